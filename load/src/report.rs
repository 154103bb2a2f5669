//! Results: one [`RunReport`] per measured run, written as JSON and as a Markdown table, and
//! the confab/reference ratios of a comparison.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::procfs::ProcSample;
use crate::seq::SeqTotals;
use crate::stats::LatencySummary;
use crate::target::ServerKind;

/// A server's resource use over one run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    /// CPU seconds (user + system) spent during the measured phase.
    pub cpu_s: f64,
    /// RSS at the end of the run, KiB.
    pub rss_kib: u64,
    /// Peak RSS of the process's life up to the end of the run, KiB.
    pub peak_rss_kib: u64,
}

impl Usage {
    pub fn between(start: &ProcSample, end: &ProcSample) -> Self {
        Usage {
            cpu_s: (end.cpu_s - start.cpu_s).max(0.0),
            rss_kib: end.rss_kib,
            peak_rss_kib: end.peak_rss_kib,
        }
    }
}

/// The figures of one measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `fanout`, `chat`, `idle`, `storm` or `distributed`.
    pub scenario: String,
    /// A short description of the parameters, e.g. `S=1000 100B max`.
    pub case: String,
    pub server: ServerKind,
    pub target: String,
    pub params: serde_json::Value,
    /// Client connections held during the run.
    pub connections: usize,
    /// Length of the measured phase, seconds.
    pub duration_s: f64,
    /// Offered publish rate, messages/s (`None`: as fast as deliveries allow).
    pub offered_msgs_per_s: Option<f64>,
    /// Messages accepted by the server.
    pub published: u64,
    pub published_per_s: f64,
    /// Events received by the measuring clients.
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub latency: LatencySummary,
    pub seq: SeqTotals,
    pub resyncs: u64,
    pub disconnects: u64,
    pub errors: u64,
    pub rate_limited: u64,
    /// The server's resource use, when its PID is known.
    pub server_usage: Option<Usage>,
    /// The load generator's own CPU seconds over the measured phase (it shares the cores).
    pub loadgen_cpu_s: Option<f64>,
    /// CPU seconds every other process on the machine took over the measured phase: how much
    /// the shared cores were disturbed.
    pub other_cpu_s: Option<f64>,
    /// Scenario-specific figures (e.g. `rss_per_conn_kib`, `storm_s`).
    pub extra: BTreeMap<String, f64>,
    /// Why the run failed its correctness checks (losses, duplicates, order, lost
    /// connections, refused sends); empty when it passed them.
    pub failures: Vec<String>,
    /// Performance bounds the run missed (e.g. p99 over the bound, offered rate not reached).
    pub misses: Vec<String>,
}

impl RunReport {
    /// Adds the checks every run shares: nothing lost, duplicated or reordered, no resync, no
    /// connection lost.
    pub fn check_delivery(&mut self) {
        if self.seq.losses > 0 {
            self.failures
                .push(format!("{} events lost", self.seq.losses));
        }
        if self.seq.duplicates > 0 {
            self.failures
                .push(format!("{} duplicate events", self.seq.duplicates));
        }
        if self.seq.order_violations > 0 {
            self.failures
                .push(format!("{} order violations", self.seq.order_violations));
        }
        if self.resyncs > 0 {
            self.failures.push(format!("{} resyncs", self.resyncs));
        }
        if self.disconnects > 0 {
            self.failures
                .push(format!("{} connections lost", self.disconnects));
        }
    }

    /// Passed both the correctness checks and the performance bounds.
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.misses.is_empty()
    }

    /// Server CPU seconds per million delivered events.
    pub fn cpu_s_per_million(&self) -> Option<f64> {
        let usage = self.server_usage?;
        (self.delivered > 0).then(|| usage.cpu_s / self.delivered as f64 * 1e6)
    }

    /// One line for the terminal.
    pub fn one_line(&self) -> String {
        let mut usage = match self.server_usage {
            Some(u) => format!(
                " | server cpu {:.2}s peak rss {:.1} MiB",
                u.cpu_s,
                u.peak_rss_kib as f64 / 1024.0
            ),
            None => String::new(),
        };
        if let Some(l) = self.loadgen_cpu_s {
            usage.push_str(&format!(" | loadgen cpu {l:.2}s"));
        }
        if let Some(o) = self.other_cpu_s {
            usage.push_str(&format!(" | other procs cpu {o:.2}s"));
        }
        let extra: Vec<String> = self
            .extra
            .iter()
            .map(|(k, v)| format!("{k}={}", fmt_num(*v)))
            .collect();
        format!(
            "{} {} [{}]: delivered {} ev/s, p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms, lost {} dup {} order {}{}{}{}",
            self.scenario,
            self.server.as_str(),
            self.case,
            fmt_num(self.delivered_per_s),
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.p999_ms,
            self.latency.max_ms,
            self.seq.losses,
            self.seq.duplicates,
            self.seq.order_violations,
            usage,
            if extra.is_empty() { String::new() } else { format!(" | {}", extra.join(" ")) },
            if self.failures.is_empty() {
                String::new()
            } else {
                format!(" | FAILED: {}", self.failures.join("; "))
            } + &if self.misses.is_empty() {
                String::new()
            } else {
                format!(" | missed: {}", self.misses.join("; "))
            },
        )
    }
}

/// Formats a figure with thousands separators (no decimals above 100).
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v.abs() < 100.0 {
        return format!("{v:.2}");
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        out.insert(0, '-');
    }
    out
}

fn opt2(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into())
}

/// The Markdown table of a set of runs.
pub fn markdown_table(reports: &[RunReport]) -> String {
    let mut out = String::from(
        "| scenario | server | case | conns | offered msg/s | delivered ev/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | dup | order | server CPU s | server peak RSS MiB | loadgen CPU s | other procs CPU s | notes |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in reports {
        let (cpu, rss) = match r.server_usage {
            Some(u) => (
                format!("{:.2}", u.cpu_s),
                format!("{:.1}", u.peak_rss_kib as f64 / 1024.0),
            ),
            None => ("n/a".into(), "n/a".into()),
        };
        let mut notes: Vec<String> = r
            .extra
            .iter()
            .map(|(k, v)| format!("{k}={}", fmt_num(*v)))
            .collect();
        notes.extend(r.failures.iter().map(|f| format!("FAILED: {f}")));
        notes.extend(r.misses.iter().map(|m| format!("missed: {m}")));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.server.as_str(),
            r.case,
            r.connections,
            r.offered_msgs_per_s.map(fmt_num).unwrap_or_else(|| "max".into()),
            fmt_num(r.delivered_per_s),
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.latency.p999_ms,
            r.latency.max_ms,
            r.seq.losses,
            r.seq.duplicates,
            r.seq.order_violations,
            cpu,
            rss,
            opt2(r.loadgen_cpu_s),
            opt2(r.other_cpu_s),
            notes.join("; "),
        );
    }
    out
}

/// confab against the reference server for one case, run back to back with the same client.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub case: String,
    /// Runs per server the figures are medians of.
    pub runs: usize,
    /// confab delivered/s ÷ reference delivered/s (max-rate runs).
    pub throughput: f64,
    /// confab p99 ÷ reference p99 at the same fixed rate.
    pub p99_at_same_rate: Option<f64>,
    /// confab CPU per delivered event ÷ the reference's.
    pub cpu_per_event: Option<f64>,
    /// confab peak RSS ÷ the reference's.
    pub peak_rss: Option<f64>,
    /// Both servers at fixed delivery rates (`compare --fixed-deliveries`).
    pub fixed: Vec<FixedRatio>,
}

/// confab against the reference at one fixed delivery rate (medians of the runs).
#[derive(Debug, Clone, Serialize)]
pub struct FixedRatio {
    /// Offered deliveries per second (messages/s × subscribers).
    pub deliveries_per_s: f64,
    pub confab_p99_ms: f64,
    pub reference_p99_ms: f64,
    /// confab p99 ÷ reference p99.
    pub p99: Option<f64>,
    /// confab server CPU per delivered event ÷ the reference's, at this rate.
    pub cpu_per_event: Option<f64>,
}

impl FixedRatio {
    pub fn of(deliveries_per_s: f64, confab: &RunReport, reference: &RunReport) -> Self {
        FixedRatio {
            deliveries_per_s,
            confab_p99_ms: confab.latency.p99_ms,
            reference_p99_ms: reference.latency.p99_ms,
            p99: div(Some(confab.latency.p99_ms), Some(reference.latency.p99_ms)),
            cpu_per_event: div(confab.cpu_s_per_million(), reference.cpu_s_per_million()),
        }
    }
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl Ratio {
    pub fn of(
        case: &str,
        confab_max: &RunReport,
        reference_max: &RunReport,
        fixed: Option<(&RunReport, &RunReport)>,
        runs: usize,
    ) -> Self {
        Ratio {
            case: case.to_string(),
            runs,
            throughput: if reference_max.delivered_per_s > 0.0 {
                confab_max.delivered_per_s / reference_max.delivered_per_s
            } else {
                0.0
            },
            p99_at_same_rate: fixed
                .and_then(|(c, r)| div(Some(c.latency.p99_ms), Some(r.latency.p99_ms))),
            cpu_per_event: div(
                confab_max.cpu_s_per_million(),
                reference_max.cpu_s_per_million(),
            ),
            peak_rss: div(
                confab_max.server_usage.map(|u| u.peak_rss_kib as f64),
                reference_max.server_usage.map(|u| u.peak_rss_kib as f64),
            ),
            fixed: Vec::new(),
        }
    }
}

/// The Markdown table of ratios.
pub fn ratio_table(ratios: &[Ratio]) -> String {
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
    let mut out = String::from(
        "| case (confab, or the server it names) | runs each | delivered/s ÷ reference (max rate) | p99 ÷ reference (same fixed rate) | server CPU per event ÷ reference | peak RSS ÷ reference |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in ratios {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {} | {} | {} |",
            r.case,
            r.runs,
            r.throughput,
            opt(r.p99_at_same_rate),
            opt(r.cpu_per_event),
            opt(r.peak_rss)
        );
    }
    if ratios.iter().any(|r| !r.fixed.is_empty()) {
        out.push_str(
            "\n| case (confab, or the server it names) | fixed deliveries/s | p99 ms | reference p99 ms | p99 ÷ reference | server CPU per event ÷ reference |\n|---|---:|---:|---:|---:|---:|\n",
        );
        for r in ratios {
            for f in &r.fixed {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.2} | {:.2} | {} | {} |",
                    r.case,
                    fmt_num(f.deliveries_per_s),
                    f.confab_p99_ms,
                    f.reference_p99_ms,
                    opt(f.p99),
                    opt(f.cpu_per_event)
                );
            }
        }
    }
    out
}

/// Where results go: `DIR/<unix time>-<name>.{json,md}`.
#[derive(Debug)]
pub struct Output {
    pub dir: PathBuf,
    pub stamp: String,
    runs: std::sync::atomic::AtomicUsize,
}

impl Output {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Output {
            dir: dir.to_path_buf(),
            stamp: (confab_shared::now_ms() / 1000).to_string(),
            runs: Default::default(),
        })
    }

    /// A file name stem unique to one run of this invocation, e.g. for a server's log.
    pub fn run_stem(&self, name: &str) -> String {
        let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n:03}-{name}", self.stamp)
    }

    pub fn path(&self, name: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{}-{name}.{ext}", self.stamp))
    }

    /// Writes `value` as pretty JSON; returns the path.
    pub fn json<T: Serialize>(&self, name: &str, value: &T) -> Result<PathBuf> {
        let path = self.path(name, "json");
        let text = serde_json::to_string_pretty(value).context("encoding results")?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Writes Markdown text; returns the path.
    pub fn markdown(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.path(name, "md");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// The default results directory: `load/results` of this source tree (gitignored).
pub fn default_results_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(server: ServerKind, delivered_per_s: f64, p99: f64, cpu: f64) -> RunReport {
        RunReport {
            scenario: "fanout".into(),
            case: "S=10".into(),
            server,
            target: "t".into(),
            params: serde_json::Value::Null,
            connections: 10,
            duration_s: 1.0,
            offered_msgs_per_s: None,
            published: 100,
            published_per_s: 100.0,
            delivered: 1000,
            delivered_per_s,
            latency: LatencySummary {
                p99_ms: p99,
                ..Default::default()
            },
            seq: SeqTotals::default(),
            resyncs: 0,
            disconnects: 0,
            errors: 0,
            rate_limited: 0,
            server_usage: Some(Usage {
                cpu_s: cpu,
                rss_kib: 1024,
                peak_rss_kib: 2048,
            }),
            loadgen_cpu_s: None,
            other_cpu_s: None,
            extra: BTreeMap::new(),
            failures: Vec::new(),
            misses: Vec::new(),
        }
    }

    #[test]
    fn ratios_divide_confab_by_reference() {
        let c = report(ServerKind::Confab, 500.0, 4.0, 2.0);
        let r = report(ServerKind::Reference, 1000.0, 2.0, 1.0);
        let ratio = Ratio::of("S=10", &c, &r, Some((&c, &r)), 1);
        assert_eq!(ratio.throughput, 0.5);
        assert_eq!(ratio.p99_at_same_rate, Some(2.0));
        assert_eq!(ratio.cpu_per_event, Some(2.0));
        assert_eq!(ratio.peak_rss, Some(1.0));
        assert!(ratio_table(&[ratio]).contains("| S=10 | 1 | 0.50 | 2.00 | 2.00 | 1.00 |"));
    }

    #[test]
    fn fixed_rate_ratios_get_a_table_of_their_own() {
        let c = report(ServerKind::Confab, 100.0, 3.0, 3.0);
        let r = report(ServerKind::Reference, 100.0, 2.0, 2.0);
        let mut ratio = Ratio::of("S=10", &c, &r, None, 1);
        assert!(!ratio_table(std::slice::from_ref(&ratio)).contains("fixed deliveries/s"));
        ratio.fixed.push(FixedRatio::of(100_000.0, &c, &r));
        assert_eq!(ratio.fixed[0].p99, Some(1.5));
        assert_eq!(ratio.fixed[0].cpu_per_event, Some(1.5));
        let table = ratio_table(&[ratio]);
        assert!(
            table.contains("| S=10 | 100,000 | 3.00 | 2.00 | 1.50 | 1.50 |"),
            "{table}"
        );
    }

    #[test]
    fn delivery_checks_name_each_failure() {
        let mut r = report(ServerKind::Confab, 1.0, 1.0, 1.0);
        r.check_delivery();
        assert!(r.passed());
        r.seq.losses = 3;
        r.disconnects = 1;
        r.check_delivery();
        assert_eq!(r.failures, ["3 events lost", "1 connections lost"]);
        assert!(markdown_table(&[r]).contains("FAILED: 3 events lost"));
    }

    #[test]
    fn numbers_get_separators() {
        assert_eq!(fmt_num(1234567.4), "1,234,567");
        assert_eq!(fmt_num(12.345), "12.35");
        assert_eq!(fmt_num(-1000.0), "-1,000");
        assert_eq!(fmt_num(f64::NAN), "-");
    }
}
