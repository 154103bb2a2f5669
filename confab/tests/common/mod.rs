//! The harness of confab's end-to-end tests: it starts a real deployment on free ports
//! ([`DevServer`]) and drives it with real WebSocket clients ([`Client`]) and a real HTTP
//! client ([`Http`]).
//!
//! The deployment is chosen by the environment variable `CONFAB_TEST_TARGET` ([`target`]):
//! unset or `dev`, one `confab dev` process; `cluster`, the processes of a distributed
//! deployment (a directory `redis-server`, a durable store `redis-server`, one `confab cell`
//! and one `confab gateway`), seeded with what `confab dev` seeds. SPEC §4–5 behave the same in
//! both modes, so the same tests run against both; the few that check something only
//! `confab dev` has check the cluster's equivalent instead (they ask [`target`]).
//!
//! With `CONFAB_TEST_REDIS=cluster` as well, the directory is a 3-master Redis Cluster
//! (`redis+cluster://` URL, [`confab_testkit::TestRedis`]); the cell's store is chosen by
//! [`store_redis`].
//!
//! Every wait is bounded ([`WAIT`]) so that a broken server fails a test instead of hanging it,
//! and no test passes or fails on how fast the server is: to check that something does *not*
//! happen, a test watches for a short bounded time ([`QUIET`]) and asserts nothing came.

// Each test file uses a different part of the harness.
#![allow(dead_code)]

pub mod raw;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use confab_testkit::{free_port, RedisServer, TestRedis};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Longest wait for anything the server should do (a reply, an event, a close).
pub const WAIT: Duration = Duration::from_secs(10);
/// Longest wait for a process to print its listen address or become ready (it may be built
/// on a busy machine).
pub const START_WAIT: Duration = Duration::from_secs(60);
/// How long a test watches to conclude that something does not happen.
pub const QUIET: Duration = Duration::from_millis(700);

/// The workspace `confab dev` seeds.
pub const DEMO: &str = "demo";
/// The seeded public channel of `demo` (id and name).
pub const GENERAL: &str = "general";

/// The id of the one cell of a test cluster (the id `confab dev` gives its cell).
const CLUSTER_CELL_ID: &str = "local-1";
/// The region of that cell, the region `confab dev` uses.
const CLUSTER_REGION: &str = "local";
/// Authenticates the links between the test cluster's gateway and cell, as production does.
const CLUSTER_SECRET: &str = "harness-cluster-secret";
/// How many ports a cell is tried on before the harness gives up (another test can take a
/// probed free port before the cell binds it).
const CELL_PORT_ATTEMPTS: usize = 5;

/// The deployment the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One `confab dev` process (the default).
    Dev,
    /// A `confab cell` and a `confab gateway` with real Redis servers.
    Cluster,
}

/// The deployment selected by `CONFAB_TEST_TARGET` (`dev` when unset or empty). Any other
/// value fails the test, so that a typo does not silently test dev mode instead.
pub fn target() -> Target {
    match std::env::var("CONFAB_TEST_TARGET") {
        Err(std::env::VarError::NotPresent) => Target::Dev,
        Ok(value) if value.is_empty() || value == "dev" => Target::Dev,
        Ok(value) if value == "cluster" => Target::Cluster,
        other => panic!("CONFAB_TEST_TARGET must be `dev` or `cluster`, not {other:?}"),
    }
}

/// Unix seconds now.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Signs `claims` as an HS256 JWT with `secret`.
pub fn mint_with_secret(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a test token")
}

/// Builds a [`DevServer`] with extra flags or environment.
pub struct DevServerBuilder {
    args: Vec<(String, String)>,
    envs: Vec<(String, String)>,
    jwt_secret: String,
    admin_token: String,
}

/// The flags of `confab dev` that belong to the cell in a cluster (every other one is a
/// gateway flag).
const CELL_FLAGS: [&str; 11] = [
    "--retention-events",
    "--max-channels-per-workspace",
    "--max-channels-per-user",
    "--max-members-per-channel",
    "--webhook-timeout-ms",
    "--webhook-backoff-max-s",
    "--webhook-give-up-after-s",
    "--webhook-disable-after-s",
    "--webhook-deny-private",
    "--max-webhooks-per-user",
    "--webhook-per-host",
];

/// Whether a flag of `confab dev` belongs to the cell in a cluster.
fn is_cell_flag(flag: &str) -> bool {
    CELL_FLAGS.contains(&flag)
}

/// Whether an environment variable of `confab dev` belongs to the cell in a cluster: the
/// variable of a cell flag.
fn is_cell_env(key: &str) -> bool {
    CELL_FLAGS
        .iter()
        .any(|flag| key == format!("CONFAB_{}", flag[2..].replace('-', "_").to_uppercase()))
}

/// A `confab` command with none of the tests' own `CONFAB_*` variables: they must not
/// configure the server behind the test's back.
fn confab_command(subcommand: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    cmd.arg(subcommand);
    for (key, _) in std::env::vars() {
        if key.starts_with("CONFAB_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

impl DevServerBuilder {
    /// Adds `flag value` to the command line (`--jwt-secret` and `--admin-token` are
    /// remembered so that the harness mints matching tokens). Against a cluster,
    /// the [`CELL_FLAGS`] go to the cell and every other flag to the gateway.
    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        match flag {
            "--jwt-secret" => self.jwt_secret = value.to_string(),
            "--admin-token" => self.admin_token = value.to_string(),
            _ => {}
        }
        self.args.push((flag.to_string(), value.to_string()));
        self
    }

    /// Sets an environment variable of the process (`CONFAB_JWT_SECRET` and
    /// `CONFAB_ADMIN_TOKEN` are remembered like their flags). Against a cluster,
    /// the variables of the [`CELL_FLAGS`] go to the cell and every other one to the gateway.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        match key {
            "CONFAB_JWT_SECRET" => self.jwt_secret = value.to_string(),
            "CONFAB_ADMIN_TOKEN" => self.admin_token = value.to_string(),
            _ => {}
        }
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the deployment [`target`] selects and waits until it serves the seeded `demo`.
    pub async fn start(self) -> DevServer {
        match target() {
            Target::Dev => self.start_dev().await,
            Target::Cluster => self.start_cluster().await,
        }
    }

    /// Starts `confab dev --listen 127.0.0.1:0 <args>` and waits for its listen line.
    async fn start_dev(self) -> DevServer {
        let mut cmd = confab_command("dev");
        cmd.arg("--listen").arg("127.0.0.1:0");
        for (flag, value) in &self.args {
            cmd.arg(flag).arg(value);
        }
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        let (process, listen) = Proc::spawn("confab dev", cmd);
        let mut server = DevServer::new(process, None, self.jwt_secret, self.admin_token);
        let addr = server.main.await_listen(listen).await;
        server.set_addr(addr);
        server
    }

    /// Starts a directory Redis, a durable store Redis, `confab cell` and `confab gateway`,
    /// waits until both are ready and seeds what `confab dev` seeds.
    async fn start_cluster(self) -> DevServer {
        let directory = TestRedis::from_env();
        let store = store_redis(&directory);
        let (cell_args, gateway_args): (Vec<_>, Vec<_>) =
            self.args.iter().partition(|(flag, _)| is_cell_flag(flag));
        let (cell_envs, gateway_envs): (Vec<_>, Vec<_>) =
            self.envs.iter().partition(|(key, _)| is_cell_env(key));

        let (cell, cell_addr) = start_cell(&directory, &store, &cell_args, &cell_envs).await;

        let mut cmd = confab_command("gateway");
        cmd.args(["--listen", "127.0.0.1:0", "--redis", &directory.url()])
            .args(["--cluster-secret", CLUSTER_SECRET]);
        // The gateway has no default secret or admin token; give it `confab dev`'s unless the
        // test sets them, by flag or by environment (then the gateway must read that).
        let given = |flag: &str, env: &str| {
            gateway_args.iter().any(|(f, _)| f == flag)
                || gateway_envs.iter().any(|(k, _)| k == env)
        };
        if !given("--jwt-secret", "CONFAB_JWT_SECRET") {
            cmd.args(["--jwt-secret", &self.jwt_secret]);
        }
        if !given("--admin-token", "CONFAB_ADMIN_TOKEN") {
            cmd.args(["--admin-token", &self.admin_token]);
        }
        for (flag, value) in &gateway_args {
            cmd.arg(flag).arg(value);
        }
        cmd.envs(gateway_envs.iter().map(|(k, v)| (k, v)));
        let (gateway, listen) = Proc::spawn("confab gateway", cmd);

        let cluster = ClusterParts {
            cell,
            cell_base: format!("http://{cell_addr}"),
            store,
            directory,
        };
        let mut server = DevServer::new(gateway, Some(cluster), self.jwt_secret, self.admin_token);
        let addr = server.main.await_listen(listen).await;
        server.set_addr(addr);
        let cell_ready = format!("{}/readyz", server.cell_base_url());
        server.wait_ready(&cell_ready).await;
        let gateway_ready = format!("{}/readyz", server.base_url());
        server.wait_ready(&gateway_ready).await;
        server.seed_demo().await;
        server
    }
}

/// The Redis of the test cluster's cell store, with the URL the cell is given.
struct StoreRedis {
    /// The store's own server (none when it shares the directory's Redis).
    _server: Option<RedisServer>,
    url: String,
}

/// Chooses the cell store's Redis, the one place the harness does: the store's own durable
/// `redis-server` beside a single directory Redis, and the directory's Redis Cluster itself
/// when `CONFAB_TEST_REDIS=cluster` made it one, so that the store runs on the cluster too
/// (its keys, `confab:cs:…`, never meet the directory's, and the harness has one cell).
fn store_redis(directory: &TestRedis) -> StoreRedis {
    match directory {
        TestRedis::Cluster(_) => StoreRedis {
            _server: None,
            url: directory.url(),
        },
        TestRedis::Single(_) => {
            let server = RedisServer::start_durable();
            StoreRedis {
                url: server.url(),
                _server: Some(server),
            }
        }
    }
}

/// Starts `confab cell` on a free port; another process can take a probed port before the
/// cell binds it, and the cell then exits at once, so it is tried again on another port.
async fn start_cell(
    directory: &TestRedis,
    store: &StoreRedis,
    args: &[&(String, String)],
    envs: &[&(String, String)],
) -> (Proc, SocketAddr) {
    let mut attempt = 1;
    loop {
        let port = free_port();
        let mut cmd = confab_command("cell");
        cmd.args(["--id", CLUSTER_CELL_ID, "--region", CLUSTER_REGION])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--advertise", &format!("http://127.0.0.1:{port}")])
            .args(["--redis", &store.url, "--directory", &directory.url()])
            .args(["--cluster-secret", CLUSTER_SECRET]);
        for (flag, value) in args {
            cmd.arg(flag).arg(value);
        }
        cmd.envs(envs.iter().map(|(k, v)| (k, v)));
        let (mut cell, listen) = Proc::spawn("confab cell", cmd);
        match cell.listen(listen).await {
            Listen::Addr(addr) => return (cell, addr),
            Listen::Exited if attempt < CELL_PORT_ATTEMPTS => attempt += 1,
            failure => panic!(
                "confab cell did not start on port {port} (attempt {attempt}): {failure:?}\n{}",
                cell.diagnostics()
            ),
        }
    }
}

/// What waiting for a process's listen line gave.
#[derive(Debug)]
enum Listen {
    /// The address it listens on.
    Addr(SocketAddr),
    /// It closed its stdout (it exited) without printing the line.
    Exited,
    /// It printed no listen line within [`START_WAIT`].
    Silent,
}

/// A child process whose stdout and stderr are drained by threads, killed when dropped.
struct Proc {
    /// How the process names itself at the start of its listen line (`confab gateway`, …).
    name: &'static str,
    child: Child,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Proc {
    /// Spawns `cmd` and returns it with the URL of its listen line, the first stdout line that
    /// starts with `name` and says `listening on <url>`.
    fn spawn(name: &'static str, mut cmd: Command) -> (Proc, oneshot::Receiver<String>) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));

        let stdout_lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
        let (url_tx, url_rx) = oneshot::channel::<String>();

        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::clone(&stdout_lines);
        // A thread drains stdout for the whole life of the process so that it never blocks on
        // a full pipe; it hands over the listen address as soon as it is printed, and its end
        // (dropping the sender) tells the waiter that the process closed its stdout.
        std::thread::spawn(move || {
            let mut url_tx = Some(url_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let url = line
                    .strip_prefix(name)
                    .and_then(|rest| rest.split_once(" listening on "))
                    .map(|(_, url)| url.trim().to_string());
                // Only the first listen line counts; the sender is taken only then.
                if let Some(url) = url {
                    if let Some(tx) = url_tx.take() {
                        let _ = tx.send(url);
                    }
                }
                if let Ok(mut lines) = lines.lock() {
                    lines.push(line);
                }
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let tail = Arc::clone(&stderr_tail);
        std::thread::spawn(move || drain_tail(stderr, tail));

        let process = Proc {
            name,
            child,
            stdout_lines,
            stderr_tail,
        };
        (process, url_rx)
    }

    /// Waits (bounded) for the listen line.
    async fn listen(&mut self, listen: oneshot::Receiver<String>) -> Listen {
        match tokio::time::timeout(START_WAIT, listen).await {
            Ok(Ok(url)) => {
                let authority = url
                    .strip_prefix("http://")
                    .unwrap_or_else(|| {
                        panic!("{} listen line has no http:// url: {url:?}", self.name)
                    })
                    .trim_end_matches('/');
                Listen::Addr(authority.parse().unwrap_or_else(|e| {
                    panic!("{} listen line address {authority:?}: {e}", self.name)
                }))
            }
            Ok(Err(_)) => Listen::Exited,
            Err(_) => Listen::Silent,
        }
    }

    /// Waits (bounded) for the listen line and panics with the process's output without it.
    async fn await_listen(&mut self, listen: oneshot::Receiver<String>) -> SocketAddr {
        match self.listen(listen).await {
            Listen::Addr(addr) => addr,
            Listen::Exited => {
                let status = self.wait_exit(Duration::from_secs(2));
                panic!(
                    "{} ended its stdout without printing its listen line (exit: {status:?})",
                    self.name
                );
            }
            Listen::Silent => panic!("{} printed no listen line within {START_WAIT:?}", self.name),
        }
    }

    fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        let stderr: Vec<String> = self
            .stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        format!(
            "---- {} ----\nstdout:\n{}\nstderr (tail):\n{}",
            self.name,
            self.stdout_lines().join("\n"),
            stderr.join("\n")
        )
    }

    /// The exit status if the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (bounded) for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain_tail(stream: impl Read, tail: Arc<Mutex<VecDeque<String>>>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if let Ok(mut tail) = tail.lock() {
            if tail.len() >= 300 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// The processes behind the gateway of a test cluster. Fields drop in order: the cell stops
/// before the Redis servers it uses.
struct ClusterParts {
    cell: Proc,
    /// `http://127.0.0.1:PORT` of the cell (its `/readyz`, `/metrics`).
    cell_base: String,
    store: StoreRedis,
    directory: TestRedis,
}

/// A running deployment, killed when dropped: one `confab dev` process, or a cluster whose
/// gateway stands where `confab dev` would (its URL, its stdout, its process id).
pub struct DevServer {
    /// `confab dev`, or the cluster's gateway. Declared first so it is killed first.
    main: Proc,
    cluster: Option<ClusterParts>,
    base: String,
    addr: SocketAddr,
    jwt_secret: String,
    admin_token: String,
    http: reqwest::Client,
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

impl DevServer {
    fn new(
        main: Proc,
        cluster: Option<ClusterParts>,
        jwt_secret: String,
        admin_token: String,
    ) -> DevServer {
        DevServer {
            main,
            cluster,
            base: String::new(),
            addr: "127.0.0.1:0".parse().expect("socket address"),
            jwt_secret,
            admin_token,
            http: reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .expect("http client"),
        }
    }

    fn set_addr(&mut self, addr: SocketAddr) {
        self.addr = addr;
        self.base = format!("http://{addr}");
    }

    /// Polls `url` (bounded) until it answers 200, failing early if a process exits.
    async fn wait_ready(&mut self, url: &str) {
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Ok(response) = self.http.get(url).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self.main.exited() {
                panic!(
                    "{} exited ({status}) before {url} was ready",
                    self.main.name
                );
            }
            if let Some(status) = self.cluster.as_mut().and_then(|c| c.cell.exited()) {
                panic!("confab cell exited ({status}) before {url} was ready");
            }
            assert!(
                Instant::now() < deadline,
                "{url} did not answer 200 within {START_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Seeds a cluster as `confab dev` seeds itself: workspace `demo` in region `local` with
    /// public channel `general` whose members are alice and bob (seqs 1 and 2).
    async fn seed_demo(&self) {
        self.admin()
            .post(
                "/admin/v1/workspaces",
                json!({"id": DEMO, "name": "Demo", "region": CLUSTER_REGION}),
            )
            .await
            .expect_status(201);
        self.admin()
            .post(
                &format!("/admin/v1/workspaces/{DEMO}/channels"),
                json!({"id": GENERAL, "kind": "public", "members": ["alice", "bob"]}),
            )
            .await
            .expect_status(201);
    }

    /// A builder for a server with extra flags.
    pub fn builder() -> DevServerBuilder {
        DevServerBuilder {
            args: Vec::new(),
            envs: Vec::new(),
            jwt_secret: "dev-secret".to_string(),
            admin_token: "dev-admin".to_string(),
        }
    }

    /// A server with the default configuration.
    pub async fn start() -> DevServer {
        Self::builder().start().await
    }

    /// `http://127.0.0.1:PORT` of `confab dev` or of the cluster's gateway.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` of the process that runs the cell: `confab dev` itself, or
    /// the cluster's `confab cell` (whose `/metrics` has the cell's metrics).
    pub fn cell_base_url(&self) -> &str {
        self.cluster
            .as_ref()
            .map_or(self.base.as_str(), |c| c.cell_base.as_str())
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The lines `confab dev` (or the cluster's gateway) printed on stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.main.stdout_lines()
    }

    /// The lines the cluster's cell printed on stdout so far (empty for `confab dev`).
    pub fn cell_stdout_lines(&self) -> Vec<String> {
        self.cluster
            .as_ref()
            .map(|c| c.cell.stdout_lines())
            .unwrap_or_default()
    }

    /// Waits (bounded) for a stdout line starting with `prefix` and returns the rest of it.
    pub async fn stdout_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self
                .stdout_lines()
                .iter()
                .find_map(|l| l.strip_prefix(prefix))
            {
                return line.to_string();
            }
            if Instant::now() >= deadline {
                panic!(
                    "no stdout line starting with {prefix:?}; stdout: {:#?}",
                    self.stdout_lines()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn diagnostics(&self) -> String {
        match &self.cluster {
            None => self.main.diagnostics(),
            Some(cluster) => format!(
                "{}\n{}",
                self.main.diagnostics(),
                cluster.cell.diagnostics()
            ),
        }
    }

    /// The process id of `confab dev` or of the cluster's gateway.
    pub fn pid(&self) -> u32 {
        self.main.child.id()
    }

    /// Sends SIGTERM to `confab dev` or to the cluster's gateway.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits (bounded) for `confab dev` or the cluster's gateway to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.main.wait_exit(timeout)
    }

    // ---- tokens ----

    /// Signs `claims` with the server's JWT secret.
    pub fn mint(&self, claims: &Value) -> String {
        mint_with_secret(&self.jwt_secret, claims)
    }

    /// A one-hour token for `user` of `demo`.
    pub fn token(&self, user: &str) -> String {
        self.token_in(DEMO, user)
    }

    /// A one-hour token for `user` of `workspace`.
    pub fn token_in(&self, workspace: &str, user: &str) -> String {
        self.mint(&json!({"sub": user, "wsp": workspace, "exp": now_s() + 3600}))
    }

    // ---- WebSocket clients ----

    /// `ws://127.0.0.1:PORT/v1/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// A WebSocket connected to `/v1/ws` that has said nothing yet.
    pub async fn connect(&self) -> Client {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(self.addr))
            .await
            .expect("tcp connect timed out")
            .expect("tcp connect");
        Client::handshake(self.ws_url(), stream).await
    }

    /// A WebSocket whose socket receive buffer is as small as the kernel allows, so that a
    /// client that stops reading makes the server's writes block quickly.
    pub async fn connect_with_small_receive_buffer(&self) -> Client {
        let socket = TcpSocket::new_v4().expect("tcp socket");
        socket
            .set_recv_buffer_size(1024)
            .expect("set receive buffer size");
        let stream = tokio::time::timeout(WAIT, socket.connect(self.addr))
            .await
            .expect("tcp connect timed out")
            .expect("tcp connect");
        Client::handshake(self.ws_url(), stream).await
    }

    /// A WebSocket connected to `/v1/ws?<query>` that has said nothing yet; with
    /// `small_receive_buffer`, its receive buffer is as small as in
    /// [`Self::connect_with_small_receive_buffer`].
    pub async fn connect_with_query(&self, query: &str, small_receive_buffer: bool) -> Client {
        let socket = TcpSocket::new_v4().expect("tcp socket");
        if small_receive_buffer {
            socket
                .set_recv_buffer_size(1024)
                .expect("set receive buffer size");
        }
        let stream = tokio::time::timeout(WAIT, socket.connect(self.addr))
            .await
            .expect("tcp connect timed out")
            .expect("tcp connect");
        Client::handshake(format!("{}?{query}", self.ws_url()), stream).await
    }

    /// A session of `user` of `demo`, past `ready`.
    pub async fn client(&self, user: &str) -> Client {
        self.client_in(DEMO, user).await
    }

    /// A session of `user` of `workspace`, past `ready`.
    pub async fn client_in(&self, workspace: &str, user: &str) -> Client {
        let token = self.token_in(workspace, user);
        self.client_with_token(&token).await
    }

    /// A session opened with `token`, past `ready`.
    pub async fn client_with_token(&self, token: &str) -> Client {
        let mut client = self.connect().await;
        client.hello(token, None).await;
        client
    }

    /// A session of `user` of `demo` that resumes `resume`, past `ready` (replayed events stay
    /// buffered for `next_event`).
    pub async fn client_resuming(&self, user: &str, resume: Value) -> Client {
        let token = self.token(user);
        let mut client = self.connect().await;
        client.hello(&token, Some(resume)).await;
        client
    }

    // ---- HTTP ----

    /// An HTTP client sending `Authorization: Bearer <token>`.
    pub fn http(&self, token: &str) -> Http {
        Http {
            client: self.http.clone(),
            base: self.base.clone(),
            auth: Some(format!("Bearer {token}")),
        }
    }

    /// An HTTP client of `user` of `demo`.
    pub fn http_as(&self, user: &str) -> Http {
        self.http(&self.token(user))
    }

    /// An HTTP client sending no `Authorization` header.
    pub fn anon(&self) -> Http {
        Http {
            client: self.http.clone(),
            base: self.base.clone(),
            auth: None,
        }
    }

    /// An HTTP client of the process that runs the cell ([`DevServer::cell_base_url`]),
    /// sending no `Authorization` header.
    pub fn cell_anon(&self) -> Http {
        Http {
            client: self.http.clone(),
            base: self.cell_base_url().to_string(),
            auth: None,
        }
    }

    /// An HTTP client with an arbitrary `Authorization` header value.
    pub fn http_with_authorization(&self, value: &str) -> Http {
        Http {
            client: self.http.clone(),
            base: self.base.clone(),
            auth: Some(value.to_string()),
        }
    }

    /// An HTTP client with the admin token.
    pub fn admin(&self) -> Http {
        self.http(&self.admin_token.clone())
    }

    /// Creates workspace `id` in region `local` through the admin API.
    pub async fn create_workspace(&self, id: &str) -> Value {
        self.admin()
            .post("/admin/v1/workspaces", json!({"id": id, "region": "local"}))
            .await
            .expect_status(201)
    }

    /// Creates a channel as `creator` of `demo` over HTTP and returns the channel object.
    pub async fn create_channel(
        &self,
        creator: &str,
        name: &str,
        kind: &str,
        members: &[&str],
    ) -> Value {
        self.http_as(creator)
            .post(
                "/v1/channels",
                json!({"name": name, "kind": kind, "members": members}),
            )
            .await
            .expect_status(201)
    }
}

/// What one read from a WebSocket produced.
#[derive(Debug)]
pub enum Incoming {
    /// A text frame holding JSON.
    Json(Value),
    /// A binary frame (the protocol never sends one).
    Binary(Vec<u8>),
    /// A close frame, with its code and reason.
    Close(Option<u16>, String),
    /// The connection ended without a close frame (or failed).
    Ended(String),
    /// Nothing arrived in time.
    Timeout,
}

/// A WebSocket client of `/v1/ws`. Frames read but not yet asked for wait in `pending`.
pub struct Client {
    ws: WebSocketStream<TcpStream>,
    pending: VecDeque<Value>,
    next_id: i64,
    /// The `ready` frame, once `hello` succeeded.
    pub ready: Value,
}

impl Client {
    async fn handshake(url: String, stream: TcpStream) -> Client {
        let (ws, _response) =
            tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
                .await
                .expect("websocket handshake timed out")
                .expect("websocket handshake");
        Client {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            ready: Value::Null,
        }
    }

    // ---- writing ----

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.ws
            .send(Message::text(text))
            .await
            .expect("send a text frame");
    }

    /// Sends a JSON object as a text frame, as it is.
    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(value.to_string()).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::binary(bytes))
            .await
            .expect("send a binary frame");
    }

    /// Sends a WebSocket ping control frame.
    pub async fn send_ws_ping(&mut self) {
        self.ws
            .send(Message::Ping(Vec::new().into()))
            .await
            .expect("send a ping frame");
    }

    /// Sends a close frame with `code`.
    pub async fn send_close(&mut self, code: u16) {
        self.ws
            .send(Message::Close(Some(CloseFrame {
                code: WsCloseCode::from(code),
                reason: "".into(),
            })))
            .await
            .expect("send a close frame");
    }

    /// Sends a JSON frame and a close frame in one socket write, without waiting for any
    /// reply: the server finds both in one read, so it handles the frame and the close back to
    /// back.
    pub async fn send_json_and_close(&mut self, value: &Value) {
        self.ws
            .feed(Message::text(value.to_string()))
            .await
            .expect("queue a text frame");
        self.ws
            .feed(Message::Close(None))
            .await
            .expect("queue a close frame");
        self.ws.flush().await.expect("write both frames");
    }

    /// Sends `hello` and returns the first frame the server answers, which is not checked.
    pub async fn hello_raw(&mut self, token: &str, resume: Option<Value>) -> Incoming {
        let mut hello = json!({"op": "hello", "token": token});
        if let Some(resume) = resume {
            hello["resume"] = resume;
        }
        self.send_json(&hello).await;
        self.read(WAIT).await
    }

    /// Sends `hello` and asserts that `ready` comes back; stores and returns it.
    pub async fn hello(&mut self, token: &str, resume: Option<Value>) -> Value {
        match self.hello_raw(token, resume).await {
            Incoming::Json(frame) if frame["op"] == "ready" => {
                self.ready = frame.clone();
                frame
            }
            other => panic!("expected ready after hello, got {other:?}"),
        }
    }

    // ---- reading ----

    /// Reads the next frame from the socket (not from `pending`), waiting at most `timeout`.
    /// WebSocket pings and pongs are skipped (tungstenite answers pings itself).
    pub async fn read(&mut self, timeout: Duration) -> Incoming {
        let deadline = Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Incoming::Timeout,
                Ok(next) => next,
            };
            return match next {
                None => Incoming::Ended("stream ended".to_string()),
                Some(Err(e)) => Incoming::Ended(e.to_string()),
                Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                    Ok(value) => Incoming::Json(value),
                    Err(e) => panic!("server sent a text frame that is not JSON ({e}): {text}"),
                },
                Some(Ok(Message::Binary(bytes))) => Incoming::Binary(bytes.to_vec()),
                Some(Ok(Message::Close(frame))) => match frame {
                    Some(frame) => {
                        Incoming::Close(Some(u16::from(frame.code)), frame.reason.to_string())
                    }
                    None => Incoming::Close(None, String::new()),
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            };
        }
    }

    /// The next JSON frame, from `pending` first; panics on close or after [`WAIT`].
    pub async fn next_frame(&mut self) -> Value {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        match self.read(WAIT).await {
            Incoming::Json(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Sends `request` (adding a unique integer `id` unless it has one) and returns the
    /// non-event frame that echoes its id; events and other frames read meanwhile are kept.
    pub async fn request(&mut self, mut request: Value) -> Value {
        if request.get("id").is_none() {
            request["id"] = json!(self.next_id);
            self.next_id += 1;
        }
        let id = request["id"].clone();
        self.send_json(&request).await;
        self.reply_to(&id).await
    }

    /// Waits for the non-event frame whose `id` is `id`.
    pub async fn reply_to(&mut self, id: &Value) -> Value {
        if let Some(pos) = self
            .pending
            .iter()
            .position(|f| f["op"] != "event" && f.get("id") == Some(id))
        {
            return self.pending.remove(pos).expect("pending frame");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Json(frame) => {
                    if frame["op"] != "event" && frame.get("id") == Some(id) {
                        return frame;
                    }
                    self.pending.push_back(frame);
                }
                other => panic!(
                    "no reply to request id {id} (got {other:?}); frames meanwhile: {:?}",
                    self.pending
                ),
            }
        }
    }

    /// `request`, asserting the reply's `op` is `op`.
    pub async fn request_op(&mut self, op: &str, request: Value) -> Value {
        let reply = self.request(request.clone()).await;
        assert_eq!(reply["op"], op, "request {request} answered {reply}");
        reply
    }

    /// `request`, asserting it is answered by an error with `code`.
    pub async fn request_error(&mut self, code: &str, request: Value) -> Value {
        let reply = self.request(request.clone()).await;
        assert_eq!(reply["op"], "error", "request {request} answered {reply}");
        assert_eq!(reply["code"], code, "request {request} answered {reply}");
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {reply}"
        );
        reply
    }

    /// Sends a message and returns its ack.
    pub async fn send_message(&mut self, channel: &str, text: &str) -> Value {
        self.request_op(
            "ack",
            json!({"op": "send", "channel": channel, "text": text}),
        )
        .await
    }

    /// Checks the connection is open and served: a `ping` is answered by its `pong`.
    pub async fn assert_alive(&mut self) {
        let pong = self.request(json!({"op": "ping"})).await;
        assert_eq!(pong["op"], "pong", "ping answered {pong}");
    }

    /// The next event of type `ty` (from `pending` first), within `timeout`; other frames read
    /// meanwhile are kept.
    pub async fn next_event(&mut self, ty: &str, timeout: Duration) -> Value {
        self.next_event_where(ty, |_| true, timeout).await
    }

    /// The next event of type `ty` matching `pred`, within `timeout`.
    pub async fn next_event_where(
        &mut self,
        ty: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        let matches = |f: &Value| f["op"] == "event" && f["type"] == ty && pred(f);
        if let Some(pos) = self.pending.iter().position(matches) {
            return self.pending.remove(pos).expect("pending frame");
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Json(frame) => {
                    if matches(&frame) {
                        return frame;
                    }
                    self.pending.push_back(frame);
                }
                other => panic!(
                    "no {ty} event (got {other:?}); frames meanwhile: {:?}",
                    self.pending
                ),
            }
        }
    }

    /// Reads for `duration` and panics if an event of type `ty` is pending or arrives.
    pub async fn expect_no_event(&mut self, ty: &str, duration: Duration) {
        self.expect_no_event_where(ty, |_| true, duration).await;
    }

    /// Reads for `duration` and panics if an event of type `ty` matching `pred` is pending or
    /// arrives.
    pub async fn expect_no_event_where(
        &mut self,
        ty: &str,
        pred: impl Fn(&Value) -> bool,
        duration: Duration,
    ) {
        let matches = |f: &Value| f["op"] == "event" && f["type"] == ty && pred(f);
        if let Some(frame) = self.pending.iter().find(|f| matches(f)) {
            panic!("unexpected {ty} event: {frame}");
        }
        let deadline = Instant::now() + duration;
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Json(frame) => {
                    assert!(!matches(&frame), "unexpected {ty} event: {frame}");
                    self.pending.push_back(frame);
                }
                Incoming::Timeout => return,
                other => panic!("connection ended while watching for {ty} events: {other:?}"),
            }
        }
    }

    /// Reads for `duration` and panics if any frame is pending or arrives.
    pub async fn expect_no_frame(&mut self, duration: Duration) {
        assert!(
            self.pending.is_empty(),
            "unexpected frames pending: {:?}",
            self.pending
        );
        match self.read(duration).await {
            Incoming::Timeout => {}
            other => panic!("expected no frame, got {other:?}"),
        }
    }

    /// Reads until a close frame and asserts its code; returns the frames read before it.
    pub async fn expect_close(&mut self, code: u16) -> Vec<Value> {
        self.expect_close_within(code, WAIT).await
    }

    /// [`Client::expect_close`] with a custom bound.
    pub async fn expect_close_within(&mut self, code: u16, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut before: Vec<Value> = self.pending.drain(..).collect();
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Json(frame) => before.push(frame),
                Incoming::Binary(_) => {}
                Incoming::Close(got, reason) => {
                    assert_eq!(
                        got,
                        Some(code),
                        "expected close {code}, got close {got:?} ({reason:?}); frames before: {}",
                        summarize(&before)
                    );
                    return before;
                }
                other => panic!(
                    "expected close {code}, got {other:?}; frames before: {}",
                    summarize(&before)
                ),
            }
        }
    }

    /// Events and other frames read but not yet asked for.
    pub fn pending(&self) -> &VecDeque<Value> {
        &self.pending
    }

    /// Drops every pending frame.
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// Reads every frame that arrives within `duration` into `pending` and returns them all.
    pub async fn collect_for(&mut self, duration: Duration) -> Vec<Value> {
        let deadline = Instant::now() + duration;
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Json(frame) => self.pending.push_back(frame),
                Incoming::Timeout => break,
                other => panic!("connection ended while collecting frames: {other:?}"),
            }
        }
        self.pending.iter().cloned().collect()
    }

    /// The session's `ready` entry for `channel`.
    pub fn ready_channel(&self, channel: &str) -> Option<Value> {
        self.ready["channels"]
            .as_array()?
            .iter()
            .find(|c| c["id"] == channel)
            .cloned()
    }
}

/// A short description of frames for failure messages (texts can be 60 KB).
fn summarize(frames: &[Value]) -> String {
    let shown: Vec<String> = frames
        .iter()
        .take(10)
        .map(|f| {
            let s = f.to_string();
            if s.len() > 200 {
                format!("{}…", &s[..200])
            } else {
                s
            }
        })
        .collect();
    format!("{} frames: [{}]", frames.len(), shown.join(", "))
}

/// An HTTP client of one server with one `Authorization` header.
pub struct Http {
    client: reqwest::Client,
    base: String,
    auth: Option<String>,
}

/// An HTTP response with its body read (as JSON when it is JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The body as JSON; `Value::Null` when empty, `Value::String` when not JSON.
    pub body: Value,
}

impl Resp {
    /// Asserts the status and returns the body.
    pub fn expect_status(self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        self.body
    }

    /// Asserts an error response `{"error":{"code","message"}}` with `status` and `code`.
    pub fn expect_error(self, status: u16, code: &str) -> Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        assert_eq!(
            self.body["error"]["code"], code,
            "unexpected error body: {}",
            self.body
        );
        assert!(
            self.body["error"]["message"].is_string(),
            "error body without a message: {}",
            self.body
        );
        self.body
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

impl Http {
    async fn send(&self, builder: reqwest::RequestBuilder) -> Resp {
        let builder = match &self.auth {
            Some(auth) => builder.header("Authorization", auth),
            None => builder,
        };
        let response = builder.send().await.expect("http request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("http response body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.send(self.client.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// POSTs `body` with one extra header.
    pub async fn post_with_header(&self, path: &str, header: (&str, &str), body: Value) -> Resp {
        self.send(
            self.client
                .post(format!("{}{path}", self.base))
                .header(header.0, header.1)
                .json(&body),
        )
        .await
    }

    /// POSTs `body` as it is, labelled `application/json`.
    pub async fn post_raw(&self, path: &str, body: &str) -> Resp {
        self.send(
            self.client
                .post(format!("{}{path}", self.base))
                .header("Content-Type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(self.client.delete(format!("{}{path}", self.base)))
            .await
    }
}
