//! SPEC §3, workspace isolation: a token opens exactly its own workspace. Users of another
//! workspace (created through the admin API), even ones with the same user ids, never see or
//! touch `demo`'s channels, messages, members or presence.

mod common;

use common::{DevServer, GENERAL, QUIET, WAIT};
use serde_json::{json, Value};

/// A server with workspace `acme` beside `demo`.
async fn two_workspaces() -> DevServer {
    let server = DevServer::start().await;
    server.create_workspace("acme").await;
    server
}

#[tokio::test]
async fn a_same_named_user_of_another_workspace_is_not_in_demos_channels() {
    let server = two_workspaces().await;
    let mallory = server.client_in("acme", "alice").await;
    assert_eq!(mallory.ready["workspace"], "acme");
    assert_eq!(mallory.ready["channels"], json!([]));
}

#[tokio::test]
async fn every_op_on_demos_channel_from_another_workspace_is_not_found() {
    let server = two_workspaces().await;
    let mut demo_alice = server.client("alice").await;
    let sent = demo_alice.send_message(GENERAL, "demo only").await;
    let mut mallory = server.client_in("acme", "alice").await;
    let frames = [
        json!({"op": "send", "channel": GENERAL, "text": "x"}),
        json!({"op": "edit", "channel": GENERAL, "seq": sent["seq"], "text": "x"}),
        json!({"op": "delete", "channel": GENERAL, "seq": sent["seq"]}),
        json!({"op": "typing", "channel": GENERAL}),
        json!({"op": "history", "channel": GENERAL}),
        json!({"op": "join", "channel": GENERAL}),
        json!({"op": "leave", "channel": GENERAL}),
        json!({"op": "read", "channel": GENERAL, "seq": 1}),
    ];
    for frame in frames {
        mallory.request_error("not_found", frame).await;
    }

    // demo saw nothing of it, and its message stands.
    demo_alice.next_event("message", WAIT).await;
    demo_alice.expect_no_frame(QUIET).await;
    let page = demo_alice
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    assert_eq!(page["messages"][0]["text"], "demo only");
    assert_eq!(page["messages"][0]["edited"], false);
    let later = server.client("alice").await;
    let general = later.ready_channel(GENERAL).expect("general");
    assert_eq!(
        general["last_seq"], sent["seq"],
        "nothing was added to demo's log"
    );
}

#[tokio::test]
async fn demos_events_never_reach_another_workspace() {
    let server = two_workspaces().await;
    // acme's carol shares her id with demo's carol, whom demo adds to general.
    let mut mallory = server.client_in("acme", "carol").await;
    mallory
        .request_op(
            "presence",
            json!({"op": "presence_sub", "users": ["alice"]}),
        )
        .await;
    let mut demo_carol = server.client("carol").await;
    let mut alice = server.client("alice").await;
    alice.send_message(GENERAL, "secret plans").await;
    alice
        .send_json(&json!({"op": "typing", "channel": GENERAL}))
        .await;
    server
        .http_as("alice")
        .post("/v1/channels/general/members", json!({"user": "carol"}))
        .await
        .expect_status(200);
    demo_carol.next_event("channel_added", WAIT).await;
    drop(alice);
    mallory.expect_no_frame(QUIET).await;
}

#[tokio::test]
async fn resuming_demos_channel_from_another_workspace_replays_nothing_of_it() {
    let server = two_workspaces().await;
    let mut bob = server.client("bob").await;
    bob.send_message(GENERAL, "demo history").await;
    let token = server.token_in("acme", "bob");
    let mut mallory = server.connect().await;
    mallory.hello(&token, Some(json!({"general": 0}))).await;
    let frames = mallory.collect_for(QUIET).await;
    for frame in &frames {
        assert!(
            !matches!(
                frame["type"].as_str(),
                Some(
                    "message"
                        | "member_joined"
                        | "member_left"
                        | "message_edited"
                        | "message_deleted"
                )
            ),
            "demo's log leaked into acme: {frame}"
        );
    }
}

#[tokio::test]
async fn presence_of_demos_users_is_not_revealed_to_another_workspace() {
    let server = two_workspaces().await;
    let _alice = server.client("alice").await;
    let bob = server.client("bob").await;
    let mut mallory = server.client_in("acme", "mallory").await;
    let reply = mallory
        .request_op(
            "presence",
            json!({"op": "presence_sub", "users": ["alice", "bob"]}),
        )
        .await;
    assert_eq!(
        reply["users"],
        json!({"alice": "offline", "bob": "offline"})
    );
    let over_http = server
        .http(&server.token_in("acme", "mallory"))
        .get("/v1/presence?users=alice,bob")
        .await
        .expect_status(200);
    assert_eq!(
        over_http,
        json!({"users": {"alice": "offline", "bob": "offline"}})
    );

    // And presence changes in demo produce no event in acme.
    let _carol = server.client("carol").await;
    drop(bob);
    mallory.expect_no_event("presence", QUIET).await;
}

#[tokio::test]
async fn a_same_named_user_is_online_only_in_its_own_workspace() {
    let server = two_workspaces().await;
    let _acme_alice = server.client_in("acme", "alice").await;
    let mut bob = server.client("bob").await;
    let reply = bob
        .request_op(
            "presence",
            json!({"op": "presence_sub", "users": ["alice"]}),
        )
        .await;
    assert_eq!(reply["users"]["alice"], "offline");
}

#[tokio::test]
async fn the_http_api_of_another_workspace_never_shows_or_changes_demo() {
    let server = two_workspaces().await;
    server
        .http_as("alice")
        .post(
            "/v1/channels/general/messages",
            json!({"text": "demo words"}),
        )
        .await
        .expect_status(201);
    let secret = server
        .create_channel("alice", "secret", "private", &["bob"])
        .await;
    let secret_id = secret["id"].as_str().expect("id");
    let mallory = server.http(&server.token_in("acme", "alice"));

    let listed = mallory
        .get("/v1/channels?scope=public")
        .await
        .expect_status(200);
    assert_eq!(listed, json!({"channels": []}));
    let mine = mallory.get("/v1/channels").await.expect_status(200);
    assert_eq!(mine, json!({"channels": []}));

    for channel in [GENERAL, secret_id] {
        mallory
            .get(&format!("/v1/channels/{channel}/messages"))
            .await
            .expect_error(404, "not_found");
        mallory
            .post(
                &format!("/v1/channels/{channel}/messages"),
                json!({"text": "intrusion"}),
            )
            .await
            .expect_error(404, "not_found");
        mallory
            .post(
                &format!("/v1/channels/{channel}/members"),
                json!({"user": "alice"}),
            )
            .await
            .expect_error(404, "not_found");
        mallory
            .delete(&format!("/v1/channels/{channel}/members/bob"))
            .await
            .expect_error(404, "not_found");
        mallory
            .get(&format!("/v1/channels/{channel}"))
            .await
            .expect_error(404, "not_found");
        mallory
            .get(&format!("/v1/channels/{channel}/members"))
            .await
            .expect_error(404, "not_found");
    }

    // demo is unchanged.
    let page = server
        .http_as("bob")
        .get("/v1/channels/general/messages")
        .await
        .expect_status(200);
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, vec!["demo words"]);
    let members = server
        .http_as("bob")
        .get("/v1/channels/general/members")
        .await
        .expect_status(200);
    assert_eq!(
        members["members"].as_array().map(Vec::len),
        Some(2),
        "{members}"
    );
}

#[tokio::test]
async fn channel_names_and_dms_are_per_workspace() {
    let server = two_workspaces().await;
    let mut demo_bob = server.client("bob").await;
    let acme = server.http(&server.token_in("acme", "alice"));
    // acme may have its own "general": names are unique per workspace only.
    let acme_general = acme
        .post(
            "/v1/channels",
            json!({"name": "general", "kind": "public", "members": ["bob"]}),
        )
        .await
        .expect_status(201);
    assert_ne!(acme_general["id"], GENERAL);
    // A DM with acme's bob is not demo's bob.
    let dm = acme
        .post("/v1/dms", json!({"user": "bob"}))
        .await
        .expect_status(200);
    demo_bob.expect_no_frame(QUIET).await;

    let demo_list = server
        .http_as("bob")
        .get("/v1/channels")
        .await
        .expect_status(200);
    let ids: Vec<&Value> = demo_list["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| &c["id"])
        .collect();
    assert_eq!(ids, vec![&json!(GENERAL)], "demo's bob: {demo_list}");
    let dm_id = dm["id"].as_str().expect("id");
    server
        .http_as("bob")
        .get(&format!("/v1/channels/{dm_id}/messages"))
        .await
        .expect_error(404, "not_found");

    // acme's bob does see both.
    let acme_bob = server
        .http(&server.token_in("acme", "bob"))
        .get("/v1/channels")
        .await
        .expect_status(200);
    assert_eq!(
        acme_bob["channels"].as_array().map(Vec::len),
        Some(2),
        "{acme_bob}"
    );
}

#[tokio::test]
async fn resuming_a_private_channel_one_is_not_in_replays_nothing_of_it() {
    let server = two_workspaces().await;
    let secret = server
        .create_channel("alice", "secret", "private", &["bob"])
        .await;
    let secret_id = secret["id"].as_str().expect("id").to_string();
    let mut alice = server.client("alice").await;
    alice.send_message(&secret_id, "members only").await;

    // carol is in the same workspace but not in the channel.
    let token = server.token("carol");
    let mut carol = server.connect().await;
    let mut resume = serde_json::Map::new();
    resume.insert(secret_id.clone(), json!(0));
    carol.hello(&token, Some(Value::Object(resume))).await;
    let frames = carol.collect_for(QUIET).await;
    assert!(
        frames.iter().all(|f| f["channel"] != secret_id.as_str()),
        "a private channel's events reached a non-member: {frames:?}"
    );
}
