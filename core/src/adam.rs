//! Adam with f32 master weights, applied identically by every replica.
//!
//! Determinism: each element is updated by the same sequence of IEEE-exact
//! operations (+, -, *, /, sqrt) in the order written here. Rust never fuses
//! a multiply and an add on its own, and no reduction crosses elements, so
//! vectorization cannot change a bit. The bias corrections use `libm::pow`,
//! which is the same code on every target.

use alloc::vec;
use alloc::vec::Vec;

use crate::config::AdamConfig;

/// Adam's moments and step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    /// First moment, one per parameter.
    pub m: Vec<f32>,
    /// Second moment, one per parameter.
    pub v: Vec<f32>,
    /// Number of updates applied so far.
    pub t: u64,
}

impl AdamState {
    /// Zero moments for `n` parameters.
    pub fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }
}

/// One Adam step that descends the loss along the ES ascent direction
/// `ascent` (the estimated gradient of fitness `-loss`), with step size `lr`
/// (the config's lr after any schedule) and decoupled weight decay.
pub fn step(cfg: &AdamConfig, lr: f32, params: &mut [f32], state: &mut AdamState, ascent: &[f32]) {
    let k = Coefficients::next(cfg, lr, state);
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX, checked just above.
        unsafe { in_place_avx(&k, params, &mut state.m, &mut state.v, ascent) };
        return;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return simd128::in_place(&k, params, &mut state.m, &mut state.v, ascent);
    #[allow(unreachable_code)]
    in_place(&k, params, &mut state.m, &mut state.v, ascent);
}

/// [`step`] from the weights `old` into `new`, the same bits: a replica
/// that keeps past weight versions writes the new weights into a recycled
/// buffer and keeps `old` as it is, instead of copying every weight into
/// its version ring before updating in place.
///
/// # Panics
///
/// If `old` and `new` differ in length.
pub fn step_into(
    cfg: &AdamConfig,
    lr: f32,
    old: &[f32],
    new: &mut [f32],
    state: &mut AdamState,
    ascent: &[f32],
) {
    assert_eq!(old.len(), new.len(), "weights before and after an Adam step");
    let k = Coefficients::next(cfg, lr, state);
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX, checked just above.
        unsafe { into_avx(&k, old, new, &mut state.m, &mut state.v, ascent) };
        return;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return simd128::into(&k, old, new, &mut state.m, &mut state.v, ascent);
    #[allow(unreachable_code)]
    into(&k, old, new, &mut state.m, &mut state.v, ascent);
}

/// One step's constants, computed once.
struct Coefficients {
    bc1: f32,
    bc2: f32,
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    lr: f32,
    eps: f32,
    decay: f32,
}

impl Coefficients {
    /// Counts the step and computes its bias corrections.
    fn next(cfg: &AdamConfig, lr: f32, state: &mut AdamState) -> Self {
        state.t += 1;
        let t = state.t as f64;
        Self {
            bc1: (1.0 - libm::pow(cfg.beta1 as f64, t)) as f32,
            bc2: (1.0 - libm::pow(cfg.beta2 as f64, t)) as f32,
            b1: cfg.beta1,
            b2: cfg.beta2,
            c1: 1.0 - cfg.beta1,
            c2: 1.0 - cfg.beta2,
            lr,
            eps: cfg.eps,
            decay: lr * cfg.weight_decay,
        }
    }

    /// One weight's update: its moments move, and the new weight is
    /// returned. Written once, so every entry point runs the same
    /// operations in the same order.
    #[inline(always)]
    fn weight(&self, p: f32, m: &mut f32, v: &mut f32, a: f32) -> f32 {
        let g = -a;
        *m = self.b1 * *m + self.c1 * g;
        *v = self.b2 * *v + self.c2 * (g * g);
        let mhat = *m / self.bc1;
        let vhat = *v / self.bc2;
        p - self.lr * (mhat / (sqrt(vhat) + self.eps)) - self.decay * p
    }
}

#[inline(always)]
fn in_place(k: &Coefficients, params: &mut [f32], m: &mut [f32], v: &mut [f32], ascent: &[f32]) {
    let moments = m.iter_mut().zip(v.iter_mut());
    for ((p, (m, v)), &a) in params.iter_mut().zip(moments).zip(ascent) {
        *p = k.weight(*p, m, v, a);
    }
}

#[inline(always)]
fn into(k: &Coefficients, old: &[f32], new: &mut [f32], m: &mut [f32], v: &mut [f32], ascent: &[f32]) {
    let moments = m.iter_mut().zip(v.iter_mut());
    for (((q, &p), (m, v)), &a) in new.iter_mut().zip(old).zip(moments).zip(ascent) {
        *q = k.weight(p, m, v, a);
    }
}

/// [`in_place`] compiled for AVX: eight lanes instead of SSE2's four. Adam
/// runs over every weight on every replica at every step, and its three
/// divisions and square root per weight are a large part of a small
/// model's update. AVX alone (not FMA) changes no bit: each lane does the
/// same IEEE operations, and nothing fuses a multiply with an add.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx")]
unsafe fn in_place_avx(k: &Coefficients, params: &mut [f32], m: &mut [f32], v: &mut [f32], ascent: &[f32]) {
    in_place(k, params, m, v, ascent);
}

/// [`into`] compiled for AVX (see [`in_place_avx`]).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx")]
unsafe fn into_avx(
    k: &Coefficients,
    old: &[f32],
    new: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    ascent: &[f32],
) {
    into(k, old, new, m, v, ascent);
}

/// Adam in wasm on simd128's four lanes: the browser volunteer applies
/// every step's update on one Web Worker, and without `std` the scalar loop
/// calls libm's software square root, which nothing vectorizes. Each lane
/// runs [`Coefficients::weight`]'s operations in its order; wasm's SIMD
/// arithmetic is IEEE 754 (subnormals included, no fused multiply-add), so
/// the bits are the scalar loop's.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    use super::Coefficients;
    use core::arch::wasm32::*;

    /// Four weights' [`Coefficients::weight`].
    #[inline(always)]
    fn weight4(k: &Coefficients, p: v128, m: &mut v128, v: &mut v128, a: v128) -> v128 {
        let s = f32x4_splat;
        let g = f32x4_neg(a);
        *m = f32x4_add(f32x4_mul(s(k.b1), *m), f32x4_mul(s(k.c1), g));
        *v = f32x4_add(f32x4_mul(s(k.b2), *v), f32x4_mul(s(k.c2), f32x4_mul(g, g)));
        let mhat = f32x4_div(*m, s(k.bc1));
        let vhat = f32x4_div(*v, s(k.bc2));
        let step = f32x4_mul(s(k.lr), f32x4_div(mhat, f32x4_add(f32x4_sqrt(vhat), s(k.eps))));
        f32x4_sub(f32x4_sub(p, step), f32x4_mul(s(k.decay), p))
    }

    /// Loads four lanes from a slice of at least four.
    #[inline(always)]
    fn load(x: &[f32]) -> v128 {
        f32x4(x[0], x[1], x[2], x[3])
    }

    /// Stores four lanes into a slice of at least four.
    #[inline(always)]
    fn store(x: &mut [f32], y: v128) {
        x[0] = f32x4_extract_lane::<0>(y);
        x[1] = f32x4_extract_lane::<1>(y);
        x[2] = f32x4_extract_lane::<2>(y);
        x[3] = f32x4_extract_lane::<3>(y);
    }

    pub(super) fn in_place(
        k: &Coefficients,
        params: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        ascent: &[f32],
    ) {
        let n = params.len().min(m.len()).min(v.len()).min(ascent.len());
        let body = n / 4 * 4;
        for i in (0..body).step_by(4) {
            let (mut m4, mut v4) = (load(&m[i..]), load(&v[i..]));
            let q = weight4(k, load(&params[i..]), &mut m4, &mut v4, load(&ascent[i..]));
            store(&mut params[i..], q);
            store(&mut m[i..], m4);
            store(&mut v[i..], v4);
        }
        super::in_place(
            k,
            &mut params[body..n],
            &mut m[body..n],
            &mut v[body..n],
            &ascent[body..n],
        );
    }

    pub(super) fn into(
        k: &Coefficients,
        old: &[f32],
        new: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        ascent: &[f32],
    ) {
        let n = old
            .len()
            .min(new.len())
            .min(m.len())
            .min(v.len())
            .min(ascent.len());
        let body = n / 4 * 4;
        for i in (0..body).step_by(4) {
            let (mut m4, mut v4) = (load(&m[i..]), load(&v[i..]));
            let q = weight4(k, load(&old[i..]), &mut m4, &mut v4, load(&ascent[i..]));
            store(&mut new[i..], q);
            store(&mut m[i..], m4);
            store(&mut v[i..], v4);
        }
        super::into(
            k,
            &old[body..n],
            &mut new[body..n],
            &mut m[body..n],
            &mut v[body..n],
            &ascent[body..n],
        );
    }
}

/// The IEEE square root, correctly rounded on every target, so any
/// implementation gives the same bits. With `std` it is the compiler's
/// intrinsic, which lets the loop above be vectorized (a scalar libm call
/// per weight would not, and Adam is on the step's critical path); without
/// it (the wasm volunteer), libm's.
#[inline(always)]
fn sqrt(x: f32) -> f32 {
    #[cfg(feature = "std")]
    {
        x.sqrt()
    }
    #[cfg(not(feature = "std"))]
    {
        libm::sqrtf(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_loss() {
        let cfg = AdamConfig::default();
        let mut p = vec![1.0f32, 1.0];
        let mut s = AdamState::new(2);
        step(&cfg, 0.1, &mut p, &mut s, &[2.0, -3.0]);
        // With bias correction, the first step is lr * sign(ascent).
        assert!((p[0] - 1.1).abs() < 1e-6 && (p[1] - 0.9).abs() < 1e-6, "{p:?}");
        assert_eq!(s.t, 1);
    }

    #[test]
    fn a_step_into_a_new_buffer_gives_the_same_bits() {
        let cfg = AdamConfig {
            weight_decay: 0.1,
            ..AdamConfig::default()
        };
        // Odd lengths reach the vector loops' tails.
        let n = 1003;
        let p0: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let (mut a, mut b) = (p0.clone(), p0);
        let (mut sa, mut sb) = (AdamState::new(n), AdamState::new(n));
        for t in 0..5 {
            let g: Vec<f32> = (0..n).map(|i| ((i * 13 + t * 7) % 29) as f32 - 14.0).collect();
            step(&cfg, 0.01, &mut a, &mut sa, &g);
            let old = core::mem::replace(&mut b, vec![f32::NAN; n]);
            step_into(&cfg, 0.01, &old, &mut b, &mut sb, &g);
        }
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(bits(&sa.m), bits(&sb.m));
        assert_eq!(bits(&sa.v), bits(&sb.v));
        assert_eq!(sa.t, sb.t);
    }

    #[test]
    fn weight_decay_shrinks_towards_zero() {
        let cfg = AdamConfig {
            weight_decay: 0.5,
            ..AdamConfig::default()
        };
        let mut p = vec![2.0f32];
        let mut s = AdamState::new(1);
        step(&cfg, 0.1, &mut p, &mut s, &[0.0]);
        assert!((p[0] - 1.9).abs() < 1e-6);
    }
}
