//! Per-stream sequence tracking: losses, duplicates and order violations.
//!
//! A stream is a confab channel (seqs assigned by the server) or, against the reference server,
//! one publisher's frames (seqs assigned by the publisher). Either way a receiver expects every
//! seq after the one it started from exactly once and in increasing order, so one tracker serves
//! both servers and the metrics are comparable.

use std::collections::BTreeMap;

/// What one observed seq meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The next expected seq.
    InOrder,
    /// A seq beyond the next expected one; the seqs in between are missing (for now).
    Gap { skipped: u64 },
    /// A seq that was missing arrived after a higher one: an order violation.
    Late,
    /// A seq received before, or one at or below the starting point.
    Duplicate,
}

/// Tracks one stream's seqs as seen by one receiver.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    /// Seqs at or below this were known before tracking started (e.g. `last_seq` in `ready`).
    start: u64,
    /// The highest seq received so far (or `start`).
    highest: u64,
    /// Missing seqs below `highest`, as disjoint ranges `start..end` keyed by start. Normally
    /// empty; ranges keep a bogus jump in seq from costing memory per skipped seq.
    missing: BTreeMap<u64, u64>,
    received: u64,
    duplicates: u64,
    order_violations: u64,
}

impl SeqTracker {
    /// A tracker for a receiver that has seen everything up to `last_seen` (0: nothing).
    pub fn starting_after(last_seen: u64) -> Self {
        SeqTracker {
            start: last_seen,
            highest: last_seen,
            missing: BTreeMap::new(),
            received: 0,
            duplicates: 0,
            order_violations: 0,
        }
    }

    /// Records one received seq.
    pub fn observe(&mut self, seq: u64) -> Observation {
        if seq == self.highest + 1 {
            self.highest = seq;
            self.received += 1;
            return Observation::InOrder;
        }
        if seq > self.highest {
            let skipped = seq - self.highest - 1;
            self.missing.insert(self.highest + 1, seq);
            self.highest = seq;
            self.received += 1;
            return Observation::Gap { skipped };
        }
        if seq > self.start && self.take_missing(seq) {
            self.received += 1;
            self.order_violations += 1;
            return Observation::Late;
        }
        self.duplicates += 1;
        Observation::Duplicate
    }

    /// Removes `seq` from the missing ranges; false when it was not missing.
    fn take_missing(&mut self, seq: u64) -> bool {
        let Some((&lo, &hi)) = self.missing.range(..=seq).next_back() else {
            return false;
        };
        if seq >= hi {
            return false;
        }
        self.missing.remove(&lo);
        if lo < seq {
            self.missing.insert(lo, seq);
        }
        if seq + 1 < hi {
            self.missing.insert(seq + 1, hi);
        }
        true
    }

    /// The highest seq seen: what a client puts in `resume`.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// The seq tracking started after.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Distinct seqs received.
    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    pub fn order_violations(&self) -> u64 {
        self.order_violations
    }

    /// Seqs in `start+1..=final_seq` never received: the holes plus everything above the highest
    /// seq seen.
    pub fn losses_up_to(&self, final_seq: u64) -> u64 {
        let holes: u64 = self
            .missing
            .iter()
            .map(|(&lo, &hi)| hi.min(final_seq + 1).saturating_sub(lo))
            .sum();
        holes + final_seq.saturating_sub(self.highest)
    }

    /// Whether every seq up to `seq` has been received.
    pub fn complete_up_to(&self, seq: u64) -> bool {
        self.highest >= seq && self.missing.range(..=seq).next().is_none()
    }
}

/// Sums of the per-stream counters over many trackers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SeqTotals {
    pub received: u64,
    pub losses: u64,
    pub duplicates: u64,
    pub order_violations: u64,
}

impl SeqTotals {
    /// Adds one tracker, judged against the stream's final seq.
    pub fn add(&mut self, tracker: &SeqTracker, final_seq: u64) {
        self.received += tracker.received();
        self.losses += tracker.losses_up_to(final_seq);
        self.duplicates += tracker.duplicates();
        self.order_violations += tracker.order_violations();
    }

    /// Adds a stream the receiver never saw a frame of: everything after `start` was lost.
    pub fn add_unseen(&mut self, start: u64, final_seq: u64) {
        self.losses += final_seq.saturating_sub(start);
    }

    pub fn merge(&mut self, other: SeqTotals) {
        self.received += other.received;
        self.losses += other.losses;
        self.duplicates += other.duplicates;
        self.order_violations += other.order_violations;
    }

    /// No loss, no duplicate, no order violation.
    pub fn clean(&self) -> bool {
        self.losses == 0 && self.duplicates == 0 && self.order_violations == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_is_clean() {
        let mut t = SeqTracker::starting_after(0);
        for seq in 1..=100 {
            assert_eq!(t.observe(seq), Observation::InOrder);
        }
        assert_eq!(t.received(), 100);
        assert_eq!(t.losses_up_to(100), 0);
        assert!(t.complete_up_to(100));
        assert_eq!(t.highest(), 100);
    }

    #[test]
    fn starts_after_ready_last_seq() {
        let mut t = SeqTracker::starting_after(45);
        assert_eq!(t.observe(46), Observation::InOrder);
        assert_eq!(t.losses_up_to(48), 2);
        assert_eq!(
            t.observe(45),
            Observation::Duplicate,
            "seqs before the start are old"
        );
    }

    #[test]
    fn gap_counts_as_loss_until_filled() {
        let mut t = SeqTracker::starting_after(0);
        t.observe(1);
        assert_eq!(t.observe(5), Observation::Gap { skipped: 3 });
        assert_eq!(t.losses_up_to(5), 3);
        assert!(!t.complete_up_to(5));
        assert!(t.complete_up_to(1));
        assert_eq!(t.observe(3), Observation::Late);
        assert_eq!(t.losses_up_to(5), 2);
        assert_eq!(t.observe(2), Observation::Late);
        assert_eq!(t.observe(4), Observation::Late);
        assert_eq!(t.losses_up_to(5), 0);
        assert_eq!(t.order_violations(), 3);
        assert!(t.complete_up_to(5));
    }

    #[test]
    fn duplicates_are_counted_not_received() {
        let mut t = SeqTracker::starting_after(0);
        t.observe(1);
        t.observe(2);
        assert_eq!(t.observe(2), Observation::Duplicate);
        assert_eq!(t.observe(1), Observation::Duplicate);
        t.observe(4);
        t.observe(3);
        assert_eq!(
            t.observe(3),
            Observation::Duplicate,
            "a late seq seen twice is a duplicate"
        );
        assert_eq!(t.received(), 4);
        assert_eq!(t.duplicates(), 3);
        assert_eq!(t.order_violations(), 1);
    }

    #[test]
    fn losses_beyond_highest_and_partial_final() {
        let mut t = SeqTracker::starting_after(10);
        t.observe(11);
        t.observe(20);
        // Missing 12..=19 (8) and 21..=25 (5).
        assert_eq!(t.losses_up_to(25), 13);
        // A final seq inside a hole counts only the part of the hole up to it.
        assert_eq!(t.losses_up_to(15), 4);
    }

    #[test]
    fn huge_jump_is_cheap() {
        let mut t = SeqTracker::starting_after(0);
        t.observe(u64::MAX / 2);
        assert_eq!(t.losses_up_to(u64::MAX / 2), u64::MAX / 2 - 1);
        assert_eq!(t.observe(7), Observation::Late);
        assert_eq!(t.losses_up_to(u64::MAX / 2), u64::MAX / 2 - 2);
    }

    #[test]
    fn totals_add_unseen_streams_as_losses() {
        let mut totals = SeqTotals::default();
        let mut t = SeqTracker::starting_after(0);
        t.observe(1);
        t.observe(1);
        totals.add(&t, 3);
        totals.add_unseen(0, 4);
        assert_eq!(totals.received, 1);
        assert_eq!(totals.losses, 2 + 4);
        assert_eq!(totals.duplicates, 1);
        assert!(!totals.clean());
    }
}
