//! SPEC §5–6, webhooks: registration and its errors, and delivery to a real HTTP receiver
//! (signature and headers, retries with the same `delivery_id`, timeouts that never hold up
//! another webhook, filters, the bot's own events, order, disable and re-enable). Runs against
//! `confab dev` and, with `CONFAB_TEST_TARGET=cluster`, a distributed deployment.

mod common;
mod webhook_receiver;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{DevServer, GENERAL, QUIET, WAIT};
use serde_json::{json, Value};
use webhook_receiver::{signature_is_valid, Answer, Receiver};

/// Bound for waits that include retries (backoff of 1 s, 2 s, ...).
const RETRY_WAIT: Duration = Duration::from_secs(30);

/// Registers a webhook as `user`; returns `(id, secret)`.
async fn register(server: &DevServer, user: &str, body: Value) -> (String, String) {
    let created = server
        .http_as(user)
        .post("/v1/webhooks", body)
        .await
        .expect_status(201);
    let id = created["id"].as_str().expect("webhook id").to_string();
    let secret = created["secret"].as_str().expect("secret").to_string();
    (id, secret)
}

async fn post(server: &DevServer, user: &str, channel: &str, text: &str) -> u64 {
    let ack = server
        .http_as(user)
        .post(
            &format!("/v1/channels/{channel}/messages"),
            json!({ "text": text }),
        )
        .await
        .expect_status(201);
    ack["seq"].as_u64().expect("seq")
}

async fn webhook(server: &DevServer, user: &str, id: &str) -> Value {
    let list = server
        .http_as(user)
        .get("/v1/webhooks")
        .await
        .expect_status(200);
    list["webhooks"]
        .as_array()
        .expect("webhooks array")
        .iter()
        .find(|w| w["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("webhook {id} not listed: {list}"))
}

fn texts(hits: &[webhook_receiver::Hit]) -> Vec<String> {
    hits.iter()
        .filter_map(|h| h.body["text"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_delivery_is_the_websocket_event_with_workspace_delivery_id_headers_and_a_valid_signature(
) {
    let server = DevServer::start().await;
    let receiver = Receiver::start().await;
    let (id, secret) = register(
        &server,
        "bob",
        json!({"url": receiver.url(), "events": ["message"]}),
    )
    .await;
    assert_eq!(secret.len(), 64, "32 random bytes in hex: {secret}");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));

    let mut bob_ws = server.client("bob").await;
    let seq = post(&server, "alice", GENERAL, "ping").await;
    let on_socket = bob_ws.next_event("message", WAIT).await;
    let hit = receiver.wait_for(1, WAIT).await.remove(0);

    let delivery_id = format!("{id}:{GENERAL}:{seq}");
    assert_eq!(hit.delivery_id(), delivery_id);
    assert_eq!(hit.attempt(), 1);
    assert_eq!(hit.header("content-type"), "application/json");
    assert!(
        signature_is_valid(&secret, hit.header("confab-signature"), &hit.raw),
        "signature {:?} does not verify",
        hit.header("confab-signature")
    );
    assert!(!signature_is_valid(
        "0".repeat(64).as_str(),
        hit.header("confab-signature"),
        &hit.raw
    ));
    let t: u64 = hit
        .header("confab-signature")
        .split(',')
        .find_map(|p| p.strip_prefix("t="))
        .and_then(|t| t.parse().ok())
        .expect("t=");
    assert!(t.abs_diff(common::now_s()) < 300, "t={t} is not now");

    // The event exactly as on the WebSocket, plus workspace and delivery_id.
    let mut body = hit.body.clone();
    assert_eq!(body["workspace"], common::DEMO);
    assert_eq!(body["delivery_id"], delivery_id);
    let object = body.as_object_mut().expect("object body");
    object.remove("workspace");
    object.remove("delivery_id");
    assert_eq!(body, on_socket);
    assert_eq!(body["op"], "event");
    assert_eq!(body["seq"], seq);

    let listed = webhook(&server, "bob", &id).await;
    assert_eq!(listed["status"], "active");
    assert!(listed["last_error"].is_null(), "{listed}");
    assert_eq!(listed["url"], receiver.url());
    assert_eq!(listed["events"], json!(["message"]));
    assert!(
        listed.get("secret").is_none(),
        "the secret is shown only once: {listed}"
    );
}

#[tokio::test]
async fn two_failures_then_a_2xx_deliver_on_attempt_3_with_the_same_delivery_id() {
    let server = DevServer::start().await;
    let receiver = Receiver::start().await;
    receiver.script(&[Answer::Status(500), Answer::Status(500)]);
    let (id, _) = register(
        &server,
        "bob",
        json!({"url": receiver.url(), "events": ["message"]}),
    )
    .await;
    let seq = post(&server, "alice", GENERAL, "retry me").await;
    let hits = receiver.wait_for(3, RETRY_WAIT).await;
    let expected = format!("{id}:{GENERAL}:{seq}");
    assert!(hits.iter().all(|h| h.delivery_id() == expected), "{hits:?}");
    assert_eq!(
        hits.iter().map(|h| h.attempt()).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // The first retry waits about 1 s, the second about 2 s (never less than the backoff).
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(900));
    assert!(hits[2].at - hits[1].at >= Duration::from_millis(1900));
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        receiver.hits().len(),
        3,
        "delivered once done: no 4th attempt"
    );
    assert!(webhook(&server, "bob", &id).await["last_error"].is_null());
}

#[tokio::test]
async fn a_hanging_receiver_times_out_and_is_retried_while_a_healthy_webhook_gets_everything() {
    let server = DevServer::builder()
        .arg("--webhook-timeout-ms", "500")
        .start()
        .await;
    let hanging = Receiver::start().await;
    hanging.answer(Answer::Hang);
    let healthy = Receiver::start().await;
    let (stuck_id, _) = register(
        &server,
        "bob",
        json!({"url": hanging.url(), "events": ["message"]}),
    )
    .await;
    register(
        &server,
        "bob",
        json!({"url": healthy.url(), "events": ["message"]}),
    )
    .await;

    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(post(&server, "alice", GENERAL, &format!("m{i}")).await);
    }
    let got = healthy.wait_for(5, WAIT).await;
    assert_eq!(texts(&got), vec!["m0", "m1", "m2", "m3", "m4"]);

    // The hanging one is retried on its first delivery (one attempt at a time, in order).
    let stuck = hanging.wait_for(2, RETRY_WAIT).await;
    let first = format!("{stuck_id}:{GENERAL}:{}", seqs[0]);
    assert!(stuck.iter().all(|h| h.delivery_id() == first), "{stuck:?}");
    assert_eq!(stuck[1].attempt(), 2);
    let last_error = webhook(&server, "bob", &stuck_id).await["last_error"].clone();
    assert!(
        last_error.as_str().is_some_and(|e| e.contains("timeout")),
        "last_error: {last_error}"
    );
}

#[tokio::test]
async fn a_bots_own_events_are_not_delivered_to_it() {
    let server = DevServer::start().await;
    let receiver = Receiver::start().await;
    register(
        &server,
        "bob",
        json!({"url": receiver.url(), "events": ["message", "member_joined"]}),
    )
    .await;
    post(&server, "bob", GENERAL, "from the bot").await;
    post(&server, "alice", GENERAL, "from alice").await;
    receiver.wait_for(1, WAIT).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(texts(&receiver.hits()), vec!["from alice"]);
}

#[tokio::test]
async fn event_type_and_channel_filters_decide_what_is_delivered() {
    let server = DevServer::start().await;
    let other = server
        .create_channel("alice", "other", "public", &["bob"])
        .await;
    let other = other["id"].as_str().expect("id").to_string();
    let messages_of_general = Receiver::start().await;
    let joins_everywhere = Receiver::start().await;
    register(
        &server,
        "bob",
        json!({"url": messages_of_general.url(), "events": ["message"], "channels": [GENERAL]}),
    )
    .await;
    register(
        &server,
        "bob",
        json!({"url": joins_everywhere.url(), "events": ["member_joined"]}),
    )
    .await;

    post(&server, "alice", &other, "in other").await;
    post(&server, "alice", GENERAL, "in general").await;
    server
        .http_as("carol")
        .post(
            &format!("/v1/channels/{other}/members"),
            json!({"user": "carol"}),
        )
        .await
        .expect_status(200);

    let general = messages_of_general.wait_for(1, WAIT).await;
    let joins = joins_everywhere.wait_for(1, WAIT).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(texts(&messages_of_general.hits()), vec!["in general"]);
    assert_eq!(general[0].body["channel"], GENERAL);
    let joins_now = joins_everywhere.hits();
    assert_eq!(joins_now.len(), 1, "{joins_now:?}");
    assert_eq!(joins[0].body["type"], "member_joined");
    assert_eq!(joins[0].body["user"], "carol");
    assert_eq!(joins[0].body["channel"], other);
}

#[tokio::test]
async fn a_thousand_messages_are_a_thousand_distinct_deliveries_in_seq_order_per_channel() {
    let server = DevServer::builder()
        .arg("--client-rate", "100000")
        .start()
        .await;
    let second = server
        .create_channel("alice", "second", "public", &["bob"])
        .await;
    let second = second["id"].as_str().expect("id").to_string();
    let receiver = Receiver::start().await;
    register(
        &server,
        "bob",
        json!({"url": receiver.url(), "events": ["message"]}),
    )
    .await;

    let sending = [GENERAL.to_string(), second.clone()].map(|channel| {
        let http = server.http_as("alice");
        tokio::spawn(async move {
            for i in 0..500 {
                http.post(
                    &format!("/v1/channels/{channel}/messages"),
                    json!({ "text": format!("{channel} {i}") }),
                )
                .await
                .expect_status(201);
            }
        })
    });
    for task in sending {
        task.await.expect("sender");
    }
    let hits = receiver
        .wait_until(Duration::from_secs(120), |hits| {
            hits.iter()
                .map(|h| h.delivery_id().to_string())
                .collect::<HashSet<_>>()
                .len()
                >= 1000
        })
        .await;
    let ids: HashSet<&str> = hits.iter().map(|h| h.delivery_id()).collect();
    assert_eq!(ids.len(), 1000);
    let mut last: HashMap<String, u64> = HashMap::new();
    for hit in &hits {
        let channel = hit.body["channel"].as_str().expect("channel").to_string();
        let seq = hit.body["seq"].as_u64().expect("seq");
        let previous = last.insert(channel.clone(), seq).unwrap_or(0);
        assert!(seq > previous, "{channel}: seq {seq} after {previous}");
    }
    assert_eq!(hits.len(), 1000, "no delivery was attempted twice");
}

#[tokio::test]
async fn a_webhook_failing_everything_is_disabled_keeps_its_deliveries_and_resumes_when_enabled() {
    let server = DevServer::builder()
        .arg("--webhook-disable-after-s", "2")
        .arg("--webhook-backoff-max-s", "1")
        .start()
        .await;
    let receiver = Receiver::start().await;
    receiver.answer(Answer::Status(503));
    let (id, _) = register(
        &server,
        "bob",
        json!({"url": receiver.url(), "events": ["message"]}),
    )
    .await;
    let seq = post(&server, "alice", GENERAL, "while failing").await;

    let deadline = tokio::time::Instant::now() + RETRY_WAIT;
    let disabled = loop {
        let listed = webhook(&server, "bob", &id).await;
        if listed["status"] == "disabled" {
            break listed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never disabled: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(disabled["last_error"], "status 503");
    // Disabled: nothing more is attempted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = receiver.hits().len();
    assert!(attempts >= 2, "retried before disabling: {attempts}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.hits().len(),
        attempts,
        "a disabled webhook is not attempted"
    );

    // Enabled again, it resumes with the pending delivery (same id).
    receiver.answer(Answer::Status(200));
    let enabled = server
        .http_as("bob")
        .post(&format!("/v1/webhooks/{id}/enable"), json!({}))
        .await
        .expect_status(200);
    assert_eq!(enabled["status"], "active");
    let hits = receiver.wait_for(attempts + 1, RETRY_WAIT).await;
    let expected = format!("{id}:{GENERAL}:{seq}");
    assert!(hits.iter().all(|h| h.delivery_id() == expected), "{hits:?}");
    let listed = webhook(&server, "bob", &id).await;
    assert_eq!(listed["status"], "active");
    // Only its owner can enable it.
    server
        .http_as("alice")
        .post(&format!("/v1/webhooks/{id}/enable"), json!({}))
        .await
        .expect_error(404, "not_found");
}

#[tokio::test]
async fn registration_refuses_bad_urls_unknown_events_foreign_channels_and_too_many_webhooks() {
    let server = DevServer::builder()
        .arg("--max-webhooks-per-user", "2")
        .start()
        .await;
    let bob = server.http_as("bob");
    let long = format!("http://example.com/{}", "a".repeat(2048));
    for url in [
        "ftp://example.com/hook",
        "not a url",
        "http://",
        long.as_str(),
    ] {
        bob.post("/v1/webhooks", json!({"url": url, "events": ["message"]}))
            .await
            .expect_error(400, "bad_request");
    }
    for events in [json!([]), json!(["typing"]), json!(["nope"])] {
        bob.post(
            "/v1/webhooks",
            json!({"url": "http://example.com/hook", "events": events}),
        )
        .await
        .expect_error(400, "bad_request");
    }
    let private = server
        .create_channel("alice", "secret-room", "private", &[])
        .await;
    let public = server
        .create_channel("alice", "not-bobs", "public", &[])
        .await;
    let with = |channel: &Value| json!({"url": "http://example.com/hook", "events": ["message"], "channels": [channel["id"]]});
    bob.post("/v1/webhooks", with(&private))
        .await
        .expect_error(404, "not_found");
    bob.post("/v1/webhooks", with(&public))
        .await
        .expect_error(403, "forbidden");
    bob.post(
        "/v1/webhooks",
        json!({"url": "http://example.com/hook", "events": ["message"], "channels": ["nosuch"]}),
    )
    .await
    .expect_error(404, "not_found");

    // A loopback URL nothing answers on: these webhooks never send anything off the machine.
    let ok = json!({"url": "http://127.0.0.1:9/hook", "events": ["message"]});
    let (first, _) = register(&server, "bob", ok.clone()).await;
    register(&server, "bob", ok.clone()).await;
    bob.post("/v1/webhooks", ok.clone())
        .await
        .expect_error(409, "conflict");
    // The bound is per user.
    register(&server, "alice", ok.clone()).await;

    // Listing shows the caller's own only; deleting frees a place.
    let listed = bob.get("/v1/webhooks").await.expect_status(200);
    assert_eq!(
        listed["webhooks"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    server
        .http_as("alice")
        .delete(&format!("/v1/webhooks/{first}"))
        .await
        .expect_error(404, "not_found");
    assert_eq!(
        bob.delete(&format!("/v1/webhooks/{first}"))
            .await
            .expect_status(200),
        json!({})
    );
    bob.delete(&format!("/v1/webhooks/{first}"))
        .await
        .expect_error(404, "not_found");
    register(&server, "bob", ok).await;
    server
        .anon()
        .get("/v1/webhooks")
        .await
        .expect_error(401, "unauthorized");
}

#[tokio::test]
async fn deny_private_refuses_loopback_destinations_at_registration() {
    let server = DevServer::builder()
        .env("CONFAB_WEBHOOK_DENY_PRIVATE", "true")
        .start()
        .await;
    let receiver = Receiver::start().await;
    let bob = server.http_as("bob");
    for url in [
        receiver.url(),
        format!("http://localhost:{}/hook", receiver.port),
        format!("http://[::1]:{}/hook", receiver.port),
        "http://10.0.0.7/hook".to_string(),
        "http://169.254.169.254/latest".to_string(),
    ] {
        let refused = bob
            .post("/v1/webhooks", json!({"url": url, "events": ["message"]}))
            .await
            .expect_error(400, "bad_request");
        assert!(
            refused["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("refused address")),
            "{url}: {refused}"
        );
    }
}

#[tokio::test]
async fn a_deleted_webhook_receives_nothing_more() {
    let server = DevServer::start().await;
    let receiver = Receiver::start().await;
    let (id, _) = register(
        &server,
        "bob",
        json!({"url": receiver.url(), "events": ["message"]}),
    )
    .await;
    post(&server, "alice", GENERAL, "before").await;
    receiver.wait_for(1, WAIT).await;
    server
        .http_as("bob")
        .delete(&format!("/v1/webhooks/{id}"))
        .await
        .expect_status(200);
    post(&server, "alice", GENERAL, "after").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(texts(&receiver.hits()), vec!["before"]);
}
