//! The live-move benchmark (`confab-load move`): the pause a workspace sees while it moves
//! between cells under traffic, and whether the workspace beside it notices.
//!
//! It starts its own local deployment (a directory Redis, two cells each with a Redis store,
//! one gateway; every Redis `appendonly yes`, `appendfsync always`), creates two workspaces on
//! the first cell — `moving` and `steady`, side by side — seeds `moving` with messages, connects
//! the clients (half in each workspace, a few members per channel, one sender per channel),
//! runs traffic, moves `moving` to the second cell half-way, and reports:
//! - for `moving`, the longest time from a send to its ack and from a send to its delivery, for
//!   sends made from just before the move until just after it (the pause), and the same before
//!   the move (the baseline);
//! - for `steady`, its p99 send→ack and send→delivery before the move and during it, as ratios;
//! - the move's total time and how long its writes waited (the gateway's own figures).
//!
//! Clients behave as the SDK does: a closed socket (`4010` when the workspace moves) is
//! reconnected with `resume`, and unacked sends are sent again with the same `client_msg_id`
//! and their original send time, so a resent message's latency includes the reconnect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::api::mint_jwt;
use crate::client::Connector;
use crate::target::{ServerKind, Target};

const JWT_SECRET: &str = "move-bench-secret";
const ADMIN_TOKEN: &str = "move-bench-admin";
const CLUSTER_SECRET: &str = "move-bench-cluster";
const REGION: &str = "bench";
const MOVING: &str = "moving";
const STEADY: &str = "steady";
/// Sends seeded at once while the workspace is filled.
const SEED_CONCURRENCY: usize = 32;

/// What the benchmark is asked to do.
#[derive(Debug, Clone)]
pub struct MoveBench {
    pub confab: PathBuf,
    pub out: PathBuf,
    /// Connected clients, half in each workspace.
    pub clients: usize,
    /// Channels per workspace.
    pub channels: usize,
    /// Messages seeded into the moving workspace before the run.
    pub messages: usize,
    /// Messages per second sent in each workspace during the run.
    pub rate: f64,
    /// Seconds of traffic before the move, and after it.
    pub before_s: f64,
    pub after_s: f64,
}

/// Latency figures of one workspace over one window, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Window {
    pub sends: u64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    pub delivery_p99_ms: f64,
    pub delivery_max_ms: f64,
}

/// The benchmark's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct MoveReport {
    pub clients: usize,
    pub channels: usize,
    pub seeded_messages: usize,
    pub rate_per_workspace: f64,
    /// The move as the gateway reported it.
    pub move_total_ms: u64,
    pub move_freeze_ms: u64,
    pub move_keys: u64,
    /// The moving workspace before the move, and across it (sends from 1 s before the move
    /// began to 1 s after it returned).
    pub moving_before: Window,
    pub moving_across: Window,
    /// The steady workspace before the move, and while it ran.
    pub steady_before: Window,
    pub steady_during: Window,
    /// steady p99 during / before.
    pub steady_ack_p99_ratio: f64,
    pub steady_delivery_p99_ratio: f64,
    /// Messages acked but never delivered to a member (must be 0).
    pub undelivered: u64,
}

/// One measurement: when the message was sent (µs since the run's start), how long its ack or
/// its delivery took, and to which workspace it belongs.
#[derive(Debug, Clone, Copy)]
struct Sample {
    sent_us: u64,
    latency_us: u64,
    moving: bool,
    delivery: bool,
}

/// A restartable-free process: killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Proc> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .env("CONFAB_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Proc(child))
}

async fn redis(dir: &Path, name: &str) -> Result<(Proc, String)> {
    let port = free_port()?;
    let data = dir.join(name);
    std::fs::create_dir_all(&data)?;
    let args = crate::chaos::cluster::durable_redis_args(port, &data);
    let proc = spawn(
        Path::new("redis-server"),
        &args,
        &dir.join(format!("{name}.log")),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("{name} did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((proc, format!("redis://127.0.0.1:{port}")))
}

async fn wait_ready(http: &reqwest::Client, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} never answered 200");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The deployment: kept alive while the benchmark runs.
struct Deployment {
    _procs: Vec<Proc>,
    gateway: String,
}

async fn deploy(confab: &Path, dir: &Path, http: &reqwest::Client) -> Result<Deployment> {
    // Every run starts from empty stores.
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let mut procs = Vec::new();
    let (p, directory) = redis(dir, "redis-directory").await?;
    procs.push(p);
    for cell in ["c1", "c2"] {
        let (p, store) = redis(dir, &format!("redis-{cell}")).await?;
        procs.push(p);
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let args: Vec<String> = [
            "cell",
            "--id",
            cell,
            "--region",
            REGION,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--advertise",
            &url,
            "--redis",
            &store,
            "--directory",
            &directory,
            "--cluster-secret",
            CLUSTER_SECRET,
        ]
        .map(String::from)
        .to_vec();
        procs.push(spawn(confab, &args, &dir.join(format!("cell-{cell}.log"))).await?);
        wait_ready(http, &format!("{url}/readyz")).await?;
    }
    let port = free_port()?;
    let args: Vec<String> = [
        "gateway",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--redis",
        &directory,
        "--jwt-secret",
        JWT_SECRET,
        "--admin-token",
        ADMIN_TOKEN,
        "--cluster-secret",
        CLUSTER_SECRET,
        "--client-rate",
        "1000",
        "--max-connections",
        "100000",
    ]
    .map(String::from)
    .to_vec();
    procs.push(spawn(confab, &args, &dir.join("gateway.log")).await?);
    let gateway = format!("http://127.0.0.1:{port}");
    wait_ready(http, &format!("{gateway}/readyz")).await?;
    Ok(Deployment {
        _procs: procs,
        gateway,
    })
}

async fn admin(http: &reqwest::Client, gateway: &str, path: &str, body: Value) -> Result<Value> {
    let reply = http
        .post(format!("{gateway}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = reply.status();
    let body: Value = reply.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST {path}: {status} {body}");
    }
    Ok(body)
}

fn user(index: usize) -> String {
    format!("u{index}")
}

fn token(ws: &str, user: &str) -> Result<String> {
    mint_jwt(JWT_SECRET, ws, user, 24 * 3600)
}

/// Creates the workspace's channels; channel `k` has the users `k*m .. k*m+m`.
async fn create_channels(
    http: &reqwest::Client,
    gateway: &str,
    ws: &str,
    channels: usize,
    per_channel: usize,
) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for k in 0..channels {
        let creator = user(k * per_channel);
        let members: Vec<String> = (1..per_channel)
            .map(|i| user(k * per_channel + i))
            .collect();
        let reply = http
            .post(format!("{gateway}/v1/channels"))
            .bearer_auth(token(ws, &creator)?)
            .json(&json!({"name": format!("ch{k}"), "kind": "public", "members": members}))
            .send()
            .await?;
        let status = reply.status();
        let body: Value = reply.json().await.unwrap_or(Value::Null);
        if status.as_u16() != 201 {
            bail!("creating channel {k} of {ws}: {status} {body}");
        }
        ids.push(body["id"].as_str().context("channel id")?.to_string());
    }
    Ok(ids)
}

async fn seed(
    http: &reqwest::Client,
    gateway: &str,
    channels: &[String],
    per_channel: usize,
    messages: usize,
) -> Result<()> {
    let http = http.clone();
    let gateway = gateway.to_string();
    let jobs: Vec<(String, String)> = (0..messages)
        .map(|i| {
            let k = i % channels.len();
            (channels[k].clone(), user(k * per_channel))
        })
        .collect();
    futures_util::stream::iter(jobs)
        .map(|(channel, sender)| {
            let (http, gateway) = (http.clone(), gateway.clone());
            async move {
                let reply = http
                    .post(format!("{gateway}/v1/channels/{channel}/messages"))
                    .bearer_auth(token(MOVING, &sender)?)
                    .json(&json!({"text": "seeded history ".repeat(8)}))
                    .send()
                    .await?;
                if reply.status().as_u16() != 201 {
                    bail!("seeding: {}", reply.status());
                }
                Ok(())
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .collect::<Vec<Result<()>>>()
        .await
        .into_iter()
        .collect()
}

/// One client: a member of `channel`, sending every `interval` when it is its sender.
struct ClientPlan {
    index: usize,
    ws: &'static str,
    token: String,
    channel: String,
    send_every: Option<Duration>,
}

/// A client's outcome.
#[derive(Default)]
struct ClientOutcome {
    samples: Vec<Sample>,
    /// Sends acked: `client_msg_id`s and their send time (µs).
    acked: Vec<(String, u64)>,
    /// Messages delivered to this client: `client_msg_id`s.
    delivered: Vec<String>,
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

/// Runs one client until `stop`; reconnects with `resume` whenever its socket closes.
async fn client(
    plan: ClientPlan,
    connector: Arc<Connector>,
    start: Instant,
    stop: CancellationToken,
) -> Result<ClientOutcome> {
    let mut out = ClientOutcome::default();
    let mut last_seq = 0u64;
    // client_msg_id -> send time (µs), for sends not acked yet.
    let mut unacked: Vec<(String, u64)> = Vec::new();
    let mut request_ids: HashMap<u64, String> = HashMap::new();
    let mut next_id = 1u64;
    let mut next_msg = 0u64;
    let moving = plan.ws == MOVING;
    'connection: while !stop.is_cancelled() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ws = connector.connect_retrying(plan.index, deadline).await?;
        let resume = [(plan.channel.clone(), last_seq)];
        let resume: &[(String, u64)] = if last_seq > 0 { &resume } else { &[] };
        if crate::client::hello(&mut ws, &plan.token, resume)
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // Whatever was not acked goes again, with its id and its first send time.
        request_ids.clear();
        for (cmid, sent_us) in &unacked {
            let id = next_id;
            next_id += 1;
            request_ids.insert(id, cmid.clone());
            let frame = json!({"op": "send", "id": id, "channel": plan.channel,
                "text": format!("{cmid}|{sent_us}"), "client_msg_id": cmid});
            if ws.send(Message::text(frame.to_string())).await.is_err() {
                continue 'connection;
            }
        }
        let period = plan.send_every.unwrap_or(Duration::from_secs(10));
        // Senders are spread over the period, so that sends are even in time and some land in
        // every short window (a freeze among them).
        let phase = period.mul_f64((plan.index % 101) as f64 / 101.0);
        let mut tick = tokio::time::interval_at(Instant::now() + phase, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => break 'connection,
                _ = tick.tick() => {
                    let frame = if plan.send_every.is_some() {
                        let cmid = format!("{}-{}", plan.index, next_msg);
                        next_msg += 1;
                        let sent_us = micros(start);
                        unacked.push((cmid.clone(), sent_us));
                        let id = next_id;
                        next_id += 1;
                        request_ids.insert(id, cmid.clone());
                        json!({"op": "send", "id": id, "channel": plan.channel,
                            "text": format!("{cmid}|{sent_us}"), "client_msg_id": cmid})
                    } else {
                        continue;
                    };
                    if ws.send(Message::text(frame.to_string())).await.is_err() {
                        continue 'connection;
                    }
                }
                _ = ping.tick() => {
                    let frame = json!({"op": "ping", "id": 0});
                    if ws.send(Message::text(frame.to_string())).await.is_err() {
                        continue 'connection;
                    }
                }
                frame = ws.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(_)) => continue,
                        None | Some(Err(_)) => continue 'connection,
                    };
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                    handle_frame(&frame, &plan, start, moving, &mut out, &mut unacked, &mut request_ids, &mut last_seq);
                }
            }
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn handle_frame(
    frame: &Value,
    plan: &ClientPlan,
    start: Instant,
    moving: bool,
    out: &mut ClientOutcome,
    unacked: &mut Vec<(String, u64)>,
    request_ids: &mut HashMap<u64, String>,
    last_seq: &mut u64,
) {
    let now = micros(start);
    match frame["op"].as_str() {
        Some("ack") => {
            let Some(cmid) = frame["id"].as_u64().and_then(|id| request_ids.remove(&id)) else {
                return;
            };
            if let Some(pos) = unacked.iter().position(|(c, _)| *c == cmid) {
                let (cmid, sent_us) = unacked.remove(pos);
                out.samples.push(Sample {
                    sent_us,
                    latency_us: now.saturating_sub(sent_us),
                    moving,
                    delivery: false,
                });
                out.acked.push((cmid, sent_us));
            }
        }
        Some("error") if frame["code"] == "unavailable" => {
            // The send stays unacked; it goes again with the next connection or tick.
            if let Some(id) = frame["id"].as_u64() {
                request_ids.remove(&id);
            }
        }
        Some("event") if frame["type"] == "message" && frame["channel"] == json!(plan.channel) => {
            let seq = frame["seq"].as_u64().unwrap_or(0);
            if seq <= *last_seq {
                return;
            }
            *last_seq = seq;
            let text = frame["text"].as_str().unwrap_or("");
            let Some((cmid, sent)) = text.split_once('|') else {
                return;
            };
            let Ok(sent_us) = sent.parse::<u64>() else {
                return;
            };
            if plan.send_every.is_none() {
                out.samples.push(Sample {
                    sent_us,
                    latency_us: now.saturating_sub(sent_us),
                    moving,
                    delivery: true,
                });
                out.delivered.push(cmid.to_string());
            }
        }
        _ => {}
    }
}

fn window(samples: &[Sample], moving: bool, from_us: u64, to_us: u64) -> Window {
    let mut acks = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!("3 sigfig is valid"));
    let mut deliveries = acks.clone();
    for s in samples
        .iter()
        .filter(|s| s.moving == moving && (from_us..to_us).contains(&s.sent_us))
    {
        let h = if s.delivery {
            &mut deliveries
        } else {
            &mut acks
        };
        let _ = h.record(s.latency_us.max(1));
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Window {
        sends: acks.len(),
        ack_p99_ms: ms(acks.value_at_quantile(0.99)),
        ack_max_ms: ms(acks.max()),
        delivery_p99_ms: ms(deliveries.value_at_quantile(0.99)),
        delivery_max_ms: ms(deliveries.max()),
    }
}

/// Runs the benchmark and returns its report (also written to `out/move.json`).
pub async fn run(bench: MoveBench) -> Result<MoveReport> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let deployment = deploy(&bench.confab, &bench.out.join("move-cluster"), &http).await?;
    let gw = deployment.gateway.clone();
    // Both workspaces on c1: the second cell takes none while drained.
    admin(&http, &gw, "/admin/v1/cells/c2/drain", json!({})).await?;
    for ws in [MOVING, STEADY] {
        admin(
            &http,
            &gw,
            "/admin/v1/workspaces",
            json!({"id": ws, "region": REGION}),
        )
        .await?;
    }
    admin(&http, &gw, "/admin/v1/cells/c2/undrain", json!({})).await?;
    let per_ws = (bench.clients / 2).max(bench.channels);
    let per_channel = (per_ws / bench.channels).max(2);
    let mut channels = HashMap::new();
    for ws in [MOVING, STEADY] {
        channels.insert(
            ws,
            create_channels(&http, &gw, ws, bench.channels, per_channel).await?,
        );
    }
    eprintln!("seeding {} messages into {MOVING}", bench.messages);
    seed(&http, &gw, &channels[MOVING], per_channel, bench.messages).await?;

    let target = Target::external(ServerKind::Confab, vec![gw.clone()], Vec::new());
    let connector = Arc::new(Connector::new(&target, false, false).await?);
    let start = Instant::now();
    let stop = CancellationToken::new();
    let send_every = Duration::from_secs_f64(bench.channels as f64 / bench.rate.max(0.1));
    let mut tasks = Vec::new();
    let clients = 2 * bench.channels * per_channel;
    for (w, ws) in [MOVING, STEADY].into_iter().enumerate() {
        for (k, channel) in channels[ws].iter().enumerate() {
            for m in 0..per_channel {
                let index = w * per_ws + k * per_channel + m;
                let plan = ClientPlan {
                    index,
                    ws,
                    token: token(ws, &user(k * per_channel + m))?,
                    channel: channel.clone(),
                    send_every: (m == 0).then_some(send_every),
                };
                tasks.push(tokio::spawn(client(
                    plan,
                    connector.clone(),
                    start,
                    stop.clone(),
                )));
            }
        }
    }
    eprintln!(
        "{} clients connected; traffic for {} s before the move",
        tasks.len(),
        bench.before_s
    );
    tokio::time::sleep(Duration::from_secs_f64(bench.before_s)).await;
    let move_start = micros(start);
    let moved = admin(
        &http,
        &gw,
        &format!("/admin/v1/workspaces/{MOVING}/move"),
        json!({"cell": "c2"}),
    )
    .await?;
    let move_end = micros(start);
    eprintln!("moved: {moved}; traffic for {} s more", bench.after_s);
    tokio::time::sleep(Duration::from_secs_f64(bench.after_s)).await;
    stop.cancel();
    let mut samples = Vec::new();
    let (mut acked, mut delivered) = (Vec::new(), std::collections::HashSet::new());
    for task in tasks {
        let outcome = task.await.context("client task")??;
        samples.extend(outcome.samples);
        acked.extend(outcome.acked);
        delivered.extend(outcome.delivered);
    }
    // Sends of the last two seconds may still be on their way when the clients stop.
    let settled_us = micros(start).saturating_sub(2_000_000);
    let undelivered = acked
        .iter()
        .filter(|(cmid, sent_us)| *sent_us < settled_us && !delivered.contains(cmid))
        .count() as u64;
    let warm_us = 1_000_000;
    let before = (warm_us, move_start);
    let across = (move_start.saturating_sub(1_000_000), move_end + 1_000_000);
    let during = (move_start, move_end.max(move_start + 1));
    let steady_before = window(&samples, false, before.0, before.1);
    let steady_during = window(&samples, false, during.0, during.1 + 1_000_000);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let report = MoveReport {
        clients,
        channels: bench.channels,
        seeded_messages: bench.messages,
        rate_per_workspace: bench.rate,
        move_total_ms: moved["duration_ms"].as_u64().unwrap_or(0),
        move_freeze_ms: moved["freeze_ms"].as_u64().unwrap_or(0),
        move_keys: moved["keys"].as_u64().unwrap_or(0),
        moving_before: window(&samples, true, before.0, before.1),
        moving_across: window(&samples, true, across.0, across.1),
        steady_before,
        steady_during,
        steady_ack_p99_ratio: ratio(steady_during.ack_p99_ms, steady_before.ack_p99_ms),
        steady_delivery_p99_ratio: ratio(
            steady_during.delivery_p99_ms,
            steady_before.delivery_p99_ms,
        ),
        undelivered,
    };
    std::fs::create_dir_all(&bench.out)?;
    std::fs::write(
        bench.out.join("move.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}
