//! Multi-run suites: the fanout matrix of `run fanout`, `compare` (the same fanout runs against
//! the reference server and confab, back to back, and their ratios, plus a rate sweep for the
//! p99 plot), and `smoke` (every scenario, small and short, for CI).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::plot::{self, Series};
use crate::reference::ReferenceConfig;
use crate::report::{markdown_table, ratio_table, Output, Ratio, RunReport};
use crate::scenario::chat::{self, ChatParams};
use crate::scenario::fanout::{self, FanoutParams};
use crate::scenario::idle::{self, IdleParams};
use crate::scenario::storm::{self, StormParams};
use crate::scenario::webhooks::{self, WebhookParams};
use crate::scenario::{ClientOptions, RunContext};
use crate::target::{DevOptions, ServerKind, Target, TargetSpec};

/// What the machine is, for the record.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            mem_total_kib: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), {:.1} GiB RAM, Linux {}",
            self.cpus,
            self.cpu_model,
            self.mem_total_kib as f64 / 1024.0 / 1024.0,
            self.kernel
        )
    }
}

/// Everything a results file holds.
#[derive(Debug, Serialize)]
pub struct Results<'a> {
    pub command: String,
    pub machine: Machine,
    pub reports: &'a [RunReport],
    pub ratios: &'a [Ratio],
}

/// Opens a fresh target from `spec`, runs `body` against it, and stops it.
pub async fn with_target<T, F>(
    spec: &TargetSpec,
    client: &ClientOptions,
    out: &Output,
    name: &str,
    body: F,
) -> Result<T>
where
    F: for<'c> AsyncFnOnce(&'c RunContext) -> Result<T>,
{
    let target = spec.open(Some(&out.dir), &out.run_stem(name)).await?;
    // On error the target is dropped, and a server started here is killed with it.
    let ctx = RunContext::new(target, client).await?;
    let result = body(&ctx).await;
    let mut target = ctx.target;
    let exited = target.exited();
    target.stop().await;
    match (exited, result) {
        (Some(status), Err(e)) => {
            Err(e.context(format!("the server exited during the run ({status})")))
        }
        (Some(status), Ok(_)) => Err(anyhow::anyhow!(
            "the server exited during the run ({status})"
        )),
        (None, result) => result,
    }
}

/// Runs one fanout case against a fresh target.
pub async fn fanout_once(
    spec: &TargetSpec,
    client: &ClientOptions,
    out: &Output,
    params: &FanoutParams,
    scenario: &str,
) -> Result<RunReport> {
    let name = format!("{scenario}-{}", spec.kind().as_str());
    let report = with_target(spec, client, out, &name, async |ctx| {
        fanout::run(ctx, params, scenario).await
    })
    .await
    .with_context(|| format!("{scenario} {} [{}]", spec.kind().as_str(), params.case()))?;
    println!("{}", report.one_line());
    Ok(report)
}

/// Writes reports as JSON and Markdown; prints the table and the paths.
pub fn write_results(
    out: &Output,
    name: &str,
    command: &str,
    reports: &[RunReport],
    ratios: &[Ratio],
) -> Result<()> {
    let results = Results {
        command: command.to_string(),
        machine: Machine::read(),
        reports,
        ratios,
    };
    let json = out.json(name, &results)?;
    let mut md = format!(
        "Command: `{command}`\n\nMachine: {}\n\n{}",
        results.machine.describe(),
        markdown_table(reports)
    );
    if !ratios.is_empty() {
        md.push('\n');
        md.push_str(&ratio_table(ratios));
    }
    let md_path = out.markdown(name, &md)?;
    println!("\n{md}");
    println!("results: {} and {}", json.display(), md_path.display());
    Ok(())
}

/// Parameters of `compare`.
#[derive(Debug, Clone)]
pub struct CompareParams {
    pub confab: PathBuf,
    pub dev: DevOptions,
    pub reference: ReferenceConfig,
    pub subscribers: Vec<usize>,
    pub sizes: Vec<usize>,
    pub publishers: usize,
    pub duration: Duration,
    pub window: u64,
    /// Subscribers of the rate sweep behind the plot (`None`: no sweep).
    pub sweep_subscribers: Option<usize>,
    pub sweep_size: usize,
    /// Offered rates of the sweep, as fractions of the reference server's max rate.
    pub sweep_fractions: Vec<f64>,
    /// Runs per server and case; ratios use the medians.
    pub repeat: usize,
    /// Also run confab with clients that ask for batched frames (`?batch=1`), as an arm of
    /// its own.
    pub batch: bool,
    /// Also run confab with clients that negotiate permessage-deflate, as an arm of its own.
    pub deflate: bool,
    /// Word texts ([`crate::payload::make_words_text`]).
    pub words: bool,
}

/// The outcome of `compare`.
#[derive(Debug)]
pub struct Comparison {
    pub reports: Vec<RunReport>,
    pub ratios: Vec<Ratio>,
    pub plot: Option<PathBuf>,
}

/// Fanout against the reference server and against confab, back to back, with the same
/// client and parameters: max rate for each, then both at half of confab's max rate.
pub async fn compare(
    p: &CompareParams,
    client: &ClientOptions,
    out: &Output,
) -> Result<Comparison> {
    let reference = TargetSpec::SpawnReference(p.reference);
    let confab = TargetSpec::SpawnDev {
        binary: p.confab.clone(),
        options: p.dev.clone(),
    };
    // The runs of each case alternate over the arms: the reference, confab, and confab again
    // with its clients asking for batched frames (`batch`) or compression (`deflate`).
    let batched = ClientOptions {
        batch: true,
        ..client.clone()
    };
    let deflated = ClientOptions {
        deflate: true,
        ..client.clone()
    };
    let mut arms = vec![(&reference, client), (&confab, client)];
    if p.batch {
        arms.push((&confab, &batched));
    }
    if p.deflate {
        arms.push((&confab, &deflated));
    }
    let mut reports = Vec::new();
    let mut ratios = Vec::new();
    let mut reference_max_rate = Vec::new();
    let repeat = p.repeat.max(1);
    for &subscribers in &p.subscribers {
        for &size in &p.sizes {
            crate::scenario::raise_nofile(subscribers as u64 + 512)?;
            let base = FanoutParams {
                subscribers,
                publishers: p.publishers,
                rate: None,
                size,
                duration: p.duration,
                window: p.window,
                words: p.words,
                ..FanoutParams::default()
            };
            // The arms alternate, so all see the same drift in what else the shared machine
            // is doing; each figure is the median of `repeat` runs.
            let max_runs = alternate(&arms, out, &base, repeat, &mut reports).await?;
            let max: Vec<RunReport> = max_runs
                .iter()
                .map(|runs| median_by(runs, |r| r.delivered_per_s))
                .collect();
            let half = max[1].published_per_s / 2.0;
            let mut at_half = None;
            if half >= 1.0 {
                let params = FanoutParams {
                    rate: Some(half.round()),
                    ..base.clone()
                };
                let half_runs = alternate(&arms, out, &params, repeat, &mut reports).await?;
                at_half = Some(
                    half_runs
                        .iter()
                        .map(|runs| median_by(runs, |r| r.latency.p99_ms))
                        .collect::<Vec<_>>(),
                );
            }
            for (arm, (_, arm_client)) in arms.iter().enumerate().skip(1) {
                let case = fanout::labelled(
                    format!("S={subscribers} {size}B"),
                    arm_client.batch,
                    arm_client.deflate,
                );
                let ratio = Ratio::of(
                    &case,
                    &max[arm],
                    &max[0],
                    at_half.as_ref().map(|h| (&h[arm], &h[0])),
                    repeat,
                );
                println!(
                    "ratio {case} (medians of {repeat}): delivered/s confab÷reference {:.2}, p99 at half confab max {}",
                    ratio.throughput,
                    ratio
                        .p99_at_same_rate
                        .map(|v| format!("{v:.2}"))
                        .unwrap_or_else(|| "n/a".into())
                );
                ratios.push(ratio);
            }
            reference_max_rate.push(((subscribers, size), max[0].published_per_s));
        }
    }

    let mut plot_path = None;
    if let Some(subscribers) = p.sweep_subscribers {
        let size = p.sweep_size;
        let base = FanoutParams {
            subscribers,
            publishers: p.publishers,
            rate: None,
            size,
            duration: p.duration,
            window: p.window,
            ..FanoutParams::default()
        };
        let max_rate = match reference_max_rate
            .iter()
            .find(|(k, _)| *k == (subscribers, size))
        {
            Some((_, rate)) => *rate,
            None => {
                let r = fanout_once(&reference, client, out, &base, "fanout").await?;
                let rate = r.published_per_s;
                reports.push(r);
                rate
            }
        };
        let mut series = vec![
            Series {
                label: "reference".into(),
                points: Vec::new(),
            },
            Series {
                label: "confab".into(),
                points: Vec::new(),
            },
        ];
        for &fraction in &p.sweep_fractions {
            let rate = (max_rate * fraction).round().max(1.0);
            let params = FanoutParams {
                rate: Some(rate),
                ..base.clone()
            };
            for (i, spec) in [&reference, &confab].into_iter().enumerate() {
                let report = fanout_once(spec, client, out, &params, "fanout-sweep").await?;
                series[i]
                    .points
                    .push((rate * subscribers as f64, report.latency.p99_ms.max(0.001)));
                reports.push(report);
            }
        }
        let path = out.path("compare-p99", "png");
        plot::p99_vs_rate(
            &path,
            &format!("fanout, {subscribers} subscribers, {size} B: p99 against offered rate"),
            &series,
        )?;
        println!("plot: {}", path.display());
        plot_path = Some(path);
    }
    Ok(Comparison {
        reports,
        ratios,
        plot: plot_path,
    })
}

/// Runs `params` `repeat` times against each arm (a server and the client options to reach
/// it with), alternating; every run goes into `all` (tagged with its repeat), and the runs of
/// each arm are returned, in the order of `arms`.
async fn alternate(
    arms: &[(&TargetSpec, &ClientOptions)],
    out: &Output,
    params: &FanoutParams,
    repeat: usize,
    all: &mut Vec<RunReport>,
) -> Result<Vec<Vec<RunReport>>> {
    let mut runs = vec![Vec::new(); arms.len()];
    for k in 0..repeat {
        for ((spec, client), runs) in arms.iter().zip(runs.iter_mut()) {
            let mut report = fanout_once(spec, client, out, params, "fanout").await?;
            report.extra.insert("repeat".into(), k as f64);
            all.push(report.clone());
            runs.push(report);
        }
    }
    Ok(runs)
}

/// The run with the median value of `key` (the lower middle for an even count).
pub fn median_by(runs: &[RunReport], key: impl Fn(&RunReport) -> f64) -> RunReport {
    let mut sorted: Vec<&RunReport> = runs.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[(sorted.len() - 1) / 2].clone()
}

/// One smoke scenario's outcome.
#[derive(Debug)]
pub struct SmokeOutcome {
    pub name: String,
    pub reports: Vec<RunReport>,
    pub error: Option<String>,
}

impl SmokeOutcome {
    /// Ran, and nothing was lost, duplicated or reordered, and no connection dropped.
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && !self.reports.is_empty()
            && self.reports.iter().all(|r| r.failures.is_empty())
    }
}

/// Runs one smoke scenario under the time limit and prints its outcome.
async fn smoke_step(
    name: &str,
    fut: impl std::future::Future<Output = Result<Vec<RunReport>>>,
) -> SmokeOutcome {
    let result = tokio::time::timeout(SMOKE_SCENARIO_LIMIT, fut).await;
    let (reports, error) = match result {
        Ok(Ok(reports)) => (reports, None),
        Ok(Err(e)) => (Vec::new(), Some(format!("{e:#}"))),
        Err(_) => (
            Vec::new(),
            Some(format!("did not finish within {SMOKE_SCENARIO_LIMIT:?}")),
        ),
    };
    let outcome = SmokeOutcome {
        name: name.to_string(),
        reports,
        error,
    };
    println!(
        "smoke {}: {}",
        outcome.name,
        if outcome.ok() { "ok" } else { "FAILED" }
    );
    for r in &outcome.reports {
        println!("  {}", r.one_line());
    }
    if let Some(e) = &outcome.error {
        println!("  error: {e}");
    }
    outcome
}

/// Longest any smoke scenario may take.
const SMOKE_SCENARIO_LIMIT: Duration = Duration::from_secs(120);

/// A short run of each scenario against fresh `confab dev` processes (and the reference server
/// for fanout), all on 127.0.0.1.
pub async fn smoke(confab: &Path, out: &Output) -> Result<Vec<SmokeOutcome>> {
    let client = ClientOptions {
        connect_concurrency: 32,
        ..ClientOptions::default()
    };
    let dev = TargetSpec::SpawnDev {
        binary: confab.to_path_buf(),
        options: DevOptions::default(),
    };
    let reference = TargetSpec::SpawnReference(ReferenceConfig::default());
    let fanout = FanoutParams {
        subscribers: 20,
        publishers: 2,
        rate: Some(200.0),
        size: 100,
        duration: Duration::from_secs(2),
        window: 16,
        words: false,
        drain: Duration::from_secs(3),
    };
    let mut outcomes = Vec::new();

    outcomes.push(
        smoke_step("fanout reference", async {
            Ok(vec![
                fanout_once(
                    &reference,
                    &client,
                    out,
                    &FanoutParams {
                        rate: None,
                        ..fanout.clone()
                    },
                    "fanout",
                )
                .await?,
            ])
        })
        .await,
    );
    outcomes.push(
        smoke_step("fanout confab", async {
            Ok(vec![
                fanout_once(&dev, &client, out, &fanout, "fanout").await?,
                fanout_once(
                    &dev,
                    &client,
                    out,
                    &FanoutParams {
                        rate: None,
                        ..fanout.clone()
                    },
                    "fanout",
                )
                .await?,
            ])
        })
        .await,
    );
    outcomes.push(
        smoke_step("chat", async {
            let params = ChatParams {
                users: 100,
                channels: 10,
                members: 10,
                rates: vec![50.0],
                step: Duration::from_secs(2),
                typing: Duration::from_millis(100),
                ..ChatParams::default()
            };
            with_target(&dev, &client, out, "chat", async |ctx| {
                chat::run(ctx, &params).await
            })
            .await
        })
        .await,
    );
    outcomes.push(
        smoke_step("idle", async {
            let params = IdleParams {
                connections: 200,
                hold: Duration::from_secs(1),
            };
            Ok(vec![
                with_target(&dev, &client, out, "idle", async |ctx| {
                    idle::run(ctx, &params).await
                })
                .await?,
            ])
        })
        .await,
    );
    outcomes.push(
        smoke_step("storm", async {
            let params = StormParams {
                connections: 200,
                channels: 10,
                rate: 50.0,
                before: Duration::from_secs(1),
                after: Duration::from_secs(1),
                timeout: Duration::from_secs(30),
                ..StormParams::default()
            };
            Ok(vec![
                with_target(&dev, &client, out, "storm", async |ctx| {
                    storm::run(ctx, &params).await
                })
                .await?,
            ])
        })
        .await,
    );
    outcomes.push(
        smoke_step("webhooks", async {
            let params = WebhookParams {
                bots: 3,
                channels: 2,
                rate: 50.0,
                posters: 4,
                fanout: FanoutParams {
                    subscribers: 20,
                    duration: Duration::from_secs(2),
                    ..fanout.clone()
                },
                drain: Duration::from_secs(15),
            };
            Ok(vec![
                with_target(&dev, &client, out, "webhooks", async |ctx| {
                    webhooks::run(ctx, &params).await
                })
                .await?,
            ])
        })
        .await,
    );
    outcomes.push(
        smoke_step(
            "distributed (runner path: two URLs of one dev server)",
            async {
                // Distributed mode needs gateways and a cell; until a smoke run can start them,
                // this exercises the multi-target runner against one dev server named twice.
                let server = dev
                    .open(Some(&out.dir), &out.run_stem("distributed"))
                    .await?;
                let twice = Target::external(
                    ServerKind::Confab,
                    vec![server.bases[0].clone(), server.bases[0].clone()],
                    server.pids.clone(),
                );
                let result = async {
                    let ctx = RunContext::new(twice, &client).await?;
                    fanout::run(&ctx, &fanout, "distributed").await
                }
                .await;
                server.stop().await;
                let report = result?;
                println!("{}", report.one_line());
                Ok(vec![report])
            },
        )
        .await,
    );
    Ok(outcomes)
}
