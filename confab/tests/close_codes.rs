//! SPEC §4, close codes: when the server closes a client WebSocket and with which code (`1000`,
//! `1001`, `1009`, `4000`, `4001`, `4002`, `4003`, `4004`, `4008`).

mod common;

use std::time::Duration;

use common::{mint_with_secret, now_s, Client, DevServer, Incoming, GENERAL, WAIT};
use serde_json::json;

// ---- 1000 ----

#[tokio::test]
async fn a_normal_close_from_the_client_is_answered_with_1000() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    bob.request_op(
        "presence",
        json!({"op": "presence_sub", "users": ["alice"]}),
    )
    .await;
    let mut alice = server.client("alice").await;
    bob.next_event("presence", WAIT).await;

    alice.send_close(1000).await;
    alice.expect_close(1000).await;
    let offline = bob.next_event("presence", WAIT).await;
    assert_eq!(offline["user"], "alice");
    assert_eq!(offline["status"], "offline");
}

// ---- 1001 ----

/// Reads past any frames to the end of the connection and describes it unless it is a close
/// with `1001`.
async fn not_going_away(who: &str, client: &mut Client) -> Option<String> {
    let outcome = loop {
        match client.read(WAIT).await {
            Incoming::Json(_) => continue,
            other => break other,
        }
    };
    match outcome {
        Incoming::Close(Some(1001), _) => None,
        other => Some(format!("{who}: {other:?}")),
    }
}

#[tokio::test]
async fn sigterm_closes_every_session_with_1001_and_the_process_exits() {
    let mut server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    let mut bob = server.client("bob").await;

    server.terminate();
    let mut wrong = Vec::new();
    for (who, client) in [
        ("alice", &mut alice),
        ("alice's second session", &mut alice_phone),
        ("bob", &mut bob),
    ] {
        wrong.extend(not_going_away(who, client).await);
    }
    assert!(
        wrong.is_empty(),
        "expected close 1001 for every session on SIGTERM, got: {wrong:#?}"
    );
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some(),
        "the server (confab dev, or the gateway) still runs 30 s after SIGTERM"
    );
}

#[tokio::test]
async fn sigterm_closes_a_connection_still_awaiting_hello_with_1001() {
    let server = DevServer::start().await;
    let mut fresh = server.connect().await;
    // The upgrade is done; make sure the server is serving the socket before the signal.
    let _alice = server.client("alice").await;
    server.terminate();
    let wrong = not_going_away("a connection before hello", &mut fresh).await;
    assert!(
        wrong.is_none(),
        "expected close 1001 on SIGTERM, got: {wrong:?}"
    );
}

// ---- 1009 ----

#[tokio::test]
async fn a_frame_over_max_frame_bytes_closes_with_1009() {
    let server = DevServer::builder()
        .arg("--max-frame-bytes", "4096")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    // A frame just under the bound is served.
    alice.send_message(GENERAL, &"a".repeat(3900)).await;
    alice
        .send_json(&json!({"op": "send", "channel": GENERAL, "text": "b".repeat(5000)}))
        .await;
    alice.expect_close(1009).await;
}

#[tokio::test]
async fn a_frame_over_the_default_64_kib_closes_with_1009() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice
        .send_json(&json!({"op": "ping", "pad": "p".repeat(64 * 1024)}))
        .await;
    alice.expect_close(1009).await;
}

#[tokio::test]
async fn a_binary_frame_over_max_frame_bytes_closes_with_1009() {
    let server = DevServer::builder()
        .arg("--max-frame-bytes", "4096")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    alice.send_binary(vec![7u8; 8192]).await;
    alice.expect_close(1009).await;
}

// ---- 4000 ----

#[tokio::test]
async fn a_client_silent_for_twice_the_heartbeat_is_closed_with_4000() {
    let server = DevServer::builder()
        .arg("--heartbeat-ms", "500")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    assert_eq!(alice.ready["heartbeat_ms"], 500);
    // Reading would make the client answer the server's pings, so it neither reads nor writes
    // for well over 2 × 500 ms; then the close must be waiting.
    tokio::time::sleep(Duration::from_secs(4)).await;
    alice.expect_close(4000).await;
}

#[tokio::test]
async fn websocket_pings_alone_keep_a_client_connected() {
    let server = DevServer::builder()
        .arg("--heartbeat-ms", "500")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    // Three seconds of control frames only, every 200 ms: far more often than 2 × 500 ms.
    for _ in 0..15 {
        alice.send_ws_ping().await;
        match alice.read(Duration::from_millis(200)).await {
            Incoming::Timeout => {}
            Incoming::Json(frame) => panic!("unexpected frame {frame}"),
            other => panic!("the connection ended although the client pinged: {other:?}"),
        }
    }
    alice.assert_alive().await;
}

#[tokio::test]
async fn ping_requests_keep_a_client_connected() {
    let server = DevServer::builder()
        .arg("--heartbeat-ms", "500")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    for _ in 0..15 {
        alice.assert_alive().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    alice.assert_alive().await;
}

// ---- 4001 ----

#[tokio::test]
async fn a_token_with_a_bad_signature_closes_with_4001() {
    let server = DevServer::start().await;
    let token = mint_with_secret(
        "not-the-secret",
        &json!({"sub": "alice", "wsp": "demo", "exp": now_s() + 3600}),
    );
    let mut client = server.connect().await;
    client
        .send_json(&json!({"op": "hello", "token": token}))
        .await;
    let frames = client.expect_close(4001).await;
    assert!(
        frames.iter().all(|f| f["op"] != "ready"),
        "a bad token got ready: {frames:?}"
    );
}

#[tokio::test]
async fn a_token_that_is_not_a_jwt_closes_with_4001() {
    let server = DevServer::start().await;
    let mut client = server.connect().await;
    client
        .send_json(&json!({"op": "hello", "token": "definitely-not-a-jwt"}))
        .await;
    client.expect_close(4001).await;
}

#[tokio::test]
async fn a_token_without_its_required_claims_closes_with_4001() {
    let server = DevServer::start().await;
    let exp = now_s() + 3600;
    for claims in [
        json!({"wsp": "demo", "exp": exp}),
        json!({"sub": "alice", "exp": exp}),
        json!({"sub": "alice", "wsp": "demo"}),
        json!({"sub": "not a valid id", "wsp": "demo", "exp": exp}),
    ] {
        let mut client = server.connect().await;
        client
            .send_json(&json!({"op": "hello", "token": server.mint(&claims)}))
            .await;
        client.expect_close(4001).await;
    }
}

#[tokio::test]
async fn a_token_expired_beyond_the_60_s_leeway_closes_with_4001() {
    let server = DevServer::start().await;
    let token = server.mint(&json!({"sub": "alice", "wsp": "demo", "exp": now_s() - 120}));
    let mut client = server.connect().await;
    client
        .send_json(&json!({"op": "hello", "token": token}))
        .await;
    client.expect_close(4001).await;
}

#[tokio::test]
async fn a_token_expired_within_the_60_s_leeway_is_accepted() {
    let server = DevServer::start().await;
    let token = server.mint(&json!({"sub": "alice", "wsp": "demo", "exp": now_s() - 20}));
    let client = server.client_with_token(&token).await;
    assert_eq!(client.ready["user"], "alice");
}

#[tokio::test]
async fn the_jwt_secret_flag_decides_which_tokens_are_valid() {
    let server = DevServer::builder()
        .arg("--jwt-secret", "s3cret")
        .start()
        .await;
    // The harness mints with the configured secret.
    let alice = server.client("alice").await;
    assert_eq!(alice.ready["user"], "alice");
    let stale = mint_with_secret(
        "dev-secret",
        &json!({"sub": "alice", "wsp": "demo", "exp": now_s() + 3600}),
    );
    let mut client = server.connect().await;
    client
        .send_json(&json!({"op": "hello", "token": stale}))
        .await;
    client.expect_close(4001).await;
}

// ---- 4002 ----

#[tokio::test]
async fn no_hello_within_the_hello_timeout_closes_with_4002() {
    let server = DevServer::builder()
        .arg("--hello-timeout-ms", "500")
        .start()
        .await;
    let mut client = server.connect().await;
    client.expect_close(4002).await;
}

#[tokio::test]
async fn a_hello_in_time_is_not_closed_by_the_hello_timeout() {
    let server = DevServer::builder()
        .arg("--hello-timeout-ms", "500")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    alice.assert_alive().await;
}

// ---- 4003 ----

#[tokio::test]
async fn more_than_20_bad_requests_in_10_s_close_with_4003() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    for i in 0..20 {
        let error = alice.request(json!({"op": "no-such-op", "id": i})).await;
        assert_eq!(error["code"], "bad_request", "{error}");
    }
    // Twenty are tolerated.
    alice.assert_alive().await;
    alice.send_text("not json at all").await;
    alice.expect_close(4003).await;
}

#[tokio::test]
async fn errors_other_than_bad_request_do_not_count_as_abuse() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut carol = server.client("carol").await;
    for _ in 0..15 {
        carol
            .request_error("not_found", json!({"op": "history", "channel": "nowhere"}))
            .await;
        carol
            .request_error(
                "forbidden",
                json!({"op": "send", "channel": GENERAL, "text": "let me in"}),
            )
            .await;
    }
    carol.assert_alive().await;
}

#[tokio::test]
async fn a_client_that_keeps_sending_past_its_rate_is_closed_with_4003() {
    let server = DevServer::builder().arg("--client-rate", "2").start().await;
    let mut alice = server.client("alice").await;
    // A burst of 4 passes; each further frame is answered rate_limited, and a refused frame
    // counts as abuse like a bad_request: the 21st within 10 s closes the connection.
    for i in 0..30 {
        alice.send_json(&json!({"op": "ping", "id": i})).await;
    }
    let before = alice.expect_close(4003).await;
    let limited = before
        .iter()
        .filter(|f| f["op"] == "error" && f["code"] == "rate_limited")
        .count();
    assert!(
        limited >= 20,
        "closed after {limited} rate_limited answers: {before:?}"
    );
}

// ---- 4004 ----

#[tokio::test]
async fn a_valid_token_for_an_unknown_workspace_closes_with_4004() {
    let server = DevServer::start().await;
    let token = server.token_in("atlantis", "alice");
    let mut client = server.connect().await;
    client
        .send_json(&json!({"op": "hello", "token": token}))
        .await;
    client.expect_close(4004).await;
}

// ---- 4008 ----

/// Sends `count` messages of `text` from `client` to general, one at a time, dropping the
/// client's own copies as they come; returns how many were sent.
async fn flood(client: &mut Client, text: &str, count: u64) -> u64 {
    for _ in 0..count {
        client.send_message(GENERAL, text).await;
        client.discard_pending();
    }
    count
}

/// A server whose session queues hold only 8 events, so that a client that stops reading
/// overflows its queue after a few large messages.
async fn slow_consumer_server() -> DevServer {
    DevServer::builder()
        .arg("--queue-events", "8")
        .arg("--client-rate", "1000")
        .arg("--max-text-bytes", "60000")
        .start()
        .await
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_4008_without_slowing_others() {
    let server = slow_consumer_server().await;
    // alice reads her ready and then never reads again; her socket buffer is tiny so that the
    // server's writes to her block early.
    let mut alice = server.connect_with_small_receive_buffer().await;
    alice.hello(&server.token("alice"), None).await;

    let mut bob = server.client("bob").await;

    // carol is a member who reads everything, on her own task: she must get every message in
    // order however slow alice is, and ends when she sees "done".
    let mut carol = server.client("carol").await;
    carol
        .request_op("ack", json!({"op": "join", "channel": GENERAL}))
        .await;
    let carol_task = tokio::spawn(async move {
        let mut seqs = Vec::new();
        loop {
            match carol.read(Duration::from_secs(60)).await {
                Incoming::Json(frame) if frame["type"] == "message" => {
                    seqs.push(frame["seq"].as_u64().expect("seq"));
                    if frame["text"] == "done" {
                        return Ok(seqs);
                    }
                }
                Incoming::Json(_) => {}
                other => return Err(format!("carol's connection failed: {other:?}")),
            }
        }
    });

    // Flood with large texts: 300 × 55 kB is far beyond what the TCP buffers absorb. The
    // first 60 overflow alice's 8-event queue; she then looks for her close while the rest
    // goes on, since the server drops a closed session's socket 5 s after its close frame
    // whether or not the client read it (and with a store that fsyncs every append, the
    // whole flood takes longer than that).
    let text = "f".repeat(55_000);
    flood(&mut bob, &text, 60).await;
    let flooder = tokio::spawn(async move {
        let sent = 60 + flood(&mut bob, &text, 240).await;
        let done = bob.send_message(GENERAL, "done").await;
        (sent, done)
    });

    // alice finds, after what was already in flight, a close with 4008; what she got before
    // it is in strictly increasing seq.
    let before = alice
        .expect_close_within(4008, Duration::from_secs(60))
        .await;
    let (sent, done) = flooder.await.expect("bob's flood");
    let seen: Vec<u64> = before
        .iter()
        .filter(|f| f["type"] == "message")
        .filter_map(|f| f["seq"].as_u64())
        .collect();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "alice's messages out of order"
    );

    // Reconnecting with resume, she learns what she missed: more than her queue holds, so
    // she is told to read history.
    let last_seen = seen.last().copied().unwrap_or(2);
    let mut alice = server
        .client_resuming("alice", json!({ GENERAL: last_seen }))
        .await;
    let resync = alice.next_event("resync", WAIT).await;
    assert_eq!(resync["channel"], GENERAL);

    // carol was never dropped and got every message, in order.
    let seqs = match tokio::time::timeout(Duration::from_secs(120), carol_task).await {
        Ok(Ok(Ok(seqs))) => seqs,
        Ok(Ok(Err(e))) => panic!("{e}"),
        Ok(Err(e)) => panic!("carol's task failed: {e}"),
        Err(_) => panic!("carol did not receive the last message"),
    };
    let last = done["seq"].as_u64().expect("seq");
    let first = last - sent;
    assert_eq!(seqs, (first..=last).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_client_that_never_reads_again_is_dropped_and_goes_offline() {
    let server = slow_consumer_server().await;
    let mut alice = server.connect_with_small_receive_buffer().await;
    alice.hello(&server.token("alice"), None).await;
    let mut bob = server.client("bob").await;
    flood(&mut bob, &"f".repeat(55_000), 300).await;

    // alice's queue overflowed long ago. While she still reads nothing, the server must have
    // dropped her session: she is offline and no longer counted as a connection.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let presence = server
            .http_as("bob")
            .get("/v1/presence?users=alice")
            .await
            .expect_status(200);
        if presence["users"]["alice"] == "offline" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice's overflowed session is still online while she does not read: {presence}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(alice);
}

/// How many sockets process `pid` has open.
fn open_sockets(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

#[tokio::test]
async fn the_socket_of_a_client_that_never_reads_again_is_closed_by_the_server() {
    let server = slow_consumer_server().await;
    let mut bob = server.client("bob").await;
    let mut alice = server.connect_with_small_receive_buffer().await;
    alice.hello(&server.token("alice"), None).await;
    let with_alice = open_sockets(server.pid());
    flood(&mut bob, &"f".repeat(55_000), 300).await;

    // alice's queue overflowed: the close frame cannot reach her either, as she reads nothing.
    // The server gives up on her socket after a grace period instead of holding it (and its
    // buffers) for as long as she stays connected. Her client has not closed anything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while open_sockets(server.pid()) >= with_alice {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server still holds the socket of a client that stopped reading"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(alice);
}
