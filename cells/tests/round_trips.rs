//! How many requests the cell sends its Redis for operations that touch many members. Every
//! store call is awaited on the cell's single actor thread, so a loop of one round trip per
//! member stalls every channel of the cell for its whole length.
//!
//! Redis counts the requests itself: `total_reads_processed` in `INFO stats` grows by one for
//! each read of a client's socket. A client that waits for each reply before sending the next
//! request costs at least one read per request; a pipeline costs about one read per 16 KiB it
//! sends, however many commands it holds. (`total_commands_processed` would not tell the two
//! apart: it counts the commands of a pipeline, and even those a script runs, one by one.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start_on, Engine};
use confab_shared::link::{CellOp, CellReply, ChannelOp, WorkspaceOp};
use confab_shared::server::ChannelKind;
use confab_shared::UserId;

/// `total_reads_processed` of the Redis at `url`, read over a connection of its own (the
/// `INFO` request itself is one more read).
async fn reads_processed(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("total_reads_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats has total_reads_processed")
}

#[actix_rt::test]
async fn creating_a_channel_with_1000_members_takes_a_few_redis_round_trips_not_one_per_member() {
    let (_cell, mut gw, store) = start_on(Engine::Redis, 10_000).await;
    let url = store.redis.as_ref().unwrap().url();
    let mut probe = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let members: Vec<UserId> = (1..1000)
        .map(|i| UserId::new(&format!("member-{i:04}")).unwrap())
        .collect();
    let op = CellOp::Workspace(WorkspaceOp::CreateChannel {
        name: "everyone".into(),
        kind: ChannelKind::Public,
        members,
    });

    let before = reads_processed(&mut probe).await;
    let reply = gw.op("alice", None, op).await;
    let after = reads_processed(&mut probe).await;

    let Ok(CellReply::Channel(info)) = reply else {
        panic!("expected the channel, got {reply:?}");
    };
    assert_eq!(info.last_seq, 1000, "one member_joined per member");
    let listed = gw
        .op(
            "alice",
            None,
            CellOp::channel(info.id.clone(), ChannelOp::ListMembers),
        )
        .await;
    let Ok(CellReply::Members(listed)) = listed else {
        panic!("expected the members, got {listed:?}");
    };
    assert_eq!(listed.len(), 1000);
    // Minus the read of the second INFO. One round trip per member would be 1,000 reads at
    // the very least (2,000 before the joins were pipelined); about 350 KiB of pipelined
    // scripts take a few dozen reads.
    let requests = after - before - 1;
    println!("redis reads for a channel of 1000 members: {requests}");
    assert!(
        requests < 100,
        "creating the channel took {requests} reads of redis"
    );
}
