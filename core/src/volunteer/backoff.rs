//! When to reconnect after a connection ends.

/// Exponential backoff with jitter: the pause before a reconnection starts
/// at [`Backoff::MIN_MS`] and doubles after each failed attempt up to a
/// ceiling; a connection that stayed open longer than
/// [`Backoff::HEALTHY_MS`] was healthy, and the next pause starts from the
/// bottom again.
///
/// Each pause is drawn between half and all of the current step, from a
/// random fraction the caller passes in (the core has no random
/// generator): after a server restart, many volunteers then spread their
/// reconnections instead of arriving together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The longest step.
    max_ms: u64,
    /// The step of the next pause.
    next_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_MS)
    }
}

impl Backoff {
    /// The first step.
    pub const MIN_MS: u64 = 100;
    /// The default ceiling, ten seconds: a restarted server is found again
    /// quickly, and a server that is down for long gets a request every few
    /// seconds per volunteer at most.
    pub const DEFAULT_MAX_MS: u64 = 10_000;
    /// A connection open longer than this was healthy.
    pub const HEALTHY_MS: u64 = 5_000;

    /// A backoff whose steps stop growing at `max_ms` (at least
    /// [`Backoff::MIN_MS`]).
    pub fn new(max_ms: u64) -> Self {
        Self {
            max_ms: max_ms.max(Self::MIN_MS),
            next_ms: Self::MIN_MS,
        }
    }

    /// The pause before the next attempt, in milliseconds, after a
    /// connection that stayed open `open_ms` (`None`: it never opened).
    /// `jitter` is a random fraction in `[0, 1]` (out of range is clamped,
    /// NaN counts as 1); the pause is `step * (1 + jitter) / 2`.
    pub fn pause(&mut self, open_ms: Option<u64>, jitter: f64) -> u64 {
        if open_ms.is_some_and(|ms| ms > Self::HEALTHY_MS) {
            self.next_ms = Self::MIN_MS;
        }
        let jitter = if jitter.is_nan() {
            1.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let pause = (self.next_ms as f64 * (0.5 + 0.5 * jitter)) as u64;
        self.next_ms = self.next_ms.saturating_mul(2).min(self.max_ms);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_within_the_jitter_bounds() {
        let mut b = Backoff::new(1_000);
        let mut steps = alloc::vec::Vec::new();
        for i in 0..8 {
            // Alternate the extremes and a middle draw.
            let jitter = [0.0, 1.0, 0.5][i % 3];
            let step = b.next_ms;
            let pause = b.pause(None, jitter);
            assert!(
                step / 2 <= pause && pause <= step,
                "pause {pause} for step {step}"
            );
            assert_eq!(pause, (step as f64 * (0.5 + 0.5 * jitter)) as u64);
            steps.push(step);
        }
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
    }

    #[test]
    fn every_draw_stays_within_half_and_all_of_the_step() {
        for k in 0..=100 {
            let jitter = k as f64 / 100.0;
            let mut b = Backoff::new(10_000);
            for _ in 0..10 {
                let step = b.next_ms;
                let pause = b.pause(Some(10), jitter);
                assert!(
                    (step / 2..=step).contains(&pause),
                    "{pause} for {step} at {jitter}"
                );
            }
        }
        // Out-of-range and NaN draws cannot leave the bounds either.
        for (jitter, want) in [(-3.0, 50), (7.0, 100), (f64::NAN, 100), (f64::INFINITY, 100)] {
            assert_eq!(Backoff::default().pause(None, jitter), want, "jitter {jitter}");
        }
    }

    #[test]
    fn a_healthy_connection_starts_over() {
        let mut b = Backoff::new(10_000);
        for _ in 0..5 {
            b.pause(None, 1.0);
        }
        // A short-lived connection keeps climbing, a healthy one starts over.
        assert_eq!(b.pause(Some(Backoff::HEALTHY_MS), 1.0), 3_200);
        assert_eq!(b.pause(Some(Backoff::HEALTHY_MS + 1), 1.0), 100);
        assert_eq!(b.pause(None, 1.0), 200);
        // A ceiling below the first step is raised to it.
        assert_eq!(Backoff::new(0).pause(None, 1.0), Backoff::MIN_MS);
    }
}
