//! The Redis presence and directory engines against a real `redis-server`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use confab_directory::{
    CellLoad, CellRegistration, CellTenure, CreateWorkspaceError, Directory, DirectoryChange,
    PresenceSession, PresenceStore, RedisDirectory, RedisPresence, WorkspaceRecord,
};
use confab_shared::server::Status;
use confab_shared::{CellId, SessionId, UserId, WorkspaceId};
use confab_testkit::RedisServer;
use futures_util::StreamExt;
use tokio::sync::broadcast;

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
        if change.workspace.as_str() != "probe" {
            return change;
        }
    }
}

/// Waits until the pub/sub subscriber is connected, by publishing until a change arrives.
async fn wait_subscribed(
    presence: &RedisPresence,
    rx: &mut broadcast::Receiver<confab_directory::PresenceChange>,
) {
    let probe = session("probe", "probe", "probe");
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

#[tokio::test]
async fn presence_is_online_while_a_session_lives_and_changes_reach_subscribers() {
    let redis = RedisServer::start();
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

#[tokio::test]
async fn sessions_of_a_dead_gateway_expire_and_the_user_is_announced_offline() {
    let redis = RedisServer::start();
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

#[tokio::test]
async fn refreshed_sessions_do_not_expire() {
    let redis = RedisServer::start();
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

#[tokio::test]
async fn directory_registers_cells_places_workspaces_and_announces_moves() {
    let redis = RedisServer::start();
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
}

#[tokio::test]
async fn engines_answer_unavailable_quickly_while_redis_is_down_and_recover() {
    let mut redis = RedisServer::start();
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

#[tokio::test]
async fn a_refresh_after_the_users_sessions_were_swept_announces_it_online_again() {
    let redis = RedisServer::start();
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

#[tokio::test]
async fn a_refresh_of_a_user_whose_sessions_all_expired_announces_it_online_again() {
    let redis = RedisServer::start();
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

#[tokio::test]
async fn the_change_stream_reports_a_reset_when_it_reconnects_after_a_redis_restart() {
    let mut redis = RedisServer::start();
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

#[tokio::test]
async fn a_dead_gateways_twenty_thousand_sessions_all_go_offline_within_60_s() {
    const SESSIONS: usize = 20_000;
    let redis = RedisServer::start();
    let presence = RedisPresence::start_with_ttl(&redis.url(), Duration::from_secs(5)).unwrap();
    // Count the offline announcements on a subscription of the test's own.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("confab:presence").await.unwrap();
    let offline = tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        let mut offline = 0;
        while offline < SESSIONS {
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
    });

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
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let left: u64 = redis::AsyncCommands::zcard(&mut conn, "confab:presence:users")
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_second_claim_of_a_cell_id_supersedes_the_first_process() {
    let redis = RedisServer::start();
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

#[tokio::test]
async fn redis_move_records_switch_once_and_an_undo_is_final() {
    let redis = RedisServer::start();
    let directory = RedisDirectory::start(&redis.url()).unwrap();
    move_records_switch_once_and_an_undo_is_final(directory.as_ref()).await;
}

#[tokio::test]
async fn memory_move_records_switch_once_and_an_undo_is_final() {
    let directory = confab_directory::MemoryDirectory::new();
    move_records_switch_once_and_an_undo_is_final(&directory).await;
}
