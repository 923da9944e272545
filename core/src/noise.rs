//! Counter-based random streams: the noise every replica rebuilds from seeds.
//!
//! A stream is a pure function of a 64-bit key and an element index, so a
//! member's perturbation can be regenerated anywhere, in any order, from
//! (run seed, step, pair, tensor) alone. Only integer operations produce the
//! bits; the Gaussian comes from a quantile table with linear interpolation
//! (one int-to-float conversion, one subtraction, one multiply and one add,
//! all IEEE-exact), so x86_64 and wasm32 produce identical f32 values.
//!
//! Why not a crate: `rand_distr`'s normal sampler uses the platform `ln`/`exp`
//! through ziggurat rejection, which the determinism contract forbids on the
//! update path, and no maintained crate offers a table-based counter normal.
//! The mixer is SplitMix64's finalizer, a well-studied public-domain function.

mod table;

use rand_core::{RngCore, impls};

use crate::config::RunConfig;
use crate::model::Layout;

/// Key domain for initial weights.
pub const DOMAIN_INIT: u64 = 1;
/// Key domain for member perturbations.
pub const DOMAIN_NOISE: u64 = 2;
/// Key domain for minibatch selection.
pub const DOMAIN_BATCH: u64 = 3;
/// Key domain for text sampling.
pub const DOMAIN_SAMPLE: u64 = 4;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective, avalanche-complete 64-bit mix.
#[inline(always)]
pub fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Folds a tuple of integers into one stream key; distinct tuples give
/// independent-looking streams.
pub fn derive(parts: &[u64]) -> u64 {
    let mut h = 0x5EED_0000_0000_0001u64;
    for &p in parts {
        h = mix64(h ^ mix64(p.wrapping_add(GOLDEN)));
    }
    h
}

/// The stream key of one antithetic pair's noise on one tensor.
pub fn pair_key(seed: u64, step: u64, pair: u64, tensor: usize) -> u64 {
    derive(&[DOMAIN_NOISE, seed, step, pair, tensor as u64])
}

/// Word `j` of stream `key`.
#[inline(always)]
fn word(key: u64, j: u64) -> u64 {
    mix64(key.wrapping_add(j.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Maps 32 random bits to a standard normal through the quantile table:
/// the top 12 bits pick an equal-probability bucket, the low 20 bits
/// interpolate inside it. The result is bounded by about ±4.17.
#[inline(always)]
pub fn normal(u: u32) -> f32 {
    let q = &table::QUANTILES;
    let i = (u >> 20) as usize;
    let f = (u & 0xF_FFFF) as f32 * (1.0 / 1_048_576.0);
    let lo = q[i];
    let hi = q[i + 1];
    lo + f * (hi - lo)
}

/// Fills `out` with elements `0..out.len()` of the Gaussian stream `key`.
pub fn fill_normal(key: u64, out: &mut [f32]) {
    let mut pairs = out.chunks_exact_mut(2);
    let mut j = 0u64;
    for p in &mut pairs {
        let w = word(key, j);
        p[0] = normal(w as u32);
        p[1] = normal((w >> 32) as u32);
        j += 1;
    }
    if let [last] = pairs.into_remainder() {
        *last = normal(word(key, j) as u32);
    }
}

/// Fills `out` with uniforms in [0, 1) (24-bit resolution) from stream `key`.
pub fn fill_uniform(key: u64, out: &mut [f32]) {
    for (j, x) in out.iter_mut().enumerate() {
        *x = (word(key, j as u64) >> 40) as f32 * (1.0 / 16_777_216.0);
    }
}

/// Number of noise values one pair draws for a tensor: `(rows + cols) * rank`
/// for a low-rank matrix (A then B), `rows * cols` otherwise.
pub fn tensor_noise_len(rows: usize, cols: usize, is_matrix: bool, rank: Option<usize>) -> usize {
    match rank {
        Some(r) if is_matrix => (rows + cols) * r,
        _ => rows * cols,
    }
}

/// Number of noise values one pair draws for tensor `id` under `cfg`:
/// [`tensor_noise_len`] at the config's rank, except that a tensor the
/// config does not perturb ([`RunConfig::perturbs`]) takes none under
/// low-rank noise (a per-input head would otherwise make every member carry
/// thousands of zeros) and keeps its zero-filled place under full-rank
/// noise, whose buffer is parameter-shaped.
pub fn noise_len(layout: &Layout, cfg: &RunConfig, id: usize) -> usize {
    let (t, rank) = (&layout.tensors[id], cfg.es.noise.rank());
    if rank.is_some() && !cfg.perturbs(layout, id) {
        return 0;
    }
    tensor_noise_len(t.rows, t.cols, t.is_matrix, rank)
}

/// One antithetic pair's noise for every tensor, concatenated in layout order.
///
/// Low-rank (`rank = Some(r)`): a matrix `[m, n]` contributes `A` (`[m, r]`,
/// row-major) then `B` (`[n, r]`); a vector contributes its Gaussian values.
/// Full (`rank = None`): every tensor contributes `rows * cols` values, so the
/// buffer is exactly a parameter-shaped `eps`. The rank is the config's.
///
/// A tensor the config does not perturb ([`RunConfig::perturbs`]) is not
/// drawn ([`noise_len`]); every other tensor's noise is the same whether or
/// not it is (each tensor has its own stream).
pub fn pair_noise(layout: &Layout, cfg: &RunConfig, step: u64, pair: u64, out: &mut alloc::vec::Vec<f32>) {
    out.clear();
    for id in 0..layout.tensors.len() {
        let start = out.len();
        out.resize(start + noise_len(layout, cfg, id), 0.0);
        if cfg.perturbs(layout, id) {
            fill_normal(pair_key(cfg.seed, step, pair, id), &mut out[start..]);
        }
    }
}

/// Offsets of each tensor's noise inside a [`pair_noise`] buffer, plus the total.
pub fn pair_noise_offsets(layout: &Layout, cfg: &RunConfig) -> (alloc::vec::Vec<usize>, usize) {
    let mut offs = alloc::vec::Vec::with_capacity(layout.tensors.len());
    let mut total = 0;
    for id in 0..layout.tensors.len() {
        offs.push(total);
        total += noise_len(layout, cfg, id);
    }
    (offs, total)
}

/// A seekable random stream for non-noise uses (text sampling, shuffles),
/// exposed through rand's traits so any `rand`-style code can use it.
#[derive(Clone, Debug)]
pub struct Stream {
    key: u64,
    counter: u64,
}

impl Stream {
    /// A stream starting at element 0 of `key`.
    pub fn new(key: u64) -> Self {
        Self { key, counter: 0 }
    }
}

impl RngCore for Stream {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }

    fn next_u64(&mut self) -> u64 {
        let w = word(self.key, self.counter);
        self.counter += 1;
        w
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        impls::fill_bytes_via_next(self, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_table_matches_the_normal_cdf() {
        let q = &table::QUANTILES;
        for k in 1..table::BUCKETS {
            // Phi(x) = erfc(-x / sqrt 2) / 2 must equal k / 4096.
            let x = q[k] as f64;
            let p = 0.5 * libm::erfc(-x / core::f64::consts::SQRT_2);
            let want = k as f64 / table::BUCKETS as f64;
            // f32 rounding of x moves p by at most density * 2^-24 * |x|.
            assert!(
                (p - want).abs() < 1e-7 + 1e-7 * x.abs(),
                "k={k} p={p} want={want}"
            );
            assert_eq!(q[k], -q[table::BUCKETS - k]);
            assert!(q[k] > q[k - 1]);
        }
    }

    #[test]
    fn normal_moments() {
        let mut v = alloc::vec![0.0f32; 1 << 20];
        fill_normal(derive(&[9]), &mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let kurt = v.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n / (var * var);
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        assert!((kurt - 3.0).abs() < 0.05, "kurtosis {kurt}");
    }

    #[test]
    fn streams_are_pure_functions_of_key_and_index() {
        let mut a = alloc::vec![0.0f32; 101];
        let mut b = alloc::vec![0.0f32; 40];
        fill_normal(7, &mut a);
        fill_normal(7, &mut b);
        assert_eq!(&a[..40], &b[..]);
        fill_normal(8, &mut b);
        assert_ne!(&a[..40], &b[..]);
        assert_ne!(pair_key(1, 2, 3, 4), pair_key(1, 2, 3, 5));
        assert_ne!(pair_key(1, 2, 3, 4), pair_key(1, 3, 2, 4));
    }
}
