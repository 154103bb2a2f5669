//! The cell's storage seam: the [`CellStore`] trait every engine implements, and the record
//! types it speaks in.
//!
//! The trait is shaped for Redis (the production engine) and implemented in memory by
//! [`MemoryStore`] for `confab dev` and tests. The actors above it never learn which engine runs:
//! it is chosen once, when the [`crate::Cell`] starts.
//!
//! Contract shared by every engine:
//! - Everything is keyed by workspace first; no call ever reads or writes another workspace.
//! - [`CellStore::append`] is the only write of the channel log, and it writes the event *and*
//!   its side effects ([`SideEffect`]) in one step (one `MULTI`/pipeline or script in Redis),
//!   so a crash never leaves a logged join without its membership or a message without its
//!   idempotency key. The caller acks and delivers an event only after `append` returned `Ok`.
//! - Seqs are assigned by the channel's actor; `append` refuses any seq other than
//!   `last_seq + 1` ([`StoreError::SeqConflict`]), which turns a second writer into an error
//!   instead of a fork of the log.
//! - The one exception is [`CellStore::raise_last_seq`], for a store that lost writes: the
//!   actor moves `last_seq` up to the highest seq it handed out, so none is handed out twice.
//! - A Redis store is also fenced: a newer process of the same cell claims it with a higher
//!   epoch, and every write of an older one fails with [`StoreError::Fenced`].

mod memory;
mod redis;
mod timed;

use std::collections::HashMap;

use async_trait::async_trait;
use confab_shared::moves::{KeyDump, KeyPage};
use confab_shared::server::{ChannelKind, Event, MessageView};
use confab_shared::{ChannelId, UserId, WorkspaceId};

pub use self::redis::{Persistence, RedisStore};
pub use memory::MemoryStore;
pub use timed::TimedStore;

/// Why a store call failed. Every variant reaches clients as `unavailable`: they are the
/// store's problems, not the request's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The engine cannot be reached or timed out; retrying later may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// `append` got a seq that is not the channel's next one (another writer, or a stale actor).
    #[error("seq conflict in channel {channel}: next seq is {expected}, got {got}")]
    SeqConflict {
        channel: ChannelId,
        expected: u64,
        got: u64,
    },
    /// A write named a channel that does not exist.
    #[error("channel {0} does not exist")]
    NoSuchChannel(ChannelId),
    /// `append` was given an ephemeral event (typing, read, ...), which has no place in a log.
    #[error("{0} events are not logged")]
    NotLoggable(&'static str),
    /// [`CellStore::append_joins`] was given an event that is not a `member_joined`.
    #[error("append_joins takes member_joined events, not {0}")]
    NotAJoin(&'static str),
    /// Stored data could not be read back (a bug or a foreign writer).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// Another process claimed the store with a newer epoch (same cell id started twice):
    /// this process's writes are refused and it must stop serving.
    #[error("store fenced: {0}")]
    Fenced(String),
    /// A step of a workspace move that the workspace's state in this store does not allow
    /// (another move's epoch, a workspace already released, an engine that cannot move).
    #[error("move refused: {0}")]
    MoveRefused(String),
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// What a channel is, apart from its log and members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMeta {
    pub id: ChannelId,
    pub name: String,
    pub kind: ChannelKind,
}

/// A channel to create, with the unique claims it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChannel {
    pub meta: ChannelMeta,
    /// For a DM: the two users, sorted; the pair may own at most one channel.
    pub dm_pair: Option<(UserId, UserId)>,
    /// For a public or private channel: the most public and private channels the workspace
    /// may have, this one included (`None`: no bound). DMs are never counted.
    pub max_channels: Option<u64>,
}

/// The outcome of [`CellStore::create_channel`]; nothing is written unless `Created`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// The workspace was never created on this cell.
    UnknownWorkspace,
    /// A channel with this id exists.
    IdTaken,
    /// A public channel of the workspace already has this name. Only public channels claim
    /// their names (SPEC §3): a private one collides with nothing, so that creating a channel
    /// never tells whether a private channel of that name exists.
    NameTaken,
    /// The workspace already has [`NewChannel::max_channels`] public and private channels.
    TooManyChannels,
    /// The DM pair already has its channel, this one.
    DmExists(ChannelId),
}

/// Everything a channel's actor loads when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSnapshot {
    pub meta: ChannelMeta,
    /// Seq of the latest event (0 when the log is empty).
    pub last_seq: u64,
    /// Seq of the oldest event still in the log (`last_seq + 1` when the log is empty).
    pub first_seq: u64,
    pub members: Vec<UserId>,
}

/// A channel as listings need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSummary {
    pub meta: ChannelMeta,
    pub last_seq: u64,
}

/// A page request over a channel's messages (not its other events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageQuery {
    /// Only messages with seq > `after`.
    pub after: u64,
    /// Only messages with seq < `before` (`u64::MAX` for no bound).
    pub before: u64,
    /// At most this many messages.
    pub limit: usize,
    /// Take the newest `limit` of the range (else the oldest). The result is ascending anyway.
    pub newest_first: bool,
}

/// A read marker after [`CellStore::advance_read_marker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMarker {
    pub previous: u64,
    pub current: u64,
}

/// The state change an appended event implies, besides its place in the log. Engines apply
/// it in the same atomic step as the append; [`side_effect`] is the one interpretation both
/// engines share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideEffect<'a> {
    /// Store the message's current state (for history) and, when it has a `client_msg_id`,
    /// the idempotency key `(channel, user, client_msg_id) -> (seq, ts)`.
    NewMessage(MessageView),
    /// Replace the text of message `target` and mark it edited.
    Edited { target: u64, text: &'a str },
    /// Mark message `target` deleted and clear its text.
    Deleted { target: u64 },
    /// Add `user` to the channel's members and the channel to the user's channel list.
    Joined(&'a UserId),
    /// The reverse of `Joined`.
    Left(&'a UserId),
}

/// A registered webhook (SPEC §6) as the store keeps it, under its workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    /// `W` and 16 random alphanumerics.
    pub id: String,
    /// The user that registered it and whose membership it follows.
    pub user: UserId,
    pub url: String,
    /// Hex of 32 random bytes, the HMAC key of its signatures.
    pub secret: String,
    /// Event types it receives (`message`, `member_joined`, ...).
    pub events: Vec<String>,
    /// The channels named at registration; `None`: every channel of its user.
    pub channels: Option<Vec<ChannelId>>,
    pub state: WebhookState,
}

/// The parts of a webhook its deliveries change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookState {
    /// `"status":"disabled"`: nothing is attempted until it is enabled again.
    pub disabled: bool,
    /// What the last failed attempt got; `None` after a success.
    pub last_error: Option<String>,
    /// Unix ms of the first failure after the last success (the disable rule's clock).
    pub failing_since_ms: Option<u64>,
}

/// The outcome of [`CellStore::create_webhook`]; nothing is written unless `Created`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookCreate {
    Created,
    /// The user already has the most webhooks a user may have.
    TooMany,
    /// The workspace was never created on this cell.
    UnknownWorkspace,
    /// A webhook with this id exists.
    IdTaken,
}

/// The side effect of a log event; `None` for events that are not logged.
pub fn side_effect(event: &Event) -> Option<SideEffect<'_>> {
    Some(match event {
        Event::Message {
            seq,
            ts,
            user,
            text,
            client_msg_id,
            thread,
            ..
        } => SideEffect::NewMessage(MessageView {
            seq: *seq,
            ts: *ts,
            user: user.clone(),
            text: text.clone(),
            client_msg_id: client_msg_id.clone(),
            thread: *thread,
            edited: false,
            deleted: false,
        }),
        Event::MessageEdited { target, text, .. } => SideEffect::Edited {
            target: *target,
            text,
        },
        Event::MessageDeleted { target, .. } => SideEffect::Deleted { target: *target },
        Event::MemberJoined { user, .. } => SideEffect::Joined(user),
        Event::MemberLeft { user, .. } => SideEffect::Left(user),
        _ => return None,
    })
}

/// Where a workspace stands in a move, as a store records it durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveMark {
    /// Leaving, still serving: writes are recorded for the final copy.
    Copying(u64),
    /// Leaving, frozen: every write of the workspace is refused.
    Frozen(u64),
    /// Left: the directory points elsewhere; every write is refused.
    Gone(u64),
    /// Arriving: the copy is under way; not served yet.
    Incoming(u64),
}

/// The refusal of every move step by an engine that cannot move workspaces.
fn cannot_move() -> StoreError {
    StoreError::MoveRefused("this store engine does not move workspaces".into())
}

/// A cell's durable state. Object-safe; every method is one round trip (or one pipeline) in a
/// Redis engine.
#[async_trait]
pub trait CellStore: Send + Sync + 'static {
    /// Creates the workspace; `false` when it already existed (nothing changes then).
    async fn create_workspace(
        &self,
        workspace: &WorkspaceId,
        name: Option<&str>,
    ) -> StoreResult<bool>;

    /// Whether the workspace was created on this cell.
    async fn workspace_exists(&self, workspace: &WorkspaceId) -> StoreResult<bool>;

    /// How many workspaces this cell holds.
    async fn workspace_count(&self) -> StoreResult<u64>;

    /// Creates an empty channel (no members, no events), claiming its id, its name (public
    /// channels) or its DM pair atomically, within the workspace's channel bound.
    async fn create_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &NewChannel,
    ) -> StoreResult<CreateOutcome>;

    /// The channel's metadata, seq window and members; `None` when it does not exist.
    async fn load_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelSnapshot>>;

    /// Summaries of the named channels that exist, in the order given.
    async fn channel_summaries(
        &self,
        workspace: &WorkspaceId,
        channels: &[ChannelId],
    ) -> StoreResult<Vec<ChannelSummary>>;

    /// Every public channel of the workspace, ordered by id.
    async fn public_channels(&self, workspace: &WorkspaceId) -> StoreResult<Vec<ChannelSummary>>;

    /// The DM channel of a user pair (sorted), if it was created.
    async fn dm_channel(
        &self,
        workspace: &WorkspaceId,
        pair: (&UserId, &UserId),
    ) -> StoreResult<Option<ChannelId>>;

    /// Appends a log event at its seq (must be `last_seq + 1`), applies its [`SideEffect`] and
    /// trims the log to its newest `retention` events, dropping the idempotency keys of the
    /// trimmed messages (message states stay, for history), all in one atomic step.
    async fn append(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        event: &Event,
        retention: u64,
    ) -> StoreResult<()>;

    /// Appends `member_joined` events of consecutive seqs, each as [`CellStore::append`]
    /// would, in one round trip. It stops before the first event whose user is already a
    /// member of `max_user_channels` channels (that event and the ones after it are not
    /// written) and returns how many were appended. Every event is checked and written
    /// atomically on its own: a failure may leave a prefix written, which a reload finds.
    async fn append_joins(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        events: &[Event],
        retention: u64,
        max_user_channels: u64,
    ) -> StoreResult<usize>;
    /// Moves the channel's `last_seq` from `expected` up to `to`, leaving the seqs between
    /// unused, in one atomic step. For a store that lost writes (an async replica promoted, an
    /// append-only file truncated): seqs a cell already handed out must not be handed out
    /// again with other content, so it continues above them. `SeqConflict` when `last_seq` is
    /// not `expected` (or `to` is not above it). Retained events up to `expected` may be
    /// dropped from the log by the step (an engine that keeps the log contiguous does).
    async fn raise_last_seq(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        expected: u64,
        to: u64,
    ) -> StoreResult<()>;

    /// Up to `max` logged events with seq > `after`, ascending. Events trimmed away are
    /// missing: the caller checks that the first one is `after + 1`.
    async fn events_after(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        after: u64,
        max: usize,
    ) -> StoreResult<Vec<Event>>;

    /// The `(seq, ts)` of the message `user` sent with `client_msg_id` in the channel, while
    /// that message is still within retention.
    async fn find_client_msg(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        user: &UserId,
        client_msg_id: &str,
    ) -> StoreResult<Option<(u64, u64)>>;

    /// A message as it stands now (kept beyond retention).
    async fn message(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<Option<MessageView>>;

    /// A page of messages as they stand now, ascending by seq.
    async fn messages(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        query: MessageQuery,
    ) -> StoreResult<Vec<MessageView>>;

    /// The channels `user` is a member of, ordered by id.
    async fn user_channels(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> StoreResult<Vec<ChannelId>>;

    /// How many channels each of `users` is a member of, in the order given, in one round
    /// trip.
    async fn channel_counts(
        &self,
        workspace: &WorkspaceId,
        users: &[UserId],
    ) -> StoreResult<Vec<u64>>;

    /// Each of `users`' read marker in `channel` (0 without one), in the order given, in one
    /// round trip.
    async fn read_markers_in(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        users: &[UserId],
    ) -> StoreResult<Vec<u64>>;

    /// The user's read markers, by channel (channels without a marker are absent).
    async fn read_markers(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> StoreResult<HashMap<ChannelId, u64>>;

    /// Moves the user's marker in the channel to `max(marker, seq)` atomically.
    async fn advance_read_marker(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<ReadMarker>;

    /// Every workspace this cell holds (the webhook worker rebuilds its index from them at
    /// start).
    async fn workspace_ids(&self) -> StoreResult<Vec<WorkspaceId>>;

    /// Stores a new webhook, unless its user already has `max_per_user` of them.
    async fn create_webhook(
        &self,
        workspace: &WorkspaceId,
        hook: &WebhookRecord,
        max_per_user: u64,
    ) -> StoreResult<WebhookCreate>;

    /// Every webhook of the workspace, ordered by id.
    async fn webhooks(&self, workspace: &WorkspaceId) -> StoreResult<Vec<WebhookRecord>>;

    /// Deletes a webhook and its delivery cursors; `false` when there was none.
    async fn delete_webhook(&self, workspace: &WorkspaceId, id: &str) -> StoreResult<bool>;

    /// Replaces a webhook's [`WebhookState`]; `false` when the webhook does not exist (a
    /// deleted webhook is never brought back).
    async fn set_webhook_state(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        state: &WebhookState,
    ) -> StoreResult<bool>;

    /// A webhook's delivery cursors: per channel, the seq up to which its events are done
    /// (delivered, dropped or filtered out). The pending deliveries are the channel's log
    /// events after it.
    async fn webhook_cursors(
        &self,
        workspace: &WorkspaceId,
        id: &str,
    ) -> StoreResult<HashMap<ChannelId, u64>>;

    /// Moves a webhook's cursor in a channel to `max(cursor, seq)` (creating it at `seq`);
    /// nothing when the webhook does not exist.
    async fn advance_webhook_cursor(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<()>;

    // Moves (see `confab_shared::moves`). An engine that cannot move workspaces (the memory
    // engine of `confab dev`, which has one cell) refuses every step.

    /// The workspaces this store holds a move mark for, read when the cell starts.
    async fn move_marks(&self) -> StoreResult<Vec<(WorkspaceId, MoveMark)>> {
        Ok(Vec::new())
    }

    /// Source: marks the workspace `Copying(epoch)`, so that every write of it from now on is
    /// recorded, and lists its keys for [`CellStore::export_keys`].
    async fn begin_export(&self, _workspace: &WorkspaceId, _epoch: u64) -> StoreResult<()> {
        Err(cannot_move())
    }

    /// Source: the page of listed keys starting at `start`, with their values.
    async fn export_keys(&self, _workspace: &WorkspaceId, _start: u64) -> StoreResult<KeyPage> {
        Err(cannot_move())
    }

    /// Source: marks the workspace `Frozen(epoch)` (every write refused from now on) and lists
    /// the keys written since `begin_export` for [`CellStore::export_keys`].
    async fn freeze(&self, _workspace: &WorkspaceId, _epoch: u64) -> StoreResult<()> {
        Err(cannot_move())
    }

    /// Source: marks the workspace `Gone(epoch)` and forgets it (every write of it is refused
    /// from now on); its keys are deleted by [`CellStore::purge_workspace`].
    async fn release(&self, _workspace: &WorkspaceId, _epoch: u64) -> StoreResult<()> {
        Err(cannot_move())
    }

    /// Deletes every key of a workspace this store no longer serves (`Gone`).
    async fn purge_workspace(&self, _workspace: &WorkspaceId) -> StoreResult<()> {
        Err(cannot_move())
    }

    /// Source: clears a `Copying` or `Frozen` mark of `epoch`; the workspace is written again.
    /// Refused once the workspace is `Gone`.
    async fn abort_export(&self, _workspace: &WorkspaceId, _epoch: u64) -> StoreResult<()> {
        Err(cannot_move())
    }

    /// Target: marks the workspace `Incoming(epoch)` and deletes whatever is left of it.
    /// Refused when the store serves the workspace.
    async fn begin_import(&self, _workspace: &WorkspaceId, _epoch: u64) -> StoreResult<()> {
        Err(cannot_move())
    }

    /// Target: writes keys as they were on the source (a key without a value is deleted).
    async fn import_keys(
        &self,
        _workspace: &WorkspaceId,
        _epoch: u64,
        _keys: &[KeyDump],
    ) -> StoreResult<()> {
        Err(cannot_move())
    }

    /// Target: the workspace is complete; it joins the store's workspaces.
    async fn commit_import(&self, _workspace: &WorkspaceId, _epoch: u64) -> StoreResult<()> {
        Err(cannot_move())
    }

    /// Target: drops an import that did not switch.
    async fn abort_import(&self, _workspace: &WorkspaceId, _epoch: u64) -> StoreResult<()> {
        Err(cannot_move())
    }
}
