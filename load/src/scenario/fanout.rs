//! Scenario 1, fanout: one channel, S subscribers, P publishers, at a fixed rate or as fast as
//! deliveries allow; and scenario 5 when the target has several gateway URLs (subscribers are
//! spread round-robin over them, publishers use the first).
//!
//! With `channels` K > 1 (confab only) there are K channels side by side: subscriber i and
//! publisher j are members of channel i mod K and j mod K (at least one publisher each), and
//! every publisher sends the same share of the rate. Many channels with many senders load a
//! cell's actors (one actor per channel); many channels of 1,000 members are how 15,000
//! connections get the same deliveries per second as 1,000.
//!
//! Against confab the channel is created over HTTP with every subscriber and publisher as a
//! member before anyone connects; each subscriber tracks the channel's seqs from `last_seq` in
//! its `ready`, and the final seq is the highest one acked to a publisher. Against the
//! reference server each publisher sends `message`-shaped frames on its own stream with its
//! own seqs from 1, and the final seq is the number it sent.
//!
//! "Max rate" is closed-loop on deliveries: publishers keep at most `window` messages per
//! subscriber in flight (published but not yet received, on average), so the server is kept
//! busy without letting the load generator fall so far behind that the server's slow-consumer
//! rule fires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{open_many, wait_until, RunContext};
use crate::client::{self, Ended, Inbox, Received, Shared, Ws};
use crate::nats;
use crate::payload;
use crate::progress;
use crate::report::RunReport;
use crate::seq::SeqTotals;
use crate::stats::Counters;
use crate::target::ServerKind;

/// Parameters of one fanout run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutParams {
    pub subscribers: usize,
    /// Publishers (at least one per channel).
    pub publishers: usize,
    /// Channels the subscribers and publishers are spread over (1: one channel for all).
    pub channels: usize,
    /// Total publish rate in messages/s; `None` for max rate.
    pub rate: Option<f64>,
    /// Message text size in bytes.
    pub size: usize,
    /// Texts padded with words (compressible like chat) instead of one repeated letter.
    pub words: bool,
    pub duration: Duration,
    /// Max-rate mode: messages in flight per subscriber (on average).
    pub window: u64,
    /// How long deliveries may stall after publishing before the rest count as lost.
    pub drain: Duration,
}

impl Default for FanoutParams {
    fn default() -> Self {
        FanoutParams {
            subscribers: 1000,
            publishers: 1,
            channels: 1,
            rate: None,
            size: 100,
            words: false,
            duration: Duration::from_secs(10),
            window: 64,
            drain: Duration::from_secs(5),
        }
    }
}

impl FanoutParams {
    /// `S=1000 100B max` / `S=1000 100B 50 msg/s` / `S=15000 K=15 100B 100 msg/s`.
    pub fn case(&self) -> String {
        let rate = match self.rate {
            Some(r) => format!("{} msg/s", crate::report::fmt_num(r)),
            None => "max".into(),
        };
        let channels = match self.channel_count() {
            1 => String::new(),
            k => format!(" K={k}"),
        };
        let words = if self.words { " words" } else { "" };
        format!(
            "S={}{channels} {}B{words} {}",
            self.subscribers, self.size, rate
        )
    }

    /// Channels actually used: at least 1, at most one per subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels.clamp(1, self.subscribers.max(1))
    }

    /// Publishers actually used: at least one per channel.
    pub fn publisher_count(&self) -> usize {
        self.publishers.max(self.channel_count())
    }

    /// The total rate (messages/s) at which each subscriber receives `deliveries_per_s ÷
    /// subscribers` messages/s, so the run delivers `deliveries_per_s` events/s.
    pub fn rate_for_deliveries(&self, deliveries_per_s: f64) -> f64 {
        let per_channel = deliveries_per_s / self.subscribers.max(1) as f64;
        per_channel * self.channel_count() as f64
    }
}

/// A case's label, marked with what its confab connections asked for: batched frames
/// (`?batch=1`), permessage-deflate.
pub fn labelled(case: String, batch: bool, deflate: bool) -> String {
    let mut case = case;
    if batch {
        case.push_str(" batch=1");
    }
    if deflate {
        case.push_str(" deflate");
    }
    case
}

/// The closed-loop gate of max-rate publishing, shared by every publisher of a run.
#[derive(Debug)]
pub struct Gate {
    /// Messages sent and not refused.
    sent: AtomicU64,
    receivers: u64,
    window: u64,
}

impl Gate {
    pub fn new(receivers: usize, window: u64) -> Self {
        Gate {
            sent: AtomicU64::new(0),
            receivers: receivers.max(1) as u64,
            window: window.max(1),
        }
    }

    /// How many more messages may be sent now, given the deliveries so far.
    pub fn allowance(&self, delivered: u64) -> u64 {
        let sent = self.sent.load(Ordering::Relaxed);
        let in_flight = sent.saturating_sub(delivered / self.receivers);
        self.window.saturating_sub(in_flight)
    }
}

/// What a publisher does.
#[derive(Debug, Clone)]
pub struct PublisherSpec {
    pub index: usize,
    pub kind: ServerKind,
    /// The confab channel id, or the reference stream name.
    pub stream: String,
    pub user: String,
    pub size: usize,
    /// Word texts ([`payload::make_words_text`]).
    pub words: bool,
    /// This publisher's rate in messages/s; `None`: as the gate allows.
    pub rate: Option<f64>,
    /// Max rate: most sends of this publisher not yet acked. With many publishers on one
    /// gateway, the shared gate alone could let their sum pass the bound a link keeps on
    /// requests in flight (and have sends refused).
    pub max_unacked: Option<u64>,
}

/// What a publisher did.
#[derive(Debug, Clone, Default)]
pub struct PublisherResult {
    pub sent: u64,
    pub acked: u64,
    pub refused: u64,
    /// Highest seq acked (confab) or sent (reference) on its stream.
    pub final_seq: u64,
    pub lost: Option<String>,
}

/// Most messages one publisher sends per 1 ms tick, so a stalled server does not get a burst
/// of thousands when it recovers.
const MAX_BURST: u64 = 256;

/// Publishes until `stop_sending`, then (confab) waits for the outstanding acks; `stop` ends
/// it at once.
pub async fn publisher(
    mut ws: Ws,
    spec: PublisherSpec,
    gate: Option<Arc<Gate>>,
    shared: Arc<Shared>,
    stop_sending: CancellationToken,
    stop: CancellationToken,
) -> PublisherResult {
    let mut result = PublisherResult::default();
    let mut inbox = match spec.kind {
        ServerKind::Nats => Inbox::for_nats(spec.index, false),
        _ => Inbox::new(spec.index, false),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = tokio::time::Instant::now();
    let ack_deadline = Duration::from_secs(10);
    let mut sending_stopped_at: Option<tokio::time::Instant> = None;
    loop {
        let sending = sending_stopped_at.is_none();
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => inbox.handle_each(&text, &shared, |received| {
                    publisher_saw(received, &spec, &mut result, gate.as_deref(), &shared)
                }),
                Some(Ok(Message::Binary(data))) if inbox.nats.is_some() => {
                    let pings = inbox.handle_nats(&data, &shared, |received| {
                        publisher_saw(received, &spec, &mut result, gate.as_deref(), &shared)
                    });
                    let answered = match pings {
                        Ok(0) => Ok(()),
                        Ok(_) => ws.send(Message::binary(nats::PONG)).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(why) = answered {
                        result.lost = Some(format!("publisher's NATS connection failed: {why}"));
                        Counters::bump(&shared.counters.disconnects);
                        break;
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    let code = close.map(|c| u16::from(c.code)).unwrap_or(1005);
                    result.lost = Some(format!("publisher closed by the server with {code}"));
                    Counters::bump(&shared.counters.disconnects);
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    result.lost = Some(format!("publisher connection failed: {e}"));
                    Counters::bump(&shared.counters.disconnects);
                    break;
                }
                None => {
                    result.lost = Some("publisher connection ended".into());
                    Counters::bump(&shared.counters.disconnects);
                    break;
                }
            },
            _ = stop_sending.cancelled(), if sending => {
                sending_stopped_at = Some(tokio::time::Instant::now());
            }
            _ = tick.tick() => {
                if let Some(at) = sending_stopped_at {
                    let settled = result.acked + result.refused >= result.sent;
                    if settled || at.elapsed() > ack_deadline {
                        break;
                    }
                    continue;
                }
                let due = match (spec.rate, &gate) {
                    (Some(rate), _) => {
                        let target = (started.elapsed().as_secs_f64() * rate) as u64;
                        target.saturating_sub(result.sent)
                    }
                    (None, Some(gate)) => gate.allowance(Counters::get(&shared.counters.delivered)),
                    (None, None) => 1,
                };
                let due = match spec.max_unacked {
                    Some(max) => due.min(max.saturating_sub(result.sent.saturating_sub(result.acked + result.refused))),
                    None => due,
                };
                let due = due.min(MAX_BURST);
                if due == 0 {
                    continue;
                }
                if let Err(e) = send_batch(&mut ws, &spec, &mut result, gate.as_deref(), due).await {
                    result.lost = Some(format!("publishing failed: {e}"));
                    Counters::bump(&shared.counters.disconnects);
                    break;
                }
            }
        }
    }
    if spec.kind != ServerKind::Confab {
        // Subscribers are judged against every frame sent: one the server dropped is a loss.
        result.final_seq = result.sent;
    }
    client::close_gracefully(ws).await;
    result
}

/// What a publisher does with what it received: counts acks (confab), or the echo of its own
/// frames (the reference server and NATS echo every frame to its sender too; the echo of the
/// publisher's own frame is its "ack"). Waiting for the last one before closing matters:
/// frames the server has not read yet when the publisher closes its socket would be lost.
fn publisher_saw(
    received: Received,
    spec: &PublisherSpec,
    result: &mut PublisherResult,
    gate: Option<&Gate>,
    shared: &Shared,
) {
    match received {
        Received::Ack { seq, .. } => {
            result.acked += 1;
            result.final_seq = result.final_seq.max(seq);
            Counters::bump(&shared.counters.published);
        }
        Received::Message { channel, seq }
            if spec.kind != ServerKind::Confab && channel == spec.stream && seq > result.acked =>
        {
            let newly = seq - result.acked;
            result.acked = seq;
            result.final_seq = seq;
            shared
                .counters
                .published
                .fetch_add(newly, Ordering::Relaxed);
        }
        Received::Error { .. } => {
            result.refused += 1;
            if let Some(gate) = gate {
                gate.sent.fetch_sub(1, Ordering::Relaxed);
            }
        }
        _ => {}
    }
}

async fn send_batch(
    ws: &mut Ws,
    spec: &PublisherSpec,
    result: &mut PublisherResult,
    gate: Option<&Gate>,
    count: u64,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    for _ in 0..count {
        let publish_us = payload::now_us();
        let text = if spec.words {
            payload::make_words_text(publish_us, spec.size, result.sent)
        } else {
            payload::make_text(publish_us, spec.size)
        };
        let frame = match spec.kind {
            ServerKind::Confab => Message::text(payload::send_frame(
                &spec.stream,
                &text,
                &payload::client_msg_id(publish_us, result.sent + 1),
            )),
            ServerKind::Reference => Message::text(payload::reference_frame(
                &spec.stream,
                result.sent + 1,
                &spec.user,
                &text,
            )),
            ServerKind::Nats => Message::binary(nats::publish(
                &spec.stream,
                &payload::reference_frame(&spec.stream, result.sent + 1, &spec.user, &text),
            )),
        };
        ws.feed(frame).await?;
        result.sent += 1;
        if let Some(gate) = gate {
            gate.sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    ws.flush().await
}

/// Longest wait for NATS's answer to a connection's `CONNECT`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// A subscriber connection running in its own task.
pub struct Subscriber {
    pub index: usize,
    /// The seq the subscriber starts after on the channel (confab) or 0 (reference).
    pub start: u64,
    pub task: JoinHandle<(Inbox, Ended)>,
}

/// Opens, greets and starts a measuring subscriber.
pub async fn open_subscriber(
    ctx: &RunContext,
    index: usize,
    user: &str,
    channel: Option<&str>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<Subscriber> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut ws = ctx.connector.connect_retrying(index, deadline).await?;
    let mut inbox = Inbox::new(index, true);
    let mut start = 0;
    let heartbeat = match ctx.kind() {
        ServerKind::Confab => {
            let token = ctx.api()?.token(user).await?;
            let ready = client::hello(&mut ws, &token, &[]).await?;
            inbox.track_ready(&ready);
            if let Some(channel) = channel {
                start = ready
                    .channels
                    .iter()
                    .find(|(c, _)| c == channel)
                    .map(|(_, s)| *s)
                    .with_context(|| format!("{user}'s ready does not list channel {channel}"))?;
            }
            Some(ready.heartbeat)
        }
        ServerKind::Reference => {
            inbox.auto_streams = true;
            None
        }
        ServerKind::Nats => {
            inbox = Inbox::for_nats(index, true);
            nats::greet(&mut ws, &nats::every_subject(&ctx.run_id), HELLO_TIMEOUT).await?;
            None
        }
    };
    let task = tokio::spawn(async move {
        let ended = client::receive_loop(ws, &mut inbox, &shared, heartbeat, &stop).await;
        (inbox, ended)
    });
    Ok(Subscriber { index, start, task })
}

/// Opens and greets a publisher connection that will publish on `stream` (its task is
/// started by the caller).
pub async fn open_publisher(
    ctx: &RunContext,
    index: usize,
    user: &str,
    stream: &str,
) -> Result<Ws> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut ws = ctx.connector.connect_retrying(index, deadline).await?;
    match ctx.kind() {
        ServerKind::Confab => {
            let token = ctx.api()?.token(user).await?;
            client::hello(&mut ws, &token, &[]).await?;
        }
        ServerKind::Reference => {}
        // A publisher takes its own subject: the echo of its frames is its "ack".
        ServerKind::Nats => {
            nats::greet(&mut ws, stream, HELLO_TIMEOUT).await?;
        }
    }
    Ok(ws)
}

/// Stops subscribers and collects their inboxes, closing their sockets normally.
pub async fn collect_subscribers(subscribers: Vec<Subscriber>) -> Vec<(usize, u64, Inbox, bool)> {
    let mut out = Vec::with_capacity(subscribers.len());
    let mut closes = Vec::new();
    for s in subscribers {
        match s.task.await {
            Ok((inbox, Ended::Stopped(ws))) => {
                closes.push(tokio::spawn(client::close_gracefully(*ws)));
                out.push((s.index, s.start, inbox, true));
            }
            Ok((inbox, Ended::Lost(why))) => {
                warn!(index = s.index, %why, "subscriber lost");
                out.push((s.index, s.start, inbox, false));
            }
            Err(e) => warn!(index = s.index, error = %e, "subscriber task failed"),
        }
    }
    for c in closes {
        let _ = c.await;
    }
    out
}

/// Runs one fanout measurement.
pub async fn run(ctx: &RunContext, p: &FanoutParams, scenario: &str) -> Result<RunReport> {
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let endpoints = ctx.connector.endpoints();
    let k = p.channel_count();
    if k > 1 && ctx.kind() != ServerKind::Confab {
        anyhow::bail!("fanout over several channels needs confab (the reference server has one stream for everyone)");
    }
    let publishers: Vec<String> = (0..p.publisher_count()).map(|j| ctx.user("p", j)).collect();
    let subscribers: Vec<String> = (0..p.subscribers).map(|i| ctx.user("s", i)).collect();

    // Set up the channels (confab) or the streams (reference): publisher j's stream, and
    // (confab) subscriber i's channel, i mod K.
    let (streams, sub_channels): (Vec<String>, Vec<String>) = match ctx.kind() {
        ServerKind::Confab => {
            let api = ctx.api()?;
            let mut channels = Vec::with_capacity(k);
            for c in 0..k {
                // Publisher c (c < K ≤ publishers) creates channel c.
                let creator = api.token(&publishers[c]).await?;
                let mut members: Vec<String> =
                    publishers.iter().skip(c + k).step_by(k).cloned().collect();
                members.extend(subscribers.iter().skip(c).step_by(k).cloned());
                let name = match k {
                    1 => format!("fanout-{}-{scenario}", ctx.run_id),
                    _ => format!("fanout-{}-{scenario}-{c}", ctx.run_id),
                };
                channels.push(ctx.create_channel(&creator, &name, &members).await?);
            }
            (
                (0..publishers.len())
                    .map(|j| channels[j % k].clone())
                    .collect(),
                channels,
            )
        }
        ServerKind::Reference => (
            (0..publishers.len())
                .map(|j| format!("{}-p{j}", ctx.run_id))
                .collect(),
            Vec::new(),
        ),
        ServerKind::Nats => (
            (0..publishers.len())
                .map(|j| nats::subject(&ctx.run_id, j))
                .collect(),
            Vec::new(),
        ),
    };
    let channel_of = |i: usize| sub_channels.get(i % k).map(String::as_str);

    let subs = open_many(p.subscribers, ctx.connect_concurrency, "subscribers", |i| {
        open_subscriber(
            ctx,
            i,
            &subscribers[i],
            channel_of(i),
            shared.clone(),
            stop.clone(),
        )
    })
    .await?;
    // Publishers connect to the first endpoint: index j * endpoints maps to endpoint 0.
    let mut pub_sockets = Vec::new();
    for (j, user) in publishers.iter().enumerate() {
        pub_sockets.push(
            open_publisher(ctx, p.subscribers + j * endpoints, user, &streams[j])
                .await
                .with_context(|| format!("publisher {j}"))?,
        );
    }
    info!(scenario, case = %p.case(), "connected, publishing");

    let before = ctx.sample();
    let wire_before = crate::wire::bytes_in();
    let start_us = payload::now_us();
    let stop_sending = CancellationToken::new();
    // Max rate over K channels: each message reaches S/K subscribers, and each channel may
    // have `window` messages in flight.
    let gate = p
        .rate
        .is_none()
        .then(|| Arc::new(Gate::new(p.subscribers / k, p.window * k as u64)));
    let per_publisher = p.rate.map(|r| r / publishers.len() as f64);
    let mut pub_tasks = Vec::new();
    for (j, ws) in pub_sockets.into_iter().enumerate() {
        let spec = PublisherSpec {
            index: p.subscribers + j,
            kind: ctx.kind(),
            stream: streams[j].clone(),
            user: publishers[j].clone(),
            size: p.size,
            words: p.words,
            rate: per_publisher,
            max_unacked: (k > 1).then_some(p.window),
        };
        pub_tasks.push(tokio::spawn(publisher(
            ws,
            spec,
            gate.clone(),
            shared.clone(),
            stop_sending.clone(),
            stop.clone(),
        )));
    }

    let bar = progress::timer(p.duration, &format!("{scenario} {}", ctx.kind().as_str()));
    let run_start = tokio::time::Instant::now();
    while run_start.elapsed() < p.duration {
        tokio::time::sleep(Duration::from_millis(200).min(p.duration)).await;
        let secs = run_start.elapsed().as_secs_f64().max(0.001);
        bar.set_position(secs as u64);
        bar.set_message(format!(
            "{} ev/s",
            crate::report::fmt_num(Counters::get(&shared.counters.delivered) as f64 / secs)
        ));
    }
    bar.finish_and_clear();
    stop_sending.cancel();
    let publish_end_us = payload::now_us();

    let mut results = Vec::new();
    for t in pub_tasks {
        results.push(t.await.context("publisher task failed")?);
    }
    // The final seq of each stream, and how many deliveries that makes.
    let mut finals: HashMap<String, u64> = HashMap::new();
    for (j, r) in results.iter().enumerate() {
        let f = finals.entry(streams[j].clone()).or_insert(0);
        *f = (*f).max(r.final_seq);
    }
    // What subscriber i should see: its channel's stream (confab), or every stream
    // (reference).
    let finals_of = |i: usize| -> HashMap<String, u64> {
        match channel_of(i) {
            Some(c) => HashMap::from([(c.to_string(), finals.get(c).copied().unwrap_or(0))]),
            None => finals.clone(),
        }
    };
    let expected: u64 = subs
        .iter()
        .map(|s| {
            finals_of(s.index)
                .values()
                .map(|f| f.saturating_sub(s.start))
                .sum::<u64>()
        })
        .sum();
    let drained = wait_until(
        || Counters::get(&shared.counters.delivered) >= expected,
        || Counters::get(&shared.counters.delivered),
        p.drain,
        p.drain * 6,
    )
    .await;
    let after = ctx.sample();
    let wire_bytes = crate::wire::bytes_in().saturating_sub(wire_before);
    stop.cancel();

    let collected = collect_subscribers(subs).await;
    let mut seq = SeqTotals::default();
    for (i, start, inbox, _) in &collected {
        seq.merge(inbox.totals(&finals_of(*i), *start));
    }
    let missing_subscribers = p.subscribers - collected.len();

    let delivered = Counters::get(&shared.counters.delivered);
    let last_us = collected
        .iter()
        .map(|(_, _, inbox, _)| inbox.last_delivery_us)
        .max()
        .unwrap_or(0)
        .max(publish_end_us);
    let elapsed_s = (last_us.saturating_sub(start_us)) as f64 / 1e6;
    let publish_s = (publish_end_us.saturating_sub(start_us)) as f64 / 1e6;
    let published = Counters::get(&shared.counters.published);
    let measured = before.until(&after);
    let mut report = RunReport {
        scenario: scenario.to_string(),
        case: labelled(p.case(), ctx.connector.batch, ctx.connector.deflate),
        server: ctx.kind(),
        target: ctx.target.label.clone(),
        params: serde_json::to_value(p).unwrap_or_default(),
        connections: p.subscribers + publishers.len(),
        duration_s: elapsed_s,
        offered_msgs_per_s: p.rate,
        published,
        published_per_s: published as f64 / publish_s.max(1e-3),
        delivered,
        delivered_per_s: delivered as f64 / elapsed_s.max(1e-3),
        latency: shared.latency.summary(),
        seq,
        resyncs: Counters::get(&shared.counters.resyncs),
        disconnects: Counters::get(&shared.counters.disconnects),
        errors: Counters::get(&shared.counters.errors),
        rate_limited: Counters::get(&shared.counters.rate_limited),
        server_usage: measured.server,
        loadgen_cpu_s: measured.loadgen_cpu_s,
        other_cpu_s: measured.other_cpu_s,
        extra: Default::default(),
        failures: Vec::new(),
        misses: Vec::new(),
    };
    if delivered > 0 {
        // Bytes into every client socket (subscribers' and publishers') per delivery.
        report
            .extra
            .insert("wire_B_per_ev".into(), wire_bytes as f64 / delivered as f64);
        if let Some(us) = report.cpu_s_per_million() {
            report.extra.insert("cpu_us_per_ev".into(), us);
            report.extra.insert("server_cpu_us_per_ev".into(), us);
        }
        let frames = Counters::get(&shared.counters.frames).max(1);
        report
            .extra
            .insert("ev_per_frame".into(), delivered as f64 / frames as f64);
    }
    report.check_delivery();
    if published == 0 {
        report.failures.push("nothing was published".into());
    }
    for (j, r) in results.iter().enumerate() {
        if let Some(why) = &r.lost {
            report.failures.push(format!("publisher {j}: {why}"));
        }
        if r.refused > 0 {
            report
                .failures
                .push(format!("publisher {j}: {} sends refused", r.refused));
        }
        if r.acked + r.refused < r.sent {
            report.failures.push(format!(
                "publisher {j}: {} sends never acked",
                r.sent - r.acked - r.refused
            ));
        }
    }
    if missing_subscribers > 0 {
        report
            .failures
            .push(format!("{missing_subscribers} subscriber tasks failed"));
    }
    if !drained && report.seq.losses == 0 {
        report
            .failures
            .push("deliveries did not complete within the drain time".into());
    }
    Ok(report)
}
