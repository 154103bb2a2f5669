//! Scenario 3, idle: N connections that only keep their heartbeat, and what they cost the
//! server in resident memory (VmRSS after − VmRSS before, ÷ N).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::fanout::{collect_subscribers, open_subscriber};
use super::{open_many, raise_nofile, RunContext};
use crate::client::Shared;
use crate::progress;
use crate::report::RunReport;
use crate::seq::SeqTotals;
use crate::stats::Counters;

/// Parameters of one idle run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleParams {
    pub connections: usize,
    /// How long the connections stay open after the last one is ready.
    pub hold: Duration,
}

impl Default for IdleParams {
    fn default() -> Self {
        IdleParams {
            connections: 5000,
            hold: Duration::from_secs(5),
        }
    }
}

pub async fn run(ctx: &RunContext, p: &IdleParams) -> Result<RunReport> {
    // Each connection is one descriptor here (and one in the server, which has its own limit).
    raise_nofile(p.connections as u64 + 512)?;
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    // Let the server settle after start-up before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ctx.sample();
    let users: Vec<String> = (0..p.connections).map(|i| ctx.user("i", i)).collect();
    let conns = open_many(
        p.connections,
        ctx.connect_concurrency,
        "idle connections",
        |i| open_subscriber(ctx, i, &users[i], None, shared.clone(), stop.clone()),
    )
    .await?;
    let bar = progress::timer(p.hold, "holding idle connections");
    let hold_start = tokio::time::Instant::now();
    while hold_start.elapsed() < p.hold {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_position(hold_start.elapsed().as_secs());
    }
    bar.finish_and_clear();
    let after = ctx.sample();
    stop.cancel();
    let collected = collect_subscribers(conns).await;
    let measured = before.until(&after);

    let mut report = RunReport {
        scenario: "idle".into(),
        case: format!("N={}", p.connections),
        server: ctx.kind(),
        target: ctx.target.label.clone(),
        params: serde_json::to_value(p).unwrap_or_default(),
        connections: p.connections,
        duration_s: p.hold.as_secs_f64(),
        offered_msgs_per_s: Some(0.0),
        published: 0,
        published_per_s: 0.0,
        delivered: 0,
        delivered_per_s: 0.0,
        latency: Default::default(),
        seq: SeqTotals::default(),
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
    let n = p.connections.max(1) as f64;
    if let (Some(b), Some(a)) = (before.server, after.server) {
        report
            .extra
            .insert("rss_before_kib".into(), b.rss_kib as f64);
        report
            .extra
            .insert("rss_after_kib".into(), a.rss_kib as f64);
        report.extra.insert(
            "rss_per_conn_kib".into(),
            (a.rss_kib as f64 - b.rss_kib as f64) / n,
        );
    }
    if let (Some(b), Some(a)) = (before.loadgen, after.loadgen) {
        report.extra.insert(
            "loadgen_rss_per_conn_kib".into(),
            (a.rss_kib as f64 - b.rss_kib as f64) / n,
        );
    }
    report.check_delivery();
    if collected.len() != p.connections {
        report.failures.push(format!(
            "{} of {} connections ended early",
            p.connections - collected.len(),
            p.connections
        ));
    }
    if report.server_usage.is_none() {
        report.failures.push(
            "server PID unknown: RSS per connection needs --spawn-dev or --server-pid".into(),
        );
    }
    Ok(report)
}

/// Checks that the open-files limit allows `connections` before a long setup starts.
pub fn check_limits(connections: usize) -> Result<()> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    if (hard as usize) < connections + 64 {
        bail!("{connections} connections need more open files than the hard limit {hard} (soft {soft})");
    }
    Ok(())
}
