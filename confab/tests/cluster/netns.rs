//! Hosts on addresses of their own, for partition tests: network namespaces that the test
//! makes itself (`ip netns`), joined by veth pairs, with real `redis-server`s and real
//! `confab cell` and `confab gateway` processes in them, and links to cut and heal.
//!
//! [`Hosts::start`] makes four namespaces: `gw` (a gateway), `cell` (cell `c1`, region `r`),
//! `store` (c1's Redis) and `dir` (the presence + directory Redis), and a point-to-point link
//! for each pair that talks: gw–cell, cell–store, gw–dir and cell–dir, each a /30 of its own
//! (the namespaces have no other route, so nothing reaches anywhere else). A fifth link,
//! `client`, joins the test's own namespace to `gw`; the test's clients reach the gateway
//! over it and it is never cut. Processes listen on fixed ports (a namespace holds nothing
//! else) and the links are authenticated with the cluster secret, as between real hosts.
//!
//! A [`Cut`] takes a link down (`ip link set DEV down`: the other side loses its carrier) or
//! makes it a black hole (a `pfifo` queue of length 0 at both ends: every packet is dropped,
//! nothing answers, no reset; `tc netem loss 100%` does the same where the kernel has netem).
//!
//! Names start with `cfp<pid>-`, so parallel test processes never collide; a namespace left by
//! a test process that died without cleaning up (SIGKILL) is removed, with the processes still
//! running in it, when the next test process starts.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use confab_testkit::RedisServer;

use super::{binary, cell_flags, gateway_flags, wait_http_ok, Proc};

/// The start of every name this module gives a namespace or an interface.
const PREFIX: &str = "cfp";
/// Ports inside the namespaces.
const REDIS_PORT: u16 = 6379;
const CELL_PORT: u16 = 7000;
const GATEWAY_PORT: u16 = 8080;

/// Numbers the topologies of this process (each test makes its own).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `command`; `Err` with what it printed when it fails or cannot start.
fn run(command: &mut Command) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `ip ARGS` (in namespace `netns` when given).
fn ip(netns: Option<&str>, args: &[&str]) -> Result<(), String> {
    let mut command = Command::new("ip");
    if let Some(netns) = netns {
        command.args(["-n", netns]);
    }
    run(command.args(args))
}

/// `tc ARGS` (in namespace `netns` when given).
fn tc(netns: Option<&str>, args: &[&str]) -> Result<(), String> {
    let mut command = Command::new("tc");
    if let Some(netns) = netns {
        command.args(["-n", netns]);
    }
    run(command.args(args))
}

/// Why this machine cannot run partition tests (not root, no `ip` or `tc`, network
/// namespaces refused), or `None` when it can. Removes stale namespaces first.
pub fn unsupported() -> Option<String> {
    remove_stale();
    if let Err(e) = run(Command::new("tc").arg("-V")) {
        return Some(format!("no `tc` (install iproute2): {e}"));
    }
    let name = format!("{PREFIX}{}-probe{}", std::process::id(), next());
    match Netns::add(&name) {
        Ok(_probe) => None,
        Err(e) => Some(format!(
            "`ip netns add` failed (needs root and iproute2): {e}"
        )),
    }
}

fn next() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Removes, once per process, the namespaces of test processes that no longer run.
fn remove_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("removing network namespace {name}, left by test process {pid}");
                drop(Netns {
                    name: name.to_string(),
                });
            }
        }
    });
}

/// A network namespace, removed (with every process still in it) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns add NAME`, with its loopback up.
    fn add(name: &str) -> Result<Netns, String> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let netns = Netns {
            name: name.to_string(),
        };
        ip(Some(name), &["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// `program` to run in this namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs in it was started in it by a test: stop it, by its id.
        if let Ok(output) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// One end of a link: a device in a namespace (`None`: the test's own) with an address.
struct End {
    netns: Option<String>,
    dev: String,
    address: Ipv4Addr,
}

impl End {
    fn ip(&self, args: &[&str]) -> Result<(), String> {
        ip(self.netns.as_deref(), args)
    }
}

/// How a link is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// `ip link set DEV down` at the first end: its routes go, the other end loses carrier.
    Down,
    /// Every packet dropped at both ends, silently (`tc qdisc ... pfifo limit 0`).
    Blackhole,
}

/// A veth pair between two namespaces, each end with an address of one /30.
pub struct Link {
    pub name: &'static str,
    a: End,
    b: End,
}

impl Link {
    /// Joins `a` (device `a_dev`) and `b` (`b_dev`; `None`: the test's own namespace) on the
    /// /30 of `base`: `a` gets `base + 1`, `b` `base + 2`.
    fn join(
        name: &'static str,
        (a, a_dev): (&Netns, &str),
        (b, b_dev): (Option<&Netns>, &str),
        base: Ipv4Addr,
    ) -> Result<Link, String> {
        let b_netns = b.map(|n| n.name.clone());
        let mut add = vec!["link", "add", b_dev];
        if let Some(netns) = &b_netns {
            add.extend(["netns", netns.as_str()]);
        }
        add.extend(["type", "veth", "peer", "name", a_dev, "netns", &a.name]);
        ip(None, &add)?;
        let link = Link {
            name,
            a: End {
                netns: Some(a.name.clone()),
                dev: a_dev.to_string(),
                address: Ipv4Addr::from(u32::from(base) + 1),
            },
            b: End {
                netns: b_netns,
                dev: b_dev.to_string(),
                address: Ipv4Addr::from(u32::from(base) + 2),
            },
        };
        for end in [&link.a, &link.b] {
            end.ip(&[
                "addr",
                "add",
                &format!("{}/30", end.address),
                "dev",
                &end.dev,
            ])?;
            end.ip(&["link", "set", &end.dev, "up"])?;
        }
        Ok(link)
    }

    /// The first end's address.
    pub fn a(&self) -> String {
        self.a.address.to_string()
    }

    /// The second end's address.
    pub fn b(&self) -> String {
        self.b.address.to_string()
    }

    /// Cuts the link.
    pub fn cut(&self, how: Cut) {
        let result = match how {
            Cut::Down => self.a.ip(&["link", "set", &self.a.dev, "down"]),
            Cut::Blackhole => [&self.a, &self.b].into_iter().try_for_each(|end| {
                tc(
                    end.netns.as_deref(),
                    &[
                        "qdisc", "add", "dev", &end.dev, "root", "pfifo", "limit", "0",
                    ],
                )
            }),
        };
        result.unwrap_or_else(|e| panic!("cutting link {}: {e}", self.name));
    }

    /// Undoes [`Link::cut`].
    pub fn heal(&self, how: Cut) {
        let result = match how {
            Cut::Down => self.a.ip(&["link", "set", &self.a.dev, "up"]),
            Cut::Blackhole => [&self.a, &self.b].into_iter().try_for_each(|end| {
                tc(
                    end.netns.as_deref(),
                    &["qdisc", "del", "dev", &end.dev, "root"],
                )
            }),
        };
        result.unwrap_or_else(|e| panic!("healing link {}: {e}", self.name));
    }
}

/// A gateway, a cell and their Redis servers, each in a namespace of its own (module docs).
pub struct Hosts {
    // Fields drop in order: the processes go before their namespaces.
    gateway: Proc,
    cell: Proc,
    store: RedisServer,
    directory: RedisServer,
    pub gw_cell: Link,
    pub cell_store: Link,
    pub gw_dir: Link,
    pub cell_dir: Link,
    client: Link,
    namespaces: Vec<Netns>,
}

impl Hosts {
    /// Makes the namespaces and links, starts the Redis servers, the cell and the gateway,
    /// and waits until the gateway is ready. Panics when any of it fails (call
    /// [`unsupported`] first).
    pub async fn start() -> Hosts {
        let pid = std::process::id();
        let n = next();
        let netns = |role: &str| {
            Netns::add(&format!("{PREFIX}{pid}-{n}-{role}"))
                .unwrap_or_else(|e| panic!("making namespace {role}: {e}"))
        };
        let (gw, cell, store, dir) = (netns("gw"), netns("cell"), netns("store"), netns("dir"));
        let link = |name, a, b, base: [u8; 4]| {
            Link::join(name, a, b, Ipv4Addr::from(base))
                .unwrap_or_else(|e| panic!("making link {name}: {e}"))
        };
        let gw_cell = link(
            "gw-cell",
            (&gw, "to-cell"),
            (Some(&cell), "to-gw"),
            [10, 1, 0, 0],
        );
        let cell_store = link(
            "cell-store",
            (&cell, "to-store"),
            (Some(&store), "to-cell"),
            [10, 2, 0, 0],
        );
        let gw_dir = link(
            "gw-dir",
            (&gw, "to-dir"),
            (Some(&dir), "to-gw"),
            [10, 3, 0, 0],
        );
        let cell_dir = link(
            "cell-dir",
            (&cell, "to-dir"),
            (Some(&dir), "to-cell"),
            [10, 4, 0, 0],
        );
        let client = link(
            "client",
            (&gw, "to-client"),
            (None, &format!("{PREFIX}{pid}k{n}")),
            client_subnet(pid, n),
        );

        let store_redis = RedisServer::start_in_netns(&store.name, REDIS_PORT);
        let directory = RedisServer::start_in_netns(&dir.name, REDIS_PORT);
        let cell_proc = spawn(cell.exec(binary()).args(cell_flags(
            "c1",
            "r",
            &format!("0.0.0.0:{CELL_PORT}"),
            &format!("{}:{CELL_PORT}", gw_cell.b()),
            &store_redis.url_at(&cell_store.b()),
            &directory.url_at(&cell_dir.b()),
        )));
        let gateway = spawn(gw.exec(binary()).args(gateway_flags(
            &format!("0.0.0.0:{GATEWAY_PORT}"),
            &directory.url_at(&gw_dir.b()),
        )));
        let hosts = Hosts {
            gateway,
            cell: cell_proc,
            store: store_redis,
            directory,
            gw_cell,
            cell_store,
            gw_dir,
            cell_dir,
            client,
            namespaces: vec![gw, cell, store, dir],
        };
        wait_http_ok(&format!("{}/readyz", hosts.gateway_url())).await;
        hosts
    }

    /// `http://IP:PORT` of the gateway, reached over the `client` link.
    pub fn gateway_url(&self) -> String {
        format!("http://{}:{GATEWAY_PORT}", self.client.a())
    }

    /// `ws://IP:PORT/v1/ws` of the gateway.
    pub fn gateway_ws(&self) -> String {
        format!("ws://{}:{GATEWAY_PORT}/v1/ws", self.client.a())
    }
}

/// Starts `command` (a confab process), logging warnings to the test's stderr.
fn spawn(command: &mut Command) -> Proc {
    let child = command
        .env("CONFAB_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a confab process in its namespace");
    Proc(Some(child))
}

/// The /30 of the `client` link of topology `n` of process `pid`, in 10.240.0.0/12: the only
/// addresses this module puts in the test's own namespace, different for each topology of
/// a process and, but for pids equal modulo 16384, for each process.
fn client_subnet(pid: u32, n: u32) -> [u8; 4] {
    let slot = (pid % 16_384) * 16 + n % 16;
    (u32::from(Ipv4Addr::new(10, 240, 0, 0)) + slot * 4).to_be_bytes()
}
