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
//! The rule is Little's law on what the coordinator measures. Every
//! volunteer should hold the work it evaluates while a result travels to
//! the coordinator and its next job travels back: its speed times its round
//! trip, plus the job in hand (see [`super::scheduler`]). The window opens
//! enough steps to hold all of that, plus the step being finished:
//! `ceil(sum of wanted members / population) + 1`. On one host that is
//! one or two steps; 50 ms away about the step rate times the round trip.
//! Speeds and round trips are estimates, so a feedback term corrects them:
//! a close that finds a ready volunteer holding no job at all (it idled on
//! the network) adds a step of slack, and a run of closes with every
//! volunteer busy takes one away. With [`Settings::fixed_lag`] the window
//! is `lag + 1` always.
//!
//! The cap on staleness follows the lr schedule. Early in a run a step
//! evaluated 16 updates behind costs little and the rate it buys is what
//! reaches a loss soonest; late, as the lr decays and the loss nears its
//! floor, the same staleness costs more than the rate buys (8 volunteers
//! at RTT 50 ms for 10 minutes ended at 2.001 with at most 8 steps behind
//! and 2.035 with 16; docs/LEARNING.md, "Steps in flight that follow the
//! lr"). So at most `ceil(lag * decay)` steps are behind, where `decay` is
//! the lr over its peak, and never fewer than half the lag: from `lag`
//! at the peak down to `lag / 2` once the lr has halved.

use super::types::Settings;

/// Closes in a row with every volunteer busy, per step in the window,
/// before the window shrinks: slow to shrink, quick to grow, so a window
/// that just covers the round trip is not given up for one lucky close.
const CALM_PER_STEP: u32 = 8;

/// The number of steps to keep open, and the evidence for changing it.
#[derive(Clone, Debug)]
pub struct Window {
    /// Steps that hold the work the volunteers want, plus one.
    needed: usize,
    /// Steps of slack on top, from the feedback.
    slack: usize,
    /// `lag + 1`.
    max: usize,
    /// The lr over its peak, in `[0, 1]`: scales the cap (module docs).
    decay: f64,
    fixed: bool,
    /// Closes in a row at which every ready volunteer held a job.
    calm: u32,
}

impl Window {
    /// The starting window for a run with this `lag`: at its cap, all
    /// `lag + 1` steps (evaluated at the weights of when they open).
    ///
    /// Why not one step until the first close: before any result the
    /// coordinator knows nothing of the fleet, and a window of one step
    /// costs a round trip per step until measurements come in. 8
    /// volunteers at 150 ms closed their 25th step 0.89 s into the run
    /// starting at one step and 0.69 s starting at the cap. The price is
    /// staleness at the very start (the first steps are evaluated at the
    /// initial weights, up to the lag behind), which fixed-lag runs show is
    /// small: `train --fixed-lag --lag 16` reached validation 2.40 within
    /// 25-50 steps of `--lag 0` on three seeds (docs/LEARNING.md, "The
    /// start of a run at 150 ms"). The first close sets the window from
    /// what was measured.
    pub fn new(settings: &Settings, lag: u32) -> Self {
        Self {
            needed: lag as usize + 1,
            slack: 0,
            max: lag as usize + 1,
            decay: 1.0,
            fixed: settings.fixed_lag,
            calm: 0,
        }
    }

    /// Slack tops the estimate up by at most a quarter (at least two
    /// steps): enough to cover a burst of slow results, not so much that a
    /// run of bursts leaves the window at its cap (each step of slack is a
    /// step of staleness for every step evaluated).
    fn most_slack(&self) -> usize {
        (self.needed / 4).max(2)
    }

    /// How many steps to keep open now: 1 ..= `lag + 1`.
    pub fn open(&self) -> usize {
        if self.fixed {
            return self.max;
        }
        (self.needed + self.slack).clamp(1, self.cap())
    }

    /// The most steps open at the lr's current decay: the steps behind the
    /// oldest (`max - 1`, the lag) scaled by the decay, but at least half
    /// of them.
    fn cap(&self) -> usize {
        let lag = self.max - 1;
        let behind = (lag as f64 * self.decay).ceil() as usize;
        behind.clamp(lag.div_ceil(2), lag) + 1
    }

    /// The most steps behind the oldest open step at the lr's current
    /// decay (0 without a lag): what the volunteers' wanted work is
    /// measured against to stretch a step ([`super::stretch`]).
    pub fn behind(&self) -> usize {
        if self.fixed {
            return self.max - 1;
        }
        self.cap() - 1
    }

    /// The schedule's lr is now `decay` times its peak. A broken value
    /// reads as the peak, the cap of a run without a schedule.
    pub fn follow(&mut self, decay: f64) {
        self.decay = if decay.is_finite() {
            decay.clamp(0.0, 1.0)
        } else {
            1.0
        };
    }

    /// A step closed. `wanted` is the work, in steps (members over the
    /// population), the ready volunteers want to hold; `starved` says
    /// whether one of them held no job at that moment.
    pub fn closed(&mut self, wanted: f64, starved: bool) {
        if self.fixed {
            return;
        }
        // Saturating: a huge or non-finite estimate is clamped, not trusted.
        self.needed = (wanted.ceil().clamp(0.0, self.max as f64) as usize) + 1;
        self.slack = self.slack.min(self.most_slack());
        if starved {
            self.calm = 0;
            self.slack = (self.slack + 1).min(self.most_slack());
        } else {
            self.calm += 1;
            if self.calm >= CALM_PER_STEP * self.open() as u32 {
                self.calm = 0;
                self.slack = self.slack.saturating_sub(1);
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
    fn the_window_holds_the_wanted_work_plus_the_step_being_finished() {
        let mut w = auto(16);
        assert_eq!(w.open(), 17, "a run starts at the cap");
        w.closed(0.0, false);
        assert_eq!(w.open(), 1, "nothing wanted: one step");
        w.closed(0.5, false);
        assert_eq!(w.open(), 2);
        w.closed(9.2, false);
        assert_eq!(w.open(), 11, "ceil(9.2) + 1");
        w.closed(1e9, false);
        assert_eq!(w.open(), 17, "never past lag + 1");
        w.closed(f64::NAN, false);
        assert!((1..=17).contains(&w.open()), "a broken estimate stays in range");
        w.closed(2.0, false);
        assert_eq!(w.open(), 3, "the estimate follows the fleet down at once");
    }

    #[test]
    fn starving_adds_slack_and_calm_takes_it_away() {
        let mut w = auto(32);
        // 11 steps wanted: 12 open, plus up to a quarter of that in slack.
        for want in [13, 14, 15, 15] {
            w.closed(11.0, true);
            assert_eq!(w.open(), want);
        }
        // Eight calm closes per open step before each step of slack goes.
        for _ in 0..CALM_PER_STEP * 15 - 1 {
            w.closed(11.0, false);
        }
        assert_eq!(w.open(), 15, "one close short of shrinking");
        w.closed(11.0, false);
        assert_eq!(w.open(), 14);
        // A starved close resets the calm count.
        for _ in 0..CALM_PER_STEP * 14 - 1 {
            w.closed(11.0, false);
        }
        w.closed(11.0, true);
        assert_eq!(w.open(), 15);
        // A smaller estimate takes the excess slack with it.
        w.closed(3.0, false);
        assert_eq!(w.open(), 6, "4 needed, at most 2 of slack");
        for _ in 0..1000 {
            w.closed(3.0, false);
        }
        assert_eq!(w.open(), 4, "down to what the volunteers want");
        let mut w = auto(8);
        for _ in 0..100 {
            w.closed(20.0, true);
        }
        assert_eq!(w.open(), 9, "never past lag + 1");
    }

    #[test]
    fn the_cap_shrinks_with_the_lr_down_to_half_the_lag() {
        let mut w = auto(16);
        w.closed(40.0, false);
        assert_eq!(w.open(), 17, "at the peak lr, lag + 1");
        w.follow(0.75);
        assert_eq!(w.open(), 13, "12 behind");
        w.follow(0.7);
        assert_eq!(w.open(), 13, "ceil(11.2) = 12 behind");
        w.follow(0.3);
        assert_eq!(w.open(), 9, "never under half the lag");
        w.closed(3.0, false);
        assert_eq!(
            w.open(),
            4,
            "the cap only caps: a small fleet's window is its own"
        );
        w.follow(f64::NAN);
        w.closed(40.0, false);
        assert_eq!(w.open(), 17, "a broken decay reads as the peak");
        let mut w = auto(1);
        w.follow(0.0);
        w.closed(5.0, false);
        assert_eq!(w.open(), 2, "a lag of one stays one");
        let fixed = Settings {
            fixed_lag: true,
            ..Settings::default()
        };
        let mut w = Window::new(&fixed, 5);
        w.follow(0.1);
        assert_eq!(w.open(), 6, "a fixed lag does not follow the lr");
    }

    #[test]
    fn without_a_lag_or_with_a_fixed_one_the_window_never_moves() {
        let mut w = auto(0);
        w.closed(5.0, true);
        assert_eq!(w.open(), 1);
        let fixed = Settings {
            fixed_lag: true,
            ..Settings::default()
        };
        let mut w = Window::new(&fixed, 5);
        assert_eq!(w.open(), 6);
        for starved in [true, false, false] {
            w.closed(0.0, starved);
        }
        for _ in 0..1000 {
            w.closed(0.0, false);
        }
        assert_eq!(w.open(), 6);
    }
}
