//! A cell's graceful shutdown (`Cell::shut_down`): the writes already taken finish and are
//! acked, sessions are told `4010` after those acks, and anything sent afterwards answers
//! `unavailable`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use confab_shared::link::{Attach, CellReply, ToCell};
use confab_shared::{CloseCode, ErrorCode};

on_every_engine!(shutdown_acks_the_writes_taken_then_tells_sessions_4010_and_refuses_the_rest,);

async fn shutdown_acks_the_writes_taken_then_tells_sessions_4010_and_refuses_the_rest(
    engine: Engine,
) {
    let (cell, mut gw, _store) = start_on(engine, 10_000).await;
    gw.attach("alice", "a1").await;
    gw.settle().await;
    let before = gw.replies_seen;
    // Taken before the shutdown begins: every one of them must be acked.
    let taken: Vec<u64> = (0..20)
        .map(|i| {
            gw.send_request(
                "w",
                "alice",
                Some("a1"),
                send_op("general", &format!("m{i}")),
            )
        })
        .collect();
    // The gateway keeps reading its link while the cell drains, as a real one does.
    let stopping = cell.clone();
    let drain = actix_rt::spawn(async move { stopping.shut_down(Duration::from_secs(10)).await });
    let mut seqs = Vec::new();
    for req in taken {
        match gw.reply(req).await {
            Ok(CellReply::Ack { seq, .. }) => seqs.push(seq),
            other => panic!("a write taken before the shutdown was not acked: {other:?}"),
        }
    }
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 20, "{seqs:?}");
    gw.settle().await;
    let report = drain.await.unwrap();
    assert_eq!(report.unanswered, 0, "{report:?}");
    assert!(report.flushed, "{report:?}");
    assert_eq!(report.sessions_told, 1, "{report:?}");
    assert_eq!(
        gw.closes,
        vec![("a1".to_string(), CloseCode::ReconnectNow, before + 20)],
        "the session is told to reconnect once, after every ack"
    );
    assert!(cell.is_stopping());
    assert!(gw.link.is_lost(), "the link is given up at the end");

    // A second gateway linking now is refused everything.
    let mut late = Gw::connect(&cell, "g2", 100);
    let req = late.send_request("w", "alice", None, send_op("general", "late"));
    assert_eq!(code(&late.reply(req).await), ErrorCode::Unavailable);
    late.send(ToCell::Attach(Attach {
        session: sid("b1"),
        workspace: ws("w"),
        user: user("bob"),
        resume: Vec::new(),
        replay_limit: 100,
    }));
    let attached = late.attach_result("b1").await;
    assert_eq!(attached.map_err(|e| e.code), Err(ErrorCode::Unavailable));
}
