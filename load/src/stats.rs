//! Latency statistics: publish→receive latencies recorded by thousands of connection tasks
//! into a few shared HDR histograms, and the summary every report carries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded exactly, in microseconds; anything above is clamped to it.
const MAX_TRACKABLE_US: u64 = 120_000_000;
/// Shards of the shared histogram. A histogram per connection would cost ~100 KiB each
/// (500 MiB for 5,000 subscribers), one shared histogram would serialize the recording
/// threads; a handful of mutex-guarded shards keeps contention negligible on a few cores.
const SHARDS: usize = 16;

fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that `new_with_bounds` accepts (low >= 1, high >= 2 * low,
    // precision <= 5), so this cannot fail at run time.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_TRACKABLE_US, 3).expect("constant histogram bounds are valid")
}

/// Latencies of one measurement phase, recorded from many tasks.
#[derive(Debug)]
pub struct LatencyHub {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for LatencyHub {
    fn default() -> Self {
        LatencyHub {
            shards: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }
}

impl LatencyHub {
    /// Records one latency in microseconds; `hint` (e.g. the connection index) picks the shard.
    pub fn record(&self, hint: usize, latency_us: u64) {
        let shard = &self.shards[hint % SHARDS];
        let mut histogram = shard.lock().unwrap_or_else(|e| e.into_inner());
        histogram.saturating_record(latency_us.max(1));
    }

    /// The merged histogram of everything recorded since the last reset.
    pub fn snapshot(&self) -> Histogram<u64> {
        let mut merged = new_histogram();
        for shard in &self.shards {
            let histogram = shard.lock().unwrap_or_else(|e| e.into_inner());
            // Shards share bounds, so adding cannot fail; a failure would only drop samples.
            let _ = merged.add(&*histogram);
        }
        merged
    }

    /// Clears every shard, to start a new measurement phase.
    pub fn reset(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|e| e.into_inner()).reset();
        }
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.snapshot())
    }
}

/// Latency percentiles of one run, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// Event counters shared by every connection task of a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events received by measuring receivers (messages, plus typing in the chat scenario).
    pub delivered: AtomicU64,
    /// Typing events among `delivered` (the rest are messages).
    pub typing: AtomicU64,
    /// Messages accepted by the server (acks; frames sent, against the reference server).
    pub published: AtomicU64,
    /// `error` frames received, by any connection.
    pub errors: AtomicU64,
    /// `error` frames with code `rate_limited`, among `errors`.
    pub rate_limited: AtomicU64,
    /// `resync` events received.
    pub resyncs: AtomicU64,
    /// Connections the server closed or that failed while they should have stayed open.
    pub disconnects: AtomicU64,
    /// Text frames received by measuring receivers (fewer than their deliveries when frames
    /// are batched).
    pub frames: AtomicU64,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let hub = LatencyHub::default();
        // 1..=1000 ms, one sample each, spread over shards.
        for i in 1..=1000u64 {
            hub.record(i as usize, i * 1000);
        }
        let s = hub.summary();
        assert_eq!(s.samples, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "p50 {}", s.p50_ms);
        assert!((s.p99_ms - 990.0).abs() < 1.0, "p99 {}", s.p99_ms);
        assert!((s.p999_ms - 999.0).abs() < 1.0, "p999 {}", s.p999_ms);
        assert!((s.max_ms - 1000.0).abs() < 1.0, "max {}", s.max_ms);
        assert!((s.mean_ms - 500.5).abs() < 1.0, "mean {}", s.mean_ms);
    }

    #[test]
    fn reset_starts_a_new_phase() {
        let hub = LatencyHub::default();
        hub.record(0, 5_000);
        hub.reset();
        assert_eq!(hub.summary(), LatencySummary::default());
        hub.record(3, 7_000);
        assert_eq!(hub.summary().samples, 1);
    }

    #[test]
    fn zero_and_huge_latencies_are_clamped_not_dropped() {
        let hub = LatencyHub::default();
        hub.record(0, 0);
        hub.record(0, u64::MAX);
        let s = hub.summary();
        assert_eq!(s.samples, 2);
        assert!(s.max_ms >= MAX_TRACKABLE_US as f64 / 1000.0 * 0.99);
    }
}
