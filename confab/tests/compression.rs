//! permessage-deflate on client WebSockets (SPEC §4, RFC 7692), with a client that does its
//! own framing ([`common::raw`]): the gateway accepts the extension with
//! `server_no_context_takeover`, its compressed events inflate to exactly what a plain client
//! gets, the 1009 limit applies after inflation (a compression bomb gets 1009, not memory),
//! and clients that did not negotiate the extension see nothing of it.

mod common;

use common::raw::{deflate, RawClient};
use common::{DevServer, Incoming, GENERAL, WAIT};
use serde_json::{json, Value};
use std::time::Duration;

/// What browsers offer.
const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A chat text of about `len` bytes of words: compressible as real chat is, not as a run of
/// one letter.
fn chat_text(len: usize, seed: u64) -> String {
    const WORDS: [&str; 24] = [
        "the",
        "meeting",
        "is",
        "moved",
        "to",
        "thursday",
        "because",
        "half",
        "of",
        "team",
        "will",
        "be",
        "at",
        "conference",
        "please",
        "review",
        "draft",
        "before",
        "then",
        "and",
        "send",
        "comments",
        "on",
        "slides",
    ];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut text = String::new();
    while text.len() < len {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
        text.push(' ');
    }
    text.truncate(len);
    text
}

/// Letters and digits from a generator: deflate gains only a quarter on them.
fn noisy_text(len: usize, seed: u64) -> String {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ALNUM[(state % ALNUM.len() as u64) as usize] as char
        })
        .collect()
}

async fn deflate_client(server: &DevServer, query: &str, small_buffer: bool) -> RawClient {
    RawClient::connect(server.addr(), query, Some(BROWSER_OFFER), small_buffer).await
}

/// The server's peak RSS in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn the_extension_is_accepted_with_no_context_takeover_and_events_inflate_intact() {
    let server = DevServer::start().await;
    let mut alice = deflate_client(&server, "", false).await;
    let answer = alice
        .extensions
        .clone()
        .expect("permessage-deflate accepted");
    assert!(answer.starts_with("permessage-deflate"), "{answer}");
    assert!(answer.contains("server_no_context_takeover"), "{answer}");
    assert!(answer.contains("client_no_context_takeover"), "{answer}");
    alice.hello(&server.token("alice")).await;
    // carol reads the same events without the extension.
    let mut carol = server.client("carol").await;
    carol
        .request_op("ack", json!({"op": "join", "channel": GENERAL}))
        .await;
    let mut bob = server.client("bob").await;

    let texts: Vec<String> = (0..20).map(|i| chat_text(1024, i)).collect();
    for text in &texts {
        bob.send_message(GENERAL, text).await;
    }
    let mut got = Vec::new();
    while got.len() < texts.len() {
        match alice.read(WAIT).await {
            Incoming::Json(frame) if frame["type"] == "message" => got.push(frame),
            Incoming::Json(_) => {}
            other => panic!("alice: {other:?}"),
        }
    }
    let mut plain = Vec::new();
    while plain.len() < texts.len() {
        plain.push(carol.next_event("message", WAIT).await);
    }
    assert_eq!(got, plain, "the same events, field for field");
    assert_eq!(
        got.iter()
            .map(|f| f["text"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        texts
    );
    assert!(
        alice.compressed_texts >= texts.len() as u64,
        "1 KiB events went compressed ({} of {})",
        alice.compressed_texts,
        alice.texts
    );
    let text_bytes: usize = texts.iter().map(String::len).sum();
    assert!(
        alice.wire_bytes < text_bytes as u64 / 2,
        "{} bytes on the wire for {text_bytes} bytes of texts",
        alice.wire_bytes
    );

    // Her own frames may be compressed too: a compressed send is acked and delivered.
    let send = json!({"op": "send", "id": 1, "channel": GENERAL, "text": chat_text(2000, 99)});
    alice.send_compressed(send.to_string().as_bytes()).await;
    let mut acked = false;
    let mut echoed = false;
    while !(acked && echoed) {
        match alice.read(WAIT).await {
            Incoming::Json(frame) if frame["op"] == "ack" => acked = frame["id"] == 1,
            Incoming::Json(frame) if frame["type"] == "message" => {
                echoed = frame["text"] == send["text"];
            }
            Incoming::Json(_) => {}
            other => panic!("alice: {other:?}"),
        }
    }
    // And a plain frame on the same connection still works.
    alice.send_text(r#"{"op":"ping","id":2}"#).await;
    match alice.read(WAIT).await {
        Incoming::Json(pong) => assert_eq!(pong, json!({"op": "pong", "id": 2})),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_compressed_frame_over_the_limit_once_inflated_closes_with_1009() {
    let server = DevServer::builder()
        .arg("--max-frame-bytes", "4096")
        .start()
        .await;
    let mut alice = deflate_client(&server, "", false).await;
    alice.hello(&server.token("alice")).await;
    // Within the limit as sent, over it inflated.
    let send = json!({"op": "send", "channel": GENERAL, "text": chat_text(12_000, 1)}).to_string();
    assert!(deflate(send.as_bytes()).len() < 4096);
    alice.send_compressed(send.as_bytes()).await;
    alice.expect_close(1009).await;

    // The same text just under the limit inflated is fine.
    let mut bob = deflate_client(&server, "", false).await;
    bob.hello(&server.token("bob")).await;
    let send = json!({"op": "send", "id": 5, "channel": GENERAL, "text": chat_text(3500, 2)});
    bob.send_compressed(send.to_string().as_bytes()).await;
    loop {
        match bob.read(WAIT).await {
            Incoming::Json(frame) if frame["op"] == "ack" => break,
            Incoming::Json(_) => {}
            other => panic!("bob: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_compression_bomb_gets_1009_without_the_server_growing() {
    let server = DevServer::start().await;
    // 48 MiB of one byte compress to about 48 KiB: within the 64 KiB frame limit as sent.
    let bomb = deflate(&vec![b' '; 48 << 20]);
    assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
    let before = peak_rss_kib(server.pid());
    for _ in 0..5 {
        let mut attacker = deflate_client(&server, "", false).await;
        attacker.hello(&server.token("mallory")).await;
        attacker.send_frame(0x81 | 0x40, &bomb).await;
        attacker.expect_close(1009).await;
    }
    // Also before hello: the limit holds for every frame.
    let mut attacker = deflate_client(&server, "", false).await;
    attacker.send_frame(0x81 | 0x40, &bomb).await;
    attacker.expect_close(1009).await;
    let grown_mib = peak_rss_kib(server.pid()).saturating_sub(before) / 1024;
    assert!(
        grown_mib < 16,
        "peak RSS grew by {grown_mib} MiB for bombs of 48 MiB each"
    );
    // Others are unaffected.
    let mut bob = server.client("bob").await;
    bob.send_message(GENERAL, "still here").await;
}

#[tokio::test]
async fn a_frame_declaring_more_than_the_limit_closes_with_1009_before_its_payload() {
    let server = DevServer::start().await;
    for extensions in [None, Some(BROWSER_OFFER)] {
        let mut attacker = RawClient::connect(server.addr(), "", extensions, false).await;
        attacker.hello(&server.token("mallory")).await;
        // A gigabyte announced, none of it sent: the limit is checked on the header.
        attacker.send_header_only(0x81, 1 << 30).await;
        attacker.expect_close(1009).await;
    }
}

#[tokio::test]
async fn clients_without_the_extension_get_plain_frames_and_rsv1_is_refused() {
    let server = DevServer::start().await;
    let mut alice = RawClient::connect(server.addr(), "", None, false).await;
    assert_eq!(alice.extensions, None, "nothing offered, nothing answered");
    alice.hello(&server.token("alice")).await;
    let mut bob = server.client("bob").await;
    let text = chat_text(4000, 7);
    bob.send_message(GENERAL, &text).await;
    loop {
        match alice.read(WAIT).await {
            Incoming::Json(frame) if frame["type"] == "message" => {
                assert_eq!(frame["text"], text.as_str());
                break;
            }
            Incoming::Json(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(alice.compressed_texts, 0);
    // A compressed frame on a connection that did not negotiate it ends the connection.
    alice.send_compressed(br#"{"op":"ping","id":1}"#).await;
    match alice.read(WAIT).await {
        Incoming::Close(..) | Incoming::Ended(_) => {}
        other => panic!("expected the connection to end, got {other:?}"),
    }

    // An offer the gateway cannot honour (a smaller server window) is declined, not failed.
    let mut carol = RawClient::connect(
        server.addr(),
        "",
        Some("permessage-deflate; server_max_window_bits=10"),
        false,
    )
    .await;
    assert_eq!(carol.extensions, None);
    carol.hello(&server.token("carol")).await;
}

#[tokio::test]
async fn compressed_batches_inflate_to_arrays_holding_every_event_once_in_order() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .arg("--queue-bytes", &(64 << 20).to_string())
        .start()
        .await;
    // alice asks for batches and compression, then stops reading during the flood. The texts
    // compress by only a quarter, so 600 of them are over twice what the kernel buffers hold.
    let mut alice = deflate_client(&server, "batch=1", true).await;
    alice.hello(&server.token("alice")).await;
    let mut bob = server.client("bob").await;
    let mut seqs = Vec::new();
    for i in 0..600 {
        let ack = bob.send_message(GENERAL, &noisy_text(16_000, i)).await;
        seqs.push(ack["seq"].as_u64().expect("seq"));
        bob.discard_pending();
    }
    let mut got = Vec::new();
    let mut arrays = 0;
    while got.len() < seqs.len() {
        match alice.read(Duration::from_secs(60)).await {
            Incoming::Json(Value::Array(batch)) => {
                arrays += 1;
                assert!(batch.len() >= 2);
                got.extend(
                    batch
                        .iter()
                        .filter(|f| f["type"] == "message")
                        .map(|f| f["seq"].as_u64()),
                );
            }
            Incoming::Json(frame) if frame["type"] == "message" => got.push(frame["seq"].as_u64()),
            Incoming::Json(_) => {}
            other => panic!("after {} events: {other:?}", got.len()),
        }
    }
    assert_eq!(got, seqs.into_iter().map(Some).collect::<Vec<_>>());
    assert!(arrays > 0, "what piled up came as arrays");
    assert!(
        alice.compressed_texts > 0,
        "compressed frames ({} of {})",
        alice.compressed_texts,
        alice.texts
    );
}
