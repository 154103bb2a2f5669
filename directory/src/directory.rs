//! The directory: cells and workspace placement (SPEC §2, §7).

use async_trait::async_trait;
use confab_shared::{CellId, WorkspaceId};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::moves::{MoveBegun, MovePhase, MoveRecord};
use crate::EngineError;

/// A cell missing heartbeats for this long is `down`.
pub const CELL_DOWN_AFTER_MS: u64 = 15_000;

/// What a cell says of itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRegistration {
    pub id: CellId,
    pub region: String,
    /// Base URL gateways use to reach the cell (its `/v1/link`).
    pub url: String,
}

/// Who held a cell id before a process claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellHolder {
    /// The epoch it claimed the id with.
    pub epoch: u64,
    /// How it described itself (`pid N on HOST`), empty if unknown.
    pub process: String,
    pub url: String,
    /// Unix ms of its last heartbeat.
    pub last_heartbeat_ms: u64,
}

/// The outcome of [`Directory::claim_cell`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellClaim {
    /// This process's epoch: higher than any earlier claim of the id.
    pub epoch: u64,
    /// The previous holder, if the id was claimed before.
    pub previous: Option<CellHolder>,
}

/// Whether a cell process still holds its id, as a heartbeat or a registration finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellTenure {
    /// The id is still this process's: the heartbeat (or registration) was recorded.
    Held,
    /// A newer process claimed the id (split brain): this one must stop serving.
    Superseded { epoch: u64 },
    /// The directory has no record of the cell (it lost its data): register again.
    Unregistered,
}

/// A cell's load and bounds, reported with each heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellLoad {
    /// Client sessions attached to the cell.
    pub connections: u64,
    /// `--max-workspaces`: placement and moves skip the cell once it holds this many
    /// workspaces; `None` is no bound.
    pub max_workspaces: Option<u64>,
    /// `--max-connections`: the cell refuses attaches beyond this many sessions, and counts
    /// as full for placement once it has them; `None` is no bound.
    pub max_connections: Option<u64>,
}

/// A cell as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRecord {
    pub id: CellId,
    pub region: String,
    pub url: String,
    pub draining: bool,
    /// Unix ms of the last heartbeat.
    pub last_heartbeat_ms: u64,
    pub connections: u64,
    /// Workspaces the directory places on this cell.
    pub workspaces: u64,
    /// The cell's `--max-workspaces`, as its last heartbeat said (`None`: no bound).
    #[serde(default)]
    pub max_workspaces: Option<u64>,
    /// The cell's `--max-connections`, as its last heartbeat said (`None`: no bound).
    #[serde(default)]
    pub max_connections: Option<u64>,
}

/// A cell's status as `GET /admin/v1/cells` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellStatus {
    Healthy,
    Draining,
    Down,
}

impl CellRecord {
    /// Whether the cell can take one more workspace: below both of its bounds. A cell at
    /// `--max-connections` counts as full too, since it refuses new sessions.
    pub fn has_room(&self) -> bool {
        self.max_workspaces.is_none_or(|max| self.workspaces < max)
            && self
                .max_connections
                .is_none_or(|max| self.connections < max)
    }

    /// Whether a workspace may be placed or moved onto the cell now: healthy (not down, not
    /// draining) and with room.
    pub fn accepts_workspaces(&self, now_ms: u64) -> bool {
        self.status(now_ms) == CellStatus::Healthy && self.has_room()
    }

    /// `down` after missed heartbeats, else `draining` when drained, else `healthy`.
    pub fn status(&self, now_ms: u64) -> CellStatus {
        if now_ms.saturating_sub(self.last_heartbeat_ms) > CELL_DOWN_AFTER_MS {
            CellStatus::Down
        } else if self.draining {
            CellStatus::Draining
        } else {
            CellStatus::Healthy
        }
    }
}

/// Which cell owns a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub id: WorkspaceId,
    pub cell: CellId,
    pub region: String,
    pub name: Option<String>,
}

/// A change other processes must react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryChange {
    /// The workspace is now served by another cell: re-route it.
    WorkspaceMoved {
        workspace: WorkspaceId,
        cell: CellId,
    },
    /// A cell registered, was drained, or changed its URL.
    CellChanged { cell: CellId },
}

/// Why a workspace could not be created.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CreateWorkspaceError {
    #[error("workspace {0} already exists")]
    Exists(WorkspaceId),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The directory engine.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Claims a cell id for a starting process and registers the cell (keeping its draining
    /// flag): the id's epoch goes up by one (to at least `min_epoch`), so every process that
    /// claimed it before is superseded. `process` says who claims (`pid N on HOST`). Never
    /// waits for an earlier holder: a restart after a crash claims at once.
    async fn claim_cell(
        &self,
        cell: CellRegistration,
        process: &str,
        min_epoch: u64,
        now_ms: u64,
    ) -> Result<CellClaim, EngineError>;
    /// Registers the cell again under the epoch it claimed (after the directory lost its
    /// record), unless a newer process claimed the id meanwhile.
    async fn register_cell(
        &self,
        cell: CellRegistration,
        process: &str,
        epoch: u64,
        now_ms: u64,
    ) -> Result<CellTenure, EngineError>;
    /// Records a cell's heartbeat and load, if the process (by its epoch) still holds the id.
    async fn heartbeat_cell(
        &self,
        id: &CellId,
        epoch: u64,
        load: CellLoad,
        now_ms: u64,
    ) -> Result<CellTenure, EngineError>;
    /// Every known cell, with its workspace count.
    async fn cells(&self) -> Result<Vec<CellRecord>, EngineError>;
    /// Marks a cell draining; `false` when no such cell exists.
    async fn drain_cell(&self, id: &CellId) -> Result<bool, EngineError>;
    /// The record of a workspace, if it exists.
    async fn workspace(&self, id: &WorkspaceId) -> Result<Option<WorkspaceRecord>, EngineError>;
    /// Creates a workspace record; fails with `Exists` when the id is taken.
    async fn create_workspace(&self, record: WorkspaceRecord) -> Result<(), CreateWorkspaceError>;
    /// Removes a workspace record (to roll back a creation the cell refused).
    async fn delete_workspace(&self, id: &WorkspaceId) -> Result<(), EngineError>;
    /// Points a workspace at another cell and region, and announces the move.
    async fn move_workspace(
        &self,
        id: &WorkspaceId,
        cell: &CellId,
        region: &str,
    ) -> Result<(), EngineError>;
    /// Changes from now on.
    fn subscribe(&self) -> broadcast::Receiver<DirectoryChange>;

    /// Clears a cell's draining flag; `false` when no such cell exists.
    async fn undrain_cell(&self, id: &CellId) -> Result<bool, EngineError>;
    /// Every workspace record, ordered by id.
    async fn workspaces(&self) -> Result<Vec<WorkspaceRecord>, EngineError>;
    /// Records a new move of `record.workspace` (its `epoch` is assigned here), unless one is
    /// recorded already or the workspace does not exist.
    async fn begin_move(&self, record: MoveRecord) -> Result<MoveBegun, EngineError>;
    /// The move recorded for a workspace.
    async fn move_record(&self, workspace: &WorkspaceId)
        -> Result<Option<MoveRecord>, EngineError>;
    /// Every recorded move.
    async fn moves(&self) -> Result<Vec<MoveRecord>, EngineError>;
    /// Sets the move's phase and lease, if the recorded move still has `epoch` (an `Undoing`
    /// move takes no other phase).
    async fn update_move(
        &self,
        workspace: &WorkspaceId,
        epoch: u64,
        phase: MovePhase,
        lease_until_ms: u64,
    ) -> Result<bool, EngineError>;
    /// The switch: if the recorded move has `epoch`, is `Frozen`, and the workspace is still on
    /// the move's source, points it at the target (and the target's region), marks the move `Switched`
    /// and announces it, atomically. `false` (nothing changed) otherwise.
    async fn switch_move(&self, workspace: &WorkspaceId, epoch: u64) -> Result<bool, EngineError>;
    /// Forgets the recorded move, if it still has `epoch`.
    async fn end_move(&self, workspace: &WorkspaceId, epoch: u64) -> Result<(), EngineError>;
}

/// Placement (SPEC §2): the healthy, non-draining cell of `region` with room (see
/// [`CellRecord::has_room`]) and the fewest workspaces (ties broken by id, so placement is
/// deterministic).
pub fn choose_cell<'a>(
    cells: &'a [CellRecord],
    region: &str,
    now_ms: u64,
) -> Option<&'a CellRecord> {
    place(cells, region, now_ms).ok()
}

/// Why no cell of a region can take a workspace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPlacement {
    /// The region has no cell that is up and not draining.
    #[error("region {0:?} has no healthy cell")]
    NoHealthyCell(String),
    /// Every healthy cell of the region is at one of its bounds.
    #[error(
        "region {0:?} is full: every healthy cell is at its --max-workspaces or \
         --max-connections bound; add a cell or raise a bound"
    )]
    RegionFull(String),
}

/// [`choose_cell`], saying why when no cell fits: a region with healthy cells that are all
/// full is told apart from one with no healthy cell.
pub fn place<'a>(
    cells: &'a [CellRecord],
    region: &str,
    now_ms: u64,
) -> Result<&'a CellRecord, NoPlacement> {
    let mut healthy = cells
        .iter()
        .filter(|c| c.region == region && c.status(now_ms) == CellStatus::Healthy)
        .peekable();
    if healthy.peek().is_none() {
        return Err(NoPlacement::NoHealthyCell(region.to_string()));
    }
    healthy
        .filter(|c| c.has_room())
        .min_by(|a, b| {
            a.workspaces
                .cmp(&b.workspaces)
                .then_with(|| a.id.cmp(&b.id))
        })
        .ok_or_else(|| NoPlacement::RegionFull(region.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(id: &str, region: &str, workspaces: u64, draining: bool, hb: u64) -> CellRecord {
        CellRecord {
            id: CellId::new(id).unwrap_or_else(|e| panic!("{e}")),
            region: region.into(),
            url: format!("http://{id}"),
            draining,
            last_heartbeat_ms: hb,
            connections: 0,
            workspaces,
            max_workspaces: None,
            max_connections: None,
        }
    }

    #[test]
    fn placement_skips_a_full_cell_and_tells_a_full_region_from_one_without_cells() {
        let now = 100_000;
        let bounded = |id, workspaces, max_ws, connections, max_conn| CellRecord {
            connections,
            max_workspaces: max_ws,
            max_connections: max_conn,
            ..cell(id, "us", workspaces, false, now)
        };
        let cells = vec![
            bounded("a", 1, Some(1), 0, None),
            bounded("b", 5, None, 10, Some(10)),
            bounded("c", 7, Some(8), 9, Some(10)),
        ];
        assert_eq!(place(&cells, "us", now).map(|c| c.id.as_str()), Ok("c"));
        assert!(!cells[0].has_room() && !cells[1].has_room() && cells[2].has_room());
        let full = &cells[..2];
        assert_eq!(
            place(full, "us", now),
            Err(NoPlacement::RegionFull("us".into()))
        );
        assert!(choose_cell(full, "us", now).is_none());
        let draining = vec![cell("d", "us", 0, true, now)];
        assert_eq!(
            place(&draining, "us", now),
            Err(NoPlacement::NoHealthyCell("us".into()))
        );
        assert!(!draining[0].accepts_workspaces(now));
        assert!(cells[2].accepts_workspaces(now));
        assert!(!cells[2].accepts_workspaces(now + CELL_DOWN_AFTER_MS + 1));
    }

    #[test]
    fn placement_picks_the_least_loaded_healthy_cell_of_the_region() {
        let now = 100_000;
        let cells = vec![
            cell("a", "us", 5, false, now),
            cell("b", "us", 2, false, now),
            cell("c", "us", 0, true, now),
            cell("d", "us", 0, false, now - CELL_DOWN_AFTER_MS - 1),
            cell("e", "eu", 0, false, now),
        ];
        assert_eq!(
            choose_cell(&cells, "us", now).map(|c| c.id.as_str()),
            Some("b")
        );
        assert_eq!(
            choose_cell(&cells, "eu", now).map(|c| c.id.as_str()),
            Some("e")
        );
        assert!(choose_cell(&cells, "ap", now).is_none());
    }

    #[test]
    fn status_is_down_after_missed_heartbeats_then_draining_then_healthy() {
        let now = 100_000;
        assert_eq!(cell("a", "r", 0, true, 0).status(now), CellStatus::Down);
        assert_eq!(
            cell("a", "r", 0, true, now).status(now),
            CellStatus::Draining
        );
        assert_eq!(
            cell("a", "r", 0, false, now).status(now),
            CellStatus::Healthy
        );
    }
}
