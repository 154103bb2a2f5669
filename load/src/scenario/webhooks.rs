//! The webhook scenario: bots in busy channels, with receivers (in this process) answering at
//! once; and what webhook traffic costs the chat path.
//!
//! 1. Fanout at max rate, to find the chat path's limit on this machine in this run.
//! 2. Fanout at half that rate with no webhook traffic: the baseline p99.
//! 3. `bots` bot users, each a member of `channels` busy channels with a webhook to a local
//!    receiver; messages are posted into the busy channels at `rate` (each one is a delivery
//!    to every bot) while the fanout of step 2 runs again: its p99 against the baseline is the
//!    cost of webhooks to the chat path, and the receivers' count over the phase is the
//!    deliveries/s sustained. Delivery latency is from the message's publish (its text carries
//!    the publish time) to its arrival at the receiver, which answers 200 at once.
//!
//! The receiver is a minimal keep-alive HTTP/1.1 server on a loopback port; it checks nothing
//! but counts every delivery and its `delivery_id`, so duplicates and losses are reported.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::fanout::{self, FanoutParams};
use super::{require_confab, RunContext};
use crate::payload;
use crate::report::RunReport;
use crate::stats::LatencySummary;

/// Parameters of one webhook run.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookParams {
    /// Bot users, each with one webhook.
    pub bots: usize,
    /// Busy channels; every bot is a member of each.
    pub channels: usize,
    /// Messages/s posted into the busy channels in total (each is `bots` deliveries).
    pub rate: f64,
    /// HTTP posts in flight at once.
    pub posters: usize,
    /// The chat-path measurement: fanout to this many subscribers.
    pub fanout: FanoutParams,
    /// How long the deliveries may take to finish after posting stops.
    pub drain: Duration,
}

impl Default for WebhookParams {
    fn default() -> Self {
        WebhookParams {
            bots: 10,
            channels: 10,
            rate: 500.0,
            posters: 16,
            fanout: FanoutParams {
                subscribers: 200,
                duration: Duration::from_secs(10),
                ..FanoutParams::default()
            },
            drain: Duration::from_secs(30),
        }
    }
}

/// What the receivers saw.
struct Received {
    deliveries: AtomicU64,
    ids: Mutex<HashSet<String>>,
    /// Microseconds from publish to arrival.
    latency: Mutex<Histogram<u64>>,
}

impl Received {
    fn new() -> Result<Self> {
        Ok(Received {
            deliveries: AtomicU64::new(0),
            ids: Mutex::new(HashSet::new()),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3).context("latency histogram")?,
            ),
        })
    }

    fn record(&self, body: &[u8]) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        if let Some(id) = value["delivery_id"].as_str() {
            if let Ok(mut ids) = self.ids.lock() {
                ids.insert(id.to_string());
            }
        }
        let published = value["text"].as_str().and_then(payload::parse_publish_us);
        if let (Some(published), Ok(mut h)) = (published, self.latency.lock()) {
            h.saturating_record(payload::now_us().saturating_sub(published).max(1));
        }
    }

    fn latency(&self) -> LatencySummary {
        self.latency
            .lock()
            .map(|h| LatencySummary::from_histogram(&h))
            .unwrap_or_default()
    }

    fn distinct(&self) -> u64 {
        self.ids.lock().map(|ids| ids.len() as u64).unwrap_or(0)
    }
}

/// Starts the receiver; returns its URL.
async fn start_receiver(received: Arc<Received>, stop: CancellationToken) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the webhook receiver")?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { break };
                    tokio::spawn(serve(stream, received.clone()));
                }
            }
        }
    });
    Ok(url)
}

async fn serve(mut stream: TcpStream, received: Arc<Received>) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let start = head_end + 4;
        while buf.len() < start + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        received.record(&buf[start..start + length]);
        buf.drain(..start + length);
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Posts messages into the busy channels at `rate` until `stop`; returns how many were
/// accepted.
async fn post_load(
    http: reqwest::Client,
    base: String,
    token: String,
    channels: Vec<String>,
    p: WebhookParams,
    stop: CancellationToken,
) -> u64 {
    let posted = Arc::new(AtomicU64::new(0));
    let per_poster = p.rate / p.posters.max(1) as f64;
    let mut tasks = Vec::new();
    for j in 0..p.posters.max(1) {
        let (http, base, token, channels, stop, posted) = (
            http.clone(),
            base.clone(),
            token.clone(),
            channels.clone(),
            stop.clone(),
            posted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / per_poster.max(0.001));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut i = j;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let channel = &channels[i % channels.len()];
                i += p.posters.max(1);
                let text = payload::make_text(payload::now_us(), p.fanout.size);
                let sent = http
                    .post(format!("{base}/v1/channels/{channel}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({ "text": text }))
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().as_u16() == 201) {
                    posted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    posted.load(Ordering::Relaxed)
}

/// Runs the scenario; the report is the fanout run under webhook load, with the webhook and
/// baseline figures in `extra`.
pub async fn run(ctx: &RunContext, p: &WebhookParams) -> Result<RunReport> {
    require_confab(ctx, "webhooks")?;
    let api = ctx.api()?;
    let base = ctx.target.bases[0].trim_end_matches('/').to_string();

    // 1 and 2: the chat path alone.
    let max = fanout::run(
        ctx,
        &FanoutParams {
            rate: None,
            ..p.fanout.clone()
        },
        "webhooks-fanout-max",
    )
    .await?;
    let half = FanoutParams {
        rate: Some((max.published_per_s / 2.0).max(1.0)),
        ..p.fanout.clone()
    };
    let baseline = fanout::run(ctx, &half, "webhooks-fanout-baseline").await?;

    // 3: bots, busy channels, webhooks.
    let received = Arc::new(Received::new()?);
    let stop_receiver = CancellationToken::new();
    let url = start_receiver(received.clone(), stop_receiver.clone()).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(p.posters.max(1) * 2)
        .timeout(Duration::from_secs(30))
        .build()?;
    let bots: Vec<String> = (0..p.bots).map(|i| ctx.user("bot", i)).collect();
    let poster = ctx.user("busy", 0);
    let poster_token = api.token(&poster).await?;
    let mut channels = Vec::new();
    for c in 0..p.channels.max(1) {
        let name = format!("busy-{}-{c}", ctx.run_id);
        channels.push(ctx.create_channel(&poster_token, &name, &bots).await?);
    }
    for bot in &bots {
        let token = api.token(bot).await?;
        let reply = http
            .post(format!("{base}/v1/webhooks"))
            .bearer_auth(&token)
            .json(&json!({"url": url, "events": ["message"]}))
            .send()
            .await
            .context("POST /v1/webhooks")?;
        anyhow::ensure!(
            reply.status().as_u16() == 201,
            "POST /v1/webhooks answered {}",
            reply.status()
        );
    }
    info!(
        bots = p.bots,
        channels = p.channels,
        rate = p.rate,
        "webhooks registered, posting"
    );

    let stop_posting = CancellationToken::new();
    let posting = tokio::spawn(post_load(
        http.clone(),
        base.clone(),
        poster_token.clone(),
        channels.clone(),
        p.clone(),
        stop_posting.clone(),
    ));
    // Let the webhook traffic reach its steady state before measuring the chat path.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window_start = (
        received.deliveries.load(Ordering::Relaxed),
        payload::now_us(),
    );
    let mut loaded = fanout::run(ctx, &half, "webhooks-fanout-with-webhooks").await?;
    let window_end = (
        received.deliveries.load(Ordering::Relaxed),
        payload::now_us(),
    );
    stop_posting.cancel();
    let posted = posting.await.unwrap_or(0);
    let expected = posted * p.bots as u64;
    super::wait_until(
        || received.distinct() >= expected,
        || received.deliveries.load(Ordering::Relaxed),
        Duration::from_secs(5),
        p.drain,
    )
    .await;
    stop_receiver.cancel();

    let window_s = (window_end.1.saturating_sub(window_start.1)) as f64 / 1e6;
    let deliveries_per_s = (window_end.0 - window_start.0) as f64 / window_s.max(0.001);
    let latency = received.latency();
    let distinct = received.distinct();
    let ratio = if baseline.latency.p99_ms > 0.0 {
        loaded.latency.p99_ms / baseline.latency.p99_ms
    } else {
        0.0
    };
    loaded.scenario = "webhooks".into();
    loaded.case = format!(
        "bots={} channels={} {} msg/s; fanout S={} at {:.0} msg/s",
        p.bots,
        p.channels,
        p.rate,
        p.fanout.subscribers,
        half.rate.unwrap_or(0.0)
    );
    let extra = &mut loaded.extra;
    extra.insert("fanout_max_msgs_per_s".into(), max.published_per_s);
    extra.insert("fanout_p99_baseline_ms".into(), baseline.latency.p99_ms);
    extra.insert("fanout_p99_with_webhooks_ms".into(), loaded.latency.p99_ms);
    extra.insert("fanout_p99_ratio".into(), ratio);
    extra.insert("webhook_deliveries_per_s".into(), deliveries_per_s);
    extra.insert("webhook_latency_p50_ms".into(), latency.p50_ms);
    extra.insert("webhook_latency_p99_ms".into(), latency.p99_ms);
    extra.insert("webhook_posted".into(), posted as f64);
    extra.insert("webhook_expected".into(), expected as f64);
    extra.insert("webhook_distinct_delivered".into(), distinct as f64);
    extra.insert(
        "webhook_duplicates".into(),
        received
            .deliveries
            .load(Ordering::Relaxed)
            .saturating_sub(distinct) as f64,
    );
    if distinct < expected {
        loaded.failures.push(format!(
            "{} of {expected} webhook deliveries missing after the drain",
            expected - distinct
        ));
    }
    loaded.params = serde_json::to_value(p).unwrap_or(Value::Null);
    println!(
        "webhooks: {deliveries_per_s:.0} deliveries/s, latency p50 {:.2} ms p99 {:.2} ms; fanout p99 {:.2} ms with vs {:.2} ms without (x{ratio:.2}) at {:.0} msg/s (half of max {:.0})",
        latency.p50_ms,
        latency.p99_ms,
        loaded.latency.p99_ms,
        baseline.latency.p99_ms,
        half.rate.unwrap_or(0.0),
        max.published_per_s
    );
    Ok(loaded)
}
