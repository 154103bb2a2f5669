//! The directory on a real 3-master Redis Cluster (docs/operations.md, "Running on a Redis
//! Cluster"): two workspaces whose directory slots are on different masters, one on each of
//! two cells, traffic on both through one gateway, then `kill -9` of the master that holds one
//! workspace's directory slot (no replicas, so nothing takes over until it restarts).
//!
//! What happens, and is asserted: nothing acked is lost in either workspace; the other
//! workspace's clients never notice; the lost workspace's clients keep chatting too, because
//! the gateway routes its sessions from its last-known copy of the directory (static
//! stability), and a gateway that never routed it answers a new session `unavailable`. The
//! directory answers `503` for what needs the lost slot only (reading or creating a workspace
//! there, listing every workspace) and serves the rest. Once the master restarts with its data,
//! the lost workspace is served everywhere again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::time::Duration;

use cluster::traffic::{all_messages, check_nothing_lost, Report, Sender};
use cluster::{Client, Cluster, WAIT};
use confab_directory::redis_engine::keys;
use confab_shared::WorkspaceId;
use confab_testkit::RedisCluster;
use reqwest::Method;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How long each phase of traffic runs.
const PHASE: Duration = Duration::from_secs(3);

/// The first of `w0`, `w1`, … whose directory slot's master is (`on`) or is not node `node`,
/// and is none of `taken`.
fn workspace_where(cluster: &RedisCluster, node: usize, on: bool, taken: &[&str]) -> String {
    (0..1000)
        .map(|i| format!("w{i}"))
        .find(|ws| {
            let key = keys::workspace(&WorkspaceId::new(ws).unwrap());
            !taken.contains(&ws.as_str()) && (cluster.master_of(&key) == node) == on
        })
        .expect("a workspace id on that master")
}

#[tokio::test]
async fn a_dead_directory_master_costs_its_workspaces_directory_reads_and_no_acked_message() {
    let mut cluster = Cluster::new()
        .redis_cluster()
        .cell("c1", "r")
        .cell("c2", "r")
        .gateways(2)
        .start()
        .await;
    let redis = cluster.directory.as_cluster().expect("a Redis Cluster");
    // The master to kill holds neither the cell registry nor the presence index, so that
    // what it costs is one workspace's slot (the registry's master is the subject of
    // docs/operations.md too: heartbeats and placement stop, serving does not).
    let (cells_node, due_node) = (
        redis.master_of(keys::CELLS),
        redis.master_of(keys::PRESENCE_DUE),
    );
    let victim = (0..3)
        .find(|n| *n != cells_node && *n != due_node)
        .expect("a master without the registry and the index");
    let lost = workspace_where(redis, victim, true, &[]);
    let kept = workspace_where(redis, victim, false, &[]);
    let lost_later = workspace_where(redis, victim, true, &[&lost]);
    let kept_later = workspace_where(redis, victim, false, &[&kept]);
    let lost_cell = cluster.create_workspace(&lost, "r").await;
    let kept_cell = cluster.create_workspace(&kept, "r").await;
    assert_ne!(
        lost_cell, kept_cell,
        "placement spreads the two over both cells"
    );

    let stop = CancellationToken::new();
    let mut channels = Vec::new();
    let mut senders = Vec::new();
    let mut tokens = Vec::new();
    for workspace in [&lost, &kept] {
        let reader = cluster.token(workspace, "a").await;
        let (status, body) = cluster
            .api(
                0,
                &reader,
                Method::POST,
                "/v1/channels",
                Some(json!({"name": "general", "kind": "public", "members": ["a", "b", "c"]})),
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
                measure: false,
            };
            senders.push((workspace.clone(), tokio::spawn(sender.run(stop.clone()))));
        }
        tokens.push(cluster.token(workspace, "c").await);
        channels.push((workspace.clone(), reader, channel));
    }
    let (lost_token, kept_token) = (tokens[0].clone(), tokens[1].clone());

    tokio::time::sleep(PHASE).await;
    cluster
        .directory
        .as_cluster_mut()
        .expect("a Redis Cluster")
        .kill_node(victim);
    tokio::time::sleep(PHASE).await;

    // The directory answers for what it still has and 503 for the lost slot.
    let status = |(status, _): (u16, serde_json::Value)| status;
    let path = |ws: &str| format!("/admin/v1/workspaces/{ws}");
    assert_eq!(
        status(cluster.admin(0, Method::GET, &path(&kept), None).await),
        200
    );
    assert_eq!(
        status(cluster.admin(0, Method::GET, &path(&lost), None).await),
        503
    );
    assert_eq!(
        status(
            cluster
                .admin(0, Method::GET, "/admin/v1/workspaces", None)
                .await
        ),
        503
    );
    assert_eq!(
        status(cluster.admin(0, Method::GET, "/admin/v1/cells", None).await),
        200
    );
    let create = |ws: &str| Some(json!({"id": ws, "region": "r"}));
    assert_eq!(
        status(
            cluster
                .admin(0, Method::POST, "/admin/v1/workspaces", create(&kept_later))
                .await
        ),
        201
    );
    assert_eq!(
        status(
            cluster
                .admin(0, Method::POST, "/admin/v1/workspaces", create(&lost_later))
                .await
        ),
        503
    );
    // A new session of the lost workspace: the gateway that routed it attaches it from its
    // last-known directory; one that never did cannot, and says `unavailable`.
    let mut routed = Client::connect(&cluster.gateway(0).ws_url(), &lost_token, None).await;
    let ack = routed
        .request(json!({"op": "send", "channel": channels[0].2, "text": "during"}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let refused = Client::try_connect(&cluster.gateway(1).ws_url(), &lost_token, None).await;
    let refusal = refused
        .err()
        .expect("a gateway that never routed it refuses");
    assert!(
        refusal.contains("unavailable") || refusal.contains("4010"),
        "{refusal}"
    );
    // The other workspace is served by both gateways as before.
    Client::connect(&cluster.gateway(1).ws_url(), &kept_token, None).await;
    tokio::time::sleep(PHASE).await;

    cluster
        .directory
        .as_cluster_mut()
        .expect("a Redis Cluster")
        .restart_node(victim);
    // Back with its data: the lost workspace's record is read again, by every gateway.
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(cluster.admin(1, Method::GET, &path(&lost), None).await) != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{lost} never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Client::connect(&cluster.gateway(1).ws_url(), &lost_token, None).await;
    tokio::time::sleep(PHASE).await;
    stop.cancel();

    let mut reports: Vec<(String, Report)> = Vec::new();
    for (workspace, sender) in senders {
        reports.push((workspace, sender.await.unwrap()));
    }
    for (workspace, report) in &reports {
        println!("{workspace}: {report}");
        // Neither workspace's clients noticed: the gateway routes both from what it knows.
        assert!(
            report.disruptions.is_empty() && report.errors.is_empty(),
            "{workspace}'s clients were disturbed: {report}"
        );
    }
    for (workspace, reader, channel) in &channels {
        let workspace_reports: Vec<Report> = reports
            .iter()
            .filter(|(w, _)| w == workspace)
            .map(|(_, r)| r.clone())
            .collect();
        let messages = all_messages(&cluster.gateway(0).url(), reader, channel).await;
        let acked = check_nothing_lost(&workspace_reports, &messages);
        assert!(acked > 0, "{workspace}: nothing was acked");
        println!("{workspace}: {acked} acked messages, all in the log once");
    }
}
