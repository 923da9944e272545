//! Elementwise functions of the forward pass.
//!
//! The forward path may trade the last bits for speed (losses only feed
//! ranks), so the fast backend uses a rational tanh that vectorizes, while
//! the reference backend uses `libm`, which is the same on every target.

/// Largest |x| the rational tanh is evaluated at; beyond it tanh(x) rounds to ±1.
pub(crate) const TANH_CLAMP: f32 = 7.998_811_7;

/// tanh as Eigen's rational minimax approximation (13/6), |error| < 1e-6.
/// Only multiplies, adds and one divide, so the compiler vectorizes loops of it.
#[inline(always)]
pub fn tanh_fast(x: f32) -> f32 {
    let x = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let x2 = x * x;
    let mut p = x2 * -2.760_768_5e-16 + 2.000_188e-13;
    p = x2 * p + -8.604_672e-11;
    p = x2 * p + 5.122_297e-8;
    p = x2 * p + 1.485_722_4e-5;
    p = x2 * p + 6.372_619_3e-4;
    p = x2 * p + 4.893_524_6e-3;
    p *= x;
    let mut q = x2 * 1.198_258_4e-6 + 1.185_347_1e-4;
    q = x2 * q + 2.268_434_6e-3;
    q = x2 * q + 4.893_525e-3;
    p / q
}

/// Applies tanh in place with the backend's flavour.
#[inline]
pub fn tanh_slice(fast: bool, xs: &mut [f32]) {
    if fast {
        for x in xs {
            *x = tanh_fast(*x);
        }
    } else {
        for x in xs {
            *x = libm::tanhf(*x);
        }
    }
}

/// `dst = tanh(src)` in one pass (no copy first), with the backend's flavour.
#[inline]
pub fn tanh_into(fast: bool, src: &[f32], dst: &mut [f32]) {
    if fast {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = tanh_fast(x);
        }
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = libm::tanhf(x);
        }
    }
}

/// `log(sum(exp(row))) - row[target]`: the cross-entropy of one prediction,
/// computed around the row maximum so large logits cannot overflow.
#[inline]
pub fn nll(row: &[f32], target: usize) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&z| libm::expf(z - max)).sum();
    max + libm::logf(sum) - row[target]
}

/// e^x for x <= 0 (inputs below -87 give e^-87), relative error < 2e-7:
/// Cody-Waite range reduction and the Cephes polynomial, built only from
/// multiplies, adds and integer bit operations, so a loop of it vectorizes
/// (`libm::expf` is a call per element). Forward path only.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let t = x * core::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4 * r + 1.398_2e-3;
    p = p * r + 8.333_33e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    p * f32::from_bits(((k + 127) << 23) as u32)
}

/// [`nll`] for the fast backend: the maximum and the sum of exponentials in
/// eight independent lanes with [`exp_fast`], so both loops vectorize.
#[inline(always)]
pub fn nll_fast(row: &[f32], target: usize) -> f32 {
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    let mut m = [f32::NEG_INFINITY; 8];
    for c in chunks.clone() {
        for k in 0..8 {
            // A compare and select, not `f32::max`: that is a call to
            // `fmaxf` per element in no_std wasm.
            if c[k] > m[k] {
                m[k] = c[k];
            }
        }
    }
    let max = tail.iter().chain(&m).copied().fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [0.0f32; 8];
    for c in chunks {
        for k in 0..8 {
            acc[k] += exp_fast(c[k] - max);
        }
    }
    let sum = acc.iter().sum::<f32>() + tail.iter().map(|&z| exp_fast(z - max)).sum::<f32>();
    max + libm::logf(sum) - row[target]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_tanh_is_close_to_libm() {
        let mut worst = 0.0f32;
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.001;
            worst = worst.max((tanh_fast(x) - libm::tanhf(x)).abs());
        }
        assert!(worst < 2e-6, "worst error {worst}");
        assert_eq!(tanh_fast(100.0), tanh_fast(TANH_CLAMP));
        assert!(tanh_fast(f32::INFINITY) <= 1.0);
    }

    #[test]
    fn fast_exp_and_nll_are_close_to_libm() {
        let mut worst = 0.0f32;
        for i in 0..=86_900 {
            let x = -(i as f32) * 0.001;
            let want = libm::expf(x);
            worst = worst.max((exp_fast(x) - want).abs() / want);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_fast(-1000.0), exp_fast(-87.0));
        let row: alloc::vec::Vec<f32> = (0..65).map(|i| ((i * 37) % 11) as f32 * 0.7 - 3.0).collect();
        for target in [0, 17, 64] {
            let (f, r) = (nll_fast(&row, target), nll(&row, target));
            assert!((f - r).abs() < 1e-5 * (1.0 + r.abs()), "{f} vs {r}");
        }
    }

    #[test]
    fn nll_is_stable_and_correct() {
        let row = [1.0f32, 2.0, 3.0];
        let lse = libm::logf(libm::expf(1.0) + libm::expf(2.0) + libm::expf(3.0));
        assert!((nll(&row, 0) - (lse - 1.0)).abs() < 1e-6);
        let big = [1000.0f32, 0.0];
        assert!(nll(&big, 0).abs() < 1e-6);
    }
}
