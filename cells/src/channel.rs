//! [`ChannelActor`]: the one owner of an active channel. It alone assigns the channel's seqs,
//! holds its members and subscribed sessions, and fans its events out.
//!
//! Every op runs as one `ctx.wait` step ([`ChannelActor::sequenced`]): no other message is
//! handled while an op awaits the store, so "read `last_seq`, append `last_seq + 1`, publish"
//! is atomic and seqs are 1, 2, 3, … without gap or reuse. When a write fails the actor
//! marks itself stale and reloads from the store before its next op, so a write whose outcome
//! is unknown is neither reused nor skipped (if it landed, the reload delivers it late).
//! Reads that need no ordering (history) run beside the queue with `ctx.spawn`.
//!
//! Seqs are never reused, even when the store loses writes (an async replica promoted, an
//! append-only file truncated): the actor remembers the highest seq it handed out, and when the
//! store's `last_seq` is found below it, raises the store's to it, continues above, counts the
//! regression (`confab_store_regressions_total`) and tells the channel's sessions to `resync`.
//! The mark is kept in memory (across actor restarts, in the registry), so a regression while
//! the cell runs is caught; one that happens while the cell is down is not.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::{ready, ActorFutureExt, LocalBoxActorFuture, WrapFuture};
use actix::{Actor, ActorContext, AsyncContext, AtomicResponse, Context, Handler};
use confab_shared::link::{Caller, CellError, CellReply, ChannelOp, Frame, ToGateway};
use confab_shared::server::{ChannelInfo, ChannelKind, Event};
use confab_shared::{limits, now_ms, now_us, ChannelId, SessionId, UserId, WorkspaceId};

use crate::fanout::{self, Subscribers};
use crate::link::Reply;
use crate::messages::{ChannelRequest, Inspect, SeedMembers, Subscribe, Unsubscribe};
use crate::registry::{Registry, SessionEntry};
use crate::store::{CellStore, ChannelMeta, ChannelSnapshot, MessageQuery, StoreError};
use crate::workspace;

/// Most recent events kept encoded in memory, so that most resumes replay without the store.
const RECENT_EVENTS: usize = 256;
/// How often an actor looks at whether it is idle.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);
/// An actor with no subscribed session stops after this long without an op.
const IDLE_STOP_AFTER: Duration = Duration::from_secs(300);
const TYPING_THROTTLE: Duration = Duration::from_millis(limits::TYPING_THROTTLE_MS);

/// The loaded state of a channel.
struct ChannelState {
    meta: ChannelMeta,
    last_seq: u64,
    first_seq: u64,
    members: HashSet<UserId>,
}

/// Who may do what on a channel, as the behaviour decisions put it.
#[derive(Clone, Copy)]
enum Rule {
    /// send, edit, delete, typing, read: public non-members are forbidden, others not found.
    Member,
    /// history and member listing: public channels are open to the workspace.
    View,
}

/// What a write op's store step produced.
enum Outcome {
    /// The events were appended; commit them in order. `invited` users get `channel_added`
    /// (with their read marker) before their `member_joined`.
    Appended {
        events: Vec<Event>,
        created_us: u64,
        invited: HashMap<UserId, u64>,
        /// The store's `last_seq` when it was found below the events' predecessor (it lost
        /// writes) and raised before the append.
        regressed: Option<u64>,
    },
    /// A `send` whose `client_msg_id` was already used: the first ack again.
    Duplicate { seq: u64, ts: u64 },
    /// The op is refused after looking at stored data.
    Refused(CellError),
}

/// Appends one event and reports it as the op's outcome (the common case of every op but
/// channel creation, which appends several).
async fn append_one(
    store: &dyn CellStore,
    workspace: &WorkspaceId,
    channel: &ChannelId,
    event: Event,
    retention: u64,
    created_us: u64,
) -> Result<Outcome, StoreError> {
    let regressed = append_above(store, workspace, channel, &event, retention).await?;
    Ok(Outcome::Appended {
        events: vec![event],
        created_us,
        invited: HashMap::new(),
        regressed,
    })
}

/// Appends `event` at the seq the actor assigned. When the store's `last_seq` is below the
/// event's predecessor, the store lost writes the actor had committed (and clients had seen):
/// the store's `last_seq` is raised first, so the event still lands above every seq handed
/// out. Returns the `last_seq` the store had in that case.
async fn append_above(
    store: &dyn CellStore,
    workspace: &WorkspaceId,
    channel: &ChannelId,
    event: &Event,
    retention: u64,
) -> Result<Option<u64>, StoreError> {
    match store.append(workspace, channel, event, retention).await {
        Ok(()) => Ok(None),
        Err(StoreError::SeqConflict { expected, got, .. }) if expected < got => {
            let found = expected - 1;
            store
                .raise_last_seq(workspace, channel, found, got - 1)
                .await?;
            store.append(workspace, channel, event, retention).await?;
            Ok(Some(found))
        }
        Err(e) => Err(e),
    }
}

/// [`append_above`] for a batch of joins (`CellStore::append_joins`): when the store's
/// `last_seq` is found below the first join's predecessor, it is raised first. Returns how
/// many joins were appended and the `last_seq` the store had in that case.
async fn append_joins_above(
    store: &dyn CellStore,
    workspace: &WorkspaceId,
    channel: &ChannelId,
    joins: &[Event],
    retention: u64,
    max_user_channels: u64,
) -> Result<(usize, Option<u64>), StoreError> {
    let first = joins.first().and_then(Event::seq);
    match store
        .append_joins(workspace, channel, joins, retention, max_user_channels)
        .await
    {
        Ok(appended) => Ok((appended, None)),
        Err(StoreError::SeqConflict { expected, got, .. })
            if expected < got && Some(got) == first =>
        {
            let found = expected - 1;
            store
                .raise_last_seq(workspace, channel, found, got - 1)
                .await?;
            let appended = store
                .append_joins(workspace, channel, joins, retention, max_user_channels)
                .await?;
            Ok((appended, Some(found)))
        }
        Err(e) => Err(e),
    }
}

/// What a reload found: the snapshot, events that landed although their write was reported
/// failed, and the store's `last_seq` if it was found below the highest seq handed out.
type Loaded = (Option<ChannelSnapshot>, Vec<Event>, Option<u64>);

/// The actor of one active channel.
pub(crate) struct ChannelActor {
    reg: Arc<Registry>,
    workspace: WorkspaceId,
    id: ChannelId,
    state: Option<ChannelState>,
    /// The in-memory state may differ from the store (a write failed): reload before any op.
    stale: bool,
    /// The last load found no such channel.
    missing: bool,
    subs: Subscribers,
    typing: HashMap<UserId, Instant>,
    recent: VecDeque<(u64, Frame)>,
    last_op: Instant,
    /// The highest seq this process handed out in the channel: the store's `last_seq` must
    /// never be found below it (else it lost writes, and the actor continues above it).
    high_water: u64,
    /// `confab_events_published_total`, registered once per actor instead of per event.
    published: metrics::Counter,
}

impl Actor for ChannelActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Nothing is handled before the state is loaded.
        ctx.wait(self.reload());
        ctx.run_interval(HOUSEKEEPING_EVERY, |act, ctx| act.housekeeping(ctx));
    }
}

impl ChannelActor {
    pub(crate) fn new(reg: Arc<Registry>, workspace: WorkspaceId, id: ChannelId) -> Self {
        let high_water = reg.high_water(&(workspace.clone(), id.clone()));
        ChannelActor {
            reg,
            workspace,
            id,
            state: None,
            stale: true,
            missing: false,
            subs: Subscribers::default(),
            typing: HashMap::new(),
            recent: VecDeque::new(),
            last_op: Instant::now(),
            high_water,
            published: metrics::counter!("confab_events_published_total"),
        }
    }

    /// Loads the channel from the store. With a previous state, events the store has beyond
    /// it (a write reported failed that landed anyway) are committed now, so none is lost.
    /// A store found below the highest seq handed out lost writes: its `last_seq` is raised
    /// to that seq before the actor goes on.
    fn reload(&mut self) -> LocalBoxActorFuture<Self, ()> {
        let store = self.reg.store.clone();
        let (ws, id) = (self.workspace.clone(), self.id.clone());
        let known = self.state.as_ref().map(|s| s.last_seq);
        let high = self.high_water.max(known.unwrap_or(0));
        let load = async move {
            let mut snapshot = store.load_channel(&ws, &id).await?;
            let mut regressed = None;
            if let Some(s) = snapshot.as_mut().filter(|s| s.last_seq < high) {
                store.raise_last_seq(&ws, &id, s.last_seq, high).await?;
                regressed = Some(s.last_seq);
                s.last_seq = high;
            }
            let missed = match (&snapshot, known) {
                (Some(s), Some(known)) if s.last_seq > known => {
                    let count = usize::try_from(s.last_seq - known).unwrap_or(usize::MAX);
                    store.events_after(&ws, &id, known, count).await?
                }
                _ => Vec::new(),
            };
            Ok::<_, StoreError>((snapshot, missed, regressed))
        };
        load.into_actor(self)
            .map(|result, act, ctx| act.apply_load(result, ctx))
            .boxed_local()
    }

    /// The store lost writes: seqs from `found + 1` up to the highest handed out are gone from
    /// it, and clients saw them with content the store no longer has. Count it, say it, drop
    /// the cached events (replays now come from the store, and find the gap) and tell every
    /// subscribed session to resync.
    fn regressed(&mut self, found: u64) {
        metrics::counter!("confab_store_regressions_total").increment(1);
        tracing::warn!(
            workspace = %self.workspace,
            channel = %self.id,
            store_last_seq = found,
            handed_out = self.high_water,
            "the store lost writes; continuing above the highest seq handed out, sessions resync"
        );
        self.recent.clear();
        let event = Event::Resync {
            channel: self.id.clone(),
        };
        self.publish(&fanout::frame(&event, now_us()));
    }

    fn apply_load(&mut self, result: Result<Loaded, StoreError>, ctx: &mut Context<Self>) {
        match result {
            Ok((Some(snapshot), missed, regressed)) => {
                if let Some(found) = regressed {
                    self.regressed(found);
                }
                for event in missed {
                    tracing::warn!(channel = %self.id, seq = ?event.seq(), "delivering an event whose write was reported failed");
                    self.commit(event, now_us());
                }
                self.recent.retain(|(seq, _)| *seq <= snapshot.last_seq);
                self.state = Some(ChannelState {
                    meta: snapshot.meta,
                    last_seq: snapshot.last_seq,
                    first_seq: snapshot.first_seq,
                    members: snapshot.members.into_iter().collect(),
                });
                self.stale = false;
                self.missing = false;
            }
            Ok((None, _, _)) => {
                self.state = None;
                self.stale = false;
                self.missing = true;
                // A probe for a channel that does not exist must not leave an actor behind.
                ctx.run_later(Duration::from_secs(1), |act, ctx| {
                    if act.missing {
                        act.stop(ctx);
                    }
                });
            }
            Err(e) => {
                tracing::warn!(channel = %self.id, error = %e, "channel load failed");
                self.stale = true;
            }
        }
    }

    /// Runs `op` once the state is loaded, as one exclusive step of this actor.
    fn sequenced<R: 'static>(
        &mut self,
        op: impl FnOnce(&mut Self, &mut Context<Self>) -> LocalBoxActorFuture<Self, R> + 'static,
    ) -> LocalBoxActorFuture<Self, R> {
        self.last_op = Instant::now();
        let load = if self.stale || self.missing {
            self.reload()
        } else {
            ready(()).boxed_local()
        };
        load.then(move |(), act, ctx| op(act, ctx)).boxed_local()
    }

    fn housekeeping(&mut self, ctx: &mut Context<Self>) {
        self.typing.retain(|_, at| at.elapsed() < TYPING_THROTTLE);
        let idle = self.subs.is_empty() && self.last_op.elapsed() >= IDLE_STOP_AFTER;
        if self.missing || idle {
            self.stop(ctx);
        }
    }

    fn stop(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(channel = %self.id, "channel actor stopping");
        self.reg
            .remember_high_water((self.workspace.clone(), self.id.clone()), self.high_water);
        self.reg
            .forget_channel(&(self.workspace.clone(), self.id.clone()), &ctx.address());
        ctx.stop();
    }

    /// The state, if the caller may act under `rule`.
    fn access(&self, user: &UserId, rule: Rule) -> Result<&ChannelState, CellError> {
        if self.stale {
            return Err(CellError::unavailable("channel state unavailable, retry"));
        }
        let state = self
            .state
            .as_ref()
            .ok_or_else(|| CellError::not_found("channel"))?;
        if state.members.contains(user) {
            return Ok(state);
        }
        match (state.meta.kind, rule) {
            (ChannelKind::Public, Rule::View) => Ok(state),
            (ChannelKind::Public, Rule::Member) => {
                Err(CellError::forbidden("not a member of this channel"))
            }
            _ => Err(CellError::not_found("channel")),
        }
    }

    fn info(&self, read_seq: u64) -> Option<ChannelInfo> {
        self.state.as_ref().map(|s| ChannelInfo {
            id: self.id.clone(),
            name: s.meta.name.clone(),
            kind: s.meta.kind,
            last_seq: s.last_seq,
            read_seq,
        })
    }

    fn ack_current(&self) -> Result<CellReply, CellError> {
        let seq = self.state.as_ref().map_or(0, |s| s.last_seq);
        Ok(CellReply::Ack {
            channel: self.id.clone(),
            seq,
            ts: now_ms(),
        })
    }

    /// Makes an appended event visible: state, subscriptions, fanout, recent log. The event
    /// is already durable.
    fn commit(&mut self, event: Event, created_us: u64) {
        let Some(seq) = event.seq() else {
            return;
        };
        let retention = self.reg.settings.retention_events.max(1);
        if let Some(state) = self.state.as_mut() {
            debug_assert_eq!(seq, state.last_seq + 1, "seqs are committed in order");
            state.last_seq = seq;
            state.first_seq = state.first_seq.max((seq + 1).saturating_sub(retention));
        }
        self.high_water = self.high_water.max(seq);
        if let Event::MemberJoined { user, .. } = &event {
            self.add_member(user);
        }
        let frame = fanout::frame(&event, created_us);
        self.publish(&frame);
        if let Some(state) = self.state.as_ref() {
            // After the join's member is added and before the leaver is removed, so that a
            // webhook's user counts as a member of the events of its own joins and leaves.
            self.reg
                .webhooks
                .notify(&self.workspace, &self.id, seq, |u| {
                    state.members.contains(u)
                });
        }
        self.recent.push_back((seq, frame));
        let keep = RECENT_EVENTS.min(usize::try_from(retention).unwrap_or(RECENT_EVENTS));
        while self.recent.len() > keep {
            self.recent.pop_front();
        }
        // The leaver receives its own member_left: unsubscribe only after the fanout.
        if let Event::MemberLeft { user, .. } = &event {
            self.remove_member(user);
        }
    }

    fn publish(&mut self, frame: &Frame) {
        self.published.increment(1);
        self.subs.deliver(frame);
    }

    fn add_member(&mut self, user: &UserId) {
        if let Some(state) = self.state.as_mut() {
            state.members.insert(user.clone());
        }
        for entry in self.reg.sessions_of(&self.workspace, user) {
            self.subscribe(&entry);
        }
    }

    fn remove_member(&mut self, user: &UserId) {
        if let Some(state) = self.state.as_mut() {
            state.members.remove(user);
        }
        for entry in self.subs.remove_user(user) {
            entry.untrack(&self.id);
        }
    }

    fn subscribe(&mut self, entry: &Arc<SessionEntry>) -> bool {
        entry.workspace == self.workspace && entry.track(&self.id) && {
            self.subs.add(entry);
            true
        }
    }

    /// Sends `channel_added` to every session of a user added by someone else.
    fn announce_added(&self, user: &UserId, read_seq: u64) {
        let Some(info) = self.info(read_seq) else {
            return;
        };
        let sessions = self.reg.sessions_of(&self.workspace, user);
        if sessions.is_empty() {
            return;
        }
        let event = Event::ChannelAdded {
            channel: self.id.clone(),
            info,
        };
        self.published.increment(1);
        fanout::deliver_to(&sessions, &fanout::frame(&event, now_us()));
    }

    /// Applies a write op's outcome: commit its events in order, then answer.
    fn finish(
        &mut self,
        result: Result<Outcome, StoreError>,
        done: impl FnOnce(&Self, Option<(u64, u64)>) -> Result<CellReply, CellError>,
    ) -> Result<CellReply, CellError> {
        match result {
            Ok(Outcome::Appended {
                events,
                created_us,
                invited,
                regressed,
            }) => {
                if let Some(found) = regressed {
                    self.regressed(found);
                }
                let mut last = None;
                for event in events {
                    if let Event::MemberJoined { user, .. } = &event {
                        if let Some(read_seq) = invited.get(user) {
                            self.announce_added(user, *read_seq);
                        }
                    }
                    last = event_seq_ts(&event).or(last);
                    self.commit(event, created_us);
                }
                done(self, last)
            }
            Ok(Outcome::Duplicate { seq, ts }) => done(self, Some((seq, ts))),
            Ok(Outcome::Refused(e)) => Err(e),
            Err(e) => {
                tracing::warn!(channel = %self.id, error = %e, "channel write failed, reloading before the next op");
                self.stale = true;
                Err(store_unavailable(&e))
            }
        }
    }
}

fn event_seq_ts(event: &Event) -> Option<(u64, u64)> {
    match event {
        Event::Message { seq, ts, .. }
        | Event::MessageEdited { seq, ts, .. }
        | Event::MessageDeleted { seq, ts, .. }
        | Event::MemberJoined { seq, ts, .. }
        | Event::MemberLeft { seq, ts, .. } => Some((*seq, *ts)),
        _ => None,
    }
}

/// The one mapping of store failures to the client-facing error.
pub(crate) fn store_unavailable(e: &StoreError) -> CellError {
    tracing::debug!(error = %e, "store error surfaced as unavailable");
    CellError::unavailable("storage unavailable, retry")
}

fn ack(channel: &ChannelId, seq_ts: Option<(u64, u64)>) -> Result<CellReply, CellError> {
    let (seq, ts) = seq_ts.ok_or_else(|| CellError::unavailable("no event written"))?;
    Ok(CellReply::Ack {
        channel: channel.clone(),
        seq,
        ts,
    })
}

// ---- ops ----------------------------------------------------------------------------------

type Step = LocalBoxActorFuture<ChannelActor, ()>;

impl ChannelActor {
    fn dispatch(
        &mut self,
        caller: Caller,
        op: ChannelOp,
        reply: Reply,
        ctx: &mut Context<Self>,
    ) -> Step {
        let user = caller.user;
        match op {
            ChannelOp::Send {
                text,
                client_msg_id,
                thread,
            } => self.op_send(user, text, client_msg_id, thread, reply),
            ChannelOp::Edit { seq, text } => self.op_edit(user, seq, Some(text), reply),
            ChannelOp::Delete { seq } => self.op_edit(user, seq, None, reply),
            ChannelOp::Typing => {
                reply.send(self.op_typing(&user));
                ready(()).boxed_local()
            }
            ChannelOp::History {
                before,
                after,
                limit,
            } => {
                self.op_history(&user, before, after, limit, reply, ctx);
                ready(()).boxed_local()
            }
            ChannelOp::AddMember { user: target } => self.op_add(user, target, reply),
            ChannelOp::RemoveMember { user: target } => self.op_remove(user, target, reply),
            ChannelOp::ListMembers => {
                reply.send(self.op_members(&user));
                ready(()).boxed_local()
            }
        }
    }

    /// Runs a write's store step, then commits and answers through `reply`.
    fn write(
        &mut self,
        step: impl std::future::Future<Output = Result<Outcome, StoreError>> + 'static,
        reply: Reply,
    ) -> Step {
        let channel = self.id.clone();
        step.into_actor(self)
            .map(move |result, act, _| {
                reply.send(act.finish(result, |_, seq_ts| ack(&channel, seq_ts)));
            })
            .boxed_local()
    }

    fn op_send(
        &mut self,
        user: UserId,
        text: String,
        client_msg_id: Option<String>,
        thread: Option<u64>,
        reply: Reply,
    ) -> Step {
        let checked = self
            .access(&user, Rule::Member)
            .map(|s| s.last_seq + 1)
            .and_then(|seq| check_text(&text).map(|()| seq))
            .and_then(|seq| check_client_msg_id(client_msg_id.as_deref()).map(|()| seq));
        let seq = match checked {
            Ok(seq) => seq,
            Err(e) => return refuse(reply, e),
        };
        let (store, ws, channel) = (
            self.reg.store.clone(),
            self.workspace.clone(),
            self.id.clone(),
        );
        let retention = self.reg.settings.retention_events;
        let step = async move {
            if let Some(parent) = thread {
                if store.message(&ws, &channel, parent).await?.is_none() {
                    return Ok(Outcome::Refused(CellError::not_found("thread message")));
                }
            }
            if let Some(cmid) = &client_msg_id {
                if let Some((seq, ts)) = store.find_client_msg(&ws, &channel, &user, cmid).await? {
                    return Ok(Outcome::Duplicate { seq, ts });
                }
            }
            let created_us = now_us();
            let event = Event::Message {
                channel: channel.clone(),
                seq,
                ts: created_us / 1000,
                user,
                text,
                client_msg_id,
                thread,
            };
            append_one(&*store, &ws, &channel, event, retention, created_us).await
        };
        self.write(step, reply)
    }

    /// Edits (`text` given) or deletes the caller's message `target`.
    fn op_edit(&mut self, user: UserId, target: u64, text: Option<String>, reply: Reply) -> Step {
        let checked = self
            .access(&user, Rule::Member)
            .map(|s| s.last_seq + 1)
            .and_then(|seq| text.as_deref().map_or(Ok(()), check_text).map(|()| seq));
        let seq = match checked {
            Ok(seq) => seq,
            Err(e) => return refuse(reply, e),
        };
        let (store, ws, channel) = (
            self.reg.store.clone(),
            self.workspace.clone(),
            self.id.clone(),
        );
        let retention = self.reg.settings.retention_events;
        let step = async move {
            let message = store.message(&ws, &channel, target).await?;
            let Some(message) = message.filter(|m| !m.deleted) else {
                return Ok(Outcome::Refused(CellError::not_found("message")));
            };
            if message.user != user {
                let verb = if text.is_some() { "edit" } else { "delete" };
                return Ok(Outcome::Refused(CellError::forbidden(format!(
                    "only the author may {verb} a message"
                ))));
            }
            let created_us = now_us();
            let ts = created_us / 1000;
            let event = match text {
                Some(text) => Event::MessageEdited {
                    channel: channel.clone(),
                    seq,
                    ts,
                    user,
                    target,
                    text,
                },
                None => Event::MessageDeleted {
                    channel: channel.clone(),
                    seq,
                    ts,
                    user,
                    target,
                },
            };
            append_one(&*store, &ws, &channel, event, retention, created_us).await
        };
        self.write(step, reply)
    }

    fn op_typing(&mut self, user: &UserId) -> Result<CellReply, CellError> {
        self.access(user, Rule::Member)?;
        let now = Instant::now();
        if let Some(at) = self.typing.get(user) {
            if now.duration_since(*at) < TYPING_THROTTLE {
                return Ok(CellReply::Done);
            }
        }
        self.typing.insert(user.clone(), now);
        let event = Event::Typing {
            channel: self.id.clone(),
            user: user.clone(),
        };
        self.published.increment(1);
        self.subs
            .deliver_except(user, &fanout::frame(&event, now_us()));
        Ok(CellReply::Done)
    }

    fn op_history(
        &mut self,
        user: &UserId,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
        reply: Reply,
        ctx: &mut Context<Self>,
    ) {
        if let Err(e) = self.access(user, Rule::View) {
            return reply.send(Err(e));
        }
        let limit = limit.clamp(1, limits::HISTORY_MAX_LIMIT) as usize;
        // Ask one more than the page to learn whether more lie beyond it.
        let query = MessageQuery {
            after: after.unwrap_or(0),
            before: before.unwrap_or(u64::MAX),
            limit: limit + 1,
            newest_first: after.is_none(),
        };
        let (store, ws, channel) = (
            self.reg.store.clone(),
            self.workspace.clone(),
            self.id.clone(),
        );
        let read = async move {
            let result = store.messages(&ws, &channel, query).await;
            reply.send(
                result
                    .map_err(|e| store_unavailable(&e))
                    .map(|mut messages| {
                        let has_more = messages.len() > limit;
                        if has_more {
                            if query.newest_first {
                                messages.remove(0);
                            } else {
                                messages.truncate(limit);
                            }
                        }
                        CellReply::History {
                            channel,
                            messages,
                            has_more,
                        }
                    }),
            );
        };
        ctx.spawn(read.into_actor(self));
    }

    fn op_members(&self, user: &UserId) -> Result<CellReply, CellError> {
        let state = self.access(user, Rule::View)?;
        let mut members: Vec<UserId> = state.members.iter().cloned().collect();
        members.sort();
        Ok(CellReply::Members(members))
    }

    fn op_add(&mut self, caller: UserId, target: UserId, reply: Reply) -> Step {
        let state = match self.membership_access(&caller, &target) {
            Ok(state) => state,
            Err(e) => return refuse(reply, e),
        };
        if state.members.contains(&target) {
            reply.send(self.ack_current());
            return ready(()).boxed_local();
        }
        let max_members = self.reg.settings.max_members_per_channel;
        if state.members.len() >= max_members {
            return refuse(reply, workspace::channel_full(max_members));
        }
        let invited = (caller != target).then(|| target.clone());
        let step = self.join_step(vec![target], invited.into_iter().collect());
        self.write(step, reply)
    }

    fn op_remove(&mut self, caller: UserId, target: UserId, reply: Reply) -> Step {
        let state = match self.membership_access(&caller, &target) {
            Ok(state) => state,
            Err(e) => return refuse(reply, e),
        };
        if !state.members.contains(&target) {
            reply.send(self.ack_current());
            return ready(()).boxed_local();
        }
        let seq = state.last_seq + 1;
        let (store, ws, channel) = (
            self.reg.store.clone(),
            self.workspace.clone(),
            self.id.clone(),
        );
        let retention = self.reg.settings.retention_events;
        let step = async move {
            let created_us = now_us();
            let event = Event::MemberLeft {
                channel: channel.clone(),
                seq,
                ts: created_us / 1000,
                user: target,
            };
            append_one(&*store, &ws, &channel, event, retention, created_us).await
        };
        self.write(step, reply)
    }

    /// Who may change membership: hidden channels are not found by non-members, DMs never
    /// change, and only members change others' membership.
    fn membership_access(
        &self,
        caller: &UserId,
        target: &UserId,
    ) -> Result<&ChannelState, CellError> {
        let state = self.access(caller, Rule::View)?;
        let is_member = state.members.contains(caller);
        if state.meta.kind == ChannelKind::Dm {
            return Err(CellError::forbidden("the members of a dm cannot change"));
        }
        if caller != target && !is_member {
            return Err(CellError::forbidden(
                "only members may change other members",
            ));
        }
        Ok(state)
    }

    /// The store step of `users` joining in order; `invited` ones get `channel_added`. A user
    /// already in as many channels as one may be is left out; when that leaves nobody to
    /// join, the op is refused with `conflict`.
    ///
    /// The markers and the joins take one round trip each, however many users join (a channel
    /// created with 1,000 members used to cost 2,000 sequential round trips on the cell's
    /// actor thread), plus one per user left out.
    fn join_step(
        &self,
        users: Vec<UserId>,
        invited: HashSet<UserId>,
    ) -> impl std::future::Future<Output = Result<Outcome, StoreError>> + 'static {
        let next = self.state.as_ref().map_or(1, |s| s.last_seq + 1);
        let (store, ws, channel) = (
            self.reg.store.clone(),
            self.workspace.clone(),
            self.id.clone(),
        );
        let retention = self.reg.settings.retention_events;
        let max_channels = self.reg.settings.max_channels_per_user;
        async move {
            let created_us = now_us();
            let invited: Vec<UserId> = users
                .iter()
                .filter(|u| invited.contains(*u))
                .cloned()
                .collect();
            let markers = store.read_markers_in(&ws, &channel, &invited).await?;
            let markers: HashMap<UserId, u64> = invited.into_iter().zip(markers).collect();
            let mut events = Vec::with_capacity(users.len());
            let mut left_out = None;
            let mut regressed = None;
            let mut pending = users.as_slice();
            while !pending.is_empty() {
                let first = next + events.len() as u64;
                let batch: Vec<Event> = (first..)
                    .zip(pending)
                    .map(|(seq, user)| Event::MemberJoined {
                        channel: channel.clone(),
                        seq,
                        ts: created_us / 1000,
                        user: user.clone(),
                    })
                    .collect();
                let (appended, found) = append_joins_above(
                    &*store,
                    &ws,
                    &channel,
                    &batch,
                    retention,
                    max_channels as u64,
                )
                .await?;
                regressed = regressed.or(found);
                events.extend(batch.into_iter().take(appended));
                let Some(full) = pending.get(appended) else {
                    break;
                };
                left_out.get_or_insert_with(|| full.clone());
                pending = &pending[appended + 1..];
            }
            match left_out {
                Some(user) if events.is_empty() => {
                    Ok(Outcome::Refused(workspace::user_full(&user, max_channels)))
                }
                _ => Ok(Outcome::Appended {
                    events,
                    created_us,
                    invited: markers,
                    regressed,
                }),
            }
        }
    }

    fn op_seed(
        &mut self,
        members: Vec<UserId>,
        by: Option<UserId>,
    ) -> LocalBoxActorFuture<Self, Result<ChannelInfo, CellError>> {
        if self.stale {
            return ready(Err(CellError::unavailable(
                "channel state unavailable, retry",
            )))
            .boxed_local();
        }
        let Some(state) = self.state.as_ref() else {
            return ready(Err(CellError::not_found("channel"))).boxed_local();
        };
        let mut seen = HashSet::new();
        let joining: Vec<UserId> = members
            .into_iter()
            .filter(|u| !state.members.contains(u) && seen.insert(u.clone()))
            .collect();
        let max_members = self.reg.settings.max_members_per_channel;
        if state.members.len() + joining.len() > max_members {
            return ready(Err(workspace::channel_full(max_members))).boxed_local();
        }
        let invited = joining
            .iter()
            .filter(|u| Some(*u) != by.as_ref())
            .cloned()
            .collect();
        self.join_step(joining, invited)
            .into_actor(self)
            .map(move |result, act, _| {
                act.finish(result, |_, _| Ok(CellReply::Done))?;
                act.info(0).ok_or_else(|| CellError::not_found("channel"))
            })
            .boxed_local()
    }

    fn op_subscribe(
        &mut self,
        msg: Subscribe,
    ) -> LocalBoxActorFuture<Self, Result<Option<ChannelInfo>, CellError>> {
        if self.stale {
            return ready(Err(CellError::unavailable(
                "channel state unavailable, retry",
            )))
            .boxed_local();
        }
        let member = self
            .state
            .as_ref()
            .is_some_and(|s| s.members.contains(&msg.session.user));
        if !member || !self.subscribe(&msg.session) {
            return ready(Ok(None)).boxed_local();
        }
        let info = self.info(0);
        let Some(after) = msg.resume else {
            return ready(Ok(info)).boxed_local();
        };
        self.replay(&msg.session, after, msg.replay_limit)
            .map(move |(), _, _| Ok(info))
            .boxed_local()
    }

    /// Delivers to one just-subscribed session every event after `after`, or `resync` when
    /// they cannot all be replayed. Runs inside the subscribe step, so no live event can
    /// slip in between: replay then live has no gap and no duplicate.
    fn replay(&mut self, session: &Arc<SessionEntry>, after: u64, limit: u32) -> Step {
        let Some(state) = self.state.as_ref() else {
            return ready(()).boxed_local();
        };
        let (last, first) = (state.last_seq, state.first_seq);
        let target = Target::new(session);
        if after == last {
            return ready(()).boxed_local();
        }
        if after > last || after + 1 < first || last - after > u64::from(limit) {
            target.resync(&self.id);
            return ready(()).boxed_local();
        }
        if self
            .recent
            .front()
            .is_some_and(|(seq, _)| *seq <= after + 1)
        {
            let now = now_us();
            for (_, frame) in self.recent.iter().filter(|(seq, _)| *seq > after) {
                // A clone shares the frame's compressed form with every replay of it.
                target.send(Frame {
                    created_us: now,
                    ..frame.clone()
                });
            }
            return ready(()).boxed_local();
        }
        let (store, ws, channel) = (
            self.reg.store.clone(),
            self.workspace.clone(),
            self.id.clone(),
        );
        let count = usize::try_from(last - after).unwrap_or(usize::MAX);
        let read = async move { store.events_after(&ws, &channel, after, count).await };
        read.into_actor(self)
            .map(move |result, act, _| {
                let events = result.unwrap_or_default();
                let contiguous = events.len() == count
                    && events
                        .iter()
                        .zip(after + 1..)
                        .all(|(e, seq)| e.seq() == Some(seq));
                if !contiguous {
                    return target.resync(&act.id);
                }
                let now = now_us();
                for event in &events {
                    target.send(fanout::frame(event, now));
                }
            })
            .boxed_local()
    }
}

/// One session as a replay target: a single recipient list shared by all replayed frames.
struct Target {
    link: Arc<crate::link::Link>,
    sessions: Arc<[SessionId]>,
}

impl Target {
    fn new(session: &Arc<SessionEntry>) -> Self {
        Target {
            link: session.link.clone(),
            sessions: Arc::from(vec![session.id.clone()]),
        }
    }

    fn send(&self, frame: Frame) {
        self.link.push(ToGateway::Deliver {
            sessions: self.sessions.clone(),
            frame,
        });
    }

    fn resync(&self, channel: &ChannelId) {
        let event = Event::Resync {
            channel: channel.clone(),
        };
        self.send(fanout::frame(&event, now_us()));
    }
}

fn refuse(reply: Reply, error: CellError) -> Step {
    reply.send(Err(error));
    ready(()).boxed_local()
}

fn check_text(text: &str) -> Result<(), CellError> {
    // The gateway enforces the configured limit; this only keeps absurd input out of the store.
    confab_shared::client::check_text(text, limits::MAX_TEXT_BYTES * 4)
        .map_err(|(code, message)| CellError::new(code, message))
}

fn check_client_msg_id(cmid: Option<&str>) -> Result<(), CellError> {
    match cmid {
        Some(c) if c.is_empty() || c.len() > limits::MAX_CLIENT_MSG_ID_BYTES => Err(
            CellError::bad_request("client_msg_id must be 1 to 64 bytes"),
        ),
        _ => Ok(()),
    }
}

// ---- handlers -----------------------------------------------------------------------------

impl Handler<ChannelRequest> for ChannelActor {
    type Result = ();

    fn handle(&mut self, msg: ChannelRequest, ctx: &mut Context<Self>) {
        let step = self.sequenced(move |act, ctx| act.dispatch(msg.caller, msg.op, msg.reply, ctx));
        ctx.wait(step);
    }
}

impl Handler<Subscribe> for ChannelActor {
    type Result = AtomicResponse<Self, Result<Option<ChannelInfo>, CellError>>;

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.sequenced(move |act, _| act.op_subscribe(msg)))
    }
}

impl Handler<Unsubscribe> for ChannelActor {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        self.subs.remove(&msg.session);
    }
}

impl Handler<SeedMembers> for ChannelActor {
    type Result = AtomicResponse<Self, Result<ChannelInfo, CellError>>;

    fn handle(&mut self, msg: SeedMembers, _: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.sequenced(move |act, _| act.op_seed(msg.members, msg.by)))
    }
}

impl Handler<Inspect> for ChannelActor {
    type Result = AtomicResponse<Self, Result<ChannelInfo, CellError>>;

    fn handle(&mut self, msg: Inspect, _: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.sequenced(move |act, _| {
            let result = act
                .access(&msg.user, Rule::Member)
                .map(|_| ())
                .and_then(|()| act.info(0).ok_or_else(|| CellError::not_found("channel")));
            ready(result).boxed_local()
        }))
    }
}
