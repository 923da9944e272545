//! Matrix multiply for the forward pass.
//!
//! [`Backend::Fast`] is `matrixmultiply`'s sgemm: packed, cache-blocked, with
//! AVX2/FMA kernels chosen at run time natively (its `std` feature); in wasm,
//! our own simd128 kernel (`simd128.rs`, which says why) for the RNN's
//! shapes and `matrixmultiply`'s for the rest (the head's n = V). FMA and
//! blocking make its last bits target-dependent, which the forward path
//! allows (losses only feed ranks).
//!
//! [`Backend::Reference`] is a plain loop with one fixed summation order and
//! no FMA, so it gives bit-identical results on every target. Tests check the
//! fast kernels against it, and the cross-platform golden uses it to make
//! even the losses identical.

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128;

/// Which kernel the forward pass uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The fastest kernel on this target.
    #[default]
    Fast,
    /// The portable, bit-reproducible scalar kernel.
    Reference,
}

/// Row-major `C[m, n] = beta * C + A[m, k] * B[k, n]` with row strides
/// `lda`, `ldb`, `ldc`. `beta` is 0 (overwrite) or 1 (accumulate).
///
/// # Panics
/// If a slice is too short for the given shape (a caller bug, never input).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    backend: Backend,
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k && lda >= k);
    assert!(k == 0 || (b.len() >= (k - 1) * ldb + n && ldb >= n));
    assert!(c.len() >= (m - 1) * ldc + n && ldc >= n);
    match backend {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        Backend::Fast if simd128::supports(n) => {
            // SAFETY: the asserts above keep every access inside the slices.
            unsafe { simd128::sgemm(m, k, n, a, lda, b, ldb, c, ldc, beta) }
        }
        Backend::Fast => {
            // SAFETY: the asserts above keep every access of an m x k, k x n
            // and m x n row-major matrix with these strides inside the slices;
            // `c` is borrowed mutably, so it cannot alias `a` or `b`.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    lda as isize,
                    1,
                    b.as_ptr(),
                    ldb as isize,
                    1,
                    beta,
                    c.as_mut_ptr(),
                    ldc as isize,
                    1,
                )
            }
        }
        Backend::Reference => {
            for i in 0..m {
                let ci = &mut c[i * ldc..i * ldc + n];
                if beta == 0.0 {
                    ci.fill(0.0);
                }
                for p in 0..k {
                    let aip = a[i * lda + p];
                    let bp = &b[p * ldb..p * ldb + n];
                    for (cj, &bj) in ci.iter_mut().zip(bp) {
                        *cj += aip * bj;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::{derive, fill_normal};

    #[test]
    fn fast_matches_reference() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (33, 65, 17),
            (64, 256, 65),
            (7, 512, 256),
            (13, 24, 24),
        ] {
            let mut a = alloc::vec![0.0; m * k];
            let mut b = alloc::vec![0.0; k * n];
            let mut c0 = alloc::vec![0.0; m * n];
            fill_normal(derive(&[1, m as u64]), &mut a);
            fill_normal(derive(&[2, n as u64]), &mut b);
            fill_normal(derive(&[3, k as u64]), &mut c0);
            for beta in [0.0, 1.0] {
                let mut c1 = c0.clone();
                let mut c2 = c0.clone();
                sgemm(Backend::Fast, m, k, n, &a, k, &b, n, &mut c1, n, beta);
                sgemm(Backend::Reference, m, k, n, &a, k, &b, n, &mut c2, n, beta);
                for (x, y) in c1.iter().zip(&c2) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }
}
