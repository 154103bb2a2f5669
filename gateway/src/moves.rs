//! Live workspace moves and drains (SPEC §7), driven by the gateway that got the admin
//! request, which holds links to both cells.
//!
//! A move, step by step (each step carries the move's epoch, see `confab_directory::moves`):
//! 1. the directory records the move (`begin_move`: one at a time per workspace);
//! 2. the target drops anything left of the workspace and waits for it (`ImportBegin`);
//! 3. the source records what is written from now on and lists its keys (`ExportBegin`); its
//!    keys are copied page by page while it keeps serving (`ExportPage` → `ImportPage`);
//! 4. the directory notes `frozen`; the source freezes the workspace (`Freeze`: requests wait
//!    in the cell, the store refuses any write of it, durably) and only the keys written since
//!    step 3 are copied (`ExportDirty` → `ImportPage`);
//! 5. the directory switches (a compare-and-set on the epoch and the source), announcing it;
//! 6. the target serves (`ImportCommit`: what waited there goes on), then the source lets go
//!    (`Release`: what waited is answered "moved" and follows the workspace, sessions get
//!    `4010` and resume on the target);
//! 7. the directory forgets the move.
//!
//! A failure before step 5 undoes the move (`Abort` on the source, `ImportAbort` on the
//! target); after it, the move can only be finished. A gateway that dies mid-move leaves the
//! directory's record, whose lease then runs out: every gateway sweeps for such records
//! ([`recover_abandoned`]) and finishes (switched) or undoes (not switched) them.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use confab_directory::{
    choose_cell, CellRecord, CellStatus, MoveBegun, MovePhase, MoveRecord, MOVE_LEASE_MS,
};
use confab_shared::link::{AdminOp, CellError, CellReply};
use confab_shared::moves::{KeyDump, KeyPage, MoveOp};
use confab_shared::{now_ms, CellId, WorkspaceId};
use dashmap::DashMap;

use crate::server::Gateway;

/// Counter: workspace moves by `outcome` (`done`, `failed`, `undone`).
pub const MOVES: &str = "confab_workspace_moves_total";
/// Histogram: seconds a moving workspace was frozen (writes waiting).
pub const FREEZE_SECONDS: &str = "confab_workspace_move_freeze_seconds";
/// Histogram: seconds a move took, from its record to its release.
pub const MOVE_SECONDS: &str = "confab_workspace_move_seconds";

/// How often a gateway renews the lease of a move it drives.
const LEASE_RENEW_EVERY: Duration = Duration::from_secs(2);
/// How often a gateway looks for moves whose driver died.
pub const RECOVER_EVERY: Duration = Duration::from_secs(3);
/// Attempts of a step that must happen once the directory switched (commit, release).
const FINISH_ATTEMPTS: usize = 5;
/// Pause of a drain before it tries again when no cell of its region can take a workspace.
const DRAIN_RETRY: Duration = Duration::from_secs(2);

/// Why a move did not happen (or did not finish).
#[derive(Debug, Clone, thiserror::Error)]
pub enum MoveError {
    #[error("workspace {0} not found")]
    UnknownWorkspace(WorkspaceId),
    #[error("cell {0} not found")]
    UnknownCell(CellId),
    /// Down, draining or full: `503`.
    #[error("cell {0} cannot take the workspace: {1}")]
    TargetUnavailable(CellId, String),
    /// Another move of the workspace is under way.
    #[error("workspace {0} is being moved already (to {1})")]
    Busy(WorkspaceId, CellId),
    /// A step failed; the move was undone (or will be, by a sweep).
    #[error("move failed: {0}")]
    Failed(String),
}

/// A move that went through.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub workspace: WorkspaceId,
    pub from: CellId,
    pub cell: CellId,
    pub region: String,
    /// `false` when the workspace was on that cell already.
    pub moved: bool,
    /// Keys copied, bulk and final.
    pub keys: u64,
    /// How long writes waited.
    pub freeze: Duration,
    pub total: Duration,
}

fn outcome(name: &'static str) {
    metrics::counter!(MOVES, "outcome" => name).increment(1);
}

/// Makes the move metrics' series exist from the start, with their help texts.
pub fn describe() {
    metrics::describe_counter!(MOVES, "workspace moves, by outcome (done, failed, undone)");
    metrics::describe_histogram!(
        FREEZE_SECONDS,
        metrics::Unit::Seconds,
        "how long a moving workspace's writes waited"
    );
    metrics::describe_histogram!(
        MOVE_SECONDS,
        metrics::Unit::Seconds,
        "how long a workspace move took, bulk copy included"
    );
    for name in ["done", "failed", "undone"] {
        metrics::counter!(MOVES, "outcome" => name).increment(0);
    }
}

fn phase_code(phase: MovePhase) -> u8 {
    match phase {
        MovePhase::Copying => 0,
        MovePhase::Frozen => 1,
        MovePhase::Switched => 2,
        MovePhase::Undoing => 3,
    }
}

fn phase_of(code: u8) -> MovePhase {
    match code {
        0 => MovePhase::Copying,
        1 => MovePhase::Frozen,
        2 => MovePhase::Switched,
        _ => MovePhase::Undoing,
    }
}

/// Whether `cell` may take a moving workspace; why not otherwise (down, draining, or full by
/// its `--max-workspaces` or `--max-connections`: all `503`).
fn refusal(cell: &CellRecord, now: u64) -> Option<String> {
    match cell.status(now) {
        CellStatus::Healthy if cell.has_room() => None,
        CellStatus::Healthy => Some("it is full".into()),
        CellStatus::Draining => Some("it is draining".into()),
        CellStatus::Down => Some("it is down".into()),
    }
}

/// Moves `workspace` to `to` and returns once it is served there (SPEC §7). The move runs in
/// a task of its own, so that a caller that gives up (an HTTP client that disconnects) never
/// cuts it off half-way.
pub async fn move_workspace(
    gateway: &Arc<Gateway>,
    workspace: &WorkspaceId,
    to: &CellId,
) -> Result<MoveReport, MoveError> {
    let (gateway, workspace, to) = (gateway.clone(), workspace.clone(), to.clone());
    tokio::spawn(async move { run_move(&gateway, &workspace, &to).await })
        .await
        .unwrap_or_else(|e| Err(MoveError::Failed(format!("the move task failed: {e}"))))
}

async fn run_move(
    gateway: &Arc<Gateway>,
    workspace: &WorkspaceId,
    to: &CellId,
) -> Result<MoveReport, MoveError> {
    let started = Instant::now();
    let directory = &gateway.directory;
    let failed = |e: &dyn std::fmt::Display| MoveError::Failed(e.to_string());
    let record = directory
        .workspace(workspace)
        .await
        .map_err(|e| failed(&e))?
        .ok_or_else(|| MoveError::UnknownWorkspace(workspace.clone()))?;
    let cells = directory.cells().await.map_err(|e| failed(&e))?;
    let target = cells
        .iter()
        .find(|c| &c.id == to)
        .ok_or_else(|| MoveError::UnknownCell(to.clone()))?;
    // A move left behind by a gateway that died is finished or undone first.
    if let Some(earlier) = directory
        .move_record(workspace)
        .await
        .map_err(|e| failed(&e))?
    {
        if earlier.lease_until_ms > now_ms() {
            return Err(MoveError::Busy(workspace.clone(), earlier.to));
        }
        recover(gateway, &earlier).await?;
    }
    let record = directory
        .workspace(workspace)
        .await
        .map_err(|e| failed(&e))?
        .unwrap_or(record);
    if &record.cell == to {
        return Ok(MoveReport {
            workspace: workspace.clone(),
            from: record.cell.clone(),
            cell: record.cell,
            region: record.region,
            moved: false,
            keys: 0,
            freeze: Duration::ZERO,
            total: started.elapsed(),
        });
    }
    if let Some(why) = refusal(target, now_ms()) {
        return Err(MoveError::TargetUnavailable(to.clone(), why));
    }
    let begun = directory
        .begin_move(MoveRecord {
            workspace: workspace.clone(),
            from: record.cell.clone(),
            to: to.clone(),
            to_region: target.region.clone(),
            epoch: 0,
            phase: MovePhase::Copying,
            lease_until_ms: now_ms() + MOVE_LEASE_MS,
        })
        .await
        .map_err(|e| failed(&e))?;
    let plan = match begun {
        MoveBegun::Started(plan) => plan,
        MoveBegun::Busy(other) => return Err(MoveError::Busy(workspace.clone(), other.to)),
        MoveBegun::UnknownWorkspace => return Err(MoveError::UnknownWorkspace(workspace.clone())),
    };
    tracing::info!(workspace = %workspace, from = %plan.from, to = %plan.to, epoch = plan.epoch, "workspace move started");
    let phase = Arc::new(AtomicU8::new(phase_code(MovePhase::Copying)));
    let lease = tokio::spawn(renew_lease(gateway.clone(), plan.clone(), phase.clone()));
    let run = Mover {
        gateway,
        plan: &plan,
        phase: &phase,
    }
    .run()
    .await;
    lease.abort();
    match run {
        Ok((keys, freeze)) => {
            outcome("done");
            let total = started.elapsed();
            metrics::histogram!(FREEZE_SECONDS).record(freeze.as_secs_f64());
            metrics::histogram!(MOVE_SECONDS).record(total.as_secs_f64());
            tracing::info!(workspace = %workspace, to = %plan.to, keys, freeze_ms = freeze.as_millis() as u64, total_ms = total.as_millis() as u64, "workspace moved");
            Ok(MoveReport {
                workspace: workspace.clone(),
                from: plan.from.clone(),
                cell: plan.to.clone(),
                region: plan.to_region.clone(),
                moved: true,
                keys,
                freeze,
                total,
            })
        }
        Err(e) => {
            outcome("failed");
            tracing::warn!(workspace = %workspace, to = %plan.to, error = %e, "workspace move failed");
            if let Err(undo) = recover(gateway, &plan).await {
                // The record stays; a sweep finishes the job once the cells answer.
                tracing::warn!(workspace = %workspace, error = %undo, "move not undone yet; a sweep will");
                let _ = directory
                    .update_move(
                        workspace,
                        plan.epoch,
                        phase_of(phase.load(Ordering::Acquire)),
                        0,
                    )
                    .await;
            }
            Err(e)
        }
    }
}

/// Renews a move's lease while its driver runs.
async fn renew_lease(gateway: Arc<Gateway>, plan: MoveRecord, phase: Arc<AtomicU8>) {
    loop {
        tokio::time::sleep(LEASE_RENEW_EVERY).await;
        let current = phase_of(phase.load(Ordering::Acquire));
        let renewed = gateway
            .directory
            .update_move(
                &plan.workspace,
                plan.epoch,
                current,
                now_ms() + MOVE_LEASE_MS,
            )
            .await;
        if let Err(e) = renewed {
            tracing::warn!(workspace = %plan.workspace, error = %e, "could not renew a move's lease");
        }
    }
}

/// One running move.
struct Mover<'a> {
    gateway: &'a Arc<Gateway>,
    plan: &'a MoveRecord,
    phase: &'a AtomicU8,
}

impl Mover<'_> {
    async fn step(&self, cell: &CellId, op: MoveOp) -> Result<CellReply, MoveError> {
        let name = op.name();
        self.gateway
            .links
            .admin(cell, AdminOp::Move(op))
            .await
            .map_err(|e: CellError| {
                MoveError::Failed(format!("{name} on cell {cell}: {}", e.message))
            })
    }

    async fn set_phase(&self, phase: MovePhase) -> Result<(), MoveError> {
        self.phase.store(phase_code(phase), Ordering::Release);
        let plan = self.plan;
        let held = self
            .gateway
            .directory
            .update_move(&plan.workspace, plan.epoch, phase, now_ms() + MOVE_LEASE_MS)
            .await
            .map_err(|e| MoveError::Failed(e.to_string()))?;
        if !held {
            return Err(MoveError::Failed(
                "the move was taken over (its lease ran out)".into(),
            ));
        }
        Ok(())
    }

    /// Copies pages until the source says the export is complete: all keys, or (`dirty`)
    /// those written since the export began.
    async fn copy(&self, dirty: bool) -> Result<u64, MoveError> {
        let mut page = self.export(dirty, 0).await?;
        let mut keys = 0u64;
        loop {
            keys += page.keys.len() as u64;
            let Some(cursor) = page.next else {
                self.import(page.keys).await?;
                return Ok(keys);
            };
            let delay = self.gateway.config.move_page_delay;
            if !dirty && !delay.is_zero() {
                self.import(page.keys).await?;
                tokio::time::sleep(delay).await;
                page = self.export(dirty, cursor).await?;
            } else {
                // The next page is read from the source while this one is written to the
                // target; pages are still written one after the other, in order.
                let (imported, exported) =
                    tokio::join!(self.import(page.keys), self.export(dirty, cursor));
                imported?;
                page = exported?;
            }
        }
    }

    /// A page of the source's export list from `cursor`.
    async fn export(&self, dirty: bool, cursor: u64) -> Result<KeyPage, MoveError> {
        let workspace = self.plan.workspace.clone();
        let op = if dirty {
            MoveOp::ExportDirty { workspace, cursor }
        } else {
            MoveOp::ExportPage { workspace, cursor }
        };
        match self.step(&self.plan.from, op).await? {
            CellReply::Keys(page) => Ok(page),
            _ => Err(MoveError::Failed("the source answered no key page".into())),
        }
    }

    /// Writes a page of keys to the target.
    async fn import(&self, keys: Vec<KeyDump>) -> Result<(), MoveError> {
        if keys.is_empty() {
            return Ok(());
        }
        let op = MoveOp::ImportPage {
            workspace: self.plan.workspace.clone(),
            epoch: self.plan.epoch,
            keys,
        };
        self.step(&self.plan.to, op).await.map(drop)
    }

    /// Steps 2 to 6 of the module docs; the keys copied and how long writes waited.
    async fn run(&self) -> Result<(u64, Duration), MoveError> {
        let plan = self.plan;
        let (ws, epoch) = (&plan.workspace, plan.epoch);
        self.step(
            &plan.to,
            MoveOp::ImportBegin {
                workspace: ws.clone(),
                epoch,
            },
        )
        .await?;
        self.step(
            &plan.from,
            MoveOp::ExportBegin {
                workspace: ws.clone(),
                epoch,
            },
        )
        .await?;
        let bulk = self.copy(false).await?;
        self.set_phase(MovePhase::Frozen).await?;
        let frozen = Instant::now();
        self.step(
            &plan.from,
            MoveOp::Freeze {
                workspace: ws.clone(),
                epoch,
            },
        )
        .await?;
        let last = self.copy(true).await?;
        let switched = self
            .gateway
            .directory
            .switch_move(ws, epoch)
            .await
            .map_err(|e| MoveError::Failed(e.to_string()))?;
        if !switched {
            return Err(MoveError::Failed(
                "the directory refused the switch (another move or a stale epoch)".into(),
            ));
        }
        self.phase
            .store(phase_code(MovePhase::Switched), Ordering::Release);
        self.gateway.links.forget_route(ws, &plan.from);
        finish(self.gateway, plan).await?;
        Ok((bulk + last, frozen.elapsed()))
    }
}

/// After the switch: the target serves, the source lets go, the directory forgets the move.
/// Each step is retried a few times; a step that keeps failing is left to a sweep.
async fn finish(gateway: &Arc<Gateway>, plan: &MoveRecord) -> Result<(), MoveError> {
    let (ws, epoch) = (&plan.workspace, plan.epoch);
    let steps = [
        (
            &plan.to,
            MoveOp::ImportCommit {
                workspace: ws.clone(),
                epoch,
            },
        ),
        (
            &plan.from,
            MoveOp::Release {
                workspace: ws.clone(),
                epoch,
            },
        ),
    ];
    for (cell, op) in steps {
        let name = op.name();
        let mut attempt = 0;
        loop {
            match gateway.links.admin(cell, AdminOp::Move(op.clone())).await {
                Ok(_) => break,
                Err(e) if attempt + 1 < FINISH_ATTEMPTS => {
                    attempt += 1;
                    tracing::warn!(workspace = %ws, cell = %cell, step = name, error = %e.message, "move step failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                }
                Err(e) => {
                    return Err(MoveError::Failed(format!(
                        "{name} on cell {cell}: {}",
                        e.message
                    )))
                }
            }
        }
    }
    gateway
        .directory
        .end_move(ws, epoch)
        .await
        .map_err(|e| MoveError::Failed(e.to_string()))
}

/// Finishes a recorded move whose directory entry switched, or undoes one that did not.
pub async fn recover(gateway: &Arc<Gateway>, plan: &MoveRecord) -> Result<(), MoveError> {
    let (ws, epoch) = (&plan.workspace, plan.epoch);
    let current = gateway
        .directory
        .workspace(ws)
        .await
        .map_err(|e| MoveError::Failed(e.to_string()))?;
    let Some(current) = current else {
        // The workspace is gone from the directory: nothing to finish.
        return gateway
            .directory
            .end_move(ws, epoch)
            .await
            .map_err(|e| MoveError::Failed(e.to_string()));
    };
    if current.cell == plan.to {
        tracing::info!(workspace = %ws, epoch, "finishing an interrupted move");
        finish(gateway, plan).await?;
        outcome("done");
        return Ok(());
    }
    tracing::info!(workspace = %ws, epoch, "undoing a move");
    // First the record: from now on the attempt cannot switch, even if its driver is alive
    // after all, so the source may write the workspace again.
    let claimed = gateway
        .directory
        .update_move(ws, epoch, MovePhase::Undoing, now_ms() + MOVE_LEASE_MS)
        .await
        .map_err(|e| MoveError::Failed(e.to_string()))?;
    if !claimed {
        // The record changed meanwhile: another gateway finished or undid the move.
        return Ok(());
    }
    let abort = MoveOp::Abort {
        workspace: ws.clone(),
        epoch,
    };
    gateway
        .links
        .admin(&plan.from, AdminOp::Move(abort))
        .await
        .map_err(|e| MoveError::Failed(format!("abort on cell {}: {}", plan.from, e.message)))?;
    let abort_import = MoveOp::ImportAbort {
        workspace: ws.clone(),
        epoch,
    };
    if let Err(e) = gateway
        .links
        .admin(&plan.to, AdminOp::Move(abort_import))
        .await
    {
        // What the target holds of the workspace is not served and is dropped by the next
        // import; only its keys linger meanwhile.
        tracing::warn!(workspace = %ws, cell = %plan.to, error = %e.message, "could not drop an undone import");
    }
    gateway
        .directory
        .end_move(ws, epoch)
        .await
        .map_err(|e| MoveError::Failed(e.to_string()))?;
    outcome("undone");
    Ok(())
}

/// Finishes or undoes every recorded move whose lease ran out; runs until shutdown.
pub async fn recover_abandoned(gateway: Arc<Gateway>) {
    loop {
        tokio::select! {
            () = gateway.shutdown.cancelled() => return,
            () = tokio::time::sleep(RECOVER_EVERY) => {}
        }
        let moves = match gateway.directory.moves().await {
            Ok(moves) => moves,
            Err(e) => {
                tracing::debug!(error = %e, "could not list moves");
                continue;
            }
        };
        let now = now_ms();
        for plan in moves.into_iter().filter(|m| m.lease_until_ms <= now) {
            if let Err(e) = recover(&gateway, &plan).await {
                tracing::warn!(workspace = %plan.workspace, error = %e, "abandoned move not recovered yet");
            }
        }
    }
}

/// Drains running in this gateway, by cell, so that a second request does not start another.
static DRAINS: LazyLock<DashMap<CellId, ()>> = LazyLock::new(DashMap::new);

/// Starts moving every workspace off a draining cell, one at a time, unless this gateway is
/// already doing so. Returns at once.
pub fn start_drain(gateway: &Arc<Gateway>, cell: &CellId) {
    if DRAINS.insert(cell.clone(), ()).is_some() {
        return;
    }
    let (gateway, cell) = (gateway.clone(), cell.clone());
    tokio::spawn(async move {
        drain(&gateway, &cell).await;
        DRAINS.remove(&cell);
    });
}

/// Moves the cell's workspaces, one at a time, each to the healthy cell of the cell's region
/// with the most room, until none is left or the cell is undrained.
async fn drain(gateway: &Arc<Gateway>, cell: &CellId) {
    tracing::info!(cell = %cell, "drain with move started");
    loop {
        if gateway.shutdown.is_cancelled() {
            return;
        }
        let (cells, workspaces) = match (
            gateway.directory.cells().await,
            gateway.directory.workspaces().await,
        ) {
            (Ok(cells), Ok(workspaces)) => (cells, workspaces),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(cell = %cell, error = %e, "drain cannot read the directory");
                tokio::time::sleep(DRAIN_RETRY).await;
                continue;
            }
        };
        let Some(me) = cells.iter().find(|c| &c.id == cell) else {
            return;
        };
        if !me.draining {
            tracing::info!(cell = %cell, "cell undrained; drain stopped");
            return;
        }
        let Some(next) = workspaces.iter().find(|w| &w.cell == cell) else {
            tracing::info!(cell = %cell, "drain with move done");
            return;
        };
        let Some(target) = choose_cell(&cells, &me.region, now_ms()) else {
            tracing::warn!(cell = %cell, region = %me.region, "no healthy cell in the region takes workspaces; drain waits");
            tokio::time::sleep(DRAIN_RETRY).await;
            continue;
        };
        if let Err(e) = run_move(gateway, &next.id, &target.id).await {
            tracing::warn!(cell = %cell, workspace = %next.id, error = %e, "drain move failed; retrying");
            tokio::time::sleep(DRAIN_RETRY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(workspaces: u64, max_workspaces: Option<u64>, draining: bool) -> CellRecord {
        CellRecord {
            id: CellId::new("c2").unwrap_or_else(|e| panic!("{e}")),
            region: "us".into(),
            url: "http://c2".into(),
            draining,
            last_heartbeat_ms: 100_000,
            connections: 0,
            workspaces,
            max_workspaces,
            max_connections: None,
        }
    }

    #[test]
    fn a_move_target_must_be_healthy_and_have_room() {
        let now = 100_000;
        assert_eq!(refusal(&cell(1, None, false), now), None);
        assert_eq!(refusal(&cell(1, Some(2), false), now), None);
        assert_eq!(
            refusal(&cell(2, Some(2), false), now).as_deref(),
            Some("it is full")
        );
        assert_eq!(
            refusal(&cell(0, None, true), now).as_deref(),
            Some("it is draining")
        );
        assert_eq!(
            refusal(&cell(0, None, false), now + 60_000).as_deref(),
            Some("it is down")
        );
    }
}
