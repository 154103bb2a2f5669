//! The processes of a chaos run, laid out like `infra/local/cluster.sh` (a presence+directory
//! Redis, a cell with its own Redis store, two gateways) on free loopback ports, each of which
//! can be killed with SIGKILL and restarted with the same command line, data directory and port.
//!
//! Every Redis runs with `--appendonly yes --appendfsync always`: an acked write is on disk
//! before the ack, so a `kill -9` of a Redis loses nothing that was acknowledged.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// The deployment's secrets (local only).
pub const JWT_SECRET: &str = "chaos-secret";
pub const ADMIN_TOKEN: &str = "chaos-admin";
const CLUSTER_SECRET: &str = "chaos-cluster-secret";
/// The cell's region and the workspace the run uses.
pub const REGION: &str = "chaos-region";
pub const WORKSPACE: &str = "chaos";
/// Longest wait for a (re)started process to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Which process to kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Victim {
    Gateway(usize),
    Cell,
    CellRedis,
    DirectoryRedis,
}

use serde::Serialize;

impl Victim {
    pub fn name(self) -> String {
        match self {
            Victim::Gateway(i) => format!("gateway-{}", i + 1),
            Victim::Cell => "cell-c1".into(),
            Victim::CellRedis => "redis-c1".into(),
            Victim::DirectoryRedis => "redis-directory".into(),
        }
    }
}

/// How to check that a process is up.
#[derive(Debug, Clone)]
enum Health {
    /// `PING` answered `+PONG` on this port.
    Redis(u16),
    /// `GET /readyz` (or `/healthz` for a cell) answered 200.
    Http(String),
}

/// One process, restartable.
#[derive(Debug)]
struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    health: Health,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap.
    async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill().ok();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        Ok(())
    }

    async fn wait_healthy(&mut self, http: &reqwest::Client) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{} exited with {status}; see {}",
                        self.name,
                        self.log.display()
                    );
                }
            }
            let up = match &self.health {
                Health::Redis(port) => redis_pong(*port).await,
                Health::Http(url) => http
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
            };
            if up {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} did not come up within {START_TIMEOUT:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn redis_pong(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer).await?;
        Ok::<bool, std::io::Error>(&answer == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

/// A free loopback port (bound and released; the run starts its processes on them at once).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The cluster of a chaos run.
#[derive(Debug)]
pub struct Cluster {
    procs: Vec<Proc>,
    /// `http://127.0.0.1:port` of each gateway.
    pub gateways: Vec<String>,
    http: reqwest::Client,
}

impl Cluster {
    /// Starts every process under `dir` (data and logs) and creates the run's workspace.
    pub async fn start(confab: &Path, dir: &Path) -> Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let redis = |name: &str, port: u16| -> Result<Proc> {
            let data = dir.join(name);
            std::fs::create_dir_all(&data)?;
            Ok(Proc {
                name: name.into(),
                program: "redis-server".into(),
                args: durable_redis_args(port, &data),
                log: dir.join(format!("{name}.log")),
                health: Health::Redis(port),
                child: None,
            })
        };
        let (dir_port, store_port, cell_port) = (free_port()?, free_port()?, free_port()?);
        let directory = format!("redis://127.0.0.1:{dir_port}");
        let mut procs = vec![
            redis("redis-directory", dir_port)?,
            redis("redis-c1", store_port)?,
        ];
        let cell_url = format!("http://127.0.0.1:{cell_port}");
        procs.push(Proc {
            name: "cell-c1".into(),
            program: confab.to_path_buf(),
            args: [
                "cell",
                "--id",
                "c1",
                "--region",
                REGION,
                "--listen",
                &format!("127.0.0.1:{cell_port}"),
                "--advertise",
                &cell_url,
                "--redis",
                &format!("redis://127.0.0.1:{store_port}"),
                "--directory",
                &directory,
                "--cluster-secret",
                CLUSTER_SECRET,
            ]
            .map(String::from)
            .to_vec(),
            log: dir.join("cell-c1.log"),
            health: Health::Http(format!("{cell_url}/readyz")),
            child: None,
        });
        let mut gateways = Vec::new();
        for i in 1..=2 {
            let port = free_port()?;
            let base = format!("http://127.0.0.1:{port}");
            procs.push(Proc {
                name: format!("gateway-{i}"),
                program: confab.to_path_buf(),
                args: [
                    "gateway",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--redis",
                    &directory,
                    "--jwt-secret",
                    JWT_SECRET,
                    "--admin-token",
                    ADMIN_TOKEN,
                    "--cluster-secret",
                    CLUSTER_SECRET,
                ]
                .map(String::from)
                .to_vec(),
                log: dir.join(format!("gateway-{i}.log")),
                health: Health::Http(format!("{base}/readyz")),
                child: None,
            });
            gateways.push(base);
        }
        let mut cluster = Cluster {
            procs,
            gateways,
            http,
        };
        for i in 0..cluster.procs.len() {
            cluster.procs[i].spawn()?;
            let http = cluster.http.clone();
            cluster.procs[i].wait_healthy(&http).await?;
        }
        cluster.create_workspace().await?;
        Ok(cluster)
    }

    async fn create_workspace(&self) -> Result<()> {
        let reply = self
            .http
            .post(format!("{}/admin/v1/workspaces", self.gateways[0]))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({"id": WORKSPACE, "region": REGION, "name": "chaos"}))
            .send()
            .await
            .context("POST /admin/v1/workspaces")?;
        if !reply.status().is_success() {
            let status = reply.status();
            let body = reply.text().await.unwrap_or_default();
            bail!("creating the workspace: {status} {body}");
        }
        Ok(())
    }

    fn proc_mut(&mut self, victim: Victim) -> Result<&mut Proc> {
        let name = victim.name();
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process {name}"))
    }

    /// `kill -9`s the victim.
    pub async fn kill(&mut self, victim: Victim) -> Result<()> {
        self.proc_mut(victim)?.kill9().await
    }

    /// Starts the victim again and waits until it answers.
    pub async fn restart(&mut self, victim: Victim) -> Result<()> {
        let http = self.http.clone();
        let proc = self.proc_mut(victim)?;
        proc.spawn()?;
        proc.wait_healthy(&http).await
    }

    /// The PID of the victim's running process (`confab-load capacity` reads its `/proc`).
    pub fn pid(&self, victim: Victim) -> Option<u32> {
        let name = victim.name();
        self.procs
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.child.as_ref())
            .and_then(Child::id)
    }

    /// The port of a Redis victim (`confab-load capacity` reads its `INFO`).
    pub fn redis_port(&self, victim: Victim) -> Option<u16> {
        let name = victim.name();
        self.procs
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| match p.health {
                Health::Redis(port) => Some(port),
                Health::Http(_) => None,
            })
    }

    /// The port a confab victim listens on (`confab-load capacity` reads its sockets).
    pub fn http_port(&self, victim: Victim) -> Option<u16> {
        let name = victim.name();
        let proc = self.procs.iter().find(|p| p.name == name)?;
        match &proc.health {
            Health::Http(url) => url.rsplit(':').next()?.split('/').next()?.parse().ok(),
            Health::Redis(_) => None,
        }
    }

    /// Stops everything (SIGKILL: nothing is left to flush that the run still needs).
    pub async fn stop(&mut self) {
        for proc in self.procs.iter_mut().rev() {
            let _ = proc.kill9().await;
        }
    }
}

/// The arguments of a `redis-server` on `port` whose writes are on disk before it answers
/// (`appendonly yes`, `appendfsync always`, no RDB snapshots), keeping its files in `data`.
pub(crate) fn durable_redis_args(port: u16, data: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &data.to_string_lossy(),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ]
    .map(String::from)
    .to_vec()
}
