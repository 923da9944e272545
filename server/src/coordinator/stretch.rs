//! How many sequences a step's minibatch holds: more when the volunteers
//! would otherwise wait on a long round trip.
//!
//! With steps in flight a fleet far away is bound by its window, not by
//! its CPU: at most `lag` steps are behind, and each takes a round trip to
//! come back, so the step rate is about the window over the round trip
//! whatever the volunteers could compute. Eight volunteers at 25% of a
//! core 150 ± 50 ms away ran 60 steps/s with each using a small part of
//! its share; the same fleet ran 190-210 close by. A step of more sequences
//! per member costs a volunteer more time but no more round trips, and it
//! learns more per step (a member's loss over more text is a less noisy
//! directional derivative): `seedling train --fixed-lag --lag 16` reached
//! validation 2.40 at steps 275-325 with one sequence per member, 200-225
//! with two and 175-200 with four (seeds 0-2). So far away the idle CPU
//! buys steps, and close by, where CPU is what binds, one sequence stays
//! fastest (docs/LEARNING.md, "Longer minibatches far away").
//!
//! The rule: one more sequence for every [`RTT_PER_SEQUENCE`] of the
//! median volunteer's round trip, up to [`Settings::far_batch`] times the
//! config's batch. Only an adaptive window stretches: a fixed lag is the
//! rule tests predict, and a step's minibatch must then follow from the
//! step alone.
//!
//! [`Settings::far_batch`]: super::types::Settings::far_batch

use seedling_core::config::limits::MAX_BATCH;

/// Round trip (seconds) per extra sequence: 50 ms keeps one sequence, 150 ±
/// 50 ms gets three. Measured with 8 x 25% fleets, 30 s runs: at 50 ms two
/// sequences reached 2.40 later (1.97 s against 1.64); at 150 ± 50 ms two
/// and three reached it in 3.1-3.3 and 2.95 s against 3.5, four in 3.5-3.7
/// s (the loop's compute grew into the round trip).
pub const RTT_PER_SEQUENCE: f64 = 0.075;

/// Sequences in a step opened now: `base` (the config's batch) times one
/// plus a sequence per [`RTT_PER_SEQUENCE`] of `rtt`, at most `most` times
/// `base` and never past the most a replica accepts
/// ([`MAX_BATCH`], or `base` if that is larger). A broken or unknown round
/// trip (0 before the first pong) keeps `base`.
pub fn sequences(base: u32, most: u32, rtt: f64) -> usize {
    let times = if rtt.is_finite() && rtt > 0.0 {
        1 + (rtt / RTT_PER_SEQUENCE) as u64
    } else {
        1
    };
    let stretched = u64::from(base) * times.clamp(1, u64::from(most.max(1)));
    stretched.min(u64::from(MAX_BATCH.max(base))) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_longer_round_trip_gets_more_sequences_up_to_the_most() {
        assert_eq!(sequences(1, 3, 0.0), 1, "no round trip measured yet");
        assert_eq!(sequences(1, 3, 0.002), 1, "loopback");
        assert_eq!(sequences(1, 3, 0.05), 1, "50 ms");
        assert_eq!(sequences(1, 3, 0.08), 2);
        assert_eq!(sequences(1, 3, 0.16), 3, "150 ms with jitter");
        assert_eq!(sequences(1, 3, 2.0), 3, "never past the most");
        assert_eq!(sequences(2, 3, 0.16), 6, "times the config's batch");
        assert_eq!(sequences(1, 1, 0.5), 1, "a most of one never stretches");
        assert_eq!(sequences(1, 0, 0.5), 1, "nor does zero");
        assert_eq!(sequences(1, 3, f64::NAN), 1);
        assert_eq!(sequences(1, 3, f64::INFINITY), 1);
        assert_eq!(sequences(1, 3, -1.0), 1);
        assert_eq!(
            sequences(MAX_BATCH, 3, 0.16),
            MAX_BATCH as usize,
            "a replica takes no more"
        );
        assert_eq!(sequences(2000, 3, 0.16), MAX_BATCH as usize);
        assert_eq!(sequences(1, u32::MAX, 1e9), MAX_BATCH as usize);
    }
}
