//! Sending, fanout, typing, idempotency, edit/delete and history through a real cell.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use confab_cells::{CellConfig, MemoryStore};
use confab_shared::link::{CellOp, CellReply, ChannelOp, ToCell};
use confab_shared::server::ChannelKind;
use confab_shared::server::MessageView;
use confab_shared::{CellId, ErrorCode};

on_every_engine!(
    seqs_are_1_2_3_without_gaps_across_concurrent_senders_on_several_threads,
    a_reused_client_msg_id_returns_the_first_ack_without_a_new_event,
    edit_and_delete_are_author_only_and_history_shows_messages_as_they_stand,
    history_pages_both_ways_with_has_more,
);

async fn seqs_are_1_2_3_without_gaps_across_concurrent_senders_on_several_threads(engine: Engine) {
    let (cell, mut gw, _store) = start_on(engine, 10_000).await;
    // general already has seq 1 and 2 (the seeded joins).
    let mut gateways: Vec<Gw> = (0..3)
        .map(|i| Gw::connect(&cell, &format!("t{i}"), 10_000))
        .collect();
    let per_gateway = 100u64;
    std::thread::scope(|scope| {
        for (i, g) in gateways.iter().enumerate() {
            let link = &g.link;
            scope.spawn(move || {
                for n in 0..per_gateway {
                    link.send(ToCell::Request {
                        req: n + 1,
                        caller: confab_shared::link::Caller {
                            workspace: ws("w"),
                            user: user(if i % 2 == 0 { "alice" } else { "bob" }),
                            session: None,
                        },
                        op: send_op("general", &format!("m{i}-{n}")),
                    });
                }
            });
        }
    });
    let mut seqs = BTreeSet::new();
    for g in &mut gateways {
        for req in 1..=per_gateway {
            assert!(seqs.insert(ack_seq(&g.reply(req).await)));
        }
    }
    let expected: BTreeSet<u64> = (3..3 + 3 * per_gateway).collect();
    assert_eq!(seqs, expected);
    // The next one continues the sequence.
    assert_eq!(
        ack_seq(&gw.op("alice", None, send_op("general", "last")).await),
        3 + 3 * per_gateway
    );
}

#[actix_rt::test]
async fn one_deliver_per_gateway_reaches_every_member_session_and_the_sender() {
    let (cell, mut gw1) = start().await;
    let mut gw2 = Gw::connect(&cell, "g2", 1000);
    gw1.attach("alice", "a1").await;
    gw1.attach("alice", "a2").await;
    gw1.attach("bob", "b1").await;
    gw2.attach("bob", "b2").await;
    gw2.attach("carol", "c1").await; // not a member
    gw1.settle().await;
    gw2.settle().await;
    let before = (gw1.delivers.len(), gw2.delivers.len());

    let reply = gw1
        .op("alice", Some("a1"), send_op("general", "hello"))
        .await;
    assert_eq!(ack_seq(&reply), 3);
    gw1.settle().await;
    gw2.settle().await;

    let new1 = &gw1.delivers[before.0..];
    let new2 = &gw2.delivers[before.1..];
    assert_eq!(new1.len(), 1, "one Deliver for gateway 1: {new1:?}");
    assert_eq!(new2.len(), 1, "one Deliver for gateway 2: {new2:?}");
    let mut on1 = new1[0].0.clone();
    on1.sort();
    assert_eq!(on1, vec!["a1", "a2", "b1"]);
    assert_eq!(new2[0].0, vec!["b2"]);
    let frame = &new1[0].1;
    assert_eq!(frame["op"], "event");
    assert_eq!(frame["type"], "message");
    assert_eq!(frame["seq"], 3);
    assert_eq!(frame["user"], "alice");
    assert_eq!(frame["text"], "hello");
    assert_eq!(
        &new2[0].1, frame,
        "the same encoded frame goes to every gateway"
    );
}

#[actix_rt::test]
async fn typing_skips_all_of_the_typists_sessions_and_is_throttled() {
    let (_cell, mut gw) = start().await;
    gw.attach("alice", "a1").await;
    gw.attach("alice", "a2").await;
    gw.attach("bob", "b1").await;
    gw.settle().await;
    let typing = || CellOp::channel(ch("general"), ChannelOp::Typing);
    assert_eq!(
        gw.op("alice", Some("a1"), typing()).await,
        Ok(CellReply::Done)
    );
    assert_eq!(
        gw.op("alice", Some("a1"), typing()).await,
        Ok(CellReply::Done)
    );
    assert_eq!(
        gw.op("alice", Some("a2"), typing()).await,
        Ok(CellReply::Done)
    );
    let bob = gw.drain("b1").await;
    assert_eq!(
        bob.len(),
        1,
        "further typing within 3 s is dropped: {bob:?}"
    );
    assert_eq!(bob[0]["type"], "typing");
    assert_eq!(bob[0]["user"], "alice");
    assert!(gw.drain("a1").await.is_empty());
    assert!(gw.drain("a2").await.is_empty());
    // Another user's typing is not throttled by alice's.
    assert_eq!(
        gw.op("bob", Some("b1"), typing()).await,
        Ok(CellReply::Done)
    );
    assert_eq!(gw.drain("a1").await.len(), 1);
    assert!(gw.drain("b1").await.is_empty());
}

#[actix_rt::test]
async fn typing_by_a_non_member_of_a_public_channel_is_forbidden() {
    let (_cell, mut gw) = start().await;
    let reply = gw
        .op(
            "carol",
            None,
            CellOp::channel(ch("general"), ChannelOp::Typing),
        )
        .await;
    assert_eq!(code(&reply), ErrorCode::Forbidden);
}

async fn a_reused_client_msg_id_returns_the_first_ack_without_a_new_event(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    gw.attach("bob", "b1").await;
    gw.settle().await;
    let send = |text: &str| {
        CellOp::channel(
            ch("general"),
            ChannelOp::Send {
                text: text.to_string(),
                client_msg_id: Some("k1".into()),
                thread: None,
            },
        )
    };
    let first = gw.op("alice", None, send("once")).await;
    let again = gw.op("alice", None, send("twice")).await;
    assert_eq!(first, again);
    assert_eq!(gw.drain("b1").await.len(), 1);
    // Another user may use the same id.
    let other = gw.op("bob", None, send("bob's")).await;
    assert_eq!(ack_seq(&other), ack_seq(&first) + 1);
}

#[actix_rt::test]
async fn send_needs_membership_and_an_existing_thread() {
    let (_cell, mut gw) = start().await;
    assert_eq!(
        code(&gw.op("carol", None, send_op("general", "x")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&gw.op("alice", None, send_op("nope", "x")).await),
        ErrorCode::NotFound
    );
    let reply = gw
        .op(
            "alice",
            None,
            CellOp::channel(
                ch("general"),
                ChannelOp::Send {
                    text: "reply".into(),
                    client_msg_id: None,
                    thread: Some(1), // seq 1 is a member_joined, not a message
                },
            ),
        )
        .await;
    assert_eq!(code(&reply), ErrorCode::NotFound);
    let parent = ack_seq(&gw.op("alice", None, send_op("general", "parent")).await);
    let reply = gw
        .op(
            "bob",
            None,
            CellOp::channel(
                ch("general"),
                ChannelOp::Send {
                    text: "reply".into(),
                    client_msg_id: None,
                    thread: Some(parent),
                },
            ),
        )
        .await;
    assert_eq!(ack_seq(&reply), parent + 1);
}

fn history(before: Option<u64>, after: Option<u64>, limit: u32) -> CellOp {
    CellOp::channel(
        ch("general"),
        ChannelOp::History {
            before,
            after,
            limit,
        },
    )
}

fn page(
    reply: Result<CellReply, confab_shared::link::CellError>,
) -> (Vec<u64>, bool, Vec<MessageView>) {
    match reply {
        Ok(CellReply::History {
            messages, has_more, ..
        }) => (messages.iter().map(|m| m.seq).collect(), has_more, messages),
        other => panic!("expected history, got {other:?}"),
    }
}

async fn edit_and_delete_are_author_only_and_history_shows_messages_as_they_stand(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    gw.attach("bob", "b1").await;
    let m1 = ack_seq(&gw.op("alice", None, send_op("general", "first")).await);
    let m2 = ack_seq(&gw.op("alice", None, send_op("general", "second")).await);
    let edit = |seq, text: &str| {
        CellOp::channel(
            ch("general"),
            ChannelOp::Edit {
                seq,
                text: text.into(),
            },
        )
    };
    let delete = |seq| CellOp::channel(ch("general"), ChannelOp::Delete { seq });

    assert_eq!(
        code(&gw.op("bob", None, edit(m1, "hijack")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&gw.op("bob", None, delete(m1)).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&gw.op("alice", None, edit(1, "a join")).await),
        ErrorCode::NotFound
    );
    let e = ack_seq(&gw.op("alice", None, edit(m1, "first, edited")).await);
    let d = ack_seq(&gw.op("alice", None, delete(m2)).await);
    assert_eq!((e, d), (m2 + 1, m2 + 2));
    assert_eq!(
        code(&gw.op("alice", None, edit(m2, "undelete")).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(&gw.op("alice", None, delete(m2)).await),
        ErrorCode::NotFound
    );

    let events = gw.drain("b1").await;
    let kinds: Vec<&str> = events.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["message", "message", "message_edited", "message_deleted"]
    );
    assert_eq!(events[2]["target"], m1);
    assert_eq!(events[2]["text"], "first, edited");
    assert_eq!(events[3]["target"], m2);

    let (seqs, has_more, messages) = page(gw.op("bob", None, history(None, None, 50)).await);
    assert_eq!(seqs, vec![m1, m2], "only messages, ascending");
    assert!(!has_more);
    assert_eq!(messages[0].text, "first, edited");
    assert!(messages[0].edited && !messages[0].deleted);
    assert_eq!(messages[1].text, "");
    assert!(messages[1].deleted);
}

async fn history_pages_both_ways_with_has_more(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    // seqs 3..=12 are messages m0..m9.
    for i in 0..10 {
        gw.op("alice", None, send_op("general", &format!("m{i}")))
            .await
            .unwrap();
    }
    let h = |b, a, l| history(b, a, l);
    let (seqs, more, _) = page(gw.op("bob", None, h(None, None, 4)).await);
    assert_eq!((seqs, more), (vec![9, 10, 11, 12], true));
    let (seqs, more, _) = page(gw.op("bob", None, h(Some(9), None, 4)).await);
    assert_eq!((seqs, more), (vec![5, 6, 7, 8], true));
    let (seqs, more, _) = page(gw.op("bob", None, h(Some(5), None, 4)).await);
    assert_eq!((seqs, more), (vec![3, 4], false));
    let (seqs, more, _) = page(gw.op("bob", None, h(None, Some(2), 4)).await);
    assert_eq!((seqs, more), (vec![3, 4, 5, 6], true));
    let (seqs, more, _) = page(gw.op("bob", None, h(None, Some(8), 4)).await);
    assert_eq!((seqs, more), (vec![9, 10, 11, 12], false));
    let (seqs, more, _) = page(gw.op("bob", None, h(Some(10), Some(4), 3)).await);
    assert_eq!((seqs, more), (vec![5, 6, 7], true));
    let (seqs, more, _) = page(gw.op("bob", None, h(Some(10), Some(6), 3)).await);
    assert_eq!((seqs, more), (vec![7, 8, 9], false));
    // A public channel's history is open to non-members of the workspace.
    let (seqs, _, _) = page(gw.op("carol", None, h(None, None, 2)).await);
    assert_eq!(seqs, vec![11, 12]);
}

/// Counts `confab_events_published_total` increments on this thread.
#[derive(Default)]
struct Published(Arc<AtomicU64>);

impl metrics::CounterFn for Published {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

struct CountingRecorder(Arc<AtomicU64>);

impl metrics::Recorder for CountingRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() == "confab_events_published_total" {
            metrics::Counter::from_arc(Arc::new(Published(self.0.clone())))
        } else {
            metrics::Counter::noop()
        }
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[actix_rt::test]
async fn each_published_event_increments_the_counter_once_whatever_the_recipients() {
    let count = Arc::new(AtomicU64::new(0));
    let recorder = CountingRecorder(count.clone());
    // One actor thread, this one, so that a thread-local recorder sees every actor.
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (_cell, mut gw) =
        start_configured(Arc::new(MemoryStore::new()), with_actor_threads(1)).await;
    gw.attach("alice", "a1").await;
    gw.attach("bob", "b1").await;
    gw.attach("bob", "b2").await;
    gw.settle().await;
    let seeded = count.load(Ordering::Relaxed);
    assert_eq!(seeded, 2, "the two seeded joins");
    gw.op("alice", None, send_op("general", "x")).await.unwrap();
    gw.op("alice", None, send_op("general", "y")).await.unwrap();
    gw.settle().await;
    assert_eq!(count.load(Ordering::Relaxed), seeded + 2);
}

/// A cell's config with `actor_threads` threads.
fn with_actor_threads(actor_threads: usize) -> CellConfig {
    CellConfig {
        actor_threads,
        ..CellConfig::new(CellId::new("c1").unwrap())
    }
}

/// Channels spread over four actor threads: sends to all of them at once, interleaved, still
/// get one gapless seq order per channel, and every event reaches the subscriber in it.
#[actix_rt::test]
async fn channels_on_four_actor_threads_each_keep_one_gapless_seq_order() {
    let (cell, mut gw) =
        start_configured(Arc::new(MemoryStore::new()), with_actor_threads(4)).await;
    let channels: Vec<String> = (0..16).map(|i| format!("room-{i}")).collect();
    for channel in &channels {
        gw.seed(channel, ChannelKind::Public, &["alice", "bob"])
            .await;
    }
    gw.attach("bob", "b1").await;
    let mut requests = Vec::new();
    for round in 0..50 {
        for channel in &channels {
            let req = gw.send_request("w", "alice", None, send_op(channel, &format!("{round}")));
            requests.push((channel.clone(), req));
        }
    }
    let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
    for (channel, req) in requests {
        let seq = ack_seq(&gw.reply(req).await);
        seqs.entry(channel).or_default().push(seq);
    }
    for (channel, mut got) in seqs {
        got.sort_unstable();
        let first = got[0];
        let expected: Vec<u64> = (first..first + 50).collect();
        assert_eq!(got, expected, "{channel}: seqs not one gapless order");
    }
    gw.settle().await;
    let events = gw.drain("b1").await;
    assert_eq!(events.len(), 16 * 50, "bob got {} events", events.len());
    assert_eq!(cell.actor_threads(), 4);
}
