//! The learning curve a checkpoint keeps: one point per closed step,
//! thinned past a cap so a long run's checkpoints stay small.

use serde::{Deserialize, Serialize};

/// One point of the learning curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// Step at which the losses were measured.
    pub step: u64,
    /// Wall-clock seconds since the run started (across restarts).
    pub elapsed_s: f64,
    /// Training tokens consumed so far.
    pub tokens: u64,
    /// Mean population loss of the step, nats/char. Written as JSON `null`
    /// when not finite (JSON has no NaN) and read back as NaN, so a diverged
    /// run can still be checkpointed and inspected.
    #[serde(with = "nan_as_null")]
    pub train_loss: f32,
    /// Validation loss, nats/char, at steps where it was measured.
    pub val_loss: Option<f32>,
}

/// Most points a run's history holds. Every checkpoint stores the whole
/// history as JSON, and runs take a point per step: a 30-minute local run
/// of the default model closes over 100,000 steps, which made each
/// checkpoint (every 100 steps, on the coordinator's thread) serialize and
/// write megabytes, more with every step. A few thousand points draw the
/// curve as well.
pub const HISTORY_CAP: usize = 16_384;

/// The newest points, which are never thinned: the status page shows the
/// last 500 at full resolution.
const HISTORY_RECENT: usize = 1024;

/// Appends `point` and, past [`HISTORY_CAP`], thins the older part of the
/// history: every other point without a validation loss goes (and every
/// other validation point too, once those alone would fill half the cap).
/// The first point and the newest [`HISTORY_RECENT`] always stay. Older
/// stretches so end up coarser than newer ones, like a round-robin
/// database; steps, tokens and times are cumulative, so nothing is lost but
/// resolution.
pub fn record(history: &mut Vec<HistoryPoint>, point: HistoryPoint) {
    history.push(point);
    if history.len() <= HISTORY_CAP {
        return;
    }
    let old = history.len() - HISTORY_RECENT;
    let vals = history[1..old].iter().filter(|h| h.val_loss.is_some()).count();
    let thin_vals = vals > HISTORY_CAP / 2;
    let (mut i, mut train, mut val) = (0, 0, 0);
    history.retain(|h| {
        let keep = if i == 0 || i >= old {
            true
        } else if h.val_loss.is_some() {
            val += 1;
            !thin_vals || val % 2 == 0
        } else {
            train += 1;
            train % 2 == 0
        };
        i += 1;
        keep
    });
}

/// Serde helper: a non-finite f32 travels as `null` (JSON has no NaN).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f32(*x)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, val_every: u64) -> HistoryPoint {
        HistoryPoint {
            step,
            elapsed_s: step as f64 * 0.01,
            tokens: step * 100,
            train_loss: 4.0 - step as f32 * 1e-6,
            val_loss: step.is_multiple_of(val_every).then_some(3.0),
        }
    }

    #[test]
    fn long_histories_are_thinned_to_the_cap_keeping_the_ends() {
        for val_every in [25, 1_000_000] {
            let mut h = Vec::new();
            let n = 200_000;
            for step in 0..n {
                record(&mut h, point(step, val_every));
                assert!(h.len() <= HISTORY_CAP);
            }
            assert!(h.len() > HISTORY_CAP / 2, "{}", h.len());
            assert_eq!(h[0].step, 0);
            // The newest points are all there, in order.
            let recent: Vec<u64> = h[h.len() - HISTORY_RECENT..].iter().map(|p| p.step).collect();
            assert_eq!(recent, (n - HISTORY_RECENT as u64..n).collect::<Vec<_>>());
            assert!(
                h.windows(2)
                    .all(|w| w[0].step < w[1].step && w[0].tokens < w[1].tokens)
            );
            // Validation points survive thinning better than training points,
            // and still span the run.
            let vals: Vec<u64> = h
                .iter()
                .filter(|p| p.val_loss.is_some())
                .map(|p| p.step)
                .collect();
            if val_every == 25 {
                assert!(vals.len() >= HISTORY_CAP / 4, "{}", vals.len());
                assert!(vals[1] < n / 10, "{vals:?}");
            } else {
                assert_eq!(vals, [0]);
            }
        }
    }

    #[test]
    fn short_histories_are_kept_whole() {
        let mut h = Vec::new();
        for step in 0..HISTORY_CAP as u64 {
            record(&mut h, point(step, 3));
        }
        assert_eq!(
            h,
            (0..HISTORY_CAP as u64).map(|s| point(s, 3)).collect::<Vec<_>>()
        );
    }
}
