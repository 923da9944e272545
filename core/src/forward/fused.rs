//! The forward pass of [`Backend::Fast`]: the same RNN as the reference
//! loop in the parent module, arranged for speed (the forward path may
//! reorder sums: losses only feed ranks, see `gemm`).
//!
//! - Every layer's hidden state lives in one row-major buffer, `[h_0 | h_1 |
//!   ... ]` per row, and layer `l >= 1`'s input and recurrent matrices are
//!   adjacent in the parameter layout, so `[h_{l-1}, h_l] x [W_ih; W_hh]` is
//!   one GEMM with K = 2H (no second pass over the pre-activations). Layer
//!   0's one-hot input is a row of `W_ih` added in the epilogue.
//! - One epilogue pass per row does everything after the GEMM: the
//!   embedding row, the member's bias (base bias plus its noise, formed once
//!   per call), both rank-1 corrections `c (x . a) b`, and tanh, writing the
//!   new hidden state in place (the corrections' dots read the old state
//!   first).
//! - The head adds its bias and correction and takes the cross-entropy with a
//!   vectorized exp in the same pass.
//! - Natively, the whole pass is compiled a second time with AVX2 and FMA
//!   enabled and chosen at run time: the epilogue is plain loops the compiler
//!   vectorizes, eight lanes wide instead of SSE2's four (the GEMM has its own
//!   dispatch). In wasm the same loops become simd128.
//! - Large calls are cut into blocks of members (or sequences, for
//!   inference) run one after another, so a block's state stays in the L2
//!   cache across layers and time steps instead of streaming through L3.

use alloc::vec;
use alloc::vec::Vec;

use super::{LowRankPop, Minibatch, add_rank_r, dot};
use crate::activation::{nll_fast, tanh_fast};
use crate::gemm::{Backend, PackedB, sgemm_packed};
use crate::model::Layout;

/// Rows (sequences) per block: 8 members of RW-256 (B = 16). The block's
/// hidden states, pre-activations and logits then take about 0.4 MiB, which
/// leaves room in a 1 MiB L2 for the GEMM's packed weights.
const BLOCK_ROWS: usize = 128;

/// Each member's mean cross-entropy; `pert` as in the reference pass.
pub(super) fn forward(
    layout: &Layout,
    params: &[f32],
    batch: &Minibatch,
    members: usize,
    pert: Option<&LowRankPop>,
) -> Vec<f32> {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { forward_avx2(layout, params, batch, members, pert) };
    }
    forward_blocks(layout, params, batch, members, pert)
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(
    layout: &Layout,
    params: &[f32],
    batch: &Minibatch,
    members: usize,
    pert: Option<&LowRankPop>,
) -> Vec<f32> {
    forward_blocks(layout, params, batch, members, pert)
}

/// Splits the call into blocks of whole members (or, for one unperturbed
/// member, of sequences) and runs them one after another.
#[inline(always)]
fn forward_blocks(
    layout: &Layout,
    params: &[f32],
    batch: &Minibatch,
    members: usize,
    pert: Option<&LowRankPop>,
) -> Vec<f32> {
    let bsz = batch.batch();
    if pert.is_none() && members == 1 && bsz > BLOCK_ROWS {
        // Inference: sequences are independent; the mean over all of them
        // is the size-weighted mean of the blocks' means.
        let mut total = 0.0f64;
        let mut b0 = 0;
        while b0 < bsz {
            let n = BLOCK_ROWS.min(bsz - b0);
            let sub = batch.rows(b0, n);
            let l = run(layout, params, &sub, 0, 1, None)[0];
            total += l as f64 * n as f64;
            b0 += n;
        }
        return vec![(total / bsz as f64) as f32];
    }
    let per_block = (BLOCK_ROWS / bsz.max(1)).max(1);
    let mut out = Vec::with_capacity(members);
    let mut k0 = 0;
    while k0 < members {
        let n = per_block.min(members - k0);
        out.extend(run(layout, params, batch, k0, n, pert));
        k0 += n;
    }
    out
}

/// Member `k`'s bias for tensor `tensor` (`len` values): the base bias plus,
/// under low-rank noise, its scaled noise.
#[inline(always)]
fn member_bias(
    params: &[f32],
    layout: &Layout,
    tensor: usize,
    pert: Option<&LowRankPop>,
    first: usize,
    members: usize,
) -> Vec<f32> {
    let base = &params[layout.tensors[tensor].range()];
    let Some(p) = pert else {
        return base.to_vec();
    };
    let mut out = Vec::with_capacity(members * base.len());
    for k in first..first + members {
        let (e, c) = p.bias(k, tensor, base.len());
        out.extend(base.iter().zip(e).map(|(&b, &e)| b + c * e));
    }
    out
}

/// `out[j] = tanh(pre[j] + bias[j] + extra[j] + s1 b1[j] + s2 b2[j])`: the
/// whole epilogue of one row in one vectorizable pass.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fused_tanh(
    out: &mut [f32],
    pre: &[f32],
    bias: &[f32],
    extra: &[f32],
    s1: f32,
    b1: &[f32],
    s2: f32,
    b2: &[f32],
) {
    let n = out.len();
    let (pre, bias, extra, b1, b2) = (&pre[..n], &bias[..n], &extra[..n], &b1[..n], &b2[..n]);
    let terms = pre.iter().zip(bias).zip(extra).zip(b1.iter().zip(b2));
    for (o, (((&p, &c), &e), (&x1, &x2))) in out.iter_mut().zip(terms) {
        *o = tanh_fast(p + c + e + s1 * x1 + s2 * x2);
    }
}

/// Member `k`'s correction of matrix `tensor` for one input row `x`: for
/// rank 1 the scale `c (x . a)` and the vector `b` (the caller fuses `s b`
/// into its pass); for higher ranks it is added to `out` here and the scale
/// returned is 0.
#[inline(always)]
fn correction<'p>(
    p: &'p LowRankPop,
    layout: &Layout,
    k: usize,
    tensor: usize,
    x: Lookup,
    out: &mut [f32],
    u: &mut [f32],
) -> (f32, &'p [f32]) {
    let t = &layout.tensors[tensor];
    let (m, n, r) = (t.rows, t.cols, p.rank);
    let (a, b) = p.tensor(k, tensor, (m + n) * r).split_at(m * r);
    let c = p.mat_coef[k];
    if r == 1 {
        let u0 = match x {
            Lookup::Row(i) => a[i],
            Lookup::Dense(x) => dot(x, a),
        };
        return (c * u0, b);
    }
    match x {
        Lookup::Row(i) => u.copy_from_slice(&a[i * r..(i + 1) * r]),
        Lookup::Dense(x) => {
            u.fill(0.0);
            for (i, &xi) in x.iter().enumerate() {
                for (uq, &aq) in u.iter_mut().zip(&a[i * r..(i + 1) * r]) {
                    *uq += xi * aq;
                }
            }
        }
    }
    add_rank_r(out, b, u, c);
    (0.0, b)
}

/// The input of a matrix correction: a one-hot row index or a dense vector.
#[derive(Clone, Copy)]
enum Lookup<'a> {
    Row(usize),
    Dense(&'a [f32]),
}

/// The forward pass of members `first..first + members` of `pert` (or of
/// the plain model, `first` = 0 and `members` = 1) on `batch`.
#[inline(always)]
fn run(
    layout: &Layout,
    params: &[f32],
    batch: &Minibatch,
    first: usize,
    members: usize,
    pert: Option<&LowRankPop>,
) -> Vec<f32> {
    let (h, v, nl) = (layout.hidden(), layout.vocab(), layout.layers());
    let bsz = batch.batch();
    let rows = members * bsz;
    let w = nl * h;
    let mut hs = vec![0.0f32; rows * w];
    let mut pre = vec![0.0f32; rows * h];
    let mut logits = vec![0.0f32; rows * v];
    let mut total = vec![0.0f64; members];
    let mut u = vec![0.0f32; pert.map_or(1, |p| p.rank)];
    let zeros = vec![0.0f32; h.max(v)];
    let biases: Vec<Vec<f32>> = (0..nl)
        .map(|l| member_bias(params, layout, 3 * l + 2, pert, first, members))
        .collect();
    let bias_out = member_bias(params, layout, 3 * nl + 1, pert, first, members);
    let member = |k: usize| if pert.is_some() { k } else { 0 };
    // Layer l's weights: [W_ih; W_hh] (K = 2H), or W_hh for layer 0 (its
    // input is one-hot); prepared once for all time steps of the block.
    let weights: Vec<PackedB> = (0..nl)
        .map(|l| {
            debug_assert_eq!(layout.w_ih(l).range().end, layout.w_hh(l).offset);
            let (k_in, w0) = if l == 0 {
                (h, layout.w_hh(0).offset)
            } else {
                (2 * h, layout.w_ih(l).offset)
            };
            PackedB::new(Backend::Fast, k_in, h, &params[w0..w0 + k_in * h], h)
        })
        .collect();
    let w_out = PackedB::new(Backend::Fast, h, v, &params[layout.w_out().range()], v);
    for t in 0..batch.seq_len() {
        for (l, wl) in weights.iter().enumerate() {
            // pre = [h_{l-1}, h_l] x [W_ih; W_hh], or h_0 x W_hh for layer 0.
            let a_off = l.saturating_sub(1) * h;
            sgemm_packed(rows, &hs[a_off..], w, wl, &mut pre, h, 0.0);
            let emb0 = layout.w_ih(0).offset;
            for row in 0..rows {
                let k = row / bsz;
                let pre_row = &mut pre[row * h..(row + 1) * h];
                let hrow = &mut hs[row * w..(row + 1) * w];
                let tok = (l == 0).then(|| batch.token(row % bsz, t));
                let ((s1, b1), (s2, b2)) = match pert {
                    Some(p) => {
                        let x = match tok {
                            Some(tok) => Lookup::Row(tok),
                            None => Lookup::Dense(&hrow[(l - 1) * h..l * h]),
                        };
                        let c1 = correction(p, layout, first + k, 3 * l, x, pre_row, &mut u);
                        let old = Lookup::Dense(&hrow[l * h..(l + 1) * h]);
                        let c2 = correction(p, layout, first + k, 3 * l + 1, old, pre_row, &mut u);
                        (c1, c2)
                    }
                    None => ((0.0, &zeros[..h]), (0.0, &zeros[..h])),
                };
                let extra = match tok {
                    Some(tok) => &params[emb0 + tok * h..emb0 + (tok + 1) * h],
                    None => &zeros[..h],
                };
                let bias = &biases[l][member(k) * h..(member(k) + 1) * h];
                fused_tanh(
                    &mut hrow[l * h..(l + 1) * h],
                    pre_row,
                    bias,
                    extra,
                    s1,
                    b1,
                    s2,
                    b2,
                );
            }
        }
        let top = (nl - 1) * h;
        sgemm_packed(rows, &hs[top..], w, &w_out, &mut logits, v, 0.0);
        for row in 0..rows {
            let k = row / bsz;
            let z = &mut logits[row * v..(row + 1) * v];
            let (s, b) = match pert {
                Some(p) => {
                    let x = Lookup::Dense(&hs[row * w + top..row * w + top + h]);
                    correction(p, layout, first + k, 3 * nl, x, z, &mut u)
                }
                None => (0.0, &zeros[..v]),
            };
            for (x, (&c, &bj)) in z
                .iter_mut()
                .zip(bias_out[member(k) * v..(member(k) + 1) * v].iter().zip(&b[..v]))
            {
                *x += c + s * bj;
            }
            total[k] += nll_fast(z, batch.token(row % bsz, t + 1)) as f64;
        }
    }
    let per = (bsz * batch.seq_len()) as f64;
    total.into_iter().map(|s| (s / per) as f32).collect()
}
