//! One connection type over a single Redis and a Redis Cluster, chosen by the URL.
//!
//! `redis://…` (and `rediss://`, `unix://`) is a single server, through the connection
//! manager as before. `redis+cluster://HOST:PORT[,HOST:PORT…]` names a Redis Cluster by its
//! seed nodes (any reachable one is enough to learn the slot map); commands are routed by key
//! slot, and the connection follows failovers and slot migrations by itself. Both variants
//! implement [`redis::aio::ConnectionLike`], so scripts, pipelines and commands run on either.
//!
//! In a cluster a script or a pipeline may only touch keys of one slot: callers hash-tag the
//! keys that must travel together (`{…}`). A `SCAN` is per node: [`RedisConn::scan_slot`] runs
//! it on the master owning a given key's slot, which is where every key of that hash tag lives;
//! [`RedisConn::scan_all`] runs it on every master.
//!
//! Scripts go through [`Lua`] rather than [`redis::Script`]: on `NOSCRIPT` (a node that never
//! ran the script, or restarted) `redis::Script` loads it with `SCRIPT LOAD` on *every* node of
//! a cluster, which fails while any one node is down, so that a process started during an
//! outage of one master could run no script anywhere. [`Lua`] sends the script's text (`EVAL`)
//! to the one node that asked. Pub/sub is not a connection of this type: a `PUBLISH` in a
//! Redis Cluster reaches the subscribers of every node (its own at once, the others' over the
//! cluster bus, milliseconds later), so a subscriber listens on every seed ([`pubsub_urls`])
//! and keeps the first copy of each message; [`RedisConn::publish_via`] publishes on the node
//! of a given key's slot (the one a caller already depends on).
//!
//! See docs/operations.md, "Running on a Redis Cluster".

use std::borrow::Cow;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{
    Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, ToRedisArgs, Value,
};

/// The scheme that names a Redis Cluster by its seed nodes.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// How long a connection attempt and a reply may take before the command fails.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(1),
            response: Duration::from_secs(2),
        }
    }
}

/// A connection to a single Redis or to a Redis Cluster. Cheap to clone (both variants are
/// handles to a shared, multiplexed connection).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The seed URLs of a `redis+cluster://` URL, each as a `redis://` URL; `None` for any other
/// URL. A seed may carry its own `user:password@`.
pub fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix(CLUSTER_SCHEME)?;
    let rest = rest.trim_end_matches('/');
    Some(
        rest.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| format!("redis://{s}"))
            .collect(),
    )
}

/// The URLs to subscribe on for the pub/sub channels of `url`: the URL itself for a single
/// Redis; every seed of a `redis+cluster://` URL (a message published on any node reaches the
/// subscribers of every node, first those of the node that published it).
pub fn pubsub_urls(url: &str) -> Vec<String> {
    match cluster_seeds(url) {
        Some(seeds) if !seeds.is_empty() => seeds,
        _ => vec![url.to_string()],
    }
}

/// A Lua script, run with `EVALSHA` and sent whole (`EVAL`) to the node that answers
/// `NOSCRIPT` (see the module docs for why not [`redis::Script`]).
#[derive(Debug)]
pub struct Lua {
    code: Cow<'static, str>,
    hash: String,
}

/// One call of a [`Lua`] script: its keys and arguments.
#[derive(Debug)]
pub struct LuaCall<'a> {
    lua: &'a Lua,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Lua {
    /// A script from its text: a literal, or one put together once (a shared guard and a body).
    pub fn new(code: impl Into<Cow<'static, str>>) -> Lua {
        let code = code.into();
        Lua {
            hash: redis::Script::new(&code).get_hash().to_string(),
            code,
        }
    }

    /// A call with no key or argument yet.
    pub fn prepare(&self) -> LuaCall<'_> {
        LuaCall {
            lua: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// A call with its first key.
    pub fn key<T: ToRedisArgs>(&self, key: T) -> LuaCall<'_> {
        let mut call = self.prepare();
        call.key(key);
        call
    }
}

impl LuaCall<'_> {
    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// How many keys the call has so far.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn command(&self, name: &str, script: &str) -> Cmd {
        let mut cmd = redis::cmd(name);
        cmd.arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }

    /// The call as an `EVALSHA`, for a pipeline: it fails with `NOSCRIPT` ([`is_noscript`]) on a
    /// node that does not have the script cached.
    pub fn evalsha_cmd(&self) -> Cmd {
        self.command("EVALSHA", &self.lua.hash)
    }

    /// The call as an `EVAL` (the script's whole text), for a pipeline: it runs on any node,
    /// which caches the script for the `EVALSHA`s after it.
    pub fn eval_cmd(&self) -> Cmd {
        self.command("EVAL", &self.lua.code)
    }

    /// Runs the script on the node of its first key's slot (any node without keys).
    pub async fn invoke<T: FromRedisValue>(&self, conn: &mut RedisConn) -> RedisResult<T> {
        match self.evalsha_cmd().query_async(conn).await {
            // EVAL caches the script on that node: the next EVALSHA finds it.
            Err(e) if is_noscript(&e) => self.eval_cmd().query_async(conn).await,
            other => other,
        }
    }
}

/// Whether a command failed because the node did not have the script (`NOSCRIPT`).
pub fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

impl RedisConn {
    /// Opens a connection lazily: nothing is reached until the first command, which fails
    /// (within the timeouts) while Redis is unreachable; later commands reconnect.
    pub fn open(url: &str, timeouts: Timeouts) -> RedisResult<RedisConn> {
        match cluster_seeds(url) {
            Some(seeds) => {
                if seeds.is_empty() {
                    return Err(RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "redis+cluster:// URL without any seed node",
                    )));
                }
                let client = ClusterClient::builder(seeds)
                    .retries(1)
                    .connection_timeout(timeouts.connect)
                    .response_timeout(timeouts.response)
                    .build()?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeouts.connect)
                    .set_response_timeout(timeouts.response);
                Ok(RedisConn::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
            None => {
                let client = redis::Client::open(url)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_response_timeout(Some(timeouts.response))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?))
            }
        }
    }

    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// One `SCAN` step over the keys matching `pattern`, on the node that owns `slot_key`'s
    /// slot (on a single Redis, the server): the next cursor (0 once through) and the keys.
    /// Every key of a hash tag lives on that node, so a pattern under one tag sees them all.
    pub async fn scan_slot(
        &mut self,
        slot_key: &str,
        pattern: &str,
        cursor: u64,
        count: usize,
    ) -> RedisResult<(u64, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        match self {
            RedisConn::Single(conn) => cmd.query_async(conn).await,
            RedisConn::Cluster(conn) => {
                let route = Route::with_key(slot_key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let reply = conn.route_command(cmd, routing).await?;
                Ok(redis::from_redis_value(reply)?)
            }
        }
    }
}

impl RedisConn {
    /// Every key matching `pattern`, on a cluster from every master (a `SCAN` per master, each
    /// to the end). Fails when any master does not answer: the listing would be incomplete.
    pub async fn scan_all(&mut self, pattern: &str, count: usize) -> RedisResult<Vec<String>> {
        let scan = |cursor: u64| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(count);
            cmd
        };
        let mut all = Vec::new();
        match self {
            RedisConn::Single(conn) => {
                let mut cursor = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = scan(cursor).query_async(conn).await?;
                    all.extend(keys);
                    if next == 0 {
                        return Ok(all);
                    }
                    cursor = next;
                }
            }
            RedisConn::Cluster(conn) => {
                // Every master the slot map names, each scanned by its address: a master that
                // is down fails the listing rather than leaving its keys out of it.
                for (host, port) in cluster_masters(conn).await? {
                    let mut cursor = 0;
                    loop {
                        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port,
                        });
                        let reply = conn.route_command(scan(cursor), routing).await?;
                        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
                        all.extend(keys);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
                Ok(all)
            }
        }
    }

    /// `PUBLISH channel payload`, on a cluster sent to the master of `slot_key`'s slot (the
    /// message reaches every node's subscribers from there). A caller names a key whose
    /// master it needs anyway, so that a publish fails only when the change it announces could
    /// not be made either.
    pub async fn publish_via(
        &mut self,
        slot_key: &str,
        channel: &str,
        payload: &str,
    ) -> RedisResult<()> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        match self {
            RedisConn::Single(conn) => cmd.query_async(conn).await,
            RedisConn::Cluster(conn) => {
                let route = Route::with_key(slot_key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                conn.route_command(cmd, routing).await.map(|_| ())
            }
        }
    }
}

/// The address of every master that serves slots, from `CLUSTER SLOTS` as the masters this
/// connection reaches answer it (the first answer that parses).
async fn cluster_masters(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let answers = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
        )
        .await?;
    let answers = match answers {
        Value::Map(per_node) => per_node.into_iter().map(|(_, v)| v).collect(),
        other => vec![other],
    };
    for answer in answers {
        // Each range: [start, end, [host, port, id, …] of its master, replicas…].
        let Ok(ranges) = redis::from_redis_value::<Vec<Vec<Value>>>(answer) else {
            continue;
        };
        let mut masters: Vec<(String, u16)> = Vec::new();
        for range in ranges {
            let Some(master) = range.get(2).cloned() else {
                continue;
            };
            let Ok(node) = redis::from_redis_value::<Vec<Value>>(master) else {
                continue;
            };
            let (Some(host), Some(port)) = (node.first(), node.get(1)) else {
                continue;
            };
            let (Ok(host), Ok(port)) = (
                redis::from_redis_value::<String>(host.clone()),
                redis::from_redis_value::<u16>(port.clone()),
            ) else {
                continue;
            };
            if !masters.contains(&(host.clone(), port)) {
                masters.push((host, port));
            }
        }
        if !masters.is_empty() {
            return Ok(masters);
        }
    }
    Err(RedisError::from((
        ErrorKind::Client,
        "CLUSTER SLOTS: no master answered with the slot map",
    )))
}

/// Whether a `MULTI` was aborted because its slot has moved (a failover, a slot migration).
fn moved_in_transaction(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ExecAbort) && {
        let text = e.to_string();
        text.contains("Moved") || text.contains("MOVED")
    }
}

/// The first argument after the name of a pipeline's first command: its key, for the
/// commands of a transaction on one slot.
fn first_key(pipeline: &Pipeline) -> Option<Vec<u8>> {
    let first = pipeline.cmd_iter().next()?;
    match first.args_iter().nth(1)? {
        redis::Arg::Simple(key) => Some(key.to_vec()),
        _ => None,
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(conn) => Box::pin(async move {
                match conn.req_packed_commands(pipeline, offset, count).await {
                    Err(e) if pipeline.is_transaction() && moved_in_transaction(&e) => {
                        // The cluster connection follows `MOVED` for commands and plain
                        // pipelines, not inside `MULTI` (whose commands answer it queued and
                        // `EXEC` aborts): after a failover a transaction alone would meet the
                        // old slot map for ever. A read of its first key is redirected and
                        // refreshes the map; the aborted transaction ran nothing, so it is
                        // sent again, once.
                        if let Some(key) = first_key(pipeline) {
                            let _: RedisResult<Value> =
                                redis::cmd("EXISTS").arg(key).query_async(conn).await;
                        }
                        conn.req_packed_commands(pipeline, offset, count).await
                    }
                    other => other,
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_list_their_seeds_and_other_urls_are_single() {
        assert_eq!(
            cluster_seeds("redis+cluster://10.0.0.1:7000,10.0.0.2:7001/"),
            Some(vec![
                "redis://10.0.0.1:7000".to_string(),
                "redis://10.0.0.2:7001".to_string()
            ])
        );
        assert_eq!(
            cluster_seeds("redis+cluster://:pw@h:1"),
            Some(vec!["redis://:pw@h:1".to_string()])
        );
        assert_eq!(cluster_seeds("redis://127.0.0.1:6379"), None);
        assert_eq!(cluster_seeds("redis+cluster://"), Some(vec![]));
        assert!(RedisConn::open("redis+cluster://", Timeouts::default()).is_err());
    }
}
