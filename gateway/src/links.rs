//! Links to cells: routing a workspace to its cell, request/reply correlation, and the delivery
//! of what cells send to local sessions.
//!
//! A link is opened lazily, once per cell, through a [`CellConnector`] — in-process for
//! `confab dev`, a WebSocket to the cell's `/v1/link` otherwise — and one task per link reads
//! the cell's messages in order. When a link is lost its pending requests fail with
//! `unavailable` and its sessions are told to reconnect (`4010`); the next use opens a new link.
//!
//! Opening a link may hang (a cell behind a host that drops packets), so it never holds a
//! caller: one background attempt per cell opens it, every caller that needs the link meanwhile
//! shares that attempt's outcome, and each caller waits at most [`LINK_OPEN_WAIT`] for it.
//!
//! A WebSocket session's request waits for nothing ([`Links::submit`]): it is sent from the
//! session's reader, and the link reader queues its answer on the session's delivery shard like
//! an event, in the link's order — after the events the request caused, which the cell sends
//! first. The session's reader answers `unavailable` for requests the cell leaves unanswered
//! past the request timeout ([`RequestTimeouts`]). HTTP API and operator requests, which have a
//! task of their own anyway, wait for their answer on a oneshot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_directory::{CellRecord, Directory, DirectoryChange, EngineError};
use confab_shared::client::RequestId;
use confab_shared::link::{
    AdminOp, Attach, Caller, CellError, CellOp, CellReply, RequestKey, ToCell, ToGateway,
};
use confab_shared::server::ChannelInfo;
use confab_shared::{CellId, CloseCode, ErrorCode, SessionId, WorkspaceId};
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::sessions::{AnswerDue, SessionHandle, SessionRegistry};

/// `delay` plus up to half of it again, so that gateways do not retry in lockstep.
fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    delay + delay.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// Longest a request or a session's hello waits for a link to be opened before it answers
/// `unavailable`, whatever the network does.
pub const LINK_OPEN_WAIT: Duration = Duration::from_secs(4);
/// Longest one attempt to open a link may take (directory lookup and connector together),
/// so that a connector that never returns cannot hold the cell's attempt forever.
const LINK_OPEN_LIMIT: Duration = Duration::from_secs(10);

/// The link to a cell is closed or could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
#[error("link to cell unavailable: {0}")]
pub struct LinkError(pub String);

/// The sending side of a link.
pub trait LinkSink: Send + Sync + 'static {
    /// Queues a message for the cell without blocking.
    fn send(&self, message: ToCell) -> Result<(), LinkError>;
}

/// An open link: where to send, what arrives, and a token the transport fires when the link
/// is lost.
pub struct CellConnection {
    pub sink: Box<dyn LinkSink>,
    pub inbound: mpsc::Receiver<ToGateway>,
    pub lost: CancellationToken,
}

/// Opens links to cells.
#[async_trait]
pub trait CellConnector: Send + Sync + 'static {
    async fn connect(&self, cell: &CellRecord) -> Result<CellConnection, LinkError>;
}

/// Where a workspace is served, or why it cannot be.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    #[error("unknown workspace {0}")]
    UnknownWorkspace(WorkspaceId),
    #[error("{0}")]
    Unavailable(String),
}

impl From<RouteError> for CellError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::UnknownWorkspace(_) => CellError::new(ErrorCode::NotFound, e.to_string()),
            RouteError::Unavailable(m) => CellError::unavailable(m),
        }
    }
}

/// The attempt to open a link to a cell, whose outcome every caller waiting for it shares.
type Opening = Shared<BoxFuture<'static, Result<Arc<CellLink>, RouteError>>>;

/// A cell's answer to a request: its outcome, or that the workspace moved (not performed).
enum Answer {
    Done(Result<CellReply, CellError>),
    Moved,
}

/// Who waits for the answer to a request.
enum Waiter {
    /// A caller awaiting it in a task of its own: the HTTP API, operator requests, and a
    /// session's request that had to wait for a route or a link.
    Task(oneshot::Sender<Answer>),
    /// A session's request, answered through the session's delivery shard.
    Session(SessionRequest),
}

/// A WebSocket session's request to its workspace's cell, from its frame to its answer.
struct SessionRequest {
    /// Counts the request as unanswered until its answer is queued (see
    /// [`SessionHandle::close_once_answered`]).
    due: AnswerDue,
    id: Option<RequestId>,
    /// Kept to send the request again should the workspace have moved.
    op: CellOp,
}

impl SessionRequest {
    fn caller(&self) -> Caller {
        let session = self.due.session();
        Caller {
            workspace: session.workspace.clone(),
            user: session.user.clone(),
            session: Some(session.id.clone()),
        }
    }

    /// Queues the answer directly. Only for the session's own reader, and only for answers no
    /// delivery of the cell can be ahead of (the request was not sent, or timed out).
    fn answer_here(self, result: Result<CellReply, CellError>) {
        self.due.session().push_answer(self.id, result);
    }
}

/// The requests one session sent on links and whose answers are not in yet, oldest first, so
/// that its reader answers `unavailable` to those a cell leaves unanswered past the request
/// timeout ([`Links::expire`], on the reader's heartbeat tick): a deadline queue per session
/// instead of a timer (and a task) per request. Every request of a connection gets the same
/// timeout, so the oldest is always the first due. Entries of answered requests are dropped
/// as they reach the front; the queue holds at most what the client sent within one request
/// timeout, which its frame rate bounds. Dropping it (the session ended) forgets its requests
/// on their links.
#[derive(Default)]
pub struct RequestTimeouts {
    queue: VecDeque<InFlight>,
}

struct InFlight {
    deadline: Instant,
    link: Weak<CellLink>,
    req: RequestKey,
}

impl InFlight {
    /// Whether the request still waits for its answer (`None` when it does not: answered,
    /// timed out, or its link is gone).
    fn waiting(&self) -> Option<Arc<CellLink>> {
        self.link
            .upgrade()
            .filter(|link| link.pending.contains_key(&self.req))
    }
}

impl RequestTimeouts {
    /// The deadline of the oldest request still queued (answered ones may still be queued:
    /// [`Links::expire`] drops them), when there is one.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.front().map(|f| f.deadline)
    }

    fn push(&mut self, deadline: Instant, link: &Arc<CellLink>, req: RequestKey) {
        // The oldest requests were most likely answered meanwhile: dropping them here keeps
        // the queue near the number in flight.
        while self.queue.front().is_some_and(|f| f.waiting().is_none()) {
            self.queue.pop_front();
        }
        self.queue.push_back(InFlight {
            deadline,
            link: Arc::downgrade(link),
            req,
        });
    }
}

impl Drop for RequestTimeouts {
    fn drop(&mut self) {
        for entry in self.queue.drain(..) {
            if let Some(link) = entry.link.upgrade() {
                link.pending.remove(&entry.req);
            }
        }
    }
}

type AttachWaiter = oneshot::Sender<Result<Vec<ChannelInfo>, CellError>>;

/// Longest a request keeps following a workspace that moved before it is `unavailable`.
const MOVED_RETRY_LIMIT: Duration = Duration::from_secs(5);
/// Pause before asking the directory again when it still names the cell that said "moved".
const MOVED_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Longest a lookup waits for the directory when the gateway has a last-known answer to fall
/// back on (a directory Redis that drops packets answers nothing for seconds).
const DIRECTORY_FALLBACK_WAIT: Duration = Duration::from_secs(1);
/// Counter: lookups answered from the gateway's last-known copy of the directory because the
/// directory did not answer, by `lookup` (`route`, `cell`).
pub const DIRECTORY_FALLBACKS: &str = "confab_gateway_directory_fallbacks_total";

/// One open link to a cell.
pub struct CellLink {
    pub cell: CellId,
    sink: Box<dyn LinkSink>,
    next_request: AtomicU64,
    pending: DashMap<RequestKey, Waiter>,
    /// Sessions being attached, with their workspace (re-routed if the cell says it moved).
    attaching: DashMap<SessionId, (WorkspaceId, AttachWaiter)>,
    lost: CancellationToken,
}

impl CellLink {
    fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Sends a request and waits for its reply, at most `timeout`.
    async fn request(&self, caller: Caller, op: CellOp, timeout: Duration) -> Answer {
        let req = self.next_request.fetch_add(1, Ordering::Relaxed);
        self.call(req, ToCell::Request { req, caller, op }, timeout)
            .await
    }

    async fn admin(&self, op: AdminOp, timeout: Duration) -> Result<CellReply, CellError> {
        let req = self.next_request.fetch_add(1, Ordering::Relaxed);
        match self.call(req, ToCell::Admin { req, op }, timeout).await {
            Answer::Done(result) => result,
            Answer::Moved => Err(CellError::unavailable("the cell refused the admin op")),
        }
    }

    async fn call(&self, req: RequestKey, message: ToCell, timeout: Duration) -> Answer {
        let (tx, rx) = oneshot::channel();
        self.pending.insert(req, Waiter::Task(tx));
        if let Err(e) = self.sink.send(message) {
            self.pending.remove(&req);
            return Answer::Done(Err(CellError::unavailable(e.to_string())));
        }
        let outcome = tokio::time::timeout(timeout, rx).await;
        self.pending.remove(&req);
        match outcome {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Answer::Done(Err(CellError::unavailable("the cell link was lost"))),
            Err(_) => Answer::Done(Err(CellError::unavailable(
                "the cell did not answer in time",
            ))),
        }
    }

    /// Sends a session's request; its answer comes through the link reader.
    fn send_session_request(
        self: &Arc<Self>,
        request: SessionRequest,
        deadline: Instant,
        timeouts: &mut RequestTimeouts,
    ) {
        let req = self.next_request.fetch_add(1, Ordering::Relaxed);
        let message = ToCell::Request {
            req,
            caller: request.caller(),
            // The request keeps the op in case the workspace moved.
            op: request.op.clone(),
        };
        self.pending.insert(req, Waiter::Session(request));
        if let Err(e) = self.sink.send(message) {
            if let Some((_, Waiter::Session(request))) = self.pending.remove(&req) {
                request.answer_here(Err(CellError::unavailable(e.to_string())));
            }
            return;
        }
        timeouts.push(deadline, self, req);
    }
}

/// The gateway's links, by cell, and its routing of workspaces to cells.
pub struct Links {
    directory: Arc<dyn Directory>,
    connector: Arc<dyn CellConnector>,
    sessions: Arc<SessionRegistry>,
    links: DashMap<CellId, Arc<CellLink>>,
    routes: DashMap<WorkspaceId, CellId>,
    /// The last-known copy of the directory (static stability): every workspace -> cell and
    /// every cell registration the directory answered, kept when `routes` is cleared, and
    /// used only when the directory does not answer.
    known_routes: DashMap<WorkspaceId, CellId>,
    known_cells: DashMap<CellId, CellRecord>,
    /// The attempt under way to open each cell's link, so that concurrent first uses open one
    /// link and a cell that is down delays no other cell's link.
    connecting: DashMap<CellId, Opening>,
    request_timeout: Duration,
}

impl Links {
    pub fn new(
        directory: Arc<dyn Directory>,
        connector: Arc<dyn CellConnector>,
        sessions: Arc<SessionRegistry>,
        request_timeout: Duration,
    ) -> Arc<Links> {
        Arc::new(Links {
            directory,
            connector,
            sessions,
            links: DashMap::new(),
            routes: DashMap::new(),
            known_routes: DashMap::new(),
            known_cells: DashMap::new(),
            connecting: DashMap::new(),
            request_timeout,
        })
    }

    /// Follows directory changes (workspace moves) so routes never go stale; runs until the
    /// directory's change stream ends.
    pub async fn follow_directory(self: Arc<Self>) {
        let mut changes = self.directory.subscribe();
        loop {
            match changes.recv().await {
                Ok(DirectoryChange::WorkspaceMoved { workspace, cell }) => {
                    self.known_routes.insert(workspace.clone(), cell);
                    self.routes.remove(&workspace);
                }
                Ok(DirectoryChange::CellChanged { .. }) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.routes.clear(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    }

    /// Forgets the cached route of `workspace` if it still names `cell`: the next use asks
    /// the directory.
    pub fn forget_route(&self, workspace: &WorkspaceId, cell: &CellId) {
        self.routes.remove_if(workspace, |_, c| c == cell);
    }

    /// Records the cells the directory answered, as the last-known copy.
    pub fn remember_cells(&self, cells: &[CellRecord]) {
        for cell in cells {
            self.known_cells.insert(cell.id.clone(), cell.clone());
        }
    }

    /// The cell serving `workspace`. When the directory does not answer, a workspace this
    /// gateway routed before goes to its last-known cell (a cell that no longer serves it says
    /// "moved", and the directory is asked again); an unknown one is `unavailable`.
    pub async fn route(&self, workspace: &WorkspaceId) -> Result<CellId, RouteError> {
        if let Some(cell) = self.routes.get(workspace) {
            return Ok(cell.clone());
        }
        let known = self.known_routes.get(workspace).map(|c| c.clone());
        let lookup = self.directory.workspace(workspace);
        let answer = match &known {
            Some(_) => tokio::time::timeout(DIRECTORY_FALLBACK_WAIT, lookup)
                .await
                .unwrap_or_else(|_| Err(EngineError("the directory did not answer".into()))),
            None => lookup.await,
        };
        match answer {
            Ok(Some(record)) => {
                self.known_routes
                    .insert(workspace.clone(), record.cell.clone());
                self.routes.insert(workspace.clone(), record.cell.clone());
                Ok(record.cell)
            }
            Ok(None) => {
                self.known_routes.remove(workspace);
                Err(RouteError::UnknownWorkspace(workspace.clone()))
            }
            Err(e) => match known {
                Some(cell) => {
                    metrics::counter!(DIRECTORY_FALLBACKS, "lookup" => "route").increment(1);
                    tracing::debug!(workspace = %workspace, cell = %cell, error = %e, "directory unreachable: routing with the last-known cell");
                    Ok(cell)
                }
                None => Err(RouteError::Unavailable(format!(
                    "the directory is unreachable and this gateway has not routed workspace \
                     {workspace} before; retry ({e})"
                ))),
            },
        }
    }

    /// The registration of `cell`: the directory's, or the last-known one when the directory
    /// does not answer or no longer lists the cell (a directory that lost its data lists a
    /// cell again at its next heartbeat; the link handshake checks the cell's identity).
    async fn cell_record(&self, cell: &CellId) -> Result<CellRecord, RouteError> {
        let known = self.known_cells.get(cell).map(|c| c.clone());
        let lookup = self.directory.cells();
        let answer = match &known {
            Some(_) => tokio::time::timeout(DIRECTORY_FALLBACK_WAIT, lookup)
                .await
                .unwrap_or_else(|_| Err(EngineError("the directory did not answer".into()))),
            None => lookup.await,
        };
        let error = match answer {
            Ok(cells) => {
                self.remember_cells(&cells);
                if let Some(record) = cells.into_iter().find(|c| &c.id == cell) {
                    return Ok(record);
                }
                format!("cell {cell} is not registered")
            }
            Err(e) => e.to_string(),
        };
        match known {
            Some(record) => {
                metrics::counter!(DIRECTORY_FALLBACKS, "lookup" => "cell").increment(1);
                tracing::debug!(cell = %cell, error = %error, "directory unreachable: using the last-known registration");
                Ok(record)
            }
            None => Err(RouteError::Unavailable(error)),
        }
    }

    /// The open link to `cell`, opening it if needed; `unavailable` within [`LINK_OPEN_WAIT`]
    /// when it cannot be opened. (Boxed: the link's reader task calls it again to reconnect,
    /// and a named future type breaks that cycle for the compiler.)
    pub fn link<'a>(
        self: &'a Arc<Self>,
        cell: &'a CellId,
    ) -> BoxFuture<'a, Result<Arc<CellLink>, RouteError>> {
        Box::pin(async move {
            if let Some(link) = self.links.get(cell).filter(|l| !l.is_lost()) {
                return Ok(Arc::clone(&link));
            }
            let opening = self
                .connecting
                .entry(cell.clone())
                .or_insert_with(|| self.start_opening(cell.clone()))
                .clone();
            match tokio::time::timeout(LINK_OPEN_WAIT, opening).await {
                Ok(outcome) => outcome,
                Err(_) => Err(RouteError::Unavailable(format!(
                    "the link to cell {cell} could not be opened in time"
                ))),
            }
        })
    }

    /// Starts the one attempt to open `cell`'s link. It runs on its own, so it completes (and
    /// makes way for the next attempt) even when every caller waiting for it has given up.
    fn start_opening(self: &Arc<Self>, cell: CellId) -> Opening {
        let links = Arc::clone(self);
        let task = tokio::spawn(async move {
            let outcome = tokio::time::timeout(LINK_OPEN_LIMIT, links.open(&cell))
                .await
                .unwrap_or_else(|_| {
                    Err(RouteError::Unavailable(format!(
                        "opening the link to cell {cell} timed out"
                    )))
                });
            // Only this attempt is ever registered for the cell while it runs.
            links.connecting.remove(&cell);
            outcome
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(RouteError::Unavailable(format!(
                    "opening the link failed: {e}"
                )))
            })
        }
        .boxed()
        .shared()
    }

    /// Opens the link to `cell` (unless another attempt just did) and starts its reader.
    async fn open(self: &Arc<Self>, cell: &CellId) -> Result<Arc<CellLink>, RouteError> {
        if let Some(link) = self.links.get(cell).filter(|l| !l.is_lost()) {
            return Ok(Arc::clone(&link));
        }
        let record = self.cell_record(cell).await?;
        let connection = self
            .connector
            .connect(&record)
            .await
            .map_err(|e| RouteError::Unavailable(e.to_string()))?;
        let link = Arc::new(CellLink {
            cell: cell.clone(),
            sink: connection.sink,
            next_request: AtomicU64::new(1),
            pending: DashMap::new(),
            attaching: DashMap::new(),
            lost: connection.lost,
        });
        self.links.insert(cell.clone(), Arc::clone(&link));
        tokio::spawn(Arc::clone(self).read_link(Arc::clone(&link), connection.inbound));
        tracing::info!(cell = %cell, "link to cell opened");
        Ok(link)
    }

    /// The link serving `workspace`.
    pub async fn link_for(
        self: &Arc<Self>,
        workspace: &WorkspaceId,
    ) -> Result<Arc<CellLink>, RouteError> {
        let cell = self.route(workspace).await?;
        self.link(&cell).await
    }

    /// Performs `op` for `caller` in the cell of the caller's workspace. When that cell says
    /// the workspace moved (the request was not performed), the directory is asked again and
    /// the request follows the workspace, for at most [`MOVED_RETRY_LIMIT`].
    pub async fn request(
        self: &Arc<Self>,
        caller: Caller,
        op: CellOp,
    ) -> Result<CellReply, CellError> {
        self.request_from(caller, op, None).await
    }

    /// [`Links::request`], for a request that `refused_by` already answered "moved".
    async fn request_from(
        self: &Arc<Self>,
        caller: Caller,
        op: CellOp,
        mut refused_by: Option<CellId>,
    ) -> Result<CellReply, CellError> {
        let deadline = tokio::time::Instant::now() + MOVED_RETRY_LIMIT;
        loop {
            let link = self.link_for(&caller.workspace).await?;
            if refused_by.as_ref() == Some(&link.cell) {
                // The directory still names the cell that refused: its switch is not visible
                // here yet.
                tokio::time::sleep(MOVED_RETRY_PAUSE).await;
            }
            // One copy of the op per request, kept for a retry on the workspace's new cell;
            // the link takes the original.
            let answer = link
                .request(caller.clone(), op.clone(), self.request_timeout)
                .await;
            match answer {
                Answer::Done(result) => return result,
                Answer::Moved => {
                    self.forget_route(&caller.workspace, &link.cell);
                    if tokio::time::Instant::now() >= deadline {
                        return Err(CellError::unavailable("the workspace is moving, retry"));
                    }
                    tracing::debug!(workspace = %caller.workspace, cell = %link.cell, "workspace moved; following it");
                    refused_by = Some(link.cell.clone());
                }
            }
        }
    }

    /// Sends request `id` of `session` to its workspace's cell, without waiting: the link
    /// reader queues the answer on the session's delivery shard, in the link's order (so a
    /// `send`'s ack follows the echo of its message). Call it from the session's reader, which
    /// owns `timeouts` and calls [`Links::expire`] on it.
    pub fn submit(
        self: &Arc<Self>,
        session: &Arc<SessionHandle>,
        id: Option<RequestId>,
        op: CellOp,
        timeouts: &mut RequestTimeouts,
    ) {
        let request = SessionRequest {
            due: session.expect_answer(),
            id,
            op,
        };
        match self.open_link_for(&session.workspace) {
            Some(link) => {
                let deadline = Instant::now() + self.request_timeout;
                link.send_session_request(request, deadline, timeouts);
            }
            None => {
                // A hand-off that stays: the route is not cached or the link is not open (the
                // first request after a move, or while a cell is down), and finding them asks
                // the directory and opens a link, which can take up to LINK_OPEN_WAIT. The
                // session's reader must not wait that long, so this request waits in a task of
                // its own, and its answer still goes through the session's shard.
                tokio::spawn(Arc::clone(self).request_in_task(request, None));
            }
        }
    }

    /// The open link of `workspace`'s cell when both its route and the link are at hand.
    fn open_link_for(&self, workspace: &WorkspaceId) -> Option<Arc<CellLink>> {
        let cell = self.routes.get(workspace)?.clone();
        let link = self.links.get(&cell)?;
        (!link.is_lost()).then(|| Arc::clone(&link))
    }

    /// Performs a session's request in a task of its own (see [`Links::submit`]) and queues
    /// the answer on the session's shard.
    async fn request_in_task(self: Arc<Self>, request: SessionRequest, refused_by: Option<CellId>) {
        let caller = request.caller();
        let SessionRequest { due, id, op } = request;
        let result = self.request_from(caller, op, refused_by).await;
        self.sessions.answer(due, id, result).await;
    }

    /// Answers `unavailable` to the requests in `timeouts` that are past their deadline;
    /// called by the session's reader, on the session's thread.
    pub fn expire(&self, timeouts: &mut RequestTimeouts) {
        let now = Instant::now();
        while let Some(front) = timeouts.queue.front() {
            let Some(link) = front.waiting() else {
                timeouts.queue.pop_front();
                continue;
            };
            if front.deadline > now {
                break;
            }
            let req = front.req;
            timeouts.queue.pop_front();
            if let Some((_, Waiter::Session(request))) = link.pending.remove(&req) {
                request.answer_here(Err(CellError::unavailable(
                    "the cell did not answer in time",
                )));
            }
        }
    }

    /// Sends an operator request to `cell`.
    pub async fn admin(
        self: &Arc<Self>,
        cell: &CellId,
        op: AdminOp,
    ) -> Result<CellReply, CellError> {
        let link = self.link(cell).await?;
        link.admin(op, self.request_timeout).await
    }

    /// Attaches a session (already in the registry) to its workspace's cell and waits for the
    /// user's channels.
    pub async fn attach(
        self: &Arc<Self>,
        link: &CellLink,
        attach: Attach,
    ) -> Result<Vec<ChannelInfo>, CellError> {
        let session = attach.session.clone();
        let (tx, rx) = oneshot::channel();
        link.attaching
            .insert(session.clone(), (attach.workspace.clone(), tx));
        if let Err(e) = link.sink.send(ToCell::Attach(attach)) {
            link.attaching.remove(&session);
            return Err(CellError::unavailable(e.to_string()));
        }
        let outcome = tokio::time::timeout(self.request_timeout, rx).await;
        link.attaching.remove(&session);
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CellError::unavailable("the cell link was lost")),
            Err(_) => Err(CellError::unavailable("the cell did not answer in time")),
        }
    }

    /// Tells the session's cell that the session is gone.
    pub fn detach(&self, cell: &CellId, session: &SessionId) {
        if let Some(link) = self.links.get(cell) {
            let _ = link.sink.send(ToCell::Detach {
                session: session.clone(),
            });
        }
    }

    /// Reads one link's messages in order until it is lost.
    async fn read_link(
        self: Arc<Self>,
        link: Arc<CellLink>,
        mut inbound: mpsc::Receiver<ToGateway>,
    ) {
        loop {
            let message = tokio::select! {
                biased;
                message = inbound.recv() => message,
                () = link.lost.cancelled() => None,
            };
            let Some(message) = message else { break };
            tokio::select! {
                biased;
                () = self.dispatch(&link, message) => {}
                // A delivery waits while a worker's shard is full; the link may be lost then.
                () = link.lost.cancelled() => break,
            }
        }
        link.lost.cancel();
        self.links
            .remove_if(&link.cell, |_, l| Arc::ptr_eq(l, &link));
        self.fail_pending(&link).await;
        tracing::warn!(cell = %link.cell, "link to cell lost");
        self.reattach_when_back(link.cell.clone()).await;
    }

    /// While a cell is unreachable its sessions stay open and their requests answer
    /// `unavailable`. Once a link is open again, they are told to reconnect (`4010`) and
    /// resume, which replays whatever they missed meanwhile.
    async fn reattach_when_back(self: Arc<Self>, cell: CellId) {
        let mut delay = Duration::from_millis(100);
        loop {
            if self.sessions.count_where(|s| s.cell == cell) == 0 {
                return;
            }
            match self.link(&cell).await {
                Ok(_) => break,
                Err(e) => tracing::debug!(cell = %cell, error = %e, "cell still unreachable"),
            }
            tokio::time::sleep(jitter(delay)).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        tracing::info!(cell = %cell, "cell reachable again; its sessions reconnect");
        self.sessions
            .close_where(CloseCode::ReconnectNow, |s| s.cell == cell);
    }

    /// Answers every request still waiting on a lost link with `unavailable`, and every
    /// attach.
    async fn fail_pending(&self, link: &CellLink) {
        // Dropping the attach waiters wakes each with "link lost".
        link.attaching.clear();
        let requests: Vec<RequestKey> = link.pending.iter().map(|entry| *entry.key()).collect();
        for req in requests {
            // A task's waiter is dropped here, which wakes it with "link lost".
            if let Some((_, Waiter::Session(request))) = link.pending.remove(&req) {
                let lost = Err(CellError::unavailable("the cell link was lost"));
                self.sessions.answer(request.due, request.id, lost).await;
            }
        }
    }

    async fn dispatch(self: &Arc<Self>, link: &CellLink, message: ToGateway) {
        match message {
            ToGateway::Deliver { sessions, frame } => self.sessions.deliver(sessions, frame).await,
            ToGateway::Reply { req, result } => match link.pending.remove(&req) {
                Some((_, Waiter::Task(waiter))) => {
                    let _ = waiter.send(Answer::Done(result));
                }
                Some((_, Waiter::Session(request))) => {
                    self.sessions.answer(request.due, request.id, result).await;
                }
                None => {}
            },
            ToGateway::Ready { session, channels } => {
                if let Some((_, (_, waiter))) = link.attaching.remove(&session) {
                    let _ = waiter.send(Ok(channels));
                }
            }
            ToGateway::AttachFailed { session, error } => {
                if let Some((_, (_, waiter))) = link.attaching.remove(&session) {
                    let _ = waiter.send(Err(error));
                }
            }
            ToGateway::Moved { req } => match link.pending.remove(&req) {
                Some((_, Waiter::Task(waiter))) => {
                    let _ = waiter.send(Answer::Moved);
                }
                Some((_, Waiter::Session(request))) => {
                    // A hand-off that stays, and only while a workspace moves: following it
                    // asks the directory (and may open a link), which this reader must not
                    // wait for, so the request goes on in a task of its own.
                    self.forget_route(&request.due.session().workspace, &link.cell);
                    let refused_by = Some(link.cell.clone());
                    tokio::spawn(Arc::clone(self).request_in_task(request, refused_by));
                }
                None => {}
            },
            ToGateway::AttachMoved { session } => {
                // The session reconnects (`4010`), and its next hello asks the directory.
                if let Some((_, (workspace, waiter))) = link.attaching.remove(&session) {
                    self.forget_route(&workspace, &link.cell);
                    let _ = waiter.send(Err(CellError::unavailable(
                        "the workspace moved to another cell, reconnect",
                    )));
                }
            }
            ToGateway::Close { session, code } => {
                self.sessions.close_after_deliveries(session, code).await;
            }
        }
    }
}
