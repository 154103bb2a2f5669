//! The cell's end of a link over a WebSocket (actix-ws): `GET /v1/link` upgrades a gateway's
//! connection, bounds it while it is a stranger, runs the cell's side of the handshake and then
//! pumps frames between the socket and the cell's [`LinkHandle`](crate::LinkHandle). The
//! handshake, the bounds and the framing both ends share are in
//! [`confab_shared::link_transport`]; the gateway's end is `confab_gateway::link_ws`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use confab_shared::link::{
    self, FrameWriter, Framing, LinkAuth, LinkChallenge, LinkHello, LinkRole, LinkWelcome,
    Reassembler, ToCell, ToGateway,
};
use confab_shared::link_transport::{
    fill_batch, for_log, is_loopback, prove, refusal_of_reply, valid_gateway_name, verify,
    HANDSHAKE_DEADLINE, LINK_DEADLINE, LINK_QUEUE, MAX_PENDING_LINKS, PREAUTH_BYTES,
};
use confab_shared::recipient_lists::ListEncoder;
use confab_shared::CellId;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Cell;

/// Drains what is queued (at least one message) into the frames of one write.
/// Each channel's recipient list crosses once and is then named by its number
/// (`confab_shared::recipient_lists`).
async fn next_frames(
    queue: &mut mpsc::Receiver<ToGateway>,
    writer: &mut FrameWriter,
    lists: &mut ListEncoder,
) -> Option<Vec<Vec<u8>>> {
    let first = queue.recv().await?;
    Some(fill_batch(
        writer,
        first,
        || queue.try_recv().ok(),
        |w, m| lists.push(w, m),
        refusal_of_reply,
    ))
}

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
    #[error("link protocol {0}, this cell speaks {ours}", ours = link::LINK_PROTOCOL)]
    Protocol(u32),
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
    if hello.protocol != link::LINK_PROTOCOL {
        return Err(Refusal::Protocol(hello.protocol));
    }
    let cell_nonce: link::LinkNonce = rand::random();
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
        protocol: link::LINK_PROTOCOL,
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
    let mut lists = ListEncoder::default();
    'pump: loop {
        let batch = tokio::select! {
            () = lost.cancelled() => break,
            batch = next_frames(&mut outbound, &mut frames, &mut lists) => batch,
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
