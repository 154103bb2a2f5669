//! Webhooks (SPEC §6): registration, and the delivery worker that POSTs a bot's events to it.
//!
//! What is pending is never held anywhere but the store: each webhook keeps, per channel, a
//! *cursor* (the seq up to which its deliveries are done), and its pending deliveries are
//! exactly the channel's durable log events after that cursor that it wants. Nothing extra is
//! written when an event is appended, and a cell killed at any moment loses none: after a
//! restart the worker rebuilds its index from the store and replays every log from its
//! cursors. Delivery is at least once: a cursor is persisted after each batch and before each
//! retry wait, so a crash re-sends at most a batch, with the same `delivery_id`
//! (`<webhook>:<channel>:<seq>`).
//!
//! The worker runs on its own arbiter (thread), so that HTTP work never delays the channel
//! actors. A channel actor wakes it after each append ([`Hub::notify`], a map lookup for a
//! workspace without webhooks); one task per (webhook, channel) with pending work reads at most
//! [`BATCH`] events at a time and attempts them one at a time, in seq order, retrying with
//! exponential backoff. Tasks of other channels and other webhooks proceed meanwhile; each
//! destination (host and port) has a semaphore of `per_host` attempts at once, so a slow
//! receiver holds at most that many connections and never a task of another destination. A
//! slow periodic rescan catches what a wake-up missed (a store error, a disabled webhook's
//! give-ups).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Arbiter;
use actix_rt::ArbiterHandle;
use confab_shared::link::{Caller, CellError, CellReply, WebhookInfo, WebhookOp};
use confab_shared::server::{encode_event, Event};
use confab_shared::{now_ms, ChannelId, ErrorCode, UserId, WorkspaceId};
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::channel::store_unavailable;
use crate::registry::Registry;
use crate::store::{CellStore, StoreResult, WebhookCreate, WebhookRecord, WebhookState};
use crate::user::inspect;

/// Counter: deliveries by `outcome`: `delivered` (2xx), `retried` (a failed attempt that is
/// tried again), `dropped` (given up after `give_up_after`, or trimmed from the log before it
/// could be attempted), `refused` (an attempt refused by `--webhook-deny-private`).
pub const DELIVERIES: &str = "confab_webhook_deliveries_total";
/// Counter: HTTP attempts made.
pub const ATTEMPTS: &str = "confab_webhook_attempts_total";
/// Gauge: log events after the webhooks' cursors in this cell (deliveries not yet done).
pub const PENDING: &str = "confab_webhook_pending";
/// Histogram: seconds from an event's creation to its webhook's 2xx.
pub const LATENCY: &str = "confab_webhook_delivery_latency_seconds";
/// Buckets of [`LATENCY`], from milliseconds (a receiver answering at once) to an hour
/// (deliveries that waited through retries).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
/// Gauge: webhooks of this cell with `"status":"disabled"`.
pub const DISABLED: &str = "confab_webhooks_disabled";

/// The event types a webhook may ask for: the channel log's.
pub const EVENT_TYPES: [&str; 5] = [
    "message",
    "message_edited",
    "message_deleted",
    "member_joined",
    "member_left",
];

/// Most events a (webhook, channel) task holds in memory at once; the rest wait in the store.
pub const BATCH: usize = 64;
/// Longest webhook URL (SPEC §6).
const MAX_URL_CHARS: usize = 2048;
/// Most channels one webhook may name.
const MAX_CHANNELS_PER_WEBHOOK: usize = 100;
/// The first retry waits this long; each further one twice as long, up to `backoff_max`.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// How often the worker looks for work a wake-up missed.
const RESCAN_EVERY: Duration = Duration::from_secs(2);
/// Most of a receiver's answer body read (and thrown away) so its connection can be reused.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How long registration waits for DNS when `deny_private` checks a host name.
const REGISTRATION_DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// How webhooks are delivered: the flags of SPEC §6 and the worker's bounds.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// An attempt without a 2xx within this long failed (`--webhook-timeout-ms`).
    pub timeout: Duration,
    /// Longest wait between two attempts (`--webhook-backoff-max-s`).
    pub backoff_max: Duration,
    /// A delivery not done this long after its event was created is dropped
    /// (`--webhook-give-up-after-s`).
    pub give_up_after: Duration,
    /// A webhook failing everything for this long is disabled (`--webhook-disable-after-s`).
    pub disable_after: Duration,
    /// Refuse loopback, private, link-local and unique-local destinations
    /// (`--webhook-deny-private`).
    pub deny_private: bool,
    /// Webhooks one user may have (`--max-webhooks-per-user`).
    pub max_per_user: usize,
    /// Attempts in flight at once to one destination host and port (`--webhook-per-host`).
    pub per_host: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            timeout: Duration::from_millis(5000),
            backoff_max: Duration::from_secs(600),
            give_up_after: Duration::from_secs(86_400),
            disable_after: Duration::from_secs(3600),
            deny_private: false,
            max_per_user: 20,
            per_host: 16,
        }
    }
}

/// Whether an address is one `deny_private` refuses: loopback, private, link-local,
/// unique-local, unspecified, broadcast or carrier-grade NAT (IPv4 inside IPv6 included).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// The error of a connection refused by the address policy; `last_error` says its text.
#[derive(Debug, thiserror::Error)]
#[error("refused address: {0} is a private, loopback or link-local destination")]
struct RefusedAddress(String);

/// A DNS resolver that drops the addresses `deny_private` refuses, so that a name resolving to
/// 127.0.0.1 at delivery (DNS rebinding included) is never connected to.
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                found.into_iter().filter(|a| !is_private(a.ip())).collect();
            if allowed.is_empty() {
                return Err(Box::new(RefusedAddress(host)) as Box<_>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why an attempt failed, as `last_error` says it.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("status {0}")]
    Status(u16),
    #[error("timeout after {0} ms")]
    Timeout(u128),
    #[error("{0}")]
    Refused(String),
    #[error("connection failed: {0}")]
    Connection(String),
}

/// One registered webhook, as the worker holds it.
struct Hook {
    ws: WorkspaceId,
    rec: WebhookRecord,
    state: Mutex<WebhookState>,
    deleted: AtomicBool,
    /// Cancelled when the webhook is deleted or disabled, ending its tasks' waits; replaced
    /// when it is enabled again.
    stop: Mutex<CancellationToken>,
}

impl Hook {
    fn new(ws: WorkspaceId, rec: WebhookRecord) -> Self {
        let stop = CancellationToken::new();
        if rec.state.disabled {
            stop.cancel();
        }
        Hook {
            ws,
            state: Mutex::new(rec.state.clone()),
            rec,
            deleted: AtomicBool::new(false),
            stop: Mutex::new(stop),
        }
    }

    fn is_active(&self) -> bool {
        !self.deleted.load(Ordering::Acquire) && !self.state.lock().disabled
    }

    fn is_disabled(&self) -> bool {
        self.state.lock().disabled
    }

    fn stop_token(&self) -> CancellationToken {
        self.stop.lock().clone()
    }

    /// Whether events of `channel` are for it at all (its filter and its user's membership).
    fn follows(&self, channel: &ChannelId, is_member: bool) -> bool {
        is_member
            && self
                .rec
                .channels
                .as_ref()
                .is_none_or(|list| list.contains(channel))
    }

    /// Whether it wants this event, given whether its user was a member when it happened.
    fn wants(&self, event: &Event, was_member: bool) -> bool {
        was_member
            && event_user(event).is_some_and(|u| *u != self.rec.user)
            && self.rec.events.iter().any(|t| t == event.type_name())
    }
}

/// Where one (webhook, channel) pair stands.
#[derive(Default)]
struct Position {
    /// The channel's highest seq the worker heard of.
    known: u64,
    /// Deliveries done up to this seq (in memory).
    cursor: u64,
    /// The cursor as last written to the store.
    persisted: u64,
    /// The stored cursor was read (or created).
    loaded: bool,
    /// A task works on the pair.
    running: bool,
}

struct Pair {
    hook: Arc<Hook>,
    channel: ChannelId,
    pos: Mutex<Position>,
}

type PairKey = (WorkspaceId, String, ChannelId);

/// The cell's webhook worker: the index of webhooks by workspace, the (webhook, channel)
/// pairs, the HTTP client and the per-destination semaphores.
pub(crate) struct Hub {
    store: Arc<dyn CellStore>,
    config: WebhookConfig,
    client: reqwest::Client,
    arbiter: ArbiterHandle,
    hooks: DashMap<WorkspaceId, Arc<[Arc<Hook>]>>,
    pairs: DashMap<PairKey, Arc<Pair>>,
    hosts: DashMap<String, Arc<Semaphore>>,
    /// Workspaces whose index must be reloaded from the store (a reload failed).
    reload: Mutex<HashSet<WorkspaceId>>,
    pending: AtomicI64,
    pending_gauge: metrics::Gauge,
}

impl Hub {
    /// Starts the worker on an arbiter of its own; it rebuilds its index from the store.
    ///
    /// # Panics
    /// Outside a running actix `System`, as [`crate::Cell::start`].
    pub(crate) fn start(store: Arc<dyn CellStore>, config: WebhookConfig) -> Arc<Hub> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(config.per_host.max(1))
            .user_agent("confab-webhooks/1");
        if config.deny_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        let client = builder.build().unwrap_or_else(|e| {
            tracing::error!(error = %e, "webhook http client could not be built; using defaults");
            reqwest::Client::new()
        });
        let arbiter = Arbiter::new().handle();
        describe_metrics();
        let hub = Arc::new(Hub {
            store,
            config,
            client,
            arbiter,
            hooks: DashMap::new(),
            pairs: DashMap::new(),
            hosts: DashMap::new(),
            reload: Mutex::new(HashSet::new()),
            pending: AtomicI64::new(0),
            pending_gauge: metrics::gauge!(PENDING),
        });
        let worker = hub.clone();
        hub.arbiter.spawn(async move { worker.run().await });
        hub
    }

    /// The worker's background loop: rebuild the index, then rescan slowly.
    async fn run(self: Arc<Self>) {
        loop {
            match self.rebuild().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook index could not be built yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let mut tick = tokio::time::interval(RESCAN_EVERY);
        loop {
            tick.tick().await;
            self.rescan().await;
        }
    }

    async fn rebuild(self: &Arc<Self>) -> StoreResult<()> {
        let workspaces = self.store.workspace_ids().await?;
        for ws in workspaces {
            self.load_workspace(&ws).await?;
        }
        tracing::info!(
            webhooks = self.hooks.iter().map(|h| h.len()).sum::<usize>(),
            "webhook worker started"
        );
        Ok(())
    }

    /// Loads a workspace's webhooks from the store into the index (keeping the ones it
    /// holds), creates their pairs with their stored cursors (or, for a channel without one,
    /// a cursor at the channel's current seq) and wakes every pair with pending work.
    async fn load_workspace(self: &Arc<Self>, ws: &WorkspaceId) -> StoreResult<()> {
        let records = self.store.webhooks(ws).await?;
        let known: HashMap<String, Arc<Hook>> = self
            .hooks
            .get(ws)
            .map(|h| h.iter().map(|h| (h.rec.id.clone(), h.clone())).collect())
            .unwrap_or_default();
        let hooks: Vec<Arc<Hook>> = records
            .into_iter()
            .map(|rec| match known.get(&rec.id) {
                Some(hook) => hook.clone(),
                None => Arc::new(Hook::new(ws.clone(), rec)),
            })
            .collect();
        if hooks.is_empty() {
            self.hooks.remove(ws);
            return Ok(());
        }
        self.hooks.insert(ws.clone(), hooks.clone().into());
        for hook in hooks {
            self.load_pairs(&hook).await?;
        }
        self.update_disabled_gauge();
        Ok(())
    }

    async fn load_pairs(self: &Arc<Self>, hook: &Arc<Hook>) -> StoreResult<()> {
        let ws = &hook.ws;
        let cursors = self.store.webhook_cursors(ws, &hook.rec.id).await?;
        let mut channels: Vec<ChannelId> = match &hook.rec.channels {
            Some(list) => list.clone(),
            None => self.store.user_channels(ws, &hook.rec.user).await?,
        };
        channels.extend(
            cursors
                .keys()
                .filter(|c| !channels.contains(c))
                .cloned()
                .collect::<Vec<_>>(),
        );
        for summary in self.store.channel_summaries(ws, &channels).await? {
            let channel = summary.meta.id;
            let stored = cursors.get(&channel).copied();
            let cursor = match stored {
                Some(cursor) => cursor,
                None => {
                    self.store
                        .advance_webhook_cursor(ws, &hook.rec.id, &channel, summary.last_seq)
                        .await?;
                    summary.last_seq
                }
            };
            let pair = self.pair(hook, &channel, cursor, true);
            self.raise_known(&pair, summary.last_seq.max(cursor));
            self.wake(&pair);
        }
        Ok(())
    }

    /// The pair of `hook` and `channel`, created with `cursor` if there is none.
    fn pair(&self, hook: &Arc<Hook>, channel: &ChannelId, cursor: u64, loaded: bool) -> Arc<Pair> {
        let key = (hook.ws.clone(), hook.rec.id.clone(), channel.clone());
        self.pairs
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Pair {
                    hook: hook.clone(),
                    channel: channel.clone(),
                    pos: Mutex::new(Position {
                        known: cursor,
                        cursor,
                        persisted: cursor,
                        loaded,
                        running: false,
                    }),
                })
            })
            .clone()
    }

    /// A channel actor appended `seq` (already durable): wake the webhooks that follow the
    /// channel. Hot path: a workspace without webhooks costs one map lookup.
    pub(crate) fn notify(
        self: &Arc<Self>,
        ws: &WorkspaceId,
        channel: &ChannelId,
        seq: u64,
        is_member: impl Fn(&UserId) -> bool,
    ) {
        let Some(hooks) = self.hooks.get(ws).map(|h| h.clone()) else {
            return;
        };
        for hook in hooks.iter() {
            let key = (ws.clone(), hook.rec.id.clone(), channel.clone());
            let pair = match self.pairs.get(&key).map(|p| p.clone()) {
                Some(pair) => pair,
                None if hook.follows(channel, is_member(&hook.rec.user)) => {
                    // A channel its user joined since: deliveries start at this event.
                    self.pair(hook, channel, seq.saturating_sub(1), false)
                }
                None => continue,
            };
            self.raise_known(&pair, seq);
            self.wake(&pair);
        }
    }

    fn raise_known(&self, pair: &Pair, seq: u64) {
        let mut pos = pair.pos.lock();
        if seq > pos.known {
            self.add_pending(seq - pos.known);
            pos.known = seq;
        }
    }

    fn add_pending(&self, delta: u64) {
        let delta = i64::try_from(delta).unwrap_or(i64::MAX);
        let total = self.pending.fetch_add(delta, Ordering::Relaxed) + delta;
        self.pending_gauge.set(total as f64);
    }

    fn sub_pending(&self, delta: u64) {
        let delta = i64::try_from(delta).unwrap_or(i64::MAX);
        let total = self.pending.fetch_sub(delta, Ordering::Relaxed) - delta;
        self.pending_gauge.set(total as f64);
    }

    /// Starts a task for the pair when it has pending work, its webhook is active and no
    /// task works on it yet.
    fn wake(self: &Arc<Self>, pair: &Arc<Pair>) {
        {
            let mut pos = pair.pos.lock();
            if pos.running || pos.known <= pos.cursor || !pair.hook.is_active() {
                return;
            }
            pos.running = true;
        }
        let (hub, pair) = (self.clone(), pair.clone());
        self.arbiter.spawn(async move { hub.work(pair).await });
    }

    /// One pair's task: deliver until caught up, paused (disabled, deleted) or the store fails
    /// (the rescan tries again).
    async fn work(self: Arc<Self>, pair: Arc<Pair>) {
        loop {
            let result = self.drain(&pair).await;
            if let Err(e) = &result {
                tracing::warn!(webhook = %pair.hook.rec.id, channel = %pair.channel, error = %e, "webhook delivery paused by a store error");
            }
            let mut pos = pair.pos.lock();
            if result.is_err() || pos.known <= pos.cursor || !pair.hook.is_active() {
                pos.running = false;
                break;
            }
        }
        if pair.hook.deleted.load(Ordering::Acquire) {
            self.forget_pair(&pair);
        }
    }

    async fn drain(&self, pair: &Pair) -> StoreResult<()> {
        let hook = &pair.hook;
        let (ws, id, channel) = (&hook.ws, &hook.rec.id, &pair.channel);
        self.load_cursor(pair).await?;
        loop {
            if !hook.is_active() {
                return self.persist(pair).await;
            }
            let (cursor, known) = {
                let pos = pair.pos.lock();
                (pos.cursor, pos.known)
            };
            if cursor >= known {
                return self.persist(pair).await;
            }
            let events = self.store.events_after(ws, channel, cursor, BATCH).await?;
            let Some(first) = events.first().and_then(Event::seq) else {
                // Nothing logged after the cursor (seqs a store that lost writes skipped).
                self.advance(pair, known);
                continue;
            };
            if first > cursor + 1 {
                let lost = first - cursor - 1;
                tracing::warn!(webhook = %id, channel = %channel, lost, "webhook deliveries trimmed from the log before they were attempted");
                metrics::counter!(DELIVERIES, "outcome" => "dropped").increment(lost);
            }
            let member_now = self
                .store
                .user_channels(ws, &hook.rec.user)
                .await?
                .contains(channel);
            let membership = membership_at(&events, &hook.rec.user, member_now);
            for (event, was_member) in events.iter().zip(membership) {
                let Some(seq) = event.seq() else { continue };
                if hook.wants(event, was_member) && !self.deliver(pair, event).await? {
                    return self.persist(pair).await;
                }
                self.advance(pair, seq);
            }
            self.persist(pair).await?;
        }
    }

    /// Reads the pair's stored cursor once (a pair made by a wake-up starts at the waking
    /// event unless the store already holds a cursor for it).
    async fn load_cursor(&self, pair: &Pair) -> StoreResult<()> {
        if pair.pos.lock().loaded {
            return Ok(());
        }
        let hook = &pair.hook;
        let stored = self
            .store
            .webhook_cursors(&hook.ws, &hook.rec.id)
            .await?
            .get(&pair.channel)
            .copied();
        let cursor = match stored {
            Some(cursor) => cursor,
            None => {
                let cursor = pair.pos.lock().cursor;
                self.store
                    .advance_webhook_cursor(&hook.ws, &hook.rec.id, &pair.channel, cursor)
                    .await?;
                cursor
            }
        };
        let mut pos = pair.pos.lock();
        pos.loaded = true;
        pos.persisted = cursor;
        if cursor > pos.known {
            self.add_pending(cursor - pos.known);
            pos.known = cursor;
        }
        if cursor > pos.cursor {
            self.sub_pending(cursor - pos.cursor);
            pos.cursor = cursor;
        } else {
            // The stored cursor is behind the wake-up's: deliver from the stored one.
            self.add_pending(pos.cursor - cursor);
            pos.cursor = cursor;
        }
        Ok(())
    }

    fn advance(&self, pair: &Pair, seq: u64) {
        let mut pos = pair.pos.lock();
        if seq > pos.cursor {
            if seq > pos.known {
                self.add_pending(seq - pos.known);
                pos.known = seq;
            }
            self.sub_pending(seq - pos.cursor);
            pos.cursor = seq;
        }
    }

    /// Writes the pair's cursor to the store if it moved since the last write.
    async fn persist(&self, pair: &Pair) -> StoreResult<()> {
        let (cursor, persisted) = {
            let pos = pair.pos.lock();
            (pos.cursor, pos.persisted)
        };
        if cursor <= persisted {
            return Ok(());
        }
        let hook = &pair.hook;
        self.store
            .advance_webhook_cursor(&hook.ws, &hook.rec.id, &pair.channel, cursor)
            .await?;
        let mut pos = pair.pos.lock();
        pos.persisted = pos.persisted.max(cursor);
        Ok(())
    }

    /// Attempts one delivery until it succeeds or is given up (`true`: done, the cursor may
    /// pass it), or its webhook is disabled or deleted (`false`: stop here).
    async fn deliver(&self, pair: &Pair, event: &Event) -> StoreResult<bool> {
        let hook = &pair.hook;
        let seq = event.seq().unwrap_or(0);
        let ts = event_ts(event);
        let delivery_id = format!("{}:{}:{seq}", hook.rec.id, pair.channel);
        let body = delivery_body(event, &hook.ws, &delivery_id);
        let give_up_ms = millis(self.config.give_up_after);
        let mut attempt: u32 = 1;
        loop {
            if !hook.is_active() {
                return Ok(false);
            }
            if now_ms().saturating_sub(ts) >= give_up_ms {
                metrics::counter!(DELIVERIES, "outcome" => "dropped").increment(1);
                tracing::warn!(webhook = %hook.rec.id, delivery = %delivery_id, attempts = attempt - 1, "webhook delivery given up");
                return Ok(true);
            }
            metrics::counter!(ATTEMPTS).increment(1);
            match self.attempt(hook, &body, &delivery_id, attempt).await {
                Ok(()) => {
                    metrics::counter!(DELIVERIES, "outcome" => "delivered").increment(1);
                    let latency = now_ms().saturating_sub(ts) as f64 / 1000.0;
                    metrics::histogram!(LATENCY).record(latency);
                    self.record_success(hook).await;
                    return Ok(true);
                }
                Err(failure) => {
                    let outcome = match failure {
                        Failure::Refused(_) => "refused",
                        _ => "retried",
                    };
                    metrics::counter!(DELIVERIES, "outcome" => outcome).increment(1);
                    tracing::debug!(webhook = %hook.rec.id, delivery = %delivery_id, attempt, error = %failure, "webhook attempt failed");
                    self.record_failure(hook, failure.to_string()).await;
                }
            }
            if !hook.is_active() {
                return Ok(false);
            }
            // What is done before this delivery must not be re-sent after a crash during the
            // wait.
            self.persist(pair).await?;
            let wait = backoff(attempt, self.config.backoff_max);
            let stop = hook.stop_token();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return Ok(false),
            }
            attempt = attempt.saturating_add(1);
        }
    }

    /// One HTTP attempt.
    async fn attempt(
        &self,
        hook: &Hook,
        body: &[u8],
        delivery_id: &str,
        attempt: u32,
    ) -> Result<(), Failure> {
        let url = reqwest::Url::parse(&hook.rec.url)
            .map_err(|e| Failure::Connection(format!("bad url: {e}")))?;
        let host = url.host_str().unwrap_or("").to_string();
        if self.config.deny_private {
            if let Some(ip) = literal_ip(&host) {
                if is_private(ip) {
                    return Err(Failure::Refused(RefusedAddress(host).to_string()));
                }
            }
        }
        let destination = format!("{host}:{}", url.port_or_known_default().unwrap_or(0));
        let semaphore = self
            .hosts
            .entry(destination)
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.per_host.max(1))))
            .clone();
        let _permit = semaphore
            .acquire_owned()
            .await
            .map_err(|_| Failure::Connection("worker stopping".into()))?;
        let t = now_ms() / 1000;
        let signature = sign(&hook.rec.secret, t, body);
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("confab-delivery", delivery_id)
            .header("confab-attempt", attempt.to_string())
            .header("confab-signature", format!("t={t},v1={signature}"))
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(mut response) => {
                let status = response.status();
                // Read (a bounded part of) the answer so that the connection can be reused.
                let mut read = 0;
                while let Ok(Some(chunk)) = response.chunk().await {
                    read += chunk.len();
                    if read > MAX_ANSWER_BYTES {
                        break;
                    }
                }
                if status.is_success() {
                    Ok(())
                } else {
                    Err(Failure::Status(status.as_u16()))
                }
            }
            Err(e) => Err(classify(&e, self.config.timeout)),
        }
    }

    async fn record_success(&self, hook: &Hook) {
        let state = {
            let mut state = hook.state.lock();
            if state.last_error.is_none() && state.failing_since_ms.is_none() {
                return;
            }
            state.last_error = None;
            state.failing_since_ms = None;
            state.clone()
        };
        self.save_state(hook, &state).await;
    }

    /// Records a failed attempt; disables the webhook when it has failed everything for
    /// `disable_after` (counted from the first failure after the last success).
    async fn record_failure(&self, hook: &Hook, error: String) {
        let now = now_ms();
        let (state, disabled_now) = {
            let mut state = hook.state.lock();
            state.last_error = Some(error);
            let since = *state.failing_since_ms.get_or_insert(now);
            let disable =
                !state.disabled && now.saturating_sub(since) >= millis(self.config.disable_after);
            if disable {
                state.disabled = true;
            }
            (state.clone(), disable)
        };
        if disabled_now {
            hook.stop_token().cancel();
            tracing::warn!(workspace = %hook.ws, webhook = %hook.rec.id, "webhook disabled after failing everything");
            self.update_disabled_gauge();
        }
        self.save_state(hook, &state).await;
    }

    async fn save_state(&self, hook: &Hook, state: &WebhookState) {
        if let Err(e) = self
            .store
            .set_webhook_state(&hook.ws, &hook.rec.id, state)
            .await
        {
            tracing::warn!(webhook = %hook.rec.id, error = %e, "webhook state not saved");
        }
    }

    fn update_disabled_gauge(&self) {
        let disabled = self
            .hooks
            .iter()
            .flat_map(|h| h.iter().map(|h| h.is_disabled()).collect::<Vec<_>>())
            .filter(|d| *d)
            .count();
        metrics::gauge!(DISABLED).set(disabled as f64);
    }

    /// The workspace moved to another cell (its keys, cursors included, were copied there
    /// before the release): stop delivering its webhooks here. A task that is mid-attempt
    /// finishes it; its cursor write is refused by the workspace's fence, so the new cell
    /// sends that delivery again, with the same `delivery_id`.
    pub(crate) fn workspace_left(&self, ws: &WorkspaceId) {
        if let Some((_, hooks)) = self.hooks.remove(ws) {
            for hook in hooks.iter() {
                hook.deleted.store(true, Ordering::Release);
                hook.stop_token().cancel();
            }
        }
        let idle: Vec<Arc<Pair>> = self
            .pairs
            .iter()
            .filter(|p| &p.key().0 == ws && !p.pos.lock().running)
            .map(|p| p.value().clone())
            .collect();
        for pair in idle {
            self.forget_pair(&pair);
        }
        self.update_disabled_gauge();
    }

    /// A workspace arrived by a move: load its webhooks with the cursors that came with it,
    /// and deliver what is pending.
    pub(crate) fn workspace_arrived(self: &Arc<Self>, ws: WorkspaceId) {
        let hub = self.clone();
        self.arbiter.spawn(async move {
            if let Err(e) = hub.load_workspace(&ws).await {
                tracing::warn!(workspace = %ws, error = %e, "webhooks of a moved-in workspace not loaded yet; retrying in the rescan");
                hub.reload.lock().insert(ws);
            }
        });
    }

    fn forget_pair(&self, pair: &Pair) {
        let key = (
            pair.hook.ws.clone(),
            pair.hook.rec.id.clone(),
            pair.channel.clone(),
        );
        if self.pairs.remove(&key).is_some() {
            let pos = pair.pos.lock();
            self.sub_pending(pos.known.saturating_sub(pos.cursor));
        }
    }

    /// The slow safety net: reload workspaces whose reload failed, restart pairs whose task
    /// stopped on a store error, and drop what a disabled webhook held past the give-up.
    async fn rescan(self: &Arc<Self>) {
        let reload: Vec<WorkspaceId> = self.reload.lock().drain().collect();
        for ws in reload {
            if let Err(e) = self.load_workspace(&ws).await {
                tracing::warn!(workspace = %ws, error = %e, "webhook index reload failed");
                self.reload.lock().insert(ws);
            }
        }
        let pairs: Vec<Arc<Pair>> = self.pairs.iter().map(|p| p.value().clone()).collect();
        for pair in pairs {
            if pair.hook.deleted.load(Ordering::Acquire) {
                if !pair.pos.lock().running {
                    self.forget_pair(&pair);
                }
            } else if pair.hook.is_disabled() {
                self.expire(&pair).await;
            } else {
                self.wake(&pair);
            }
        }
    }

    /// Drops the deliveries of a disabled webhook's pair whose events are older than the
    /// give-up (they count as dropped); the younger ones wait for the webhook to be enabled.
    async fn expire(&self, pair: &Pair) {
        {
            let mut pos = pair.pos.lock();
            if pos.running || pos.known <= pos.cursor {
                return;
            }
            pos.running = true;
        }
        let result = self.expire_old(pair).await;
        if let Err(e) = result {
            tracing::warn!(webhook = %pair.hook.rec.id, error = %e, "webhook give-up scan failed");
        }
        pair.pos.lock().running = false;
    }

    async fn expire_old(&self, pair: &Pair) -> StoreResult<()> {
        self.load_cursor(pair).await?;
        let hook = &pair.hook;
        let give_up_ms = millis(self.config.give_up_after);
        loop {
            let cursor = pair.pos.lock().cursor;
            let events = self
                .store
                .events_after(&hook.ws, &pair.channel, cursor, BATCH)
                .await?;
            if events.is_empty() {
                break;
            }
            for event in &events {
                let Some(seq) = event.seq() else { continue };
                if now_ms().saturating_sub(event_ts(event)) < give_up_ms {
                    return self.persist(pair).await;
                }
                if hook.wants(event, true) {
                    metrics::counter!(DELIVERIES, "outcome" => "dropped").increment(1);
                }
                self.advance(pair, seq);
            }
        }
        self.persist(pair).await
    }

    // ---- registration ----------------------------------------------------------------------

    async fn create(
        self: &Arc<Self>,
        reg: &Arc<Registry>,
        caller: &Caller,
        url: String,
        events: Vec<String>,
        channels: Option<Vec<ChannelId>>,
    ) -> Result<CellReply, CellError> {
        let url = self.check_url(url).await?;
        let events = check_events(events)?;
        let channels = match channels {
            Some(list) => Some(check_channels(reg, caller, list).await?),
            None => None,
        };
        let record = WebhookRecord {
            id: random_id(),
            user: caller.user.clone(),
            url,
            secret: random_secret(),
            events,
            channels,
            state: WebhookState::default(),
        };
        let max = self.config.max_per_user.max(1);
        let ws = &caller.workspace;
        match self
            .store
            .create_webhook(ws, &record, max as u64)
            .await
            .map_err(|e| store_unavailable(&e))?
        {
            WebhookCreate::Created => {}
            WebhookCreate::TooMany => {
                return Err(CellError::new(
                    ErrorCode::Conflict,
                    format!(
                        "{} already has {max} webhooks, the most one user may have",
                        caller.user
                    ),
                ))
            }
            WebhookCreate::UnknownWorkspace => return Err(CellError::not_found("workspace")),
            WebhookCreate::IdTaken => {
                return Err(CellError::unavailable(
                    "could not pick a free webhook id, retry",
                ))
            }
        }
        tracing::info!(workspace = %ws, webhook = %record.id, user = %caller.user, "webhook registered");
        if let Err(e) = self.load_workspace(ws).await {
            tracing::warn!(workspace = %ws, error = %e, "webhook index reload failed; retrying in the rescan");
            self.reload.lock().insert(ws.clone());
        }
        Ok(CellReply::WebhookCreated {
            id: record.id,
            secret: record.secret,
        })
    }

    /// The caller's webhook `id` as the index holds it; `not_found` for anyone else's.
    fn owned(&self, caller: &Caller, id: &str) -> Result<Arc<Hook>, CellError> {
        self.hooks
            .get(&caller.workspace)
            .and_then(|hooks| hooks.iter().find(|h| h.rec.id == id).cloned())
            .filter(|h| h.rec.user == caller.user)
            .ok_or_else(|| CellError::not_found("webhook"))
    }

    async fn list(&self, caller: &Caller) -> Result<CellReply, CellError> {
        let records = self
            .store
            .webhooks(&caller.workspace)
            .await
            .map_err(|e| store_unavailable(&e))?;
        let infos = records
            .into_iter()
            .filter(|r| r.user == caller.user)
            .map(|r| WebhookInfo {
                id: r.id,
                url: r.url,
                events: r.events,
                channels: r.channels,
                status: if r.state.disabled {
                    "disabled"
                } else {
                    "active"
                }
                .to_string(),
                last_error: r.state.last_error,
            })
            .collect();
        Ok(CellReply::Webhooks(infos))
    }

    async fn delete(&self, caller: &Caller, id: &str) -> Result<CellReply, CellError> {
        let hook = self.owned(caller, id)?;
        let deleted = self
            .store
            .delete_webhook(&caller.workspace, id)
            .await
            .map_err(|e| store_unavailable(&e))?;
        if !deleted {
            return Err(CellError::not_found("webhook"));
        }
        hook.deleted.store(true, Ordering::Release);
        hook.stop_token().cancel();
        if let Some(mut hooks) = self.hooks.get_mut(&caller.workspace) {
            let kept: Vec<Arc<Hook>> = hooks.iter().filter(|h| h.rec.id != id).cloned().collect();
            *hooks = kept.into();
        }
        self.hooks.remove_if(&caller.workspace, |_, h| h.is_empty());
        let idle: Vec<Arc<Pair>> = self
            .pairs
            .iter()
            .filter(|p| Arc::ptr_eq(&p.hook, &hook) && !p.pos.lock().running)
            .map(|p| p.value().clone())
            .collect();
        for pair in idle {
            self.forget_pair(&pair);
        }
        self.update_disabled_gauge();
        tracing::info!(workspace = %caller.workspace, webhook = %id, "webhook deleted");
        Ok(CellReply::Done)
    }

    async fn enable(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<CellReply, CellError> {
        let hook = self.owned(caller, id)?;
        let state = {
            let mut state = hook.state.lock();
            state.disabled = false;
            // The disable rule's hour starts again with the next failure.
            state.failing_since_ms = None;
            state.clone()
        };
        let saved = self
            .store
            .set_webhook_state(&caller.workspace, id, &state)
            .await
            .map_err(|e| store_unavailable(&e))?;
        if !saved {
            return Err(CellError::not_found("webhook"));
        }
        {
            let mut stop = hook.stop.lock();
            if stop.is_cancelled() {
                *stop = CancellationToken::new();
            }
        }
        self.update_disabled_gauge();
        let pairs: Vec<Arc<Pair>> = self
            .pairs
            .iter()
            .filter(|p| Arc::ptr_eq(&p.hook, &hook))
            .map(|p| p.value().clone())
            .collect();
        for pair in pairs {
            self.wake(&pair);
        }
        tracing::info!(workspace = %caller.workspace, webhook = %id, "webhook enabled");
        Ok(CellReply::Done)
    }

    /// Checks a webhook URL (SPEC §6): `http` or `https`, at most 2,048 characters, with a
    /// host; under `deny_private`, not a refused address (a host name is resolved once).
    async fn check_url(&self, url: String) -> Result<String, CellError> {
        if url.chars().count() > MAX_URL_CHARS {
            return Err(CellError::bad_request("url is over 2048 characters"));
        }
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| CellError::bad_request(format!("url is not a valid URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(CellError::bad_request("url must be http or https"));
        }
        let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
            return Err(CellError::bad_request("url has no host"));
        };
        if self.config.deny_private && refused_host(host, parsed.port_or_known_default()).await {
            return Err(CellError::bad_request(format!(
                "refused address: {host} is a private, loopback or link-local destination"
            )));
        }
        Ok(url)
    }
}

/// What a failed request says, for `last_error` and the `refused` count.
fn classify(e: &reqwest::Error, timeout: Duration) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(refused) = err.downcast_ref::<RefusedAddress>() {
            return Failure::Refused(refused.to_string());
        }
        source = err.source();
    }
    if e.is_timeout() {
        return Failure::Timeout(timeout.as_millis());
    }
    // The innermost causes say what happened ("connection refused"); the URL is the
    // webhook's own.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        text = format!("{text}: {err}");
        source = err.source();
    }
    if text.contains("refused address") {
        return Failure::Refused(text);
    }
    Failure::Connection(text)
}

/// Whether `deny_private` refuses a registration's host: an address literal that is private,
/// or a name that resolves to one.
async fn refused_host(host: &str, port: Option<u16>) -> bool {
    if let Some(ip) = literal_ip(host) {
        return is_private(ip);
    }
    let lookup = tokio::net::lookup_host((host, port.unwrap_or(80)));
    match tokio::time::timeout(REGISTRATION_DNS_TIMEOUT, lookup).await {
        Ok(Ok(mut addrs)) => addrs.any(|a| is_private(a.ip())),
        // Unresolvable now: delivery checks again after resolving.
        _ => false,
    }
}

/// The address a URL host names literally (`[::1]` included).
fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

fn check_events(events: Vec<String>) -> Result<Vec<String>, CellError> {
    if events.is_empty() {
        return Err(CellError::bad_request(
            "events must name at least one event type",
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for event in events {
        if !EVENT_TYPES.contains(&event.as_str()) {
            return Err(CellError::bad_request(format!(
                "unknown event type {event:?}; webhooks take {}",
                EVENT_TYPES.join(", ")
            )));
        }
        if !out.contains(&event) {
            out.push(event);
        }
    }
    Ok(out)
}

/// Checks the channels a webhook names: each one the caller is a member of (`forbidden` for
/// a public one it is not in, `not_found` for one it cannot see).
async fn check_channels(
    reg: &Arc<Registry>,
    caller: &Caller,
    channels: Vec<ChannelId>,
) -> Result<Vec<ChannelId>, CellError> {
    if channels.is_empty() {
        return Err(CellError::bad_request(
            "channels, when given, must name at least one channel",
        ));
    }
    if channels.len() > MAX_CHANNELS_PER_WEBHOOK {
        return Err(CellError::bad_request(format!(
            "a webhook names at most {MAX_CHANNELS_PER_WEBHOOK} channels"
        )));
    }
    let mut out: Vec<ChannelId> = Vec::new();
    for channel in channels {
        if out.contains(&channel) {
            continue;
        }
        inspect(reg, &caller.workspace, &channel, &caller.user).await?;
        out.push(channel);
    }
    Ok(out)
}

/// Performs a webhook op for `caller`.
pub(crate) async fn perform(
    reg: &Arc<Registry>,
    caller: Caller,
    op: WebhookOp,
) -> Result<CellReply, CellError> {
    let hub = &reg.webhooks;
    match op {
        WebhookOp::Create {
            url,
            events,
            channels,
        } => hub.create(reg, &caller, url, events, channels).await,
        WebhookOp::List => hub.list(&caller).await,
        WebhookOp::Delete { id } => hub.delete(&caller, &id).await,
        WebhookOp::Enable { id } => hub.enable(&caller, &id).await,
    }
}

/// For each event, whether `user` was a member of the channel when it happened, reconstructed
/// backwards from the membership now and the user's own joins and leaves in the batch.
fn membership_at(events: &[Event], user: &UserId, member_now: bool) -> Vec<bool> {
    let mut member = member_now;
    let mut out = vec![false; events.len()];
    for (i, event) in events.iter().enumerate().rev() {
        match event {
            Event::MemberJoined { user: u, .. } if u == user => {
                out[i] = true;
                member = false;
            }
            Event::MemberLeft { user: u, .. } if u == user => {
                out[i] = true;
                member = true;
            }
            _ => out[i] = member,
        }
    }
    out
}

fn event_user(event: &Event) -> Option<&UserId> {
    match event {
        Event::Message { user, .. }
        | Event::MessageEdited { user, .. }
        | Event::MessageDeleted { user, .. }
        | Event::MemberJoined { user, .. }
        | Event::MemberLeft { user, .. } => Some(user),
        _ => None,
    }
}

fn event_ts(event: &Event) -> u64 {
    match event {
        Event::Message { ts, .. }
        | Event::MessageEdited { ts, .. }
        | Event::MessageDeleted { ts, .. }
        | Event::MemberJoined { ts, .. }
        | Event::MemberLeft { ts, .. } => *ts,
        _ => now_ms(),
    }
}

/// The body of a delivery: the event exactly as on the WebSocket (the same encoding, byte for
/// byte), plus `workspace` and `delivery_id` spliced in before its closing brace; no
/// intermediate JSON tree is built.
pub fn delivery_body(event: &Event, ws: &WorkspaceId, delivery_id: &str) -> Vec<u8> {
    let frame = encode_event(event);
    let object = frame.trim_end().strip_suffix('}').unwrap_or(&frame);
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut body = Vec::with_capacity(frame.len() + delivery_id.len() + 64);
    body.extend_from_slice(object.as_bytes());
    body.extend_from_slice(b",\"workspace\":");
    body.extend_from_slice(quote(ws.as_str()).as_bytes());
    body.extend_from_slice(b",\"delivery_id\":");
    body.extend_from_slice(quote(delivery_id).as_bytes());
    body.push(b'}');
    body
}

/// `hex(HMAC-SHA256(secret, "<t>.<body>"))`, the `v1` of `Confab-Signature`; the key is the
/// secret as shown at registration (its hex text).
pub fn sign(secret: &str, t: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The wait before attempt `attempt + 1`: 1 s doubling, at most `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    BACKOFF_START
        .saturating_mul(1u32 << doublings)
        .min(max.max(Duration::from_millis(1)))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn random_id() -> String {
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(16)
        .map(char::from)
        .collect();
    format!("W{suffix}")
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::thread_rng().gen();
    hex(&bytes)
}

fn describe_metrics() {
    metrics::describe_counter!(
        DELIVERIES,
        "webhook deliveries by outcome (delivered, retried, dropped, refused)"
    );
    metrics::describe_counter!(ATTEMPTS, "webhook http attempts");
    metrics::describe_gauge!(PENDING, "webhook deliveries not yet done in this cell");
    metrics::describe_histogram!(
        LATENCY,
        metrics::Unit::Seconds,
        "from an event's creation to its webhook's 2xx"
    );
    metrics::describe_gauge!(DISABLED, "disabled webhooks in this cell");
    for outcome in ["delivered", "retried", "dropped", "refused"] {
        metrics::counter!(DELIVERIES, "outcome" => outcome).absolute(0);
    }
    metrics::counter!(ATTEMPTS).absolute(0);
    metrics::gauge!(PENDING).set(0.0);
    metrics::gauge!(DISABLED).set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_the_maximum() {
        let max = Duration::from_secs(600);
        assert_eq!(backoff(1, max), Duration::from_secs(1));
        assert_eq!(backoff(2, max), Duration::from_secs(2));
        assert_eq!(backoff(4, max), Duration::from_secs(8));
        assert_eq!(backoff(10, max), Duration::from_secs(512));
        assert_eq!(backoff(11, max), max);
        assert_eq!(backoff(u32::MAX, max), max);
    }

    #[test]
    fn private_loopback_link_local_and_unique_local_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip} must be allowed");
        }
    }

    #[test]
    fn signature_is_hex_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?", split here
        // as t = "what do ya want for nothing?" cannot be a number, so the vector is checked
        // on `hex` and the framing on a second HMAC computed by hand.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        assert_eq!(
            sign("Jefe", 1_700_000_000, b"{\"a\":1}"),
            hex(&mac.finalize().into_bytes())
        );
        assert_ne!(sign("Jefe", 1, b"x"), sign("Jefe", 2, b"x"));
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_at_connection_time() {
        // What a DNS-rebinding name does at delivery: it resolves to 127.0.0.1 (here through
        // /etc/hosts), and the client's resolver refuses to hand that address out.
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver))
            .build()
            .unwrap();
        let err = client
            .post("http://localhost:9/hook")
            .send()
            .await
            .unwrap_err();
        let failure = classify(&err, Duration::from_secs(5));
        assert!(matches!(failure, Failure::Refused(_)), "{failure:?}");
        assert!(
            failure.to_string().starts_with("refused address"),
            "{failure}"
        );
    }

    #[test]
    fn a_delivery_body_is_the_websocket_event_plus_workspace_and_delivery_id() {
        let event = Event::Message {
            channel: ChannelId::new("general").unwrap(),
            seq: 7,
            ts: 1,
            user: UserId::new("alice").unwrap(),
            text: "a \"quoted\" }".into(),
            client_msg_id: None,
            thread: None,
        };
        let ws = WorkspaceId::new("demo").unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&delivery_body(&event, &ws, "W1:general:7")).unwrap();
        let mut expected: serde_json::Value = serde_json::from_str(&encode_event(&event)).unwrap();
        expected["workspace"] = "demo".into();
        expected["delivery_id"] = "W1:general:7".into();
        assert_eq!(body, expected);
    }

    #[test]
    fn membership_is_reconstructed_from_the_users_own_joins_and_leaves() {
        let ch = ChannelId::new("c").unwrap();
        let bot = UserId::new("bot").unwrap();
        let alice = UserId::new("alice").unwrap();
        let msg = |seq| Event::Message {
            channel: ch.clone(),
            seq,
            ts: 0,
            user: alice.clone(),
            text: "x".into(),
            client_msg_id: None,
            thread: None,
        };
        let events = vec![
            msg(1),
            Event::MemberJoined {
                channel: ch.clone(),
                seq: 2,
                ts: 0,
                user: bot.clone(),
            },
            msg(3),
            Event::MemberLeft {
                channel: ch.clone(),
                seq: 4,
                ts: 0,
                user: bot.clone(),
            },
            msg(5),
        ];
        let m = membership_at(&events, &bot, false);
        assert_eq!(m, vec![false, true, true, true, false]);
    }
}
