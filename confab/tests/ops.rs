//! SPEC §4, requests after ready and the events they cause: `send`, `edit`, `delete`, `typing`,
//! `history`, `join`/`leave`, `read`, `presence_sub`, `ping`, and `channel_added`.

mod common;

use std::time::Duration;

use common::{now_ms, DevServer, GENERAL, QUIET, WAIT};
use serde_json::{json, Value};

fn seq(frame: &Value) -> u64 {
    frame["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("frame without a numeric seq: {frame}"))
}

fn history_seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("history without messages: {page}"))
        .iter()
        .map(seq)
        .collect()
}

// ---- send ----

#[tokio::test]
async fn send_is_acked_with_the_next_seq_and_a_server_timestamp() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let before = now_ms();
    let ack = alice
        .request(json!({"op": "send", "id": "s-1", "channel": GENERAL, "text": "hi"}))
        .await;
    let after = now_ms();
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["id"], "s-1");
    assert_eq!(ack["channel"], GENERAL);
    // The seeded log holds seqs 1 and 2.
    assert_eq!(ack["seq"], 3);
    let ts = ack["ts"].as_u64().expect("numeric ts");
    // Unix milliseconds, give or take clock granularity; a minute of slack either side.
    assert!(
        ts + 60_000 >= before && ts <= after + 60_000,
        "ts {ts} is not Unix milliseconds near {before}..{after}"
    );

    let next = alice
        .request(json!({"op": "send", "id": 77, "channel": GENERAL, "text": "again"}))
        .await;
    assert_eq!(next["id"], 77);
    assert_eq!(next["seq"], 4);
}

#[tokio::test]
async fn a_message_reaches_every_member_session_including_the_senders_own() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    let mut bob = server.client("bob").await;

    let ack = alice.send_message(GENERAL, "hello everyone").await;
    let expected = json!({
        "op": "event", "type": "message", "channel": GENERAL,
        "seq": ack["seq"], "ts": ack["ts"], "user": "alice", "text": "hello everyone",
        "client_msg_id": null, "thread": null,
    });
    for client in [&mut alice, &mut alice_phone, &mut bob] {
        let event = client.next_event("message", WAIT).await;
        assert_eq!(event, expected);
    }
}

#[tokio::test]
async fn the_events_of_a_public_channel_reach_its_members_only() {
    let server = DevServer::start().await;
    let mut carol = server.client("carol").await;
    let mut alice = server.client("alice").await;
    alice.send_message(GENERAL, "members only").await;
    alice
        .send_json(&json!({"op": "typing", "channel": GENERAL}))
        .await;
    let mut bob = server.client("bob").await;
    bob.request_op("ack", json!({"op": "leave", "channel": GENERAL}))
        .await;
    alice.next_event("member_left", WAIT).await;
    // carol, not a member, heard none of it.
    carol.expect_no_frame(QUIET).await;
}

#[tokio::test]
async fn seqs_are_consecutive_and_each_session_sees_them_in_order() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    // Pipeline the sends so that the server handles many at once.
    for i in 0..30 {
        alice
            .send_json(&json!({"op": "send", "id": i, "channel": GENERAL, "text": format!("m{i}")}))
            .await;
    }
    let mut acked = Vec::new();
    for i in 0..30 {
        let ack = alice.reply_to(&json!(i)).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        acked.push(seq(&ack));
    }
    acked.sort_unstable();
    assert_eq!(acked, (3..=32).collect::<Vec<u64>>(), "no gap and no reuse");

    let mut seen = Vec::new();
    while seen.len() < 30 {
        seen.push(seq(&bob.next_event("message", WAIT).await));
    }
    assert_eq!(
        seen,
        (3..=32).collect::<Vec<u64>>(),
        "bob saw them out of order"
    );
}

/// Pipelines `count` sends on `client` and reads until every one is acked, checking that each
/// ack arrives after the `message` event with its seq on the same connection. Returns the
/// acked seqs.
async fn send_checking_each_ack_follows_its_echo(
    client: &mut common::Client,
    tag: &str,
    count: usize,
) -> Vec<u64> {
    for i in 0..count {
        client
            .send_json(&json!({"op": "send", "id": format!("{tag}-{i}"), "channel": GENERAL, "text": format!("{tag} {i}")}))
            .await;
    }
    let mut echoed = std::collections::HashSet::new();
    let mut acked = Vec::new();
    while acked.len() < count {
        let frame = client.next_frame().await;
        match frame["op"].as_str() {
            Some("event") if frame["type"] == "message" => {
                echoed.insert(seq(&frame));
            }
            Some("event") => {}
            Some("ack") => {
                let acked_seq = seq(&frame);
                assert!(
                    frame["id"].as_str().is_some_and(|id| id.starts_with(tag)),
                    "{tag}: an ack of another connection's request: {frame}"
                );
                assert!(
                    echoed.contains(&acked_seq),
                    "{tag}: the ack {frame} arrived before the echo of its message \
                     ({} acks and {} echoes before it)",
                    acked.len(),
                    echoed.len()
                );
                acked.push(acked_seq);
            }
            _ => panic!("{tag}: unexpected frame {frame}"),
        }
    }
    acked
}

#[tokio::test]
async fn every_ack_of_a_send_arrives_after_the_echo_of_its_message() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .start()
        .await;
    // Three connections of two users, all members of the channel, pipelining their sends at
    // once: each hears the others' messages as well as its own echoes.
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    let mut bob = server.client("bob").await;
    const SENDS: usize = 300;
    let (a, p, b) = tokio::join!(
        send_checking_each_ack_follows_its_echo(&mut alice, "alice", SENDS),
        send_checking_each_ack_follows_its_echo(&mut alice_phone, "phone", SENDS),
        send_checking_each_ack_follows_its_echo(&mut bob, "bob", SENDS),
    );
    let mut all: Vec<u64> = a.into_iter().chain(p).chain(b).collect();
    all.sort_unstable();
    // The seeded log holds seqs 1 and 2.
    let expected: Vec<u64> = (3..3 + 3 * SENDS as u64).collect();
    assert_eq!(all, expected, "every send acked once, with no gap");
}

#[tokio::test]
async fn repeating_a_client_msg_id_returns_the_first_ack_and_stores_nothing() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    let mut bob = server.client("bob").await;

    let first = alice
        .request_op(
            "ack",
            json!({"op": "send", "channel": GENERAL, "text": "once", "client_msg_id": "cm-1"}),
        )
        .await;
    let event = bob.next_event("message", WAIT).await;
    assert_eq!(event["client_msg_id"], "cm-1");

    // The retry may come from another session of the same user and even differ in text.
    let retry = alice_phone
        .request_op(
            "ack",
            json!({"op": "send", "channel": GENERAL, "text": "twice", "client_msg_id": "cm-1"}),
        )
        .await;
    assert_eq!(retry["seq"], first["seq"]);
    assert_eq!(retry["ts"], first["ts"]);
    bob.expect_no_event("message", QUIET).await;

    // The seq was not consumed by the retry.
    let next = alice.send_message(GENERAL, "next").await;
    assert_eq!(seq(&next), seq(&first) + 1);

    let page = bob
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, vec!["once", "next"]);
}

#[tokio::test]
async fn a_client_msg_id_is_scoped_to_its_user_and_channel() {
    let server = DevServer::start().await;
    let random = server
        .create_channel("alice", "random", "public", &["bob"])
        .await;
    let random_id = random["id"].as_str().expect("channel id");
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;

    let mine = alice
        .request_op(
            "ack",
            json!({"op": "send", "channel": GENERAL, "text": "a", "client_msg_id": "same"}),
        )
        .await;
    let bobs = bob
        .request_op(
            "ack",
            json!({"op": "send", "channel": GENERAL, "text": "b", "client_msg_id": "same"}),
        )
        .await;
    assert_eq!(
        seq(&bobs),
        seq(&mine) + 1,
        "another user's id is a new message"
    );
    let elsewhere = alice
        .request_op(
            "ack",
            json!({"op": "send", "channel": random_id, "text": "c", "client_msg_id": "same"}),
        )
        .await;
    assert_eq!(elsewhere["channel"], random_id);
    let event = bob
        .next_event_where("message", |e| e["channel"] == random_id, WAIT)
        .await;
    assert_eq!(event["text"], "c");
    assert_eq!(event["seq"], elsewhere["seq"]);
}

#[tokio::test]
async fn a_reply_in_a_thread_carries_its_parents_seq() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let parent = alice.send_message(GENERAL, "parent").await;
    let reply = bob
        .request_op(
            "ack",
            json!({"op": "send", "channel": GENERAL, "text": "reply", "thread": seq(&parent)}),
        )
        .await;
    let event = alice
        .next_event_where("message", |e| e["text"] == "reply", WAIT)
        .await;
    assert_eq!(event["thread"], parent["seq"]);
    assert_eq!(event["seq"], reply["seq"]);

    let page = alice
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    let messages = page["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["thread"], Value::Null);
    assert_eq!(messages[1]["thread"], parent["seq"]);
}

#[tokio::test]
async fn a_thread_must_name_a_message_of_the_channel() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice
        .request_error(
            "not_found",
            json!({"op": "send", "channel": GENERAL, "text": "x", "thread": 999}),
        )
        .await;
    // Seq 1 is alice's member_joined, not a message.
    alice
        .request_error(
            "not_found",
            json!({"op": "send", "channel": GENERAL, "text": "x", "thread": 1}),
        )
        .await;
}

// ---- edit and delete ----

#[tokio::test]
async fn the_author_edits_a_message_and_every_member_session_sees_it() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let sent = alice.send_message(GENERAL, "typo").await;
    let edit = alice
        .request_op(
            "ack",
            json!({"op": "edit", "channel": GENERAL, "seq": seq(&sent), "text": "fixed"}),
        )
        .await;
    assert_eq!(seq(&edit), seq(&sent) + 1, "the edit is the next log event");
    assert_eq!(edit["channel"], GENERAL);

    let expected = json!({
        "op": "event", "type": "message_edited", "channel": GENERAL,
        "seq": edit["seq"], "ts": edit["ts"], "user": "alice", "target": sent["seq"], "text": "fixed",
    });
    for client in [&mut alice, &mut alice_phone, &mut bob] {
        assert_eq!(client.next_event("message_edited", WAIT).await, expected);
    }

    let page = bob
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    assert_eq!(
        page["messages"],
        json!([{
            "seq": sent["seq"], "ts": sent["ts"], "user": "alice", "text": "fixed",
            "client_msg_id": null, "thread": null, "edited": true, "deleted": false,
        }])
    );
}

#[tokio::test]
async fn the_author_deletes_a_message_and_history_keeps_its_seq() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let sent = alice.send_message(GENERAL, "oops").await;
    let kept = alice.send_message(GENERAL, "kept").await;
    let delete = alice
        .request_op(
            "ack",
            json!({"op": "delete", "channel": GENERAL, "seq": seq(&sent)}),
        )
        .await;
    assert_eq!(seq(&delete), seq(&kept) + 1);

    let expected = json!({
        "op": "event", "type": "message_deleted", "channel": GENERAL,
        "seq": delete["seq"], "ts": delete["ts"], "user": "alice", "target": sent["seq"],
    });
    for client in [&mut alice, &mut alice_phone, &mut bob] {
        assert_eq!(client.next_event("message_deleted", WAIT).await, expected);
    }

    let page = bob
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    let messages = page["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2, "{page}");
    assert_eq!(messages[0]["seq"], sent["seq"]);
    assert_eq!(messages[0]["text"], "");
    assert_eq!(messages[0]["deleted"], true);
    assert_eq!(messages[1]["text"], "kept");
    assert_eq!(messages[1]["deleted"], false);

    // A deleted message can be neither edited nor deleted again.
    alice
        .request_error(
            "not_found",
            json!({"op": "edit", "channel": GENERAL, "seq": seq(&sent), "text": "back"}),
        )
        .await;
    alice
        .request_error(
            "not_found",
            json!({"op": "delete", "channel": GENERAL, "seq": seq(&sent)}),
        )
        .await;
}

#[tokio::test]
async fn only_the_author_may_edit_or_delete_a_message() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let sent = alice.send_message(GENERAL, "mine").await;
    bob.request_error(
        "forbidden",
        json!({"op": "edit", "channel": GENERAL, "seq": seq(&sent), "text": "yours now"}),
    )
    .await;
    bob.request_error(
        "forbidden",
        json!({"op": "delete", "channel": GENERAL, "seq": seq(&sent)}),
    )
    .await;
    alice.next_event("message", WAIT).await;
    alice.expect_no_event("message_edited", QUIET).await;
    alice
        .expect_no_event("message_deleted", Duration::ZERO)
        .await;

    let page = alice
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    assert_eq!(page["messages"][0]["text"], "mine");
    assert_eq!(page["messages"][0]["edited"], false);
    assert_eq!(page["messages"][0]["deleted"], false);
}

#[tokio::test]
async fn editing_or_deleting_what_is_not_a_message_is_not_found() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice
        .request_error(
            "not_found",
            json!({"op": "edit", "channel": GENERAL, "seq": 999, "text": "x"}),
        )
        .await;
    alice
        .request_error(
            "not_found",
            json!({"op": "delete", "channel": GENERAL, "seq": 999}),
        )
        .await;
    // Seq 1 is a member_joined event.
    alice
        .request_error(
            "not_found",
            json!({"op": "edit", "channel": GENERAL, "seq": 1, "text": "x"}),
        )
        .await;
    alice
        .request_error(
            "not_found",
            json!({"op": "delete", "channel": GENERAL, "seq": 1}),
        )
        .await;
}

// ---- typing ----

#[tokio::test]
async fn typing_reaches_other_members_but_not_the_typists_own_sessions() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    let mut bob = server.client("bob").await;

    alice
        .send_json(&json!({"op": "typing", "id": "t-1", "channel": GENERAL}))
        .await;
    let event = bob.next_event("typing", WAIT).await;
    assert_eq!(
        event,
        json!({"op": "event", "type": "typing", "channel": GENERAL, "user": "alice"})
    );
    alice_phone.expect_no_event("typing", QUIET).await;

    // Typing has no reply, and the typist's own session does not hear itself either.
    alice.expect_no_frame(QUIET).await;
    alice.assert_alive().await;
}

#[tokio::test]
async fn typing_is_forwarded_once_per_user_and_channel_within_three_seconds() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;

    let first_sent = tokio::time::Instant::now();
    for _ in 0..3 {
        alice
            .send_json(&json!({"op": "typing", "channel": GENERAL}))
            .await;
    }
    bob.next_event("typing", WAIT).await;
    bob.expect_no_event("typing", QUIET).await;

    // Comfortably after the 3 s window, typing is forwarded again.
    tokio::time::sleep_until(first_sent + Duration::from_millis(4000)).await;
    alice
        .send_json(&json!({"op": "typing", "channel": GENERAL}))
        .await;
    let again = bob.next_event("typing", WAIT).await;
    assert_eq!(again["user"], "alice");
}

#[tokio::test]
async fn the_typing_throttle_is_per_user_and_per_channel() {
    let server = DevServer::start().await;
    let random = server
        .create_channel("alice", "random", "public", &["bob"])
        .await;
    let random_id = random["id"].as_str().expect("channel id");
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;

    alice
        .send_json(&json!({"op": "typing", "channel": GENERAL}))
        .await;
    alice
        .send_json(&json!({"op": "typing", "channel": random_id}))
        .await;
    bob.send_json(&json!({"op": "typing", "channel": GENERAL}))
        .await;

    bob.next_event_where("typing", |e| e["channel"] == GENERAL, WAIT)
        .await;
    bob.next_event_where("typing", |e| e["channel"] == random_id, WAIT)
        .await;
    let from_bob = alice.next_event("typing", WAIT).await;
    assert_eq!(from_bob["user"], "bob");
    assert_eq!(from_bob["channel"], GENERAL);
}

#[tokio::test]
async fn typing_in_a_public_channel_one_is_not_in_is_forbidden() {
    let server = DevServer::start().await;
    let mut carol = server.client("carol").await;
    let mut bob = server.client("bob").await;
    let error = carol
        .request_error(
            "forbidden",
            json!({"op": "typing", "id": 9, "channel": GENERAL}),
        )
        .await;
    assert_eq!(error["id"], 9);
    bob.expect_no_event("typing", QUIET).await;
}

// ---- history ----

#[tokio::test]
async fn history_pages_through_messages_in_ascending_seq() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    for i in 0..10 {
        alice.send_message(GENERAL, &format!("m{i}")).await;
    }
    // Messages hold seqs 3..=12; seqs 1 and 2 are member events and never appear.
    let cases = [
        (json!({}), (3..=12).collect::<Vec<u64>>(), false),
        (json!({"limit": 3}), vec![10, 11, 12], true),
        (json!({"before": 10, "limit": 3}), vec![7, 8, 9], true),
        (json!({"before": 5, "limit": 3}), vec![3, 4], false),
        (json!({"before": 3}), vec![], false),
        (json!({"after": 10}), vec![11, 12], false),
        (json!({"after": 3, "limit": 2}), vec![4, 5], true),
        (json!({"after": 0, "limit": 10}), (3..=12).collect(), false),
        (json!({"after": 12}), vec![], false),
    ];
    for (params, want, want_more) in cases {
        let mut request = json!({"op": "history", "id": "h", "channel": GENERAL});
        for (key, value) in params.as_object().expect("params") {
            request[key] = value.clone();
        }
        let page = alice.request(request.clone()).await;
        assert_eq!(page["op"], "history", "{request} -> {page}");
        assert_eq!(page["id"], "h");
        assert_eq!(page["channel"], GENERAL);
        assert_eq!(history_seqs(&page), want, "{request} -> {page}");
        assert_eq!(page["has_more"], want_more, "{request} -> {page}");
    }

    // Both bounds: the messages strictly between them.
    let page = alice
        .request_op(
            "history",
            json!({"op": "history", "channel": GENERAL, "after": 4, "before": 8}),
        )
        .await;
    assert_eq!(history_seqs(&page), vec![5, 6, 7]);

    let page = alice
        .request_op(
            "history",
            json!({"op": "history", "channel": GENERAL, "limit": 1}),
        )
        .await;
    assert_eq!(
        page["messages"][0],
        json!({
            "seq": 12, "ts": page["messages"][0]["ts"], "user": "alice", "text": "m9",
            "client_msg_id": null, "thread": null, "edited": false, "deleted": false,
        })
    );
    assert!(page["messages"][0]["ts"].is_u64());
}

#[tokio::test]
async fn history_returns_the_latest_fifty_by_default() {
    let server = DevServer::builder()
        .arg("--client-rate", "1000")
        .start()
        .await;
    let mut alice = server.client("alice").await;
    for i in 0..55 {
        alice.send_message(GENERAL, &format!("m{i}")).await;
    }
    // Seqs 3..=57.
    let page = alice
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    assert_eq!(history_seqs(&page), (8..=57).collect::<Vec<u64>>());
    assert_eq!(page["has_more"], true);
    let page = alice
        .request_op(
            "history",
            json!({"op": "history", "channel": GENERAL, "limit": 200}),
        )
        .await;
    assert_eq!(history_seqs(&page), (3..=57).collect::<Vec<u64>>());
    assert_eq!(page["has_more"], false);
}

#[tokio::test]
async fn history_limit_must_be_between_1_and_200() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice.send_message(GENERAL, "one").await;
    for limit in [json!(0), json!(201), json!(-1), json!("5")] {
        let error = alice
            .request_error(
                "bad_request",
                json!({"op": "history", "id": "lim", "channel": GENERAL, "limit": limit}),
            )
            .await;
        assert_eq!(error["id"], "lim");
    }
    for limit in [1, 200] {
        let page = alice
            .request_op(
                "history",
                json!({"op": "history", "channel": GENERAL, "limit": limit}),
            )
            .await;
        assert_eq!(history_seqs(&page), vec![3]);
    }
}

#[tokio::test]
async fn history_of_a_public_channel_is_readable_by_non_members() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    alice.send_message(GENERAL, "public words").await;
    let mut carol = server.client("carol").await;
    let page = carol
        .request_op("history", json!({"op": "history", "channel": GENERAL}))
        .await;
    assert_eq!(page["messages"][0]["text"], "public words");
}

// ---- join and leave ----

#[tokio::test]
async fn joining_a_public_channel_is_acked_with_the_member_joined_seq() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut carol = server.client("carol").await;
    let ack = carol
        .request_op("ack", json!({"op": "join", "id": "j", "channel": GENERAL}))
        .await;
    assert_eq!(ack["id"], "j");
    assert_eq!(ack["channel"], GENERAL);
    assert_eq!(ack["seq"], 3);

    let expected = json!({
        "op": "event", "type": "member_joined", "channel": GENERAL,
        "seq": 3, "ts": ack["ts"], "user": "carol",
    });
    assert_eq!(carol.next_event("member_joined", WAIT).await, expected);
    assert_eq!(alice.next_event("member_joined", WAIT).await, expected);
    // Joining by oneself is not being added by someone else.
    carol.expect_no_event("channel_added", QUIET).await;

    // Now a member: carol receives messages and her next session lists the channel.
    alice.send_message(GENERAL, "welcome").await;
    let event = carol.next_event("message", WAIT).await;
    assert_eq!(event["text"], "welcome");
    let later = server.client("carol").await;
    let general = later
        .ready_channel(GENERAL)
        .expect("general in carol's ready");
    assert_eq!(general["kind"], "public");
    assert_eq!(general["last_seq"], 4);
}

#[tokio::test]
async fn joining_a_channel_twice_is_acked_with_the_last_seq_and_makes_no_event() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    // alice is already a member of general, whose last seq is 2.
    let ack = alice
        .request_op("ack", json!({"op": "join", "channel": GENERAL}))
        .await;
    assert_eq!(ack["seq"], 2);
    alice.expect_no_event("member_joined", QUIET).await;

    let mut bob = server.client("bob").await;
    let sent = bob.send_message(GENERAL, "moving on").await;
    let ack = alice
        .request_op("ack", json!({"op": "join", "channel": GENERAL}))
        .await;
    assert_eq!(ack["seq"], sent["seq"]);
    bob.expect_no_event("member_joined", QUIET).await;
}

#[tokio::test]
async fn leaving_is_acked_with_the_member_left_seq_and_the_leaver_receives_it() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let ack = bob
        .request_op("ack", json!({"op": "leave", "channel": GENERAL}))
        .await;
    assert_eq!(ack["seq"], 3);
    let expected = json!({
        "op": "event", "type": "member_left", "channel": GENERAL,
        "seq": 3, "ts": ack["ts"], "user": "bob",
    });
    assert_eq!(bob.next_event("member_left", WAIT).await, expected);
    assert_eq!(alice.next_event("member_left", WAIT).await, expected);

    // No longer a member: no events, no sending.
    alice.send_message(GENERAL, "bye bob").await;
    bob.expect_no_event("message", QUIET).await;
    bob.request_error(
        "forbidden",
        json!({"op": "send", "channel": GENERAL, "text": "let me back"}),
    )
    .await;
    let later = server.client("bob").await;
    assert!(later.ready_channel(GENERAL).is_none(), "{}", later.ready);
}

#[tokio::test]
async fn leaving_a_channel_one_is_not_in_is_acked_with_the_last_seq_and_makes_no_event() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut carol = server.client("carol").await;
    let ack = carol
        .request_op("ack", json!({"op": "leave", "channel": GENERAL}))
        .await;
    assert_eq!(ack["seq"], 2);
    alice.expect_no_event("member_left", QUIET).await;
}

#[tokio::test]
async fn join_is_for_public_channels_only() {
    let server = DevServer::start().await;
    let secret = server
        .create_channel("alice", "secret", "private", &[])
        .await;
    let secret_id = secret["id"].as_str().expect("channel id");
    let dm = server
        .http_as("alice")
        .post("/v1/dms", json!({"user": "bob"}))
        .await
        .expect_status(200);
    let dm_id = dm["id"].as_str().expect("dm id");

    let mut carol = server.client("carol").await;
    // Private channels and DMs are invisible to non-members.
    carol
        .request_error("not_found", json!({"op": "join", "channel": secret_id}))
        .await;
    carol
        .request_error("not_found", json!({"op": "join", "channel": dm_id}))
        .await;
    carol
        .request_error(
            "not_found",
            json!({"op": "join", "channel": "no-such-channel"}),
        )
        .await;
    // A DM's membership is fixed.
    let mut bob = server.client("bob").await;
    bob.request_error("forbidden", json!({"op": "leave", "channel": dm_id}))
        .await;
}

#[tokio::test]
async fn a_user_added_by_someone_else_gets_channel_added_before_member_joined() {
    let server = DevServer::start().await;
    let secret = server
        .create_channel("alice", "secret", "private", &[])
        .await;
    let secret_id = secret["id"].as_str().expect("channel id").to_string();
    let mut carol = server.client("carol").await;
    let mut carol_phone = server.client("carol").await;
    let mut alice = server.client("alice").await;

    let added = server
        .http_as("alice")
        .post(
            &format!("/v1/channels/{secret_id}/members"),
            json!({"user": "carol"}),
        )
        .await
        .expect_status(200);
    let joined_seq = seq(&added);

    for client in [&mut carol, &mut carol_phone] {
        let first = client.next_frame().await;
        assert_eq!(first["type"], "channel_added", "first frame: {first}");
        assert_eq!(first["channel"], secret_id.as_str());
        let info = &first["info"];
        assert_eq!(info["id"], secret_id.as_str());
        assert_eq!(info["name"], "secret");
        assert_eq!(info["kind"], "private");
        assert_eq!(info["read_seq"], 0);
        assert!(info["last_seq"].is_u64(), "{info}");
        let joined = client.next_event("member_joined", WAIT).await;
        assert_eq!(joined["channel"], secret_id.as_str());
        assert_eq!(joined["user"], "carol");
        assert_eq!(joined["seq"], joined_seq);
    }
    // The adder is a member and sees the join, but was not added itself.
    let joined = alice.next_event("member_joined", WAIT).await;
    assert_eq!(joined["user"], "carol");
    alice.expect_no_event("channel_added", QUIET).await;

    // The new member can now use the channel.
    let sent = carol.send_message(&secret_id, "thanks").await;
    let event = alice.next_event("message", WAIT).await;
    assert_eq!(event["seq"], sent["seq"]);
}

#[tokio::test]
async fn members_named_at_channel_creation_get_channel_added() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    let channel = server
        .create_channel("alice", "plans", "private", &["bob"])
        .await;
    let added = bob.next_event("channel_added", WAIT).await;
    assert_eq!(added["channel"], channel["id"]);
    assert_eq!(added["info"]["name"], "plans");
    assert_eq!(added["info"]["kind"], "private");
    let joined = bob
        .next_event_where("member_joined", |e| e["user"] == "bob", WAIT)
        .await;
    assert_eq!(joined["channel"], channel["id"]);
}

// ---- read ----

#[tokio::test]
async fn read_is_acked_and_told_to_the_users_other_sessions_only() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    let mut bob = server.client("bob").await;

    let ack = alice
        .request_op(
            "ack",
            json!({"op": "read", "id": "r", "channel": GENERAL, "seq": 2}),
        )
        .await;
    assert_eq!(ack["id"], "r");
    assert_eq!(ack["channel"], GENERAL);
    assert_eq!(ack["seq"], 2);

    let event = alice_phone.next_event("read", WAIT).await;
    assert_eq!(
        event,
        json!({"op": "event", "type": "read", "channel": GENERAL, "seq": 2})
    );
    alice.expect_no_event("read", QUIET).await;
    bob.expect_no_event("read", Duration::ZERO).await;

    let later = server.client("alice").await;
    assert_eq!(
        later.ready_channel(GENERAL).expect("general")["read_seq"],
        2
    );
}

#[tokio::test]
async fn the_read_marker_never_moves_back() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let mut alice_phone = server.client("alice").await;
    for text in ["a", "b", "c"] {
        alice.send_message(GENERAL, text).await;
    }
    // Seqs 3, 4, 5 are messages.
    alice
        .request_op("ack", json!({"op": "read", "channel": GENERAL, "seq": 5}))
        .await;
    alice_phone
        .next_event_where("read", |e| e["seq"] == 5, WAIT)
        .await;

    let ack = alice
        .request_op("ack", json!({"op": "read", "channel": GENERAL, "seq": 3}))
        .await;
    assert_eq!(ack["seq"], 3, "the ack echoes the requested seq");
    alice_phone.expect_no_event("read", QUIET).await;
    let later = server.client("alice").await;
    assert_eq!(
        later.ready_channel(GENERAL).expect("general")["read_seq"],
        5
    );
}

#[tokio::test]
async fn a_read_marker_beyond_the_last_seq_stops_at_it() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let ack = alice
        .request_op("ack", json!({"op": "read", "channel": GENERAL, "seq": 999}))
        .await;
    assert_eq!(ack["seq"], 999);
    let later = server.client("alice").await;
    assert_eq!(
        later.ready_channel(GENERAL).expect("general")["read_seq"],
        2
    );
}

#[tokio::test]
async fn reading_a_public_channel_one_is_not_in_is_forbidden() {
    let server = DevServer::start().await;
    let mut carol = server.client("carol").await;
    carol
        .request_error(
            "forbidden",
            json!({"op": "read", "channel": GENERAL, "seq": 1}),
        )
        .await;
}

// ---- presence ----

#[tokio::test]
async fn presence_sub_answers_the_current_status_of_each_user() {
    let server = DevServer::start().await;
    let _alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let reply = bob
        .request(
            json!({"op": "presence_sub", "id": "p", "users": ["alice", "carol", "nobody", "bob"]}),
        )
        .await;
    assert_eq!(
        reply,
        json!({
            "op": "presence", "id": "p",
            "users": {"alice": "online", "bob": "online", "carol": "offline", "nobody": "offline"},
        })
    );
}

#[tokio::test]
async fn a_subscriber_is_told_when_a_user_comes_online_and_goes_offline() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    bob.request_op(
        "presence",
        json!({"op": "presence_sub", "users": ["carol"]}),
    )
    .await;

    let carol = server.client("carol").await;
    let online = bob.next_event("presence", WAIT).await;
    assert_eq!(
        online,
        json!({"op": "event", "type": "presence", "user": "carol", "status": "online"})
    );

    drop(carol);
    let offline = bob.next_event("presence", WAIT).await;
    assert_eq!(
        offline,
        json!({"op": "event", "type": "presence", "user": "carol", "status": "offline"})
    );
}

#[tokio::test]
async fn a_user_stays_online_while_any_of_its_sessions_is_connected() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    let mut carol = server.client("carol").await;
    let mut carol_phone = server.client("carol").await;
    let reply = bob
        .request_op(
            "presence",
            json!({"op": "presence_sub", "users": ["carol"]}),
        )
        .await;
    assert_eq!(reply["users"]["carol"], "online");

    carol.send_close(1000).await;
    carol.expect_close(1000).await;
    bob.expect_no_event("presence", QUIET).await;
    // carol is still online through her other session.
    let reply = bob
        .request_op(
            "presence",
            json!({"op": "presence_sub", "users": ["carol"]}),
        )
        .await;
    assert_eq!(reply["users"]["carol"], "online");

    carol_phone.send_close(1000).await;
    carol_phone.expect_close(1000).await;
    let offline = bob.next_event("presence", WAIT).await;
    assert_eq!(offline["status"], "offline");
}

#[tokio::test]
async fn presence_sub_replaces_the_previous_set() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    let mut alice = server.client("alice").await;
    bob.request_op(
        "presence",
        json!({"op": "presence_sub", "users": ["carol"]}),
    )
    .await;
    let reply = bob
        .request_op("presence", json!({"op": "presence_sub", "users": ["dave"]}))
        .await;
    assert_eq!(reply["users"], json!({"dave": "offline"}));

    let _carol = server.client("carol").await;
    let _dave = server.client("dave").await;
    let event = bob.next_event("presence", WAIT).await;
    assert_eq!(event["user"], "dave");
    bob.expect_no_event("presence", QUIET).await;
    // A session that never subscribed hears nothing.
    alice.expect_no_event("presence", Duration::ZERO).await;
}

#[tokio::test]
async fn presence_sub_takes_at_most_500_users() {
    let server = DevServer::start().await;
    let mut bob = server.client("bob").await;
    let users: Vec<String> = (0..501).map(|i| format!("user{i}")).collect();
    let error = bob
        .request_error(
            "bad_request",
            json!({"op": "presence_sub", "id": "big", "users": users}),
        )
        .await;
    assert_eq!(error["id"], "big");
    let reply = bob
        .request_op(
            "presence",
            json!({"op": "presence_sub", "users": &users[..500]}),
        )
        .await;
    assert_eq!(reply["users"].as_object().map(|u| u.len()), Some(500));
}

// ---- ping ----

#[tokio::test]
async fn ping_is_answered_with_pong_echoing_the_id() {
    let server = DevServer::start().await;
    let mut alice = server.client("alice").await;
    let pong = alice.request(json!({"op": "ping", "id": 42})).await;
    assert_eq!(pong, json!({"op": "pong", "id": 42}));
    let pong = alice.request(json!({"op": "ping", "id": "p-1"})).await;
    assert_eq!(pong, json!({"op": "pong", "id": "p-1"}));
    let id64 = "x".repeat(64);
    let pong = alice.request(json!({"op": "ping", "id": id64})).await;
    assert_eq!(pong["id"], id64.as_str());
}
