//! SPEC §5, the HTTP API for bots and apps: every endpoint (webhooks aside), its success body
//! and its errors, and that what it does reaches WebSocket sessions.

mod common;

use std::time::Duration;

use common::{now_s, DevServer, GENERAL, QUIET, WAIT};
use serde_json::{json, Value};

fn is_valid_id(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

fn channel_ids(list: &Value) -> Vec<String> {
    list["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("no channels array: {list}"))
        .iter()
        .map(|c| c["id"].as_str().expect("channel id").to_string())
        .collect()
}

fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages array: {page}"))
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

// ---- POST /v1/channels and GET /v1/channels ----

#[tokio::test]
async fn creating_a_channel_answers_201_with_the_channel_and_makes_the_creator_a_member() {
    let server = DevServer::start().await;
    let created = server
        .http_as("alice")
        .post(
            "/v1/channels",
            json!({"name": "random", "kind": "public", "members": ["bob", "bob"]}),
        )
        .await
        .expect_status(201);
    assert!(is_valid_id(&created["id"]), "{created}");
    assert_eq!(created["name"], "random");
    assert_eq!(created["kind"], "public");
    assert!(created["last_seq"].is_u64(), "{created}");
    assert_eq!(created["read_seq"], 0);
    let id = created["id"].as_str().expect("id").to_string();

    for user in ["alice", "bob"] {
        let mine = server
            .http_as(user)
            .get("/v1/channels")
            .await
            .expect_status(200);
        let ids = channel_ids(&mine);
        assert!(ids.contains(&id), "{user}'s channels: {mine}");
        assert!(
            ids.contains(&GENERAL.to_string()),
            "{user}'s channels: {mine}"
        );
    }
    // The log starts with the creator's join, then the named members' (deduplicated).
    let mut alice = server
        .client_resuming("alice", json!({ id.as_str(): 0 }))
        .await;
    let first = alice.next_event("member_joined", WAIT).await;
    assert_eq!(
        (first["seq"].clone(), first["user"].clone()),
        (json!(1), json!("alice"))
    );
    let second = alice.next_event("member_joined", WAIT).await;
    assert_eq!(
        (second["seq"].clone(), second["user"].clone()),
        (json!(2), json!("bob"))
    );
    alice.expect_no_event("member_joined", QUIET).await;
}

#[tokio::test]
async fn listing_channels_shows_the_callers_by_default_and_every_public_one_with_scope_public() {
    let server = DevServer::start().await;
    let public = server
        .create_channel("alice", "random", "public", &[])
        .await;
    let private = server
        .create_channel("alice", "secret", "private", &["bob"])
        .await;
    let public_id = public["id"].as_str().expect("id").to_string();
    let private_id = private["id"].as_str().expect("id").to_string();

    let carol = server.http_as("carol");
    let mine = carol.get("/v1/channels").await.expect_status(200);
    assert_eq!(mine, json!({"channels": []}));
    let all_public = carol
        .get("/v1/channels?scope=public")
        .await
        .expect_status(200);
    let ids = channel_ids(&all_public);
    assert!(ids.contains(&GENERAL.to_string()), "{all_public}");
    assert!(ids.contains(&public_id), "{all_public}");
    assert!(
        !ids.contains(&private_id),
        "a private channel leaked: {all_public}"
    );
    for channel in all_public["channels"].as_array().expect("channels") {
        assert_eq!(channel["kind"], "public", "{all_public}");
    }

    let bob = server
        .http_as("bob")
        .get("/v1/channels")
        .await
        .expect_status(200);
    let ids = channel_ids(&bob);
    assert!(ids.contains(&private_id), "{bob}");
    assert!(!ids.contains(&public_id), "bob is not in random: {bob}");
    let entry = bob["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .find(|c| c["id"] == private_id.as_str())
        .expect("secret listed");
    assert_eq!(entry["name"], "secret");
    assert_eq!(entry["kind"], "private");
}

#[tokio::test]
async fn creating_a_channel_with_an_invalid_body_is_400() {
    let server = DevServer::start().await;
    let alice = server.http_as("alice");
    let bodies = [
        json!({"kind": "public", "members": []}),
        json!({"name": "x", "kind": "dm", "members": ["bob"]}),
        json!({"name": "x", "kind": "bogus", "members": []}),
        json!({"name": "", "kind": "public", "members": []}),
        json!({"name": "   ", "kind": "public", "members": []}),
        json!({"name": "n".repeat(81), "kind": "public", "members": []}),
        json!({"name": "x", "kind": "public", "members": ["not a valid id"]}),
        json!({"name": "x", "kind": "public", "members": "bob"}),
        json!({"name": 5, "kind": "public", "members": []}),
    ];
    for body in bodies {
        let response = alice.post("/v1/channels", body.clone()).await;
        assert_eq!(response.status, 400, "for {body}: {:?}", response.body);
        response.expect_error(400, "bad_request");
    }
    alice
        .post_raw("/v1/channels", "{not json")
        .await
        .expect_error(400, "bad_request");
    // The longest allowed name is 80 bytes.
    alice
        .post(
            "/v1/channels",
            json!({"name": "n".repeat(80), "kind": "public", "members": []}),
        )
        .await
        .expect_status(201);
}

#[tokio::test]
async fn a_duplicate_channel_name_is_409() {
    let server = DevServer::start().await;
    let alice = server.http_as("alice");
    alice
        .post(
            "/v1/channels",
            json!({"name": "general", "kind": "public", "members": []}),
        )
        .await
        .expect_error(409, "conflict");
    server
        .create_channel("alice", "random", "public", &[])
        .await;
    // Unique among public channels, whoever asks.
    server
        .http_as("bob")
        .post(
            "/v1/channels",
            json!({"name": "random", "kind": "public", "members": []}),
        )
        .await
        .expect_error(409, "conflict");
}

#[tokio::test]
async fn a_private_channel_name_collides_with_nothing() {
    let server = DevServer::start().await;
    let (alice, bob) = (server.http_as("alice"), server.http_as("bob"));
    let create = |name: &str, kind: &str| json!({"name": name, "kind": kind, "members": []});
    // A private channel with a public channel's name.
    let private = alice
        .post("/v1/channels", create(GENERAL, "private"))
        .await
        .expect_status(201);
    assert_eq!(private["name"], GENERAL);
    assert_eq!(private["kind"], "private");
    // A public channel with a private channel's name, created by someone who cannot see it:
    // the answer must not tell that the private one exists.
    alice
        .post("/v1/channels", create("secret", "private"))
        .await
        .expect_status(201);
    let public = bob
        .post("/v1/channels", create("secret", "public"))
        .await
        .expect_status(201);
    assert_eq!(public["kind"], "public");
    // Two private channels of one name, whoever creates them.
    bob.post("/v1/channels", create("secret", "private"))
        .await
        .expect_status(201);
    alice
        .post("/v1/channels", create("secret", "private"))
        .await
        .expect_status(201);
    // The public name is taken now.
    alice
        .post("/v1/channels", create("secret", "public"))
        .await
        .expect_error(409, "conflict");
}

// ---- authentication ----

#[tokio::test]
async fn every_endpoint_needs_a_valid_token() {
    let server = DevServer::start().await;
    let expired = server.mint(&json!({"sub": "alice", "wsp": "demo", "exp": now_s() - 600}));
    let forged = common::mint_with_secret(
        "wrong",
        &json!({"sub": "alice", "wsp": "demo", "exp": now_s() + 600}),
    );
    let callers = [
        server.anon(),
        server.http(&expired),
        server.http(&forged),
        server.http("not-a-jwt"),
        // The admin token is not a user token.
        server.http("dev-admin"),
        server.http_with_authorization("Basic YWxpY2U6cHc="),
    ];
    for caller in &callers {
        caller
            .get("/v1/channels")
            .await
            .expect_error(401, "unauthorized");
        caller
            .post(
                "/v1/channels",
                json!({"name": "x", "kind": "public", "members": []}),
            )
            .await
            .expect_error(401, "unauthorized");
        caller
            .post("/v1/channels/general/messages", json!({"text": "x"}))
            .await
            .expect_error(401, "unauthorized");
        caller
            .get("/v1/channels/general/messages")
            .await
            .expect_error(401, "unauthorized");
        caller
            .post("/v1/channels/general/members", json!({"user": "carol"}))
            .await
            .expect_error(401, "unauthorized");
        caller
            .delete("/v1/channels/general/members/bob")
            .await
            .expect_error(401, "unauthorized");
        caller
            .post("/v1/dms", json!({"user": "bob"}))
            .await
            .expect_error(401, "unauthorized");
        caller
            .get("/v1/presence?users=alice")
            .await
            .expect_error(401, "unauthorized");
    }
    // Nothing happened: general still has only its two seeded events.
    let page = server
        .http_as("alice")
        .get("/v1/channels/general/messages")
        .await
        .expect_status(200);
    assert_eq!(page["messages"], json!([]));
}

// ---- POST /v1/channels/{id}/messages ----

#[tokio::test]
async fn a_message_posted_over_http_is_201_and_reaches_websocket_sessions() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut bob_ws = server.client("bob").await;
    let posted = server
        .http_as("bob")
        .post(
            "/v1/channels/general/messages",
            json!({"text": "from a bot"}),
        )
        .await
        .expect_status(201);
    assert_eq!(posted["channel"], GENERAL);
    assert_eq!(posted["seq"], 3);
    assert!(posted["ts"].is_u64(), "{posted}");

    let expected = json!({
        "op": "event", "type": "message", "channel": GENERAL, "seq": 3, "ts": posted["ts"],
        "user": "bob", "text": "from a bot", "client_msg_id": null, "thread": null,
    });
    assert_eq!(alice.next_event("message", WAIT).await, expected);
    // The poster's own WebSocket sessions receive it too.
    assert_eq!(bob_ws.next_event("message", WAIT).await, expected);
}

#[tokio::test]
async fn a_repeated_client_msg_id_over_http_returns_the_first_result() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let bob = server.http_as("bob");
    let first = bob
        .post(
            "/v1/channels/general/messages",
            json!({"text": "once", "client_msg_id": "bot-1"}),
        )
        .await
        .expect_status(201);
    let again = bob
        .post(
            "/v1/channels/general/messages",
            json!({"text": "once", "client_msg_id": "bot-1"}),
        )
        .await
        .expect_status(201);
    assert_eq!(again["seq"], first["seq"]);
    assert_eq!(again["ts"], first["ts"]);
    let event = alice.next_event("message", WAIT).await;
    assert_eq!(event["client_msg_id"], "bot-1");
    alice.expect_no_event("message", QUIET).await;

    // The same id from the same user over the WebSocket is the same message too.
    let mut bob_ws = server.client("bob").await;
    let ack = bob_ws
        .request_op(
            "ack",
            json!({"op": "send", "channel": GENERAL, "text": "once", "client_msg_id": "bot-1"}),
        )
        .await;
    assert_eq!(ack["seq"], first["seq"]);
}

#[tokio::test]
async fn an_idempotency_key_header_is_the_client_msg_id_of_an_http_post() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let bob = server.http_as("bob");
    let path = "/v1/channels/general/messages";
    let first = bob
        .post_with_header(
            path,
            ("Idempotency-Key", "retry-1"),
            json!({"text": "once"}),
        )
        .await
        .expect_status(201);
    // A retry with the same key (after `unavailable`, say) is the same message.
    let again = bob
        .post_with_header(
            path,
            ("Idempotency-Key", "retry-1"),
            json!({"text": "once"}),
        )
        .await
        .expect_status(201);
    assert_eq!((&again["seq"], &again["ts"]), (&first["seq"], &first["ts"]));
    // So is the same id given in the body.
    let body_id = bob
        .post(path, json!({"text": "once", "client_msg_id": "retry-1"}))
        .await
        .expect_status(201);
    assert_eq!(body_id["seq"], first["seq"]);
    let event = alice.next_event("message", WAIT).await;
    assert_eq!(event["client_msg_id"], "retry-1");
    alice.expect_no_event("message", QUIET).await;
    // Both given: they must agree.
    bob.post_with_header(
        path,
        ("Idempotency-Key", "retry-1"),
        json!({"text": "once", "client_msg_id": "retry-1"}),
    )
    .await
    .expect_status(201);
    bob.post_with_header(
        path,
        ("Idempotency-Key", "retry-2"),
        json!({"text": "twice", "client_msg_id": "other"}),
    )
    .await
    .expect_error(400, "bad_request");
    // The header obeys the client_msg_id limits.
    let long = "k".repeat(65);
    bob.post_with_header(path, ("Idempotency-Key", &long), json!({"text": "x"}))
        .await
        .expect_error(400, "bad_request");
    alice.expect_no_event("message", QUIET).await;
}

#[tokio::test]
async fn a_message_posted_over_http_may_reply_in_a_thread() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let parent = alice.send_message(GENERAL, "question").await;
    let bob = server.http_as("bob");
    bob.post(
        "/v1/channels/general/messages",
        json!({"text": "answer", "thread": parent["seq"]}),
    )
    .await
    .expect_status(201);
    let event = alice
        .next_event_where("message", |e| e["text"] == "answer", WAIT)
        .await;
    assert_eq!(event["thread"], parent["seq"]);
    bob.post(
        "/v1/channels/general/messages",
        json!({"text": "lost", "thread": 999}),
    )
    .await
    .expect_error(404, "not_found");
}

#[tokio::test]
async fn posting_a_message_answers_the_spec_errors() {
    let server = DevServer::start().await;
    let secret = server
        .create_channel("alice", "secret", "private", &[])
        .await;
    let secret_id = secret["id"].as_str().expect("id");
    let carol = server.http_as("carol");
    carol
        .post("/v1/channels/general/messages", json!({"text": "hi"}))
        .await
        .expect_error(403, "forbidden");
    carol
        .post(
            &format!("/v1/channels/{secret_id}/messages"),
            json!({"text": "hi"}),
        )
        .await
        .expect_error(404, "not_found");
    carol
        .post("/v1/channels/nowhere/messages", json!({"text": "hi"}))
        .await
        .expect_error(404, "not_found");

    let alice = server.http_as("alice");
    alice
        .post(
            "/v1/channels/general/messages",
            json!({"text": "x".repeat(16 * 1024 + 1)}),
        )
        .await
        .expect_error(413, "too_large");
    alice
        .post("/v1/channels/general/messages", json!({}))
        .await
        .expect_error(400, "bad_request");
    alice
        .post("/v1/channels/general/messages", json!({"text": 12}))
        .await
        .expect_error(400, "bad_request");
    alice
        .post_raw("/v1/channels/general/messages", "text=hi")
        .await
        .expect_error(400, "bad_request");
    // None of those made a message.
    let page = alice
        .get("/v1/channels/general/messages")
        .await
        .expect_status(200);
    assert_eq!(page["messages"], json!([]));
}

// ---- GET /v1/channels/{id}/messages ----

#[tokio::test]
async fn reading_messages_over_http_pages_like_history() {
    let server = DevServer::start().await;
    let bob = server.http_as("bob");
    for i in 0..6 {
        bob.post(
            "/v1/channels/general/messages",
            json!({"text": format!("m{i}")}),
        )
        .await
        .expect_status(201);
    }
    // Seqs 3..=8.
    let cases = [
        ("", vec![3, 4, 5, 6, 7, 8], false),
        ("?limit=2", vec![7, 8], true),
        ("?before=6&limit=2", vec![4, 5], true),
        ("?before=5", vec![3, 4], false),
        ("?after=6", vec![7, 8], false),
        ("?after=3&limit=2", vec![4, 5], true),
        ("?after=3&before=6", vec![4, 5], false),
    ];
    for (query, want, more) in cases {
        let page = bob
            .get(&format!("/v1/channels/general/messages{query}"))
            .await
            .expect_status(200);
        assert_eq!(seqs(&page), want, "{query}: {page}");
        if query != "?after=3&before=6" {
            assert_eq!(page["has_more"], more, "{query}: {page}");
        }
    }
    let page = bob
        .get("/v1/channels/general/messages?limit=1")
        .await
        .expect_status(200);
    let message = &page["messages"][0];
    assert_eq!(message["user"], "bob");
    assert_eq!(message["text"], "m5");
    assert_eq!(message["edited"], false);
    assert_eq!(message["deleted"], false);
    assert_eq!(message["client_msg_id"], Value::Null);
    assert_eq!(message["thread"], Value::Null);
    assert!(message["ts"].is_u64());

    for query in ["?limit=0", "?limit=201", "?limit=many", "?before=x"] {
        bob.get(&format!("/v1/channels/general/messages{query}"))
            .await
            .expect_error(400, "bad_request");
    }
    bob.get("/v1/channels/general/messages?limit=200")
        .await
        .expect_status(200);
}

#[tokio::test]
async fn reading_messages_follows_channel_visibility() {
    let server = DevServer::start().await;
    let secret = server
        .create_channel("alice", "secret", "private", &[])
        .await;
    let secret_id = secret["id"].as_str().expect("id");
    let carol = server.http_as("carol");
    // Public: readable by anyone in the workspace.
    carol
        .get("/v1/channels/general/messages")
        .await
        .expect_status(200);
    carol
        .get(&format!("/v1/channels/{secret_id}/messages"))
        .await
        .expect_error(404, "not_found");
    carol
        .get("/v1/channels/nowhere/messages")
        .await
        .expect_error(404, "not_found");
    server
        .http_as("alice")
        .get(&format!("/v1/channels/{secret_id}/messages"))
        .await
        .expect_status(200);
}

// ---- members ----

#[tokio::test]
async fn adding_a_member_answers_its_member_joined_seq() {
    let server = DevServer::start().await;
    let mut carol = server.client("carol").await;
    let mut bob = server.client("bob").await;
    let alice = server.http_as("alice");
    let added = alice
        .post("/v1/channels/general/members", json!({"user": "carol"}))
        .await
        .expect_status(200);
    assert_eq!(added, json!({"seq": 3}));

    let first = carol.next_frame().await;
    assert_eq!(first["type"], "channel_added", "{first}");
    assert_eq!(first["info"]["id"], GENERAL);
    let joined = carol.next_event("member_joined", WAIT).await;
    assert_eq!(joined["seq"], 3);
    assert_eq!(joined["user"], "carol");
    assert_eq!(bob.next_event("member_joined", WAIT).await["user"], "carol");

    // Adding a member again changes nothing.
    let again = alice
        .post("/v1/channels/general/members", json!({"user": "carol"}))
        .await
        .expect_status(200);
    assert_eq!(again, json!({"seq": 3}));
    bob.expect_no_event("member_joined", QUIET).await;

    // A user named before ever connecting may be added.
    alice
        .post("/v1/channels/general/members", json!({"user": "newcomer"}))
        .await
        .expect_status(200);
    let newcomer = server.client("newcomer").await;
    assert!(
        newcomer.ready_channel(GENERAL).is_some(),
        "{}",
        newcomer.ready
    );
}

#[tokio::test]
async fn adding_a_member_answers_the_spec_errors() {
    let server = DevServer::start().await;
    let random = server
        .create_channel("alice", "random", "public", &[])
        .await;
    let random_id = random["id"].as_str().expect("id");
    let secret = server
        .create_channel("alice", "secret", "private", &[])
        .await;
    let secret_id = secret["id"].as_str().expect("id");
    let dm = server
        .http_as("alice")
        .post("/v1/dms", json!({"user": "bob"}))
        .await
        .expect_status(200);
    let dm_id = dm["id"].as_str().expect("id");

    let bob = server.http_as("bob");
    // bob is not in random: he may join it himself but not add others.
    bob.post(
        &format!("/v1/channels/{random_id}/members"),
        json!({"user": "carol"}),
    )
    .await
    .expect_error(403, "forbidden");
    bob.post(
        &format!("/v1/channels/{secret_id}/members"),
        json!({"user": "bob"}),
    )
    .await
    .expect_error(404, "not_found");
    bob.post(
        &format!("/v1/channels/{dm_id}/members"),
        json!({"user": "carol"}),
    )
    .await
    .expect_error(403, "forbidden");
    bob.post("/v1/channels/nowhere/members", json!({"user": "bob"}))
        .await
        .expect_error(404, "not_found");
    bob.post("/v1/channels/general/members", json!({}))
        .await
        .expect_error(400, "bad_request");
    bob.post("/v1/channels/general/members", json!({"user": "not valid"}))
        .await
        .expect_error(400, "bad_request");
    // Joining a public channel oneself is allowed.
    let joined = bob
        .post(
            &format!("/v1/channels/{random_id}/members"),
            json!({"user": "bob"}),
        )
        .await
        .expect_status(200);
    assert!(joined["seq"].is_u64(), "{joined}");
}

#[tokio::test]
async fn removing_a_member_answers_its_member_left_seq() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    let mut alice_ws = server.client("alice").await;
    let alice = server.http_as("alice");
    let removed = alice
        .delete("/v1/channels/general/members/bob")
        .await
        .expect_status(200);
    assert_eq!(removed, json!({"seq": 3}));
    // The removed user's sessions are told too.
    let left = bob.next_event("member_left", WAIT).await;
    assert_eq!(left["seq"], 3);
    assert_eq!(left["user"], "bob");
    assert_eq!(
        alice_ws.next_event("member_left", WAIT).await["user"],
        "bob"
    );

    // Removing a non-member changes nothing.
    let again = alice
        .delete("/v1/channels/general/members/bob")
        .await
        .expect_status(200);
    assert_eq!(again, json!({"seq": 3}));
    alice_ws.expect_no_event("member_left", QUIET).await;

    // bob is out: he can no longer post.
    server
        .http_as("bob")
        .post("/v1/channels/general/messages", json!({"text": "hey"}))
        .await
        .expect_error(403, "forbidden");
}

#[tokio::test]
async fn removing_a_member_answers_the_spec_errors() {
    let server = DevServer::start().await;
    let secret = server
        .create_channel("alice", "secret", "private", &["bob"])
        .await;
    let secret_id = secret["id"].as_str().expect("id");
    let dm = server
        .http_as("alice")
        .post("/v1/dms", json!({"user": "bob"}))
        .await
        .expect_status(200);
    let dm_id = dm["id"].as_str().expect("id");
    let carol = server.http_as("carol");
    carol
        .delete("/v1/channels/general/members/alice")
        .await
        .expect_error(403, "forbidden");
    carol
        .delete(&format!("/v1/channels/{secret_id}/members/bob"))
        .await
        .expect_error(404, "not_found");
    carol
        .delete("/v1/channels/nowhere/members/bob")
        .await
        .expect_error(404, "not_found");
    server
        .http_as("alice")
        .delete(&format!("/v1/channels/{dm_id}/members/bob"))
        .await
        .expect_error(403, "forbidden");
    // alice is still in general.
    let members = server
        .http_as("alice")
        .get("/v1/channels/general/members")
        .await
        .expect_status(200);
    let mut names: Vec<String> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m.as_str().expect("member id").to_string())
        .collect();
    names.sort();
    assert_eq!(names, vec!["alice", "bob"]);
}

// ---- DMs ----

#[tokio::test]
async fn a_dm_is_created_once_and_then_the_same_channel_is_returned() {
    let server = DevServer::start().await;
    let mut bob_ws = server.client("bob").await;
    let alice = server.http_as("alice");
    let dm = alice
        .post("/v1/dms", json!({"user": "bob"}))
        .await
        .expect_status(200);
    assert!(is_valid_id(&dm["id"]), "{dm}");
    assert_eq!(dm["kind"], "dm");
    assert_eq!(dm["name"], "alice,bob");
    let again = alice
        .post("/v1/dms", json!({"user": "bob"}))
        .await
        .expect_status(200);
    assert_eq!(again["id"], dm["id"]);
    let from_bob = server
        .http_as("bob")
        .post("/v1/dms", json!({"user": "alice"}))
        .await
        .expect_status(200);
    assert_eq!(from_bob["id"], dm["id"]);

    // bob was added by alice's action, once.
    let added = bob_ws.next_event("channel_added", WAIT).await;
    assert_eq!(added["channel"], dm["id"]);
    assert_eq!(added["info"]["kind"], "dm");
    bob_ws.expect_no_event("channel_added", QUIET).await;

    // The DM works and is private to its two members.
    let id = dm["id"].as_str().expect("id");
    let posted = alice
        .post(
            &format!("/v1/channels/{id}/messages"),
            json!({"text": "psst"}),
        )
        .await
        .expect_status(201);
    let event = bob_ws.next_event("message", WAIT).await;
    assert_eq!(event["seq"], posted["seq"]);
    server
        .http_as("carol")
        .get(&format!("/v1/channels/{id}/messages"))
        .await
        .expect_error(404, "not_found");
    let listed = server
        .http_as("bob")
        .get("/v1/channels")
        .await
        .expect_status(200);
    assert!(channel_ids(&listed).contains(&id.to_string()), "{listed}");
}

#[tokio::test]
async fn opening_a_dm_with_an_invalid_body_is_400() {
    let server = DevServer::start().await;
    let alice = server.http_as("alice");
    alice
        .post("/v1/dms", json!({}))
        .await
        .expect_error(400, "bad_request");
    alice
        .post("/v1/dms", json!({"user": "not valid"}))
        .await
        .expect_error(400, "bad_request");
}

// ---- presence ----

#[tokio::test]
async fn presence_over_http_reports_each_named_user() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let bob = server.http_as("bob");
    let presence = bob
        .get("/v1/presence?users=alice,bob,carol")
        .await
        .expect_status(200);
    assert_eq!(
        presence,
        json!({"users": {"alice": "online", "bob": "offline", "carol": "offline"}})
    );

    alice.send_close(1000).await;
    alice.expect_close(1000).await;
    // Going offline is observed within a bounded wait.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let presence = bob.get("/v1/presence?users=alice").await.expect_status(200);
        if presence["users"]["alice"] == "offline" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice still online after closing: {presence}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- additions: one channel and its members ----

#[tokio::test]
async fn a_channel_and_its_members_can_be_read_when_visible() {
    let server = DevServer::start().await;
    let alice = server.http_as("alice");
    let general = alice.get("/v1/channels/general").await.expect_status(200);
    assert_eq!(
        general,
        json!({"id": "general", "name": "general", "kind": "public", "last_seq": 2, "read_seq": 0})
    );
    let members = server
        .http_as("carol")
        .get("/v1/channels/general/members")
        .await
        .expect_status(200);
    let mut names: Vec<&str> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(names, vec!["alice", "bob"]);

    let secret = server
        .create_channel("alice", "secret", "private", &[])
        .await;
    let id = secret["id"].as_str().expect("id");
    let carol = server.http_as("carol");
    carol
        .get(&format!("/v1/channels/{id}"))
        .await
        .expect_error(404, "not_found");
    carol
        .get(&format!("/v1/channels/{id}/members"))
        .await
        .expect_error(404, "not_found");
}

// ---- rate limit ----

#[tokio::test]
async fn http_requests_beyond_the_client_rate_are_429_with_retry_after() {
    let server = DevServer::builder().arg("--client-rate", "2").start().await;
    let alice = server.http_as("alice");
    let mut limited = None;
    for _ in 0..30 {
        let response = alice.get("/v1/channels").await;
        if response.status == 429 {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status, 200, "{:?}", response.body);
    }
    let limited = limited.expect("30 requests at a rate of 2/s were all served");
    let retry_after = limited
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {limited:?}"));
    let seconds: u64 = retry_after
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {retry_after:?}"));
    assert!(seconds >= 1, "Retry-After {seconds}");
    limited.expect_error(429, "rate_limited");

    // The limit is per user: bob is served meanwhile.
    server
        .http_as("bob")
        .get("/v1/channels")
        .await
        .expect_status(200);
    // After waiting as told, alice is served again.
    tokio::time::sleep(Duration::from_secs(seconds) + Duration::from_millis(500)).await;
    alice.get("/v1/channels").await.expect_status(200);
}
