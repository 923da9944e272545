//! A minGRU character model, the gated alternative to the tanh RNN that
//! docs/LEARNING.md measures against it under ES.
//!
//! minGRU (Feng et al. 2024, "Were RNNs All We Needed?") drops the hidden
//! state from the gates: with a one-hot input `x_t`,
//!
//! ```text
//! z_t  = sigmoid(W_z[x_t] + b_z)
//! h~_t = W_h[x_t] + b_h
//! h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t
//! y_t  = softmax(h_t W_out + b_out)
//! ```
//!
//! so the state is a learned, input-gated moving average of embeddings.
//! This is the study path only: whole parameter vectors (no low-rank
//! kernel, no fixed cross-target operation order), evaluated one sequence
//! after the other. It is not part of the run config or the wire, and the
//! determinism contract does not cover it; if it ever beats the tanh RNN it
//! would get the same population-batched kernels first.

use alloc::vec;
use alloc::vec::Vec;

use crate::activation::nll;
use crate::error::{Error, Result, check_len};
use crate::rng;
use crate::tokenizer::Token;

/// Shape of a one-layer minGRU: `3 * vocab * hidden + 2 * hidden + vocab`
/// parameters, laid out as `w_z [vocab x hidden]`, `b_z [hidden]`,
/// `w_h [vocab x hidden]`, `b_h [hidden]`, `w_out [hidden x vocab]`,
/// `b_out [vocab]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinGru {
    /// Distinct characters (one-hot input, softmax output).
    pub vocab: usize,
    /// Width of the state.
    pub hidden: usize,
}

impl MinGru {
    /// Parameter count.
    pub fn len(&self) -> usize {
        3 * self.vocab * self.hidden + 2 * self.hidden + self.vocab
    }

    /// Always false: a model has parameters (clippy wants it beside `len`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(rows, cols)` of each tensor in layout order (biases have one row),
    /// for low-rank noise on the matrices.
    pub fn shapes(&self) -> [(usize, usize); 6] {
        let (v, h) = (self.vocab, self.hidden);
        [(v, h), (1, h), (v, h), (1, h), (h, v), (1, v)]
    }

    /// Tensor sizes in layout order.
    fn sizes(&self) -> [usize; 6] {
        self.shapes().map(|(r, c)| r * c)
    }

    /// Initial weights: every tensor uniform in `±scale / sqrt(hidden)`, the
    /// same rule as [`crate::model::Layout::init_params`], so a comparison
    /// starts both cells alike.
    pub fn init_params(&self, seed: u64, scale: f32) -> Vec<f32> {
        let bound = scale / libm::sqrtf(self.hidden as f32);
        let mut p = Vec::with_capacity(self.len());
        for (id, n) in self.sizes().into_iter().enumerate() {
            let mut t = vec![0.0f32; n];
            // Tensor ids past the tanh RNN's, so the streams never coincide.
            rng::fill_uniform(
                rng::derive(&[rng::DOMAIN_INIT, seed, 1 << 32 | id as u64]),
                &mut t,
            );
            p.extend(t.iter().map(|x| (x * 2.0 - 1.0) * bound));
        }
        p
    }

    /// Mean cross-entropy (nats per character) over `tokens`, whole
    /// sequences of `seq_len + 1` tokens, each from the zero state: the
    /// same quantity [`crate::forward::loss`] computes for the tanh RNN.
    pub fn loss(&self, params: &[f32], tokens: &[Token], seq_len: usize) -> Result<f32> {
        check_len("minGRU parameters", self.len(), params.len())?;
        let w = seq_len + 1;
        if seq_len == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(w) {
            return Err(Error::Config(
                "minGRU loss needs whole sequences of seq_len + 1 tokens".into(),
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(Error::UnknownToken(t as u32));
        }
        let (v, h) = (self.vocab, self.hidden);
        let [n_wz, n_bz, n_wh, n_bh, n_wo, _] = self.sizes();
        let (w_z, rest) = params.split_at(n_wz);
        let (b_z, rest) = rest.split_at(n_bz);
        let (w_h, rest) = rest.split_at(n_wh);
        let (b_h, rest) = rest.split_at(n_bh);
        let (w_out, b_out) = rest.split_at(n_wo);
        let mut state = vec![0.0f32; h];
        let mut logits = vec![0.0f32; v];
        let mut total = 0.0f64;
        for seq in tokens.chunks_exact(w) {
            state.fill(0.0);
            for t in 0..seq_len {
                let x = seq[t] as usize;
                let (zr, hr) = (&w_z[x * h..(x + 1) * h], &w_h[x * h..(x + 1) * h]);
                for j in 0..h {
                    let z = 1.0 / (1.0 + libm::expf(-(zr[j] + b_z[j])));
                    state[j] += z * (hr[j] + b_h[j] - state[j]);
                }
                logits.copy_from_slice(b_out);
                for (j, &s) in state.iter().enumerate() {
                    for (l, &wo) in logits.iter_mut().zip(&w_out[j * v..(j + 1) * v]) {
                        *l += s * wo;
                    }
                }
                total += nll(&logits, seq[t + 1] as usize) as f64;
            }
        }
        Ok((total / (tokens.len() / w * seq_len) as f64) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_init_are_consistent() {
        let m = MinGru {
            vocab: 65,
            hidden: 12,
        };
        // The size docs/LEARNING.md compares with the 1x16 tanh RNN (2,417).
        assert_eq!(m.len(), 2429);
        let p = m.init_params(0, 1.0);
        assert_eq!(p.len(), m.len());
        assert!(p.iter().all(|x| x.abs() <= 1.0 / libm::sqrtf(12.0)));
        assert_ne!(p, m.init_params(1, 1.0));
    }

    #[test]
    fn zero_weights_predict_uniformly_and_gates_carry_state() {
        let m = MinGru { vocab: 3, hidden: 2 };
        let mut p = vec![0.0f32; m.len()];
        let tokens: Vec<Token> = vec![0, 1, 2, 0, 2, 1];
        let l = m.loss(&p, &tokens, 2).unwrap();
        assert!((l - libm::logf(3.0)).abs() < 1e-6, "{l}");
        // Offsets: w_z 0..6, b_z 6..8, w_h 8..14, b_h 14..16, w_out 16..22.
        // Token 0 opens unit 0's gate and writes 1.0; unit 0 votes for token 2.
        p[0] = 30.0;
        p[8] = 1.0;
        p[16 + 2] = 5.0;
        // Token 2 closes the gate: after "0 2" the state still holds token 0,
        // so both positions of "0 2 2" predict 2 well.
        p[2 * 2] = -30.0;
        let seq: Vec<Token> = vec![0, 2, 2];
        let carried = m.loss(&p, &seq, 2).unwrap();
        assert!(carried < 0.02, "{carried}");
        // Token 2 opens the gate and writes 0: the second position forgets.
        p[2 * 2] = 30.0;
        let reset = m.loss(&p, &seq, 2).unwrap();
        assert!(reset > 0.5, "{reset}");
        assert!(m.loss(&p, &[0, 1], 2).is_err() && m.loss(&p, &[0, 1, 7], 2).is_err());
        assert!(m.loss(&p[1..], &seq, 2).is_err());
    }
}
