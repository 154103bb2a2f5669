//! Cells as the unit of operations, with real Redis and real processes: a cell's metrics from
//! its first second, and its bounds (`--max-workspaces`, `--max-connections`): placement skips
//! a full cell, a region whose cells are all full answers `503`, `GET /admin/v1/cells` shows
//! the bounds, and an attach past `--max-connections` answers `unavailable`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::time::{Duration, Instant};

use cluster::{Client, Cluster, WAIT};
use reqwest::Method;
use serde_json::json;

/// Every metric a cell serves, by the names alerts and dashboards use.
const CELL_METRICS: [&str; 7] = [
    "confab_build_info{version=",
    "confab_cell_workspaces",
    "confab_cell_channel_actors",
    "confab_cell_user_actors",
    "confab_cell_links",
    "confab_store_op_duration_seconds_bucket{",
    "confab_events_appended_total",
];

/// The first `/metrics` page `url` answers 200 with.
async fn first_metrics_page(url: &str) -> String {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(response) = client.get(format!("{url}/metrics")).send().await {
            if response.status().is_success() {
                return response.text().await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{url}/metrics never answered 200");
}

/// The value of the sample line that starts with `series` (name and labels, as rendered).
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics_page(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_cell_serves_every_metric_from_its_first_page_and_counts_what_it_does() {
    let mut cluster = Cluster::new().cell("c1", "local").start().await;
    // A cell that restarts serves its first page again: read that page, not one taken after
    // a scrape interval.
    cluster.cells[0].kill9();
    let url = cluster.cells[0].url();
    let restarted = async {
        cluster.cells[0].restart().await;
    };
    let (page, ()) = tokio::join!(first_metrics_page(&url), restarted);
    for name in CELL_METRICS {
        assert!(
            page.contains(name),
            "{name} missing from the first page:\n{page}"
        );
    }
    assert_eq!(
        sample(&page, "confab_events_appended_total"),
        Some(0.0),
        "{page}"
    );

    cluster.create_workspace("acme", "local").await;
    let token = cluster.token("acme", "alice").await;
    let (status, body) = cluster
        .api(
            0,
            &token,
            Method::POST,
            "/v1/channels",
            Some(json!({"name": "general", "kind": "public", "members": ["alice"]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let channel = body["id"].as_str().unwrap().to_string();
    let mut alice = Client::connect(&cluster.gateway(0).ws_url(), &token, None).await;
    for i in 0..3 {
        let ack = alice
            .request(json!({"op": "send", "channel": channel, "text": format!("m{i}")}))
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    // Gauges are sampled every second: poll until they show the traffic.
    let deadline = Instant::now() + WAIT;
    loop {
        let page = metrics_page(&url).await;
        let shows =
            |series: &str, at_least: f64| sample(&page, series).is_some_and(|v| v >= at_least);
        // The channel's creation is its first event (alice joining), then three messages.
        if shows("confab_events_appended_total", 4.0)
            && shows("confab_cell_workspaces", 1.0)
            && shows("confab_cell_links", 1.0)
            && shows("confab_cell_channel_actors", 1.0)
            && shows("confab_cell_user_actors", 1.0)
            && shows("confab_store_op_duration_seconds_count{op=\"append\"}", 3.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the traffic:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /admin/v1/cells`, by id.
async fn cells(cluster: &cluster::Running) -> serde_json::Map<String, serde_json::Value> {
    let (status, body) = cluster.admin(0, Method::GET, "/admin/v1/cells", None).await;
    assert_eq!(status, 200, "{body}");
    body["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c.clone()))
        .collect()
}

/// Waits until the directory holds what every cell's heartbeat published (its bounds are
/// sent with each heartbeat).
async fn wait_for_cells(
    cluster: &cluster::Running,
    ready: impl Fn(&serde_json::Map<String, serde_json::Value>) -> bool,
) -> serde_json::Map<String, serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let cells = cells(cluster).await;
        if ready(&cells) {
            return cells;
        }
        assert!(Instant::now() < deadline, "cells never became {cells:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn try_create_workspace(cluster: &cluster::Running, id: &str) -> (u16, serde_json::Value) {
    cluster
        .admin(
            0,
            Method::POST,
            "/admin/v1/workspaces",
            Some(json!({"id": id, "region": "r"})),
        )
        .await
}

#[tokio::test]
async fn placement_skips_a_full_cell_and_a_region_of_full_cells_answers_503() {
    let cluster = Cluster::new()
        .cell_with("c1", "r", &["--max-workspaces", "1"])
        .cell_with("c2", "r", &["--max-workspaces", "2"])
        .cell("c3", "other")
        .start()
        .await;
    let shown = wait_for_cells(&cluster, |cells| {
        cells["c1"]["max_workspaces"] == 1 && cells["c2"]["max_workspaces"] == 2
    })
    .await;
    assert_eq!(shown["c1"]["max_connections"], json!(null), "{shown:?}");
    assert_eq!(shown["c3"]["max_workspaces"], json!(null), "{shown:?}");
    // `confab ctl cells` shows them as its last two columns, `-` for no bound.
    let ctl = std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["ctl", "--gateway", &cluster.gateway(0).url()])
        .args(["--admin-token", cluster::ADMIN_TOKEN, "cells"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&ctl.stdout);
    let bounds_of = |id: &str| -> Vec<String> {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
        let columns: Vec<&str> = row.split_whitespace().collect();
        columns[columns.len() - 2..]
            .iter()
            .map(|c| c.to_string())
            .collect()
    };
    assert_eq!(bounds_of("c1"), ["1", "-"], "{table}");
    assert_eq!(bounds_of("c3"), ["-", "-"], "{table}");

    // Both empty: the tie goes to c1, which is then full, so the next two go to c2.
    assert_eq!(cluster.create_workspace("w1", "r").await, "c1");
    assert_eq!(cluster.create_workspace("w2", "r").await, "c2");
    assert_eq!(cluster.create_workspace("w3", "r").await, "c2");
    let (status, body) = try_create_workspace(&cluster, "w4").await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("full"), "{body}");
    // The refused id stays free, and another region is not affected.
    assert_eq!(cluster.create_workspace("w4", "other").await, "c3");
    let (status, body) = cluster
        .admin(0, Method::GET, "/admin/v1/workspaces/w4", None)
        .await;
    assert_eq!((status, body["cell"].clone()), (200, json!("c3")), "{body}");
}

/// Opens a client socket and says hello; returns the frames and close code it got.
async fn hello_outcome(ws_url: &str, token: &str) -> (Vec<serde_json::Value>, Option<u16>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let hello = json!({"op": "hello", "token": token}).to_string();
    ws.send(Message::text(hello)).await.unwrap();
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                let ready = frame["op"] == "ready";
                frames.push(frame);
                if ready {
                    return (frames, None);
                }
            }
            Ok(Some(Ok(Message::Close(close)))) => {
                return (frames, close.map(|c| u16::from(c.code)))
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no outcome of hello: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_attach_past_max_connections_answers_unavailable_and_the_cell_counts_as_full() {
    let cluster = Cluster::new()
        .cell_with("c1", "r", &["--max-connections", "1"])
        .start()
        .await;
    wait_for_cells(&cluster, |cells| cells["c1"]["max_connections"] == 1).await;
    cluster.create_workspace("acme", "r").await;
    let alice = cluster.token("acme", "alice").await;
    let bob = cluster.token("acme", "bob").await;
    let (status, body) = cluster
        .api(
            0,
            &alice,
            Method::POST,
            "/v1/channels",
            Some(json!({"name": "general", "kind": "public", "members": ["alice"]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let channel = body["id"].as_str().unwrap().to_string();
    let ws_url = cluster.gateway(0).ws_url();
    let mut first = Client::connect(&ws_url, &alice, None).await;

    let (frames, close) = hello_outcome(&ws_url, &bob).await;
    assert_eq!(close, Some(4010), "{frames:?}");
    let error = frames
        .iter()
        .find(|f| f["op"] == "error")
        .expect("an error");
    assert_eq!(error["code"], "unavailable", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--max-connections"),
        "{error}"
    );
    // The attached session is untouched.
    let ack = first
        .request(json!({"op": "send", "channel": channel, "text": "still here"}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");

    // At its connection bound the cell takes no new workspace either.
    wait_for_cells(&cluster, |cells| cells["c1"]["connections"] == 1).await;
    let (status, body) = try_create_workspace(&cluster, "globex").await;
    assert_eq!(status, 503, "{body}");

    // Once alice leaves, bob gets in.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let (frames, close) = hello_outcome(&ws_url, &bob).await;
        if close.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob never got in: {frames:?} {close:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
