//! A local confab cluster for end-to-end tests: real `redis-server`s (one shared presence +
//! directory Redis, one durable store per cell), real `confab cell` and `confab gateway`
//! processes on free loopback ports, and a small WebSocket client.
//!
//! `Cluster::new().cell("c1", "us-east").gateways(2).start().await` — every process can be
//! killed with SIGKILL and restarted on the same port with the same data.
//!
//! The presence + directory Redis is a 3-master Redis Cluster instead with
//! `CONFAB_TEST_REDIS=cluster` or [`Cluster::redis_cluster`] ([`confab_testkit::TestRedis`]).
//! A cell's store is a 3-master Redis Cluster of its own with [`Cluster::store_cluster`]
//! (its masters are killed and restarted through [`CellProc::store`]).

#![allow(dead_code)]

pub mod netns;
pub mod traffic;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confab_testkit::{free_port, RedisCluster, TestRedis};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const JWT_SECRET: &str = "dev-secret";
pub const ADMIN_TOKEN: &str = "dev-admin";
pub const CLUSTER_SECRET: &str = "test-cluster-secret";
/// Generous bound for anything a test waits for; never a pass/fail timing assertion.
pub const WAIT: Duration = Duration::from_secs(20);

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_confab")
}

/// The flags of a `confab cell` process: who it is, where it listens and which Redis servers
/// it uses (`listen` and `advertise` as `IP:PORT`), with the cluster secret.
fn cell_flags(
    id: &str,
    region: &str,
    listen: &str,
    advertise: &str,
    redis: &str,
    directory: &str,
) -> Vec<String> {
    [
        "cell",
        "--id",
        id,
        "--region",
        region,
        "--listen",
        listen,
        "--advertise",
        &format!("http://{advertise}"),
        "--redis",
        redis,
        "--directory",
        directory,
        "--cluster-secret",
        CLUSTER_SECRET,
    ]
    .map(String::from)
    .to_vec()
}

/// The flags of a `confab gateway` process listening on `listen` with directory `redis`: the
/// test secrets and tokens, and a client rate no test traffic reaches.
fn gateway_flags(listen: &str, redis: &str) -> Vec<String> {
    [
        "gateway",
        "--listen",
        listen,
        "--redis",
        redis,
        "--jwt-secret",
        JWT_SECRET,
        "--admin-token",
        ADMIN_TOKEN,
        "--cluster-secret",
        CLUSTER_SECRET,
        "--client-rate",
        "1000",
    ]
    .map(String::from)
    .to_vec()
}

/// A child process killed when dropped.
struct Proc(Option<Child>);

impl Proc {
    /// Whether the process exits within `wait` (e.g. because its port was taken).
    fn exited_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(child) = self.0.as_mut() {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    self.0 = None;
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The exit status, if the process exits within `wait`.
    fn exit_status_within(&mut self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(child) = self.0.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.0 = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -TERM {pid} failed");
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `confab cell` process with its own durable Redis (one server, or a Redis Cluster).
pub struct CellProc {
    pub id: String,
    pub region: String,
    pub port: u16,
    pub store: TestRedis,
    directory_url: String,
    retention: u64,
    /// Flags added to the cell's command line (see [`Cluster::cell_with`]).
    extra: Vec<String>,
    proc: Proc,
}

impl CellProc {
    /// The command line of this cell's process, listening on `port`.
    fn command(&self, port: u16) -> Command {
        let address = format!("127.0.0.1:{port}");
        let flags = cell_flags(
            &self.id,
            &self.region,
            &address,
            &address,
            &self.store.url(),
            &self.directory_url,
        );
        let mut command = Command::new(binary());
        command
            .args(flags)
            .args(["--retention-events", &self.retention.to_string()])
            .args(&self.extra)
            .env("CONFAB_LOG", "warn")
            .stdout(Stdio::null());
        command
    }

    fn spawn(&mut self) {
        let child = self
            .command(self.port)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start confab cell");
        self.proc = Proc(Some(child));
    }

    /// The process id while the cell runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The exit status, if the cell exits within `wait`.
    pub fn exit_status_within(&mut self, wait: Duration) -> Option<ExitStatus> {
        self.proc.exit_status_within(wait)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against the cell's store (to break it the way a lost write would);
    /// returns its output.
    pub fn store_cli(&self, args: &[&str]) -> String {
        let TestRedis::Single(store) = &self.store else {
            return self.store.cli(args).trim().to_string();
        };
        let output = Command::new("redis-cli")
            .args(["-p", &store.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(output.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Starts a second process with this cell's id, region and store on another port (a
    /// split brain: the same `--id` started twice), and waits until it is ready. Its log
    /// lines are collected in [`TwinProc::log`].
    pub async fn start_twin(&self) -> TwinProc {
        loop {
            let port = free_port();
            let mut child = self
                .command(port)
                .stderr(Stdio::piped())
                .spawn()
                .expect("start the twin cell");
            let log = Arc::new(Mutex::new(Vec::new()));
            if let Some(stderr) = child.stderr.take() {
                let lines = Arc::clone(&log);
                std::thread::spawn(move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        eprintln!("twin: {line}");
                        lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    }
                });
            }
            let mut proc = Proc(Some(child));
            // Another test may have taken the probed port first: the twin then exits at once.
            if proc.exited_within(Duration::from_millis(300)) {
                continue;
            }
            wait_http_ok(&format!("http://127.0.0.1:{port}/readyz")).await;
            return TwinProc { port, proc, log };
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts the cell again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        wait_http_ok(&format!("http://127.0.0.1:{}/readyz", self.port)).await;
    }

    /// Sends SIGTERM (a graceful shutdown); the process may still run for a while.
    pub fn sigterm(&self) {
        self.proc.sigterm();
    }
}

/// A second process started with a cell's id (see [`CellProc::start_twin`]).
pub struct TwinProc {
    pub port: u16,
    proc: Proc,
    /// Its stderr, line by line.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl TwinProc {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether a line containing every one of `parts` was logged within `wait`.
    pub async fn logged_within(&self, parts: &[&str], wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let found = {
                let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                log.iter()
                    .any(|line| parts.iter().all(|p| line.contains(p)))
            };
            if found {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The exit status, if the process exits within `wait`.
    pub fn exit_status_within(&mut self, wait: Duration) -> Option<ExitStatus> {
        self.proc.exit_status_within(wait)
    }
}

/// A `confab gateway` process.
pub struct GatewayProc {
    pub port: u16,
    directory_url: String,
    presence_ttl_ms: u64,
    /// Flags added to the gateway's command line (see [`Cluster::gateway_args`]).
    extra: Vec<String>,
    proc: Proc,
    /// `--move-page-delay-ms`.
    move_page_delay_ms: u64,
}

impl GatewayProc {
    fn spawn(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let child = Command::new(binary())
            .args(gateway_flags(&listen, &self.directory_url))
            .args(["--presence-ttl-ms", &self.presence_ttl_ms.to_string()])
            .args(&self.extra)
            .args(["--move-page-delay-ms", &self.move_page_delay_ms.to_string()])
            .env("CONFAB_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start confab gateway");
        let mut child = child;
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
        }
        self.proc = Proc(Some(child));
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.port)
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Sends SIGTERM (a graceful shutdown); the process may still run for a while.
    pub fn sigterm(&self) {
        self.proc.sigterm();
    }

    /// The exit status, if the gateway exits within `wait`.
    pub fn exit_status_within(&mut self, wait: Duration) -> Option<ExitStatus> {
        self.proc.exit_status_within(wait)
    }

    /// Starts the gateway again on the same port (after it exited or was killed).
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        wait_http_ok(&format!("{}/readyz", self.url())).await;
    }
}

/// Builder of a cluster.
/// A cell to start: id, region, extra flags, and whether its store is a Redis Cluster (with
/// that many replicas per master).
struct CellSpec {
    id: String,
    region: String,
    extra: Vec<String>,
    store_cluster: Option<usize>,
}

pub struct Cluster {
    cells: Vec<CellSpec>,
    gateways: usize,
    gateway_args: Vec<String>,
    presence_ttl_ms: u64,
    retention: u64,
    durable_directory: bool,
    redis_cluster: bool,
    move_page_delay_ms: u64,
}

/// A running cluster.
pub struct Running {
    pub directory: TestRedis,
    pub cells: Vec<CellProc>,
    pub gateways: Vec<GatewayProc>,
    http: reqwest::Client,
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster {
            cells: Vec::new(),
            gateways: 1,
            gateway_args: Vec::new(),
            presence_ttl_ms: 30_000,
            retention: 10_000,
            durable_directory: false,
            redis_cluster: TestRedis::cluster_from_env(),
            move_page_delay_ms: 0,
        }
    }

    pub fn cell(self, id: &str, region: &str) -> Cluster {
        self.cell_with(id, region, &[])
    }

    /// A cell started with extra flags (e.g. `["--max-workspaces", "1"]`).
    pub fn cell_with(mut self, id: &str, region: &str, args: &[&str]) -> Cluster {
        let args = args.iter().map(|a| a.to_string()).collect();
        self.cells.push(CellSpec {
            id: id.into(),
            region: region.into(),
            extra: args,
            store_cluster: None,
        });
        self
    }

    /// The store of the cell added last is a 3-master Redis Cluster, each master with
    /// `replicas` replicas, instead of one `redis-server`.
    pub fn store_cluster(mut self, replicas: usize) -> Cluster {
        let cell = self
            .cells
            .last_mut()
            .expect("store_cluster follows the cell it is for");
        cell.store_cluster = Some(replicas);
        self
    }

    /// Extra flags for every gateway (e.g. `["--shutdown-spread-ms", "1000"]`).
    pub fn gateway_args(mut self, args: &[&str]) -> Cluster {
        self.gateway_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn gateways(mut self, n: usize) -> Cluster {
        self.gateways = n;
        self
    }

    pub fn presence_ttl_ms(mut self, ms: u64) -> Cluster {
        self.presence_ttl_ms = ms;
        self
    }

    /// Runs the presence + directory Redis with `appendonly`, so a restart keeps its data.
    pub fn durable_directory(mut self) -> Cluster {
        self.durable_directory = true;
        self
    }

    /// The presence + directory Redis is a 3-master Redis Cluster, whatever
    /// `CONFAB_TEST_REDIS` says.
    pub fn redis_cluster(mut self) -> Cluster {
        self.redis_cluster = true;
        self
    }

    /// Gateways pause this long between the pages of a move's bulk copy.
    pub fn move_page_delay_ms(mut self, ms: u64) -> Cluster {
        self.move_page_delay_ms = ms;
        self
    }

    pub async fn start(self) -> Running {
        // Every test Redis is durable (`RedisServer::start_durable` is `start`); the flag
        // says that the test relies on it.
        let _ = self.durable_directory;
        let directory = if self.redis_cluster {
            TestRedis::cluster()
        } else {
            TestRedis::single()
        };
        let mut cells = Vec::new();
        for CellSpec {
            id,
            region,
            extra,
            store_cluster,
        } in self.cells
        {
            let store = match store_cluster {
                None => TestRedis::single(),
                Some(replicas) => {
                    TestRedis::Cluster(RedisCluster::start_with_replicas(3, replicas))
                }
            };
            let mut cell = CellProc {
                id,
                region,
                port: free_port(),
                store,
                directory_url: directory.url(),
                retention: self.retention,
                extra,
                proc: Proc(None),
            };
            cell.spawn();
            // Another test may have taken the probed port first: the cell then exits at once.
            while cell.proc.exited_within(Duration::from_millis(300)) {
                cell.port = free_port();
                cell.spawn();
            }
            cells.push(cell);
        }
        for cell in &cells {
            wait_http_ok(&format!("http://127.0.0.1:{}/readyz", cell.port)).await;
        }
        let mut gateways = Vec::new();
        for _ in 0..self.gateways {
            let mut gateway = GatewayProc {
                port: free_port(),
                directory_url: directory.url(),
                presence_ttl_ms: self.presence_ttl_ms,
                extra: self.gateway_args.clone(),
                proc: Proc(None),
                move_page_delay_ms: self.move_page_delay_ms,
            };
            gateway.spawn();
            while gateway.proc.exited_within(Duration::from_millis(300)) {
                gateway.port = free_port();
                gateway.spawn();
            }
            gateways.push(gateway);
        }
        for gateway in &gateways {
            wait_http_ok(&format!("{}/readyz", gateway.url())).await;
        }
        Running {
            directory,
            cells,
            gateways,
            http: reqwest::Client::new(),
        }
    }
}

/// Polls `url` until it answers 200.
pub async fn wait_http_ok(url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(response) = client.get(url).send().await {
            if response.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered 200");
}

/// The HTTP and admin API of one gateway, at its base URL.
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// The API of the gateway at `base` (`http://IP:PORT`).
    pub fn new(base: &str) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: base.to_string(),
        }
    }

    /// A call with a bearer token: (status, body).
    pub async fn call(
        &self,
        bearer: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(bearer);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("http request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Creates a workspace in `region`; returns the cell it was placed on.
    pub async fn create_workspace(&self, id: &str, region: &str) -> String {
        let (status, body) = self
            .call(
                ADMIN_TOKEN,
                reqwest::Method::POST,
                "/admin/v1/workspaces",
                Some(json!({"id": id, "region": region})),
            )
            .await;
        assert_eq!(status, 201, "creating workspace {id}: {body}");
        body["cell"].as_str().expect("cell").to_string()
    }

    /// A token for `user` of `workspace`, minted by the admin API.
    pub async fn token(&self, workspace: &str, user: &str) -> String {
        let (status, body) = self
            .call(
                ADMIN_TOKEN,
                reqwest::Method::POST,
                "/admin/v1/tokens",
                Some(json!({"workspace": workspace, "user": user})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("token").to_string()
    }
}

impl Running {
    pub fn gateway(&self, i: usize) -> &GatewayProc {
        &self.gateways[i]
    }

    /// The API of gateway `i`.
    fn api_of(&self, i: usize) -> Api {
        Api {
            http: self.http.clone(),
            base: self.gateway(i).url(),
        }
    }

    /// An admin API call on gateway `i`: (status, body).
    pub async fn admin(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(i, ADMIN_TOKEN, method, path, body).await
    }

    /// A call on gateway `i` with a bearer token: (status, body).
    async fn call(
        &self,
        i: usize,
        bearer: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.api_of(i).call(bearer, method, path, body).await
    }

    /// Creates a workspace in `region`; returns the cell it was placed on.
    pub async fn create_workspace(&self, id: &str, region: &str) -> String {
        self.api_of(0).create_workspace(id, region).await
    }

    /// A token for `user` of `workspace`, minted by the admin API.
    pub async fn token(&self, workspace: &str, user: &str) -> String {
        self.api_of(0).token(workspace, user).await
    }

    /// An HTTP API call on gateway `i` with a user token: (status, body).
    pub async fn api(
        &self,
        i: usize,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(i, token, method, path, body).await
    }
}

/// What arrived on a client socket.
#[derive(Debug)]
pub enum Incoming {
    Frame(Value),
    Closed(Option<u16>),
    Timeout,
}

/// A minimal protocol client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<Value>,
    next_id: u64,
    pub ready: Value,
}

impl Client {
    /// Connects to `ws_url`, says hello (with `resume`) and waits for `ready`.
    pub async fn connect(ws_url: &str, token: &str, resume: Option<Value>) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(ws_url))
            .await
            .expect("connect timed out")
            .expect("connect");
        let mut client = Client {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            ready: Value::Null,
        };
        let mut hello = json!({"op": "hello", "token": token});
        if let Some(resume) = resume {
            hello["resume"] = resume;
        }
        client.send(&hello).await;
        match client.read(WAIT).await {
            Incoming::Frame(frame) if frame["op"] == "ready" => client.ready = frame,
            other => panic!("expected ready, got {other:?}"),
        }
        client
    }

    /// As [`Client::connect`], but a refused hello (an error, a close) is `Err` with what
    /// arrived instead of a panic (for tests where the workspace may be moving meanwhile).
    pub async fn try_connect(
        ws_url: &str,
        token: &str,
        resume: Option<Value>,
    ) -> Result<Client, String> {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(ws_url))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = Client {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            ready: Value::Null,
        };
        let mut hello = json!({"op": "hello", "token": token});
        if let Some(resume) = resume {
            hello["resume"] = resume;
        }
        client
            .ws
            .send(Message::text(hello.to_string()))
            .await
            .map_err(|e| format!("hello: {e}"))?;
        match client.read(WAIT).await {
            Incoming::Frame(frame) if frame["op"] == "ready" => {
                client.ready = frame;
                Ok(client)
            }
            other => Err(format!("{other:?}")),
        }
    }

    pub async fn send(&mut self, frame: &Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    /// Reads one frame (or the close) within `timeout`.
    pub async fn read(&mut self, timeout: Duration) -> Incoming {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await;
            match next {
                Err(_) => return Incoming::Timeout,
                Ok(None) | Ok(Some(Err(_))) => return Incoming::Closed(None),
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Incoming::Frame(serde_json::from_str(&text).expect("json frame"))
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Incoming::Closed(frame.map(|f| u16::from(f.code)))
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Sends a request with a fresh id and returns its reply (ack, history, error…),
    /// keeping events that arrive meanwhile for `next_event`.
    pub async fn request(&mut self, mut request: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        self.send(&request).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left).await {
                Incoming::Frame(frame) if frame["id"] == json!(id) => return frame,
                Incoming::Frame(frame) => self.pending.push_back(frame),
                other => panic!("no reply to {request}: {other:?}"),
            }
        }
    }

    /// As [`Client::request`], but a socket closed before the reply is `Err(close code)`
    /// instead of a panic (for tests where the server may close it meanwhile).
    pub async fn try_request(&mut self, mut request: Value) -> Result<Value, Option<u16>> {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        if self
            .ws
            .send(Message::text(request.to_string()))
            .await
            .is_err()
        {
            return Err(None);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left).await {
                Incoming::Frame(frame) if frame["id"] == json!(id) => return Ok(frame),
                Incoming::Frame(frame) => self.pending.push_back(frame),
                Incoming::Closed(code) => return Err(code),
                Incoming::Timeout => panic!("no reply to {request}"),
            }
        }
    }

    /// The next event of type `ty` (earlier frames of other kinds are dropped).
    pub async fn next_event(&mut self, ty: &str) -> Value {
        while let Some(frame) = self.pending.pop_front() {
            if frame["op"] == "event" && frame["type"] == ty {
                return frame;
            }
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left).await {
                Incoming::Frame(frame) if frame["op"] == "event" && frame["type"] == ty => {
                    return frame
                }
                Incoming::Frame(_) => {}
                other => panic!("waiting for a {ty} event: {other:?}"),
            }
        }
    }

    /// Waits for the server to close the socket; returns the close code.
    pub async fn closed(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left).await {
                Incoming::Closed(code) => return code,
                Incoming::Frame(frame) => self.pending.push_back(frame),
                Incoming::Timeout => panic!("the socket was not closed in time"),
            }
        }
    }

    /// Frames received but not consumed yet.
    pub fn take_pending(&mut self) -> Vec<Value> {
        self.pending.drain(..).collect()
    }
}
