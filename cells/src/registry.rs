//! The cell's shared directory of live things: channel and user actors by key, and attached
//! sessions by id and by user.
//!
//! It is a set of `DashMap`s rather than an actor on purpose: it is consulted on the hot path
//! (routing every request, and by a channel's actor when it adds a member and must find that
//! user's sessions right away), and a synchronous lookup costs no mailbox hop. No map
//! reference is ever held across an await or while another map of the registry is locked.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use actix::{Actor, Addr};
use actix_rt::ArbiterHandle;
use confab_shared::link::{Attach, CellError};
use confab_shared::{ChannelId, SessionId, UserId, WorkspaceId};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::cell::CellBounds;
use crate::channel::ChannelActor;
use crate::link::Link;
use crate::messages::Unsubscribe;
use crate::moving::MoveGate;
use crate::store::CellStore;
use crate::user::UserActor;
use crate::webhooks::Hub;

/// A channel's key: channels are always named within their workspace.
pub(crate) type ChannelKey = (WorkspaceId, ChannelId);
/// A user's key: users are always named within their workspace.
pub(crate) type UserKey = (WorkspaceId, UserId);

/// One attached client session.
pub(crate) struct SessionEntry {
    pub(crate) id: SessionId,
    pub(crate) workspace: WorkspaceId,
    pub(crate) user: UserId,
    pub(crate) link: Arc<Link>,
    subscriptions: Mutex<Subscriptions>,
}

#[derive(Default)]
struct Subscriptions {
    detached: bool,
    channels: HashSet<ChannelId>,
}

impl SessionEntry {
    pub(crate) fn new(
        id: SessionId,
        workspace: WorkspaceId,
        user: UserId,
        link: Arc<Link>,
    ) -> Self {
        SessionEntry {
            id,
            workspace,
            user,
            link,
            subscriptions: Mutex::new(Subscriptions::default()),
        }
    }

    /// Records that a channel's actor subscribes this session; `false` once the session is
    /// detached, so a detach never misses a subscription made concurrently with it.
    pub(crate) fn track(&self, channel: &ChannelId) -> bool {
        let mut subs = self.subscriptions.lock();
        if subs.detached {
            return false;
        }
        subs.channels.insert(channel.clone());
        true
    }

    /// Records that a channel's actor dropped this session.
    pub(crate) fn untrack(&self, channel: &ChannelId) {
        self.subscriptions.lock().channels.remove(channel);
    }

    fn close(&self) -> HashSet<ChannelId> {
        let mut subs = self.subscriptions.lock();
        subs.detached = true;
        std::mem::take(&mut subs.channels)
    }
}

/// Cell-wide settings the actors read.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) retention_events: u64,
    pub(crate) max_channels_per_workspace: usize,
    pub(crate) max_channels_per_user: usize,
    /// At least 2, so that a DM can always have its two members.
    pub(crate) max_members_per_channel: usize,
    pub(crate) bounds: CellBounds,
}

/// The threads a cell's channel and user actors run on: the cell's own arbiter first, then
/// one more arbiter per extra thread, stopped when the cell's state is dropped.
///
/// An actor's key (workspace and channel, or workspace and user) picks its arbiter by hash,
/// and [`Registry::channel`] starts at most one actor per key, so each channel still has
/// exactly one actor assigning its seqs; spreading only lets different channels (and users)
/// run on different cores.
pub(crate) struct ActorArbiters {
    handles: Vec<ArbiterHandle>,
    owned: Vec<actix::Arbiter>,
    hasher: std::collections::hash_map::RandomState,
}

impl ActorArbiters {
    /// The current arbiter and `threads - 1` new ones (at least the current one).
    pub(crate) fn start(threads: usize) -> Self {
        let owned: Vec<actix::Arbiter> =
            (1..threads.max(1)).map(|_| actix::Arbiter::new()).collect();
        let handles = std::iter::once(actix::Arbiter::current())
            .chain(owned.iter().map(|a| a.handle()))
            .collect();
        ActorArbiters {
            handles,
            owned,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// How many threads actors run on.
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// The arbiter the actor of `key` runs on.
    fn for_key(&self, key: &impl std::hash::Hash) -> &ArbiterHandle {
        let slot = self.hasher.hash_one(key) as usize % self.handles.len();
        &self.handles[slot]
    }
}

impl Drop for ActorArbiters {
    fn drop(&mut self) {
        for arbiter in &self.owned {
            arbiter.stop();
        }
    }
}

/// Shared state of one cell.
pub(crate) struct Registry {
    pub(crate) store: Arc<dyn CellStore>,
    pub(crate) settings: Settings,
    pub(crate) arbiter: ArbiterHandle,
    /// The threads channel and user actors run on.
    pub(crate) actor_arbiters: ActorArbiters,
    /// The webhook worker, woken by channel actors after each append.
    pub(crate) webhooks: Arc<Hub>,
    channels: DashMap<ChannelKey, Addr<ChannelActor>>,
    users: DashMap<UserKey, Addr<UserActor>>,
    sessions: DashMap<SessionId, Arc<SessionEntry>>,
    user_sessions: DashMap<UserKey, Vec<Arc<SessionEntry>>>,
    /// The highest seq this process handed out in each channel whose actor stopped, so that
    /// the next actor of the channel still notices a store that lost writes (see
    /// `ChannelActor::high_water`). One number per channel ever active in this process.
    high_water: DashMap<ChannelKey, u64>,
    pub(crate) workspaces: AtomicU64,
    next_link: AtomicU64,
    /// Gateway links connected and not lost yet, by id.
    pub(crate) links: DashMap<u64, Arc<Link>>,
    /// Set once shutdown began: new requests and attaches answer `unavailable`.
    pub(crate) stopping: AtomicBool,
    /// Workspaces moving in or out of this cell, and the requests waiting for their move.
    pub(crate) gate: Arc<MoveGate>,
}

impl Registry {
    pub(crate) fn new(
        store: Arc<dyn CellStore>,
        settings: Settings,
        arbiter: ArbiterHandle,
        actor_arbiters: ActorArbiters,
        webhooks: Arc<Hub>,
    ) -> Self {
        Registry {
            store,
            settings,
            arbiter,
            actor_arbiters,
            webhooks,
            channels: DashMap::new(),
            users: DashMap::new(),
            sessions: DashMap::new(),
            user_sessions: DashMap::new(),
            high_water: DashMap::new(),
            workspaces: AtomicU64::new(0),
            next_link: AtomicU64::new(1),
            links: DashMap::new(),
            stopping: AtomicBool::new(false),
            gate: Arc::new(MoveGate::default()),
        }
    }

    /// The highest seq handed out in the channel by an earlier actor of this process.
    pub(crate) fn high_water(&self, key: &ChannelKey) -> u64 {
        self.high_water.get(key).map_or(0, |seq| *seq)
    }

    /// Keeps a stopping channel actor's highest seq for the channel's next actor.
    pub(crate) fn remember_high_water(&self, key: ChannelKey, seq: u64) {
        if seq > 0 {
            let mut entry = self.high_water.entry(key).or_insert(0);
            *entry = (*entry).max(seq);
        }
    }

    pub(crate) fn next_link_id(&self) -> u64 {
        self.next_link.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Why an attach of `session` must be refused: the cell serves its `max_connections`
    /// already (a session attaching again under its own id replaces itself, so it passes).
    pub(crate) fn refuse_attach(&self, session: &SessionId) -> Option<CellError> {
        let max = self.settings.bounds.max_connections?;
        if (self.sessions.len() as u64) < max || self.sessions.contains_key(session) {
            return None;
        }
        metrics::counter!("confab_cell_attaches_refused_total", "reason" => "max_connections")
            .increment(1);
        Some(CellError::unavailable(format!(
            "this cell is full: it serves its --max-connections of {max} sessions; retry later"
        )))
    }

    /// Every attached session.
    pub(crate) fn all_sessions(&self) -> Vec<Arc<SessionEntry>> {
        self.sessions.iter().map(|e| e.value().clone()).collect()
    }

    /// Channel and user actors in the maps (a stopped one counts until it is replaced or
    /// forgets itself, which it does as it stops).
    pub(crate) fn actor_counts(&self) -> (usize, usize) {
        (self.channels.len(), self.users.len())
    }

    /// The actor of a channel, started (on the arbiter its key hashes to) if none is running.
    pub(crate) fn channel(
        self: &Arc<Self>,
        workspace: &WorkspaceId,
        channel: &ChannelId,
    ) -> Addr<ChannelActor> {
        get_or_start(
            &self.channels,
            (workspace.clone(), channel.clone()),
            |key| {
                let (reg, ws, ch) = (self.clone(), key.0.clone(), key.1.clone());
                ChannelActor::start_in_arbiter(self.actor_arbiters.for_key(key), move |_| {
                    ChannelActor::new(reg, ws, ch)
                })
            },
        )
    }

    /// The channel's actor if one is running; never starts one.
    pub(crate) fn live_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
    ) -> Option<Addr<ChannelActor>> {
        self.channels
            .get(&(workspace.clone(), channel.clone()))
            .map(|a| a.clone())
    }

    /// Forgets a stopping channel actor, unless another one already replaced it.
    pub(crate) fn forget_channel(&self, key: &ChannelKey, addr: &Addr<ChannelActor>) {
        self.channels.remove_if(key, |_, a| a == addr);
    }

    /// The actor of a user, started if none is running.
    pub(crate) fn user(
        self: &Arc<Self>,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> Addr<UserActor> {
        get_or_start(&self.users, (workspace.clone(), user.clone()), |key| {
            let (reg, ws, u) = (self.clone(), key.0.clone(), key.1.clone());
            UserActor::start_in_arbiter(self.actor_arbiters.for_key(key), move |_| {
                UserActor::new(reg, ws, u)
            })
        })
    }

    /// Forgets a stopping user actor, unless another one already replaced it.
    pub(crate) fn forget_user(&self, key: &UserKey, addr: &Addr<UserActor>) {
        self.users.remove_if(key, |_, a| a == addr);
    }

    /// Registers a session before its attach is processed, so that a detach arriving at any
    /// later point finds it. A session id attached again first loses its old registration.
    pub(crate) fn register_session(&self, attach: &Attach, link: &Arc<Link>) -> Arc<SessionEntry> {
        self.detach_session(&attach.session);
        let entry = Arc::new(SessionEntry::new(
            attach.session.clone(),
            attach.workspace.clone(),
            attach.user.clone(),
            link.clone(),
        ));
        self.sessions.insert(entry.id.clone(), entry.clone());
        self.user_sessions
            .entry((entry.workspace.clone(), entry.user.clone()))
            .or_default()
            .push(entry.clone());
        link.sessions.lock().insert(entry.id.clone());
        entry
    }

    /// The attached sessions of a user.
    pub(crate) fn sessions_of(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> Vec<Arc<SessionEntry>> {
        self.user_sessions
            .get(&(workspace.clone(), user.clone()))
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    pub(crate) fn has_sessions(&self, workspace: &WorkspaceId, user: &UserId) -> bool {
        self.user_sessions
            .contains_key(&(workspace.clone(), user.clone()))
    }

    /// Detaches a session if `link` is the one it is attached through: a gateway may only
    /// detach its own sessions.
    pub(crate) fn detach_from_link(&self, session: &SessionId, link: &Link) {
        let owned = self
            .sessions
            .get(session)
            .is_some_and(|e| e.link.id == link.id);
        if owned {
            self.detach_session(session);
        }
    }

    /// Removes a session everywhere: registry, link, and every channel actor it was
    /// subscribed to.
    pub(crate) fn detach_session(&self, session: &SessionId) {
        if let Some((_, entry)) = self.sessions.remove(session) {
            self.finish_detach(entry);
        }
    }

    /// Detaches this registration of a session, not a newer one under the same id.
    pub(crate) fn detach_entry(&self, entry: &Arc<SessionEntry>) {
        if let Some((_, entry)) = self
            .sessions
            .remove_if(&entry.id, |_, e| Arc::ptr_eq(e, entry))
        {
            self.finish_detach(entry);
        }
    }

    fn finish_detach(&self, entry: Arc<SessionEntry>) {
        let session = &entry.id;
        let key = (entry.workspace.clone(), entry.user.clone());
        if let Entry::Occupied(mut e) = self.user_sessions.entry(key) {
            e.get_mut().retain(|s| !Arc::ptr_eq(s, &entry));
            if e.get().is_empty() {
                e.remove();
            }
        }
        entry.link.sessions.lock().remove(session);
        for channel in entry.close() {
            if let Some(addr) = self.live_channel(&entry.workspace, &channel) {
                addr.do_send(Unsubscribe {
                    session: session.clone(),
                });
            }
        }
        tracing::debug!(session = %session, user = %entry.user, "session detached");
    }

    /// The attached sessions of a workspace.
    pub(crate) fn sessions_in(&self, workspace: &WorkspaceId) -> Vec<Arc<SessionEntry>> {
        self.sessions
            .iter()
            .filter(|e| &e.workspace == workspace)
            .map(|e| e.value().clone())
            .collect()
    }

    /// Forgets every channel and user actor of a workspace that left the cell, so that if it
    /// ever comes back its actors start afresh from the store. The old actors stop on their
    /// own once idle (their sessions are detached first).
    pub(crate) fn forget_workspace(&self, workspace: &WorkspaceId) {
        self.channels.retain(|key, _| &key.0 != workspace);
        self.users.retain(|key, _| &key.0 != workspace);
        self.high_water.retain(|key, _| &key.0 != workspace);
    }

    /// Detaches every session of a link the cell gave up on or the gateway dropped.
    pub(crate) fn detach_link(&self, link: &Link) {
        let sessions: Vec<SessionId> = link.sessions.lock().drain().collect();
        tracing::info!(gateway = %link.gateway, link = link.id, sessions = sessions.len(), "link lost, detaching its sessions");
        for session in sessions {
            self.detach_session(&session);
        }
    }
}

/// The live actor under `key`, or a new one from `start` when there is none or it stopped.
/// The map's entry lock makes concurrent first uses start exactly one actor.
fn get_or_start<K, A>(map: &DashMap<K, Addr<A>>, key: K, start: impl Fn(&K) -> Addr<A>) -> Addr<A>
where
    K: std::hash::Hash + Eq + Clone,
    A: actix::Actor<Context = actix::Context<A>>,
{
    if let Some(addr) = map.get(&key).filter(|a| a.connected()) {
        return addr.clone();
    }
    match map.entry(key) {
        Entry::Occupied(mut e) => {
            if !e.get().connected() {
                let addr = start(e.key());
                e.insert(addr);
            }
            e.get().clone()
        }
        Entry::Vacant(e) => {
            let addr = start(e.key());
            e.insert(addr).clone()
        }
    }
}
