//! Local client sessions: a registry by session id, and each session's bounded outbound queue.
//!
//! Hot path: a cell's `Deliver` names the sessions of this gateway that must receive one
//! encoded frame; [`SessionRegistry::deliver`] looks each up and queues a clone of the same
//! `ByteString` (a reference-count increment, no copy, no encoding). A queue that is full, in
//! events or bytes, closes its session with `4008` instead of growing.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use confab_shared::link::Frame;
use confab_shared::{CellId, CloseCode, SessionId, UserId, WorkspaceId};
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// The sending half of a session: what the rest of the gateway holds.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: SessionId,
    pub workspace: WorkspaceId,
    pub user: UserId,
    /// The cell the session is attached to.
    pub cell: CellId,
    queue: mpsc::Sender<Frame>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    close_code: AtomicU16,
    closing: CancellationToken,
}

/// The receiving half, owned by the session's writer.
#[derive(Debug)]
pub struct SessionQueue {
    pub frames: mpsc::Receiver<Frame>,
    pub closing: CancellationToken,
}

impl SessionHandle {
    /// A session with a queue of at most `max_events` frames and `max_bytes` bytes.
    pub fn new(
        id: SessionId,
        workspace: WorkspaceId,
        user: UserId,
        cell: CellId,
        max_events: usize,
        max_bytes: usize,
    ) -> (Arc<SessionHandle>, SessionQueue) {
        let (queue, frames) = mpsc::channel(max_events.max(1));
        let closing = CancellationToken::new();
        let handle = Arc::new(SessionHandle {
            id,
            workspace,
            user,
            cell,
            queue,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            close_code: AtomicU16::new(0),
            closing: closing.clone(),
        });
        (handle, SessionQueue { frames, closing })
    }

    /// Queues a frame for the socket. On overflow the session is closed with `4008`.
    pub fn push(&self, frame: Frame) {
        if self.closing.is_cancelled() {
            return;
        }
        let len = frame.text.len();
        let queued = self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.max_bytes {
            self.overflow();
            return;
        }
        match self.queue.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.overflow(),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// The writer took a frame of `len` bytes off the queue.
    pub fn dequeued(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
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
        let decided = self
            .close_code
            .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        self.closing.cancel();
        decided
    }

    /// The close code decided so far, if any.
    pub fn close_code(&self) -> Option<CloseCode> {
        let code = self.close_code.load(Ordering::Acquire);
        ALL_CLOSE_CODES.into_iter().find(|c| c.code() == code)
    }

    /// A token cancelled when the session is asked to close.
    pub fn closing_token(&self) -> CancellationToken {
        self.closing.clone()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }
}

const ALL_CLOSE_CODES: [CloseCode; 10] = [
    CloseCode::Normal,
    CloseCode::GoingAway,
    CloseCode::FrameTooBig,
    CloseCode::HeartbeatTimeout,
    CloseCode::BadToken,
    CloseCode::HelloTimeout,
    CloseCode::ProtocolAbuse,
    CloseCode::UnknownWorkspace,
    CloseCode::SlowConsumer,
    CloseCode::ReconnectNow,
];

/// Every session of this gateway, by id.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: DashMap<SessionId, Arc<SessionHandle>>,
}

impl SessionRegistry {
    pub fn insert(&self, handle: Arc<SessionHandle>) {
        self.sessions.insert(handle.id.clone(), handle);
        metrics::gauge!(m::CONNECTIONS).set(self.sessions.len() as f64);
    }

    pub fn remove(&self, id: &SessionId) {
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

    /// Queues one frame to each of `ids` (sessions gone meanwhile are skipped).
    pub fn deliver(&self, ids: &[SessionId], frame: &Frame) {
        for id in ids {
            if let Some(session) = self.sessions.get(id) {
                session.push(frame.clone());
            }
        }
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
    use bytestring::ByteString;

    fn handle(events: usize, bytes: usize) -> (Arc<SessionHandle>, SessionQueue) {
        let id = |s: &str| s.to_string();
        SessionHandle::new(
            SessionId::new(&id("s")).unwrap_or_else(|e| panic!("{e}")),
            WorkspaceId::new("w").unwrap_or_else(|e| panic!("{e}")),
            UserId::new("u").unwrap_or_else(|e| panic!("{e}")),
            CellId::new("c").unwrap_or_else(|e| panic!("{e}")),
            events,
            bytes,
        )
    }

    fn frame(text: &'static str) -> Frame {
        Frame {
            text: ByteString::from_static(text),
            created_us: 0,
        }
    }

    #[test]
    fn overflowing_the_event_bound_closes_with_4008() {
        let (session, _queue) = handle(2, 1 << 20);
        session.push(frame("a"));
        session.push(frame("b"));
        assert!(!session.is_closing());
        session.push(frame("c"));
        assert_eq!(session.close_code(), Some(CloseCode::SlowConsumer));
    }

    #[test]
    fn overflowing_the_byte_bound_closes_with_4008() {
        let (session, _queue) = handle(100, 4);
        session.push(frame("abc"));
        session.push(frame("de"));
        assert_eq!(session.close_code(), Some(CloseCode::SlowConsumer));
    }

    #[test]
    fn the_first_close_code_wins() {
        let (session, _queue) = handle(1, 1);
        assert!(session.close(CloseCode::GoingAway));
        assert!(!session.close(CloseCode::SlowConsumer));
        assert_eq!(session.close_code(), Some(CloseCode::GoingAway));
    }
}
