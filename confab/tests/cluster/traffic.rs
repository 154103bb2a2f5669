//! Traffic for tests that break processes under load: a sender that keeps sending to one
//! channel through whichever gateway is up, reconnecting after any close and retrying an
//! unanswered message with the same `client_msg_id` (as the JS SDK does), and that records
//! every ack, every error code, every close code and, optionally, each message's delivery
//! latency back to its own socket. A [`Timeline`] shows the acks and disruptions while the
//! sender runs, for tests that wait on them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Longest a request may go unanswered before the test calls it a hang.
pub const HANG: Duration = Duration::from_secs(10);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one sender saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// `(text, seq)` of every acked message, in send order.
    pub acked: Vec<(String, u64)>,
    /// Error replies by code.
    pub errors: BTreeMap<String, usize>,
    /// Socket closes by close code (0: closed without a code).
    pub closes: BTreeMap<u16, usize>,
    /// When each message's event reached the sender's socket, and the seconds since its
    /// send, when measured.
    pub latencies: Vec<(Instant, f64)>,
    /// When each `unavailable` reply or close arrived.
    pub disruptions: Vec<Instant>,
}

/// How a sender runs.
#[derive(Debug, Clone)]
pub struct Sender {
    /// WebSocket URLs of the gateways, tried in turn.
    pub gateways: Vec<String>,
    pub token: String,
    pub channel: String,
    /// Prefix of every text and `client_msg_id`.
    pub label: String,
    /// Pause between two messages.
    pub pace: Duration,
    /// Wait for each message's own event and record its latency.
    pub measure: bool,
}

/// What a sender did so far, as it happens (see [`Sender::run_watched`]).
#[derive(Debug, Default)]
pub struct Timeline {
    /// `(sent, acked)`: when each acked message was first sent and when its ack arrived.
    pub acks: Vec<(Instant, Instant)>,
    /// When each `unavailable` reply, refused `hello` or close arrived.
    pub disruptions: Vec<Instant>,
}

/// A sender's [`Timeline`], shared with the test.
pub type Watch = Arc<Mutex<Timeline>>;

/// Locks `watch` (a panicked holder leaves it usable: the data is only pushed to).
pub fn timeline(watch: &Watch) -> std::sync::MutexGuard<'_, Timeline> {
    watch.lock().unwrap_or_else(|e| e.into_inner())
}

enum Outcome {
    Acked(u64),
    Unavailable,
    Closed(u16),
}

impl Sender {
    /// Sends until `stop` fires (finishing the message under way), then reports.
    pub async fn run(self, stop: CancellationToken) -> Report {
        self.run_watched(stop, HANG, Watch::default()).await
    }

    /// As [`Sender::run`], but a request may go unanswered for `hang` before it counts as a
    /// hang, and every ack and disruption is also recorded in `watch` as it happens.
    pub async fn run_watched(
        self,
        stop: CancellationToken,
        hang: Duration,
        watch: Watch,
    ) -> Report {
        let mut report = Report::default();
        let mut gateway = 0;
        let mut n = 0u64;
        let mut next_id = 1u64;
        // When the message under way (`n`) was first sent; kept across its retries.
        let mut first_sent = None;
        let disrupted = |report: &mut Report| {
            let now = Instant::now();
            report.disruptions.push(now);
            timeline(&watch).disruptions.push(now);
        };
        'connect: while !stop.is_cancelled() {
            let url = &self.gateways[gateway % self.gateways.len()];
            gateway += 1;
            let mut socket = match connect(url, &self.token, hang).await {
                Ok(socket) => socket,
                Err(refusal) => {
                    if let Some(code) = refusal {
                        *report.errors.entry(code).or_default() += 1;
                    }
                    timeline(&watch).disruptions.push(Instant::now());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            while !stop.is_cancelled() {
                let text = format!("{}-{n}", self.label);
                let id = next_id;
                next_id += 1;
                let sent = Instant::now();
                let first = *first_sent.get_or_insert(sent);
                let send = json!({"op": "send", "id": id, "channel": self.channel,
                                  "text": text, "client_msg_id": text});
                if socket.send(Message::text(send.to_string())).await.is_err() {
                    *report.closes.entry(0).or_default() += 1;
                    disrupted(&mut report);
                    continue 'connect;
                }
                match self
                    .outcome(&mut socket, id, &text, sent, hang, &mut report)
                    .await
                {
                    Outcome::Acked(seq) => {
                        report.acked.push((text, seq));
                        timeline(&watch).acks.push((first, Instant::now()));
                        first_sent = None;
                        n += 1;
                        tokio::time::sleep(self.pace).await;
                    }
                    Outcome::Unavailable => {
                        disrupted(&mut report);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Outcome::Closed(code) => {
                        *report.closes.entry(code).or_default() += 1;
                        disrupted(&mut report);
                        continue 'connect;
                    }
                }
            }
            let _ = socket.close(None).await;
        }
        report
    }

    /// Reads until the reply to request `id` (and, when measuring, the message's own event).
    async fn outcome(
        &self,
        socket: &mut Socket,
        id: u64,
        text: &str,
        sent: Instant,
        hang: Duration,
        report: &mut Report,
    ) -> Outcome {
        let mut acked = None;
        let mut delivered = !self.measure;
        let deadline = tokio::time::Instant::now() + hang;
        loop {
            if let (Some(seq), true) = (acked, delivered) {
                return Outcome::Acked(seq);
            }
            let frame = match tokio::time::timeout_at(deadline, socket.next()).await {
                Err(_) => panic!("{}: no reply to message {text} within {hang:?}", self.label),
                Ok(Some(Ok(Message::Text(raw)))) => {
                    serde_json::from_str::<Value>(&raw).expect("json frame")
                }
                Ok(Some(Ok(Message::Close(close)))) => {
                    // Acked before the close: the ack counts, the latency is not measured.
                    return match acked {
                        Some(seq) => Outcome::Acked(seq),
                        None => Outcome::Closed(close.map_or(0, |c| u16::from(c.code))),
                    };
                }
                Ok(Some(Ok(_))) => continue,
                Ok(None) | Ok(Some(Err(_))) => {
                    return match acked {
                        Some(seq) => Outcome::Acked(seq),
                        None => Outcome::Closed(0),
                    }
                }
            };
            if frame["id"] == json!(id) {
                match frame["op"].as_str() {
                    Some("ack") => acked = frame["seq"].as_u64(),
                    Some("error") => {
                        let code = frame["code"].as_str().unwrap_or("?").to_string();
                        *report.errors.entry(code.clone()).or_default() += 1;
                        assert_eq!(code, "unavailable", "{}: {frame}", self.label);
                        return Outcome::Unavailable;
                    }
                    _ => panic!("{}: unexpected reply {frame}", self.label),
                }
            } else if self.measure
                && frame["op"] == "event"
                && frame["type"] == "message"
                && frame["client_msg_id"] == text
            {
                delivered = true;
                report
                    .latencies
                    .push((Instant::now(), sent.elapsed().as_secs_f64()));
            }
        }
    }
}

/// Opens a socket and says hello. `Err` when the gateway is down or refuses the socket, or
/// closes it before `ready` (its cell unreachable), with the error code it sent if any.
async fn connect(url: &str, token: &str, hang: Duration) -> Result<Socket, Option<String>> {
    let (mut socket, _) = tokio::time::timeout(hang, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| None)?
        .map_err(|_| None)?;
    let hello = json!({"op": "hello", "token": token});
    socket
        .send(Message::text(hello.to_string()))
        .await
        .map_err(|_| None)?;
    let mut refusal = None;
    loop {
        match tokio::time::timeout(hang, socket.next())
            .await
            .map_err(|_| None)?
        {
            Some(Ok(Message::Text(raw))) => {
                let frame: Value = serde_json::from_str(&raw).map_err(|_| None)?;
                if frame["op"] == "ready" {
                    return Ok(socket);
                }
                if frame["op"] == "error" {
                    refusal = frame["code"].as_str().map(str::to_string);
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Err(refusal),
            Some(Ok(_)) => {}
        }
    }
}

/// Compact: counts only, for assertion messages.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} acked, errors {:?}, closes {:?}, {} disruptions",
            self.acked.len(),
            self.errors,
            self.closes,
            self.disruptions.len()
        )
    }
}

/// Every message of `channel`, ascending by seq, read through the HTTP API of `gateway`.
pub async fn all_messages(gateway: &str, token: &str, channel: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    let mut messages = Vec::new();
    let mut after = 0u64;
    loop {
        let page: Value = client
            .get(format!(
                "{gateway}/v1/channels/{channel}/messages?after={after}&limit=200"
            ))
            .bearer_auth(token)
            .send()
            .await
            .expect("history request")
            .json()
            .await
            .expect("history json");
        let batch = page["messages"].as_array().cloned().unwrap_or_default();
        let Some(last) = batch.last().and_then(|m| m["seq"].as_u64()) else {
            return messages;
        };
        after = last;
        messages.extend(batch);
        if page["has_more"] != true {
            return messages;
        }
    }
}

/// Checks that every acked message is in `messages` at its seq with its text, that no text
/// appears twice; returns how many messages were acked.
pub fn check_nothing_lost(reports: &[Report], messages: &[Value]) -> usize {
    let by_seq: BTreeMap<u64, &str> = messages
        .iter()
        .filter_map(|m| Some((m["seq"].as_u64()?, m["text"].as_str()?)))
        .collect();
    let mut texts = std::collections::HashSet::new();
    for text in by_seq.values() {
        assert!(texts.insert(*text), "message {text} appears twice");
    }
    let mut acked = 0;
    for report in reports {
        for (text, seq) in &report.acked {
            assert_eq!(
                by_seq.get(seq).copied(),
                Some(text.as_str()),
                "acked message {text} (seq {seq}) is not in the log"
            );
            acked += 1;
        }
    }
    acked
}

/// The `q` quantile (0..=1) of `samples`, in milliseconds.
pub fn quantile_ms(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index] * 1000.0
}
