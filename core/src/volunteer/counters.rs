//! What a volunteer has done, for its display.

use alloc::collections::VecDeque;

/// Counters a client shows, kept across reconnections. Times are
/// milliseconds on the caller's clock (the core has none); it only needs
/// to be monotonic enough for a rate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Members evaluated and reported.
    pub members: u64,
    /// Jobs answered.
    pub jobs: u64,
    /// Updates applied: steps this replica followed.
    pub steps: u64,
    /// Snapshots loaded (one per connection, plus one per divergence).
    pub snapshots: u64,
    /// Connections opened after the first.
    pub reconnects: u64,
    /// Times the server refused or dropped this volunteer.
    pub rejections: u64,
    /// When the first job was answered, for the rate's denominator.
    started_ms: Option<u64>,
    /// (answer time, members) of recent jobs, within [`Counters::RATE_WINDOW_MS`].
    recent: VecDeque<(u64, u64)>,
}

impl Counters {
    /// Members per second are measured over this trailing window, so the
    /// figure follows the volunteer's real contribution (idle time while
    /// other volunteers finish a step included) rather than the speed of
    /// one job.
    pub const RATE_WINDOW_MS: u64 = 10_000;

    /// Counts a job of `members` answered at `now_ms`.
    pub fn answered(&mut self, members: usize, now_ms: u64) {
        self.members += members as u64;
        self.jobs += 1;
        self.started_ms.get_or_insert(now_ms);
        self.recent.push_back((now_ms, members as u64));
        while self
            .recent
            .front()
            .is_some_and(|&(t, _)| t.saturating_add(Self::RATE_WINDOW_MS) < now_ms)
        {
            self.recent.pop_front();
        }
    }

    /// Members per second at `now_ms` over the trailing window (or since
    /// the first job, if that is shorter, but at least a second).
    pub fn rate(&self, now_ms: u64) -> f64 {
        let Some(start) = self.started_ms else { return 0.0 };
        let span = now_ms.saturating_sub(start).clamp(1_000, Self::RATE_WINDOW_MS);
        let members: u64 = self
            .recent
            .iter()
            .filter(|&&(t, _)| t.saturating_add(Self::RATE_WINDOW_MS) >= now_ms)
            .map(|&(_, n)| n)
            .sum();
        members as f64 * 1_000.0 / span as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_only_the_trailing_window() {
        let mut c = Counters::default();
        assert_eq!(c.rate(0), 0.0);
        c.answered(10, 0);
        // Within the first second the denominator is one second.
        assert_eq!(c.rate(500), 10.0);
        c.answered(10, 4_000);
        assert_eq!(c.rate(4_000), 5.0);
        // The first job leaves the window after ten seconds.
        assert_eq!(c.rate(12_000), 1.0);
        assert_eq!((c.members, c.jobs), (20, 2));
        // A later job drops it for good.
        c.answered(5, 30_000);
        assert_eq!(c.recent.len(), 1);
        assert_eq!(c.rate(30_000), 0.5);
    }
}
