//! Local client sessions: a registry by session id, and each session's bounded outbound queue.
//!
//! Hot path: a cell's `Deliver` names the sessions of this gateway that must receive one
//! encoded frame; [`SessionRegistry::deliver`] looks each up and queues a clone of the same
//! `ByteString` (a reference-count increment, no copy, no encoding) into its [`Outbox`]. An
//! outbox that is full, in events or bytes, closes its session with `4008` instead of growing.

use std::sync::Arc;

use confab_shared::link::Frame;
use confab_shared::{CellId, CloseCode, SessionId, UserId, WorkspaceId};
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
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
        })
    }

    /// Queues an event for the socket. On overflow the session is closed with `4008`.
    pub fn push(&self, frame: Frame) {
        if self.outbox.push_event(frame) == Err(Refused::Overflow) {
            self.overflow();
        }
    }

    /// Queues a reply or error frame. On overflow the session is closed with `4008`.
    pub fn push_reply(&self, text: bytestring::ByteString) {
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
}

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
        Frame {
            text: ByteString::from_static(text),
            created_us: 0,
        }
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
