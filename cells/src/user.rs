//! [`UserActor`]: one per user of a workspace with attached sessions (or a user-level request
//! in flight). It attaches sessions (`Ready` with the user's channels, subscriptions, replay),
//! moves read markers and tells the user's other sessions, and answers the user's channel
//! listings ([`UserOp`]); the user's channel creations and DMs (`WorkspaceOp`) run here too.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::fut::WrapFuture;
use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler};
use confab_shared::link::{Caller, CellError, CellReply, UserOp};
use confab_shared::server::{ChannelInfo, Event};
use confab_shared::{limits, now_ms, now_us, ChannelId, UserId, WorkspaceId};
use futures_util::future::join_all;

use crate::channel::store_unavailable;
use crate::fanout;
use crate::link::AttachReply;
use crate::messages::{AttachSession, Inspect, Subscribe, UserRequest, WorkspaceRequest};
use crate::registry::{Registry, SessionEntry};
use crate::store::ChannelSummary;
use crate::workspace;

/// How often an actor looks at whether its user is gone.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);

/// The actor of one user of one workspace.
pub(crate) struct UserActor {
    reg: Arc<Registry>,
    workspace: WorkspaceId,
    user: UserId,
    /// Requests and attaches being processed; the actor never stops with one in flight.
    busy: usize,
}

impl Actor for UserActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(HOUSEKEEPING_EVERY, |act, ctx| {
            if act.busy == 0 && !act.reg.has_sessions(&act.workspace, &act.user) {
                act.reg
                    .forget_user(&(act.workspace.clone(), act.user.clone()), &ctx.address());
                ctx.stop();
            }
        });
    }
}

impl UserActor {
    pub(crate) fn new(reg: Arc<Registry>, workspace: WorkspaceId, user: UserId) -> Self {
        UserActor {
            reg,
            workspace,
            user,
            busy: 0,
        }
    }
}

impl Handler<AttachSession> for UserActor {
    type Result = ();

    fn handle(&mut self, msg: AttachSession, ctx: &mut Context<Self>) {
        self.busy += 1;
        let work = attach(
            self.reg.clone(),
            msg.session,
            msg.resume,
            msg.replay_limit,
            msg.reply,
        );
        // Attaches of one user run one at a time, so their subscriptions never interleave.
        ctx.wait(work.into_actor(self).map(|(), act, _| act.busy -= 1));
    }
}

impl Handler<UserRequest> for UserActor {
    type Result = ();

    fn handle(&mut self, msg: UserRequest, ctx: &mut Context<Self>) {
        self.busy += 1;
        let reg = self.reg.clone();
        let reply = msg.reply;
        let work = async move {
            let result = user_op(&reg, msg.caller, msg.op).await;
            reply.send(result);
        };
        ctx.spawn(work.into_actor(self).map(|(), act, _| act.busy -= 1));
    }
}

impl Handler<WorkspaceRequest> for UserActor {
    type Result = ();

    fn handle(&mut self, msg: WorkspaceRequest, ctx: &mut Context<Self>) {
        self.busy += 1;
        let reg = self.reg.clone();
        let reply = msg.reply;
        let work = async move {
            let result = workspace::perform(&reg, msg.caller, msg.op).await;
            reply.send(result);
        };
        ctx.spawn(work.into_actor(self).map(|(), act, _| act.busy -= 1));
    }
}

/// Attaches a session: the workspace must exist; the session is subscribed to each of the
/// user's channels (replaying what `resume` asks for), then `Ready` lists them.
async fn attach(
    reg: Arc<Registry>,
    session: Arc<SessionEntry>,
    resume: Vec<(ChannelId, u64)>,
    replay_limit: u32,
    reply: AttachReply,
) {
    match attach_channels(&reg, &session, &resume, replay_limit).await {
        Ok(channels) => reply.ready(channels),
        Err(e) => reply.fail(e),
    }
}

async fn attach_channels(
    reg: &Arc<Registry>,
    session: &Arc<SessionEntry>,
    resume: &[(ChannelId, u64)],
    replay_limit: u32,
) -> Result<Vec<ChannelInfo>, CellError> {
    let (ws, user) = (&session.workspace, &session.user);
    let store = &reg.store;
    let exists = store
        .workspace_exists(ws)
        .await
        .map_err(|e| store_unavailable(&e))?;
    if !exists {
        return Err(CellError::new(
            confab_shared::ErrorCode::NotFound,
            "unknown workspace",
        ));
    }
    let channels = store
        .user_channels(ws, user)
        .await
        .map_err(|e| store_unavailable(&e))?;
    let markers = store
        .read_markers(ws, user)
        .await
        .map_err(|e| store_unavailable(&e))?;
    let resume: HashMap<&ChannelId, u64> = resume
        .iter()
        .take(limits::MAX_RESUME_CHANNELS)
        .map(|(c, s)| (c, *s))
        .collect();
    let subscribes = channels.iter().map(|channel| {
        let msg = Subscribe {
            session: session.clone(),
            resume: resume.get(channel).copied(),
            replay_limit,
        };
        subscribe(reg, ws, channel, msg)
    });
    let mut infos = Vec::with_capacity(channels.len());
    for result in join_all(subscribes).await {
        if let Some(mut info) = result? {
            info.read_seq = markers.get(&info.id).copied().unwrap_or(0);
            infos.push(info);
        }
    }
    Ok(infos)
}

/// Subscribes through the channel's actor, once more with a fresh actor if the first one
/// stopped (went idle) with the message in its mailbox.
async fn subscribe(
    reg: &Arc<Registry>,
    ws: &WorkspaceId,
    channel: &ChannelId,
    msg: Subscribe,
) -> Result<Option<ChannelInfo>, CellError> {
    if let Ok(result) = reg.channel(ws, channel).send(msg.clone()).await {
        return result;
    }
    reg.channel(ws, channel)
        .send(msg)
        .await
        .map_err(|_| CellError::unavailable("channel unavailable, retry"))?
}

pub(crate) async fn inspect(
    reg: &Arc<Registry>,
    ws: &WorkspaceId,
    channel: &ChannelId,
    user: &UserId,
) -> Result<ChannelInfo, CellError> {
    reg.channel(ws, channel)
        .send(Inspect { user: user.clone() })
        .await
        .map_err(|_| CellError::unavailable("channel unavailable, retry"))?
}

async fn user_op(reg: &Arc<Registry>, caller: Caller, op: UserOp) -> Result<CellReply, CellError> {
    match op {
        UserOp::Read { channel, seq } => read(reg, &caller, channel, seq).await,
        UserOp::ListChannels { public } => list_channels(reg, &caller, public).await,
    }
}

/// Moves the caller's read marker to `max(marker, min(seq, last_seq))`; when it moved, the
/// user's other sessions get a `read` event.
async fn read(
    reg: &Arc<Registry>,
    caller: &Caller,
    channel: ChannelId,
    seq: u64,
) -> Result<CellReply, CellError> {
    let info = inspect(reg, &caller.workspace, &channel, &caller.user).await?;
    let marker = reg
        .store
        .advance_read_marker(
            &caller.workspace,
            &caller.user,
            &channel,
            seq.min(info.last_seq),
        )
        .await
        .map_err(|e| store_unavailable(&e))?;
    if marker.current > marker.previous {
        let others: Vec<Arc<SessionEntry>> = reg
            .sessions_of(&caller.workspace, &caller.user)
            .into_iter()
            .filter(|s| Some(&s.id) != caller.session.as_ref())
            .collect();
        if !others.is_empty() {
            let event = Event::Read {
                channel: channel.clone(),
                seq: marker.current,
            };
            metrics::counter!("confab_events_published_total").increment(1);
            fanout::deliver_to(&others, &fanout::frame(&event, now_us()));
        }
    }
    Ok(CellReply::Ack {
        channel,
        seq,
        ts: now_ms(),
    })
}

/// The caller's channels, or every public channel of the workspace.
async fn list_channels(
    reg: &Arc<Registry>,
    caller: &Caller,
    public: bool,
) -> Result<CellReply, CellError> {
    let (store, ws, user) = (&reg.store, &caller.workspace, &caller.user);
    let unavailable = |e| store_unavailable(&e);
    let mine = store.user_channels(ws, user).await.map_err(unavailable)?;
    let markers = store.read_markers(ws, user).await.map_err(unavailable)?;
    let summaries = if public {
        store.public_channels(ws).await.map_err(unavailable)?
    } else {
        store
            .channel_summaries(ws, &mine)
            .await
            .map_err(unavailable)?
    };
    let mine: HashSet<ChannelId> = mine.into_iter().collect();
    let infos = summaries
        .into_iter()
        .map(|s| {
            let read_seq = if mine.contains(&s.meta.id) {
                markers.get(&s.meta.id).copied().unwrap_or(0)
            } else {
                0
            };
            summary_info(s, read_seq)
        })
        .collect();
    Ok(CellReply::Channels(infos))
}

pub(crate) fn summary_info(summary: ChannelSummary, read_seq: u64) -> ChannelInfo {
    ChannelInfo {
        id: summary.meta.id,
        name: summary.meta.name,
        kind: summary.meta.kind,
        last_seq: summary.last_seq,
        read_seq,
    }
}
