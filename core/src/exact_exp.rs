//! `libm::expf`, bit for bit, eight values at a time.
//!
//! Why: the update path may only use operations that give the same bits on
//! every target (ARCHITECTURE.md, Determinism contract), so the readout's
//! softmax calls `libm::expf`, a branchy scalar call per logit. Every
//! replica runs that softmax on every update (64 positions x 65 logits with
//! the default recipe), and it was a sixth of the update's time. Here the
//! same algorithm (FreeBSD's `e_expf.c`, which `libm` ports: argument
//! reduction by `k ln 2`, a rational approximation, a scaling by `2^k`) is
//! written without branches over eight lanes, with the same IEEE operations
//! in the same order, so the compiler vectorizes it (SSE on x86-64, simd128
//! in wasm) and every result equals `libm::expf`'s. Lanes outside the range
//! where that algorithm takes its common path (`|x| <= 2^-14`, `|x| >=
//! 87.34`, NaN) are recomputed by `libm::expf` itself.
//!
//! The equality is the contract: `core/tests/exact_exp.rs` checks it
//! natively, under Node and in Chromium over a stride of all 2^32 bit
//! patterns (and it held over all of them, natively, when it was written).

/// `libm::expf`'s constants (`src/math/expf.rs`), by their bits.
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
const INV_LN2: f32 = f32::from_bits(0x3fb8_aa3b);
const P1: f32 = f32::from_bits(0x3e2a_aa8f);
const P2: f32 = f32::from_bits(0xbb35_5215);

/// Above this |x| (as bits) libm takes its overflow, underflow or NaN path.
const ABS_LARGE: u32 = 0x42ae_ac50;
/// At or below this |x| (as bits, 2^-14) libm returns `1 + x`.
const ABS_TINY: u32 = 0x3900_0000;
/// Above this |x| (1.5 ln 2) k is rounded from x / ln 2.
const ABS_ROUNDED: u32 = 0x3f85_1592;
/// Above this |x| (0.5 ln 2) and up to the one above, k is +-1.
const ABS_ONE: u32 = 0x3eb1_7218;

/// Replaces every value of `xs` by `libm::expf` of it.
pub fn expf_in_place(xs: &mut [f32]) {
    let mut chunks = xs.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let lanes: &mut [f32; 8] = chunk.try_into().expect("chunks of eight");
        expf8(lanes);
    }
    for x in chunks.into_remainder() {
        *x = libm::expf(*x);
    }
}

/// Eight `libm::expf`s: the common path in lanes, then libm for any lane
/// off it.
#[inline(always)]
fn expf8(lanes: &mut [f32; 8]) {
    let input = *lanes;
    let mut common = true;
    for x in lanes.iter_mut() {
        let (y, on_path) = common_path(*x);
        *x = y;
        common &= on_path;
    }
    if !common {
        for (y, &x) in lanes.iter_mut().zip(&input) {
            if !on_common_path(x.to_bits() & 0x7fff_ffff) {
                *y = libm::expf(x);
            }
        }
    }
}

/// libm's expf for `2^-14 < |x| < 87.34`, and whether `x` is in that
/// range (the value is meaningless when not). Each line is one of libm's,
/// its three reductions merged: with k = 0, `x - 0 * LN2_HI` is x and
/// `0 * LN2_LO` is 0, as libm's `hi = x, lo = 0`; and `y * 2^0` is y.
#[inline(always)]
fn common_path(x: f32) -> (f32, bool) {
    let bits = x.to_bits();
    let abs = bits & 0x7fff_ffff;
    let negative = bits >> 31 == 1;
    let half = if negative { -0.5 } else { 0.5 };
    // libm: `(INV_LN2 * x + HALF[sign]) as i32`; in range, the
    // conversion never saturates.
    let rounded = (INV_LN2 * x + half) as i32;
    let one = if negative { -1 } else { 1 };
    let k = if abs > ABS_ROUNDED {
        rounded
    } else if abs > ABS_ONE {
        one
    } else {
        0
    };
    let kf = k as f32;
    let hi = x - kf * LN2_HI;
    let lo = kf * LN2_LO;
    let r = hi - lo;
    let xx = r * r;
    let c = r - xx * (P1 + xx * P2);
    let y = 1.0 + (r * c / (2.0 - c) - lo + hi);
    // libm's scalbnf multiplies once by 2^k when -126 <= k <= 127, which
    // holds on this path (|k| <= 126).
    let scale = f32::from_bits((k.wrapping_add(127) as u32) << 23);
    (y * scale, on_common_path(abs))
}

/// Whether libm takes its common path for an |x| of these bits.
#[inline(always)]
fn on_common_path(abs: u32) -> bool {
    ABS_TINY < abs && abs < ABS_LARGE
}
