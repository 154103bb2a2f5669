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
