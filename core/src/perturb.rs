//! The perturbation plan: which tensors ES perturbs, and each antithetic
//! pair's noise on them, rebuilt by every replica from seeds.
//!
//! A pair's noise on a tensor is the Gaussian stream [`pair_key`] names, a
//! pure function of (run seed, step, pair, tensor id), so a member's
//! perturbation can be regenerated anywhere and in any order. The bits are
//! part of the determinism contract (ARCHITECTURE.md, Determinism
//! contract): the forward pass and the update must draw the same values.
//!
//! This module sits above [`crate::config`] and [`crate::model`] and draws
//! its numbers from the leaf [`crate::rng`].

use alloc::vec::Vec;

use crate::config::{Readout, RunConfig};
use crate::model::{Layout, TensorId, TensorSpec};
use crate::rng::{DOMAIN_NOISE, derive, fill_normal};

/// The stream key of one antithetic pair's noise on one tensor.
pub fn pair_key(seed: u64, step: u64, pair: u64, tensor: TensorId) -> u64 {
    derive(&[DOMAIN_NOISE, seed, step, pair, tensor.key()])
}

/// Whether ES perturbs tensor `id` under `cfg`. With the exact readout,
/// noise on the readout would only add variance to the members' losses (its
/// update ignores ES's estimate), so the readout stays unperturbed and its
/// noise is neither drawn nor accumulated.
pub fn perturbs(layout: &Layout, cfg: &RunConfig, id: TensorId) -> bool {
    cfg.recipe.readout == Readout::Es || !layout.is_readout(id)
}

/// Number of noise values one pair draws for tensor `t` at rank `rank`:
/// `(rows + cols) * rank` for a low-rank matrix (A then B), `rows * cols`
/// otherwise.
pub fn tensor_noise_len(t: &TensorSpec, rank: Option<usize>) -> usize {
    match rank {
        Some(r) if t.is_matrix => (t.rows + t.cols) * r,
        _ => t.rows * t.cols,
    }
}

/// Number of noise values one pair draws for tensor `id` under `cfg`:
/// [`tensor_noise_len`] at the config's rank, except that a tensor the
/// config does not perturb ([`perturbs`]) takes none under low-rank noise (a
/// per-input head would otherwise make every member carry thousands of
/// zeros) and keeps its zero-filled place under full-rank noise, whose
/// buffer is parameter-shaped.
pub fn noise_len(layout: &Layout, cfg: &RunConfig, id: TensorId) -> usize {
    let rank = cfg.es.noise.rank();
    if rank.is_some() && !perturbs(layout, cfg, id) {
        return 0;
    }
    tensor_noise_len(layout.tensor(id), rank)
}

/// One antithetic pair's noise for every tensor, concatenated in layout order.
///
/// Low-rank (`rank = Some(r)`): a matrix `[m, n]` contributes `A` (`[m, r]`,
/// row-major) then `B` (`[n, r]`); a vector contributes its Gaussian values.
/// Full (`rank = None`): every tensor contributes `rows * cols` values, so the
/// buffer is exactly a parameter-shaped `eps`. The rank is the config's.
///
/// A tensor the config does not perturb ([`perturbs`]) is not drawn
/// ([`noise_len`]); every other tensor's noise is the same whether or not it
/// is (each tensor has its own stream).
pub fn pair_noise(layout: &Layout, cfg: &RunConfig, step: u64, pair: u64, out: &mut Vec<f32>) {
    out.clear();
    for id in layout.ids() {
        let start = out.len();
        out.resize(start + noise_len(layout, cfg, id), 0.0);
        if perturbs(layout, cfg, id) {
            fill_normal(pair_key(cfg.seed, step, pair, id), &mut out[start..]);
        }
    }
}

/// Offsets of each tensor's noise inside a [`pair_noise`] buffer (indexed by
/// [`TensorId::index`]), plus the total.
pub fn pair_noise_offsets(layout: &Layout, cfg: &RunConfig) -> (Vec<usize>, usize) {
    let mut offs = Vec::with_capacity(layout.tensors.len());
    let mut total = 0;
    for id in layout.ids() {
        offs.push(total);
        total += noise_len(layout, cfg, id);
    }
    (offs, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, NoiseKind};
    use crate::rng;

    fn small() -> (Layout, RunConfig) {
        let mut cfg = RunConfig::rw256(5);
        cfg.model = ModelConfig {
            vocab: 5,
            hidden: 4,
            layers: 2,
            head: Default::default(),
        };
        cfg.es.noise = NoiseKind::LowRank { rank: 2 };
        (Layout::new(cfg.model), cfg)
    }

    #[test]
    fn pair_keys_differ_by_every_part() {
        let (layout, _) = small();
        let (a, b) = (layout.layer(1).w_ih, layout.layer(1).w_hh);
        assert_ne!(pair_key(1, 2, 3, a), pair_key(1, 2, 3, b));
        assert_ne!(pair_key(1, 2, 3, a), pair_key(1, 3, 2, a));
        assert_ne!(pair_key(1, 2, 3, a), pair_key(2, 2, 3, a));
    }

    /// Each tensor's block of a pair's noise is the tensor's own stream, at
    /// the offset [`pair_noise_offsets`] gives, and the unperturbed readout
    /// of the exact recipe takes no place under low-rank noise.
    #[test]
    fn pair_noise_is_the_tensors_streams_in_layout_order() {
        let (layout, mut cfg) = small();
        for readout in [Readout::Es, Readout::Exact] {
            cfg.recipe.readout = readout;
            let mut buf = Vec::new();
            pair_noise(&layout, &cfg, 7, 3, &mut buf);
            let (offs, total) = pair_noise_offsets(&layout, &cfg);
            assert_eq!(buf.len(), total);
            for (id, t) in layout.iter() {
                let n = noise_len(&layout, &cfg, id);
                let perturbed = perturbs(&layout, &cfg, id);
                assert_eq!(perturbed, readout == Readout::Es || !layout.is_readout(id));
                assert_eq!(
                    n,
                    if perturbed {
                        tensor_noise_len(t, Some(2))
                    } else {
                        0
                    }
                );
                let mut want = alloc::vec![0.0; n];
                rng::fill_normal(pair_key(cfg.seed, 7, 3, id), &mut want);
                assert_eq!(
                    buf[offs[id.index()]..offs[id.index()] + n],
                    want[..],
                    "{}",
                    t.name
                );
            }
        }
    }
}
