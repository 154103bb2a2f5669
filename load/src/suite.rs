//! Multi-run suites: the fanout matrix of `run fanout`, `compare` (the same fanout runs against
//! the reference server and confab, back to back, and their ratios, plus a rate sweep for the
//! p99 plot), and `smoke` (every scenario, small and short, for CI).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::pin::Pin;
use crate::plot::{self, Series};
use crate::reference::ReferenceConfig;
use crate::report::{fmt_num, markdown_table, ratio_table, FixedRatio, Output, Ratio, RunReport};
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
    /// The CPUs this load generator may run on (all of them unless `--pin`).
    pub loadgen_cpus: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            // Counted from /proc/cpuinfo: available_parallelism would count only the CPUs
            // this process is pinned to.
            cpus: cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count(),
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
            loadgen_cpus: crate::pin::current_thread_cores()
                .map(|c| c.to_string())
                .unwrap_or_default(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), {:.1} GiB RAM, Linux {}; load generator on CPUs {}",
            self.cpus,
            self.cpu_model,
            self.mem_total_kib as f64 / 1024.0 / 1024.0,
            self.kernel,
            self.loadgen_cpus
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
    write_results_with(out, name, command, reports, ratios, "")
}

/// [`write_results`] with more Markdown after the tables.
pub fn write_results_with(
    out: &Output,
    name: &str,
    command: &str,
    reports: &[RunReport],
    ratios: &[Ratio],
    more_markdown: &str,
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
    if !more_markdown.is_empty() {
        md.push('\n');
        md.push_str(more_markdown);
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
    /// Both servers also at these fixed delivery rates (deliveries/s = messages/s ×
    /// subscribers), each case.
    pub fixed_deliveries: Vec<f64>,
    /// Whether to run both at half of confab's max rate (the classic fixed-rate point).
    pub half: bool,
    /// Servers on `pin.server`; the load generator (already pinned by the caller) on
    /// `pin.client`.
    pub pin: Option<Pin>,
    /// Also run confab with clients that ask for batched frames (`?batch=1`), as a third arm.
    pub batch: bool,
    /// A run in which other processes took more than this many CPU seconds is disturbed:
    /// it is kept in the results, marked, and run again (at most [`DISTURBED_RETRIES`]
    /// times; the last attempt counts whatever it measured).
    pub max_other_cpu_s: Option<f64>,
    /// Also run confab with clients that negotiate permessage-deflate, as an arm of its own.
    pub deflate: bool,
    /// Word texts ([`crate::payload::make_words_text`]).
    pub words: bool,
    /// Also run NATS's WebSocket server (this `nats-server` binary), as an arm of its own.
    pub nats: Option<PathBuf>,
}

/// Most repeats of one disturbed run.
pub const DISTURBED_RETRIES: usize = 3;

/// Whether other processes took more CPU during `report`'s measured phase than `limit`.
pub fn disturbed(report: &RunReport, limit: Option<f64>) -> bool {
    match (limit, report.other_cpu_s) {
        (Some(limit), Some(other)) => other > limit,
        _ => false,
    }
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
    let cpus = p.pin.as_ref().map(|pin| pin.server.clone());
    let reference = TargetSpec::SpawnReference {
        config: p.reference,
        cpus: cpus.clone(),
    };
    let confab = TargetSpec::SpawnDev {
        binary: p.confab.clone(),
        options: DevOptions {
            cpus: cpus.clone(),
            ..p.dev.clone()
        },
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
    let nats = p.nats.as_ref().map(|binary| TargetSpec::SpawnNats {
        binary: binary.clone(),
        cpus: cpus.clone(),
    });
    let mut arms = vec![(&reference, client), (&confab, client)];
    if p.batch {
        arms.push((&confab, &batched));
    }
    if p.deflate {
        arms.push((&confab, &deflated));
    }
    if let Some(nats) = &nats {
        arms.push((nats, client));
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
            let max_runs =
                alternate(&arms, out, &base, repeat, p.max_other_cpu_s, &mut reports).await?;
            let max: Vec<RunReport> = max_runs
                .iter()
                .map(|runs| median_by(runs, |r| r.delivered_per_s))
                .collect();
            let half = max[1].published_per_s / 2.0;
            let mut at_half = None;
            if p.half && half >= 1.0 {
                let params = FanoutParams {
                    rate: Some(half.round()),
                    ..base.clone()
                };
                let runs =
                    alternate(&arms, out, &params, repeat, p.max_other_cpu_s, &mut reports).await?;
                at_half = Some(runs.iter().map(|r| median_by(r, p99)).collect::<Vec<_>>());
            }
            let mut at_fixed = Vec::new();
            for &deliveries in &p.fixed_deliveries {
                let params = FanoutParams {
                    rate: Some(base.rate_for_deliveries(deliveries)),
                    ..base.clone()
                };
                let runs =
                    alternate(&arms, out, &params, repeat, p.max_other_cpu_s, &mut reports).await?;
                at_fixed.push((deliveries, runs));
            }
            for (arm, (arm_spec, arm_client)) in arms.iter().enumerate().skip(1) {
                let mut case = fanout::labelled(
                    format!("S={subscribers} {size}B"),
                    arm_client.batch,
                    arm_client.deflate,
                );
                if arm_spec.kind() == ServerKind::Nats {
                    case.push_str(" nats");
                }
                let mut ratio = Ratio::of(
                    &case,
                    &max[arm],
                    &max[0],
                    at_half.as_ref().map(|h| (&h[arm], &h[0])),
                    repeat,
                );
                ratio.fixed = at_fixed
                    .iter()
                    .map(|(deliveries, runs)| {
                        let mut fixed = FixedRatio::of(
                            *deliveries,
                            &median_by(&runs[arm], p99),
                            &median_by(&runs[0], p99),
                        );
                        fixed.cpu_per_event = cpu_ratio(&runs[arm], &runs[0]);
                        fixed
                    })
                    .collect();
                ratio.cpu_per_event = cpu_ratio(&max_runs[arm], &max_runs[0]);
                for f in &ratio.fixed {
                    println!(
                        "ratio {case} at {} deliveries/s (medians of {repeat}): p99 {:.2} ms, reference {:.2} ms",
                        fmt_num(f.deliveries_per_s),
                        f.confab_p99_ms,
                        f.reference_p99_ms
                    );
                }
                println!(
                    "ratio {case} (medians of {repeat}): delivered/s ÷ reference {:.2}, p99 at half confab max {}",
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
/// each arm are returned, in the order of `arms`. A run disturbed by other processes (more
/// than `max_other_cpu_s`) is kept in `all`, marked, and run again.
async fn alternate(
    arms: &[(&TargetSpec, &ClientOptions)],
    out: &Output,
    params: &FanoutParams,
    repeat: usize,
    max_other_cpu_s: Option<f64>,
    all: &mut Vec<RunReport>,
) -> Result<Vec<Vec<RunReport>>> {
    let mut runs = vec![Vec::new(); arms.len()];
    for k in 0..repeat {
        for ((spec, client), runs) in arms.iter().zip(runs.iter_mut()) {
            let mut attempt = 0;
            let report = loop {
                let mut report = fanout_once(spec, client, out, params, "fanout").await?;
                report.extra.insert("repeat".into(), k as f64);
                attempt += 1;
                if attempt <= DISTURBED_RETRIES && disturbed(&report, max_other_cpu_s) {
                    println!(
                        "  disturbed (other processes {:.2} CPU s): running it again",
                        report.other_cpu_s.unwrap_or(0.0)
                    );
                    report.extra.insert("disturbed".into(), 1.0);
                    all.push(report);
                    continue;
                }
                break report;
            };
            all.push(report.clone());
            runs.push(report);
        }
    }
    Ok(runs)
}

/// The median of `key` over the runs that have it (the lower middle for an even count).
pub fn median_value(runs: &[RunReport], key: impl Fn(&RunReport) -> Option<f64>) -> Option<f64> {
    let mut values: Vec<f64> = runs.iter().filter_map(key).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[(values.len() - 1) / 2])
}

/// A run's p99 latency, the key of the fixed-rate medians.
fn p99(report: &RunReport) -> f64 {
    report.latency.p99_ms
}

/// confab's CPU per event over the reference's, each the median over its own runs, not taken
/// from the runs that are the median by throughput: on a shared machine the two vary apart.
fn cpu_ratio(confab: &[RunReport], reference: &[RunReport]) -> Option<f64> {
    match (
        median_value(confab, RunReport::cpu_s_per_million),
        median_value(reference, RunReport::cpu_s_per_million),
    ) {
        (Some(c), Some(r)) if r > 0.0 => Some(c / r),
        _ => None,
    }
}

/// The run with the median value of `key` (the lower middle for an even count).
pub fn median_by(runs: &[RunReport], key: impl Fn(&RunReport) -> f64) -> RunReport {
    let mut sorted: Vec<&RunReport> = runs.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[(sorted.len() - 1) / 2].clone()
}

/// Parameters of `scale`: the same deliveries per second at growing connection counts.
#[derive(Debug, Clone)]
pub struct ScaleParams {
    pub confab: PathBuf,
    pub dev: DevOptions,
    /// Subscriber connections per point (publishers, one per channel, come on top).
    pub connections: Vec<usize>,
    /// Subscribers per channel: N connections make ⌈N ÷ this⌉ channels.
    pub channel_size: usize,
    /// Offered deliveries per second; 0 is max rate.
    pub deliveries: Vec<f64>,
    pub size: usize,
    pub duration: Duration,
    pub window: u64,
    /// Runs per point; rounds alternate between ascending and descending order.
    pub repeat: usize,
    /// Also run the reference server at every point (one stream for every subscriber at the
    /// same deliveries/s), pinned like confab: the machine's own growth with connections,
    /// measured in the same run (kernel socket lookups, cache misses), for confab's to be
    /// read against.
    pub reference: Option<ReferenceConfig>,
}

impl ScaleParams {
    /// The fanout run of `connections` subscribers at `deliveries` per second (0: max).
    pub fn case(&self, connections: usize, deliveries: f64) -> FanoutParams {
        let channels = connections.div_ceil(self.channel_size.max(1)).max(1);
        let base = FanoutParams {
            subscribers: connections,
            channels,
            publishers: channels,
            rate: None,
            size: self.size,
            duration: self.duration,
            window: self.window,
            ..FanoutParams::default()
        };
        FanoutParams {
            rate: (deliveries > 0.0).then(|| base.rate_for_deliveries(deliveries)),
            ..base
        }
    }

    /// The run of `server` at `connections` subscribers and `deliveries` per second: confab's
    /// [`Self::case`], or the reference server's one stream (one publisher) at the same
    /// deliveries per second.
    pub fn case_for(
        &self,
        server: ServerKind,
        connections: usize,
        deliveries: f64,
    ) -> FanoutParams {
        let confab = self.case(connections, deliveries);
        if server == ServerKind::Confab {
            return confab;
        }
        let one = FanoutParams {
            channels: 1,
            publishers: 1,
            ..confab
        };
        FanoutParams {
            rate: (deliveries > 0.0).then(|| one.rate_for_deliveries(deliveries)),
            ..one
        }
    }

    /// The order of round `round`: ascending, then descending, and so on, so that drift in
    /// what else the machine does spreads over both ends of the curve.
    pub fn order(&self, round: usize) -> Vec<usize> {
        let mut order = self.connections.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        order
    }
}

/// One point of the scale curve (medians over its runs).
#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    pub server: ServerKind,
    /// Offered deliveries/s; `None` for max rate.
    pub deliveries_per_s: Option<f64>,
    pub connections: usize,
    pub channels: usize,
    pub runs: usize,
    pub delivered_per_s: f64,
    /// Server CPU µs per delivered event, the median run's.
    pub cpu_us_per_event: Option<f64>,
    /// `cpu_us_per_event` ÷ that of the same server's first (smallest) connection count.
    pub vs_first: Option<f64>,
    /// confab's `cpu_us_per_event` ÷ the reference server's at the same connections (when
    /// the run measured it).
    pub vs_reference: Option<f64>,
    pub p99_ms: f64,
    pub failed_runs: usize,
}

/// Builds the points of one delivery rate from its runs (in `p.connections` order): confab's,
/// then the reference server's when it ran, each relative to its own smallest point.
pub fn scale_points(
    p: &ScaleParams,
    deliveries: f64,
    runs: &[(usize, RunReport)],
) -> Vec<ScalePoint> {
    let mut points: Vec<ScalePoint> = Vec::new();
    for server in [ServerKind::Confab, ServerKind::Reference] {
        let mut first: Option<f64> = None;
        for &n in &p.connections {
            let mine: Vec<RunReport> = runs
                .iter()
                .filter(|(c, r)| *c == n && r.server == server)
                .map(|(_, r)| r.clone())
                .collect();
            if mine.is_empty() {
                continue;
            }
            let median = median_by(&mine, |r| r.cpu_s_per_million().unwrap_or(f64::NAN));
            let cpu = median.cpu_s_per_million();
            if first.is_none() {
                first = cpu;
            }
            points.push(ScalePoint {
                server,
                deliveries_per_s: (deliveries > 0.0).then_some(deliveries),
                connections: n,
                channels: p.case_for(server, n, deliveries).channel_count(),
                runs: mine.len(),
                delivered_per_s: median.delivered_per_s,
                cpu_us_per_event: cpu,
                vs_first: match (cpu, first) {
                    (Some(c), Some(f)) if f > 0.0 => Some(c / f),
                    _ => None,
                },
                vs_reference: None,
                p99_ms: median.latency.p99_ms,
                failed_runs: mine.iter().filter(|r| !r.failures.is_empty()).count(),
            });
        }
    }
    let reference: Vec<(usize, Option<f64>)> = points
        .iter()
        .filter(|pt| pt.server == ServerKind::Reference)
        .map(|pt| (pt.connections, pt.cpu_us_per_event))
        .collect();
    for pt in points
        .iter_mut()
        .filter(|pt| pt.server == ServerKind::Confab)
    {
        let at_n = reference.iter().find(|(n, _)| *n == pt.connections);
        pt.vs_reference = match (pt.cpu_us_per_event, at_n) {
            (Some(c), Some((_, Some(r)))) if *r > 0.0 => Some(c / r),
            _ => None,
        };
    }
    points
}

/// The Markdown table of a scale curve.
pub fn scale_table(points: &[ScalePoint]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "| server | offered deliveries/s | connections | channels | runs | delivered ev/s | server CPU µs per delivery | ÷ smallest N | ÷ reference at N | p99 ms | failed runs |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let opt = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "n/a".into())
    };
    for pt in points {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            pt.server.as_str(),
            pt.deliveries_per_s
                .map(fmt_num)
                .unwrap_or_else(|| "max".into()),
            fmt_num(pt.connections as f64),
            pt.channels,
            pt.runs,
            fmt_num(pt.delivered_per_s),
            opt(pt.cpu_us_per_event, 3),
            opt(pt.vs_first, 2),
            opt(pt.vs_reference, 2),
            pt.p99_ms,
            pt.failed_runs
        );
    }
    out
}

/// The scale curve: fresh `confab dev` per run, the same deliveries/s spread over channels of
/// `channel_size` subscribers, from the smallest connection count to the largest.
pub async fn scale(
    p: &ScaleParams,
    client: &ClientOptions,
    out: &Output,
) -> Result<(Vec<RunReport>, Vec<ScalePoint>)> {
    let confab = TargetSpec::SpawnDev {
        binary: p.confab.clone(),
        options: p.dev.clone(),
    };
    let reference = p.reference.map(|config| TargetSpec::SpawnReference {
        config,
        cpus: p.dev.cpus.clone(),
    });
    let servers: Vec<&TargetSpec> = std::iter::once(&confab).chain(&reference).collect();
    let mut reports = Vec::new();
    let mut points = Vec::new();
    for &deliveries in &p.deliveries {
        let mut runs = Vec::new();
        for round in 0..p.repeat.max(1) {
            for n in p.order(round) {
                // At each point the servers alternate, so both see the same drift.
                for spec in &servers {
                    let params = p.case_for(spec.kind(), n, deliveries);
                    crate::scenario::raise_nofile((n + params.publisher_count()) as u64 + 512)?;
                    let mut report = fanout_once(spec, client, out, &params, "scale").await?;
                    report.extra.insert("repeat".into(), round as f64);
                    runs.push((n, report.clone()));
                    reports.push(report);
                }
            }
        }
        let these = scale_points(p, deliveries, &runs);
        println!("\n{}", scale_table(&these));
        points.extend(these);
    }
    Ok((reports, points))
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
    let reference = TargetSpec::SpawnReference {
        config: ReferenceConfig::default(),
        cpus: None,
    };
    let fanout = FanoutParams {
        subscribers: 20,
        publishers: 2,
        channels: 1,
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
                // Several channels side by side, as the scale curve and the actor-thread
                // runs use them.
                fanout_once(
                    &dev,
                    &client,
                    out,
                    &FanoutParams {
                        channels: 4,
                        publishers: 4,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ScaleParams {
        ScaleParams {
            confab: PathBuf::from("confab"),
            dev: DevOptions::default(),
            connections: vec![1000, 2500, 15000],
            channel_size: 1000,
            deliveries: vec![100_000.0],
            size: 100,
            duration: Duration::from_secs(1),
            window: 64,
            repeat: 2,
            reference: None,
        }
    }

    #[test]
    fn a_scale_point_keeps_deliveries_per_second_whatever_the_connections() {
        let p = params();
        for (n, channels) in [(1000, 1), (2500, 3), (15000, 15)] {
            let case = p.case(n, 100_000.0);
            assert_eq!(case.channel_count(), channels);
            assert_eq!(case.publisher_count(), channels);
            // Each channel gets the same message rate; every subscriber receives it.
            let per_channel = case.rate.unwrap() / channels as f64;
            assert!((per_channel * n as f64 - 100_000.0).abs() < 1e-6, "{n}");
        }
        assert_eq!(p.case(15000, 0.0).rate, None);
    }

    #[test]
    fn scale_rounds_alternate_their_order() {
        let p = params();
        assert_eq!(p.order(0), [1000, 2500, 15000]);
        assert_eq!(p.order(1), [15000, 2500, 1000]);
        assert_eq!(p.order(2), [1000, 2500, 15000]);
    }

    fn run(delivered: u64, cpu_s: f64) -> RunReport {
        RunReport {
            scenario: "scale".into(),
            case: String::new(),
            server: ServerKind::Confab,
            target: String::new(),
            params: serde_json::Value::Null,
            connections: 0,
            duration_s: 1.0,
            offered_msgs_per_s: None,
            published: 1,
            published_per_s: 1.0,
            delivered,
            delivered_per_s: delivered as f64,
            latency: Default::default(),
            seq: Default::default(),
            resyncs: 0,
            disconnects: 0,
            errors: 0,
            rate_limited: 0,
            server_usage: Some(crate::report::Usage {
                cpu_s,
                rss_kib: 0,
                peak_rss_kib: 0,
            }),
            loadgen_cpu_s: None,
            other_cpu_s: None,
            extra: Default::default(),
            failures: Vec::new(),
            misses: Vec::new(),
        }
    }

    #[test]
    fn the_reference_runs_one_stream_at_the_same_deliveries_and_confab_is_read_against_it() {
        let p = ScaleParams {
            repeat: 1,
            reference: Some(ReferenceConfig::default()),
            ..params()
        };
        let case = p.case_for(ServerKind::Reference, 15000, 100_000.0);
        assert_eq!((case.channel_count(), case.publisher_count()), (1, 1));
        assert!((case.rate.unwrap() * 15000.0 - 100_000.0).abs() < 1e-6);
        let reference = |delivered, cpu_s| RunReport {
            server: ServerKind::Reference,
            ..run(delivered, cpu_s)
        };
        let runs = vec![
            (1000, run(1_000_000, 4.0)),
            (1000, reference(1_000_000, 5.0)),
            (15000, run(1_000_000, 9.0)),
            (15000, reference(1_000_000, 7.5)),
        ];
        let points = scale_points(&p, 100_000.0, &runs);
        let servers: Vec<_> = points
            .iter()
            .map(|pt| (pt.server, pt.connections))
            .collect();
        assert_eq!(
            servers,
            [
                (ServerKind::Confab, 1000),
                (ServerKind::Confab, 15000),
                (ServerKind::Reference, 1000),
                (ServerKind::Reference, 15000)
            ]
        );
        let close = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < 1e-9;
        assert!(close(points[1].vs_first, 9.0 / 4.0));
        assert!(close(points[3].vs_first, 7.5 / 5.0));
        assert!(close(points[0].vs_reference, 4.0 / 5.0));
        assert!(close(points[1].vs_reference, 9.0 / 7.5));
        assert_eq!(points[2].vs_reference, None);
        assert_eq!(points[3].channels, 1);
    }

    #[test]
    fn scale_points_are_medians_relative_to_the_smallest_connection_count() {
        let p = ScaleParams {
            repeat: 3,
            ..params()
        };
        // 1,000: 2, 3, 4 µs per delivery; 15,000: 3, 6, 5; 2,500 never ran.
        let runs = vec![
            (1000, run(1_000_000, 2.0)),
            (15000, run(1_000_000, 3.0)),
            (1000, run(1_000_000, 4.0)),
            (15000, run(1_000_000, 6.0)),
            (1000, run(1_000_000, 3.0)),
            (15000, run(1_000_000, 5.0)),
        ];
        let points = scale_points(&p, 100_000.0, &runs);
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].connections, 1000);
        assert_eq!(points[0].runs, 3);
        assert_eq!(points[0].cpu_us_per_event, Some(3.0));
        assert_eq!(points[0].vs_first, Some(1.0));
        assert_eq!(points[1].connections, 15000);
        assert_eq!(points[1].channels, 15);
        assert_eq!(points[1].cpu_us_per_event, Some(5.0));
        let ratio = points[1].vs_first.unwrap();
        assert!((ratio - 5.0 / 3.0).abs() < 1e-9);
        let table = scale_table(&points);
        assert!(
            table.contains(
                "| confab | 100,000 | 15,000 | 15 | 3 | 1,000,000 | 5.000 | 1.67 | n/a |"
            ),
            "{table}"
        );
    }
}
