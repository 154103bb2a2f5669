//! One client WebSocket at `/v1/ws` (SPEC §4), from `hello` to close.
//!
//! Each connection is one task, started by the [`upgrade`] service on the bare socket. This
//! module's [`Connection`] reads frames, enforces the limits — rate, size, abuse, heartbeat —
//! and forwards requests to the cell. It never writes to the socket: every frame a session
//! receives — `ready`, replies, errors and events alike — goes into the session's bounded
//! [`Outbox`], which a write pump beside it drains (see [`crate::socket`]), so the queue bound
//! covers everything.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody};
use actix_http::h1;
use actix_http::ws::{HandshakeError, ProtocolError};
use actix_http::{header, ConnectionType, Request, Response};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use bytestring::ByteString;
use confab_directory::PresenceSession;
use confab_shared::client::{parse_frame, ClientRequest, FrameError, RequestId};
use confab_shared::limits::{ABUSE_BAD_REQUESTS, ABUSE_WINDOW_MS};
use confab_shared::link::{Attach, CellError};
use confab_shared::server::{encode, ServerFrame};
use confab_shared::wire::request_op;
use confab_shared::{CloseCode, ErrorCode};
use futures_util::SinkExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use crate::api_error::ApiError;
use crate::deflate;
use crate::links::{RequestTimeouts, RouteError};
use crate::metrics as m;
use crate::rate::TokenBucket;
use crate::server::{Gateway, PendingHello, SocketGuard};
use crate::sessions::{counted_error_frame, error_frame, SessionHandle};
use crate::socket::{write_outbox, FrameReader, Incoming, Outbox, SocketOptions};

/// The path of the client WebSocket.
pub const WS_PATH: &str = "/v1/ws";
/// When a full gateway tells a client to retry (it may also try another gateway at once).
const FULL_RETRY_AFTER_MS: u64 = 1000;

/// The gateway's upgrade service: every request carrying `Upgrade: websocket` comes here, with
/// its connection, instead of going to the actix-web application. `GET /v1/ws` is answered with
/// `101`, and the bare socket goes to a task of its own ([`serve_socket`]); the request, the
/// dispatcher and its fixed 8 KiB buffers are all released when this returns. Anything else
/// gets a JSON error and the connection is closed.
pub async fn upgrade(
    gateway: Arc<Gateway>,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), UpgradeError> {
    if req.path() != WS_PATH || req.method() != Method::GET {
        return respond_and_close(framed, ApiError::not_found("no such endpoint")).await;
    }
    let handshake = actix_http::ws::handshake(req.head());
    let deflate = deflate::negotiate(
        req.head()
            .headers()
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .filter_map(|value| value.to_str().ok()),
    );
    let mut options = socket_options(req.uri().query());
    options.deflate = deflate.is_some();
    // The request's headers share the dispatcher's read buffer: let both go now.
    drop(req);
    let response = match handshake {
        Ok(mut response) => {
            if let Some(accepted) = deflate {
                response.insert_header((header::SEC_WEBSOCKET_EXTENSIONS, accepted));
            }
            response.finish().drop_body()
        }
        Err(e) => return respond_and_close(framed, handshake_failed(e)).await,
    };
    if gateway.shutdown.is_cancelled() {
        // SPEC §1: a gateway shutting down refuses new WebSockets, so that a client (or its
        // load balancer) goes to another gateway at once.
        let mut leaving = ApiError::unavailable("this gateway is shutting down");
        leaving.retry_after_ms = Some(FULL_RETRY_AFTER_MS);
        return respond_and_close(framed, leaving).await;
    }
    let peer = framed.io_ref().peer_addr()?;
    let Some(pending) = gateway.try_pending_hello(peer.ip()) else {
        let mut many = ApiError::new(
            ErrorCode::RateLimited,
            "too many connections from this address have not sent hello yet",
        );
        many.retry_after_ms = Some(FULL_RETRY_AFTER_MS);
        metrics::counter!(m::PENDING_HELLO_REFUSED).increment(1);
        return respond_and_close(framed, many).await;
    };
    let Some(open) = gateway.try_open_socket() else {
        let mut full = ApiError::unavailable("this gateway serves its maximum of connections");
        full.retry_after_ms = Some(FULL_RETRY_AFTER_MS);
        metrics::counter!(m::CONNECTIONS_REFUSED).increment(1);
        return respond_and_close(framed, full).await;
    };
    framed
        .send(h1::Message::Item((response, BodySize::None)))
        .await?;
    let parts = framed.into_parts();
    let (read, write) = parts.io.into_split();
    // Bytes the client sent right behind the request are its first frames.
    let max_frame_bytes = gateway.config.limits.max_frame_bytes;
    let reader = FrameReader::new(read, &parts.read_buf, max_frame_bytes, options);
    actix_rt::spawn(serve_socket(gateway, reader, write, options, open, pending));
    Ok(())
}

/// The opt-ins a client asks for in the query of `/v1/ws` (SPEC §4): `batch=1`. Other
/// parameters, and other values, are ignored. (The other opt-in, permessage-deflate, is
/// negotiated in the headers.)
fn socket_options(query: Option<&str>) -> SocketOptions {
    let mut options = SocketOptions::default();
    for pair in query.unwrap_or("").split('&') {
        if pair == "batch=1" {
            options.batch = true;
        }
    }
    options
}

/// One client socket after the upgrade: the session's reader ([`run`]) in this task and its
/// outbox's write pump in another, on the same thread; then a short linger so that the close
/// frame arrives.
async fn serve_socket(
    gateway: Arc<Gateway>,
    mut reader: FrameReader,
    write: OwnedWriteHalf,
    options: SocketOptions,
    _open: SocketGuard,
    pending: PendingHello,
) {
    let limits = &gateway.config.limits;
    let outbox = Outbox::new(limits.queue_events, limits.queue_bytes);
    // The pump is a task of its own on this thread: a delivery wakes only the pump, without
    // polling the reader's timers and socket too (which a join in one task would).
    let pump = actix_rt::spawn(write_outbox(Arc::clone(&outbox), write, options));
    run(gateway, Arc::clone(&outbox), &mut reader, pending).await;
    // Every way out of `run` has decided a close code; this only makes sure of it.
    outbox.close(CloseCode::Normal);
    let _ = pump.await;
    reader.linger().await;
}

/// `GET /v1/ws` without `Upgrade: websocket` (requests with it never reach the application,
/// see [`upgrade`]): the handshake's error.
pub async fn route(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(match actix_http::ws::handshake(req.head()) {
        Err(e) => handshake_failed(e),
        Ok(_) => ApiError::bad_request("websocket handshake failed: not an upgrade request"),
    })
}

fn handshake_failed(e: HandshakeError) -> ApiError {
    ApiError::bad_request(format!("websocket handshake failed: {e}"))
}

/// Writes `error` as a whole HTTP response on a connection the dispatcher handed over, which
/// then closes.
async fn respond_and_close(
    mut framed: Framed<TcpStream, h1::Codec>,
    error: ApiError,
) -> Result<(), UpgradeError> {
    let response: Response<BoxBody> = error.error_response().into();
    let (mut head, body) = response.into_parts();
    head.head_mut().set_connection_type(ConnectionType::Close);
    let body = actix_http::body::to_bytes(body).await.unwrap_or_default();
    framed
        .send(h1::Message::Item((
            head,
            BodySize::Sized(body.len() as u64),
        )))
        .await?;
    framed.send(h1::Message::Chunk(Some(body))).await?;
    framed.send(h1::Message::Chunk(None)).await?;
    Ok(())
}

/// The upgrade failed on the socket (the client went away mid-handshake).
#[derive(Debug, thiserror::Error)]
#[error("websocket upgrade: {0}")]
pub struct UpgradeError(#[from] std::io::Error);

impl From<UpgradeError> for Response<BoxBody> {
    fn from(_: UpgradeError) -> Self {
        Response::new(StatusCode::BAD_REQUEST)
    }
}

async fn run(
    gateway: Arc<Gateway>,
    outbox: Arc<Outbox>,
    reader: &mut FrameReader,
    pending: PendingHello,
) {
    if gateway.shutdown.is_cancelled() {
        outbox.close(CloseCode::GoingAway);
        return;
    }
    let shutdown = gateway.shutdown.clone();
    let mut conn = Connection::new(gateway, outbox);
    let hello_timeout = Duration::from_millis(conn.gateway.config.limits.hello_timeout_ms);
    let waited = tokio::select! {
        waited = tokio::time::timeout(hello_timeout, conn.await_hello(reader)) => waited,
        // Not yet a registered session: the shutdown path cannot reach it, so it listens here.
        () = shutdown.cancelled() => Ok(Err(CloseCode::GoingAway)),
    };
    // Past hello (or about to close): no longer counted against the client's address.
    drop(pending);
    let hello = match waited {
        Ok(Ok(hello)) => hello,
        Ok(Err(code)) => return conn.close(code),
        Err(_) => return conn.close(CloseCode::HelloTimeout),
    };
    let Some(handle) = conn.attach(hello).await else {
        return;
    };
    conn.serve(handle, reader).await;
}

/// A `hello` frame's content.
struct Hello {
    token: String,
    resume: Vec<(confab_shared::ChannelId, u64)>,
}

/// Per-connection state of the reader.
struct Connection {
    gateway: Arc<Gateway>,
    outbox: Arc<Outbox>,
    bucket: TokenBucket,
    bad_requests: VecDeque<Instant>,
    last_frame: Instant,
    session: Option<Arc<SessionHandle>>,
    /// The session's requests waiting for the cell, to answer those it leaves unanswered.
    requests: RequestTimeouts,
}

/// What the reader decided about one incoming frame.
enum Step {
    Continue,
    Close(CloseCode),
}

impl Connection {
    fn new(gateway: Arc<Gateway>, outbox: Arc<Outbox>) -> Self {
        let bucket = TokenBucket::per_second(gateway.config.limits.client_rate);
        Connection {
            gateway,
            outbox,
            bucket,
            bad_requests: VecDeque::new(),
            last_frame: Instant::now(),
            session: None,
            requests: RequestTimeouts::default(),
        }
    }

    /// Reads frames until a `hello`; answers anything else with an error.
    async fn await_hello(&mut self, reader: &mut FrameReader) -> Result<Hello, CloseCode> {
        loop {
            let text = match self.next_text(reader).await? {
                Some(text) => text,
                None => continue,
            };
            match parse_frame(&text, self.gateway.config.limits.max_text_bytes) {
                Ok(frame) => match frame.request {
                    ClientRequest::Hello { token, resume } => {
                        return Ok(Hello {
                            token,
                            resume: resume.unwrap_or_default().into_iter().collect(),
                        })
                    }
                    _ => {
                        let e = CellError::bad_request("send hello first");
                        self.reply_error(frame.id, &e, None);
                        self.count_refused()?;
                    }
                },
                Err(e) => self.frame_error(e)?,
            }
        }
    }

    /// The next text frame, after the checks every frame gets; `None` when the frame was
    /// handled here (control frames, refused frames).
    async fn next_text(
        &mut self,
        reader: &mut FrameReader,
    ) -> Result<Option<ByteString>, CloseCode> {
        let incoming = match reader.next().await {
            None => return Err(CloseCode::Normal),
            Some(Err(ProtocolError::Overflow)) => return Err(CloseCode::FrameTooBig),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket protocol error");
                return Err(CloseCode::Normal);
            }
            Some(Ok(incoming)) => incoming,
        };
        metrics::counter!(m::FRAMES_IN).increment(1);
        self.last_frame = Instant::now();
        if let Incoming::Close = incoming {
            return Err(CloseCode::Normal);
        }
        if let Err(retry_after_ms) = self.bucket.take(Instant::now()) {
            let id = match &incoming {
                Incoming::Text(text) => request_id_of(text),
                _ => None,
            };
            let e = CellError::new(ErrorCode::RateLimited, "too many frames");
            self.reply_error(id, &e, Some(retry_after_ms));
            // A client that keeps sending past its rate would otherwise be answered forever.
            self.count_refused()?;
            return Ok(None);
        }
        let refused = match incoming {
            Incoming::Text(text) => return Ok(Some(text)),
            Incoming::Binary => "binary frames are not supported; send JSON text",
            Incoming::InvalidText => "text frame is not valid UTF-8",
            Incoming::Ping(payload) => {
                let _ = self.outbox.push_pong(payload);
                return Ok(None);
            }
            Incoming::Pong | Incoming::Close => return Ok(None),
        };
        self.reply_error(None, &CellError::bad_request(refused), None);
        self.count_refused()?;
        Ok(None)
    }

    fn frame_error(&mut self, e: FrameError) -> Result<(), CloseCode> {
        let error = CellError::new(e.code, e.message);
        self.reply_error(e.id, &error, None);
        if e.code == ErrorCode::BadRequest {
            self.count_refused()?;
        }
        Ok(())
    }

    /// Counts a refused frame (`bad_request` or `rate_limited`); over 20 in 10 s is abuse
    /// (`4003`).
    fn count_refused(&mut self) -> Result<(), CloseCode> {
        let now = Instant::now();
        let window = Duration::from_millis(ABUSE_WINDOW_MS);
        while self
            .bad_requests
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.bad_requests.pop_front();
        }
        self.bad_requests.push_back(now);
        if self.bad_requests.len() > ABUSE_BAD_REQUESTS as usize {
            return Err(CloseCode::ProtocolAbuse);
        }
        Ok(())
    }

    /// Sends an error: through the session queue once ready, straight to the socket before.
    /// Queues an error (an overflowing queue closes the session with `4008`).
    fn reply_error(&mut self, id: Option<RequestId>, e: &CellError, retry: Option<u64>) {
        metrics::counter!(m::ERRORS, "code" => e.code.as_str()).increment(1);
        let text = error_frame(id, e, retry);
        match &self.session {
            Some(session) => session.push_reply(text),
            None => {
                if self.outbox.push_reply(text) == Err(crate::socket::Refused::Overflow) {
                    self.close(CloseCode::SlowConsumer);
                }
            }
        }
    }

    /// Closes the connection with `code`, after what is already queued.
    fn close(&self, code: CloseCode) {
        if self.outbox.close(code) {
            metrics::counter!(m::CLOSES, "code" => code.code().to_string()).increment(1);
        }
    }

    /// Verifies the token, registers the session and attaches it to its cell; writes `ready`.
    async fn attach(&mut self, hello: Hello) -> Option<Arc<SessionHandle>> {
        let gateway = Arc::clone(&self.gateway);
        let claims = match gateway.tokens.verify(&hello.token) {
            Ok(claims) => claims,
            Err(e) => {
                tracing::debug!(error = %e, "hello with a bad token");
                self.close(CloseCode::BadToken);
                return None;
            }
        };
        let link = match gateway.links.link_for(&claims.wsp).await {
            Ok(link) => link,
            Err(RouteError::UnknownWorkspace(_)) => {
                self.close(CloseCode::UnknownWorkspace);
                return None;
            }
            Err(RouteError::Unavailable(message)) => {
                let e = CellError::unavailable(message);
                self.reply_error(None, &e, None);
                self.close(CloseCode::ReconnectNow);
                return None;
            }
        };
        let limits = &gateway.config.limits;
        let id = gateway.sessions.new_id();
        let handle = SessionHandle::new(
            id.clone(),
            claims.wsp.clone(),
            claims.sub.clone(),
            link.cell.clone(),
            Arc::clone(&self.outbox),
        );
        gateway.sessions.insert(Arc::clone(&handle));
        let attach = Attach {
            session: id.clone(),
            workspace: claims.wsp.clone(),
            user: claims.sub.clone(),
            resume: hello.resume,
            replay_limit: (limits.queue_events / 2).max(1) as u32,
        };
        let channels = match gateway.links.attach(&link, attach).await {
            Ok(channels) => channels,
            Err(e) => {
                gateway.sessions.remove(&id);
                gateway.links.detach(&link.cell, &id);
                let code = if e.code == ErrorCode::NotFound {
                    CloseCode::UnknownWorkspace
                } else {
                    self.reply_error(None, &e, None);
                    CloseCode::ReconnectNow
                };
                self.close(code);
                return None;
            }
        };
        let ready = encode(&ServerFrame::Ready {
            session: id,
            user: claims.sub,
            workspace: claims.wsp,
            heartbeat_ms: limits.heartbeat_ms,
            channels,
        });
        // The session counts as online before the client learns it is ready: whatever the
        // client does next (or tells another user to check) must already see it online, also
        // with a presence engine a network round trip away.
        gateway.presence.session_up(&presence_of(&handle)).await;
        // `ready` goes first; events that reached the session while it attached follow it.
        self.outbox.go_live(ready);
        self.session = Some(Arc::clone(&handle));
        Some(handle)
    }

    /// Serves a ready session until it closes.
    ///
    /// The session's one timer sleeps until the next thing that can be due, its heartbeat
    /// deadline or its oldest request's, rather than ticking: with 15,000 mostly quiet
    /// sessions a tick per session per second was 15,000 wake-ups a second (timer wheel,
    /// task poll) paid whatever the deliveries (about 2% of the CPU per delivery at 15,000
    /// connections, docs/benchmarks.md).
    async fn serve(mut self, handle: Arc<SessionHandle>, reader: &mut FrameReader) {
        let heartbeat = Duration::from_millis(self.gateway.config.limits.heartbeat_ms);
        let check = tokio::time::sleep_until(self.next_check(heartbeat).into());
        tokio::pin!(check);
        let closing = handle.closing_token();
        loop {
            let step = tokio::select! {
                biased;
                () = closing.cancelled() => break,
                () = &mut check => {
                    self.gateway.links.expire(&mut self.requests);
                    let step = self.check_heartbeat(heartbeat);
                    check.as_mut().reset(self.next_check(heartbeat).into());
                    step
                }
                text = self.next_text(reader) => match text {
                    Ok(Some(text)) => {
                        let step = self.handle_text(&handle, &text);
                        // A request just sent may be due before what the timer waits for.
                        let next = self.next_check(heartbeat);
                        if next < check.deadline().into_std() {
                            check.as_mut().reset(next.into());
                        }
                        step
                    }
                    Ok(None) => Step::Continue,
                    Err(code) => Step::Close(code),
                },
            };
            if let Step::Close(code) = step {
                handle.close(code);
                break;
            }
        }
        if let Some(code) = handle.close_code() {
            metrics::counter!(m::CLOSES, "code" => code.code().to_string()).increment(1);
        }
        self.forget(&handle).await;
    }

    /// When the session's timer must next wake: at its heartbeat deadline (two heartbeats
    /// after the last frame; a frame since moves it later, which the wake-up finds out), or
    /// when its oldest request waiting for the cell is due, whichever comes first.
    fn next_check(&self, heartbeat: Duration) -> Instant {
        let silence = self.last_frame + heartbeat * 2;
        match self.requests.next_deadline() {
            Some(request) => request.min(silence),
            None => silence,
        }
    }

    fn check_heartbeat(&self, heartbeat: Duration) -> Step {
        if self.last_frame.elapsed() >= heartbeat * 2 {
            Step::Close(CloseCode::HeartbeatTimeout)
        } else {
            Step::Continue
        }
    }

    /// Removes every trace of the session: registry, cell, presence.
    async fn forget(&self, handle: &SessionHandle) {
        self.gateway.sessions.remove(&handle.id);
        self.gateway.links.detach(&handle.cell, &handle.id);
        self.gateway
            .presence
            .session_down(&presence_of(handle))
            .await;
    }

    fn handle_text(&mut self, handle: &Arc<SessionHandle>, text: &str) -> Step {
        let frame = match parse_frame(text, self.gateway.config.limits.max_text_bytes) {
            Ok(frame) => frame,
            Err(e) => {
                metrics::counter!(m::ERRORS, "code" => e.code.as_str()).increment(1);
                let error = CellError::new(e.code, e.message);
                handle.push_reply(error_frame(e.id, &error, None));
                if e.code == ErrorCode::BadRequest {
                    if let Err(code) = self.count_refused() {
                        return Step::Close(code);
                    }
                }
                return Step::Continue;
            }
        };
        let id = frame.id;
        let op = match frame.request {
            ClientRequest::Ping {} => {
                handle.push_reply(encode(&ServerFrame::Pong { id }));
                return Step::Continue;
            }
            ClientRequest::Hello { .. } => {
                let e = CellError::bad_request("already said hello");
                push_error(handle, id, &e);
                return match self.count_refused() {
                    Ok(()) => Step::Continue,
                    Err(code) => Step::Close(code),
                };
            }
            ClientRequest::PresenceSub { users } => {
                // The watch is made here, in the session's own task, before this task can run
                // the session's cleanup; only the status read waits, in a task of its own (a
                // round trip to the presence engine, which this reader must not wait for).
                let users = self
                    .gateway
                    .presence
                    .watch(&handle.id, &handle.workspace, users);
                actix_rt::spawn(presence_sub(
                    Arc::clone(&self.gateway),
                    Arc::clone(handle),
                    id,
                    users,
                ));
                return Step::Continue;
            }
            other => {
                let max_text = self.gateway.config.limits.max_text_bytes;
                match request_op(other, &handle.user, max_text) {
                    Ok(op) => op,
                    Err(e) => {
                        push_error(handle, id, &CellError::new(e.code, e.message));
                        return Step::Continue;
                    }
                }
            }
        };
        if let Some(op) = op {
            // No task per request: the answer comes through the session's delivery shard.
            self.gateway
                .links
                .submit(handle, id, op, &mut self.requests);
        }
        Step::Continue
    }
}

/// The `id` of a frame that is refused before it is parsed (rate limiting), so that the error
/// still echoes it; `None` when the frame has no readable id.
fn request_id_of(text: &str) -> Option<RequestId> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<RequestId>,
    }
    serde_json::from_str::<IdOnly>(text)
        .ok()
        .and_then(|f| f.id)
        .filter(|id| !matches!(id, RequestId::Str(s) if s.chars().count() > 64))
}

/// Answers a `presence_sub` whose watch is already made: the current statuses of `users`.
async fn presence_sub(
    gateway: Arc<Gateway>,
    handle: Arc<SessionHandle>,
    id: Option<RequestId>,
    users: Vec<confab_shared::UserId>,
) {
    let users = gateway.presence.statuses(&handle.workspace, users).await;
    let reply = encode(&ServerFrame::Presence { id, users });
    // Through the session's shard: behind the presence events queued before it.
    gateway.sessions.reply(handle, reply).await;
}

fn push_error(handle: &SessionHandle, id: Option<RequestId>, e: &CellError) {
    handle.push_reply(counted_error_frame(id, e));
}

fn presence_of(handle: &SessionHandle) -> PresenceSession {
    PresenceSession {
        workspace: handle.workspace.clone(),
        user: handle.user.clone(),
        session: handle.id.clone(),
    }
}
