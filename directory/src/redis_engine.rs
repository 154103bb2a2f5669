//! Redis engines for presence and the directory, shared by every gateway and cell of a
//! deployment, on a single Redis or a Redis Cluster (a `redis+cluster://` URL, see
//! [`crate::redis_conn`]).
//!
//! Keys (the layout is the same on both; `{…}` is a Redis Cluster hash tag, so every key with
//! the same tag lives in one slot, and every script, `MULTI` and pipeline below touches the
//! keys of one slot only):
//!
//! One slot per workspace, tag `{WS}` (the workspace id): a workspace never spans two masters.
//! - `confab:ws:{WS}`: the workspace's record (JSON).
//! - `confab:move:{WS}`: the move of the workspace under way (see `redis_moves`).
//! - `confab:presence:{WS}:USER`: sorted set of the user's sessions, scored by expiry (Unix
//!   ms). Gateways refresh their sessions every few seconds; a dead gateway's sessions simply
//!   stop being refreshed and expire.
//! - `confab:presence:{WS}`: sorted set of the workspace's users with at least one session,
//!   scored by their latest expiry, so a sweep finds users whose sessions all expired and
//!   announces them offline. A user is in it exactly while announced online: a refresh that
//!   finds its user missing (swept during an outage longer than the TTL) announces it online
//!   again.
//!
//! The cell registry, tag `{cells}`, one slot (cells are few):
//! - `confab:{cells}:ids` (set of ids) and `confab:{cells}:cell:ID` (hash: region, url,
//!   draining, heartbeat, connections, bounds, and `epoch` and `process`: the epoch of the
//!   id's latest claim and who made it).
//! - `confab:{cells}:placement` (hash: workspace → its cell) and `confab:{cells}:counts`
//!   (hash: cell → how many workspaces it has), changed together by one script
//!   ([`PLACE_FN`]) that is idempotent, so running it again after a failure repairs them.
//!
//! Single keys, each in a slot of its own:
//! - `confab:move_epoch`: the counter that numbers moves.
//! - `confab:presence:due`: sorted set of workspaces with users, each scored at or before the
//!   earliest expiry among its users: the sweep visits only workspaces that are due.
//! - Pub/sub channels `confab:presence` and `confab:directory` carry changes to every process
//!   (a `PUBLISH` on any node of a cluster reaches the subscribers of all of them).
//!
//! A directory written by a build before this layout (no hash tags, `confab:cellws` counts) is
//! moved to it by `infra/migrate-directory-keys.lua` (docs/operations.md).
//!
//! On a single Redis the workspace record, the move record and the placement change in one
//! script. On a cluster they are in different slots: the workspace's slot changes first (that
//! is the truth every read uses) and the placement follows in a second script; a process that
//! dies in between leaves one workspace counted on its former cell until the move's end or
//! the next change of that workspace runs the idempotent placement again.
//!
//! Every status transition is decided inside a Lua script in the workspace's slot, so exactly
//! one process announces it. Commands time out quickly (`unavailable`, never a hang) and the
//! connection reconnects by itself when Redis is back; on a cluster, a master that is down
//! makes only the workspaces of its slots (and, if it holds them, the cell registry or the
//! presence index) unavailable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_shared::server::Status;
use confab_shared::{CellId, UserId, WorkspaceId};
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::directory::{
    CellClaim, CellHolder, CellLoad, CellRecord, CellRegistration, CellTenure,
    CreateWorkspaceError, Directory, DirectoryChange, WorkspaceRecord,
};
use crate::moves::{MoveBegun, MovePhase, MoveRecord};
use crate::presence::{PresenceChange, PresenceSession, PresenceStore};
use crate::redis_conn::{pubsub_urls, Lua, RedisConn, Timeouts};
use crate::EngineError;

/// A session not refreshed for this long counts as gone.
pub const SESSION_TTL: Duration = Duration::from_secs(30);
/// How often each process sweeps for users whose sessions all expired.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Users expired in one sweep script (one Redis round trip), and workspaces read from the
/// presence index at a time; a sweep runs batches until none is left, so a dead gateway's
/// sessions expire within one sweep at any size.
const SWEEP_BATCH: usize = 1000;
/// Most batches in one sweep (a million users); the next sweep goes on from there.
const SWEEP_MAX_BATCHES: usize = 1000;
/// Sessions refreshed in one refresh script.
const REFRESH_BATCH: usize = 1000;
/// Refresh scripts in flight at once on a cluster (one per workspace).
const REFRESH_CONCURRENCY: usize = 16;
const PRESENCE_CHANNEL: &str = "confab:presence";
pub(crate) const DIRECTORY_CHANNEL: &str = "confab:directory";

/// The names of every key of the engines (see the module docs). Public for tests and tools
/// that look at a deployment's Redis.
pub mod keys {
    use confab_shared::{CellId, UserId, WorkspaceId};

    /// The presence index: workspaces with users, scored by when they are due for a sweep.
    pub const PRESENCE_DUE: &str = "confab:presence:due";
    /// The set of registered cell ids.
    pub const CELLS: &str = "confab:{cells}:ids";
    /// Workspace → its cell.
    pub const PLACEMENT: &str = "confab:{cells}:placement";
    /// Cell → how many workspaces it has.
    pub const COUNTS: &str = "confab:{cells}:counts";
    /// The counter that numbers moves.
    pub const MOVE_EPOCH: &str = "confab:move_epoch";

    /// A workspace's record.
    pub fn workspace(ws: &WorkspaceId) -> String {
        format!("confab:ws:{{{ws}}}")
    }

    /// A workspace's move under way.
    pub fn move_record(ws: &WorkspaceId) -> String {
        format!("confab:move:{{{ws}}}")
    }

    /// A cell's hash.
    pub fn cell(id: &CellId) -> String {
        format!("confab:{{cells}}:cell:{id}")
    }

    /// The sorted set of a workspace's users with sessions.
    pub fn presence_users(ws: &WorkspaceId) -> String {
        format!("confab:presence:{{{ws}}}")
    }

    /// The sorted set of a user's sessions.
    pub fn presence_sessions(ws: &WorkspaceId, user: &UserId) -> String {
        format!("confab:presence:{{{ws}}}:{user}")
    }
}

/// Counter: failed commands on the directory and presence Redis (`engine="directory"`).
pub const REDIS_ERRORS: &str = "confab_redis_errors_total";
/// Gauge: seconds since the presence sweep last ran through (0 right after one did), so a
/// sweep that keeps failing shows as a lag that grows by [`SWEEP_EVERY`] per attempt.
pub const PRESENCE_SWEEP_LAG: &str = "confab_presence_sweep_lag_seconds";

pub(crate) fn engine_error(e: redis::RedisError) -> EngineError {
    metrics::counter!(REDIS_ERRORS, "engine" => "directory").increment(1);
    EngineError(format!("redis: {e}"))
}

/// Opens a connection (to a single Redis, or to a Redis Cluster for a `redis+cluster://`
/// URL) that fails requests fast while Redis is unreachable and reconnects in the background.
pub fn connect(url: &str) -> Result<RedisConn, EngineError> {
    // The series exists from the first connection on, so dashboards show 0 rather than nothing.
    metrics::counter!(REDIS_ERRORS, "engine" => "directory").increment(0);
    RedisConn::open(url, Timeouts::default()).map_err(engine_error)
}

/// A pub/sub message: its body, and an id unique to this publish, so that a subscriber that
/// listens on several nodes of a cluster (every copy of a message arrives once per node) keeps
/// the first copy only.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    #[serde(flatten)]
    body: T,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

/// An id no other publish of any process uses: a random number drawn once per process, and
/// a counter.
pub(crate) fn message_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    format!("{seed:016x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `body` as a message with a fresh id.
fn envelope<T: Serialize>(body: T) -> String {
    serde_json::to_string(&Envelope {
        body,
        id: Some(message_id()),
    })
    .unwrap_or_default()
}

/// The ids of the messages received last, to drop the copies of a message that arrive
/// through the other nodes of a cluster (bounded: the oldest go first).
struct Recent {
    seen: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

/// Message ids remembered; copies of one message arrive within milliseconds of each other.
const RECENT_IDS: usize = 65_536;

impl Recent {
    /// Whether `id` is new (then it is remembered).
    fn first(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() >= RECENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

/// Forwards the messages of a pub/sub channel into `sink`, each once, from one subscription
/// per URL of `urls` (every seed of a cluster: a message reaches the subscribers of the node
/// that published it at once, the other nodes' a few milliseconds later over the cluster bus,
/// so listening on every node keeps a change ahead of the reply to the write that made it, as
/// on a single Redis). Each subscription reconnects forever; `connected`, if given, counts the
/// subscriptions made (messages published while none was connected were never received).
fn spawn_subscriber<T, F>(
    urls: Vec<String>,
    channel: &'static str,
    sink: broadcast::Sender<T>,
    connected: Option<watch::Sender<u64>>,
    parse: F,
) where
    T: Clone + Send + 'static,
    F: Fn(&[u8]) -> Option<(Option<String>, T)> + Send + Sync + 'static,
{
    let recent = Arc::new(parking_lot::Mutex::new(Recent {
        seen: std::collections::HashSet::new(),
        order: std::collections::VecDeque::new(),
    }));
    let parse = Arc::new(parse);
    for url in urls {
        let (sink, connected, parse, recent) = (
            sink.clone(),
            connected.clone(),
            Arc::clone(&parse),
            Arc::clone(&recent),
        );
        let once = move |bytes: &[u8]| {
            let (id, change) = parse(bytes)?;
            match id {
                Some(id) if !recent.lock().first(&id) => None,
                _ => Some(change),
            }
        };
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match subscribe_once(&url, channel, &sink, connected.as_ref(), &once).await {
                    Ok(()) => delay = Duration::from_millis(100),
                    Err(e) => tracing::warn!(channel, error = %e, "redis subscription lost"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
    }
}

async fn subscribe_once<T, F>(
    url: &str,
    channel: &str,
    sink: &broadcast::Sender<T>,
    connected: Option<&watch::Sender<u64>>,
    parse: &F,
) -> Result<(), redis::RedisError>
where
    F: Fn(&[u8]) -> Option<T>,
{
    let client = redis::Client::open(url)?;
    let mut pubsub = tokio::time::timeout(Timeouts::default().connect, client.get_async_pubsub())
        .await
        .map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connection timed out"))
        })??;
    pubsub.subscribe(channel).await?;
    if let Some(connected) = connected {
        connected.send_modify(|n| *n += 1);
    }
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        if let Some(change) = parse(message.get_payload_bytes()) {
            let _ = sink.send(change);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Presence

#[derive(Serialize, Deserialize)]
struct PresenceWire {
    workspace: WorkspaceId,
    user: UserId,
    status: Status,
}

/// Adds a session: KEYS = the user's sessions, the workspace's users; ARGV = session, expiry,
/// now, user, channel, `online` payload. Announces `online` when it is the user's first live
/// session.
const SESSION_UP: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local before = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[2] + 60000)
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('ZADD', KEYS[2], top[2], ARGV[4])
if before == 0 then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return before
";

/// Removes a session (or sweeps expired ones when ARGV[1] is empty): KEYS as [`SESSION_UP`];
/// ARGV = session, now, user, channel, `offline` payload. Announces `offline` when the user has
/// no live session left and this call is the one that removed the user. Returns the user's
/// latest expiry left, or `''` when it has none.
const SESSION_DOWN: &str = r"
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if count == 0 then
  redis.call('DEL', KEYS[1])
  if redis.call('ZREM', KEYS[2], ARGV[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
  return ''
end
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('ZADD', KEYS[2], top[2], ARGV[3])
return top[2]
";

/// Extends the lifetime of a batch of sessions (KEYS: per session its workspace's users, then
/// its user's sessions; ARGV: expiry, channel, now, then session, user and `online` payload
/// per session), adding back what expired. A user that counted as offline — not in its
/// workspace's users (swept offline, or lost with Redis), or with every session expired (which
/// `statuses` already reads as offline) — is announced online again.
const REFRESH: &str = r"
local expiry = tonumber(ARGV[1])
local announced = 0
for i = 1, #KEYS / 2 do
  local users, sessions = KEYS[2 * i - 1], KEYS[2 * i]
  local base = 3 * (i - 1) + 3
  local live = redis.call('ZCOUNT', sessions, ARGV[3], '+inf')
  redis.call('ZADD', sessions, expiry, ARGV[base + 1])
  redis.call('PEXPIREAT', sessions, expiry + 60000)
  local added = redis.call('ZADD', users, 'GT', expiry, ARGV[base + 2])
  if added == 1 or live == 0 then
    redis.call('PUBLISH', ARGV[2], ARGV[base + 3])
    announced = announced + 1
  end
end
return announced
";

/// Expires a batch of one workspace's users (KEYS: the workspace's users, then each user's
/// sessions; ARGV: now, channel, then user and `offline` payload per user): as
/// [`SESSION_DOWN`] without a session, for each. Returns {announced, the earliest expiry left
/// among the workspace's users or ''}.
const SWEEP: &str = r"
local announced = 0
for i = 2, #KEYS do
  local base = 2 * (i - 2) + 2
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  if redis.call('ZCARD', KEYS[i]) == 0 then
    redis.call('DEL', KEYS[i])
    if redis.call('ZREM', KEYS[1], ARGV[base + 1]) == 1 then
      redis.call('PUBLISH', ARGV[2], ARGV[base + 2])
      announced = announced + 1
    end
  else
    local top = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
    redis.call('ZADD', KEYS[1], top[2], ARGV[base + 1])
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {announced, first[2] or ''}
";

/// The Redis presence engine.
pub struct RedisPresence {
    conn: RedisConn,
    ttl_ms: u64,
    changes: broadcast::Sender<PresenceChange>,
    /// Counts the change subscriber's (re)connections.
    resets: watch::Sender<u64>,
    up: Lua,
    down: Lua,
    refresh: Lua,
    sweep: Lua,
}

/// The earliest expiry among a workspace's users, as `ZRANGE … 0 0 WITHSCORES` answers it.
async fn earliest_expiry(
    conn: &mut RedisConn,
    ws: &WorkspaceId,
) -> Result<Option<f64>, EngineError> {
    let first: Vec<(String, f64)> = conn
        .zrange_withscores(keys::presence_users(ws), 0, 0)
        .await
        .map_err(engine_error)?;
    Ok(first.first().map(|(_, score)| *score))
}

impl RedisPresence {
    /// Connects and starts the change subscriber and the expiry sweeper.
    pub fn start(url: &str) -> Result<Arc<RedisPresence>, EngineError> {
        Self::start_with_ttl(url, SESSION_TTL)
    }

    /// As [`start`](Self::start), with sessions expiring `ttl` after their last refresh.
    pub fn start_with_ttl(url: &str, ttl: Duration) -> Result<Arc<RedisPresence>, EngineError> {
        let (changes, _) = broadcast::channel(4096);
        let (resets, _) = watch::channel(0);
        let presence = Arc::new(RedisPresence {
            conn: connect(url)?,
            ttl_ms: ttl.as_millis() as u64,
            changes: changes.clone(),
            resets: resets.clone(),
            up: Lua::new(SESSION_UP),
            down: Lua::new(SESSION_DOWN),
            refresh: Lua::new(REFRESH),
            sweep: Lua::new(SWEEP),
        });
        let connected = Some(resets);
        spawn_subscriber(
            pubsub_urls(url),
            PRESENCE_CHANNEL,
            changes,
            connected,
            |bytes| {
                let wire: Envelope<PresenceWire> = serde_json::from_slice(bytes).ok()?;
                Some((
                    wire.id,
                    PresenceChange {
                        workspace: wire.body.workspace,
                        user: wire.body.user,
                        status: wire.body.status,
                    },
                ))
            },
        );
        let sweeper = Arc::clone(&presence);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            let mut last_through = std::time::Instant::now();
            loop {
                tick.tick().await;
                match sweeper.sweep().await {
                    Ok(_) => last_through = std::time::Instant::now(),
                    Err(e) => tracing::debug!(error = %e, "presence sweep failed"),
                }
                metrics::gauge!(PRESENCE_SWEEP_LAG).set(last_through.elapsed().as_secs_f64());
            }
        });
        Ok(presence)
    }

    fn payload(workspace: &WorkspaceId, user: &UserId, status: Status) -> String {
        envelope(PresenceWire {
            workspace: workspace.clone(),
            user: user.clone(),
            status,
        })
    }

    /// Puts workspaces in the presence index due no later than `at` (Unix ms): `ZADD LT`
    /// lowers a later score and adds a missing workspace, never delays one.
    async fn due_by(&self, workspaces: &[&WorkspaceId], at: u64) -> Result<(), EngineError> {
        if workspaces.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(keys::PRESENCE_DUE).arg("LT");
        for ws in workspaces {
            cmd.arg(at).arg(ws.as_str());
        }
        cmd.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(engine_error)
    }

    /// Announces `offline` for users whose sessions all expired (their gateway died), in
    /// batches of one script each until none is left; returns how many it announced. Only
    /// the workspaces the presence index has due are visited. A workspace whose slot does not
    /// answer (its master is down) is skipped and the others are swept; the sweep then fails
    /// (it did not run through), naming how many it skipped.
    pub async fn sweep(&self) -> Result<usize, EngineError> {
        let mut conn = self.conn.clone();
        let mut announced = 0;
        let mut skipped = 0;
        let mut last_error = None;
        for _ in 0..SWEEP_MAX_BATCHES {
            let now = confab_shared::now_ms();
            // Workspaces swept go out of the range (due later, or gone); those skipped stay
            // in it, and the next batch starts after them.
            let due: Vec<String> = conn
                .zrangebyscore_limit(
                    keys::PRESENCE_DUE,
                    "-inf",
                    now,
                    skipped as isize,
                    SWEEP_BATCH as isize,
                )
                .await
                .map_err(engine_error)?;
            for member in &due {
                let Ok(ws) = WorkspaceId::new(member) else {
                    conn.zrem::<_, _, ()>(keys::PRESENCE_DUE, member)
                        .await
                        .map_err(engine_error)?;
                    continue;
                };
                match self.sweep_workspace(&ws, now).await {
                    Ok(n) => announced += n,
                    Err(e) => {
                        skipped += 1;
                        last_error = Some(e);
                    }
                }
            }
            if due.len() < SWEEP_BATCH {
                break;
            }
        }
        match last_error {
            Some(e) => Err(EngineError(format!(
                "{skipped} workspaces not swept ({announced} users announced offline in \
                 others): {}",
                e.0
            ))),
            None => Ok(announced),
        }
    }

    /// Sweeps one workspace and sets when it is due next.
    async fn sweep_workspace(&self, ws: &WorkspaceId, now: u64) -> Result<usize, EngineError> {
        let mut conn = self.conn.clone();
        let users_key = keys::presence_users(ws);
        let mut announced = 0;
        let mut earliest = None;
        for _ in 0..SWEEP_MAX_BATCHES {
            let expired: Vec<String> = conn
                .zrangebyscore_limit(&users_key, "-inf", now, 0, SWEEP_BATCH as isize)
                .await
                .map_err(engine_error)?;
            let mut batch = self.sweep.key(&users_key);
            batch.arg(now).arg(PRESENCE_CHANNEL);
            let mut malformed = Vec::new();
            for member in &expired {
                let Ok(user) = UserId::new(member) else {
                    malformed.push(member.as_str());
                    continue;
                };
                batch
                    .key(keys::presence_sessions(ws, &user))
                    .arg(member)
                    .arg(Self::payload(ws, &user, Status::Offline));
            }
            if !malformed.is_empty() {
                conn.zrem::<_, _, ()>(&users_key, &malformed)
                    .await
                    .map_err(engine_error)?;
            }
            let (n, first): (usize, String) =
                batch.invoke(&mut conn).await.map_err(engine_error)?;
            announced += n;
            earliest = first.parse::<f64>().ok();
            if expired.len() < SWEEP_BATCH {
                break;
            }
        }
        // The index follows what the workspace's slot says; a session opened or closed
        // meanwhile lowers it again (`due_by`) after changing the workspace, so reading the
        // workspace once more after writing the index catches what that write overwrote.
        match earliest {
            Some(at) => conn
                .zadd::<_, _, _, ()>(keys::PRESENCE_DUE, ws.as_str(), at)
                .await
                .map_err(engine_error)?,
            None => conn
                .zrem::<_, _, ()>(keys::PRESENCE_DUE, ws.as_str())
                .await
                .map_err(engine_error)?,
        }
        if let Some(at) = earliest_expiry(&mut conn, ws).await? {
            if earliest.is_none_or(|written| at < written) {
                self.due_by(&[ws], at as u64).await?;
            }
        }
        Ok(announced)
    }
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn session_up(&self, _gateway: &str, s: &PresenceSession) -> Result<(), EngineError> {
        let now = confab_shared::now_ms();
        let expiry = now + self.ttl_ms;
        self.up
            .key(keys::presence_sessions(&s.workspace, &s.user))
            .key(keys::presence_users(&s.workspace))
            .arg(s.session.as_str())
            .arg(expiry)
            .arg(now)
            .arg(s.user.as_str())
            .arg(PRESENCE_CHANNEL)
            .arg(Self::payload(&s.workspace, &s.user, Status::Online))
            .invoke::<i64>(&mut self.conn.clone())
            .await
            .map_err(engine_error)?;
        self.due_by(&[&s.workspace], expiry).await
    }

    async fn session_down(&self, _gateway: &str, s: &PresenceSession) -> Result<(), EngineError> {
        let left: String = self
            .down
            .key(keys::presence_sessions(&s.workspace, &s.user))
            .key(keys::presence_users(&s.workspace))
            .arg(s.session.as_str())
            .arg(confab_shared::now_ms())
            .arg(s.user.as_str())
            .arg(PRESENCE_CHANNEL)
            .arg(Self::payload(&s.workspace, &s.user, Status::Offline))
            .invoke(&mut self.conn.clone())
            .await
            .map_err(engine_error)?;
        // The user's latest expiry may have come down to an earlier session's.
        match left.parse::<f64>() {
            Ok(at) => self.due_by(&[&s.workspace], at as u64).await,
            Err(_) => Ok(()),
        }
    }

    async fn refresh(
        &self,
        _gateway: &str,
        sessions: &[PresenceSession],
    ) -> Result<(), EngineError> {
        let now = confab_shared::now_ms();
        let expiry = now + self.ttl_ms;
        // One script per batch: a refresh is a few round trips, not one per session. On a
        // cluster a batch holds the sessions of one workspace (one slot); on a single Redis
        // any sessions.
        let mut groups: BTreeMap<&WorkspaceId, Vec<&PresenceSession>> = BTreeMap::new();
        let batches: Vec<Vec<&PresenceSession>> = if self.conn.is_cluster() {
            for s in sessions {
                groups.entry(&s.workspace).or_default().push(s);
            }
            groups
                .values()
                .flat_map(|group| group.chunks(REFRESH_BATCH).map(<[_]>::to_vec))
                .collect()
        } else {
            sessions
                .chunks(REFRESH_BATCH)
                .map(|chunk| chunk.iter().collect())
                .collect()
        };
        let mut calls = Vec::with_capacity(batches.len());
        for batch in &batches {
            let mut call = self.refresh.prepare();
            call.arg(expiry).arg(PRESENCE_CHANNEL).arg(now);
            for s in batch {
                call.key(keys::presence_users(&s.workspace))
                    .key(keys::presence_sessions(&s.workspace, &s.user))
                    .arg(s.session.as_str())
                    .arg(s.user.as_str())
                    .arg(Self::payload(&s.workspace, &s.user, Status::Online));
            }
            let mut conn = self.conn.clone();
            calls.push(async move { call.invoke::<usize>(&mut conn).await });
        }
        // Every batch runs even when one fails: on a cluster a master that is down must not
        // keep the sessions of the other masters' workspaces from being refreshed (they would
        // expire and be announced offline). The refresh fails after, with the first error.
        let results: Vec<Result<usize, redis::RedisError>> = futures_util::stream::iter(calls)
            .buffer_unordered(REFRESH_CONCURRENCY)
            .collect()
            .await;
        let mut workspaces: Vec<&WorkspaceId> = sessions.iter().map(|s| &s.workspace).collect();
        workspaces.sort();
        workspaces.dedup();
        let mut indexed = Ok(());
        for chunk in workspaces.chunks(REFRESH_BATCH) {
            if let Err(e) = self.due_by(chunk, expiry).await {
                indexed = Err(e);
            }
        }
        for result in results {
            result.map_err(engine_error)?;
        }
        indexed
    }

    async fn statuses(
        &self,
        workspace: &WorkspaceId,
        users: &[UserId],
    ) -> Result<Vec<Status>, EngineError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let now = confab_shared::now_ms();
        let mut pipe = redis::pipe();
        for user in users {
            pipe.zcount(keys::presence_sessions(workspace, user), now, "+inf");
        }
        let counts: Vec<u64> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(engine_error)?;
        Ok(counts
            .into_iter()
            .map(|c| {
                if c > 0 {
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

    fn resets(&self) -> watch::Receiver<u64> {
        self.resets.subscribe()
    }
}

// ---------------------------------------------------------------------------------------
// Directory

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum DirectoryWire {
    Moved {
        workspace: WorkspaceId,
        cell: CellId,
    },
    Cell {
        cell: CellId,
    },
}

/// Lua: `place(placement, counts, ws, cell)` records that workspace `ws` is on `cell` (`false`:
/// on none, it was deleted) and moves the per-cell counts to match. Idempotent: a second run
/// changes nothing, so it repairs a placement that a failure left behind.
macro_rules! place_fn {
    () => {
        r"
local function place(placement, counts, ws, cell)
  local old = redis.call('HGET', placement, ws)
  if old == cell then return end
  if old then redis.call('HINCRBY', counts, old, -1) end
  if cell then
    redis.call('HSET', placement, ws, cell)
    redis.call('HINCRBY', counts, cell, 1)
  else
    redis.call('HDEL', placement, ws)
  end
end
"
    };
}
pub(crate) use place_fn;

/// Places a workspace on its own: KEYS = placement, counts; ARGV = workspace, cell (`''`:
/// none).
const PLACE: &str = concat!(
    place_fn!(),
    r"
local cell = ARGV[2]
if cell == '' then cell = false end
place(KEYS[1], KEYS[2], ARGV[1], cell)
return 1
"
);

/// Points a workspace at another cell: KEYS = workspace record, then (on a single Redis)
/// placement and counts; ARGV = cell, region, channel, payload, workspace.
const MOVE_WORKSPACE: &str = concat!(
    place_fn!(),
    r"
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local record = cjson.decode(raw)
record['cell'] = ARGV[1]
record['region'] = ARGV[2]
redis.call('SET', KEYS[1], cjson.encode(record))
if KEYS[2] then place(KEYS[2], KEYS[3], ARGV[5], ARGV[1]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"
);

/// Deletes a workspace record: KEYS = the record, then (on a single Redis) placement and
/// counts; ARGV = workspace.
const DELETE_WORKSPACE: &str = concat!(
    place_fn!(),
    r"
redis.call('DEL', KEYS[1])
if KEYS[2] then place(KEYS[2], KEYS[3], ARGV[1], false) end
return 1
"
);

/// Claims a cell id: KEYS = cell hash, cells set; ARGV = id, region, url, now, process,
/// min epoch. Returns {epoch, then the previous epoch, process, url, heartbeat or ''}.
const CLAIM_CELL: &str = r"
local prev = redis.call('HMGET', KEYS[1], 'epoch', 'process', 'url', 'heartbeat')
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
if epoch < tonumber(ARGV[6]) then
  epoch = tonumber(ARGV[6])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'region', ARGV[2], 'url', ARGV[3], 'heartbeat', ARGV[4], 'process', ARGV[5])
return {tostring(epoch), prev[1] or '', prev[2] or '', prev[3] or '', prev[4] or ''}
";

/// Registers a cell again under its epoch: KEYS = cell hash, cells set; ARGV = id, region, url,
/// now, process, epoch. Returns -2 when registered, else the newer epoch holding the id.
const REGISTER_CELL: &str = r"
local held = redis.call('HGET', KEYS[1], 'epoch')
if held and held ~= ARGV[6] then return tonumber(held) end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'region', ARGV[2], 'url', ARGV[3], 'heartbeat', ARGV[4], 'process', ARGV[5], 'epoch', ARGV[6])
return -2
";

/// A heartbeat under an epoch: KEYS = cell hash; ARGV = epoch, now, connections,
/// max_workspaces, max_connections (a bound is `""` when there is none). Returns -2 when
/// recorded, -1 when the cell is not registered, else the epoch now holding the id.
const HEARTBEAT_CELL: &str = r"
local held = redis.call('HGET', KEYS[1], 'epoch')
if not held or redis.call('HEXISTS', KEYS[1], 'url') == 0 then return -1 end
if held ~= ARGV[1] then return tonumber(held) end
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2], 'connections', ARGV[3],
  'max_workspaces', ARGV[4] or '', 'max_connections', ARGV[5] or '')
return -2
";

/// A bound as the cell hash stores it: the number, or `""` for none.
fn bound_field(bound: Option<u64>) -> String {
    bound.map(|b| b.to_string()).unwrap_or_default()
}

/// The Redis directory engine.
pub struct RedisDirectory {
    conn: RedisConn,
    changes: broadcast::Sender<DirectoryChange>,
    move_script: Lua,
    delete_script: Lua,
    place_script: Lua,
    claim_script: Lua,
    register_script: Lua,
    heartbeat_script: Lua,
}

/// A registration or heartbeat script's answer.
fn tenure(outcome: i64) -> CellTenure {
    match outcome {
        -2 => CellTenure::Held,
        -1 => CellTenure::Unregistered,
        epoch => CellTenure::Superseded {
            epoch: epoch.max(0) as u64,
        },
    }
}

impl RedisDirectory {
    /// Connects and starts the change subscriber.
    pub fn start(url: &str) -> Result<Arc<RedisDirectory>, EngineError> {
        let (changes, _) = broadcast::channel(4096);
        let directory = Arc::new(RedisDirectory {
            conn: connect(url)?,
            changes: changes.clone(),
            move_script: Lua::new(MOVE_WORKSPACE),
            delete_script: Lua::new(DELETE_WORKSPACE),
            place_script: Lua::new(PLACE),
            claim_script: Lua::new(CLAIM_CELL),
            register_script: Lua::new(REGISTER_CELL),
            heartbeat_script: Lua::new(HEARTBEAT_CELL),
        });
        spawn_subscriber(
            pubsub_urls(url),
            DIRECTORY_CHANNEL,
            changes,
            None,
            |bytes| {
                let wire: Envelope<DirectoryWire> = serde_json::from_slice(bytes).ok()?;
                Some((
                    wire.id,
                    match wire.body {
                        DirectoryWire::Moved { workspace, cell } => {
                            DirectoryChange::WorkspaceMoved { workspace, cell }
                        }
                        DirectoryWire::Cell { cell } => DirectoryChange::CellChanged { cell },
                    },
                ))
            },
        );
        Ok(directory)
    }

    pub(crate) fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Whether the placement changes in the workspace slot's own scripts (a single Redis,
    /// where every key is on one server) rather than after them (a cluster: another slot).
    pub(crate) fn placement_inline(&self) -> bool {
        !self.conn.is_cluster()
    }

    /// Adds the placement keys to a workspace script's call on a single Redis.
    pub(crate) fn with_placement(&self, call: &mut crate::redis_conn::LuaCall<'_>) {
        if self.placement_inline() {
            call.key(keys::PLACEMENT).key(keys::COUNTS);
        }
    }

    /// Records that `ws` is on `cell` (`None`: deleted), in the cell registry's slot.
    pub(crate) async fn place(
        &self,
        ws: &WorkspaceId,
        cell: Option<&CellId>,
    ) -> Result<(), EngineError> {
        self.place_script
            .key(keys::PLACEMENT)
            .key(keys::COUNTS)
            .arg(ws.as_str())
            .arg(cell.map_or("", CellId::as_str))
            .invoke::<i64>(&mut self.conn())
            .await
            .map_err(engine_error)?;
        Ok(())
    }

    /// On a cluster, places `ws` after its own slot changed. The workspace's record is the
    /// truth and has changed already, so a failure here is logged, not returned: the
    /// workspace stays counted on its former cell until its move ends or it changes again.
    pub(crate) async fn place_after(&self, ws: &WorkspaceId, cell: Option<&CellId>) {
        if self.placement_inline() {
            return;
        }
        if let Err(e) = self.place(ws, cell).await {
            tracing::warn!(workspace = %ws, error = %e, "workspace placement not recorded");
        }
    }

    /// Announces that a cell changed (drained, undrained, registered).
    pub(crate) async fn announce_cell(&self, cell: &CellId) -> Result<(), EngineError> {
        self.publish(&DirectoryWire::Cell { cell: cell.clone() })
            .await
    }

    async fn publish(&self, wire: &DirectoryWire) -> Result<(), EngineError> {
        let payload = envelope(wire);
        // Only cell changes are published from here: through the cell registry's master.
        self.conn()
            .publish_via(keys::CELLS, DIRECTORY_CHANNEL, &payload)
            .await
            .map_err(engine_error)
    }
}

fn cell_from_hash(id: &str, hash: &HashMap<String, String>) -> Option<CellRecord> {
    Some(CellRecord {
        id: CellId::new(id).ok()?,
        region: hash.get("region")?.clone(),
        url: hash.get("url")?.clone(),
        draining: hash.get("draining").is_some_and(|d| d == "1"),
        last_heartbeat_ms: hash.get("heartbeat")?.parse().ok()?,
        connections: hash
            .get("connections")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        workspaces: 0,
        max_workspaces: hash.get("max_workspaces").and_then(|b| b.parse().ok()),
        max_connections: hash.get("max_connections").and_then(|b| b.parse().ok()),
    })
}

#[async_trait]
impl Directory for RedisDirectory {
    async fn claim_cell(
        &self,
        cell: CellRegistration,
        process: &str,
        min_epoch: u64,
        now_ms: u64,
    ) -> Result<CellClaim, EngineError> {
        let reply: Vec<String> = self
            .claim_script
            .key(keys::cell(&cell.id))
            .key(keys::CELLS)
            .arg(cell.id.as_str())
            .arg(&cell.region)
            .arg(&cell.url)
            .arg(now_ms)
            .arg(process)
            .arg(min_epoch)
            .invoke(&mut self.conn())
            .await
            .map_err(engine_error)?;
        let field = |i: usize| reply.get(i).map(String::as_str).unwrap_or("");
        let epoch = field(0)
            .parse()
            .map_err(|e| EngineError(format!("bad epoch from claim: {e}")))?;
        let previous = field(1).parse().ok().map(|epoch| CellHolder {
            epoch,
            process: field(2).to_string(),
            url: field(3).to_string(),
            last_heartbeat_ms: field(4).parse().unwrap_or(0),
        });
        self.publish(&DirectoryWire::Cell { cell: cell.id }).await?;
        Ok(CellClaim { epoch, previous })
    }

    async fn register_cell(
        &self,
        cell: CellRegistration,
        process: &str,
        epoch: u64,
        now_ms: u64,
    ) -> Result<CellTenure, EngineError> {
        let outcome: i64 = self
            .register_script
            .key(keys::cell(&cell.id))
            .key(keys::CELLS)
            .arg(cell.id.as_str())
            .arg(&cell.region)
            .arg(&cell.url)
            .arg(now_ms)
            .arg(process)
            .arg(epoch)
            .invoke(&mut self.conn())
            .await
            .map_err(engine_error)?;
        let tenure = tenure(outcome);
        if tenure == CellTenure::Held {
            self.publish(&DirectoryWire::Cell { cell: cell.id }).await?;
        }
        Ok(tenure)
    }

    async fn heartbeat_cell(
        &self,
        id: &CellId,
        epoch: u64,
        load: CellLoad,
        now_ms: u64,
    ) -> Result<CellTenure, EngineError> {
        let outcome: i64 = self
            .heartbeat_script
            .key(keys::cell(id))
            .arg(epoch)
            .arg(now_ms)
            .arg(load.connections)
            .arg(bound_field(load.max_workspaces))
            .arg(bound_field(load.max_connections))
            .invoke(&mut self.conn())
            .await
            .map_err(engine_error)?;
        Ok(tenure(outcome))
    }

    async fn cells(&self) -> Result<Vec<CellRecord>, EngineError> {
        let mut conn = self.conn();
        let ids: Vec<String> = conn.smembers(keys::CELLS).await.map_err(engine_error)?;
        // Only valid ids are ever registered.
        let ids: Vec<CellId> = ids.iter().filter_map(|id| CellId::new(id).ok()).collect();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(keys::cell(id));
        }
        pipe.hgetall(keys::COUNTS);
        let mut hashes: Vec<HashMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(engine_error)?;
        let counts = hashes.pop().unwrap_or_default();
        let mut cells: Vec<CellRecord> = ids
            .iter()
            .zip(&hashes)
            .filter_map(|(id, hash)| cell_from_hash(id.as_str(), hash))
            .map(|mut cell| {
                cell.workspaces = counts
                    .get(cell.id.as_str())
                    .and_then(|c| c.parse::<i64>().ok())
                    .unwrap_or(0)
                    .max(0) as u64;
                cell
            })
            .collect();
        cells.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(cells)
    }

    async fn drain_cell(&self, id: &CellId) -> Result<bool, EngineError> {
        self.set_draining(id, true).await
    }

    async fn workspace(&self, id: &WorkspaceId) -> Result<Option<WorkspaceRecord>, EngineError> {
        let raw: Option<String> = self
            .conn()
            .get(keys::workspace(id))
            .await
            .map_err(engine_error)?;
        raw.map(|raw| {
            serde_json::from_str(&raw)
                .map_err(|e| EngineError(format!("bad workspace record: {e}")))
        })
        .transpose()
    }

    async fn create_workspace(&self, record: WorkspaceRecord) -> Result<(), CreateWorkspaceError> {
        let raw = serde_json::to_string(&record).unwrap_or_default();
        let mut conn = self.conn();
        let created: bool = redis::cmd("SET")
            .arg(keys::workspace(&record.id))
            .arg(raw)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(engine_error)?
            .is_some();
        if !created {
            return Err(CreateWorkspaceError::Exists(record.id));
        }
        if self.placement_inline() {
            self.place(&record.id, Some(&record.cell)).await?;
        } else {
            self.place_after(&record.id, Some(&record.cell)).await;
        }
        Ok(())
    }

    async fn delete_workspace(&self, id: &WorkspaceId) -> Result<(), EngineError> {
        if self.workspace(id).await?.is_some() {
            let mut call = self.delete_script.key(keys::workspace(id));
            self.with_placement(&mut call);
            call.arg(id.as_str())
                .invoke::<i64>(&mut self.conn())
                .await
                .map_err(engine_error)?;
            self.place_after(id, None).await;
        }
        Ok(())
    }

    async fn move_workspace(
        &self,
        id: &WorkspaceId,
        cell: &CellId,
        region: &str,
    ) -> Result<(), EngineError> {
        let payload = envelope(DirectoryWire::Moved {
            workspace: id.clone(),
            cell: cell.clone(),
        });
        let mut call = self.move_script.key(keys::workspace(id));
        self.with_placement(&mut call);
        let moved: i64 = call
            .arg(cell.as_str())
            .arg(region)
            .arg(DIRECTORY_CHANNEL)
            .arg(payload)
            .arg(id.as_str())
            .invoke(&mut self.conn())
            .await
            .map_err(engine_error)?;
        if moved == 0 {
            return Err(EngineError(format!("workspace {id} does not exist")));
        }
        self.place_after(id, Some(cell)).await;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<DirectoryChange> {
        self.changes.subscribe()
    }

    async fn undrain_cell(&self, id: &CellId) -> Result<bool, EngineError> {
        self.set_draining(id, false).await
    }

    async fn workspaces(&self) -> Result<Vec<WorkspaceRecord>, EngineError> {
        self.all_workspaces().await
    }

    async fn begin_move(&self, record: MoveRecord) -> Result<MoveBegun, EngineError> {
        self.record_move(record).await
    }

    async fn move_record(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<Option<MoveRecord>, EngineError> {
        self.read_move(workspace).await
    }

    async fn moves(&self) -> Result<Vec<MoveRecord>, EngineError> {
        self.all_moves().await
    }

    async fn update_move(
        &self,
        workspace: &WorkspaceId,
        epoch: u64,
        phase: MovePhase,
        lease_until_ms: u64,
    ) -> Result<bool, EngineError> {
        self.set_move_phase(workspace, epoch, phase, lease_until_ms)
            .await
    }

    async fn switch_move(&self, workspace: &WorkspaceId, epoch: u64) -> Result<bool, EngineError> {
        self.switch(workspace, epoch).await
    }

    async fn end_move(&self, workspace: &WorkspaceId, epoch: u64) -> Result<(), EngineError> {
        self.forget_move(workspace, epoch).await
    }
}
