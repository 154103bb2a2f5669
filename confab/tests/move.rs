//! Live workspace moves end to end (SPEC §7): real cells with durable Redis stores, real
//! gateways, clients sending all along; moves across regions, the admin API's answers, and a
//! move whose gateway is killed half-way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod common_move;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{Client, Cluster, WAIT};
use common_move::{
    assert_acks_in_history, channel, connect_retrying, directory_cli, history, keep_sending,
    metric, move_key, post_messages, store_holds, wait_for_count,
};
use reqwest::Method;
use serde_json::{json, Value};

async fn move_to(cluster: &cluster::Running, gateway: usize, ws: &str, cell: &str) -> (u16, Value) {
    cluster
        .admin(
            gateway,
            Method::POST,
            &format!("/admin/v1/workspaces/{ws}/move"),
            Some(json!({ "cell": cell })),
        )
        .await
}

/// The workspace's record, asked of the cluster's last gateway (tests kill the first).
async fn cell_of(cluster: &cluster::Running, ws: &str) -> Value {
    let last = cluster.gateways.len() - 1;
    let (status, body) = cluster
        .admin(
            last,
            Method::GET,
            &format!("/admin/v1/workspaces/{ws}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_live_move_under_four_continuous_senders_keeps_every_acked_seq_once_and_without_gap() {
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "us-east")
        .gateways(2)
        .start()
        .await;
    assert_eq!(cluster.create_workspace("acme", "us-east").await, "c1");
    let users = ["u1", "u2", "u3", "u4"];
    let mut tokens = Vec::new();
    for user in users {
        tokens.push(cluster.token("acme", user).await);
    }
    let room = channel(&cluster, &tokens[0], "room", &users[1..]).await;
    // Some history beside the busy channel, so the copy has more than one channel to move.
    for k in 0..4 {
        let side = channel(&cluster, &tokens[0], &format!("side{k}"), &["u2"]).await;
        post_messages(&cluster, &tokens[0], &side, 10).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = users
        .iter()
        .zip(&tokens)
        .enumerate()
        .map(|(i, (user, token))| {
            keep_sending(
                cluster.gateway(i % 2).ws_url(),
                token.clone(),
                room.clone(),
                user.to_string(),
                stop.clone(),
                acked.clone(),
            )
        })
        .collect();
    wait_for_count(&acked, 80).await;

    let (status, body) = move_to(&cluster, 0, "acme", "c2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["cell"].as_str(), body["moved"].as_bool()),
        (Some("c2"), Some(true))
    );
    let at_move = acked.load(Ordering::Acquire);
    // Traffic goes on, now served by c2.
    wait_for_count(&acked, at_move + 80).await;
    stop.store(true, Ordering::Release);
    let mut acks = Vec::new();
    for sender in senders {
        let sent = sender.await.unwrap();
        assert!(
            sent.reconnects >= 1,
            "every session is told to reconnect (4010) by the move"
        );
        acks.extend(sent.acks);
    }

    assert_eq!(cell_of(&cluster, "acme").await["cell"], "c2");
    let messages = history(&cluster, 1, &tokens[1], &room).await;
    assert_acks_in_history(&acks, &messages);
    // The source let go of everything it held of the workspace; the target counts it.
    assert!(
        !store_holds(&cluster.cells[0], "acme"),
        "c1 still holds acme's keys"
    );
    let (_, cells) = cluster.admin(0, Method::GET, "/admin/v1/cells", None).await;
    let count = |id: &str| {
        cells["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| c["workspaces"].clone())
            .unwrap()
    };
    assert_eq!((count("c1"), count("c2")), (json!(0), json!(1)));
    let (_, listed) = cluster
        .admin(0, Method::GET, "/admin/v1/workspaces?cell=c2", None)
        .await;
    assert_eq!(
        listed["workspaces"],
        json!([{"id": "acme", "cell": "c2", "region": "us-east"}])
    );
    let done = r#"confab_workspace_moves_total{outcome="done"}"#;
    assert_eq!(metric(&cluster.gateway(0).url(), done).await, 1.0);
}

#[tokio::test]
async fn a_move_to_another_region_keeps_history_markers_and_idempotency_keys_and_seqs_continue() {
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "eu-west")
        .start()
        .await;
    cluster.create_workspace("acme", "us-east").await;
    let (alice_token, bob_token) = (
        cluster.token("acme", "alice").await,
        cluster.token("acme", "bob").await,
    );
    let room = channel(&cluster, &alice_token, "room", &["bob"]).await;
    let seeded = post_messages(&cluster, &alice_token, &room, 30).await;
    let mut alice = Client::connect(&cluster.gateway(0).ws_url(), &alice_token, None).await;
    let first = alice
        .request(json!({"op": "send", "channel": room, "text": "once", "client_msg_id": "k1"}))
        .await;
    assert_eq!(first["op"], "ack", "{first}");
    let mut bob = Client::connect(&cluster.gateway(0).ws_url(), &bob_token, None).await;
    let read = bob
        .request(json!({"op": "read", "channel": room, "seq": seeded[9]}))
        .await;
    assert_eq!(read["op"], "ack", "{read}");
    drop(bob);

    let (status, body) = move_to(&cluster, 0, "acme", "c2").await;
    assert_eq!(status, 200, "{body}");
    let record = cell_of(&cluster, "acme").await;
    assert_eq!(
        (record["cell"].as_str(), record["region"].as_str()),
        (Some("c2"), Some("eu-west")),
        "the workspace's region becomes the target's"
    );
    assert_eq!(alice.closed(WAIT).await, Some(4010));

    let mut alice = connect_retrying(&cluster.gateway(0).ws_url(), &alice_token, None).await;
    let again = alice
        .request(json!({"op": "send", "channel": room, "text": "once", "client_msg_id": "k1"}))
        .await;
    assert_eq!(
        again["seq"], first["seq"],
        "the idempotency key moved with the workspace"
    );
    let next = alice
        .request(json!({"op": "send", "channel": room, "text": "after"}))
        .await;
    assert_eq!(
        next["seq"].as_u64(),
        Some(first["seq"].as_u64().unwrap() + 1)
    );
    let bob = Client::connect(&cluster.gateway(0).ws_url(), &bob_token, None).await;
    let listed = bob.ready["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == json!(room))
        .cloned()
        .unwrap();
    assert_eq!(
        listed["read_seq"].as_u64(),
        Some(seeded[9]),
        "read markers moved"
    );
    let messages = history(&cluster, 0, &alice_token, &room).await;
    assert_eq!(
        messages.len(),
        32,
        "30 seeded, the idempotent one once, one after"
    );
}

#[tokio::test]
async fn move_answers_not_found_for_unknown_names_ok_for_the_same_cell_and_unavailable_for_a_draining_or_down_target(
) {
    let mut cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "us-east")
        .cell("c3", "us-east")
        .start()
        .await;
    assert_eq!(cluster.create_workspace("acme", "us-east").await, "c1");

    let (status, body) = move_to(&cluster, 0, "nosuch", "c2").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = move_to(&cluster, 0, "acme", "nosuch").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = move_to(&cluster, 0, "acme", "c1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["cell"].as_str(), body["moved"].as_bool()),
        (Some("c1"), Some(false))
    );

    let (status, _) = cluster
        .admin(0, Method::POST, "/admin/v1/cells/c2/drain", None)
        .await;
    assert_eq!(status, 200);
    let (status, body) = move_to(&cluster, 0, "acme", "c2").await;
    assert_eq!(status, 503, "a draining cell takes no workspace: {body}");
    let (status, body) = cluster
        .admin(0, Method::POST, "/admin/v1/cells/c2/undrain", None)
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("healthy")));

    cluster.cells[2].kill9();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, body) = cluster.admin(0, Method::GET, "/admin/v1/cells", None).await;
        let down = body["cells"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == "c3" && c["status"] == "down");
        if down {
            break;
        }
        assert!(Instant::now() < deadline, "c3 never reported down");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, body) = move_to(&cluster, 0, "acme", "c3").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(cell_of(&cluster, "acme").await["cell"], "c1");
    // Nothing moved, nothing paused: the workspace still serves.
    let token = cluster.token("acme", "alice").await;
    let room = channel(&cluster, &token, "room", &[]).await;
    assert_eq!(post_messages(&cluster, &token, &room, 1).await, vec![2]);
}

/// Waits until the directory holds no record of a move of `ws`.
async fn wait_move_record_gone(cluster: &cluster::Running, ws: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !directory_cli(cluster, &["GET", &move_key(ws)]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the move of {ws} was never finished or undone"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A workspace whose copy takes more than one page: a channel with 900 members is over 900
/// keys (each member's channel set), and pages hold 512.
async fn seed_big_channel(cluster: &cluster::Running, ws: &str) {
    let members: Vec<String> = (0..900).map(|i| format!("m{i}")).collect();
    let (status, body) = cluster
        .admin(
            0,
            Method::POST,
            &format!("/admin/v1/workspaces/{ws}/channels"),
            Some(json!({"id": "big", "kind": "public", "members": members})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_move_whose_gateway_is_killed_half_way_is_undone_by_another_gateway_and_the_next_move_finishes(
) {
    let mut cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "us-east")
        .gateways(2)
        .move_page_delay_ms(3000)
        .start()
        .await;
    assert_eq!(cluster.create_workspace("acme", "us-east").await, "c1");
    seed_big_channel(&cluster, "acme").await;
    let token = cluster.token("acme", "m1").await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let sender = keep_sending(
        cluster.gateway(1).ws_url(),
        token.clone(),
        "big".into(),
        "m1".into(),
        stop.clone(),
        acked.clone(),
    );
    wait_for_count(&acked, 20).await;

    // Gateway 0 starts the move and dies during its bulk copy (it pauses 3 s between pages).
    let url = format!("{}/admin/v1/workspaces/acme/move", cluster.gateway(0).url());
    let attempt = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .bearer_auth(cluster::ADMIN_TOKEN)
            .json(&json!({"cell": "c2"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let deadline = Instant::now() + WAIT;
    while directory_cli(&cluster, &["GET", &move_key("acme")]).is_empty() {
        assert!(Instant::now() < deadline, "the move never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.gateways[0].kill9();
    assert!(
        attempt.await.unwrap().is_err(),
        "the killed gateway never answered"
    );

    // Gateway 1 finds the abandoned move once its lease ran out, and undoes it.
    wait_move_record_gone(&cluster, "acme").await;
    assert_eq!(cell_of(&cluster, "acme").await["cell"], "c1");
    assert!(
        !store_holds(&cluster.cells[1], "acme"),
        "c2 kept a copy of an undone move"
    );
    assert_eq!(
        cluster.cells[0].store_cli(&["HGET", "confab:cs:{acme}.ctl", "mark"]),
        ""
    );
    let undone = r#"confab_workspace_moves_total{outcome="undone"}"#;
    assert_eq!(metric(&cluster.gateway(1).url(), undone).await, 1.0);
    let before = acked.load(Ordering::Acquire);
    wait_for_count(&acked, before + 20).await;

    // The next move, from the restarted gateway, goes through.
    cluster.gateways[0].restart().await;
    let (status, body) = move_to(&cluster, 0, "acme", "c2").await;
    assert_eq!(status, 200, "{body}");
    let at_move = acked.load(Ordering::Acquire);
    wait_for_count(&acked, at_move + 20).await;
    stop.store(true, Ordering::Release);
    let sent = sender.await.unwrap();
    let messages = history(&cluster, 1, &token, "big").await;
    assert_acks_in_history(&sent.acks, &messages);
    assert!(!store_holds(&cluster.cells[0], "acme"));
}

#[tokio::test]
async fn a_move_whose_source_cell_is_killed_half_way_is_undone_once_the_cell_is_back() {
    let mut cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "us-east")
        .move_page_delay_ms(3000)
        .start()
        .await;
    assert_eq!(cluster.create_workspace("acme", "us-east").await, "c1");
    seed_big_channel(&cluster, "acme").await;
    let token = cluster.token("acme", "m1").await;
    let acked = post_messages(&cluster, &token, "big", 10).await;

    let url = format!("{}/admin/v1/workspaces/acme/move", cluster.gateway(0).url());
    let attempt = tokio::spawn(async move {
        let response = reqwest::Client::new()
            .post(url)
            .bearer_auth(cluster::ADMIN_TOKEN)
            .json(&json!({"cell": "c2"}))
            .send()
            .await
            .unwrap();
        response.status().as_u16()
    });
    let deadline = Instant::now() + WAIT;
    while directory_cli(&cluster, &["GET", &move_key("acme")]).is_empty() {
        assert!(Instant::now() < deadline, "the move never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.cells[0].kill9();
    assert_eq!(
        attempt.await.unwrap(),
        503,
        "the move fails while its source is down"
    );
    cluster.cells[0].restart().await;

    wait_move_record_gone(&cluster, "acme").await;
    assert_eq!(cell_of(&cluster, "acme").await["cell"], "c1");
    assert_eq!(
        cluster.cells[0].store_cli(&["HGET", "confab:cs:{acme}.ctl", "mark"]),
        ""
    );
    // Served by c1 alone, with everything it acked, and its seqs continue.
    let after = post_messages(&cluster, &token, "big", 1).await;
    assert_eq!(after, vec![acked.last().unwrap() + 1]);
    let messages = history(&cluster, 0, &token, "big").await;
    assert_eq!(messages.len(), 11);
}
