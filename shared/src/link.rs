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

use std::sync::Arc;

use bytestring::ByteString;
use serde::{Deserialize, Serialize};

use crate::codes::{CloseCode, ErrorCode};
use crate::ids::{CellId, ChannelId, SessionId, UserId, WorkspaceId};
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

/// An operation on the workspace's data, on behalf of a [`Caller`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellOp {
    /// Post a message (`send`, `POST /v1/channels/{id}/messages`).
    Send {
        channel: ChannelId,
        text: String,
        client_msg_id: Option<String>,
        thread: Option<u64>,
    },
    /// Replace the text of the caller's message `seq`.
    Edit {
        channel: ChannelId,
        seq: u64,
        text: String,
    },
    /// Delete the caller's message `seq`.
    Delete { channel: ChannelId, seq: u64 },
    /// Tell the other members the caller is typing (no reply on success).
    Typing { channel: ChannelId },
    /// A page of messages.
    History {
        channel: ChannelId,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    },
    /// Make `user` a member: a join when it is the caller, an invitation otherwise.
    AddMember { channel: ChannelId, user: UserId },
    /// Remove `user` from the channel: a leave when it is the caller.
    RemoveMember { channel: ChannelId, user: UserId },
    /// Move the caller's read marker forward.
    Read { channel: ChannelId, seq: u64 },
    /// Create a public or private channel; the caller and `members` become members.
    CreateChannel {
        name: String,
        kind: ChannelKind,
        members: Vec<UserId>,
    },
    /// The caller's channels, or every public channel of the workspace.
    ListChannels { public: bool },
    /// The DM channel between the caller and `user`, created on first use.
    OpenDm { user: UserId },
    /// The members of a channel the caller may see.
    ListMembers { channel: ChannelId },
}

impl CellOp {
    /// The op name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            CellOp::Send { .. } => "send",
            CellOp::Edit { .. } => "edit",
            CellOp::Delete { .. } => "delete",
            CellOp::Typing { .. } => "typing",
            CellOp::History { .. } => "history",
            CellOp::AddMember { .. } => "add_member",
            CellOp::RemoveMember { .. } => "remove_member",
            CellOp::Read { .. } => "read",
            CellOp::CreateChannel { .. } => "create_channel",
            CellOp::ListChannels { .. } => "list_channels",
            CellOp::OpenDm { .. } => "open_dm",
            CellOp::ListMembers { .. } => "list_members",
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
}

/// The first binary frame on a link WebSocket, from the gateway: who it is, and the cluster
/// secret when the deployment sets one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHello {
    pub gateway: String,
    pub secret: Option<String>,
}

/// The cell's answer to [`LinkHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkWelcome {
    pub cell: CellId,
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
                frame: Frame {
                    text: ByteString::from_static("{\"op\":\"event\"}"),
                    created_us: 9,
                },
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
            op: CellOp::History {
                channel: ch("general"),
                before: None,
                after: Some(3),
                limit: 50,
            },
        };
        let back: ToCell = decode(&encode(&to_cell)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, to_cell);
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
}
