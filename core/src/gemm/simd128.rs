//! The wasm simd128 GEMM of [`Backend::Fast`](super::Backend::Fast):
//! `C[m, n] (+)= A[m, k] B[k, n]`, row-major, any shape.
//!
//! Why not `matrixmultiply`'s wasm kernel: its 8 x 8 tile keeps 16 vector
//! accumulators, which is every SIMD register V8 has on x86-64 before the
//! operands, so it spills. This 4 x 8 tile keeps 8 accumulators, two B
//! vectors and the broadcast A values in registers. Without FMA in plain
//! simd128 a multiply and an add per lane is the floor, so the kernel is
//! bound by arithmetic and instruction issue once its operands stay in
//! registers and the L1 cache: B is packed into panels of 8 columns (`k x 8`
//! floats, 16 KiB for k = 512; the last panel zero-padded, so the head's
//! n = V = 65 runs here too), and each panel is swept down all rows of A
//! before the next, so the panel stays in L1 while A streams from L2 (the
//! forward pass calls this with L2-sized row blocks, and packs each weight
//! matrix once per block, not once per call: [`super::PackedB`]).
//!
//! Why not a bigger tile or more unrolling: V8 compiles this to SSE/AVX with
//! 15 usable xmm registers and folds no constant into an address, so every
//! distinct address costs an instruction. A 5 x 8 or 6 x 8 tile spills an
//! accumulator to the stack and turns the loop into a store-to-load chain;
//! unrolling k lets LLVM's wasm output group the products per accumulator,
//! which keeps all the unrolled B vectors live and spills too; splatting the
//! packed A values out of one vector load instead of four broadcast loads
//! puts four shuffles per step on the FP ports the arithmetic needs.
//!
//! A is packed too, per call, for the full 4-row tiles ([`pack_a`]): each
//! tile's four rows interleaved, so the four broadcasts of a step sit at
//! constant offsets from one pointer ([`tile`]). Reading the rows in place, V8 spends
//! an address computation with the row stride on each of them every step
//! (`lea` of base + stride * row); packed, it is a plain constant add (wasm-opt
//! folds constants into `v128.load`'s offset but not into
//! `v128.load32_splat`'s). Packing costs one pass over A per call, which
//! every panel then reuses.

use alloc::vec::Vec;
use core::arch::wasm32::*;

/// Columns per panel and tile.
const NR: usize = 8;
/// Rows per tile.
const MR: usize = 4;

/// Floats [`pack`] writes for a `k x n` matrix.
pub(super) fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * k * NR
}

/// Packs row-major `B[k, n]` (row stride `ldb`) into `out` as panels of
/// [`NR`] columns, each `k` rows of `NR` floats, the last zero-padded.
pub(super) fn pack(k: usize, n: usize, b: &[f32], ldb: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(packed_len(k, n), 0.0);
    if k == 0 {
        return;
    }
    for (p, panel) in out.chunks_exact_mut(k * NR).enumerate() {
        let (j0, w) = (p * NR, NR.min(n - p * NR));
        for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
            dst[..w].copy_from_slice(&b[kk * ldb + j0..kk * ldb + j0 + w]);
        }
    }
}

/// `C = beta * C + A B` for row-major `A` and `C` (row strides `lda`,
/// `ldc`) and `B` packed by [`pack`]; `beta` is 0 or 1.
///
/// # Safety
/// The matrices must lie inside the slices (the caller checks this with
/// the same asserts as the portable path) and `packed` must hold
/// [`packed_len`]`(k, n)` floats.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm_packed(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    packed: &[f32],
    c: &mut [f32],
    ldc: usize,
    beta: f32,
) {
    debug_assert!(packed.len() >= packed_len(k, n));
    let (a, c) = (a.as_ptr(), c.as_mut_ptr());
    let tiles = m / MR;
    let mut ap: Vec<f32> = Vec::with_capacity(tiles * k * MR);
    // SAFETY: rows 0..tiles * MR of A are inside the slice (the caller's
    // checks) and `ap` has room for `tiles` packed tiles of k * MR floats,
    // all written before the length is set.
    unsafe {
        for t in 0..tiles {
            pack_a(k, a.add(t * MR * lda), lda, ap.as_mut_ptr().add(t * k * MR));
        }
        ap.set_len(tiles * k * MR);
    }
    for p in 0..n.div_ceil(NR) {
        // SAFETY: panel p lies inside `packed`.
        let bp = unsafe { packed.as_ptr().add(p * k * NR) };
        let w = NR.min(n - p * NR);
        // SAFETY (both loops): packed tile t is inside `ap`; rows t * MR..
        // (t + 1) * MR (or i) of A and C and columns p*NR..p*NR + w of C are
        // inside the slices, per the caller's checks.
        for t in 0..tiles {
            unsafe {
                let acc = tile::<MR, true>(k, ap.as_ptr().add(t * k * MR), MR, bp);
                store(&acc, c.add(t * MR * ldc + p * NR), ldc, w, beta);
            }
        }
        for i in tiles * MR..m {
            unsafe {
                let acc = tile::<1, false>(k, a.add(i * lda), lda, bp);
                store(&acc, c.add(i * ldc + p * NR), ldc, w, beta);
            }
        }
    }
}

/// Copies rows 0..[`MR`] of A (row stride `lda`, columns 0..k) to `out`
/// interleaved, column `kk`'s [`MR`] values at `out[kk * MR..]`: a 4 x 4
/// transpose per four columns.
///
/// # Safety
/// Rows 0..MR, columns 0..k of A and `k * MR` floats from `out` must lie
/// inside their allocations.
#[inline(always)]
unsafe fn pack_a(k: usize, a: *const f32, lda: usize, out: *mut f32) {
    const _: () = assert!(MR == 4, "pack_a transposes 4 x 4 blocks");
    let mut kk = 0;
    // SAFETY: the caller's contract covers every access below.
    unsafe {
        while kk + 4 <= k {
            let r0 = v128_load(a.add(kk) as *const v128);
            let r1 = v128_load(a.add(lda + kk) as *const v128);
            let r2 = v128_load(a.add(2 * lda + kk) as *const v128);
            let r3 = v128_load(a.add(3 * lda + kk) as *const v128);
            // (r0[0] r1[0] r0[1] r1[1]), (r0[2] r1[2] r0[3] r1[3]), same for r2, r3.
            let t0 = i32x4_shuffle::<0, 4, 1, 5>(r0, r1);
            let t1 = i32x4_shuffle::<2, 6, 3, 7>(r0, r1);
            let t2 = i32x4_shuffle::<0, 4, 1, 5>(r2, r3);
            let t3 = i32x4_shuffle::<2, 6, 3, 7>(r2, r3);
            let o = out.add(kk * MR);
            v128_store(o as *mut v128, i64x2_shuffle::<0, 2>(t0, t2));
            v128_store(o.add(4) as *mut v128, i64x2_shuffle::<1, 3>(t0, t2));
            v128_store(o.add(8) as *mut v128, i64x2_shuffle::<0, 2>(t1, t3));
            v128_store(o.add(12) as *mut v128, i64x2_shuffle::<1, 3>(t1, t3));
            kk += 4;
        }
        for kk in kk..k {
            for r in 0..MR {
                *out.add(kk * MR + r) = *a.add(r * lda + kk);
            }
        }
    }
}

/// One `R x 8` tile of `A B` over the whole depth `k`: two accumulators
/// (columns 0..4 and 4..8) per row. Row `r`, column `kk` of A is
/// `a[r * lda + kk]`, or, `PACKED` (by [`pack_a`], with `lda` = `R`),
/// `a[kk * R + r]`: the step's broadcasts are then constant offsets from one
/// pointer.
///
/// Not inlined on purpose: V8 allocates registers per function, and inside
/// the caller's loops it keeps the loop counter on the stack or spills
/// accumulators; alone, the loop keeps everything in registers (the call is
/// once per `k`-long loop).
#[inline(never)]
unsafe fn tile<const R: usize, const PACKED: bool>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
) -> [[v128; 2]; R] {
    let zero = f32x4_splat(0.0);
    let mut acc = [[zero; 2]; R];
    for kk in 0..k {
        // SAFETY: the panel holds k rows of NR floats; row r of A holds k.
        unsafe {
            let b0 = v128_load(b.add(kk * NR) as *const v128);
            let b1 = v128_load(b.add(kk * NR + 4) as *const v128);
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = if PACKED { kk * R + r } else { r * lda + kk };
                let x = v128_load32_splat(a.add(at) as *const u32);
                acc[0] = f32x4_add(acc[0], f32x4_mul(x, b0));
                acc[1] = f32x4_add(acc[1], f32x4_mul(x, b1));
            }
        }
    }
    acc
}

/// Writes (`beta` = 0) or adds (`beta` = 1) a tile's rows to C, only their
/// first `w` columns (the last panel of a width that is not a multiple of 8).
#[inline(always)]
unsafe fn store<const R: usize>(acc: &[[v128; 2]; R], c: *mut f32, ldc: usize, w: usize, beta: f32) {
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: columns 0..w of row r of the tile are inside C.
        unsafe {
            let cr = c.add(r * ldc);
            if w == NR {
                let (p0, p1) = (cr as *mut v128, cr.add(4) as *mut v128);
                if beta == 0.0 {
                    v128_store(p0, row[0]);
                    v128_store(p1, row[1]);
                } else {
                    v128_store(p0, f32x4_add(v128_load(p0), row[0]));
                    v128_store(p1, f32x4_add(v128_load(p1), row[1]));
                }
            } else {
                let mut tmp = [0.0f32; NR];
                v128_store(tmp.as_mut_ptr() as *mut v128, row[0]);
                v128_store(tmp.as_mut_ptr().add(4) as *mut v128, row[1]);
                for (j, &t) in tmp[..w].iter().enumerate() {
                    let cj = cr.add(j);
                    *cj = if beta == 0.0 { t } else { *cj + t };
                }
            }
        }
    }
}
