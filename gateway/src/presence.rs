//! Presence subscriptions of this gateway's sessions (`presence_sub`), fed by the presence
//! engine's change stream: each change is encoded once and queued to every local session that
//! subscribed to that user.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use confab_directory::{EngineError, PresenceChange, PresenceSession, PresenceStore};
use confab_shared::link::Frame;
use confab_shared::server::{encode_event, Event, Status};
use confab_shared::{SessionId, UserId, WorkspaceId};
use dashmap::DashMap;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::metrics as m;
use crate::sessions::SessionRegistry;

/// Users whose statuses one resync reads at a time.
const RESYNC_BATCH: usize = 1000;

/// Local presence subscriptions.
pub struct PresenceHub {
    store: Arc<dyn PresenceStore>,
    sessions: Arc<SessionRegistry>,
    gateway_id: String,
    /// (workspace, user) -> the local sessions watching that user.
    watchers: DashMap<(WorkspaceId, UserId), HashSet<SessionId>>,
    /// session -> (its workspace, the users it watches), to replace or drop the set.
    subscriptions: DashMap<SessionId, (WorkspaceId, Vec<UserId>)>,
}

impl PresenceHub {
    pub fn new(
        store: Arc<dyn PresenceStore>,
        sessions: Arc<SessionRegistry>,
        gateway_id: String,
    ) -> Arc<PresenceHub> {
        Arc::new(PresenceHub {
            store,
            sessions,
            gateway_id,
            watchers: DashMap::new(),
            subscriptions: DashMap::new(),
        })
    }

    pub fn store(&self) -> &Arc<dyn PresenceStore> {
        &self.store
    }

    /// Forwards the engine's changes to watching sessions; runs until the stream ends.
    ///
    /// Changes can be missed: while the engine's stream reconnects (the presence Redis
    /// restarted, say, and users were swept offline and then announced online again before it
    /// was back), or when this task lags behind a burst (a dead gateway's users all going
    /// offline at once). Either way the hub re-reads the status of every watched user and
    /// tells the watchers, so what they show is right again.
    pub async fn follow_changes(self: Arc<Self>) {
        let mut changes = self.store.subscribe();
        let mut resets = self.store.resets();
        let mut resets_open = true;
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) => self.announce(&change),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "presence changes lagged; re-reading statuses");
                        self.resync().await;
                    }
                    Err(RecvError::Closed) => break,
                },
                reset = resets.changed(), if resets_open => {
                    if reset.is_err() {
                        resets_open = false;
                        continue;
                    }
                    // What arrived before the reset is older than what the re-read returns.
                    loop {
                        match changes.try_recv() {
                            Ok(change) => self.announce(&change),
                            Err(TryRecvError::Lagged(_)) => {}
                            Err(_) => break,
                        }
                    }
                    self.resync().await;
                }
            }
        }
    }

    /// Tells every watcher the current status of each user it watches (a status may repeat
    /// one it was told already).
    async fn resync(&self) {
        let mut watched: HashMap<WorkspaceId, Vec<UserId>> = HashMap::new();
        for entry in self.watchers.iter() {
            let (workspace, user) = entry.key();
            watched
                .entry(workspace.clone())
                .or_default()
                .push(user.clone());
        }
        for (workspace, users) in watched {
            for chunk in users.chunks(RESYNC_BATCH) {
                let statuses = match self.store.statuses(&workspace, chunk).await {
                    Ok(statuses) => statuses,
                    Err(e) => {
                        // The stream is down again: its next reset re-reads.
                        tracing::warn!(error = %e, "presence resync failed");
                        return;
                    }
                };
                for (user, status) in chunk.iter().zip(statuses) {
                    self.announce(&PresenceChange {
                        workspace: workspace.clone(),
                        user: user.clone(),
                        status,
                    });
                }
            }
        }
    }

    fn announce(&self, change: &PresenceChange) {
        let key = (change.workspace.clone(), change.user.clone());
        let Some(watchers) = self.watchers.get(&key) else {
            return;
        };
        let frame = Frame {
            text: encode_event(&Event::Presence {
                user: change.user.clone(),
                status: change.status,
            }),
            created_us: confab_shared::now_us(),
        };
        for session in watchers.iter() {
            if let Some(handle) = self.sessions.get(session) {
                handle.push(frame.clone());
            }
        }
    }

    /// A session became ready: it counts as online.
    pub async fn session_up(&self, session: &PresenceSession) -> Result<(), EngineError> {
        self.store.session_up(&self.gateway_id, session).await
    }

    /// A session closed: drop its subscriptions and its presence.
    pub async fn session_down(&self, session: &PresenceSession) -> Result<(), EngineError> {
        self.unsubscribe(&session.session);
        self.store.session_down(&self.gateway_id, session).await
    }

    /// Replaces the set of users `session` watches and returns it, sorted and deduplicated.
    ///
    /// Synchronous on purpose: the task serving the session calls it, and later calls
    /// [`session_down`](Self::session_down) in the same task, so the cleanup always comes after
    /// (and removes) every watch the session made. A watch made from another task could run
    /// after the cleanup and stay behind for a session that no longer exists.
    pub fn watch(
        &self,
        session: &SessionId,
        workspace: &WorkspaceId,
        users: Vec<UserId>,
    ) -> Vec<UserId> {
        let mut users = users;
        users.sort();
        users.dedup();
        self.unsubscribe(session);
        for user in &users {
            self.watchers
                .entry((workspace.clone(), user.clone()))
                .or_default()
                .insert(session.clone());
        }
        self.subscriptions
            .insert(session.clone(), (workspace.clone(), users.clone()));
        self.update_gauges();
        users
    }

    /// The current statuses of `users` (a `presence_sub` reply).
    pub async fn statuses(
        &self,
        workspace: &WorkspaceId,
        users: Vec<UserId>,
    ) -> Result<BTreeMap<UserId, Status>, EngineError> {
        let statuses = self.store.statuses(workspace, &users).await?;
        Ok(users.into_iter().zip(statuses).collect())
    }

    fn unsubscribe(&self, session: &SessionId) {
        let Some((_, (workspace, users))) = self.subscriptions.remove(session) else {
            return;
        };
        for user in users {
            let key = (workspace.clone(), user);
            let now_empty = self.watchers.get_mut(&key).is_some_and(|mut set| {
                set.remove(session);
                set.is_empty()
            });
            if now_empty {
                self.watchers.remove_if(&key, |_, set| set.is_empty());
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        metrics::gauge!(m::PRESENCE_WATCHERS).set(self.subscriptions.len() as f64);
        metrics::gauge!(m::PRESENCE_WATCHED_USERS).set(self.watchers.len() as f64);
    }

    /// Keeps this gateway's sessions alive in the engine (for engines that expire them).
    pub async fn refresh(&self, sessions: &[PresenceSession]) -> Result<(), EngineError> {
        self.store.refresh(&self.gateway_id, sessions).await
    }
}
