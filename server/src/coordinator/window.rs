//! How many steps are open at once: enough to keep every volunteer busy
//! across the network's round trip, and no more.
//!
//! With steps in flight (a lag D > 0), step `s`'s members are evaluated at
//! the weights of an earlier step while the steps before `s` are still
//! being evaluated, so a volunteer a round trip away is handed work before
//! the step it waits on closes. Each step opened is evaluated at the newest
//! weights every replica holds when it opens (the job names that version),
//! so a step opened `k` steps ahead of the oldest is `k` updates stale.
//! Staleness costs learning per step, idle volunteers cost steps per
//! second: the window opens as many steps as the fleet needs to stay busy.
//!
//! The rule is a feedback loop on what the coordinator sees, not a model
//! of the network: at every step's close, if a volunteer sat with no job
//! at all while every open step was handed out (it waited on the network
//! or on the close), the window grows by one step, up to `lag + 1`; after
//! a run of closes with every volunteer busy it shrinks by one, down to
//! one (the synchronous rule). On one host the window stays near one or
//! two; 50 ms away it grows until the round trip is covered (the step rate
//! times the round trip, plus the jobs queued at the volunteers). With
//! [`Settings::fixed_lag`] it is `lag + 1` always.

use super::types::Settings;

/// Closes in a row with every volunteer busy, per step in the window,
/// before the window shrinks: slow to shrink, quick to grow, so a window
/// that just covers the round trip is not given up for one lucky close.
const CALM_PER_STEP: u32 = 8;

/// The number of steps to keep open, and the evidence for changing it.
#[derive(Clone, Debug)]
pub struct Window {
    /// Steps to keep open: 1 ..= `max`.
    open: usize,
    /// `lag + 1`.
    max: usize,
    fixed: bool,
    /// Closes in a row at which every ready volunteer held a job.
    calm: u32,
}

impl Window {
    /// The starting window for a run with this `lag`: one step (fresh
    /// weights) unless the lag is fixed.
    pub fn new(settings: &Settings, lag: u32) -> Self {
        let max = lag as usize + 1;
        let fixed = settings.fixed_lag;
        Self {
            open: if fixed { max } else { 1 },
            max,
            fixed,
            calm: 0,
        }
    }

    /// How many steps to keep open now.
    pub fn open(&self) -> usize {
        self.open
    }

    /// A step closed; `starved` says whether a ready volunteer held no job
    /// at that moment (the open steps were all handed out).
    pub fn closed(&mut self, starved: bool) {
        if self.fixed {
            return;
        }
        if starved {
            self.calm = 0;
            self.open = (self.open + 1).min(self.max);
        } else {
            self.calm += 1;
            if self.calm >= CALM_PER_STEP * self.open as u32 {
                self.calm = 0;
                self.open = (self.open - 1).max(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(lag: u32) -> Window {
        Window::new(&Settings::default(), lag)
    }

    #[test]
    fn starving_grows_the_window_to_the_lag_and_calm_shrinks_it_to_one() {
        let mut w = auto(3);
        assert_eq!(w.open(), 1, "a run starts synchronous");
        for want in [2, 3, 4, 4] {
            w.closed(true);
            assert_eq!(w.open(), want);
        }
        // Eight calm closes per open step before each shrink.
        for _ in 0..CALM_PER_STEP * 4 - 1 {
            w.closed(false);
        }
        assert_eq!(w.open(), 4, "one close short of shrinking");
        w.closed(false);
        assert_eq!(w.open(), 3);
        // A starved close resets the calm count.
        for _ in 0..CALM_PER_STEP * 3 - 1 {
            w.closed(false);
        }
        w.closed(true);
        assert_eq!(w.open(), 4);
        for _ in 0..1000 {
            w.closed(false);
        }
        assert_eq!(w.open(), 1, "never below one step");
    }

    #[test]
    fn without_a_lag_or_with_a_fixed_one_the_window_never_moves() {
        let mut w = auto(0);
        w.closed(true);
        assert_eq!(w.open(), 1);
        let fixed = Settings {
            fixed_lag: true,
            ..Settings::default()
        };
        let mut w = Window::new(&fixed, 5);
        assert_eq!(w.open(), 6);
        for starved in [true, false, false] {
            w.closed(starved);
        }
        for _ in 0..1000 {
            w.closed(false);
        }
        assert_eq!(w.open(), 6);
    }
}
