//! The native AVX2 + FMA GEMM of [`PackedB`](super::PackedB):
//! `C[m, n] (+)= A[m, k] B[k, n]`, row-major, any shape, with `B` packed
//! once for many calls.
//!
//! Why not `matrixmultiply` for the forward pass: it packs both operands on
//! every call, and the forward pass multiplies by the same weights 64 times
//! per block (every time step). At RW-256's shapes (128 rows, k = 256 or
//! 512) packing per call is a sizeable share of the evaluation's time, and
//! each thread would stream the unpacked weights through its L2 on every
//! step on top of the packed copies. Here `B` is packed once per call of the
//! forward pass into panels of 16 columns (the last panel 8 wide when at
//! most 8 columns are left, or a single column taken as dot products, so
//! the head's n = V = 65 wastes nothing), and `A` is read
//! where it lies: each tile broadcasts its rows' values straight from the
//! caller's row-major state.
//!
//! The tile is 6 x 16 (BLIS's choice for AVX2): 12 accumulators, two B
//! vectors and one broadcast fill 15 of the 16 ymm registers, and each
//! depth step issues 12 FMAs against 8 loads. Depth is cut into blocks of
//! [`KC`] so that one panel's slice (`KC x 16` floats, 16 KiB) stays in the
//! 32 KiB L1 while every row of A sweeps past it.

use alloc::vec::Vec;
use core::arch::x86_64::*;

/// Columns per full panel and tile.
const NR: usize = 16;
/// Rows per tile.
const MR: usize = 6;
/// Depth per block.
const KC: usize = 256;
/// Floats per 64-byte cache line: panels start on a line.
const LINE: usize = 16;

/// Width of panel `p` as stored: 16, or 8 for a last panel of at most 8
/// columns, or 1 for a last panel of one column (the head's 65th), which is
/// a matrix-vector product: [`column`] takes it as one dot product per row
/// (a 6 x 8 tile would spend 6 FMAs per depth on one useful lane, about as
/// long as a whole 16-column panel).
#[inline(always)]
fn stored_width(n: usize, p: usize) -> usize {
    match n - p * NR {
        1 => 1,
        w if w <= NR / 2 => NR / 2,
        _ => NR,
    }
}

/// Packs row-major `B[k, n]` (row stride `ldb`) into `out` as panels of 16
/// columns (the last one 8 or 16 wide, zero-padded), each `k` rows of its
/// stored width; panel `p` starts at float `p * k * 16` from the returned
/// offset, which puts the panels on 64-byte boundaries.
pub(super) fn pack(k: usize, n: usize, b: &[f32], ldb: usize, out: &mut Vec<f32>) -> usize {
    out.clear();
    out.resize(n.div_ceil(NR) * k * NR + LINE, 0.0);
    let start = out.as_ptr().align_offset(LINE * 4).min(LINE - 1);
    for p in 0..n.div_ceil(NR) {
        let (j0, w, sw) = (p * NR, NR.min(n - p * NR), stored_width(n, p));
        let panel = &mut out[start + p * k * NR..][..k * sw];
        for (kk, dst) in panel.chunks_exact_mut(sw).enumerate() {
            dst[..w].copy_from_slice(&b[kk * ldb + j0..kk * ldb + j0 + w]);
        }
    }
    start
}

/// `C = beta * C + A B` for row-major `A` and `C` (row strides `lda`,
/// `ldc`) and `B` packed by [`pack`] (`packed` starts at its offset);
/// `beta` is 0 or 1.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the matrices must lie inside the slices
/// (the caller checks this with the same asserts as the portable path), and
/// `packed` must be what [`pack`] wrote for this `k` and `n`.
#[target_feature(enable = "avx2,fma")]
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
    debug_assert!(packed.len() >= n.div_ceil(NR) * k * NR);
    let (a, c) = (a.as_ptr(), c.as_mut_ptr());
    if k == 0 {
        if beta == 0.0 {
            for i in 0..m {
                // SAFETY: row i's first n columns are inside C.
                unsafe { core::ptr::write_bytes(c.add(i * ldc), 0, n) };
            }
        }
        return;
    }
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let add = beta != 0.0 || k0 > 0;
        let panels = n.div_ceil(NR);
        for p in 0..panels {
            let (w, sw) = (NR.min(n - p * NR), stored_width(n, p));
            // The slice the next sweep reads: the next panel's, or the first
            // panel's in the next depth block.
            let (next, len) = if p + 1 < panels {
                let sw = stored_width(n, p + 1);
                ((p + 1) * k * NR + k0 * sw, kc * sw)
            } else if k0 + kc < k {
                let sw = stored_width(n, 0);
                ((k0 + kc) * sw, KC.min(k - k0 - kc) * sw)
            } else {
                (0, 0)
            };
            let (next, lines) = (packed[next..].as_ptr(), len / LINE);
            // SAFETY: rows k0..k0 + kc of panel p lie inside `packed`; rows
            // i..i + R of A (columns k0..k0 + kc) and of C (columns p*NR..
            // p*NR + w) lie inside the slices, per the caller's checks.
            unsafe {
                let bp = packed.as_ptr().add(p * k * NR + k0 * sw);
                let (ap, cp) = (a.add(k0), c.add(p * NR));
                if sw == NR {
                    panel::<2>(m, kc, ap, lda, bp, cp, ldc, w, add, next, lines);
                } else if sw == 1 {
                    column(m, kc, ap, lda, bp, cp, ldc, add);
                } else {
                    panel::<1>(m, kc, ap, lda, bp, cp, ldc, w, add, next, lines);
                }
            }
        }
        k0 += kc;
    }
}

/// All rows of A against one panel slice of `V` vectors (8 floats each),
/// prefetching the `lines` cache lines at `next` (the slice the next sweep
/// reads) a few after each tile. The packed weights of the forward pass do
/// not stay in L2 (its three matrices and a block's state are more than
/// 1 MiB), so without this each sweep would start on L3 misses.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn panel<const V: usize>(
    m: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    w: usize,
    add: bool,
    next: *const f32,
    lines: usize,
) {
    let mut i = 0;
    let per = lines.div_ceil(m.div_ceil(MR).max(1));
    let mut fetched = 0;
    // Rows go in tiles of 6, except that when m is not a multiple of 6 the
    // last few tiles take 5 rows (when there are enough tiles): a 5 x 16 tile
    // still keeps 10 independent accumulators in flight, where a 1- or 2-row
    // remainder tile would leave the FMA units mostly idle (128 rows: 18
    // tiles of 6 and 4 of 5 instead of 21 of 6 and one of 2).
    let tiles = m.div_ceil(MR);
    let fives = if tiles * MR - m <= tiles {
        tiles * MR - m
    } else {
        0
    };
    let sixes = if fives > 0 { tiles - fives } else { m / MR };
    for t in 0..sixes + fives {
        // SAFETY (every call): rows i..i + R of A and C are inside, per the caller.
        unsafe {
            let (ap, cp) = (a.add(i * lda), c.add(i * ldc));
            if t < sixes {
                tile::<MR, V>(kc, ap, lda, b, cp, ldc, w, add);
            } else {
                tile::<{ MR - 1 }, V>(kc, ap, lda, b, cp, ldc, w, add);
            }
        }
        // Prefetch hints never fault; these addresses are inside `packed` anyway.
        let end = (fetched + per).min(lines);
        while fetched < end {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(next.add(fetched * LINE) as *const i8) };
            fetched += 1;
        }
        i += if t < sixes { MR } else { MR - 1 };
    }
    unsafe {
        let (a, c) = (a.add(i * lda), c.add(i * ldc));
        match m - i {
            1 => tile::<1, V>(kc, a, lda, b, c, ldc, w, add),
            2 => tile::<2, V>(kc, a, lda, b, c, ldc, w, add),
            3 => tile::<3, V>(kc, a, lda, b, c, ldc, w, add),
            4 => tile::<4, V>(kc, a, lda, b, c, ldc, w, add),
            5 => tile::<5, V>(kc, a, lda, b, c, ldc, w, add),
            _ => {}
        }
    }
}

/// `C[i, 0] (+)= A[i, ..kc] . b` for every row: one column of C as dot
/// products, four vectors of depth at a time.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn column(
    m: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let k32 = kc / 32 * 32;
    let k8 = kc / 8 * 8;
    // SAFETY: row i of A holds kc floats from `a + i * lda`, `b` holds kc
    // floats, and C's row i has column 0 (the caller's checks).
    unsafe {
        for i in 0..m {
            let ar = a.add(i * lda);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut kk = 0;
            while kk < k32 {
                for (q, s) in acc.iter_mut().enumerate() {
                    let (x, y) = (
                        _mm256_loadu_ps(ar.add(kk + 8 * q)),
                        _mm256_loadu_ps(b.add(kk + 8 * q)),
                    );
                    *s = _mm256_fmadd_ps(x, y, *s);
                }
                kk += 32;
            }
            while kk < k8 {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(ar.add(kk)), _mm256_loadu_ps(b.add(kk)), acc[0]);
                kk += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let mut sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
            while kk < kc {
                sum += *ar.add(kk) * *b.add(kk);
                kk += 1;
            }
            let cr = c.add(i * ldc);
            *cr = if add { *cr + sum } else { sum };
        }
    }
}

/// One `R x 8V` tile over depth `kc`, then written (or added, `add`) to the
/// first `w` columns of C's rows.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const V: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    w: usize,
    add: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    // SAFETY: the panel slice holds kc rows of 8V floats; row r of A holds
    // kc floats from `a + r * lda`; columns 0..w of C's rows are inside.
    unsafe {
        let mut bp = b;
        for kk in 0..kc {
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(bp.add(8 * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r * lda + kk));
                for (s, &y) in row.iter_mut().zip(&bv) {
                    *s = _mm256_fmadd_ps(x, y, *s);
                }
            }
            bp = bp.add(8 * V);
        }
        for (r, row) in acc.iter().enumerate() {
            let cr = c.add(r * ldc);
            if w == 8 * V {
                for (v, &x) in row.iter().enumerate() {
                    let p = cr.add(8 * v);
                    let x = if add {
                        _mm256_add_ps(_mm256_loadu_ps(p), x)
                    } else {
                        x
                    };
                    _mm256_storeu_ps(p, x);
                }
            } else {
                let mut tmp = [0.0f32; NR];
                for (v, &x) in row.iter().enumerate() {
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), x);
                }
                for (j, &t) in tmp[..w].iter().enumerate() {
                    let cj = cr.add(j);
                    *cj = if add { *cj + t } else { t };
                }
            }
        }
    }
}
