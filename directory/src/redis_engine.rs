//! Redis engines for presence and the directory, shared by every gateway and cell of a
//! deployment.
//!
//! Keys (all under `confab:`):
//! - `presence:{ws}/{user}`: sorted set of the user's sessions, scored by expiry (Unix ms).
//!   Gateways refresh their sessions every few seconds; a dead gateway's sessions simply stop
//!   being refreshed and expire.
//! - `presence:users`: sorted set of `{ws}/{user}` with at least one session, scored by the
//!   latest expiry, so a sweep finds users whose sessions all expired and announces them
//!   offline. A user is in it exactly while announced online: a refresh that finds its user
//!   missing (swept during an outage longer than the TTL) announces it online again.
//! - `cells` (set of ids) and `cell:{id}` (hash: region, url, draining, heartbeat, connections,
//!   and `epoch` and `process`: the epoch of the id's latest claim and who made it).
//! - `ws:{id}`: a workspace's record (JSON); `cellws`: workspaces per cell (hash).
//! - `move:{ws}` and `move_epoch`: moves under way (see `redis_moves`).
//! - Pub/sub channels `presence` and `directory` carry changes to every process.
//!
//! Every status transition is decided inside a Lua script, so exactly one process announces
//! it. Commands time out quickly (`unavailable`, never a hang) and the connection manager
//! reconnects by itself when Redis is back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_shared::server::Status;
use confab_shared::{CellId, UserId, WorkspaceId};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::directory::{
    CellClaim, CellHolder, CellLoad, CellRecord, CellRegistration, CellTenure,
    CreateWorkspaceError, Directory, DirectoryChange, WorkspaceRecord,
};
use crate::moves::{MoveBegun, MovePhase, MoveRecord};
use crate::presence::{PresenceChange, PresenceSession, PresenceStore};
use crate::EngineError;

/// A session not refreshed for this long counts as gone.
pub const SESSION_TTL: Duration = Duration::from_secs(30);
/// How often each process sweeps for users whose sessions all expired.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Users expired in one sweep script (one Redis round trip); a sweep runs batches until none
/// is left, so a dead gateway's sessions expire within one sweep at any size.
const SWEEP_BATCH: usize = 1000;
/// Most batches in one sweep (a million users); the next sweep goes on from there.
const SWEEP_MAX_BATCHES: usize = 1000;
/// Sessions refreshed in one refresh script.
const REFRESH_BATCH: usize = 1000;
const PRESENCE_CHANNEL: &str = "confab:presence";
pub(crate) const DIRECTORY_CHANNEL: &str = "confab:directory";
const USERS_KEY: &str = "confab:presence:users";
const CELLS_KEY: &str = "confab:cells";
pub(crate) const CELL_WORKSPACES_KEY: &str = "confab:cellws";

/// Counter: failed commands on the directory and presence Redis (`engine="directory"`).
pub const REDIS_ERRORS: &str = "confab_redis_errors_total";
/// Gauge: seconds since the presence sweep last ran through (0 right after one did), so a
/// sweep that keeps failing shows as a lag that grows by [`SWEEP_EVERY`] per attempt.
pub const PRESENCE_SWEEP_LAG: &str = "confab_presence_sweep_lag_seconds";

pub(crate) fn engine_error(e: redis::RedisError) -> EngineError {
    metrics::counter!(REDIS_ERRORS, "engine" => "directory").increment(1);
    EngineError(format!("redis: {e}"))
}

/// Opens a connection manager that fails requests fast while Redis is unreachable and
/// reconnects in the background.
pub fn connect(url: &str) -> Result<ConnectionManager, EngineError> {
    // The series exists from the first connection on, so dashboards show 0 rather than nothing.
    metrics::counter!(REDIS_ERRORS, "engine" => "directory").increment(0);
    let client = redis::Client::open(url).map_err(engine_error)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, config).map_err(engine_error)
}

/// Forwards the messages of a pub/sub channel into `sink`, reconnecting forever; `connected`,
/// if given, counts the subscriptions made (messages published in between were never received).
fn spawn_subscriber<T, F>(
    url: String,
    channel: &'static str,
    sink: broadcast::Sender<T>,
    connected: Option<watch::Sender<u64>>,
    parse: F,
) where
    T: Clone + Send + 'static,
    F: Fn(&[u8]) -> Option<T> + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        loop {
            match subscribe_once(&url, channel, &sink, connected.as_ref(), &parse).await {
                Ok(()) => delay = Duration::from_millis(100),
                Err(e) => tracing::warn!(channel, error = %e, "redis subscription lost"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    });
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
    let mut pubsub = client.get_async_pubsub().await?;
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

/// Adds a session; announces `online` when it is the user's first live one.
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

/// Removes a session (or sweeps expired ones when ARGV[1] is empty); announces `offline` when
/// the user has no live session left and this call is the one that removed the user.
const SESSION_DOWN: &str = r"
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if count == 0 then
  redis.call('DEL', KEYS[1])
  if redis.call('ZREM', KEYS[2], ARGV[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
else
  local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('ZADD', KEYS[2], top[2], ARGV[3])
end
return count
";

/// Extends the lifetime of a batch of sessions (KEYS[2..]: their users' keys; ARGV: expiry,
/// channel, now, then session, member and `online` payload per key), adding back what
/// expired. A user that counted as offline — not in the users set (swept offline, or lost with
/// Redis), or with every session expired (which `statuses` already reads as offline) — is
/// announced online again.
const REFRESH: &str = r"
local expiry = tonumber(ARGV[1])
local announced = 0
for i = 2, #KEYS do
  local base = 3 * (i - 2) + 3
  local live = redis.call('ZCOUNT', KEYS[i], ARGV[3], '+inf')
  redis.call('ZADD', KEYS[i], expiry, ARGV[base + 1])
  redis.call('PEXPIREAT', KEYS[i], expiry + 60000)
  local added = redis.call('ZADD', KEYS[1], 'GT', expiry, ARGV[base + 2])
  if added == 1 or live == 0 then
    redis.call('PUBLISH', ARGV[2], ARGV[base + 3])
    announced = announced + 1
  end
end
return announced
";

/// Expires a batch of users (KEYS[2..]: their keys; ARGV: now, channel, then member and
/// `offline` payload per key): as [`SESSION_DOWN`] without a session, for each.
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
return announced
";

/// The Redis presence engine.
pub struct RedisPresence {
    conn: ConnectionManager,
    ttl_ms: u64,
    changes: broadcast::Sender<PresenceChange>,
    /// Counts the change subscriber's (re)connections.
    resets: watch::Sender<u64>,
    up: Script,
    down: Script,
    refresh: Script,
    sweep: Script,
}

fn user_member(workspace: &WorkspaceId, user: &UserId) -> String {
    format!("{workspace}/{user}")
}

fn user_key(member: &str) -> String {
    format!("confab:presence:{member}")
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
            up: Script::new(SESSION_UP),
            down: Script::new(SESSION_DOWN),
            refresh: Script::new(REFRESH),
            sweep: Script::new(SWEEP),
        });
        let connected = Some(resets);
        spawn_subscriber(
            url.to_string(),
            PRESENCE_CHANNEL,
            changes,
            connected,
            |bytes| {
                let wire: PresenceWire = serde_json::from_slice(bytes).ok()?;
                Some(PresenceChange {
                    workspace: wire.workspace,
                    user: wire.user,
                    status: wire.status,
                })
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
        serde_json::to_string(&PresenceWire {
            workspace: workspace.clone(),
            user: user.clone(),
            status,
        })
        .unwrap_or_default()
    }

    /// Announces `offline` for users whose sessions all expired (their gateway died), in
    /// batches of one script each until none is left; returns how many it announced.
    pub async fn sweep(&self) -> Result<usize, EngineError> {
        let mut conn = self.conn.clone();
        let mut announced = 0;
        for _ in 0..SWEEP_MAX_BATCHES {
            let now = confab_shared::now_ms();
            let expired: Vec<String> = conn
                .zrangebyscore_limit(USERS_KEY, "-inf", now, 0, SWEEP_BATCH as isize)
                .await
                .map_err(engine_error)?;
            let mut batch = self.sweep.prepare_invoke();
            batch.key(USERS_KEY).arg(now).arg(PRESENCE_CHANNEL);
            let mut users = 0;
            let mut malformed = Vec::new();
            for member in &expired {
                let parsed = member.split_once('/').and_then(|(ws, user)| {
                    Some((WorkspaceId::new(ws).ok()?, UserId::new(user).ok()?))
                });
                let Some((ws, user)) = parsed else {
                    malformed.push(member.as_str());
                    continue;
                };
                batch.key(user_key(member)).arg(member).arg(Self::payload(
                    &ws,
                    &user,
                    Status::Offline,
                ));
                users += 1;
            }
            if !malformed.is_empty() {
                conn.zrem::<_, _, ()>(USERS_KEY, &malformed)
                    .await
                    .map_err(engine_error)?;
            }
            if users > 0 {
                announced += batch
                    .invoke_async::<usize>(&mut conn)
                    .await
                    .map_err(engine_error)?;
            }
            if expired.len() < SWEEP_BATCH {
                break;
            }
        }
        Ok(announced)
    }
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn session_up(&self, _gateway: &str, s: &PresenceSession) -> Result<(), EngineError> {
        let now = confab_shared::now_ms();
        let member = user_member(&s.workspace, &s.user);
        self.up
            .key(user_key(&member))
            .key(USERS_KEY)
            .arg(s.session.as_str())
            .arg(now + self.ttl_ms)
            .arg(now)
            .arg(&member)
            .arg(PRESENCE_CHANNEL)
            .arg(Self::payload(&s.workspace, &s.user, Status::Online))
            .invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(engine_error)?;
        Ok(())
    }

    async fn session_down(&self, _gateway: &str, s: &PresenceSession) -> Result<(), EngineError> {
        let member = user_member(&s.workspace, &s.user);
        self.down
            .key(user_key(&member))
            .key(USERS_KEY)
            .arg(s.session.as_str())
            .arg(confab_shared::now_ms())
            .arg(&member)
            .arg(PRESENCE_CHANNEL)
            .arg(Self::payload(&s.workspace, &s.user, Status::Offline))
            .invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(engine_error)?;
        Ok(())
    }

    async fn refresh(
        &self,
        _gateway: &str,
        sessions: &[PresenceSession],
    ) -> Result<(), EngineError> {
        let now = confab_shared::now_ms();
        let expiry = now + self.ttl_ms;
        // One script per batch: a refresh is a few round trips, not one per session.
        for chunk in sessions.chunks(REFRESH_BATCH) {
            let mut batch = self.refresh.prepare_invoke();
            batch
                .key(USERS_KEY)
                .arg(expiry)
                .arg(PRESENCE_CHANNEL)
                .arg(now);
            for s in chunk {
                let member = user_member(&s.workspace, &s.user);
                batch
                    .key(user_key(&member))
                    .arg(s.session.as_str())
                    .arg(&member)
                    .arg(Self::payload(&s.workspace, &s.user, Status::Online));
            }
            batch
                .invoke_async::<usize>(&mut self.conn.clone())
                .await
                .map_err(engine_error)?;
        }
        Ok(())
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
            pipe.zcount(user_key(&user_member(workspace, user)), now, "+inf");
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

/// Points a workspace at another cell and moves its count, atomically.
const MOVE_WORKSPACE: &str = r"
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local record = cjson.decode(raw)
redis.call('HINCRBY', KEYS[2], record['cell'], -1)
record['cell'] = ARGV[1]
record['region'] = ARGV[2]
redis.call('SET', KEYS[1], cjson.encode(record))
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

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
    conn: ConnectionManager,
    changes: broadcast::Sender<DirectoryChange>,
    move_script: Script,
    claim_script: Script,
    register_script: Script,
    heartbeat_script: Script,
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

fn cell_key(id: &CellId) -> String {
    format!("confab:cell:{id}")
}

fn workspace_key(id: &WorkspaceId) -> String {
    format!("confab:ws:{id}")
}

impl RedisDirectory {
    /// Connects and starts the change subscriber.
    pub fn start(url: &str) -> Result<Arc<RedisDirectory>, EngineError> {
        let (changes, _) = broadcast::channel(4096);
        let directory = Arc::new(RedisDirectory {
            conn: connect(url)?,
            changes: changes.clone(),
            move_script: Script::new(MOVE_WORKSPACE),
            claim_script: Script::new(CLAIM_CELL),
            register_script: Script::new(REGISTER_CELL),
            heartbeat_script: Script::new(HEARTBEAT_CELL),
        });
        spawn_subscriber(url.to_string(), DIRECTORY_CHANNEL, changes, None, |bytes| {
            Some(match serde_json::from_slice(bytes).ok()? {
                DirectoryWire::Moved { workspace, cell } => {
                    DirectoryChange::WorkspaceMoved { workspace, cell }
                }
                DirectoryWire::Cell { cell } => DirectoryChange::CellChanged { cell },
            })
        });
        Ok(directory)
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Announces that a cell changed (drained, undrained, registered).
    pub(crate) async fn announce_cell(&self, cell: &CellId) -> Result<(), EngineError> {
        self.publish(&DirectoryWire::Cell { cell: cell.clone() })
            .await
    }

    async fn publish(&self, wire: &DirectoryWire) -> Result<(), EngineError> {
        let payload = serde_json::to_string(wire).unwrap_or_default();
        self.conn
            .clone()
            .publish::<_, _, ()>(DIRECTORY_CHANNEL, payload)
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
            .key(cell_key(&cell.id))
            .key(CELLS_KEY)
            .arg(cell.id.as_str())
            .arg(&cell.region)
            .arg(&cell.url)
            .arg(now_ms)
            .arg(process)
            .arg(min_epoch)
            .invoke_async(&mut self.conn.clone())
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
            .key(cell_key(&cell.id))
            .key(CELLS_KEY)
            .arg(cell.id.as_str())
            .arg(&cell.region)
            .arg(&cell.url)
            .arg(now_ms)
            .arg(process)
            .arg(epoch)
            .invoke_async(&mut self.conn.clone())
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
            .key(cell_key(id))
            .arg(epoch)
            .arg(now_ms)
            .arg(load.connections)
            .arg(bound_field(load.max_workspaces))
            .arg(bound_field(load.max_connections))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(engine_error)?;
        Ok(tenure(outcome))
    }

    async fn cells(&self) -> Result<Vec<CellRecord>, EngineError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.smembers(CELLS_KEY).await.map_err(engine_error)?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(format!("confab:cell:{id}"));
        }
        pipe.hgetall(CELL_WORKSPACES_KEY);
        let mut hashes: Vec<HashMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(engine_error)?;
        let counts = hashes.pop().unwrap_or_default();
        let mut cells: Vec<CellRecord> = ids
            .iter()
            .zip(&hashes)
            .filter_map(|(id, hash)| cell_from_hash(id, hash))
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
        let mut conn = self.conn.clone();
        let known: bool = conn
            .sismember(CELLS_KEY, id.as_str())
            .await
            .map_err(engine_error)?;
        if !known {
            return Ok(false);
        }
        conn.hset::<_, _, _, ()>(cell_key(id), "draining", "1")
            .await
            .map_err(engine_error)?;
        self.publish(&DirectoryWire::Cell { cell: id.clone() })
            .await?;
        Ok(true)
    }

    async fn workspace(&self, id: &WorkspaceId) -> Result<Option<WorkspaceRecord>, EngineError> {
        let raw: Option<String> = self
            .conn
            .clone()
            .get(workspace_key(id))
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
        let mut conn = self.conn.clone();
        let created: bool = redis::cmd("SET")
            .arg(workspace_key(&record.id))
            .arg(raw)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(engine_error)?
            .is_some();
        if !created {
            return Err(CreateWorkspaceError::Exists(record.id));
        }
        conn.hincr::<_, _, _, ()>(CELL_WORKSPACES_KEY, record.cell.as_str(), 1)
            .await
            .map_err(engine_error)?;
        Ok(())
    }

    async fn delete_workspace(&self, id: &WorkspaceId) -> Result<(), EngineError> {
        if let Some(record) = self.workspace(id).await? {
            let mut conn = self.conn.clone();
            redis::pipe()
                .atomic()
                .del(workspace_key(id))
                .ignore()
                .hincr(CELL_WORKSPACES_KEY, record.cell.as_str(), -1)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(engine_error)?;
        }
        Ok(())
    }

    async fn move_workspace(
        &self,
        id: &WorkspaceId,
        cell: &CellId,
        region: &str,
    ) -> Result<(), EngineError> {
        let payload = serde_json::to_string(&DirectoryWire::Moved {
            workspace: id.clone(),
            cell: cell.clone(),
        })
        .unwrap_or_default();
        let moved: i64 = self
            .move_script
            .key(workspace_key(id))
            .key(CELL_WORKSPACES_KEY)
            .arg(cell.as_str())
            .arg(region)
            .arg(DIRECTORY_CHANNEL)
            .arg(payload)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(engine_error)?;
        if moved == 0 {
            return Err(EngineError(format!("workspace {id} does not exist")));
        }
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
