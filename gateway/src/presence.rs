//! Presence subscriptions of this gateway's sessions (`presence_sub`), fed by the presence
//! engine's change stream: each change is encoded once and handed, like a cell's event, to the
//! delivery shards of the local sessions that subscribed to that user (see [`crate::shards`]).
//!
//! Presence lives in the directory Redis. While that Redis does not answer, the hub degrades
//! instead of failing (static stability): `presence_sub` and `GET /v1/presence` answer from
//! the statuses this gateway last knew (`confab_presence_stale` is 1 meanwhile), sessions that
//! open or close are not reported to the engine but remembered, and once the engine answers
//! again the hub re-publishes this gateway's live sessions, reports the closes it held back,
//! and re-reads the statuses its watchers show.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
/// Most statuses kept as the last-known answer (watched users are always kept).
const MAX_KNOWN: usize = 100_000;
/// Most session closes held back while the engine does not answer; beyond it the engine's
/// TTL expires them.
const MAX_PENDING_DOWNS: usize = 100_000;
/// How often a stale hub tries the engine again.
const RECOVERY_EVERY: Duration = Duration::from_secs(1);

/// Local presence subscriptions.
pub struct PresenceHub {
    store: Arc<dyn PresenceStore>,
    sessions: Arc<SessionRegistry>,
    gateway_id: String,
    /// (workspace, user) -> the local sessions watching that user.
    watchers: DashMap<(WorkspaceId, UserId), HashSet<SessionId>>,
    /// session -> (its workspace, the users it watches), to replace or drop the set.
    subscriptions: DashMap<SessionId, (WorkspaceId, Vec<UserId>)>,
    /// Whether the engine failed and presence answers come from `known`.
    stale: AtomicBool,
    /// The statuses this gateway last knew, from reads and changes.
    known: DashMap<(WorkspaceId, UserId), Status>,
    /// Session closes the engine has not been told of yet.
    pending_downs: parking_lot::Mutex<Vec<PresenceSession>>,
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
            stale: AtomicBool::new(false),
            known: DashMap::new(),
            pending_downs: parking_lot::Mutex::new(Vec::new()),
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
                    Ok(change) => self.announce(&change).await,
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
                            Ok(change) => self.announce(&change).await,
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
                        // The stream is down again: its next reset, or the recovery, re-reads.
                        tracing::warn!(error = %e, "presence resync failed");
                        self.mark_stale(&e);
                        return;
                    }
                };
                for (user, status) in chunk.iter().zip(statuses) {
                    self.announce(&PresenceChange {
                        workspace: workspace.clone(),
                        user: user.clone(),
                        status,
                    })
                    .await;
                }
            }
        }
    }

    async fn announce(&self, change: &PresenceChange) {
        let key = (change.workspace.clone(), change.user.clone());
        self.remember(&key, change.status);
        // Copied out (reference counts): the map's lock is not held while the shards' queues
        // may make this wait.
        let watchers: Arc<[SessionId]> = match self.watchers.get(&key) {
            Some(watchers) => watchers.iter().cloned().collect(),
            None => return,
        };
        let frame = Frame::new(
            encode_event(&Event::Presence {
                user: change.user.clone(),
                status: change.status,
            }),
            confab_shared::now_us(),
        );
        self.sessions.deliver(watchers, frame).await;
    }

    /// Whether presence answers come from the last-known statuses (the engine failed).
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    fn mark_stale(&self, e: &EngineError) {
        if !self.stale.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "presence engine unreachable: answering from the last-known statuses");
        }
        metrics::gauge!(m::PRESENCE_STALE).set(1.0);
    }

    /// Keeps `status` as the last-known one of `key` (bounded: at [`MAX_KNOWN`], only watched
    /// users are kept).
    fn remember(&self, key: &(WorkspaceId, UserId), status: Status) {
        if self.known.len() >= MAX_KNOWN && !self.known.contains_key(key) {
            self.known.retain(|k, _| self.watchers.contains_key(k));
            if self.known.len() >= MAX_KNOWN && !self.watchers.contains_key(key) {
                return;
            }
        }
        self.known.insert(key.clone(), status);
    }

    /// A session became ready: it counts as online. Never fails: while the engine does not
    /// answer, the session is published by the next refresh that reaches it.
    pub async fn session_up(&self, session: &PresenceSession) {
        let key = (session.workspace.clone(), session.user.clone());
        if !self.is_stale() {
            match self.store.session_up(&self.gateway_id, session).await {
                Ok(()) => return,
                Err(e) => self.mark_stale(&e),
            }
        }
        // What this gateway knows for sure: the user is online.
        if self.known.get(&key).map(|s| *s) != Some(Status::Online) {
            self.announce(&PresenceChange {
                workspace: key.0,
                user: key.1,
                status: Status::Online,
            })
            .await;
        }
    }

    /// A session closed: drop its subscriptions and its presence. Never fails: while the
    /// engine does not answer, the close is held back and reported once it does.
    pub async fn session_down(&self, session: &PresenceSession) {
        self.unsubscribe(&session.session);
        if !self.is_stale() {
            match self.store.session_down(&self.gateway_id, session).await {
                Ok(()) => return,
                Err(e) => self.mark_stale(&e),
            }
        }
        let mut pending = self.pending_downs.lock();
        if pending.len() < MAX_PENDING_DOWNS {
            pending.push(session.clone());
        }
    }

    /// While stale, tries the engine every [`RECOVERY_EVERY`] until `shutdown`.
    pub async fn recover_when_back(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(RECOVERY_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if self.is_stale() {
                let _ = self.keep_alive().await;
            }
        }
    }

    /// Publishes this gateway's live sessions (extending their lifetime), reports the closes
    /// held back, and, if presence was stale, re-reads what the watchers show and clears the
    /// stale mark.
    pub async fn keep_alive(&self) -> Result<(), EngineError> {
        let sessions = self.sessions.snapshot(|s| PresenceSession {
            workspace: s.workspace.clone(),
            user: s.user.clone(),
            session: s.id.clone(),
        });
        if let Err(e) = self.store.refresh(&self.gateway_id, &sessions).await {
            self.mark_stale(&e);
            return Err(e);
        }
        // A session that closed while the refresh was under way may have been added back by
        // it: take it out again (a second session_down announces nothing).
        let mut downs: Vec<PresenceSession> = std::mem::take(&mut *self.pending_downs.lock());
        downs.extend(
            sessions
                .into_iter()
                .filter(|s| self.sessions.get(&s.session).is_none()),
        );
        for (i, session) in downs.iter().enumerate() {
            if let Err(e) = self.store.session_down(&self.gateway_id, session).await {
                let mut pending = self.pending_downs.lock();
                pending.extend(downs[i..].iter().cloned());
                pending.truncate(MAX_PENDING_DOWNS);
                drop(pending);
                self.mark_stale(&e);
                return Err(e);
            }
        }
        if self.stale.swap(false, Ordering::Relaxed) {
            tracing::info!("presence engine reachable again: re-reading statuses");
            metrics::gauge!(m::PRESENCE_STALE).set(0.0);
            self.resync().await;
        }
        Ok(())
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

    /// The current statuses of `users` (a `presence_sub` reply); while the engine does not
    /// answer, the last-known ones (`offline` for a user this gateway knows nothing of).
    pub async fn statuses(
        &self,
        workspace: &WorkspaceId,
        users: Vec<UserId>,
    ) -> BTreeMap<UserId, Status> {
        if !self.is_stale() {
            match self.store.statuses(workspace, &users).await {
                Ok(statuses) => {
                    for (user, status) in users.iter().zip(&statuses) {
                        self.remember(&(workspace.clone(), user.clone()), *status);
                    }
                    return users.into_iter().zip(statuses).collect();
                }
                Err(e) => self.mark_stale(&e),
            }
        }
        users
            .into_iter()
            .map(|user| {
                let status = self
                    .known
                    .get(&(workspace.clone(), user.clone()))
                    .map_or(Status::Offline, |s| *s);
                (user, status)
            })
            .collect()
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
}
