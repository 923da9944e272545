//! The ES gradient, rebuilt by every replica from seeds and shaped weights.
//!
//! `g = sum_i w_i eps_i / (n sigma)` over the members the server counted. The
//! two members of antithetic pair k share `eps_k` with opposite signs, so the
//! sum runs over pairs with coefficient `(w_2k - w_2k+1) / (n sigma)`.
//!
//! Determinism (ARCHITECTURE.md, Determinism contract): pairs are
//! accumulated in ascending order, each element of `g` receives its terms in
//! that order, and every term is computed by the same expression,
//! `(coef * a_i) * b_j` for a low-rank matrix and `coef * e_j` otherwise.
//! Loops run over elements with no cross-element reduction, so the
//! compiler's vectorization cannot reorder a sum, and the result is
//! bit-identical on x86_64 and wasm32.

use alloc::vec;
use alloc::vec::Vec;

use crate::config::RunConfig;
use crate::error::{Error, Result, check_len};
use crate::forward::Minibatch;
use crate::model::Layout;
use crate::perturb::{pair_key, perturbs, tensor_noise_len};
use crate::rng::fill_normal;

/// One pair's coefficient in the gradient, in ascending pair order.
fn pair_coefficients(cfg: &RunConfig, weights: &[(u32, f32)]) -> Result<Vec<(u32, f32)>> {
    let mut sorted = weights.to_vec();
    sorted.sort_by_key(|&(m, _)| m);
    for w in sorted.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(Error::Member(w[0].0));
        }
    }
    if let Some(&(m, _)) = sorted.iter().find(|&&(m, _)| m >= cfg.es.population) {
        return Err(Error::Member(m));
    }
    if sorted.iter().any(|(_, w)| !w.is_finite()) {
        return Err(Error::NonFinite);
    }
    let scale = 1.0 / (sorted.len() as f32 * cfg.es.sigma);
    let mut out: Vec<(u32, f32)> = Vec::new();
    for &(m, w) in &sorted {
        let signed = if m % 2 == 0 { w } else { -w };
        match out.last_mut() {
            Some((p, c)) if *p == m / 2 => *c += signed,
            _ => out.push((m / 2, signed)),
        }
    }
    for (_, c) in &mut out {
        *c *= scale;
    }
    Ok(out)
}

/// The ES estimate of the gradient of fitness (`-loss`) from the step's
/// `(member, weight)` list. Refuses repeated or out-of-range members and
/// non-finite weights, since the list comes from the network.
pub fn es_gradient(layout: &Layout, cfg: &RunConfig, step: u64, weights: &[(u32, f32)]) -> Result<Vec<f32>> {
    let mut g = Vec::new();
    es_gradient_into(layout, cfg, step, weights, &mut g)?;
    Ok(g)
}

/// [`es_gradient`] into `g` (resized to the model), so a replica applying
/// update after update reuses one buffer instead of allocating and
/// faulting in a model-sized one per step. `g`'s old contents do not
/// matter; on an error it is left unspecified.
pub fn es_gradient_into(
    layout: &Layout,
    cfg: &RunConfig,
    step: u64,
    weights: &[(u32, f32)],
    g: &mut Vec<f32>,
) -> Result<()> {
    let coefs = pair_coefficients(cfg, weights)?;
    g.clear();
    g.resize(layout.len, 0.0);
    let rank = cfg.es.noise.rank();
    let mut buf = Vec::new();
    for (id, t) in layout.iter() {
        if !perturbs(layout, cfg, id) {
            continue; // never perturbed: no estimate (see `perturb::perturbs`)
        }
        buf.resize(tensor_noise_len(t, rank), 0.0);
        let dst = &mut g[t.range()];
        for &(pair, c) in &coefs {
            fill_normal(pair_key(cfg.seed, step, pair as u64, id), &mut buf);
            match rank {
                Some(r) if t.is_matrix => {
                    let c = c / libm::sqrtf(r as f32);
                    let (a, b) = buf.split_at(t.rows * r);
                    if r == 1 {
                        // Rank 1 (the default) reads `b` contiguously, which
                        // the compiler vectorizes; `step_by` below it does not.
                        for (row, &ai) in dst.chunks_exact_mut(t.cols).zip(a) {
                            let ca = c * ai;
                            for (d, &bj) in row.iter_mut().zip(&b[..t.cols]) {
                                *d += ca * bj;
                            }
                        }
                        continue;
                    }
                    for q in 0..r {
                        for i in 0..t.rows {
                            let ca = c * a[i * r + q];
                            let row = &mut dst[i * t.cols..(i + 1) * t.cols];
                            for (d, bj) in row.iter_mut().zip(b.iter().skip(q).step_by(r)) {
                                *d += ca * bj;
                            }
                        }
                    }
                }
                _ => {
                    for (d, &e) in dst.iter_mut().zip(&buf) {
                        *d += c * e;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Zeroes the gradient rows of the first layer's input matrix whose
/// character no sequence of `batch` reads as input ([`InputRows::Seen`]).
///
/// The input is one-hot, so such a row never touches the loss and its
/// exact gradient is zero; ES's estimate there is only noise. The result
/// depends on the tokens alone (no arithmetic), so it keeps the update path
/// bit-identical across targets.
///
/// [`InputRows::Seen`]: crate::config::InputRows::Seen
pub fn keep_seen_rows(layout: &Layout, batch: &Minibatch, g: &mut [f32]) -> Result<()> {
    check_len("gradient", layout.len, g.len())?;
    let mut seen = vec![false; layout.vocab()];
    for tok in batch.inputs() {
        *seen.get_mut(tok).ok_or(Error::UnknownToken(tok as u32))? = true;
    }
    let (w, h) = (layout.w_ih(0), layout.hidden());
    for (row, _) in seen.iter().enumerate().filter(|(_, s)| !**s) {
        g[w.offset + row * h..w.offset + (row + 1) * h].fill(0.0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, NoiseKind};
    use crate::forward::perturbed_params;

    fn cfg(noise: NoiseKind) -> RunConfig {
        let mut c = RunConfig::rw256(5);
        c.model = ModelConfig {
            vocab: 5,
            hidden: 6,
            layers: 1,
            head: Default::default(),
        };
        c.es.noise = noise;
        c.es.population = 6;
        c.es.sigma = 0.5;
        c
    }

    #[test]
    fn gradient_is_the_weighted_sum_of_materialized_noise() {
        for noise in [NoiseKind::Full, NoiseKind::LowRank { rank: 2 }] {
            let c = cfg(noise);
            let layout = Layout::new(c.model);
            let zero = vec![0.0; layout.len];
            let weights = [(0u32, 0.5f32), (1, -0.5), (4, 0.25), (3, 0.1)];
            let g = es_gradient(&layout, &c, 7, &weights).unwrap();
            let mut want = vec![0.0f32; layout.len];
            for &(m, w) in &weights {
                // perturbed_params(0) = sign * sigma * eps.
                let p = perturbed_params(&layout, &zero, &c, 7, m);
                for (x, e) in want.iter_mut().zip(p) {
                    *x += w * e / (c.es.sigma * c.es.sigma * weights.len() as f32);
                }
            }
            for (a, b) in g.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{noise:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn hostile_lists_are_refused() {
        let c = cfg(NoiseKind::Full);
        let layout = Layout::new(c.model);
        assert_eq!(es_gradient(&layout, &c, 0, &[(6, 0.1)]), Err(Error::Member(6)));
        assert_eq!(
            es_gradient(&layout, &c, 0, &[(1, 0.1), (1, 0.2)]),
            Err(Error::Member(1))
        );
        assert_eq!(
            es_gradient(&layout, &c, 0, &[(1, f32::NAN)]),
            Err(Error::NonFinite)
        );
    }

    /// Exactly the first layer's input rows of characters no sequence reads
    /// are zeroed: a character that is only a target (the last token) does
    /// not count, and no other tensor, layer 1's input matrix included,
    /// changes.
    #[test]
    fn keep_seen_rows_zeroes_exactly_the_unread_rows() {
        let layout = Layout::new(ModelConfig {
            vocab: 7,
            hidden: 3,
            layers: 2,
            head: Default::default(),
        });
        // Inputs read characters 1, 2 and 4; 6 is only a target.
        let tokens: [crate::tokenizer::Token; 8] = [1, 2, 1, 6, 4, 4, 2, 6];
        let batch = Minibatch::new(&tokens, 2, 3, 7).unwrap();
        let mut g = vec![1.0f32; layout.len];
        keep_seen_rows(&layout, &batch, &mut g).unwrap();
        let w = layout.w_ih(0);
        for (i, &x) in g.iter().enumerate() {
            let row = (i >= w.offset && i < w.offset + w.len()).then(|| (i - w.offset) / 3);
            let want = match row {
                Some(r) if ![1, 2, 4].contains(&r) => 0.0,
                _ => 1.0,
            };
            assert_eq!(x, want, "element {i} (input row {row:?})");
        }
        // A buffer or minibatch that does not fit is an error, not a panic.
        assert!(keep_seen_rows(&layout, &batch, &mut g[1..]).is_err());
        let wide: [crate::tokenizer::Token; 4] = [9, 1, 2, 3];
        let wide = Minibatch::new(&wide, 1, 3, 10).unwrap();
        assert!(keep_seen_rows(&layout, &wide, &mut g).is_err());
    }

    /// What the rows keep is sound: backpropagation's exact gradient is zero
    /// on every row keep_seen_rows zeroes, and not on the rows it keeps.
    #[cfg(feature = "bptt")]
    #[test]
    fn unread_rows_have_a_zero_exact_gradient() {
        let layout = Layout::new(ModelConfig {
            vocab: 11,
            hidden: 6,
            layers: 1,
            head: Default::default(),
        });
        let params = layout.init_params(5, 1.0);
        let tokens: Vec<crate::tokenizer::Token> = (0..2 * 10u32).map(|i| ((i * i) % 11) as _).collect();
        let batch = Minibatch::new(&tokens, 2, 9, 11).unwrap();
        let (_, grad) =
            crate::backprop::loss_and_gradient(&layout, &params, &tokens, 9, crate::gemm::Backend::Reference)
                .unwrap();
        let mut kept = vec![1.0f32; layout.len];
        keep_seen_rows(&layout, &batch, &mut kept).unwrap();
        let w = layout.w_ih(0);
        let (mut zeroed, mut read) = (0, 0);
        for r in 0..11 {
            let rows = w.offset + r * 6..w.offset + (r + 1) * 6;
            if kept[rows.clone()].iter().all(|&k| k == 0.0) {
                zeroed += 1;
                assert!(grad[rows].iter().all(|&x| x == 0.0), "row {r} has a gradient");
            } else {
                read += 1;
                assert!(
                    grad[rows].iter().any(|&x| x != 0.0),
                    "row {r} is read but has no gradient"
                );
            }
        }
        assert!(zeroed > 0 && read > 0, "{zeroed} rows zeroed, {read} read");
    }
}
