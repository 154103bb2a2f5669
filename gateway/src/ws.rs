//! One client WebSocket at `/v1/ws` (SPEC §4), from `hello` to close.
//!
//! Each connection runs as two tasks: the reader (this module's [`Connection`]) parses frames,
//! enforces the limits — rate, size, abuse, heartbeat — and forwards requests to the cell; the
//! writer drains the session's bounded queue into the socket. Every frame a session receives
//! after `ready` — replies, errors and events alike — passes through that one queue, so the
//! queue bound covers everything and the writer is the only place that writes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseReason, ProtocolError, Session};
use bytestring::ByteString;
use confab_directory::PresenceSession;
use confab_shared::client::{parse_frame, ClientRequest, FrameError, RequestId};
use confab_shared::limits::{ABUSE_BAD_REQUESTS, ABUSE_WINDOW_MS, HISTORY_DEFAULT_LIMIT};
use confab_shared::link::{Attach, Caller, CellError, CellOp, CellReply, Frame};
use confab_shared::server::{encode, ServerFrame};
use confab_shared::{CloseCode, ErrorCode, SessionId};

use crate::links::RouteError;
use crate::metrics as m;
use crate::rate::TokenBucket;
use crate::server::Gateway;
use crate::sessions::{SessionHandle, SessionQueue};

/// `GET /v1/ws`: upgrades and hands the socket to its own task.
pub async fn route(
    req: HttpRequest,
    body: web::Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let max = gateway.config.limits.max_frame_bytes;
    let stream = stream
        .max_frame_size(max)
        .aggregate_continuations()
        .max_continuation_size(max);
    actix_rt::spawn(run(gateway.into_inner(), session, stream));
    Ok(response)
}

async fn run(gateway: Arc<Gateway>, socket: Session, mut stream: AggregatedMessageStream) {
    if gateway.shutdown.is_cancelled() {
        close_socket(socket, CloseCode::GoingAway).await;
        return;
    }
    let shutdown = gateway.shutdown.clone();
    let mut conn = Connection::new(gateway, socket);
    let hello_timeout = Duration::from_millis(conn.gateway.config.limits.hello_timeout_ms);
    let waited = tokio::select! {
        waited = tokio::time::timeout(hello_timeout, conn.await_hello(&mut stream)) => waited,
        // Not yet a registered session: the shutdown path cannot reach it, so it listens here.
        () = shutdown.cancelled() => Ok(Err(CloseCode::GoingAway)),
    };
    let hello = match waited {
        Ok(Ok(hello)) => hello,
        Ok(Err(code)) => return conn.close_before_ready(code).await,
        Err(_) => return conn.close_before_ready(CloseCode::HelloTimeout).await,
    };
    let Some((handle, queue)) = conn.attach(hello).await else {
        return;
    };
    conn.serve(handle, queue, stream).await;
}

/// A `hello` frame's content.
struct Hello {
    token: String,
    resume: Vec<(confab_shared::ChannelId, u64)>,
}

/// Per-connection state of the reader.
struct Connection {
    gateway: Arc<Gateway>,
    socket: Session,
    bucket: TokenBucket,
    bad_requests: VecDeque<Instant>,
    last_frame: Instant,
    session: Option<Arc<SessionHandle>>,
}

/// What the reader decided about one incoming frame.
enum Step {
    Continue,
    Close(CloseCode),
}

impl Connection {
    fn new(gateway: Arc<Gateway>, socket: Session) -> Self {
        let bucket = TokenBucket::per_second(gateway.config.limits.client_rate);
        Connection {
            gateway,
            socket,
            bucket,
            bad_requests: VecDeque::new(),
            last_frame: Instant::now(),
            session: None,
        }
    }

    /// Reads frames until a `hello`; answers anything else with an error.
    async fn await_hello(
        &mut self,
        stream: &mut AggregatedMessageStream,
    ) -> Result<Hello, CloseCode> {
        loop {
            let text = match self.next_text(stream).await? {
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
                        self.reply_error(frame.id, &e, None).await;
                        self.count_bad_request()?;
                    }
                },
                Err(e) => self.frame_error(e).await?,
            }
        }
    }

    /// The next text frame, after the checks every frame gets; `None` when the frame was
    /// handled here (control frames, refused frames).
    async fn next_text(
        &mut self,
        stream: &mut AggregatedMessageStream,
    ) -> Result<Option<ByteString>, CloseCode> {
        let message = match stream.recv().await {
            None => return Err(CloseCode::Normal),
            Some(Err(ProtocolError::Overflow)) => return Err(CloseCode::FrameTooBig),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket protocol error");
                return Err(CloseCode::Normal);
            }
            Some(Ok(message)) => message,
        };
        metrics::counter!(m::FRAMES_IN).increment(1);
        self.last_frame = Instant::now();
        if let AggregatedMessage::Close(_) = message {
            return Err(CloseCode::Normal);
        }
        if let Err(retry_after_ms) = self.bucket.take(Instant::now()) {
            let id = match &message {
                AggregatedMessage::Text(text) => request_id_of(text),
                _ => None,
            };
            let e = CellError::new(ErrorCode::RateLimited, "too many frames");
            self.reply_error(id, &e, Some(retry_after_ms)).await;
            return Ok(None);
        }
        match message {
            AggregatedMessage::Text(text) => Ok(Some(text)),
            AggregatedMessage::Binary(_) => {
                let e = CellError::bad_request("binary frames are not supported; send JSON text");
                self.reply_error(None, &e, None).await;
                self.count_bad_request()?;
                Ok(None)
            }
            AggregatedMessage::Ping(payload) => {
                let _ = self.socket.pong(&payload).await;
                Ok(None)
            }
            AggregatedMessage::Pong(_) | AggregatedMessage::Close(_) => Ok(None),
        }
    }

    async fn frame_error(&mut self, e: FrameError) -> Result<(), CloseCode> {
        let error = CellError::new(e.code, e.message);
        self.reply_error(e.id, &error, None).await;
        if e.code == ErrorCode::BadRequest {
            self.count_bad_request()?;
        }
        Ok(())
    }

    /// Counts a `bad_request`; over 20 in 10 s is abuse (`4003`).
    fn count_bad_request(&mut self) -> Result<(), CloseCode> {
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
    async fn reply_error(&mut self, id: Option<RequestId>, e: &CellError, retry: Option<u64>) {
        metrics::counter!(m::ERRORS, "code" => e.code.as_str()).increment(1);
        let text = error_frame(id, e, retry);
        match &self.session {
            Some(session) => session.push(reply(text)),
            None => {
                let _ = self.socket.text(text).await;
            }
        }
    }

    async fn close_before_ready(self, code: CloseCode) {
        metrics::counter!(m::CLOSES, "code" => code.code().to_string()).increment(1);
        close_socket(self.socket, code).await;
    }

    /// Verifies the token, registers the session and attaches it to its cell; writes `ready`.
    async fn attach(&mut self, hello: Hello) -> Option<(Arc<SessionHandle>, SessionQueue)> {
        let gateway = Arc::clone(&self.gateway);
        let claims = match gateway.tokens.verify(&hello.token) {
            Ok(claims) => claims,
            Err(e) => {
                tracing::debug!(error = %e, "hello with a bad token");
                self.close_now(CloseCode::BadToken).await;
                return None;
            }
        };
        let link = match gateway.links.link_for(&claims.wsp).await {
            Ok(link) => link,
            Err(RouteError::UnknownWorkspace(_)) => {
                self.close_now(CloseCode::UnknownWorkspace).await;
                return None;
            }
            Err(RouteError::Unavailable(message)) => {
                let e = CellError::unavailable(message);
                self.reply_error(None, &e, None).await;
                self.close_now(CloseCode::ReconnectNow).await;
                return None;
            }
        };
        let limits = &gateway.config.limits;
        let id = new_session_id();
        let (handle, queue) = SessionHandle::new(
            id.clone(),
            claims.wsp.clone(),
            claims.sub.clone(),
            link.cell.clone(),
            limits.queue_events,
            limits.queue_bytes,
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
                    self.reply_error(None, &e, None).await;
                    CloseCode::ReconnectNow
                };
                self.close_now(code).await;
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
        if let Err(e) = gateway.presence.session_up(&presence_of(&handle)).await {
            tracing::warn!(error = %e, "presence session_up failed");
        }
        metrics::counter!(m::FRAMES_OUT).increment(1);
        if self.socket.text(ready).await.is_err() {
            self.forget(&handle).await;
            return None;
        }
        self.session = Some(Arc::clone(&handle));
        Some((handle, queue))
    }

    async fn close_now(&mut self, code: CloseCode) {
        metrics::counter!(m::CLOSES, "code" => code.code().to_string()).increment(1);
        let _ = self.socket.clone().close(Some(close_reason(code))).await;
    }

    /// Serves a ready session until it closes.
    async fn serve(
        mut self,
        handle: Arc<SessionHandle>,
        queue: SessionQueue,
        mut stream: AggregatedMessageStream,
    ) {
        let writer = actix_rt::spawn(write_loop(Arc::clone(&handle), queue, self.socket.clone()));
        let heartbeat = Duration::from_millis(self.gateway.config.limits.heartbeat_ms);
        let mut tick = tokio::time::interval(
            (heartbeat / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        );
        let closing = handle.closing_token();
        loop {
            let step = tokio::select! {
                biased;
                () = closing.cancelled() => break,
                _ = tick.tick() => self.check_heartbeat(heartbeat),
                text = self.next_text(&mut stream) => match text {
                    Ok(Some(text)) => self.handle_text(&handle, &text),
                    Ok(None) => Step::Continue,
                    Err(code) => Step::Close(code),
                },
            };
            if let Step::Close(code) = step {
                handle.close(code);
                break;
            }
        }
        let _ = writer.await;
        self.forget(&handle).await;
    }

    fn check_heartbeat(&self, heartbeat: Duration) -> Step {
        if self.last_frame.elapsed() > heartbeat * 2 {
            Step::Close(CloseCode::HeartbeatTimeout)
        } else {
            Step::Continue
        }
    }

    /// Removes every trace of the session: registry, cell, presence.
    async fn forget(&self, handle: &SessionHandle) {
        self.gateway.sessions.remove(&handle.id);
        self.gateway.links.detach(&handle.cell, &handle.id);
        if let Err(e) = self
            .gateway
            .presence
            .session_down(&presence_of(handle))
            .await
        {
            tracing::warn!(error = %e, "presence session_down failed");
        }
    }

    fn handle_text(&mut self, handle: &Arc<SessionHandle>, text: &str) -> Step {
        let frame = match parse_frame(text, self.gateway.config.limits.max_text_bytes) {
            Ok(frame) => frame,
            Err(e) => {
                metrics::counter!(m::ERRORS, "code" => e.code.as_str()).increment(1);
                let error = CellError::new(e.code, e.message);
                handle.push(reply(error_frame(e.id, &error, None)));
                if e.code == ErrorCode::BadRequest {
                    if let Err(code) = self.count_bad_request() {
                        return Step::Close(code);
                    }
                }
                return Step::Continue;
            }
        };
        let id = frame.id;
        let op = match frame.request {
            ClientRequest::Ping {} => {
                handle.push(reply(encode(&ServerFrame::Pong { id })));
                return Step::Continue;
            }
            ClientRequest::Hello { .. } => {
                let e = CellError::bad_request("already said hello");
                push_error(handle, id, &e);
                return match self.count_bad_request() {
                    Ok(()) => Step::Continue,
                    Err(code) => Step::Close(code),
                };
            }
            ClientRequest::PresenceSub { users } => {
                actix_rt::spawn(presence_sub(
                    Arc::clone(&self.gateway),
                    Arc::clone(handle),
                    id,
                    users,
                ));
                return Step::Continue;
            }
            other => to_cell_op(other, handle),
        };
        if let Some(op) = op {
            actix_rt::spawn(forward(
                Arc::clone(&self.gateway),
                Arc::clone(handle),
                id,
                op,
            ));
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

/// Maps a client request to the cell op that performs it.
fn to_cell_op(request: ClientRequest, handle: &SessionHandle) -> Option<CellOp> {
    Some(match request {
        ClientRequest::Send {
            channel,
            text,
            client_msg_id,
            thread,
        } => CellOp::Send {
            channel,
            text,
            client_msg_id,
            thread,
        },
        ClientRequest::Edit { channel, seq, text } => CellOp::Edit { channel, seq, text },
        ClientRequest::Delete { channel, seq } => CellOp::Delete { channel, seq },
        ClientRequest::Typing { channel } => CellOp::Typing { channel },
        ClientRequest::History {
            channel,
            before,
            after,
            limit,
        } => CellOp::History {
            channel,
            before,
            after,
            limit: limit.unwrap_or(HISTORY_DEFAULT_LIMIT),
        },
        ClientRequest::Join { channel } => CellOp::AddMember {
            channel,
            user: handle.user.clone(),
        },
        ClientRequest::Leave { channel } => CellOp::RemoveMember {
            channel,
            user: handle.user.clone(),
        },
        ClientRequest::Read { channel, seq } => CellOp::Read { channel, seq },
        ClientRequest::Hello { .. }
        | ClientRequest::Ping {}
        | ClientRequest::PresenceSub { .. } => return None,
    })
}

/// Performs `op` in the cell and queues its reply.
async fn forward(
    gateway: Arc<Gateway>,
    handle: Arc<SessionHandle>,
    id: Option<RequestId>,
    op: CellOp,
) {
    let caller = Caller {
        workspace: handle.workspace.clone(),
        user: handle.user.clone(),
        session: Some(handle.id.clone()),
    };
    match gateway.links.request(caller, op).await {
        Ok(CellReply::Ack { channel, seq, ts }) => {
            handle.push(reply(encode(&ServerFrame::Ack {
                id,
                channel,
                seq,
                ts,
            })));
        }
        Ok(CellReply::History {
            channel,
            messages,
            has_more,
        }) => handle.push(reply(encode(&ServerFrame::History {
            id,
            channel,
            messages,
            has_more,
        }))),
        Ok(CellReply::Done) => {}
        Ok(other) => {
            tracing::error!(reply = ?other, "cell sent a reply of the wrong kind");
            push_error(
                &handle,
                id,
                &CellError::unavailable("unexpected reply from the cell"),
            );
        }
        Err(e) => push_error(&handle, id, &e),
    }
}

async fn presence_sub(
    gateway: Arc<Gateway>,
    handle: Arc<SessionHandle>,
    id: Option<RequestId>,
    users: Vec<confab_shared::UserId>,
) {
    match gateway
        .presence
        .subscribe(&handle.id, &handle.workspace, users)
        .await
    {
        Ok(users) => handle.push(reply(encode(&ServerFrame::Presence { id, users }))),
        Err(e) => push_error(&handle, id, &CellError::unavailable(e.to_string())),
    }
}

fn push_error(handle: &SessionHandle, id: Option<RequestId>, e: &CellError) {
    metrics::counter!(m::ERRORS, "code" => e.code.as_str()).increment(1);
    handle.push(reply(error_frame(id, e, None)));
}

fn error_frame(id: Option<RequestId>, e: &CellError, retry_after_ms: Option<u64>) -> ByteString {
    encode(&ServerFrame::Error {
        id,
        code: e.code,
        message: e.message.clone(),
        retry_after_ms,
    })
}

/// A reply frame: not an event, so it is not counted in delivery latency.
fn reply(text: ByteString) -> Frame {
    Frame {
        text,
        created_us: 0,
    }
}

/// Drains the session's queue into the socket until the session closes, then sends the close
/// frame with the session's close code.
async fn write_loop(handle: Arc<SessionHandle>, mut queue: SessionQueue, mut socket: Session) {
    // Metric handles are resolved once per session, not once per frame: this is the hot path.
    let frames_out = metrics::counter!(m::FRAMES_OUT);
    let latency = metrics::histogram!(m::DELIVERY_LATENCY);
    loop {
        let frame = tokio::select! {
            biased;
            () = queue.closing.cancelled() => break,
            frame = queue.frames.recv() => frame,
        };
        let Some(frame) = frame else { break };
        handle.dequeued(frame.text.len());
        let created_us = frame.created_us;
        // A client that stops reading blocks this write; closing must not wait for it.
        let written = tokio::select! {
            biased;
            () = queue.closing.cancelled() => break,
            written = socket.text(frame.text) => written,
        };
        if written.is_err() {
            handle.close(CloseCode::Normal);
            break;
        }
        frames_out.increment(1);
        if created_us > 0 {
            let latency_us = confab_shared::now_us().saturating_sub(created_us);
            latency.record(latency_us as f64 / 1e6);
        }
    }
    let code = handle.close_code().unwrap_or(CloseCode::Normal);
    metrics::counter!(m::CLOSES, "code" => code.code().to_string()).increment(1);
    // The close frame queues behind what the socket has not taken yet. A client that stops
    // reading may take it much later, or never: the close is left to a small task of its own
    // and the session (registry, cell, presence) is released now.
    actix_rt::spawn(close_socket(socket, code));
}

async fn close_socket(socket: Session, code: CloseCode) {
    let _ = socket.close(Some(close_reason(code))).await;
}

fn close_reason(code: CloseCode) -> CloseReason {
    CloseReason {
        code: actix_ws::CloseCode::from(code.code()),
        description: Some(code.reason().to_string()),
    }
}

fn presence_of(handle: &SessionHandle) -> PresenceSession {
    PresenceSession {
        workspace: handle.workspace.clone(),
        user: handle.user.clone(),
        session: handle.id.clone(),
    }
}

/// A new session id: 32 hex characters, unique across the deployment.
fn new_session_id() -> SessionId {
    let id = uuid::Uuid::new_v4().simple().to_string();
    // A UUID's simple form is 32 hex characters, always a valid id.
    SessionId::new(&id).unwrap_or_else(|_| unreachable!("uuid is a valid id"))
}
