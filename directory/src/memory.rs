//! In-memory presence and directory engines, for `confab dev` and tests: one process holds all
//! state, so nothing expires on its own and a mutex per engine is enough (no lock is held
//! across an await).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use confab_shared::server::Status;
use confab_shared::{CellId, SessionId, UserId, WorkspaceId};
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::directory::{
    CellClaim, CellHolder, CellLoad, CellRecord, CellRegistration, CellTenure,
    CreateWorkspaceError, Directory, DirectoryChange, WorkspaceRecord,
};
use crate::moves::{MoveBegun, MovePhase, MoveRecord};
use crate::presence::{PresenceChange, PresenceSession, PresenceStore};
use crate::EngineError;

/// Capacity of the change broadcast; a subscriber lagging further behind misses changes and is
/// told so by `RecvError::Lagged`.
const CHANGES_CAPACITY: usize = 4096;

/// The in-memory directory.
pub struct MemoryDirectory {
    state: Mutex<DirectoryState>,
    changes: broadcast::Sender<DirectoryChange>,
}

#[derive(Default)]
struct DirectoryState {
    cells: HashMap<CellId, CellRecord>,
    /// Each cell id's epoch and the process that claimed it.
    holders: HashMap<CellId, (u64, String)>,
    workspaces: HashMap<WorkspaceId, WorkspaceRecord>,
    moves: HashMap<WorkspaceId, MoveRecord>,
    move_epoch: u64,
}

impl DirectoryState {
    /// Records a cell's registration, keeping its draining flag.
    fn register(&mut self, cell: CellRegistration, now_ms: u64) {
        let draining = self.cells.get(&cell.id).is_some_and(|c| c.draining);
        self.cells.insert(
            cell.id.clone(),
            CellRecord {
                id: cell.id,
                region: cell.region,
                url: cell.url,
                draining,
                last_heartbeat_ms: now_ms,
                connections: 0,
                workspaces: 0,
                max_workspaces: None,
                max_connections: None,
            },
        );
    }
}

impl Default for MemoryDirectory {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryDirectory {
    pub fn new() -> Self {
        MemoryDirectory {
            state: Mutex::new(DirectoryState::default()),
            changes: broadcast::channel(CHANGES_CAPACITY).0,
        }
    }

    fn announce(&self, change: DirectoryChange) {
        // No subscriber is not an error.
        let _ = self.changes.send(change);
    }
}

#[async_trait]
impl Directory for MemoryDirectory {
    async fn claim_cell(
        &self,
        cell: CellRegistration,
        process: &str,
        min_epoch: u64,
        now_ms: u64,
    ) -> Result<CellClaim, EngineError> {
        let id = cell.id.clone();
        let claim = {
            let mut state = self.state.lock();
            let previous = state.holders.get(&id).map(|(epoch, process)| CellHolder {
                epoch: *epoch,
                process: process.clone(),
                url: state
                    .cells
                    .get(&id)
                    .map(|c| c.url.clone())
                    .unwrap_or_default(),
                last_heartbeat_ms: state.cells.get(&id).map_or(0, |c| c.last_heartbeat_ms),
            });
            let epoch = previous.as_ref().map_or(1, |p| p.epoch + 1).max(min_epoch);
            state
                .holders
                .insert(id.clone(), (epoch, process.to_string()));
            state.register(cell, now_ms);
            CellClaim { epoch, previous }
        };
        self.announce(DirectoryChange::CellChanged { cell: id });
        Ok(claim)
    }

    async fn register_cell(
        &self,
        cell: CellRegistration,
        process: &str,
        epoch: u64,
        now_ms: u64,
    ) -> Result<CellTenure, EngineError> {
        let id = cell.id.clone();
        {
            let mut state = self.state.lock();
            if let Some((held, _)) = state.holders.get(&id).filter(|(e, _)| *e != epoch) {
                return Ok(CellTenure::Superseded { epoch: *held });
            }
            state
                .holders
                .insert(id.clone(), (epoch, process.to_string()));
            state.register(cell, now_ms);
        }
        self.announce(DirectoryChange::CellChanged { cell: id });
        Ok(CellTenure::Held)
    }

    async fn heartbeat_cell(
        &self,
        id: &CellId,
        epoch: u64,
        load: CellLoad,
        now_ms: u64,
    ) -> Result<CellTenure, EngineError> {
        let mut state = self.state.lock();
        match state.holders.get(id) {
            Some((held, _)) if *held != epoch => {
                return Ok(CellTenure::Superseded { epoch: *held })
            }
            Some(_) => {}
            None => return Ok(CellTenure::Unregistered),
        }
        match state.cells.get_mut(id) {
            Some(cell) => {
                cell.last_heartbeat_ms = now_ms;
                cell.connections = load.connections;
                cell.max_workspaces = load.max_workspaces;
                cell.max_connections = load.max_connections;
                Ok(CellTenure::Held)
            }
            None => Ok(CellTenure::Unregistered),
        }
    }

    async fn cells(&self) -> Result<Vec<CellRecord>, EngineError> {
        let state = self.state.lock();
        let mut cells: Vec<CellRecord> = state.cells.values().cloned().collect();
        for cell in &mut cells {
            cell.workspaces = state
                .workspaces
                .values()
                .filter(|w| w.cell == cell.id)
                .count() as u64;
        }
        cells.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(cells)
    }

    async fn drain_cell(&self, id: &CellId) -> Result<bool, EngineError> {
        let found = match self.state.lock().cells.get_mut(id) {
            Some(cell) => {
                cell.draining = true;
                true
            }
            None => false,
        };
        if found {
            self.announce(DirectoryChange::CellChanged { cell: id.clone() });
        }
        Ok(found)
    }

    async fn workspace(&self, id: &WorkspaceId) -> Result<Option<WorkspaceRecord>, EngineError> {
        Ok(self.state.lock().workspaces.get(id).cloned())
    }

    async fn create_workspace(&self, record: WorkspaceRecord) -> Result<(), CreateWorkspaceError> {
        let mut state = self.state.lock();
        if state.workspaces.contains_key(&record.id) {
            return Err(CreateWorkspaceError::Exists(record.id));
        }
        state.workspaces.insert(record.id.clone(), record);
        Ok(())
    }

    async fn delete_workspace(&self, id: &WorkspaceId) -> Result<(), EngineError> {
        self.state.lock().workspaces.remove(id);
        Ok(())
    }

    async fn move_workspace(
        &self,
        id: &WorkspaceId,
        cell: &CellId,
        region: &str,
    ) -> Result<(), EngineError> {
        {
            let mut state = self.state.lock();
            let Some(record) = state.workspaces.get_mut(id) else {
                return Err(EngineError(format!("workspace {id} does not exist")));
            };
            record.cell = cell.clone();
            record.region = region.to_string();
        }
        self.announce(DirectoryChange::WorkspaceMoved {
            workspace: id.clone(),
            cell: cell.clone(),
        });
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<DirectoryChange> {
        self.changes.subscribe()
    }

    async fn undrain_cell(&self, id: &CellId) -> Result<bool, EngineError> {
        let found = match self.state.lock().cells.get_mut(id) {
            Some(cell) => {
                cell.draining = false;
                true
            }
            None => false,
        };
        if found {
            self.announce(DirectoryChange::CellChanged { cell: id.clone() });
        }
        Ok(found)
    }

    async fn workspaces(&self) -> Result<Vec<WorkspaceRecord>, EngineError> {
        let mut all: Vec<WorkspaceRecord> =
            self.state.lock().workspaces.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    async fn begin_move(&self, mut record: MoveRecord) -> Result<MoveBegun, EngineError> {
        let mut state = self.state.lock();
        if !state.workspaces.contains_key(&record.workspace) {
            return Ok(MoveBegun::UnknownWorkspace);
        }
        if let Some(existing) = state.moves.get(&record.workspace) {
            return Ok(MoveBegun::Busy(existing.clone()));
        }
        state.move_epoch += 1;
        record.epoch = state.move_epoch;
        state.moves.insert(record.workspace.clone(), record.clone());
        Ok(MoveBegun::Started(record))
    }

    async fn move_record(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<Option<MoveRecord>, EngineError> {
        Ok(self.state.lock().moves.get(workspace).cloned())
    }

    async fn moves(&self) -> Result<Vec<MoveRecord>, EngineError> {
        Ok(self.state.lock().moves.values().cloned().collect())
    }

    async fn update_move(
        &self,
        workspace: &WorkspaceId,
        epoch: u64,
        phase: MovePhase,
        lease_until_ms: u64,
    ) -> Result<bool, EngineError> {
        let mut state = self.state.lock();
        match state.moves.get_mut(workspace) {
            Some(record)
                if record.epoch == epoch
                    && (record.phase != MovePhase::Undoing || phase == MovePhase::Undoing) =>
            {
                record.phase = phase;
                record.lease_until_ms = lease_until_ms;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn switch_move(&self, workspace: &WorkspaceId, epoch: u64) -> Result<bool, EngineError> {
        let switched_to = {
            let mut state = self.state.lock();
            let DirectoryState {
                moves, workspaces, ..
            } = &mut *state;
            match (moves.get_mut(workspace), workspaces.get_mut(workspace)) {
                (Some(mv), Some(ws))
                    if mv.epoch == epoch && mv.phase == MovePhase::Frozen && ws.cell == mv.from =>
                {
                    ws.cell = mv.to.clone();
                    ws.region = mv.to_region.clone();
                    mv.phase = MovePhase::Switched;
                    Some(mv.to.clone())
                }
                _ => None,
            }
        };
        let Some(cell) = switched_to else {
            return Ok(false);
        };
        self.announce(DirectoryChange::WorkspaceMoved {
            workspace: workspace.clone(),
            cell,
        });
        Ok(true)
    }

    async fn end_move(&self, workspace: &WorkspaceId, epoch: u64) -> Result<(), EngineError> {
        let mut state = self.state.lock();
        if state.moves.get(workspace).is_some_and(|m| m.epoch == epoch) {
            state.moves.remove(workspace);
        }
        Ok(())
    }
}

/// The in-memory presence engine.
pub struct MemoryPresence {
    sessions: Mutex<HashMap<(WorkspaceId, UserId), HashSet<SessionId>>>,
    changes: broadcast::Sender<PresenceChange>,
    /// Never moves: the in-process change stream cannot miss a change.
    resets: tokio::sync::watch::Sender<u64>,
}

impl Default for MemoryPresence {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryPresence {
    pub fn new() -> Self {
        MemoryPresence {
            sessions: Mutex::new(HashMap::new()),
            changes: broadcast::channel(CHANGES_CAPACITY).0,
            resets: tokio::sync::watch::channel(0).0,
        }
    }
}

#[async_trait]
impl PresenceStore for MemoryPresence {
    async fn session_up(&self, _gateway: &str, s: &PresenceSession) -> Result<(), EngineError> {
        let came_online = {
            let mut sessions = self.sessions.lock();
            let set = sessions
                .entry((s.workspace.clone(), s.user.clone()))
                .or_default();
            set.insert(s.session.clone()) && set.len() == 1
        };
        if came_online {
            let _ = self.changes.send(PresenceChange {
                workspace: s.workspace.clone(),
                user: s.user.clone(),
                status: Status::Online,
            });
        }
        Ok(())
    }

    async fn session_down(&self, _gateway: &str, s: &PresenceSession) -> Result<(), EngineError> {
        let went_offline = {
            let mut sessions = self.sessions.lock();
            let key = (s.workspace.clone(), s.user.clone());
            let removed_last = sessions
                .get_mut(&key)
                .is_some_and(|set| set.remove(&s.session) && set.is_empty());
            if removed_last {
                sessions.remove(&key);
            }
            removed_last
        };
        if went_offline {
            let _ = self.changes.send(PresenceChange {
                workspace: s.workspace.clone(),
                user: s.user.clone(),
                status: Status::Offline,
            });
        }
        Ok(())
    }

    async fn refresh(
        &self,
        _gateway: &str,
        _sessions: &[PresenceSession],
    ) -> Result<(), EngineError> {
        // One process holds every session: they cannot outlive their gateway, so nothing expires.
        Ok(())
    }

    async fn statuses(
        &self,
        workspace: &WorkspaceId,
        users: &[UserId],
    ) -> Result<Vec<Status>, EngineError> {
        let sessions = self.sessions.lock();
        Ok(users
            .iter()
            .map(|u| {
                if sessions.contains_key(&(workspace.clone(), u.clone())) {
                    Status::Online
                } else {
                    Status::Offline
                }
            })
            .collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<PresenceChange> {
        self.changes.subscribe()
    }

    fn resets(&self) -> tokio::sync::watch::Receiver<u64> {
        self.resets.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, session: &str) -> PresenceSession {
        PresenceSession {
            workspace: WorkspaceId::new("w").unwrap_or_else(|e| panic!("{e}")),
            user: UserId::new(user).unwrap_or_else(|e| panic!("{e}")),
            session: SessionId::new(session).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    #[tokio::test]
    async fn a_user_is_online_while_any_session_is_up_and_changes_are_announced_once() {
        let presence = MemoryPresence::new();
        let mut changes = presence.subscribe();
        let (a1, a2) = (session("alice", "s1"), session("alice", "s2"));
        presence
            .session_up("g", &a1)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        presence
            .session_up("g", &a2)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        presence
            .session_down("g", &a1)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let statuses = presence
            .statuses(&a1.workspace, std::slice::from_ref(&a1.user))
            .await
            .unwrap_or_default();
        assert_eq!(statuses, vec![Status::Online]);
        presence
            .session_down("g", &a2)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            changes.try_recv().map(|c| c.status).ok(),
            Some(Status::Online)
        );
        assert_eq!(
            changes.try_recv().map(|c| c.status).ok(),
            Some(Status::Offline)
        );
        assert!(changes.try_recv().is_err());
    }

    #[tokio::test]
    async fn workspaces_are_created_once_and_counted_per_cell() {
        let dir = MemoryDirectory::new();
        let cell = CellId::new("c1").unwrap_or_else(|e| panic!("{e}"));
        dir.claim_cell(
            CellRegistration {
                id: cell.clone(),
                region: "local".into(),
                url: "inproc".into(),
            },
            "test",
            0,
            1,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let record = WorkspaceRecord {
            id: WorkspaceId::new("demo").unwrap_or_else(|e| panic!("{e}")),
            cell: cell.clone(),
            region: "local".into(),
            name: None,
        };
        assert!(dir.create_workspace(record.clone()).await.is_ok());
        assert!(matches!(
            dir.create_workspace(record).await,
            Err(CreateWorkspaceError::Exists(_))
        ));
        let cells = dir.cells().await.unwrap_or_default();
        assert_eq!(cells.first().map(|c| c.workspaces), Some(1));
    }
}
