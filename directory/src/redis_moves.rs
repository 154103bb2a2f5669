//! The Redis directory's records of moves and of the workspace list (see [`crate::moves`]).
//!
//! Keys: `confab:move:{WS}` (JSON [`MoveRecord`]), in the workspace's slot next to its record
//! `confab:ws:{WS}`, and `confab:move_epoch` (the epoch counter, a slot of its own). The switch
//! is one script that checks the move's epoch and the workspace's current cell, moves the
//! workspace, marks the move switched and publishes the change; on a single Redis the same
//! script moves the placement and the counts, on a cluster they follow (another slot) and the
//! move's end places the workspace once more, which repairs a placement a failure left behind.

use std::sync::LazyLock;

use confab_shared::{CellId, WorkspaceId};
use redis::AsyncCommands;

use crate::directory::WorkspaceRecord;
use crate::moves::{MoveBegun, MovePhase, MoveRecord};
use crate::redis_conn::Lua;
use crate::redis_engine::{
    engine_error, keys, message_id, place_fn, RedisDirectory, DIRECTORY_CHANNEL,
};
use crate::EngineError;

/// Keys read per `SCAN` step when listing.
const SCAN_COUNT: usize = 500;

/// KEYS = move, workspace, then (on a single Redis) the epoch counter; ARGV = record JSON
/// without epoch, then (on a cluster) the epoch taken from the counter beforehand. Returns
/// {'started', json}, {'busy', json} or {'unknown'}.
static BEGIN_MOVE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('EXISTS', KEYS[2]) == 0 then return {'unknown'} end
local existing = redis.call('GET', KEYS[1])
if existing then return {'busy', existing} end
local record = cjson.decode(ARGV[1])
if KEYS[3] then
  record['epoch'] = redis.call('INCR', KEYS[3])
else
  record['epoch'] = tonumber(ARGV[2])
end
local json = cjson.encode(record)
redis.call('SET', KEYS[1], json)
return {'started', json}
",
    )
});

/// KEYS = move; ARGV = epoch, phase, lease. Returns 1 when updated; an `undoing` move stays so.
static UPDATE_MOVE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local record = cjson.decode(raw)
if tostring(record['epoch']) ~= ARGV[1] then return 0 end
if record['phase'] == 'undoing' and ARGV[2] ~= 'undoing' then return 0 end
record['phase'] = ARGV[2]
record['lease_until_ms'] = tonumber(ARGV[3])
redis.call('SET', KEYS[1], cjson.encode(record))
return 1
",
    )
});

/// KEYS = move, workspace, then (on a single Redis) placement and counts; ARGV = epoch,
/// directory channel, message id. Returns 1 when switched; only a `frozen` move switches.
static SWITCH_MOVE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(concat!(
        place_fn!(),
        r"
local raw = redis.call('GET', KEYS[1])
local ws_raw = redis.call('GET', KEYS[2])
if not raw or not ws_raw then return 0 end
local record = cjson.decode(raw)
if tostring(record['epoch']) ~= ARGV[1] or record['phase'] ~= 'frozen' then return 0 end
local ws = cjson.decode(ws_raw)
if ws['cell'] ~= record['from'] then return 0 end
ws['cell'] = record['to']
ws['region'] = record['to_region']
redis.call('SET', KEYS[2], cjson.encode(ws))
if KEYS[3] then place(KEYS[3], KEYS[4], record['workspace'], record['to']) end
record['phase'] = 'switched'
redis.call('SET', KEYS[1], cjson.encode(record))
redis.call('PUBLISH', ARGV[2], cjson.encode({kind = 'moved', workspace = record['workspace'], cell = record['to'], id = ARGV[3]}))
return 1
"
    ))
});

/// KEYS = move; ARGV = epoch.
static END_MOVE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
if tostring(cjson.decode(raw)['epoch']) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
",
    )
});

fn parse_record(raw: &str) -> Result<MoveRecord, EngineError> {
    serde_json::from_str(raw).map_err(|e| EngineError(format!("bad move record: {e}")))
}

fn phase_name(phase: MovePhase) -> &'static str {
    match phase {
        MovePhase::Copying => "copying",
        MovePhase::Frozen => "frozen",
        MovePhase::Switched => "switched",
        MovePhase::Undoing => "undoing",
    }
}

impl RedisDirectory {
    /// Every key matching `pattern`, from every master of a cluster.
    async fn scan_keys(&self, pattern: &str) -> Result<Vec<String>, EngineError> {
        self.conn()
            .scan_all(pattern, SCAN_COUNT)
            .await
            .map_err(engine_error)
    }

    /// The values of `keys` (`MGET`, split by slot on a cluster), in batches.
    async fn get_all(&self, keys: &[String]) -> Result<Vec<String>, EngineError> {
        let mut values = Vec::with_capacity(keys.len());
        for batch in keys.chunks(SCAN_COUNT) {
            let raws: Vec<Option<String>> = redis::cmd("MGET")
                .arg(batch)
                .query_async(&mut self.conn())
                .await
                .map_err(engine_error)?;
            values.extend(raws.into_iter().flatten());
        }
        Ok(values)
    }

    pub(crate) async fn set_draining(
        &self,
        id: &CellId,
        draining: bool,
    ) -> Result<bool, EngineError> {
        let mut conn = self.conn();
        let known: bool = conn
            .sismember(keys::CELLS, id.as_str())
            .await
            .map_err(engine_error)?;
        if !known {
            return Ok(false);
        }
        let flag = if draining { "1" } else { "0" };
        conn.hset::<_, _, _, ()>(keys::cell(id), "draining", flag)
            .await
            .map_err(engine_error)?;
        self.announce_cell(id).await?;
        Ok(true)
    }

    pub(crate) async fn all_workspaces(&self) -> Result<Vec<WorkspaceRecord>, EngineError> {
        let keys = self.scan_keys("confab:ws:*").await?;
        let mut records = Vec::with_capacity(keys.len());
        for raw in self.get_all(&keys).await? {
            match serde_json::from_str::<WorkspaceRecord>(&raw) {
                Ok(record) => records.push(record),
                Err(e) => tracing::warn!(error = %e, "skipping a bad workspace record"),
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    pub(crate) async fn record_move(&self, record: MoveRecord) -> Result<MoveBegun, EngineError> {
        let json = serde_json::to_string(&record).unwrap_or_default();
        let mut call = BEGIN_MOVE.key(keys::move_record(&record.workspace));
        call.key(keys::workspace(&record.workspace)).arg(json);
        if self.placement_inline() {
            call.key(keys::MOVE_EPOCH);
        } else {
            // Another slot: the epoch is taken first (one that a busy or unknown answer
            // leaves unused is never used; epochs only need to be unique and growing).
            let epoch: u64 = self
                .conn()
                .incr(keys::MOVE_EPOCH, 1)
                .await
                .map_err(engine_error)?;
            call.arg(epoch);
        }
        let reply: Vec<String> = call.invoke(&mut self.conn()).await.map_err(engine_error)?;
        match reply.as_slice() {
            [kind, json] if kind == "started" => Ok(MoveBegun::Started(parse_record(json)?)),
            [kind, json] if kind == "busy" => Ok(MoveBegun::Busy(parse_record(json)?)),
            _ => Ok(MoveBegun::UnknownWorkspace),
        }
    }

    pub(crate) async fn read_move(
        &self,
        ws: &WorkspaceId,
    ) -> Result<Option<MoveRecord>, EngineError> {
        let raw: Option<String> = self
            .conn()
            .get(keys::move_record(ws))
            .await
            .map_err(engine_error)?;
        raw.map(|raw| parse_record(&raw)).transpose()
    }

    pub(crate) async fn all_moves(&self) -> Result<Vec<MoveRecord>, EngineError> {
        let keys = self.scan_keys("confab:move:*").await?;
        Ok(self
            .get_all(&keys)
            .await?
            .iter()
            .filter_map(|raw| parse_record(raw).ok())
            .collect())
    }

    pub(crate) async fn set_move_phase(
        &self,
        ws: &WorkspaceId,
        epoch: u64,
        phase: MovePhase,
        lease_until_ms: u64,
    ) -> Result<bool, EngineError> {
        let updated: i64 = UPDATE_MOVE
            .key(keys::move_record(ws))
            .arg(epoch)
            .arg(phase_name(phase))
            .arg(lease_until_ms)
            .invoke(&mut self.conn())
            .await
            .map_err(engine_error)?;
        Ok(updated == 1)
    }

    pub(crate) async fn switch(&self, ws: &WorkspaceId, epoch: u64) -> Result<bool, EngineError> {
        let mut call = SWITCH_MOVE.key(keys::move_record(ws));
        call.key(keys::workspace(ws));
        self.with_placement(&mut call);
        let switched: i64 = call
            .arg(epoch)
            .arg(DIRECTORY_CHANNEL)
            .arg(message_id())
            .invoke(&mut self.conn())
            .await
            .map_err(engine_error)?;
        if switched == 1 && !self.placement_inline() {
            if let Some(record) = self.workspace_record(ws).await {
                self.place_after(ws, Some(&record.cell)).await;
            }
        }
        Ok(switched == 1)
    }

    pub(crate) async fn forget_move(
        &self,
        ws: &WorkspaceId,
        epoch: u64,
    ) -> Result<(), EngineError> {
        END_MOVE
            .key(keys::move_record(ws))
            .arg(epoch)
            .invoke::<i64>(&mut self.conn())
            .await
            .map_err(engine_error)?;
        // On a cluster, the placement of a switch that failed halfway is repaired here (a
        // no-op when it is right).
        if !self.placement_inline() {
            if let Some(record) = self.workspace_record(ws).await {
                self.place_after(ws, Some(&record.cell)).await;
            }
        }
        Ok(())
    }

    /// The workspace's record, `None` when it is gone or unreadable (logged).
    async fn workspace_record(&self, ws: &WorkspaceId) -> Option<WorkspaceRecord> {
        let raw: Result<Option<String>, _> = self.conn().get(keys::workspace(ws)).await;
        match raw {
            Ok(raw) => raw.and_then(|raw| serde_json::from_str(&raw).ok()),
            Err(e) => {
                tracing::warn!(workspace = %ws, error = %engine_error(e), "workspace record not read");
                None
            }
        }
    }
}
