//! Text generation from a trained model: one token at a time.
//!
//! [`RnnState`] carries the hidden state of one sequence, so a caller (the
//! CLI, the browser page) can feed a prompt and then sample or search.

use alloc::vec;
use alloc::vec::Vec;
use rand_core::Rng;

use crate::activation::tanh_slice;
use crate::error::{Result, check_len};
use crate::gemm::{Backend, sgemm};
use crate::model::Layout;
use crate::tokenizer::Token;

/// Hidden state of one sequence, all layers.
#[derive(Clone, Debug, PartialEq)]
pub struct RnnState {
    h: Vec<Vec<f32>>,
}

impl RnnState {
    /// The zero state the model was trained from.
    pub fn new(layout: &Layout) -> Self {
        Self {
            h: vec![vec![0.0; layout.hidden()]; layout.layers()],
        }
    }

    /// Feeds one token and returns the logits of the next one. Out-of-range
    /// tokens and wrong-sized parameters are errors.
    pub fn step(&mut self, layout: &Layout, params: &[f32], token: Token) -> Result<Vec<f32>> {
        check_len("parameters", layout.len, params.len())?;
        if token as usize >= layout.vocab() {
            return Err(crate::Error::UnknownToken(token as u32));
        }
        let (h, v) = (layout.hidden(), layout.vocab());
        let mut x: Vec<f32> = Vec::new();
        for l in 0..layout.layers() {
            let mut pre = vec![0.0f32; h];
            if l == 0 {
                let src = layout.w_ih(0).offset + token as usize * h;
                pre.copy_from_slice(&params[src..src + h]);
            } else {
                sgemm(
                    Backend::Fast,
                    1,
                    h,
                    h,
                    &x,
                    h,
                    &params[layout.w_ih(l).range()],
                    h,
                    &mut pre,
                    h,
                    0.0,
                );
            }
            sgemm(
                Backend::Fast,
                1,
                h,
                h,
                &self.h[l],
                h,
                &params[layout.w_hh(l).range()],
                h,
                &mut pre,
                h,
                1.0,
            );
            for (p, b) in pre.iter_mut().zip(&params[layout.b(l).range()]) {
                *p += b;
            }
            tanh_slice(true, &mut pre);
            self.h[l].copy_from_slice(&pre);
            x = pre;
        }
        let (w_out, b_out) = layout.head_for(token as usize);
        let mut logits = params[b_out].to_vec();
        sgemm(
            Backend::Fast,
            1,
            h,
            v,
            &x,
            h,
            &params[w_out],
            v,
            &mut logits,
            v,
            1.0,
        );
        Ok(logits)
    }
}

/// Log-probabilities from logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + libm::logf(logits.iter().map(|&z| libm::expf(z - max)).sum());
    logits.iter().map(|&z| z - lse).collect()
}

/// Samples a token from `logits / temperature`, restricted to the `top_k`
/// most likely tokens (0 = all). Temperature 0 picks the most likely token.
pub fn sample(logits: &[f32], temperature: f32, top_k: usize, rng: &mut impl Rng) -> Token {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if temperature <= 0.0 || !temperature.is_finite() {
        return idx[0] as Token;
    }
    if top_k > 0 && top_k < idx.len() {
        idx.truncate(top_k);
    }
    let max = logits[idx[0]];
    let weights: Vec<f32> = idx
        .iter()
        .map(|&i| libm::expf((logits[i] - max) / temperature))
        .collect();
    let total: f32 = weights.iter().sum();
    let mut u = (rng.next_u32() >> 8) as f32 / 16_777_216.0 * total;
    for (&i, &w) in idx.iter().zip(&weights) {
        if u < w {
            return i as Token;
        }
        u -= w;
    }
    idx[idx.len() - 1] as Token
}

/// Feeds `prompt` (which must be non-empty) and samples `len` more tokens.
pub fn sample_text(
    layout: &Layout,
    params: &[f32],
    prompt: &[Token],
    len: usize,
    temperature: f32,
    top_k: usize,
    rng: &mut impl Rng,
) -> Result<Vec<Token>> {
    let mut state = RnnState::new(layout);
    let mut logits = Vec::new();
    for &t in prompt {
        logits = state.step(layout, params, t)?;
    }
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        if logits.is_empty() {
            break;
        }
        let t = sample(&logits, temperature, top_k, rng);
        out.push(t);
        logits = state.step(layout, params, t)?;
    }
    Ok(out)
}

/// One beam-search hypothesis.
#[derive(Clone, Debug, PartialEq)]
pub struct Beam {
    /// Generated tokens (the prompt excluded).
    pub tokens: Vec<Token>,
    /// Sum of the log-probabilities of `tokens`, in nats.
    pub logprob: f32,
}

/// Beam search of width `width` for `len` tokens after `prompt` (non-empty);
/// returns up to `width` beams, most likely first.
pub fn beam_search(
    layout: &Layout,
    params: &[f32],
    prompt: &[Token],
    width: usize,
    len: usize,
) -> Result<Vec<Beam>> {
    let width = width.max(1);
    let mut state = RnnState::new(layout);
    let mut logits = Vec::new();
    for &t in prompt {
        logits = state.step(layout, params, t)?;
    }
    if logits.is_empty() {
        return Ok(Vec::new());
    }
    let mut beams = vec![(
        Beam {
            tokens: Vec::new(),
            logprob: 0.0,
        },
        state,
        log_softmax(&logits),
    )];
    for _ in 0..len {
        let mut cands: Vec<(f32, usize, Token)> = Vec::new();
        for (bi, (beam, _, lp)) in beams.iter().enumerate() {
            for (t, &l) in lp.iter().enumerate() {
                cands.push((beam.logprob + l, bi, t as Token));
            }
        }
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        cands.truncate(width);
        let mut next = Vec::with_capacity(cands.len());
        for (score, bi, t) in cands {
            let (beam, st, _) = &beams[bi];
            let mut st = st.clone();
            let logits = st.step(layout, params, t)?;
            let mut tokens = beam.tokens.clone();
            tokens.push(t);
            next.push((
                Beam {
                    tokens,
                    logprob: score,
                },
                st,
                log_softmax(&logits),
            ));
        }
        beams = next;
    }
    Ok(beams.into_iter().map(|(b, _, _)| b).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::forward::{Minibatch, loss};
    use crate::rng::Stream;

    fn model() -> (Layout, Vec<f32>) {
        let layout = Layout::new(ModelConfig {
            vocab: 6,
            hidden: 8,
            layers: 2,
            head: Default::default(),
        });
        let p = layout.init_params(1, 3.0);
        (layout, p)
    }

    #[test]
    fn stepping_agrees_with_the_batched_loss() {
        let (layout, p) = model();
        let toks: Vec<Token> = vec![1, 4, 2, 2, 0, 5];
        let mut st = RnnState::new(&layout);
        let mut total = 0.0;
        for w in toks.windows(2) {
            let lp = log_softmax(&st.step(&layout, &p, w[0]).unwrap());
            total -= lp[w[1] as usize];
        }
        let mb = Minibatch::new(&toks, 1, 5, 6).unwrap();
        let want = loss(&layout, &p, &mb, Backend::Reference).unwrap();
        assert!((total / 5.0 - want).abs() < 1e-4);
    }

    #[test]
    fn greedy_beam_and_sampling_behave() {
        let (layout, p) = model();
        let beams = beam_search(&layout, &p, &[1], 3, 4).unwrap();
        assert_eq!(beams.len(), 3);
        assert!(beams.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        // Width-1 beam search is greedy decoding, i.e. temperature 0.
        let greedy = beam_search(&layout, &p, &[1], 1, 4).unwrap();
        let mut rng = Stream::new(1);
        let t0 = sample_text(&layout, &p, &[1], 4, 0.0, 0, &mut rng).unwrap();
        assert_eq!(greedy[0].tokens, t0);
        // The best beam is at least as likely as the greedy path.
        assert!(beams[0].logprob >= greedy[0].logprob - 1e-6);
        // top_k = 1 is greedy too, whatever the temperature.
        assert_eq!(sample(&[0.0, 3.0, 1.0], 5.0, 1, &mut rng), 1);
        assert!(RnnState::new(&layout).step(&layout, &p, 6).is_err());
    }
}
