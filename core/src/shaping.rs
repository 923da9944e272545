//! Fitness shaping: turning losses into the weights of the ES update.
//!
//! Centered ranks (the default) make the update invariant to any monotone
//! transform of the loss and bound each member's influence: a lying client
//! can give the members it evaluated at most weight 0.5. Z-scores keep the
//! size of each member's advantage, clipped at ±3 so a liar stays bounded.
//! Only the server shapes (the update carries the weights), so the
//! shaping itself need not be bit-identical across targets, but both are
//! deterministic. A centered-rank update travels as the ranks alone, and
//! every replica turns a rank into its weight with [`centered_rank`], one
//! division and one subtraction in f32, the same bits on every target.

use alloc::vec::Vec;

use crate::config::Shaping;
use crate::error::{Error, Result};

/// Shapes `(member, loss)` pairs with the run's [`Shaping`]; the result is
/// sorted by member. Refuses non-finite losses and repeated members.
pub fn shape(kind: Shaping, losses: &[(u32, f32)]) -> Result<Vec<(u32, f32)>> {
    match kind {
        Shaping::CenteredRanks => centered_ranks(losses),
        Shaping::ZScores => z_scores(losses),
    }
}

/// Largest |weight| a z-scored member gets.
pub const Z_CLIP: f32 = 3.0;

/// Standardized fitness: `(mean - loss) / std` (fitness is `-loss`),
/// clipped to `±Z_CLIP`, sorted by member. Mean and variance are summed in
/// f64 in member order. All weights are 0 when every loss is equal (or a
/// single member is given).
pub fn z_scores(losses: &[(u32, f32)]) -> Result<Vec<(u32, f32)>> {
    if losses.iter().any(|(_, l)| !l.is_finite()) {
        return Err(Error::NonFinite);
    }
    let mut out: Vec<(u32, f32)> = losses.to_vec();
    out.sort_by_key(|&(m, _)| m);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Member(w[0].0));
    }
    let n = out.len().max(1) as f64;
    let mean = out.iter().map(|&(_, l)| l as f64).sum::<f64>() / n;
    let var = out
        .iter()
        .map(|&(_, l)| {
            let d = l as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    // libm: `f64::sqrt` needs std, and the core builds without it for wasm.
    let std = libm::sqrt(var);
    for (_, w) in &mut out {
        *w = if std > 0.0 {
            (((mean - *w as f64) / std) as f32).clamp(-Z_CLIP, Z_CLIP)
        } else {
            0.0
        };
    }
    Ok(out)
}

/// Centered ranks of `(member, loss)` pairs: fitness is `-loss`, the member
/// with the highest fitness gets `+0.5`, the lowest `-0.5`, evenly spaced
/// between (`rank / (n - 1) - 0.5`). Equal losses are ordered by member index
/// (the lower index ranks lower), so every replica computes the same list.
/// The result is sorted by member. A single member gets weight 0.
///
/// Refuses non-finite losses and repeated members: both would make the list
/// depend on more than the losses.
pub fn centered_ranks(losses: &[(u32, f32)]) -> Result<Vec<(u32, f32)>> {
    if losses.iter().any(|(_, l)| !l.is_finite()) {
        return Err(Error::NonFinite);
    }
    if losses.windows(2).all(|w| w[0].0 < w[1].0) {
        return Ok(ranks_of_sorted(losses));
    }
    ranks_by_comparison(losses)
}

/// [`centered_ranks`] of finite losses in any member order.
fn ranks_by_comparison(losses: &[(u32, f32)]) -> Result<Vec<(u32, f32)>> {
    let mut order: Vec<(u32, f32)> = losses.to_vec();
    // Ascending fitness = descending loss; ties by member index. Adding 0.0
    // folds -0.0 into +0.0 so that the two count as the tie they are.
    order.sort_by(|a, b| (b.1 + 0.0).total_cmp(&(a.1 + 0.0)).then(a.0.cmp(&b.0)));
    if let Some(w) = order.windows(2).find(|w| w[0].0 == w[1].0 && w[0].1 == w[1].1) {
        return Err(Error::Member(w[0].0));
    }
    let n = order.len();
    let mut out: Vec<(u32, f32)> = order
        .iter()
        .enumerate()
        .map(|(rank, &(m, _))| (m, centered_rank(rank, n)))
        .collect();
    out.sort_by_key(|&(m, _)| m);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Member(w[0].0));
    }
    Ok(out)
}

/// [`centered_ranks`] of finite losses already sorted by distinct member,
/// as the server's books list them: the same weights, from one sort of
/// plain integers instead of two sorts with a comparator.
///
/// Each loss becomes a 32-bit key that orders like descending
/// `total_cmp` (with -0.0 folded into +0.0); the input position below it
/// breaks ties, and position order is member order here.
fn ranks_of_sorted(losses: &[(u32, f32)]) -> Vec<(u32, f32)> {
    let n = losses.len();
    let mut keys: Vec<u64> = losses
        .iter()
        .enumerate()
        .map(|(i, &(_, l))| {
            let bits = (l + 0.0).to_bits();
            // Ascending as unsigned exactly when the floats ascend ...
            let up = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
            // ... and complemented to descend.
            (u64::from(!up) << 32) | i as u64
        })
        .collect();
    keys.sort_unstable();
    let mut out: Vec<(u32, f32)> = losses.iter().map(|&(m, _)| (m, 0.0)).collect();
    for (rank, key) in keys.iter().enumerate() {
        out[*key as u32 as usize].1 = centered_rank(rank, n);
    }
    out
}

/// The weight of rank `rank` (0 the lowest fitness) among `n` counted
/// members: `rank / (n - 1) - 0.5`, and 0 for a lone member.
///
/// The one expression both shaping paths use, and the one a replica uses
/// to rebuild the weights from the ranks a compact update carries
/// (`protocol::weights`): single f32 operations, correctly rounded on
/// every target, so the rebuilt weights are the server's bit for bit.
pub fn centered_rank(rank: usize, n: usize) -> f32 {
    if n > 1 {
        rank as f32 / (n - 1) as f32 - 0.5
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // proptest is a native dev-dependency only.
    #[cfg(not(target_arch = "wasm32"))]
    proptest::proptest! {
        /// The fast path for member-sorted input gives the weights of the
        /// general one bit for bit, ties and signed zeros included.
        #[test]
        fn sorted_input_ranks_like_the_general_path(
            picks in proptest::collection::vec((0u32..3, 0usize..6), 0..200),
        ) {
            let values = [0.0f32, -0.0, 1.5, -2.25, 3.0e-7, f32::MAX];
            let mut m = 0;
            let losses: Vec<(u32, f32)> = picks
                .iter()
                .map(|&(gap, v)| {
                    m += gap + 1;
                    (m, values[v])
                })
                .collect();
            let fast = ranks_of_sorted(&losses);
            let general = ranks_by_comparison(&losses).unwrap();
            let bits = |w: &[(u32, f32)]| w.iter().map(|&(m, x)| (m, x.to_bits())).collect::<Vec<_>>();
            proptest::prop_assert_eq!(bits(&fast), bits(&general));
        }
    }

    #[test]
    fn lowest_loss_gets_half() {
        let w = centered_ranks(&[(0, 3.0), (1, 1.0), (2, 2.0)]).unwrap();
        assert_eq!(w, [(0, -0.5), (1, 0.5), (2, 0.0)]);
    }

    #[test]
    fn ties_break_by_member_and_bad_input_is_refused() {
        let w = centered_ranks(&[(4, 1.0), (2, 1.0)]).unwrap();
        assert_eq!(w, [(2, -0.5), (4, 0.5)]);
        assert_eq!(centered_ranks(&[(0, f32::NAN)]), Err(Error::NonFinite));
        assert_eq!(centered_ranks(&[(1, 1.0), (1, 2.0)]), Err(Error::Member(1)));
        assert_eq!(centered_ranks(&[(3, 1.0)]).unwrap(), [(3, 0.0)]);
    }

    #[test]
    fn z_scores_standardize_fitness() {
        let w = shape(Shaping::ZScores, &[(2, 3.0), (0, 1.0), (1, 2.0)]).unwrap();
        let s = (2.0f32 / 3.0).sqrt();
        let want = [(0, 1.0 / s), (1, 0.0), (2, -1.0 / s)];
        for (a, b) in w.iter().zip(want) {
            assert!(a.0 == b.0 && (a.1 - b.1).abs() < 1e-6, "{w:?}");
        }
        // One outlier among many is clipped; equal losses give zeros.
        let mut many: Vec<(u32, f32)> = (0..100).map(|m| (m, 1.0)).collect();
        many[7].1 = -1e6;
        assert_eq!(z_scores(&many).unwrap()[7].1, Z_CLIP);
        assert!(
            z_scores(&[(0, 2.0), (1, 2.0)])
                .unwrap()
                .iter()
                .all(|w| w.1 == 0.0)
        );
        assert_eq!(z_scores(&[(0, f32::INFINITY)]), Err(Error::NonFinite));
        assert_eq!(z_scores(&[(1, 1.0), (1, 2.0)]), Err(Error::Member(1)));
        assert_eq!(
            shape(Shaping::CenteredRanks, &[(0, 1.0), (1, 2.0)]).unwrap(),
            [(0, 0.5), (1, -0.5)]
        );
    }
}
