//! Matrix multiply for the forward pass.
//!
//! [`Backend::Fast`] is `matrixmultiply`'s sgemm: packed, cache-blocked, with
//! AVX2/FMA kernels chosen at run time natively (its `std` feature); in wasm,
//! our own simd128 kernel (`simd128.rs`, which says why) for every shape.
//! FMA and blocking make its last bits target-dependent, which the forward
//! path allows (losses only feed ranks).
//!
//! [`PackedB`] and [`sgemm_packed`] let a caller that multiplies many
//! matrices by the same weights (the forward pass: every time step of a
//! block) prepare the weights once: the wasm kernel and, natively on a CPU
//! with AVX2 and FMA, our own kernel (`avx2.rs`, which says why) pack B into
//! panels once instead of on every call.
//!
//! [`Backend::Reference`] is a plain loop with one fixed summation order and
//! no FMA, so it gives bit-identical results on every target. Tests check the
//! fast kernels against it, and the cross-platform golden uses it to make
//! even the losses identical.

#[cfg(all(feature = "std", target_arch = "x86_64"))]
mod avx2;
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
        Backend::Fast => sgemm_packed(m, a, lda, &PackedB::new(backend, k, n, b, ldb), c, ldc, beta),
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
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

/// A right-hand matrix `B[k, n]` prepared for many [`sgemm_packed`] calls:
/// the packed panels of the wasm kernel or, natively on a CPU with AVX2 and
/// FMA, of `avx2.rs`'s kernel (built once here instead of in every call);
/// elsewhere just the borrowed matrix for `matrixmultiply`, which packs per
/// call.
pub struct PackedB<'a> {
    backend: Backend,
    k: usize,
    n: usize,
    b: &'a [f32],
    ldb: usize,
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    packed: alloc::vec::Vec<f32>,
    /// The AVX2 kernel's panels from `packed[start..]` (empty when the CPU
    /// lacks AVX2 or FMA, or for the reference backend).
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    packed: alloc::vec::Vec<f32>,
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    start: usize,
}

impl<'a> PackedB<'a> {
    /// Prepares row-major `b` (row stride `ldb`) for `backend`.
    ///
    /// # Panics
    /// If `b` is too short for the shape (a caller bug, never input).
    pub fn new(backend: Backend, k: usize, n: usize, b: &'a [f32], ldb: usize) -> Self {
        assert!(k == 0 || n == 0 || (b.len() >= (k - 1) * ldb + n && ldb >= n));
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        let packed = {
            let mut out = alloc::vec::Vec::new();
            if backend == Backend::Fast {
                simd128::pack(k, n, b, ldb, &mut out);
            }
            out
        };
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        let (packed, start) = {
            let mut out = alloc::vec::Vec::new();
            let mut start = 0;
            if backend == Backend::Fast && k > 0 && n > 0 && has_avx2_fma() {
                start = avx2::pack(k, n, b, ldb, &mut out);
            }
            (out, start)
        };
        Self {
            backend,
            k,
            n,
            b,
            ldb,
            #[cfg(any(
                all(target_arch = "wasm32", target_feature = "simd128"),
                all(feature = "std", target_arch = "x86_64")
            ))]
            packed,
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            start,
        }
    }
}

/// [`sgemm`] with a prepared right-hand side: `C[m, n] = beta * C + A[m, k]
/// * B` for the `k x n` matrix `b` holds, with `b`'s backend.
///
/// # Panics
/// If a slice is too short for the given shape (a caller bug, never input).
pub fn sgemm_packed(m: usize, a: &[f32], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize, beta: f32) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if b.backend == Backend::Fast {
        let (k, n) = (b.k, b.n);
        if m == 0 || n == 0 {
            return;
        }
        assert!(a.len() >= (m - 1) * lda + k && lda >= k);
        assert!(c.len() >= (m - 1) * ldc + n && ldc >= n);
        // SAFETY: the asserts above and in `PackedB::new` keep every access
        // inside the slices; `packed` was built by `pack` for this k and n.
        unsafe { simd128::sgemm_packed(m, k, n, a, lda, &b.packed, c, ldc, beta) };
        return;
    }
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if !b.packed.is_empty() {
        let (k, n) = (b.k, b.n);
        if m == 0 {
            return;
        }
        assert!(a.len() >= (m - 1) * lda + k && lda >= k);
        assert!(c.len() >= (m - 1) * ldc + n && ldc >= n);
        // SAFETY: `packed` is only filled when the CPU has AVX2 and FMA; the
        // asserts above and in `PackedB::new` keep every access inside the
        // slices; `packed[start..]` was built by `avx2::pack` for this k and n.
        unsafe { avx2::sgemm_packed(m, k, n, a, lda, &b.packed[b.start..], c, ldc, beta) };
        return;
    }
    sgemm(b.backend, m, b.k, b.n, a, lda, b.b, b.ldb, c, ldc, beta);
}

/// Whether this CPU runs the AVX2 + FMA kernel (detected once by `std`).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{derive, fill_normal};

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
