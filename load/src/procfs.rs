//! Resource usage of a server process, read from `/proc` (Linux).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Clock ticks per second of `/proc/PID/stat` times. Linux exports these in USER_HZ, which is
/// 100 on every architecture the kernel supports, independent of the kernel's own HZ.
const USER_HZ: f64 = 100.0;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProcSample {
    /// User plus system CPU time since the process started, in seconds.
    pub cpu_s: f64,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size since the process started, KiB.
    pub peak_rss_kib: u64,
}

/// Reads the counters of process `pid`.
pub fn sample(pid: u32) -> Result<ProcSample> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(base.join("stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(base.join("status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(ProcSample {
        cpu_s: parse_cpu_seconds(&stat)?,
        rss_kib: parse_status_kib(&status, "VmRSS:")?,
        peak_rss_kib: parse_status_kib(&status, "VmHWM:")?,
    })
}

/// Reads the counters of this process.
pub fn sample_self() -> Result<ProcSample> {
    sample(std::process::id())
}

/// CPU seconds the whole machine has spent busy (every state but idle and iowait, summed
/// over all CPUs) since boot, from `/proc/stat`. The difference over a run, less the server's
/// and the load generator's own CPU, is what other processes took from the shared cores.
pub fn machine_busy_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_busy(&stat)
}

fn parse_machine_busy(stat: &str) -> Result<f64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().context("bad /proc/stat value"))
        .collect::<Result<_>>()?;
    if ticks.len() < 5 {
        bail!("short cpu line in /proc/stat");
    }
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // counted in user, so only the first eight are summed.
    let total: u64 = ticks.iter().take(8).sum();
    Ok((total - ticks[3] - ticks[4]) as f64 / USER_HZ)
}

/// The machine-wide count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`). Each drop costs the client a SYN
/// retransmission (1 s, then 3 s, ...), which is what a reconnect storm runs into when a
/// server listens with a short backlog.
pub fn listen_overflows() -> Result<u64> {
    let netstat =
        std::fs::read_to_string("/proc/net/netstat").context("reading /proc/net/netstat")?;
    parse_netstat(&netstat, "TcpExt:", "ListenOverflows")
}

fn parse_netstat(netstat: &str, section: &str, field: &str) -> Result<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with(section));
    let names = lines
        .next()
        .with_context(|| format!("no {section} header"))?;
    let values = lines
        .next()
        .with_context(|| format!("no {section} values"))?;
    let index = names
        .split_whitespace()
        .position(|n| n == field)
        .with_context(|| format!("no {field} in {section}"))?;
    let value = values
        .split_whitespace()
        .nth(index)
        .with_context(|| format!("no value for {field}"))?;
    value
        .parse()
        .with_context(|| format!("bad {field} value {value:?}"))
}

/// utime + stime from a `/proc/PID/stat` line. The command name (field 2) is parenthesised and
/// may hold spaces, so fields are counted from the last `)`.
fn parse_cpu_seconds(stat: &str) -> Result<f64> {
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc stat: no command name")?;
    // After the command name come field 3 (state) onwards; utime and stime are fields 14, 15.
    let fields: Vec<&str> = after.split_whitespace().collect();
    if fields.len() < 13 {
        bail!(
            "malformed /proc stat: {} fields after the name",
            fields.len()
        );
    }
    let utime: u64 = fields[11].parse().context("utime")?;
    let stime: u64 = fields[12].parse().context("stime")?;
    Ok((utime + stime) as f64 / USER_HZ)
}

/// A `Key:   1234 kB` line of `/proc/PID/status`, in KiB.
fn parse_status_kib(status: &str, key: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc status"))?;
    let value = line[key.len()..]
        .split_whitespace()
        .next()
        .with_context(|| format!("empty {key}"))?;
    value
        .parse()
        .with_context(|| format!("bad {key} value {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_from_stat_with_spaces_in_the_name() {
        let stat =
            "1234 (confab dev (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 \
                    123 456 789";
        assert_eq!(parse_cpu_seconds(stat).unwrap(), 3.0);
        assert!(parse_cpu_seconds("1 (x) S 1").is_err());
    }

    #[test]
    fn parses_rss_and_peak() {
        let status = "Name:\tconfab\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS:").unwrap(), 10240);
        assert_eq!(parse_status_kib(status, "VmHWM:").unwrap(), 20480);
        assert!(parse_status_kib(status, "VmSwap:").is_err());
    }

    #[test]
    fn machine_busy_excludes_idle_and_iowait_and_guest() {
        let stat = "cpu  100 20 30 1000 50 5 5 0 40 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_machine_busy(stat).unwrap(), 1.6);
        assert!(parse_machine_busy("intr 1 2\n").is_err());
        assert!(machine_busy_s().unwrap() > 0.0);
    }

    #[test]
    fn reads_a_netstat_counter_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 17\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(
            parse_netstat(netstat, "TcpExt:", "ListenOverflows").unwrap(),
            17
        );
        assert!(parse_netstat(netstat, "TcpExt:", "Nope").is_err());
        assert!(listen_overflows().is_ok());
    }

    #[test]
    fn samples_this_process() {
        let s = sample_self().unwrap();
        assert!(s.rss_kib > 0);
        assert!(s.peak_rss_kib >= s.rss_kib);
    }
}
