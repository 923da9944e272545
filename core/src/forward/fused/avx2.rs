//! The fused pass's per-row epilogue in AVX2 + FMA intrinsics (native
//! x86_64 only; wasm and other CPUs use `epilogue_portable`).
//!
//! Why intrinsics rather than the portable loops compiled with AVX2: Rust
//! never contracts `a * b + c` into an FMA, so the portable tanh is a chain
//! of separate multiplies and adds, and the rank-1 corrections' dots took
//! passes of their own over the new state. Here tanh's polynomials are
//! FMAs, its divide is a reciprocal estimate refined by one Newton step,
//! and the dots are two more FMAs per vector while the new state is still
//! in registers. The result differs from the portable one in the last bits
//! only (the forward path may, see `gemm`).

use core::arch::x86_64::*;

use super::{Terms, epilogue_portable};
use crate::activation::TANH_CLAMP;

/// tanh of eight lanes: the same rational approximation as
/// [`tanh_fast`](crate::activation::tanh_fast), with FMAs in Estrin's order, and `p / q` as
/// `y = p r`, `y + r (p - q y)` for the reciprocal estimate `r` of `q`
/// (relative error about 2^-22 after the step; `q >= 4.9e-3`, never 0).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn tanh8(x: __m256) -> __m256 {
    let c = _mm256_set1_ps;
    let x = _mm256_min_ps(_mm256_max_ps(x, c(-TANH_CLAMP)), c(TANH_CLAMP));
    let x2 = _mm256_mul_ps(x, x);
    let x4 = _mm256_mul_ps(x2, x2);
    let x8 = _mm256_mul_ps(x4, x4);
    let fma = |a, b, c| _mm256_fmadd_ps(a, b, c);
    // Estrin's scheme: pairs of coefficients first, then powers x^4 and x^8
    // join them, so the longest chain is four operations deep, not seven.
    // The loop then keeps fewer iterations in flight waiting on latency.
    let p01 = fma(x2, c(6.372_619_3e-4), c(4.893_524_6e-3));
    let p23 = fma(x2, c(5.122_297e-8), c(1.485_722_4e-5));
    let p45 = fma(x2, c(2.000_188e-13), c(-8.604_672e-11));
    let p03 = fma(x4, p23, p01);
    let p46 = fma(x4, c(-2.760_768_5e-16), p45);
    let p = _mm256_mul_ps(fma(x8, p46, p03), x);
    let q01 = fma(x2, c(2.268_434_6e-3), c(4.893_525e-3));
    let q23 = fma(x2, c(1.198_258_4e-6), c(1.185_347_1e-4));
    let q = fma(x4, q23, q01);
    let r = _mm256_rcp_ps(q);
    let y = _mm256_mul_ps(p, r);
    _mm256_fmadd_ps(r, _mm256_fnmadd_ps(q, y, p), y)
}

/// The sum of eight lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn load(x: &[f32]) -> __m256 {
    debug_assert!(x.len() >= 8);
    // SAFETY: every caller passes a chunk of exactly 8 floats.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

/// `epilogue` of the fused pass: `out = tanh(pre + terms)` and, for
/// [`Terms::Rank1`], the new state's dots with `d1` and `d2`. Rows whose
/// length is not a multiple of 8 take the portable loops.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn epilogue(out: &mut [f32], pre: &[f32], terms: &Terms) -> (f32, f32) {
    let n = out.len();
    if !n.is_multiple_of(8) {
        return epilogue_portable(out, pre, terms);
    }
    fn chunks(x: &[f32], n: usize) -> core::slice::ChunksExact<'_, f32> {
        x[..n].chunks_exact(8)
    }
    let ch = |x| chunks(x, n);
    let pre = ch(pre);
    let store = |o: &mut [f32], y: __m256| {
        // SAFETY: `o` is a chunk of exactly 8 floats.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), y) }
    };
    match *terms {
        Terms::Plain(t1) => {
            for (o, (p, a)) in out.chunks_exact_mut(8).zip(pre.zip(ch(t1))) {
                store(o, tanh8(_mm256_add_ps(load(p), load(a))));
            }
            (0.0, 0.0)
        }
        Terms::Sum(t1, t2) => {
            for (o, ((p, a), b)) in out.chunks_exact_mut(8).zip(pre.zip(ch(t1)).zip(ch(t2))) {
                store(o, tanh8(_mm256_add_ps(_mm256_add_ps(load(p), load(a)), load(b))));
            }
            (0.0, 0.0)
        }
        Terms::Rank1(ref r) => {
            let (s1, s2) = (_mm256_set1_ps(r.s1), _mm256_set1_ps(r.s2));
            let (mut acc1, mut acc2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let ins = pre.zip(ch(r.t1)).zip(ch(r.t2)).zip(ch(r.b1).zip(ch(r.b2)));
            for ((o, (((p, a), e), (x1, x2))), (y1, y2)) in
                out.chunks_exact_mut(8).zip(ins).zip(ch(r.d1).zip(ch(r.d2)))
            {
                let mut x = _mm256_add_ps(_mm256_add_ps(load(p), load(a)), load(e));
                x = _mm256_fmadd_ps(s1, load(x1), x);
                x = _mm256_fmadd_ps(s2, load(x2), x);
                let y = tanh8(x);
                store(o, y);
                acc1 = _mm256_fmadd_ps(y, load(y1), acc1);
                acc2 = _mm256_fmadd_ps(y, load(y2), acc2);
            }
            (hsum(acc1), hsum(acc2))
        }
    }
}
