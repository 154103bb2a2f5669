//! A chaos client: one user with one connection at a time, which logs every ack and every
//! event, reconnects with `resume` after any close or error (to a random gateway, another one
//! right after a failure, so a dead one is not waited on), and retries an unacknowledged send
//! with the same `client_msg_id` after `unavailable`, any other error, a silent ack timeout or
//! a disconnect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::check::{ClientLog, Entry, Line};
use crate::payload;

/// Where the run is: clients connect in `Connect`, send new messages only in `Traffic`, finish
/// their pending send in `Drain`, and close in `Done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Connect,
    Traffic,
    Drain,
    Done,
}

/// Without an ack for this long, a send is written again (same `client_msg_id`).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before retrying a send that was answered with an error.
const RETRY_AFTER: Duration = Duration::from_millis(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const PING_EVERY: Duration = Duration::from_secs(10);

/// A send not acked yet.
#[derive(Debug, Clone)]
struct Pending {
    /// The request id, also the number in `client_msg_id`.
    n: u64,
    channel: String,
    attempts: u32,
}

/// How a client behaves over time.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Mean time between two sends.
    pub interval: Duration,
    /// Mean connection lifetime before the client drops it itself; `None`: never.
    pub churn: Option<Duration>,
}

/// What the runner reads while the client runs.
#[derive(Debug, Default)]
pub struct State {
    pub log: ClientLog,
    /// Highest seq received per channel: the `resume` map.
    pub highest: HashMap<String, u64>,
    /// Whether a send is waiting for its ack.
    pub pending: bool,
    /// Whether the first `ready` came.
    pub ready: bool,
}

/// One client.
#[derive(Debug)]
pub struct ChaosClient {
    pub index: usize,
    pub user: String,
    token: String,
    gateways: Vec<String>,
    /// Mean time between two sends of this client.
    interval: Duration,
    /// Mean lifetime of a connection before the client drops it itself (no close frame) and
    /// resumes, so that resumes also happen while a Redis is down; `None`: never.
    churn: Option<Duration>,
    started: tokio::time::Instant,
    pub state: Arc<Mutex<State>>,
}

/// A lock that survives a panicked holder (the state is a log; it stays readable).
pub fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
struct ServerFrame {
    op: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    client_msg_id: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    channels: Option<Vec<ReadyChannel>>,
}

#[derive(Deserialize)]
struct ReadyChannel {
    id: String,
    last_seq: u64,
}

type Ws = WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a connection ended.
enum Ended {
    Lost(String),
    Done,
}

impl ChaosClient {
    pub fn new(
        index: usize,
        user: String,
        token: String,
        channels: Vec<String>,
        gateways: Vec<String>,
        pace: Pace,
        started: tokio::time::Instant,
    ) -> Self {
        let state = State {
            log: ClientLog {
                user: user.clone(),
                channels,
                lines: Vec::new(),
            },
            ..State::default()
        };
        ChaosClient {
            index,
            user,
            token,
            gateways,
            interval: pace.interval,
            churn: pace.churn,
            started,
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn log(&self, entry: Entry) {
        let t_ms = self.started.elapsed().as_millis() as u64;
        lock(&self.state).log.lines.push(Line { t_ms, entry });
    }

    fn client_msg_id(&self, n: u64) -> String {
        format!("{}-{n}", self.user)
    }

    /// Runs until the phase is `Done`: connects, serves, reconnects.
    pub async fn run(self, mut phase: watch::Receiver<Phase>) {
        let mut pending: Option<Pending> = None;
        let mut next_n = 1u64;
        let mut last_gateway = self.index;
        let mut failed = false;
        let mut backoff = Duration::from_millis(100);
        loop {
            if *phase.borrow() == Phase::Done {
                return;
            }
            // A random gateway each time (a fixed rotation could fall into step with the kills
            // and never be on the gateway that dies), but another one right after a failure.
            let choice = if failed {
                last_gateway + 1
            } else {
                rand::random::<usize>()
            } % self.gateways.len();
            last_gateway = choice;
            let gateway = &self.gateways[choice];
            let ws = match self.open(gateway).await {
                Ok(ws) => ws,
                Err(e) => {
                    failed = true;
                    self.log(Entry::Disconnect {
                        reason: format!("{gateway}: {e:#}"),
                    });
                    let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff + jitter) => {}
                        _ = phase.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            match self.serve(ws, &mut phase, &mut pending, &mut next_n).await {
                Ended::Done => return,
                Ended::Lost(reason) => {
                    // A connection the server reset or closed: its gateway may be gone.
                    failed = !reason.contains("churn");
                    self.log(Entry::Disconnect { reason });
                }
            }
        }
    }

    /// Connects, says hello (with `resume` after the first time) and logs `ready`.
    async fn open(&self, gateway: &str) -> Result<Ws> {
        let url = format!("{}/v1/ws", gateway.replacen("http://", "ws://", 1));
        let (mut ws, _) =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(&url))
                .await
                .map_err(|_| anyhow!("connect timed out"))??;
        let (resume, resumed) = {
            let state = lock(&self.state);
            let resume: Vec<(String, u64)> =
                state.highest.iter().map(|(c, s)| (c.clone(), *s)).collect();
            (resume, state.ready)
        };
        let hello = payload::hello_frame(&self.token, resume.iter().map(|(c, s)| (c.as_str(), *s)));
        ws.send(Message::text(hello)).await?;
        let ready = tokio::time::timeout(HELLO_TIMEOUT, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
                    Some(Ok(Message::Close(close))) => {
                        let code = close.map(|c| u16::from(c.code)).unwrap_or(1005);
                        bail!("closed with {code} during hello")
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("during hello: {e}"),
                    None => bail!("ended during hello"),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no ready within {HELLO_TIMEOUT:?}"))??;
        let frame: ServerFrame = serde_json::from_str(&ready)?;
        if frame.op != "ready" {
            bail!(
                "hello answered with {}",
                ready.chars().take(200).collect::<String>()
            );
        }
        let channels: Vec<(String, u64)> = frame
            .channels
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.id, c.last_seq))
            .collect();
        {
            let mut state = lock(&self.state);
            if !state.ready {
                // Tracking starts after what the first ready says the channel holds.
                for (channel, last) in &channels {
                    state.highest.insert(channel.clone(), *last);
                }
                state.ready = true;
            }
        }
        self.log(Entry::Ready {
            session: frame.session.unwrap_or_default(),
            resumed,
            channels,
        });
        Ok(ws)
    }

    async fn send(&self, ws: &mut Ws, pending: &mut Pending) -> Result<()> {
        pending.attempts += 1;
        let client_msg_id = self.client_msg_id(pending.n);
        let text = format!("chaos {client_msg_id}");
        let frame = serde_json::json!({
            "op": "send", "id": pending.n, "channel": pending.channel,
            "text": text, "client_msg_id": client_msg_id,
        });
        self.log(Entry::Send {
            channel: pending.channel.clone(),
            client_msg_id,
            attempt: pending.attempts,
        });
        ws.send(Message::text(frame.to_string())).await?;
        Ok(())
    }

    fn next_send_in(&self) -> Duration {
        // Uniform in [interval / 2, interval * 3 / 2): a human-ish pace, not in lockstep.
        let ms = self.interval.as_millis().max(2) as u64;
        Duration::from_millis(ms / 2 + rand::random::<u64>() % ms)
    }

    async fn serve(
        &self,
        mut ws: Ws,
        phase: &mut watch::Receiver<Phase>,
        pending: &mut Option<Pending>,
        next_n: &mut u64,
    ) -> Ended {
        // A send that was in flight when the last connection ended goes again, first.
        let mut resend_at = pending.as_ref().map(|_| tokio::time::Instant::now());
        let mut next_send = tokio::time::Instant::now() + self.next_send_in();
        let mut ping = tokio::time::interval(PING_EVERY);
        let drop_at = self.churn.map(|mean| {
            let ms = mean.as_millis().max(2) as u64;
            tokio::time::Instant::now() + Duration::from_millis(ms / 2 + rand::random::<u64>() % ms)
        });
        loop {
            let now = tokio::time::Instant::now();
            let current = *phase.borrow();
            if current == Phase::Done {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return Ended::Done;
            }
            if current == Phase::Traffic && drop_at.is_some_and(|at| at <= now) {
                // Dropped without a close frame, like a client whose network went away.
                drop(ws);
                return Ended::Lost("dropped by the client (churn)".into());
            }
            if let (Some(p), Some(at)) = (pending.as_mut(), resend_at) {
                if at <= now {
                    if let Err(e) = self.send(&mut ws, p).await {
                        return Ended::Lost(format!("sending: {e}"));
                    }
                    resend_at = Some(now + ACK_TIMEOUT);
                }
            }
            if pending.is_none() && current == Phase::Traffic && next_send <= now {
                let channel = {
                    let state = lock(&self.state);
                    let channels = &state.log.channels;
                    channels[rand::random::<usize>() % channels.len().max(1)].clone()
                };
                let mut p = Pending {
                    n: *next_n,
                    channel,
                    attempts: 0,
                };
                *next_n += 1;
                lock(&self.state).pending = true;
                if let Err(e) = self.send(&mut ws, &mut p).await {
                    *pending = Some(p);
                    return Ended::Lost(format!("sending: {e}"));
                }
                *pending = Some(p);
                resend_at = Some(now + ACK_TIMEOUT);
                next_send = now + self.next_send_in();
            }
            let mut wake = match (pending.is_some(), resend_at) {
                (true, Some(at)) => at,
                _ => next_send.max(now + Duration::from_millis(10)),
            };
            if let Some(at) = drop_at {
                wake = wake.min(at.max(now + Duration::from_millis(10)));
            }
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(retry) = self.handle(&text, pending) {
                            resend_at = Some(tokio::time::Instant::now() + retry);
                        }
                    }
                    Some(Ok(Message::Close(close))) => {
                        let code = close.map(|c| u16::from(c.code)).unwrap_or(1005);
                        return Ended::Lost(format!("closed by the server with {code}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Lost(format!("connection failed: {e}")),
                    None => return Ended::Lost("connection ended".into()),
                },
                _ = tokio::time::sleep_until(wake) => {}
                _ = ping.tick() => {
                    if let Err(e) = ws.send(Message::text(payload::PING_FRAME)).await {
                        return Ended::Lost(format!("sending ping: {e}"));
                    }
                }
                _ = phase.changed() => {}
            }
        }
    }

    /// Logs one server frame; returns when to retry the pending send if this frame refused it.
    fn handle(&self, text: &str, pending: &mut Option<Pending>) -> Option<Duration> {
        let Ok(frame) = serde_json::from_str::<ServerFrame>(text) else {
            return None;
        };
        match frame.op.as_str() {
            "event" => {
                let (Some(channel), kind) = (frame.channel, frame.kind.unwrap_or_default()) else {
                    return None;
                };
                if kind == "resync" {
                    self.log(Entry::Resync { channel });
                    return None;
                }
                let Some(seq) = frame.seq else {
                    return None; // typing, read: not log events
                };
                {
                    let mut state = lock(&self.state);
                    let highest = state.highest.entry(channel.clone()).or_default();
                    *highest = (*highest).max(seq);
                }
                self.log(Entry::Event {
                    channel,
                    seq,
                    kind,
                    client_msg_id: frame.client_msg_id,
                });
                None
            }
            "ack" => {
                let n = frame.id.as_ref().and_then(|id| id.as_u64())?;
                let (Some(channel), Some(seq)) = (frame.channel, frame.seq) else {
                    return None;
                };
                self.log(Entry::Ack {
                    channel,
                    seq,
                    client_msg_id: self.client_msg_id(n),
                });
                if pending.as_ref().is_some_and(|p| p.n == n) {
                    *pending = None;
                    lock(&self.state).pending = false;
                }
                None
            }
            "error" => {
                let n = frame.id.as_ref().and_then(|id| id.as_u64())?;
                if pending.as_ref().is_none_or(|p| p.n != n) {
                    return None;
                }
                self.log(Entry::SendError {
                    client_msg_id: self.client_msg_id(n),
                    code: frame.code.unwrap_or_default(),
                });
                Some(RETRY_AFTER)
            }
            _ => None,
        }
    }
}
