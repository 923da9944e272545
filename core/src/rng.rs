//! Counter-based random streams: every random number a replica draws.
//!
//! A stream is a pure function of a 64-bit key and an element index, so a
//! value can be regenerated anywhere, in any order, from the tuple its key
//! was derived from (for member noise, run seed, step, pair and tensor; see
//! [`crate::perturb`]). Only integer operations produce the bits; the
//! Gaussian comes from a quantile table with linear interpolation (one
//! int-to-float conversion, one subtraction, one multiply and one add, all
//! IEEE-exact), so x86_64 and wasm32 produce identical f32 values. These
//! bits are part of the determinism contract (ARCHITECTURE.md, Determinism
//! contract): changing any function here changes every run.
//!
//! This module is a leaf: it knows nothing of configs or models, so every
//! other module may use it.
//!
//! Why not a crate: `rand_distr`'s normal sampler uses the platform `ln`/`exp`
//! through ziggurat rejection, which the determinism contract forbids on the
//! update path, and no maintained crate offers a table-based counter normal.
//! The mixer is SplitMix64's finalizer, a well-studied public-domain function.

mod table;

use rand_core::{Infallible, TryRng, utils};

// The core's key domains: the first part of every derived key, so streams
// drawn for different purposes never coincide.

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

/// Infallible, so it is a `rand_core::Rng` too (the blanket impl).
impl TryRng for Stream {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.try_next_u64().map(|w| w as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let w = word(self.key, self.counter);
        self.counter += 1;
        Ok(w)
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        utils::fill_bytes_via_next_word(dst, || self.try_next_u64())
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
        assert_ne!(derive(&[1, 2, 3, 4]), derive(&[1, 2, 3, 5]));
        assert_ne!(derive(&[1, 2, 3, 4]), derive(&[1, 3, 2, 4]));
    }
}
