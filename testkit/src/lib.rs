//! Test support: a real `redis-server` on a free loopback port, in its own directory, that a
//! test can kill (`SIGKILL`) and restart on the same port with the same data files.
//!
//! Tests use real Redis rather than a fake, so what they check is what production runs. Every
//! server is durable as production requires (`appendonly yes`, `appendfsync always`) unless a
//! test asks for other settings with [`RedisServer::start_with_args`] (to check that a cell
//! refuses a store that is not durable).
//!
//! [`RedisServer::start_in_netns`] runs one inside a network namespace the test made (see
//! confab/tests/cluster/netns.rs), listening on every address of that namespace, so that
//! processes in other namespaces reach it over the test's own virtual links.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A `redis-server` process owned by a test.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    /// Extra `redis-server` arguments, after the durable defaults (so they override them).
    args: Vec<String>,
    /// The network namespace it runs in (`ip netns exec`), or `None`: 127.0.0.1 of the test's.
    netns: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server that writes every command to its append-only file before answering
    /// (`appendonly yes`, `appendfsync always`), the settings a cell requires of its store.
    pub fn start() -> RedisServer {
        Self::start_with_args(&[])
    }

    /// The same as [`RedisServer::start`]: every test server is durable.
    pub fn start_durable() -> RedisServer {
        Self::start()
    }

    /// Starts a server with extra arguments after the durable defaults, e.g.
    /// `&["--appendfsync", "everysec"]` or `&["--rename-command", "CONFIG", ""]`.
    pub fn start_with_args(args: &[&str]) -> RedisServer {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::start_fresh(|| args.clone())
    }

    /// Starts a server on a free port with a fresh data directory and the arguments `args`
    /// gives for that attempt (a cluster node picks its bus port per attempt too).
    fn start_fresh(args: impl Fn() -> Vec<String>) -> RedisServer {
        // A free port can be taken by another test between our probe and redis binding it;
        // then redis exits at once and we try another port.
        for _ in 0..10 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("confab-redis-{}-{port}", std::process::id()));
            // Left over by an earlier server of this process on this port: not this one's data.
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
            let mut server = RedisServer {
                port,
                dir,
                args: args(),
                netns: None,
                child: None,
            };
            if server.try_spawn() {
                return server;
            }
        }
        panic!("could not start redis-server on any free port");
    }

    /// Starts a durable server in network namespace `netns` on `port`, bound to every address
    /// of that namespace (which holds nothing else, so the port is free). Reach it at
    /// [`RedisServer::url_at`] the namespace's address on a link.
    pub fn start_in_netns(netns: &str, port: u16) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("confab-redis-{}-{netns}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        let mut server = RedisServer {
            port,
            dir,
            // Redis refuses clients from other hosts while it has no password unless told.
            args: vec!["--protected-mode".into(), "no".into()],
            netns: Some(netns.to_string()),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server did not come up again on port {}",
            self.port
        );
    }

    /// Starts the process and waits until it answers; `false` if it exited or never did.
    fn try_spawn(&mut self) -> bool {
        let mut command = self.in_netns("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg(if self.netns.is_some() {
                "0.0.0.0"
            } else {
                "127.0.0.1"
            })
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg("always")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}); install it: apt-get install redis-server")
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ping() {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// `program` to run in this server's network namespace, if it has one.
    fn in_netns(&self, program: &str) -> Command {
        match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, program]);
                command
            }
            None => Command::new(program),
        }
    }

    /// Whether the server answers `PING`.
    pub fn ping(&self) -> bool {
        if self.netns.is_some() {
            // Only its own namespace may reach it: ask there, with a bound on the wait.
            let output = self
                .in_netns("timeout")
                .args(["2", "redis-cli", "-p", &self.port.to_string(), "PING"])
                .stderr(Stdio::null())
                .output();
            return output.is_ok_and(|o| o.stdout.starts_with(b"PONG"));
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.url_at("127.0.0.1")
    }

    /// `redis://ADDRESS:PORT`: the server as reached at `address` (one of its namespace's).
    pub fn url_at(&self, address: &str) -> String {
        format!("redis://{address}:{}", self.port)
    }

    /// Kills the server with SIGKILL (no shutdown save).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster owned by a test: `masters` masters, each with `replicas` replicas, one
/// `redis-server --cluster-enabled yes` per node on free loopback ports, joined with
/// `redis-cli --cluster create --cluster-yes`. Each node is a [`RedisServer`], so a test can
/// kill one ([`RedisCluster::kill_node`]) and start it again with its data and its cluster
/// configuration (`nodes.conf`).
///
/// Nodes run with `cluster-require-full-coverage no`, as confab's operations guide asks: when
/// a master dies with no replica to take over, only the keys of its slots are unreachable and
/// the other masters keep serving theirs (with the default, every node refuses every
/// command). `cluster-node-timeout` is 2 s, so a replica takes over within a few seconds.
pub struct RedisCluster {
    /// Every node, in the order they were given to `redis-cli --cluster create` (masters
    /// first).
    pub nodes: Vec<RedisServer>,
    masters: usize,
}

/// How long the node of a cluster may miss the others before it counts as failed.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 2000;

/// A node of a cluster as `CLUSTER NODES` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// Flagged `fail` (or `fail?`) by the node that answered.
    pub failed: bool,
    /// The slot ranges it serves (masters only), inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl RedisServer {
    /// Starts a durable Redis Cluster node (not yet part of a cluster): a client port and a
    /// cluster bus port, both free (`cluster-port`; the default, port + 10000, may be taken
    /// or past 65535).
    pub fn start_cluster_node() -> RedisServer {
        Self::start_fresh(|| {
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &CLUSTER_NODE_TIMEOUT_MS.to_string(),
                "--cluster-require-full-coverage",
                "no",
                // A replica's first sync starts at once, not after the default 5 s.
                "--repl-diskless-sync-delay",
                "0",
                "--cluster-port",
                &free_port().to_string(),
            ]
            .map(String::from)
            .to_vec()
        })
    }

    /// `redis-cli -p PORT ARGS…`, its standard output (bounded: 10 s).
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("timeout")
            .args(["10", "redis-cli", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// This node's view of the cluster (`CLUSTER NODES`), empty when it does not answer.
    pub fn cluster_nodes(&self) -> Vec<ClusterNode> {
        self.cli(&["CLUSTER", "NODES"])
            .lines()
            .filter_map(parse_cluster_node)
            .collect()
    }

    /// Whether this node answers and reports `cluster_state:ok` with every slot served.
    pub fn cluster_ok(&self) -> bool {
        let info = self.cli(&["CLUSTER", "INFO"]);
        info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
    }
}

/// One line of `CLUSTER NODES`: `id ip:port@bus flags master ping pong epoch link slots…`.
fn parse_cluster_node(line: &str) -> Option<ClusterNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (id, address, flags) = (fields.first()?, fields.get(1)?, fields.get(2)?);
    let port = address
        .split('@')
        .next()?
        .rsplit_once(':')?
        .1
        .parse()
        .ok()?;
    let flags: Vec<&str> = flags.split(',').collect();
    let slots = fields
        .iter()
        .skip(8)
        // Slots being migrated show as `[slot->-id]`; a test cluster never migrates.
        .filter(|range| !range.starts_with('['))
        .filter_map(|range| match range.split_once('-') {
            Some((start, end)) => Some((start.parse().ok()?, end.parse().ok()?)),
            None => range.parse().ok().map(|slot| (slot, slot)),
        })
        .collect();
    Some(ClusterNode {
        id: id.to_string(),
        port,
        master: flags.contains(&"master"),
        failed: flags.contains(&"fail") || flags.contains(&"fail?"),
        slots,
    })
}

impl RedisCluster {
    /// Starts `masters` masters with no replicas.
    pub fn start(masters: usize) -> RedisCluster {
        Self::start_with_replicas(masters, 0)
    }

    /// Starts `masters × (1 + replicas)` nodes, creates the cluster and waits until every
    /// node reports `cluster_state:ok` and knows every master.
    pub fn start_with_replicas(masters: usize, replicas: usize) -> RedisCluster {
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs at least 3 masters"
        );
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_cluster_node())
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("timeout")
            .args(["60", "redis-cli", "--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): apt-get install redis-tools"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes, masters };
        cluster.wait_settled();
        if replicas > 0 {
            // A replica that has not finished its first sync can never take over: wait for
            // every master's replicas before a test can kill one.
            let view = cluster.live_node().cluster_nodes();
            for master in view.iter().filter(|n| n.master && !n.slots.is_empty()) {
                if let Some(i) = cluster.nodes.iter().position(|n| n.port == master.port) {
                    cluster.wait_replicated(i);
                }
            }
        }
        cluster
    }

    /// Kills every node with SIGKILL: the whole cluster is down.
    pub fn kill_all(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Starts every node again (after [`RedisCluster::kill_all`], or kills them first) and
    /// waits until the cluster is whole again.
    pub fn restart_all(&mut self) {
        self.kill_all();
        for node in &mut self.nodes {
            node.spawn();
        }
        self.wait_settled();
    }

    /// Waits (bounded: 60 s) until every node serves every slot and sees every node, with as
    /// many masters as the cluster was created with.
    pub fn wait_settled(&self) {
        let masters = self.masters;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // A replica that has not joined yet could not take over.
            let settled = self.nodes.iter().all(|node| {
                let view = node.cluster_nodes();
                node.cluster_ok()
                    && view.len() == self.nodes.len()
                    && view.iter().filter(|n| n.master).count() == masters
            });
            if settled {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never settled: {:#?}",
                self.nodes
                    .iter()
                    .find(|n| n.ping())
                    .map(|n| n.cluster_nodes())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…`, every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// A node that answers, for questions about the cluster.
    fn live_node(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.ping())
            .unwrap_or_else(|| panic!("no live cluster node"))
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, asked of a live node).
    pub fn slot_of(&self, key: &str) -> u16 {
        let answer = self.live_node().cli(&["CLUSTER", "KEYSLOT", key]);
        answer
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {answer:?}: {e}"))
    }

    /// The index in [`RedisCluster::nodes`] of the master that serves `key`'s slot, as a
    /// live node sees it (after a failover: the promoted replica).
    pub fn master_of(&self, key: &str) -> usize {
        let slot = self.slot_of(key);
        let view = self.live_node().cluster_nodes();
        let master = view
            .iter()
            .find(|n| n.master && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .unwrap_or_else(|| panic!("no master serves slot {slot} of {key:?}: {view:#?}"));
        self.nodes
            .iter()
            .position(|n| n.port == master.port)
            .unwrap_or_else(|| panic!("slot {slot} is served by a node not of this cluster"))
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its port with its data and cluster configuration.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart();
    }

    /// Waits (bounded: 30 s) until every live node but `except`'s sees `key`'s slot served
    /// by a master that is not failed and not node `except` (a replica took over).
    pub fn wait_failover(&self, key: &str, except: usize) {
        let slot = self.slot_of(key);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let moved = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, n)| *i != except && n.ping())
                .all(|(_, n)| {
                    n.cluster_nodes().iter().any(|m| {
                        m.master
                            && !m.failed
                            && m.port != self.nodes[except].port
                            && m.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
                    })
                });
            if moved {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over slot {slot} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded: 30 s) until every replica of master `i` has everything it wrote.
    pub fn wait_replicated(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.nodes[i].cli(&["INFO", "replication"]);
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.trim().strip_prefix(name))
                    .map(str::to_string)
            };
            let master_offset = field("master_repl_offset:");
            let replicas: Vec<String> = info
                .lines()
                .filter(|l| l.starts_with("slave") && l.contains("offset="))
                .filter_map(|l| {
                    let offset = l.split("offset=").nth(1)?.split(',').next()?;
                    Some(offset.trim().to_string())
                })
                .collect();
            if !replicas.is_empty() && replicas.iter().all(|o| Some(o) == master_offset.as_ref()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas of node {i} never caught up: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis-cli -c ARGS…` against a live node (`-c` follows the cluster's redirections), its
    /// standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        self.live_node().cli(&all)
    }
}

/// The environment variable that chooses the Redis the end-to-end harnesses give confab as
/// its directory: unset, empty or `single`, one `redis-server`; `cluster`, a 3-master Redis
/// Cluster ([`TestRedis::from_env`]).
pub const REDIS_ENV: &str = "CONFAB_TEST_REDIS";

/// A single Redis or a Redis Cluster, owned by a test.
pub enum TestRedis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl TestRedis {
    /// One durable `redis-server`.
    pub fn single() -> TestRedis {
        TestRedis::Single(RedisServer::start())
    }

    /// A Redis Cluster of 3 masters without replicas.
    pub fn cluster() -> TestRedis {
        TestRedis::Cluster(RedisCluster::start(3))
    }

    /// Whether [`REDIS_ENV`] asks for a Redis Cluster. Any value but `single`, `cluster` or
    /// nothing fails the test, so that a typo does not silently test a single Redis instead.
    pub fn cluster_from_env() -> bool {
        match std::env::var(REDIS_ENV) {
            Err(std::env::VarError::NotPresent) => false,
            Ok(value) if value.is_empty() || value == "single" => false,
            Ok(value) if value == "cluster" => true,
            other => panic!("{REDIS_ENV} must be `single` or `cluster`, not {other:?}"),
        }
    }

    /// What [`REDIS_ENV`] asks for.
    pub fn from_env() -> TestRedis {
        if Self::cluster_from_env() {
            Self::cluster()
        } else {
            Self::single()
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, TestRedis::Cluster(_))
    }

    /// The URL confab is given: `redis://…`, or `redis+cluster://…` with every node as a seed.
    pub fn url(&self) -> String {
        match self {
            TestRedis::Single(server) => server.url(),
            TestRedis::Cluster(cluster) => cluster.url(),
        }
    }

    /// A plain `redis://` URL to subscribe on: a publish on any node of a cluster reaches the
    /// subscribers of every node, so the first node's.
    pub fn pubsub_url(&self) -> String {
        match self {
            TestRedis::Single(server) => server.url(),
            TestRedis::Cluster(cluster) => cluster.nodes[0].url(),
        }
    }

    /// `redis-cli ARGS…` (on a cluster `-c`, following redirections), its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        match self {
            TestRedis::Single(server) => server.cli(args),
            TestRedis::Cluster(cluster) => cluster.cli(args),
        }
    }

    /// Kills every server with SIGKILL: the whole Redis is down.
    pub fn kill(&mut self) {
        match self {
            TestRedis::Single(server) => server.kill(),
            TestRedis::Cluster(cluster) => cluster.kill_all(),
        }
    }

    /// Starts every server again with its data (a cluster: until it is whole again).
    pub fn restart(&mut self) {
        match self {
            TestRedis::Single(server) => server.restart(),
            TestRedis::Cluster(cluster) => cluster.restart_all(),
        }
    }

    /// The cluster, when this is one.
    pub fn as_cluster(&self) -> Option<&RedisCluster> {
        match self {
            TestRedis::Single(_) => None,
            TestRedis::Cluster(cluster) => Some(cluster),
        }
    }

    /// The cluster, when this is one.
    pub fn as_cluster_mut(&mut self) -> Option<&mut RedisCluster> {
        match self {
            TestRedis::Single(_) => None,
            TestRedis::Cluster(cluster) => Some(cluster),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_parse_with_their_flags_and_slots() {
        let line = "de67 127.0.0.1:17103@27103 master,fail - 1 2 3 disconnected 0-5460 7000";
        assert_eq!(
            parse_cluster_node(line),
            Some(ClusterNode {
                id: "de67".into(),
                port: 17103,
                master: true,
                failed: true,
                slots: vec![(0, 5460), (7000, 7000)],
            })
        );
        let replica = "aa 127.0.0.1:1@2 myself,slave de67 0 0 3 connected";
        let parsed = parse_cluster_node(replica).unwrap_or_else(|| panic!("a replica line"));
        assert!(!parsed.master && parsed.slots.is_empty());
    }

    #[test]
    fn a_cluster_of_three_masters_serves_every_slot_and_a_dead_master_costs_only_its_own() {
        let mut cluster = RedisCluster::start(3);
        assert!(cluster.url().starts_with("redis+cluster://127.0.0.1:"));
        // Three keys on three different masters.
        let mut keys: Vec<(String, usize)> = Vec::new();
        for i in 0.. {
            let key = format!("k{i}");
            let node = cluster.master_of(&key);
            if keys.iter().all(|(_, n)| *n != node) {
                keys.push((key, node));
            }
            if keys.len() == 3 {
                break;
            }
        }
        for (key, _) in &keys {
            assert_eq!(cluster.cli(&["SET", key, "v"]).trim(), "OK");
        }
        let (dead_key, dead) = keys[0].clone();
        cluster.kill_node(dead);
        for (key, _) in &keys[1..] {
            assert_eq!(cluster.cli(&["GET", key]).trim(), "v", "{key} lost");
        }
        assert_ne!(cluster.cli(&["GET", &dead_key]).trim(), "v");
        cluster.restart_node(dead);
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.cli(&["GET", &dead_key]).trim() != "v" {
            assert!(
                Instant::now() < deadline,
                "{dead_key} not back after the restart"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn a_replica_takes_over_the_slots_of_a_killed_master() {
        let mut cluster = RedisCluster::start_with_replicas(3, 1);
        assert_eq!(cluster.cli(&["SET", "k", "v"]).trim(), "OK");
        let master = cluster.master_of("k");
        cluster.wait_replicated(master);
        cluster.kill_node(master);
        cluster.wait_failover("k", master);
        assert_ne!(cluster.master_of("k"), master);
        assert_eq!(cluster.cli(&["GET", "k"]).trim(), "v");
    }
}
