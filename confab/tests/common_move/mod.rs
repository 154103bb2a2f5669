//! Helpers shared by the move and drain tests: clients that keep sending across moves, and
//! the checks that nothing acked was lost, reused or skipped.

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::cluster::{self, Client, WAIT};

/// Creates a public channel in the token's workspace with `members`; returns its id.
pub async fn channel(
    cluster: &cluster::Running,
    token: &str,
    name: &str,
    members: &[&str],
) -> String {
    let (status, body) = cluster
        .api(
            0,
            token,
            Method::POST,
            "/v1/channels",
            Some(json!({"name": name, "kind": "public", "members": members})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// Posts `n` messages over HTTP; returns their seqs.
pub async fn post_messages(
    cluster: &cluster::Running,
    token: &str,
    channel: &str,
    n: usize,
) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        let (status, body) = cluster
            .api(
                0,
                token,
                Method::POST,
                &format!("/v1/channels/{channel}/messages"),
                Some(json!({"text": format!("seed {i}")})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        seqs.push(body["seq"].as_u64().unwrap());
    }
    seqs
}

/// Every message of a channel, oldest first, read over HTTP from gateway `gateway`.
pub async fn history(
    cluster: &cluster::Running,
    gateway: usize,
    token: &str,
    channel: &str,
) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let (status, body) = cluster
            .api(
                gateway,
                token,
                Method::GET,
                &format!("/v1/channels/{channel}/messages?after={after}&limit=200"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let page = body["messages"].as_array().unwrap().clone();
        let Some(last) = page.last() else { break };
        after = last["seq"].as_u64().unwrap();
        all.extend(page);
        if body["has_more"] != true {
            break;
        }
    }
    all
}

/// Connects, retrying while the hello is refused (the workspace may be moving).
pub async fn connect_retrying(url: &str, token: &str, resume: Option<Value>) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::try_connect(url, token, resume.clone()).await {
            Ok(client) => return client,
            Err(e) => {
                assert!(Instant::now() < deadline, "could not connect: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What one continuous sender got.
pub struct Sent {
    /// `(client_msg_id, acked seq)`, in the order acked.
    pub acks: Vec<(String, u64)>,
    /// Times its socket was closed under it and it reconnected.
    pub reconnects: usize,
}

/// A client that sends to `channel` until `stop`, each message with its own `client_msg_id`:
/// an `unavailable` reply or a closed socket (`4010` when its workspace moves) is retried
/// with the same id after reconnecting with `resume`, as the SDK does.
pub fn keep_sending(
    url: String,
    token: String,
    channel: String,
    user: String,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Sent> {
    tokio::spawn(async move {
        let mut client = connect_retrying(&url, &token, None).await;
        let mut sent = Sent {
            acks: Vec::new(),
            reconnects: 0,
        };
        let mut i = 0;
        while !stop.load(Ordering::Acquire) {
            let cmid = format!("{user}-{i}");
            let request =
                json!({"op": "send", "channel": channel, "text": cmid, "client_msg_id": cmid});
            match client.try_request(request).await {
                Ok(reply) if reply["op"] == "ack" => {
                    sent.acks.push((cmid, reply["seq"].as_u64().unwrap()));
                    acked.fetch_add(1, Ordering::AcqRel);
                    i += 1;
                    // Events from the other senders are not what this client checks.
                    client.take_pending();
                }
                Ok(reply) if reply["code"] == "unavailable" => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(reply) => panic!("{user}: unexpected reply {reply}"),
                Err(_) => {
                    sent.reconnects += 1;
                    let last = sent.acks.last().map_or(0, |(_, seq)| *seq);
                    let resume = json!({ channel.clone(): last });
                    client = connect_retrying(&url, &token, Some(resume)).await;
                }
            }
        }
        sent
    })
}

/// Waits until `counter` reaches `at_least`.
pub async fn wait_for_count(counter: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + WAIT;
    while counter.load(Ordering::Acquire) < at_least {
        assert!(
            Instant::now() < deadline,
            "only {} of {at_least} acks arrived",
            counter.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that every ack is in the channel's history with its own text at its seq, that no
/// seq is there twice, and that the messages after `first_sent` fill their seqs without gap.
pub fn assert_acks_in_history(acks: &[(String, u64)], history: &[Value]) {
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    let unique: HashSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "a seq is in the history twice");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "history out of order");
    let acked: HashSet<u64> = acks.iter().map(|(_, seq)| *seq).collect();
    assert_eq!(acked.len(), acks.len(), "two acks carry the same seq");
    for (cmid, seq) in acks {
        let message = history
            .iter()
            .find(|m| m["seq"] == json!(seq))
            .unwrap_or_else(|| panic!("acked seq {seq} ({cmid}) is not in the history"));
        assert_eq!(
            message["text"],
            json!(cmid),
            "seq {seq} holds another message"
        );
    }
    // Every message sent by the continuous senders is one of theirs: no gap in between.
    let first = *acked.iter().min().unwrap();
    let last = *acked.iter().max().unwrap();
    let between: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|s| (first..=last).contains(s))
        .collect();
    assert_eq!(
        between.len() as u64,
        last - first + 1,
        "the history skips a seq between {first} and {last}"
    );
    assert!(
        between.iter().all(|s| acked.contains(s)),
        "a message nobody acked sits between the acked ones"
    );
}

/// The value of a counter series in a gateway's `/metrics`, 0 when absent.
pub async fn metric(gateway_url: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{gateway_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Whether a cell's store still holds anything of `workspace`.
pub fn store_holds(cell: &cluster::CellProc, workspace: &str) -> bool {
    let keys = cell.store_cli(&[
        "--scan",
        "--pattern",
        &format!("confab:cs:{{{workspace}}}:*"),
    ]);
    let served = cell.store_cli(&["HGET", &format!("confab:cs:{{{workspace}}}.ctl"), "served"]);
    !keys.is_empty() || served == "1"
}

/// The directory's key of the move record of `workspace`.
pub fn move_key(workspace: &str) -> String {
    let ws = confab_shared::WorkspaceId::new(workspace).expect("a workspace id");
    confab_directory::redis_engine::keys::move_record(&ws)
}

/// Runs `redis-cli` against the directory's Redis.
pub fn directory_cli(cluster: &cluster::Running, args: &[&str]) -> String {
    cluster.directory.cli(args).trim().to_string()
}
