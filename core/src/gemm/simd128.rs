//! The wasm simd128 GEMM of [`Backend::Fast`](super::Backend::Fast) for the
//! RNN's shapes: `C[m, n] (+)= A[m, k] B[k, n]` with `n` a multiple of 8
//! (the recurrent and fused layers: n = H), row-major.
//!
//! Why not `matrixmultiply`'s wasm kernel: its 8 x 8 tile keeps 16 vector
//! accumulators, which is every SIMD register V8 has on x86-64 before the
//! operands, so it spills. This 4 x 8 tile keeps 8 accumulators, two B
//! vectors and one broadcast A value in registers. Without FMA in plain
//! simd128 a multiply and an add per lane is the floor, so the kernel is
//! arithmetic-bound once its operands stay in registers and the L1 cache:
//! B is packed once per call into panels of 8 columns (`k x 8` floats,
//! 16 KiB for k = 512), and each panel is swept down all rows of A before
//! the next, so the panel stays in L1 while A streams from L2 (the forward
//! pass calls this with L2-sized row blocks).

use alloc::vec;
use core::arch::wasm32::*;

/// Columns per panel and tile.
const NR: usize = 8;
/// Rows per tile.
const MR: usize = 4;

/// Whether [`sgemm`] handles this shape (`n` a multiple of [`NR`]).
pub(super) fn supports(n: usize) -> bool {
    n % NR == 0
}

/// `C = beta * C + A B` for row-major matrices with row strides `lda`,
/// `ldb`, `ldc`; `beta` is 0 or 1, and `n` a multiple of [`NR`].
///
/// # Safety
/// The matrices must lie inside the slices (the caller checks this with
/// the same asserts as the portable path).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm(
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
    debug_assert!(supports(n));
    let mut packed = vec![0.0f32; k * n];
    for (p, panel) in packed.chunks_exact_mut(k * NR).enumerate() {
        for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
            let src = kk * ldb + p * NR;
            dst.copy_from_slice(&b[src..src + NR]);
        }
    }
    let (a, c) = (a.as_ptr(), c.as_mut_ptr());
    for (p, panel) in packed.chunks_exact(k * NR).enumerate() {
        let bp = panel.as_ptr();
        let mut i = 0;
        // SAFETY (both loops): rows i..i + MR (or i) of A and C and columns
        // p*NR..(p+1)*NR of C are inside the slices, per the caller's checks.
        while i + MR <= m {
            unsafe { tile::<MR>(k, a.add(i * lda), lda, bp, c.add(i * ldc + p * NR), ldc, beta) };
            i += MR;
        }
        while i < m {
            unsafe { tile::<1>(k, a.add(i * lda), lda, bp, c.add(i * ldc + p * NR), ldc, beta) };
            i += 1;
        }
    }
}

/// One `R x 8` tile of C over the whole depth `k`: two accumulators per row.
#[inline(always)]
unsafe fn tile<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    beta: f32,
) {
    let zero = f32x4_splat(0.0);
    let mut lo = [zero; R];
    let mut hi = [zero; R];
    for kk in 0..k {
        // SAFETY: the panel holds k rows of NR floats; row r of A holds k.
        unsafe {
            let b0 = v128_load(b.add(kk * NR) as *const v128);
            let b1 = v128_load(b.add(kk * NR + 4) as *const v128);
            for r in 0..R {
                let x = v128_load32_splat(a.add(r * lda + kk) as *const u32);
                lo[r] = f32x4_add(lo[r], f32x4_mul(x, b0));
                hi[r] = f32x4_add(hi[r], f32x4_mul(x, b1));
            }
        }
    }
    for r in 0..R {
        // SAFETY: row r of the tile, 8 floats, is inside C.
        unsafe {
            let p0 = c.add(r * ldc) as *mut v128;
            let p1 = c.add(r * ldc + 4) as *mut v128;
            if beta == 0.0 {
                v128_store(p0, lo[r]);
                v128_store(p1, hi[r]);
            } else {
                v128_store(p0, f32x4_add(v128_load(p0), lo[r]));
                v128_store(p1, f32x4_add(v128_load(p1), hi[r]));
            }
        }
    }
}
