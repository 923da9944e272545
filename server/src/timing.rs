//! Where the coordinator thread's time goes, step by step.
//!
//! The coordinator is one thread that every event of the run passes through,
//! so its busy time per step bounds how many volunteers one server can lead.
//! That time splits into work that grows with the model (the replica's
//! update and hash, validation, checkpoints) and work that grows with the
//! number of volunteers (bookkeeping, job assignment, encoding, broadcast).
//! [`StepTiming`] keeps the two apart, so the load test and the coordinator
//! benchmark can report the second alone.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Steps remembered for the quantiles.
const RECENT: usize = 1000;

/// Median and 99th percentile of a per-step duration over recent steps, in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// The most recent step's, so a poller can collect every step's value.
    pub last: f64,
    /// Steps the figures cover.
    pub steps: usize,
}

impl Quantiles {
    /// Nearest-rank quantiles of `samples`, oldest first.
    pub fn of(samples: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = samples.into_iter().collect();
        let Some(&last) = v.last() else {
            return Self::default();
        };
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            p50: rank(0.5),
            p99: rank(0.99),
            last,
            steps: v.len(),
        }
    }
}

/// Busy time of the coordinator thread per step, split into overhead and
/// replica work. Idle time (waiting for events) counts as neither.
#[derive(Debug, Default)]
pub struct StepTiming {
    /// When the event being handled now started.
    entered: Option<Instant>,
    /// Time spent on the current step's events before `entered`.
    busy: Duration,
    /// Overhead of recent steps, ms.
    overhead: VecDeque<f64>,
    /// Update and hash time of recent steps, ms.
    update: VecDeque<f64>,
}

impl StepTiming {
    /// An event starts being handled.
    pub fn enter(&mut self, now: Instant) {
        self.entered = Some(now);
    }

    /// The event is handled.
    pub fn leave(&mut self) {
        if let Some(t) = self.entered.take() {
            self.busy += t.elapsed();
        }
    }

    /// A step closed: its busy time so far, minus `update` (the replica's
    /// update and hash) and `excluded` (validation, checkpoint), is its
    /// overhead. What the current event does next counts for the next step.
    pub fn step_closed(&mut self, update: Duration, excluded: Duration) {
        let now = Instant::now();
        let busy = self.busy
            + self
                .entered
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let overhead = busy.saturating_sub(update + excluded);
        for (q, d) in [(&mut self.overhead, overhead), (&mut self.update, update)] {
            q.push_back(d.as_secs_f64() * 1e3);
            if q.len() > RECENT {
                q.pop_front();
            }
        }
        self.busy = Duration::ZERO;
        if self.entered.is_some() {
            self.entered = Some(now);
        }
    }

    /// Quantiles of the coordinator's overhead per step.
    pub fn overhead(&self) -> Quantiles {
        Quantiles::of(self.overhead.iter().copied())
    }

    /// Quantiles of the replica's update and hash time per step.
    pub fn update(&self) -> Quantiles {
        Quantiles::of(self.update.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let q = Quantiles::of((1..=100).map(f64::from));
        assert_eq!((q.p50, q.p99, q.steps), (50.0, 99.0, 100));
        let q = Quantiles::of([3.0, 1.0, 2.0]);
        assert_eq!((q.p50, q.p99, q.last), (2.0, 3.0, 2.0));
        assert_eq!(Quantiles::of([]), Quantiles::default());
    }

    #[test]
    fn update_time_is_not_overhead() {
        let mut t = StepTiming::default();
        t.enter(Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        t.step_closed(Duration::from_millis(20), Duration::from_millis(5));
        t.leave();
        let (o, u) = (t.overhead(), t.update());
        assert_eq!(u.p50, 20.0);
        assert!(o.p50 >= 5.0 && o.p50 < 30.0, "overhead {o:?}");
    }
}
