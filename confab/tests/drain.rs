//! Drain with move and undrain end to end (SPEC §7), through `confab ctl` as an operator runs
//! them: a drained cell's workspaces move one at a time to the healthy cells of its region
//! with the most room, under traffic, until it holds none.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod common_move;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use cluster::Cluster;
use common_move::{assert_acks_in_history, channel, history, keep_sending, wait_for_count};
use reqwest::Method;
use serde_json::{json, Value};

/// Runs `confab ctl` against gateway 0: (success, stdout, stderr).
fn ctl(cluster: &cluster::Running, args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args([
            "ctl",
            "--gateway",
            &cluster.gateway(0).url(),
            "--admin-token",
            cluster::ADMIN_TOKEN,
        ])
        .args(args)
        .output()
        .expect("run confab ctl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

async fn post(cluster: &cluster::Running, path: &str, body: Option<Value>) -> (u16, Value) {
    cluster.admin(0, Method::POST, path, body).await
}

#[tokio::test]
async fn a_drain_with_move_empties_the_cell_one_workspace_at_a_time_under_traffic() {
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "us-east")
        .cell("c3", "us-east")
        .cell("e1", "eu-west")
        .gateways(2)
        .start()
        .await;
    // Three workspaces on c1: the other us-east cells take none while drained.
    for cell in ["c2", "c3"] {
        assert_eq!(
            post(&cluster, &format!("/admin/v1/cells/{cell}/drain"), None)
                .await
                .0,
            200
        );
    }
    for ws in ["w1", "w2", "w3"] {
        assert_eq!(cluster.create_workspace(ws, "us-east").await, "c1");
    }
    for cell in ["c2", "c3"] {
        let (status, body) = post(&cluster, &format!("/admin/v1/cells/{cell}/undrain"), None).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("healthy")));
    }
    let token = cluster.token("w2", "alice").await;
    let room = channel(&cluster, &token, "room", &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let sender = keep_sending(
        cluster.gateway(1).ws_url(),
        token.clone(),
        room.clone(),
        "alice".into(),
        stop.clone(),
        acked.clone(),
    );
    wait_for_count(&acked, 30).await;

    let (ok, out, err) = ctl(&cluster, &["cell", "drain", "c1", "--move"]);
    assert!(ok, "ctl cell drain --move failed: {err}");
    assert!(out.contains("drained"), "{out}");
    let at_drained = acked.load(Ordering::Acquire);
    wait_for_count(&acked, at_drained + 30).await;
    stop.store(true, Ordering::Release);
    let sent = sender.await.unwrap();
    assert_acks_in_history(&sent.acks, &history(&cluster, 0, &token, &room).await);

    let (ok, out, err) = ctl(&cluster, &["--json", "workspaces", "--cell", "c1"]);
    assert!(ok, "{err}");
    let on_c1: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(on_c1["workspaces"], json!([]));
    let (_, all) = cluster
        .admin(0, Method::GET, "/admin/v1/workspaces", None)
        .await;
    let placed: Vec<(String, String)> = all["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            assert_eq!(w["region"], "us-east", "a drain stays in its region: {w}");
            (
                w["id"].as_str().unwrap().into(),
                w["cell"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(placed.len(), 3);
    // Each move went to the cell with the most room then: c2, c3, then c2 again.
    let per_cell = |cell: &str| placed.iter().filter(|(_, c)| c == cell).count();
    assert_eq!((per_cell("c2"), per_cell("c3")), (2, 1), "{placed:?}");
    let (ok, out, err) = ctl(&cluster, &["workspaces", "--cell", "c3"]);
    assert!(
        ok && out.starts_with("ID") && out.lines().count() == 2,
        "{out}{err}"
    );

    // Still draining: no new workspace lands there; undrained, it takes them again.
    let (_, cells) = cluster.admin(0, Method::GET, "/admin/v1/cells", None).await;
    let c1 = cells["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "c1")
        .cloned();
    assert_eq!(
        c1.map(|c| (c["status"].clone(), c["workspaces"].clone())),
        Some((json!("draining"), json!(0)))
    );
    let (ok, out, err) = ctl(&cluster, &["cell", "undrain", "c1"]);
    assert!(ok && out.contains("takes new workspaces"), "{out}{err}");
    assert_eq!(cluster.create_workspace("w4", "us-east").await, "c1");
}

#[tokio::test]
async fn drain_and_undrain_answer_not_found_for_an_unknown_cell_and_drain_with_move_answers_202() {
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "us-east")
        .start()
        .await;
    assert_eq!(
        post(&cluster, "/admin/v1/cells/nosuch/drain", None).await.0,
        404
    );
    assert_eq!(
        post(&cluster, "/admin/v1/cells/nosuch/undrain", None)
            .await
            .0,
        404
    );
    assert_eq!(cluster.create_workspace("w1", "us-east").await, "c1");
    let (status, body) = post(
        &cluster,
        "/admin/v1/cells/c1/drain",
        Some(json!({"move": true})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["workspaces"], 1);
    let deadline = std::time::Instant::now() + cluster::WAIT;
    loop {
        let (_, listed) = cluster
            .admin(0, Method::GET, "/admin/v1/workspaces?cell=c2", None)
            .await;
        if listed["workspaces"] == json!([{"id": "w1", "cell": "c2", "region": "us-east"}]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "w1 never moved: {listed}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
