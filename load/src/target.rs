//! The server under load: confab, the reference server or NATS, started here or already
//! running.
//!
//! A target knows its base URLs (several for the distributed scenario), what kind of server it
//! is (which decides how clients speak to it), and, when it can, the server's PID so that CPU
//! time and RSS are read from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::info;

use crate::pin::{self, Cores};
use crate::procfs::{self, ProcSample};
use crate::reference::{InProcess, ReferenceConfig};

/// Which protocol the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    /// confab: hello/ready handshake, channels, server-assigned seqs.
    Confab,
    /// The reference fanout server: every text frame to everyone, client-assigned seqs.
    Reference,
    /// NATS's WebSocket server (`nats.rs`): reference-shaped frames as message payloads.
    Nats,
}

impl ServerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::Confab => "confab",
            ServerKind::Reference => "reference",
            ServerKind::Nats => "nats",
        }
    }
}

/// Settings for a `confab dev` started by the load generator. Benchmarks raise the per-client
/// rate limit so the limiter is not what is measured.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub client_rate: u32,
    pub queue_events: usize,
    /// Extra `CONFAB_*` environment for the child, e.g. a shorter heartbeat.
    pub env: Vec<(String, String)>,
    /// Where the child's stderr (its logs) goes; discarded when `None`.
    pub log_file: Option<PathBuf>,
    /// The CPUs the server runs on (`--pin`); anywhere when `None`.
    pub cpus: Option<Cores>,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            client_rate: 1_000_000,
            queue_events: confab_shared::limits::QUEUE_EVENTS,
            env: Vec::new(),
            log_file: None,
            cpus: None,
        }
    }
}

/// A server to put load on.
#[derive(Debug)]
pub struct Target {
    pub kind: ServerKind,
    /// `http://host:port` of each endpoint (gateways, for confab).
    pub bases: Vec<String>,
    /// PIDs of the server processes, when known.
    pub pids: Vec<u32>,
    /// A human description for reports.
    pub label: String,
    child: Option<Child>,
    in_process: Option<InProcess>,
}

impl Target {
    /// A server that is already running.
    pub fn external(kind: ServerKind, bases: Vec<String>, pids: Vec<u32>) -> Self {
        let label = format!("{} at {}", kind.as_str(), bases.join(", "));
        Target {
            kind,
            bases,
            pids,
            label,
            child: None,
            in_process: None,
        }
    }

    /// A server this runner started as `child` (process `pid`), serving at `base`; `pinned`
    /// is [`check_pinned`]'s label suffix.
    fn child(
        kind: ServerKind,
        name: &str,
        base: String,
        child: Child,
        pid: u32,
        pinned: &str,
    ) -> Self {
        Target {
            kind,
            label: format!("{name} (pid {pid}, {base}{pinned})"),
            bases: vec![base],
            pids: vec![pid],
            child: Some(child),
            in_process: None,
        }
    }

    /// Starts `confab dev --listen 127.0.0.1:0` and waits for its listening line.
    pub async fn spawn_dev(binary: &Path, options: &DevOptions) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .args(["dev", "--listen", "127.0.0.1:0"])
            .env("CONFAB_CLIENT_RATE", options.client_rate.to_string())
            .env("CONFAB_QUEUE_EVENTS", options.queue_events.to_string())
            // Every simulated client comes from 127.0.0.1: the per-address bound on
            // connections still without hello is meant for real clients, not for the load.
            .env("CONFAB_MAX_PENDING_HELLO_PER_IP", "1000000")
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        stderr_to(&mut command, options.log_file.as_deref())?;
        let mut child = spawn(command, options.cpus.as_ref())
            .with_context(|| format!("starting {} dev", binary.display()))?;
        let pid = child.id().context("confab dev exited at once")?;
        let stdout = child.stdout.take().context("no stdout from confab dev")?;
        let base = read_listen_line(stdout, "confab dev listening on ")
            .await
            .with_context(|| {
                format!(
                    "{} dev did not print its \"confab dev listening on http://...\" line",
                    binary.display()
                )
            })?;
        let pinned = check_pinned(pid, options.cpus.as_ref())?;
        info!(%base, pid, "confab dev started");
        Ok(Target::child(
            ServerKind::Confab,
            "confab dev",
            base,
            child,
            pid,
            &pinned,
        ))
    }

    /// Starts the reference server as a child process (this binary's `reference` command), so
    /// that its CPU time and memory are measured apart from the load generator's.
    pub async fn spawn_reference(config: ReferenceConfig, cpus: Option<&Cores>) -> Result<Self> {
        let exe = std::env::current_exe().context("locating confab-load's own binary")?;
        let mut command = Command::new(&exe);
        command
            .args(["reference", "--listen", "127.0.0.1:0", "--queue"])
            .arg(config.queue.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = spawn(command, cpus)
            .with_context(|| format!("starting {} reference", exe.display()))?;
        let pid = child.id().context("the reference server exited at once")?;
        let stdout = child
            .stdout
            .take()
            .context("no stdout from the reference server")?;
        let base = read_listen_line(stdout, "reference listening on ").await?;
        let pinned = check_pinned(pid, cpus)?;
        Ok(Target::child(
            ServerKind::Reference,
            "reference",
            base,
            child,
            pid,
            &pinned,
        ))
    }

    /// Starts `nats-server` (the binary at `binary`) with its WebSocket listener on a free
    /// loopback port ([`crate::nats::server_config`]) and waits until it accepts connections.
    pub async fn spawn_nats(
        binary: &Path,
        cpus: Option<&Cores>,
        log_file: Option<&Path>,
    ) -> Result<Self> {
        let port = free_port().context("finding a free port for NATS")?;
        let config = crate::nats::write_server_config(&std::env::temp_dir(), port)?;
        let mut command = Command::new(binary);
        command
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        stderr_to(&mut command, log_file)?;
        let mut child = spawn(command, cpus)
            .with_context(|| format!("starting {} -c {}", binary.display(), config.display()))?;
        let pid = child.id().context("nats-server exited at once")?;
        let addr = format!("127.0.0.1:{port}");
        let listening = wait_listening(&mut child, &addr).await;
        // Read at start-up only: gone whether or not the server came up.
        let _ = std::fs::remove_file(&config);
        listening?;
        let pinned = check_pinned(pid, cpus)?;
        let base = format!("http://{addr}");
        info!(%base, pid, "nats-server started");
        Ok(Target::child(
            ServerKind::Nats,
            "nats-server",
            base,
            child,
            pid,
            &pinned,
        ))
    }

    /// Runs the reference server inside this process (its CPU and memory are not separable
    /// from the load generator's, so none are reported).
    pub async fn in_process_reference(config: ReferenceConfig) -> Result<Self> {
        let server = InProcess::start(config)
            .await
            .context("starting the in-process reference server")?;
        let base = format!("http://{}", server.addr);
        Ok(Target {
            kind: ServerKind::Reference,
            label: format!("reference (in-process, {base})"),
            bases: vec![base],
            pids: Vec::new(),
            child: None,
            in_process: Some(server),
        })
    }

    /// The WebSocket URL of endpoint `i` (round-robin over the endpoints).
    pub fn ws_url(&self, i: usize) -> String {
        let base = &self.bases[i % self.bases.len()];
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("ws://"))
            .unwrap_or(base);
        let host = rest.split('/').next().unwrap_or(rest);
        format!("ws://{host}/v1/ws")
    }

    /// Sums of the server processes' counters; `None` when no PID is known.
    pub fn sample(&self) -> Option<ProcSample> {
        if self.pids.is_empty() {
            return None;
        }
        let mut total = ProcSample {
            cpu_s: 0.0,
            rss_kib: 0,
            peak_rss_kib: 0,
        };
        for pid in &self.pids {
            let s = procfs::sample(*pid).ok()?;
            total.cpu_s += s.cpu_s;
            total.rss_kib += s.rss_kib;
            total.peak_rss_kib += s.peak_rss_kib;
        }
        Some(total)
    }

    /// Whether a server this runner started has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Stops what this runner started; leaves external servers alone.
    pub async fn stop(mut self) {
        if let Some(server) = self.in_process.take() {
            server.stop().await;
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
    }
}

/// Spawns `command`, on `cpus` when given: from a thread pinned there, so the process and all
/// its threads inherit the pinning from their first instruction.
fn spawn(mut command: Command, cpus: Option<&Cores>) -> Result<Child> {
    match cpus {
        None => Ok(command.spawn()?),
        Some(cpus) => {
            // tokio's process support needs the runtime's context on the spawning thread.
            let runtime = tokio::runtime::Handle::current();
            pin::on_pinned_thread(cpus, move || {
                let _entered = runtime.enter();
                Ok(command.spawn()?)
            })
        }
    }
}

/// Waits (at most 30 s) until `child` accepts connections on `addr`; fails at once if it exits.
async fn wait_listening(child: &mut Child, addr: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("nats-server exited with {status} before listening on {addr}");
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nats-server did not listen on {addr} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Sends `command`'s stderr (the server's logs) to a new file at `log_file`, or discards it.
fn stderr_to(command: &mut Command, log_file: Option<&Path>) -> Result<()> {
    match log_file {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            command.stderr(file);
        }
        None => {
            command.stderr(Stdio::null());
        }
    }
    Ok(())
}

/// A loopback port nothing listens on now (the kernel's pick; free again when this returns,
/// so another process could take it first: a server that fails to bind says so).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Once the server is up (its threads started): fails unless every thread of it runs on
/// `cpus`. Returns the label's suffix, e.g. `, CPUs 0, 3 threads`.
fn check_pinned(pid: u32, cpus: Option<&Cores>) -> Result<String> {
    match cpus {
        None => Ok(String::new()),
        Some(cpus) => {
            let threads = pin::verify_process(pid, cpus)?;
            Ok(format!(", CPUs {cpus}, {threads} threads"))
        }
    }
}

/// Reads the child's stdout until the line starting with `prefix`, returns the URL after it,
/// and keeps draining stdout in the background so the child never blocks on a full pipe.
async fn read_listen_line(stdout: tokio::process::ChildStdout, prefix: &str) -> Result<String> {
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.trim().strip_prefix(prefix) {
                return Ok::<_, std::io::Error>(Some(url.trim().to_string()));
            }
        }
        Ok(None)
    })
    .await;
    let base = match found {
        Ok(Ok(Some(url))) => url,
        Ok(Ok(None)) => bail!("the server exited before printing \"{prefix}...\""),
        Ok(Err(e)) => bail!("reading the server's stdout: {e}"),
        Err(_) => bail!("no \"{prefix}...\" line within 30 s"),
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    crate::api::host_port(&base)?;
    Ok(base)
}

/// How to get a target for each run: servers started here are started fresh per run, so
/// every run's CPU and peak RSS are its own.
#[derive(Debug, Clone)]
pub enum TargetSpec {
    External {
        kind: ServerKind,
        bases: Vec<String>,
        pids: Vec<u32>,
    },
    SpawnDev {
        binary: PathBuf,
        options: DevOptions,
    },
    SpawnReference {
        config: ReferenceConfig,
        /// The CPUs the reference server runs on (`--pin`).
        cpus: Option<Cores>,
    },
    InProcessReference(ReferenceConfig),
    /// `nats-server` at `binary`, on `cpus` when given.
    SpawnNats {
        binary: PathBuf,
        cpus: Option<Cores>,
    },
}

impl TargetSpec {
    pub fn kind(&self) -> ServerKind {
        match self {
            TargetSpec::External { kind, .. } => *kind,
            TargetSpec::SpawnDev { .. } => ServerKind::Confab,
            TargetSpec::SpawnReference { .. } | TargetSpec::InProcessReference(_) => {
                ServerKind::Reference
            }
            TargetSpec::SpawnNats { .. } => ServerKind::Nats,
        }
    }

    /// Starts (or names) the server for one run; `log_name` names the server's log file.
    pub async fn open(&self, log_dir: Option<&Path>, log_name: &str) -> Result<Target> {
        match self {
            TargetSpec::External { kind, bases, pids } => {
                Ok(Target::external(*kind, bases.clone(), pids.clone()))
            }
            TargetSpec::SpawnDev { binary, options } => {
                let mut options = options.clone();
                if options.log_file.is_none() {
                    options.log_file = log_dir.map(|d| d.join(format!("{log_name}.confab.log")));
                }
                Target::spawn_dev(binary, &options).await
            }
            TargetSpec::SpawnReference { config, cpus } => {
                Target::spawn_reference(*config, cpus.as_ref()).await
            }
            TargetSpec::InProcessReference(config) => Target::in_process_reference(*config).await,
            TargetSpec::SpawnNats { binary, cpus } => {
                let log = log_dir.map(|d| d.join(format!("{log_name}.nats.log")));
                Target::spawn_nats(binary, cpus.as_ref(), log.as_deref()).await
            }
        }
    }
}
