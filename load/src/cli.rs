//! The command line: `reference`, `run <scenario>`, `compare` and `smoke`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::api::TokenSource;
use crate::pin::{self, Pin};
use crate::reference::{ReferenceConfig, DEFAULT_QUEUE};
use crate::report::{default_results_dir, Output, RunReport};
use crate::scenario::chat::{self, ChatParams};
use crate::scenario::fanout::FanoutParams;
use crate::scenario::idle::{self, IdleParams};
use crate::scenario::storm::{self, StormParams};
use crate::scenario::webhooks::{self, WebhookParams};
use crate::scenario::ClientOptions;
use crate::suite::{self, CompareParams, ScaleParams};
use crate::target::{DevOptions, ServerKind, TargetSpec};

#[derive(Debug, Parser)]
#[command(
    name = "confab-load",
    version,
    about = "Load generator and benchmark suite for confab, with a reference fanout server"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing env-filter syntax); logs go to stderr.
    #[arg(long, global = true, default_value = "warn", env = "CONFAB_LOAD_LOG")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the reference fanout server: every text frame to every client.
    Reference {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// Frames a client may fall behind before it is disconnected (close 4008).
        #[arg(long, default_value_t = DEFAULT_QUEUE)]
        queue: usize,
    },
    /// Run one scenario (each list option runs every combination).
    Run {
        #[command(subcommand)]
        scenario: Scenario,
    },
    /// Fanout against the reference server and confab back to back; prints confab/reference
    /// ratios, writes JSON, Markdown and a p99-against-rate PNG.
    Compare(CompareArgs),
    /// The chat mix through a local cluster (two gateways, a cell, their Redis servers) while
    /// a gateway, the cell, the cell's Redis and the directory Redis are killed with SIGKILL in
    /// turn and restarted; exits non-zero unless every acked message reached every member
    /// exactly once, in seq order.
    Chaos(ChaosArgs),
    /// A short run of each scenario against `confab dev` (CI); exits non-zero if any scenario
    /// fails to run or loses, duplicates or reorders a message.
    Smoke {
        /// The confab binary.
        #[arg(long)]
        confab: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// CPU per delivered event at the same deliveries/s from few to many connections (channels
    /// of --channel-size subscribers), a fresh `confab dev` per run; prints each point's ratio
    /// to the smallest.
    Scale(ScaleArgs),
    /// Measures unit costs (RSS per connection, CPU per event, Redis commands, bytes and CPU
    /// per event, per presence change and per session-second, link bytes per event) on a
    /// local distributed deployment and projects them to 1M and 10M users: the inputs of
    /// docs/capacity.md (written to OUT/capacity.md and OUT/capacity.json).
    Capacity(CapacityArgs),
    /// A live workspace move under traffic through a local deployment (two cells, a gateway,
    /// their Redis servers): the pause the moving workspace sees, the move's total time, and
    /// the p99 of a workspace beside it before and during the move.
    Move(MoveArgs),
}

/// `--pin[=SERVER:CLIENT]`: servers on SERVER's CPUs, this process on CLIENT's (default 0:1).
#[derive(Debug, Clone, Args)]
struct PinArgs {
    /// Pin the server started here to SERVER's CPUs and the load generator's threads to
    /// CLIENT's (CPU lists as taskset writes them: 0, 0-1, 0,2). Alone: 0:1.
    #[arg(long, value_name = "SERVER:CLIENT", num_args = 0..=1, default_missing_value = "0:1")]
    pin: Option<Pin>,
}

#[derive(Debug, Args)]
struct ScaleArgs {
    /// The confab binary, started as `confab dev` for each run.
    #[arg(long)]
    confab: PathBuf,
    /// Subscriber connections per point.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,5000,10000,15000"
    )]
    connections: Vec<usize>,
    /// Subscribers per channel.
    #[arg(long, default_value_t = 1000)]
    channel_size: usize,
    /// Offered deliveries per second, each a curve; 0 is max rate.
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    deliveries: Vec<f64>,
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Runs per point.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    #[command(flatten)]
    pin: PinArgs,
    #[arg(long, default_value_t = 1_000_000)]
    client_rate: u32,
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Also run the reference server at every point (one stream for all subscribers, the same
    /// deliveries/s), alternating with confab: the machine's own growth with connections.
    #[arg(long)]
    reference: bool,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CapacityArgs {
    /// The confab binary (a release build for figures worth quoting).
    #[arg(long)]
    confab: PathBuf,
    #[arg(long, default_value_t = 2000)]
    sessions: usize,
    /// Members of the one channel of the events phase (at most 1,000).
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// Members that post, in turn (each stays under the 20 frames/s client rate).
    #[arg(long, default_value_t = 10)]
    senders: usize,
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Messages per second of the events phase.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of the idle phase (presence refreshes run every 10 s).
    #[arg(long, default_value_t = 30.0)]
    idle_s: f64,
    /// Profile: regions, and messages per user per hour.
    #[arg(long, default_value_t = 3.0)]
    regions: f64,
    #[arg(long, default_value_t = 12.0)]
    messages_per_user_per_hour: f64,
    /// Profile: online sessions that receive each message.
    #[arg(long, default_value_t = 20.0)]
    fanout: f64,
    #[arg(long, default_value_t = 1.0)]
    reconnects_per_user_per_hour: f64,
    #[arg(long, default_value_t = 16.0)]
    host_cores: f64,
    #[arg(long, default_value = "target/capacity")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct MoveArgs {
    /// The confab binary.
    #[arg(long)]
    confab: PathBuf,
    /// Connected clients, half in each workspace.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Channels per workspace.
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Messages in the moving workspace before the run.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Messages per second sent in each workspace.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of traffic before the move, and after it.
    #[arg(long, default_value_t = 10.0)]
    before_s: f64,
    #[arg(long, default_value_t = 5.0)]
    after_s: f64,
    /// Directory for the deployment's data and logs, and move.json.
    #[arg(long, default_value = "target/move-bench")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct ChaosArgs {
    /// The confab binary.
    #[arg(long)]
    confab: PathBuf,
    /// Seconds of traffic, during which the kills happen.
    #[arg(long, default_value_t = 600.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 12)]
    users: usize,
    #[arg(long, default_value_t = 6)]
    channels: usize,
    /// Members per channel.
    #[arg(long, default_value_t = 4)]
    members: usize,
    /// Mean milliseconds between two sends of one client.
    #[arg(long, default_value_t = 500)]
    send_interval_ms: u64,
    /// Seconds between two kills.
    #[arg(long, default_value_t = 20.0)]
    kill_every_s: f64,
    /// Seconds a killed process stays down.
    #[arg(long, default_value_t = 3.0)]
    down_s: f64,
    /// Mean seconds a client keeps a connection before dropping it (no close frame) and
    /// resuming, so resumes also happen during outages; 0: never.
    #[arg(long, default_value_t = 20.0)]
    churn_s: f64,
    /// Directory for the processes' data and logs, the clients' logs and report.json.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// One channel, S subscribers.
    Fanout {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        fanout: FanoutArgs,
    },
    /// Many small channels at a human pace; highest rate with p99 under a bound.
    Chat {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        chat: ChatArgs,
    },
    /// Idle connections and the server's RSS per connection.
    Idle {
        #[command(flatten)]
        target: TargetArgs,
        /// Connection counts, one run each.
        #[arg(long, value_delimiter = ',', default_value = "5000")]
        connections: Vec<usize>,
        /// Seconds the connections are held before the RSS reading.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
    },
    /// Drop every connection at once; time until all resumed, nothing lost.
    Storm {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        channels: usize,
        /// Total publish rate through the storm, messages/s.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seconds allowed for everyone to resume.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Fanout through several gateways (give each with --target) of one distributed
    /// deployment.
    Distributed {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        fanout: FanoutArgs,
    },
    /// Bots in busy channels with local webhook receivers answering at once: deliveries/s,
    /// delivery latency, and the fanout p99 at half of max rate with and without them.
    Webhooks {
        #[command(flatten)]
        target: TargetArgs,
        /// Bot users, one webhook each.
        #[arg(long, default_value_t = 10)]
        bots: usize,
        /// Busy channels, each with every bot as a member.
        #[arg(long, default_value_t = 10)]
        channels: usize,
        /// Messages/s posted into the busy channels (each one is a delivery per bot).
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// HTTP posts in flight at once.
        #[arg(long, default_value_t = 16)]
        posters: usize,
        /// Subscribers of the fanout that measures the chat path.
        #[arg(long, default_value_t = 200)]
        subscribers: usize,
        /// Seconds of each fanout run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
}

#[derive(Debug, Clone, Args)]
struct TargetArgs {
    /// A running server's base URL (http://host:port); repeat for several gateways.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// What the --target servers are.
    #[arg(long, value_enum, default_value = "confab")]
    target_kind: ServerKind,
    /// PIDs of the --target servers, to read their CPU and RSS from /proc.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Start `PATH dev --listen 127.0.0.1:0` afresh for each run.
    #[arg(long, value_name = "PATH")]
    spawn_dev: Option<PathBuf>,
    /// Start the reference server (this binary's `reference`) afresh for each run.
    #[arg(long)]
    spawn_reference: bool,
    /// Run the reference server inside this process (no server CPU/RSS figures).
    #[arg(long)]
    in_process_reference: bool,
    /// The workspace of the client users.
    #[arg(long, default_value = "demo")]
    workspace: String,
    /// Sign client tokens with this HS256 secret.
    #[arg(long, default_value = "dev-secret")]
    jwt_secret: String,
    /// Mint client tokens through POST /admin/v1/tokens with this admin token instead.
    #[arg(long)]
    admin_token: Option<String>,
    /// --client-rate of a spawned confab dev (frames/s per connection).
    #[arg(long, default_value_t = 1_000_000)]
    client_rate: u32,
    /// --queue-events of a spawned confab dev, and the reference server's queue.
    #[arg(long, default_value_t = DEFAULT_QUEUE)]
    queue_events: usize,
    /// Connections opened at once during setup.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Connections to confab ask for batched frames (`/v1/ws?batch=1`).
    #[arg(long)]
    batch: bool,
    #[command(flatten)]
    pin: PinArgs,
    /// Connections to confab negotiate permessage-deflate.
    #[arg(long)]
    deflate: bool,
    /// Results directory (default: load/results of the source tree).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl TargetArgs {
    fn spec(&self) -> Result<TargetSpec> {
        let chosen = [
            !self.targets.is_empty(),
            self.spawn_dev.is_some(),
            self.spawn_reference,
            self.in_process_reference,
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if chosen != 1 {
            bail!("give exactly one of --target URL, --spawn-dev PATH, --spawn-reference, --in-process-reference");
        }
        let reference = ReferenceConfig {
            queue: self.queue_events,
        };
        let cpus = self.pin.pin.as_ref().map(|p| p.server.clone());
        if cpus.is_some() && (self.in_process_reference || !self.targets.is_empty()) {
            eprintln!("--pin: only this process is pinned; servers it does not start run where they were started");
        }
        Ok(if let Some(binary) = &self.spawn_dev {
            TargetSpec::SpawnDev {
                binary: binary.clone(),
                options: DevOptions {
                    client_rate: self.client_rate,
                    queue_events: self.queue_events,
                    cpus,
                    ..DevOptions::default()
                },
            }
        } else if self.spawn_reference {
            TargetSpec::SpawnReference {
                config: reference,
                cpus,
            }
        } else if self.in_process_reference {
            TargetSpec::InProcessReference(reference)
        } else {
            TargetSpec::External {
                kind: self.target_kind,
                bases: self.targets.clone(),
                pids: self.server_pids.clone(),
            }
        })
    }

    fn client(&self) -> ClientOptions {
        ClientOptions {
            workspace: self.workspace.clone(),
            tokens: match &self.admin_token {
                Some(admin_token) => TokenSource::Admin {
                    admin_token: admin_token.clone(),
                },
                None => TokenSource::Jwt {
                    secret: self.jwt_secret.clone(),
                },
            },
            connect_concurrency: self.connect_concurrency,
            batch: self.batch,
            deflate: self.deflate,
        }
    }

    fn output(&self) -> Result<Output> {
        Output::new(&self.out.clone().unwrap_or_else(default_results_dir))
    }
}

#[derive(Debug, Clone, Args)]
struct FanoutArgs {
    /// Subscriber counts.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    subscribers: Vec<usize>,
    /// Total publish rates in messages/s; 0 means max rate.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    rates: Vec<f64>,
    /// Text sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    sizes: Vec<usize>,
    /// Publishers (at least one per channel).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Channels the subscribers and publishers are spread over (confab only).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Max rate: messages in flight per subscriber.
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Pad texts with words (compressible like chat) instead of one repeated letter.
    #[arg(long)]
    words: bool,
}

impl FanoutArgs {
    fn cases(&self) -> Vec<FanoutParams> {
        let mut out = Vec::new();
        for &subscribers in &self.subscribers {
            for &size in &self.sizes {
                for &rate in &self.rates {
                    out.push(FanoutParams {
                        subscribers,
                        publishers: self.publishers.max(1),
                        channels: self.channels.max(1),
                        rate: (rate > 0.0).then_some(rate),
                        size,
                        duration: secs(self.duration),
                        window: self.window,
                        words: self.words,
                        ..FanoutParams::default()
                    });
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Args)]
struct ChatArgs {
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    #[arg(long, default_value_t = 1_000)]
    channels: usize,
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// No user in a second channel.
    #[arg(long)]
    no_guests: bool,
    /// First total rate of the search, messages/s.
    #[arg(long, default_value_t = 500.0)]
    start_rate: f64,
    /// Run exactly these rates instead of searching.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 10.0)]
    step: f64,
    #[arg(long, default_value_t = 50.0)]
    p99_limit_ms: f64,
    #[arg(long, default_value_t = 8)]
    max_steps: usize,
    /// Milliseconds between a user's typing and its send.
    #[arg(long, default_value_t = 300)]
    typing_ms: u64,
    #[arg(long, default_value_t = 100)]
    size: usize,
}

#[derive(Debug, Clone, Args)]
struct CompareArgs {
    /// The confab binary, started as `confab dev` for each confab run.
    #[arg(long)]
    confab: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    subscribers: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Subscribers of the p99-against-rate sweep; 0 skips the sweep.
    #[arg(long, default_value_t = 1000)]
    sweep_subscribers: usize,
    #[arg(long, default_value_t = 100)]
    sweep_size: usize,
    /// Sweep rates as fractions of the reference server's max rate.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5,0.75,1.0")]
    sweep_fractions: Vec<f64>,
    /// Runs per server and case, alternating; ratios use the medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also run both servers at these fixed deliveries/s (messages/s × subscribers).
    #[arg(long, value_delimiter = ',')]
    fixed_deliveries: Vec<f64>,
    /// Skip the runs at half of confab's max rate.
    #[arg(long)]
    no_half: bool,
    /// Run again (up to 3 times) a run in which other processes took more than this many CPU
    /// seconds; the disturbed runs stay in the JSON, marked `disturbed`.
    #[arg(long, value_name = "SECONDS")]
    max_other_cpu: Option<f64>,
    #[command(flatten)]
    pin: PinArgs,
    #[arg(long, default_value_t = 1_000_000)]
    client_rate: u32,
    #[arg(long, default_value_t = DEFAULT_QUEUE)]
    queue_events: usize,
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Also run every case against confab with clients asking for batched frames
    /// (`?batch=1`), alternating with the other runs, with its own ratios to the reference.
    #[arg(long)]
    batch: bool,
    /// Also run every case against confab with clients negotiating permessage-deflate, the
    /// same way.
    #[arg(long)]
    deflate: bool,
    /// Pad texts with words (compressible like chat) instead of one repeated letter.
    #[arg(long)]
    words: bool,
    /// Also run every case against NATS's WebSocket server, started from this `nats-server`
    /// binary (Debian's package: /usr/sbin/nats-server), pinned like the others, with its own
    /// ratios to the reference.
    #[arg(long, value_name = "NATS_SERVER")]
    nats: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.1))
}

/// The command line as typed, for the results files.
fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

impl Command {
    /// The `--pin` of the command, if it takes one and was given it.
    fn pin(&self) -> Option<&Pin> {
        match self {
            Command::Compare(args) => args.pin.pin.as_ref(),
            Command::Scale(args) => args.pin.pin.as_ref(),
            Command::Run { scenario } => scenario.target().pin.pin.as_ref(),
            _ => None,
        }
    }
}

impl Scenario {
    fn target(&self) -> &TargetArgs {
        match self {
            Scenario::Fanout { target, .. }
            | Scenario::Chat { target, .. }
            | Scenario::Idle { target, .. }
            | Scenario::Storm { target, .. }
            | Scenario::Distributed { target, .. }
            | Scenario::Webhooks { target, .. } => target,
        }
    }
}

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> Result<std::process::ExitCode> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let pinned = cli.command.pin().cloned();
    if let Some(pin) = &pinned {
        // Before the runtime exists, so that every thread it starts inherits the pinning; each
        // also pins itself when it starts, whichever thread started it.
        pin.check_available()?;
        pin::pin_current_thread(&pin.client)?;
        let client = pin.client.clone();
        builder
            .worker_threads(pin.client.len())
            .on_thread_start(move || {
                if let Err(e) = pin::pin_current_thread(&client) {
                    eprintln!("confab-load: pinning a runtime thread: {e:#}");
                }
            });
    }
    let runtime = builder.build().context("starting the tokio runtime")?;
    if let Some(pin) = &pinned {
        let threads = pin::verify_process(std::process::id(), &pin.client)?;
        println!(
            "pinned: servers started here on CPUs {}, this load generator on CPUs {} ({threads} threads)",
            pin.server, pin.client
        );
    }
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match command {
        Command::Reference { listen, queue } => {
            crate::scenario::raise_nofile(u64::MAX)?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr()?;
            // The one line the runner waits for; flushed at once since stdout is a pipe.
            println!("reference listening on http://{addr}");
            use std::io::Write as _;
            std::io::stdout().flush()?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let on_signal = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                on_signal.cancel();
            });
            crate::reference::serve(listener, ReferenceConfig { queue }, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { scenario } => run_scenario(scenario).await,
        Command::Compare(args) => {
            crate::scenario::raise_nofile(u64::MAX)?;
            let out = Output::new(&args.out.clone().unwrap_or_else(default_results_dir))?;
            let params = CompareParams {
                confab: args.confab.clone(),
                dev: DevOptions {
                    client_rate: args.client_rate,
                    queue_events: args.queue_events,
                    ..DevOptions::default()
                },
                reference: ReferenceConfig {
                    queue: args.queue_events,
                },
                subscribers: args.subscribers.clone(),
                sizes: args.sizes.clone(),
                publishers: args.publishers.max(1),
                duration: secs(args.duration),
                window: args.window,
                sweep_subscribers: (args.sweep_subscribers > 0).then_some(args.sweep_subscribers),
                sweep_size: args.sweep_size,
                sweep_fractions: args.sweep_fractions.clone(),
                repeat: args.repeat,
                batch: args.batch,
                fixed_deliveries: args.fixed_deliveries.clone(),
                half: !args.no_half,
                pin: args.pin.pin.clone(),
                max_other_cpu_s: args.max_other_cpu,
                deflate: args.deflate,
                words: args.words,
                nats: args.nats.clone(),
            };
            let client = ClientOptions {
                connect_concurrency: args.connect_concurrency,
                ..ClientOptions::default()
            };
            let comparison = suite::compare(&params, &client, &out).await?;
            suite::write_results(
                &out,
                "compare",
                &command_line(),
                &comparison.reports,
                &comparison.ratios,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scale(args) => {
            crate::scenario::raise_nofile(u64::MAX)?;
            let out = Output::new(&args.out.clone().unwrap_or_else(default_results_dir))?;
            let params = ScaleParams {
                confab: args.confab.clone(),
                dev: DevOptions {
                    client_rate: args.client_rate,
                    cpus: args.pin.pin.as_ref().map(|p| p.server.clone()),
                    ..DevOptions::default()
                },
                connections: args.connections.clone(),
                channel_size: args.channel_size.max(1),
                deliveries: args.deliveries.clone(),
                size: args.size,
                duration: secs(args.duration),
                window: args.window,
                repeat: args.repeat.max(1),
                reference: args.reference.then(ReferenceConfig::default),
            };
            let client = ClientOptions {
                connect_concurrency: args.connect_concurrency,
                ..ClientOptions::default()
            };
            let (reports, points) = suite::scale(&params, &client, &out).await?;
            suite::write_results_with(
                &out,
                "scale",
                &command_line(),
                &reports,
                &[],
                &suite::scale_table(&points),
            )?;
            out.json("scale-points", &points)?;
            let failed = reports.iter().filter(|r| !r.failures.is_empty()).count();
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("{failed} run(s) failed their delivery checks");
                ExitCode::FAILURE
            })
        }
        Command::Chaos(args) => {
            crate::scenario::raise_nofile(65_536)?;
            let report = crate::chaos::run(crate::chaos::ChaosParams {
                confab: args.confab,
                duration: secs(args.duration_s),
                users: args.users,
                channels: args.channels,
                members: args.members,
                send_interval: Duration::from_millis(args.send_interval_ms.max(10)),
                kill_every: secs(args.kill_every_s),
                down: secs(args.down_s),
                churn: (args.churn_s > 0.0).then(|| secs(args.churn_s)),
                out: args.out,
            })
            .await?;
            println!("{}", report.summary());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Capacity(args) => {
            crate::scenario::raise_nofile(65_536)?;
            let profile = crate::capacity::Profile {
                steps: vec![1e6, 1e7],
                regions: args.regions,
                messages_per_user_per_hour: args.messages_per_user_per_hour,
                fanout: args.fanout,
                reconnects_per_user_per_hour: args.reconnects_per_user_per_hour,
                gateway_max_connections: confab_shared::limits::MAX_CONNECTIONS as f64,
                host_cores: args.host_cores,
                cpu_target: 0.5,
                redis_core_target: 0.5,
            };
            let params = crate::capacity::CapacityParams {
                confab: args.confab,
                sessions: args.sessions,
                members: args.members.min(1000),
                senders: args.senders.max(1),
                messages: args.messages,
                rate: args.rate,
                idle: secs(args.idle_s),
                out: args.out.clone(),
            };
            let report = crate::capacity::run(params, &profile).await?;
            let markdown = report.markdown(&profile);
            std::fs::create_dir_all(&args.out)?;
            std::fs::write(args.out.join("capacity.md"), &markdown)?;
            let json = serde_json::json!({"command": command_line(), "profile": profile, "report": report});
            std::fs::write(
                args.out.join("capacity.json"),
                serde_json::to_string_pretty(&json)?,
            )?;
            println!("{markdown}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Move(args) => {
            crate::scenario::raise_nofile(u64::MAX)?;
            let report = crate::moving::run(crate::moving::MoveBench {
                confab: args.confab,
                out: args.out,
                clients: args.clients,
                channels: args.channels,
                messages: args.messages,
                rate: args.rate,
                before_s: args.before_s,
                after_s: args.after_s,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.undelivered == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Smoke { confab, out } => {
            crate::scenario::raise_nofile(u64::MAX)?;
            let out = Output::new(&out.unwrap_or_else(default_results_dir))?;
            let outcomes = suite::smoke(&confab, &out).await?;
            let reports: Vec<RunReport> = outcomes.iter().flat_map(|o| o.reports.clone()).collect();
            suite::write_results(&out, "smoke", &command_line(), &reports, &[])?;
            let failed: Vec<&str> = outcomes
                .iter()
                .filter(|o| !o.ok())
                .map(|o| o.name.as_str())
                .collect();
            if failed.is_empty() {
                println!("smoke: all {} scenarios ok", outcomes.len());
                Ok(ExitCode::SUCCESS)
            } else {
                println!("smoke: FAILED: {}", failed.join(", "));
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

async fn run_scenario(scenario: Scenario) -> Result<std::process::ExitCode> {
    let (name, out, reports) = match scenario {
        Scenario::Fanout { target, fanout } => {
            let spec = target.spec()?;
            let out = target.output()?;
            let mut reports = Vec::new();
            for case in fanout.cases() {
                crate::scenario::raise_nofile(case.subscribers as u64 + 512)?;
                reports.push(
                    suite::fanout_once(&spec, &target.client(), &out, &case, "fanout").await?,
                );
            }
            ("fanout", out, reports)
        }
        Scenario::Distributed { target, fanout } => {
            if target.targets.len() < 2 {
                bail!("the distributed scenario takes two or more --target URLs (the gateways of one deployment)");
            }
            let spec = target.spec()?;
            for base in &target.targets {
                crate::api::check_reachable(base).await.context(
                    "the distributed scenario needs running gateways and a cell (confab gateway / confab cell with Redis)",
                )?;
            }
            let out = target.output()?;
            let mut reports = Vec::new();
            for case in fanout.cases() {
                crate::scenario::raise_nofile(case.subscribers as u64 + 512)?;
                reports.push(
                    suite::fanout_once(&spec, &target.client(), &out, &case, "distributed").await?,
                );
            }
            ("distributed", out, reports)
        }
        Scenario::Chat { target, chat: args } => {
            let spec = target.spec()?;
            let out = target.output()?;
            let params = ChatParams {
                users: args.users,
                channels: args.channels,
                members: args.members,
                guests: !args.no_guests,
                start_rate: args.start_rate,
                rates: args.rates.clone(),
                step: secs(args.step),
                p99_limit_ms: args.p99_limit_ms,
                max_steps: args.max_steps,
                typing: Duration::from_millis(args.typing_ms),
                size: args.size,
            };
            let reports = suite::with_target(&spec, &target.client(), &out, "chat", async |ctx| {
                chat::run(ctx, &params).await
            })
            .await?;
            for r in &reports {
                println!("{}", r.one_line());
            }
            ("chat", out, reports)
        }
        Scenario::Idle {
            target,
            connections,
            hold,
        } => {
            let spec = target.spec()?;
            let out = target.output()?;
            let mut reports = Vec::new();
            for n in connections {
                idle::check_limits(n)?;
                let params = IdleParams {
                    connections: n,
                    hold: secs(hold),
                };
                let report =
                    suite::with_target(&spec, &target.client(), &out, "idle", async |ctx| {
                        idle::run(ctx, &params).await
                    })
                    .await?;
                println!("{}", report.one_line());
                reports.push(report);
            }
            ("idle", out, reports)
        }
        Scenario::Webhooks {
            target,
            bots,
            channels,
            rate,
            posters,
            subscribers,
            duration,
        } => {
            let spec = target.spec()?;
            let out = target.output()?;
            let params = WebhookParams {
                bots,
                channels,
                rate,
                posters,
                fanout: FanoutParams {
                    subscribers,
                    duration: secs(duration),
                    ..FanoutParams::default()
                },
                ..WebhookParams::default()
            };
            crate::scenario::raise_nofile(subscribers as u64 + 512)?;
            let report =
                suite::with_target(&spec, &target.client(), &out, "webhooks", async |ctx| {
                    webhooks::run(ctx, &params).await
                })
                .await?;
            println!("{}", report.one_line());
            ("webhooks", out, vec![report])
        }
        Scenario::Storm {
            target,
            connections,
            channels,
            rate,
            timeout,
        } => {
            let spec = target.spec()?;
            let out = target.output()?;
            let params = StormParams {
                connections,
                channels,
                rate,
                timeout: secs(timeout),
                ..StormParams::default()
            };
            let report = suite::with_target(&spec, &target.client(), &out, "storm", async |ctx| {
                storm::run(ctx, &params).await
            })
            .await?;
            println!("{}", report.one_line());
            ("storm", out, vec![report])
        }
    };
    suite::write_results(&out, name, &command_line(), &reports, &[])?;
    let failed = reports.iter().filter(|r| !r.failures.is_empty()).count();
    Ok(if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("{failed} run(s) failed their delivery checks");
        std::process::ExitCode::FAILURE
    })
}
