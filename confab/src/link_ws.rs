//! The gateway↔cell link over a WebSocket: the transport of `confab gateway` and `confab cell`.
//!
//! The gateway opens one WebSocket per cell, to `<advertise>/v1/link`, and the two sides
//! authenticate each other before anything else crosses:
//!
//! 1. gateway → cell [`LinkHello`]: its name and a random nonce;
//! 2. cell → gateway [`LinkChallenge`]: its id, its own nonce and, with a cluster secret, an
//!    HMAC-SHA256 keyed with the secret over both names and both nonces; a gateway with a
//!    secret refuses a cell whose proof is missing or wrong;
//! 3. gateway → cell [`LinkAuth`]: the gateway's HMAC over the same transcript (another role
//!    label, so a proof cannot be reflected); a cell with a secret refuses a wrong one;
//! 4. cell → gateway [`LinkWelcome`]: the link is open.
//!
//! The secret never crosses the wire, and fresh nonces on both sides keep a recorded handshake
//! from being replayed. A cell without a secret accepts links from loopback peers only.
//! Until the handshake is done a peer is a stranger: it may send at most [`PREAUTH_BYTES`]
//! bytes, must finish within [`HANDSHAKE_DEADLINE`], and at most [`MAX_PENDING_LINKS`]
//! strangers are served at once; what it says about itself is logged truncated.
//!
//! Then both sides send binary frames built by [`FrameWriter`]: a writer drains everything
//! queued so far into one batch frame, so a burst of deliveries costs one frame and one
//! syscall, and a message larger than a frame travels as fragments the other side joins, so
//! no single reply can exceed the transport's frame bound and cut the link. Pings keep the
//! link honest: silence for [`LINK_DEADLINE`] counts as a lost link.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use async_trait::async_trait;
use confab_cells::Cell;
use confab_directory::CellRecord;
use confab_gateway::{CellConnection, CellConnector, LinkError, LinkSink};
use confab_shared::link::{
    self, CellError, FrameWriter, Framing, LinkAuth, LinkChallenge, LinkHello, LinkNonce,
    LinkProof, LinkRole, LinkWelcome, Reassembler, ToCell, ToGateway,
};
use confab_shared::{CellId, ErrorCode};
use futures_util::{SinkExt, Stream, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Messages queued per link direction before the link counts as overloaded.
pub const LINK_QUEUE: usize = 64 * 1024;
/// Ping interval on an idle link.
const LINK_PING: Duration = Duration::from_secs(3);
/// A link silent for this long is lost.
pub const LINK_DEADLINE: Duration = Duration::from_secs(10);
/// Time allowed to open a link and finish its handshake, on both sides.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);
/// Bytes a peer may send before it is authenticated (hello, auth and a few pings fit).
pub const PREAUTH_BYTES: usize = 8 * 1024;
/// Links in their handshake a cell serves at once; more are answered `503` at the upgrade.
pub const MAX_PENDING_LINKS: usize = 64;
/// Longest gateway name a cell accepts.
const MAX_GATEWAY_NAME: usize = 64;
/// Characters of a peer-supplied string that reach a log line.
const LOGGED_CHARS: usize = 64;

type HmacSha256 = Hmac<Sha256>;

fn new_nonce() -> LinkNonce {
    use rand::RngCore;
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

fn mac(secret: &str, transcript: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("hmac accepts keys of any length"));
    mac.update(transcript);
    mac
}

/// This side's proof that it holds `secret`.
fn prove(secret: &str, transcript: &[u8]) -> LinkProof {
    mac(secret, transcript).finalize().into_bytes().into()
}

/// Whether `proof` shows the other side holds `secret` (compared in constant time).
fn verify(secret: &str, transcript: &[u8], proof: &LinkProof) -> bool {
    mac(secret, transcript).verify_slice(proof).is_ok()
}

/// A peer-supplied string as it may appear in a log line: at most [`LOGGED_CHARS`]
/// characters, control characters replaced, so a stranger can neither flood nor forge logs.
pub fn for_log(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(LOGGED_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(LOGGED_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Whether a link from `peer` may be served by a cell without a cluster secret.
pub fn is_loopback(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

fn valid_gateway_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_GATEWAY_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// What a cell says when a reply cannot cross the link at all (over [`link::MAX_LINK_MESSAGE`]):
/// the waiting request gets an error at once instead of waiting out its timeout.
fn refusal_of_reply(message: &ToGateway) -> Option<ToGateway> {
    match message {
        ToGateway::Reply { req, .. } => Some(ToGateway::Reply {
            req: *req,
            result: Err(CellError::new(
                ErrorCode::TooLarge,
                "the reply is too large to send",
            )),
        }),
        ToGateway::Ready { session, .. } => Some(ToGateway::AttachFailed {
            session: session.clone(),
            error: CellError::unavailable("the session's channels are too large to send"),
        }),
        _ => None,
    }
}

/// Drains what is queued (at least one message) into the frames of one write.
async fn next_frames<T: serde::Serialize>(
    queue: &mut mpsc::Receiver<T>,
    writer: &mut FrameWriter,
    refusal: fn(&T) -> Option<T>,
) -> Option<Vec<Vec<u8>>> {
    let first = queue.recv().await?;
    add(writer, &first, refusal);
    while !writer.is_full() {
        match queue.try_recv() {
            Ok(message) => add(writer, &message, refusal),
            Err(_) => break,
        }
    }
    Some(writer.take())
}

fn add<T: serde::Serialize>(writer: &mut FrameWriter, message: &T, refusal: fn(&T) -> Option<T>) {
    if let Err(e) = writer.push(message) {
        tracing::error!(error = %e, "link message dropped");
        if let Some(substitute) = refusal(message) {
            let _ = writer.push(&substitute);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Gateway side

/// Opens WebSocket links to cells.
pub struct WsConnector {
    pub gateway: String,
    pub secret: Option<String>,
    /// Largest frame the link sends or accepts.
    pub max_frame: usize,
}

struct QueueSink(mpsc::Sender<ToCell>);

impl LinkSink for QueueSink {
    fn send(&self, message: ToCell) -> Result<(), LinkError> {
        self.0
            .try_send(message)
            .map_err(|e| LinkError(format!("link queue: {e}")))
    }
}

fn link_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!("{base}/v1/link")
}

type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next handshake message from the cell.
async fn read_from_cell<T: serde::de::DeserializeOwned>(
    socket: &mut ClientSocket,
) -> Result<T, LinkError> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Binary(bytes))) => {
                return link::decode(&bytes)
                    .map_err(|e| LinkError(format!("bad handshake from the cell: {e}")))
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(LinkError(format!("cell refused the link: {frame:?}")))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(LinkError(format!("during the handshake: {e}"))),
            None => return Err(LinkError("cell closed during the handshake".into())),
        }
    }
}

impl WsConnector {
    /// Opens the WebSocket and runs the handshake (module docs): the cell proves itself first.
    async fn open(&self, url: &str, cell: &CellId) -> Result<ClientSocket, LinkError> {
        let config = WebSocketConfig::default()
            .max_frame_size(Some(self.max_frame))
            .max_message_size(Some(self.max_frame));
        let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .map_err(|e| LinkError(format!("connecting to {url}: {e}")))?;
        let gateway_nonce = new_nonce();
        let hello = LinkHello {
            gateway: self.gateway.clone(),
            nonce: gateway_nonce,
        };
        socket
            .send(Message::Binary(link::encode(&hello).into()))
            .await
            .map_err(|e| LinkError(format!("sending hello: {e}")))?;
        let challenge: LinkChallenge = read_from_cell(&mut socket).await?;
        if &challenge.cell != cell {
            return Err(LinkError(format!(
                "{url} is cell {}, not {cell}",
                challenge.cell
            )));
        }
        let transcript =
            |role| link::transcript(role, &self.gateway, cell, &gateway_nonce, &challenge.nonce);
        let proof = match (&self.secret, &challenge.proof) {
            (None, _) => None,
            (Some(secret), Some(proof)) if verify(secret, &transcript(LinkRole::Cell), proof) => {
                Some(prove(secret, &transcript(LinkRole::Gateway)))
            }
            (Some(_), Some(_)) => {
                let _ = socket.close(None).await;
                return Err(LinkError(format!(
                    "{url} failed to prove it holds the cluster secret; refused"
                )));
            }
            (Some(_), None) => {
                let _ = socket.close(None).await;
                return Err(LinkError(format!("{url} has no cluster secret; refused")));
            }
        };
        socket
            .send(Message::Binary(link::encode(&LinkAuth { proof }).into()))
            .await
            .map_err(|e| LinkError(format!("sending the proof: {e}")))?;
        let welcome: LinkWelcome = read_from_cell(&mut socket).await?;
        if &welcome.cell != cell {
            return Err(LinkError(format!(
                "{url} is cell {}, not {cell}",
                welcome.cell
            )));
        }
        Ok(socket)
    }
}

#[async_trait]
impl CellConnector for WsConnector {
    async fn connect(&self, cell: &CellRecord) -> Result<CellConnection, LinkError> {
        let url = link_url(&cell.url);
        let socket = tokio::time::timeout(HANDSHAKE_DEADLINE, self.open(&url, &cell.id))
            .await
            .map_err(|_| LinkError(format!("opening {url} timed out")))??;
        let (to_cell, outbound) = mpsc::channel(LINK_QUEUE);
        let (inbound_tx, inbound) = mpsc::channel(LINK_QUEUE);
        let lost = CancellationToken::new();
        tokio::spawn(pump_gateway_link(
            socket,
            outbound,
            inbound_tx,
            lost.clone(),
            Framing::for_max_frame(self.max_frame),
        ));
        Ok(CellConnection {
            sink: Box::new(QueueSink(to_cell)),
            inbound,
            lost,
        })
    }
}

/// Moves messages between the link socket and the gateway's queues until either side ends.
async fn pump_gateway_link(
    socket: ClientSocket,
    mut outbound: mpsc::Receiver<ToCell>,
    inbound: mpsc::Sender<ToGateway>,
    lost: CancellationToken,
    framing: Framing,
) {
    let (mut write, mut read) = socket.split();
    let writer_lost = lost.clone();
    let writer = tokio::spawn(async move {
        let mut frames = FrameWriter::new(framing);
        let mut ping = tokio::time::interval(LINK_PING);
        'pump: loop {
            let batch = tokio::select! {
                () = writer_lost.cancelled() => break,
                batch = next_frames(&mut outbound, &mut frames, |_| None) => match batch {
                    Some(batch) => batch,
                    None => break,
                },
                _ = ping.tick() => vec![],
            };
            if batch.is_empty() {
                if write.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
                continue;
            }
            for frame in batch {
                if write.feed(Message::Binary(frame.into())).await.is_err() {
                    break 'pump;
                }
            }
            if write.flush().await.is_err() {
                break;
            }
        }
        let _ = write.close().await;
        writer_lost.cancel();
    });
    let mut reassembler = Reassembler::default();
    let mut last_heard = Instant::now();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    'read: loop {
        let frame = tokio::select! {
            () = lost.cancelled() => break,
            _ = check.tick() => {
                if last_heard.elapsed() > LINK_DEADLINE {
                    tracing::warn!("cell link silent too long");
                    break;
                }
                continue;
            }
            frame = read.next() => frame,
        };
        last_heard = Instant::now();
        match frame {
            Some(Ok(Message::Binary(bytes))) => {
                let messages = match reassembler.push::<ToGateway>(&bytes) {
                    Ok(messages) => messages,
                    Err(e) => {
                        tracing::error!(error = %e, "bad frame on a cell link");
                        break;
                    }
                };
                for message in messages {
                    if inbound.send(message).await.is_err() {
                        break 'read;
                    }
                }
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "cell link failed");
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    lost.cancel();
    let _ = writer.await;
}

// ---------------------------------------------------------------------------------------
// Cell side

/// What the cell's `/v1/link` endpoint needs.
pub struct LinkEndpoint {
    cell: Cell,
    cell_id: CellId,
    secret: Option<String>,
    max_frame: usize,
    /// Links between their upgrade and the end of their handshake.
    pending: Arc<AtomicUsize>,
}

impl LinkEndpoint {
    /// `secret: None` (or empty) serves loopback peers only.
    pub fn new(cell: Cell, cell_id: CellId, secret: Option<String>, max_frame: usize) -> Self {
        LinkEndpoint {
            cell,
            cell_id,
            secret: secret.filter(|s| !s.is_empty()),
            max_frame,
            pending: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// A place among the [`MAX_PENDING_LINKS`] links a cell serves in their handshake; freed on
/// drop.
struct PendingSlot(Arc<AtomicUsize>);

impl PendingSlot {
    fn take(pending: &Arc<AtomicUsize>) -> Option<PendingSlot> {
        if pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING_LINKS {
            pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(PendingSlot(Arc::clone(pending)))
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the peer has authenticated, and whether it sent too much before.
#[derive(Default)]
struct PreAuth {
    authenticated: AtomicBool,
    exceeded: AtomicBool,
}

/// The request body of a link (the WebSocket's bytes), cut off once a peer that has not
/// authenticated sent more than [`PREAUTH_BYTES`]: a stranger can make the cell hold no
/// more than that, whatever frame length it announces.
struct PreAuthPayload {
    inner: web::Payload,
    state: Arc<PreAuth>,
    seen: usize,
}

impl Stream for PreAuthPayload {
    type Item = Result<web::Bytes, actix_web::error::PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(bytes))) = &next {
            if !this.state.authenticated.load(Ordering::Acquire) {
                this.seen = this.seen.saturating_add(bytes.len());
                if this.seen > PREAUTH_BYTES {
                    this.state.exceeded.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(actix_web::error::PayloadError::Overflow)));
                }
            }
        }
        next
    }
}

/// `GET /v1/link`: a gateway's link.
pub async fn link_route(
    req: HttpRequest,
    body: web::Payload,
    endpoint: web::Data<LinkEndpoint>,
) -> Result<HttpResponse, actix_web::Error> {
    let peer = req.peer_addr();
    if endpoint.secret.is_none() && !peer.is_some_and(|p| is_loopback(p.ip())) {
        tracing::warn!(
            peer = ?peer,
            "link refused: not from loopback and this cell has no --cluster-secret"
        );
        return Ok(HttpResponse::Forbidden().json(serde_json::json!({
            "error": "forbidden",
            "message": "this cell accepts links from loopback addresses only",
        })));
    }
    let Some(slot) = PendingSlot::take(&endpoint.pending) else {
        tracing::warn!(peer = ?peer, "link refused: too many links in their handshake");
        return Ok(HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(serde_json::json!({
                "error": "unavailable",
                "message": "too many links in their handshake",
            })));
    };
    let state = Arc::new(PreAuth::default());
    let bounded = PreAuthPayload {
        inner: body,
        state: Arc::clone(&state),
        seen: 0,
    };
    let boxed: Pin<Box<dyn Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>>>> =
        Box::pin(bounded);
    let mut payload = actix_web::dev::Payload::from(boxed);
    let body = web::Payload::from_request(&req, &mut payload).await?;
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let stream = stream
        .max_frame_size(endpoint.max_frame)
        .aggregate_continuations()
        .max_continuation_size(endpoint.max_frame);
    actix_rt::spawn(serve_link(
        endpoint.into_inner(),
        session,
        stream,
        state,
        slot,
        peer,
    ));
    Ok(response)
}

/// Why a cell ends a link during its handshake.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("more than {PREAUTH_BYTES} bytes before authenticating")]
    Oversized,
    #[error("closed or failed during the handshake")]
    Closed,
    #[error("malformed handshake message")]
    Malformed,
    #[error("invalid gateway name {0:?}")]
    BadName(String),
    #[error("wrong cluster secret")]
    WrongSecret,
    #[error("no cluster secret")]
    NoSecret,
    #[error("no handshake within {HANDSHAKE_DEADLINE:?}")]
    Timeout,
}

impl Refusal {
    fn close_code(&self) -> actix_ws::CloseCode {
        match self {
            Refusal::Oversized => actix_ws::CloseCode::Size,
            _ => actix_ws::CloseCode::Policy,
        }
    }
}

async fn serve_link(
    endpoint: Arc<LinkEndpoint>,
    mut session: actix_ws::Session,
    mut stream: actix_ws::AggregatedMessageStream,
    state: Arc<PreAuth>,
    slot: PendingSlot,
    peer: Option<SocketAddr>,
) {
    let handshake = tokio::time::timeout(
        HANDSHAKE_DEADLINE,
        handshake(&endpoint, &mut session, &mut stream, &state),
    )
    .await
    .unwrap_or(Err(Refusal::Timeout));
    let gateway = match handshake {
        Ok(gateway) => gateway,
        Err(refusal) => {
            tracing::warn!(peer = ?peer, reason = %refusal, "link refused");
            let reason = actix_ws::CloseReason {
                code: refusal.close_code(),
                description: Some(refusal.to_string()),
            };
            let _ = session.close(Some(reason)).await;
            return;
        }
    };
    state.authenticated.store(true, Ordering::Release);
    drop(slot);
    let welcome = LinkWelcome {
        cell: endpoint.cell_id.clone(),
    };
    if session.binary(link::encode(&welcome)).await.is_err() {
        return;
    }
    tracing::info!(gateway = %gateway, "gateway linked");
    let (outbound_tx, outbound) = mpsc::channel(LINK_QUEUE);
    let handle = endpoint.cell.connect(gateway.clone(), outbound_tx);
    let lost = handle.lost_token();
    let writer = actix_rt::spawn(write_cell_link(
        session.clone(),
        outbound,
        lost.clone(),
        Framing::for_max_frame(endpoint.max_frame),
    ));
    let mut reassembler = Reassembler::default();
    let mut last_heard = Instant::now();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let message = tokio::select! {
            () = lost.cancelled() => break,
            _ = check.tick() => {
                if last_heard.elapsed() > LINK_DEADLINE { break; }
                continue;
            }
            message = stream.recv() => message,
        };
        last_heard = Instant::now();
        match message {
            Some(Ok(actix_ws::AggregatedMessage::Binary(bytes))) => {
                match reassembler.push::<ToCell>(&bytes) {
                    Ok(messages) => {
                        for message in messages {
                            handle.send(message);
                        }
                    }
                    Err(e) => {
                        tracing::error!(gateway = %gateway, error = %e, "bad frame on a link");
                        break;
                    }
                }
            }
            Some(Ok(actix_ws::AggregatedMessage::Ping(payload))) => {
                let _ = session.pong(&payload).await;
            }
            Some(Ok(actix_ws::AggregatedMessage::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    lost.cancel();
    drop(handle);
    let _ = writer.await;
    tracing::info!(gateway = %gateway, "gateway link closed");
}

/// The cell's side of the handshake (module docs); the authenticated gateway's name.
async fn handshake(
    endpoint: &LinkEndpoint,
    session: &mut actix_ws::Session,
    stream: &mut actix_ws::AggregatedMessageStream,
    state: &PreAuth,
) -> Result<String, Refusal> {
    let hello: LinkHello = read_from_gateway(stream, state).await?;
    if !valid_gateway_name(&hello.gateway) {
        return Err(Refusal::BadName(for_log(&hello.gateway)));
    }
    let cell_nonce = new_nonce();
    let transcript = |role| {
        link::transcript(
            role,
            &hello.gateway,
            &endpoint.cell_id,
            &hello.nonce,
            &cell_nonce,
        )
    };
    let challenge = LinkChallenge {
        cell: endpoint.cell_id.clone(),
        nonce: cell_nonce,
        proof: endpoint
            .secret
            .as_deref()
            .map(|secret| prove(secret, &transcript(LinkRole::Cell))),
    };
    session
        .binary(link::encode(&challenge))
        .await
        .map_err(|_| Refusal::Closed)?;
    let auth: LinkAuth = read_from_gateway(stream, state).await?;
    if let Some(secret) = endpoint.secret.as_deref() {
        match auth.proof {
            Some(proof) if verify(secret, &transcript(LinkRole::Gateway), &proof) => {}
            Some(_) => return Err(Refusal::WrongSecret),
            None => return Err(Refusal::NoSecret),
        }
    }
    Ok(hello.gateway)
}

async fn read_from_gateway<T: serde::de::DeserializeOwned>(
    stream: &mut actix_ws::AggregatedMessageStream,
    state: &PreAuth,
) -> Result<T, Refusal> {
    loop {
        match stream.recv().await {
            Some(Ok(actix_ws::AggregatedMessage::Binary(bytes))) => {
                return link::decode(&bytes).map_err(|_| Refusal::Malformed)
            }
            Some(Ok(
                actix_ws::AggregatedMessage::Ping(_) | actix_ws::AggregatedMessage::Pong(_),
            )) => {}
            Some(Err(_)) if state.exceeded.load(Ordering::Acquire) => {
                return Err(Refusal::Oversized)
            }
            Some(Ok(actix_ws::AggregatedMessage::Text(_))) => return Err(Refusal::Malformed),
            _ => return Err(Refusal::Closed),
        }
    }
}

async fn write_cell_link(
    mut session: actix_ws::Session,
    mut outbound: mpsc::Receiver<ToGateway>,
    lost: CancellationToken,
    framing: Framing,
) {
    let mut frames = FrameWriter::new(framing);
    'pump: loop {
        let batch = tokio::select! {
            () = lost.cancelled() => break,
            batch = next_frames(&mut outbound, &mut frames, refusal_of_reply) => batch,
        };
        let Some(batch) = batch else { break };
        for frame in batch {
            if session.binary(frame).await.is_err() {
                break 'pump;
            }
        }
    }
    lost.cancel();
    let _ = session.close(None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_count_as_loopback() {
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(
                is_loopback(ip.parse().unwrap_or_else(|e| panic!("{e}"))),
                "{ip}"
            );
        }
        for ip in [
            "10.0.0.5",
            "192.168.1.1",
            "0.0.0.0",
            "::",
            "::ffff:10.0.0.1",
            "fe80::1",
        ] {
            assert!(
                !is_loopback(ip.parse().unwrap_or_else(|e| panic!("{e}"))),
                "{ip}"
            );
        }
    }

    #[test]
    fn peer_strings_are_logged_bounded_and_without_control_characters() {
        let long = "a".repeat(10_000);
        let logged = for_log(&long);
        assert_eq!(logged.chars().count(), LOGGED_CHARS + 1);
        assert_eq!(for_log("gw\n[fake] line"), "gw?[fake] line");
        assert_eq!(for_log("gw-1"), "gw-1");
    }

    #[test]
    fn gateway_names_are_short_and_plain() {
        assert!(valid_gateway_name("gw-0123456789ab"));
        assert!(!valid_gateway_name(""));
        assert!(!valid_gateway_name(&"g".repeat(65)));
        assert!(!valid_gateway_name("gw 1"));
    }

    #[test]
    fn a_proof_made_with_another_secret_or_transcript_does_not_verify() {
        let proof = prove("s3cret", b"transcript");
        assert!(verify("s3cret", b"transcript", &proof));
        assert!(!verify("other", b"transcript", &proof));
        assert!(!verify("s3cret", b"transcripu", &proof));
    }
}
