//! The Redis directory's records of moves and of the workspace list (see [`crate::moves`]).
//!
//! Keys: `confab:move:{ws}` (JSON [`MoveRecord`]), `confab:move_epoch` (the epoch counter).
//! The switch is one script that checks the move's epoch and the workspace's current cell,
//! moves the workspace and its cell counts, marks the move switched and publishes the change.

use std::sync::LazyLock;

use confab_shared::{CellId, WorkspaceId};
use redis::{AsyncCommands, Script};

use crate::directory::WorkspaceRecord;
use crate::moves::{MoveBegun, MovePhase, MoveRecord};
use crate::redis_engine::{engine_error, RedisDirectory, CELL_WORKSPACES_KEY, DIRECTORY_CHANNEL};
use crate::EngineError;

const MOVE_EPOCH_KEY: &str = "confab:move_epoch";
/// Keys read per `SCAN` step when listing.
const SCAN_COUNT: usize = 500;

fn move_key(ws: &WorkspaceId) -> String {
    format!("confab:move:{ws}")
}

fn workspace_key(ws: &WorkspaceId) -> String {
    format!("confab:ws:{ws}")
}

/// KEYS = move, workspace, epoch counter; ARGV = record JSON without epoch. Returns
/// {'started', json}, {'busy', json} or {'unknown'}.
static BEGIN_MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[2]) == 0 then return {'unknown'} end
local existing = redis.call('GET', KEYS[1])
if existing then return {'busy', existing} end
local record = cjson.decode(ARGV[1])
record['epoch'] = redis.call('INCR', KEYS[3])
local json = cjson.encode(record)
redis.call('SET', KEYS[1], json)
return {'started', json}
",
    )
});

/// KEYS = move; ARGV = epoch, phase, lease. Returns 1 when updated; an `undoing` move stays so.
static UPDATE_MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
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

/// KEYS = move, workspace, cell counts; ARGV = epoch, directory channel. Returns 1 when
/// switched; only a `frozen` move switches.
static SWITCH_MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local raw = redis.call('GET', KEYS[1])
local ws_raw = redis.call('GET', KEYS[2])
if not raw or not ws_raw then return 0 end
local record = cjson.decode(raw)
if tostring(record['epoch']) ~= ARGV[1] or record['phase'] ~= 'frozen' then return 0 end
local ws = cjson.decode(ws_raw)
if ws['cell'] ~= record['from'] then return 0 end
redis.call('HINCRBY', KEYS[3], ws['cell'], -1)
ws['cell'] = record['to']
ws['region'] = record['to_region']
redis.call('SET', KEYS[2], cjson.encode(ws))
redis.call('HINCRBY', KEYS[3], record['to'], 1)
record['phase'] = 'switched'
redis.call('SET', KEYS[1], cjson.encode(record))
redis.call('PUBLISH', ARGV[2], cjson.encode({kind = 'moved', workspace = record['workspace'], cell = record['to']}))
return 1
",
    )
});

/// KEYS = move; ARGV = epoch.
static END_MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
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
    /// Every key matching `pattern`.
    async fn scan_keys(&self, pattern: &str) -> Result<Vec<String>, EngineError> {
        let mut conn = self.conn();
        let mut all = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await
                .map_err(engine_error)?;
            all.extend(keys);
            if next == 0 {
                return Ok(all);
            }
            cursor = next;
        }
    }

    pub(crate) async fn set_draining(
        &self,
        id: &CellId,
        draining: bool,
    ) -> Result<bool, EngineError> {
        let mut conn = self.conn();
        let known: bool = conn
            .sismember("confab:cells", id.as_str())
            .await
            .map_err(engine_error)?;
        if !known {
            return Ok(false);
        }
        let flag = if draining { "1" } else { "0" };
        conn.hset::<_, _, _, ()>(format!("confab:cell:{id}"), "draining", flag)
            .await
            .map_err(engine_error)?;
        self.announce_cell(id).await?;
        Ok(true)
    }

    pub(crate) async fn all_workspaces(&self) -> Result<Vec<WorkspaceRecord>, EngineError> {
        let keys = self.scan_keys("confab:ws:*").await?;
        let mut records = Vec::with_capacity(keys.len());
        for batch in keys.chunks(SCAN_COUNT) {
            let raws: Vec<Option<String>> = redis::cmd("MGET")
                .arg(batch)
                .query_async(&mut self.conn())
                .await
                .map_err(engine_error)?;
            for raw in raws.into_iter().flatten() {
                match serde_json::from_str::<WorkspaceRecord>(&raw) {
                    Ok(record) => records.push(record),
                    Err(e) => tracing::warn!(error = %e, "skipping a bad workspace record"),
                }
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    pub(crate) async fn record_move(&self, record: MoveRecord) -> Result<MoveBegun, EngineError> {
        let json = serde_json::to_string(&record).unwrap_or_default();
        let reply: Vec<String> = BEGIN_MOVE
            .key(move_key(&record.workspace))
            .key(workspace_key(&record.workspace))
            .key(MOVE_EPOCH_KEY)
            .arg(json)
            .invoke_async(&mut self.conn())
            .await
            .map_err(engine_error)?;
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
        let raw: Option<String> = self.conn().get(move_key(ws)).await.map_err(engine_error)?;
        raw.map(|raw| parse_record(&raw)).transpose()
    }

    pub(crate) async fn all_moves(&self) -> Result<Vec<MoveRecord>, EngineError> {
        let keys = self.scan_keys("confab:move:*").await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raws: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await
            .map_err(engine_error)?;
        Ok(raws
            .into_iter()
            .flatten()
            .filter_map(|raw| parse_record(&raw).ok())
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
            .key(move_key(ws))
            .arg(epoch)
            .arg(phase_name(phase))
            .arg(lease_until_ms)
            .invoke_async(&mut self.conn())
            .await
            .map_err(engine_error)?;
        Ok(updated == 1)
    }

    pub(crate) async fn switch(&self, ws: &WorkspaceId, epoch: u64) -> Result<bool, EngineError> {
        let switched: i64 = SWITCH_MOVE
            .key(move_key(ws))
            .key(workspace_key(ws))
            .key(CELL_WORKSPACES_KEY)
            .arg(epoch)
            .arg(DIRECTORY_CHANNEL)
            .invoke_async(&mut self.conn())
            .await
            .map_err(engine_error)?;
        Ok(switched == 1)
    }

    pub(crate) async fn forget_move(
        &self,
        ws: &WorkspaceId,
        epoch: u64,
    ) -> Result<(), EngineError> {
        END_MOVE
            .key(move_key(ws))
            .arg(epoch)
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map_err(engine_error)?;
        Ok(())
    }
}
