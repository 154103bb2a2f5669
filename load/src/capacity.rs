//! `confab-load capacity`: measures confab's unit costs on a real distributed deployment and
//! projects them to a deployment size; the inputs of `docs/capacity.md`.
//!
//! The deployment is the chaos layout ([`crate::chaos::cluster`]: a directory Redis, one
//! cell with its Redis store, two gateways, all on loopback). Three phases, each measured by
//! the difference of counters read before and after it: `/proc/PID` of the confab processes
//! (CPU, RSS, bytes written) and `INFO` of each Redis (commands, network bytes, CPU):
//!
//! 1. **connect**: `sessions` sessions say `hello`, spread over both gateways (RSS per
//!    connection, directory cost of a session coming online);
//! 2. **idle**: they hold for `idle` seconds, pinging every 20 s as clients do (directory and
//!    gateway cost of keeping a session: presence refreshes, heartbeats);
//! 3. **events**: `senders` members post `messages` into one channel of `members` members
//!    at `rate` messages/s (gateway CPU per delivered event; cell CPU, store Redis commands,
//!    bytes and CPU per published event; link bytes per event per gateway);
//!
//! and, at the end, every session closes (directory cost of a session going offline).
//! Webhooks are not measured: this build has none.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{mint_jwt, Api, TokenSource};
use crate::chaos::cluster::{Cluster, Victim, JWT_SECRET, WORKSPACE};
use crate::{client, payload, procfs};

/// How often an otherwise idle session pings (a client's heartbeat; the server closes a
/// session silent for 2 × 30 s).
const PING_EVERY: Duration = Duration::from_secs(20);
/// Longest wait for the last deliveries after the last send.
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// Length of the baseline phase (no session), long enough for two presence sweeps.
const BASELINE: Duration = Duration::from_secs(12);

/// What to measure.
#[derive(Debug, Clone)]
pub struct CapacityParams {
    pub confab: PathBuf,
    pub sessions: usize,
    pub members: usize,
    pub senders: usize,
    pub messages: usize,
    pub rate: f64,
    pub idle: Duration,
    pub out: PathBuf,
}

/// The measured unit costs (the model's inputs).
#[derive(Debug, Clone, Serialize)]
pub struct UnitCosts {
    pub gateway_rss_kib_per_connection: f64,
    pub gateway_cpu_us_per_session_second: f64,
    pub gateway_cpu_us_per_delivered_event: f64,
    pub cell_cpu_us_per_published_event: f64,
    pub store_redis_commands_per_event: f64,
    pub store_redis_bytes_in_per_event: f64,
    pub store_redis_cpu_us_per_event: f64,
    pub link_bytes_per_event_per_gateway: f64,
    pub directory_commands_per_session_up: f64,
    pub directory_bytes_per_session_up: f64,
    pub directory_cpu_us_per_session_up: f64,
    pub directory_commands_per_session_down: f64,
    pub directory_cpu_us_per_session_down: f64,
    pub directory_commands_per_session_second: f64,
    pub directory_bytes_per_session_second: f64,
    pub directory_cpu_us_per_session_second: f64,
}

/// What one run measured, with its parameters.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityReport {
    pub sessions: usize,
    pub members: usize,
    pub messages: usize,
    pub rate: f64,
    pub idle_s: f64,
    pub delivered: u64,
    pub costs: UnitCosts,
    pub projections: Vec<Projection>,
}

/// `INFO` counters of one Redis.
#[derive(Debug, Clone, Copy, Default)]
struct RedisInfo {
    commands: f64,
    bytes_in: f64,
    bytes_out: f64,
    cpu_s: f64,
}

impl RedisInfo {
    fn minus(self, before: RedisInfo) -> RedisInfo {
        RedisInfo {
            commands: self.commands - before.commands,
            bytes_in: self.bytes_in - before.bytes_in,
            bytes_out: self.bytes_out - before.bytes_out,
            cpu_s: self.cpu_s - before.cpu_s,
        }
    }
}

async fn redis_info(port: u16) -> Result<RedisInfo> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"INFO\r\n").await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    // A bulk string: `$<len>\r\n<len bytes>\r\n`.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if n == 0 {
            bail!("redis on port {port} closed during INFO");
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some((head, body)) = text.split_once("\r\n") {
            let len: usize = head.trim_start_matches('$').parse().context("INFO reply")?;
            if body.len() >= len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&reply).to_string();
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok(RedisInfo {
        commands: field("total_commands_processed"),
        bytes_in: field("total_net_input_bytes"),
        bytes_out: field("total_net_output_bytes"),
        cpu_s: field("used_cpu_sys") + field("used_cpu_user"),
    })
}

/// Bytes sent so far on the established TCP connections whose local port is `port` (the
/// cell's links to gateways), from the kernel's `tcp_info` as `ss -ti` shows it.
fn link_bytes_sent(port: u16) -> Result<f64> {
    let out = std::process::Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .context("running ss (iproute2)")?;
    if !out.status.success() {
        bail!("ss failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("bytes_sent:"))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum())
}

/// Everything read at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    gateway_cpu_s: f64,
    gateway_rss_kib: f64,
    cell_cpu_s: f64,
    link_sent: f64,
    store: RedisInfo,
    directory: RedisInfo,
}

struct Pids {
    gateways: [u32; 2],
    cell: u32,
    cell_port: u16,
    store_port: u16,
    directory_port: u16,
}

async fn snapshot(p: &Pids) -> Result<Snapshot> {
    let mut s = Snapshot::default();
    for pid in p.gateways {
        let sample = procfs::sample(pid)?;
        s.gateway_cpu_s += sample.cpu_s;
        s.gateway_rss_kib += sample.rss_kib as f64;
    }
    s.cell_cpu_s = procfs::sample(p.cell)?.cpu_s;
    s.link_sent = link_bytes_sent(p.cell_port)?;
    s.store = redis_info(p.store_port).await?;
    s.directory = redis_info(p.directory_port).await?;
    Ok(s)
}

/// A session past `ready`: frames sent through `tx` (pings every [`PING_EVERY`] otherwise),
/// message events counted into the shared counter; dropping `tx` closes it.
struct Session {
    tx: mpsc::Sender<String>,
}

async fn open_session(gateway: &str, user: &str, delivered: Arc<AtomicU64>) -> Result<Session> {
    let addr = gateway.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await?;
    let url = format!("ws://{addr}/v1/ws");
    let stream = crate::wire::WireStream::new(stream);
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    let token = mint_jwt(JWT_SECRET, WORKSPACE, user, 3600)?;
    client::hello(&mut ws, &token, &[]).await?;
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = stream.next().await {
            if let Message::Text(text) = frame {
                if text.contains("\"type\":\"message\"") {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let (tx, mut rx) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            let frame = tokio::select! {
                _ = ping.tick() => r#"{"op":"ping"}"#.to_string(),
                next = rx.recv() => match next {
                    Some(frame) => frame,
                    None => break,
                },
            };
            if sink.send(Message::text(frame)).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    });
    Ok(Session { tx })
}

/// The directory's and the gateways' cost per second with no session at all.
struct Baseline {
    directory_per_s: RedisInfo,
    gateway_cpu_per_s: f64,
}

impl Baseline {
    fn new(directory: RedisInfo, gateway_cpu_s: f64, over: Duration) -> Baseline {
        let s = over.as_secs_f64();
        Baseline {
            directory_per_s: RedisInfo {
                commands: directory.commands / s,
                bytes_in: directory.bytes_in / s,
                bytes_out: directory.bytes_out / s,
                cpu_s: directory.cpu_s / s,
            },
            gateway_cpu_per_s: gateway_cpu_s / s,
        }
    }

    /// `measured` over `over`, less what the baseline costs in that time (never below 0).
    fn remove(&self, measured: RedisInfo, over: Duration) -> RedisInfo {
        let s = over.as_secs_f64();
        let b = self.directory_per_s;
        RedisInfo {
            commands: (measured.commands - b.commands * s).max(0.0),
            bytes_in: (measured.bytes_in - b.bytes_in * s).max(0.0),
            bytes_out: (measured.bytes_out - b.bytes_out * s).max(0.0),
            cpu_s: (measured.cpu_s - b.cpu_s * s).max(0.0),
        }
    }
}

fn per(value: f64, count: f64) -> f64 {
    if count > 0.0 {
        value / count
    } else {
        0.0
    }
}

/// Runs the three phases on a fresh cluster and returns the unit costs with the projections.
pub async fn run(params: CapacityParams, profile: &Profile) -> Result<CapacityReport> {
    if params.members > params.sessions || params.senders > params.members {
        bail!("need senders <= members <= sessions");
    }
    // A fresh deployment each run: the data of an earlier one would hold its workspace.
    let dir = params.out.join("cluster");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let mut cluster = Cluster::start(&params.confab, &dir).await?;
    let result = measure(&cluster, &params).await;
    cluster.stop().await;
    let (costs, delivered) = result?;
    let projections = profile
        .steps
        .iter()
        .map(|&u| project(&costs, profile, u))
        .collect();
    Ok(CapacityReport {
        sessions: params.sessions,
        members: params.members,
        messages: params.messages,
        rate: params.rate,
        idle_s: params.idle.as_secs_f64(),
        delivered,
        costs,
        projections,
    })
}

async fn measure(cluster: &Cluster, params: &CapacityParams) -> Result<(UnitCosts, u64)> {
    let pid = |v| cluster.pid(v).context("a process has no pid");
    let port = |v| cluster.redis_port(v).context("a redis has no port");
    let pids = Pids {
        gateways: [pid(Victim::Gateway(0))?, pid(Victim::Gateway(1))?],
        cell: pid(Victim::Cell)?,
        cell_port: cluster
            .http_port(Victim::Cell)
            .context("the cell has no port")?,
        store_port: port(Victim::CellRedis)?,
        directory_port: port(Victim::DirectoryRedis)?,
    };
    let n = params.sessions as f64;
    let delivered = Arc::new(AtomicU64::new(0));
    let users: Vec<String> = (0..params.sessions).map(|i| format!("u{i}")).collect();

    // 0. baseline: what the deployment costs with no session (cell heartbeats, presence
    // sweeps, Redis's own housekeeping), subtracted from the phases below by their length.
    let quiet = snapshot(&pids).await?;
    let quiet_at = Instant::now();
    tokio::time::sleep(BASELINE).await;
    let before = snapshot(&pids).await?;
    let baseline = Baseline::new(
        before.directory.minus(quiet.directory),
        before.gateway_cpu_s - quiet.gateway_cpu_s,
        quiet_at.elapsed(),
    );
    println!("baseline: {:.0} s", BASELINE.as_secs_f64());

    // 1. connect
    let connect_at = Instant::now();
    let mut sessions = Vec::with_capacity(params.sessions);
    for (batch_no, batch) in users.chunks(100).enumerate() {
        let opened = futures_util::future::join_all(batch.iter().enumerate().map(|(i, u)| {
            let gateway = &cluster.gateways[(batch_no * 100 + i) % 2];
            open_session(gateway, u, Arc::clone(&delivered))
        }))
        .await;
        for s in opened {
            sessions.push(s?);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = snapshot(&pids).await?;
    let up = baseline.remove(
        connected.directory.minus(before.directory),
        connect_at.elapsed(),
    );
    println!("connect: {} sessions", sessions.len());

    // 2. idle
    let idle_at = Instant::now();
    tokio::time::sleep(params.idle).await;
    let idled = snapshot(&pids).await?;
    let idle_for = idle_at.elapsed();
    let idle = baseline.remove(idled.directory.minus(connected.directory), idle_for);
    let idle_gateway_cpu_s = idled.gateway_cpu_s
        - connected.gateway_cpu_s
        - baseline.gateway_cpu_per_s * idle_for.as_secs_f64();
    let session_seconds = n * idle_for.as_secs_f64();
    println!("idle: {:.0} s", params.idle.as_secs_f64());

    // 3. events
    let api = Api::new(
        &cluster.gateways[0],
        WORKSPACE,
        TokenSource::Jwt {
            secret: JWT_SECRET.into(),
        },
    )?;
    let owner = api.token(&users[0]).await?;
    let channel = api
        .create_channel(&owner, "capacity", &users[1..params.members])
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    delivered.store(0, Ordering::Relaxed);
    let start = snapshot(&pids).await?;
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / params.rate.max(0.1));
    for m in 0..params.messages {
        let due = started + interval * m as u32;
        tokio::time::sleep_until(due.into()).await;
        let text = format!("capacity message {m}");
        let frame = payload::send_frame(&channel, &text, &format!("cap-{m}"));
        sessions[m % params.senders]
            .tx
            .send(frame)
            .await
            .context("a sender's session ended")?;
    }
    let expected = (params.messages * params.members) as u64;
    let last_send = Instant::now();
    while delivered.load(Ordering::Relaxed) < expected && last_send.elapsed() < DRAIN_WAIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = delivered.load(Ordering::Relaxed);
    let end = snapshot(&pids).await?;
    println!(
        "events: {} messages, {got} of {expected} deliveries",
        params.messages
    );
    if got < expected {
        bail!("only {got} of {expected} deliveries arrived within {DRAIN_WAIT:?} of the last send: the figures would be wrong");
    }
    let published = params.messages as f64;
    let store = end.store.minus(start.store);
    let link_sent = end.link_sent - start.link_sent;

    // closing
    let close_at = Instant::now();
    drop(sessions);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let closed = snapshot(&pids).await?;
    let down = baseline.remove(closed.directory.minus(end.directory), close_at.elapsed());

    let costs = UnitCosts {
        gateway_rss_kib_per_connection: per(connected.gateway_rss_kib - before.gateway_rss_kib, n),
        gateway_cpu_us_per_session_second: per(idle_gateway_cpu_s.max(0.0) * 1e6, session_seconds),
        gateway_cpu_us_per_delivered_event: per(
            (end.gateway_cpu_s - start.gateway_cpu_s) * 1e6,
            got as f64,
        ),
        cell_cpu_us_per_published_event: per((end.cell_cpu_s - start.cell_cpu_s) * 1e6, published),
        store_redis_commands_per_event: per(store.commands, published),
        store_redis_bytes_in_per_event: per(store.bytes_in, published),
        store_redis_cpu_us_per_event: per(store.cpu_s * 1e6, published),
        link_bytes_per_event_per_gateway: per(link_sent, published * 2.0),
        directory_commands_per_session_up: per(up.commands, n),
        directory_bytes_per_session_up: per(up.bytes_in + up.bytes_out, n),
        directory_cpu_us_per_session_up: per(up.cpu_s * 1e6, n),
        directory_commands_per_session_down: per(down.commands, n),
        directory_cpu_us_per_session_down: per(down.cpu_s * 1e6, n),
        directory_commands_per_session_second: per(idle.commands, session_seconds),
        directory_bytes_per_session_second: per(idle.bytes_in + idle.bytes_out, session_seconds),
        directory_cpu_us_per_session_second: per(idle.cpu_s * 1e6, session_seconds),
    };
    Ok((costs, got))
}

/// The traffic a deployment is sized for (assumptions, not measurements: each is a flag).
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// Concurrent users at each step (one session each).
    pub steps: Vec<f64>,
    pub regions: f64,
    pub messages_per_user_per_hour: f64,
    /// Online member sessions that receive each message.
    pub fanout: f64,
    /// Times a user goes offline and online again per hour.
    pub reconnects_per_user_per_hour: f64,
    /// `--max-connections` of a gateway.
    pub gateway_max_connections: f64,
    /// Cores of a gateway or cell host, and the share of them a plan may use.
    pub host_cores: f64,
    pub cpu_target: f64,
    /// Share of its one core a Redis may use (Redis executes commands on one thread).
    pub redis_core_target: f64,
}

/// One step of the model.
#[derive(Debug, Clone, Serialize)]
pub struct Projection {
    pub users: f64,
    pub users_per_region: f64,
    pub published_per_s_per_region: f64,
    pub delivered_per_s_per_region: f64,
    pub gateways_per_region: f64,
    pub gateway_bound: &'static str,
    pub gateway_memory_gib_per_region: f64,
    pub cells_per_region: f64,
    pub cell_bound: &'static str,
    pub store_redis_commands_per_s_per_region: f64,
    pub link_mbit_per_s_per_region: f64,
    pub directory_commands_per_s: f64,
    pub directory_cores: f64,
    pub directory_shards: f64,
    pub first_bottleneck: String,
}

/// Users at which one directory Redis reaches its core target with `profile`'s churn.
fn directory_limit_users(c: &UnitCosts, profile: &Profile) -> f64 {
    let per_user_us = c.directory_cpu_us_per_session_second
        + profile.reconnects_per_user_per_hour / 3600.0
            * (c.directory_cpu_us_per_session_up + c.directory_cpu_us_per_session_down);
    per(profile.redis_core_target * 1e6, per_user_us)
}

pub fn project(c: &UnitCosts, profile: &Profile, users: f64) -> Projection {
    let u = users / profile.regions;
    let published = u * profile.messages_per_user_per_hour / 3600.0;
    let delivered = published * profile.fanout;
    let host = profile.host_cores * profile.cpu_target;
    let by_connections = (u / profile.gateway_max_connections).ceil();
    let gateway_cores = (delivered * c.gateway_cpu_us_per_delivered_event
        + u * c.gateway_cpu_us_per_session_second)
        / 1e6;
    let by_cpu = (gateway_cores / host).ceil();
    let (gateways, gateway_bound) = if by_connections >= by_cpu {
        (by_connections.max(2.0), "connections")
    } else {
        (by_cpu.max(2.0), "CPU")
    };
    let cell_cores = published * c.cell_cpu_us_per_published_event / 1e6;
    let store_core = published * c.store_redis_cpu_us_per_event / 1e6;
    let cells_by_cpu = (cell_cores / host).ceil();
    let cells_by_store = (store_core / profile.redis_core_target).ceil();
    let (cells, cell_bound) = if cells_by_store >= cells_by_cpu {
        (cells_by_store.max(1.0), "its store Redis")
    } else {
        (cells_by_cpu.max(1.0), "CPU")
    };
    let changes = users * profile.reconnects_per_user_per_hour / 3600.0;
    let directory_commands = users * c.directory_commands_per_session_second
        + changes * (c.directory_commands_per_session_up + c.directory_commands_per_session_down);
    let directory_cores = (users * c.directory_cpu_us_per_session_second
        + changes * (c.directory_cpu_us_per_session_up + c.directory_cpu_us_per_session_down))
        / 1e6;
    let directory_shards = (directory_cores / profile.redis_core_target)
        .ceil()
        .max(1.0);
    let limit = directory_limit_users(c, profile);
    let first_bottleneck = if directory_shards > 1.0 {
        format!(
            "the directory Redis: one instance holds about {:.1}M users; this step needs {directory_shards:.0} shards",
            limit / 1e6
        )
    } else {
        format!(
            "gateways by {gateway_bound} (the directory Redis would hold about {:.1}M users)",
            limit / 1e6
        )
    };
    Projection {
        users,
        users_per_region: u,
        published_per_s_per_region: published,
        delivered_per_s_per_region: delivered,
        gateways_per_region: gateways,
        gateway_bound,
        gateway_memory_gib_per_region: u * c.gateway_rss_kib_per_connection / (1024.0 * 1024.0),
        cells_per_region: cells,
        cell_bound,
        store_redis_commands_per_s_per_region: published * c.store_redis_commands_per_event,
        link_mbit_per_s_per_region: published
            * gateways.min(profile.fanout)
            * c.link_bytes_per_event_per_gateway
            * 8.0
            / 1e6,
        directory_commands_per_s: directory_commands,
        directory_cores,
        directory_shards,
        first_bottleneck,
    }
}

impl CapacityReport {
    /// The Markdown tables of `docs/capacity.md`.
    pub fn markdown(&self, profile: &Profile) -> String {
        let c = &self.costs;
        let mut s = String::new();
        s.push_str(&format!(
            "Measured by `confab-load capacity` on a distributed deployment on loopback (two gateways, one cell, a store Redis and a directory Redis): {} sessions, one channel of {} members, {} messages at {} msg/s ({} of {} deliveries arrived), {:.0} s idle.\n\n",
            self.sessions, self.members, self.messages, self.rate, self.delivered,
            self.messages * self.members, self.idle_s
        ));
        s.push_str("| unit cost | value | phase |\n|---|---|---|\n");
        let rows: [(&str, f64, &str); 16] = [
            (
                "gateway RSS per connection, KiB",
                c.gateway_rss_kib_per_connection,
                "connect",
            ),
            (
                "gateway CPU per session-second (heartbeats, presence refresh), µs",
                c.gateway_cpu_us_per_session_second,
                "idle",
            ),
            (
                "gateway CPU per delivered event, µs",
                c.gateway_cpu_us_per_delivered_event,
                "events",
            ),
            (
                "cell CPU per published event, µs",
                c.cell_cpu_us_per_published_event,
                "events",
            ),
            (
                "store Redis commands per event",
                c.store_redis_commands_per_event,
                "events",
            ),
            (
                "store Redis bytes in per event",
                c.store_redis_bytes_in_per_event,
                "events",
            ),
            (
                "store Redis CPU per event, µs",
                c.store_redis_cpu_us_per_event,
                "events",
            ),
            (
                "link bytes per event per gateway",
                c.link_bytes_per_event_per_gateway,
                "events",
            ),
            (
                "directory Redis commands per session online",
                c.directory_commands_per_session_up,
                "connect",
            ),
            (
                "directory Redis bytes per session online",
                c.directory_bytes_per_session_up,
                "connect",
            ),
            (
                "directory Redis CPU per session online, µs",
                c.directory_cpu_us_per_session_up,
                "connect",
            ),
            (
                "directory Redis commands per session offline",
                c.directory_commands_per_session_down,
                "close",
            ),
            (
                "directory Redis CPU per session offline, µs",
                c.directory_cpu_us_per_session_down,
                "close",
            ),
            (
                "directory Redis commands per session-second",
                c.directory_commands_per_session_second,
                "idle",
            ),
            (
                "directory Redis bytes per session-second",
                c.directory_bytes_per_session_second,
                "idle",
            ),
            (
                "directory Redis CPU per session-second, µs",
                c.directory_cpu_us_per_session_second,
                "idle",
            ),
        ];
        for (name, value, phase) in rows {
            s.push_str(&format!("| {name} | {value:.3} | {phase} |\n"));
        }
        s.push_str(&format!(
            "\nProfile (assumed): {:.0} regions, {} messages per user per hour, each delivered to {} online sessions, {} reconnects per user per hour, gateways of at most {:.0} connections, hosts of {:.0} cores used to {:.0}%, each Redis to {:.0}% of its core.\n\n",
            profile.regions, profile.messages_per_user_per_hour, profile.fanout,
            profile.reconnects_per_user_per_hour, profile.gateway_max_connections,
            profile.host_cores, profile.cpu_target * 100.0, profile.redis_core_target * 100.0
        ));
        s.push_str("| concurrent users | per region: published / delivered ev/s | gateways (bound by) | gateway memory GiB | cells (bound by) | store Redis cmd/s | link Mbit/s | directory cmd/s, cores, shards | first bottleneck |\n|---|---|---|---|---|---|---|---|---|\n");
        for p in &self.projections {
            s.push_str(&format!(
                "| {:.0}M ({:.0}k per region) | {:.0} / {:.0} | {:.0} ({}) | {:.1} | {:.0} ({}) | {:.0} | {:.1} | {:.0}, {:.2}, {:.0} | {} |\n",
                p.users / 1e6, p.users_per_region / 1e3, p.published_per_s_per_region,
                p.delivered_per_s_per_region, p.gateways_per_region, p.gateway_bound,
                p.gateway_memory_gib_per_region, p.cells_per_region, p.cell_bound,
                p.store_redis_commands_per_s_per_region, p.link_mbit_per_s_per_region,
                p.directory_commands_per_s, p.directory_cores, p.directory_shards,
                p.first_bottleneck
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> UnitCosts {
        UnitCosts {
            gateway_rss_kib_per_connection: 4.0,
            gateway_cpu_us_per_session_second: 1.0,
            gateway_cpu_us_per_delivered_event: 2.0,
            cell_cpu_us_per_published_event: 100.0,
            store_redis_commands_per_event: 1.0,
            store_redis_bytes_in_per_event: 500.0,
            store_redis_cpu_us_per_event: 50.0,
            link_bytes_per_event_per_gateway: 300.0,
            directory_commands_per_session_up: 2.0,
            directory_bytes_per_session_up: 300.0,
            directory_cpu_us_per_session_up: 20.0,
            directory_commands_per_session_down: 2.0,
            directory_cpu_us_per_session_down: 20.0,
            directory_commands_per_session_second: 0.1,
            directory_bytes_per_session_second: 10.0,
            directory_cpu_us_per_session_second: 0.5,
        }
    }

    fn profile() -> Profile {
        Profile {
            steps: vec![1e6, 1e7],
            regions: 3.0,
            messages_per_user_per_hour: 12.0,
            fanout: 20.0,
            reconnects_per_user_per_hour: 1.0,
            gateway_max_connections: 50_000.0,
            host_cores: 16.0,
            cpu_target: 0.5,
            redis_core_target: 0.5,
        }
    }

    #[test]
    fn gateways_are_bound_by_connections_when_fanout_is_cheap() {
        let p = project(&costs(), &profile(), 3e6);
        // 1M users per region / 50,000 connections per gateway.
        assert_eq!(p.gateways_per_region, 20.0);
        assert_eq!(p.gateway_bound, "connections");
        // 1M × 12 / 3600 messages/s, 50 µs of store Redis each, half a core per store.
        assert!((p.published_per_s_per_region - 3333.33).abs() < 0.01);
        assert_eq!(p.cells_per_region, 1.0);
    }

    #[test]
    fn the_directory_needs_shards_once_its_one_core_is_used_up() {
        // 0.5 µs/s + 1/3600 × 40 µs per user: about 0.511 µs/s, so 0.5 core holds ~0.98M.
        let limit = directory_limit_users(&costs(), &profile());
        assert!((limit - 978_261.0).abs() < 10.0, "{limit}");
        let p = project(&costs(), &profile(), 1e7);
        assert_eq!(p.directory_shards, 11.0);
        assert!(p.first_bottleneck.starts_with("the directory Redis"));
    }
}
