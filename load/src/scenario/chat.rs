//! Scenario 2, chat mix: U users in C small channels (M members each; every tenth user is
//! also a guest in a second channel), each user sending at a human pace (exponentially
//! distributed pauses) with a `typing` first. Steps through total rates to find the highest
//! one at which p99 publish→receive latency stays under the bound (50 ms by default): doubling
//! while steps pass, then bisecting between the last pass and the first failure.
//!
//! The users stay connected across steps; each step resets the latency histogram and takes
//! the counters' differences. Losses, duplicates and order violations are judged once, at the
//! end, over the whole run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{open_many, raise_nofile, require_confab, wait_until, RunContext};
use crate::client::{self, Ended, Inbox, Received, Shared, Ws};
use crate::payload;
use crate::progress;
use crate::report::RunReport;
use crate::seq::SeqTotals;
use crate::stats::Counters;

/// Parameters of a chat-mix search.
#[derive(Debug, Clone, Serialize)]
pub struct ChatParams {
    pub users: usize,
    pub channels: usize,
    pub members: usize,
    /// Every tenth user also joins a second channel.
    pub guests: bool,
    /// First total rate tried, messages/s.
    pub start_rate: f64,
    /// Run exactly these rates instead of searching.
    pub rates: Vec<f64>,
    pub step: Duration,
    pub p99_limit_ms: f64,
    pub max_steps: usize,
    /// Between a user's `typing` and its `send`.
    pub typing: Duration,
    pub size: usize,
}

impl Default for ChatParams {
    fn default() -> Self {
        ChatParams {
            users: 10_000,
            channels: 1_000,
            members: 10,
            guests: true,
            start_rate: 500.0,
            rates: Vec::new(),
            step: Duration::from_secs(10),
            p99_limit_ms: 50.0,
            max_steps: 8,
            typing: Duration::from_millis(300),
            size: 100,
        }
    }
}

/// Channel -> its members' user indices. User `u` is at home in channel `u / members` (users
/// beyond `channels * members` wrap around); with guests, users with `u % 10 == 1` are also in
/// the channel half-way round.
pub fn membership(users: usize, channels: usize, members: usize, guests: bool) -> Vec<Vec<usize>> {
    let channels = channels.max(1);
    let members = members.max(1);
    let mut out = vec![Vec::new(); channels];
    for u in 0..users {
        let home = if u < channels * members {
            u / members
        } else {
            u % channels
        };
        out[home].push(u);
        if guests && u % 10 == 1 && channels > 1 {
            let guest = (home + channels / 2).max(home + 1) % channels;
            if guest != home {
                out[guest].push(u);
            }
        }
    }
    out
}

/// Next rate to try, and whether the search is over: double until the first failure, then
/// bisect until the bracket is within 15 %.
pub fn next_rate(best_pass: Option<f64>, first_fail: Option<f64>) -> Option<f64> {
    match (best_pass, first_fail) {
        (Some(pass), None) => Some(pass * 2.0),
        (Some(pass), Some(fail)) if fail / pass > 1.15 => Some((pass + fail) / 2.0),
        (None, Some(fail)) if fail > 10.0 => Some(fail / 4.0),
        _ => None,
    }
}

/// What a chat user reports at the end.
struct UserEnd {
    inbox: Inbox,
    /// Highest acked seq per channel.
    acked: HashMap<String, u64>,
    ended: Ended,
}

enum Next {
    Typing,
    Send(usize),
}

#[allow(clippy::too_many_arguments)]
async fn chat_user(
    mut ws: Ws,
    mut inbox: Inbox,
    channels: Vec<String>,
    mut control: watch::Receiver<u64>,
    typing: Duration,
    size: usize,
    heartbeat: Duration,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> UserEnd {
    let mut rng = StdRng::seed_from_u64(inbox.index as u64);
    let mut acked: HashMap<String, u64> = HashMap::new();
    let far = Duration::from_secs(86_400);
    let mut next_at = tokio::time::Instant::now() + far;
    let mut next = Next::Typing;
    // The typing time of a user that starts a step mid-typing (shorter than `typing`).
    let mut first_typing: Option<Duration> = None;
    // This user's sends so far, for their client_msg_ids.
    let mut sends: u64 = 0;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    // The pause before a user's next `typing`: exponential around the per-user interval
    // (minus the typing time), i.e. Poisson sends at the user's rate.
    let pause = |rng: &mut StdRng, interval_us: u64| -> Duration {
        let mean = (interval_us as f64 / 1e6 - typing.as_secs_f64()).max(0.0);
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        Duration::from_secs_f64(-u.ln() * mean)
    };
    let ended = loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break Ended::Stopped(Box::new(ws)),
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    inbox.handle_each(&text, &shared, |received| {
                        if let Received::Ack { channel: Some(channel), seq } = received {
                            Counters::bump(&shared.counters.published);
                            let max = acked.entry(channel).or_insert(0);
                            *max = (*max).max(seq);
                        }
                    });
                }
                Some(Ok(Message::Close(close))) => {
                    Counters::bump(&shared.counters.disconnects);
                    let code = close.map(|c| u16::from(c.code)).unwrap_or(1005);
                    break Ended::Lost(format!("closed by the server with {code}"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    Counters::bump(&shared.counters.disconnects);
                    break Ended::Lost(format!("connection failed: {e}"));
                }
                None => {
                    Counters::bump(&shared.counters.disconnects);
                    break Ended::Lost("connection ended".into());
                }
            },
            changed = control.changed() => {
                if changed.is_err() {
                    continue;
                }
                let interval = *control.borrow_and_update();
                next = Next::Typing;
                next_at = tokio::time::Instant::now() + if interval == 0 || channels.is_empty() {
                    far
                } else {
                    // Start each user in the steady state of its send cycle (typing time τ
                    // plus an exponential pause, mean interval I): with probability τ/I it is
                    // typing now and sends within τ; otherwise its next typing comes after an
                    // exponential pause. Starting everyone at a uniform point of the interval
                    // instead would overshoot the rate for the first interval.
                    let cycle = Duration::from_micros(interval);
                    if rng.gen_bool((typing.as_secs_f64() / cycle.as_secs_f64()).clamp(0.0, 1.0)) {
                        first_typing = Some(typing.mul_f64(rng.gen_range(0.0..1.0)));
                        Duration::ZERO
                    } else {
                        pause(&mut rng, interval)
                    }
                };
            }
            _ = tokio::time::sleep_until(next_at) => {
                let frame = match next {
                    Next::Typing => {
                        let c = rng.gen_range(0..channels.len());
                        next = Next::Send(c);
                        next_at = tokio::time::Instant::now() + first_typing.take().unwrap_or(typing);
                        payload::typing_frame(&channels[c])
                    }
                    Next::Send(c) => {
                        let interval = *control.borrow();
                        next = Next::Typing;
                        next_at = tokio::time::Instant::now()
                            + if interval == 0 { far } else { pause(&mut rng, interval) };
                        sends += 1;
                        let publish_us = payload::now_us();
                        payload::send_frame(
                            &channels[c],
                            &payload::make_text(publish_us, size),
                            &payload::client_msg_id(publish_us, sends),
                        )
                    }
                };
                if let Err(e) = ws.send(Message::text(frame)).await {
                    Counters::bump(&shared.counters.disconnects);
                    break Ended::Lost(format!("sending: {e}"));
                }
            }
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::text(payload::PING_FRAME)).await {
                    Counters::bump(&shared.counters.disconnects);
                    break Ended::Lost(format!("sending ping: {e}"));
                }
            }
        }
    };
    UserEnd {
        inbox,
        acked,
        ended,
    }
}

/// Runs the search; returns one report per step and a final summary report.
pub async fn run(ctx: &RunContext, p: &ChatParams) -> Result<Vec<RunReport>> {
    require_confab(ctx, "chat")?;
    raise_nofile(p.users as u64 + 512)?;
    let api = ctx.api()?;
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let users: Vec<String> = (0..p.users).map(|i| ctx.user("c", i)).collect();

    // Channels, created over HTTP before anyone connects.
    let plan = membership(p.users, p.channels, p.members, p.guests);
    let bar = progress::counter(plan.len() as u64, "creating channels");
    let created: Vec<Result<String>> = futures_util::stream::iter(plan.iter().enumerate())
        .map(|(c, members)| {
            let users = &users;
            let bar = &bar;
            async move {
                let Some((&creator, rest)) = members.split_first() else {
                    return Ok(String::new());
                };
                let token = api.token(&users[creator]).await?;
                let rest: Vec<String> = rest.iter().map(|&u| users[u].clone()).collect();
                let id = ctx
                    .create_channel(&token, &format!("chat-{}-{c}", ctx.run_id), &rest)
                    .await;
                bar.inc(1);
                id
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    bar.finish_and_clear();
    created.into_iter().collect::<Result<Vec<String>>>()?;

    let (control_tx, control_rx) = watch::channel(0u64);
    let tasks = open_many(p.users, ctx.connect_concurrency, "chat users", |i| {
        let users = &users;
        let shared = shared.clone();
        let stop = stop.clone();
        let control = control_rx.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut ws = ctx.connector.connect_retrying(i, deadline).await?;
            let token = api.token(&users[i]).await?;
            let ready = client::hello(&mut ws, &token, &[]).await?;
            let mut inbox = Inbox::new(i, true);
            inbox.count_typing = true;
            inbox.track_ready(&ready);
            let channels: Vec<String> = ready.channels.iter().map(|(c, _)| c.clone()).collect();
            Ok(tokio::spawn(chat_user(
                ws,
                inbox,
                channels,
                control,
                p.typing,
                p.size,
                ready.heartbeat,
                shared,
                stop,
            )))
        }
    })
    .await?;

    let mut steps: Vec<RunReport> = Vec::new();
    let mut best: Option<f64> = None;
    let mut fail: Option<f64> = None;
    let mut fixed = p.rates.iter().copied();
    let mut rate = if p.rates.is_empty() {
        Some(p.start_rate)
    } else {
        fixed.next()
    };
    while let Some(r) = rate {
        if steps.len() >= p.max_steps.max(1) {
            break;
        }
        let step = run_step(ctx, p, r, &shared, &control_tx).await?;
        if step.passed() {
            best = Some(best.map_or(r, |b: f64| b.max(r)));
        } else {
            fail = Some(fail.map_or(r, |f: f64| f.min(r)));
        }
        steps.push(step);
        rate = if p.rates.is_empty() {
            next_rate(best, fail)
        } else {
            fixed.next()
        };
    }

    // Settle, stop everyone, and judge the whole run's deliveries.
    stop.cancel();
    let mut ends = Vec::with_capacity(tasks.len());
    for t in tasks {
        ends.push(t.await.context("chat user task failed")?);
    }
    let mut finals: HashMap<String, u64> = HashMap::new();
    for end in &ends {
        for (c, s) in &end.acked {
            let f = finals.entry(c.clone()).or_insert(0);
            *f = (*f).max(*s);
        }
    }
    let mut seq = SeqTotals::default();
    let mut lost = 0;
    let mut closes = Vec::new();
    for end in ends {
        for (channel, tracker) in &end.inbox.trackers {
            let final_seq = finals
                .get(channel.as_ref())
                .copied()
                .unwrap_or(tracker.start());
            seq.add(tracker, final_seq);
        }
        match end.ended {
            Ended::Stopped(ws) => closes.push(tokio::spawn(client::close_gracefully(*ws))),
            Ended::Lost(_) => lost += 1,
        }
    }
    for c in closes {
        let _ = c.await;
    }

    let mut summary = match steps
        .iter()
        .filter(|s| s.passed())
        .max_by(|a, b| a.delivered_per_s.total_cmp(&b.delivered_per_s))
    {
        Some(s) => s.clone(),
        None => steps.first().cloned().context("no chat step ran")?,
    };
    summary.case = format!("best step, p99 < {} ms", p.p99_limit_ms);
    summary.seq = seq;
    summary.failures.clear();
    summary.misses.clear();
    summary.disconnects = lost;
    summary.check_delivery();
    let passing = steps.iter().filter(|s| s.passed()).count();
    if passing == 0 {
        summary
            .misses
            .push(format!("no step kept p99 under {} ms", p.p99_limit_ms));
    }
    summary
        .extra
        .insert("max_msgs_per_s_p99_ok".into(), best.unwrap_or(0.0));
    steps.push(summary);
    Ok(steps)
}

async fn run_step(
    ctx: &RunContext,
    p: &ChatParams,
    rate: f64,
    shared: &Shared,
    control: &watch::Sender<u64>,
) -> Result<RunReport> {
    let c = &shared.counters;
    shared.latency.reset();
    let (d0, t0, p0, e0, x0) = (
        Counters::get(&c.delivered),
        Counters::get(&c.typing),
        Counters::get(&c.published),
        Counters::get(&c.errors),
        Counters::get(&c.disconnects),
    );
    let before = ctx.sample();
    let interval_us = (p.users as f64 * 1e6 / rate.max(1e-3)) as u64;
    control.send_replace(interval_us.max(1));
    let bar = progress::timer(
        p.step,
        &format!("chat {} msg/s", crate::report::fmt_num(rate)),
    );
    let start = tokio::time::Instant::now();
    while start.elapsed() < p.step {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_position(start.elapsed().as_secs());
    }
    bar.finish_and_clear();
    control.send_replace(0);
    let elapsed = start.elapsed().as_secs_f64();
    let published = Counters::get(&c.published) - p0;
    // Let the messages in flight land (and their acks come back) before the next step.
    wait_until(
        || false,
        || Counters::get(&c.delivered) + Counters::get(&c.published),
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .await;
    let after = ctx.sample();
    let delivered = Counters::get(&c.delivered) - d0;
    let measured = before.until(&after);
    let mut report = RunReport {
        scenario: "chat".into(),
        case: format!("{} msg/s offered", crate::report::fmt_num(rate)),
        server: ctx.kind(),
        target: ctx.target.label.clone(),
        params: serde_json::to_value(p).unwrap_or_default(),
        connections: p.users,
        duration_s: elapsed,
        offered_msgs_per_s: Some(rate),
        published,
        published_per_s: published as f64 / elapsed,
        delivered,
        delivered_per_s: delivered as f64 / elapsed,
        latency: shared.latency.summary(),
        seq: SeqTotals::default(),
        resyncs: Counters::get(&c.resyncs),
        disconnects: Counters::get(&c.disconnects) - x0,
        errors: Counters::get(&c.errors) - e0,
        rate_limited: Counters::get(&c.rate_limited),
        server_usage: measured.server,
        loadgen_cpu_s: measured.loadgen_cpu_s,
        other_cpu_s: measured.other_cpu_s,
        extra: Default::default(),
        failures: Vec::new(),
        misses: Vec::new(),
    };
    let typing = Counters::get(&c.typing) - t0;
    report
        .extra
        .insert("messages".into(), delivered.saturating_sub(typing) as f64);
    report.extra.insert("typing".into(), typing as f64);
    if report.latency.p99_ms >= p.p99_limit_ms {
        report.misses.push(format!(
            "p99 {:.1} ms is not under {} ms",
            report.latency.p99_ms, p.p99_limit_ms
        ));
    }
    if report.published_per_s < 0.9 * rate {
        report.misses.push(format!(
            "only {:.0} of {:.0} msg/s published",
            report.published_per_s, rate
        ));
    }
    if report.disconnects > 0 {
        report
            .failures
            .push(format!("{} connections lost", report.disconnects));
    }
    if report.errors > 0 {
        report
            .failures
            .push(format!("{} error frames", report.errors));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_gives_every_user_a_home_and_some_a_second_channel() {
        let plan = membership(10_000, 1_000, 10, true);
        assert_eq!(plan.len(), 1_000);
        let mut count = vec![0; 10_000];
        for members in &plan {
            assert!(
                members.len() >= 10 && members.len() <= 11,
                "{}",
                members.len()
            );
            for &u in members {
                count[u] += 1;
            }
        }
        assert!(count.iter().all(|&c| c >= 1));
        assert_eq!(count.iter().filter(|&&c| c == 2).count(), 1_000);
        let plain = membership(100, 10, 10, false);
        assert!(plain.iter().all(|m| m.len() == 10));
    }

    #[test]
    fn search_doubles_then_bisects_then_stops() {
        assert_eq!(next_rate(Some(500.0), None), Some(1000.0));
        assert_eq!(next_rate(Some(1000.0), Some(2000.0)), Some(1500.0));
        assert_eq!(next_rate(Some(1500.0), Some(1700.0)), None);
        assert_eq!(next_rate(None, Some(500.0)), Some(125.0));
        assert_eq!(next_rate(None, Some(8.0)), None);
    }
}
