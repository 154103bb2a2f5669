//! Presence: which sessions are online, and the user statuses derived from them (SPEC §4).

use async_trait::async_trait;
use confab_shared::server::Status;
use confab_shared::{SessionId, UserId, WorkspaceId};
use tokio::sync::{broadcast, watch};

use crate::EngineError;

/// A session as presence knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PresenceSession {
    pub workspace: WorkspaceId,
    pub user: UserId,
    pub session: SessionId,
}

/// A user's status changed (announced once per change, to every subscriber).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub workspace: WorkspaceId,
    pub user: UserId,
    pub status: Status,
}

/// The presence engine.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// A session is connected (and ready). `gateway` identifies the process holding it, whose
    /// sessions expire together if it dies without closing them.
    async fn session_up(&self, gateway: &str, session: &PresenceSession)
        -> Result<(), EngineError>;
    /// A session closed.
    async fn session_down(
        &self,
        gateway: &str,
        session: &PresenceSession,
    ) -> Result<(), EngineError>;
    /// The gateway is alive and still holds `sessions`: extend their lifetime, adding back any
    /// that expired meanwhile (a user that was announced offline is announced online again).
    async fn refresh(&self, gateway: &str, sessions: &[PresenceSession])
        -> Result<(), EngineError>;
    /// The statuses of `users` of `workspace`, in the given order.
    async fn statuses(
        &self,
        workspace: &WorkspaceId,
        users: &[UserId],
    ) -> Result<Vec<Status>, EngineError>;
    /// Status changes from now on, for every workspace.
    fn subscribe(&self) -> broadcast::Receiver<PresenceChange>;
    /// Moves each time the change stream (re)connects to where changes are published: changes
    /// made while it was not connected never reach [`subscribe`](Self::subscribe), so a
    /// subscriber re-reads the statuses it shows when this moves.
    fn resets(&self) -> watch::Receiver<u64>;
}
