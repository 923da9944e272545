//! Fitness shaping: turning losses into the weights of the ES update.
//!
//! Centered ranks make the update invariant to any monotone transform of the
//! loss and bound each member's influence: a lying client can give the
//! members it evaluated at most weight 0.5.

use alloc::vec::Vec;

use crate::error::{Error, Result};

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
        .map(|(rank, &(m, _))| {
            let w = if n > 1 {
                rank as f32 / (n - 1) as f32 - 0.5
            } else {
                0.0
            };
            (m, w)
        })
        .collect();
    out.sort_by_key(|&(m, _)| m);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Member(w[0].0));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
