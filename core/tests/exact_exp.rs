//! `exact_exp::expf_in_place` equals `libm::expf` bit for bit, natively and
//! in wasm: it is on the update path, where every replica must compute the
//! same bits.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use seedling_core::exact_exp::expf_in_place;

fn check(values: &mut [f32]) {
    let want: Vec<u32> = values.iter().map(|&x| libm::expf(x).to_bits()).collect();
    let input = values.to_vec();
    expf_in_place(values);
    for ((x, got), want) in input.iter().zip(values.iter()).zip(want) {
        // NaN in, NaN out, of the same bits: compare bits throughout.
        assert_eq!(
            got.to_bits(),
            want,
            "expf({x:e}) = {got:e}, libm {:e}",
            f32::from_bits(want)
        );
    }
}

/// Every 4099th bit pattern (a prime stride, so every exponent and many
/// mantissas of both signs), in chunks of eight and a tail.
#[test]
fn equals_libm_over_a_stride_of_all_floats() {
    let mut values: Vec<f32> = (0..=u32::MAX / 4099).map(|i| f32::from_bits(i * 4099)).collect();
    values.push(1.5);
    check(&mut values);
}

/// The softmax's inputs (`z - max`, at most 0) densely, and the edges of
/// every path of libm's algorithm: each threshold's neighbours (|x| of 2^-14,
/// 0.5 ln 2, 1.5 ln 2, the underflow and overflow bounds), 0, infinities,
/// NaN.
#[test]
fn equals_libm_at_the_edges_and_on_the_softmax_range() {
    let mut values: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 5e-4).collect();
    for t in [
        0x3900_0000u32,
        0x3eb1_7218,
        0x3f85_1592,
        0x42ae_ac50,
        0x42b1_7218,
        0x42cf_f1b5,
    ] {
        for d in [-2i32, -1, 0, 1, 2] {
            let abs = t.wrapping_add_signed(d);
            values.extend([f32::from_bits(abs), f32::from_bits(abs | 0x8000_0000)]);
        }
    }
    values.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        -f32::MAX,
    ]);
    check(&mut values);
}
