//! Messages between the cell's actors; each says who sends it and what it causes.

use std::sync::Arc;

use actix::Message;
use confab_shared::link::{Caller, CellError, ChannelOp, UserOp, WorkspaceOp};
use confab_shared::server::ChannelInfo;
use confab_shared::{ChannelId, SessionId, UserId};

use crate::link::{AttachReply, Reply};
use crate::registry::SessionEntry;

/// Link -> channel actor: perform a channel op (send, edit, delete, typing, history,
/// membership, member listing) on the actor's channel and answer through `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ChannelRequest {
    pub(crate) caller: Caller,
    pub(crate) op: ChannelOp,
    pub(crate) reply: Reply,
}

/// User actor -> channel actor at attach: subscribe the session and replay from `resume`;
/// answers the channel as `ready` lists it (`read_seq` 0), or `None` when the user is no member.
#[derive(Message, Clone)]
#[rtype(result = "Result<Option<ChannelInfo>, CellError>")]
pub(crate) struct Subscribe {
    pub(crate) session: Arc<SessionEntry>,
    pub(crate) resume: Option<u64>,
    pub(crate) replay_limit: u32,
}

/// Registry -> channel actor: the session detached; stop delivering to it.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Unsubscribe {
    pub(crate) session: SessionId,
}

/// Workspace ops -> channel actor of a channel just created: `members` join in order (a
/// `member_joined` each, `channel_added` first for everyone but `by`); answers the channel.
#[derive(Message)]
#[rtype(result = "Result<ChannelInfo, CellError>")]
pub(crate) struct SeedMembers {
    pub(crate) members: Vec<UserId>,
    pub(crate) by: Option<UserId>,
}

/// User actor -> channel actor: the channel as its member `user` sees it (`read_seq` 0);
/// refused as `send` would be for a non-member.
#[derive(Message)]
#[rtype(result = "Result<ChannelInfo, CellError>")]
pub(crate) struct Inspect {
    pub(crate) user: UserId,
}

/// Link -> user actor: attach a registered session: build `Ready`, subscribe and replay.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct AttachSession {
    pub(crate) session: Arc<SessionEntry>,
    pub(crate) resume: Vec<(ChannelId, u64)>,
    pub(crate) replay_limit: u32,
    pub(crate) reply: AttachReply,
}

/// Link -> user actor: a user-level op (read marker, channel listing), answered through
/// `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct UserRequest {
    pub(crate) caller: Caller,
    pub(crate) op: UserOp,
    pub(crate) reply: Reply,
}

/// Link -> the caller's user actor: a workspace op (channel creation, DM), run there for the
/// caller and answered through `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct WorkspaceRequest {
    pub(crate) caller: Caller,
    pub(crate) op: WorkspaceOp,
    pub(crate) reply: Reply,
}
