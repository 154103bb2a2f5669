//! The monitoring kit works against a real deployment: `infra/local/cluster.sh` starts a
//! two-region cluster, a real Prometheus (Debian package `prometheus`) scrapes it with
//! `infra/prometheus/prometheus.yml` and evaluates `infra/prometheus/rules/`, chat traffic
//! runs, and then every query of the Grafana dashboard (`infra/grafana/confab.json`), every
//! recording rule and every alert expression must return data through Prometheus's HTTP API.
//! No query may name a metric that the processes do not export.
//!
//! Alert expressions are run with their comparisons made `bool` (`x > 0.1` becomes
//! `x > bool 0.1`): a healthy cluster fires no alert, and this still proves that each alert
//! is computed from series that exist.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use confab_testkit::free_port;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Metrics that issue 9 (cell metrics, webhooks) adds in parallel with this kit: the
/// dashboard and the rules already use them, and until the processes export them the queries
/// naming them are skipped, each one printed. The test fails when a name listed here is
/// exported (take it out of the list: its queries then must return data) or when no query
/// uses it. After merging issue 9 this list must be empty.
const NOT_YET_EXPORTED: &[&str] = &[];

/// Longest wait for the cluster's and Prometheus's start, and for every query to have data.
const DEADLINE: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cluster of `infra/local/cluster.sh` on free ports; stopped on drop.
struct LocalCluster {
    dir: PathBuf,
    ports: BTreeMap<&'static str, u16>,
    started: String,
}

impl LocalCluster {
    const PORTS: [&'static str; 7] = [
        "REDIS_DIRECTORY_PORT",
        "REDIS_C1_PORT",
        "REDIS_C2_PORT",
        "CELL_C1_PORT",
        "CELL_C2_PORT",
        "GATEWAY_1_PORT",
        "GATEWAY_2_PORT",
    ];

    fn start(dir: PathBuf) -> LocalCluster {
        let ports = Self::PORTS
            .iter()
            .map(|&name| (name, free_port()))
            .collect();
        let mut cluster = LocalCluster {
            dir,
            ports,
            started: String::new(),
        };
        let out = cluster.run("start");
        cluster.started = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "cluster.sh start failed: {}\n{}",
            cluster.started,
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    fn run(&self, action: &str) -> std::process::Output {
        let mut command = Command::new("bash");
        command
            .arg(repo().join("infra/local/cluster.sh"))
            .arg(action)
            .env("CONFAB_BIN", env!("CARGO_BIN_EXE_confab"))
            .env("CONFAB_CLUSTER_DIR", &self.dir)
            .env("CONFAB_LOG", "warn");
        for (name, port) in &self.ports {
            command.env(name, port.to_string());
        }
        command.output().expect("run cluster.sh")
    }

    fn port(&self, name: &str) -> u16 {
        self.ports[name]
    }

    /// `http://127.0.0.1:PORT` of gateway 1 or 2.
    fn gateway(&self, n: u8) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.port(&format!("GATEWAY_{n}_PORT"))
        )
    }

    /// The token `cluster.sh start` printed for `workspace`/`user`.
    fn token(&self, workspace: &str, user: &str) -> String {
        let prefix = format!("token {workspace}/{user}: ");
        self.started
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{}", self.started))
            .trim()
            .to_string()
    }

    /// The `/metrics` URL of every process, by the port variable that names it.
    fn metrics_urls(&self) -> Vec<String> {
        [
            "CELL_C1_PORT",
            "CELL_C2_PORT",
            "GATEWAY_1_PORT",
            "GATEWAY_2_PORT",
        ]
        .iter()
        .map(|p| format!("http://127.0.0.1:{}/metrics", self.port(p)))
        .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.run("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Prometheus scraping the cluster with the committed config; killed on drop.
struct Prometheus {
    child: Child,
    base: String,
}

impl Prometheus {
    fn start(cluster: &LocalCluster, dir: &Path) -> Prometheus {
        let binary = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
        let config = Self::config(cluster);
        std::fs::create_dir_all(dir).unwrap();
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {binary:?} ({e}): this test needs a real Prometheus \
                     (apt-get install prometheus, or set PROMETHEUS_BIN)"
                )
            });
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// `infra/prometheus/prometheus.yml` with the test cluster's ports, a 1 s scrape and
    /// evaluation interval, and absolute rule paths. Every substitution must apply, so the
    /// test notices when the committed file changes shape.
    fn config(cluster: &LocalCluster) -> String {
        let dir = repo().join("infra/prometheus");
        let mut config = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
        let rules = format!("{}/rules/", dir.canonicalize().unwrap().display());
        let substitutions = [
            (
                "127.0.0.1:8081",
                format!("127.0.0.1:{}", cluster.port("GATEWAY_1_PORT")),
            ),
            (
                "127.0.0.1:8082",
                format!("127.0.0.1:{}", cluster.port("GATEWAY_2_PORT")),
            ),
            (
                "127.0.0.1:7001",
                format!("127.0.0.1:{}", cluster.port("CELL_C1_PORT")),
            ),
            (
                "127.0.0.1:7002",
                format!("127.0.0.1:{}", cluster.port("CELL_C2_PORT")),
            ),
            ("scrape_interval: 15s", "scrape_interval: 1s".into()),
            ("evaluation_interval: 15s", "evaluation_interval: 1s".into()),
            ("- rules/", format!("- {rules}")),
        ];
        for (from, to) in substitutions {
            assert!(config.contains(from), "prometheus.yml has no {from:?}");
            config = config.replace(from, &to);
        }
        config
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .query(query)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match response {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// The result vector of an instant query, or the error Prometheus gave.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let answer = self.get("/api/v1/query", &[("query", expr)]).await;
        if answer["status"] != "success" {
            return Err(format!("{answer}"));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until every scrape target of the cluster is up.
    async fn wait_for_targets(&self, count: usize) {
        let start = Instant::now();
        loop {
            let targets = self.get("/api/v1/targets", &[]).await;
            let up = targets["data"]["activeTargets"]
                .as_array()
                .map(|t| t.iter().filter(|t| t["health"] == "up").count())
                .unwrap_or(0);
            if up == count {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "Prometheus did not scrape all {count} targets: {targets}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One query to check, and where it comes from.
struct Query {
    origin: String,
    expr: String,
}

/// Every `expr` of the dashboard's panels (rows' nested panels included).
fn dashboard_queries() -> Vec<Query> {
    let path = repo().join("infra/grafana/confab.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    let mut panels: Vec<Value> = dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            let expr = target["expr"].as_str().expect("a target without expr");
            queries.push(Query {
                origin: format!(
                    "dashboard panel {:?}",
                    panel["title"].as_str().unwrap_or("")
                ),
                // Grafana's interval variables, as Grafana would fill them at a 15 s scrape.
                expr: expr
                    .replace("$__rate_interval", "1m")
                    .replace("$__interval", "15s"),
            });
        }
    }
    assert!(queries.len() > 20, "the dashboard has too few queries");
    queries
}

/// `expr` with `bool` after each comparison operator outside label matchers and strings.
fn with_bool_comparisons(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::new();
    let (mut braces, mut quoted) = (0, false);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => braces += 1,
            '}' if !quoted => braces -= 1,
            _ => {}
        }
        let comparison = match (c, next) {
            _ if quoted || braces != 0 => None,
            ('=' | '!' | '>' | '<', Some('=')) => Some(2),
            ('>' | '<', _) => Some(1),
            _ => None,
        };
        if let Some(width) = comparison {
            out.extend(&chars[i..i + width]);
            out.push_str(" bool");
            i += width;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// The identifiers of `expr` outside strings: metric names, recorded series, functions.
fn identifiers(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            current.push(c);
        } else if !current.is_empty() {
            names.insert(std::mem::take(&mut current));
        }
    }
    names
}

/// The metrics `expr` reads: `confab_*` names, and those of the recorded series it names.
fn metrics_of(expr: &str, recorded: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    let mut metrics = BTreeSet::new();
    for name in identifiers(expr) {
        if let Some(inner) = recorded.get(&name) {
            metrics.extend(inner.iter().cloned());
        } else if name.starts_with("confab_") {
            metrics.insert(name);
        }
    }
    metrics
}

/// Whether `metric` (a sample name such as `x_bucket`) belongs to the not-yet-exported `base`.
fn belongs_to(metric: &str, base: &str) -> bool {
    metric == base
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| metric.strip_suffix(suffix) == Some(base))
}

/// The sample names every process of the cluster exports now.
async fn exported_metrics(cluster: &LocalCluster) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for url in cluster.metrics_urls() {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// A client session past `ready`, whose incoming frames are read (and dropped) in the
/// background; returns the sender half.
async fn session(
    gateway: &str,
    token: &str,
) -> futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
> {
    let url = format!("{}/v1/ws", gateway.replacen("http", "ws", 1));
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let hello = json!({"op": "hello", "token": token}).to_string();
    tx.send(Message::text(hello)).await.unwrap();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("no ready")
            .expect("closed before ready")
            .unwrap();
        if let Message::Text(text) = frame {
            let value: Value = serde_json::from_str(&text).unwrap();
            assert_ne!(value["op"], "error", "hello failed: {value}");
            if value["op"] == "ready" {
                break;
            }
        }
    }
    tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    tx
}

/// Creates public channel `room` in the token's workspace with `bob` as a member.
async fn create_room(gateway: &str, token: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{gateway}/v1/channels"))
        .bearer_auth(token)
        .json(&json!({"name": "room", "kind": "public", "members": ["bob"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

/// Registers a webhook of `bob` to a local receiver that answers 200 to every request,
/// while webhooks exist; `false` when this build has no webhook API yet (its metrics must
/// then be listed in [`NOT_YET_EXPORTED`]).
async fn register_webhook(gateway: &str, token: &str) -> bool {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let response = reqwest::Client::new()
        .post(format!("{gateway}/v1/webhooks"))
        .bearer_auth(token)
        .json(&json!({"url": url, "events": ["message"]}))
        .send()
        .await
        .unwrap();
    if response.status() == 404 {
        return false;
    }
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    true
}

/// Chat in both workspaces (both cells, both gateways), presence subscriptions, one error,
/// one refused token; messages go on in the background until the returned task is aborted.
async fn run_traffic(cluster: &LocalCluster) -> tokio::task::JoinHandle<()> {
    let (gw1, gw2) = (cluster.gateway(1), cluster.gateway(2));
    let mut senders = Vec::new();
    for (workspace, home, other) in [("acme", &gw1, &gw2), ("globex", &gw2, &gw1)] {
        let (alice, bob) = (
            cluster.token(workspace, "alice"),
            cluster.token(workspace, "bob"),
        );
        let room = create_room(home, &alice).await;
        let webhooks = register_webhook(home, &bob).await;
        assert!(
            webhooks || NOT_YET_EXPORTED.contains(&"confab_webhook_deliveries_total"),
            "this build has no webhook API but its metrics are not listed as not yet exported"
        );
        if !webhooks {
            eprintln!("NOTE: POST /v1/webhooks answers 404 here: no webhook traffic yet");
        }
        let mut bob_tx = session(other, &bob).await;
        let presence = json!({"op": "presence_sub", "id": 1, "users": ["alice"]});
        bob_tx
            .send(Message::text(presence.to_string()))
            .await
            .unwrap();
        // One bad_request error for confab_errors_total{code}.
        bob_tx.send(Message::text("not json")).await.unwrap();
        let alice_tx = session(home, &alice).await;
        senders.push((alice_tx, room, bob_tx));
    }
    // A refused token, for confab_closes_total{code="4001"}.
    let url = format!("{}/v1/ws", gw1.replacen("http", "ws", 1));
    let (mut bad, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = json!({"op": "hello", "token": "not-a-token"}).to_string();
    bad.send(Message::text(hello)).await.unwrap();
    while let Some(Ok(_)) = bad.next().await {}
    tokio::spawn(async move {
        // 5 messages a second per workspace, well inside the 20 frames/s client rate; bounded
        // to 10 minutes in case the test never aborts it.
        for n in 0..3000u32 {
            for (alice, room, _bob) in &mut senders {
                let send =
                    json!({"op": "send", "id": n, "channel": room, "text": format!("hi {n}")});
                if alice.send(Message::text(send.to_string())).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test]
async fn every_dashboard_and_rule_query_returns_data_from_a_real_prometheus_scraping_the_local_cluster(
) {
    let dir = std::env::temp_dir().join(format!("confab-monitoring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = LocalCluster::start(dir.join("cluster"));
    let prometheus = Prometheus::start(&cluster, &dir.join("prometheus"));
    prometheus.wait_for_targets(4).await;
    let traffic = run_traffic(&cluster).await;

    // The rules as Prometheus loaded them: none may fail to evaluate.
    let rules = prometheus.get("/api/v1/rules", &[]).await;
    let rules: Vec<Value> = rules["data"]["groups"]
        .as_array()
        .expect("no rule groups loaded")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(rules.len() >= 20, "too few rules loaded: {}", rules.len());
    let mut recorded = BTreeMap::new();
    let mut queries = dashboard_queries();
    for rule in &rules {
        let (name, expr) = (
            rule["name"].as_str().unwrap(),
            rule["query"].as_str().unwrap(),
        );
        if rule["type"] == "recording" {
            recorded.insert(name.to_string(), metrics_of(expr, &BTreeMap::new()));
            queries.push(Query {
                origin: format!("recording rule {name}"),
                expr: expr.to_string(),
            });
            // The series the rule records, as Prometheus evaluates it.
            queries.push(Query {
                origin: format!("recorded series {name}"),
                expr: name.to_string(),
            });
        } else {
            queries.push(Query {
                origin: format!("alert {name} (comparisons as bool)"),
                expr: with_bool_comparisons(expr),
            });
        }
    }

    // Which metrics each query reads, against what the processes export. A histogram shows
    // on /metrics only from its first observation (a webhook's latency from its first
    // delivery), so the names are read again while the traffic runs, up to the deadline.
    let named: BTreeSet<String> = queries
        .iter()
        .flat_map(|q| metrics_of(&q.expr, &recorded))
        .filter(|m| !NOT_YET_EXPORTED.iter().any(|base| belongs_to(m, base)))
        .collect();
    let mut exported = exported_metrics(&cluster).await;
    let waiting_since = Instant::now();
    while !named.is_subset(&exported) && waiting_since.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_secs(1)).await;
        exported = exported_metrics(&cluster).await;
    }
    let mut problems = Vec::new();
    for base in NOT_YET_EXPORTED {
        if exported.iter().any(|m| belongs_to(m, base)) {
            problems.push(format!(
                "{base} is exported now: remove it from NOT_YET_EXPORTED in confab/tests/monitoring.rs"
            ));
        }
        let used = queries.iter().any(|q| {
            metrics_of(&q.expr, &recorded)
                .iter()
                .any(|m| belongs_to(m, base))
        });
        if !used {
            problems.push(format!(
                "{base} is listed in NOT_YET_EXPORTED but no query uses it"
            ));
        }
    }
    let mut pending = Vec::new();
    for query in queries {
        let metrics = metrics_of(&query.expr, &recorded);
        let waiting: Vec<&String> = metrics
            .iter()
            .filter(|m| NOT_YET_EXPORTED.iter().any(|base| belongs_to(m, base)))
            .collect();
        let unknown: Vec<&String> = metrics
            .iter()
            .filter(|m| !exported.contains(*m) && !waiting.contains(m))
            .collect();
        if !unknown.is_empty() {
            problems.push(format!(
                "{}: `{}` names metrics no process exports: {unknown:?}",
                query.origin, query.expr
            ));
        } else if !waiting.is_empty() {
            eprintln!(
                "SKIPPED until issue 9 is merged: {}: `{}` (not yet exported: {waiting:?})",
                query.origin, query.expr
            );
        } else {
            pending.push(query);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every other query must return data while the traffic runs.
    let checked = pending.len();
    let start = Instant::now();
    let mut last_errors = BTreeMap::new();
    while !pending.is_empty() && start.elapsed() < DEADLINE {
        let mut still = Vec::new();
        for query in pending {
            match prometheus.query(&query.expr).await {
                Ok(result) if !result.is_empty() => {}
                outcome => {
                    let why = outcome.err().unwrap_or_else(|| "no data".into());
                    last_errors.insert(query.origin.clone(), why);
                    still.push(query);
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    traffic.abort();
    let failed: Vec<String> = pending
        .iter()
        .map(|q| format!("{}: `{}`: {}", q.origin, q.expr, last_errors[&q.origin]))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {checked} queries returned no data within {DEADLINE:?}:\n{}",
        failed.len(),
        failed.join("\n")
    );
    eprintln!("{checked} queries returned data");
    for rule in &rules {
        assert_ne!(rule["health"], "err", "rule failed to evaluate: {rule}");
    }
}

#[test]
fn comparisons_become_bool_outside_label_matchers_and_strings() {
    assert_eq!(
        with_bool_comparisons(r#"sum(x{status!="down",a=~"b>c"}) == 0 and y >= 2 * z"#),
        r#"sum(x{status!="down",a=~"b>c"}) == bool 0 and y >= bool 2 * z"#
    );
    assert_eq!(with_bool_comparisons("a > 0.1"), "a > bool 0.1");
}

#[test]
fn metrics_of_a_query_include_those_behind_recorded_series() {
    let recorded = BTreeMap::from([(
        "job:confab_x:rate5m".to_string(),
        BTreeSet::from(["confab_x_total".to_string()]),
    )]);
    assert_eq!(
        metrics_of(
            r#"job:confab_x:rate5m > 2 * rate(confab_y_bucket{job="confab-cell"}[5m])"#,
            &recorded
        ),
        BTreeSet::from(["confab_x_total".to_string(), "confab_y_bucket".to_string()])
    );
}
