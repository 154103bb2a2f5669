//! SPEC §4, errors and limits: every error code a WebSocket request can earn, the id it echoes,
//! the text and rate limits, and that the connection stays open after each error.

mod common;

use std::time::Duration;

use common::{Client, DevServer, GENERAL};
use serde_json::{json, Value};

/// Reads the next non-event frame and asserts it is an error with `code`.
async fn next_error(client: &mut Client, code: &str) -> Value {
    loop {
        let frame = client.next_frame().await;
        if frame["op"] == "event" {
            continue;
        }
        assert_eq!(frame["op"], "error", "expected an error, got {frame}");
        assert_eq!(frame["code"], code, "{frame}");
        assert!(
            frame["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {frame}"
        );
        return frame;
    }
}

/// Reads the next `n` frames that are not events.
async fn next_replies(client: &mut Client, n: usize) -> Vec<Value> {
    let mut replies = Vec::with_capacity(n);
    while replies.len() < n {
        let frame = client.next_frame().await;
        if frame["op"] != "event" {
            replies.push(frame);
        }
    }
    replies
}

/// Asserts that `replies` echo exactly the ids `ids`, each once (in any order: acks travel
/// through the cell, errors do not).
fn assert_echoes_ids(replies: &[Value], ids: std::ops::Range<i64>) {
    let mut got: Vec<Option<i64>> = replies.iter().map(|r| r["id"].as_i64()).collect();
    got.sort_unstable();
    let want: Vec<Option<i64>> = ids.map(Some).collect();
    assert_eq!(
        got, want,
        "every reply and error echoes its request's id: {replies:?}"
    );
}

/// The connection still works: a ping is answered and a message goes through.
async fn assert_still_serving(client: &mut Client) {
    client.assert_alive().await;
    client.send_message(GENERAL, "still here").await;
}

// ---- bad_request ----

#[tokio::test]
async fn a_frame_that_is_not_json_is_bad_request_and_the_connection_stays_open() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice.send_text("hello? {").await;
    let error = next_error(&mut alice, "bad_request").await;
    assert_eq!(error["id"], Value::Null);
    assert_still_serving(&mut alice).await;
}

#[tokio::test]
async fn a_binary_frame_is_bad_request() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice.send_binary(br#"{"op":"ping","id":1}"#.to_vec()).await;
    let error = next_error(&mut alice, "bad_request").await;
    assert_eq!(error["id"], Value::Null);
    assert_still_serving(&mut alice).await;
}

#[tokio::test]
async fn json_that_is_not_an_object_is_bad_request() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    for text in ["[1,2]", "42", "\"ping\"", "null"] {
        alice.send_text(text).await;
        let error = next_error(&mut alice, "bad_request").await;
        assert_eq!(error["id"], Value::Null, "for {text}");
    }
    assert_still_serving(&mut alice).await;
}

#[tokio::test]
async fn an_ill_typed_field_is_bad_request_echoing_the_id() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let frames = [
        json!({"op": "send", "id": 5, "channel": 5, "text": "x"}),
        json!({"op": "send", "id": "t", "channel": GENERAL, "text": 7}),
        json!({"op": "read", "id": 6, "channel": GENERAL, "seq": "3"}),
        json!({"op": "edit", "id": 7, "channel": GENERAL, "seq": -3, "text": "x"}),
        json!({"op": "send", "id": 8, "channel": GENERAL, "text": "x", "thread": "parent"}),
        json!({"op": "presence_sub", "id": 9, "users": "alice"}),
        json!({"op": "hello", "id": 10, "token": 12}),
        json!({"op": 3, "id": 11}),
    ];
    for frame in frames {
        let error = alice.request_error("bad_request", frame.clone()).await;
        assert_eq!(error["id"], frame["id"], "for {frame}");
    }
    assert_still_serving(&mut alice).await;
}

#[tokio::test]
async fn a_missing_field_is_bad_request_echoing_the_id() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let frames = [
        json!({"op": "send", "id": 1, "channel": GENERAL}),
        json!({"op": "send", "id": 2, "text": "where"}),
        json!({"op": "read", "id": 3, "channel": GENERAL}),
        json!({"op": "edit", "id": 4, "channel": GENERAL, "text": "x"}),
        json!({"op": "delete", "id": 5, "channel": GENERAL}),
        json!({"op": "presence_sub", "id": 6}),
        json!({"op": "typing", "id": 7}),
        json!({"op": "history", "id": 8}),
    ];
    for frame in frames {
        let error = alice.request_error("bad_request", frame.clone()).await;
        assert_eq!(error["id"], frame["id"], "for {frame}");
    }
    assert_still_serving(&mut alice).await;
}

#[tokio::test]
async fn an_unknown_op_is_bad_request_echoing_the_id() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let error = alice
        .request_error("bad_request", json!({"op": "dance", "id": "d1"}))
        .await;
    assert_eq!(error["id"], "d1");
    assert_still_serving(&mut alice).await;
}

#[tokio::test]
async fn a_frame_without_op_is_bad_request_echoing_the_id() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let error = alice
        .request_error("bad_request", json!({"id": 7, "channel": GENERAL}))
        .await;
    assert_eq!(error["id"], 7);
    assert_still_serving(&mut alice).await;
}

#[tokio::test]
async fn a_request_id_longer_than_64_characters_is_bad_request() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice
        .send_json(&json!({"op": "ping", "id": "x".repeat(65)}))
        .await;
    let error = next_error(&mut alice, "bad_request").await;
    // The id is not readable as an id, so it cannot be echoed.
    assert_eq!(error["id"], Value::Null);
    assert_still_serving(&mut alice).await;
}

// ---- not_found and forbidden ----

#[tokio::test]
async fn every_op_on_an_unknown_channel_is_not_found() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let channel = "no-such-channel";
    let frames = [
        json!({"op": "send", "channel": channel, "text": "x"}),
        json!({"op": "edit", "channel": channel, "seq": 1, "text": "x"}),
        json!({"op": "delete", "channel": channel, "seq": 1}),
        json!({"op": "typing", "channel": channel}),
        json!({"op": "history", "channel": channel}),
        json!({"op": "join", "channel": channel}),
        json!({"op": "leave", "channel": channel}),
        json!({"op": "read", "channel": channel, "seq": 1}),
    ];
    for frame in frames {
        alice.request_error("not_found", frame).await;
    }
    assert_still_serving(&mut alice).await;
}

#[tokio::test]
async fn a_public_channel_refuses_the_ops_of_non_members_with_forbidden() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let sent = alice.send_message(GENERAL, "mine").await;
    let mut carol = server.client("carol").await;
    let frames = [
        json!({"op": "send", "channel": GENERAL, "text": "x"}),
        json!({"op": "edit", "channel": GENERAL, "seq": sent["seq"], "text": "x"}),
        json!({"op": "delete", "channel": GENERAL, "seq": sent["seq"]}),
        json!({"op": "typing", "channel": GENERAL}),
        json!({"op": "read", "channel": GENERAL, "seq": 1}),
    ];
    for frame in frames {
        carol.request_error("forbidden", frame).await;
    }
    carol.assert_alive().await;
}

#[tokio::test]
async fn a_private_channel_is_not_found_for_every_op_of_non_members() {
    let server = DevServer::start().await;
    let secret = server
        .create_channel("alice", "secret", "private", &["bob"])
        .await;
    let id = secret["id"].as_str().expect("channel id");
    let mut alice = server.client("alice").await;
    let sent = alice.send_message(id, "hush").await;
    let mut carol = server.client("carol").await;
    let frames = [
        json!({"op": "send", "channel": id, "text": "x"}),
        json!({"op": "edit", "channel": id, "seq": sent["seq"], "text": "x"}),
        json!({"op": "delete", "channel": id, "seq": sent["seq"]}),
        json!({"op": "typing", "channel": id}),
        json!({"op": "history", "channel": id}),
        json!({"op": "join", "channel": id}),
        json!({"op": "leave", "channel": id}),
        json!({"op": "read", "channel": id, "seq": 1}),
    ];
    for frame in frames {
        carol.request_error("not_found", frame).await;
    }
    carol.assert_alive().await;
}

// ---- too_large ----

#[tokio::test]
async fn text_over_16_kib_is_too_large_and_16_kib_is_accepted() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let error = alice
        .request_error(
            "too_large",
            json!({"op": "send", "id": "big", "channel": GENERAL, "text": "x".repeat(16 * 1024 + 1)}),
        )
        .await;
    assert_eq!(error["id"], "big");
    let ack = alice.send_message(GENERAL, &"x".repeat(16 * 1024)).await;
    assert_eq!(ack["seq"], 3, "the refused text took no seq");
}

#[tokio::test]
async fn the_text_limit_counts_utf8_bytes_not_characters() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    // '€' is 3 bytes: 5462 of them are 16386 bytes in only 5462 characters.
    alice
        .request_error(
            "too_large",
            json!({"op": "send", "channel": GENERAL, "text": "€".repeat(5462)}),
        )
        .await;
    // 5461 of them are 16383 bytes.
    alice.send_message(GENERAL, &"€".repeat(5461)).await;
}

#[tokio::test]
async fn an_edit_with_text_over_the_limit_is_too_large() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let sent = alice.send_message(GENERAL, "short").await;
    alice
        .request_error(
            "too_large",
            json!({"op": "edit", "channel": GENERAL, "seq": sent["seq"], "text": "y".repeat(16 * 1024 + 1)}),
        )
        .await;
    let page = alice
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    assert_eq!(page["messages"][0]["text"], "short");
}

#[tokio::test]
async fn the_max_text_bytes_flag_sets_the_text_limit() {
    let server = DevServer::builder()
        .arg("--max-text-bytes", "100")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    alice
        .request_error(
            "too_large",
            json!({"op": "send", "channel": GENERAL, "text": "z".repeat(101)}),
        )
        .await;
    alice.send_message(GENERAL, &"z".repeat(100)).await;
}

// ---- rate_limited ----

#[tokio::test]
async fn frames_beyond_the_client_rate_are_rate_limited_with_retry_after() {
    let server = DevServer::builder().arg("--client-rate", "2").start().await;
    let mut alice = server.client("alice").await;
    let started = tokio::time::Instant::now();
    for i in 0..20 {
        alice.send_json(&json!({"op": "ping", "id": i})).await;
    }
    let mut pongs = 0u64;
    let mut limited = Vec::new();
    for reply in next_replies(&mut alice, 20).await {
        match reply["op"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                limited.push(reply);
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        !limited.is_empty(),
        "20 pings at a rate of 2/s were all served"
    );
    // Bursts of twice the rate (4), plus what the bucket refilled while the test ran.
    let allowed = 4.0 + 2.0 * elapsed + 1.0;
    assert!(
        (pongs as f64) <= allowed,
        "{pongs} pongs in {elapsed:.1} s exceed a rate of 2/s with bursts of 4"
    );
    let mut longest = 0;
    for error in &limited {
        let retry = error["retry_after_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("rate_limited without retry_after_ms: {error}"));
        assert!(retry > 0, "retry_after_ms must be positive: {error}");
        longest = longest.max(retry);
    }

    // The connection stays open; after waiting as told, requests are served again.
    tokio::time::sleep(Duration::from_millis(longest) + Duration::from_millis(1500)).await;
    alice.assert_alive().await;
}

#[tokio::test]
async fn a_rate_limited_error_echoes_the_request_id() {
    let server = DevServer::builder().arg("--client-rate", "2").start().await;
    let mut alice = server.client("alice").await;
    for i in 0..12 {
        alice.send_json(&json!({"op": "ping", "id": i})).await;
    }
    let replies = next_replies(&mut alice, 12).await;
    assert!(
        replies.iter().any(|r| r["code"] == "rate_limited"),
        "12 pings at once were all served at 2/s: {replies:?}"
    );
    assert_echoes_ids(&replies, 0..12);
}

#[tokio::test]
async fn the_default_client_rate_allows_a_burst_of_thirty_but_not_a_flood() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    // The default is 20 frames/s with bursts of 40: 30 back-to-back frames all pass.
    for i in 0..30 {
        alice.send_json(&json!({"op": "ping", "id": i})).await;
    }
    for i in 0..30 {
        let reply = alice.reply_to(&json!(i)).await;
        assert_eq!(reply["op"], "pong", "frame {i} of a burst of 30: {reply}");
    }
    // 200 more, sent at once, cannot all pass: they are answered rate_limited until the
    // refusals amount to abuse (4003).
    for i in 100..300 {
        alice.send_json(&json!({"op": "ping", "id": i})).await;
    }
    let before = alice.expect_close(4003).await;
    let limited = before.iter().filter(|f| f["op"] == "error").count();
    for reply in before.iter().filter(|f| f["op"] == "error") {
        assert_eq!(reply["code"], "rate_limited", "{reply}");
    }
    assert!(limited > 0, "200 frames in a burst were all served");
}

#[tokio::test]
async fn rate_limited_sends_are_not_stored() {
    let server = DevServer::builder().arg("--client-rate", "2").start().await;
    let mut alice = server.client("alice").await;
    for i in 0..12 {
        alice
            .send_json(&json!({"op": "send", "id": i, "channel": GENERAL, "text": format!("m{i}")}))
            .await;
    }
    let mut acked = Vec::new();
    for reply in next_replies(&mut alice, 12).await {
        if reply["op"] == "ack" {
            acked.push(reply["seq"].as_u64().expect("seq"));
        } else {
            assert_eq!(reply["code"], "rate_limited", "{reply}");
        }
    }
    assert!(acked.len() < 12, "every send of a flood was accepted");
    // Only the acked sends made messages, with consecutive seqs.
    acked.sort_unstable();
    let want: Vec<u64> = (3..3 + acked.len() as u64).collect();
    assert_eq!(acked, want);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let page = alice
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    assert_eq!(
        page["messages"].as_array().map(Vec::len),
        Some(acked.len()),
        "{page}"
    );
}
