//! The benchmark scenarios and what they share: the run context (target, connector, API
//! client), opening thousands of connections with bounded concurrency, channel setup, and
//! the measurement bracket (server and load-generator `/proc` samples around a phase).
//!
//! - [`fanout`]: one channel, many subscribers (scenario 1; also the distributed scenario 5,
//!   given several gateway URLs).
//! - [`chat`]: many small channels at a human pace, searching the highest rate under a p99
//!   bound (scenario 2).
//! - [`idle`]: idle connections and the server's memory per connection (scenario 3).
//! - [`storm`]: every connection dropped at once and resumed (scenario 4).
//! - [`webhooks`]: bots in busy channels with local receivers; deliveries/s, their latency,
//!   and the fanout p99 with and without webhook traffic.

pub mod chat;
pub mod fanout;
pub mod idle;
pub mod storm;
pub mod webhooks;

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;

use crate::api::{Api, TokenSource};
use crate::client::Connector;
use crate::procfs::{self, ProcSample};
use crate::progress;
use crate::report::Usage;
use crate::target::{ServerKind, Target};

/// How clients authenticate and how fast they connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub workspace: String,
    pub tokens: TokenSource,
    /// Connections opened at the same time during setup.
    pub connect_concurrency: usize,
    /// Connections to confab ask for batched frames (`?batch=1`).
    pub batch: bool,
    /// Connections to confab offer permessage-deflate.
    pub deflate: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            workspace: "demo".into(),
            tokens: TokenSource::Jwt {
                secret: "dev-secret".into(),
            },
            connect_concurrency: 64,
            batch: false,
            deflate: false,
        }
    }
}

/// Everything a scenario needs to reach its target.
#[derive(Debug)]
pub struct RunContext {
    pub target: Target,
    pub connector: Connector,
    /// The HTTP API of the first endpoint (confab only).
    pub api: Option<Api>,
    /// A short random prefix for the user ids and channel names of this run, so runs against
    /// the same server never collide.
    pub run_id: String,
    pub connect_concurrency: usize,
}

impl RunContext {
    pub async fn new(target: Target, options: &ClientOptions) -> Result<Self> {
        for base in &target.bases {
            crate::api::check_reachable(base).await?;
        }
        let connector = Connector::new(&target, options.batch, options.deflate).await?;
        let api = match target.kind {
            ServerKind::Confab => Some(Api::new(
                &target.bases[0],
                &options.workspace,
                options.tokens.clone(),
            )?),
            ServerKind::Reference | ServerKind::Nats => None,
        };
        Ok(RunContext {
            target,
            connector,
            api,
            run_id: run_id(),
            connect_concurrency: options.connect_concurrency.max(1),
        })
    }

    pub fn kind(&self) -> ServerKind {
        self.target.kind
    }

    /// A user id unique to this run.
    pub fn user(&self, role: &str, i: usize) -> String {
        format!("{}{role}{i}", self.run_id)
    }

    /// The API, or an error naming the scenario that needs confab.
    pub fn api(&self) -> Result<&Api> {
        self.api
            .as_ref()
            .context("this step needs a confab target (the reference server has no API)")
    }

    /// Samples the server and this process.
    pub fn sample(&self) -> Bracket {
        Bracket {
            server: self.target.sample(),
            loadgen: procfs::sample_self().ok(),
            machine_busy_s: procfs::machine_busy_s().ok(),
        }
    }

    /// Creates a public channel with `creator` and `members`: up to 999 members in the
    /// creation request (SPEC limit of 1,000 initial members), the rest added one by one.
    /// Done before anyone connects, so the membership events reach no session.
    pub async fn create_channel(
        &self,
        creator_token: &str,
        name: &str,
        members: &[String],
    ) -> Result<String> {
        let api = self.api()?;
        let first = members.len().min(999);
        let channel = api
            .create_channel(creator_token, name, &members[..first])
            .await
            .with_context(|| format!("creating channel {name}"))?;
        if members.len() > first {
            let bar = progress::counter((members.len() - first) as u64, "adding members");
            let results: Vec<Result<()>> = futures_util::stream::iter(&members[first..])
                .map(|user| {
                    let bar = &bar;
                    let channel = &channel;
                    async move {
                        let r = api.add_member(creator_token, channel, user).await;
                        bar.inc(1);
                        r
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            bar.finish_and_clear();
            results.into_iter().collect::<Result<Vec<()>>>()?;
        }
        Ok(channel)
    }
}

/// Server and load-generator samples at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Bracket {
    pub server: Option<ProcSample>,
    pub loadgen: Option<ProcSample>,
    /// Busy CPU seconds of the whole machine.
    pub machine_busy_s: Option<f64>,
}

impl Bracket {
    /// Server usage, load-generator CPU, and other processes' CPU between `self` and `end`.
    pub fn until(&self, end: &Bracket) -> Measured {
        let server = match (&self.server, &end.server) {
            (Some(a), Some(b)) => Some(Usage::between(a, b)),
            _ => None,
        };
        let loadgen = match (&self.loadgen, &end.loadgen) {
            (Some(a), Some(b)) => Some((b.cpu_s - a.cpu_s).max(0.0)),
            _ => None,
        };
        // Only meaningful when the server's CPU is known (otherwise it counts as "other").
        let other = match (self.machine_busy_s, end.machine_busy_s, server, loadgen) {
            (Some(a), Some(b), Some(s), Some(l)) => Some((b - a - s.cpu_s - l).max(0.0)),
            _ => None,
        };
        Measured {
            server,
            loadgen_cpu_s: loadgen,
            other_cpu_s: other,
        }
    }
}

/// Resource use over a measured phase.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub server: Option<Usage>,
    pub loadgen_cpu_s: Option<f64>,
    /// CPU seconds taken by every other process on the machine (the cores are shared).
    pub other_cpu_s: Option<f64>,
}

fn run_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..5)
        .map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char)
        .collect()
}

/// Runs `open(i)` for `i in 0..n` with at most `concurrency` at once, with a progress bar;
/// fails with the first error, naming the connection.
pub async fn open_many<T, F, Fut>(
    n: usize,
    concurrency: usize,
    label: &str,
    open: F,
) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let bar = progress::counter(n as u64, label);
    let mut out = Vec::with_capacity(n);
    let mut results = futures_util::stream::iter(0..n)
        .map(|i| {
            let fut = open(i);
            async move { (i, fut.await) }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((i, result)) = results.next().await {
        bar.inc(1);
        match result {
            Ok(v) => out.push(v),
            Err(e) => {
                bar.abandon();
                return Err(e.context(format!("{label}: connection {i}")));
            }
        }
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Waits until `done()` or until `progress()` has not moved for `stall`, polling every 20 ms;
/// returns whether `done()` became true.
pub async fn wait_until(
    mut done: impl FnMut() -> bool,
    mut progress: impl FnMut() -> u64,
    stall: Duration,
    limit: Duration,
) -> bool {
    let start = tokio::time::Instant::now();
    let mut last = progress();
    let mut last_change = start;
    loop {
        if done() {
            return true;
        }
        let now = tokio::time::Instant::now();
        let current = progress();
        if current != last {
            last = current;
            last_change = now;
        }
        if now - last_change >= stall || now - start >= limit {
            return done();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails unless the target speaks confab.
pub fn require_confab(ctx: &RunContext, scenario: &str) -> Result<()> {
    if ctx.kind() != ServerKind::Confab {
        bail!("the {scenario} scenario needs confab's channels and resume; the reference server only does fanout");
    }
    Ok(())
}

/// Raises this process's soft open-files limit to `want` (or the hard limit), for runs with
/// thousands of connections.
pub fn raise_nofile(want: u64) -> Result<u64> {
    rlimit::increase_nofile_limit(want).context("raising the open-files limit")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn open_many_reports_the_failing_index() {
        let err = open_many(10, 3, "test", |i| async move {
            if i == 7 {
                bail!("boom")
            }
            Ok(i)
        })
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("connection 7: boom"), "{err:#}");
        let mut ok = open_many(5, 2, "test", |i| async move { Ok(i) })
            .await
            .unwrap();
        ok.sort();
        assert_eq!(ok, [0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn wait_until_gives_up_on_a_stall() {
        let counter = AtomicU64::new(0);
        let done = wait_until(
            || false,
            || counter.load(Ordering::Relaxed),
            Duration::from_millis(100),
            Duration::from_secs(5),
        )
        .await;
        assert!(!done);
        let done = wait_until(
            || counter.fetch_add(1, Ordering::Relaxed) > 5,
            || 0,
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .await;
        assert!(done);
    }

    #[test]
    fn run_ids_are_valid_id_prefixes() {
        let id = run_id();
        assert_eq!(id.len(), 5);
        assert!(confab_shared::UserId::new(&format!("{id}s12")).is_ok());
    }
}
