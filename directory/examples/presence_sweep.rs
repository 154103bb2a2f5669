//! How long the Redis presence engine takes to announce a dead gateway's sessions offline.
//!
//! `cargo run --release -p confab-directory --example presence_sweep -- 50000` starts a
//! `redis-server` on a free loopback port, registers that many sessions (one user each) for a
//! gateway that then stops refreshing them, and times the sweep that expires them all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use confab_directory::redis_engine::keys;
use confab_directory::{PresenceSession, PresenceStore, RedisPresence};
use confab_shared::{SessionId, UserId, WorkspaceId};
use confab_testkit::RedisServer;

const TTL: Duration = Duration::from_secs(1);

fn main() {
    let sessions: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("the number of sessions"))
        .unwrap_or(50_000);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(sessions));
}

async fn run(count: usize) {
    let redis = RedisServer::start();
    let presence = RedisPresence::start_with_ttl(&redis.url(), TTL).unwrap();
    let workspace = WorkspaceId::new("bench").unwrap();
    let sessions: Vec<PresenceSession> = (0..count)
        .map(|i| PresenceSession {
            workspace: workspace.clone(),
            user: UserId::new(&format!("user{i}")).unwrap(),
            session: SessionId::new(&format!("s{i}")).unwrap(),
        })
        .collect();
    let started = Instant::now();
    presence.refresh("dead-gateway", &sessions).await.unwrap();
    let registered = started.elapsed();
    // The gateway dies now: wait until every session has expired, then sweep until none is
    // left. The engine's own sweeper (every 5 s) may take part, as other processes' do in a
    // deployment; the figure is the time until every user was announced offline.
    tokio::time::sleep(TTL + Duration::from_millis(200)).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let started = Instant::now();
    let mut announced = 0;
    let mut left: u64 = 1;
    while left > 0 {
        announced += presence.sweep().await.unwrap();
        left = redis::AsyncCommands::zcard(&mut conn, keys::presence_users(&workspace))
            .await
            .unwrap();
    }
    let swept = started.elapsed();
    println!(
        "{count} sessions: registered in {:.2} s; all offline {:.2} s after they expired ({announced} announced by this sweep, the rest by the engine's own)",
        registered.as_secs_f64(),
        swept.as_secs_f64()
    );
}
