//! The directory on a real 3-master Redis Cluster (docs/operations.md, "Running on a Redis
//! Cluster"): two workspaces whose directory slots are on different masters, one on each of
//! two cells, traffic on both through one gateway, then `kill -9` of the master that holds one
//! workspace's directory slot (no replicas, so nothing takes over until it restarts).
//!
//! What happens, and is asserted: nothing acked is lost in either workspace; the other
//! workspace's clients never notice; the lost workspace's clients keep chatting too, because
//! the gateway routes its sessions from its last-known copy of the directory (static
//! stability), and a gateway that never routed it answers a new session `unavailable`. The
//! directory answers `503` for what needs the lost slot only (reading or creating a workspace
//! there, listing every workspace) and serves the rest. Once the master restarts with its data,
//! the lost workspace is served everywhere again.
//!
//! The cell store on a 3-master Redis Cluster of its own: `kill -9` of the master that holds
//! one workspace's store slot costs that workspace its writes (`unavailable`, no hang, no
//! loss) and no other workspace anything; once the master is back, the workspace is served
//! again by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::time::{Duration, Instant};

use cluster::traffic::{all_messages, check_nothing_lost, timeline, Report, Sender, Watch, HANG};
use cluster::{Client, Cluster, WAIT};
use confab_directory::redis_engine::keys;
use confab_shared::WorkspaceId;
use confab_testkit::RedisCluster;
use reqwest::Method;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How long each phase of traffic runs.
const PHASE: Duration = Duration::from_secs(3);

/// The first of `w0`, `w1`, … whose directory slot's master is (`on`) or is not node `node`,
/// and is none of `taken`.
fn workspace_where(cluster: &RedisCluster, node: usize, on: bool, taken: &[&str]) -> String {
    (0..1000)
        .map(|i| format!("w{i}"))
        .find(|ws| {
            let key = keys::workspace(&WorkspaceId::new(ws).unwrap());
            !taken.contains(&ws.as_str()) && (cluster.master_of(&key) == node) == on
        })
        .expect("a workspace id on that master")
}

#[tokio::test]
async fn a_dead_directory_master_costs_its_workspaces_directory_reads_and_no_acked_message() {
    let mut cluster = Cluster::new()
        .redis_cluster()
        .cell("c1", "r")
        .cell("c2", "r")
        .gateways(2)
        .start()
        .await;
    let redis = cluster.directory.as_cluster().expect("a Redis Cluster");
    // The master to kill holds neither the cell registry nor the presence index, so that
    // what it costs is one workspace's slot (the registry's master is the subject of
    // docs/operations.md too: heartbeats and placement stop, serving does not).
    let (cells_node, due_node) = (
        redis.master_of(keys::CELLS),
        redis.master_of(keys::PRESENCE_DUE),
    );
    let victim = (0..3)
        .find(|n| *n != cells_node && *n != due_node)
        .expect("a master without the registry and the index");
    let lost = workspace_where(redis, victim, true, &[]);
    let kept = workspace_where(redis, victim, false, &[]);
    let lost_later = workspace_where(redis, victim, true, &[&lost]);
    let kept_later = workspace_where(redis, victim, false, &[&kept]);
    let lost_cell = cluster.create_workspace(&lost, "r").await;
    let kept_cell = cluster.create_workspace(&kept, "r").await;
    assert_ne!(
        lost_cell, kept_cell,
        "placement spreads the two over both cells"
    );

    let stop = CancellationToken::new();
    let mut channels = Vec::new();
    let mut senders = Vec::new();
    let mut tokens = Vec::new();
    for workspace in [&lost, &kept] {
        let reader = cluster.token(workspace, "a").await;
        let (status, body) = cluster
            .api(
                0,
                &reader,
                Method::POST,
                "/v1/channels",
                Some(json!({"name": "general", "kind": "public", "members": ["a", "b", "c"]})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let channel = body["id"].as_str().unwrap().to_string();
        for user in ["a", "b"] {
            let sender = Sender {
                gateways: vec![cluster.gateway(0).ws_url()],
                token: cluster.token(workspace, user).await,
                channel: channel.clone(),
                label: format!("{workspace}-{user}"),
                pace: Duration::from_millis(10),
                measure: false,
            };
            senders.push((workspace.clone(), tokio::spawn(sender.run(stop.clone()))));
        }
        tokens.push(cluster.token(workspace, "c").await);
        channels.push((workspace.clone(), reader, channel));
    }
    let (lost_token, kept_token) = (tokens[0].clone(), tokens[1].clone());

    tokio::time::sleep(PHASE).await;
    cluster
        .directory
        .as_cluster_mut()
        .expect("a Redis Cluster")
        .kill_node(victim);
    tokio::time::sleep(PHASE).await;

    // The directory answers for what it still has and 503 for the lost slot.
    let status = |(status, _): (u16, serde_json::Value)| status;
    let path = |ws: &str| format!("/admin/v1/workspaces/{ws}");
    assert_eq!(
        status(cluster.admin(0, Method::GET, &path(&kept), None).await),
        200
    );
    assert_eq!(
        status(cluster.admin(0, Method::GET, &path(&lost), None).await),
        503
    );
    assert_eq!(
        status(
            cluster
                .admin(0, Method::GET, "/admin/v1/workspaces", None)
                .await
        ),
        503
    );
    assert_eq!(
        status(cluster.admin(0, Method::GET, "/admin/v1/cells", None).await),
        200
    );
    let create = |ws: &str| Some(json!({"id": ws, "region": "r"}));
    assert_eq!(
        status(
            cluster
                .admin(0, Method::POST, "/admin/v1/workspaces", create(&kept_later))
                .await
        ),
        201
    );
    assert_eq!(
        status(
            cluster
                .admin(0, Method::POST, "/admin/v1/workspaces", create(&lost_later))
                .await
        ),
        503
    );
    // A new session of the lost workspace: the gateway that routed it attaches it from its
    // last-known directory; one that never did cannot, and says `unavailable`.
    let mut routed = Client::connect(&cluster.gateway(0).ws_url(), &lost_token, None).await;
    let ack = routed
        .request(json!({"op": "send", "channel": channels[0].2, "text": "during"}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let refused = Client::try_connect(&cluster.gateway(1).ws_url(), &lost_token, None).await;
    let refusal = refused
        .err()
        .expect("a gateway that never routed it refuses");
    assert!(
        refusal.contains("unavailable") || refusal.contains("4010"),
        "{refusal}"
    );
    // The other workspace is served by both gateways as before.
    Client::connect(&cluster.gateway(1).ws_url(), &kept_token, None).await;
    tokio::time::sleep(PHASE).await;

    cluster
        .directory
        .as_cluster_mut()
        .expect("a Redis Cluster")
        .restart_node(victim);
    // Back with its data: the lost workspace's record is read again, by every gateway.
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(cluster.admin(1, Method::GET, &path(&lost), None).await) != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{lost} never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Client::connect(&cluster.gateway(1).ws_url(), &lost_token, None).await;
    tokio::time::sleep(PHASE).await;
    stop.cancel();

    let mut reports: Vec<(String, Report)> = Vec::new();
    for (workspace, sender) in senders {
        reports.push((workspace, sender.await.unwrap()));
    }
    for (workspace, report) in &reports {
        println!("{workspace}: {report}");
        // Neither workspace's clients noticed: the gateway routes both from what it knows.
        assert!(
            report.disruptions.is_empty() && report.errors.is_empty(),
            "{workspace}'s clients were disturbed: {report}"
        );
    }
    for (workspace, reader, channel) in &channels {
        let workspace_reports: Vec<Report> = reports
            .iter()
            .filter(|(w, _)| w == workspace)
            .map(|(_, r)| r.clone())
            .collect();
        let messages = all_messages(&cluster.gateway(0).url(), reader, channel).await;
        let acked = check_nothing_lost(&workspace_reports, &messages);
        assert!(acked > 0, "{workspace}: nothing was acked");
        println!("{workspace}: {acked} acked messages, all in the log once");
    }
}

/// The cell store's control key of workspace `ws`, in the workspace's slot.
fn store_ctl(ws: &str) -> String {
    format!("confab:cs:{{{ws}}}.ctl")
}

/// The first of `s0`, `s1`, … whose store slot's master is (`on`) or is not node `node`.
fn store_workspace_where(store: &RedisCluster, node: usize, on: bool) -> String {
    (0..1000)
        .map(|i| format!("s{i}"))
        .find(|ws| (store.master_of(&store_ctl(ws)) == node) == on)
        .expect("a workspace id on that master")
}

/// One workspace's senders and the channel they chat in.
struct Chat {
    workspace: String,
    reader: String,
    channel: String,
    senders: Vec<tokio::task::JoinHandle<Report>>,
    watches: Vec<Watch>,
}

impl Chat {
    /// Creates a channel in `workspace` and starts two senders in it through gateway 0.
    async fn start(cluster: &cluster::Running, workspace: &str, stop: &CancellationToken) -> Chat {
        let reader = cluster.token(workspace, "a").await;
        let (status, body) = cluster
            .api(
                0,
                &reader,
                Method::POST,
                "/v1/channels",
                Some(json!({"name": "general", "kind": "public", "members": ["a", "b"]})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let channel = body["id"].as_str().unwrap().to_string();
        let mut chat = Chat {
            workspace: workspace.to_string(),
            reader,
            channel: channel.clone(),
            senders: Vec::new(),
            watches: Vec::new(),
        };
        for user in ["a", "b"] {
            let sender = Sender {
                gateways: vec![cluster.gateway(0).ws_url()],
                token: cluster.token(workspace, user).await,
                channel: channel.clone(),
                label: format!("{workspace}-{user}"),
                pace: Duration::from_millis(10),
                measure: false,
            };
            let watch = Watch::default();
            chat.watches.push(watch.clone());
            chat.senders
                .push(tokio::spawn(sender.run_watched(stop.clone(), HANG, watch)));
        }
        chat
    }

    /// When the first ack arrived after `since`, if one did.
    fn first_ack_after(&self, since: Instant) -> Option<Instant> {
        self.watches
            .iter()
            .filter_map(|w| timeline(w).acks.iter().map(|a| a.1).find(|t| *t > since))
            .min()
    }

    /// When the first disruption (an `unavailable` reply or a close) came after `since`.
    fn first_disruption_after(&self, since: Instant) -> Option<Instant> {
        self.watches
            .iter()
            .filter_map(|w| timeline(w).disruptions.iter().copied().find(|t| *t > since))
            .min()
    }

    /// How many acks arrived in `from..to`.
    fn acks_between(&self, from: Instant, to: Instant) -> usize {
        self.watches
            .iter()
            .map(|w| {
                timeline(w)
                    .acks
                    .iter()
                    .filter(|a| a.1 > from && a.1 < to)
                    .count()
            })
            .sum()
    }

    /// Waits for the senders and checks every acked message is in the log once.
    async fn finish(self, cluster: &cluster::Running) -> Vec<Report> {
        let workspace = self.workspace.clone();
        let (reports, messages) = self.stopped(cluster).await;
        let acked = check_nothing_lost(&reports, &messages);
        assert!(acked > 0, "{workspace}: nothing was acked");
        println!("{workspace}: {acked} acked messages, all in the log once");
        reports
    }

    /// Waits for the senders; their reports (with when each ack came) and the channel's log.
    async fn stopped(self, cluster: &cluster::Running) -> (Vec<Report>, Vec<serde_json::Value>) {
        let mut reports = Vec::new();
        for (sender, watch) in self.senders.into_iter().zip(&self.watches) {
            let report = sender.await.unwrap();
            assert_eq!(report.acked.len(), timeline(watch).acks.len());
            reports.push(report);
        }
        let messages = all_messages(&cluster.gateway(0).url(), &self.reader, &self.channel).await;
        (reports, messages)
    }
}

/// Waits (bounded) until `chat` has an ack after `since`; returns when it came.
async fn wait_ack_after(chat: &Chat, since: Instant, what: &str) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(at) = chat.first_ack_after(since) {
            return at;
        }
        assert!(Instant::now() < deadline, "{}: {what}", chat.workspace);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every client of `workspace` went through without an error or a disruption.
fn assert_undisturbed(workspace: &str, reports: Vec<Report>) {
    for report in &reports {
        println!("{workspace}: {report}");
        assert!(
            report.disruptions.is_empty() && report.errors.is_empty(),
            "{workspace}'s clients were disturbed: {report}"
        );
    }
}

/// A cell whose store is a 3-master Redis Cluster (`replicas` per master), two workspaces
/// chatting on it, and the master of one's slot (`lost`) killed after a phase of traffic.
struct StoreMasterKilled {
    cluster: cluster::Running,
    victim: usize,
    lost: String,
    kept: String,
    stop: CancellationToken,
    lost_chat: Chat,
    kept_chat: Chat,
    killed: Instant,
}

async fn kill_a_store_master_under_traffic(replicas: usize) -> StoreMasterKilled {
    let mut cluster = Cluster::new()
        .cell("c1", "r")
        .store_cluster(replicas)
        .gateways(1)
        .start()
        .await;
    let store = cluster.cells[0]
        .store
        .as_cluster()
        .expect("a Redis Cluster");
    // The master to kill holds none of the cell-wide keys (`{.cell}`: the store's fence, its
    // workspaces), so that what it costs is its workspaces' slots.
    let cell_node = store.master_of("confab:cs:{.cell}:fence");
    let victim = (0..3).find(|n| *n != cell_node).expect("another master");
    let lost = store_workspace_where(store, victim, true);
    let kept = store_workspace_where(store, victim, false);
    for ws in [&lost, &kept] {
        assert_eq!(cluster.create_workspace(ws, "r").await, "c1");
    }

    let stop = CancellationToken::new();
    let lost_chat = Chat::start(&cluster, &lost, &stop).await;
    let kept_chat = Chat::start(&cluster, &kept, &stop).await;
    tokio::time::sleep(PHASE).await;

    let killed = Instant::now();
    cluster.cells[0]
        .store
        .as_cluster_mut()
        .expect("a Redis Cluster")
        .kill_node(victim);
    StoreMasterKilled {
        cluster,
        victim,
        lost,
        kept,
        stop,
        lost_chat,
        kept_chat,
        killed,
    }
}

#[tokio::test]
async fn a_dead_store_master_makes_its_workspaces_unavailable_until_it_restarts_and_loses_nothing_acked(
) {
    let StoreMasterKilled {
        mut cluster,
        victim,
        lost,
        kept,
        stop,
        lost_chat,
        kept_chat,
        killed,
    } = kill_a_store_master_under_traffic(0).await;
    // The lost workspace's sends are refused (`unavailable`), never hang (a hang panics its
    // sender) and are not acked, while the other workspace's clients keep chatting.
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        if let Some(at) = lost_chat.first_disruption_after(killed) {
            break at;
        }
        assert!(Instant::now() < deadline, "{lost}: no send was refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(PHASE).await;
    let restarting = Instant::now();
    // An ack within a second of the kill may be of a write the master made before it died.
    let grace = killed + Duration::from_secs(1);
    assert_eq!(
        lost_chat.acks_between(grace, restarting),
        0,
        "{lost}: acked while its store master was down"
    );
    assert!(
        kept_chat.acks_between(killed, restarting) > 0,
        "{kept}: not served while another master was down"
    );
    assert_eq!(
        kept_chat.first_disruption_after(killed),
        None,
        "{kept} was disturbed"
    );

    cluster.cells[0]
        .store
        .as_cluster_mut()
        .expect("a Redis Cluster")
        .restart_node(victim);
    let served = wait_ack_after(
        &lost_chat,
        restarting,
        "never served again after the restart",
    )
    .await;
    tokio::time::sleep(PHASE).await;
    stop.cancel();
    println!(
        "store master killed: {lost} refused after {} ms; restarted: served again after {} ms",
        (refused - killed).as_millis(),
        (served - restarting).as_millis()
    );

    assert_undisturbed(&kept, kept_chat.finish(&cluster).await);
    let lost_reports = lost_chat.finish(&cluster).await;
    for report in &lost_reports {
        println!("{lost}: {report}");
        assert!(
            report.closes.is_empty(),
            "{lost}'s sockets were closed: {report}"
        );
    }
    assert!(
        lost_reports
            .iter()
            .any(|r| r.errors.contains_key("unavailable")),
        "{lost}: no `unavailable`"
    );
}

#[tokio::test]
async fn a_dead_store_master_with_a_replica_is_replaced_and_its_workspaces_are_served_again_without_it(
) {
    let StoreMasterKilled {
        cluster,
        victim,
        lost,
        kept,
        stop,
        lost_chat,
        kept_chat,
        killed,
    } = kill_a_store_master_under_traffic(1).await;
    let store = cluster.cells[0]
        .store
        .as_cluster()
        .expect("a Redis Cluster");
    // A replica takes over (`wait_failover` would block the senders' runtime: polled here).
    let deadline = Instant::now() + 2 * WAIT;
    while store.master_of(&store_ctl(&lost)) == victim {
        assert!(
            Instant::now() < deadline,
            "no replica took over {lost}'s slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = Instant::now();
    // Served again by the promoted replica, the dead master still down.
    let served = wait_ack_after(
        &lost_chat,
        killed + Duration::from_secs(1),
        "never served by the replica",
    )
    .await;
    let refused = lost_chat.first_disruption_after(killed);
    tokio::time::sleep(PHASE).await;
    stop.cancel();
    assert!(
        kept_chat.acks_between(killed, promoted) > 0,
        "{kept}: not served while another master was down"
    );
    println!(
        "store master killed, replica promoted after {} ms; {lost} refused after {:?} ms, served again after {} ms",
        (promoted - killed).as_millis(),
        refused.map(|r| (r - killed).as_millis()),
        (served - killed).as_millis()
    );

    assert_undisturbed(&kept, kept_chat.finish(&cluster).await);
    // Replication is asynchronous: what the dead master acked in its last moments may not
    // have reached the replica, and the replica's log continues from what it has (a seq of a
    // lost message may be taken by a later one). Guaranteed, and asserted: no message is in
    // the log twice, and every message acked once the replica served is in it at its seq.
    // How many earlier acked messages are not is printed.
    let watches = lost_chat.watches.clone();
    let (reports, messages) = lost_chat.stopped(&cluster).await;
    let by_seq: std::collections::BTreeMap<u64, &str> = messages
        .iter()
        .filter_map(|m| Some((m["seq"].as_u64()?, m["text"].as_str()?)))
        .collect();
    let mut texts = std::collections::HashSet::new();
    for text in by_seq.values() {
        assert!(texts.insert(*text), "message {text} appears twice");
    }
    let (mut after, mut missing_before) = (0, 0);
    for (report, watch) in reports.iter().zip(&watches) {
        println!("{lost}: {report}");
        assert!(
            report.closes.is_empty(),
            "{lost}'s sockets were closed: {report}"
        );
        let acks = timeline(watch).acks.clone();
        for ((text, seq), (_, acked_at)) in report.acked.iter().zip(acks) {
            let logged = by_seq.get(seq).copied() == Some(text.as_str());
            if acked_at >= served {
                assert!(
                    logged,
                    "{text} (seq {seq}), acked by the replica, is not in the log"
                );
                after += 1;
            } else if !logged {
                missing_before += 1;
            }
        }
    }
    assert!(after > 0, "{lost}: nothing acked after the failover");
    println!(
        "{lost}: {after} acked after the failover, all in the log; {missing_before} acked before it missing"
    );
}
