//! Partitions between hosts (docs/operations.md, "What a partition does"): a gateway, a cell,
//! the cell's store and the directory Redis, each in a network namespace of its own on its own
//! addresses (cluster/netns.rs). Under traffic from several clients, each link is cut and
//! healed in turn, first taken down, then made a black hole: the system degrades to
//! `unavailable` (or closes sessions for them to reconnect) instead of hanging, recovers by
//! itself once the link is back, and no acked message is missing from the channel log.
//!
//! Where network namespaces are not allowed (not root, no iproute2) every test passes after
//! saying so on stderr. `CONFAB_PARTITION_ROUNDS` (default 1) repeats the cuts, and
//! `CONFAB_PARTITION_HOLD_S` (default 1) holds each cut that long after every client saw it
//! (infra/partition.sh sets both for its long run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::io::Write;
use std::time::{Duration, Instant};

use cluster::netns::{unsupported, Cut, Hosts, Link};
use cluster::traffic::{all_messages, check_nothing_lost, timeline, Report, Sender, Watch};
use cluster::Api;
use reqwest::Method;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest a request may go unanswered: a gateway answers `unavailable` after its 10 s
/// request timeout, or after a link it waits for has failed to open (4 s); this is slack on
/// top, on a loaded machine.
const HANG: Duration = Duration::from_secs(25);
/// Bound for every client to see a cut, and for every client to be served again after a heal.
const NOTICE: Duration = Duration::from_secs(45);
const RECOVER: Duration = Duration::from_secs(60);
const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The hosts, or `None` (after saying why on stderr, past the test harness's capture) where
/// this machine does not allow network namespaces.
async fn hosts_or_skip(test: &str) -> Option<Hosts> {
    if let Some(why) = unsupported() {
        let _ = writeln!(
            std::io::stderr(),
            "{test}: SKIPPED, this machine does not allow the partition test: {why}"
        );
        return None;
    }
    Some(Hosts::start().await)
}

/// Several clients sending to one channel through the gateway.
struct Traffic {
    stop: CancellationToken,
    senders: Vec<JoinHandle<Report>>,
    watches: Vec<Watch>,
    reader: String,
    channel: String,
}

impl Traffic {
    async fn start(hosts: &Hosts) -> Traffic {
        let api = Api::new(&hosts.gateway_url());
        api.create_workspace("acme", "r").await;
        let reader = api.token("acme", USERS[0]).await;
        let (status, body) = api
            .call(
                &reader,
                Method::POST,
                "/v1/channels",
                Some(json!({"name": "general", "kind": "public", "members": USERS})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let channel = body["id"].as_str().unwrap().to_string();
        let stop = CancellationToken::new();
        let mut senders = Vec::new();
        let mut watches = Vec::new();
        for user in USERS {
            let sender = Sender {
                gateways: vec![hosts.gateway_ws()],
                token: api.token("acme", user).await,
                channel: channel.clone(),
                label: user.to_string(),
                pace: Duration::from_millis(20),
                measure: false,
            };
            let watch = Watch::default();
            senders.push(tokio::spawn(sender.run_watched(
                stop.clone(),
                HANG,
                watch.clone(),
            )));
            watches.push(watch);
        }
        Traffic {
            stop,
            senders,
            watches,
            reader,
            channel,
        }
    }

    /// How long after `since` each client first saw a disruption, once every one has, within
    /// `bound`.
    async fn all_disrupted(&self, since: Instant, bound: Duration) -> Vec<Duration> {
        self.wait_all(bound, "saw the cut", |watch| {
            let timeline = timeline(watch);
            let first = timeline.disruptions.iter().find(|at| **at >= since)?;
            Some(*first - since)
        })
        .await
    }

    /// How long after `since` each client had a message sent at or after `since` acked, once
    /// every one has, within `bound`.
    async fn all_acked_after(&self, since: Instant, bound: Duration) -> Vec<Duration> {
        self.wait_all(bound, "was served", |watch| {
            let timeline = timeline(watch);
            let (_, acked) = timeline.acks.iter().find(|(sent, _)| *sent >= since)?;
            Some(*acked - since)
        })
        .await
    }

    /// Messages first sent in `from..to` and acked before `to`.
    fn acked_within(&self, from: Instant, to: Instant) -> usize {
        self.watches
            .iter()
            .map(|watch| {
                timeline(watch)
                    .acks
                    .iter()
                    .filter(|(sent, acked)| *sent >= from && *acked < to)
                    .count()
            })
            .sum()
    }

    async fn wait_all(
        &self,
        bound: Duration,
        what: &str,
        of: impl Fn(&Watch) -> Option<Duration>,
    ) -> Vec<Duration> {
        let deadline = Instant::now() + bound;
        loop {
            let seen: Vec<Option<Duration>> = self.watches.iter().map(&of).collect();
            if seen.iter().all(Option::is_some) {
                return seen.into_iter().flatten().collect();
            }
            assert!(
                Instant::now() < deadline,
                "not every client {what} within {bound:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the clients and checks that every acked message is in the channel's log once.
    async fn finish(self, hosts: &Hosts) -> usize {
        self.stop.cancel();
        let mut reports = Vec::new();
        for sender in self.senders {
            reports.push(sender.await.unwrap());
        }
        for report in &reports {
            println!("  client: {report}");
        }
        let messages = all_messages(&hosts.gateway_url(), &self.reader, &self.channel).await;
        check_nothing_lost(&reports, &messages)
    }
}

fn max(durations: &[Duration]) -> Duration {
    durations.iter().copied().max().unwrap_or_default()
}

/// Cuts `links` with `how` and heals them, once every client has seen the cut: nothing sent
/// during the cut is acked before the heal, and after it every client is served again.
async fn cut_and_heal(traffic: &Traffic, links: &[&Link], how: Cut) {
    let names: Vec<_> = links.iter().map(|l| l.name).collect();
    traffic.all_acked_after(Instant::now(), RECOVER).await;
    let cut = Instant::now();
    for link in links {
        link.cut(how);
    }
    let noticed = traffic.all_disrupted(cut, NOTICE).await;
    tokio::time::sleep(Duration::from_secs(env_u64("CONFAB_PARTITION_HOLD_S", 1))).await;
    let healed = Instant::now();
    for link in links {
        link.heal(how);
    }
    let during = traffic.acked_within(cut, healed);
    assert_eq!(during, 0, "{names:?} cut ({how:?}): messages were acked");
    let recovered = traffic.all_acked_after(healed, RECOVER).await;
    println!(
        "{names:?} {how:?}: every client degraded within {:.1} s, the cut held {:.1} s, \
         every client served again {:.1} s after the heal",
        max(&noticed).as_secs_f64(),
        (healed - cut).as_secs_f64(),
        max(&recovered).as_secs_f64()
    );
}

/// Cuts `links` in turn with each [`Cut`], `CONFAB_PARTITION_ROUNDS` times, then checks the
/// log.
async fn partition_test(test: &str, links: impl Fn(&Hosts) -> Vec<&Link>) {
    let Some(hosts) = hosts_or_skip(test).await else {
        return;
    };
    let traffic = Traffic::start(&hosts).await;
    for _ in 0..env_u64("CONFAB_PARTITION_ROUNDS", 1) {
        for how in [Cut::Down, Cut::Blackhole] {
            cut_and_heal(&traffic, &links(&hosts), how).await;
        }
    }
    let acked = traffic.finish(&hosts).await;
    println!("{test}: {acked} acked messages, all in the log once");
}

#[tokio::test]
async fn a_cut_gateway_cell_link_answers_unavailable_recovers_and_loses_nothing_acked() {
    partition_test("gateway-cell", |hosts| vec![&hosts.gw_cell]).await;
}

#[tokio::test]
async fn a_cut_cell_store_link_answers_unavailable_recovers_and_loses_nothing_acked() {
    partition_test("cell-store", |hosts| vec![&hosts.cell_store]).await;
}

/// The directory cut off from the gateway and the cell (both links at once): every connected
/// client keeps chatting through it, past the directory clients' timeouts and the cell's
/// missed heartbeats, and nothing acked is lost once it is back.
#[tokio::test]
async fn with_the_directory_cut_off_every_connected_client_keeps_chatting() {
    let Some(hosts) = hosts_or_skip("directory").await else {
        return;
    };
    let traffic = Traffic::start(&hosts).await;
    for how in [Cut::Down, Cut::Blackhole] {
        traffic.all_acked_after(Instant::now(), RECOVER).await;
        let cut = Instant::now();
        hosts.gw_dir.cut(how);
        hosts.cell_dir.cut(how);
        // Well past the 2 s Redis timeouts and several missed 2 s cell heartbeats.
        let served = traffic
            .all_acked_after(cut + Duration::from_secs(10), NOTICE)
            .await;
        hosts.gw_dir.heal(how);
        hosts.cell_dir.heal(how);
        let healed = Instant::now();
        let recovered = traffic.all_acked_after(healed, RECOVER).await;
        println!(
            "directory {how:?}: every client still served {:.1} s into the cut; \
             served {:.1} s after the heal",
            (max(&served) + Duration::from_secs(10)).as_secs_f64(),
            max(&recovered).as_secs_f64()
        );
    }
    let acked = traffic.finish(&hosts).await;
    println!("directory: {acked} acked messages, all in the log once");
}
