//! The gateway<->cell link protocol: the one seam between the `gateway` and `cells` crates.
//!
//! A gateway holds one link per cell. Over it the gateway attaches and detaches client sessions
//! and forwards requests; the cell answers with `Ready`, `Reply` and, for fanout, `Deliver`:
//! one encoded frame plus the list of this gateway's sessions that must receive it, so a cell
//! sends each event once per gateway and the gateway fans it out locally.
//!
//! In `confab dev` the messages travel through in-process channels; between processes they
//! travel as binary WebSocket frames encoded with [`encode`] / [`decode`] (postcard). The types
//! here therefore avoid serde features postcard cannot express (internally tagged or untagged
//! enums, skipped fields).
//!
//! Ordering contract: a link delivers messages in the order they were sent. The cell sends every
//! frame of one channel from one actor, so per channel a session sees events in seq order; a
//! session's `Ready` may arrive after `Deliver`s for it, and the gateway holds those back until
//! `Ready` has been written.

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use bytestring::ByteString;
use serde::{Deserialize, Serialize};

use crate::codes::{CloseCode, ErrorCode};
use crate::ids::{CellId, ChannelId, SessionId, UserId, WorkspaceId};
use crate::moves::{KeyPage, MoveOp};
use crate::server::{ChannelInfo, ChannelKind, MessageView};

/// Correlates a [`ToCell::Request`] or [`ToCell::Admin`] with its [`ToGateway::Reply`];
/// unique per link.
pub type RequestKey = u64;

/// One server frame, encoded once, with the time its event was created in the cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The frame's JSON text, exactly as written to client sockets.
    pub text: ByteString,
    /// Unix microseconds at which the cell created the event (for delivery latency).
    pub created_us: u64,
    /// The text's permessage-deflate form, made by the first session that needs it and
    /// shared by every clone of the frame, so that a fanout compresses an event once. Never
    /// sent over a link: each gateway makes its own.
    #[serde(skip)]
    pub deflated: Deflated,
}

impl Frame {
    pub fn new(text: ByteString, created_us: u64) -> Frame {
        Frame {
            text,
            created_us,
            deflated: Deflated::default(),
        }
    }
}

/// The compressed form of a [`Frame`], computed at most once for all its clones. A cache, not
/// part of the frame's value: frames compare equal whatever it holds.
#[derive(Clone, Default)]
pub struct Deflated(Arc<OnceLock<Option<Bytes>>>);

impl Deflated {
    /// The compressed form, made by `compress` the first time any clone asks; `None` when the
    /// frame goes out uncompressed.
    pub fn get_or_init(&self, compress: impl FnOnce() -> Option<Bytes>) -> Option<&Bytes> {
        self.0.get_or_init(compress).as_ref()
    }
}

impl PartialEq for Deflated {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Deflated {}

impl fmt::Debug for Deflated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.get() {
            Some(Some(bytes)) => write!(f, "Deflated({} bytes)", bytes.len()),
            Some(None) => f.write_str("Deflated(none)"),
            None => f.write_str("Deflated(not yet)"),
        }
    }
}

/// Who performs a request: a user of a workspace, through a WebSocket session or over HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub workspace: WorkspaceId,
    pub user: UserId,
    /// The WebSocket session the request came from; `None` for the HTTP API.
    pub session: Option<SessionId>,
}

/// A session's request to join the cell: the cell answers [`ToGateway::Ready`] (then replays
/// what `resume` asks for) or [`ToGateway::AttachFailed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    pub session: SessionId,
    pub workspace: WorkspaceId,
    pub user: UserId,
    /// Channels to replay, each with the last seq the client saw.
    pub resume: Vec<(ChannelId, u64)>,
    /// Most events the session's queue takes in one replay; a longer gap is answered with
    /// `resync` so a resume can never overflow the queue it fills.
    pub replay_limit: u32,
}

/// An operation on the workspace's data, on behalf of a [`Caller`], grouped by the part of
/// the cell that performs it: the cell routes on the group alone, and each actor is handed
/// only the ops it performs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellOp {
    /// An op on one channel, performed by that channel's actor.
    Channel { channel: ChannelId, op: ChannelOp },
    /// An op on the caller's own state, performed by the caller's user actor.
    User(UserOp),
    /// An op that creates channels in the workspace (`cells/src/workspace.rs`), run for the
    /// caller on the caller's user actor.
    Workspace(WorkspaceOp),
    /// An op on the caller's webhooks, performed by the cell's webhook hub.
    Webhook(WebhookOp),
}

impl CellOp {
    /// The op name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            CellOp::Channel { op, .. } => op.name(),
            CellOp::User(op) => op.name(),
            CellOp::Workspace(op) => op.name(),
            CellOp::Webhook(op) => op.name(),
        }
    }

    /// An op on `channel`.
    pub fn channel(channel: ChannelId, op: ChannelOp) -> CellOp {
        CellOp::Channel { channel, op }
    }
}

impl From<UserOp> for CellOp {
    fn from(op: UserOp) -> CellOp {
        CellOp::User(op)
    }
}

impl From<WorkspaceOp> for CellOp {
    fn from(op: WorkspaceOp) -> CellOp {
        CellOp::Workspace(op)
    }
}

impl From<WebhookOp> for CellOp {
    fn from(op: WebhookOp) -> CellOp {
        CellOp::Webhook(op)
    }
}

/// An op on one channel ([`CellOp::Channel`] names the channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelOp {
    /// Post a message (`send`, `POST /v1/channels/{id}/messages`).
    Send {
        text: String,
        client_msg_id: Option<String>,
        thread: Option<u64>,
    },
    /// Replace the text of the caller's message `seq`.
    Edit { seq: u64, text: String },
    /// Delete the caller's message `seq`.
    Delete { seq: u64 },
    /// Tell the other members the caller is typing (no reply on success).
    Typing,
    /// A page of messages.
    History {
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    },
    /// Make `user` a member: a join when it is the caller, an invitation otherwise.
    AddMember { user: UserId },
    /// Remove `user` from the channel: a leave when it is the caller.
    RemoveMember { user: UserId },
    /// The members of a channel the caller may see.
    ListMembers,
}

impl ChannelOp {
    /// The op name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ChannelOp::Send { .. } => "send",
            ChannelOp::Edit { .. } => "edit",
            ChannelOp::Delete { .. } => "delete",
            ChannelOp::Typing => "typing",
            ChannelOp::History { .. } => "history",
            ChannelOp::AddMember { .. } => "add_member",
            ChannelOp::RemoveMember { .. } => "remove_member",
            ChannelOp::ListMembers => "list_members",
        }
    }
}

/// An op on the caller's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserOp {
    /// Move the caller's read marker forward.
    Read { channel: ChannelId, seq: u64 },
    /// The caller's channels, or every public channel of the workspace.
    ListChannels { public: bool },
}

impl UserOp {
    /// The op name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            UserOp::Read { .. } => "read",
            UserOp::ListChannels { .. } => "list_channels",
        }
    }
}

/// An op that creates a channel of the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkspaceOp {
    /// Create a public or private channel; the caller and `members` become members.
    CreateChannel {
        name: String,
        kind: ChannelKind,
        members: Vec<UserId>,
    },
    /// The DM channel between the caller and `user`, created on first use.
    OpenDm { user: UserId },
}

impl WorkspaceOp {
    /// The op name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            WorkspaceOp::CreateChannel { .. } => "create_channel",
            WorkspaceOp::OpenDm { .. } => "open_dm",
        }
    }
}

/// An op on the caller's webhooks (SPEC §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WebhookOp {
    /// Register a webhook for the caller: `events` of `channels` (or of every channel the
    /// caller is a member of) are POSTed to `url`.
    Create {
        url: String,
        events: Vec<String>,
        channels: Option<Vec<ChannelId>>,
    },
    /// The caller's webhooks.
    List,
    /// Delete one of the caller's webhooks, with its pending deliveries.
    Delete { id: String },
    /// Turn one of the caller's disabled webhooks back to `active`.
    Enable { id: String },
}

impl WebhookOp {
    /// The op name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            WebhookOp::Create { .. } => "create_webhook",
            WebhookOp::List => "list_webhooks",
            WebhookOp::Delete { .. } => "delete_webhook",
            WebhookOp::Enable { .. } => "enable_webhook",
        }
    }
}

/// Operator requests, sent by the gateway's admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminOp {
    /// Create an empty workspace on this cell (the directory already points it here).
    CreateWorkspace {
        workspace: WorkspaceId,
        name: Option<String>,
    },
    /// Seed a channel with members, as `confab dev` does for `demo`/`general`; a no-op when
    /// the channel exists.
    SeedChannel {
        workspace: WorkspaceId,
        channel: ChannelId,
        kind: ChannelKind,
        members: Vec<UserId>,
    },
    /// One step of a live workspace move (see [`crate::moves`]).
    Move(MoveOp),
}

/// The successful outcome of a [`CellOp`] or [`AdminOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellReply {
    /// The seq and ts of the event the op created, or of the channel's latest event when a
    /// membership op changed nothing, or the marker's seq for `Read`.
    Ack {
        channel: ChannelId,
        seq: u64,
        ts: u64,
    },
    History {
        channel: ChannelId,
        messages: Vec<MessageView>,
        has_more: bool,
    },
    Channel(ChannelInfo),
    Channels(Vec<ChannelInfo>),
    Members(Vec<UserId>),
    /// Done, nothing to report (typing, admin ops).
    Done,
    /// A webhook was registered; its secret is shown this once.
    WebhookCreated {
        id: String,
        secret: String,
    },
    /// The caller's webhooks.
    Webhooks(Vec<WebhookInfo>),
    /// A page of a workspace's store keys, for a move.
    Keys(KeyPage),
}

/// A webhook as `GET /v1/webhooks` lists it (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookInfo {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    /// The channels named at registration; `None`: every channel the owner is a member of.
    pub channels: Option<Vec<ChannelId>>,
    /// `active` or `disabled`.
    pub status: String,
    /// What the last failed attempt got (a status code, a timeout, a refused address);
    /// `None` when the last attempt succeeded or none was made.
    pub last_error: Option<String>,
}

/// A refused op: a SPEC error code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct CellError {
    pub code: ErrorCode,
    pub message: String,
}

impl CellError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CellError {
            code,
            message: message.into(),
        }
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}

/// Gateway to cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCell {
    /// Attach a session that has said `hello` with a valid token.
    Attach(Attach),
    /// The session is gone (closed, or its gateway is dropping it).
    Detach { session: SessionId },
    /// Perform `op` for `caller`; answered by a `Reply` with the same `req`.
    Request {
        req: RequestKey,
        caller: Caller,
        op: CellOp,
    },
    /// Perform an operator request; answered by a `Reply` with the same `req`.
    Admin { req: RequestKey, op: AdminOp },
}

/// Cell to gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToGateway {
    /// The session is attached: here are the user's channels. Replayed events follow.
    Ready {
        session: SessionId,
        channels: Vec<ChannelInfo>,
    },
    /// The session could not be attached (e.g. unknown workspace); the gateway closes it.
    AttachFailed {
        session: SessionId,
        error: CellError,
    },
    /// Write `frame` to each of `sessions` (all on this gateway).
    Deliver {
        sessions: Arc<[SessionId]>,
        frame: Frame,
    },
    /// The outcome of request `req`.
    Reply {
        req: RequestKey,
        result: Result<CellReply, CellError>,
    },
    /// Close the session with `code` (e.g. `4010` while its workspace moves).
    Close { session: SessionId, code: CloseCode },
    /// Request `req`'s workspace moved to another cell and the request was not performed:
    /// the gateway looks the workspace up again and sends it there.
    Moved { req: RequestKey },
    /// The session's workspace moved to another cell; it was not attached. The gateway looks
    /// the workspace up again and the session reconnects (`4010`).
    AttachMoved { session: SessionId },
}

/// Random bytes each side of a link contributes to its handshake, so that no proof can be
/// replayed on another link.
pub type LinkNonce = [u8; 32];
/// An HMAC-SHA256 over the handshake's transcript, keyed with the cluster secret.
pub type LinkProof = [u8; 32];

/// The first binary frame on a link WebSocket, from the gateway: who it is, and its nonce.
/// The cluster secret itself never crosses the wire; each side proves it holds it by an
/// HMAC over both nonces ([`LinkChallenge`], [`LinkAuth`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHello {
    pub gateway: String,
    pub nonce: LinkNonce,
    /// The sender's [`LINK_PROTOCOL`]; last, so that a hello of a build without it fails to
    /// decode instead of being misread.
    pub protocol: u32,
}

/// The version of the link's message encoding. postcard encodes enum variants by position, so
/// any change to a link message other than a variant appended at the end changes it; a cell
/// and a gateway link only when theirs are equal, and otherwise refuse each other with a clear
/// error rather than misreading each other's messages.
///
/// 1: the vocabulary until the typed ops; 2: `CellOp` grouped by the actor that performs it;
/// 3: a cell's messages wrapped in [`crate::recipient_lists::Incoming`].
pub const LINK_PROTOCOL: u32 = 3;

/// The cell's answer to [`LinkHello`]: who it is, its own nonce and, when it has a cluster
/// secret, its proof over [`transcript`]`(`[`LinkRole::Cell`]`, ..)`. A gateway with a secret
/// refuses a cell without a valid proof before sending anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkChallenge {
    pub cell: CellId,
    pub nonce: LinkNonce,
    pub proof: Option<LinkProof>,
    /// The cell's [`LINK_PROTOCOL`] (last, as in [`LinkHello`]).
    pub protocol: u32,
}

/// The gateway's proof over [`transcript`]`(`[`LinkRole::Gateway`]`, ..)`, when it has a
/// cluster secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkAuth {
    pub proof: Option<LinkProof>,
}

/// The cell's last handshake frame: the gateway is authenticated and the link is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkWelcome {
    pub cell: CellId,
}

/// Which side of a link a proof comes from. Part of the transcript, so that a proof one side
/// sends can never be reflected back as the other side's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRole {
    Gateway,
    Cell,
}

/// The bytes a link proof is computed over: a protocol label, the role, both names and both
/// nonces, each length-prefixed so that no two transcripts are ambiguous.
pub fn transcript(
    role: LinkRole,
    gateway: &str,
    cell: &CellId,
    gateway_nonce: &LinkNonce,
    cell_nonce: &LinkNonce,
) -> Vec<u8> {
    let role = match role {
        LinkRole::Gateway => b"gateway".as_slice(),
        LinkRole::Cell => b"cell".as_slice(),
    };
    let mut out = Vec::with_capacity(160);
    for part in [
        b"confab-link-v1".as_slice(),
        role,
        gateway.as_bytes(),
        cell.as_str().as_bytes(),
        gateway_nonce.as_slice(),
        cell_nonce.as_slice(),
    ] {
        // Every part is short (names are bounded before this is called).
        out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Why bytes are not a link message.
#[derive(Debug, thiserror::Error)]
#[error("bad link message: {0}")]
pub struct DecodeError(#[from] postcard::Error);

/// Encodes a link message to the bytes of one binary WebSocket frame.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // postcard only fails on types it cannot express, which this module avoids (tested below).
    postcard::to_stdvec(message).unwrap_or_default()
}

/// Decodes one binary link frame.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    Ok(postcard::from_bytes(bytes)?)
}

/// Appends one message to a batch: several link messages travel in one WebSocket frame, each
/// right after the other (postcard is self-delimiting).
pub fn encode_into<T: Serialize>(message: &T, batch: &mut Vec<u8>) {
    // postcard only fails on types it cannot express, which this module avoids.
    *batch = postcard::to_extend(message, std::mem::take(batch)).unwrap_or_default();
}

/// Decodes every message of a batch, in order.
pub fn decode_batch<'a, T: Deserialize<'a>>(mut bytes: &'a [u8]) -> Result<Vec<T>, DecodeError> {
    let mut messages = Vec::new();
    while !bytes.is_empty() {
        let (message, rest) = postcard::take_from_bytes(bytes)?;
        messages.push(message);
        bytes = rest;
    }
    Ok(messages)
}

// ---------------------------------------------------------------------------------------
// Frames: how messages travel over a link transport that bounds its frame size.

/// First byte of a frame holding whole messages, one right after the other.
const FRAME_BATCH: u8 = 0;
/// First byte of a frame holding a piece of one message, more pieces following.
const FRAME_MORE: u8 = 1;
/// First byte of a frame holding the last piece of one message.
const FRAME_LAST: u8 = 2;

/// Largest message a link carries, summed over its fragments: a sender refuses to send more
/// and a receiver refuses to buffer more, so one peer bounds what the other holds.
pub const MAX_LINK_MESSAGE: usize = 64 * 1024 * 1024;

/// How a writer cuts messages into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// A message longer than this travels as fragments of at most this many bytes.
    pub fragment: usize,
    /// A writer stops adding whole messages to a frame past this many bytes.
    pub batch: usize,
}

impl Framing {
    /// The framing whose frames never exceed `max_frame` bytes: a batch frame holds at most
    /// `batch + fragment + 1` bytes (its last message may be up to `fragment` long).
    pub fn for_max_frame(max_frame: usize) -> Framing {
        let fragment = (max_frame.saturating_sub(2) / 2).clamp(16, 1024 * 1024);
        Framing {
            fragment,
            batch: fragment.min(256 * 1024),
        }
    }
}

/// A message the link refuses to carry: its encoding is over [`MAX_LINK_MESSAGE`].
#[derive(Debug, thiserror::Error)]
#[error("link message of {0} bytes is over the link's bound")]
pub struct MessageTooLarge(pub usize);

/// Builds the frames of one write from queued messages, in order: whole messages share batch
/// frames, and a message longer than [`Framing::fragment`] is cut into fragments that follow
/// one another, so no frame exceeds the transport's bound whatever a message's size.
#[derive(Debug)]
pub struct FrameWriter {
    framing: Framing,
    batch: Vec<u8>,
    frames: Vec<Vec<u8>>,
    framed_bytes: usize,
}

impl FrameWriter {
    pub fn new(framing: Framing) -> FrameWriter {
        FrameWriter {
            framing,
            batch: Vec::new(),
            frames: Vec::new(),
            framed_bytes: 0,
        }
    }

    /// Adds one message; a message over [`MAX_LINK_MESSAGE`] is left out and reported.
    pub fn push<T: Serialize>(&mut self, message: &T) -> Result<(), MessageTooLarge> {
        if self.batch.is_empty() {
            self.batch.reserve(1024);
            self.batch.push(FRAME_BATCH);
        }
        let start = self.batch.len();
        encode_into(message, &mut self.batch);
        let len = self.batch.len().saturating_sub(start);
        if len <= self.framing.fragment {
            return Ok(());
        }
        let big = self.batch.split_off(start);
        if len > MAX_LINK_MESSAGE {
            return Err(MessageTooLarge(len));
        }
        self.flush_batch();
        let mut pieces = big.chunks(self.framing.fragment).peekable();
        while let Some(piece) = pieces.next() {
            let kind = if pieces.peek().is_some() {
                FRAME_MORE
            } else {
                FRAME_LAST
            };
            let mut frame = Vec::with_capacity(piece.len() + 1);
            frame.push(kind);
            frame.extend_from_slice(piece);
            self.framed_bytes += frame.len();
            self.frames.push(frame);
        }
        Ok(())
    }

    /// Whether this write holds enough to be sent without waiting for more messages.
    pub fn is_full(&self) -> bool {
        self.batch.len() + self.framed_bytes >= self.framing.batch
    }

    /// Whether no message was added since the last [`FrameWriter::take`].
    pub fn is_empty(&self) -> bool {
        self.batch.len() <= 1 && self.frames.is_empty()
    }

    /// The frames built so far, in order; the writer starts over.
    pub fn take(&mut self) -> Vec<Vec<u8>> {
        self.flush_batch();
        self.framed_bytes = 0;
        std::mem::take(&mut self.frames)
    }

    fn flush_batch(&mut self) {
        if self.batch.len() > 1 {
            let batch = std::mem::take(&mut self.batch);
            self.framed_bytes += batch.len();
            self.frames.push(batch);
        } else {
            self.batch.clear();
        }
    }
}

/// Why a frame is not part of a valid link stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("empty link frame")]
    Empty,
    #[error("unknown link frame kind {0}")]
    UnknownKind(u8),
    #[error("a batch frame in the middle of a fragmented message")]
    Interleaved,
    #[error("fragmented link message over {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// The receiving side of [`FrameWriter`]: decodes batch frames and joins fragments, holding
/// at most `max_message` bytes of one unfinished message.
#[derive(Debug)]
pub struct Reassembler {
    partial: Vec<u8>,
    max_message: usize,
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(MAX_LINK_MESSAGE)
    }
}

impl Reassembler {
    pub fn new(max_message: usize) -> Reassembler {
        Reassembler {
            partial: Vec::new(),
            max_message,
        }
    }

    /// The messages `frame` completes (none for a fragment that is not the last).
    pub fn push<T: serde::de::DeserializeOwned>(
        &mut self,
        frame: &[u8],
    ) -> Result<Vec<T>, FrameError> {
        let (&kind, body) = frame.split_first().ok_or(FrameError::Empty)?;
        match kind {
            FRAME_BATCH if self.partial.is_empty() => Ok(decode_batch(body)?),
            FRAME_BATCH => Err(FrameError::Interleaved),
            FRAME_MORE | FRAME_LAST => {
                if self.partial.len() + body.len() > self.max_message {
                    return Err(FrameError::TooLarge(self.max_message));
                }
                self.partial.extend_from_slice(body);
                if kind == FRAME_MORE {
                    return Ok(Vec::new());
                }
                let whole = std::mem::take(&mut self.partial);
                Ok(vec![decode(&whole)?])
            }
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> ChannelId {
        ChannelId::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_message_kind_round_trips_through_the_binary_encoding() {
        let session = SessionId::new("s1").unwrap_or_else(|e| panic!("{e}"));
        let to_gateway = vec![
            ToGateway::Ready {
                session: session.clone(),
                channels: vec![ChannelInfo {
                    id: ch("general"),
                    name: "general".into(),
                    kind: ChannelKind::Public,
                    last_seq: 4,
                    read_seq: 2,
                }],
            },
            ToGateway::Deliver {
                sessions: Arc::from(vec![session.clone()]),
                frame: Frame::new(ByteString::from_static("{\"op\":\"event\"}"), 9),
            },
            ToGateway::Reply {
                req: 3,
                result: Err(CellError::not_found("channel")),
            },
            ToGateway::Reply {
                req: 4,
                result: Ok(CellReply::Ack {
                    channel: ch("general"),
                    seq: 5,
                    ts: 6,
                }),
            },
            ToGateway::Close {
                session: session.clone(),
                code: CloseCode::ReconnectNow,
            },
        ];
        for message in to_gateway {
            let bytes = encode(&message);
            let back: ToGateway = decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, message);
        }
        let to_cell = ToCell::Request {
            req: 1,
            caller: Caller {
                workspace: WorkspaceId::new("demo").unwrap_or_else(|e| panic!("{e}")),
                user: UserId::new("alice").unwrap_or_else(|e| panic!("{e}")),
                session: Some(session),
            },
            op: CellOp::channel(
                ch("general"),
                ChannelOp::History {
                    before: None,
                    after: Some(3),
                    limit: 50,
                },
            ),
        };
        let back: ToCell = decode(&encode(&to_cell)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, to_cell);
    }

    #[test]
    fn every_op_keeps_the_name_logs_and_metrics_know_it_by() {
        let user = || UserId::new("bob").unwrap_or_else(|e| panic!("{e}"));
        let on = |op| CellOp::channel(ch("general"), op);
        let ops = [
            (
                on(ChannelOp::Send {
                    text: "hi".into(),
                    client_msg_id: None,
                    thread: None,
                }),
                "send",
            ),
            (
                on(ChannelOp::Edit {
                    seq: 1,
                    text: "x".into(),
                }),
                "edit",
            ),
            (on(ChannelOp::Delete { seq: 1 }), "delete"),
            (on(ChannelOp::Typing), "typing"),
            (
                on(ChannelOp::History {
                    before: None,
                    after: None,
                    limit: 1,
                }),
                "history",
            ),
            (on(ChannelOp::AddMember { user: user() }), "add_member"),
            (
                on(ChannelOp::RemoveMember { user: user() }),
                "remove_member",
            ),
            (on(ChannelOp::ListMembers), "list_members"),
            (
                UserOp::Read {
                    channel: ch("general"),
                    seq: 1,
                }
                .into(),
                "read",
            ),
            (
                UserOp::ListChannels { public: true }.into(),
                "list_channels",
            ),
            (
                WorkspaceOp::CreateChannel {
                    name: "x".into(),
                    kind: ChannelKind::Public,
                    members: vec![],
                }
                .into(),
                "create_channel",
            ),
            (WorkspaceOp::OpenDm { user: user() }.into(), "open_dm"),
            (
                WebhookOp::Create {
                    url: "http://h/".into(),
                    events: vec![],
                    channels: None,
                }
                .into(),
                "create_webhook",
            ),
            (WebhookOp::List.into(), "list_webhooks"),
            (
                WebhookOp::Delete { id: "w".into() }.into(),
                "delete_webhook",
            ),
            (
                WebhookOp::Enable { id: "w".into() }.into(),
                "enable_webhook",
            ),
        ];
        for (op, name) in ops {
            assert_eq!(op.name(), name, "{op:?}");
        }
    }

    #[test]
    fn a_batch_carries_several_messages_in_order() {
        let mut batch = Vec::new();
        for session in ["a", "b", "c"] {
            let message = ToCell::Detach {
                session: SessionId::new(session).unwrap_or_else(|e| panic!("{e}")),
            };
            encode_into(&message, &mut batch);
        }
        let back: Vec<ToCell> = decode_batch(&batch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.len(), 3);
        assert!(matches!(&back[2], ToCell::Detach { session } if session.as_str() == "c"));
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(decode::<ToCell>(&[0xff, 0xff, 0xff]).is_err());
    }

    fn detach(n: usize) -> ToCell {
        ToCell::Detach {
            session: SessionId::new(&format!("s{n}")).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// A message whose encoding is a little over `bytes` long.
    fn big_reply(bytes: usize) -> ToGateway {
        ToGateway::Deliver {
            sessions: Arc::from(vec![]),
            frame: Frame::new(ByteString::from("x".repeat(bytes)), 1),
        }
    }

    fn receive<T: serde::de::DeserializeOwned>(frames: &[Vec<u8>]) -> Vec<T> {
        let mut reassembler = Reassembler::default();
        let mut out = Vec::new();
        for frame in frames {
            out.extend(
                reassembler
                    .push::<T>(frame)
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        out
    }

    #[test]
    fn a_message_larger_than_a_frame_travels_as_fragments_and_comes_back_whole() {
        let framing = Framing::for_max_frame(64 * 1024);
        let mut writer = FrameWriter::new(framing);
        let big = big_reply(1024 * 1024);
        writer.push(&detach(1)).unwrap_or_else(|e| panic!("{e}"));
        writer.push(&big).unwrap_or_else(|e| panic!("{e}"));
        writer
            .push(&ToGateway::Close {
                session: SessionId::new("s2").unwrap_or_else(|e| panic!("{e}")),
                code: CloseCode::ReconnectNow,
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let frames = writer.take();
        assert!(frames.len() > 16, "{} frames", frames.len());
        for frame in &frames {
            assert!(frame.len() <= 64 * 1024, "a frame of {} bytes", frame.len());
        }
        // The first frame is the batch before the big message (a Detach, read as ToCell).
        let first: Vec<ToCell> = receive(&frames[..1]);
        assert_eq!(first, vec![detach(1)]);
        let rest: Vec<ToGateway> = receive(&frames[1..]);
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0], big);
        assert!(matches!(rest[1], ToGateway::Close { .. }));
        assert!(writer.is_empty());
    }

    #[test]
    fn small_messages_share_one_batch_frame() {
        let mut writer = FrameWriter::new(Framing::for_max_frame(16 * 1024 * 1024));
        for n in 0..100 {
            writer.push(&detach(n)).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(!writer.is_full());
        let frames = writer.take();
        assert_eq!(frames.len(), 1);
        let back: Vec<ToCell> = receive(&frames);
        assert_eq!(back.len(), 100);
        assert_eq!(back[99], detach(99));
    }

    #[test]
    fn a_receiver_refuses_to_buffer_more_than_its_bound() {
        let mut writer = FrameWriter::new(Framing::for_max_frame(1024));
        writer
            .push(&big_reply(10_000))
            .unwrap_or_else(|e| panic!("{e}"));
        let frames = writer.take();
        let mut reassembler = Reassembler::new(4096);
        let outcome = frames
            .iter()
            .map(|f| reassembler.push::<ToGateway>(f))
            .find(|r| r.is_err());
        assert!(matches!(outcome, Some(Err(FrameError::TooLarge(4096)))));
    }

    #[test]
    fn a_sender_refuses_a_message_over_the_link_bound() {
        let mut writer = FrameWriter::new(Framing::for_max_frame(16 * 1024 * 1024));
        let outcome = writer.push(&big_reply(MAX_LINK_MESSAGE + 1));
        assert!(matches!(outcome, Err(MessageTooLarge(_))));
        assert!(writer.is_empty());
        writer.push(&detach(1)).unwrap_or_else(|e| panic!("{e}"));
        let back: Vec<ToCell> = receive(&writer.take());
        assert_eq!(back, vec![detach(1)]);
    }

    #[test]
    fn malformed_frame_streams_are_errors() {
        let mut reassembler = Reassembler::default();
        assert!(matches!(
            reassembler.push::<ToCell>(&[]),
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            reassembler.push::<ToCell>(&[9, 1]),
            Err(FrameError::UnknownKind(9))
        ));
        assert!(reassembler.push::<ToCell>(&[FRAME_MORE, 1]).is_ok());
        assert!(matches!(
            reassembler.push::<ToCell>(&[FRAME_BATCH]),
            Err(FrameError::Interleaved)
        ));
    }

    #[test]
    fn proofs_of_the_two_roles_differ() {
        let cell = CellId::new("c1").unwrap_or_else(|e| panic!("{e}"));
        let a = transcript(LinkRole::Gateway, "gw", &cell, &[1; 32], &[2; 32]);
        let b = transcript(LinkRole::Cell, "gw", &cell, &[1; 32], &[2; 32]);
        let c = transcript(LinkRole::Gateway, "gw", &cell, &[2; 32], &[1; 32]);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
