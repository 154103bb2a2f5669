//! A cell and a store that is not what it should be: a store that is not durable (the cell
//! refuses to start), and a store that lost writes it had acknowledged (the cell never reuses
//! a seq). Real `confab cell` processes, real `redis-server`s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{wait_http_ok, Client, Cluster, WAIT};
use confab_testkit::{free_port, RedisServer};
use reqwest::Method;
use serde_json::json;

/// A `confab cell` on `store`, with the extra `flags`; killed when dropped.
struct CellUnderTest {
    child: Child,
    port: u16,
}

impl CellUnderTest {
    fn start(store: &RedisServer, directory: &RedisServer, flags: &[&str]) -> CellUnderTest {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_confab"))
            .args(["cell", "--id", "c1", "--region", "us-east"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--advertise", &format!("http://127.0.0.1:{port}")])
            .args(["--redis", &store.url(), "--directory", &directory.url()])
            .args(flags)
            .env("CONFAB_LOG", "warn")
            .env_remove("CONFAB_STORE_FSYNC")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start confab cell");
        CellUnderTest { child, port }
    }

    /// Waits for the cell to exit; its success and what it wrote on stderr.
    fn refused(mut self) -> (bool, String) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return (status.success(), stderr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the cell did not exit");
    }

    async fn serves(&self) {
        wait_http_ok(&format!("http://127.0.0.1:{}/readyz", self.port)).await;
    }
}

impl Drop for CellUnderTest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_cell_refuses_to_start_on_a_store_without_appendonly() {
    let directory = RedisServer::start();
    let store = RedisServer::start_with_args(&["--appendonly", "no"]);
    // Not even the operator's word for everysec makes a store without a log durable.
    for flags in [&[][..], &["--store-fsync", "everysec"][..]] {
        let (success, stderr) = CellUnderTest::start(&store, &directory, flags).refused();
        assert!(!success, "the cell must exit non-zero");
        assert!(
            stderr.contains("refusing to start") && stderr.contains("appendonly no"),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn a_cell_refuses_appendfsync_everysec_unless_the_operator_accepts_it() {
    let directory = RedisServer::start();
    let store = RedisServer::start_with_args(&["--appendfsync", "everysec"]);
    let (success, stderr) = CellUnderTest::start(&store, &directory, &[]).refused();
    assert!(!success);
    assert!(
        stderr.contains("appendfsync everysec") && stderr.contains("--store-fsync everysec"),
        "{stderr}"
    );
    let (success, _) =
        CellUnderTest::start(&store, &directory, &["--store-fsync", "always"]).refused();
    assert!(!success, "always is verified where it can be");
    let accepted = CellUnderTest::start(&store, &directory, &["--store-fsync", "everysec"]);
    accepted.serves().await;
}

#[tokio::test]
async fn a_cell_starts_on_a_store_that_fsyncs_every_write() {
    let directory = RedisServer::start();
    let store = RedisServer::start_with_args(&["--appendfsync", "always"]);
    CellUnderTest::start(&store, &directory, &[]).serves().await;
}

#[tokio::test]
async fn where_config_get_is_refused_the_operator_must_state_the_fsync_policy() {
    let directory = RedisServer::start();
    // A managed Redis: CONFIG is not available to clients.
    let store = RedisServer::start_with_args(&["--rename-command", "CONFIG", ""]);
    let (success, stderr) = CellUnderTest::start(&store, &directory, &[]).refused();
    assert!(!success);
    assert!(
        stderr.contains("cannot be read") && stderr.contains("--store-fsync always"),
        "{stderr}"
    );
    let vouched = CellUnderTest::start(&store, &directory, &["--store-fsync", "always"]);
    vouched.serves().await;
}

/// The value of a counter in a Prometheus text page (0 when absent).
fn counter(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn seqs_are_not_reused_after_the_store_lost_writes_and_sessions_resync() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
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
    let mut alice = Client::connect(&cluster.gateway(0).ws_url(), &token, None).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        let ack = alice
            .request(
                json!({"op": "send", "channel": room, "text": format!("before {i}"),
                            "client_msg_id": format!("b{i}")}),
            )
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
        seqs.push(ack["seq"].as_u64().unwrap());
    }
    let highest = *seqs.last().unwrap();
    let kept = seqs[1];

    // The store loses the last three messages, as a promoted replica that lagged would.
    let cell = &cluster.cells[0];
    let key = format!("confab:cs:{{acme}}:ch:{room}");
    cell.store_cli(&["HSET", &key, "last_seq", &kept.to_string()]);
    let above = format!("({kept}");
    cell.store_cli(&["ZREMRANGEBYSCORE", &format!("{key}:log"), &above, "+inf"]);
    cell.store_cli(&["ZREMRANGEBYSCORE", &format!("{key}:msgs"), &above, "+inf"]);

    // The next message continues above every seq handed out, not at the store's next one.
    let ack = alice
        .request(json!({"op": "send", "channel": room, "text": "after",
                        "client_msg_id": "a0"}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["seq"].as_u64(), Some(highest + 1), "{ack}");
    // The session is told that what it holds no longer matches the channel.
    let resync = alice.next_event("resync").await;
    assert_eq!(resync["channel"], room.as_str());
    let ack = alice
        .request(json!({"op": "send", "channel": room, "text": "later",
                        "client_msg_id": "a1"}))
        .await;
    assert_eq!(ack["seq"].as_u64(), Some(highest + 2), "{ack}");

    // No seq of a lost message was given to other content.
    let history = alice
        .request(json!({"op": "history", "channel": room, "limit": 50}))
        .await;
    let stored: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(
        stored.iter().all(|seq| *seq <= kept || *seq > highest),
        "{stored:?}"
    );
    assert_eq!(stored.last(), Some(&(highest + 2)));

    // Counted once, for the operators' alert.
    let page = reqwest::get(format!("{}/metrics", cell.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        counter(&page, "confab_store_regressions_total"),
        1,
        "{page}"
    );
}

#[tokio::test]
async fn a_store_back_from_an_outage_with_lost_writes_is_caught_on_reload() {
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
    let mut alice = Client::connect(&cluster.gateway(0).ws_url(), &token, None).await;
    let mut highest = 0;
    for i in 0..4 {
        let ack = alice
            .request(
                json!({"op": "send", "channel": room, "text": format!("m{i}"),
                            "client_msg_id": format!("m{i}")}),
            )
            .await;
        highest = ack["seq"].as_u64().unwrap();
    }

    // The store goes away; a send fails and the channel must reload before its next op.
    cluster.cells[0].store.kill();
    let reply = alice
        .request(json!({"op": "send", "channel": room, "text": "during",
                        "client_msg_id": "during"}))
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    // It comes back without its last writes (an older copy, a lagging replica).
    cluster.cells[0].store.restart();
    let key = format!("confab:cs:{{acme}}:ch:{room}");
    cluster.cells[0].store_cli(&["HSET", &key, "last_seq", "1"]);
    cluster.cells[0].store_cli(&["ZREMRANGEBYSCORE", &format!("{key}:log"), "(1", "+inf"]);

    // The retry (same client_msg_id) lands above every seq handed out; sessions resync.
    let deadline = Instant::now() + WAIT;
    let ack = loop {
        let reply = alice
            .request(json!({"op": "send", "channel": room, "text": "during",
                            "client_msg_id": "during"}))
            .await;
        if reply["op"] == "ack" || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ack["seq"].as_u64(), Some(highest + 1), "{ack}");
    assert_eq!(alice.next_event("resync").await["channel"], room.as_str());
    let page = reqwest::get(format!("{}/metrics", cluster.cells[0].url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        counter(&page, "confab_store_regressions_total"),
        1,
        "{page}"
    );
}
