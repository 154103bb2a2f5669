//! Hostile input (SPEC §4 errors, limits and guarantees): malformed frames, binary frames,
//! oversize frames and texts, floods and idle connections each get the SPEC answer, while
//! bystanders connected to the same server keep exchanging messages normally.

mod common;

use std::time::Duration;

use common::{Client, DevServer, Incoming, GENERAL, WAIT};
use serde_json::json;

/// Two users who keep talking in `general`: bob sends, dave receives.
struct Bystanders {
    bob: Client,
    dave: Client,
    round: u32,
}

impl Bystanders {
    async fn join(server: &DevServer) -> Bystanders {
        let bob = server.client("bob").await;
        let mut dave = server.client("dave").await;
        dave.request_op("ack", json!({"op": "join", "channel": GENERAL}))
            .await;
        Bystanders {
            bob,
            dave,
            round: 0,
        }
    }

    /// One message from bob that dave receives with the acked seq.
    async fn exchange(&mut self) {
        self.round += 1;
        let text = format!("bystander round {}", self.round);
        let ack = self.bob.send_message(GENERAL, &text).await;
        let event = self
            .dave
            .next_event_where("message", |e| e["text"] == text.as_str(), WAIT)
            .await;
        assert_eq!(event["seq"], ack["seq"], "bystander message {text}");
        // Keep their buffers small; attackers' messages may land there too.
        self.bob.discard_pending();
        self.dave.discard_pending();
    }
}

async fn expect_error(client: &mut Client, code: &str) {
    loop {
        let frame = client.next_frame().await;
        if frame["op"] == "event" {
            continue;
        }
        assert_eq!(frame["op"], "error", "{frame}");
        assert_eq!(frame["code"], code, "{frame}");
        return;
    }
}

#[tokio::test]
async fn malformed_frames_get_bad_request_while_others_keep_talking() {
    let server = DevServer::start().await;
    let mut bystanders = Bystanders::join(&server).await;
    let mut attacker = server.client("alice").await;

    attacker.send_text("}{ not json").await;
    expect_error(&mut attacker, "bad_request").await;
    bystanders.exchange().await;

    attacker.send_binary(vec![0xff, 0x00, 0x13, 0x37]).await;
    expect_error(&mut attacker, "bad_request").await;
    bystanders.exchange().await;

    attacker
        .request_error(
            "bad_request",
            json!({"op": "send", "channel": ["general"], "text": {}}),
        )
        .await;
    bystanders.exchange().await;

    attacker
        .request_error("bad_request", json!({"op": "format_disk"}))
        .await;
    bystanders.exchange().await;

    attacker
        .request_error("bad_request", json!({"channel": GENERAL, "text": "no op"}))
        .await;
    bystanders.exchange().await;

    // Deeply nested JSON is refused, not a crash.
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    attacker.send_text(nested).await;
    expect_error(&mut attacker, "bad_request").await;
    bystanders.exchange().await;

    attacker.assert_alive().await;
}

#[tokio::test]
async fn oversize_texts_get_too_large_while_others_keep_talking() {
    let server = DevServer::start().await;
    let mut bystanders = Bystanders::join(&server).await;
    let mut attacker = server.client("alice").await;
    for _ in 0..3 {
        attacker
            .request_error(
                "too_large",
                json!({"op": "send", "channel": GENERAL, "text": "x".repeat(40_000)}),
            )
            .await;
        bystanders.exchange().await;
    }
    attacker.assert_alive().await;
}

#[tokio::test]
async fn an_oversize_frame_closes_only_its_own_connection() {
    let server = DevServer::builder()
        .arg("--max-frame-bytes", "4096")
        .start()
        .await;
    let mut bystanders = Bystanders::join(&server).await;
    // The attacker's other session is a bystander too: the close is per connection.
    let mut attacker_phone = server.client("alice").await;
    let mut attacker = server.client("alice").await;
    attacker.send_text("y".repeat(100_000)).await;
    attacker.expect_close(1009).await;
    bystanders.exchange().await;
    attacker_phone
        .send_message(GENERAL, "phone still works")
        .await;
}

#[tokio::test]
async fn a_bad_request_flood_closes_only_the_abuser() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut bystanders = Bystanders::join(&server).await;
    let mut attacker = server.client("alice").await;
    for _ in 0..30 {
        attacker.send_text("garbage").await;
    }
    attacker.expect_close(4003).await;
    bystanders.exchange().await;
    // The abuser may come back with a new connection.
    let mut again = server.client("alice").await;
    again.assert_alive().await;
}

#[tokio::test]
async fn a_frame_flood_is_rate_limited_then_closed_with_4003_without_slowing_others() {
    let server = DevServer::start().await;
    let mut bystanders = Bystanders::join(&server).await;
    let mut attacker = server.client("alice").await;
    // 400 frames at once against the default 20/s with bursts of 40.
    for i in 0..400 {
        attacker
            .send_json(&json!({"op": "send", "id": i, "channel": GENERAL, "text": "spam"}))
            .await;
        if i % 100 == 0 {
            bystanders.exchange().await;
        }
    }
    bystanders.exchange().await;
    // The burst is served, the rest is answered rate_limited, and a client that keeps
    // sending past its rate is abusive: 4003 instead of being answered forever.
    let before = attacker.expect_close(4003).await;
    let mut acked = 0;
    let mut limited = 0;
    for frame in &before {
        match frame["op"].as_str() {
            Some("event") => {}
            Some("ack") => acked += 1,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                assert!(frame["retry_after_ms"].is_u64(), "{frame}");
                limited += 1;
            }
            _ => panic!("unexpected reply {frame}"),
        }
    }
    assert!(acked > 0, "nothing of the flood was served");
    assert!(
        limited > 0,
        "the flood was never rate limited ({acked} acks)"
    );
    bystanders.exchange().await;
    // The attacker may come back, within its rate.
    let mut again = server.client("alice").await;
    again.assert_alive().await;
}

#[tokio::test]
async fn a_message_flood_from_one_member_does_not_starve_another() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut bystanders = Bystanders::join(&server).await;
    let mut flooder = server.client("alice").await;
    for round in 0..5 {
        for i in 0..100 {
            flooder
                .send_json(&json!({"op": "send", "id": round * 1000 + i, "channel": GENERAL, "text": "flood"}))
                .await;
        }
        bystanders.exchange().await;
    }
    for round in 0..5 {
        for i in 0..100 {
            let reply = flooder.reply_to(&json!(round * 1000 + i)).await;
            assert_eq!(reply["op"], "ack", "{reply}");
        }
    }
}

#[tokio::test]
async fn connections_that_never_say_hello_are_closed_while_others_keep_talking() {
    let server = DevServer::builder()
        .arg("--hello-timeout-ms", "500")
        .start()
        .await;
    let mut bystanders = Bystanders::join(&server).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(server.connect().await);
    }
    bystanders.exchange().await;
    for client in &mut idle {
        client.expect_close(4002).await;
    }
    bystanders.exchange().await;
}

#[tokio::test]
async fn requests_before_hello_do_not_open_a_session() {
    let server = DevServer::start().await;
    let mut bystanders = Bystanders::join(&server).await;
    let mut stranger = server.connect().await;
    stranger
        .send_json(&json!({"op": "send", "channel": GENERAL, "text": "sneaky"}))
        .await;
    stranger
        .send_json(&json!({"op": "history", "id": 1, "channel": GENERAL}))
        .await;
    // Whatever the answer (an error or a close), it is never an ack or a page of history.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stranger.read(left).await {
            Incoming::Json(frame) => assert!(
                frame["op"] == "error",
                "a request before hello was served: {frame}"
            ),
            Incoming::Close(..) | Incoming::Ended(_) | Incoming::Timeout => break,
            Incoming::Binary(_) => panic!("binary frame from the server"),
        }
    }
    bystanders.exchange().await;
    let page = bystanders
        .bob
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    assert!(
        page["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .all(|m| m["text"] != "sneaky"),
        "a send before hello was stored: {page}"
    );
}

#[tokio::test]
async fn an_http_body_that_trickles_in_is_answered_408_and_cut_off_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = DevServer::builder()
        .arg("--http-body-timeout-ms", "2000")
        .start()
        .await;
    let stream = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST /v1/channels/{GENERAL}/messages HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n",
        server.token("alice")
    );
    write.write_all(head.as_bytes()).await.expect("write head");
    // One byte of the announced 1000 per second, for as long as the server listens.
    let trickle = tokio::spawn(async move {
        for _ in 0..1000 {
            if write.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    // Meanwhile the server serves everyone else.
    let mut bystanders = Bystanders::join(&server).await;
    bystanders.exchange().await;
    assert_eq!(server.anon().get("/healthz").await.status, 200);

    // The slow request is answered 408 and its connection closed, well before its body
    // could have arrived.
    let mut response = Vec::new();
    let ended = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    trickle.abort();
    let text = String::from_utf8_lossy(&response).into_owned();
    assert!(ended.is_ok(), "the connection stayed open; got {text:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(text.contains(r#""code":"bad_request""#), "{text:?}");
    bystanders.exchange().await;
}
