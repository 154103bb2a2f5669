//! The client fleet's building blocks: connecting (spread over loopback source addresses),
//! the confab handshake, and the receive side every connection shares ([`Inbox`]), which
//! tracks seqs, records latencies and counts events.
//!
//! One tokio task owns each connection and both its halves; there is no per-frame channel
//! hop, so the load generator spends its share of the two cores on reading frames.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use confab_shared::server::ServerFrame;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::nats;
use crate::payload::{self, Incoming};
use crate::seq::{Observation, SeqTotals, SeqTracker};
use crate::stats::{Counters, LatencyHub};
use crate::target::{ServerKind, Target};
use crate::wire::{self, WireStream};

/// A client WebSocket, over a socket that counts what arrives and inflates permessage-deflate.
pub type Ws = WebSocketStream<WireStream>;

/// Loopback source addresses to spread connections over: one address has ~28,000 ephemeral
/// ports, and a reconnect storm needs new ports while the old ones sit in TIME_WAIT.
const SOURCE_ADDRS: u8 = 8;
/// Longest wait for a TCP connection to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a handshake answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Client-side WebSocket buffers: small, since 15,000 connections share this process (the
/// library default is a 128 KiB eager read buffer per connection).
fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

/// Opens WebSockets to a target's endpoints.
#[derive(Debug, Clone)]
pub struct Connector {
    pub kind: ServerKind,
    endpoints: Vec<(String, SocketAddr)>,
    /// Connections ask confab for batched frames (`/v1/ws?batch=1`, SPEC §4).
    pub batch: bool,
    /// Connections offer confab permessage-deflate (and fail if it is not accepted).
    pub deflate: bool,
}

impl Connector {
    /// A connector to `target`'s endpoints; with `batch`, confab connections ask for batched
    /// frames, and with `deflate` they offer permessage-deflate (the reference server has
    /// neither and is asked for nothing).
    pub async fn new(target: &Target, batch: bool, deflate: bool) -> Result<Self> {
        let batch = batch && target.kind == ServerKind::Confab;
        let deflate = deflate && target.kind == ServerKind::Confab;
        let mut endpoints = Vec::new();
        for i in 0..target.bases.len() {
            let mut url = target.ws_url(i);
            if batch {
                url.push_str("?batch=1");
            }
            let host_port = crate::api::host_port(&url)?;
            let addr = tokio::net::lookup_host(&host_port)
                .await
                .with_context(|| format!("resolving {host_port}"))?
                .next()
                .with_context(|| format!("{host_port} resolves to nothing"))?;
            endpoints.push((url, addr));
        }
        if endpoints.is_empty() {
            bail!("the target has no endpoint");
        }
        Ok(Connector {
            kind: target.kind,
            endpoints,
            batch,
            deflate,
        })
    }

    /// How many endpoints connections are spread over.
    pub fn endpoints(&self) -> usize {
        self.endpoints.len()
    }

    /// Opens connection number `index` (which picks the endpoint and the source address).
    pub async fn connect(&self, index: usize) -> Result<Ws> {
        let (url, addr) = &self.endpoints[index % self.endpoints.len()];
        let socket = match addr.ip() {
            IpAddr::V4(ip) => {
                let socket = TcpSocket::new_v4()?;
                if ip.is_loopback() {
                    let source =
                        Ipv4Addr::new(127, 0, 0, 1 + (index % SOURCE_ADDRS as usize) as u8);
                    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
                }
                socket
            }
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // The kernel would retry a lost SYN for minutes; a client gives up sooner and retries.
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(*addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut request = url.as_str().into_client_request()?;
        if self.deflate {
            request.headers_mut().insert(
                "Sec-WebSocket-Extensions",
                HeaderValue::from_static(wire::DEFLATE_OFFER),
            );
        }
        let (mut ws, response) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_tungstenite::client_async_with_config(
                request,
                WireStream::new(stream),
                Some(client_ws_config()),
            ),
        )
        .await
        .map_err(|_| anyhow!("websocket handshake with {url} timed out"))?
        .with_context(|| format!("websocket handshake with {url}"))?;
        if self.deflate {
            let answer = response
                .headers()
                .get("Sec-WebSocket-Extensions")
                .and_then(|v| v.to_str().ok());
            let Some(no_context_takeover) = wire::accepted(answer) else {
                bail!("{url} did not accept permessage-deflate");
            };
            ws.get_mut().inflate(no_context_takeover);
        }
        Ok(ws)
    }

    /// [`Self::connect`] with retries and jittered backoff until `deadline`, the way a real
    /// client retries a refused or reset connection.
    pub async fn connect_retrying(
        &self,
        index: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Ws> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.connect(index).await {
                Ok(ws) => return Ok(ws),
                Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                    debug!(index, error = %e, "connect failed, retrying");
                    let jitter = Duration::from_millis(
                        rand::random::<u64>() % (backoff.as_millis() as u64 + 1),
                    );
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What `ready` said.
#[derive(Debug, Clone)]
pub struct Ready {
    pub session: String,
    pub heartbeat: Duration,
    /// The user's channels and their `last_seq`.
    pub channels: Vec<(String, u64)>,
}

/// Sends `hello` and waits for `ready`. Frames after `ready` (resume replays) stay unread.
pub async fn hello(ws: &mut Ws, token: &str, resume: &[(String, u64)]) -> Result<Ready> {
    let frame = payload::hello_frame(token, resume.iter().map(|(c, s)| (c.as_str(), *s)));
    ws.send(Message::text(frame))
        .await
        .context("sending hello")?;
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Close(close))) => {
                    let (code, reason) = close
                        .map(|c| (u16::from(c.code), c.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    bail!("closed by the server during hello: {code} {reason}")
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(anyhow!(e).context("reading the answer to hello")),
                None => bail!("connection ended during hello"),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no answer to hello within {HANDSHAKE_TIMEOUT:?}"))??;
    match serde_json::from_str::<ServerFrame>(&answer) {
        Ok(ServerFrame::Ready {
            session,
            heartbeat_ms,
            channels,
            ..
        }) => Ok(Ready {
            session: session.as_str().to_string(),
            heartbeat: Duration::from_millis(heartbeat_ms.max(1000)),
            channels: channels
                .into_iter()
                .map(|c| (c.id.as_str().to_string(), c.last_seq))
                .collect(),
        }),
        Ok(ServerFrame::Error { code, message, .. }) => {
            bail!("hello refused: {} {message}", code.as_str())
        }
        Ok(_) | Err(_) => bail!(
            "unexpected answer to hello: {}",
            answer.chars().take(200).collect::<String>()
        ),
    }
}

/// What every connection of a run shares: counters and the latency histograms.
#[derive(Debug, Default)]
pub struct Shared {
    pub counters: Counters,
    pub latency: LatencyHub,
    /// Connections that finished resuming (reconnect storm).
    pub resumed: AtomicU64,
}

/// What a received frame was, for the loops that act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A `message` event (also counted and measured when the inbox measures).
    Message {
        channel: String,
        seq: u64,
    },
    Ack {
        channel: Option<String>,
        seq: u64,
    },
    Error {
        code: String,
    },
    Other,
}

/// The receive-side state of one connection.
#[derive(Debug)]
pub struct Inbox {
    /// The connection's index, used to spread latency samples over histogram shards.
    pub index: usize,
    /// Per-stream seq trackers.
    pub trackers: HashMap<Box<str>, SeqTracker>,
    /// Create a tracker (from seq 0) for a stream seen for the first time: reference streams
    /// start when the run starts. Against confab, trackers come from `ready` instead.
    pub auto_streams: bool,
    /// Whether this connection's deliveries count in the run's figures.
    pub measure: bool,
    /// Whether typing events count as deliveries (chat mix).
    pub count_typing: bool,
    /// Channels still to catch up to (seq) before this connection counts as resumed.
    pub resume_targets: Vec<(Box<str>, u64)>,
    /// When the connection finished resuming, µs since the epoch.
    pub resumed_at_us: Option<u64>,
    /// Frames that could not be read.
    pub unreadable: u64,
    /// When this connection last received a measured message, µs since the epoch.
    pub last_delivery_us: u64,
    /// Against NATS: the reader of its protocol, whose messages' payloads are the frames.
    pub nats: Option<nats::Parser>,
}

impl Inbox {
    pub fn new(index: usize, measure: bool) -> Self {
        Inbox {
            index,
            trackers: HashMap::new(),
            auto_streams: false,
            measure,
            count_typing: false,
            resume_targets: Vec::new(),
            resumed_at_us: None,
            unreadable: 0,
            last_delivery_us: 0,
            nats: None,
        }
    }

    /// An inbox for a NATS connection: every stream is tracked from seq 0 (like the
    /// reference server's), and binary frames are read as NATS protocol.
    pub fn for_nats(index: usize, measure: bool) -> Self {
        Inbox {
            auto_streams: true,
            nats: Some(nats::Parser::default()),
            ..Inbox::new(index, measure)
        }
    }

    /// Starts tracking the channels listed in `ready`, each from its `last_seq`, unless the
    /// channel is tracked already (a resumed connection keeps its trackers).
    pub fn track_ready(&mut self, ready: &Ready) {
        for (channel, last_seq) in &ready.channels {
            self.trackers
                .entry(channel.as_str().into())
                .or_insert_with(|| SeqTracker::starting_after(*last_seq));
        }
    }

    /// After a resumed `ready`: the connection counts as resumed once every channel has caught
    /// up to its `last_seq` in that `ready`.
    pub fn expect_resume(&mut self, ready: &Ready, shared: &Shared) {
        self.resume_targets = ready
            .channels
            .iter()
            .map(|(c, s)| (c.as_str().into(), *s))
            .collect();
        self.resumed_at_us = None;
        self.check_resumed(shared);
    }

    fn check_resumed(&mut self, shared: &Shared) {
        if self.resumed_at_us.is_some() {
            return;
        }
        let trackers = &self.trackers;
        self.resume_targets
            .retain(|(c, s)| !trackers.get(c).is_some_and(|t| t.complete_up_to(*s)));
        if self.resume_targets.is_empty() {
            self.resumed_at_us = Some(payload::now_us());
            shared.resumed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `resume` map for a reconnect: the highest seq seen per channel.
    pub fn resume_map(&self) -> Vec<(String, u64)> {
        self.trackers
            .iter()
            .map(|(c, t)| (c.to_string(), t.highest()))
            .collect()
    }

    /// Handles one text frame holding one server frame (see [`Self::handle_each`] for frames
    /// that may hold a batch).
    pub fn handle(&mut self, frame: &str, shared: &Shared) -> Received {
        let Ok(incoming) = Incoming::parse(frame) else {
            self.unreadable += 1;
            return Received::Other;
        };
        self.handle_incoming(&incoming, shared)
    }

    /// Handles one text frame: a server frame, or a batch of them (a JSON array, `?batch=1`),
    /// calling `each` with what each of them was, in order.
    pub fn handle_each(&mut self, frame: &str, shared: &Shared, mut each: impl FnMut(Received)) {
        if !frame.trim_start().starts_with('[') {
            each(self.handle(frame, shared));
            return;
        }
        match serde_json::from_str::<Vec<Incoming<'_>>>(frame) {
            Ok(batch) => {
                for incoming in &batch {
                    each(self.handle_incoming(incoming, shared));
                }
            }
            Err(_) => self.unreadable += 1,
        }
    }

    /// Handles one binary frame of a NATS connection: each message payload in it (a frame, as
    /// [`Self::handle`] reads it), calling `each` with what it was. Returns how many `PING`s
    /// the frame held, each to be answered with [`nats::PONG`].
    pub fn handle_nats(
        &mut self,
        data: &[u8],
        shared: &Shared,
        mut each: impl FnMut(Received),
    ) -> Result<usize, nats::ParseError> {
        let Some(mut parser) = self.nats.take() else {
            self.unreadable += 1;
            return Ok(0);
        };
        let mut pings = 0;
        let result = parser.feed(data, |op| match op {
            nats::Op::Msg(payload) => match std::str::from_utf8(payload) {
                Ok(frame) => each(self.handle(frame, shared)),
                Err(_) => self.unreadable += 1,
            },
            nats::Op::Ping => pings += 1,
            nats::Op::Pong | nats::Op::Other => {}
        });
        self.nats = Some(parser);
        result.map(|()| pings)
    }

    fn handle_incoming(&mut self, incoming: &Incoming<'_>, shared: &Shared) -> Received {
        match incoming.op.as_ref() {
            "event" => self.event(incoming, shared),
            "ack" => Received::Ack {
                channel: incoming.channel.as_ref().map(|c| c.to_string()),
                seq: incoming.seq.unwrap_or(0),
            },
            "error" => {
                Counters::bump(&shared.counters.errors);
                let code = incoming.code.as_deref().unwrap_or("").to_string();
                if code == "rate_limited" {
                    Counters::bump(&shared.counters.rate_limited);
                } else {
                    debug!(index = self.index, %code, message = ?incoming.message, "error frame");
                }
                Received::Error { code }
            }
            _ => Received::Other,
        }
    }

    fn event(&mut self, incoming: &Incoming<'_>, shared: &Shared) -> Received {
        let Some(channel) = incoming.channel.as_deref() else {
            return Received::Other;
        };
        match incoming.kind.as_deref() {
            Some("message") => {}
            Some("typing") => {
                if self.measure && self.count_typing {
                    Counters::bump(&shared.counters.delivered);
                    Counters::bump(&shared.counters.typing);
                }
                return Received::Other;
            }
            Some("resync") => {
                Counters::bump(&shared.counters.resyncs);
                return Received::Other;
            }
            // Other log events (edits, membership) still take a seq in the channel.
            Some(_) => {
                if let (Some(seq), Some(t)) = (incoming.seq, self.trackers.get_mut(channel)) {
                    t.observe(seq);
                }
                return Received::Other;
            }
            None => return Received::Other,
        }
        let Some(seq) = incoming.seq else {
            self.unreadable += 1;
            return Received::Other;
        };
        if self.measure {
            let now = payload::now_us();
            if let Some(published) = incoming.text.as_deref().and_then(payload::parse_publish_us) {
                shared
                    .latency
                    .record(self.index, now.saturating_sub(published));
            }
            // One shared atomic per delivery: the message count is derived (delivered minus
            // typing) and the latest delivery time is kept per connection, because every
            // shared write here is paid a million times a second at max rate.
            Counters::bump(&shared.counters.delivered);
            self.last_delivery_us = now;
        }
        let tracker = match self.trackers.get_mut(channel) {
            Some(t) => Some(t),
            None if self.auto_streams => Some(
                self.trackers
                    .entry(channel.into())
                    .or_insert_with(|| SeqTracker::starting_after(0)),
            ),
            None => None,
        };
        if let Some(tracker) = tracker {
            if let Observation::Gap { skipped } = tracker.observe(seq) {
                debug!(index = self.index, channel, seq, skipped, "seq gap");
            }
        }
        if !self.resume_targets.is_empty() {
            self.check_resumed(shared);
        }
        Received::Message {
            channel: channel.to_string(),
            seq,
        }
    }

    /// This inbox's counters against the final seq of every stream it should have seen
    /// (`finals`: stream -> last seq published). A stream never seen counts as all lost from
    /// `default_start`.
    pub fn totals(&self, finals: &HashMap<String, u64>, default_start: u64) -> SeqTotals {
        let mut totals = SeqTotals::default();
        for (stream, final_seq) in finals {
            match self.trackers.get(stream.as_str()) {
                Some(t) => totals.add(t, *final_seq),
                None => totals.add_unseen(default_start, *final_seq),
            }
        }
        totals
    }
}

/// How a connection loop ended.
#[derive(Debug)]
pub enum Ended {
    /// Stopped by the run; the socket is handed back (to be closed or dropped abruptly).
    Stopped(Box<Ws>),
    /// The server closed the connection or it failed.
    Lost(String),
}

/// Reads and handles frames until `stop`, sending a `ping` every heartbeat (confab only) and
/// answering NATS's `PING`s.
pub async fn receive_loop(
    mut ws: Ws,
    inbox: &mut Inbox,
    shared: &Shared,
    heartbeat: Option<Duration>,
    stop: &CancellationToken,
) -> Ended {
    let period = heartbeat.unwrap_or(Duration::from_secs(3600));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ended::Stopped(Box::new(ws)),
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    if inbox.measure {
                        Counters::bump(&shared.counters.frames);
                    }
                    inbox.handle_each(&text, shared, |_| {});
                }
                Some(Ok(Message::Binary(data))) if inbox.nats.is_some() => {
                    if inbox.measure {
                        Counters::bump(&shared.counters.frames);
                    }
                    match inbox.handle_nats(&data, shared, |_| {}) {
                        Ok(0) => {}
                        Ok(_) => {
                            if let Err(e) = ws.send(Message::binary(nats::PONG)).await {
                                Counters::bump(&shared.counters.disconnects);
                                return Ended::Lost(format!("sending PONG: {e}"));
                            }
                        }
                        Err(e) => {
                            Counters::bump(&shared.counters.disconnects);
                            return Ended::Lost(e.to_string());
                        }
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    Counters::bump(&shared.counters.disconnects);
                    let code = close.map(|c| u16::from(c.code)).unwrap_or(1005);
                    return Ended::Lost(format!("closed by the server with {code}"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    Counters::bump(&shared.counters.disconnects);
                    return Ended::Lost(format!("connection failed: {e}"));
                }
                None => {
                    Counters::bump(&shared.counters.disconnects);
                    return Ended::Lost("connection ended".into());
                }
            },
            _ = ping.tick(), if heartbeat.is_some() => {
                if let Err(e) = ws.send(Message::text(payload::PING_FRAME)).await {
                    Counters::bump(&shared.counters.disconnects);
                    return Ended::Lost(format!("sending ping: {e}"));
                }
            }
        }
    }
}

/// Closes a stopped connection with a normal close, without waiting long for the answer.
pub async fn close_gracefully(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(channel: &str, seq: u64, text: &str) -> String {
        payload::reference_frame(channel, seq, "u", text)
    }

    #[test]
    fn inbox_tracks_seqs_and_records_latency() {
        let shared = Shared::default();
        let mut inbox = Inbox::new(0, true);
        inbox.auto_streams = true;
        let text = payload::make_text(payload::now_us(), 50);
        for seq in [1, 2, 4, 3, 3] {
            inbox.handle(&message("s", seq, &text), &shared);
        }
        let finals = HashMap::from([("s".to_string(), 5), ("never".to_string(), 2)]);
        let totals = inbox.totals(&finals, 0);
        assert_eq!(totals.received, 4);
        assert_eq!(totals.duplicates, 1);
        assert_eq!(totals.order_violations, 1);
        assert_eq!(totals.losses, 1 + 2);
        assert_eq!(Counters::get(&shared.counters.delivered), 5);
        assert!(inbox.last_delivery_us > 0);
        assert_eq!(shared.latency.summary().samples, 5);
    }

    #[test]
    fn confab_inbox_ignores_untracked_channels_and_counts_errors() {
        let shared = Shared::default();
        let mut inbox = Inbox::new(1, false);
        inbox.track_ready(&Ready {
            session: "s".into(),
            heartbeat: Duration::from_secs(30),
            channels: vec![("general".into(), 2)],
        });
        inbox.handle(&message("general", 3, "hi"), &shared);
        inbox.handle(&message("other", 1, "hi"), &shared);
        inbox.handle(
            r#"{"op":"error","id":null,"code":"rate_limited","message":"x","retry_after_ms":5}"#,
            &shared,
        );
        assert_eq!(inbox.trackers.len(), 1);
        assert_eq!(inbox.trackers["general"].highest(), 3);
        assert_eq!(
            Counters::get(&shared.counters.delivered),
            0,
            "not measuring"
        );
        assert_eq!(Counters::get(&shared.counters.rate_limited), 1);
        assert_eq!(inbox.resume_map(), vec![("general".to_string(), 3)]);
    }

    #[test]
    fn a_batched_frame_is_handled_as_each_of_its_frames_in_order() {
        let shared = Shared::default();
        let mut inbox = Inbox::new(0, true);
        inbox.auto_streams = true;
        let batch = format!(
            "[{},{},{}]",
            message("s", 1, "a"),
            r#"{"op":"ack","id":1,"channel":"s","seq":2,"ts":1}"#,
            message("s", 2, "b")
        );
        let mut seen = Vec::new();
        inbox.handle_each(&batch, &shared, |r| seen.push(r));
        assert_eq!(
            seen,
            [
                Received::Message {
                    channel: "s".into(),
                    seq: 1
                },
                Received::Ack {
                    channel: Some("s".into()),
                    seq: 2
                },
                Received::Message {
                    channel: "s".into(),
                    seq: 2
                },
            ]
        );
        assert_eq!(Counters::get(&shared.counters.delivered), 2);
        let mut single = Vec::new();
        inbox.handle_each(&message("s", 3, "c"), &shared, |r| single.push(r));
        assert_eq!(single.len(), 1);
        inbox.handle_each("[not json", &shared, |_| panic!("nothing to handle"));
        assert_eq!(inbox.unreadable, 1);
    }

    #[test]
    fn resume_completes_when_every_channel_caught_up() {
        let shared = Shared::default();
        let mut inbox = Inbox::new(0, false);
        let ready = Ready {
            session: "s".into(),
            heartbeat: Duration::from_secs(30),
            channels: vec![("a".into(), 1), ("b".into(), 3)],
        };
        inbox.track_ready(&Ready {
            channels: vec![("a".into(), 1), ("b".into(), 1)],
            ..ready.clone()
        });
        inbox.expect_resume(&ready, &shared);
        assert!(inbox.resumed_at_us.is_none());
        inbox.handle(&message("b", 2, "x"), &shared);
        assert!(inbox.resumed_at_us.is_none());
        inbox.handle(&message("b", 3, "x"), &shared);
        assert!(inbox.resumed_at_us.is_some());
        assert_eq!(shared.resumed.load(Ordering::Relaxed), 1);
    }
}
