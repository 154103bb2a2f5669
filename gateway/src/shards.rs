//! Delivery shards: everything a cell or the presence engine sends a session reaches it on the
//! worker thread that serves it.
//!
//! Every client socket is served by one HTTP worker thread for its whole life (its task is
//! spawned there and never moves). Each worker thread that serves sessions has a shard: a
//! thread-local map of those sessions and a bounded queue, drained by a task on that thread.
//! The shard's index is part of every session id it hands out ([`Shards::new_id`]), so whoever
//! holds a session id knows its shard without a lookup. A link reader splits each event's
//! recipients by shard ([`Shards::deliver`]) and hands each shard only its own — one
//! cross-thread hand-off per shard concerned, not one per recipient, and no shard looks at
//! another's sessions — and each shard looks its sessions up in its own map and queues the
//! frame in their outboxes. Taking a session's outbox lock and waking its write pump therefore
//! happen on the thread that owns both, so the per-recipient work neither bounces cache lines
//! between cores nor wakes tasks across threads, and the shards work in parallel.
//!
//! One way into an outbox: events, the answers to a session's requests, a cell's `Close` of a
//! session, presence changes and `presence_sub` replies all take this path. (What the
//! connection answers by itself — `pong`, refused frames, a request that timed out or could not
//! be sent — it queues directly, on this same thread: none of it follows anything a shard
//! holds.)
//!
//! Order: a shard's queue is FIFO and a link reader queues one message at a time, so each
//! session receives a link's messages in the link's order. A cell sends the events a request
//! caused before its reply, so the sender's `ack` follows the echo of its own message, and a
//! `Close` follows every delivery and answer sent before it. A full queue makes the link reader
//! wait; its own link queue then fills and the cell gives the link up, as it would if the
//! reader itself were slow.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytestring::ByteString;
use confab_shared::client::RequestId;
use confab_shared::link::{CellError, CellReply, Frame};
use confab_shared::{CloseCode, SessionId};
use parking_lot::RwLock;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::sessions::{AnswerDue, SessionHandle};

/// Items a shard's queue holds before the link reader waits.
const SHARD_QUEUE: usize = 4096;
/// Items a shard takes from its queue per wake.
const DRAIN_BATCH: usize = 256;

/// What a shard is handed.
enum Item {
    /// An event for those of `sessions` this shard serves: the ones at `picks`.
    Deliver {
        sessions: Arc<[SessionId]>,
        picks: Picks,
        frame: Frame,
    },
    /// A cell's answer to a request of a session (encoded here, on the session's thread).
    Answer {
        due: AnswerDue,
        id: Option<RequestId>,
        result: Result<CellReply, CellError>,
    },
    /// A reply already encoded (`presence_sub`'s).
    Reply {
        session: Arc<SessionHandle>,
        text: ByteString,
    },
    Close {
        session: SessionId,
        code: CloseCode,
    },
}

/// Which of a delivery's recipients belong to the shard it is handed to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Picks {
    /// All of them: the common case of a single recipient, or of one worker thread.
    All,
    /// Those at these positions, in the delivery's order.
    At(Vec<u32>),
}

/// The shards of one gateway, one per worker thread that serves sessions.
pub struct Shards {
    /// Tells this gateway's shards apart from another gateway's in the same process.
    key: usize,
    /// Each shard's queue, at the index its session ids carry; never removed, so that the
    /// indices stay valid (a worker thread that stopped leaves a closed queue).
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
        match item {
            Item::Deliver {
                sessions: ids,
                picks,
                frame,
            } => {
                let sessions = self.sessions.borrow();
                let push = |id: &SessionId| {
                    if let Some(session) = sessions.get(id) {
                        session.push(frame.clone());
                    }
                };
                match picks {
                    Picks::All => ids.iter().for_each(push),
                    Picks::At(at) => at
                        .iter()
                        .filter_map(|&i| ids.get(i as usize))
                        .for_each(push),
                }
            }
            Item::Answer { due, id, result } => {
                due.session().push_answer(id, result);
                // Counted as answered only now that the answer is queued.
                drop(due);
            }
            Item::Reply { session, text } => session.push_reply(text),
            Item::Close { session, code } => {
                let session = self.sessions.borrow().get(&session).cloned();
                if let Some(session) = session {
                    session.close_once_answered(code);
                }
            }
        }
    }
}

thread_local! {
    /// This thread's shard of each gateway, by [`Shards::key`], with its index.
    static LOCAL: RefCell<HashMap<usize, (usize, Rc<Shard>)>> = RefCell::new(HashMap::new());
}

/// The shard named by a session id this gateway handed out ([`Shards::new_id`]): the decimal
/// index before its first `_`.
pub fn shard_of(id: &SessionId) -> Option<usize> {
    let (index, _) = id.as_str().split_once('_')?;
    index.parse().ok()
}

/// Splits a delivery's recipients by shard: each shard of the `shards` that serves any of
/// them, with the positions of its own. Ids that name no shard are left out.
fn split_by_shard(sessions: &[SessionId], shards: usize) -> Vec<(usize, Picks)> {
    let Some(first) = sessions.first().map(shard_of) else {
        return Vec::new();
    };
    if sessions[1..].iter().all(|id| shard_of(id) == first) {
        return first
            .filter(|&shard| shard < shards)
            .map(|shard| (shard, Picks::All))
            .into_iter()
            .collect();
    }
    let mut picks = vec![Vec::new(); shards];
    for (i, id) in sessions.iter().enumerate() {
        if let Some(at) = shard_of(id).and_then(|shard| picks.get_mut(shard)) {
            at.push(i as u32);
        }
    }
    picks
        .into_iter()
        .enumerate()
        .filter(|(_, at)| !at.is_empty())
        .map(|(shard, at)| (shard, Picks::At(at)))
        .collect()
}

impl Shards {
    /// The calling thread's shard and its index; the first call on a thread starts it.
    fn local(&self) -> (usize, Rc<Shard>) {
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            let (index, shard) = local.entry(self.key).or_insert_with(|| self.start_shard());
            (*index, Rc::clone(shard))
        })
    }

    /// A new session id, unique across the deployment, naming the calling thread's shard.
    /// Call it from the task that will serve the session's socket.
    pub fn new_id(&self) -> SessionId {
        let (index, _) = self.local();
        let id = format!("{index}_{}", uuid::Uuid::new_v4().simple());
        // Digits, `_` and 32 hex characters: always a valid id, at most 53 characters.
        SessionId::new(&id).unwrap_or_else(|_| unreachable!("a valid session id"))
    }

    /// Adds a session to the calling thread's shard. Call it from the task that serves the
    /// session's socket, the one that made its id.
    pub fn register(&self, session: &Arc<SessionHandle>) {
        let (index, shard) = self.local();
        debug_assert_eq!(
            shard_of(&session.id),
            Some(index),
            "a session is registered on the thread whose shard its id names"
        );
        shard
            .sessions
            .borrow_mut()
            .insert(session.id.clone(), Arc::clone(session));
    }

    /// Removes a session from the calling thread's shard (the thread that registered it).
    pub fn unregister(&self, id: &SessionId) {
        LOCAL.with(|local| {
            if let Some((_, shard)) = local.borrow().get(&self.key) {
                shard.sessions.borrow_mut().remove(id);
            }
        });
    }

    fn start_shard(&self) -> (usize, Rc<Shard>) {
        let (queue, mut inbox) = mpsc::channel(SHARD_QUEUE);
        let index = {
            let mut queues = self.queues.write();
            queues.push(queue);
            queues.len() - 1
        };
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
        (index, shard)
    }

    /// Queues `frame` for `sessions` (those of them this gateway serves): each shard gets
    /// the ones it serves.
    pub async fn deliver(&self, sessions: Arc<[SessionId]>, frame: Frame) {
        let shards = self.queues.read().len();
        let split = split_by_shard(&sessions, shards);
        let items = split.into_iter().map(|(shard, picks)| {
            let item = Item::Deliver {
                sessions: Arc::clone(&sessions),
                picks,
                frame: frame.clone(),
            };
            (shard, item)
        });
        self.hand_out(items).await;
    }

    /// Queues the cell's answer to a session's request, behind everything its link delivered
    /// before it; the request counts as answered once the answer is in the outbox.
    pub async fn answer(
        &self,
        due: AnswerDue,
        id: Option<RequestId>,
        result: Result<CellReply, CellError>,
    ) {
        if let Some(shard) = shard_of(&due.session().id) {
            let item = Item::Answer { due, id, result };
            self.hand_out(std::iter::once((shard, item))).await;
        }
    }

    /// Queues an encoded reply for `session`, behind everything handed to its shard before.
    pub async fn reply(&self, session: Arc<SessionHandle>, text: ByteString) {
        if let Some(shard) = shard_of(&session.id) {
            let item = Item::Reply { session, text };
            self.hand_out(std::iter::once((shard, item))).await;
        }
    }

    /// Closes a session with `code` after everything handed to its shard before.
    pub async fn close(&self, session: SessionId, code: CloseCode) {
        if let Some(shard) = shard_of(&session) {
            let item = Item::Close { session, code };
            self.hand_out(std::iter::once((shard, item))).await;
        }
    }

    /// Queues each item on its shard, waiting for room where a queue is full (after trying
    /// every other shard, so that one full shard does not hold the rest back). An item for a
    /// shard that stopped (its worker thread ended at shutdown) is dropped.
    async fn hand_out(&self, items: impl Iterator<Item = (usize, Item)>) {
        let mut full = Vec::new();
        {
            let queues = self.queues.read();
            for (shard, item) in items {
                let Some(queue) = queues.get(shard) else {
                    continue;
                };
                match queue.try_send(item) {
                    Ok(()) | Err(TrySendError::Closed(_)) => {}
                    Err(TrySendError::Full(item)) => full.push((queue.clone(), item)),
                }
            }
        }
        for (queue, item) in full {
            let _ = queue.send(item).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::Outbox;
    use confab_shared::server::encode;
    use confab_shared::{CellId, ChannelId, UserId, WorkspaceId};
    use std::time::Duration;

    fn id(s: &str) -> SessionId {
        SessionId::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A live session with an id `shards` made on the calling thread.
    fn session(shards: &Shards, user: &str) -> Arc<SessionHandle> {
        let outbox = Outbox::new(1000, 1 << 20);
        outbox.go_live(ByteString::from_static("ready"));
        SessionHandle::new(
            shards.new_id(),
            WorkspaceId::new("w").unwrap_or_else(|e| panic!("{e}")),
            UserId::new(user).unwrap_or_else(|e| panic!("{e}")),
            CellId::new("c").unwrap_or_else(|e| panic!("{e}")),
            outbox,
        )
    }

    fn frame(n: usize) -> Frame {
        Frame::new(ByteString::from(n.to_string()), 0)
    }

    fn ack(n: u64) -> Result<CellReply, CellError> {
        Ok(CellReply::Ack {
            channel: ChannelId::new("general").unwrap_or_else(|e| panic!("{e}")),
            seq: n,
            ts: 0,
        })
    }

    fn ack_text(n: u64) -> String {
        encode(&confab_shared::server::ServerFrame::Ack {
            id: Some(RequestId::Int(n as i64)),
            channel: ChannelId::new("general").unwrap_or_else(|e| panic!("{e}")),
            seq: n,
            ts: 0,
        })
        .to_string()
    }

    #[test]
    fn a_delivery_is_split_by_the_shard_each_session_id_names() {
        let ids = [
            id("1_a"),
            id("0_b"),
            id("1_c"),
            id("x"),
            id("7_d"),
            id("0_e"),
        ];
        assert_eq!(
            split_by_shard(&ids, 2),
            vec![(0, Picks::At(vec![1, 5])), (1, Picks::At(vec![0, 2]))],
            "each shard gets only its own, in order; ids naming no shard of this gateway are left out"
        );
        assert_eq!(split_by_shard(&ids[..1], 2), vec![(1, Picks::All)]);
        assert_eq!(
            split_by_shard(&[id("0_a"), id("0_b")], 2),
            vec![(0, Picks::All)]
        );
        assert_eq!(split_by_shard(&[id("5_a")], 2), vec![]);
        assert_eq!(split_by_shard(&[], 2), vec![]);
    }

    #[test]
    fn sessions_on_two_threads_get_every_delivery_and_answer_in_order_and_a_close_after_them() {
        actix_rt::System::new().block_on(async {
            let shards = Arc::new(Shards::default());
            let workers = [actix_rt::Arbiter::new(), actix_rt::Arbiter::new()];
            let mut sessions = Vec::new();
            for (n, worker) in workers.iter().enumerate() {
                let (registered, done) = tokio::sync::oneshot::channel();
                let shards = Arc::clone(&shards);
                worker.spawn(async move {
                    let session = session(&shards, &format!("u{n}"));
                    shards.register(&session);
                    let _ = registered.send(session);
                });
                sessions.push(done.await.unwrap_or_else(|e| panic!("{e}")));
            }
            assert_eq!(shards.queues.read().len(), 2, "one shard per thread");
            assert_eq!(shard_of(&sessions[0].id), Some(0));
            assert_eq!(shard_of(&sessions[1].id), Some(1));

            let ids: Arc<[SessionId]> = sessions.iter().map(|s| s.id.clone()).collect();
            let mut expected = vec!["ready".to_string()];
            for n in 0..500 {
                shards.deliver(Arc::clone(&ids), frame(n)).await;
                expected.push(n.to_string());
                if n % 10 == 0 {
                    // An answer handed out after an event stays behind it.
                    let due = sessions[0].expect_answer();
                    let seq = n as u64;
                    shards
                        .answer(due, Some(RequestId::Int(seq as i64)), ack(seq))
                        .await;
                }
            }
            // The close follows the deliveries: s0 keeps all of them (a close refuses later
            // frames, so a close that overtook them would cut the list short).
            shards
                .close(sessions[0].id.clone(), CloseCode::ReconnectNow)
                .await;

            let expected_0: Vec<String> = std::iter::once("ready".to_string())
                .chain((0..500).flat_map(|n| {
                    let answer = (n % 10 == 0).then(|| ack_text(n as u64));
                    std::iter::once(n.to_string()).chain(answer)
                }))
                .collect();
            for _ in 0..200 {
                if sessions[0].close_code().is_some() && sessions[1].queued_texts().len() == 501 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(sessions[0].close_code(), Some(CloseCode::ReconnectNow));
            assert_eq!(sessions[0].queued_texts(), expected_0);
            assert_eq!(sessions[1].queued_texts(), expected);
            assert_eq!(sessions[1].close_code(), None);
            for worker in &workers {
                worker.stop();
            }
        });
    }
}
