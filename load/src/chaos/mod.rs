//! `confab-load chaos`: the chat mix through a local cluster while its processes are killed
//! with SIGKILL in turn — a gateway, the cell, the cell's Redis, the directory Redis — and
//! restarted, then a verdict from every client's log ([`check`]): every acked message delivered
//! to every member exactly once, in seq order, none lost, no send stored twice.
//!
//! - [`cluster`]: the processes, restartable, every Redis with `appendfsync always`.
//! - [`client`]: clients that log acks and events, resume after any disconnect and retry
//!   unacked sends with the same `client_msg_id`.
//! - [`check`]: the verdict, from the logs alone.
//!
//! `infra/chaos.sh` drives it (full run: 10 minutes; CI: a short one).

pub mod check;
pub mod client;
pub mod cluster;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::sync::watch;

use self::check::{ClientLog, Verdict};
use self::client::{lock, ChaosClient, Pace, Phase};
use self::cluster::{Cluster, Victim};
use crate::api::{self, Api, TokenSource};

/// How long the end of a run may take: the last sends to be acked, then every member to
/// receive everything acked.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a chaos run does.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosParams {
    pub confab: PathBuf,
    /// Traffic time; kills happen inside it.
    pub duration: Duration,
    pub users: usize,
    pub channels: usize,
    /// Members per channel (each user is in about `channels * members / users` channels).
    pub members: usize,
    /// Mean time between two sends of one client.
    pub send_interval: Duration,
    /// Time between two kills.
    pub kill_every: Duration,
    /// How long a killed process stays down before it is restarted.
    pub down: Duration,
    /// Mean lifetime of a client connection before the client drops it and resumes.
    pub churn: Option<Duration>,
    pub out: PathBuf,
}

/// One kill.
#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    pub victim: String,
    /// Seconds into the traffic phase.
    pub at_s: f64,
    /// Seconds from the kill until the restarted process answered.
    pub back_after_s: f64,
}

/// The figures of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub params: ChaosParams,
    pub kills: Vec<Kill>,
    /// Distinct messages the clients sent (each with its own `client_msg_id`).
    pub messages_sent: u64,
    /// Sends still unacked when the run ended (should be 0).
    pub unacked: u64,
    /// Members still missing acked messages when the run ended (should be 0).
    pub behind: u64,
    pub verdict: Verdict,
    pub wall_s: f64,
}

impl ChaosReport {
    pub fn ok(&self) -> bool {
        self.verdict.clean() && self.unacked == 0 && self.behind == 0
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let v = &self.verdict;
        let kills: Vec<String> = self
            .kills
            .iter()
            .map(|k| format!("{}@{:.0}s(+{:.1}s)", k.victim, k.at_s, k.back_after_s))
            .collect();
        let mut text = format!(
            "chaos: {} users, {} channels, {:.0} s of traffic, {} kills: {}\n\
             messages sent {}, acked {}, send attempts {}, send errors {}, unacked {}\n\
             deliveries {} of {} expected, lost {} (acked {}), duplicates {}, reordered {}, \
             conflicts {}, resyncs {}, connections {} ({} disconnects)\n",
            self.params.users,
            self.params.channels,
            self.params.duration.as_secs_f64(),
            self.kills.len(),
            kills.join(" "),
            self.messages_sent,
            v.acked,
            v.send_attempts,
            v.send_errors,
            self.unacked,
            v.delivered,
            v.expected,
            v.lost,
            v.lost_acked,
            v.duplicates,
            v.reordered,
            v.conflicts,
            v.resyncs,
            v.readies,
            v.disconnects,
        );
        for problem in &v.problems {
            text.push_str(&format!("  problem: {problem}\n"));
        }
        text.push_str(if self.ok() {
            "chaos: ok"
        } else {
            "chaos: FAILED"
        });
        text
    }
}

/// Members of channel `k`: `members` consecutive users starting at a stride that spreads the
/// channels over everyone.
fn channel_members(k: usize, users: usize, members: usize) -> Vec<usize> {
    let stride = (users / 2).max(1);
    (0..members.min(users))
        .map(|j| (k * stride + k + j) % users)
        .collect()
}

/// Runs the chaos scenario and writes its logs and report under `params.out`.
pub async fn run(params: ChaosParams) -> Result<ChaosReport> {
    if params.users < 2 || params.channels < 1 || params.members < 2 {
        bail!("a chaos run needs at least 2 users, 1 channel and 2 members per channel");
    }
    let wall = std::time::Instant::now();
    let mut cluster = Cluster::start(&params.confab, &params.out.join("cluster")).await?;
    let result = drive(&params, &mut cluster).await;
    cluster.stop().await;
    let (kills, logs, unacked, behind) = result?;
    write_logs(&params.out.join("clients"), &logs)?;
    let verdict = check::check(&logs);
    let messages_sent = logs
        .iter()
        .map(|log| {
            log.lines
                .iter()
                .filter(|l| matches!(&l.entry, check::Entry::Send { attempt: 1, .. }))
                .count() as u64
        })
        .sum();
    let report = ChaosReport {
        params,
        kills,
        messages_sent,
        unacked,
        behind,
        verdict,
        wall_s: wall.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(report.params.out.join("report.json"), json)?;
    Ok(report)
}

type Driven = (Vec<Kill>, Vec<ClientLog>, u64, u64);

async fn drive(params: &ChaosParams, cluster: &mut Cluster) -> Result<Driven> {
    let api = Api::new(
        &cluster.gateways[0],
        cluster::WORKSPACE,
        TokenSource::Jwt {
            secret: cluster::JWT_SECRET.into(),
        },
    )?;
    let users: Vec<String> = (0..params.users).map(|i| format!("u{i}")).collect();
    let mut tokens = Vec::new();
    for user in &users {
        tokens.push(api::mint_jwt(
            cluster::JWT_SECRET,
            cluster::WORKSPACE,
            user,
            24 * 3600,
        )?);
    }
    let mut memberships: Vec<Vec<String>> = vec![Vec::new(); params.users];
    for k in 0..params.channels {
        let members = channel_members(k, params.users, params.members);
        let names: Vec<String> = members.iter().map(|&i| users[i].clone()).collect();
        let channel = api
            .create_channel(&tokens[members[0]], &format!("chaos-{k}"), &names[1..])
            .await
            .with_context(|| format!("creating channel chaos-{k}"))?;
        for &i in &members {
            memberships[i].push(channel.clone());
        }
    }
    let started = tokio::time::Instant::now();
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let mut states = Vec::new();
    let mut tasks = Vec::new();
    for (i, user) in users.iter().enumerate() {
        if memberships[i].is_empty() {
            continue;
        }
        let client = ChaosClient::new(
            i,
            user.clone(),
            tokens[i].clone(),
            memberships[i].clone(),
            cluster.gateways.clone(),
            Pace {
                interval: params.send_interval,
                churn: params.churn,
            },
            started,
        );
        states.push(client.state.clone());
        tasks.push(tokio::spawn(client.run(phase_rx.clone())));
    }
    let all_ready = || states.iter().all(|s| lock(s).ready);
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    while !all_ready() {
        if tokio::time::Instant::now() > deadline {
            bail!("the clients did not all connect within {CONNECT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    phase_tx.send_replace(Phase::Traffic);
    let kills = chaos(params, cluster).await?;
    phase_tx.send_replace(Phase::Drain);
    // Every send acked, then every member caught up with every acked seq.
    let drained = wait_for(DRAIN_TIMEOUT, || states.iter().all(|s| !lock(s).pending)).await;
    let last_acked = |states: &[std::sync::Arc<std::sync::Mutex<client::State>>]| {
        let mut last: HashMap<String, u64> = HashMap::new();
        for s in states {
            for line in &lock(s).log.lines {
                if let check::Entry::Ack { channel, seq, .. } = &line.entry {
                    let l = last.entry(channel.clone()).or_default();
                    *l = (*l).max(*seq);
                }
            }
        }
        last
    };
    let last = last_acked(&states);
    let behind_count = |states: &[std::sync::Arc<std::sync::Mutex<client::State>>]| {
        states
            .iter()
            .filter(|s| {
                let state = lock(s);
                state.log.channels.iter().any(|c| {
                    state.highest.get(c).copied().unwrap_or(0) < last.get(c).copied().unwrap_or(0)
                })
            })
            .count() as u64
    };
    wait_for(DRAIN_TIMEOUT, || behind_count(&states) == 0).await;
    let behind = behind_count(&states);
    phase_tx.send_replace(Phase::Done);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let unacked = if drained {
        0
    } else {
        states.iter().filter(|s| lock(s).pending).count() as u64
    };
    let logs = states.iter().map(|s| lock(s).log.clone()).collect();
    Ok((kills, logs, unacked, behind))
}

async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The kills, in turn, during the traffic phase; returns when the phase is over.
async fn chaos(params: &ChaosParams, cluster: &mut Cluster) -> Result<Vec<Kill>> {
    let start = tokio::time::Instant::now();
    let end = start + params.duration;
    let mut kills = Vec::new();
    let mut round = 0usize;
    'rounds: loop {
        let victims = [
            Victim::Gateway(round % 2),
            Victim::Cell,
            Victim::CellRedis,
            Victim::DirectoryRedis,
        ];
        for victim in victims {
            let at = start + params.kill_every * (kills.len() as u32 + 1);
            if at + params.down >= end {
                break 'rounds;
            }
            tokio::time::sleep_until(at).await;
            cluster.kill(victim).await?;
            tracing::info!(victim = %victim.name(), "killed");
            tokio::time::sleep(params.down).await;
            cluster
                .restart(victim)
                .await
                .with_context(|| format!("restarting {}", victim.name()))?;
            let back = tokio::time::Instant::now();
            tracing::info!(victim = %victim.name(), "restarted");
            kills.push(Kill {
                victim: victim.name(),
                at_s: (at - start).as_secs_f64(),
                back_after_s: (back - at).as_secs_f64(),
            });
        }
        round += 1;
    }
    tokio::time::sleep_until(end).await;
    Ok(kills)
}

fn write_logs(dir: &Path, logs: &[ClientLog]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for log in logs {
        let mut text = String::new();
        for line in &log.lines {
            text.push_str(&serde_json::to_string(line)?);
            text.push('\n');
        }
        std::fs::write(dir.join(format!("{}.jsonl", log.user)), text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_spread_over_every_user() {
        let mut seen = vec![0; 12];
        for k in 0..6 {
            let members = channel_members(k, 12, 4);
            assert_eq!(members.len(), 4);
            let mut distinct = members.clone();
            distinct.dedup();
            assert_eq!(distinct.len(), 4);
            for m in members {
                seen[m] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }
}
