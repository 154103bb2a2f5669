//! A cell is a failure domain (SPEC §1): with traffic on two cells, `kill -9` of one leaves
//! the other cell's workspaces working, their messages delivered as before (the latencies are
//! measured and printed side by side, never asserted); the killed cell's clients get
//! `unavailable` or `4010` within 5 s, never a hang, and recover when it restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::time::{Duration, Instant};

use cluster::traffic::{all_messages, check_nothing_lost, quantile_ms, Report, Sender};
use cluster::Cluster;
use reqwest::Method;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How long each phase of traffic runs.
const PHASE: Duration = Duration::from_secs(3);
/// SPEC §4 and the brief: the killed cell's clients hear of it within this long.
const TOLD_WITHIN: Duration = Duration::from_secs(5);

fn latencies_between(reports: &[&Report], from: Instant, to: Instant) -> Vec<f64> {
    reports
        .iter()
        .flat_map(|r| r.latencies.iter())
        .filter(|(at, _)| *at >= from && *at < to)
        .map(|(_, seconds)| *seconds)
        .collect()
}

#[tokio::test]
async fn killing_one_cell_leaves_the_other_cells_workspaces_working_and_its_own_recover() {
    let mut cluster = Cluster::new().cell("c1", "r").cell("c2", "r").start().await;
    assert_eq!(cluster.create_workspace("victim", "r").await, "c1");
    assert_eq!(cluster.create_workspace("bystander", "r").await, "c2");
    let stop = CancellationToken::new();
    let mut channels = Vec::new();
    let mut senders = Vec::new();
    for workspace in ["victim", "bystander"] {
        let reader = cluster.token(workspace, "a").await;
        let (status, body) = cluster
            .api(
                0,
                &reader,
                Method::POST,
                "/v1/channels",
                Some(json!({"name": "general", "kind": "public", "members": ["a", "b"]})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let channel = body["id"].as_str().unwrap().to_string();
        for user in ["a", "b"] {
            let sender = Sender {
                gateways: vec![cluster.gateway(0).ws_url()],
                token: cluster.token(workspace, user).await,
                channel: channel.clone(),
                label: format!("{workspace}-{user}"),
                pace: Duration::from_millis(10),
                measure: true,
            };
            senders.push((workspace, tokio::spawn(sender.run(stop.clone()))));
        }
        channels.push((workspace, reader, channel));
    }
    let started = Instant::now();
    tokio::time::sleep(PHASE).await;
    let killed = Instant::now();
    cluster.cells[0].kill9();
    tokio::time::sleep(PHASE).await;
    let restarting = Instant::now();
    cluster.cells[0].restart().await;
    let restarted = Instant::now();
    tokio::time::sleep(PHASE).await;
    stop.cancel();
    let mut reports: Vec<(&str, Report)> = Vec::new();
    for (workspace, sender) in senders {
        reports.push((workspace, sender.await.unwrap()));
    }
    let of = |workspace: &str| -> Vec<&Report> {
        reports
            .iter()
            .filter(|(w, _)| *w == workspace)
            .map(|(_, r)| r)
            .collect()
    };

    for report in of("bystander") {
        assert!(
            report.disruptions.is_empty() && report.errors.is_empty(),
            "the other cell's workspace was disturbed: {report}"
        );
    }
    let before = latencies_between(&of("bystander"), started, killed);
    let during = latencies_between(&of("bystander"), killed, restarting);
    let after = latencies_between(&of("bystander"), restarted, Instant::now());
    assert!(!during.is_empty(), "the other cell's messages stopped");
    println!(
        "bystander send->delivery latency, p50 / p99 ms: before the kill {:.2} / {:.2} ({} msgs), \
         while c1 is down {:.2} / {:.2} ({} msgs), after its restart {:.2} / {:.2} ({} msgs); \
         p50 ratio down/before {:.2}, p99 ratio {:.2}",
        quantile_ms(&before, 0.5),
        quantile_ms(&before, 0.99),
        before.len(),
        quantile_ms(&during, 0.5),
        quantile_ms(&during, 0.99),
        during.len(),
        quantile_ms(&after, 0.5),
        quantile_ms(&after, 0.99),
        after.len(),
        quantile_ms(&during, 0.5) / quantile_ms(&before, 0.5),
        quantile_ms(&during, 0.99) / quantile_ms(&before, 0.99),
    );

    for report in of("victim") {
        let told = report
            .disruptions
            .iter()
            .find(|at| **at >= killed)
            .map(|at| *at - killed)
            .unwrap_or_else(|| panic!("a client of the killed cell was never told: {report}"));
        println!("victim client told after {told:?}: {report}");
        assert!(told <= TOLD_WITHIN, "told only after {told:?}: {report}");
        let recovered = report.latencies.iter().any(|(at, _)| *at >= restarted);
        assert!(
            recovered,
            "a client of the killed cell did not recover: {report}"
        );
    }

    for (workspace, reader, channel) in &channels {
        let workspace_reports: Vec<Report> = of(workspace).into_iter().cloned().collect();
        let messages = all_messages(&cluster.gateway(0).url(), reader, channel).await;
        let acked = check_nothing_lost(&workspace_reports, &messages);
        println!("{workspace}: {acked} acked messages, all in the log");
    }
}
