//! The per-workspace limits of the cell (flags of `dev` and `cell`): channels per workspace,
//! channels per user and members per channel. Beyond each, the request is refused with a
//! clear message (`conflict`, or `bad_request` when the request itself names too many
//! members), over HTTP and the WebSocket alike, and nothing else suffers: the gateway↔cell
//! link stays up, so every other session of the cell keeps working and none is closed with
//! `4010`. The limits exist so that no reply the API can produce outgrows that link.

mod common;

use common::{Client, DevServer, GENERAL, QUIET};
use serde_json::{json, Value};

/// The refusal's message, asserting it says `says`.
fn message_of(body: &Value, says: &str) -> String {
    let message = body["error"]["message"]
        .as_str()
        .or_else(|| body["message"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains(says),
        "the message {message:?} should say {says:?}: {body}"
    );
    message
}

/// The link to the cell survived the refusals: `observer`, a session open since before them,
/// was not closed (no `4010`, no frame but events), is still served, and its message reaches
/// a session opened now.
async fn assert_link_survived(server: &DevServer, observer: &mut Client) {
    for frame in observer.collect_for(QUIET).await {
        assert_eq!(frame["op"], "event", "unexpected frame {frame}");
    }
    observer.discard_pending();
    observer.assert_alive().await;
    let mut fresh = server.client("alice").await;
    let ack = observer.send_message(GENERAL, "still linked").await;
    let seen = fresh
        .next_event_where("message", |e| e["seq"] == ack["seq"], common::WAIT)
        .await;
    assert_eq!(seen["text"], "still linked");
}

fn channel_body(name: &str, kind: &str, members: &[&str]) -> Value {
    json!({"name": name, "kind": kind, "members": members})
}

#[tokio::test]
async fn a_channel_beyond_the_workspace_limit_is_409_and_dms_do_not_count() {
    let server = DevServer::builder()
        .arg("--max-channels-per-workspace", "3")
        .start()
        .await;
    let mut observer = server.client("bob").await;
    let alice = server.http_as("alice");
    // `general` is the first of the three.
    alice
        .post("/v1/channels", channel_body("second", "public", &[]))
        .await
        .expect_status(201);
    alice
        .post("/v1/channels", channel_body("third", "private", &[]))
        .await
        .expect_status(201);
    for kind in ["public", "private"] {
        let refused = alice
            .post("/v1/channels", channel_body("fourth", kind, &[]))
            .await
            .expect_error(409, "conflict");
        message_of(&refused, "the workspace has 3 channels");
    }
    // DMs are bounded per user, not per workspace.
    let dm = alice
        .post("/v1/dms", json!({"user": "carol"}))
        .await
        .expect_status(200);
    assert_eq!(dm["kind"], "dm");
    let listed = alice
        .get("/v1/channels?scope=public")
        .await
        .expect_status(200);
    assert_eq!(listed["channels"].as_array().map(Vec::len), Some(2));
    assert_link_survived(&server, &mut observer).await;
}

#[tokio::test]
async fn members_beyond_the_channel_limit_are_refused_over_http_and_the_websocket() {
    let server = DevServer::builder()
        .arg("--max-members-per-channel", "3")
        .start()
        .await;
    let mut observer = server.client("bob").await;
    let alice = server.http_as("alice");
    // Four members named, the creator included: the request itself is too big.
    let refused = alice
        .post(
            "/v1/channels",
            channel_body("crowd", "public", &["bob", "carol", "dave"]),
        )
        .await
        .expect_error(400, "bad_request");
    message_of(&refused, "4 members named, more than the 3");
    let crowd = alice
        .post("/v1/channels", channel_body("crowd", "public", &["bob"]))
        .await
        .expect_status(201);
    let id = crowd["id"].as_str().unwrap_or_default().to_string();
    alice
        .post(
            &format!("/v1/channels/{id}/members"),
            json!({"user": "carol"}),
        )
        .await
        .expect_status(200);
    let refused = alice
        .post(
            &format!("/v1/channels/{id}/members"),
            json!({"user": "dave"}),
        )
        .await
        .expect_error(409, "conflict");
    message_of(&refused, "the channel has 3 members");
    let mut dave = server.client("dave").await;
    let refused = dave
        .request_error("conflict", json!({"op": "join", "channel": id}))
        .await;
    message_of(&refused, "the channel has 3 members");
    dave.assert_alive().await;
    // A member leaving makes room.
    observer
        .request_op("ack", json!({"op": "leave", "channel": id}))
        .await;
    dave.request_op("ack", json!({"op": "join", "channel": id}))
        .await;
    let members = alice
        .get(&format!("/v1/channels/{id}/members"))
        .await
        .expect_status(200);
    assert_eq!(members["members"], json!(["alice", "carol", "dave"]));
    assert_link_survived(&server, &mut observer).await;
}

#[tokio::test]
async fn a_user_beyond_the_channel_limit_is_refused_whoever_adds_it() {
    let server = DevServer::builder()
        .arg("--max-channels-per-user", "3")
        .start()
        .await;
    let mut observer = server.client("bob").await;
    let (alice, bob) = (server.http_as("alice"), server.http_as("bob"));
    // alice is in `general`; two more make three.
    let mine = alice
        .post("/v1/channels", channel_body("mine-1", "public", &[]))
        .await
        .expect_status(201);
    alice
        .post("/v1/channels", channel_body("mine-2", "private", &[]))
        .await
        .expect_status(201);
    let full = "alice is already a member of 3 channels";
    // By creating one herself.
    let refused = alice
        .post("/v1/channels", channel_body("mine-3", "private", &[]))
        .await
        .expect_error(409, "conflict");
    message_of(&refused, full);
    let theirs = bob
        .post("/v1/channels", channel_body("theirs", "public", &[]))
        .await
        .expect_status(201);
    let theirs = theirs["id"].as_str().unwrap_or_default().to_string();
    // By joining over the WebSocket.
    let mut alice_ws = server.client("alice").await;
    let refused = alice_ws
        .request_error("conflict", json!({"op": "join", "channel": theirs}))
        .await;
    message_of(&refused, full);
    // By being added, or named at a creation (which then creates nothing), or by a DM.
    let refused = bob
        .post(
            &format!("/v1/channels/{theirs}/members"),
            json!({"user": "alice"}),
        )
        .await
        .expect_error(409, "conflict");
    message_of(&refused, full);
    let refused = bob
        .post("/v1/dms", json!({"user": "alice"}))
        .await
        .expect_error(409, "conflict");
    message_of(&refused, full);
    let refused = bob
        .post(
            "/v1/channels",
            channel_body("with-alice", "public", &["alice"]),
        )
        .await
        .expect_error(409, "conflict");
    message_of(&refused, full);
    bob.post("/v1/channels", channel_body("with-alice", "public", &[]))
        .await
        .expect_status(201);
    alice_ws.expect_no_event("channel_added", QUIET).await;
    // Leaving one makes room for another.
    let left = mine["id"].as_str().unwrap_or_default();
    alice_ws
        .request_op("ack", json!({"op": "leave", "channel": left}))
        .await;
    alice_ws
        .request_op("ack", json!({"op": "join", "channel": theirs}))
        .await;
    let again = server.client("alice").await;
    assert_eq!(again.ready["channels"].as_array().map(Vec::len), Some(3));
    alice_ws.assert_alive().await;
    assert_link_survived(&server, &mut observer).await;
}

/// At the default limit of 2,000 channels per user, with the longest names (80 control
/// characters' worth of JSON escapes each), the user's `ready` and channel list still arrive
/// whole and the next channel is refused.
#[tokio::test]
async fn at_the_default_user_limit_ready_arrives_whole_and_one_more_channel_is_409() {
    let server = DevServer::builder()
        .arg("--client-rate", "100000")
        .start()
        .await;
    let mut observer = server.client("bob").await;
    let alice = server.http_as("alice");
    let name = |i: usize| format!("{i:04}{}", "\u{1}".repeat(76));
    // `general` is one of the 2,000.
    let creations: Vec<usize> = (1..2000).collect();
    for chunk in creations.chunks(16) {
        let created = futures_util::future::join_all(chunk.iter().map(|&i| {
            let alice = &alice;
            async move {
                alice
                    .post("/v1/channels", channel_body(&name(i), "private", &[]))
                    .await
            }
        }))
        .await;
        for resp in created {
            resp.expect_status(201);
        }
    }
    let refused = alice
        .post("/v1/channels", channel_body("one-more", "private", &[]))
        .await
        .expect_error(409, "conflict");
    message_of(&refused, "alice is already a member of 2000 channels");
    let ready = server.client("alice").await;
    let channels = ready.ready["channels"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(channels.len(), 2000);
    assert!(channels
        .iter()
        .any(|c| c["name"].as_str() == Some(name(1999).as_str())));
    let listed = alice.get("/v1/channels").await.expect_status(200);
    assert_eq!(listed["channels"].as_array().map(Vec::len), Some(2000));
    assert_link_survived(&server, &mut observer).await;
}
