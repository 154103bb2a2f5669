//! SPEC §6 "at least once, never lost" in distributed mode: pending webhook deliveries live in
//! the cell's store (Redis with `appendonly yes`, `appendfsync always`), so a cell killed with
//! SIGKILL while its receiver is down delivers every acked event after it restarts; and they
//! "move with the workspace" (SPEC §7): after a live move the new cell delivers them, and the
//! old one no longer does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod webhook_receiver;

use std::collections::HashSet;
use std::time::Duration;

use cluster::{Cluster, Running, WAIT};
use reqwest::Method;
use serde_json::{json, Value};
use webhook_receiver::Receiver;

/// Bound for the deliveries once the receiver is up (attempts back off 1 s, 2 s, 4 s, ...).
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

/// Workspace `acme`'s channel `ops` (alice and `bot`), and bot's webhook for its messages to a
/// receiver port where nothing listens yet.
struct Setup {
    alice: String,
    channel: String,
    port: u16,
    id: String,
}

async fn channel_with_a_webhook_to_a_down_receiver(cluster: &Running) -> Setup {
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
    Setup {
        alice,
        channel,
        port,
        id,
    }
}

async fn post(cluster: &Running, token: &str, channel: &str, text: &str) -> u64 {
    let (status, ack) = cluster
        .api(
            0,
            token,
            Method::POST,
            &format!("/v1/channels/{channel}/messages"),
            Some(json!({ "text": text })),
        )
        .await;
    assert_eq!(status, 201, "{ack}");
    ack["seq"].as_u64().unwrap()
}

/// Waits until the receiver got one delivery per seq, and checks they are exactly those, in
/// seq order (a delivery is attempted only after every earlier one succeeded).
async fn assert_delivered_in_order(receiver: &Receiver, id: &str, channel: &str, seqs: &[u64]) {
    let hits = receiver
        .wait_until(DELIVERY_WAIT, |hits| {
            hits.iter()
                .map(|h| h.delivery_id().to_string())
                .collect::<HashSet<_>>()
                .len()
                >= seqs.len()
        })
        .await;
    let expected: HashSet<String> = seqs
        .iter()
        .map(|seq| format!("{id}:{channel}:{seq}"))
        .collect();
    let got: HashSet<String> = hits.iter().map(|h| h.delivery_id().to_string()).collect();
    assert_eq!(got, expected);
    let mut last = 0;
    for hit in &hits {
        let seq = hit.body["seq"].as_u64().unwrap();
        assert!(seq >= last, "seq {seq} after {last}");
        last = seq;
    }
}

/// The sum of a counter's series with `label` in a cell's Prometheus page (0 when absent).
async fn cell_counter(cluster: &Running, cell: usize, name: &str, label: &str) -> f64 {
    let url = format!("http://127.0.0.1:{}/metrics", cluster.cells[cell].port);
    let page = reqwest::get(&url).await.unwrap().text().await.unwrap();
    page.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn deliveries_pending_while_the_receiver_is_down_survive_a_kill_9_of_the_cell() {
    let mut cluster = Cluster::new().cell("c1", "local").start().await;
    cluster.create_workspace("acme", "local").await;
    let Setup {
        alice,
        channel,
        port,
        id,
    } = channel_with_a_webhook_to_a_down_receiver(&cluster).await;
    let mut seqs = Vec::new();
    for i in 0..100 {
        seqs.push(post(&cluster, &alice, &channel, &format!("m{i}")).await);
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
    assert_delivered_in_order(&receiver, &id, &channel, &seqs).await;
}

#[tokio::test]
async fn pending_webhook_deliveries_move_with_their_workspace_and_only_the_new_cell_sends_them() {
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "us-east")
        .start()
        .await;
    assert_eq!(cluster.create_workspace("acme", "us-east").await, "c1");
    let Setup {
        alice,
        channel,
        port,
        id,
    } = channel_with_a_webhook_to_a_down_receiver(&cluster).await;

    let mut seqs = Vec::new();
    for i in 0..40 {
        seqs.push(post(&cluster, &alice, &channel, &format!("before {i}")).await);
    }
    let (status, moved) = cluster
        .admin(
            0,
            Method::POST,
            "/admin/v1/workspaces/acme/move",
            Some(json!({"cell": "c2"})),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    for i in 0..40 {
        seqs.push(post(&cluster, &alice, &channel, &format!("after {i}")).await);
    }

    // The webhook came along, still active.
    let bot = cluster.token("acme", "bot").await;
    let (status, listed) = cluster
        .api(0, &bot, Method::GET, "/v1/webhooks", None)
        .await;
    assert_eq!(status, 200, "{listed}");
    let hooks: Vec<Value> = listed["webhooks"].as_array().unwrap().clone();
    assert_eq!(hooks.len(), 1, "{listed}");
    assert_eq!(hooks[0]["id"], id.as_str());
    assert_eq!(hooks[0]["status"], "active");

    let receiver = Receiver::start_on(port).await;
    assert_delivered_in_order(&receiver, &id, &channel, &seqs).await;

    // The new cell sent them all; the old one, which held them while the receiver was down,
    // sent none after the release.
    let delivered = r#"outcome="delivered""#;
    // The receiver records a hit before it answers, and a cell counts a delivery once the
    // answer is in, so the last count may trail the last hit by a moment.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let on_c2 = cell_counter(&cluster, 1, "confab_webhook_deliveries_total", delivered).await;
        if on_c2 >= seqs.len() as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "c2 delivered {on_c2} of {}",
            seqs.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_c1 = cell_counter(&cluster, 0, "confab_webhook_deliveries_total", delivered).await;
    assert_eq!(on_c1, 0.0, "the old cell delivered after the move");
}
