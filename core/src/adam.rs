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
    state.t += 1;
    let t = state.t as f64;
    let bc1 = (1.0 - libm::pow(cfg.beta1 as f64, t)) as f32;
    let bc2 = (1.0 - libm::pow(cfg.beta2 as f64, t)) as f32;
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let (c1, c2) = (1.0 - b1, 1.0 - b2);
    let decay = lr * cfg.weight_decay;
    let moments = state.m.iter_mut().zip(state.v.iter_mut());
    for ((p, (m, v)), &a) in params.iter_mut().zip(moments).zip(ascent) {
        let g = -a;
        *m = b1 * *m + c1 * g;
        *v = b2 * *v + c2 * (g * g);
        let mhat = *m / bc1;
        let vhat = *v / bc2;
        *p = *p - lr * (mhat / (sqrt(vhat) + cfg.eps)) - decay * *p;
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
