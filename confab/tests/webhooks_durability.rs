//! SPEC §6 "at least once, never lost" in distributed mode: pending webhook deliveries live in
//! the cell's store (Redis with `appendonly yes`, `appendfsync always`), so a cell killed with
//! SIGKILL while its receiver is down delivers every acked event after it restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod webhook_receiver;

use std::collections::HashSet;
use std::time::Duration;

use cluster::{Cluster, WAIT};
use reqwest::Method;
use serde_json::json;
use webhook_receiver::Receiver;

/// Bound for the deliveries after the restart (the first retries wait 1 s, 2 s, ...).
const DELIVERY_WAIT: Duration = Duration::from_secs(90);

/// The value of an unlabelled gauge in a Prometheus text page.
fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn deliveries_pending_while_the_receiver_is_down_survive_a_kill_9_of_the_cell() {
    let mut cluster = Cluster::new().cell("c1", "local").start().await;
    cluster.create_workspace("acme", "local").await;
    let alice = cluster.token("acme", "alice").await;
    let bot = cluster.token("acme", "bot").await;
    let (status, created) = cluster
        .api(
            0,
            &alice,
            Method::POST,
            "/v1/channels",
            Some(json!({"name": "ops", "kind": "public", "members": ["bot"]})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let channel = created["id"].as_str().unwrap().to_string();

    // The receiver's port is chosen now but nothing listens there yet: it is down.
    let port = confab_testkit::free_port();
    let (status, hook) = cluster
        .api(
            0,
            &bot,
            Method::POST,
            "/v1/webhooks",
            Some(json!({"url": format!("http://127.0.0.1:{port}/hook"), "events": ["message"]})),
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    let id = hook["id"].as_str().unwrap().to_string();

    let mut seqs = Vec::new();
    for i in 0..100 {
        let (status, ack) = cluster
            .api(
                0,
                &alice,
                Method::POST,
                &format!("/v1/channels/{channel}/messages"),
                Some(json!({ "text": format!("m{i}") })),
            )
            .await;
        assert_eq!(status, 201, "{ack}");
        seqs.push(ack["seq"].as_u64().unwrap());
    }

    // The cell counts them as pending, then dies without a chance to save anything.
    let metrics_url = format!("http://127.0.0.1:{}/metrics", cluster.cells[0].port);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let page = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if gauge(&page, "confab_webhook_pending").is_some_and(|p| p >= 100.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pending never reached 100:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.cells[0].kill9();
    cluster.cells[0].restart().await;
    let receiver = Receiver::start_on(port).await;

    let hits = receiver
        .wait_until(DELIVERY_WAIT, |hits| {
            hits.iter()
                .map(|h| h.delivery_id().to_string())
                .collect::<HashSet<_>>()
                .len()
                >= 100
        })
        .await;
    let expected: HashSet<String> = seqs
        .iter()
        .map(|seq| format!("{id}:{channel}:{seq}"))
        .collect();
    let got: HashSet<String> = hits.iter().map(|h| h.delivery_id().to_string()).collect();
    assert_eq!(got, expected);
    // In seq order: a delivery is attempted only after every earlier one succeeded.
    let mut last = 0;
    for hit in &hits {
        let seq = hit.body["seq"].as_u64().unwrap();
        assert!(seq >= last, "seq {seq} after {last}");
        last = seq;
    }
}
