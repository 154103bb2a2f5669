//! The `CellStore` conformance suite: the same checks run against `MemoryStore` (the reference
//! semantics) and `RedisStore`, on a fresh real `redis-server` per test and on a fresh Redis
//! Cluster of three masters per test, so the engines can never drift apart unnoticed. Each
//! check is an `async fn` over `&dyn CellStore`; the `conformance!` macro turns it into
//! `memory::<check>`, `redis::<check>` and `redis_cluster::<check>` tests. Checks that only
//! make sense for Redis (fencing, moves, restarts) take a [`Backing`] and run as `redis::` and
//! `redis_cluster::` tests; those of a single Redis only (the earlier key layout, outages) and
//! of a cluster only (where keys live) are at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_cells::store::{
    ChannelMeta, ChannelSnapshot, CreateOutcome, MessageQuery, MoveMark, NewChannel, ReadMarker,
};
use confab_cells::{CellStore, MemoryStore, RedisStore, StoreError};
use confab_directory::{RedisConn, RedisTimeouts};
use confab_shared::server::{ChannelKind, Event, MessageView};
use confab_shared::{ChannelId, UserId, WorkspaceId};
use confab_testkit::{RedisCluster, RedisServer};

/// A store under test, with whatever must outlive it (the Redis processes).
struct Engine {
    store: Arc<dyn CellStore>,
    _backing: Option<Backing>,
}

fn memory_engine() -> Engine {
    Engine {
        store: Arc::new(MemoryStore::new()),
        _backing: None,
    }
}

fn redis_engine(backing: Backing) -> Engine {
    Engine {
        store: Arc::new(backing.store()),
        _backing: Some(backing),
    }
}

/// The Redis a store runs on: one server, or a cluster of three masters.
enum Backing {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Backing {
    fn single() -> Backing {
        Backing::Single(RedisServer::start())
    }

    fn cluster() -> Backing {
        Backing::Cluster(RedisCluster::start(3))
    }

    /// Another Redis of the same kind (a second cell's store).
    fn another(&self) -> Backing {
        match self {
            Backing::Single(_) => Backing::single(),
            Backing::Cluster(_) => Backing::cluster(),
        }
    }

    fn url(&self) -> String {
        match self {
            Backing::Single(server) => server.url(),
            Backing::Cluster(cluster) => cluster.url(),
        }
    }

    /// A store on this Redis, with its own connection (another cell process).
    fn store(&self) -> RedisStore {
        RedisStore::connect(&self.url()).unwrap()
    }

    /// A plain connection, for what a test reads or writes behind the store's back (routed
    /// by key in a cluster).
    fn raw(&self) -> RedisConn {
        RedisConn::open(&self.url(), RedisTimeouts::default()).unwrap()
    }

    /// Kills every Redis process and starts it again on its port with its data.
    fn restart(&mut self) {
        match self {
            Backing::Single(server) => server.restart(),
            Backing::Cluster(cluster) => {
                for node in &mut cluster.nodes {
                    node.kill();
                }
                for node in &mut cluster.nodes {
                    node.restart();
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                while !cluster.nodes.iter().all(|n| n.cluster_ok()) {
                    assert!(Instant::now() < deadline, "the cluster did not come back");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// One test per engine for every check named: `memory::<check>`, `redis::<check>` and
/// `redis_cluster::<check>`; then, for every Redis-only check (over a [`Backing`]),
/// `redis::<check>` and `redis_cluster::<check>`.
macro_rules! conformance {
    ([$($check:ident),+ $(,)?], [$($redis_check:ident),+ $(,)?] $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $check() {
                    let engine = super::memory_engine();
                    super::$check(&*engine.store).await;
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $check() {
                    let engine = super::redis_engine(super::Backing::single());
                    super::$check(&*engine.store).await;
                }
            )+
            $(
                #[tokio::test]
                async fn $redis_check() {
                    super::$redis_check(super::Backing::single()).await;
                }
            )+
        }
        mod redis_cluster {
            $(
                #[tokio::test]
                async fn $check() {
                    let engine = super::redis_engine(super::Backing::cluster());
                    super::$check(&*engine.store).await;
                }
            )+
            $(
                #[tokio::test]
                async fn $redis_check() {
                    super::$redis_check(super::Backing::cluster()).await;
                }
            )+
        }
    };
}

conformance!(
    [
        workspaces_are_created_once_and_counted,
        create_channel_in_an_unknown_workspace_writes_nothing,
        create_channel_refuses_a_taken_id_and_writes_nothing,
        create_channel_refuses_only_a_name_taken_by_a_public_channel,
        create_channel_refuses_a_channel_beyond_the_workspace_bound,
        a_dm_pair_owns_one_channel,
        workspace_ids_that_look_like_key_parts_do_not_collide,
        load_channel_snapshot_follows_joins_and_leaves,
        load_channel_of_an_unknown_channel_or_workspace_is_none,
        channel_summaries_keep_the_given_order_and_skip_unknown_ids,
        public_channels_are_ordered_by_id_without_private_or_dm_channels,
        append_refuses_a_seq_that_is_not_the_next_one,
        append_to_a_missing_channel_is_no_such_channel,
        raise_last_seq_moves_last_seq_up_from_the_expected_value_only,
        append_refuses_ephemeral_events_and_writes_nothing,
        concurrent_appends_of_the_same_seq_let_exactly_one_win,
        a_message_is_stored_as_sent_with_its_idempotency_key,
        edit_replaces_the_text_and_marks_the_message_edited,
        delete_clears_the_text_and_marks_the_message_deleted,
        edit_or_delete_of_a_missing_message_is_logged_without_inventing_one,
        join_and_leave_update_members_and_user_channels,
        append_joins_writes_every_join_in_order,
        append_joins_stops_before_a_user_with_no_room,
        channel_counts_and_read_markers_in_follow_the_users_given,
        trimming_keeps_the_newest_events_and_drops_idempotency_keys_but_not_messages,
        trimming_keeps_a_client_msg_id_reused_by_a_newer_message,
        a_retention_of_zero_keeps_the_newest_event,
        events_after_pages_by_after_and_max,
        find_client_msg_is_per_user_and_per_channel,
        messages_page_by_after_before_and_limit_in_ascending_order,
        messages_of_an_empty_range_or_unknown_channel_are_empty,
        read_markers_never_move_back,
        workspaces_never_see_each_others_data,
    ],
    [
        redis_store_survives_a_restart_when_durable,
        a_store_claimed_by_a_newer_epoch_refuses_every_write_of_the_older_one,
        a_claim_rebuilds_the_served_index_from_the_workspaces_served,
        redis_store_ignores_a_private_channels_name_claimed_by_an_earlier_version,
        a_workspace_moves_to_another_store_with_the_writes_made_during_the_copy,
        an_undone_import_leaves_nothing_and_the_source_serves_on,
    ]
);

// ---- fixtures ----

const TS: u64 = 1_700_000_000_000;

fn ws(s: &str) -> WorkspaceId {
    WorkspaceId::new(s).unwrap()
}
fn ch(s: &str) -> ChannelId {
    ChannelId::new(s).unwrap()
}
fn user(s: &str) -> UserId {
    UserId::new(s).unwrap()
}
fn users(names: &[&str]) -> Vec<UserId> {
    names.iter().map(|n| user(n)).collect()
}

fn channel(id: &str, name: &str, kind: ChannelKind) -> NewChannel {
    NewChannel {
        meta: ChannelMeta {
            id: ch(id),
            name: name.to_string(),
            kind,
        },
        dm_pair: None,
        max_channels: None,
    }
}

fn dm(id: &str, a: &str, b: &str) -> NewChannel {
    NewChannel {
        meta: ChannelMeta {
            id: ch(id),
            name: format!("{a},{b}"),
            kind: ChannelKind::Dm,
        },
        dm_pair: Some((user(a), user(b))),
        max_channels: None,
    }
}

fn message(channel: &str, seq: u64, who: &str, text: &str, cmid: Option<&str>) -> Event {
    Event::Message {
        channel: ch(channel),
        seq,
        ts: TS + seq,
        user: user(who),
        text: text.to_string(),
        client_msg_id: cmid.map(str::to_string),
        thread: None,
    }
}

fn msg(seq: u64) -> Event {
    message("c", seq, "alice", &format!("m{seq}"), None)
}

fn joined(channel: &str, seq: u64, who: &str) -> Event {
    Event::MemberJoined {
        channel: ch(channel),
        seq,
        ts: TS + seq,
        user: user(who),
    }
}

fn left(channel: &str, seq: u64, who: &str) -> Event {
    Event::MemberLeft {
        channel: ch(channel),
        seq,
        ts: TS + seq,
        user: user(who),
    }
}

fn edited(seq: u64, target: u64, text: &str) -> Event {
    Event::MessageEdited {
        channel: ch("c"),
        seq,
        ts: TS + seq,
        user: user("alice"),
        target,
        text: text.to_string(),
    }
}

fn deleted(seq: u64, target: u64) -> Event {
    Event::MessageDeleted {
        channel: ch("c"),
        seq,
        ts: TS + seq,
        user: user("alice"),
        target,
    }
}

const RETAIN_ALL: u64 = 10_000;

/// Workspace `w` with the empty public channel `c`.
async fn with_channel(store: &dyn CellStore) {
    assert!(store.create_workspace(&ws("w"), Some("W")).await.unwrap());
    let created = store
        .create_channel(&ws("w"), &channel("c", "c", ChannelKind::Public))
        .await;
    assert_eq!(created, Ok(CreateOutcome::Created));
}

async fn append(store: &dyn CellStore, event: Event) {
    let channel = match &event {
        Event::Message { channel, .. }
        | Event::MessageEdited { channel, .. }
        | Event::MessageDeleted { channel, .. }
        | Event::MemberJoined { channel, .. }
        | Event::MemberLeft { channel, .. } => channel.clone(),
        other => panic!("not a log event: {other:?}"),
    };
    store
        .append(&ws("w"), &channel, &event, RETAIN_ALL)
        .await
        .unwrap_or_else(|e| panic!("append {event:?}: {e}"));
}

async fn snapshot(store: &dyn CellStore, channel: &str) -> ChannelSnapshot {
    store
        .load_channel(&ws("w"), &ch(channel))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("channel {channel} exists"))
}

async fn seqs_after(store: &dyn CellStore, after: u64, max: usize) -> Vec<u64> {
    store
        .events_after(&ws("w"), &ch("c"), after, max)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq().unwrap())
        .collect()
}

fn query(after: u64, before: u64, limit: usize, newest_first: bool) -> MessageQuery {
    MessageQuery {
        after,
        before,
        limit,
        newest_first,
    }
}

async fn page(store: &dyn CellStore, q: MessageQuery) -> Vec<u64> {
    let page = store.messages(&ws("w"), &ch("c"), q).await.unwrap();
    page.iter().map(|m| m.seq).collect()
}

async fn find(store: &dyn CellStore, channel: &str, who: &str, cmid: &str) -> Option<(u64, u64)> {
    store
        .find_client_msg(&ws("w"), &ch(channel), &user(who), cmid)
        .await
        .unwrap()
}

// ---- workspaces and channels ----

async fn workspaces_are_created_once_and_counted(store: &dyn CellStore) {
    assert_eq!(store.workspace_count().await, Ok(0));
    assert_eq!(store.workspace_exists(&ws("a")).await, Ok(false));
    assert_eq!(store.create_workspace(&ws("a"), Some("A")).await, Ok(true));
    assert_eq!(
        store.create_workspace(&ws("a"), Some("A2")).await,
        Ok(false)
    );
    assert_eq!(store.create_workspace(&ws("b"), None).await, Ok(true));
    assert_eq!(store.workspace_exists(&ws("a")).await, Ok(true));
    assert_eq!(store.workspace_exists(&ws("b")).await, Ok(true));
    assert_eq!(store.workspace_exists(&ws("c")).await, Ok(false));
    assert_eq!(store.workspace_count().await, Ok(2));
}

async fn create_channel_in_an_unknown_workspace_writes_nothing(store: &dyn CellStore) {
    let general = channel("general", "general", ChannelKind::Public);
    assert_eq!(
        store.create_channel(&ws("w"), &general).await,
        Ok(CreateOutcome::UnknownWorkspace)
    );
    assert_eq!(
        store
            .create_channel(&ws("w"), &dm("d", "alice", "bob"))
            .await,
        Ok(CreateOutcome::UnknownWorkspace)
    );
    assert_eq!(store.workspace_exists(&ws("w")).await, Ok(false));
    assert_eq!(store.workspace_count().await, Ok(0));
    // Once the workspace exists, neither the id, the name nor the pair was claimed.
    store.create_workspace(&ws("w"), None).await.unwrap();
    assert_eq!(store.load_channel(&ws("w"), &ch("general")).await, Ok(None));
    assert_eq!(store.public_channels(&ws("w")).await, Ok(vec![]));
    assert_eq!(
        store
            .dm_channel(&ws("w"), (&user("alice"), &user("bob")))
            .await,
        Ok(None)
    );
    assert_eq!(
        store.create_channel(&ws("w"), &general).await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store
            .create_channel(&ws("w"), &dm("d", "alice", "bob"))
            .await,
        Ok(CreateOutcome::Created)
    );
}

async fn create_channel_refuses_a_taken_id_and_writes_nothing(store: &dyn CellStore) {
    with_channel(store).await;
    // Same id, another name and kind: refused, and "other" stays free.
    assert_eq!(
        store
            .create_channel(&ws("w"), &channel("c", "other", ChannelKind::Private))
            .await,
        Ok(CreateOutcome::IdTaken)
    );
    // Same id as a DM: refused, and the pair stays free.
    assert_eq!(
        store
            .create_channel(&ws("w"), &dm("c", "alice", "bob"))
            .await,
        Ok(CreateOutcome::IdTaken)
    );
    let c = snapshot(store, "c").await;
    assert_eq!(
        (c.meta.name.as_str(), c.meta.kind),
        ("c", ChannelKind::Public)
    );
    assert_eq!(
        store
            .dm_channel(&ws("w"), (&user("alice"), &user("bob")))
            .await,
        Ok(None)
    );
    assert_eq!(
        store
            .create_channel(&ws("w"), &channel("c2", "other", ChannelKind::Private))
            .await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store
            .create_channel(&ws("w"), &dm("d", "alice", "bob"))
            .await,
        Ok(CreateOutcome::Created)
    );
}

async fn create_channel_refuses_only_a_name_taken_by_a_public_channel(store: &dyn CellStore) {
    with_channel(store).await;
    let w = ws("w");
    // Public "c" exists: another public "c" is refused and its id not claimed.
    assert_eq!(
        store
            .create_channel(&w, &channel("p", "c", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::NameTaken)
    );
    assert_eq!(store.load_channel(&w, &ch("p")).await, Ok(None));
    // A private channel may have a public one's name (SPEC §3)...
    assert_eq!(
        store
            .create_channel(&w, &channel("p", "c", ChannelKind::Private))
            .await,
        Ok(CreateOutcome::Created)
    );
    // ...and claims nothing: a public channel and another private one may take its name.
    assert_eq!(
        store
            .create_channel(&w, &channel("s1", "secret", ChannelKind::Private))
            .await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store
            .create_channel(&w, &channel("s2", "secret", ChannelKind::Private))
            .await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store
            .create_channel(&w, &channel("q1", "secret", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store
            .create_channel(&w, &channel("q2", "secret", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::NameTaken)
    );
    for (id, kind) in [("p", ChannelKind::Private), ("s2", ChannelKind::Private)] {
        let meta = snapshot(store, id).await.meta;
        assert_eq!(meta.kind, kind);
    }
    // DM names claim nothing and are not refused by taken names.
    let mut named_dm = dm("d", "alice", "bob");
    named_dm.meta.name = "c".into();
    assert_eq!(
        store.create_channel(&w, &named_dm).await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store
            .create_channel(&w, &channel("q", "alice,bob", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::Created)
    );
    // Names are per workspace.
    store.create_workspace(&ws("w2"), None).await.unwrap();
    assert_eq!(
        store
            .create_channel(&ws("w2"), &channel("x", "c", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::Created)
    );
}

async fn a_dm_pair_owns_one_channel(store: &dyn CellStore) {
    store.create_workspace(&ws("w"), None).await.unwrap();
    let w = ws("w");
    assert_eq!(
        store.create_channel(&w, &dm("d1", "alice", "bob")).await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store.create_channel(&w, &dm("d2", "alice", "bob")).await,
        Ok(CreateOutcome::DmExists(ch("d1")))
    );
    assert_eq!(store.load_channel(&w, &ch("d2")).await, Ok(None));
    assert_eq!(
        store.create_channel(&w, &dm("d2", "alice", "carol")).await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store.dm_channel(&w, (&user("alice"), &user("bob"))).await,
        Ok(Some(ch("d1")))
    );
    assert_eq!(
        store.dm_channel(&w, (&user("alice"), &user("carol"))).await,
        Ok(Some(ch("d2")))
    );
    assert_eq!(
        store.dm_channel(&w, (&user("bob"), &user("carol"))).await,
        Ok(None)
    );
    assert_eq!(
        store
            .dm_channel(&ws("nope"), (&user("alice"), &user("bob")))
            .await,
        Ok(None)
    );
    let d1 = snapshot(store, "d1").await;
    assert_eq!(
        (d1.meta.name.as_str(), d1.meta.kind),
        ("alice,bob", ChannelKind::Dm)
    );
    assert_eq!(store.public_channels(&w).await, Ok(vec![]));
}

/// Workspace ids are free-form (within the id alphabet): one that happens to equal a word an
/// engine uses in its own keys must not reach another workspace's data.
async fn workspace_ids_that_look_like_key_parts_do_not_collide(store: &dyn CellStore) {
    for id in [
        "ws",
        "names",
        "public",
        "dms",
        "ch",
        "u",
        "workspaces",
        "meta",
    ] {
        assert_eq!(store.create_workspace(&ws(id), Some(id)).await, Ok(true));
    }
    for id in [
        "ws",
        "names",
        "public",
        "dms",
        "ch",
        "u",
        "workspaces",
        "meta",
    ] {
        let w = ws(id);
        for name in ["name", "general"] {
            assert_eq!(
                store
                    .create_channel(&w, &channel(name, name, ChannelKind::Public))
                    .await,
                Ok(CreateOutcome::Created),
                "channel {name} in workspace {id}"
            );
        }
        assert_eq!(
            store.create_channel(&w, &dm("d", "alice", "bob")).await,
            Ok(CreateOutcome::Created)
        );
        let public: Vec<ChannelId> = store
            .public_channels(&w)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.meta.id)
            .collect();
        assert_eq!(public, vec![ch("general"), ch("name")], "workspace {id}");
    }
    assert_eq!(store.workspace_count().await, Ok(8));
}

async fn load_channel_snapshot_follows_joins_and_leaves(store: &dyn CellStore) {
    with_channel(store).await;
    let empty = snapshot(store, "c").await;
    assert_eq!(
        empty,
        ChannelSnapshot {
            meta: ChannelMeta {
                id: ch("c"),
                name: "c".into(),
                kind: ChannelKind::Public,
            },
            last_seq: 0,
            first_seq: 1,
            members: vec![],
        }
    );
    append(store, joined("c", 1, "carol")).await;
    append(store, joined("c", 2, "alice")).await;
    append(store, joined("c", 3, "bob")).await;
    append(store, msg(4)).await;
    let s = snapshot(store, "c").await;
    assert_eq!((s.first_seq, s.last_seq), (1, 4));
    assert_eq!(s.members, users(&["alice", "bob", "carol"]), "sorted");
    append(store, left("c", 5, "bob")).await;
    append(store, left("c", 6, "alice")).await;
    let s = snapshot(store, "c").await;
    assert_eq!((s.first_seq, s.last_seq), (1, 6));
    assert_eq!(s.members, users(&["carol"]));
    // A leave of a non-member is logged and changes nothing else.
    append(store, left("c", 7, "dave")).await;
    assert_eq!(snapshot(store, "c").await.members, users(&["carol"]));
}

async fn load_channel_of_an_unknown_channel_or_workspace_is_none(store: &dyn CellStore) {
    with_channel(store).await;
    assert_eq!(store.load_channel(&ws("w"), &ch("nope")).await, Ok(None));
    assert_eq!(store.load_channel(&ws("x"), &ch("c")).await, Ok(None));
}

async fn channel_summaries_keep_the_given_order_and_skip_unknown_ids(store: &dyn CellStore) {
    store.create_workspace(&ws("w"), None).await.unwrap();
    let w = ws("w");
    for (id, kind) in [
        ("b", ChannelKind::Public),
        ("a", ChannelKind::Private),
        ("c", ChannelKind::Public),
    ] {
        store
            .create_channel(&w, &channel(id, &format!("{id}-name"), kind))
            .await
            .unwrap();
    }
    store.create_channel(&w, &dm("d", "x", "y")).await.unwrap();
    append(store, joined("a", 1, "alice")).await;
    append(store, message("a", 2, "alice", "hi", None)).await;
    append(store, joined("d", 1, "x")).await;
    let asked = [ch("c"), ch("nope"), ch("a"), ch("d"), ch("b")];
    let summaries = store.channel_summaries(&w, &asked).await.unwrap();
    let got: Vec<(&str, &str, ChannelKind, u64)> = summaries
        .iter()
        .map(|s| {
            (
                s.meta.id.as_str(),
                s.meta.name.as_str(),
                s.meta.kind,
                s.last_seq,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("c", "c-name", ChannelKind::Public, 0),
            ("a", "a-name", ChannelKind::Private, 2),
            ("d", "x,y", ChannelKind::Dm, 1),
            ("b", "b-name", ChannelKind::Public, 0),
        ]
    );
    assert_eq!(store.channel_summaries(&w, &[]).await, Ok(vec![]));
    assert_eq!(store.channel_summaries(&ws("x"), &asked).await, Ok(vec![]));
}

async fn public_channels_are_ordered_by_id_without_private_or_dm_channels(store: &dyn CellStore) {
    store.create_workspace(&ws("w"), None).await.unwrap();
    let w = ws("w");
    for (id, kind) in [
        ("m", ChannelKind::Public),
        ("z", ChannelKind::Public),
        ("p", ChannelKind::Private),
        ("a", ChannelKind::Public),
        ("B", ChannelKind::Public),
    ] {
        store
            .create_channel(&w, &channel(id, id, kind))
            .await
            .unwrap();
    }
    store.create_channel(&w, &dm("d", "x", "y")).await.unwrap();
    append(store, joined("z", 1, "alice")).await;
    let public = store.public_channels(&w).await.unwrap();
    let got: Vec<(&str, u64)> = public
        .iter()
        .map(|s| (s.meta.id.as_str(), s.last_seq))
        .collect();
    assert_eq!(got, vec![("B", 0), ("a", 0), ("m", 0), ("z", 1)]);
    assert!(public.iter().all(|s| s.meta.kind == ChannelKind::Public));
    assert_eq!(store.public_channels(&ws("x")).await, Ok(vec![]));
}

// ---- append ----

async fn append_refuses_a_seq_that_is_not_the_next_one(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    let conflict = |expected, got| {
        Err(StoreError::SeqConflict {
            channel: ch("c"),
            expected,
            got,
        })
    };
    assert_eq!(store.append(&w, &c, &msg(0), 10).await, conflict(1, 0));
    assert_eq!(store.append(&w, &c, &msg(2), 10).await, conflict(1, 2));
    append(store, msg(1)).await;
    append(store, msg(2)).await;
    // Below (a replay of an old seq) and above (a gap).
    assert_eq!(store.append(&w, &c, &msg(2), 10).await, conflict(3, 2));
    assert_eq!(store.append(&w, &c, &msg(1), 10).await, conflict(3, 1));
    assert_eq!(store.append(&w, &c, &msg(4), 10).await, conflict(3, 4));
    let refused_join = joined("c", 9, "mallory");
    assert_eq!(
        store.append(&w, &c, &refused_join, 10).await,
        conflict(3, 9)
    );
    // Nothing of the refused appends was written.
    let s = snapshot(store, "c").await;
    assert_eq!((s.first_seq, s.last_seq), (1, 2));
    assert!(s.members.is_empty());
    assert_eq!(seqs_after(store, 0, 100).await, vec![1, 2]);
    assert_eq!(store.message(&w, &c, 4).await, Ok(None));
    assert_eq!(store.user_channels(&w, &user("mallory")).await, Ok(vec![]));
    append(store, msg(3)).await;
    assert_eq!(snapshot(store, "c").await.last_seq, 3);
}

async fn raise_last_seq_moves_last_seq_up_from_the_expected_value_only(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    append(store, msg(1)).await;
    append(store, msg(2)).await;
    let conflict = |expected, got| {
        Err(StoreError::SeqConflict {
            channel: ch("c"),
            expected,
            got,
        })
    };
    // Only from the current last_seq, and only upwards.
    assert_eq!(store.raise_last_seq(&w, &c, 1, 9).await, conflict(3, 9));
    assert_eq!(store.raise_last_seq(&w, &c, 2, 2).await, conflict(3, 2));
    assert_eq!(store.raise_last_seq(&w, &c, 2, 1).await, conflict(3, 1));
    assert_eq!(snapshot(store, "c").await.last_seq, 2);
    assert_eq!(
        store.raise_last_seq(&w, &ch("nope"), 0, 5).await,
        Err(StoreError::NoSuchChannel(ch("nope")))
    );
    // After the raise the seqs between are never handed out: the next append is above them.
    assert_eq!(store.raise_last_seq(&w, &c, 2, 9).await, Ok(()));
    assert_eq!(snapshot(store, "c").await.last_seq, 9);
    assert_eq!(store.append(&w, &c, &msg(3), 10).await, conflict(10, 3));
    append(store, msg(10)).await;
    assert_eq!(snapshot(store, "c").await.last_seq, 10);
    assert_eq!(seqs_after(store, 2, 100).await, vec![10]);
    // The messages before the gap are kept for history.
    assert!(store.message(&w, &c, 2).await.unwrap().is_some());
}

async fn append_to_a_missing_channel_is_no_such_channel(store: &dyn CellStore) {
    with_channel(store).await;
    let event = message("nope", 1, "alice", "x", Some("k"));
    assert_eq!(
        store.append(&ws("w"), &ch("nope"), &event, 10).await,
        Err(StoreError::NoSuchChannel(ch("nope")))
    );
    assert_eq!(
        store.append(&ws("x"), &ch("c"), &msg(1), 10).await,
        Err(StoreError::NoSuchChannel(ch("c")))
    );
    // A refused append creates nothing on the way.
    assert_eq!(store.load_channel(&ws("w"), &ch("nope")).await, Ok(None));
    assert_eq!(find(store, "nope", "alice", "k").await, None);
    assert_eq!(store.workspace_exists(&ws("x")).await, Ok(false));
    assert_eq!(snapshot(store, "c").await.last_seq, 0);
}

async fn append_refuses_ephemeral_events_and_writes_nothing(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    let typing = Event::Typing {
        channel: ch("c"),
        user: user("alice"),
    };
    let read = Event::Read {
        channel: ch("c"),
        seq: 1,
    };
    let resync = Event::Resync { channel: ch("c") };
    assert_eq!(
        store.append(&w, &c, &typing, 10).await,
        Err(StoreError::NotLoggable("typing"))
    );
    assert_eq!(
        store.append(&w, &c, &read, 10).await,
        Err(StoreError::NotLoggable("read"))
    );
    assert_eq!(
        store.append(&w, &c, &resync, 10).await,
        Err(StoreError::NotLoggable("resync"))
    );
    // Not loggable is decided before the channel is looked up.
    assert_eq!(
        store.append(&w, &ch("nope"), &typing, 10).await,
        Err(StoreError::NotLoggable("typing"))
    );
    assert_eq!(snapshot(store, "c").await.last_seq, 0);
    assert_eq!(seqs_after(store, 0, 10).await, Vec::<u64>::new());
}

/// Two writers racing for the same seq: exactly one wins, the others get a conflict, and the
/// log holds the winner's event only.
async fn concurrent_appends_of_the_same_seq_let_exactly_one_win(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    for seq in 1..=5u64 {
        let events: Vec<Event> = (0..8)
            .map(|i| message("c", seq, "alice", &format!("{seq}-{i}"), None))
            .collect();
        let results = futures_util::future::join_all(
            events.iter().map(|e| store.append(&w, &c, e, RETAIN_ALL)),
        )
        .await;
        let winners: Vec<usize> = (0..results.len()).filter(|i| results[*i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "seq {seq}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert_eq!(
                    e,
                    &StoreError::SeqConflict {
                        channel: ch("c"),
                        expected: seq + 1,
                        got: seq
                    }
                );
            }
        }
        let logged = store.events_after(&w, &c, seq - 1, 10).await.unwrap();
        assert_eq!(logged, vec![events[winners[0]].clone()]);
    }
    assert_eq!(snapshot(store, "c").await.last_seq, 5);
}

// ---- side effects ----

async fn a_message_is_stored_as_sent_with_its_idempotency_key(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    append(store, msg(1)).await;
    let sent = Event::Message {
        channel: ch("c"),
        seq: 2,
        ts: TS + 2,
        user: user("bob"),
        text: "héllo \"world\" ✓ {json}\n:1".into(),
        client_msg_id: Some("k/1:x".into()),
        thread: Some(1),
    };
    append(store, sent.clone()).await;
    assert_eq!(
        store.message(&w, &c, 2).await,
        Ok(Some(MessageView {
            seq: 2,
            ts: TS + 2,
            user: user("bob"),
            text: "héllo \"world\" ✓ {json}\n:1".into(),
            client_msg_id: Some("k/1:x".into()),
            thread: Some(1),
            edited: false,
            deleted: false,
        }))
    );
    assert_eq!(store.events_after(&w, &c, 1, 10).await, Ok(vec![sent]));
    assert_eq!(find(store, "c", "bob", "k/1:x").await, Some((2, TS + 2)));
    assert_eq!(find(store, "c", "alice", "k/1:x").await, None);
    assert_eq!(find(store, "c", "bob", "k").await, None);
    // A message without client_msg_id claims no key.
    assert_eq!(find(store, "c", "alice", "").await, None);
    assert_eq!(store.message(&w, &c, 3).await, Ok(None));
}

async fn edit_replaces_the_text_and_marks_the_message_edited(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    append(store, message("c", 1, "alice", "first", Some("k1"))).await;
    append(store, msg(2)).await;
    append(store, edited(3, 1, "first, edited")).await;
    append(store, edited(4, 1, "first, edited twice")).await;
    let m1 = store.message(&w, &c, 1).await.unwrap().unwrap();
    assert_eq!(
        m1,
        MessageView {
            seq: 1,
            ts: TS + 1,
            user: user("alice"),
            text: "first, edited twice".into(),
            client_msg_id: Some("k1".into()),
            thread: None,
            edited: true,
            deleted: false,
        }
    );
    let m2 = store.message(&w, &c, 2).await.unwrap().unwrap();
    assert_eq!((m2.text.as_str(), m2.edited), ("m2", false));
    // The edits are log events, not messages.
    assert_eq!(page(store, query(0, u64::MAX, 10, false)).await, vec![1, 2]);
    let log = store.events_after(&w, &c, 2, 10).await.unwrap();
    assert_eq!(
        log,
        vec![
            edited(3, 1, "first, edited"),
            edited(4, 1, "first, edited twice")
        ]
    );
    assert_eq!(find(store, "c", "alice", "k1").await, Some((1, TS + 1)));
}

async fn delete_clears_the_text_and_marks_the_message_deleted(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    append(store, msg(1)).await;
    append(store, msg(2)).await;
    append(store, edited(3, 1, "changed")).await;
    append(store, deleted(4, 1)).await;
    append(store, deleted(5, 2)).await;
    let m1 = store.message(&w, &c, 1).await.unwrap().unwrap();
    assert_eq!(
        (m1.text.as_str(), m1.edited, m1.deleted),
        ("", true, true),
        "an edit stays marked after a delete"
    );
    let m2 = store.message(&w, &c, 2).await.unwrap().unwrap();
    assert_eq!((m2.text.as_str(), m2.edited, m2.deleted), ("", false, true));
    // Deleted messages stay in history, as they stand.
    let history = store
        .messages(&w, &c, query(0, u64::MAX, 10, false))
        .await
        .unwrap();
    assert_eq!(history, vec![m1, m2]);
}

async fn edit_or_delete_of_a_missing_message_is_logged_without_inventing_one(
    store: &dyn CellStore,
) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    append(store, joined("c", 1, "alice")).await;
    append(store, edited(2, 99, "ghost")).await;
    append(store, deleted(3, 98)).await;
    // Seq 1 is a join, not a message.
    append(store, edited(4, 1, "not a message")).await;
    append(store, deleted(5, 1)).await;
    assert_eq!(snapshot(store, "c").await.last_seq, 5);
    assert_eq!(seqs_after(store, 0, 10).await, vec![1, 2, 3, 4, 5]);
    for seq in [1, 2, 3, 98, 99] {
        assert_eq!(store.message(&w, &c, seq).await, Ok(None), "seq {seq}");
    }
    assert_eq!(
        page(store, query(0, u64::MAX, 10, false)).await,
        Vec::<u64>::new()
    );
}

async fn join_and_leave_update_members_and_user_channels(store: &dyn CellStore) {
    with_channel(store).await;
    let w = ws("w");
    for id in ["b", "a"] {
        store
            .create_channel(&w, &channel(id, id, ChannelKind::Private))
            .await
            .unwrap();
    }
    append(store, joined("c", 1, "alice")).await;
    append(store, joined("b", 1, "alice")).await;
    append(store, joined("a", 1, "alice")).await;
    append(store, joined("a", 2, "bob")).await;
    assert_eq!(
        store.user_channels(&w, &user("alice")).await,
        Ok(vec![ch("a"), ch("b"), ch("c")])
    );
    assert_eq!(
        store.user_channels(&w, &user("bob")).await,
        Ok(vec![ch("a")])
    );
    assert_eq!(snapshot(store, "a").await.members, users(&["alice", "bob"]));
    append(store, left("b", 2, "alice")).await;
    append(store, left("a", 3, "bob")).await;
    assert_eq!(
        store.user_channels(&w, &user("alice")).await,
        Ok(vec![ch("a"), ch("c")])
    );
    assert_eq!(store.user_channels(&w, &user("bob")).await, Ok(vec![]));
    assert_eq!(snapshot(store, "a").await.members, users(&["alice"]));
    assert!(snapshot(store, "b").await.members.is_empty());
    // Rejoining brings the channel back.
    append(store, joined("b", 3, "alice")).await;
    assert_eq!(
        store.user_channels(&w, &user("alice")).await,
        Ok(vec![ch("a"), ch("b"), ch("c")])
    );
    assert_eq!(store.user_channels(&w, &user("nobody")).await, Ok(vec![]));
    assert_eq!(
        store.user_channels(&ws("x"), &user("alice")).await,
        Ok(vec![])
    );
}

async fn create_channel_refuses_a_channel_beyond_the_workspace_bound(store: &dyn CellStore) {
    with_channel(store).await;
    let w = ws("w");
    let bounded = |id: &str, name: &str, kind| NewChannel {
        max_channels: Some(3),
        ..channel(id, name, kind)
    };
    // "c" is the first; DMs are not counted.
    assert_eq!(
        store.create_channel(&w, &dm("d", "alice", "bob")).await,
        Ok(CreateOutcome::Created)
    );
    for (id, kind) in [("p", ChannelKind::Private), ("q", ChannelKind::Public)] {
        assert_eq!(
            store.create_channel(&w, &bounded(id, id, kind)).await,
            Ok(CreateOutcome::Created)
        );
    }
    for kind in [ChannelKind::Public, ChannelKind::Private] {
        assert_eq!(
            store.create_channel(&w, &bounded("r", "r", kind)).await,
            Ok(CreateOutcome::TooManyChannels)
        );
    }
    assert_eq!(store.load_channel(&w, &ch("r")).await, Ok(None));
    // Nothing was claimed by the refusal: the name is free for a bigger bound.
    assert_eq!(
        store
            .create_channel(&w, &channel("r", "r", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::Created)
    );
    let mut dm_beyond = dm("d2", "alice", "carol");
    dm_beyond.max_channels = Some(1);
    assert_eq!(
        store.create_channel(&w, &dm_beyond).await,
        Ok(CreateOutcome::Created)
    );
    // The bound is per workspace.
    store.create_workspace(&ws("w2"), None).await.unwrap();
    assert_eq!(
        store
            .create_channel(&ws("w2"), &bounded("c", "c", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::Created)
    );
}

async fn append_joins_writes_every_join_in_order(store: &dyn CellStore) {
    with_channel(store).await;
    let w = ws("w");
    append(store, msg(1)).await;
    let joins: Vec<Event> = ["alice", "bob", "carol"]
        .iter()
        .zip(2..)
        .map(|(who, seq)| joined("c", seq, who))
        .collect();
    assert_eq!(
        store.append_joins(&w, &ch("c"), &joins, 100, 10).await,
        Ok(3)
    );
    let c = snapshot(store, "c").await;
    assert_eq!(c.last_seq, 4);
    assert_eq!(c.members, users(&["alice", "bob", "carol"]));
    assert_eq!(seqs_after(store, 0, 10).await, vec![1, 2, 3, 4]);
    assert_eq!(
        store.user_channels(&w, &user("carol")).await,
        Ok(vec![ch("c")])
    );
    assert_eq!(store.append_joins(&w, &ch("c"), &[], 100, 10).await, Ok(0));
    // A stale first seq writes nothing.
    assert!(matches!(
        store
            .append_joins(&w, &ch("c"), &[joined("c", 4, "dave")], 100, 10)
            .await,
        Err(StoreError::SeqConflict { expected: 5, .. })
    ));
    assert_eq!(snapshot(store, "c").await.last_seq, 4);
    assert_eq!(
        store
            .append_joins(&w, &ch("nope"), &[joined("nope", 1, "dave")], 100, 10)
            .await,
        Err(StoreError::NoSuchChannel(ch("nope")))
    );
    assert!(matches!(
        store.append_joins(&w, &ch("c"), &[msg(5)], 100, 10).await,
        Err(StoreError::NotAJoin(_))
    ));
    assert_eq!(snapshot(store, "c").await.last_seq, 4);
}

async fn append_joins_stops_before_a_user_with_no_room(store: &dyn CellStore) {
    with_channel(store).await;
    let w = ws("w");
    for id in ["a", "b"] {
        store
            .create_channel(&w, &channel(id, id, ChannelKind::Private))
            .await
            .unwrap();
    }
    // bob is in two channels already, alice in one.
    append(store, joined("a", 1, "bob")).await;
    append(store, joined("b", 1, "bob")).await;
    append(store, joined("a", 2, "alice")).await;
    let joins = vec![
        joined("c", 1, "alice"),
        joined("c", 2, "bob"),
        joined("c", 3, "carol"),
    ];
    assert_eq!(
        store.append_joins(&w, &ch("c"), &joins, 100, 2).await,
        Ok(1)
    );
    let c = snapshot(store, "c").await;
    assert_eq!((c.last_seq, c.members), (1, users(&["alice"])));
    assert_eq!(seqs_after(store, 0, 10).await, vec![1]);
    assert_eq!(
        store.user_channels(&w, &user("bob")).await,
        Ok(vec![ch("a"), ch("b")])
    );
    // The rest, renumbered without bob, goes in; a user at the bound may still rejoin a
    // channel it is in (that is no new channel).
    let rest = [joined("c", 2, "carol"), joined("a", 3, "bob")];
    assert_eq!(
        store.append_joins(&w, &ch("c"), &rest[..1], 100, 2).await,
        Ok(1)
    );
    assert_eq!(
        store.append_joins(&w, &ch("a"), &rest[1..], 100, 2).await,
        Ok(1)
    );
    assert_eq!(
        snapshot(store, "c").await.members,
        users(&["alice", "carol"])
    );
}

async fn channel_counts_and_read_markers_in_follow_the_users_given(store: &dyn CellStore) {
    with_channel(store).await;
    let w = ws("w");
    store
        .create_channel(&w, &channel("b", "b", ChannelKind::Private))
        .await
        .unwrap();
    append(store, joined("c", 1, "alice")).await;
    append(store, joined("b", 1, "alice")).await;
    append(store, joined("c", 2, "bob")).await;
    store
        .advance_read_marker(&w, &user("bob"), &ch("c"), 2)
        .await
        .unwrap();
    store
        .advance_read_marker(&w, &user("bob"), &ch("b"), 9)
        .await
        .unwrap();
    let who = users(&["carol", "alice", "bob", "alice"]);
    assert_eq!(store.channel_counts(&w, &who).await, Ok(vec![0, 2, 1, 2]));
    assert_eq!(
        store.read_markers_in(&w, &ch("c"), &who).await,
        Ok(vec![0, 0, 2, 0])
    );
    assert_eq!(store.channel_counts(&w, &[]).await, Ok(vec![]));
    assert_eq!(store.read_markers_in(&w, &ch("c"), &[]).await, Ok(vec![]));
    assert_eq!(store.channel_counts(&ws("x"), &who[..1]).await, Ok(vec![0]));
}

// ---- retention ----

async fn trimming_keeps_the_newest_events_and_drops_idempotency_keys_but_not_messages(
    store: &dyn CellStore,
) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    store
        .append(&w, &c, &joined("c", 1, "alice"), 3)
        .await
        .unwrap();
    for seq in 2..=6 {
        let cmid = format!("k{seq}");
        let event = message("c", seq, "alice", &format!("m{seq}"), Some(&cmid));
        store.append(&w, &c, &event, 3).await.unwrap();
    }
    let s = snapshot(store, "c").await;
    assert_eq!((s.first_seq, s.last_seq), (4, 6));
    // The trimmed join keeps its membership: trimming is about the log only.
    assert_eq!(s.members, users(&["alice"]));
    assert_eq!(seqs_after(store, 0, 100).await, vec![4, 5, 6]);
    assert_eq!(seqs_after(store, 2, 100).await, vec![4, 5, 6]);
    assert_eq!(seqs_after(store, 4, 100).await, vec![5, 6]);
    for seq in 2..=3 {
        assert_eq!(find(store, "c", "alice", &format!("k{seq}")).await, None);
    }
    for seq in 4..=6 {
        assert_eq!(
            find(store, "c", "alice", &format!("k{seq}")).await,
            Some((seq, TS + seq))
        );
    }
    // Message states outlive the log.
    assert_eq!(
        page(store, query(0, u64::MAX, 100, false)).await,
        vec![2, 3, 4, 5, 6]
    );
    let m2 = store.message(&w, &c, 2).await.unwrap().unwrap();
    assert_eq!(m2.text, "m2");
    // An edit of a trimmed message still applies to its state.
    store
        .append(&w, &c, &edited(7, 2, "late"), 3)
        .await
        .unwrap();
    let m2 = store.message(&w, &c, 2).await.unwrap().unwrap();
    assert_eq!((m2.text.as_str(), m2.edited), ("late", true));
    let s = snapshot(store, "c").await;
    assert_eq!((s.first_seq, s.last_seq), (5, 7));
    assert_eq!(find(store, "c", "alice", "k4").await, None);
    // A larger retention later keeps everything from then on.
    store.append(&w, &c, &msg(8), 100).await.unwrap();
    assert_eq!(snapshot(store, "c").await.first_seq, 5);
}

async fn trimming_keeps_a_client_msg_id_reused_by_a_newer_message(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    let send = |seq, cmid| message("c", seq, "alice", "x", Some(cmid));
    store.append(&w, &c, &send(1, "k"), 2).await.unwrap();
    // The same key again while the first is still retained (the key now names seq 2).
    store.append(&w, &c, &send(2, "k"), 2).await.unwrap();
    store.append(&w, &c, &send(3, "other"), 2).await.unwrap();
    // Seq 1 left the log; the key belongs to seq 2, which did not.
    assert_eq!(snapshot(store, "c").await.first_seq, 2);
    assert_eq!(find(store, "c", "alice", "k").await, Some((2, TS + 2)));
    store.append(&w, &c, &msg(4), 2).await.unwrap();
    assert_eq!(find(store, "c", "alice", "k").await, None);
    assert_eq!(find(store, "c", "alice", "other").await, Some((3, TS + 3)));
    // Once gone, a key may be claimed again.
    store.append(&w, &c, &send(5, "k"), 2).await.unwrap();
    assert_eq!(find(store, "c", "alice", "k").await, Some((5, TS + 5)));
}

async fn a_retention_of_zero_keeps_the_newest_event(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, c) = (ws("w"), ch("c"));
    for seq in 1..=3 {
        store.append(&w, &c, &msg(seq), 0).await.unwrap();
    }
    let s = snapshot(store, "c").await;
    assert_eq!((s.first_seq, s.last_seq), (3, 3));
    assert_eq!(seqs_after(store, 0, 10).await, vec![3]);
}

// ---- reads ----

async fn events_after_pages_by_after_and_max(store: &dyn CellStore) {
    with_channel(store).await;
    append(store, joined("c", 1, "alice")).await;
    for seq in 2..=10 {
        append(store, msg(seq)).await;
    }
    assert_eq!(seqs_after(store, 0, 3).await, vec![1, 2, 3]);
    assert_eq!(seqs_after(store, 3, 3).await, vec![4, 5, 6]);
    assert_eq!(seqs_after(store, 8, 100).await, vec![9, 10]);
    assert_eq!(seqs_after(store, 10, 5).await, Vec::<u64>::new());
    assert_eq!(seqs_after(store, 50, 5).await, Vec::<u64>::new());
    assert_eq!(seqs_after(store, 0, 0).await, Vec::<u64>::new());
    assert_eq!(
        seqs_after(store, 0, usize::MAX).await,
        (1..=10).collect::<Vec<_>>()
    );
    let events = store.events_after(&ws("w"), &ch("c"), 0, 2).await.unwrap();
    assert_eq!(events, vec![joined("c", 1, "alice"), msg(2)]);
    assert_eq!(
        store.events_after(&ws("w"), &ch("nope"), 0, 10).await,
        Ok(vec![])
    );
    assert_eq!(
        store.events_after(&ws("x"), &ch("c"), 0, 10).await,
        Ok(vec![])
    );
}

async fn find_client_msg_is_per_user_and_per_channel(store: &dyn CellStore) {
    with_channel(store).await;
    store
        .create_channel(&ws("w"), &channel("d", "d", ChannelKind::Public))
        .await
        .unwrap();
    append(store, message("c", 1, "alice", "x", Some("k"))).await;
    append(store, message("d", 1, "bob", "x", Some("k"))).await;
    append(store, message("d", 2, "alice", "x", Some("k"))).await;
    assert_eq!(find(store, "c", "alice", "k").await, Some((1, TS + 1)));
    assert_eq!(find(store, "c", "bob", "k").await, None);
    assert_eq!(find(store, "d", "bob", "k").await, Some((1, TS + 1)));
    assert_eq!(find(store, "d", "alice", "k").await, Some((2, TS + 2)));
    assert_eq!(find(store, "nope", "alice", "k").await, None);
    assert_eq!(
        store
            .find_client_msg(&ws("x"), &ch("c"), &user("alice"), "k")
            .await,
        Ok(None)
    );
}

async fn messages_page_by_after_before_and_limit_in_ascending_order(store: &dyn CellStore) {
    with_channel(store).await;
    // Messages at 2..=11 except 6 (a join) and 9 (an edit).
    append(store, joined("c", 1, "alice")).await;
    for seq in 2..=11 {
        match seq {
            6 => append(store, joined("c", 6, "bob")).await,
            9 => append(store, edited(9, 3, "three")).await,
            _ => append(store, msg(seq)).await,
        }
    }
    let all = vec![2, 3, 4, 5, 7, 8, 10, 11];
    assert_eq!(page(store, query(0, u64::MAX, 100, false)).await, all);
    assert_eq!(page(store, query(0, u64::MAX, 100, true)).await, all);
    // Oldest or newest `limit` of the range, ascending either way.
    assert_eq!(
        page(store, query(0, u64::MAX, 3, false)).await,
        vec![2, 3, 4]
    );
    assert_eq!(
        page(store, query(0, u64::MAX, 3, true)).await,
        vec![8, 10, 11]
    );
    // Both bounds are exclusive.
    assert_eq!(
        page(store, query(3, 10, 100, false)).await,
        vec![4, 5, 7, 8]
    );
    assert_eq!(page(store, query(3, 10, 2, false)).await, vec![4, 5]);
    assert_eq!(page(store, query(3, 10, 2, true)).await, vec![7, 8]);
    assert_eq!(page(store, query(0, 5, 100, true)).await, vec![2, 3, 4]);
    assert_eq!(
        page(store, query(8, u64::MAX, 100, false)).await,
        vec![10, 11]
    );
    assert_eq!(page(store, query(8, u64::MAX, 1, true)).await, vec![11]);
    // Bounds beyond the log.
    assert_eq!(page(store, query(0, 1_000, 2, true)).await, vec![10, 11]);
    assert_eq!(
        page(store, query(11, u64::MAX, 5, true)).await,
        Vec::<u64>::new()
    );
    assert_eq!(page(store, query(0, u64::MAX - 1, 1, true)).await, vec![11]);
    // Messages as they stand.
    let m3 = store.message(&ws("w"), &ch("c"), 3).await.unwrap().unwrap();
    assert_eq!((m3.text.as_str(), m3.edited), ("three", true));
    let pages = store
        .messages(&ws("w"), &ch("c"), query(2, 4, 10, false))
        .await
        .unwrap();
    assert_eq!(pages, vec![m3]);
}

async fn messages_of_an_empty_range_or_unknown_channel_are_empty(store: &dyn CellStore) {
    with_channel(store).await;
    let empty = Vec::<u64>::new();
    assert_eq!(page(store, query(0, u64::MAX, 10, true)).await, empty);
    for seq in 1..=5 {
        append(store, msg(seq)).await;
    }
    assert_eq!(page(store, query(0, u64::MAX, 0, false)).await, empty);
    assert_eq!(page(store, query(0, u64::MAX, 0, true)).await, empty);
    assert_eq!(
        page(store, query(3, 4, 10, false)).await,
        empty,
        "no seq between"
    );
    assert_eq!(page(store, query(3, 3, 10, false)).await, empty);
    assert_eq!(
        page(store, query(4, 2, 10, true)).await,
        empty,
        "after > before"
    );
    assert_eq!(page(store, query(0, 1, 10, true)).await, empty);
    assert_eq!(page(store, query(0, 0, 10, true)).await, empty);
    assert_eq!(
        page(store, query(u64::MAX, u64::MAX, 10, true)).await,
        empty
    );
    assert_eq!(
        page(store, query(u64::MAX - 1, u64::MAX, 10, true)).await,
        empty
    );
    assert_eq!(page(store, query(5, u64::MAX, 10, false)).await, empty);
    let q = query(0, u64::MAX, 10, false);
    assert_eq!(store.messages(&ws("w"), &ch("nope"), q).await, Ok(vec![]));
    assert_eq!(store.messages(&ws("x"), &ch("c"), q).await, Ok(vec![]));
}

async fn read_markers_never_move_back(store: &dyn CellStore) {
    with_channel(store).await;
    let w = ws("w");
    let (alice, bob, c, d) = (user("alice"), user("bob"), ch("c"), ch("d"));
    let marker = |previous, current| Ok(ReadMarker { previous, current });
    let advance = |who: &UserId, channel: &ChannelId, seq| {
        let (w, who, channel) = (w.clone(), who.clone(), channel.clone());
        async move { store.advance_read_marker(&w, &who, &channel, seq).await }
    };
    assert_eq!(store.read_markers(&w, &alice).await, Ok(HashMap::new()));
    assert_eq!(advance(&alice, &c, 5).await, marker(0, 5));
    assert_eq!(advance(&alice, &c, 2).await, marker(5, 5));
    assert_eq!(advance(&alice, &c, 5).await, marker(5, 5));
    assert_eq!(advance(&alice, &c, 7).await, marker(5, 7));
    assert_eq!(advance(&alice, &d, 0).await, marker(0, 0));
    assert_eq!(advance(&alice, &d, 3).await, marker(0, 3));
    assert_eq!(advance(&bob, &c, 1).await, marker(0, 1));
    assert_eq!(
        store.read_markers(&w, &alice).await,
        Ok(HashMap::from([(c.clone(), 7), (d.clone(), 3)]))
    );
    assert_eq!(
        store.read_markers(&w, &bob).await,
        Ok(HashMap::from([(c.clone(), 1)]))
    );
    assert_eq!(
        store.read_markers(&w, &user("carol")).await,
        Ok(HashMap::new())
    );
    // Markers are exact over the whole u64 range (no rounding through floating point).
    let big = u64::MAX - 1;
    assert_eq!(advance(&bob, &d, big).await, marker(0, big));
    assert_eq!(advance(&bob, &d, big - 1).await, marker(big, big));
    assert_eq!(advance(&bob, &d, 1 << 60).await, marker(big, big));
    assert_eq!(advance(&bob, &d, u64::MAX).await, marker(big, u64::MAX));
    assert_eq!(
        store.read_markers(&w, &bob).await,
        Ok(HashMap::from([(c.clone(), 1), (d, u64::MAX)]))
    );
    // A marker needs its workspace.
    assert_eq!(
        store.advance_read_marker(&ws("x"), &alice, &c, 1).await,
        Err(StoreError::NoSuchChannel(c.clone()))
    );
    assert_eq!(
        store.read_markers(&ws("x"), &alice).await,
        Ok(HashMap::new())
    );
}

async fn workspaces_never_see_each_others_data(store: &dyn CellStore) {
    with_channel(store).await;
    let (w, v, c) = (ws("w"), ws("v"), ch("c"));
    store.create_workspace(&v, None).await.unwrap();
    // The same channel id and name in another workspace is another channel.
    assert_eq!(
        store
            .create_channel(&v, &channel("c", "c", ChannelKind::Private))
            .await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store.create_channel(&v, &dm("d", "alice", "bob")).await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store.dm_channel(&w, (&user("alice"), &user("bob"))).await,
        Ok(None)
    );
    append(store, joined("c", 1, "alice")).await;
    append(store, message("c", 2, "alice", "in w", Some("k"))).await;
    let in_v = message("c", 1, "bob", "in v", None);
    store.append(&v, &c, &in_v, RETAIN_ALL).await.unwrap();
    store
        .advance_read_marker(&w, &user("alice"), &c, 2)
        .await
        .unwrap();
    let sv = store.load_channel(&v, &c).await.unwrap().unwrap();
    assert_eq!(
        (sv.meta.kind, sv.last_seq, sv.members.len()),
        (ChannelKind::Private, 1, 0)
    );
    assert_eq!(store.events_after(&v, &c, 0, 10).await, Ok(vec![in_v]));
    assert_eq!(
        store.find_client_msg(&v, &c, &user("alice"), "k").await,
        Ok(None)
    );
    assert_eq!(store.user_channels(&v, &user("alice")).await, Ok(vec![]));
    assert_eq!(
        store.read_markers(&v, &user("alice")).await,
        Ok(HashMap::new())
    );
    assert_eq!(store.public_channels(&v).await, Ok(vec![]));
    let texts: Vec<String> = store
        .messages(&w, &c, query(0, u64::MAX, 10, false))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["in w"]);
}

// ---- Redis only, on a single Redis and on a cluster: restarts, fencing, moves ----

/// How long any store call may take while Redis is down before it must have failed.
const FAIL_FAST: Duration = Duration::from_secs(8);

async fn redis_store_survives_a_restart_when_durable(mut backing: Backing) {
    let store = backing.store();
    let s: &dyn CellStore = &store;
    with_channel(s).await;
    append(s, joined("c", 1, "alice")).await;
    for seq in 2..=6 {
        let event = message(
            "c",
            seq,
            "alice",
            &format!("m{seq}"),
            Some(&format!("k{seq}")),
        );
        store.append(&ws("w"), &ch("c"), &event, 4).await.unwrap();
    }
    store
        .advance_read_marker(&ws("w"), &user("alice"), &ch("c"), 4)
        .await
        .unwrap();
    let before = snapshot(s, "c").await;
    let events = store
        .events_after(&ws("w"), &ch("c"), 0, 100)
        .await
        .unwrap();
    assert_eq!((before.first_seq, before.last_seq), (3, 6));

    backing.restart();

    // The first call after the restart may still meet the dead connection; retry a little.
    let mut after = None;
    for _ in 0..20 {
        match store.load_channel(&ws("w"), &ch("c")).await {
            Ok(snapshot) => {
                after = snapshot;
                break;
            }
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(after, Some(before));
    assert_eq!(
        store.events_after(&ws("w"), &ch("c"), 0, 100).await,
        Ok(events)
    );
    assert_eq!(find(s, "c", "alice", "k6").await, Some((6, TS + 6)));
    assert_eq!(find(s, "c", "alice", "k2").await, None);
    assert_eq!(
        store.read_markers(&ws("w"), &user("alice")).await,
        Ok(HashMap::from([(ch("c"), 4)]))
    );
    assert_eq!(store.workspace_exists(&ws("w")).await, Ok(true));
    // The log continues where it was, and the append script is loaded again by itself: first
    // by a pipeline of joins (whose EVALSHAs all meet NOSCRIPT), then by a single append.
    let joins = [joined("c", 7, "bob"), joined("c", 8, "carol")];
    assert_eq!(
        store.append_joins(&ws("w"), &ch("c"), &joins, 4, 10).await,
        Ok(2)
    );
    append(s, msg(9)).await;
    let c = snapshot(s, "c").await;
    assert_eq!(c.last_seq, 9);
    assert_eq!(c.members, users(&["alice", "bob", "carol"]));
}

async fn a_store_claimed_by_a_newer_epoch_refuses_every_write_of_the_older_one(backing: Backing) {
    let (old, new) = (backing.store(), backing.store());
    assert_eq!(old.fence_epoch().await, Ok(0));
    old.claim(3).await.unwrap();
    with_channel(&old).await;
    append(&old, joined("c", 1, "alice")).await;
    // More workspaces (in a cluster, on every master): each has its own fence to raise.
    let others: Vec<WorkspaceId> = (0..6).map(|i| ws(&format!("v{i}"))).collect();
    for v in &others {
        assert_eq!(old.create_workspace(v, None).await, Ok(true));
        assert_eq!(
            old.create_channel(v, &channel("c", "c", ChannelKind::Public))
                .await,
            Ok(CreateOutcome::Created)
        );
    }
    assert_eq!(old.fence_epoch().await, Ok(3));
    // A claim must be newer than the epoch holding the store.
    assert!(matches!(new.claim(3).await, Err(StoreError::Fenced(_))));
    new.claim(4).await.unwrap();
    let mut fenced = Box::pin(old.fenced());
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut fenced)
            .await
            .is_err(),
        "fenced before any refused write"
    );
    let (w, c, alice) = (ws("w"), ch("c"), user("alice"));
    let refused = [
        old.append(&w, &c, &msg(2), 10).await,
        old.create_workspace(&ws("w2"), None).await.map(|_| ()),
        old.create_channel(&w, &channel("d", "d", ChannelKind::Public))
            .await
            .map(|_| ()),
        old.advance_read_marker(&w, &alice, &c, 1).await.map(|_| ()),
        old.raise_last_seq(&w, &c, 1, 5).await,
        old.begin_export(&w, 9).await,
        old.begin_import(&ws("w3"), 9).await,
    ];
    for result in refused {
        assert!(matches!(result, Err(StoreError::Fenced(_))), "{result:?}");
    }
    for v in &others {
        let result = old.append(v, &c, &joined("c", 1, "bob"), 10).await;
        assert!(
            matches!(result, Err(StoreError::Fenced(_))),
            "{v}: {result:?}"
        );
    }
    tokio::time::timeout(Duration::from_secs(5), fenced)
        .await
        .expect("the older store announces that it is fenced");
    // Nothing of the refused writes landed; the newer process writes on.
    assert_eq!(snapshot(&new, "c").await.last_seq, 1);
    assert_eq!(new.workspace_exists(&ws("w2")).await, Ok(false));
    assert_eq!(new.move_marks().await, Ok(vec![]));
    append(&new, msg(2)).await;
    assert_eq!(snapshot(&new, "c").await.last_seq, 2);
    for v in &others {
        let snap = new.load_channel(v, &c).await.unwrap().unwrap();
        assert_eq!((snap.last_seq, snap.members.len()), (0, 0), "{v}");
        new.append(v, &c, &joined("c", 1, "bob"), 10).await.unwrap();
    }
    assert_eq!(new.workspace_count().await, Ok(7));
}

/// The served index (what `workspace_count` and `workspace_ids` read) follows each
/// workspace's own `served` field, which the write scripts go by: a claim rebuilds it, so an
/// index left behind by a process that died between the two writes is right again.
async fn a_claim_rebuilds_the_served_index_from_the_workspaces_served(backing: Backing) {
    let store = backing.store();
    store.claim(1).await.unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(store.create_workspace(&ws(id), None).await, Ok(true));
    }
    let mut raw = backing.raw();
    let _: () = ::redis::cmd("SREM")
        .arg("confab:cs:{.cell}:workspaces")
        .arg("b")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = ::redis::cmd("SADD")
        .arg("confab:cs:{.cell}:workspaces")
        .arg("ghost")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(store.workspace_count().await, Ok(3));
    // The workspace's own record still says it is served.
    assert_eq!(store.workspace_exists(&ws("b")).await, Ok(true));
    assert_eq!(store.workspace_exists(&ws("ghost")).await, Ok(false));

    let next = backing.store();
    next.claim(2).await.unwrap();
    assert_eq!(
        next.workspace_ids().await,
        Ok(vec![ws("a"), ws("b"), ws("c")])
    );
    assert_eq!(next.workspace_count().await, Ok(3));
}

/// Every page of an export, from the first.
async fn export_all(store: &RedisStore, w: &WorkspaceId) -> Vec<confab_shared::moves::KeyDump> {
    let mut keys = Vec::new();
    let mut cursor = Some(0);
    while let Some(start) = cursor {
        let page = store.export_keys(w, start).await.unwrap();
        keys.extend(page.keys);
        cursor = page.next;
    }
    keys
}

/// A live move as a gateway drives it, between two stores of the same kind (two cells): the
/// copy runs while the source serves, the writes made meanwhile travel in the final copy, and
/// afterwards the target serves everything while the source refuses and forgets the workspace.
async fn a_workspace_moves_to_another_store_with_the_writes_made_during_the_copy(backing: Backing) {
    let target_backing = backing.another();
    let (source, target) = (backing.store(), target_backing.store());
    source.claim(5).await.unwrap();
    target.claim(7).await.unwrap();
    let (w, c, d) = (ws("w"), ch("c"), ch("d"));
    with_channel(&source).await;
    append(&source, joined("c", 1, "alice")).await;
    append(&source, message("c", 2, "alice", "before", Some("k1"))).await;
    source
        .advance_read_marker(&w, &user("alice"), &c, 2)
        .await
        .unwrap();
    // Another workspace stays where it is.
    assert_eq!(source.create_workspace(&ws("stay"), None).await, Ok(true));

    let epoch = 40;
    source.begin_export(&w, epoch).await.unwrap();
    assert_eq!(
        source.move_marks().await,
        Ok(vec![(w.clone(), MoveMark::Copying(epoch))])
    );
    target.begin_import(&w, epoch).await.unwrap();
    assert_eq!(
        target.move_marks().await,
        Ok(vec![(w.clone(), MoveMark::Incoming(epoch))])
    );
    let first = export_all(&source, &w).await;
    assert!(
        first.iter().all(|k| k.key.starts_with("confab:cs:{w}:")),
        "{first:?}"
    );
    // Still serving: these writes are recorded for the final copy.
    append(&source, message("c", 3, "alice", "during", Some("k2"))).await;
    append(&source, edited(4, 2, "before, edited")).await;
    assert_eq!(
        source
            .create_channel(&w, &channel("d", "d", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::Created)
    );
    target.import_keys(&w, epoch, &first).await.unwrap();
    // Not served yet on the target, whatever keys it holds.
    assert_eq!(target.workspace_exists(&w).await, Ok(false));
    refused_as_moved(target.append(&w, &c, &msg(5), RETAIN_ALL).await);

    source.freeze(&w, epoch).await.unwrap();
    // Frozen: the source refuses every write of the workspace, durably; not of the others.
    refused_as_moved(source.append(&w, &c, &msg(5), RETAIN_ALL).await);
    assert_eq!(
        source
            .create_channel(&ws("stay"), &channel("c", "c", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::Created)
    );
    let dirty = export_all(&source, &w).await;
    assert!(!dirty.is_empty());
    target.import_keys(&w, epoch, &dirty).await.unwrap();
    target.commit_import(&w, epoch).await.unwrap();
    source.release(&w, epoch).await.unwrap();
    source.purge_workspace(&w).await.unwrap();

    // The target serves the whole workspace and writes on.
    assert_eq!(target.workspace_exists(&w).await, Ok(true));
    assert_eq!(target.workspace_ids().await, Ok(vec![w.clone()]));
    assert_eq!(target.move_marks().await, Ok(vec![]));
    let snap = target.load_channel(&w, &c).await.unwrap().unwrap();
    assert_eq!(
        (snap.last_seq, snap.members.clone()),
        (4, users(&["alice"]))
    );
    assert!(target.load_channel(&w, &d).await.unwrap().is_some());
    let texts: Vec<String> = target
        .messages(&w, &c, query(0, u64::MAX, 10, false))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["before, edited", "during"]);
    assert_eq!(
        target.find_client_msg(&w, &c, &user("alice"), "k2").await,
        Ok(Some((3, TS + 3)))
    );
    assert_eq!(
        target.read_markers(&w, &user("alice")).await,
        Ok(HashMap::from([(c.clone(), 2)]))
    );
    target.append(&w, &c, &msg(5), RETAIN_ALL).await.unwrap();

    // The source forgot it and refuses its writes; its other workspace serves on.
    assert_eq!(source.workspace_exists(&w).await, Ok(false));
    assert_eq!(source.workspace_ids().await, Ok(vec![ws("stay")]));
    assert_eq!(
        source.move_marks().await,
        Ok(vec![(w.clone(), MoveMark::Gone(epoch))])
    );
    assert_eq!(source.load_channel(&w, &c).await, Ok(None));
    refused_as_moved(source.append(&w, &c, &msg(5), RETAIN_ALL).await);
    source
        .append(&ws("stay"), &c, &joined("c", 1, "bob"), RETAIN_ALL)
        .await
        .unwrap();
    // A restarted source (a newer epoch) still knows the workspace left.
    let restarted = backing.store();
    restarted.claim(6).await.unwrap();
    assert_eq!(
        restarted.move_marks().await,
        Ok(vec![(w.clone(), MoveMark::Gone(epoch))])
    );
    refused_as_moved(restarted.create_workspace(&w, None).await);
}

/// A write refused by a workspace's move mark (`WSMOVED`).
fn refused_as_moved<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    assert!(
        matches!(&result, Err(StoreError::Unavailable(e)) if e.contains("WSMOVED")),
        "{result:?}"
    );
}

/// A move undone before the switch: the target drops what it imported and the source, its
/// mark cleared, serves and writes on.
async fn an_undone_import_leaves_nothing_and_the_source_serves_on(backing: Backing) {
    let target_backing = backing.another();
    let (source, target) = (backing.store(), target_backing.store());
    source.claim(1).await.unwrap();
    target.claim(1).await.unwrap();
    let (w, c) = (ws("w"), ch("c"));
    with_channel(&source).await;
    append(&source, joined("c", 1, "alice")).await;
    source.begin_export(&w, 3).await.unwrap();
    target.begin_import(&w, 3).await.unwrap();
    target
        .import_keys(&w, 3, &export_all(&source, &w).await)
        .await
        .unwrap();
    source.freeze(&w, 3).await.unwrap();
    target.abort_import(&w, 3).await.unwrap();
    source.abort_export(&w, 3).await.unwrap();

    assert_eq!(target.workspace_exists(&w).await, Ok(false));
    assert_eq!(target.load_channel(&w, &c).await, Ok(None));
    assert_eq!(target.move_marks().await, Ok(vec![]));
    assert_eq!(target.workspace_count().await, Ok(0));
    assert_eq!(source.move_marks().await, Ok(vec![]));
    append(&source, msg(2)).await;
    assert_eq!(snapshot(&source, "c").await.last_seq, 2);
    // Another attempt of a newer epoch goes through.
    source.begin_export(&w, 4).await.unwrap();
    target.begin_import(&w, 4).await.unwrap();
    target
        .import_keys(&w, 4, &export_all(&source, &w).await)
        .await
        .unwrap();
    source.freeze(&w, 4).await.unwrap();
    target
        .import_keys(&w, 4, &export_all(&source, &w).await)
        .await
        .unwrap();
    target.commit_import(&w, 4).await.unwrap();
    assert_eq!(snapshot(&target, "c").await.last_seq, 2);
    assert_eq!(target.workspace_count().await, Ok(1));
}

/// Asserts that `call` fails with `Unavailable` well within [`FAIL_FAST`].
async fn fails_fast<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) {
    let started = Instant::now();
    let result = tokio::time::timeout(FAIL_FAST + Duration::from_secs(2), call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung while redis was down"));
    let took = started.elapsed();
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{what} while redis is down: {result:?}"
    );
    assert!(took < FAIL_FAST, "{what} took {took:?} to fail");
}

async fn redis_store_ignores_a_private_channels_name_claimed_by_an_earlier_version(
    backing: Backing,
) {
    let store = backing.store();
    with_channel(&store).await;
    let w = ws("w");
    store
        .create_channel(&w, &channel("p", "secret", ChannelKind::Private))
        .await
        .unwrap();
    // Earlier versions claimed private names too, in the same hash as public ones.
    let mut conn = backing.raw();
    let _: () = ::redis::cmd("HSET")
        .arg("confab:cs:{w}:names")
        .arg("secret")
        .arg("p")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        store
            .create_channel(&w, &channel("q", "secret", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::Created)
    );
    assert_eq!(
        store
            .create_channel(&w, &channel("r", "secret", ChannelKind::Public))
            .await,
        Ok(CreateOutcome::NameTaken)
    );
}

#[tokio::test]
async fn redis_calls_fail_fast_while_redis_is_down_and_work_again_after_restart() {
    let mut server = RedisServer::start_durable();
    let store = RedisStore::connect(&server.url()).unwrap();
    let s: &dyn CellStore = &store;
    with_channel(s).await;
    append(s, joined("c", 1, "alice")).await;

    server.kill();
    let (w, c, alice) = (ws("w"), ch("c"), user("alice"));
    // Twice each: the first call meets the broken connection, later ones the reconnect loop.
    for _ in 0..2 {
        fails_fast("ping", store.ping()).await;
        fails_fast("append", store.append(&w, &c, &msg(2), RETAIN_ALL)).await;
        fails_fast("edit", store.append(&w, &c, &edited(2, 1, "x"), RETAIN_ALL)).await;
        fails_fast("load_channel", store.load_channel(&w, &c)).await;
        fails_fast("events_after", store.events_after(&w, &c, 0, 10)).await;
        fails_fast("create_workspace", store.create_workspace(&ws("v"), None)).await;
        fails_fast("workspace_exists", store.workspace_exists(&w)).await;
        fails_fast("workspace_count", store.workspace_count()).await;
        fails_fast(
            "create_channel",
            store.create_channel(&w, &channel("d", "d", ChannelKind::Public)),
        )
        .await;
        fails_fast(
            "channel_summaries",
            store.channel_summaries(&w, std::slice::from_ref(&c)),
        )
        .await;
        fails_fast("public_channels", store.public_channels(&w)).await;
        fails_fast("dm_channel", store.dm_channel(&w, (&alice, &alice))).await;
        fails_fast(
            "find_client_msg",
            store.find_client_msg(&w, &c, &alice, "k"),
        )
        .await;
        fails_fast("message", store.message(&w, &c, 1)).await;
        fails_fast(
            "messages",
            store.messages(&w, &c, query(0, u64::MAX, 10, true)),
        )
        .await;
        fails_fast("user_channels", store.user_channels(&w, &alice)).await;
        fails_fast("read_markers", store.read_markers(&w, &alice)).await;
        fails_fast(
            "advance_read_marker",
            store.advance_read_marker(&w, &alice, &c, 1),
        )
        .await;
    }

    server.restart();
    let mut attempts = 0;
    let appended = loop {
        attempts += 1;
        match store.append(&w, &c, &msg(2), RETAIN_ALL).await {
            Ok(()) => break true,
            Err(StoreError::Unavailable(_)) if attempts < 40 => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("append after restart (attempt {attempts}): {e}"),
        }
    };
    assert!(appended);
    // Nothing tried while Redis was down landed; the log goes on from seq 1.
    assert_eq!(seqs_after(s, 0, 10).await, vec![1, 2]);
    let snap = snapshot(s, "c").await;
    assert_eq!(
        (snap.last_seq, snap.members.clone()),
        (2, users(&["alice"]))
    );
    assert_eq!(store.workspace_exists(&ws("v")).await, Ok(false));
    assert_eq!(store.ping().await, Ok(()));
}

/// A server that accepts connections and never answers (hung, or a network black hole) must not
/// hang calls either: they time out as `Unavailable`.
#[tokio::test]
async fn redis_calls_fail_fast_against_a_server_that_never_answers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and holds every connection, reading nothing and writing nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => held.push(stream),
                Err(_) => break,
            }
        }
    });
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}")).unwrap();
    let (w, c, sent, edit) = (ws("w"), ch("c"), msg(1), edited(1, 1, "x"));
    // Concurrently (each on its own clock), twice: a fresh connection, then the reconnect loop.
    for _ in 0..2 {
        tokio::join!(
            fails_fast("ping", store.ping()),
            fails_fast("append", store.append(&w, &c, &sent, RETAIN_ALL)),
            fails_fast("edit", store.append(&w, &c, &edit, RETAIN_ALL)),
            fails_fast("load_channel", store.load_channel(&w, &c)),
            fails_fast("workspace_count", store.workspace_count()),
        );
    }
}

// ---- a Redis Cluster only: where the keys live, what the masters say ----

/// Every key of a workspace (its data, its `.ctl`) is on the master of its hash tag's slot,
/// and different workspaces land on different masters: one workspace never spans shards.
#[tokio::test]
async fn redis_cluster_workspaces_spread_over_the_masters_and_each_keeps_its_keys_on_one() {
    let cluster = RedisCluster::start(3);
    let store = RedisStore::connect(&cluster.url()).unwrap();
    assert!(store.is_cluster());
    store.claim(1).await.unwrap();
    let ids: Vec<String> = (0..12).map(|i| format!("ws{i}")).collect();
    for id in &ids {
        let w = ws(id);
        assert_eq!(store.create_workspace(&w, Some(id)).await, Ok(true));
        assert_eq!(
            store
                .create_channel(&w, &channel("c", "c", ChannelKind::Public))
                .await,
            Ok(CreateOutcome::Created)
        );
        store
            .append(&w, &ch("c"), &joined("c", 1, "alice"), RETAIN_ALL)
            .await
            .unwrap();
        let sent = message("c", 2, "alice", "hi", Some("k"));
        store.append(&w, &ch("c"), &sent, RETAIN_ALL).await.unwrap();
    }
    let mut homes = std::collections::BTreeSet::new();
    for id in &ids {
        let home = cluster.master_of(&format!("confab:cs:{{{id}}}.ctl"));
        homes.insert(home);
        for (i, node) in cluster.nodes.iter().enumerate() {
            let pattern = format!("confab:cs:{{{id}}}*");
            let listed = node.cli(&["--scan", "--pattern", &pattern]);
            let keys: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
            if i == home {
                // meta, names, public, channel_count, the channel's hash, log, msgs, idem,
                // idemseq, members, the user's channels, and the `.ctl`.
                assert_eq!(keys.len(), 12, "workspace {id} on node {i}: {keys:?}");
            } else {
                assert!(
                    keys.is_empty(),
                    "workspace {id} has keys on node {i}: {keys:?}"
                );
            }
        }
    }
    assert_eq!(homes.len(), 3, "12 workspaces all landed on {homes:?}");
    let all: Vec<WorkspaceId> = {
        let mut all: Vec<WorkspaceId> = ids.iter().map(|id| ws(id)).collect();
        all.sort();
        all
    };
    assert_eq!(store.workspace_ids().await, Ok(all));
}

/// A cell checks its store's persistence before it serves: in a cluster every master must
/// persist, so the weakest one is what the store reports.
#[tokio::test]
async fn redis_cluster_persistence_is_the_weakest_of_the_masters() {
    use confab_cells::store::Persistence;
    let cluster = RedisCluster::start(3);
    let store = RedisStore::connect(&cluster.url()).unwrap();
    let known = |appendonly: bool, appendfsync: &str| Persistence::Known {
        appendonly,
        appendfsync: appendfsync.to_string(),
    };
    assert_eq!(store.persistence().await, Ok(known(true, "always")));
    cluster.nodes[1].cli(&["CONFIG", "SET", "appendfsync", "everysec"]);
    assert_eq!(store.persistence().await, Ok(known(true, "everysec")));
    cluster.nodes[2].cli(&["CONFIG", "SET", "appendonly", "no"]);
    assert_eq!(store.persistence().await, Ok(known(false, "everysec")));
}

// ---- a single Redis only: the earlier key layout ----

/// Every key of the store's Redis, sorted.
async fn all_keys(conn: &mut RedisConn) -> Vec<String> {
    let mut keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(conn)
        .await
        .unwrap();
    keys.sort();
    keys
}

async fn raw_cmd(conn: &mut RedisConn, args: &[&str]) -> ::redis::Value {
    let mut cmd = ::redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(conn).await.unwrap()
}

/// A store written before hash tags (`confab:cs:w:…`, `confab:cs:workspaces`,
/// `confab:cs:moves`, `confab:cs:fence`) is not ignored: the first claim moves every
/// workspace's keys to the new names, keeps a released workspace's mark, and retires the old
/// fence so that a process of the earlier version can neither write nor claim again.
#[tokio::test]
async fn a_store_of_the_earlier_layout_is_migrated_by_the_first_claim() {
    let server = RedisServer::start();
    // Data as the earlier layout held it: written by this engine, then renamed back (the
    // values' formats did not change).
    let writer = RedisStore::connect(&server.url()).unwrap();
    let s: &dyn CellStore = &writer;
    with_channel(s).await;
    append(s, joined("c", 1, "alice")).await;
    append(s, message("c", 2, "alice", "kept", Some("k1"))).await;
    writer
        .advance_read_marker(&ws("w"), &user("alice"), &ch("c"), 2)
        .await
        .unwrap();
    let before = snapshot(s, "c").await;
    let events = writer
        .events_after(&ws("w"), &ch("c"), 0, 10)
        .await
        .unwrap();
    drop(writer);
    let mut conn = RedisConn::open(&server.url(), RedisTimeouts::default()).unwrap();
    for key in all_keys(&mut conn).await {
        if let Some(rest) = key.strip_prefix("confab:cs:{w}:") {
            raw_cmd(&mut conn, &["RENAME", &key, &format!("confab:cs:w:{rest}")]).await;
        } else {
            raw_cmd(&mut conn, &["DEL", &key]).await;
        }
    }
    raw_cmd(&mut conn, &["SET", "confab:cs:fence", "5"]).await;
    raw_cmd(&mut conn, &["SADD", "confab:cs:workspaces", "w"]).await;
    raw_cmd(&mut conn, &["HSET", "confab:cs:moves", "left", "gone:3"]).await;
    raw_cmd(&mut conn, &["HSET", "confab:cs:left:meta", "name", "Left"]).await;

    let store = RedisStore::connect(&server.url()).unwrap();
    assert_eq!(store.fence_epoch().await, Ok(5));
    assert!(matches!(store.claim(5).await, Err(StoreError::Fenced(_))));
    store.claim(6).await.unwrap();
    let s: &dyn CellStore = &store;
    assert_eq!(snapshot(s, "c").await, before);
    assert_eq!(
        store.events_after(&ws("w"), &ch("c"), 0, 10).await,
        Ok(events)
    );
    assert_eq!(find(s, "c", "alice", "k1").await, Some((2, TS + 2)));
    assert_eq!(
        store.read_markers(&ws("w"), &user("alice")).await,
        Ok(HashMap::from([(ch("c"), 2)]))
    );
    assert_eq!(store.workspace_ids().await, Ok(vec![ws("w")]));
    assert_eq!(store.workspace_count().await, Ok(1));
    assert_eq!(
        store.move_marks().await,
        Ok(vec![(ws("left"), MoveMark::Gone(3))])
    );
    // Nothing is left under the earlier names but the retired fence, which no epoch equals.
    let earlier: Vec<String> = all_keys(&mut conn)
        .await
        .into_iter()
        .filter(|k| !k.contains('{'))
        .collect();
    assert_eq!(earlier, ["confab:cs:fence"]);
    let retired: String = ::redis::cmd("GET")
        .arg("confab:cs:fence")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(retired.parse::<u64>().is_err(), "{retired}");
    assert_eq!(store.fence_epoch().await, Ok(6));
    append(s, msg(3)).await;

    // A later claim finds nothing more to migrate and keeps everything.
    let next = RedisStore::connect(&server.url()).unwrap();
    next.claim(7).await.unwrap();
    assert_eq!(snapshot(&next, "c").await.last_seq, 3);
    assert_eq!(next.workspace_ids().await, Ok(vec![ws("w")]));
}

/// The earlier layout with a move under way (its dirty keys and export list name keys of that
/// layout) is refused with a clear error, and left exactly as it was for the earlier version to
/// finish or abort the move.
#[tokio::test]
async fn a_store_of_the_earlier_layout_with_a_move_in_progress_is_refused_unchanged() {
    let server = RedisServer::start();
    let mut conn = RedisConn::open(&server.url(), RedisTimeouts::default()).unwrap();
    raw_cmd(&mut conn, &["SET", "confab:cs:fence", "5"]).await;
    raw_cmd(&mut conn, &["SADD", "confab:cs:workspaces", "w"]).await;
    raw_cmd(&mut conn, &["HSET", "confab:cs:w:meta", "name", "W"]).await;
    raw_cmd(&mut conn, &["HSET", "confab:cs:moves", "w", "frozen:9"]).await;
    raw_cmd(
        &mut conn,
        &["SADD", "confab:cs:dirty.w", "confab:cs:w:meta"],
    )
    .await;
    let before = all_keys(&mut conn).await;

    let store = RedisStore::connect(&server.url()).unwrap();
    let refused = store.claim(6).await;
    assert!(
        matches!(&refused, Err(StoreError::Corrupt(e)) if e.contains("workspace w") && e.contains("frozen:9")),
        "{refused:?}"
    );
    let fence: String = ::redis::cmd("GET")
        .arg("confab:cs:fence")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fence, "5");
    assert_eq!(all_keys(&mut conn).await, before);
}
