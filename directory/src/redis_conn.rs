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
//! it on the master owning a given key's slot, which is where every key of that hash tag lives.
//!
//! This module is the first step of Redis Cluster support (issue 11 item 5): the engines do
//! not use it yet, see docs/operations.md.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

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
            RedisConn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
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
