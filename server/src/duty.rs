//! A volunteer's CPU share: `seedling worker --cpu-percent P`.
//!
//! Volunteers expect to say how much of their machine they give, as BOINC's
//! do. Below 100 % the worker runs a duty cycle: each evaluating thread
//! computes, then rests long enough that over time it is busy P % of the
//! wall clock, and it runs at the lowest OS priority (nice 19), so the
//! owner's own programs always come first even within the share. The
//! updates the session applies are charged to the first thread's share
//! ([`Throttle::charge`]): they are CPU the volunteer gives too.
//!
//! [`DutyCycle`] is the arithmetic, with the clock passed in so it can be
//! tested without sleeping. It is a token bucket, the form of a sliding
//! window bound that needs constant state: credit accrues at P % of the wall
//! clock up to P % of [`WINDOW`], busy time spends it, and a thread in debt
//! rests until the debt is repaid. So a thread that computes without pause
//! is busy exactly P % of the time (busy / (busy + rest) = P / 100), one
//! that waited on the network may spend what it saved meanwhile (at most a
//! window's share at once), and over any stretch of wall time L a thread is
//! busy at most P / 100 * (L + [`WINDOW`]). A 100 ms window is the period of
//! Linux's CFS bandwidth control, so a worker at P % behaves like one in a
//! cgroup with `cpu.max` of P ms per 100 ms.
//!
//! Busy time is the thread's CPU time ([`crate::timing::thread_time`]), not
//! its wall time: on a machine whose other programs preempt the worker, the
//! time it sat preempted is not charged to its share.
//!
//! [`CPU_SHARE`] is the process's setting. The share and the OS priority are
//! properties of the volunteer's process, not of one connection, so they
//! live here rather than in the session: they survive reconnections, and the
//! evaluation ([`crate::worker::evaluate_parallel`]) consults them per chunk
//! without the session loop carrying any state for them.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::timing::thread_time;

/// The sliding window of the share: a thread that was idle may compute for
/// P % of this without resting.
pub const WINDOW: Duration = Duration::from_millis(100);

/// Rests shorter than this are carried as debt into the next chunk instead:
/// a sleep costs tens of microseconds and may overshoot by as much, so
/// sleeping after every small chunk would waste the share on the scheduler.
pub const MIN_REST: Duration = Duration::from_millis(1);

/// The nice value of an evaluating thread below 100 %: the lowest priority,
/// as BOINC runs its tasks, so the owner's programs win every contest for a
/// core.
pub const NICE: i32 = 19;

/// One thread's duty cycle: given how long the thread just computed, how
/// long it must rest so that it stays within its share (see the module doc).
#[derive(Clone, Debug)]
pub struct DutyCycle {
    /// The share, in (0, 1].
    share: f64,
    /// Most credit a thread may save, in seconds: `share * WINDOW`.
    cap: f64,
    /// Seconds of computing the thread may still do without resting;
    /// negative while it owes rest shorter than [`MIN_REST`].
    credit: f64,
    /// When the credit was last brought up to date (the end of the last
    /// rest, which the caller is trusted to take).
    last: Option<Instant>,
}

impl DutyCycle {
    /// A duty cycle of `percent` % (clamped to 1-100) over `window`, with a
    /// full window's credit: a thread that has not run yet was idle.
    pub fn new(percent: u8, window: Duration) -> Self {
        let share = f64::from(percent.clamp(1, 100)) / 100.0;
        let cap = share * window.as_secs_f64();
        Self {
            share,
            cap,
            credit: cap,
            last: None,
        }
    }

    /// The thread computed for `busy` (CPU time), ending at `now`: how long
    /// it must rest before computing again. The rest starts at `now`; time
    /// past its end (waiting for work, or a sleep that overshot) earns
    /// credit again.
    pub fn rest(&mut self, now: Instant, busy: Duration) -> Duration {
        // The wall time since the last update that was not this chunk's
        // computing (waiting, or preempted) earns credit up to the cap;
        // while computing the thread earns `share` and spends 1 per second.
        let idle = match self.last {
            Some(last) => now.saturating_duration_since(last).saturating_sub(busy),
            None => Duration::ZERO,
        };
        let saved = (self.credit + self.share * idle.as_secs_f64()).min(self.cap);
        self.credit = saved - (1.0 - self.share) * busy.as_secs_f64();
        self.last = Some(now);
        if self.credit >= 0.0 {
            return Duration::ZERO;
        }
        // Resting r earns share * r: rest until the debt is repaid.
        let rest = Duration::from_secs_f64(-self.credit / self.share);
        if rest < MIN_REST {
            return Duration::ZERO;
        }
        self.credit = 0.0;
        self.last = Some(now + rest);
        rest
    }

    /// The thread spent `busy` of CPU on work outside its chunks (applying
    /// an update) by `now`: [`DutyCycle::rest`] for it, except that time
    /// spent during a rest does not count as rest, so a rest still ahead
    /// grows by the rest `busy` calls for instead of starting afresh.
    pub fn charge(&mut self, now: Instant, busy: Duration) -> Duration {
        match self.last {
            Some(end) if end > now => {
                // Resting r earns share * r, so a debt of `busy` (the rest
                // already pays for its own wall time) takes busy / share.
                let extra = Duration::from_secs_f64(busy.as_secs_f64() / self.share);
                self.last = Some(end + extra);
                end + extra - now
            }
            _ => self.rest(now, busy),
        }
    }

    /// How much of the last rest is still ahead at `now`: the wait before
    /// the thread may compute again.
    pub fn owed(&self, now: Instant) -> Duration {
        self.last
            .map_or(Duration::ZERO, |end| end.saturating_duration_since(now))
    }
}

/// A process's CPU share: the percentage and one [`DutyCycle`] per
/// evaluating thread slot.
#[derive(Debug)]
pub struct Throttle {
    percent: AtomicU8,
    slots: Mutex<Vec<DutyCycle>>,
}

/// The worker process's share, set once from `seedling worker
/// --cpu-percent`; 100 % (no duty cycle, normal priority) until then.
pub static CPU_SHARE: Throttle = Throttle::new();

impl Throttle {
    /// A throttle at 100 %.
    pub const fn new() -> Self {
        Self {
            percent: AtomicU8::new(100),
            slots: Mutex::new(Vec::new()),
        }
    }

    /// Sets the share to `percent` % (clamped to 1-100), starting every
    /// thread's duty cycle afresh.
    pub fn set_percent(&self, percent: u8) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.clear();
        self.percent.store(percent.clamp(1, 100), Ordering::Relaxed);
    }

    /// The share in percent.
    pub fn percent(&self) -> u8 {
        self.percent.load(Ordering::Relaxed)
    }

    /// Runs `work` on the calling thread as evaluating thread `slot`, after
    /// the rest that slot still owes from its last chunk. At 100 % this is
    /// just `work()`.
    ///
    /// The rest comes before a chunk, not after it: the result of a job
    /// goes to the server the moment it is computed, and the rest overlaps
    /// with its trip and with the next job's arrival, instead of holding
    /// every result back by three times its compute at 25 %. The share is
    /// the same, since the same rests separate the same chunks.
    ///
    /// Slots, not OS threads, carry the duty cycle: the worker starts fresh
    /// threads for each job, and thread `slot` of the next job continues
    /// where the same slot of this one stopped (its debt and its savings).
    pub fn paced<T>(&self, slot: usize, work: impl FnOnce() -> T) -> T {
        let percent = self.percent();
        if percent >= 100 {
            return work();
        }
        lower_priority();
        let owed = self.owed(slot);
        if !owed.is_zero() {
            std::thread::sleep(owed);
        }
        let start = thread_time();
        let out = work();
        let busy = thread_time().saturating_sub(start);
        self.with_slot(slot, percent, |cycle| cycle.rest(Instant::now(), busy));
        out
    }

    /// Runs `f` on `slot`'s duty cycle, starting one at `percent` if the
    /// slot has none yet.
    fn with_slot(&self, slot: usize, percent: u8, f: impl FnOnce(&mut DutyCycle) -> Duration) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.len() <= slot {
            slots.resize(slot + 1, DutyCycle::new(percent, WINDOW));
        }
        f(&mut slots[slot]);
    }

    /// Charges `busy` of CPU time spent outside a chunk (applying an
    /// update, on the session's thread) to `slot`'s share, which then rests
    /// longer before its next chunk.
    ///
    /// Every replica applies every update whatever share of the members it
    /// evaluates, so at a fleet's step rate the updates alone can cost a
    /// volunteer a fifth of a 25 % share (docs/LEARNING.md, "Where the
    /// fleet's CPU goes, and three ways to the window that did not pay").
    /// Uncharged, a worker at `--cpu-percent 25` used 31 % of a core; the
    /// page's duty cycle has always counted them.
    pub fn charge(&self, slot: usize, busy: Duration) {
        let percent = self.percent();
        if percent >= 100 || busy.is_zero() {
            return;
        }
        self.with_slot(slot, percent, |cycle| cycle.charge(Instant::now(), busy));
    }

    /// The rest `slot` still owes before it may compute again: the worker
    /// waits it out before starting a job, reading the updates that arrive
    /// meanwhile, so a floating job starts at the newest weights.
    pub fn owed(&self, slot: usize) -> Duration {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(slot).map_or(Duration::ZERO, |d| d.owed(Instant::now()))
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

/// Lowers the calling thread to [`NICE`], once per thread.
///
/// On Linux the nice value belongs to each thread (`setpriority` with
/// `PRIO_PROCESS` and id 0 changes the caller only), and the worker's
/// evaluating threads are created per job, so each lowers itself; the
/// network threads keep their priority and answer the server promptly.
/// Through libc, already a dependency for the thread clock: one call needs
/// no crate. Raising a nice value needs no privilege; failure (a sandbox
/// that forbids it) leaves the priority as it was, and the duty cycle
/// still holds the share.
fn lower_priority() {
    thread_local! {
        static LOWERED: Cell<bool> = const { Cell::new(false) };
    }
    if LOWERED.replace(true) {
        return;
    }
    #[cfg(unix)]
    // SAFETY: setpriority only reads its integer arguments.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, NICE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs chunks of `chunk` back to back, resting as told, until `total`
    /// of wall time has passed; returns busy / wall.
    fn busy_fraction(percent: u8, chunk: Duration, total: Duration) -> f64 {
        let t0 = Instant::now();
        let mut duty = DutyCycle::new(percent, WINDOW);
        let (mut now, mut busy) = (t0, Duration::ZERO);
        while now - t0 < total {
            now += chunk;
            busy += chunk;
            now += duty.rest(now, chunk);
        }
        busy.as_secs_f64() / (now - t0).as_secs_f64()
    }

    #[test]
    fn a_busy_thread_keeps_its_share() {
        for percent in [1, 10, 25, 50, 90] {
            for chunk_us in [200, 3_000, 40_000, 250_000] {
                let got = busy_fraction(percent, Duration::from_micros(chunk_us), Duration::from_secs(60));
                let want = f64::from(percent) / 100.0;
                // The only excess is the first window's credit, spread over
                // the minute.
                assert!(
                    got >= want * 0.999 && got <= want * 1.01,
                    "{percent}% with {chunk_us} us chunks: {got}"
                );
            }
        }
    }

    #[test]
    fn a_chunk_rests_its_complement() {
        let t0 = Instant::now();
        let mut duty = DutyCycle::new(25, WINDOW);
        // The first 25 ms is the saved window; past it, each ms of work
        // costs 3 ms of rest.
        let first = duty.rest(t0 + Duration::from_millis(45), Duration::from_millis(45));
        let want = (45.0 - 25.0 - 0.25 * 45.0) / 0.25;
        assert!((first.as_secs_f64() * 1e3 - want).abs() < 1e-6, "{first:?}");
        let now = t0 + Duration::from_millis(45) + first + Duration::from_millis(10);
        assert_eq!(
            duty.rest(now, Duration::from_millis(10)),
            Duration::from_millis(30)
        );
    }

    #[test]
    fn waiting_earns_at_most_one_window() {
        let t0 = Instant::now();
        let mut duty = DutyCycle::new(25, WINDOW);
        assert_eq!(
            duty.rest(t0, Duration::from_millis(100)),
            Duration::from_millis(200)
        );
        // A minute of waiting on the network saves 25 ms, not 15 s: 20 ms
        // of work at 25 % costs 15 ms of it, the next 20 ms leave a debt of
        // 5 ms, which 20 ms of rest repay.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(duty.rest(later, Duration::from_millis(20)), Duration::ZERO);
        let rest = duty.rest(later + Duration::from_millis(20), Duration::from_millis(20));
        assert!((rest.as_secs_f64() - 0.020).abs() < 1e-9, "{rest:?}");
    }

    #[test]
    fn short_debts_are_carried_not_slept() {
        let t0 = Instant::now();
        let mut duty = DutyCycle::new(50, WINDOW);
        let mut now = t0;
        let mut rests = Vec::new();
        for _ in 0..2000 {
            now += Duration::from_micros(200);
            let rest = duty.rest(now, Duration::from_micros(200));
            now += rest;
            rests.push(rest);
        }
        // 50 ms of savings first (500 chunks), then a 1 ms rest after
        // every fifth chunk, not a 0.2 ms rest after each.
        assert!(rests[..500].iter().all(|r| r.is_zero()));
        assert!(rests.iter().all(|r| r.is_zero() || *r >= MIN_REST));
        let slept = rests.iter().filter(|r| !r.is_zero()).count();
        assert!((240..=300).contains(&slept), "{slept} rests");
    }

    /// A chunk's rest is owed after it returns, and taken before the next
    /// chunk: the result leaves the moment it is computed.
    #[test]
    fn a_chunk_returns_at_once_and_its_rest_comes_before_the_next() {
        let throttle = Throttle::new();
        throttle.set_percent(25);
        let burn = |d: Duration| {
            let start = thread_time();
            while thread_time().saturating_sub(start) < d {
                std::hint::black_box(0u64);
            }
        };
        // 150 ms of work at 25 %, with a window's 25 ms saved: a debt of
        // 87.5 ms, repaid by 350 ms of rest.
        throttle.paced(0, || burn(Duration::from_millis(150)));
        let owed = throttle.owed(0);
        assert!(
            owed > Duration::from_millis(200),
            "the rest is still ahead: {owed:?}"
        );
        let before = Instant::now();
        throttle.paced(0, || {});
        assert!(
            before.elapsed() >= owed - Duration::from_millis(1),
            "rested first"
        );
        assert!(throttle.owed(0).is_zero(), "an empty chunk leaves no debt");
    }

    /// Updates applied between chunks, some during a rest and some while
    /// idle, count against the share: chunks and updates together stay
    /// within it, as the page's duty cycle keeps them.
    #[test]
    fn charged_updates_count_against_the_share() {
        for percent in [10u8, 25, 50] {
            let t0 = Instant::now();
            let mut duty = DutyCycle::new(percent, WINDOW);
            let (chunk, update) = (Duration::from_millis(4), Duration::from_micros(350));
            let (mut now, mut busy) = (t0, Duration::ZERO);
            while now - t0 < Duration::from_secs(60) {
                // A chunk, then two updates: the first lands during the
                // rest the chunk left, the second after it.
                now += duty.owed(now);
                now += chunk;
                busy += chunk;
                duty.rest(now, chunk);
                now += update;
                busy += update;
                duty.charge(now, update);
                now += duty.owed(now) + update;
                busy += update;
                duty.charge(now, update);
            }
            let got = busy.as_secs_f64() / (now - t0).as_secs_f64();
            let want = f64::from(percent) / 100.0;
            assert!(got >= want * 0.99 && got <= want * 1.01, "{percent}%: {got}");
        }
    }

    #[test]
    fn a_charge_during_a_rest_lengthens_it() {
        let t0 = Instant::now();
        let mut duty = DutyCycle::new(25, WINDOW);
        // 45 ms of work: 25 ms saved, 20 ms of debt less 11.25 ms earned.
        let rest = duty.rest(t0, Duration::from_millis(45));
        assert!((rest.as_secs_f64() - 0.035).abs() < 1e-9, "{rest:?}");
        // 1 ms of update 10 ms into the rest adds 4 ms to it.
        let now = t0 + Duration::from_millis(10);
        let left = duty.charge(now, Duration::from_millis(1));
        assert!((left.as_secs_f64() - 0.029).abs() < 1e-9, "{left:?}");
        assert_eq!(duty.owed(now), left);
        // Past the rest a charge is an ordinary chunk: within the credit
        // saved since, no rest.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(duty.charge(later, Duration::from_millis(1)), Duration::ZERO);
    }

    #[test]
    fn a_full_share_never_rests() {
        let t0 = Instant::now();
        let mut duty = DutyCycle::new(100, WINDOW);
        let mut now = t0;
        for ms in [1, 50, 500, 5_000] {
            now += Duration::from_millis(ms);
            assert_eq!(duty.rest(now, Duration::from_millis(ms)), Duration::ZERO);
        }
    }

    #[test]
    fn the_throttle_runs_the_work_and_keeps_a_cycle_per_slot() {
        let throttle = Throttle::new();
        assert_eq!(throttle.paced(3, || 7), 7);
        assert!(throttle.slots.lock().unwrap().is_empty(), "100 % keeps no books");
        throttle.set_percent(0);
        assert_eq!(throttle.percent(), 1);
        throttle.set_percent(90);
        assert_eq!(throttle.paced(2, || "done"), "done");
        assert_eq!(throttle.slots.lock().unwrap().len(), 3);
        throttle.set_percent(100);
        assert!(throttle.slots.lock().unwrap().is_empty());
    }
}
