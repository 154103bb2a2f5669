//! Runs the fanout scenario for about a second against a real `nats-server` (Debian's
//! package; `infra/test.sh` installs it) over its WebSocket listener, with two publishers,
//! and checks that the NATS arm of `compare --nats` measures what it should: every message
//! to every subscriber, in order, packed several to a frame.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use confab_load::scenario::fanout::{self, FanoutParams};
use confab_load::scenario::{ClientOptions, RunContext};
use confab_load::target::{ServerKind, Target};

fn nats_server() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    found.expect("nats-server is not installed (apt-get install nats-server; infra/test.sh does)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_through_nats_delivers_every_message_to_every_subscriber_in_order() {
    let target = Target::spawn_nats(&nats_server(), None, None)
        .await
        .unwrap();
    let ctx = RunContext::new(target, &ClientOptions::default())
        .await
        .unwrap();
    let params = FanoutParams {
        subscribers: 40,
        publishers: 2,
        rate: None,
        size: 100,
        duration: Duration::from_secs(1),
        window: 16,
        ..FanoutParams::default()
    };
    let report = fanout::run(&ctx, &params, "fanout").await.unwrap();
    ctx.target.stop().await;
    assert_eq!(report.server, ServerKind::Nats);
    assert!(report.failures.is_empty(), "{}", report.one_line());
    assert!(report.published > 100, "published {}", report.published);
    assert_eq!(report.delivered, report.published * 40);
    assert_eq!(report.seq.received, report.delivered);
    assert!(report.seq.clean(), "{}", report.one_line());
    assert_eq!(report.latency.samples, report.delivered);
    // A child process: its CPU time is measured apart from the load generator's.
    assert!(report.server_usage.is_some());
    assert!(report.extra["ev_per_frame"] >= 1.0);
}
