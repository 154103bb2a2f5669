//! Scenario 4, reconnect storm: N connections in K channels receive a steady stream of
//! messages; all N are dropped at once (sockets closed without a WebSocket close, as when a
//! network path or a load balancer fails), and reconnect immediately with `resume` naming the
//! last seq each saw per channel. Measured: the time from the drop until every connection is
//! back and has caught up to its channels' `last_seq` as of its new `ready`, and that across
//! the whole run no subscriber missed, duplicated or reordered anything.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::fanout::{open_publisher, open_subscriber, publisher, PublisherSpec, Subscriber};
use super::{open_many, raise_nofile, require_confab, wait_until, RunContext};
use crate::client::{self, Ended, Inbox, Shared};
use crate::payload;
use crate::procfs;
use crate::progress;
use crate::report::RunReport;
use crate::seq::SeqTotals;
use crate::stats::{Counters, LatencyHub};

/// Parameters of one storm.
#[derive(Debug, Clone, Serialize)]
pub struct StormParams {
    pub connections: usize,
    pub channels: usize,
    /// Total publish rate over all channels, messages/s, kept up through the storm.
    pub rate: f64,
    pub size: usize,
    /// Publishing before the drop, and after everyone resumed.
    pub before: Duration,
    pub after: Duration,
    /// Longest the storm may take.
    pub timeout: Duration,
}

impl Default for StormParams {
    fn default() -> Self {
        StormParams {
            connections: 10_000,
            channels: 100,
            rate: 200.0,
            size: 100,
            before: Duration::from_secs(2),
            after: Duration::from_secs(2),
            timeout: Duration::from_secs(60),
        }
    }
}

pub async fn run(ctx: &RunContext, p: &StormParams) -> Result<RunReport> {
    require_confab(ctx, "storm")?;
    raise_nofile(2 * p.connections as u64 + 512)?;
    let channels_n = p.channels.clamp(1, p.connections.max(1));
    let shared = Arc::new(Shared::default());
    let api = ctx.api()?;

    // Channel k: publisher k plus the subscribers i with i % K == k.
    let publishers: Vec<String> = (0..channels_n).map(|k| ctx.user("rp", k)).collect();
    let users: Vec<String> = (0..p.connections).map(|i| ctx.user("r", i)).collect();
    let mut channels = Vec::with_capacity(channels_n);
    let bar = progress::counter(channels_n as u64, "creating channels");
    for (k, creator) in publishers.iter().enumerate() {
        let members: Vec<String> = users
            .iter()
            .enumerate()
            .filter(|(i, _)| i % channels_n == k)
            .map(|(_, u)| u.clone())
            .collect();
        let token = api.token(creator).await?;
        channels.push(
            ctx.create_channel(&token, &format!("storm-{}-{k}", ctx.run_id), &members)
                .await?,
        );
        bar.inc(1);
    }
    bar.finish_and_clear();

    let first_stop = CancellationToken::new();
    let subs = open_many(
        p.connections,
        ctx.connect_concurrency,
        "storm clients",
        |i| {
            let channel = channels[i % channels_n].clone();
            let users = &users;
            let shared = shared.clone();
            let stop = first_stop.clone();
            async move { open_subscriber(ctx, i, &users[i], Some(&channel), shared, stop).await }
        },
    )
    .await?;

    let stop_sending = CancellationToken::new();
    let stop_publishers = CancellationToken::new();
    let mut pub_tasks = Vec::new();
    for (k, user) in publishers.iter().enumerate() {
        let ws = open_publisher(ctx, p.connections + k, user, &channels[k])
            .await
            .with_context(|| format!("publisher {k}"))?;
        let spec = PublisherSpec {
            index: p.connections + k,
            kind: ctx.kind(),
            stream: channels[k].clone(),
            user: user.clone(),
            size: p.size,
            words: false,
            rate: Some(p.rate / channels_n as f64),
            max_unacked: None,
        };
        pub_tasks.push(tokio::spawn(publisher(
            ws,
            spec,
            None,
            shared.clone(),
            stop_sending.clone(),
            stop_publishers.clone(),
        )));
    }
    // Tokens are minted before the drop so the storm measures only the server.
    let mut tokens = Vec::with_capacity(users.len());
    for user in &users {
        tokens.push(api.token(user).await?);
    }
    let before_sample = ctx.sample();
    tokio::time::sleep(p.before).await;

    // The drop: stop every reader, then drop every socket without a close handshake.
    first_stop.cancel();
    let mut inboxes: Vec<(usize, u64, Inbox)> = Vec::with_capacity(subs.len());
    let mut sockets = Vec::with_capacity(subs.len());
    let mut lost_before = 0;
    for Subscriber { index, start, task } in subs {
        let (inbox, ended) = task.await.context("subscriber task failed")?;
        match ended {
            Ended::Stopped(ws) => sockets.push(ws),
            Ended::Lost(_) => lost_before += 1,
        }
        inboxes.push((index, start, inbox));
    }
    let overflows_before = procfs::listen_overflows().ok();
    let drop_us = payload::now_us();
    drop(sockets);
    let storm_start = tokio::time::Instant::now();
    let deadline = storm_start + p.timeout;

    // Everyone reconnects at once with `resume`.
    let second_stop = CancellationToken::new();
    let reconnect_latency = Arc::new(LatencyHub::default());
    let bar = progress::counter(p.connections as u64, "resumed");
    let mut tasks = Vec::with_capacity(inboxes.len());
    for (index, start, mut inbox) in inboxes {
        let ctx_connector = ctx.connector.clone();
        let token = tokens[index].clone();
        let shared = shared.clone();
        let stop = second_stop.clone();
        let reconnect_latency = reconnect_latency.clone();
        tasks.push((
            index,
            start,
            tokio::spawn(async move {
                let resume = inbox.resume_map();
                let mut ws = match ctx_connector.connect_retrying(index, deadline).await {
                    Ok(ws) => ws,
                    Err(e) => return (inbox, Ended::Lost(format!("reconnect failed: {e:#}"))),
                };
                let ready = match client::hello(&mut ws, &token, &resume).await {
                    Ok(ready) => ready,
                    Err(e) => return (inbox, Ended::Lost(format!("resume hello failed: {e:#}"))),
                };
                reconnect_latency.record(index, payload::now_us().saturating_sub(drop_us));
                inbox.track_ready(&ready);
                inbox.expect_resume(&ready, &shared);
                let ended =
                    client::receive_loop(ws, &mut inbox, &shared, Some(ready.heartbeat), &stop)
                        .await;
                (inbox, ended)
            }),
        ));
    }
    let all = p.connections as u64;
    let all_back = wait_until(
        || {
            let n = shared.resumed.load(Ordering::Relaxed);
            bar.set_position(n);
            n >= all
        },
        || 0,
        p.timeout,
        p.timeout,
    )
    .await;
    bar.finish_and_clear();
    let storm_elapsed = storm_start.elapsed();
    let overflows = match (overflows_before, procfs::listen_overflows().ok()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };

    // Keep publishing a little after the storm, then settle.
    tokio::time::sleep(p.after).await;
    stop_sending.cancel();
    let mut finals: HashMap<String, u64> = HashMap::new();
    for (k, t) in pub_tasks.into_iter().enumerate() {
        let r = t.await.context("publisher task failed")?;
        finals.insert(channels[k].clone(), r.final_seq);
    }
    stop_publishers.cancel();
    // Each subscriber should receive everything up to its channel's final seq.
    let expected_done = || {
        // Deliveries are counted globally; compare against the seqs published since each
        // subscriber's start, summed.
        Counters::get(&shared.counters.delivered)
    };
    let expected_total: u64 = tasks
        .iter()
        .map(|(i, start, _)| finals[&channels[i % channels_n]].saturating_sub(*start))
        .sum();
    wait_until(
        || expected_done() >= expected_total,
        expected_done,
        Duration::from_secs(3),
        Duration::from_secs(20),
    )
    .await;
    let after_sample = ctx.sample();
    second_stop.cancel();

    let mut seq = SeqTotals::default();
    let mut resume_times = Vec::new();
    let mut not_back = 0;
    let mut closes = Vec::new();
    for (i, start, task) in tasks {
        let (inbox, ended) = task.await.context("reconnected subscriber failed")?;
        let channel = &channels[i % channels_n];
        let only_mine = HashMap::from([(channel.clone(), finals[channel])]);
        seq.merge(inbox.totals(&only_mine, start));
        match inbox.resumed_at_us {
            Some(at) => resume_times.push(at.saturating_sub(drop_us)),
            None => not_back += 1,
        }
        if let Ended::Stopped(ws) = ended {
            closes.push(tokio::spawn(client::close_gracefully(*ws)));
        }
    }
    for c in closes {
        let _ = c.await;
    }
    resume_times.sort_unstable();
    let quantile = |q: f64| -> f64 {
        if resume_times.is_empty() {
            return f64::NAN;
        }
        let i = ((resume_times.len() as f64 - 1.0) * q).round() as usize;
        resume_times[i] as f64 / 1e6
    };

    let measured = before_sample.until(&after_sample);
    let delivered = Counters::get(&shared.counters.delivered);
    let published = Counters::get(&shared.counters.published);
    let total_s = (p.before + storm_elapsed + p.after).as_secs_f64();
    let mut report = RunReport {
        scenario: "storm".into(),
        case: format!("N={} K={} {} msg/s", p.connections, channels_n, p.rate),
        server: ctx.kind(),
        target: ctx.target.label.clone(),
        params: serde_json::to_value(p).unwrap_or_default(),
        connections: p.connections + channels_n,
        duration_s: total_s,
        offered_msgs_per_s: Some(p.rate),
        published,
        published_per_s: published as f64 / total_s,
        delivered,
        delivered_per_s: delivered as f64 / total_s,
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
    report.extra.insert("storm_s".into(), quantile(1.0));
    report.extra.insert("resume_p50_s".into(), quantile(0.5));
    report.extra.insert("resume_p99_s".into(), quantile(0.99));
    let ready = reconnect_latency.summary();
    report
        .extra
        .insert("ready_p99_s".into(), ready.p99_ms / 1000.0);
    if let Some(n) = overflows {
        // Machine-wide, so other processes' connections count too; on a quiet machine these
        // are the storm's own connections refused by a full accept queue.
        report.extra.insert("listen_overflows".into(), n as f64);
    }
    report.check_delivery();
    if lost_before > 0 {
        report
            .failures
            .push(format!("{lost_before} connections lost before the drop"));
    }
    if !all_back || not_back > 0 {
        report.failures.push(format!(
            "{not_back} of {} connections not resumed within {:?}",
            p.connections, p.timeout
        ));
    }
    Ok(report)
}
