//! The exact gradient of the minibatch loss by backpropagation through time.
//!
//! ES never needs this: it is the baseline ES is measured against. It gives
//! the gradient the ES estimate should point along (the gradient test
//! measures their cosine), and `seedling train --method bptt` trains the same
//! model with it, so a learning curve can show what the model could reach
//! with exact gradients at equal forward tokens.
//!
//! It computes the same function as [`crate::forward::loss`]: the mean
//! next-character cross-entropy of the stacked tanh RNN, every sequence
//! starting from the zero state. Only the forward and backward passes live
//! here; the optimizer is the same [`crate::adam`] the ES update uses.
//!
//! Behind the `bptt` feature (on by default natively, off in the wasm
//! volunteer, which only evaluates losses).

use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use crate::activation::tanh_into;
use crate::config::Head;
use crate::error::{Error, Result, check_len};
use crate::forward::Minibatch;
use crate::gemm::Backend;
use crate::model::Layout;
use crate::tokenizer::Token;

/// A row-major or transposed view of a matrix: element (i, j) sits at
/// `i * row + j * col`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    row: usize,
    col: usize,
}

impl<'a> View<'a> {
    /// A row-major `[_, cols]` matrix.
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row: cols,
            col: 1,
        }
    }

    /// The transpose of a row-major `[_, cols]` matrix.
    fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row: 1,
            col: cols,
        }
    }
}

/// `C[m, n] = beta * C + A[m, k] B[k, n]` with strided views (so transposes
/// cost nothing) and a row-major C. The fast backend is `matrixmultiply`,
/// the reference one a plain loop.
#[allow(clippy::too_many_arguments)]
fn gemm(backend: Backend, m: usize, k: usize, n: usize, a: View, b: View, c: &mut [f32], beta: f32) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |v: &View, r: usize, cc: usize| (r - 1) * v.row + (cc - 1) * v.col;
    assert!(k == 0 || (a.data.len() > last(&a, m, k) && b.data.len() > last(&b, k, n)));
    assert!(c.len() >= m * n);
    match backend {
        Backend::Fast => {
            // SAFETY: the asserts above keep every access of the m x k, k x n
            // and m x n matrices with these strides inside the slices; `c` is
            // borrowed mutably, so it cannot alias `a` or `b`.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.data.as_ptr(),
                    a.row as isize,
                    a.col as isize,
                    b.data.as_ptr(),
                    b.row as isize,
                    b.col as isize,
                    beta,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        }
        Backend::Reference => {
            for i in 0..m {
                let ci = &mut c[i * n..(i + 1) * n];
                if beta == 0.0 {
                    ci.fill(0.0);
                }
                for p in 0..k {
                    let aip = a.data[i * a.row + p * a.col];
                    for (j, cj) in ci.iter_mut().enumerate() {
                        *cj += aip * b.data[p * b.row + j * b.col];
                    }
                }
            }
        }
    }
}

/// Adds the column sums of a row-major `[_, n]` matrix to `dst`.
fn add_col_sums(dst: &mut [f32], m: &[f32]) {
    for row in m.chunks_exact(dst.len()) {
        for (d, &x) in dst.iter_mut().zip(row) {
            *d += x;
        }
    }
}

/// The loss of a minibatch (`tokens` holds whole sequences of `seq_len + 1`
/// tokens; mean nats per predicted token, as [`crate::forward::loss`]
/// reports it) and its exact gradient with respect to every parameter, in
/// the parameter buffer's layout.
///
/// `Backend::Reference` uses plain loops and `libm`'s tanh (the finite
/// difference test uses it); `Backend::Fast` uses the packed GEMM and the
/// fast tanh, like the ES forward pass.
pub fn loss_and_gradient(
    layout: &Layout,
    params: &[f32],
    tokens: &[Token],
    seq_len: usize,
    backend: Backend,
) -> Result<(f32, Vec<f32>)> {
    check_len("parameters", layout.len, params.len())?;
    let (h, v, layers) = (layout.hidden(), layout.vocab(), layout.layers());
    // Checks the shape and the vocabulary, so indexing below cannot fail.
    let bsz = tokens.len() / (seq_len + 1);
    if bsz == 0 || seq_len == 0 {
        return Err(Error::Config(
            "a minibatch needs one sequence of at least 2 tokens".into(),
        ));
    }
    let batch = Minibatch::new(tokens, bsz, seq_len, v)?;
    let steps = batch.seq_len();
    let fast = backend == Backend::Fast;
    let tok = |b: usize, t: usize| tokens[b * (steps + 1) + t] as usize;
    let w = |spec: &crate::model::TensorSpec| &params[spec.range()];

    // Forward, keeping every hidden state: hs[l][t] is `[B, H]`.
    let mut hs: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(steps); layers];
    // dlogits[t] = (softmax - onehot) / (B T), filled as the loss is summed.
    let mut dlogits: Vec<Vec<f32>> = Vec::with_capacity(steps);
    let mut pre = vec![0.0f32; bsz * h];
    let mut total = 0.0f64;
    let scale = 1.0 / (bsz * steps) as f32;
    for t in 0..steps {
        for l in 0..layers {
            if l == 0 {
                let w_ih = layout.w_ih(0);
                for b in 0..bsz {
                    let src = w_ih.offset + tok(b, t) * h;
                    pre[b * h..(b + 1) * h].copy_from_slice(&params[src..src + h]);
                }
            } else {
                let x = View::rows(&hs[l - 1][t], h);
                gemm(
                    backend,
                    bsz,
                    h,
                    h,
                    x,
                    View::rows(w(layout.w_ih(l)), h),
                    &mut pre,
                    0.0,
                );
            }
            if t > 0 {
                let prev = View::rows(&hs[l][t - 1], h);
                gemm(
                    backend,
                    bsz,
                    h,
                    h,
                    prev,
                    View::rows(w(layout.w_hh(l)), h),
                    &mut pre,
                    1.0,
                );
            }
            for row in pre.chunks_exact_mut(h) {
                for (x, &bj) in row.iter_mut().zip(w(layout.b(l))) {
                    *x += bj;
                }
            }
            let mut out = vec![0.0f32; bsz * h];
            tanh_into(fast, &pre, &mut out);
            hs[l].push(out);
        }
        let mut logits = vec![0.0f32; bsz * v];
        for (rows, (w_out, b_out)) in head_groups(layout, bsz, |b| tok(b, t)) {
            let top = &hs[layers - 1][t][rows.start * h..rows.end * h];
            let z = &mut logits[rows.start * v..rows.end * v];
            gemm(
                backend,
                rows.len(),
                h,
                v,
                View::rows(top, h),
                View::rows(&params[w_out], v),
                z,
                0.0,
            );
            for row in z.chunks_exact_mut(v) {
                for (x, &bj) in row.iter_mut().zip(&params[b_out.clone()]) {
                    *x += bj;
                }
            }
        }
        for (b, z) in logits.chunks_exact_mut(v).enumerate() {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for x in z.iter_mut() {
                *x = libm::expf(*x - max);
                sum += *x;
            }
            let target = tok(b, t + 1);
            total += (libm::logf(sum) - libm::logf(z[target])) as f64;
            for x in z.iter_mut() {
                *x *= scale / sum;
            }
            z[target] -= scale;
        }
        dlogits.push(logits);
    }
    let loss = (total / (bsz * steps) as f64) as f32;

    // Backward through time.
    let mut g = vec![0.0f32; layout.len];
    let mut carry: Vec<Vec<f32>> = vec![vec![0.0f32; bsz * h]; layers];
    let mut dh = vec![0.0f32; bsz * h];
    let mut dpre = vec![0.0f32; bsz * h];
    let mut tmp = vec![0.0f32; h * h.max(v)];
    for t in (0..steps).rev() {
        for (rows, (w_out, b_out)) in head_groups(layout, bsz, |b| tok(b, t)) {
            let dz = &dlogits[t][rows.start * v..rows.end * v];
            let top = &hs[layers - 1][t][rows.start * h..rows.end * h];
            let m = rows.len();
            gemm(
                backend,
                h,
                m,
                v,
                View::transposed(top, h),
                View::rows(dz, v),
                &mut tmp,
                0.0,
            );
            add_into(&mut g[w_out.clone()], &tmp[..h * v]);
            add_col_sums(&mut g[b_out], dz);
            let wt = View::transposed(&params[w_out], v);
            gemm(
                backend,
                m,
                v,
                h,
                View::rows(dz, v),
                wt,
                &mut dh[rows.start * h..rows.end * h],
                0.0,
            );
        }
        for l in (0..layers).rev() {
            let hl = &hs[l][t];
            for (((d, &dy), &c), &y) in dpre.iter_mut().zip(&dh).zip(&carry[l]).zip(hl) {
                *d = (dy + c) * (1.0 - y * y);
            }
            let (w_ih, w_hh, b) = (layout.w_ih(l), layout.w_hh(l), layout.b(l));
            add_col_sums(&mut g[b.range()], &dpre);
            if t > 0 {
                let prev = &hs[l][t - 1];
                gemm(
                    backend,
                    h,
                    bsz,
                    h,
                    View::transposed(prev, h),
                    View::rows(&dpre, h),
                    &mut tmp,
                    0.0,
                );
                add_into(&mut g[w_hh.range()], &tmp[..h * h]);
                let wt = View::transposed(w(w_hh), h);
                gemm(backend, bsz, h, h, View::rows(&dpre, h), wt, &mut carry[l], 0.0);
            }
            if l == 0 {
                for (bi, d) in dpre.chunks_exact(h).enumerate() {
                    let start = w_ih.offset + tok(bi, t) * h;
                    add_into(&mut g[start..start + h], d);
                }
            } else {
                let x = &hs[l - 1][t];
                gemm(
                    backend,
                    h,
                    bsz,
                    h,
                    View::transposed(x, h),
                    View::rows(&dpre, h),
                    &mut tmp,
                    0.0,
                );
                add_into(&mut g[w_ih.range()], &tmp[..h * h]);
                let wt = View::transposed(w(w_ih), h);
                gemm(backend, bsz, h, h, View::rows(&dpre, h), wt, &mut dh, 0.0);
            }
        }
    }
    Ok((loss, g))
}

/// Minibatch rows, and the ranges of the output matrix and bias they read.
type HeadGroup = (Range<usize>, (Range<usize>, Range<usize>));

/// The minibatch rows that share an output layer at one position, with its
/// matrix and bias (see [`Layout::head_for`]): every row with a shared head,
/// else each row alone with its input's head.
fn head_groups(layout: &Layout, bsz: usize, tok: impl Fn(usize) -> usize) -> Vec<HeadGroup> {
    match layout.config.head {
        Head::Shared => vec![(0..bsz, layout.head_for(0))],
        Head::ByInput => (0..bsz).map(|b| (b..b + 1, layout.head_for(tok(b)))).collect(),
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::forward;

    /// Central differences of the reference forward pass, in f64 steps
    /// around f32 weights, against the analytic gradient.
    #[test]
    fn gradient_matches_finite_differences() {
        for (layers, head) in [(1, Head::Shared), (2, Head::Shared), (2, Head::ByInput)] {
            let layout = Layout::new(ModelConfig {
                vocab: 7,
                hidden: 6,
                layers,
                head,
            });
            let params = layout.init_params(9, 1.5);
            let tokens: Vec<Token> = (0..3 * 6).map(|i| ((i * 5 + i / 4) % 7) as Token).collect();
            let mb = Minibatch::new(&tokens, 3, 5, 7).unwrap();
            let (loss, g) = loss_and_gradient(&layout, &params, &tokens, 5, Backend::Reference).unwrap();
            let want = forward::loss(&layout, &params, &mb, Backend::Reference).unwrap();
            assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
            let eps = 1e-2f32;
            let mut p = params.clone();
            let mut worst = 0.0f32;
            for i in 0..p.len() {
                p[i] = params[i] + eps;
                let up = forward::loss(&layout, &p, &mb, Backend::Reference).unwrap();
                p[i] = params[i] - eps;
                let down = forward::loss(&layout, &p, &mb, Backend::Reference).unwrap();
                p[i] = params[i];
                let fd = (up - down) / (2.0 * eps);
                worst = worst.max((fd - g[i]).abs());
            }
            let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(
                worst < 2e-3 * norm.max(1.0),
                "layers {layers} {head:?}: worst {worst}, |g| {norm}"
            );
            // The fast kernels give the same gradient up to rounding.
            let (fl, fg) = loss_and_gradient(&layout, &params, &tokens, 5, Backend::Fast).unwrap();
            assert!((fl - loss).abs() < 1e-4);
            assert!(fg.iter().zip(&g).all(|(a, b)| (a - b).abs() < 1e-4));
        }
    }

    #[test]
    fn wrong_parameter_count_is_an_error() {
        let layout = Layout::new(ModelConfig {
            vocab: 3,
            hidden: 2,
            layers: 1,
            head: Default::default(),
        });
        let tokens: Vec<Token> = vec![0, 1, 2];
        assert!(loss_and_gradient(&layout, &[0.0; 3], &tokens, 2, Backend::Fast).is_err());
        let params = layout.init_params(0, 1.0);
        assert!(loss_and_gradient(&layout, &params, &[0, 1, 3], 2, Backend::Fast).is_err());
        assert!(loss_and_gradient(&layout, &params, &[0, 1], 2, Backend::Fast).is_err());
    }
}
