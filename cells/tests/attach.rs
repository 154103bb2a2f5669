//! Attach: `Ready`, resume replay and resync, read markers.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use confab_shared::link::{CellOp, CellReply, UserOp};
use confab_shared::ErrorCode;
use serde_json::Value;

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect()
}

on_every_engine!(
    ready_lists_every_channel_of_the_user_with_last_and_read_seq,
    resume_replays_missed_events_in_order_from_memory_and_from_the_store,
    replay_then_live_has_no_gap_and_no_duplicate_while_others_send,
    resume_beyond_retention_gets_resync,
    read_marker_never_moves_back_and_other_sessions_get_a_read_event,
);

async fn ready_lists_every_channel_of_the_user_with_last_and_read_seq(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    gw.op("alice", None, send_op("general", "x")).await.unwrap();
    gw.op(
        "alice",
        None,
        CellOp::User(UserOp::Read {
            channel: ch("general"),
            seq: 2,
        }),
    )
    .await
    .unwrap();
    let channels = gw.attach("alice", "a1").await;
    assert_eq!(channels.len(), 1);
    let general = &channels[0];
    assert_eq!(
        (
            general.id.as_str(),
            general.name.as_str(),
            general.last_seq,
            general.read_seq
        ),
        ("general", "general", 3, 2)
    );
    assert!(
        gw.attach("carol", "c1").await.is_empty(),
        "a new user is a member of nothing"
    );
}

#[actix_rt::test]
async fn attach_to_an_unknown_workspace_fails_with_not_found() {
    let (cell, mut gw) = start().await;
    gw.send_attach("ghost", "alice", "g1", &[], 100);
    let err = gw.attach_result("g1").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(err.message, "unknown workspace");
    assert_eq!(cell.stats().connections, 0);
}

#[actix_rt::test]
async fn stats_count_workspaces_and_attached_sessions() {
    let (cell, mut gw) = start().await;
    gw.attach("alice", "a1").await;
    gw.attach("bob", "b1").await;
    let stats = cell.stats();
    assert_eq!((stats.workspaces, stats.connections), (1, 2));
    gw.send(confab_shared::link::ToCell::Detach { session: sid("a1") });
    gw.settle().await;
    assert_eq!(cell.stats().connections, 1);
}

async fn resume_replays_missed_events_in_order_from_memory_and_from_the_store(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    for i in 0..300 {
        gw.op("bob", None, send_op("general", &format!("m{i}")))
            .await
            .unwrap();
    }
    // From seq 290: the recent events held in memory. From seq 10: older than that, the store.
    gw.send_attach("w", "alice", "near", &[("general", 290)], 4096);
    gw.send_attach("w", "alice", "far", &[("general", 10)], 4096);
    gw.attach_result("near").await.unwrap();
    gw.attach_result("far").await.unwrap();
    let near = gw.drain("near").await;
    let far = gw.drain("far").await;
    assert_eq!(seqs(&near), (291..=302).collect::<Vec<_>>());
    assert_eq!(seqs(&far), (11..=302).collect::<Vec<_>>());
    assert_eq!(far[0]["type"], "message");
    assert_eq!(far[0]["text"], "m8");
}

async fn replay_then_live_has_no_gap_and_no_duplicate_while_others_send(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    for i in 0..20 {
        gw.op("bob", None, send_op("general", &format!("m{i}")))
            .await
            .unwrap();
    }
    // Sends race the attach in the same link order the gateway would produce.
    let mut reqs = Vec::new();
    for i in 0..20 {
        reqs.push(gw.send_request("w", "bob", None, send_op("general", &format!("live{i}"))));
    }
    gw.send_attach("w", "alice", "a1", &[("general", 5)], 4096);
    for i in 0..20 {
        reqs.push(gw.send_request("w", "bob", None, send_op("general", &format!("late{i}"))));
    }
    for req in reqs {
        gw.reply(req).await.unwrap();
    }
    gw.attach_result("a1").await.unwrap();
    let events = gw.drain("a1").await;
    assert_eq!(seqs(&events), (6..=62).collect::<Vec<_>>());
}

async fn resume_beyond_retention_gets_resync(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 5).await;
    for i in 0..10 {
        gw.op("bob", None, send_op("general", &format!("m{i}")))
            .await
            .unwrap();
    }
    // last_seq is 12; the log keeps 8..=12.
    gw.send_attach("w", "alice", "old", &[("general", 3)], 4096);
    gw.send_attach("w", "alice", "edge", &[("general", 7)], 4096);
    gw.attach_result("old").await.unwrap();
    gw.attach_result("edge").await.unwrap();
    let old = gw.drain("old").await;
    assert_eq!(old.len(), 1);
    assert_eq!(
        (old[0]["type"].as_str(), old[0]["channel"].as_str()),
        (Some("resync"), Some("general"))
    );
    assert_eq!(seqs(&gw.drain("edge").await), vec![8, 9, 10, 11, 12]);
    // Live events keep flowing after a resync.
    gw.op("bob", None, send_op("general", "after"))
        .await
        .unwrap();
    assert_eq!(gw.event("old").await["seq"], 13);
}

#[actix_rt::test]
async fn resume_beyond_the_replay_limit_or_the_last_seq_gets_resync() {
    let (_cell, mut gw) = start().await;
    for i in 0..10 {
        gw.op("bob", None, send_op("general", &format!("m{i}")))
            .await
            .unwrap();
    }
    gw.send_attach("w", "alice", "gap", &[("general", 2)], 5);
    gw.send_attach("w", "alice", "fits", &[("general", 7)], 5);
    gw.send_attach("w", "alice", "ahead", &[("general", 99)], 4096);
    gw.send_attach("w", "alice", "current", &[("general", 12)], 4096);
    for s in ["gap", "fits", "ahead", "current"] {
        gw.attach_result(s).await.unwrap();
    }
    assert_eq!(gw.drain("gap").await[0]["type"], "resync");
    assert_eq!(seqs(&gw.drain("fits").await), vec![8, 9, 10, 11, 12]);
    assert_eq!(gw.drain("ahead").await[0]["type"], "resync");
    assert!(gw.drain("current").await.is_empty());
}

#[actix_rt::test]
async fn resume_of_a_channel_the_user_is_not_in_replays_nothing() {
    let (_cell, mut gw) = start().await;
    gw.op("bob", None, send_op("general", "x")).await.unwrap();
    gw.send_attach("w", "carol", "c1", &[("general", 0)], 4096);
    assert!(gw.attach_result("c1").await.unwrap().is_empty());
    assert!(gw.drain("c1").await.is_empty());
}

async fn read_marker_never_moves_back_and_other_sessions_get_a_read_event(engine: Engine) {
    let (_cell, mut gw, _store) = start_on(engine, 10_000).await;
    for i in 0..5 {
        gw.op("bob", None, send_op("general", &format!("m{i}")))
            .await
            .unwrap();
    }
    gw.attach("alice", "a1").await;
    gw.attach("alice", "a2").await;
    gw.settle().await;
    let read = |seq| {
        CellOp::User(UserOp::Read {
            channel: ch("general"),
            seq,
        })
    };
    let ack = gw.op("alice", Some("a1"), read(5)).await;
    assert!(matches!(ack, Ok(CellReply::Ack { seq: 5, .. })), "{ack:?}");
    let a2 = gw.drain("a2").await;
    assert_eq!(a2.len(), 1);
    assert_eq!(
        (a2[0]["type"].as_str(), a2[0]["seq"].as_u64()),
        (Some("read"), Some(5))
    );
    assert!(
        gw.drain("a1").await.is_empty(),
        "not to the session that read"
    );

    // Backwards: acked with the requested seq, marker unchanged, no event.
    let ack = gw.op("alice", Some("a1"), read(3)).await;
    assert!(matches!(ack, Ok(CellReply::Ack { seq: 3, .. })), "{ack:?}");
    assert!(gw.drain("a2").await.is_empty());
    // Beyond the last seq: clamped to it (7).
    gw.op("alice", Some("a2"), read(1000)).await.unwrap();
    assert_eq!(gw.drain("a1").await[0]["seq"], 7);
    let channels = gw.attach("alice", "a3").await;
    assert_eq!(channels[0].read_seq, 7);
}

#[actix_rt::test]
async fn a_non_member_cannot_move_a_read_marker_of_a_public_channel() {
    let (_cell, mut gw) = start().await;
    let reply = gw
        .op(
            "carol",
            None,
            CellOp::User(UserOp::Read {
                channel: ch("general"),
                seq: 1,
            }),
        )
        .await;
    assert_eq!(code(&reply), ErrorCode::Forbidden);
}

#[actix_rt::test]
async fn ready_is_sent_after_the_replayed_events_of_its_session() {
    let (_cell, mut gw) = start().await;
    gw.op("bob", None, send_op("general", "x")).await.unwrap();
    gw.send_attach("w", "alice", "a1", &[("general", 0)], 4096);
    gw.attach_result("a1").await.unwrap();
    let events = gw.drain("a1").await;
    assert_eq!(seqs(&events), vec![1, 2, 3]);
    // The cell sends Ready after the replay: the gateway holds Delivers until Ready.
    let ready_at = gw.ready_at["a1"];
    assert!(
        ready_at >= 3,
        "ready after the 3 replayed events ({ready_at})"
    );
}
