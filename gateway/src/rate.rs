//! Token buckets for client frame rates (SPEC §4: N frames/s, bursts of 2N).

use std::time::Instant;

/// A token bucket refilled continuously at `rate` tokens per second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket of `2 * rate` tokens refilled at `rate` per second.
    pub fn per_second(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        TokenBucket {
            rate,
            burst: rate * 2.0,
            tokens: rate * 2.0,
            updated: Instant::now(),
        }
    }

    /// Takes one token: `Ok` if there was one, else `Err(ms until one is available)`.
    pub fn take(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_s = (1.0 - self.tokens) / self.rate;
            Err((wait_s * 1000.0).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_a_burst_of_twice_the_rate_then_refills() {
        let start = Instant::now();
        let mut bucket = TokenBucket::per_second(20);
        for _ in 0..40 {
            assert!(bucket.take(start).is_ok());
        }
        let wait = bucket.take(start).err();
        assert_eq!(wait, Some(50));
        assert!(bucket.take(start + Duration::from_millis(50)).is_ok());
    }
}
