//! Runs the fanout scenario for about a second against the in-process reference server over
//! real sockets, at a fixed rate and at max rate, and checks what every report must hold.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use confab_load::reference::ReferenceConfig;
use confab_load::scenario::fanout::{self, FanoutParams};
use confab_load::scenario::{ClientOptions, RunContext};
use confab_load::target::{ServerKind, Target};

async fn run(params: &FanoutParams) -> confab_load::report::RunReport {
    let target = Target::in_process_reference(ReferenceConfig::default())
        .await
        .unwrap();
    let ctx = RunContext::new(target, &ClientOptions::default())
        .await
        .unwrap();
    let report = fanout::run(&ctx, params, "fanout").await.unwrap();
    ctx.target.stop().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_rate_fanout_delivers_everything_to_everyone() {
    let params = FanoutParams {
        subscribers: 50,
        publishers: 2,
        rate: Some(200.0),
        size: 100,
        duration: Duration::from_secs(1),
        ..FanoutParams::default()
    };
    let report = run(&params).await;
    assert_eq!(report.server, ServerKind::Reference);
    assert!(report.failures.is_empty(), "{}", report.one_line());
    // About 200 messages in one second, each delivered to all 50 subscribers.
    assert!(
        (150..=260).contains(&report.published),
        "published {}",
        report.published
    );
    assert_eq!(report.delivered, report.published * 50);
    assert_eq!(report.seq.received, report.delivered);
    assert!(report.seq.clean());
    assert_eq!(report.latency.samples, report.delivered);
    assert!(report.latency.p50_ms > 0.0 && report.latency.p50_ms <= report.latency.p99_ms);
    assert!(report.latency.p99_ms <= report.latency.max_ms);
    // In-process: the server's resources cannot be told apart from the load generator's.
    assert!(report.server_usage.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_fanout_is_closed_loop_and_lossless() {
    let params = FanoutParams {
        subscribers: 100,
        publishers: 1,
        rate: None,
        size: 1024,
        duration: Duration::from_secs(1),
        window: 16,
        ..FanoutParams::default()
    };
    let report = run(&params).await;
    assert!(report.failures.is_empty(), "{}", report.one_line());
    assert!(report.published > 100, "published {}", report.published);
    assert_eq!(report.delivered, report.published * 100);
    assert!(report.delivered_per_s > 10_000.0, "{}", report.one_line());
}
