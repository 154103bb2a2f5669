//! The cell's public face: [`Cell::start`], [`Cell::connect`] and the [`LinkHandle`] a gateway
//! pushes [`ToCell`] messages into.
//!
//! [`LinkHandle::send`] never blocks and never waits for an actor: it routes each message by
//! registry lookup to the actor that owns it (`do_send`) and returns. Requests are counted per
//! link and refused as `unavailable` beyond a bound, so a flooding gateway cannot grow the
//! actors' mailboxes without limit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::Arbiter;
use confab_shared::link::{Attach, Caller, CellError, CellOp, ToCell, ToGateway};
use confab_shared::{limits, CellId};
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::link::{AttachReply, Link, Reply};
use crate::messages::{AttachSession, ChannelRequest, UserRequest, WorkspaceRequest};
use crate::registry::{ActorArbiters, Registry, Settings};
use crate::store::CellStore;
use crate::webhooks::{self, Hub, WebhookConfig};
use crate::workspace;

/// How a cell is set up.
#[derive(Debug, Clone)]
pub struct CellConfig {
    pub id: CellId,
    /// Events kept per channel for `resume` and `client_msg_id` de-duplication.
    pub retention_events: u64,
    /// Public and private channels one workspace may have (`conflict` beyond).
    pub max_channels_per_workspace: usize,
    /// Channels one user may be a member of, DMs included (`conflict` beyond).
    pub max_channels_per_user: usize,
    /// Members one channel may have (`conflict` beyond).
    pub max_members_per_channel: usize,
    /// `--max-workspaces` and `--max-connections` (default: no bound).
    pub bounds: CellBounds,
    /// Webhook delivery (SPEC §6).
    pub webhooks: WebhookConfig,
    /// Threads (actix arbiters) the cell's channel and user actors run on, at least 1. Each
    /// actor lives on one of them, placed by a hash of its key, so a channel still has exactly
    /// one seq-assigning actor (see `Registry::actor_arbiter`).
    pub actor_threads: usize,
}

/// The default of [`CellConfig::actor_threads`]: one per core.
pub fn default_actor_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How much one cell takes on (SPEC §1: `--max-workspaces N`, `--max-connections N`). The
/// cell publishes them with each heartbeat, and placement skips a cell at either bound.
///
/// At `max_connections` sessions, one more attach fails with `unavailable` (the client
/// sees the error, then `4010`, and retries later); sessions already attached are not
/// touched, and a session attaching again under its own id is never refused. At
/// `max_workspaces`, creating another workspace fails with `unavailable`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CellBounds {
    pub max_workspaces: Option<u64>,
    pub max_connections: Option<u64>,
}

impl CellConfig {
    /// A config with the protocol's default retention and limits.
    pub fn new(id: CellId) -> Self {
        CellConfig {
            id,
            retention_events: limits::RETENTION_EVENTS,
            max_channels_per_workspace: limits::MAX_CHANNELS_PER_WORKSPACE,
            max_channels_per_user: limits::MAX_CHANNELS_PER_USER,
            max_members_per_channel: limits::MAX_MEMBERS_PER_CHANNEL,
            bounds: CellBounds::default(),
            webhooks: WebhookConfig::default(),
            actor_threads: default_actor_threads(),
        }
    }
}

/// What a cell reports to the directory and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellStats {
    /// Workspaces held by the cell's store.
    pub workspaces: u64,
    /// Sessions attached right now.
    pub connections: u64,
}

/// How many actors and links a cell runs, for its gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorCounts {
    pub channel_actors: u64,
    pub user_actors: u64,
    /// Gateway links connected and not lost.
    pub links: u64,
}

/// A running cell; cheap to clone.
#[derive(Clone)]
pub struct Cell {
    id: CellId,
    pub(crate) reg: Arc<Registry>,
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cell").field("id", &self.id).finish()
    }
}

impl Cell {
    /// Starts the cell's actors on the current actix arbiter.
    ///
    /// # Panics
    /// Outside a running actix `System` (call it inside `actix_rt::System`, an actix-web
    /// server or `#[actix_rt::test]`).
    pub fn start(config: CellConfig, store: Arc<dyn CellStore>) -> Cell {
        let settings = Settings {
            retention_events: config.retention_events.max(1),
            max_channels_per_workspace: config.max_channels_per_workspace.max(1),
            max_channels_per_user: config.max_channels_per_user.max(1),
            max_members_per_channel: config.max_members_per_channel.max(2),
            bounds: config.bounds,
        };
        let hooks = Hub::start(store.clone(), config.webhooks.clone());
        let actor_arbiters = ActorArbiters::start(config.actor_threads);
        let reg = Arc::new(Registry::new(
            store,
            settings,
            Arbiter::current(),
            actor_arbiters,
            hooks,
        ));
        let counting = reg.clone();
        reg.arbiter
            .spawn(async move { workspace::refresh_workspace_count(&counting).await });
        let marking = reg.clone();
        reg.arbiter
            .spawn(async move { crate::moving::load_marks(&marking).await });
        tracing::info!(
            cell = %config.id,
            retention = config.retention_events,
            max_channels_per_workspace = reg.settings.max_channels_per_workspace,
            max_channels_per_user = reg.settings.max_channels_per_user,
            max_members_per_channel = reg.settings.max_members_per_channel,
            actor_threads = reg.actor_arbiters.len(),
            "cell started"
        );
        Cell { id: config.id, reg }
    }

    /// The cell's id.
    pub fn id(&self) -> &CellId {
        &self.id
    }

    /// The threads its channel and user actors run on (`--actor-threads`).
    pub fn actor_threads(&self) -> usize {
        self.reg.actor_arbiters.len()
    }

    /// A gateway connects: messages for it go into `outbound`. Returns the handle the
    /// gateway pushes [`ToCell`] messages into.
    pub fn connect(&self, gateway: String, outbound: mpsc::Sender<ToGateway>) -> LinkHandle {
        let link = Arc::new(Link::new(self.reg.next_link_id(), gateway, outbound));
        tracing::info!(gateway = %link.gateway, link = link.id, "gateway linked");
        // Whoever gives the link up (overflow, closed queue, dropped handle), its sessions are
        // detached here, outside of any actor.
        let (reg, watched) = (self.reg.clone(), link.clone());
        self.reg.links.insert(link.id, link.clone());
        self.reg.arbiter.spawn(async move {
            watched.lost_token().cancelled().await;
            reg.links.remove(&watched.id);
            reg.detach_link(&watched);
        });
        LinkHandle {
            reg: self.reg.clone(),
            link,
        }
    }

    /// Current counts.
    pub fn stats(&self) -> CellStats {
        CellStats {
            workspaces: self.reg.workspaces.load(Ordering::Relaxed),
            connections: self.reg.session_count() as u64,
        }
    }

    /// The bounds the cell was started with.
    pub fn bounds(&self) -> CellBounds {
        self.reg.settings.bounds
    }

    /// Live actors and links.
    pub fn actors(&self) -> ActorCounts {
        let (channels, users) = self.reg.actor_counts();
        ActorCounts {
            channel_actors: channels as u64,
            user_actors: users as u64,
            links: self.reg.links.len() as u64,
        }
    }
}

/// A gateway's end of its link to this cell. Dropping it detaches every session of the link.
pub struct LinkHandle {
    reg: Arc<Registry>,
    link: Arc<Link>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("gateway", &self.link.gateway)
            .field("link", &self.link.id)
            .finish()
    }
}

impl LinkHandle {
    /// Hands a message to the cell. Never blocks and never panics; callable from any thread.
    /// Ignored once the link is lost.
    pub fn send(&self, message: ToCell) {
        if self.link.is_lost() {
            return;
        }
        let message = if self.reg.stopping.load(Ordering::Acquire) {
            match refuse_while_stopping(&self.link, message) {
                Some(message) => message,
                None => return,
            }
        } else {
            message
        };
        match message {
            ToCell::Attach(attach) => {
                // A workspace moving in or out waits at the gate, or is told it moved.
                if let Some(attach) = self.reg.gate.admit_attach(attach, &self.link) {
                    attach_session(&self.reg, attach, &self.link);
                }
            }
            ToCell::Detach { session } => self.reg.detach_from_link(&session, &self.link),
            ToCell::Request { req, caller, op } => {
                if let Some(reply) = Reply::admit(&self.link, req) {
                    if let Some((caller, op, reply)) =
                        self.reg.gate.admit_request(caller, op, reply)
                    {
                        route_request(&self.reg, caller, op, reply);
                    }
                }
            }
            ToCell::Admin { req, op } => {
                if let Some(reply) = Reply::admit(&self.link, req) {
                    let reg = self.reg.clone();
                    self.reg.arbiter.spawn(async move {
                        reply.send(workspace::admin(&reg, op).await);
                    });
                }
            }
        }
    }

    /// Resolves when the cell gave up on this link (its queue overflowed or was closed) or
    /// the handle was dropped; the gateway then closes the link's sessions.
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        self.link.lost_token().clone().cancelled_owned()
    }

    /// A token cancelled when the link is lost (see [`LinkHandle::lost`]). It is a child
    /// token: cancelling it stops only its holder's use of the link.
    pub fn lost_token(&self) -> tokio_util::sync::CancellationToken {
        self.link.lost_token().child_token()
    }

    /// Whether the cell gave up on this link.
    pub fn is_lost(&self) -> bool {
        self.link.is_lost()
    }
}

/// Answers what a gateway sends to a cell that is shutting down: every new request and
/// attach is `unavailable` (its sessions are told to reconnect, `4010`, once the writes
/// already taken have finished). Anything else (a detach) is handed back to be served.
fn refuse_while_stopping(link: &Arc<Link>, message: ToCell) -> Option<ToCell> {
    let refusal = || CellError::unavailable("the cell is shutting down; retry");
    if let ToCell::Attach(attach) = &message {
        link.push(ToGateway::AttachFailed {
            session: attach.session.clone(),
            error: refusal(),
        });
        return None;
    }
    if let ToCell::Request { req, .. } | ToCell::Admin { req, .. } = &message {
        link.push(ToGateway::Reply {
            req: *req,
            result: Err(refusal()),
        });
        return None;
    }
    Some(message)
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        // The watcher started in `connect` detaches the sessions.
        self.link.lost_token().cancel();
    }
}

/// Registers a session and hands its attach to its user's actor.
pub(crate) fn attach_session(reg: &Arc<Registry>, attach: Attach, link: &Arc<Link>) {
    if let Some(refusal) = reg.refuse_attach(&attach.session) {
        link.push(ToGateway::AttachFailed {
            session: attach.session,
            error: refusal,
        });
        return;
    }
    let session = reg.register_session(&attach, link);
    let reply = AttachReply::new(reg.clone(), session.clone());
    reg.user(&attach.workspace, &attach.user)
        .do_send(AttachSession {
            session,
            resume: attach.resume,
            replay_limit: attach.replay_limit,
            reply,
        });
}

/// Hands a request to the part of the cell that owns its group: its channel's actor, its
/// user's actor (user and workspace ops), or the webhook hub.
pub(crate) fn route_request(reg: &Arc<Registry>, caller: Caller, op: CellOp, reply: Reply) {
    match op {
        CellOp::Channel { channel, op } => reg
            .channel(&caller.workspace, &channel)
            .do_send(ChannelRequest { caller, op, reply }),
        CellOp::User(op) => reg
            .user(&caller.workspace, &caller.user)
            .do_send(UserRequest { caller, op, reply }),
        CellOp::Workspace(op) => reg
            .user(&caller.workspace, &caller.user)
            .do_send(WorkspaceRequest { caller, op, reply }),
        CellOp::Webhook(op) => {
            let reg = reg.clone();
            reg.arbiter.clone().spawn(async move {
                reply.send(webhooks::perform(&reg, caller, op).await);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn handles_can_be_shared_across_threads() {
        assert_send_sync::<Cell>();
        assert_send_sync::<LinkHandle>();
    }
}
