//! The Redis engine of [`CellStore`]: a cell's durable state in its own Redis, a single server
//! or a Redis Cluster (`redis+cluster://h:p,h:p`, see [`RedisConn`]).
//!
//! Keys (prefix `confab:cs:`). Every key of a workspace `W` carries the hash tag `{W}`, so
//! that all of them live in one slot (one shard of a cluster) and every script touches one
//! slot; ids never hold `:`, `{`, `}` or `.`, so no workspace id can name another's key:
//! - `{W}:meta` (hash: name);
//! - `{W}:ch:{ch}` (hash: name, kind, last_seq, first_seq) — channel metadata and seq window;
//! - `{W}:names` (hash public channel name → id), `{W}:dms` (hash "a/b" → id), `{W}:public`
//!   (set of ids), `{W}:channel_count` (public and private channels created);
//! - `{W}:ch:{ch}:log` (sorted set, score = seq, member = the event's JSON) — the channel log,
//!   trimmed to the retention window;
//! - `{W}:ch:{ch}:msgs` (sorted set, score = seq, member = the message as it stands now) —
//!   history, kept beyond retention;
//! - `{W}:ch:{ch}:idem` (hash "user/client_msg_id" → "seq:ts") and `{W}:ch:{ch}:idemseq`
//!   (sorted set of those keys by seq, to drop them when their message leaves retention);
//! - `{W}:ch:{ch}:members` (set), `{W}:u:{user}:channels` (set), `{W}:u:{user}:read` (hash).
//! - `{W}:wh:ids` (set of webhook ids), `{W}:wh:{id}` (hash: user, url, secret, events,
//!   channels, disabled, last_error, failing_since), `{W}:wh:{id}:cursors` (hash channel →
//!   the seq up to which the webhook's deliveries are done), `{W}:wh:count` (hash user →
//!   webhooks it has) — webhooks and their pending deliveries (the log events after each
//!   cursor), all under the workspace's prefix so that a move copies them with the rest.
//!
//! Those are the keys under the prefix `confab:cs:{W}:` (`confab_shared::moves::key_prefix`),
//! which a move copies. Beside them, in the same slot but never copied:
//! - `{W}.ctl` (hash): `fence`, this store's fence as the workspace's writes see it (below);
//!   `served` (`1` while the store serves the workspace); `mark`, the workspace's move mark
//!   (`copying:E`, `frozen:E`, `gone:E` or `incoming:E`, for a move of epoch `E`);
//! - `{W}.dirty` (set) the keys written while the workspace is `copying`, and `{W}.export`
//!   (list) the keys an export pages over (see `moving`).
//!
//! Cell-wide keys share the tag `{.cell}` (no workspace id holds a `.`):
//! - `{.cell}:fence` (string): the epoch of the cell process that claimed the store last;
//! - `{.cell}:known` (set): every workspace that has a `.ctl` hash here, served or not;
//! - `{.cell}:workspaces` (set): the workspaces served, for counting and listing them. It
//!   follows the `served` fields (updated right after them, and rebuilt from them by every
//!   claim); `served` is what the write scripts go by.
//!
//! Every write is one Lua script on one slot, so it is atomic. [`CellStore::append`] checks the
//! seq, writes the event, applies its side effect and trims, in one script; with `appendonly
//! yes` and `appendfsync always` the write is on disk before the script returns, so before the
//! cell acks. Multi-key reads that must agree with each other (a channel's seq window and its
//! members) run in one `MULTI`. Every command times out quickly (`unavailable`) and the
//! connection reconnects by itself (in a cluster, it also follows failovers and slot moves).
//! Scripts are [`Lua`]s, not `redis::Script`s: a node without the script cached (restarted, or a
//! replica just promoted) gets its text from that one call, where `redis::Script` would load
//! it on every node of the cluster and fail while any master is down.
//!
//! Fencing: a cell process [claims](RedisStore::claim) the store with its epoch when it starts:
//! it raises `{.cell}:fence`, then the `fence` of every known workspace, and serves only once
//! all of them hold its epoch. Every workspace write script first checks the workspace's
//! `fence` against the writer's epoch, and every cell-wide write (adding a workspace to
//! `known` or `workspaces`) checks `{.cell}:fence`; a workspace is added to `known` (a fenced
//! write) before its `.ctl` is first written. So a newer process with the same cell id, once
//! its claim returned, has every write of an older process still running (split brain)
//! refused (`FENCED`, [`StoreError::Fenced`]) instead of forking the log; a write of the older
//! one that landed before the claim reached its workspace is ordered before anything the newer
//! one reads there. [`RedisStore::fenced`] then tells the older one to stop.
//!
//! The layout before hash tags (`confab:cs:W:…`, `confab:cs:fence`, `confab:cs:workspaces`,
//! `confab:cs:moves`, on a single Redis only: its scripts span slots) is migrated by the first
//! claim (see `layout`), which also leaves a value in `confab:cs:fence` that no epoch equals, so
//! a process of an earlier version has its writes refused and can never claim the store again.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use confab_directory::redis_conn::{is_noscript, Lua, LuaCall};
use confab_directory::redis_conn::{RedisConn, Timeouts};
use confab_shared::moves::key_prefix;
use confab_shared::server::{ChannelKind, Event, MessageView};
use confab_shared::{ChannelId, UserId, WorkspaceId};
use futures_util::{StreamExt, TryStreamExt};
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::AsyncCommands;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

mod layout;
mod moving;

use super::{
    side_effect, CellStore, ChannelMeta, ChannelSnapshot, ChannelSummary, CreateOutcome,
    MessageQuery, NewChannel, ReadMarker, SideEffect, StoreError, StoreResult, WebhookCreate,
    WebhookRecord, WebhookState,
};

/// The store's fence: the epoch of the process that claimed it last.
const CELL_FENCE: &str = "confab:cs:{.cell}:fence";
/// Every workspace with a `.ctl` hash in this store.
const KNOWN: &str = "confab:cs:{.cell}:known";
/// The workspaces this store serves.
const WORKSPACES: &str = "confab:cs:{.cell}:workspaces";
/// Workspaces whose `.ctl` is read or raised at once, by a claim or a listing.
const CTL_CONCURRENCY: usize = 64;
/// Ids added to or removed from a cell-wide set per script.
const INDEX_BATCH: usize = 500;

/// The first lines of every workspace write script. The last two keys are the workspace's
/// `.dirty` and `.ctl`, the last argument the writer's epoch.
///
/// The workspace's fence refuses the write of any other epoch. A workspace without a fence has
/// no `.ctl` at all: nothing of it is stored here (every script then finds nothing to change,
/// but `CREATE_WORKSPACE`, which a fenced `ENROLL` precedes). An unclaimed store holds epoch 0,
/// the epoch of a store that was never claimed (tests, tools).
///
/// Then the workspace's own fence, for moves: its `mark` decides. While it is `copying` the
/// workspace keys the script names are recorded in `.dirty` (the final copy takes them);
/// `frozen`, `gone` and `incoming` refuse the write (`WSMOVED`), durably, whatever the cell
/// process believes. `served` tells the script whether the store serves the workspace.
const FENCE_GUARD: &str = r"
local ctl = KEYS[#KEYS]
local guard = redis.call('HMGET', ctl, 'fence', 'mark', 'served')
if guard[1] and guard[1] ~= ARGV[#ARGV] then
  return redis.error_reply('FENCED the store is claimed by epoch ' .. guard[1] .. ', not ' .. ARGV[#ARGV])
end
local served = guard[3] == '1'
local base = string.sub(ctl, 1, #ctl - 4)
if guard[2] then
  local state = string.match(guard[2], '^(%a+)')
  if state ~= 'copying' then
    return redis.error_reply('WSMOVED workspace ' .. base .. ' is ' .. guard[2])
  end
  local prefix = base .. ':'
  for i = 1, #KEYS - 2 do
    if string.sub(KEYS[i], 1, #prefix) == prefix then
      redis.call('SADD', KEYS[#KEYS - 1], KEYS[i])
    end
  end
end
";

/// The first lines of every cell-wide write script: the last key is `{.cell}:fence` and the
/// last argument the writer's epoch.
const CELL_FENCE_GUARD: &str = r"
local fence = redis.call('GET', KEYS[#KEYS]) or '0'
if fence ~= ARGV[#ARGV] then
  return redis.error_reply('FENCED the store is claimed by epoch ' .. fence .. ', not ' .. ARGV[#ARGV])
end
";

/// Claims the store for an epoch: KEYS = `{.cell}:fence`; ARGV = epoch. Returns -1 when
/// claimed, else the epoch already holding it (equal or newer: this process is late and must
/// not serve).
const CLAIM: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current >= tonumber(ARGV[1]) then return current end
redis.call('SET', KEYS[1], ARGV[1])
return -1
";

/// Raises a workspace's fence to a claiming epoch: KEYS = `.ctl`; ARGV = epoch. Returns
/// `{'newer', fence}` when a newer epoch holds it already, else `{'ok', served, mark}`.
const RAISE_FENCE: &str = r"
local state = redis.call('HMGET', KEYS[1], 'fence', 'served', 'mark')
if state[1] and tonumber(state[1]) > tonumber(ARGV[1]) then return {'newer', state[1]} end
redis.call('HSET', KEYS[1], 'fence', ARGV[1])
return {'ok', state[2] or '', state[3] or ''}
";

/// Adds a workspace to `known`, before anything of it is written: KEYS = known, fence;
/// ARGV = workspace, epoch.
const ENROLL: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
return 1
";

/// Adds workspaces to or removes them from the served index: KEYS = workspaces, fence;
/// ARGV = `add` or `rem`, the workspaces, epoch.
const INDEX: &str = r"
local op = ARGV[1] == 'add' and 'SADD' or 'SREM'
for i = 2, #ARGV - 1, 1000 do
  redis.call(op, KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV - 1)))
end
return 1
";

/// Moves a channel's `last_seq` from an expected value up to a higher one, after the store lost
/// writes: KEYS = meta, dirty, ctl; ARGV = expected, new, epoch. Returns -2 when moved, -1 for
/// no such channel, else the `last_seq` found.
const RAISE_LAST_SEQ: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
if last ~= tonumber(ARGV[1]) or tonumber(ARGV[2]) <= last then return last end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[2])
return -2
";

/// Serves a workspace from now on, once: KEYS = workspace meta, dirty, ctl; ARGV = name,
/// epoch. A workspace seen for the first time takes the writer's epoch as its fence: `ENROLL`,
/// which checks the store's fence, ran first. Returns 1 when the workspace is new.
const CREATE_WORKSPACE: &str = r"
if served then return 0 end
redis.call('HSET', ctl, 'fence', ARGV[#ARGV], 'served', '1')
redis.call('HSET', KEYS[1], 'name', ARGV[1])
return 1
";

/// Appends one event: KEYS = meta, log, msgs, idem, idemseq, members, user channels, dirty,
/// ctl; ARGV = seq, event JSON, retention, effect, then the effect's arguments, then the epoch.
/// Effects: `msg` (message JSON, idem key or "", idem value), `edit`/`del` (target, new message
/// JSON), `join` (user, channel id, optionally the most channels the user may be in: a join has
/// eight arguments with it, seven without), `leave`
/// (user, channel id). Returns -2 when appended, -1 for a missing channel, -3 for a join of a
/// user with no room for another channel, else the channel's last seq (a seq conflict).
const APPEND: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
if seq ~= last + 1 then return last end
if ARGV[4] == 'join' and #ARGV >= 8 and redis.call('SISMEMBER', KEYS[7], ARGV[6]) == 0
    and redis.call('SCARD', KEYS[7]) >= tonumber(ARGV[7]) then
  return -3
end
redis.call('ZADD', KEYS[2], seq, ARGV[2])
redis.call('HSET', KEYS[1], 'last_seq', seq)
local effect = ARGV[4]
if effect == 'msg' then
  redis.call('ZADD', KEYS[3], seq, ARGV[5])
  if ARGV[6] ~= '' then
    redis.call('HSET', KEYS[4], ARGV[6], ARGV[7])
    redis.call('ZADD', KEYS[5], seq, ARGV[6])
  end
elseif effect == 'edit' or effect == 'del' then
  local target = tonumber(ARGV[5])
  if redis.call('ZCOUNT', KEYS[3], target, target) > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], target, target)
    redis.call('ZADD', KEYS[3], target, ARGV[6])
  end
elseif effect == 'join' then
  redis.call('SADD', KEYS[6], ARGV[5])
  redis.call('SADD', KEYS[7], ARGV[6])
elseif effect == 'leave' then
  redis.call('SREM', KEYS[6], ARGV[5])
  redis.call('SREM', KEYS[7], ARGV[6])
end
local retention = tonumber(ARGV[3])
local cutoff = seq - retention
if cutoff > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', cutoff)
  for _, key in ipairs(gone) do
    local value = redis.call('HGET', KEYS[4], key)
    if value and tonumber(string.match(value, '^(%d+)')) <= cutoff then
      redis.call('HDEL', KEYS[4], key)
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', cutoff)
  local first = tonumber(redis.call('HGET', KEYS[1], 'first_seq') or '1')
  if cutoff + 1 > first then redis.call('HSET', KEYS[1], 'first_seq', cutoff + 1) end
end
return -2
";

/// Creates a channel, claiming its id and its public name or DM pair: KEYS = meta, names, dms,
/// public, channel count, dirty, ctl; ARGV = id, name, kind, dm pair or "", most public and
/// private channels of the workspace or "", epoch.
const CREATE_CHANNEL: &str = r"
if not served then return {'unknown_workspace'} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'id_taken'} end
if ARGV[4] ~= '' then
  local existing = redis.call('HGET', KEYS[3], ARGV[4])
  if existing then return {'dm_exists', existing} end
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
elseif ARGV[3] ~= 'dm' then
  local public = ARGV[3] == 'public'
  -- A name held by a channel that is not public is a private channel's claim from before
  -- private names stopped claiming anything: it takes nothing.
  local holder = public and redis.call('HGET', KEYS[2], ARGV[2])
  if holder and redis.call('SISMEMBER', KEYS[4], holder) == 1 then return {'name_taken'} end
  if ARGV[5] ~= '' and tonumber(redis.call('GET', KEYS[5]) or '0') >= tonumber(ARGV[5]) then
    return {'too_many_channels'}
  end
  if public then redis.call('HSET', KEYS[2], ARGV[2], ARGV[1]) end
  redis.call('INCR', KEYS[5])
end
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'kind', ARGV[3], 'last_seq', 0, 'first_seq', 1)
if ARGV[3] == 'public' then redis.call('SADD', KEYS[4], ARGV[1]) end
return {'created'}
";

/// Moves a read marker forward only: KEYS = read hash, dirty, ctl; ARGV = channel, seq, epoch.
/// Returns `{previous, current}` as strings, or `{}` for an unknown workspace.
/// Seqs are compared as decimal strings (length first), not as Lua numbers: those are doubles,
/// which would round a marker above 2^53 and then store it in exponent form.
const ADVANCE_READ: &str = r"
if not served then return {} end
local previous = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local seq = ARGV[2]
if #seq > #previous or (#seq == #previous and seq > previous) then
  redis.call('HSET', KEYS[1], ARGV[1], seq)
  return {previous, seq}
end
return {previous, previous}
";

/// Stores a webhook within its user's bound: KEYS = ids, hook, per-user counts, dirty, ctl;
/// ARGV = id, user, most webhooks per user, then field/value pairs, then the epoch.
const CREATE_WEBHOOK: &str = r"
if not served then return 'unknown_workspace' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'id_taken' end
if tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0') >= tonumber(ARGV[3]) then
  return 'too_many'
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
for i = 4, #ARGV - 1, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 'created'
";

/// Deletes a webhook and its cursors: KEYS = ids, hook, cursors, per-user counts, dirty, ctl;
/// ARGV = id, epoch. Returns 1 when it existed.
const DELETE_WEBHOOK: &str = r"
local user = redis.call('HGET', KEYS[2], 'user')
if not user then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
if redis.call('HINCRBY', KEYS[4], user, -1) <= 0 then redis.call('HDEL', KEYS[4], user) end
return 1
";

/// Replaces a webhook's delivery state: KEYS = hook, dirty, ctl; ARGV = disabled, last_error,
/// failing_since, epoch. Returns 0 for a webhook that does not exist (never recreates it).
const SET_WEBHOOK_STATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'disabled', ARGV[1], 'last_error', ARGV[2], 'failing_since', ARGV[3])
return 1
";

/// Moves a webhook's cursor forward only: KEYS = hook, cursors, dirty, ctl; ARGV = channel,
/// seq, epoch. Seqs compare as decimal strings, as in `ADVANCE_READ`.
const ADVANCE_WEBHOOK_CURSOR: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local previous = redis.call('HGET', KEYS[2], ARGV[1])
local seq = ARGV[2]
if not previous or #seq > #previous or (#seq == #previous and seq > previous) then
  redis.call('HSET', KEYS[2], ARGV[1], seq)
end
return 1
";

/// The webhook scripts, loaded once.
struct WebhookScripts {
    create: Lua,
    delete: Lua,
    set_state: Lua,
    advance_cursor: Lua,
}

impl WebhookScripts {
    fn new() -> Self {
        WebhookScripts {
            create: fenced_script(CREATE_WEBHOOK),
            delete: fenced_script(DELETE_WEBHOOK),
            set_state: fenced_script(SET_WEBHOOK_STATE),
            advance_cursor: fenced_script(ADVANCE_WEBHOOK_CURSOR),
        }
    }
}

fn webhook_key(ws: &WorkspaceId, id: &str) -> String {
    ws_key(ws, &format!("wh:{id}"))
}

fn join_ids<T: AsRef<str>>(ids: &[T]) -> String {
    ids.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(",")
}

fn split_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn webhook_from_hash(id: &str, hash: &HashMap<String, String>) -> StoreResult<WebhookRecord> {
    let field = |name: &str| hash.get(name).map(String::as_str).unwrap_or("");
    let user = field("user")
        .parse::<UserId>()
        .map_err(|e| corrupt("webhook user", e))?;
    let channels = match field("channels") {
        "*" => None,
        raw => Some(
            split_list(raw)
                .iter()
                .map(|c| c.parse::<ChannelId>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| corrupt("webhook channel", e))?,
        ),
    };
    let failing_since_ms = match field("failing_since") {
        "" => None,
        raw => Some(raw.parse().map_err(|e| corrupt("failing_since", e))?),
    };
    Ok(WebhookRecord {
        id: id.to_string(),
        user,
        url: field("url").to_string(),
        secret: field("secret").to_string(),
        events: split_list(field("events")),
        channels,
        state: WebhookState {
            disabled: field("disabled") == "1",
            last_error: Some(field("last_error").to_string()).filter(|e| !e.is_empty()),
            failing_since_ms,
        },
    })
}

/// What a Redis store says of its persistence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persistence {
    /// `CONFIG GET` answered.
    Known {
        /// `appendonly yes`.
        appendonly: bool,
        /// `always`, `everysec` or `no`.
        appendfsync: String,
    },
    /// Redis refused to tell (why, in words).
    Unknown(String),
}

/// The Redis cell store.
pub struct RedisStore {
    conn: RedisConn,
    create_workspace: Lua,
    append: Lua,
    create_channel: Lua,
    advance_read: Lua,
    raise_last_seq: Lua,
    claim: Lua,
    raise_fence: Lua,
    enroll: Lua,
    index: Lua,
    webhook_scripts: WebhookScripts,
    /// The epoch this process claimed the store with (0 until it claims).
    epoch: AtomicU64,
    /// Cancelled on the first write refused because a newer epoch claimed the store.
    fenced: CancellationToken,
}

/// The outcome of a script that moves a channel's `last_seq` (`append`, `raise_last_seq`):
/// -2 when it did, -1 for no such channel, else the `last_seq` found (a seq conflict with
/// `got`, the seq the caller asked for).
fn seq_step_outcome(outcome: i64, channel: &ChannelId, got: u64) -> StoreResult<()> {
    match outcome {
        -2 => Ok(()),
        -1 => Err(StoreError::NoSuchChannel(channel.clone())),
        last => Err(StoreError::SeqConflict {
            channel: channel.clone(),
            expected: last.max(0) as u64 + 1,
            got,
        }),
    }
}

/// A workspace write script: the fence guard, then the script's own lines.
fn fenced_script(body: &str) -> Lua {
    Lua::new(format!("{FENCE_GUARD}{body}"))
}

/// A cell-wide write script: the store's fence guard, then the script's own lines.
fn cell_script(body: &str) -> Lua {
    Lua::new(format!("{CELL_FENCE_GUARD}{body}"))
}

/// A failed command: Redis unreachable, timed out or refusing (`unavailable`), or a reply of
/// the wrong shape, which only data written by something else can cause (`corrupt`).
fn redis_error(e: redis::RedisError) -> StoreError {
    metrics::counter!("confab_redis_errors_total", "engine" => "cell_store").increment(1);
    if e.kind() == redis::ErrorKind::UnexpectedReturnType {
        return StoreError::Corrupt(format!("redis reply: {e}"));
    }
    StoreError::Unavailable(format!("redis: {e}"))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// A key of the workspace, under its prefix (`confab:cs:{W}:what`): moves copy it.
fn ws_key(ws: &WorkspaceId, what: &str) -> String {
    format!("{}{what}", key_prefix(ws))
}

fn channel_key(ws: &WorkspaceId, ch: &ChannelId) -> String {
    ws_key(ws, &format!("ch:{ch}"))
}

fn user_key(ws: &WorkspaceId, user: &UserId, what: &str) -> String {
    ws_key(ws, &format!("u:{user}:{what}"))
}

/// The workspace's key beside its prefix (`confab:cs:{W}.what`), in its slot; never moved.
fn ws_side_key(ws: &WorkspaceId, what: &str) -> String {
    format!("confab:cs:{{{ws}}}.{what}")
}

/// The workspace's control hash: fence, served, mark.
fn ctl_key(ws: &WorkspaceId) -> String {
    ws_side_key(ws, "ctl")
}

/// The keys written while the workspace is `copying`.
fn dirty_key(ws: &WorkspaceId) -> String {
    ws_side_key(ws, "dirty")
}

/// Ends a workspace write script's keys: the workspace's `.dirty` and `.ctl`.
fn guard_keys(invocation: &mut LuaCall<'_>, ws: &WorkspaceId) {
    invocation.key(dirty_key(ws)).key(ctl_key(ws));
}

fn pair_field(pair: (&UserId, &UserId)) -> String {
    format!("{}/{}", pair.0, pair.1)
}

fn kind_name(kind: ChannelKind) -> &'static str {
    kind.as_str()
}

fn parse_kind(s: &str) -> StoreResult<ChannelKind> {
    match s {
        "public" => Ok(ChannelKind::Public),
        "private" => Ok(ChannelKind::Private),
        "dm" => Ok(ChannelKind::Dm),
        other => Err(corrupt("channel kind", other)),
    }
}

impl RedisStore {
    /// Connects lazily: the cell starts even while Redis is down and serves `unavailable`
    /// until it is back. `redis+cluster://h:p,h:p` names a Redis Cluster by its seed nodes;
    /// any other URL a single Redis.
    pub fn connect(url: &str) -> StoreResult<RedisStore> {
        // The error series exists from the start, so dashboards show 0 rather than nothing.
        metrics::counter!("confab_redis_errors_total", "engine" => "cell_store").increment(0);
        let conn = RedisConn::open(url, Timeouts::default()).map_err(redis_error)?;
        Ok(RedisStore {
            conn,
            create_workspace: fenced_script(CREATE_WORKSPACE),
            append: fenced_script(APPEND),
            create_channel: fenced_script(CREATE_CHANNEL),
            advance_read: fenced_script(ADVANCE_READ),
            raise_last_seq: fenced_script(RAISE_LAST_SEQ),
            claim: Lua::new(CLAIM),
            raise_fence: Lua::new(RAISE_FENCE),
            enroll: cell_script(ENROLL),
            index: cell_script(INDEX),
            webhook_scripts: WebhookScripts::new(),
            epoch: AtomicU64::new(0),
            fenced: CancellationToken::new(),
        })
    }

    /// Whether the store is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// The epoch holding the store now (0 when it was never claimed); a store of the earlier
    /// layout counts with the epoch that claimed it, so that the next claim is above it.
    pub async fn fence_epoch(&self) -> StoreResult<u64> {
        let epoch: Option<u64> = self.conn().get(CELL_FENCE).await.map_err(redis_error)?;
        let old = self.old_fence_epoch().await?;
        Ok(epoch.unwrap_or(0).max(old))
    }

    /// Claims the store for `epoch`: from now on every write of this store carries it, and a
    /// process that claimed the store with an older epoch has its writes refused. Fails with
    /// [`StoreError::Fenced`] when the store is already held by `epoch` or a newer one, and
    /// with [`StoreError::Corrupt`] when it holds data of the earlier layout that cannot be
    /// migrated (a move in progress).
    ///
    /// Retires the earlier layout, raises the store's fence, migrates the earlier layout's data
    /// if there is any (the first claim), then raises the fence of every known workspace and rebuilds the served index
    /// from their `served` fields. A claim that fails half-way leaves the store refusing the
    /// older process wherever it got to; the next claim (with a newer epoch) goes all the way.
    pub async fn claim(&self, epoch: u64) -> StoreResult<()> {
        self.retire_old_layout(epoch).await?;
        let held: i64 = self
            .claim
            .key(CELL_FENCE)
            .arg(epoch)
            .invoke(&mut self.conn())
            .await
            .map_err(redis_error)?;
        if held >= 0 {
            return Err(StoreError::Fenced(format!(
                "the store is held by epoch {held}, not older than {epoch}"
            )));
        }
        if !self.conn.is_cluster() {
            self.migrate_old_layout(epoch).await?;
        }
        let known: Vec<String> = self.conn().smembers(KNOWN).await.map_err(redis_error)?;
        let known: Vec<WorkspaceId> = parse_ids(known);
        let states: Vec<(WorkspaceId, bool)> = futures_util::stream::iter(known)
            .map(|ws| async move {
                let state: Vec<String> = self
                    .raise_fence
                    .key(ctl_key(&ws))
                    .arg(epoch)
                    .invoke(&mut self.conn())
                    .await
                    .map_err(redis_error)?;
                match state.first().map(String::as_str) {
                    Some("ok") => Ok((ws, state.get(1).is_some_and(|s| s == "1"))),
                    Some("newer") => Err(StoreError::Fenced(format!(
                        "workspace {ws} is held by epoch {}, not older than {epoch}",
                        state.get(1).map(String::as_str).unwrap_or("?")
                    ))),
                    _ => Err(corrupt("raise_fence reply", format!("{state:?}"))),
                }
            })
            .buffer_unordered(CTL_CONCURRENCY)
            .try_collect()
            .await?;
        let served: BTreeSet<String> = states
            .into_iter()
            .filter(|(_, served)| *served)
            .map(|(ws, _)| ws.to_string())
            .collect();
        let indexed: BTreeSet<String> = self
            .conn()
            .smembers::<_, Vec<String>>(WORKSPACES)
            .await
            .map_err(redis_error)?
            .into_iter()
            .collect();
        let missing: Vec<&String> = served.difference(&indexed).collect();
        let extra: Vec<&String> = indexed.difference(&served).collect();
        self.update_index("add", &missing, epoch).await?;
        self.update_index("rem", &extra, epoch).await?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(())
    }

    /// Adds workspaces to `known` (`{.cell}`'s fence checked) before anything of them is
    /// written, so that every later claim raises their fence.
    async fn enroll(&self, ws: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.enroll
            .key(KNOWN)
            .key(CELL_FENCE)
            .arg(ws.as_str())
            .arg(epoch)
            .invoke::<i64>(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// Adds (`add`) workspaces to the served index or removes (`rem`) them from it.
    async fn update_index<T: AsRef<str>>(
        &self,
        op: &str,
        ids: &[T],
        epoch: u64,
    ) -> StoreResult<()> {
        for batch in ids.chunks(INDEX_BATCH) {
            let mut invocation = self.index.prepare();
            invocation.key(WORKSPACES).key(CELL_FENCE).arg(op);
            for id in batch {
                invocation.arg(id.as_ref());
            }
            invocation
                .arg(epoch)
                .invoke::<i64>(&mut self.conn())
                .await
                .map_err(|e| self.write_error(e))?;
        }
        Ok(())
    }

    /// Resolves on the first write refused because another process claimed the store with a
    /// newer epoch: this process must stop serving.
    pub fn fenced(&self) -> WaitForCancellationFutureOwned {
        self.fenced.clone().cancelled_owned()
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The error of a failed write: a refusal by the fence is remembered (and announced
    /// through [`RedisStore::fenced`]) rather than reported as a passing outage.
    fn write_error(&self, e: redis::RedisError) -> StoreError {
        if e.code() == Some("FENCED") {
            if !self.fenced.is_cancelled() {
                tracing::error!(epoch = self.epoch(), error = %e, "store write fenced: a newer process holds this cell");
                self.fenced.cancel();
            }
            return StoreError::Fenced(e.to_string());
        }
        redis_error(e)
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> StoreResult<()> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await
            .map(|_| ())
            .map_err(redis_error)
    }

    /// The store's persistence settings, read with `CONFIG GET` (a cell checks them before it
    /// serves: see `confab cell --store-fsync`); in a cluster, the weakest of its masters'.
    /// `Unavailable` when Redis cannot be reached; [`Persistence::Unknown`] when it answers but
    /// refuses to say (a managed Redis that renames or forbids `CONFIG`).
    pub async fn persistence(&self) -> StoreResult<Persistence> {
        let appendonly = match self.config_values("appendonly").await? {
            Ok(values) => values.iter().all(|v| v == "yes"),
            Err(why) => return Ok(Persistence::Unknown(why)),
        };
        let appendfsync = match self.config_values("appendfsync").await? {
            Ok(values) => values
                .into_iter()
                .min_by_key(|v| match v.as_str() {
                    "always" => 2,
                    "everysec" => 1,
                    _ => 0,
                })
                .unwrap_or_default(),
            Err(why) => return Ok(Persistence::Unknown(why)),
        };
        Ok(Persistence::Known {
            appendonly,
            appendfsync,
        })
    }

    /// A `CONFIG GET` parameter's value on the server, or on every master of a cluster
    /// (lowercase); `Ok(Err(why))` when one answers but does not say.
    async fn config_values(&self, name: &str) -> StoreResult<Result<Vec<String>, String>> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        let reply = match self.conn() {
            RedisConn::Single(mut conn) => cmd.query_async::<redis::Value>(&mut conn).await,
            RedisConn::Cluster(mut conn) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                conn.route_command(cmd, routing).await
            }
        };
        let replies = match reply {
            // A cluster's answer: one reply per master, by address.
            Ok(redis::Value::Map(pairs)) if self.conn.is_cluster() => {
                pairs.into_iter().map(|(_, reply)| reply).collect()
            }
            Ok(reply) => vec![reply],
            Err(e)
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal() =>
            {
                return Err(redis_error(e))
            }
            Err(e) => return Ok(Err(format!("CONFIG GET {name}: {e}"))),
        };
        let mut values = Vec::with_capacity(replies.len());
        for reply in replies {
            if let redis::Value::ServerError(e) = &reply {
                return Ok(Err(format!("CONFIG GET {name}: {e:?}")));
            }
            let pairs: Result<HashMap<String, String>, _> = redis::from_redis_value(reply);
            match pairs.map(|mut pairs| pairs.remove(name)) {
                Ok(Some(value)) => values.push(value.to_ascii_lowercase()),
                Ok(None) => return Ok(Err(format!("CONFIG GET {name}: no value"))),
                Err(e) => return Ok(Err(format!("CONFIG GET {name}: {e}"))),
            }
        }
        Ok(Ok(values))
    }

    fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The message JSON to store after an edit or delete of `target`.
    ///
    /// It is read outside the append script, yet cannot be stale when the script runs: the
    /// script refuses any seq but `last_seq + 1`, and every change of a message is an append
    /// that moves `last_seq`, so a change landing between this read and the script makes the
    /// script fail with a seq conflict instead of overwriting it.
    async fn changed_message(
        &self,
        ws: &WorkspaceId,
        ch: &ChannelId,
        effect: &SideEffect<'_>,
    ) -> StoreResult<Option<(u64, String)>> {
        let (target, text, deleted) = match effect {
            SideEffect::Edited { target, text } => (*target, Some(*text), false),
            SideEffect::Deleted { target } => (*target, None, true),
            _ => return Ok(None),
        };
        let Some(mut message) = self.message(ws, ch, target).await? else {
            return Ok(None);
        };
        match text {
            Some(text) => {
                message.text = text.to_string();
                message.edited = true;
            }
            None => message.text.clear(),
        }
        message.deleted |= deleted;
        let json = serde_json::to_string(&message).map_err(|e| corrupt("message", e))?;
        Ok(Some((target, json)))
    }
}

fn decode_messages(raw: Vec<String>) -> StoreResult<Vec<MessageView>> {
    raw.iter()
        .map(|m| serde_json::from_str(m).map_err(|e| corrupt("message", e)))
        .collect()
}

fn parse_u64(hash: &HashMap<String, String>, field: &str) -> StoreResult<u64> {
    hash.get(field)
        .map(|v| v.parse::<u64>())
        .transpose()
        .map_err(|e| corrupt(field, e))
        .map(|v| v.unwrap_or(0))
}

fn meta_from_hash(ch: &ChannelId, hash: &HashMap<String, String>) -> StoreResult<ChannelMeta> {
    Ok(ChannelMeta {
        id: ch.clone(),
        name: hash.get("name").cloned().unwrap_or_default(),
        kind: parse_kind(hash.get("kind").map(String::as_str).unwrap_or(""))?,
    })
}

fn parse_ids<T: std::str::FromStr>(raw: Vec<String>) -> Vec<T> {
    raw.into_iter().filter_map(|s| s.parse().ok()).collect()
}

#[async_trait]
impl CellStore for RedisStore {
    async fn create_workspace(
        &self,
        workspace: &WorkspaceId,
        name: Option<&str>,
    ) -> StoreResult<bool> {
        // Known first (the store's fence checked), then served (the workspace's), then
        // indexed; a retry after a failure half-way does the rest.
        let epoch = self.epoch();
        self.enroll(workspace, epoch).await?;
        let added: u64 = self
            .create_workspace
            .key(ws_key(workspace, "meta"))
            .key(dirty_key(workspace))
            .key(ctl_key(workspace))
            .arg(name.unwrap_or(""))
            .arg(epoch)
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        self.update_index("add", &[workspace.as_str()], epoch)
            .await?;
        Ok(added == 1)
    }

    async fn workspace_exists(&self, workspace: &WorkspaceId) -> StoreResult<bool> {
        let served: Option<String> = self
            .conn()
            .hget(ctl_key(workspace), "served")
            .await
            .map_err(redis_error)?;
        Ok(served.as_deref() == Some("1"))
    }

    async fn workspace_count(&self) -> StoreResult<u64> {
        self.conn().scard(WORKSPACES).await.map_err(redis_error)
    }

    async fn create_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &NewChannel,
    ) -> StoreResult<CreateOutcome> {
        let meta = &channel.meta;
        let pair = channel
            .dm_pair
            .as_ref()
            .map(|(a, b)| pair_field((a, b)))
            .unwrap_or_default();
        let outcome: Vec<String> = self
            .create_channel
            .key(channel_key(workspace, &meta.id))
            .key(ws_key(workspace, "names"))
            .key(ws_key(workspace, "dms"))
            .key(ws_key(workspace, "public"))
            .key(ws_key(workspace, "channel_count"))
            .key(dirty_key(workspace))
            .key(ctl_key(workspace))
            .arg(meta.id.as_str())
            .arg(&meta.name)
            .arg(kind_name(meta.kind))
            .arg(pair)
            .arg(
                channel
                    .max_channels
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            )
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(match outcome.first().map(String::as_str) {
            Some("created") => CreateOutcome::Created,
            Some("unknown_workspace") => CreateOutcome::UnknownWorkspace,
            Some("id_taken") => CreateOutcome::IdTaken,
            Some("name_taken") => CreateOutcome::NameTaken,
            Some("too_many_channels") => CreateOutcome::TooManyChannels,
            Some("dm_exists") => {
                let id = outcome.get(1).map(String::as_str).unwrap_or("");
                CreateOutcome::DmExists(
                    ChannelId::new(id).map_err(|e| corrupt("dm channel id", e))?,
                )
            }
            other => return Err(corrupt("create_channel outcome", format!("{other:?}"))),
        })
    }

    async fn load_channel(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
    ) -> StoreResult<Option<ChannelSnapshot>> {
        let key = channel_key(workspace, channel);
        // One MULTI: a join landing between the two reads would otherwise show a member the
        // snapshot's last_seq does not account for yet.
        let (hash, members): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .atomic()
            .hgetall(&key)
            .smembers(format!("{key}:members"))
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)?;
        if hash.is_empty() {
            return Ok(None);
        }
        let mut members: Vec<UserId> = parse_ids(members);
        members.sort();
        Ok(Some(ChannelSnapshot {
            meta: meta_from_hash(channel, &hash)?,
            last_seq: parse_u64(&hash, "last_seq")?,
            first_seq: parse_u64(&hash, "first_seq")?.max(1),
            members,
        }))
    }

    async fn channel_summaries(
        &self,
        workspace: &WorkspaceId,
        channels: &[ChannelId],
    ) -> StoreResult<Vec<ChannelSummary>> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for channel in channels {
            pipe.hgetall(channel_key(workspace, channel));
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)?;
        channels
            .iter()
            .zip(hashes)
            .filter(|(_, hash)| !hash.is_empty())
            .map(|(id, hash)| {
                Ok(ChannelSummary {
                    meta: meta_from_hash(id, &hash)?,
                    last_seq: parse_u64(&hash, "last_seq")?,
                })
            })
            .collect()
    }

    async fn public_channels(&self, workspace: &WorkspaceId) -> StoreResult<Vec<ChannelSummary>> {
        let ids: Vec<String> = self
            .conn()
            .smembers(ws_key(workspace, "public"))
            .await
            .map_err(redis_error)?;
        let mut ids: Vec<ChannelId> = parse_ids(ids);
        ids.sort();
        self.channel_summaries(workspace, &ids).await
    }

    async fn dm_channel(
        &self,
        workspace: &WorkspaceId,
        pair: (&UserId, &UserId),
    ) -> StoreResult<Option<ChannelId>> {
        let id: Option<String> = self
            .conn()
            .hget(ws_key(workspace, "dms"), pair_field(pair))
            .await
            .map_err(redis_error)?;
        Ok(id.and_then(|id| id.parse().ok()))
    }

    async fn append(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        event: &Event,
        retention: u64,
    ) -> StoreResult<()> {
        let (Some(seq), Some(effect)) = (event.seq(), side_effect(event)) else {
            return Err(StoreError::NotLoggable(event.type_name()));
        };
        let event_json = serde_json::to_string(event).map_err(|e| corrupt("event", e))?;
        let key = channel_key(workspace, channel);
        let mut invocation = self.append.prepare();
        invocation
            .key(&key)
            .key(format!("{key}:log"))
            .key(format!("{key}:msgs"))
            .key(format!("{key}:idem"))
            .key(format!("{key}:idemseq"))
            .key(format!("{key}:members"));
        let user_channels = match &effect {
            SideEffect::Joined(user) | SideEffect::Left(user) => {
                user_key(workspace, user, "channels")
            }
            _ => format!("{key}:unused"),
        };
        invocation.key(user_channels);
        guard_keys(&mut invocation, workspace);
        invocation.arg(seq).arg(event_json).arg(retention.max(1));
        match &effect {
            SideEffect::NewMessage(view) => {
                let json = serde_json::to_string(view).map_err(|e| corrupt("message", e))?;
                let idem_key = view
                    .client_msg_id
                    .as_ref()
                    .map(|c| format!("{}/{c}", view.user))
                    .unwrap_or_default();
                invocation
                    .arg("msg")
                    .arg(json)
                    .arg(idem_key)
                    .arg(format!("{}:{}", view.seq, view.ts));
            }
            SideEffect::Edited { .. } | SideEffect::Deleted { .. } => {
                let name = if matches!(effect, SideEffect::Edited { .. }) {
                    "edit"
                } else {
                    "del"
                };
                match self.changed_message(workspace, channel, &effect).await? {
                    Some((target, json)) => invocation.arg(name).arg(target).arg(json),
                    None => invocation.arg("none"),
                };
            }
            SideEffect::Joined(user) => {
                invocation
                    .arg("join")
                    .arg(user.as_str())
                    .arg(channel.as_str());
            }
            SideEffect::Left(user) => {
                invocation
                    .arg("leave")
                    .arg(user.as_str())
                    .arg(channel.as_str());
            }
        }
        let outcome: i64 = invocation
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        seq_step_outcome(outcome, channel, seq)
    }

    async fn append_joins(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        events: &[Event],
        retention: u64,
        max_user_channels: u64,
    ) -> StoreResult<usize> {
        if events.is_empty() {
            return Ok(0);
        }
        // One pipeline of one script per event: each checks its seq and the user's room and
        // writes atomically, as `append` does, but all of them cost one round trip instead of
        // one each. After a refused join every later script fails its seq check, so nothing
        // past the refusal is written. The scripts are `EVALSHA`s; when the node does not have
        // the script (it restarted, or a replica took over) the first one fails with NOSCRIPT,
        // and every later one either fails so too or fails its seq check (the script was
        // cached meanwhile by another caller, but the first event was not written): nothing is
        // written, and the pipeline is sent again with the first script as an `EVAL`, which
        // caches it on that node for the others.
        let key = channel_key(workspace, channel);
        let mut calls = Vec::with_capacity(events.len());
        let mut seqs = Vec::with_capacity(events.len());
        for event in events {
            let Event::MemberJoined { seq, user, .. } = event else {
                return Err(StoreError::NotAJoin(event.type_name()));
            };
            let event_json = serde_json::to_string(event).map_err(|e| corrupt("event", e))?;
            let mut invocation = self.append.prepare();
            invocation
                .key(&key)
                .key(format!("{key}:log"))
                .key(format!("{key}:msgs"))
                .key(format!("{key}:idem"))
                .key(format!("{key}:idemseq"))
                .key(format!("{key}:members"))
                .key(user_key(workspace, user, "channels"))
                .key(dirty_key(workspace))
                .key(ctl_key(workspace))
                .arg(*seq)
                .arg(event_json)
                .arg(retention.max(1))
                .arg("join")
                .arg(user.as_str())
                .arg(channel.as_str())
                .arg(max_user_channels)
                .arg(self.epoch());
            calls.push(invocation);
            seqs.push(*seq);
        }
        let pipeline = |first_whole: bool| {
            let mut pipe = redis::pipe();
            for (i, call) in calls.iter().enumerate() {
                pipe.add_command(if i == 0 && first_whole {
                    call.eval_cmd()
                } else {
                    call.evalsha_cmd()
                });
            }
            pipe
        };
        let outcomes: Vec<i64> = match pipeline(false).query_async(&mut self.conn()).await {
            Err(e) if is_noscript(&e) => pipeline(true).query_async(&mut self.conn()).await,
            other => other,
        }
        .map_err(|e| self.write_error(e))?;
        for (appended, (outcome, seq)) in outcomes.iter().zip(seqs).enumerate() {
            match *outcome {
                -2 => {}
                -3 => return Ok(appended),
                -1 => return Err(StoreError::NoSuchChannel(channel.clone())),
                last => {
                    return Err(StoreError::SeqConflict {
                        channel: channel.clone(),
                        expected: last.max(0) as u64 + 1,
                        got: seq,
                    })
                }
            }
        }
        if outcomes.len() != events.len() {
            return Err(corrupt("append_joins replies", outcomes.len()));
        }
        Ok(events.len())
    }

    async fn raise_last_seq(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        expected: u64,
        to: u64,
    ) -> StoreResult<()> {
        let outcome: i64 = self
            .raise_last_seq
            .key(channel_key(workspace, channel))
            .key(dirty_key(workspace))
            .key(ctl_key(workspace))
            .arg(expected)
            .arg(to)
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        seq_step_outcome(outcome, channel, to)
    }

    async fn events_after(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        after: u64,
        max: usize,
    ) -> StoreResult<Vec<Event>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // A count beyond isize (or any negative one) means "all" to Redis.
        let count = isize::try_from(max).unwrap_or(-1);
        let raw: Vec<String> = self
            .conn()
            .zrangebyscore_limit(
                format!("{}:log", channel_key(workspace, channel)),
                format!("({after}"),
                "+inf",
                0,
                count,
            )
            .await
            .map_err(redis_error)?;
        raw.iter()
            .map(|e| serde_json::from_str(e).map_err(|e| corrupt("event", e)))
            .collect()
    }

    async fn find_client_msg(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        user: &UserId,
        client_msg_id: &str,
    ) -> StoreResult<Option<(u64, u64)>> {
        let value: Option<String> = self
            .conn()
            .hget(
                format!("{}:idem", channel_key(workspace, channel)),
                format!("{user}/{client_msg_id}"),
            )
            .await
            .map_err(redis_error)?;
        let Some(value) = value else { return Ok(None) };
        let (seq, ts) = value
            .split_once(':')
            .ok_or_else(|| corrupt("idempotency key", &value))?;
        let seq = seq.parse().map_err(|e| corrupt("idempotency seq", e))?;
        let ts = ts.parse().map_err(|e| corrupt("idempotency ts", e))?;
        Ok(Some((seq, ts)))
    }

    async fn message(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<Option<MessageView>> {
        let raw: Vec<String> = self
            .conn()
            .zrangebyscore(
                format!("{}:msgs", channel_key(workspace, channel)),
                seq,
                seq,
            )
            .await
            .map_err(redis_error)?;
        Ok(decode_messages(raw)?.into_iter().next())
    }

    async fn messages(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        query: MessageQuery,
    ) -> StoreResult<Vec<MessageView>> {
        if query.after.saturating_add(1) >= query.before || query.limit == 0 {
            return Ok(Vec::new());
        }
        let key = format!("{}:msgs", channel_key(workspace, channel));
        let low = format!("({}", query.after);
        let high = if query.before == u64::MAX {
            "+inf".to_string()
        } else {
            format!("({}", query.before)
        };
        let mut conn = self.conn();
        let limit = isize::try_from(query.limit).unwrap_or(isize::MAX);
        let raw: Vec<String> = if query.newest_first {
            let mut newest: Vec<String> = conn
                .zrevrangebyscore_limit(&key, &high, &low, 0, limit)
                .await
                .map_err(redis_error)?;
            newest.reverse();
            newest
        } else {
            conn.zrangebyscore_limit(&key, &low, &high, 0, limit)
                .await
                .map_err(redis_error)?
        };
        decode_messages(raw)
    }

    async fn user_channels(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> StoreResult<Vec<ChannelId>> {
        let raw: Vec<String> = self
            .conn()
            .smembers(user_key(workspace, user, "channels"))
            .await
            .map_err(redis_error)?;
        let mut ids: Vec<ChannelId> = parse_ids(raw);
        ids.sort();
        Ok(ids)
    }

    async fn channel_counts(
        &self,
        workspace: &WorkspaceId,
        users: &[UserId],
    ) -> StoreResult<Vec<u64>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.scard(user_key(workspace, user, "channels"));
        }
        pipe.query_async(&mut self.conn())
            .await
            .map_err(redis_error)
    }

    async fn read_markers_in(
        &self,
        workspace: &WorkspaceId,
        channel: &ChannelId,
        users: &[UserId],
    ) -> StoreResult<Vec<u64>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.hget(user_key(workspace, user, "read"), channel.as_str());
        }
        let markers: Vec<Option<u64>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)?;
        Ok(markers.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn read_markers(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
    ) -> StoreResult<HashMap<ChannelId, u64>> {
        let raw: HashMap<String, u64> = self
            .conn()
            .hgetall(user_key(workspace, user, "read"))
            .await
            .map_err(redis_error)?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
            .collect())
    }

    async fn advance_read_marker(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<ReadMarker> {
        let marker: Vec<u64> = self
            .advance_read
            .key(user_key(workspace, user, "read"))
            .key(dirty_key(workspace))
            .key(ctl_key(workspace))
            .arg(channel.as_str())
            .arg(seq)
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        match marker[..] {
            [previous, current] => Ok(ReadMarker { previous, current }),
            [] => Err(StoreError::NoSuchChannel(channel.clone())),
            _ => Err(corrupt("read marker reply", format!("{marker:?}"))),
        }
    }

    async fn workspace_ids(&self) -> StoreResult<Vec<WorkspaceId>> {
        let ids: Vec<String> = self
            .conn()
            .smembers(WORKSPACES)
            .await
            .map_err(redis_error)?;
        let mut ids: Vec<WorkspaceId> = parse_ids(ids);
        ids.sort();
        Ok(ids)
    }

    async fn create_webhook(
        &self,
        workspace: &WorkspaceId,
        hook: &WebhookRecord,
        max_per_user: u64,
    ) -> StoreResult<WebhookCreate> {
        let channels = hook
            .channels
            .as_ref()
            .map_or_else(|| "*".to_string(), |c| join_ids(c));
        let failing = hook
            .state
            .failing_since_ms
            .map(|ms| ms.to_string())
            .unwrap_or_default();
        let disabled = if hook.state.disabled { "1" } else { "0" };
        let fields = [
            ("user", hook.user.as_str().to_string()),
            ("url", hook.url.clone()),
            ("secret", hook.secret.clone()),
            ("events", join_ids(&hook.events)),
            ("channels", channels),
            ("disabled", disabled.to_string()),
            (
                "last_error",
                hook.state.last_error.clone().unwrap_or_default(),
            ),
            ("failing_since", failing),
        ];
        let mut invocation = self.webhook_scripts.create.prepare();
        invocation
            .key(ws_key(workspace, "wh:ids"))
            .key(webhook_key(workspace, &hook.id))
            .key(ws_key(workspace, "wh:count"))
            .key(dirty_key(workspace))
            .key(ctl_key(workspace))
            .arg(&hook.id)
            .arg(hook.user.as_str())
            .arg(max_per_user);
        for (name, value) in &fields {
            invocation.arg(*name).arg(value);
        }
        let outcome: String = invocation
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(match outcome.as_str() {
            "created" => WebhookCreate::Created,
            "too_many" => WebhookCreate::TooMany,
            "unknown_workspace" => WebhookCreate::UnknownWorkspace,
            "id_taken" => WebhookCreate::IdTaken,
            other => return Err(corrupt("create_webhook outcome", other)),
        })
    }

    async fn webhooks(&self, workspace: &WorkspaceId) -> StoreResult<Vec<WebhookRecord>> {
        let mut ids: Vec<String> = self
            .conn()
            .smembers(ws_key(workspace, "wh:ids"))
            .await
            .map_err(redis_error)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(webhook_key(workspace, id));
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)?;
        ids.iter()
            .zip(hashes)
            .filter(|(_, hash)| !hash.is_empty())
            .map(|(id, hash)| webhook_from_hash(id, &hash))
            .collect()
    }

    async fn delete_webhook(&self, workspace: &WorkspaceId, id: &str) -> StoreResult<bool> {
        let key = webhook_key(workspace, id);
        let deleted: i64 = self
            .webhook_scripts
            .delete
            .key(ws_key(workspace, "wh:ids"))
            .key(&key)
            .key(format!("{key}:cursors"))
            .key(ws_key(workspace, "wh:count"))
            .key(dirty_key(workspace))
            .key(ctl_key(workspace))
            .arg(id)
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(deleted == 1)
    }

    async fn set_webhook_state(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        state: &WebhookState,
    ) -> StoreResult<bool> {
        let set: i64 = self
            .webhook_scripts
            .set_state
            .key(webhook_key(workspace, id))
            .key(dirty_key(workspace))
            .key(ctl_key(workspace))
            .arg(if state.disabled { "1" } else { "0" })
            .arg(state.last_error.as_deref().unwrap_or(""))
            .arg(
                state
                    .failing_since_ms
                    .map(|ms| ms.to_string())
                    .unwrap_or_default(),
            )
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(set == 1)
    }

    async fn webhook_cursors(
        &self,
        workspace: &WorkspaceId,
        id: &str,
    ) -> StoreResult<HashMap<ChannelId, u64>> {
        let raw: HashMap<String, String> = self
            .conn()
            .hgetall(format!("{}:cursors", webhook_key(workspace, id)))
            .await
            .map_err(redis_error)?;
        raw.into_iter()
            .map(|(channel, seq)| {
                let channel = channel
                    .parse::<ChannelId>()
                    .map_err(|e| corrupt("cursor channel", e))?;
                let seq = seq.parse::<u64>().map_err(|e| corrupt("cursor", e))?;
                Ok((channel, seq))
            })
            .collect()
    }

    async fn advance_webhook_cursor(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        channel: &ChannelId,
        seq: u64,
    ) -> StoreResult<()> {
        let key = webhook_key(workspace, id);
        let _: i64 = self
            .webhook_scripts
            .advance_cursor
            .key(&key)
            .key(format!("{key}:cursors"))
            .key(dirty_key(workspace))
            .key(ctl_key(workspace))
            .arg(channel.as_str())
            .arg(seq)
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    async fn move_marks(&self) -> StoreResult<Vec<(WorkspaceId, super::MoveMark)>> {
        self.load_move_marks().await
    }

    async fn begin_export(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.start_export(workspace, epoch).await
    }

    async fn export_keys(
        &self,
        workspace: &WorkspaceId,
        start: u64,
    ) -> StoreResult<confab_shared::moves::KeyPage> {
        self.listed_keys(workspace, start).await
    }

    async fn freeze(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.freeze_workspace(workspace, epoch).await
    }

    async fn release(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.release_workspace(workspace, epoch).await
    }

    async fn purge_workspace(&self, workspace: &WorkspaceId) -> StoreResult<()> {
        self.purge_released(workspace).await
    }

    async fn abort_export(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.undo_export(workspace, epoch).await
    }

    async fn begin_import(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.start_import(workspace, epoch).await
    }

    async fn import_keys(
        &self,
        workspace: &WorkspaceId,
        epoch: u64,
        keys: &[confab_shared::moves::KeyDump],
    ) -> StoreResult<()> {
        self.restore_keys(workspace, epoch, keys).await
    }

    async fn commit_import(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.finish_import(workspace, epoch).await
    }

    async fn abort_import(&self, workspace: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.undo_import(workspace, epoch).await
    }
}
