//! Batched frames (SPEC §4, `GET /v1/ws?batch=1`): when several server frames are ready at
//! once for a session that asked for it, they go out as one JSON array in one text frame, in
//! the order of delivery; a frame alone goes out as itself, and a session that did not ask
//! never gets an array.

mod common;

use common::{Client, DevServer, Incoming, GENERAL};
use serde_json::Value;
use std::time::Duration;

/// Messages of the flood, and their text's size: 600 × 16,000 bytes is over twice what the
/// kernel's socket buffers can hold for a client that stopped reading (a send buffer is at
/// most 4 MiB here), so most of it waits in the session's queue, which the server is told
/// to make large enough for all of it.
const FLOOD: usize = 600;
const FLOOD_TEXT: usize = 16_000;

async fn lagging_server() -> DevServer {
    DevServer::builder()
        .arg("--client-rate", "1000")
        .arg("--queue-bytes", &(64 << 20).to_string())
        .start()
        .await
}

/// `bob` sends `count` messages to general, each acked before the next; returns their seqs.
async fn flood(bob: &mut Client, count: usize) -> Vec<u64> {
    let text = "b".repeat(FLOOD_TEXT);
    let mut seqs = Vec::with_capacity(count);
    for _ in 0..count {
        let ack = bob.send_message(GENERAL, &text).await;
        seqs.push(ack["seq"].as_u64().expect("ack seq"));
        bob.discard_pending();
    }
    seqs
}

/// Reads whole text frames until `count` message events arrived; returns the frames as they
/// came (objects and arrays).
async fn read_messages(client: &mut Client, count: usize) -> Vec<Value> {
    let mut frames = Vec::new();
    let mut messages = 0;
    while messages < count {
        match client.read(Duration::from_secs(60)).await {
            Incoming::Json(frame) => {
                messages += elements(&frame).filter(|f| f["type"] == "message").count();
                frames.push(frame);
            }
            other => panic!("after {messages} of {count} messages: {other:?}"),
        }
    }
    frames
}

/// The server frames a text frame holds: itself, or the elements of a batch.
fn elements(frame: &Value) -> Box<dyn Iterator<Item = &Value> + '_> {
    match frame.as_array() {
        Some(batch) => Box::new(batch.iter()),
        None => Box::new(std::iter::once(frame)),
    }
}

fn message_seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .flat_map(elements)
        .filter(|f| f["type"] == "message")
        .map(|f| f["seq"].as_u64().expect("message seq"))
        .collect()
}

#[tokio::test]
async fn a_batch_client_that_stopped_reading_gets_arrays_holding_every_event_once_in_order() {
    let server = lagging_server().await;
    // alice asks for batches, reads her ready, and then reads nothing while bob floods.
    let mut alice = server.connect_with_query("batch=1", true).await;
    alice.hello(&server.token("alice"), None).await;
    let mut bob = server.client("bob").await;
    let seqs = flood(&mut bob, FLOOD).await;

    let frames = read_messages(&mut alice, FLOOD).await;
    assert_eq!(message_seqs(&frames), seqs, "every event once, in order");
    let batches: Vec<&Vec<Value>> = frames.iter().filter_map(Value::as_array).collect();
    assert!(
        !batches.is_empty(),
        "what piled up while alice did not read came as arrays"
    );
    assert!(
        batches.iter().all(|b| b.len() >= 2),
        "an array holds several frames; a lone frame goes as itself"
    );
    assert!(
        batches
            .iter()
            .flat_map(|b| b.iter())
            .all(|f| f["op"] == "event"),
        "each element is a whole server frame"
    );
    assert!(
        frames.len() < FLOOD,
        "fewer WebSocket frames ({}) than events ({FLOOD})",
        frames.len()
    );
    // The session goes on as usual after a batch.
    alice.assert_alive().await;
}

#[tokio::test]
async fn a_client_without_batch_never_gets_an_array_even_when_it_lagged() {
    let server = lagging_server().await;
    let mut alice = server.connect_with_small_receive_buffer().await;
    alice.hello(&server.token("alice"), None).await;
    let mut bob = server.client("bob").await;
    let seqs = flood(&mut bob, FLOOD).await;

    let frames = read_messages(&mut alice, FLOOD).await;
    assert!(
        frames.iter().all(Value::is_object),
        "every frame is one JSON object"
    );
    assert_eq!(message_seqs(&frames), seqs);
}

#[tokio::test]
async fn with_batch_a_frame_ready_alone_goes_out_as_a_plain_object() {
    let server = DevServer::start().await;
    let mut alice = server.connect_with_query("batch=1", false).await;
    let ready = alice.hello(&server.token("alice"), None).await;
    assert_eq!(ready["op"], "ready", "ready is a frame of its own");
    // A request's reply, alone in the queue, is an object.
    let pong = alice.request(serde_json::json!({"op": "ping"})).await;
    assert_eq!(pong["op"], "pong");

    let mut bob = server.client("bob").await;
    let ack = bob.send_message(GENERAL, "just one").await;
    match alice.read(common::WAIT).await {
        Incoming::Json(frame) => {
            assert!(frame.is_object(), "a lone event is not wrapped: {frame}");
            assert_eq!(frame["type"], "message");
            assert_eq!(frame["seq"], ack["seq"]);
        }
        other => panic!("expected the event, got {other:?}"),
    }
}

#[tokio::test]
async fn batch_with_another_value_is_not_asked_for() {
    let server = lagging_server().await;
    let mut alice = server.connect_with_query("batch=0&x=1", true).await;
    alice.hello(&server.token("alice"), None).await;
    let mut bob = server.client("bob").await;
    let seqs = flood(&mut bob, 300).await;
    let frames = read_messages(&mut alice, 300).await;
    assert!(frames.iter().all(Value::is_object));
    assert_eq!(message_seqs(&frames), seqs);
}
