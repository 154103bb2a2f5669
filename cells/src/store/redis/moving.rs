//! The Redis engine's side of a live workspace move: marks, the key list an export pages over,
//! `DUMP` on the source and `RESTORE` on the target.
//!
//! The copy is by key, not by record type: every key under the workspace's prefix
//! (`confab:cs:{W}:`, all in the slot of the hash tag `{W}`) travels as Redis serialized it, so keys that other features add under
//! that prefix (webhooks and their deliveries) move too without this module knowing them.
//! Every write of a workspace key goes through a fenced script, whose guard records the key in
//! the workspace's dirty set while the workspace is `copying`; the final copy, frozen, takes
//! exactly those keys. The workspace's mark is in its `.ctl` hash, its dirty set and export
//! list beside it, all in the same slot; in a cluster, the key list is a `SCAN` of the master
//! that holds that slot.

use std::sync::LazyLock;

use confab_directory::redis_conn::Lua;
use confab_shared::moves::{key_prefix, KeyDump, KeyPage, MAX_PAGE_BYTES, MAX_PAGE_KEYS};
use confab_shared::WorkspaceId;
use futures_util::{StreamExt, TryStreamExt};
use redis::AsyncCommands;

use super::{
    ctl_key, dirty_key, parse_ids, redis_error, ws_side_key, RedisConn, RedisStore,
    CTL_CONCURRENCY, KNOWN,
};
use crate::store::{MoveMark, StoreError, StoreResult};

/// Keys dumped per round trip while a page fills.
const DUMP_BATCH: usize = 32;
/// Keys listed or deleted per `SCAN` step.
const SCAN_COUNT: usize = 500;

fn export_key(ws: &WorkspaceId) -> String {
    ws_side_key(ws, "export")
}

/// The first lines of every move script: the last key is the workspace's `.ctl`, the last
/// argument the cell process's epoch, which the workspace's fence must hold (a workspace
/// without a `.ctl` has none yet); `mark` and `served` are read for the script.
const MOVE_GUARD: &str = r"
local ctl = KEYS[#KEYS]
local guard = redis.call('HMGET', ctl, 'fence', 'mark', 'served')
if guard[1] and guard[1] ~= ARGV[#ARGV] then
  return redis.error_reply('FENCED the store is claimed by epoch ' .. guard[1] .. ', not ' .. ARGV[#ARGV])
end
local mark = guard[2]
local served = guard[3] == '1'
";

fn script(body: &str) -> Lua {
    Lua::new(format!("{MOVE_GUARD}{body}"))
}

/// KEYS = dirty, export, ctl; ARGV = epoch, cell epoch. A `copying` mark of another epoch (an
/// abandoned attempt) is taken over; any other mark refuses.
static BEGIN_EXPORT: LazyLock<Lua> = LazyLock::new(|| {
    script(
        r"
if not served then return 'unknown' end
if mark and string.match(mark, '^(%a+)') ~= 'copying' then return mark end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', ctl, 'mark', 'copying:' .. ARGV[1])
return 'ok'
",
    )
});

/// KEYS = dirty, export, ctl; ARGV = epoch, cell epoch. Lists the dirty keys.
static FREEZE: LazyLock<Lua> = LazyLock::new(|| {
    script(
        r"
if mark ~= 'copying:' .. ARGV[1] and mark ~= 'frozen:' .. ARGV[1] then return mark or 'none' end
redis.call('HSET', ctl, 'mark', 'frozen:' .. ARGV[1])
redis.call('DEL', KEYS[2])
local dirty = redis.call('SMEMBERS', KEYS[1])
for i = 1, #dirty, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(dirty, i, math.min(i + 999, #dirty)))
end
return 'ok'
",
    )
});

/// KEYS = dirty, export, ctl; ARGV = epoch, cell epoch.
static RELEASE: LazyLock<Lua> = LazyLock::new(|| {
    script(
        r"
if mark ~= 'frozen:' .. ARGV[1] and mark ~= 'gone:' .. ARGV[1] then return mark or 'none' end
redis.call('HSET', ctl, 'mark', 'gone:' .. ARGV[1])
redis.call('HDEL', ctl, 'served')
redis.call('DEL', KEYS[1], KEYS[2])
return 'ok'
",
    )
});

/// KEYS = dirty, export, ctl; ARGV = epoch, cell epoch.
static ABORT_EXPORT: LazyLock<Lua> = LazyLock::new(|| {
    script(
        r"
if not mark then return 'ok' end
if mark ~= 'copying:' .. ARGV[1] and mark ~= 'frozen:' .. ARGV[1] then return mark end
redis.call('HDEL', ctl, 'mark')
redis.call('DEL', KEYS[1], KEYS[2])
return 'ok'
",
    )
});

/// KEYS = ctl; ARGV = epoch, cell epoch. A workspace seen for the first time takes the cell
/// epoch as its fence: the caller enrolled it first.
static BEGIN_IMPORT: LazyLock<Lua> = LazyLock::new(|| {
    script(
        r"
if served then return 'serving' end
redis.call('HSET', ctl, 'fence', ARGV[#ARGV], 'mark', 'incoming:' .. ARGV[1])
return 'ok'
",
    )
});

/// KEYS = the page's keys, then ctl; ARGV = epoch, then a value (empty: no key) and a ttl per
/// key, then the cell epoch.
static RESTORE: LazyLock<Lua> = LazyLock::new(|| {
    script(
        r"
if mark ~= 'incoming:' .. ARGV[1] then return mark or 'none' end
for i = 1, #KEYS - 1 do
  local value = ARGV[2 + (i - 1) * 2]
  local ttl = ARGV[3 + (i - 1) * 2]
  if value == '' then
    redis.call('DEL', KEYS[i])
  else
    redis.call('RESTORE', KEYS[i], ttl, value, 'REPLACE')
  end
end
return 'ok'
",
    )
});

/// KEYS = ctl; ARGV = epoch, cell epoch.
static FINISH_IMPORT: LazyLock<Lua> = LazyLock::new(|| {
    script(
        r"
if not mark and served then return 'ok' end
if mark ~= 'incoming:' .. ARGV[1] then return mark or 'none' end
redis.call('HSET', ctl, 'served', '1')
redis.call('HDEL', ctl, 'mark')
return 'ok'
",
    )
});

/// KEYS = ctl; ARGV = epoch, cell epoch. Also undoes a commit: the gateway asks only when the
/// directory did not switch to this cell.
static UNDO_IMPORT: LazyLock<Lua> = LazyLock::new(|| {
    script(
        r"
if mark and mark ~= 'incoming:' .. ARGV[1] then return mark end
redis.call('HDEL', ctl, 'mark', 'served')
return 'ok'
",
    )
});

fn parse_mark(raw: &str) -> Option<MoveMark> {
    let (state, epoch) = raw.split_once(':')?;
    let epoch = epoch.parse().ok()?;
    Some(match state {
        "copying" => MoveMark::Copying(epoch),
        "frozen" => MoveMark::Frozen(epoch),
        "gone" => MoveMark::Gone(epoch),
        "incoming" => MoveMark::Incoming(epoch),
        _ => return None,
    })
}

/// A script's answer: `ok`, or the mark (or condition) that refused the step.
fn step_outcome(ws: &WorkspaceId, step: &str, outcome: String) -> StoreResult<()> {
    if outcome == "ok" {
        return Ok(());
    }
    Err(StoreError::MoveRefused(format!(
        "{step} of workspace {ws}: the store has it {outcome}"
    )))
}

impl RedisStore {
    /// Every workspace's move mark: the `mark` of each known workspace's `.ctl`.
    pub(super) async fn load_move_marks(&self) -> StoreResult<Vec<(WorkspaceId, MoveMark)>> {
        let known: Vec<String> = self.conn().smembers(KNOWN).await.map_err(redis_error)?;
        let known: Vec<WorkspaceId> = parse_ids(known);
        let marks: Vec<Option<(WorkspaceId, MoveMark)>> = futures_util::stream::iter(known)
            .map(|ws| async move {
                let mark = self.mark(&ws).await?;
                Ok::<_, StoreError>(mark.map(|mark| (ws, mark)))
            })
            .buffer_unordered(CTL_CONCURRENCY)
            .try_collect()
            .await?;
        let mut marks: Vec<(WorkspaceId, MoveMark)> = marks.into_iter().flatten().collect();
        marks.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(marks)
    }

    async fn mark(&self, ws: &WorkspaceId) -> StoreResult<Option<MoveMark>> {
        let mark: Option<String> = self
            .conn()
            .hget(ctl_key(ws), "mark")
            .await
            .map_err(redis_error)?;
        Ok(mark.as_deref().and_then(parse_mark))
    }

    async fn run_step(
        &self,
        ws: &WorkspaceId,
        step: &str,
        script: &Lua,
        keys: &[&str],
        epoch: u64,
    ) -> StoreResult<()> {
        let mut invocation = script.prepare();
        for key in keys {
            invocation.key(*key);
        }
        let outcome: String = invocation
            .key(ctl_key(ws))
            .arg(epoch)
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        step_outcome(ws, step, outcome)
    }

    pub(super) async fn start_export(&self, ws: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        let (dirty, export) = (dirty_key(ws), export_key(ws));
        let keys = [dirty.as_str(), export.as_str()];
        self.run_step(ws, "export", &BEGIN_EXPORT, &keys, epoch)
            .await?;
        // Listed after the mark: a key created meanwhile is in the dirty set as well, which
        // only copies it twice.
        let mut conn = self.conn();
        let pattern = format!("{}*", key_prefix(ws));
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = scan_step(&mut conn, ws, &pattern, cursor).await?;
            if !keys.is_empty() {
                conn.rpush::<_, _, ()>(&export, keys)
                    .await
                    .map_err(redis_error)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// A page of the export list from `start`: at most [`MAX_PAGE_KEYS`] keys and, but for a
    /// single larger key, [`MAX_PAGE_BYTES`] of values.
    pub(super) async fn listed_keys(&self, ws: &WorkspaceId, start: u64) -> StoreResult<KeyPage> {
        let mut conn = self.conn();
        let export = export_key(ws);
        let first = isize::try_from(start).unwrap_or(isize::MAX);
        let last = first.saturating_add(MAX_PAGE_KEYS as isize - 1);
        let (listed, total): (Vec<String>, u64) = redis::pipe()
            .lrange(&export, first, last)
            .llen(&export)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        // Only keys under the workspace's prefix are dumped: anything else in the list (which
        // only a foreign writer could put there) would name another slot, or another
        // workspace.
        let prefix = key_prefix(ws);
        if let Some(foreign) = listed.iter().find(|k| !k.starts_with(&prefix)) {
            return Err(StoreError::Corrupt(format!(
                "export list of workspace {ws} names key {foreign:?}"
            )));
        }
        let mut keys = Vec::with_capacity(listed.len());
        let mut bytes = 0usize;
        for batch in listed.chunks(DUMP_BATCH) {
            if bytes >= MAX_PAGE_BYTES {
                break;
            }
            let mut pipe = redis::pipe();
            for key in batch {
                pipe.cmd("DUMP").arg(key).cmd("PTTL").arg(key);
            }
            let replies: Vec<redis::Value> =
                pipe.query_async(&mut conn).await.map_err(redis_error)?;
            for (key, pair) in batch.iter().zip(replies.chunks(2)) {
                let dump: Option<Vec<u8>> = pair
                    .first()
                    .map(redis::from_redis_value_ref::<Option<Vec<u8>>>)
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(format!("dump reply: {e}")))?
                    .flatten();
                let ttl: i64 = pair
                    .get(1)
                    .map(redis::from_redis_value_ref::<i64>)
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(format!("pttl reply: {e}")))?
                    .unwrap_or(-1);
                bytes += dump.as_ref().map_or(0, Vec::len);
                keys.push(KeyDump {
                    key: key.clone(),
                    dump,
                    ttl_ms: u64::try_from(ttl).unwrap_or(0),
                });
            }
        }
        let end = start + keys.len() as u64;
        Ok(KeyPage {
            keys,
            next: (end < total).then_some(end),
        })
    }

    pub(super) async fn freeze_workspace(&self, ws: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        let (dirty, export) = (dirty_key(ws), export_key(ws));
        let keys = [dirty.as_str(), export.as_str()];
        self.run_step(ws, "freeze", &FREEZE, &keys, epoch).await
    }

    pub(super) async fn release_workspace(&self, ws: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        let (dirty, export) = (dirty_key(ws), export_key(ws));
        let keys = [dirty.as_str(), export.as_str()];
        self.run_step(ws, "release", &RELEASE, &keys, epoch).await?;
        // A failure here fails the step; the gateway's retry finds the workspace `gone` of
        // this epoch and tries again.
        self.update_index("rem", &[ws.as_str()], self.epoch()).await
    }

    /// Deletes a released workspace's keys, if it is still `gone` (it may have come back).
    pub(super) async fn purge_released(&self, ws: &WorkspaceId) -> StoreResult<()> {
        match self.mark(ws).await? {
            Some(MoveMark::Gone(_)) => self.purge(ws).await,
            _ => Ok(()),
        }
    }

    pub(super) async fn undo_export(&self, ws: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        let (dirty, export) = (dirty_key(ws), export_key(ws));
        let keys = [dirty.as_str(), export.as_str()];
        self.run_step(ws, "abort", &ABORT_EXPORT, &keys, epoch)
            .await
    }

    pub(super) async fn start_import(&self, ws: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.enroll(ws, self.epoch()).await?;
        self.run_step(ws, "import", &BEGIN_IMPORT, &[], epoch)
            .await?;
        self.purge(ws).await
    }

    pub(super) async fn restore_keys(
        &self,
        ws: &WorkspaceId,
        epoch: u64,
        keys: &[KeyDump],
    ) -> StoreResult<()> {
        let prefix = key_prefix(ws);
        if let Some(foreign) = keys.iter().find(|k| !k.key.starts_with(&prefix)) {
            return Err(StoreError::MoveRefused(format!(
                "key {:?} is not a key of workspace {ws}",
                foreign.key
            )));
        }
        if keys.is_empty() {
            return Ok(());
        }
        let mut invocation = RESTORE.prepare();
        for key in keys {
            invocation.key(&key.key);
        }
        invocation.key(ctl_key(ws)).arg(epoch);
        for key in keys {
            match &key.dump {
                Some(dump) => invocation.arg(dump.as_slice()),
                None => invocation.arg(""),
            };
            invocation.arg(key.ttl_ms);
        }
        let outcome: String = invocation
            .arg(self.epoch())
            .invoke(&mut self.conn())
            .await
            .map_err(|e| self.write_error(e))?;
        step_outcome(ws, "import page", outcome)
    }

    pub(super) async fn finish_import(&self, ws: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.run_step(ws, "commit", &FINISH_IMPORT, &[], epoch)
            .await?;
        // As for a release: a retry of the step finds it committed and indexes it again.
        self.update_index("add", &[ws.as_str()], self.epoch()).await
    }

    pub(super) async fn undo_import(&self, ws: &WorkspaceId, epoch: u64) -> StoreResult<()> {
        self.run_step(ws, "import abort", &UNDO_IMPORT, &[], epoch)
            .await?;
        self.update_index("rem", &[ws.as_str()], self.epoch())
            .await?;
        self.purge(ws).await
    }

    /// Deletes every key under the workspace's prefix. Called only while the store refuses
    /// writes of the workspace (`gone` or `incoming`), so nothing is written behind it.
    async fn purge(&self, ws: &WorkspaceId) -> StoreResult<()> {
        let mut conn = self.conn();
        let pattern = format!("{}*", key_prefix(ws));
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = scan_step(&mut conn, ws, &pattern, cursor).await?;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(redis_error)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// One step of a `SCAN` over the keys of `ws` matching `pattern`, on the node that holds the
/// workspace's slot: the next cursor (0 once the scan is through) and the keys of this step
/// (possibly none).
async fn scan_step(
    conn: &mut RedisConn,
    ws: &WorkspaceId,
    pattern: &str,
    cursor: u64,
) -> StoreResult<(u64, Vec<String>)> {
    conn.scan_slot(&ctl_key(ws), pattern, cursor, SCAN_COUNT)
        .await
        .map_err(redis_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_back_with_their_epoch() {
        assert_eq!(parse_mark("frozen:7"), Some(MoveMark::Frozen(7)));
        assert_eq!(parse_mark("incoming:1"), Some(MoveMark::Incoming(1)));
        assert_eq!(parse_mark("gone:x"), None);
        assert_eq!(parse_mark("other:1"), None);
    }
}
