//! SPEC §4, handshake: `hello` → `ready` with the session's channels, then the replay that
//! `resume` asks for (or `resync` beyond the retention window).

mod common;

use common::{DevServer, GENERAL, QUIET, WAIT};
use serde_json::{json, Value};

fn seq(frame: &Value) -> u64 {
    frame["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("frame without a numeric seq: {frame}"))
}

#[tokio::test]
async fn ready_names_the_session_user_workspace_heartbeat_and_member_channels() {
    let server = DevServer::start().await;
    let alice = server.client("alice").await;
    let ready = &alice.ready;

    assert_eq!(ready["op"], "ready");
    assert!(
        ready["session"].as_str().is_some_and(|s| !s.is_empty()),
        "ready without a session id: {ready}"
    );
    assert_eq!(ready["user"], "alice");
    assert_eq!(ready["workspace"], "demo");
    assert_eq!(ready["heartbeat_ms"], 30000);
    let channels = ready["channels"].as_array().expect("channels array");
    assert_eq!(
        channels.len(),
        1,
        "alice is a member of general only: {ready}"
    );
    // Seeded log: seq 1 = member_joined alice, seq 2 = member_joined bob.
    assert_eq!(
        channels[0],
        json!({"id": "general", "name": "general", "kind": "public", "last_seq": 2, "read_seq": 0})
    );
}

#[tokio::test]
async fn ready_reports_the_configured_heartbeat_interval() {
    let server = DevServer::builder()
        .arg("--heartbeat-ms", "12345")
        .start()
        .await;
    let alice = server.client("alice").await;
    assert_eq!(alice.ready["heartbeat_ms"], 12345);
}

#[tokio::test]
async fn every_session_gets_its_own_session_id() {
    let server = DevServer::start().await;
    let first = server.client("alice").await;
    let second = server.client("alice").await;
    assert_ne!(first.ready["session"], second.ready["session"]);
}

#[tokio::test]
async fn a_new_user_is_a_member_of_no_channel() {
    let server = DevServer::start().await;
    let carol = server.client("carol").await;
    assert_eq!(carol.ready["user"], "carol");
    assert_eq!(carol.ready["channels"], json!([]));
}

#[tokio::test]
async fn ready_carries_the_channels_last_seq_and_the_users_read_marker() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice.send_message(GENERAL, "one").await;
    let ack = alice.send_message(GENERAL, "two").await;
    alice
        .request_op("ack", json!({"op": "read", "channel": GENERAL, "seq": 3}))
        .await;

    let later = server.client("alice").await;
    let general = later.ready_channel(GENERAL).expect("general in ready");
    assert_eq!(general["last_seq"], ack["seq"]);
    assert_eq!(general["read_seq"], 3);

    // Read markers are per user: bob has read nothing.
    let bob = server.client("bob").await;
    let general = bob.ready_channel(GENERAL).expect("general in bob's ready");
    assert_eq!(general["last_seq"], ack["seq"]);
    assert_eq!(general["read_seq"], 0);
}

#[tokio::test]
async fn resume_replays_missed_events_in_seq_order_after_a_disconnect() {
    let server = DevServer::start().await;
    let alice = server.client("alice").await;
    drop(alice);

    // Miss a mix of log events: messages, an edit, a delete and a join.
    let mut bob = server.client("bob").await;
    let first = bob.send_message(GENERAL, "m1").await;
    bob.send_message(GENERAL, "m2").await;
    bob.request_op(
        "ack",
        json!({"op": "edit", "channel": GENERAL, "seq": seq(&first), "text": "m1 edited"}),
    )
    .await;
    bob.request_op(
        "ack",
        json!({"op": "delete", "channel": GENERAL, "seq": seq(&first)}),
    )
    .await;
    let mut carol = server.client("carol").await;
    let joined = carol
        .request_op("ack", json!({"op": "join", "channel": GENERAL}))
        .await;
    let last = seq(&joined);
    assert_eq!(last, 7, "seqs 3..=7 were just created");

    let mut alice = server.client_resuming("alice", json!({"general": 2})).await;
    let expected = [
        (3, "message"),
        (4, "message"),
        (5, "message_edited"),
        (6, "message_deleted"),
        (7, "member_joined"),
    ];
    for (want_seq, want_type) in expected {
        let frame = alice.next_frame().await;
        assert_eq!(frame["op"], "event", "replay frame: {frame}");
        assert_eq!(frame["channel"], GENERAL, "replay frame: {frame}");
        assert_eq!(frame["seq"], want_seq, "replay out of order: {frame}");
        assert_eq!(frame["type"], want_type, "replay frame: {frame}");
    }

    // After the replay, live events continue the same sequence.
    let live = bob.send_message(GENERAL, "live").await;
    let event = alice
        .next_event_where("message", |e| e["text"] == "live", WAIT)
        .await;
    assert_eq!(event["seq"], live["seq"]);
    assert_eq!(seq(&live), last + 1);
}

#[tokio::test]
async fn resume_replays_only_events_after_the_given_seq() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    for text in ["a", "b", "c"] {
        bob.send_message(GENERAL, text).await;
    }
    // Seqs 3, 4, 5 exist; alice has seen up to 4.
    let mut alice = server.client_resuming("alice", json!({"general": 4})).await;
    let frame = alice.next_frame().await;
    assert_eq!(frame["type"], "message");
    assert_eq!(frame["seq"], 5);
    assert_eq!(frame["text"], "c");
    alice.expect_no_frame(QUIET).await;
}

#[tokio::test]
async fn resume_with_nothing_missed_sends_nothing_after_ready() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    let ack = bob.send_message(GENERAL, "seen already").await;
    let mut alice = server
        .client_resuming("alice", json!({"general": seq(&ack)}))
        .await;
    alice.expect_no_frame(QUIET).await;
}

#[tokio::test]
async fn resume_replays_each_named_channel() {
    let server = DevServer::start().await;
    let random = server
        .create_channel("alice", "random", "public", &["bob"])
        .await;
    let random_id = random["id"].as_str().expect("channel id").to_string();
    let mut bob = server.client("bob").await;
    bob.send_message(GENERAL, "in general").await;
    bob.send_message(&random_id, "in random").await;

    let mut resume = serde_json::Map::new();
    resume.insert(GENERAL.to_string(), json!(2));
    resume.insert(random_id.clone(), json!(2));
    let mut alice = server.client_resuming("alice", Value::Object(resume)).await;
    let in_general = alice
        .next_event_where("message", |e| e["channel"] == GENERAL, WAIT)
        .await;
    assert_eq!(in_general["text"], "in general");
    assert_eq!(in_general["seq"], 3);
    let in_random = alice
        .next_event_where("message", |e| e["channel"] == random_id.as_str(), WAIT)
        .await;
    assert_eq!(in_random["text"], "in random");
    assert_eq!(in_random["seq"], 3);
}

#[tokio::test]
async fn resume_beyond_the_retention_window_answers_resync() {
    let server = DevServer::builder()
        .arg("--retention-events", "5")
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut bob = server.client("bob").await;
    for i in 0..10 {
        bob.send_message(GENERAL, &format!("m{i}")).await;
    }
    // Seqs 3..=12 exist and only the last 5 are retained: a resume from 2 cannot be replayed.
    let mut alice = server.client_resuming("alice", json!({"general": 2})).await;
    let resync = alice.next_event("resync", WAIT).await;
    assert_eq!(resync["channel"], GENERAL);
    // Nothing older than the window may be replayed as if the log were complete.
    alice
        .expect_no_event_where(
            "message",
            |e| e["seq"].as_u64().is_some_and(|s| s <= 7),
            QUIET,
        )
        .await;

    // History still serves the messages the client must now read.
    let page = alice
        .request_op(
            "history",
            json!({"op": "history", "channel": GENERAL, "limit": 3}),
        )
        .await;
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(seq)
        .collect();
    assert_eq!(seqs, vec![10, 11, 12]);
}

#[tokio::test]
async fn resume_within_a_small_retention_window_still_replays() {
    let server = DevServer::builder()
        .arg("--retention-events", "5")
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut bob = server.client("bob").await;
    for i in 0..10 {
        bob.send_message(GENERAL, &format!("m{i}")).await;
    }
    let mut alice = server.client_resuming("alice", json!({"general": 9})).await;
    for want in [10, 11, 12] {
        let frame = alice.next_frame().await;
        assert_eq!(frame["type"], "message", "replay frame: {frame}");
        assert_eq!(frame["seq"], want, "replay frame: {frame}");
    }
    alice.expect_no_frame(QUIET).await;
}
