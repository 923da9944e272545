//! How many sequences a step's minibatch holds: more when the window of
//! steps in flight cannot hold all the work the volunteers could do.
//!
//! With steps in flight a fleet far away, or a large one, is bound by its
//! window, not by its CPU: at most `lag` steps are behind, and each takes
//! a round trip and a job to come back, so the step rate is about the
//! window over that time whatever the volunteers could compute. Eight
//! volunteers at 25% of a core 150 ± 50 ms away ran 60 steps/s with each
//! using a small part of its share; the same fleet ran 190-210 close by.
//! A step of more sequences per member costs a volunteer more time but no
//! more round trips, and it learns more per step (a member's loss over
//! more text is a less noisy directional derivative): `seedling train
//! --fixed-lag --lag 16` reached validation 2.40 at steps 275-325 with
//! one sequence per member, 200-225 with two and 175-200 with four (seeds
//! 0-2). So the idle CPU buys steps, and where CPU is what binds, one
//! sequence stays fastest (docs/LEARNING.md, "Longer minibatches far
//! away", "Longer minibatches for a larger fleet").
//!
//! The rule measures the idle CPU as the window does (Little's law,
//! [`super::window`]): the volunteers want to hold `need` steps of work
//! at the config's batch (each its speed times its round trip, plus the
//! job in hand), and at most `behind` steps may be open behind the
//! oldest. Measured speeds overstate what a volunteer sustains about
//! twice ([`WANTED_OVER_SUSTAINED`]), so when `need` is `2k` times
//! `behind` or more, the fleet could evaluate `k` times the work the
//! window holds, and a step opened now holds `k` times the sequences, up
//! to [`Settings::far_batch`]. A far
//! fleet stretches from its first close; a large fleet close by stretches
//! once the window's cap falls with the lr, which is when a less noisy
//! step pays most (the loss near its floor). A small fleet, bound by its
//! share, never does. Only an adaptive window stretches: a fixed lag is
//! the rule tests predict, and a step's minibatch must then follow from
//! the step alone.
//!
//! [`Settings::far_batch`]: super::types::Settings::far_batch

use seedling_core::config::limits::MAX_BATCH;

/// How much the volunteers' wanted work overstates what they sustain. A
/// volunteer's speed is measured over its jobs, and a job run on saved-up
/// CPU share reads fast: eight volunteers at 25% of a core 50 ms away
/// wanted 42-78 steps of work at their measured speeds, about twice what
/// their sustained rate (the same fleet close by, bound by its CPU) times
/// the round trip gives. Stretching at once there cost a quarter of the
/// rate and reached 2.40 later (docs/LEARNING.md, "Longer minibatches for
/// a larger fleet").
pub const WANTED_OVER_SUSTAINED: f64 = 2.0;

/// How many times the config's batch a step opened now holds: the whole
/// number of times the wanted work `need` (in steps at the config's
/// batch), over [`WANTED_OVER_SUSTAINED`], fills the window's `behind`
/// steps, from 1 to `most`. A broken or empty estimate keeps 1.
pub fn times(need: f64, behind: usize, most: u32) -> u32 {
    if !(need.is_finite() && need > 0.0) || behind == 0 {
        return 1;
    }
    let k = (need / WANTED_OVER_SUSTAINED / behind as f64).floor();
    (k.min(f64::from(most.max(1))) as u32).max(1)
}

/// Sequences in a step `times` times the config's batch `base`, never past
/// the most a replica accepts ([`MAX_BATCH`], or `base` if that is larger).
pub fn sequences(base: u32, times: u32) -> usize {
    let stretched = u64::from(base) * u64::from(times.max(1));
    stretched.min(u64::from(MAX_BATCH.max(base))) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_wanting_more_than_the_window_holds_gets_more_sequences() {
        assert_eq!(times(0.0, 16, 3), 1, "nothing measured yet");
        assert_eq!(times(20.0, 16, 3), 1, "close by: the window holds it");
        assert_eq!(times(42.0, 16, 3), 1, "50 ms early: not twice the window");
        assert_eq!(times(50.0, 8, 3), 3, "the same fleet once the cap halved");
        assert_eq!(times(48.0, 8, 3), 3);
        assert_eq!(times(47.9, 8, 3), 2);
        assert_eq!(times(160.0, 16, 3), 3, "150 ms: never past the most");
        assert_eq!(times(160.0, 16, 1), 1, "a most of one never stretches");
        assert_eq!(times(160.0, 16, 0), 1, "nor does zero");
        assert_eq!(times(160.0, 0, 3), 1, "no lag, no window to fill");
        for broken in [f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(times(broken, 16, 3), 1);
        }
        assert_eq!(times(1e300, 1, u32::MAX), u32::MAX);
    }

    #[test]
    fn a_stretched_minibatch_is_whole_batches_up_to_the_most_a_replica_takes() {
        assert_eq!(sequences(1, 1), 1);
        assert_eq!(sequences(1, 3), 3);
        assert_eq!(sequences(2, 3), 6, "times the config's batch");
        assert_eq!(sequences(2, 0), 2, "zero reads as one");
        assert_eq!(
            sequences(MAX_BATCH, 3),
            MAX_BATCH as usize,
            "a replica takes no more"
        );
        assert_eq!(sequences(2000, 3), MAX_BATCH.max(2000) as usize);
        assert_eq!(sequences(1, u32::MAX), MAX_BATCH as usize);
    }
}
