//! The cell's end of one gateway link: its bounded outbound queue, its `lost` signal, and the
//! reply guards that answer every request and attach exactly once.
//!
//! A link never blocks an actor: every push is a `try_send`. A full queue means the gateway is
//! not keeping up, and the cell gives up on the whole link (detaching its sessions, which
//! then reconnect and resume) rather than silently dropping one frame and breaking the
//! no-gap guarantee for some session.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use confab_shared::link::{CellError, CellReply, RequestKey, ToGateway};
use confab_shared::server::ChannelInfo;
use confab_shared::{ErrorCode, SessionId, WorkspaceId};
use parking_lot::Mutex;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

use crate::moving::MoveGate;
use crate::registry::{Registry, SessionEntry};

/// Requests a link may have in flight in the cell before new ones are refused as
/// `unavailable`; this bounds the actors' mailboxes, which the link fills without waiting.
pub(crate) const MAX_IN_FLIGHT: usize = 16_384;

/// One connected gateway.
pub(crate) struct Link {
    pub(crate) id: u64,
    pub(crate) gateway: String,
    outbound: mpsc::Sender<ToGateway>,
    lost: CancellationToken,
    in_flight: AtomicUsize,
    /// Sessions attached through this link, detached together when the link is lost.
    pub(crate) sessions: Mutex<HashSet<SessionId>>,
}

impl Link {
    pub(crate) fn new(id: u64, gateway: String, outbound: mpsc::Sender<ToGateway>) -> Self {
        // The series exists from the first link on, so an alert on its increase has a value.
        metrics::counter!("confab_cell_links_lost_total", "reason" => "overflow").increment(0);
        Link {
            id,
            gateway,
            outbound,
            lost: CancellationToken::new(),
            in_flight: AtomicUsize::new(0),
            sessions: Mutex::new(HashSet::new()),
        }
    }

    /// Queues `message` for the gateway; on overflow gives the link up. Returns whether the
    /// message was queued.
    pub(crate) fn push(&self, message: ToGateway) -> bool {
        if self.lost.is_cancelled() {
            return false;
        }
        match self.outbound.try_send(message) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!(gateway = %self.gateway, link = self.id, "link queue full, giving up the link");
                metrics::counter!("confab_cell_links_lost_total", "reason" => "overflow")
                    .increment(1);
                self.lost.cancel();
                false
            }
            Err(TrySendError::Closed(_)) => {
                tracing::info!(gateway = %self.gateway, link = self.id, "link closed by the gateway");
                self.lost.cancel();
                false
            }
        }
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    pub(crate) fn lost_token(&self) -> &CancellationToken {
        &self.lost
    }

    /// Requests taken in and not answered yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether everything queued for the gateway was taken by the link's writer.
    pub(crate) fn is_flushed(&self) -> bool {
        self.outbound.capacity() == self.outbound.max_capacity()
    }

    /// Counts a request in; `false` when the link already has [`MAX_IN_FLIGHT`] of them.
    fn admit(&self) -> bool {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn settle(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pending answer to one request. It answers exactly once: by [`Reply::send`], or, if it
/// is dropped unanswered (an actor stopped with it in its mailbox), with `unavailable`.
pub(crate) struct Reply {
    link: Arc<Link>,
    req: RequestKey,
    answered: bool,
    /// Set while the request's workspace is leaving this cell: a failure then goes through
    /// the move gate, which may answer "moved" instead (see `crate::moving`).
    moving: Option<(Arc<MoveGate>, WorkspaceId)>,
}

impl Reply {
    /// Takes a request in; `None` (after answering it `unavailable`) when the link is full.
    pub(crate) fn admit(link: &Arc<Link>, req: RequestKey) -> Option<Reply> {
        if link.admit() {
            return Some(Reply {
                link: link.clone(),
                req,
                answered: false,
                moving: None,
            });
        }
        link.push(ToGateway::Reply {
            req,
            result: Err(CellError::unavailable("cell busy, retry")),
        });
        None
    }

    pub(crate) fn send(mut self, result: Result<CellReply, CellError>) {
        if let (Err(e), Some((gate, workspace))) = (&result, self.moving.take()) {
            if e.code == ErrorCode::Unavailable {
                // A write refused because the workspace froze meanwhile: the gate answers it
                // "moved" once the move is through, so that the gateway retries on the new cell.
                gate.divert_failure(&workspace, self, result);
                return;
            }
        }
        self.answer(result);
    }

    /// Watches the request's outcome for a move of `workspace` under way.
    pub(crate) fn watch_move(&mut self, gate: Arc<MoveGate>, workspace: WorkspaceId) {
        self.moving = Some((gate, workspace));
    }

    /// Answers that the workspace is not (or no longer) served here: the gateway looks it up
    /// again and sends the request to its new cell.
    pub(crate) fn moved(mut self) {
        if self.answered {
            return;
        }
        self.answered = true;
        // Queued before it stops counting, so a shutdown's `4010` never overtakes it.
        self.link.push(ToGateway::Moved { req: self.req });
        self.link.settle();
    }

    fn answer(&mut self, result: Result<CellReply, CellError>) {
        if self.answered {
            return;
        }
        self.answered = true;
        // Queued before it stops counting: the shutdown drain waits for `in_flight` to reach
        // 0 and then queues the sessions' `4010`, which must come after this answer.
        self.link.push(ToGateway::Reply {
            req: self.req,
            result,
        });
        self.link.settle();
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.answer(Err(CellError::unavailable("request interrupted, retry")));
    }
}

/// The pending outcome of an attach: `Ready` or `AttachFailed`, exactly once. A failed
/// attach also unregisters the session; dropped unanswered, the guard fails the attach so
/// the gateway never waits forever.
pub(crate) struct AttachReply {
    registry: Arc<Registry>,
    session: Arc<SessionEntry>,
    answered: bool,
}

impl AttachReply {
    pub(crate) fn new(registry: Arc<Registry>, session: Arc<SessionEntry>) -> Self {
        AttachReply {
            registry,
            session,
            answered: false,
        }
    }

    pub(crate) fn ready(mut self, channels: Vec<ChannelInfo>) {
        self.answered = true;
        self.session.link.push(ToGateway::Ready {
            session: self.session.id.clone(),
            channels,
        });
    }

    pub(crate) fn fail(mut self, error: CellError) {
        self.fail_in_place(error);
    }

    fn fail_in_place(&mut self, error: CellError) {
        if self.answered {
            return;
        }
        self.answered = true;
        self.registry.detach_entry(&self.session);
        self.session.link.push(ToGateway::AttachFailed {
            session: self.session.id.clone(),
            error,
        });
    }
}

impl Drop for AttachReply {
    fn drop(&mut self) {
        self.fail_in_place(CellError::unavailable("attach interrupted, retry"));
    }
}
