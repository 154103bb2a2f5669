//! The cell's part in a live workspace move: the move gate on the routing path, and the steps
//! (`confab_shared::moves::MoveOp`) a gateway drives.
//!
//! The gate holds the workspaces that are moving in or out of this cell. Other workspaces never
//! meet it: their requests pass after one failed map lookup. For a moving workspace:
//! - `Copying` (leaving, still serving): requests pass, each watched so that one refused by the
//!   store because the workspace froze meanwhile is diverted here instead of failing;
//! - `Frozen` (leaving) and `Incoming` (arriving): requests and attaches wait here — at most
//!   [`MAX_HELD`] of them and [`HOLD_LIMIT`] long, then `unavailable` — until the move goes
//!   through (they are answered "moved" on the source, served on the target) or is undone;
//! - `Gone` (left): requests are answered "moved" and attaches "attach moved", so a gateway that
//!   missed the directory's switch still ends on the right cell.
//!
//! The store keeps the same marks durably and its write scripts check them, so a write never
//! lands on a workspace that left, even in a process that has not heard of it yet.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_shared::link::{Attach, Caller, CellError, CellOp, CellReply, ToGateway};
use confab_shared::moves::MoveOp;
use confab_shared::{CloseCode, ErrorCode, WorkspaceId};
use dashmap::DashMap;

use crate::cell::{attach_session, route_request};
use crate::link::{Link, Reply};
use crate::registry::Registry;
use crate::store::{MoveMark, StoreError};
use crate::workspace::refresh_workspace_count;

/// Most requests and attaches that wait for one workspace's move; more are `unavailable`.
pub(crate) const MAX_HELD: usize = 10_000;
/// Longest a request waits for a move before it is answered `unavailable`.
pub(crate) const HOLD_LIMIT: Duration = Duration::from_secs(5);

/// Where a workspace stands at this cell's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Copying,
    Frozen,
    Incoming,
    Gone,
}

/// Something waiting for a move.
enum Held {
    Request {
        caller: Caller,
        op: CellOp,
        reply: Reply,
    },
    /// A request the store refused because the workspace froze while it ran; it was not
    /// performed, and is answered "moved" or with its own failure.
    Failed {
        reply: Reply,
        result: Result<CellReply, CellError>,
    },
    Attach {
        attach: Attach,
        link: Arc<Link>,
    },
}

struct Entry {
    phase: Phase,
    /// When the workspace started waiting (`Frozen`, `Incoming`), for [`HOLD_LIMIT`].
    since: Instant,
    held: Vec<Held>,
}

impl Entry {
    fn new(phase: Phase) -> Entry {
        Entry {
            phase,
            since: Instant::now(),
            held: Vec::new(),
        }
    }

    fn waits(&self) -> bool {
        matches!(self.phase, Phase::Frozen | Phase::Incoming)
    }

    /// Whether one more may wait: the bounds in count and time.
    fn has_room(&self) -> bool {
        self.held.len() < MAX_HELD && self.since.elapsed() < HOLD_LIMIT
    }
}

/// The move gate (see the module docs).
#[derive(Default)]
pub(crate) struct MoveGate {
    workspaces: DashMap<WorkspaceId, Entry>,
    /// How many workspaces the gate holds: every request reads it, and an atomic load is
    /// cheaper than asking the map (whose emptiness check visits every shard).
    held_workspaces: AtomicUsize,
}

fn waiting_too_long() -> CellError {
    CellError::unavailable("the workspace is moving, retry")
}

impl MoveGate {
    /// No workspace is moving in or out: the hot path's only cost.
    fn is_idle(&self) -> bool {
        self.held_workspaces.load(Ordering::Acquire) == 0
    }

    /// A request, unless it waits here or was answered: the request to route, watched when its
    /// workspace is leaving.
    pub(crate) fn admit_request(
        self: &Arc<Self>,
        caller: Caller,
        op: CellOp,
        mut reply: Reply,
    ) -> Option<(Caller, CellOp, Reply)> {
        if self.is_idle() {
            return Some((caller, op, reply));
        }
        let Some(mut entry) = self.workspaces.get_mut(&caller.workspace) else {
            return Some((caller, op, reply));
        };
        match entry.phase {
            Phase::Copying => {
                drop(entry);
                reply.watch_move(Arc::clone(self), caller.workspace.clone());
                Some((caller, op, reply))
            }
            Phase::Gone => {
                drop(entry);
                reply.moved();
                None
            }
            Phase::Frozen | Phase::Incoming if entry.has_room() => {
                entry.held.push(Held::Request { caller, op, reply });
                None
            }
            Phase::Frozen | Phase::Incoming => {
                drop(entry);
                reply.send(Err(waiting_too_long()));
                None
            }
        }
    }

    /// An attach, unless it waits here or was answered.
    pub(crate) fn admit_attach(&self, attach: Attach, link: &Arc<Link>) -> Option<Attach> {
        if self.is_idle() {
            return Some(attach);
        }
        let Some(mut entry) = self.workspaces.get_mut(&attach.workspace) else {
            return Some(attach);
        };
        match entry.phase {
            Phase::Copying => Some(attach),
            Phase::Gone => {
                link.push(ToGateway::AttachMoved {
                    session: attach.session,
                });
                None
            }
            Phase::Frozen | Phase::Incoming if entry.has_room() => {
                entry.held.push(Held::Attach {
                    attach,
                    link: Arc::clone(link),
                });
                None
            }
            Phase::Frozen | Phase::Incoming => {
                link.push(ToGateway::AttachFailed {
                    session: attach.session,
                    error: waiting_too_long(),
                });
                None
            }
        }
    }

    /// A watched request failed (`unavailable`): if its workspace froze or left meanwhile, the
    /// store refused it because of the move, so it waits for the move's outcome; otherwise
    /// the failure is answered as it is.
    pub(crate) fn divert_failure(
        &self,
        workspace: &WorkspaceId,
        reply: Reply,
        result: Result<CellReply, CellError>,
    ) {
        let mut reply = Some(reply);
        if let Some(mut entry) = self.workspaces.get_mut(workspace) {
            match entry.phase {
                Phase::Frozen if entry.held.len() < MAX_HELD => {
                    if let Some(reply) = reply.take() {
                        entry.held.push(Held::Failed {
                            reply,
                            result: result.clone(),
                        });
                    }
                }
                Phase::Gone => {
                    if let Some(reply) = reply.take() {
                        drop(entry);
                        reply.moved();
                    }
                }
                _ => {}
            }
        }
        if let Some(reply) = reply {
            reply.send(result);
        }
    }

    fn set(&self, workspace: &WorkspaceId, phase: Phase) -> Vec<Held> {
        match self.workspaces.get_mut(workspace) {
            Some(mut entry) => {
                let was_waiting = entry.waits();
                entry.phase = phase;
                if !entry.waits() {
                    return std::mem::take(&mut entry.held);
                }
                if !was_waiting {
                    entry.since = Instant::now();
                }
                Vec::new()
            }
            None => {
                if self
                    .workspaces
                    .insert(workspace.clone(), Entry::new(phase))
                    .is_none()
                {
                    self.held_workspaces.fetch_add(1, Ordering::AcqRel);
                }
                Vec::new()
            }
        }
    }

    /// Removes the workspace from the gate; what waited is returned.
    fn open(&self, workspace: &WorkspaceId) -> Vec<Held> {
        match self.workspaces.remove(workspace) {
            Some((_, entry)) => {
                self.held_workspaces.fetch_sub(1, Ordering::AcqRel);
                entry.held
            }
            None => Vec::new(),
        }
    }

    /// Answers what waited longer than [`HOLD_LIMIT`] with `unavailable`.
    fn expire(&self, workspace: &WorkspaceId) {
        let expired = match self.workspaces.get_mut(workspace) {
            Some(mut entry) if entry.waits() && entry.since.elapsed() >= HOLD_LIMIT => {
                std::mem::take(&mut entry.held)
            }
            _ => return,
        };
        if !expired.is_empty() {
            tracing::warn!(workspace = %workspace, waiting = expired.len(), "move took too long; waiting requests answered unavailable");
        }
        for held in expired {
            fail(held, waiting_too_long());
        }
    }
}

fn fail(held: Held, error: CellError) {
    match held {
        Held::Request { reply, .. } => reply.send(Err(error)),
        Held::Failed { reply, .. } => reply.send(Err(error)),
        Held::Attach { attach, link } => {
            link.push(ToGateway::AttachFailed {
                session: attach.session,
                error,
            });
        }
    }
}

/// The workspace is served here (again): what waited goes on as if it had just arrived.
fn resume(reg: &Arc<Registry>, held: Vec<Held>) {
    for held in held {
        match held {
            Held::Request { caller, op, reply } => route_request(reg, caller, op, reply),
            Held::Failed { reply, result } => reply.send(result),
            Held::Attach { attach, link } => {
                if !link.is_lost() {
                    attach_session(reg, attach, &link);
                }
            }
        }
    }
}

/// The workspace is served elsewhere: what waited is told so, and the gateway retries there.
fn redirect(held: Vec<Held>) {
    for held in held {
        match held {
            Held::Request { reply, .. } | Held::Failed { reply, .. } => reply.moved(),
            Held::Attach { attach, link } => {
                link.push(ToGateway::AttachMoved {
                    session: attach.session,
                });
            }
        }
    }
}

/// Starts waiting at the gate, and answers `unavailable` whatever still waits after
/// [`HOLD_LIMIT`].
fn start_waiting(reg: &Arc<Registry>, workspace: &WorkspaceId, phase: Phase) {
    let held = reg.gate.set(workspace, phase);
    resume(reg, held);
    let (reg, workspace) = (reg.clone(), workspace.clone());
    reg.arbiter.clone().spawn(async move {
        tokio::time::sleep(HOLD_LIMIT).await;
        reg.gate.expire(&workspace);
    });
}

/// Puts the store's durable marks on the gate when the cell starts.
pub(crate) async fn load_marks(reg: &Arc<Registry>) {
    let marks = match reg.store.move_marks().await {
        Ok(marks) => marks,
        Err(e) => {
            tracing::warn!(error = %e, "could not read move marks; the store's fence still refuses writes of moved workspaces");
            return;
        }
    };
    for (workspace, mark) in marks {
        tracing::info!(workspace = %workspace, mark = ?mark, "workspace move mark");
        match mark {
            MoveMark::Copying(_) => drop(reg.gate.set(&workspace, Phase::Copying)),
            MoveMark::Frozen(_) => start_waiting(reg, &workspace, Phase::Frozen),
            MoveMark::Incoming(_) => start_waiting(reg, &workspace, Phase::Incoming),
            MoveMark::Gone(_) => drop(reg.gate.set(&workspace, Phase::Gone)),
        }
    }
}

fn step_error(step: &MoveOp, e: StoreError) -> CellError {
    let code = match e {
        StoreError::MoveRefused(_) => ErrorCode::Conflict,
        _ => ErrorCode::Unavailable,
    };
    CellError::new(code, format!("move step {}: {e}", step.name()))
}

/// Performs one step of a move.
pub(crate) async fn step(reg: &Arc<Registry>, op: MoveOp) -> Result<CellReply, CellError> {
    let store = &reg.store;
    let ws = op.workspace().clone();
    let outcome = match &op {
        MoveOp::ExportBegin { epoch, .. } => {
            let begun = store.begin_export(&ws, *epoch).await;
            if begun.is_ok() {
                drop(reg.gate.set(&ws, Phase::Copying));
            }
            begun.map(|()| CellReply::Done)
        }
        MoveOp::ExportPage { cursor, .. } | MoveOp::ExportDirty { cursor, .. } => {
            store.export_keys(&ws, *cursor).await.map(CellReply::Keys)
        }
        MoveOp::Freeze { epoch, .. } => {
            // The gate first: from here on new requests wait; then the store's durable fence
            // refuses whatever write was already on its way.
            start_waiting(reg, &ws, Phase::Frozen);
            store.freeze(&ws, *epoch).await.map(|()| CellReply::Done)
        }
        MoveOp::Release { epoch, .. } => {
            let released = store.release(&ws, *epoch).await;
            if released.is_ok() {
                // Waiting requests go to the new cell first; the old copy is deleted after.
                release(reg, &ws);
                refresh_workspace_count(reg).await;
                let (reg, ws) = (reg.clone(), ws.clone());
                reg.arbiter.clone().spawn(async move {
                    if let Err(e) = reg.store.purge_workspace(&ws).await {
                        tracing::warn!(workspace = %ws, error = %e, "could not delete a released workspace's keys");
                    }
                });
            }
            released.map(|()| CellReply::Done)
        }
        MoveOp::Abort { epoch, .. } => {
            let undone = store.abort_export(&ws, *epoch).await;
            if undone.is_ok() {
                resume(reg, reg.gate.open(&ws));
            }
            undone.map(|()| CellReply::Done)
        }
        MoveOp::ImportBegin { epoch, .. } => {
            start_waiting(reg, &ws, Phase::Incoming);
            reg.forget_workspace(&ws);
            store
                .begin_import(&ws, *epoch)
                .await
                .map(|()| CellReply::Done)
        }
        MoveOp::ImportPage { epoch, keys, .. } => store
            .import_keys(&ws, *epoch, keys)
            .await
            .map(|()| CellReply::Done),
        MoveOp::ImportCommit { epoch, .. } => {
            let committed = store.commit_import(&ws, *epoch).await;
            if committed.is_ok() {
                resume(reg, reg.gate.open(&ws));
                reg.webhooks.workspace_arrived(ws.clone());
                refresh_workspace_count(reg).await;
            }
            committed.map(|()| CellReply::Done)
        }
        MoveOp::ImportAbort { epoch, .. } => {
            let undone = store.abort_import(&ws, *epoch).await;
            if undone.is_ok() {
                redirect(reg.gate.open(&ws));
                reg.forget_workspace(&ws);
                refresh_workspace_count(reg).await;
            }
            undone.map(|()| CellReply::Done)
        }
    };
    if outcome.is_ok() {
        tracing::info!(workspace = %ws, step = op.name(), "move step done");
    }
    outcome.map_err(|e| step_error(&op, e))
}

/// The workspace left: what waited and whatever arrives later is told "moved", its sessions
/// reconnect (`4010`, to the new cell), and its actors are forgotten.
fn release(reg: &Arc<Registry>, ws: &WorkspaceId) {
    let held = reg.gate.set(ws, Phase::Gone);
    redirect(held);
    let sessions = reg.sessions_in(ws);
    tracing::info!(workspace = %ws, sessions = sessions.len(), "workspace released; its sessions reconnect");
    for session in sessions {
        session.link.push(ToGateway::Close {
            session: session.id.clone(),
            code: CloseCode::ReconnectNow,
        });
        reg.detach_session(&session.id);
    }
    reg.forget_workspace(ws);
    reg.webhooks.workspace_left(ws);
}
