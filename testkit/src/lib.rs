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
        // A free port can be taken by another test between our probe and redis binding it;
        // then redis exits at once and we try another port.
        for _ in 0..10 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("confab-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
            let mut server = RedisServer {
                port,
                dir,
                args: args.iter().map(|a| a.to_string()).collect(),
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

/// A Redis Cluster of `masters` masters (no replicas) owned by a test: one
/// `redis-server --cluster-enabled yes` per node on free ports, joined with
/// `redis-cli --cluster create`. Each node is a [`RedisServer`], so a test can kill one.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                RedisServer::start_with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .arg("--cluster-replicas")
            .arg("0")
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): apt-get install redis-tools"));
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cluster.nodes.iter().all(|n| n.cluster_ok()) {
            assert!(
                Instant::now() < deadline,
                "the cluster never reached cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
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

    /// The index of the node that serves `key`'s slot (`redis-cli CLUSTER KEYSLOT` and
    /// `CLUSTER SLOTS` asked of a live node).
    pub fn node_of(&self, key: &str) -> usize {
        let live = self
            .nodes
            .iter()
            .find(|n| n.ping())
            .unwrap_or_else(|| panic!("no live cluster node"));
        let slot: u16 = live
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT: {e}"));
        let shards = live.cli(&["CLUSTER", "SLOTS"]);
        // Plain redis-cli output: per range, lines "start", "end", "ip", "port", "id", ...
        let lines: Vec<&str> = shards.lines().map(str::trim).collect();
        for window in lines.windows(4) {
            let (Ok(start), Ok(end), Ok(port)) = (
                window[0].parse::<u16>(),
                window[1].parse::<u16>(),
                window[3].parse::<u16>(),
            ) else {
                continue;
            };
            if window[2] == "127.0.0.1" && (start..=end).contains(&slot) {
                if let Some(i) = self.nodes.iter().position(|n| n.port == port) {
                    return i;
                }
            }
        }
        panic!("no node serves slot {slot} of {key:?}: {shards}");
    }
}

impl RedisServer {
    /// `redis-cli -p PORT ARGS…`, its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Whether this cluster node answers `cluster_state:ok`.
    pub fn cluster_ok(&self) -> bool {
        self.ping() && self.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
    }
}
