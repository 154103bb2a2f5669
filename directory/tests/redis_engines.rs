//! The Redis presence and directory engines against a real `redis-server` and against a real
//! 3-master Redis Cluster: every engine test runs on both (`<test>::single_redis` and
//! `<test>::redis_cluster`), and the cluster's own cases (a dead master, a promoted replica)
//! follow.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use confab_directory::redis_engine::keys;
use confab_directory::{
    CellLoad, CellRegistration, CellTenure, CreateWorkspaceError, Directory, DirectoryChange,
    PresenceSession, PresenceStore, RedisDirectory, RedisPresence, WorkspaceRecord,
};
use confab_directory::{RedisConn, RedisTimeouts};
use confab_shared::server::Status;
use confab_shared::{CellId, SessionId, UserId, WorkspaceId};
use confab_testkit::{RedisCluster, RedisServer, TestRedis};
use futures_util::StreamExt;
use tokio::sync::broadcast;

/// The Redis a test runs against.
type Redis = TestRedis;

/// A connection of the test's own, to read keys by name.
fn conn(redis: &Redis) -> RedisConn {
    RedisConn::open(&redis.url(), RedisTimeouts::default()).unwrap()
}

/// Runs each named `async fn(Redis)` as two tests, `NAME::single_redis` and
/// `NAME::redis_cluster`.
macro_rules! on_single_and_cluster {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test]
            async fn single_redis() {
                super::$test(super::Redis::single()).await;
            }

            #[tokio::test]
            async fn redis_cluster() {
                super::$test(super::Redis::cluster()).await;
            }
        }
    )*};
}

on_single_and_cluster!(
    presence_is_online_while_a_session_lives_and_changes_reach_subscribers,
    sessions_of_a_dead_gateway_expire_and_the_user_is_announced_offline,
    refreshed_sessions_do_not_expire,
    directory_registers_cells_places_workspaces_and_announces_moves,
    engines_answer_unavailable_quickly_while_redis_is_down_and_recover,
    a_refresh_after_the_users_sessions_were_swept_announces_it_online_again,
    a_refresh_of_a_user_whose_sessions_all_expired_announces_it_online_again,
    the_change_stream_reports_a_reset_when_it_reconnects_after_a_redis_restart,
    a_dead_gateways_twenty_thousand_sessions_all_go_offline_within_60_s,
    sessions_across_many_workspaces_are_refreshed_and_swept_offline,
    a_second_claim_of_a_cell_id_supersedes_the_first_process,
    redis_move_records_switch_once_and_an_undo_is_final,
);

fn session(ws: &str, user: &str, id: &str) -> PresenceSession {
    PresenceSession {
        workspace: WorkspaceId::new(ws).unwrap(),
        user: UserId::new(user).unwrap(),
        session: SessionId::new(id).unwrap(),
    }
}

async fn next_change(
    rx: &mut broadcast::Receiver<confab_directory::PresenceChange>,
) -> confab_directory::PresenceChange {
    loop {
        let change = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no change within 10 s")
            .expect("change stream closed");
        // The subscription probe's own changes may still be in flight; they are not the test's.
        if change.user.as_str() != "probe" {
            return change;
        }
    }
}

/// Waits until the pub/sub subscriber is connected, by publishing until a change arrives.
async fn wait_subscribed(
    presence: &RedisPresence,
    rx: &mut broadcast::Receiver<confab_directory::PresenceChange>,
) {
    wait_subscribed_in(presence, rx, "probe").await;
}

/// [`wait_subscribed`] with the probe user in workspace `ws`; drops every change pending.
async fn wait_subscribed_in(
    presence: &RedisPresence,
    rx: &mut broadcast::Receiver<confab_directory::PresenceChange>,
    ws: &str,
) {
    let probe = session(ws, "probe", "probe");
    for _ in 0..100 {
        presence.session_up("g", &probe).await.unwrap();
        presence.session_down("g", &probe).await.unwrap();
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            while rx.try_recv().is_ok() {}
            return;
        }
    }
    panic!("presence subscriber never connected");
}

async fn presence_is_online_while_a_session_lives_and_changes_reach_subscribers(redis: Redis) {
    let presence = RedisPresence::start(&redis.url()).unwrap();
    let mut changes = presence.subscribe();
    wait_subscribed(&presence, &mut changes).await;

    let (s1, s2) = (session("w", "alice", "s1"), session("w", "alice", "s2"));
    presence.session_up("g1", &s1).await.unwrap();
    presence.session_up("g2", &s2).await.unwrap();
    let change = next_change(&mut changes).await;
    assert_eq!(
        (change.user.as_str(), change.status),
        ("alice", Status::Online)
    );

    presence.session_down("g1", &s1).await.unwrap();
    let statuses = presence
        .statuses(
            &s1.workspace,
            &[s1.user.clone(), UserId::new("bob").unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(statuses, vec![Status::Online, Status::Offline]);

    presence.session_down("g2", &s2).await.unwrap();
    let change = next_change(&mut changes).await;
    assert_eq!(
        (change.user.as_str(), change.status),
        ("alice", Status::Offline)
    );
    // The second session's up did not announce a second "online".
    while let Ok(change) = changes.try_recv() {
        assert_eq!(
            change.workspace.as_str(),
            "probe",
            "unexpected change {change:?}"
        );
    }
}

async fn sessions_of_a_dead_gateway_expire_and_the_user_is_announced_offline(redis: Redis) {
    let presence = RedisPresence::start_with_ttl(&redis.url(), Duration::from_millis(300)).unwrap();
    let mut changes = presence.subscribe();
    wait_subscribed(&presence, &mut changes).await;

    let s = session("w", "carol", "s1");
    presence.session_up("dead-gateway", &s).await.unwrap();
    assert_eq!(next_change(&mut changes).await.status, Status::Online);
    // Nobody refreshes the session: it expires, and a sweep announces it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    presence.sweep().await.unwrap();
    let change = next_change(&mut changes).await;
    assert_eq!(
        (change.user.as_str(), change.status),
        ("carol", Status::Offline)
    );
    let statuses = presence
        .statuses(&s.workspace, std::slice::from_ref(&s.user))
        .await
        .unwrap();
    assert_eq!(statuses, vec![Status::Offline]);
}

async fn refreshed_sessions_do_not_expire(redis: Redis) {
    let presence = RedisPresence::start_with_ttl(&redis.url(), Duration::from_millis(300)).unwrap();
    let s = session("w", "dave", "s1");
    presence.session_up("g", &s).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        presence
            .refresh("g", std::slice::from_ref(&s))
            .await
            .unwrap();
    }
    presence.sweep().await.unwrap();
    let statuses = presence
        .statuses(&s.workspace, std::slice::from_ref(&s.user))
        .await
        .unwrap();
    assert_eq!(statuses, vec![Status::Online]);
}

async fn directory_registers_cells_places_workspaces_and_announces_moves(redis: Redis) {
    let directory = RedisDirectory::start(&redis.url()).unwrap();
    let mut changes = directory.subscribe();
    let c1 = CellId::new("c1").unwrap();
    let c2 = CellId::new("c2").unwrap();
    let mut epochs = Vec::new();
    for (id, region) in [(&c1, "us-east"), (&c2, "eu-west")] {
        let claim = directory
            .claim_cell(
                CellRegistration {
                    id: id.clone(),
                    region: region.into(),
                    url: format!("http://{id}"),
                },
                "test",
                0,
                confab_shared::now_ms(),
            )
            .await
            .unwrap();
        epochs.push(claim.epoch);
    }
    let tenure = directory
        .heartbeat_cell(
            &c1,
            epochs[0],
            CellLoad {
                connections: 7,
                max_workspaces: Some(3),
                max_connections: None,
            },
            confab_shared::now_ms(),
        )
        .await
        .unwrap();
    assert_eq!(tenure, CellTenure::Held);
    let ws = WorkspaceId::new("acme").unwrap();
    let record = WorkspaceRecord {
        id: ws.clone(),
        cell: c1.clone(),
        region: "us-east".into(),
        name: None,
    };
    directory.create_workspace(record.clone()).await.unwrap();
    assert!(matches!(
        directory.create_workspace(record).await,
        Err(CreateWorkspaceError::Exists(_))
    ));
    let cells = directory.cells().await.unwrap();
    let first = cells.iter().find(|c| c.id == c1).unwrap();
    assert_eq!((first.workspaces, first.connections), (1, 7));
    // The bounds a heartbeat publishes are read back; an absent one is no bound.
    assert_eq!(
        (first.max_workspaces, first.max_connections),
        (Some(3), None)
    );
    let second = cells.iter().find(|c| c.id == c2).unwrap();
    assert_eq!(
        (second.max_workspaces, second.max_connections),
        (None, None)
    );

    assert!(directory.drain_cell(&c2).await.unwrap());
    assert!(!directory
        .drain_cell(&CellId::new("nope").unwrap())
        .await
        .unwrap());
    assert!(directory
        .cells()
        .await
        .unwrap()
        .iter()
        .any(|c| c.id == c2 && c.draining));

    // The subscriber may connect after the first publishes; keep moving until one is seen.
    let mut seen = false;
    for _ in 0..50 {
        directory.move_workspace(&ws, &c2, "eu-west").await.unwrap();
        directory.move_workspace(&ws, &c1, "us-east").await.unwrap();
        if let Ok(Ok(change)) =
            tokio::time::timeout(Duration::from_millis(100), changes.recv()).await
        {
            if matches!(change, DirectoryChange::WorkspaceMoved { .. }) {
                seen = true;
                break;
            }
        }
    }
    assert!(seen, "no move was announced");
    let record = directory.workspace(&ws).await.unwrap().unwrap();
    assert_eq!(record.cell, c1);
    let cells = directory.cells().await.unwrap();
    assert_eq!(cells.iter().map(|c| c.workspaces).sum::<u64>(), 1);
    assert_eq!(cells.iter().find(|c| c.id == c1).unwrap().workspaces, 1);
    assert_eq!(directory.workspaces().await.unwrap().len(), 1);

    directory.delete_workspace(&ws).await.unwrap();
    assert_eq!(directory.workspace(&ws).await.unwrap(), None);
    let cells = directory.cells().await.unwrap();
    assert_eq!(cells.iter().map(|c| c.workspaces).sum::<u64>(), 0);
    assert!(directory.workspaces().await.unwrap().is_empty());
}

async fn engines_answer_unavailable_quickly_while_redis_is_down_and_recover(mut redis: Redis) {
    let directory = RedisDirectory::start(&redis.url()).unwrap();
    assert!(directory.cells().await.is_ok());
    redis.kill();
    let started = std::time::Instant::now();
    assert!(directory.cells().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a request hung while redis was down"
    );
    redis.restart();
    let mut recovered = false;
    for _ in 0..100 {
        if directory.cells().await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the engine did not recover after redis came back"
    );
}

async fn a_refresh_after_the_users_sessions_were_swept_announces_it_online_again(redis: Redis) {
    let presence = RedisPresence::start_with_ttl(&redis.url(), Duration::from_millis(300)).unwrap();
    let mut changes = presence.subscribe();
    wait_subscribed(&presence, &mut changes).await;

    let s = session("w", "erin", "s1");
    presence.session_up("g", &s).await.unwrap();
    assert_eq!(next_change(&mut changes).await.status, Status::Online);
    // The gateway cannot reach Redis for longer than the TTL: another process sweeps.
    tokio::time::sleep(Duration::from_millis(400)).await;
    presence.sweep().await.unwrap();
    assert_eq!(next_change(&mut changes).await.status, Status::Offline);
    // The gateway is back and refreshes its session: erin is online, and announced so.
    presence
        .refresh("g", std::slice::from_ref(&s))
        .await
        .unwrap();
    let change = next_change(&mut changes).await;
    assert_eq!(
        (change.user.as_str(), change.status),
        ("erin", Status::Online)
    );
    let statuses = presence
        .statuses(&s.workspace, std::slice::from_ref(&s.user))
        .await
        .unwrap();
    assert_eq!(statuses, vec![Status::Online]);
    // Further refreshes of a user that is online announce nothing.
    presence
        .refresh("g", std::slice::from_ref(&s))
        .await
        .unwrap();
    presence.session_down("g", &s).await.unwrap();
    assert_eq!(next_change(&mut changes).await.status, Status::Offline);
}

async fn a_refresh_of_a_user_whose_sessions_all_expired_announces_it_online_again(redis: Redis) {
    let presence = RedisPresence::start_with_ttl(&redis.url(), Duration::from_millis(300)).unwrap();
    let mut changes = presence.subscribe();
    wait_subscribed(&presence, &mut changes).await;

    let s = session("w", "fay", "s1");
    presence.session_up("g", &s).await.unwrap();
    assert_eq!(next_change(&mut changes).await.status, Status::Online);
    // Expired but not swept yet: statuses already read fay as offline.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let statuses = presence
        .statuses(&s.workspace, std::slice::from_ref(&s.user))
        .await
        .unwrap();
    assert_eq!(statuses, vec![Status::Offline]);
    presence
        .refresh("g", std::slice::from_ref(&s))
        .await
        .unwrap();
    let change = next_change(&mut changes).await;
    assert_eq!(
        (change.user.as_str(), change.status),
        ("fay", Status::Online)
    );
}

async fn the_change_stream_reports_a_reset_when_it_reconnects_after_a_redis_restart(
    mut redis: Redis,
) {
    let presence = RedisPresence::start(&redis.url()).unwrap();
    let mut resets = presence.resets();
    tokio::time::timeout(Duration::from_secs(10), resets.changed())
        .await
        .expect("the first subscription was not reported")
        .unwrap();
    redis.restart();
    tokio::time::timeout(Duration::from_secs(20), resets.changed())
        .await
        .expect("the resubscription after the restart was not reported")
        .unwrap();
    assert!(*resets.borrow() >= 2);
}

/// Counts the `offline` announcements on a subscription of the test's own, until `expected`.
async fn count_offline(redis: &Redis, expected: usize) -> tokio::task::JoinHandle<usize> {
    let client = redis::Client::open(redis.pubsub_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("confab:presence").await.unwrap();
    tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        let mut offline = 0;
        while offline < expected {
            let Some(message) = messages.next().await else {
                break;
            };
            let payload: serde_json::Value =
                serde_json::from_slice(message.get_payload_bytes()).unwrap();
            if payload["status"] == "offline" {
                offline += 1;
            }
        }
        offline
    })
}

/// Waits (bounded) until the presence index is empty: every workspace swept to the end.
async fn wait_presence_index_empty(redis: &Redis) {
    let mut conn = conn(redis);
    for _ in 0..100 {
        let due: u64 = redis::AsyncCommands::zcard(&mut conn, keys::PRESENCE_DUE)
            .await
            .unwrap();
        if due == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the presence index still lists workspaces");
}

async fn a_dead_gateways_twenty_thousand_sessions_all_go_offline_within_60_s(redis: Redis) {
    const SESSIONS: usize = 20_000;
    let presence = RedisPresence::start_with_ttl(&redis.url(), Duration::from_secs(5)).unwrap();
    let offline = count_offline(&redis, SESSIONS).await;

    let sessions: Vec<PresenceSession> = (0..SESSIONS)
        .map(|i| session("w", &format!("user{i}"), &format!("s{i}")))
        .collect();
    presence.refresh("dead-gateway", &sessions).await.unwrap();
    let statuses = presence
        .statuses(&sessions[0].workspace, &[sessions[0].user.clone()])
        .await
        .unwrap();
    assert_eq!(statuses, vec![Status::Online]);
    // The gateway dies: nobody refreshes them again. SPEC: gone within 60 s.
    let started = std::time::Instant::now();
    let announced = tokio::time::timeout(Duration::from_secs(60), offline)
        .await
        .unwrap_or_else(|_| panic!("not all {SESSIONS} users went offline within 60 s"))
        .unwrap();
    assert_eq!(announced, SESSIONS);
    eprintln!(
        "{SESSIONS} sessions offline {:.1} s after their last refresh (ttl 5 s)",
        started.elapsed().as_secs_f64()
    );
    let left: u64 = redis::AsyncCommands::zcard(
        &mut conn(&redis),
        keys::presence_users(&WorkspaceId::new("w").unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(left, 0);
    wait_presence_index_empty(&redis).await;
}

/// Sessions of 300 workspaces (on every master of a cluster) in one refresh: all online, and
/// once they expire the sweep announces each user offline exactly once.
async fn sessions_across_many_workspaces_are_refreshed_and_swept_offline(redis: Redis) {
    const WORKSPACES: usize = 300;
    const USERS: usize = 5;
    // Long enough for the refresh and the reads on a busy machine.
    let ttl = Duration::from_secs(3);
    let presence = RedisPresence::start_with_ttl(&redis.url(), ttl).unwrap();
    let offline = count_offline(&redis, WORKSPACES * USERS).await;
    let sessions: Vec<PresenceSession> = (0..WORKSPACES)
        .flat_map(|w| (0..USERS).map(move |u| session(&format!("ws{w}"), &format!("u{u}"), "s")))
        .collect();
    presence.refresh("g", &sessions).await.unwrap();
    for w in [0, WORKSPACES / 2, WORKSPACES - 1] {
        let users: Vec<UserId> = (0..USERS)
            .map(|u| UserId::new(&format!("u{u}")).unwrap())
            .collect();
        let statuses = presence
            .statuses(&WorkspaceId::new(&format!("ws{w}")).unwrap(), &users)
            .await
            .unwrap();
        assert_eq!(statuses, vec![Status::Online; USERS]);
    }
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    presence.sweep().await.unwrap();
    let announced = tokio::time::timeout(Duration::from_secs(30), offline)
        .await
        .expect("not every user was announced offline")
        .unwrap();
    assert_eq!(announced, WORKSPACES * USERS);
    wait_presence_index_empty(&redis).await;
    // Exactly once: a second sweep finds nobody.
    assert_eq!(presence.sweep().await.unwrap(), 0);
}

async fn a_second_claim_of_a_cell_id_supersedes_the_first_process(redis: Redis) {
    let directory = RedisDirectory::start(&redis.url()).unwrap();
    let c1 = CellId::new("c1").unwrap();
    let registration = |url: &str| CellRegistration {
        id: c1.clone(),
        region: "us-east".into(),
        url: url.into(),
    };
    let now = confab_shared::now_ms();
    let first = directory
        .claim_cell(registration("http://a"), "pid 1 on a", 0, now)
        .await
        .unwrap();
    assert_eq!(first.previous, None);
    // The second claim does not wait for the first holder, names it, and supersedes it.
    let second = directory
        .claim_cell(registration("http://b"), "pid 2 on b", 0, now + 1)
        .await
        .unwrap();
    assert!(second.epoch > first.epoch);
    let previous = second.previous.expect("the first holder");
    assert_eq!(
        (
            previous.epoch,
            previous.process.as_str(),
            previous.url.as_str()
        ),
        (first.epoch, "pid 1 on a", "http://a")
    );
    let load = CellLoad::default();
    assert_eq!(
        directory
            .heartbeat_cell(&c1, first.epoch, load, now + 2)
            .await
            .unwrap(),
        CellTenure::Superseded {
            epoch: second.epoch
        }
    );
    // The superseded process cannot take the registration back either.
    assert_eq!(
        directory
            .register_cell(registration("http://a"), "pid 1 on a", first.epoch, now + 3)
            .await
            .unwrap(),
        CellTenure::Superseded {
            epoch: second.epoch
        }
    );
    assert_eq!(
        directory
            .heartbeat_cell(&c1, second.epoch, load, now + 4)
            .await
            .unwrap(),
        CellTenure::Held
    );
    let cells = directory.cells().await.unwrap();
    assert_eq!(cells.first().map(|c| c.url.as_str()), Some("http://b"));
    // A claim never goes below a floor (the cell's store may know a higher epoch than a
    // directory that lost its data).
    let third = directory
        .claim_cell(registration("http://c"), "pid 3 on c", 100, now + 5)
        .await
        .unwrap();
    assert_eq!(third.epoch, 100);
}

/// The move record's rules, on both engines: one move per workspace, epochs never reused,
/// the switch only from `frozen` and only from the source, and an undo that cannot be undone.
async fn move_records_switch_once_and_an_undo_is_final(directory: &dyn Directory) {
    use confab_directory::{MoveBegun, MovePhase, MoveRecord};
    let ws = WorkspaceId::new("acme").unwrap();
    let (c1, c2) = (CellId::new("c1").unwrap(), CellId::new("c2").unwrap());
    let plan = |to: &CellId| MoveRecord {
        workspace: ws.clone(),
        from: c1.clone(),
        to: to.clone(),
        to_region: "eu".into(),
        epoch: 0,
        phase: MovePhase::Copying,
        lease_until_ms: 1,
    };
    assert_eq!(
        directory.begin_move(plan(&c2)).await.unwrap(),
        MoveBegun::UnknownWorkspace
    );
    directory
        .create_workspace(WorkspaceRecord {
            id: ws.clone(),
            cell: c1.clone(),
            region: "us".into(),
            name: None,
        })
        .await
        .unwrap();
    let MoveBegun::Started(first) = directory.begin_move(plan(&c2)).await.unwrap() else {
        panic!("the first move starts")
    };
    assert!(matches!(
        directory.begin_move(plan(&c2)).await.unwrap(),
        MoveBegun::Busy(_)
    ));
    assert!(
        !directory.switch_move(&ws, first.epoch).await.unwrap(),
        "no switch before the freeze"
    );
    assert!(directory
        .update_move(&ws, first.epoch, MovePhase::Undoing, 5)
        .await
        .unwrap());
    assert!(
        !directory
            .update_move(&ws, first.epoch, MovePhase::Frozen, 5)
            .await
            .unwrap(),
        "an undo is final"
    );
    assert!(!directory.switch_move(&ws, first.epoch).await.unwrap());
    directory.end_move(&ws, first.epoch).await.unwrap();
    assert_eq!(directory.move_record(&ws).await.unwrap(), None);

    let MoveBegun::Started(second) = directory.begin_move(plan(&c2)).await.unwrap() else {
        panic!("a new move starts once the first is forgotten")
    };
    assert!(second.epoch > first.epoch, "epochs are never reused");
    assert!(directory
        .update_move(&ws, second.epoch, MovePhase::Frozen, 5)
        .await
        .unwrap());
    assert!(
        !directory.switch_move(&ws, first.epoch).await.unwrap(),
        "a stale epoch"
    );
    assert!(directory.switch_move(&ws, second.epoch).await.unwrap());
    assert!(
        !directory.switch_move(&ws, second.epoch).await.unwrap(),
        "only once"
    );
    let record = directory.workspace(&ws).await.unwrap().unwrap();
    assert_eq!((record.cell, record.region.as_str()), (c2.clone(), "eu"));
    assert_eq!(
        directory.move_record(&ws).await.unwrap().map(|m| m.phase),
        Some(MovePhase::Switched)
    );
    assert_eq!(directory.moves().await.unwrap().len(), 1);
    assert_eq!(directory.workspaces().await.unwrap().len(), 1);
}

async fn redis_move_records_switch_once_and_an_undo_is_final(redis: Redis) {
    let directory = RedisDirectory::start(&redis.url()).unwrap();
    move_records_switch_once_and_an_undo_is_final(directory.as_ref()).await;
}

#[tokio::test]
async fn memory_move_records_switch_once_and_an_undo_is_final() {
    let directory = confab_directory::MemoryDirectory::new();
    move_records_switch_once_and_an_undo_is_final(&directory).await;
}

// ---------------------------------------------------------------------------------------
// A Redis Cluster losing a master

/// Workspace ids `ws0`, `ws1`, … whose slot's master is `node` (`wanted`: or is not).
fn workspace_on(cluster: &RedisCluster, node: usize, wanted: bool) -> WorkspaceId {
    (0..1000)
        .map(|i| WorkspaceId::new(&format!("ws{i}")).unwrap())
        .find(|ws| (cluster.master_of(&keys::workspace(ws)) == node) == wanted)
        .expect("a workspace id for that master")
}

/// Waits for `user`'s change to `status`, keeping every change read meanwhile in `seen`.
async fn wait_change(
    rx: &mut broadcast::Receiver<confab_directory::PresenceChange>,
    seen: &mut Vec<confab_directory::PresenceChange>,
    user: &str,
    status: Status,
) {
    loop {
        let change = next_change(rx).await;
        let found = change.user.as_str() == user && change.status == status;
        seen.push(change);
        if found {
            return;
        }
    }
}

async fn register(directory: &RedisDirectory, id: &CellId) -> u64 {
    directory
        .claim_cell(
            CellRegistration {
                id: id.clone(),
                region: "r".into(),
                url: format!("http://{id}"),
            },
            "test",
            0,
            confab_shared::now_ms(),
        )
        .await
        .unwrap()
        .epoch
}

/// Without replicas, a dead master costs only the keys of its slots: the workspace whose
/// directory slot it held answers `unavailable` (quickly), the other workspace, the cell
/// registry and presence go on, engines started during the outage run their scripts on the
/// nodes left, and the workspace is back with its record once its master restarts.
#[tokio::test]
async fn a_dead_master_makes_only_the_workspaces_of_its_slots_unavailable() {
    let mut cluster = RedisCluster::start(3);
    let (cells_node, due_node) = (
        cluster.master_of(keys::CELLS),
        cluster.master_of(keys::PRESENCE_DUE),
    );
    let victim = (0..3)
        .find(|n| *n != cells_node && *n != due_node)
        .expect("a master holding neither the cell registry nor the presence index");
    let lost = workspace_on(&cluster, victim, true);
    let kept = workspace_on(&cluster, victim, false);
    let url = cluster.url();
    let directory = RedisDirectory::start(&url).unwrap();
    let ttl = Duration::from_secs(2);
    let presence = RedisPresence::start_with_ttl(&url, ttl).unwrap();
    let mut changes = presence.subscribe();
    wait_subscribed(&presence, &mut changes).await;
    let c1 = CellId::new("c1").unwrap();
    let epoch = register(&directory, &c1).await;
    for ws in [&lost, &kept] {
        directory
            .create_workspace(WorkspaceRecord {
                id: ws.clone(),
                cell: c1.clone(),
                region: "r".into(),
                name: None,
            })
            .await
            .unwrap();
    }
    let (lost_session, kept_session) = (
        session(lost.as_str(), "ann", "s1"),
        session(kept.as_str(), "bea", "s1"),
    );
    presence.session_up("g", &lost_session).await.unwrap();
    presence.session_up("g", &kept_session).await.unwrap();
    while changes.try_recv().is_ok() {}

    cluster.kill_node(victim);
    let started = std::time::Instant::now();
    assert!(directory.workspace(&lost).await.is_err());
    assert!(presence.session_up("g", &lost_session).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a request to the dead master hung"
    );
    // Listing every workspace needs every master.
    assert!(directory.workspaces().await.is_err());

    // Everything else goes on. The change stream may have been on the dead node: it resets
    // and subscribes to another (changes published in between are lost, as on a restart of a
    // single Redis; `resets` tells the gateways to read the statuses again).
    wait_subscribed_in(&presence, &mut changes, kept.as_str()).await;
    assert_eq!(
        directory.workspace(&kept).await.unwrap().map(|w| w.cell),
        Some(c1.clone())
    );
    let tenure = directory
        .heartbeat_cell(&c1, epoch, CellLoad::default(), confab_shared::now_ms())
        .await
        .unwrap();
    assert_eq!(tenure, CellTenure::Held);
    let c2 = CellId::new("c2").unwrap();
    register(&directory, &c2).await;
    directory.move_workspace(&kept, &c2, "r").await.unwrap();
    let second = session(kept.as_str(), "cid", "s2");
    presence.session_up("g", &second).await.unwrap();
    let mut seen = Vec::new();
    wait_change(&mut changes, &mut seen, "cid", Status::Online).await;
    // Engines started during the outage run their scripts on the masters left (a script
    // load on every node would fail).
    let late_directory = RedisDirectory::start(&url).unwrap();
    register(&late_directory, &CellId::new("c3").unwrap()).await;
    let late_presence = RedisPresence::start(&url).unwrap();
    late_presence
        .session_up("g2", &session(kept.as_str(), "dot", "s3"))
        .await
        .unwrap();
    late_presence
        .session_down("g2", &session(kept.as_str(), "dot", "s3"))
        .await
        .unwrap();
    // Every session expires. A refresh of sessions of both workspaces fails (one is on the
    // dead master) but refreshes the kept workspace's: eve is online again. The sweep says
    // it could not sweep the lost workspace and announces the kept one's others offline.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    let eve = session(kept.as_str(), "eve", "s4");
    assert!(presence
        .refresh("g", &[lost_session.clone(), eve.clone()])
        .await
        .is_err());
    wait_change(&mut changes, &mut seen, "eve", Status::Online).await;
    assert!(presence.sweep().await.is_err());
    wait_change(&mut changes, &mut seen, "bea", Status::Offline).await;
    wait_change(&mut changes, &mut seen, "cid", Status::Offline).await;
    assert_eq!(
        presence
            .statuses(&kept, &[UserId::new("eve").unwrap()])
            .await
            .unwrap(),
        vec![Status::Online]
    );
    assert!(
        seen.iter().all(|c| c.workspace == kept),
        "a change of the lost workspace: {seen:?}"
    );
    assert!(!seen
        .iter()
        .any(|c| c.user.as_str() == "eve" && c.status == Status::Offline));

    // The master comes back with its data: the lost workspace is served again, unchanged.
    cluster.restart_node(victim);
    let mut back = None;
    for _ in 0..200 {
        if let Ok(record) = directory.workspace(&lost).await {
            back = record;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back.map(|w| w.cell), Some(c1.clone()));
    let cells = directory.cells().await.unwrap();
    let count = |id: &CellId| {
        cells
            .iter()
            .find(|c| &c.id == id)
            .map_or(0, |c| c.workspaces)
    };
    assert_eq!((count(&c1), count(&c2)), (1, 1));
}

/// With a replica per master, a killed master's replica takes over: the workspace of its
/// slots is served again with its record and its move record, and moves go on.
#[tokio::test]
async fn a_promoted_replica_serves_the_workspace_of_a_killed_master_with_its_records() {
    use confab_directory::{MoveBegun, MovePhase, MoveRecord};
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    let ws = WorkspaceId::new("acme").unwrap();
    let master = cluster.master_of(&keys::workspace(&ws));
    let directory = RedisDirectory::start(&cluster.url()).unwrap();
    let (c1, c2) = (CellId::new("c1").unwrap(), CellId::new("c2").unwrap());
    directory
        .create_workspace(WorkspaceRecord {
            id: ws.clone(),
            cell: c1.clone(),
            region: "r".into(),
            name: None,
        })
        .await
        .unwrap();
    let MoveBegun::Started(begun) = directory
        .begin_move(MoveRecord {
            workspace: ws.clone(),
            from: c1.clone(),
            to: c2.clone(),
            to_region: "r".into(),
            epoch: 0,
            phase: MovePhase::Copying,
            lease_until_ms: 1,
        })
        .await
        .unwrap()
    else {
        panic!("the move starts")
    };
    cluster.wait_replicated(master);
    cluster.kill_node(master);
    cluster.wait_failover(&keys::workspace(&ws), master);
    let mut record = None;
    for _ in 0..300 {
        if let Ok(found) = directory.workspace(&ws).await {
            record = found;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(record.map(|w| w.cell), Some(c1));
    assert!(directory
        .update_move(&ws, begun.epoch, MovePhase::Frozen, 5)
        .await
        .unwrap());
    assert!(directory.switch_move(&ws, begun.epoch).await.unwrap());
    directory.end_move(&ws, begun.epoch).await.unwrap();
    assert_eq!(
        directory.workspace(&ws).await.unwrap().map(|w| w.cell),
        Some(c2)
    );
}

/// infra/migrate-directory-keys.lua moves a directory written by a build before hash tags
/// (one Redis) to the current layout: the engines then read its workspaces, cells, counts,
/// epochs and moves, and a second run changes nothing.
#[tokio::test]
async fn the_migration_script_moves_a_directory_of_the_old_layout_to_the_current_one() {
    use confab_directory::{MoveBegun, MovePhase, MoveRecord};
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let now = confab_shared::now_ms();
    let old_move = r#"{"workspace":"acme","from":"c1","to":"c2","to_region":"r","epoch":7,"phase":"copying","lease_until_ms":1}"#;
    redis::pipe()
        .sadd("confab:cells", &["c1", "c2"])
        .hset_multiple(
            "confab:cell:c1",
            &[
                ("region", "r"),
                ("url", "http://c1"),
                ("heartbeat", &now.to_string()),
                ("epoch", "3"),
                ("process", "p1"),
            ],
        )
        .hset_multiple(
            "confab:cell:c2",
            &[
                ("region", "r"),
                ("url", "http://c2"),
                ("heartbeat", &now.to_string()),
                ("epoch", "1"),
                ("process", "p2"),
            ],
        )
        .set(
            "confab:ws:acme",
            r#"{"id":"acme","cell":"c1","region":"r","name":"Acme"}"#,
        )
        .set(
            "confab:ws:globex",
            r#"{"id":"globex","cell":"c1","region":"r","name":null}"#,
        )
        .hset("confab:cellws", "c1", 2)
        .set("confab:move:acme", old_move)
        .set("confab:move_epoch", 7)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let script = redis::Script::new(include_str!("../../infra/migrate-directory-keys.lua"));
    let moved: i64 = script.invoke_async(&mut conn).await.unwrap();
    assert_eq!(moved, 2);
    let again: i64 = script.invoke_async(&mut conn).await.unwrap();
    assert_eq!(again, 0, "a second run moves nothing");

    let directory = RedisDirectory::start(&server.url()).unwrap();
    let acme = WorkspaceId::new("acme").unwrap();
    let record = directory.workspace(&acme).await.unwrap().unwrap();
    assert_eq!(
        (record.cell.as_str(), record.name.as_deref()),
        ("c1", Some("Acme"))
    );
    assert_eq!(directory.workspaces().await.unwrap().len(), 2);
    let cells = directory.cells().await.unwrap();
    let counts: Vec<(&str, u64)> = cells
        .iter()
        .map(|c| (c.id.as_str(), c.workspaces))
        .collect();
    assert_eq!(counts, vec![("c1", 2), ("c2", 0)]);
    let c1 = CellId::new("c1").unwrap();
    let tenure = directory
        .heartbeat_cell(&c1, 3, CellLoad::default(), now + 1)
        .await
        .unwrap();
    assert_eq!(tenure, CellTenure::Held, "the cell keeps its epoch");
    let interrupted = directory.move_record(&acme).await.unwrap().unwrap();
    assert_eq!(interrupted.epoch, 7);
    directory.end_move(&acme, 7).await.unwrap();
    let MoveBegun::Started(next) = directory
        .begin_move(MoveRecord {
            phase: MovePhase::Copying,
            ..interrupted
        })
        .await
        .unwrap()
    else {
        panic!("a move starts")
    };
    assert!(next.epoch > 7, "move epochs go on from the old counter");
}
