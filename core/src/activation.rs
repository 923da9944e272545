//! Elementwise functions of the forward pass.
//!
//! The forward path may trade the last bits for speed (losses only feed
//! ranks), so the fast backend uses a rational tanh that vectorizes, while
//! the reference backend uses `libm`, which is the same on every target.

/// Largest |x| the rational tanh is evaluated at; beyond it tanh(x) rounds to ±1.
const CLAMP: f32 = 7.998_811_7;

/// tanh as Eigen's rational minimax approximation (13/6), |error| < 1e-6.
/// Only multiplies, adds and one divide, so the compiler vectorizes loops of it.
#[inline(always)]
pub fn tanh_fast(x: f32) -> f32 {
    let x = x.clamp(-CLAMP, CLAMP);
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
        assert_eq!(tanh_fast(100.0), tanh_fast(CLAMP));
        assert!(tanh_fast(f32::INFINITY) <= 1.0);
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
