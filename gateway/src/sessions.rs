//! Local client sessions: a registry by session id, and each session's bounded outbound queue.
//!
//! Hot path: a cell's `Deliver` names the sessions of this gateway that must receive one
//! encoded frame; [`SessionRegistry::deliver`] hands each worker thread's delivery shard the
//! ones it serves (see [`crate::shards`]; a session's id names its shard), and the shard
//! queues a clone of the same `ByteString` (a reference-count increment, no copy, no encoding)
//! into each of its sessions' [`Outbox`]. The answers to a session's requests take the same
//! path ([`SessionRegistry::answer`]), so they stay behind the events sent before them. An
//! outbox that is full, in events or bytes, closes its session with `4008` instead of growing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use confab_shared::client::RequestId;
use confab_shared::link::{CellError, CellReply, Frame};
use confab_shared::server::{encode, ServerFrame};
use confab_shared::wire::WireError;
use confab_shared::{CellId, CloseCode, SessionId, UserId, WorkspaceId};
use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::shards::Shards;
use crate::socket::{Outbox, Refused};

/// A ready session, as the rest of the gateway sees it.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: SessionId,
    pub workspace: WorkspaceId,
    pub user: UserId,
    /// The cell the session is attached to.
    pub cell: CellId,
    outbox: Arc<Outbox>,
    /// Requests of this session sent on to the cell whose answer is not queued yet.
    answers_due: AtomicUsize,
    /// Woken each time one of those answers is queued.
    answered: Notify,
}

/// The longest a close asked for by the cell waits for answers still on their way to the
/// outbox (see [`SessionHandle::close_once_answered`]).
const ANSWERS_BEFORE_CLOSE: Duration = Duration::from_secs(5);

/// Counts one request of a session as unanswered until it is dropped, which happens once its
/// answer (or error) is queued, or the session is gone.
pub struct AnswerDue(Arc<SessionHandle>);

impl AnswerDue {
    /// The session the answer is due to.
    pub fn session(&self) -> &Arc<SessionHandle> {
        &self.0
    }
}

impl Drop for AnswerDue {
    fn drop(&mut self) {
        self.0.answers_due.fetch_sub(1, Ordering::AcqRel);
        self.0.answered.notify_waiters();
    }
}

impl SessionHandle {
    pub fn new(
        id: SessionId,
        workspace: WorkspaceId,
        user: UserId,
        cell: CellId,
        outbox: Arc<Outbox>,
    ) -> Arc<SessionHandle> {
        Arc::new(SessionHandle {
            id,
            workspace,
            user,
            cell,
            outbox,
            answers_due: AtomicUsize::new(0),
            answered: Notify::new(),
        })
    }

    /// Counts a request as unanswered until the returned guard is dropped.
    pub fn expect_answer(self: &Arc<Self>) -> AnswerDue {
        self.answers_due.fetch_add(1, Ordering::AcqRel);
        AnswerDue(Arc::clone(self))
    }

    /// Closes with `code` once the answers of requests already sent on are queued (at most
    /// [`ANSWERS_BEFORE_CLOSE`] later). A cell that shuts down answers every request it took
    /// before it asks for the close, and those answers reach the session's shard ahead of the
    /// close; but a request can still be on its way to the cell (in the link, waiting for a
    /// link to open, or following a workspace that moved), and closing at once would drop its
    /// answer — an ack of a write the cell did perform.
    pub fn close_once_answered(self: &Arc<Self>, code: CloseCode) {
        if self.answers_due.load(Ordering::Acquire) == 0 {
            self.close(code);
            return;
        }
        let session = Arc::clone(self);
        actix_rt::spawn(async move {
            let deadline = tokio::time::Instant::now() + ANSWERS_BEFORE_CLOSE;
            loop {
                let answered = session.answered.notified();
                if session.answers_due.load(Ordering::Acquire) == 0 {
                    break;
                }
                if tokio::time::timeout_at(deadline, answered).await.is_err() {
                    break;
                }
            }
            session.close(code);
        });
    }

    /// Queues an event for the socket. On overflow the session is closed with `4008`.
    pub fn push(&self, frame: Frame) {
        if self.outbox.push_event(frame) == Err(Refused::Overflow) {
            self.overflow();
        }
    }

    /// Queues the frame that answers request `id` with `result`, if it has one (`typing`
    /// is answered only when it fails).
    pub fn push_answer(&self, id: Option<RequestId>, result: Result<CellReply, CellError>) {
        if let Some(text) = answer_frame(id, result) {
            self.push_reply(text);
        }
    }

    /// Queues a reply or error frame. On overflow the session is closed with `4008`.
    pub fn push_reply(&self, text: ByteString) {
        if self.outbox.push_reply(text) == Err(Refused::Overflow) {
            self.overflow();
        }
    }

    fn overflow(&self) {
        if self.close(CloseCode::SlowConsumer) {
            metrics::counter!(m::SLOW_CONSUMER_CLOSES).increment(1);
            tracing::warn!(session = %self.id, user = %self.user, "slow consumer");
        }
    }

    /// Asks the session to close with `code`; the first request wins. Returns whether this
    /// call decided the code.
    pub fn close(&self, code: CloseCode) -> bool {
        self.outbox.close(code)
    }

    /// The close code decided so far, if any.
    pub fn close_code(&self) -> Option<CloseCode> {
        self.outbox.close_code()
    }

    /// A token cancelled when the session closes.
    pub fn closing_token(&self) -> CancellationToken {
        self.outbox.closing().clone()
    }

    pub fn is_closing(&self) -> bool {
        self.outbox.closing().is_cancelled()
    }

    /// The texts queued for the socket, in order (tests).
    #[cfg(test)]
    pub(crate) fn queued_texts(&self) -> Vec<String> {
        self.outbox.queued_texts()
    }
}

/// The frame that answers request `id` of a session with the cell's `result`; `None` for a
/// success that is not answered (`typing`).
pub fn answer_frame(
    id: Option<RequestId>,
    result: Result<CellReply, CellError>,
) -> Option<ByteString> {
    match result {
        Ok(CellReply::Ack { channel, seq, ts }) => Some(encode(&ServerFrame::Ack {
            id,
            channel,
            seq,
            ts,
        })),
        Ok(CellReply::History {
            channel,
            messages,
            has_more,
        }) => Some(encode(&ServerFrame::History {
            id,
            channel,
            messages,
            has_more,
        })),
        Ok(CellReply::Done) => None,
        Ok(other) => {
            tracing::error!(reply = ?other, "cell sent a reply of the wrong kind");
            let e = CellError::unavailable("unexpected reply from the cell");
            Some(counted_error_frame(id, &e))
        }
        Err(e) => Some(counted_error_frame(id, &e)),
    }
}

/// An error frame for request `id`, counted in the errors metric.
pub fn counted_error_frame(id: Option<RequestId>, e: &CellError) -> ByteString {
    metrics::counter!(m::ERRORS, "code" => e.code.as_str()).increment(1);
    error_frame(id, e, None)
}

/// An error frame for request `id`.
pub fn error_frame(
    id: Option<RequestId>,
    e: &CellError,
    retry_after_ms: Option<u64>,
) -> ByteString {
    let mut error = WireError::from(e.clone());
    error.retry_after_ms = retry_after_ms;
    encode(&error.to_frame(id))
}

/// Every session of this gateway, by id.
///
/// Hashed with aHash rather than SipHash: every delivered frame costs one lookup here, and
/// session ids are generated by the gateway, never chosen by clients.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: DashMap<SessionId, Arc<SessionHandle>, ahash::RandomState>,
    shards: Shards,
}

impl SessionRegistry {
    /// A new session id, naming the delivery shard of the calling thread; call it from the
    /// task that will serve the session's socket (and register it).
    pub fn new_id(&self) -> SessionId {
        self.shards.new_id()
    }

    /// Registers a session; call it from the task serving the session's socket, whose thread's
    /// delivery shard then delivers to it (the one its id names).
    pub fn insert(&self, handle: Arc<SessionHandle>) {
        self.shards.register(&handle);
        self.sessions.insert(handle.id.clone(), handle);
        metrics::gauge!(m::CONNECTIONS).set(self.sessions.len() as f64);
    }

    /// Forgets a session; call it from the task that registered it.
    pub fn remove(&self, id: &SessionId) {
        self.shards.unregister(id);
        self.sessions.remove(id);
        metrics::gauge!(m::CONNECTIONS).set(self.sessions.len() as f64);
    }

    pub fn get(&self, id: &SessionId) -> Option<Arc<SessionHandle>> {
        self.sessions.get(id).map(|s| Arc::clone(&s))
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Queues one frame to each of `ids` (sessions gone meanwhile are skipped), in order with
    /// every earlier delivery.
    pub async fn deliver(&self, ids: Arc<[SessionId]>, frame: Frame) {
        self.shards.deliver(ids, frame).await;
    }

    /// Queues the cell's answer to a session's request, in order with every earlier delivery;
    /// the request counts as answered once the answer is queued.
    pub async fn answer(
        &self,
        due: AnswerDue,
        id: Option<RequestId>,
        result: Result<CellReply, CellError>,
    ) {
        self.shards.answer(due, id, result).await;
    }

    /// Queues an encoded reply for `session`, in order with every earlier delivery.
    pub async fn reply(&self, session: Arc<SessionHandle>, text: ByteString) {
        self.shards.reply(session, text).await;
    }

    /// Closes a session with `code` once every delivery queued before has reached it.
    pub async fn close_after_deliveries(&self, id: SessionId, code: CloseCode) {
        self.shards.close(id, code).await;
    }

    /// How many sessions match `filter`.
    pub fn count_where(&self, filter: impl Fn(&SessionHandle) -> bool) -> usize {
        self.sessions.iter().filter(|s| filter(s)).count()
    }

    /// Maps every session through `f`.
    pub fn snapshot<T>(&self, f: impl Fn(&SessionHandle) -> T) -> Vec<T> {
        self.sessions.iter().map(|s| f(&s)).collect()
    }

    /// Closes every session matching `filter` with `code`.
    pub fn close_where(&self, code: CloseCode, filter: impl Fn(&SessionHandle) -> bool) {
        for session in self.sessions.iter() {
            if filter(&session) {
                session.close(code);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(events: usize, bytes: usize) -> Arc<SessionHandle> {
        let outbox = Outbox::new(events, bytes);
        outbox.go_live(ByteString::from_static(""));
        SessionHandle::new(
            SessionId::new("s").unwrap_or_else(|e| panic!("{e}")),
            WorkspaceId::new("w").unwrap_or_else(|e| panic!("{e}")),
            UserId::new("u").unwrap_or_else(|e| panic!("{e}")),
            CellId::new("c").unwrap_or_else(|e| panic!("{e}")),
            outbox,
        )
    }

    fn frame(text: &'static str) -> Frame {
        Frame::new(ByteString::from_static(text), 0)
    }

    #[test]
    fn overflowing_the_event_bound_closes_with_4008() {
        let session = handle(3, 1 << 20);
        session.push(frame("a"));
        session.push(frame("b"));
        assert!(!session.is_closing());
        session.push(frame("c"));
        assert_eq!(session.close_code(), Some(CloseCode::SlowConsumer));
    }

    #[test]
    fn overflowing_the_byte_bound_closes_with_4008() {
        let session = handle(100, 4);
        session.push(frame("abc"));
        session.push(frame("de"));
        assert_eq!(session.close_code(), Some(CloseCode::SlowConsumer));
    }

    #[test]
    fn the_first_close_code_wins() {
        let session = handle(1, 1);
        assert!(session.close(CloseCode::GoingAway));
        assert!(!session.close(CloseCode::SlowConsumer));
        assert_eq!(session.close_code(), Some(CloseCode::GoingAway));
    }
}
