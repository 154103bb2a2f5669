//! Pinning: the server under test on some cores, the load generator on the others
//! (`--pin SERVER:CLIENT`, default `0:1`), so that on a small machine the two do not take
//! turns on the same core and the server's figures are those of the cores it was given.
//!
//! A thread's CPU affinity is inherited by the threads and processes it creates. So:
//! - the load generator pins its main thread before the tokio runtime starts (every runtime
//!   thread then inherits it; each one also pins itself on start, for threads created later),
//!   and the runtime's default worker count follows the pinned set;
//! - a server is spawned from a short-lived thread pinned to the server's cores, so the
//!   server process and every thread it starts run there, from its first instruction.
//!
//! After a spawn the server's threads are read back from `/proc/PID/task/*/status`
//! (`Cpus_allowed_list`) and the run fails if any is allowed elsewhere.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// A set of CPU numbers, written the way `taskset -c` and `/proc/PID/status` write them
/// (`0`, `0-3`, `0,2-3`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cores(BTreeSet<usize>);

/// Most CPUs a set may name: what the kernel's `cpu_set_t` of `sched_setaffinity` holds.
pub const MAX_CPUS: usize = 1024;

impl Cores {
    pub fn new(cpus: impl IntoIterator<Item = usize>) -> Result<Self> {
        let set: BTreeSet<usize> = cpus.into_iter().collect();
        if set.is_empty() {
            bail!("an empty CPU set");
        }
        if let Some(&max) = set.iter().next_back() {
            if max >= MAX_CPUS {
                bail!("CPU {max} is beyond the {MAX_CPUS} a CPU set can name");
            }
        }
        Ok(Cores(set))
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, cpu: usize) -> bool {
        self.0.contains(&cpu)
    }

    pub fn is_subset(&self, other: &Cores) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn is_disjoint(&self, other: &Cores) -> bool {
        self.0.is_disjoint(&other.0)
    }

    fn cpu_set(&self) -> Result<CpuSet> {
        let mut set = CpuSet::new();
        for cpu in self.iter() {
            set.set(cpu)
                .with_context(|| format!("CPU {cpu} does not fit a CPU set"))?;
        }
        Ok(set)
    }
}

impl FromStr for Cores {
    type Err = anyhow::Error;

    /// `0`, `0-3`, `0,2-3`; whitespace around items is ignored.
    fn from_str(s: &str) -> Result<Self> {
        let mut cpus = BTreeSet::new();
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                bail!("empty item in CPU list {s:?}");
            }
            let (lo, hi) = match item.split_once('-') {
                Some((lo, hi)) => (parse_cpu(lo, s)?, parse_cpu(hi, s)?),
                None => {
                    let cpu = parse_cpu(item, s)?;
                    (cpu, cpu)
                }
            };
            if lo > hi {
                bail!("range {item:?} in CPU list {s:?} runs backwards");
            }
            if hi >= MAX_CPUS {
                bail!("CPU {hi} in {s:?} is beyond the {MAX_CPUS} a CPU set can name");
            }
            cpus.extend(lo..=hi);
        }
        Cores::new(cpus)
    }
}

fn parse_cpu(v: &str, list: &str) -> Result<usize> {
    v.trim()
        .parse()
        .with_context(|| format!("{v:?} in CPU list {list:?} is not a CPU number"))
}

impl fmt::Display for Cores {
    /// The shortest list form: runs of consecutive CPUs as ranges (`0-2,5`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.iter().peekable();
        while let Some(lo) = iter.next() {
            let mut hi = lo;
            while iter.peek() == Some(&(hi + 1)) {
                hi += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// Where the server and the load generator run: `SERVER:CLIENT`, two disjoint CPU lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub server: Cores,
    pub client: Cores,
}

impl FromStr for Pin {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (server, client) = s.split_once(':').with_context(|| {
            format!("--pin takes SERVER_CPUS:CLIENT_CPUS (e.g. 0:1), not {s:?}")
        })?;
        let pin = Pin {
            server: server
                .parse()
                .with_context(|| format!("the server's CPUs in --pin {s:?}"))?,
            client: client
                .parse()
                .with_context(|| format!("the load generator's CPUs in --pin {s:?}"))?,
        };
        if !pin.server.is_disjoint(&pin.client) {
            bail!("--pin {s:?}: the server's and the load generator's CPUs overlap");
        }
        Ok(pin)
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.server, self.client)
    }
}

impl Pin {
    /// Fails unless every CPU named is one this process may run on now.
    pub fn check_available(&self) -> Result<()> {
        let available = current_thread_cores()?;
        for (who, cores) in [("server", &self.server), ("load generator", &self.client)] {
            if !cores.is_subset(&available) {
                bail!(
                    "--pin {self}: the {who}'s CPUs {cores} are not all among the CPUs this process may use ({available})"
                );
            }
        }
        Ok(())
    }
}

/// The CPUs the calling thread may run on.
pub fn current_thread_cores() -> Result<Cores> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Cores::new((0..CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)))
}

/// Restricts the calling thread (and what it creates from now on) to `cores`.
pub fn pin_current_thread(cores: &Cores) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), &cores.cpu_set()?)
        .with_context(|| format!("sched_setaffinity to CPUs {cores}"))
}

/// Runs `f` on a new thread pinned to `cores` and returns its result: a process spawned in
/// `f` inherits the pinning, and so does every thread of that process.
pub fn on_pinned_thread<T: Send + 'static>(
    cores: &Cores,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let cores = cores.clone();
    std::thread::Builder::new()
        .name("pinned-spawn".into())
        .spawn(move || {
            pin_current_thread(&cores)?;
            f()
        })
        .context("starting a pinned thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the pinned thread panicked"))?
}

/// The `Cpus_allowed_list` of every thread of process `pid` (thread id, CPUs).
pub fn thread_cores(pid: u32) -> Result<Vec<(u32, Cores)>> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread that ended between the listing and the read is simply gone.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        out.push((tid, allowed_in_status(&status)?));
    }
    Ok(out)
}

/// The `Cpus_allowed_list:` line of a `/proc/.../status` file.
pub fn allowed_in_status(status: &str) -> Result<Cores> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in the status file")?
        .trim()
        .parse()
}

/// Fails unless every thread of `pid` is allowed exactly `cores`; returns the thread count.
pub fn verify_process(pid: u32, cores: &Cores) -> Result<usize> {
    let threads = thread_cores(pid)?;
    let stray: Vec<String> = threads
        .iter()
        .filter(|(_, c)| c != cores)
        .map(|(tid, c)| format!("thread {tid} on {c}"))
        .collect();
    if !stray.is_empty() {
        bail!(
            "process {pid} should run on CPUs {cores} only, but: {}",
            stray.join(", ")
        );
    }
    Ok(threads.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cores(s: &str) -> Cores {
        s.parse().unwrap()
    }

    #[test]
    fn cpu_lists_parse_as_taskset_writes_them() {
        assert_eq!(cores("0").iter().collect::<Vec<_>>(), [0]);
        assert_eq!(cores("0-3").iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(cores(" 5, 0-1 ,3").iter().collect::<Vec<_>>(), [0, 1, 3, 5]);
        assert_eq!(cores("2,2,1-2").iter().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn bad_cpu_lists_are_refused_with_the_reason() {
        for (input, reason) in [
            ("", "empty item"),
            ("1,", "empty item"),
            ("a", "not a CPU number"),
            ("3-1", "runs backwards"),
            ("-1", "not a CPU number"),
            ("0-5000", "beyond"),
        ] {
            let err = format!("{:#}", input.parse::<Cores>().unwrap_err());
            assert!(err.contains(reason), "{input:?}: {err}");
        }
    }

    #[test]
    fn cpu_lists_print_in_their_shortest_form() {
        assert_eq!(cores("0").to_string(), "0");
        assert_eq!(cores("3,0,1,2,5,7-8").to_string(), "0-3,5,7-8");
        for s in ["0", "0-1", "0,2", "1-3,6"] {
            assert_eq!(cores(s).to_string(), s);
        }
    }

    #[test]
    fn a_pin_names_two_disjoint_sets() {
        let pin: Pin = "0:1".parse().unwrap();
        assert_eq!(pin.server, cores("0"));
        assert_eq!(pin.client, cores("1"));
        let pin: Pin = "0-1:2-3".parse().unwrap();
        assert_eq!(pin.to_string(), "0-1:2-3");
        let err = format!("{:#}", "0-1:1".parse::<Pin>().unwrap_err());
        assert!(err.contains("overlap"), "{err}");
        let err = format!("{:#}", "0".parse::<Pin>().unwrap_err());
        assert!(err.contains("SERVER_CPUS:CLIENT_CPUS"), "{err}");
        let err = format!("{:#}", "0:".parse::<Pin>().unwrap_err());
        assert!(err.contains("load generator"), "{err}");
    }

    #[test]
    fn the_allowed_list_is_read_from_a_status_file() {
        let status = "Name:\tconfab\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\nMems_allowed:\t1\n";
        assert_eq!(allowed_in_status(status).unwrap(), cores("0-1"));
        assert!(allowed_in_status("Name:\tx\n").is_err());
    }

    #[test]
    fn a_process_spawned_from_a_pinned_thread_runs_only_there_with_its_threads() {
        // The first CPU this test may use; on any machine a set of one.
        let mine = current_thread_cores().unwrap();
        let first = Cores::new(mine.iter().take(1)).unwrap();
        let child = on_pinned_thread(&first, || {
            Ok(std::process::Command::new("sleep").arg("5").spawn()?)
        })
        .unwrap();
        let mut child = scopeguard(child);
        let pid = child.0.id();
        assert_eq!(verify_process(pid, &first).unwrap(), 1);
        // This thread was not pinned by spawning from another one.
        assert_eq!(current_thread_cores().unwrap(), mine);
        if mine.len() > 1 {
            let other = Cores::new(mine.iter().skip(1).take(1)).unwrap();
            let err = format!("{:#}", verify_process(pid, &other).unwrap_err());
            assert!(err.contains(&format!("on {first}")), "{err}");
        }
        let _ = child.0.kill();
    }

    #[test]
    fn threads_started_by_a_pinned_thread_inherit_its_cores() {
        let mine = current_thread_cores().unwrap();
        let last = Cores::new(mine.iter().last()).unwrap();
        let seen = on_pinned_thread(&last, || {
            std::thread::spawn(current_thread_cores).join().unwrap()
        })
        .unwrap();
        assert_eq!(seen, last);
    }

    /// Kills the child when the test ends, however it ends.
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    fn scopeguard(child: std::process::Child) -> Guard {
        Guard(child)
    }
}
