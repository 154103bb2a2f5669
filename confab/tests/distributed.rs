//! Distributed mode end to end: real `redis-server`s, real `confab cell` and `confab gateway`
//! processes, killed with SIGKILL and restarted (SPEC §1, §2, §4 guarantees, §7).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::time::{Duration, Instant};

use cluster::{Client, Cluster, Incoming, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

/// Creates a public channel in `workspace` as `creator`, with `members`; returns its id.
async fn channel(cluster: &cluster::Running, token: &str, name: &str, members: &[&str]) -> String {
    let (status, body) = cluster
        .api(
            0,
            token,
            Method::POST,
            "/v1/channels",
            Some(json!({"name": name, "kind": "public", "members": members})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// The next `message` event sent by `user` (the client's own messages are skipped).
async fn next_message_from(client: &mut Client, user: &str) -> Value {
    loop {
        let event = client.next_event("message").await;
        if event["user"] == user {
            return event;
        }
    }
}

async fn send(client: &mut Client, channel: &str, text: &str) -> u64 {
    let ack = client
        .request(json!({"op": "send", "channel": channel, "text": text}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    ack["seq"].as_u64().unwrap()
}

#[tokio::test]
async fn workspaces_are_placed_on_a_healthy_cell_of_their_region() {
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "eu-west")
        .start()
        .await;
    assert_eq!(cluster.create_workspace("acme", "us-east").await, "c1");
    assert_eq!(cluster.create_workspace("globex", "eu-west").await, "c2");

    let (status, body) = cluster
        .admin(
            0,
            Method::POST,
            "/admin/v1/workspaces",
            Some(json!({"region": "ap-south"})),
        )
        .await;
    assert_eq!(status, 503, "{body}");

    let (status, body) = cluster.admin(0, Method::GET, "/admin/v1/cells", None).await;
    assert_eq!(status, 200);
    let cells = body["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    for cell in cells {
        assert_eq!(cell["status"], "healthy", "{cell}");
        assert_eq!(cell["workspaces"], 1, "{cell}");
    }

    let (status, _) = cluster
        .admin(0, Method::POST, "/admin/v1/cells/c1/drain", None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = cluster
        .admin(
            0,
            Method::POST,
            "/admin/v1/workspaces",
            Some(json!({"region": "us-east"})),
        )
        .await;
    assert_eq!(status, 503, "a draining cell takes no new workspace");
    let (_, body) = cluster
        .admin(0, Method::GET, "/admin/v1/workspaces/acme", None)
        .await;
    assert_eq!(
        (body["cell"].as_str(), body["region"].as_str()),
        (Some("c1"), Some("us-east"))
    );
}

#[tokio::test]
async fn a_cell_that_stops_heartbeating_is_reported_down() {
    let mut cluster = Cluster::new()
        .cell("c1", "us-east")
        .cell("c2", "us-east")
        .start()
        .await;
    cluster.cells[1].kill9();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, body) = cluster.admin(0, Method::GET, "/admin/v1/cells", None).await;
        let c2 = body["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "c2")
            .cloned()
            .unwrap();
        if c2["status"] == "down" {
            break;
        }
        assert!(Instant::now() < deadline, "c2 never reported down: {c2}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Placement skips the down cell.
    assert_eq!(cluster.create_workspace("w1", "us-east").await, "c1");
}

#[tokio::test]
async fn clients_on_different_gateways_share_a_channel() {
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .gateways(2)
        .start()
        .await;
    cluster.create_workspace("acme", "us-east").await;
    let (alice_token, bob_token) = (
        cluster.token("acme", "alice").await,
        cluster.token("acme", "bob").await,
    );
    let room = channel(&cluster, &alice_token, "room", &["bob"]).await;

    let mut alice = Client::connect(&cluster.gateway(0).ws_url(), &alice_token, None).await;
    let mut bob = Client::connect(&cluster.gateway(1).ws_url(), &bob_token, None).await;
    let seq = send(&mut alice, &room, "hello from gateway 0").await;
    let event = bob.next_event("message").await;
    assert_eq!(
        (event["seq"].as_u64(), event["text"].as_str()),
        (Some(seq), Some("hello from gateway 0"))
    );

    let seq = send(&mut bob, &room, "hello from gateway 1").await;
    let event = next_message_from(&mut alice, "bob").await;
    assert_eq!(event["seq"].as_u64(), Some(seq));

    // A bot posting over HTTP on gateway 1 reaches a WebSocket on gateway 0.
    let (status, body) = cluster
        .api(
            1,
            &bob_token,
            Method::POST,
            &format!("/v1/channels/{room}/messages"),
            Some(json!({"text": "via http"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let event = next_message_from(&mut alice, "bob").await;
    assert_eq!(event["text"], "via http");
}

#[tokio::test]
async fn killing_a_gateway_mid_traffic_loses_nothing_for_a_client_that_resumes_elsewhere() {
    let mut cluster = Cluster::new()
        .cell("c1", "us-east")
        .gateways(2)
        .start()
        .await;
    cluster.create_workspace("acme", "us-east").await;
    let (alice_token, bob_token) = (
        cluster.token("acme", "alice").await,
        cluster.token("acme", "bob").await,
    );
    let room = channel(&cluster, &alice_token, "room", &["bob"]).await;

    let mut alice = Client::connect(&cluster.gateway(1).ws_url(), &alice_token, None).await;
    let mut bob = Client::connect(&cluster.gateway(0).ws_url(), &bob_token, None).await;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(send(&mut alice, &room, &format!("m{i}")).await);
    }
    // Bob reads some of them, then his gateway dies.
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(bob.next_event("message").await["seq"].as_u64().unwrap());
    }
    cluster.gateways[0].kill9();
    for i in 20..40 {
        sent.push(send(&mut alice, &room, &format!("m{i}")).await);
    }
    // Frames that reached bob's socket before the kill still count as seen.
    loop {
        match bob.read(Duration::from_millis(500)).await {
            Incoming::Frame(frame) if frame["type"] == "message" => {
                seen.push(frame["seq"].as_u64().unwrap())
            }
            Incoming::Frame(_) => {}
            Incoming::Closed(_) | Incoming::Timeout => break,
        }
    }
    let last = *seen.last().unwrap();
    let mut bob = Client::connect(
        &cluster.gateway(1).ws_url(),
        &bob_token,
        Some(json!({ room.clone(): last })),
    )
    .await;
    while seen.last() != sent.last() {
        seen.push(bob.next_event("message").await["seq"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (sent[0]..=*sent.last().unwrap()).collect();
    assert_eq!(seen, expected, "bob missed or repeated events");
}

#[tokio::test]
async fn a_killed_cell_restarts_with_its_history_and_seqs_continue() {
    let mut cluster = Cluster::new().cell("c1", "us-east").start().await;
    cluster.create_workspace("acme", "us-east").await;
    let token = cluster.token("acme", "alice").await;
    let room = channel(&cluster, &token, "room", &[]).await;
    let mut alice = Client::connect(&cluster.gateway(0).ws_url(), &token, None).await;
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(send(&mut alice, &room, &format!("durable {i}")).await);
    }
    cluster.cells[0].kill9();

    // While the cell is down the session stays open and requests answer `unavailable`.
    let reply = alice
        .request(json!({"op": "send", "channel": room, "text": "while down"}))
        .await;
    assert_eq!(
        (reply["op"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{reply}"
    );

    cluster.cells[0].restart().await;
    // Once the gateway reaches the cell again, it tells the session to reconnect.
    assert_eq!(alice.closed(WAIT * 2).await, Some(4010));
    let last = *acked.last().unwrap();
    let mut alice = Client::connect(
        &cluster.gateway(0).ws_url(),
        &token,
        Some(json!({ room.clone(): last - 5 })),
    )
    .await;
    for seq in last - 4..=last {
        assert_eq!(alice.next_event("message").await["seq"].as_u64(), Some(seq));
    }
    let history = alice
        .request(json!({"op": "history", "channel": room, "limit": 50}))
        .await;
    let seqs: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, acked, "acked messages survive the crash");
    assert_eq!(send(&mut alice, &room, "after restart").await, last + 1);
}

#[tokio::test]
async fn requests_answer_unavailable_while_the_cell_store_is_down_and_recover_after() {
    let mut cluster = Cluster::new().cell("c1", "us-east").start().await;
    cluster.create_workspace("acme", "us-east").await;
    let token = cluster.token("acme", "alice").await;
    let room = channel(&cluster, &token, "room", &[]).await;
    let mut alice = Client::connect(&cluster.gateway(0).ws_url(), &token, None).await;
    let before = send(&mut alice, &room, "before").await;

    cluster.cells[0].store.kill();
    let started = Instant::now();
    let reply = alice
        .request(json!({"op": "send", "channel": room, "text": "during"}))
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a request hung while redis was down"
    );

    cluster.cells[0].store.restart();
    let deadline = Instant::now() + WAIT;
    let seq = loop {
        let reply = alice
            .request(json!({"op": "send", "channel": room, "text": "after"}))
            .await;
        if reply["op"] == "ack" {
            break reply["seq"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "never recovered: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        seq,
        before + 1,
        "no seq was lost or reused across the outage"
    );
}

/// Stops (`SIGSTOP`) a process until dropped, then lets it go on (`SIGCONT`), also when the
/// test fails meanwhile.
struct Stopped(u32);

impl Stopped {
    fn signal(pid: u32, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    fn new(pid: u32) -> Stopped {
        Stopped::signal(pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        Stopped::signal(self.0, "-CONT");
    }
}

#[tokio::test]
async fn requests_a_hung_cell_leaves_unanswered_are_answered_unavailable_after_the_request_timeout()
{
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .gateway_args(&["--request-timeout-ms", "1500"])
        .start()
        .await;
    cluster.create_workspace("acme", "us-east").await;
    let token = cluster.token("acme", "alice").await;
    let room = channel(&cluster, &token, "room", &[]).await;
    let mut alice = Client::connect(&cluster.gateway(0).ws_url(), &token, None).await;
    send(&mut alice, &room, "before").await;

    // The cell's process stops: its link stays open, and nothing answers.
    let stopped = Stopped::new(cluster.cells[0].pid().expect("the cell runs"));
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = format!("hung-{i}");
        alice
            .send(&json!({"op": "send", "id": id, "channel": room, "text": "unheard"}))
            .await;
        ids.push(json!(id));
    }
    let mut answered = Vec::new();
    while answered.len() < ids.len() {
        match alice.read(WAIT).await {
            Incoming::Frame(frame) if ids.contains(&frame["id"]) => {
                assert_eq!(frame["op"], "error", "{frame}");
                assert_eq!(frame["code"], "unavailable", "{frame}");
                // The request timeout answered, not the loss of the link (10 s of silence).
                assert_eq!(
                    frame["message"], "the cell did not answer in time",
                    "{frame}"
                );
                answered.push(frame["id"].clone());
            }
            Incoming::Frame(_) => {}
            other => panic!("requests to a hung cell were not answered: {other:?}"),
        }
    }
    answered.sort_by_key(|id| id.to_string());
    assert_eq!(answered, ids, "each request answered once");

    // Once the cell goes on, the session is served again.
    drop(stopped);
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = alice
            .request(json!({"op": "send", "channel": room, "text": "after"}))
            .await;
        if reply["op"] == "ack" {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn presence_crosses_gateways_and_a_killed_gateways_users_go_offline() {
    let mut cluster = Cluster::new()
        .cell("c1", "us-east")
        .gateways(2)
        .presence_ttl_ms(1500)
        .start()
        .await;
    cluster.create_workspace("acme", "us-east").await;
    let (alice_token, bob_token, carol_token) = (
        cluster.token("acme", "alice").await,
        cluster.token("acme", "bob").await,
        cluster.token("acme", "carol").await,
    );
    let mut bob = Client::connect(&cluster.gateway(1).ws_url(), &bob_token, None).await;
    let reply = bob
        .request(json!({"op": "presence_sub", "users": ["alice", "carol"]}))
        .await;
    assert_eq!(
        reply["users"],
        json!({"alice": "offline", "carol": "offline"})
    );

    let _alice = Client::connect(&cluster.gateway(0).ws_url(), &alice_token, None).await;
    let event = bob.next_event("presence").await;
    assert_eq!(
        (event["user"].as_str(), event["status"].as_str()),
        (Some("alice"), Some("online"))
    );

    let mut carol = Client::connect(&cluster.gateway(0).ws_url(), &carol_token, None).await;
    assert_eq!(bob.next_event("presence").await["user"], "carol");
    carol.send(&json!({"op": "ping"})).await;
    drop(carol);
    let event = bob.next_event("presence").await;
    assert_eq!(
        (event["user"].as_str(), event["status"].as_str()),
        (Some("carol"), Some("offline"))
    );

    // Gateway 0 dies without closing alice's session: she expires and goes offline.
    cluster.gateways[0].kill9();
    let event = bob.next_event("presence").await;
    assert_eq!(
        (event["user"].as_str(), event["status"].as_str()),
        (Some("alice"), Some("offline"))
    );
    let (status, body) = cluster
        .api(1, &bob_token, Method::GET, "/v1/presence?users=alice", None)
        .await;
    assert_eq!(
        (status, &body["users"]),
        (200, &json!({"alice": "offline"}))
    );
}

#[tokio::test]
async fn ctl_lists_cells_creates_workspaces_and_mints_tokens() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
    let ctl = |args: &[&str]| {
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
    };
    let (ok, out, err) = ctl(&["cells"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("ID") && out.contains("c1") && out.contains("healthy"),
        "{out}"
    );

    let (ok, out, err) = ctl(&[
        "--json",
        "workspace",
        "create",
        "--region",
        "us-east",
        "--id",
        "acme",
    ]);
    assert!(ok, "{err}");
    let body: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(body["cell"], "c1");

    let (ok, _, err) = ctl(&["workspace", "create", "--region", "us-east", "--id", "acme"]);
    assert!(
        !ok && err.contains("409"),
        "a duplicate id fails with the API's error: {err}"
    );

    let (ok, out, err) = ctl(&[
        "token",
        "--workspace",
        "acme",
        "--user",
        "deploybot",
        "--bot",
        "--ttl",
        "600",
    ]);
    assert!(ok, "{err}");
    let token = out.trim();
    let client = Client::connect(&cluster.gateway(0).ws_url(), token, None).await;
    assert_eq!(client.ready["user"], "deploybot");

    let (ok, out, _) = ctl(&["cell", "drain", "c1"]);
    assert!(ok && out.contains("draining"), "{out}");
}

#[tokio::test]
async fn users_are_online_again_after_the_directory_redis_was_down_longer_than_the_ttl() {
    let mut cluster = Cluster::new()
        .cell("c1", "us-east")
        .gateways(2)
        .presence_ttl_ms(1500)
        .durable_directory()
        .start()
        .await;
    cluster.create_workspace("acme", "us-east").await;
    let (alice_token, bob_token) = (
        cluster.token("acme", "alice").await,
        cluster.token("acme", "bob").await,
    );
    let mut bob = Client::connect(&cluster.gateway(1).ws_url(), &bob_token, None).await;
    let reply = bob
        .request(json!({"op": "presence_sub", "users": ["alice"]}))
        .await;
    assert_eq!(reply["users"], json!({"alice": "offline"}));
    let _alice = Client::connect(&cluster.gateway(0).ws_url(), &alice_token, None).await;
    let event = bob.next_event("presence").await;
    assert_eq!(event["status"], "online", "{event}");

    // The directory Redis is down for twice the TTL: alice's session expires in it, and
    // whoever sweeps first when it is back announces her offline.
    cluster.directory.kill();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    cluster.directory.restart();

    // Alice's gateway still holds her session: she is online again, for GET and for bob.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = cluster
            .api(1, &bob_token, Method::GET, "/v1/presence?users=alice", None)
            .await;
        if status == 200 && body["users"]["alice"] == "online" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice never came back online: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A sweep runs every 5 s: past the next one, bob's last word on alice is `online`.
    let mut last = None;
    let quiet_until = Instant::now() + Duration::from_secs(7);
    loop {
        let left = quiet_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match bob.read(left).await {
            Incoming::Frame(frame) if frame["type"] == "presence" => {
                last = Some(frame["status"].clone());
            }
            Incoming::Frame(_) => {}
            Incoming::Timeout => break,
            other => panic!("bob's session ended: {other:?}"),
        }
    }
    if let Some(last) = last {
        assert_eq!(last, "online", "bob was last told alice is {last}");
    }
    let (status, body) = cluster
        .api(1, &bob_token, Method::GET, "/v1/presence?users=alice", None)
        .await;
    assert_eq!((status, &body["users"]), (200, &json!({"alice": "online"})));
}

/// A cell sends each channel's recipient list over a link once and then only its number,
/// forgetting a list once subscriptions changed (`confab_shared::recipient_lists`). A
/// subscriber that comes and goes 80 times makes 80 lists on one link, more than the cell
/// keeps before it sweeps the dropped ones: every message must still reach exactly the
/// sessions subscribed when it was sent.
#[tokio::test]
async fn a_channel_whose_subscribers_keep_changing_delivers_each_message_to_exactly_its_subscribers(
) {
    let cluster = Cluster::new()
        .cell("c1", "us-east")
        .gateways(2)
        .start()
        .await;
    cluster.create_workspace("acme", "us-east").await;
    let alice_token = cluster.token("acme", "alice").await;
    let bob_token = cluster.token("acme", "bob").await;
    let dave_token = cluster.token("acme", "dave").await;
    let room = channel(&cluster, &alice_token, "room", &["bob", "dave"]).await;

    let mut alice = Client::connect(&cluster.gateway(1).ws_url(), &alice_token, None).await;
    let mut dave = Client::connect(&cluster.gateway(0).ws_url(), &dave_token, None).await;
    let mut seqs = Vec::new();
    for round in 0..80 {
        let mut bob = Client::connect(&cluster.gateway(0).ws_url(), &bob_token, None).await;
        let seq = send(&mut alice, &room, &format!("round {round}")).await;
        let event = next_message_from(&mut bob, "alice").await;
        assert_eq!(event["seq"].as_u64(), Some(seq), "bob, round {round}");
        seqs.push(seq);
        drop(bob);
    }
    let mut heard = Vec::new();
    while heard.len() < seqs.len() {
        let event = next_message_from(&mut dave, "alice").await;
        heard.push(event["seq"].as_u64().unwrap());
    }
    assert_eq!(heard, seqs, "dave hears every round once, in order");
    // Bob, back for good, hears what is sent next, and only that.
    let mut bob = Client::connect(&cluster.gateway(0).ws_url(), &bob_token, None).await;
    let seq = send(&mut alice, &room, "last").await;
    assert_eq!(
        next_message_from(&mut bob, "alice").await["seq"].as_u64(),
        Some(seq)
    );
    assert_eq!(
        next_message_from(&mut dave, "alice").await["seq"].as_u64(),
        Some(seq)
    );
    loop {
        match bob.read(Duration::from_millis(300)).await {
            Incoming::Frame(frame) if frame["type"] == "message" => {
                panic!("bob got more than the last message: {frame}")
            }
            Incoming::Frame(_) => {}
            Incoming::Timeout => break,
            Incoming::Closed(code) => panic!("bob's socket closed: {code:?}"),
        }
    }
}
