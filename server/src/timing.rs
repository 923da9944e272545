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

/// CPU time the calling thread has used so far.
///
/// The coordinator's busy time is counted on this clock as well as on the
/// wall clock: when the coordinator shares its cores with other work (the
/// connection tasks, or in a benchmark the simulated volunteers themselves),
/// wall time includes the time it sat preempted, and only the CPU clock says
/// what the coordinator itself costs. Where the platform has no per-thread
/// clock this falls back to the wall clock.
pub fn thread_time() -> Duration {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the whole call.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
    }
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// A point on both clocks.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    wall: Instant,
    cpu: Duration,
}

impl Mark {
    /// Now, on both clocks (the CPU clock of the calling thread).
    pub fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: thread_time(),
        }
    }

    /// Time since this mark: (wall, CPU).
    pub fn elapsed(&self) -> Span {
        Span {
            wall: self.wall.elapsed(),
            cpu: thread_time().saturating_sub(self.cpu),
        }
    }
}

/// A duration on both clocks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Span {
    /// Wall-clock time.
    pub wall: Duration,
    /// CPU time of the thread that measured it.
    pub cpu: Duration,
}

impl std::ops::Add for Span {
    type Output = Span;
    fn add(self, o: Span) -> Span {
        Span {
            wall: self.wall + o.wall,
            cpu: self.cpu + o.cpu,
        }
    }
}

impl Span {
    fn saturating_sub(self, o: Span) -> Span {
        Span {
            wall: self.wall.saturating_sub(o.wall),
            cpu: self.cpu.saturating_sub(o.cpu),
        }
    }
}

/// Busy time of the coordinator thread per step, split into overhead and
/// replica work. Idle time (waiting for events) counts as neither.
///
/// The wall clock is read around every event (a cheap vDSO call). The CPU
/// clock is read only when a step closes: a thread blocked waiting for an
/// event uses no CPU, so the thread's CPU time between two closes is its
/// busy time, and reading the thread clock (a system call) twice per event
/// would cost more than some events do.
#[derive(Debug, Default)]
pub struct StepTiming {
    /// When the event being handled now started (wall clock).
    entered: Option<Instant>,
    /// Wall time spent on the current step's events before `entered`.
    busy: Duration,
    /// The thread's CPU clock when the current step began.
    cpu_start: Option<Duration>,
    /// Overhead of recent steps on the coordinator thread's CPU clock, ms.
    overhead: VecDeque<f64>,
    /// The same on the wall clock, ms.
    overhead_wall: VecDeque<f64>,
    /// Update and hash wall time of recent steps, ms.
    update: VecDeque<f64>,
    /// CPU time the delivery courier spent per recent step, ms.
    delivery: VecDeque<f64>,
    /// The courier's CPU counter when the current step began.
    delivery_start: Option<Duration>,
}

impl StepTiming {
    /// An event starts being handled.
    pub fn enter(&mut self) {
        self.entered = Some(Instant::now());
        if self.cpu_start.is_none() {
            self.cpu_start = Some(thread_time());
        }
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
    /// `delivered` is the courier's CPU counter ([`crate::delivery`]): its
    /// growth since the last close is the step's delivery time, work done
    /// off this thread but for it.
    pub fn step_closed(&mut self, update: Span, excluded: Span, delivered: Duration) {
        let cpu = thread_time();
        let busy = Span {
            wall: self.busy + self.entered.map_or(Duration::ZERO, |t| t.elapsed()),
            cpu: cpu.saturating_sub(self.cpu_start.unwrap_or(cpu)),
        };
        let overhead = busy.saturating_sub(update + excluded);
        let delivery = delivered.saturating_sub(self.delivery_start.unwrap_or(delivered));
        self.delivery_start = Some(delivered);
        for (q, d) in [
            (&mut self.overhead, overhead.cpu),
            (&mut self.overhead_wall, overhead.wall),
            (&mut self.update, update.wall),
            (&mut self.delivery, delivery),
        ] {
            q.push_back(d.as_secs_f64() * 1e3);
            if q.len() > RECENT {
                q.pop_front();
            }
        }
        self.busy = Duration::ZERO;
        self.cpu_start = Some(cpu);
        if self.entered.is_some() {
            self.entered = Some(Instant::now());
        }
    }

    /// Quantiles of the coordinator's overhead per step (its CPU time).
    pub fn overhead(&self) -> Quantiles {
        Quantiles::of(self.overhead.iter().copied())
    }

    /// Quantiles of the coordinator's overhead per step on the wall clock,
    /// preemption included.
    pub fn overhead_wall(&self) -> Quantiles {
        Quantiles::of(self.overhead_wall.iter().copied())
    }

    /// Quantiles of the replica's update and hash time per step.
    pub fn update(&self) -> Quantiles {
        Quantiles::of(self.update.iter().copied())
    }

    /// Quantiles of the delivery courier's CPU time per step.
    pub fn delivery(&self) -> Quantiles {
        Quantiles::of(self.delivery.iter().copied())
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
        t.enter();
        std::thread::sleep(Duration::from_millis(30));
        let ms = |ms| Span {
            wall: Duration::from_millis(ms),
            cpu: Duration::ZERO,
        };
        t.step_closed(ms(20), ms(5), Duration::ZERO);
        t.leave();
        let (o, w, u) = (t.overhead(), t.overhead_wall(), t.update());
        assert_eq!(u.p50, 20.0);
        assert!(w.p50 >= 5.0 && w.p50 < 30.0, "overhead {w:?}");
        // Sleeping is not busy on the CPU clock.
        assert!(o.p50 < 5.0, "CPU overhead {o:?}");
    }

    #[test]
    fn delivery_is_the_couriers_growth_per_step() {
        let mut t = StepTiming::default();
        for ms in [3, 7, 8] {
            t.step_closed(Span::default(), Span::default(), Duration::from_millis(ms));
        }
        // The first close only sets the courier's baseline.
        let d = t.delivery();
        assert_eq!((d.steps, d.last, d.p99), (3, 1.0, 4.0));
    }

    #[test]
    fn the_cpu_clock_counts_work_not_sleep() {
        let m = Mark::now();
        std::thread::sleep(Duration::from_millis(20));
        let slept = m.elapsed();
        // Spin until the CPU clock says 20 ms of work, however long other
        // load on the machine makes that take on the wall clock.
        let m = Mark::now();
        let mut x = 0u64;
        while m.elapsed().cpu < Duration::from_millis(20) {
            assert!(
                m.elapsed().wall < Duration::from_secs(20),
                "the CPU clock does not advance with work"
            );
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let spun = m.elapsed();
        assert!(slept.wall >= Duration::from_millis(20));
        assert!(slept.cpu < Duration::from_millis(10), "{slept:?}");
        assert!(spun.wall >= spun.cpu, "{spun:?}");
    }
}
