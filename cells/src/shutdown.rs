//! A cell's graceful shutdown (SPEC §1): stop taking writes, let the writes already taken
//! finish in the store, tell every session to reconnect (`4010`), and hand the gateways
//! everything queued for them before the links close. Nothing acked is lost: an ack is sent
//! only after its write returned, and the links are given up only once their queues (acks
//! and deliveries in order) were taken by their writers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use confab_shared::link::ToGateway;
use confab_shared::CloseCode;
use tokio::time::Instant;

use crate::Cell;

/// How often the drain looks at what is left.
const POLL: Duration = Duration::from_millis(10);

/// What a shutdown did, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Sessions told to reconnect.
    pub sessions_told: usize,
    /// Requests still unanswered at the deadline (0 on a clean drain).
    pub unanswered: usize,
    /// Whether every link's queue was taken by its writer before the links closed.
    pub flushed: bool,
}

impl Cell {
    /// Shuts the cell down gracefully (module docs), taking at most about `deadline`; the
    /// links are given up at the end, so the gateways' next attempt finds the cell gone.
    pub async fn shut_down(&self, deadline: Duration) -> DrainReport {
        let until = Instant::now() + deadline;
        let reg = &self.reg;
        reg.stopping.store(true, Ordering::Release);
        let in_flight = || reg.links.iter().map(|link| link.in_flight()).sum::<usize>();
        wait_until(until, || in_flight() == 0).await;
        let unanswered = in_flight();
        let sessions = reg.all_sessions();
        for session in &sessions {
            session.link.push(ToGateway::Close {
                session: session.id.clone(),
                code: CloseCode::ReconnectNow,
            });
        }
        let flushed = || reg.links.iter().all(|link| link.is_flushed());
        wait_until(until, flushed).await;
        let report = DrainReport {
            sessions_told: sessions.len(),
            unanswered,
            flushed: flushed(),
        };
        for link in reg.links.iter() {
            link.lost_token().cancel();
        }
        report
    }

    /// Whether [`Cell::shut_down`] began.
    pub fn is_stopping(&self) -> bool {
        self.reg.stopping.load(Ordering::Acquire)
    }
}

async fn wait_until(until: Instant, done: impl Fn() -> bool) {
    while !done() && Instant::now() < until {
        tokio::time::sleep(POLL).await;
    }
}
