//! The exact gradient of the loss with respect to the readout (the output
//! matrix and bias), for the recipe that does not leave the readout to ES
//! ([`crate::config::Readout::Exact`]).
//!
//! Why: ES learns one number per member evaluation, so its estimate gets
//! worse with every parameter it covers, and the readout is nearly half of
//! the default model's. Yet the readout's gradient needs no backward pass
//! through time: with `p_t` the softmax of position t and `y_t` its target,
//! it is `sum_t h_t (p_t - y_t)^T` for the matrix and `sum_t p_t - y_t` for
//! the bias, from the hidden states of one forward pass at the unperturbed
//! weights. That costs one forward pass of the step's minibatch (one
//! sequence by default), not the population's, and every replica already
//! has the minibatch. docs/LEARNING.md ("An exact readout") measures what
//! it buys.
//!
//! It is on the update path, so every replica must compute the same bits
//! (ARCHITECTURE.md, Determinism contract): plain loops in a fixed order,
//! only `+ - * /`, and `libm`'s tanh and exp (the exp in lanes,
//! [`crate::exact_exp`], to the same bits), which are the same on every
//! target. The fast kernels and the fast tanh are not used here.

use alloc::vec;

use crate::error::{Result, check_len};
use crate::forward::Minibatch;
use crate::model::Layout;

/// Overwrites the readout's part of `ascent` (the tail of the buffer, from
/// the output matrix on) with the exact ascent direction of fitness `-loss`
/// on `batch` at `params`: minus the gradient of the mean nats per predicted
/// token. The rest of `ascent` is left as it is.
pub fn overwrite_readout(
    layout: &Layout,
    params: &[f32],
    batch: &Minibatch,
    ascent: &mut [f32],
) -> Result<()> {
    check_len("parameters", layout.len, params.len())?;
    check_len("ascent direction", layout.len, ascent.len())?;
    let (h, v, layers) = (layout.hidden(), layout.vocab(), layout.layers());
    // The readout is the tail of the buffer: the output matrix (or
    // matrices, one per input character with a per-input head), then bias.
    let tail = layout.w_out().offset;
    ascent[tail..].fill(0.0);
    // states[l * h..(l + 1) * h] is layer l's hidden state.
    let mut states = vec![0.0f32; layers * h];
    let mut pre = vec![0.0f32; h];
    let mut probs = vec![0.0f32; v];
    for b in 0..batch.batch() {
        states.fill(0.0);
        for t in 0..batch.seq_len() {
            let x = batch.token(b, t);
            for l in 0..layers {
                let w_ih = &params[layout.w_ih(l).range()];
                let w_hh = &params[layout.w_hh(l).range()];
                pre.copy_from_slice(&params[layout.b(l).range()]);
                let (below, own) = states.split_at_mut(l * h);
                let own = &mut own[..h];
                if l == 0 {
                    add_row(&mut pre, &w_ih[x * h..(x + 1) * h], 1.0);
                } else {
                    add_matvec(&mut pre, &below[(l - 1) * h..], w_ih);
                }
                add_matvec(&mut pre, own, w_hh);
                for (s, &z) in own.iter_mut().zip(&pre) {
                    *s = libm::tanhf(z);
                }
            }
            let top = &states[(layers - 1) * h..];
            let (w_out, b_out) = layout.head_for(x);
            probs.copy_from_slice(&params[b_out.clone()]);
            add_matvec(&mut probs, top, &params[w_out.clone()]);
            softmax(&mut probs);
            probs[batch.token(b, t + 1)] -= 1.0;
            // probs now holds d loss / d logits of this position.
            add_row(&mut ascent[b_out], &probs, 1.0);
            for (row, &hi) in ascent[w_out].chunks_exact_mut(v).zip(top) {
                add_row(row, &probs, hi);
            }
        }
    }
    let scale = -1.0 / (batch.batch() * batch.seq_len()) as f32;
    for g in &mut ascent[tail..] {
        *g *= scale;
    }
    Ok(())
}

/// `acc += c * row`, element by element.
fn add_row(acc: &mut [f32], row: &[f32], c: f32) {
    for (a, &r) in acc.iter_mut().zip(row) {
        *a += c * r;
    }
}

/// `acc += x W` for a row-major `W` of `x.len()` rows; each element of
/// `acc` receives its terms in row order.
fn add_matvec(acc: &mut [f32], x: &[f32], w: &[f32]) {
    for (&xi, row) in x.iter().zip(w.chunks_exact(acc.len())) {
        add_row(acc, row, xi);
    }
}

/// Softmax in place, around the maximum so large logits cannot overflow.
fn softmax(z: &mut [f32]) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in z.iter_mut() {
        *x -= max;
    }
    // libm's expf to the bit, in lanes: the update path's rules hold.
    crate::exact_exp::expf_in_place(z);
    // Summed in order from 0.0, as the loop of one expf at a time did.
    let sum = z.iter().fold(0.0f32, |sum, &x| sum + x);
    for x in z.iter_mut() {
        *x /= sum;
    }
}

#[cfg(all(test, feature = "bptt"))]
mod tests {
    use super::*;
    use crate::backprop::loss_and_gradient;
    use crate::config::{Head, ModelConfig};
    use crate::gemm::Backend;
    use crate::tokenizer::Token;

    /// The readout part equals backpropagation's exact gradient (negated),
    /// for one and two layers and either head, and nothing else of the
    /// buffer is touched.
    #[test]
    fn matches_backprop_on_the_readout_only() {
        for (layers, head) in [(1u32, Head::Shared), (2, Head::Shared), (2, Head::ByInput)] {
            let layout = Layout::new(ModelConfig {
                vocab: 11,
                hidden: 6,
                layers,
                head,
            });
            let params = layout.init_params(7, 1.5);
            let tokens: alloc::vec::Vec<Token> =
                (0..3 * 10u32).map(|i| ((i * i + 5 * i) % 11) as Token).collect();
            let batch = Minibatch::new(&tokens, 3, 9, 11).unwrap();
            let (_, grad) = loss_and_gradient(&layout, &params, &tokens, 9, Backend::Reference).unwrap();
            let mut ascent = vec![7.0f32; layout.len];
            overwrite_readout(&layout, &params, &batch, &mut ascent).unwrap();
            let start = layout.w_out().offset;
            assert!(
                ascent[..start].iter().all(|&a| a == 7.0),
                "{layers} layers {head:?}: touched the recurrent part"
            );
            let mut largest = 0.0f32;
            for (i, (&a, &g)) in ascent[start..].iter().zip(&grad[start..]).enumerate() {
                assert!(
                    (a + g).abs() <= 1e-6 + 1e-4 * g.abs(),
                    "{layers} layers {head:?}, readout element {i}: {a} against {}",
                    -g
                );
                largest = largest.max(g.abs());
            }
            assert!(largest > 1e-3, "the gradient is not trivially zero");
        }
    }

    /// A minibatch of the wrong vocabulary or a short buffer is an error,
    /// not a panic.
    #[test]
    fn refuses_mismatched_buffers() {
        let layout = Layout::new(ModelConfig {
            vocab: 5,
            hidden: 3,
            layers: 1,
            head: Default::default(),
        });
        let params = layout.init_params(1, 1.0);
        let tokens: [Token; 4] = [0, 1, 2, 3];
        let batch = Minibatch::new(&tokens, 1, 3, 5).unwrap();
        let mut short = vec![0.0f32; layout.len - 1];
        assert!(overwrite_readout(&layout, &params, &batch, &mut short).is_err());
        assert!(overwrite_readout(&layout, &params[1..], &batch, &mut vec![0.0; layout.len]).is_err());
    }
}
