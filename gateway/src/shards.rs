//! Delivery shards: cells' events reach sessions on the worker threads that serve them.
//!
//! Every client socket is served by one HTTP worker thread for its whole life (its task is
//! spawned there and never moves). Each worker thread that serves sessions has a shard: a
//! thread-local map of those sessions and a bounded queue of deliveries, drained by a task on
//! that thread. A link reader hands each event to every shard's queue — one cross-thread
//! hand-off per worker, not one per recipient — and each shard looks the listed sessions up in
//! its own map and queues the frame in their outboxes. Taking a session's outbox lock and
//! waking its write pump therefore happen on the thread that owns both, so the per-recipient
//! work neither bounces cache lines between cores nor wakes tasks across threads, and the
//! shards work in parallel.
//!
//! Order: a shard's queue is FIFO and a link reader queues one message at a time, so each
//! session receives a link's deliveries — and a cell's `Close` of it, which takes the same
//! path — in the link's order. A full queue makes the link reader wait; its own link queue then
//! fills and the cell gives the link up, as it would if the reader itself were slow.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use confab_shared::link::Frame;
use confab_shared::{CloseCode, SessionId};
use parking_lot::RwLock;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::sessions::SessionHandle;

/// Deliveries a shard's queue holds before the link reader waits.
const SHARD_QUEUE: usize = 4096;
/// Deliveries a shard takes from its queue per wake.
const DRAIN_BATCH: usize = 256;

/// What a link reader hands to the shards.
#[derive(Clone)]
enum Item {
    Deliver {
        sessions: Arc<[SessionId]>,
        frame: Frame,
    },
    Close {
        session: SessionId,
        code: CloseCode,
    },
}

/// The shards of one gateway, one per worker thread that serves sessions.
pub struct Shards {
    /// Tells this gateway's shards apart from another gateway's in the same process.
    key: usize,
    queues: RwLock<Vec<mpsc::Sender<Item>>>,
}

impl Default for Shards {
    fn default() -> Self {
        static NEXT_KEY: AtomicUsize = AtomicUsize::new(0);
        Shards {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            queues: RwLock::new(Vec::new()),
        }
    }
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("shards", &self.queues.read().len())
            .finish()
    }
}

/// The sessions one worker thread serves.
#[derive(Default)]
struct Shard {
    sessions: RefCell<HashMap<SessionId, Arc<SessionHandle>, ahash::RandomState>>,
}

impl Shard {
    fn apply(&self, item: Item) {
        let sessions = self.sessions.borrow();
        match item {
            Item::Deliver {
                sessions: ids,
                frame,
            } => {
                for id in ids.iter() {
                    if let Some(session) = sessions.get(id) {
                        session.push(frame.clone());
                    }
                }
            }
            Item::Close { session, code } => {
                if let Some(session) = sessions.get(&session) {
                    session.close_once_answered(code);
                }
            }
        }
    }
}

thread_local! {
    /// This thread's shard of each gateway, by [`Shards::key`].
    static LOCAL: RefCell<HashMap<usize, Rc<Shard>>> = RefCell::new(HashMap::new());
}

impl Shards {
    /// Adds a session to the calling thread's shard. Call it from the task that serves the
    /// session's socket. The first session of a thread starts that thread's shard.
    pub fn register(&self, session: &Arc<SessionHandle>) {
        let shard = LOCAL.with(|local| {
            Rc::clone(
                local
                    .borrow_mut()
                    .entry(self.key)
                    .or_insert_with(|| self.start_shard()),
            )
        });
        shard
            .sessions
            .borrow_mut()
            .insert(session.id.clone(), Arc::clone(session));
    }

    /// Removes a session from the calling thread's shard (the thread that registered it).
    pub fn unregister(&self, id: &SessionId) {
        LOCAL.with(|local| {
            if let Some(shard) = local.borrow().get(&self.key) {
                shard.sessions.borrow_mut().remove(id);
            }
        });
    }

    fn start_shard(&self) -> Rc<Shard> {
        let (queue, mut inbox) = mpsc::channel(SHARD_QUEUE);
        self.queues.write().push(queue);
        let shard = Rc::new(Shard::default());
        let draining = Rc::clone(&shard);
        tokio::task::spawn_local(async move {
            let mut batch = Vec::with_capacity(DRAIN_BATCH);
            while inbox.recv_many(&mut batch, DRAIN_BATCH).await > 0 {
                for item in batch.drain(..) {
                    draining.apply(item);
                }
            }
        });
        shard
    }

    /// Queues `frame` for `sessions` (those of them this gateway serves).
    pub async fn deliver(&self, sessions: Arc<[SessionId]>, frame: Frame) {
        self.hand_out(Item::Deliver { sessions, frame }).await;
    }

    /// Closes a session with `code` after every delivery queued before.
    pub async fn close(&self, session: SessionId, code: CloseCode) {
        self.hand_out(Item::Close { session, code }).await;
    }

    /// Queues `item` on every shard, waiting for room where a queue is full.
    async fn hand_out(&self, item: Item) {
        let mut full = Vec::new();
        let mut gone = false;
        for queue in self.queues.read().iter() {
            match queue.try_send(item.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(item)) => full.push((queue.clone(), item)),
                Err(TrySendError::Closed(_)) => gone = true,
            }
        }
        for (queue, item) in full {
            let _ = queue.send(item).await;
        }
        if gone {
            // A worker thread stopped (server shutdown): forget its queue.
            self.queues.write().retain(|queue| !queue.is_closed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::Outbox;
    use bytestring::ByteString;
    use confab_shared::{CellId, UserId, WorkspaceId};
    use std::time::Duration;

    fn session(id: &str) -> Arc<SessionHandle> {
        let outbox = Outbox::new(1000, 1 << 20);
        outbox.go_live(ByteString::from_static("ready"));
        SessionHandle::new(
            SessionId::new(id).unwrap_or_else(|e| panic!("{e}")),
            WorkspaceId::new("w").unwrap_or_else(|e| panic!("{e}")),
            UserId::new(id).unwrap_or_else(|e| panic!("{e}")),
            CellId::new("c").unwrap_or_else(|e| panic!("{e}")),
            outbox,
        )
    }

    fn frame(n: usize) -> Frame {
        Frame::new(ByteString::from(n.to_string()), 0)
    }

    #[test]
    fn sessions_on_two_threads_get_every_delivery_in_order_and_a_close_after_them() {
        actix_rt::System::new().block_on(async {
            let shards = Arc::new(Shards::default());
            let workers = [actix_rt::Arbiter::new(), actix_rt::Arbiter::new()];
            let sessions = [session("s0"), session("s1")];
            for (worker, session) in workers.iter().zip(&sessions) {
                let (registered, done) = tokio::sync::oneshot::channel();
                let (shards, session) = (Arc::clone(&shards), Arc::clone(session));
                worker.spawn(async move {
                    shards.register(&session);
                    let _ = registered.send(());
                });
                done.await.unwrap_or_else(|e| panic!("{e}"));
            }
            assert_eq!(shards.queues.read().len(), 2, "one shard per thread");

            let ids: Arc<[SessionId]> = sessions.iter().map(|s| s.id.clone()).collect();
            for n in 0..500 {
                shards.deliver(Arc::clone(&ids), frame(n)).await;
            }
            // The close follows the deliveries: s0 keeps all 500 (a close refuses later
            // frames, so a close that overtook them would cut the list short).
            shards
                .close(sessions[0].id.clone(), CloseCode::ReconnectNow)
                .await;

            let expected: Vec<String> = std::iter::once("ready".to_string())
                .chain((0..500).map(|n| n.to_string()))
                .collect();
            for _ in 0..200 {
                if sessions[0].close_code().is_some() && sessions[1].queued_texts().len() == 501 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(sessions[0].close_code(), Some(CloseCode::ReconnectNow));
            assert_eq!(sessions[0].queued_texts(), expected);
            assert_eq!(sessions[1].queued_texts(), expected);
            assert_eq!(sessions[1].close_code(), None);
            for worker in &workers {
                worker.stop();
            }
        });
    }
}
