//! Split brain: two `confab cell` processes started with the same `--id` and store. The newer
//! one claims a higher epoch; the older one's writes are fenced, it stops serving and exits,
//! and its clients resume on the newer one without losing a message.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cluster::{Client, Cluster, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

/// Sends `text` with `client_msg_id` until it is acked, as a client must: after `unavailable`
/// it sends again with the same id; after its socket is closed it reconnects with `resume`
/// and sends again. Returns the ack's seq, the client (a new one after a reconnect) and the
/// close codes it met.
async fn send_until_acked(
    ws_url: &str,
    token: &str,
    mut client: Client,
    channel: &str,
    text: &str,
    cmid: &str,
    resume_from: u64,
) -> (u64, Client, Vec<Option<u16>>) {
    let mut closes = Vec::new();
    let deadline = Instant::now() + WAIT * 3;
    while Instant::now() < deadline {
        let send = json!({"op": "send", "channel": channel, "text": text, "client_msg_id": cmid});
        match client.try_request(send).await {
            Ok(reply) if reply["op"] == "ack" => {
                return (reply["seq"].as_u64().unwrap(), client, closes);
            }
            Ok(reply) => {
                assert_eq!(reply["code"], "unavailable", "{reply}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(code) => {
                closes.push(code);
                client =
                    Client::connect(ws_url, token, Some(json!({ channel: resume_from }))).await;
            }
        }
    }
    panic!("{text} was never acked");
}

#[tokio::test]
async fn a_second_process_with_the_same_id_fences_the_first_and_clients_resume_on_it() {
    let mut cluster = Cluster::new().cell("c1", "us-east").start().await;
    cluster.create_workspace("acme", "us-east").await;
    let token = cluster.token("acme", "alice").await;
    let (status, body) = cluster
        .api(
            0,
            &token,
            Method::POST,
            "/v1/channels",
            Some(json!({"name": "room", "kind": "public"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let room = body["id"].as_str().unwrap().to_string();
    let ws_url = cluster.gateway(0).ws_url();
    let mut alice = Client::connect(&ws_url, &token, None).await;
    let mut acked = HashMap::new();
    for i in 1..=3 {
        let ack = alice
            .request(
                json!({"op": "send", "channel": room, "text": format!("m{i}"),
                            "client_msg_id": format!("k{i}")}),
            )
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
        acked.insert(format!("m{i}"), ack["seq"].as_u64().unwrap());
    }
    let last = acked.values().copied().max().unwrap();
    let first_pid = cluster.cells[0].pid().expect("the first process runs");

    let mut twin = cluster.cells[0].start_twin().await;
    // The newer process says that another one held the id, naming it.
    assert!(
        twin.logged_within(&["another process", &format!("pid {first_pid}")], WAIT)
            .await,
        "the twin did not warn about the process holding the id"
    );

    // The older process's next write is fenced (or its next heartbeat finds the newer epoch):
    // the send fails, the older process exits, the session is told to reconnect and the
    // client resumes on the newer process, sending again with the same client_msg_id.
    let (seq, mut alice, closes) =
        send_until_acked(&ws_url, &token, alice, &room, "m4", "k4", last).await;
    let status = cluster.cells[0]
        .exit_status_within(WAIT)
        .expect("the fenced process exits");
    assert!(!status.success(), "a fenced cell exits non-zero: {status}");
    assert!(
        closes.contains(&Some(4010)),
        "the session was told to reconnect (4010), got {closes:?}"
    );
    assert_eq!(seq, last + 1, "seqs continue on the newer process");

    // Nothing was lost or doubled: every message once, in order, with the seq it was acked.
    let history = alice
        .request(json!({"op": "history", "channel": room, "limit": 50}))
        .await;
    let messages: Vec<(String, u64)> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["text"].as_str().unwrap().to_string(),
                m["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    acked.insert("m4".into(), seq);
    let mut expected: Vec<(String, u64)> = acked.into_iter().collect();
    expected.sort_by_key(|(_, seq)| *seq);
    assert_eq!(messages, expected);

    // The directory names the newer process for the cell.
    let (status, cells) = cluster.admin(0, Method::GET, "/admin/v1/cells", None).await;
    assert_eq!(status, 200, "{cells}");
    let urls: Vec<&str> = cells["cells"]
        .as_array()
        .or(cells.as_array())
        .unwrap()
        .iter()
        .filter_map(|c: &Value| c["url"].as_str())
        .collect();
    assert_eq!(urls, [twin.url().as_str()], "{cells}");
    assert!(twin
        .exit_status_within(Duration::from_millis(100))
        .is_none());
}
