//! The store's earlier key layout, before hash tags: its retirement and the migration of its
//! data, by the first claim of a process that uses the hash-tagged one.
//!
//! The earlier layout kept a workspace `W`'s keys under `confab:cs:W:` and the cell-wide ones
//! at `confab:cs:fence`, `confab:cs:workspaces` (served workspaces) and `confab:cs:moves`
//! (hash workspace → move mark). Its scripts named keys of several slots, so it only ever ran
//! on a single Redis.
//!
//! Every claim first replaces `confab:cs:fence` by [`RETIRED`], a value that no epoch equals
//! and that is no number: a process of an earlier version still running has its next write
//! refused (`FENCED`), and one started later cannot read the fence nor claim the store, so it
//! never serves (it keeps logging that it cannot claim the store). The same script refuses the
//! claim, changing nothing, when an earlier process holds a newer epoch, or when a workspace
//! is in the middle of a move (`copying`, `frozen` or `incoming`): its dirty keys and export
//! list name keys of the earlier layout, so such a store is left for the earlier version to
//! finish or abort the move.
//!
//! Then, on a single Redis holding earlier data, each workspace is enrolled, its keys renamed
//! into the new layout (a workspace `gone` has its leftover keys deleted instead, as the
//! earlier release would have) and its `.ctl` written (fence, served, mark), and only then are
//! the earlier index and marks deleted: a claim that fails half-way is resumed by the next one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;

use confab_directory::redis_conn::Lua;
use confab_shared::moves::key_prefix;
use confab_shared::WorkspaceId;
use redis::AsyncCommands;

use super::{ctl_key, redis_error, RedisStore};
use crate::store::{StoreError, StoreResult};

const OLD_FENCE: &str = "confab:cs:fence";
const OLD_WORKSPACES: &str = "confab:cs:workspaces";
const OLD_MOVES: &str = "confab:cs:moves";
/// What `confab:cs:fence` holds once a process of the hash-tagged layout claimed the store.
pub(super) const RETIRED: &str =
    "retired: the store has the hash-tagged layout (confab:cs:{.cell}:fence) of a newer confab";
/// Keys renamed per script.
const RENAME_BATCH: usize = 256;
const SCAN_COUNT: usize = 500;

/// KEYS = old fence, and on a single Redis old workspaces and old moves; ARGV = epoch,
/// [`RETIRED`]. Returns `{'ok'}`, `{'newer', epoch}` or `{'moving', workspace, mark}`.
static RETIRE: LazyLock<Lua> = LazyLock::new(|| Lua::new(RETIRE_LUA));
const RETIRE_LUA: &str = r"
local old = redis.call('GET', KEYS[1])
if old and tonumber(old) and tonumber(old) >= tonumber(ARGV[1]) then return {'newer', old} end
if #KEYS == 3 then
  local marks = redis.call('HGETALL', KEYS[3])
  for i = 1, #marks, 2 do
    if string.match(marks[i + 1], '^(%a+)') ~= 'gone' then
      return {'moving', marks[i], marks[i + 1]}
    end
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return {'ok'}
";

/// Renames a batch of a workspace's keys: KEYS = n old names, their n new names, then the
/// workspace's `.ctl`; ARGV = epoch. The workspace's fence is raised to the epoch (a newer one
/// refuses: another claim took over).
static RENAME: LazyLock<Lua> = LazyLock::new(|| Lua::new(RENAME_LUA));
const RENAME_LUA: &str = r"
local ctl = KEYS[#KEYS]
local fence = redis.call('HGET', ctl, 'fence')
if fence and tonumber(fence) > tonumber(ARGV[1]) then
  return redis.error_reply('FENCED workspace claimed by epoch ' .. fence .. ', not ' .. ARGV[1])
end
redis.call('HSET', ctl, 'fence', ARGV[1])
local n = (#KEYS - 1) / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[n + i]) end
end
return n
";

/// Writes a migrated workspace's `.ctl`: KEYS = ctl; ARGV = served (`1` or ``), mark or ``,
/// epoch.
static CONTROL: LazyLock<Lua> = LazyLock::new(|| Lua::new(CONTROL_LUA));
const CONTROL_LUA: &str = r"
local fence = redis.call('HGET', KEYS[1], 'fence')
if fence and tonumber(fence) > tonumber(ARGV[3]) then
  return redis.error_reply('FENCED workspace claimed by epoch ' .. fence .. ', not ' .. ARGV[3])
end
redis.call('HSET', KEYS[1], 'fence', ARGV[3])
if ARGV[1] == '1' then redis.call('HSET', KEYS[1], 'served', '1') else redis.call('HDEL', KEYS[1], 'served') end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'mark', ARGV[2]) else redis.call('HDEL', KEYS[1], 'mark') end
return 1
";

/// A key's name in the earlier layout, made the same key's name in the hash-tagged one.
fn renamed(ws: &WorkspaceId, old_key: &str) -> Option<String> {
    let rest = old_key.strip_prefix(&format!("confab:cs:{ws}:"))?;
    Some(format!("{}{rest}", key_prefix(ws)))
}

/// A failed script of a claim: a newer claim's fence is [`StoreError::Fenced`].
fn claim_error(e: redis::RedisError) -> StoreError {
    if e.code() == Some("FENCED") {
        return StoreError::Fenced(e.to_string());
    }
    redis_error(e)
}

impl RedisStore {
    /// The epoch in the earlier layout's fence, 0 when there is none (or it is retired).
    pub(super) async fn old_fence_epoch(&self) -> StoreResult<u64> {
        let old: Option<String> = self.conn().get(OLD_FENCE).await.map_err(redis_error)?;
        Ok(old.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Retires the earlier layout's fence, or refuses the claim (see the module doc).
    pub(super) async fn retire_old_layout(&self, epoch: u64) -> StoreResult<()> {
        let single = !self.conn.is_cluster();
        let mut invocation = RETIRE.prepare();
        invocation.key(OLD_FENCE);
        if single {
            invocation.key(OLD_WORKSPACES).key(OLD_MOVES);
        }
        let reply: Vec<String> = invocation
            .arg(epoch)
            .arg(RETIRED)
            .invoke(&mut self.conn())
            .await
            .map_err(redis_error)?;
        match reply.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["ok"] => {}
            ["newer", held] => {
                return Err(StoreError::Fenced(format!(
                    "a process of an earlier confab holds the store with epoch {held}, not older \
                     than {epoch}"
                )))
            }
            ["moving", ws, mark] => {
                return Err(StoreError::Corrupt(format!(
                    "the store holds data of the earlier key layout and workspace {ws} is in \
                     the middle of a move ({mark}): finish or abort the move with the earlier \
                     confab version, then start this one (docs/operations.md)"
                )))
            }
            _ => return Err(super::corrupt("retire reply", format!("{reply:?}"))),
        }
        Ok(())
    }

    /// Moves the earlier layout's data into this one (a single Redis; the store's fence holds
    /// `epoch` already).
    pub(super) async fn migrate_old_layout(&self, epoch: u64) -> StoreResult<()> {
        let (served, marks): (Vec<String>, HashMap<String, String>) = redis::pipe()
            .smembers(OLD_WORKSPACES)
            .hgetall(OLD_MOVES)
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)?;
        if served.is_empty() && marks.is_empty() {
            return Ok(());
        }
        let served: BTreeSet<String> = served.into_iter().collect();
        let mut workspaces: BTreeMap<String, (bool, String)> = BTreeMap::new();
        for ws in &served {
            workspaces.insert(ws.clone(), (true, String::new()));
        }
        for (ws, mark) in marks {
            workspaces.entry(ws).or_insert((false, String::new())).1 = mark;
        }
        tracing::warn!(
            workspaces = workspaces.len(),
            epoch,
            "migrating the cell store from the earlier key layout to the hash-tagged one"
        );
        let mut indexed = Vec::new();
        for (id, (is_served, mark)) in &workspaces {
            let Ok(ws) = WorkspaceId::new(id) else {
                tracing::warn!(workspace = %id, "earlier layout: not a workspace id; left as it is");
                continue;
            };
            self.enroll(&ws, epoch).await?;
            let old_keys = self.old_keys(&ws).await?;
            if *is_served {
                self.rename_keys(&ws, &old_keys, epoch).await?;
            } else if !old_keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&old_keys)
                    .query_async::<()>(&mut self.conn())
                    .await
                    .map_err(redis_error)?;
            }
            let _: i64 = CONTROL
                .key(ctl_key(&ws))
                .arg(if *is_served { "1" } else { "" })
                .arg(mark)
                .arg(epoch)
                .invoke(&mut self.conn())
                .await
                .map_err(claim_error)?;
            if *is_served {
                indexed.push(id.clone());
            }
        }
        self.update_index("add", &indexed, epoch).await?;
        let _: () = self
            .conn()
            .del(&[OLD_WORKSPACES, OLD_MOVES])
            .await
            .map_err(redis_error)?;
        tracing::warn!(
            workspaces = workspaces.len(),
            "cell store migrated to the hash-tagged key layout"
        );
        Ok(())
    }

    /// The workspace's keys in the earlier layout (a single Redis: a plain `SCAN`).
    async fn old_keys(&self, ws: &WorkspaceId) -> StoreResult<Vec<String>> {
        let mut conn = self.conn();
        let pattern = format!("confab:cs:{ws}:*");
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    async fn rename_keys(&self, ws: &WorkspaceId, old: &[String], epoch: u64) -> StoreResult<()> {
        for batch in old.chunks(RENAME_BATCH) {
            let mut invocation = RENAME.prepare();
            let mut new_names = Vec::with_capacity(batch.len());
            for key in batch {
                let Some(new) = renamed(ws, key) else {
                    return Err(super::corrupt("earlier layout key", key));
                };
                invocation.key(key);
                new_names.push(new);
            }
            for new in &new_names {
                invocation.key(new);
            }
            let _: i64 = invocation
                .key(ctl_key(ws))
                .arg(epoch)
                .invoke(&mut self.conn())
                .await
                .map_err(claim_error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_keys_are_renamed_under_the_hash_tag() {
        let ws = WorkspaceId::new("acme").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            renamed(&ws, "confab:cs:acme:ch:c:log").as_deref(),
            Some("confab:cs:{acme}:ch:c:log")
        );
        assert_eq!(renamed(&ws, "confab:cs:acme-2:meta"), None);
    }
}
