//! The forward pass of [`Backend::Fast`]: the same RNN as the reference
//! loop in the parent module, arranged for speed (the forward path may
//! reorder sums: losses only feed ranks, see `gemm`).
//!
//! - Every layer's hidden state lives in one row-major buffer, `[h_0 | h_1 |
//!   ... ]` per row, and layer `l >= 1`'s input and recurrent matrices are
//!   adjacent in the parameter layout, so `[h_{l-1}, h_l] x [W_ih; W_hh]` is
//!   one GEMM with K = 2H (no second pass over the pre-activations). Layer
//!   0's one-hot input is a row of `W_ih` (with the base bias folded in,
//!   one table per call) added in the epilogue.
//! - One epilogue pass per row does everything after the GEMM: the input
//!   row or bias, the member's bias noise, both rank-1 corrections
//!   `c (x . a) b`, and tanh, writing the new hidden state in place. Under
//!   rank 1 the same pass also takes the new state's dots with the `a`
//!   factors that will read it (its own recurrent one for the next step, the
//!   next layer's or the head's for this step), so the corrections cost no
//!   passes of their own; inference's epilogue is just `tanh(pre + t)`.
//! - The head adds its bias and correction and takes the cross-entropy with a
//!   vectorized exp in the same pass.
//! - Natively, the whole pass is compiled a second time with AVX2 and FMA
//!   enabled and chosen at run time, and the epilogue is written in
//!   intrinsics (`fused/avx2.rs`, which says why); the GEMM has its own
//!   dispatch. In wasm the portable loops become simd128.
//! - The weights are packed once per call and shared by its blocks.
//! - Large calls are cut into blocks of members (or sequences, for
//!   inference) run one after another, so a block's state stays in the L2
//!   cache across layers and time steps instead of streaming through L3.

use alloc::vec;
use alloc::vec::Vec;

use super::{LowRankPop, Minibatch, add_rank_r, dot};
use crate::activation::{nll_fast, tanh_fast};
use crate::config::Head;
use crate::gemm::{Backend, PackedB, sgemm_packed};
use crate::model::{Layout, TensorId};

#[cfg(all(feature = "std", target_arch = "x86_64"))]
mod avx2;

/// Rows (sequences) per block: 8 members of RW-256 (B = 16). The block's
/// hidden states, pre-activations and logits then take about 0.4 MiB, which
/// stays in a core's L2 cache of 512 KiB; the packed weights come from L3
/// with prefetching (see `gemm::avx2`).
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
    forward_blocks::<false>(layout, params, batch, members, pert)
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
    forward_blocks::<true>(layout, params, batch, members, pert)
}

/// What every block of a call shares: the prepared weights and layer 0's
/// input table. Built once per call, not per block.
struct Prepared<'p> {
    /// Layer l's weights: `[W_ih; W_hh]` (K = 2H), or `W_hh` for layer 0
    /// (its input is one-hot).
    weights: Vec<PackedB<'p>>,
    /// The head's output matrices: the one of a shared head, or with a
    /// per-input head one per character the minibatch reads (the others
    /// are never used, so they are not packed).
    heads: Vec<Option<PackedB<'p>>>,
    /// `W_ih(0)[token] + b(0)` per token: layer 0's one-hot input and its
    /// base bias as one row, so that epilogue reads one vector for both.
    table: Vec<f32>,
}

impl<'p> Prepared<'p> {
    fn new(layout: &Layout, params: &'p [f32], batch: &Minibatch) -> Self {
        let (h, v, nl) = (layout.hidden(), layout.vocab(), layout.layers());
        let weights = (0..nl)
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
        let pack = |tok: usize| PackedB::new(Backend::Fast, h, v, &params[layout.head_for(tok).0], v);
        let heads = match layout.config.head {
            Head::Shared => vec![Some(pack(0))],
            Head::ByInput => {
                let mut heads: Vec<Option<PackedB>> = (0..v).map(|_| None).collect();
                for tok in batch.inputs() {
                    heads[tok].get_or_insert_with(|| pack(tok));
                }
                heads
            }
        };
        let b0 = &params[layout.b(0).range()];
        let table = params[layout.w_ih(0).range()]
            .chunks_exact(h)
            .flat_map(|e| e.iter().zip(b0).map(|(&x, &b)| x + b))
            .collect();
        Self {
            weights,
            heads,
            table,
        }
    }

    /// The packed output matrix that reads the state after input `tok`.
    fn head(&self, tok: usize) -> &PackedB<'p> {
        let i = if self.heads.len() == 1 { 0 } else { tok };
        self.heads[i]
            .as_ref()
            .expect("a head for every token the minibatch reads")
    }
}

/// Splits the call into blocks of whole members (or, for one unperturbed
/// member, of sequences) and runs them one after another. `AVX` is true
/// only when called from [`forward_avx2`], after the CPU check.
#[inline(always)]
fn forward_blocks<const AVX: bool>(
    layout: &Layout,
    params: &[f32],
    batch: &Minibatch,
    members: usize,
    pert: Option<&LowRankPop>,
) -> Vec<f32> {
    let bsz = batch.batch();
    let prep = Prepared::new(layout, params, batch);
    if pert.is_none() && members == 1 && bsz > BLOCK_ROWS {
        // Inference: sequences are independent; the mean over all of them
        // is the size-weighted mean of the blocks' means.
        let mut total = 0.0f64;
        let mut b0 = 0;
        while b0 < bsz {
            let n = BLOCK_ROWS.min(bsz - b0);
            let sub = batch.rows(b0, n);
            let l = run::<AVX>(layout, params, &prep, &sub, 0, 1, None)[0];
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
        out.extend(run::<AVX>(layout, params, &prep, batch, k0, n, pert));
        k0 += n;
    }
    out
}

/// Members `first..first + members`' bias noise for tensor `tensor` (`len`
/// values each), scaled by their `±sigma`.
#[inline(always)]
fn noise_bias(p: &LowRankPop, tensor: TensorId, len: usize, first: usize, members: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(members * len);
    for k in first..first + members {
        let (e, c) = p.bias(k, tensor, len);
        out.extend(e.iter().map(|&e| c * e));
    }
    out
}

/// Member `k`'s low-rank factors `(A, B)` of matrix `tensor`.
#[inline(always)]
fn factors<'p>(p: &'p LowRankPop, layout: &Layout, k: usize, tensor: TensorId) -> (&'p [f32], &'p [f32]) {
    let t = layout.tensor(tensor);
    p.tensor(k, tensor, (t.rows + t.cols) * p.rank)
        .split_at(t.rows * p.rank)
}

/// What one row's epilogue adds to the GEMM's output before tanh.
pub(super) enum Terms<'a> {
    /// Inference: `pre + t1`.
    Plain(&'a [f32]),
    /// Rank > 1 (the corrections already added to `pre`): `pre + t1 + t2`.
    Sum(&'a [f32], &'a [f32]),
    /// Rank 1 (see [`Rank1`]).
    Rank1(Rank1<'a>),
}

/// A rank-1 row's terms, `pre + t1 + t2 + s1 b1 + s2 b2`; the epilogue also
/// returns the new state's dots with `d1` and `d2` (the `x . a` of the
/// corrections that will read this state), taken while it is still in
/// registers rather than in passes of their own.
pub(super) struct Rank1<'a> {
    t1: &'a [f32],
    t2: &'a [f32],
    s1: f32,
    b1: &'a [f32],
    s2: f32,
    b2: &'a [f32],
    d1: &'a [f32],
    d2: &'a [f32],
}

/// `out = tanh(pre + terms)` and, for [`Terms::Rank1`], `(out . d1, out . d2)`
/// (zeros otherwise).
#[inline(always)]
fn epilogue<const AVX: bool>(out: &mut [f32], pre: &[f32], terms: &Terms) -> (f32, f32) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if AVX {
        // SAFETY: `AVX` is only true inside `forward_avx2`, which runs after
        // the CPU was found to have AVX2 and FMA.
        return unsafe { avx2::epilogue(out, pre, terms) };
    }
    epilogue_portable(out, pre, terms)
}

/// [`epilogue`] as plain loops the compiler vectorizes (simd128 in wasm).
#[inline(always)]
pub(super) fn epilogue_portable(out: &mut [f32], pre: &[f32], terms: &Terms) -> (f32, f32) {
    let n = out.len();
    let pre = &pre[..n];
    match *terms {
        Terms::Plain(t1) => {
            for (o, (&p, &a)) in out.iter_mut().zip(pre.iter().zip(&t1[..n])) {
                *o = tanh_fast(p + a);
            }
            (0.0, 0.0)
        }
        Terms::Sum(t1, t2) => {
            for (o, ((&p, &a), &b)) in out.iter_mut().zip(pre.iter().zip(&t1[..n]).zip(&t2[..n])) {
                *o = tanh_fast(p + a + b);
            }
            (0.0, 0.0)
        }
        Terms::Rank1(ref r) => {
            let (s1, s2) = (r.s1, r.s2);
            let (t1, t2, b1, b2) = (&r.t1[..n], &r.t2[..n], &r.b1[..n], &r.b2[..n]);
            let terms = pre.iter().zip(t1).zip(t2).zip(b1.iter().zip(b2));
            for (o, (((&p, &c), &e), (&x1, &x2))) in out.iter_mut().zip(terms) {
                *o = tanh_fast(p + c + e + s1 * x1 + s2 * x2);
            }
            (dot(out, r.d1), dot(out, r.d2))
        }
    }
}

/// Adds member `k`'s rank-r correction of matrix `tensor` for one input row
/// `x` to `out` (the rank > 1 path; rank 1 goes through [`Terms::Rank1`]).
#[inline(always)]
fn correction(
    p: &LowRankPop,
    layout: &Layout,
    k: usize,
    tensor: TensorId,
    x: Lookup,
    out: &mut [f32],
    u: &mut [f32],
) {
    let r = p.rank;
    let (a, b) = factors(p, layout, k, tensor);
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
    add_rank_r(out, b, u, p.mat_coef[k]);
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
fn run<const AVX: bool>(
    layout: &Layout,
    params: &[f32],
    prep: &Prepared,
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
    let rank1 = pert.is_some_and(|p| p.rank == 1);
    // Under rank 1, per layer and row: the state's dot with its own
    // recurrent factor `a_hh` (read by the next step's correction) and with
    // the factor of the matrix above (`a_ih` of the next layer, or the
    // head's), each taken when the state is written.
    let mut dot_hh = vec![0.0f32; if rank1 { nl * rows } else { 0 }];
    let mut dot_up = vec![0.0f32; if rank1 { nl * rows } else { 0 }];
    let noise: Vec<Vec<f32>> = match pert {
        Some(p) => (0..nl)
            .map(|l| noise_bias(p, layout.layer(l).b, h, first, members))
            .collect(),
        None => Vec::new(),
    };
    // The head's perturbation, if ES perturbs it (not under the exact readout).
    let pert_head = pert.filter(|p| p.head);
    let head_ids = layout.head();
    let noise_out = pert_head.map(|p| noise_bias(p, head_ids.b, v, first, members));
    for t in 0..batch.seq_len() {
        for (l, wl) in prep.weights.iter().enumerate() {
            let ids = layout.layer(l);
            // pre = [h_{l-1}, h_l] x [W_ih; W_hh], or h_0 x W_hh for layer 0.
            let a_off = l.saturating_sub(1) * h;
            sgemm_packed(rows, &hs[a_off..], w, wl, &mut pre, h, 0.0);
            let bias = &params[layout.b(l).range()];
            for row in 0..rows {
                let k = row / bsz;
                let pre_row = &mut pre[row * h..(row + 1) * h];
                let hrow = &mut hs[row * w..(row + 1) * w];
                let tok = (l == 0).then(|| batch.token(row % bsz, t));
                let t1 = match tok {
                    Some(tok) => &prep.table[tok * h..(tok + 1) * h],
                    None => bias,
                };
                let terms = match pert {
                    None => Terms::Plain(t1),
                    Some(p) => {
                        let m = first + k;
                        let t2 = &noise[l][k * h..(k + 1) * h];
                        if p.rank == 1 {
                            let (a1, b1) = factors(p, layout, m, ids.w_ih);
                            let (d1, b2) = factors(p, layout, m, ids.w_hh);
                            // The matrix that reads this state: the next
                            // layer's input matrix, or the head if ES
                            // perturbs it (zeros otherwise).
                            let up = if l + 1 < nl {
                                Some(layout.layer(l + 1).w_ih)
                            } else {
                                p.head.then_some(head_ids.w)
                            };
                            let d2 = match up {
                                Some(up) => factors(p, layout, m, up).0,
                                None => &p.zeros[..],
                            };
                            let c = p.mat_coef[m];
                            let u1 = match tok {
                                Some(tok) => a1[tok],
                                None => dot_up[(l - 1) * rows + row],
                            };
                            Terms::Rank1(Rank1 {
                                t1,
                                t2,
                                s1: c * u1,
                                b1,
                                s2: c * dot_hh[l * rows + row],
                                b2,
                                d1,
                                d2,
                            })
                        } else {
                            let x = match tok {
                                Some(tok) => Lookup::Row(tok),
                                None => Lookup::Dense(&hrow[(l - 1) * h..l * h]),
                            };
                            correction(p, layout, m, ids.w_ih, x, pre_row, &mut u);
                            let old = Lookup::Dense(&hrow[l * h..(l + 1) * h]);
                            correction(p, layout, m, ids.w_hh, old, pre_row, &mut u);
                            Terms::Sum(t1, t2)
                        }
                    }
                };
                let (e1, e2) = epilogue::<AVX>(&mut hrow[l * h..(l + 1) * h], pre_row, &terms);
                if rank1 {
                    dot_hh[l * rows + row] = e1;
                    dot_up[l * rows + row] = e2;
                }
            }
        }
        let top = (nl - 1) * h;
        if layout.config.head == Head::Shared {
            sgemm_packed(rows, &hs[top..], w, prep.head(0), &mut logits, v, 0.0);
        } else {
            // Sequence s's rows (one per member, `bsz` apart) share its
            // input token, so they share its head.
            for s in 0..bsz {
                let head = prep.head(batch.token(s, t));
                sgemm_packed(
                    members,
                    &hs[s * w + top..],
                    bsz * w,
                    head,
                    &mut logits[s * v..],
                    bsz * v,
                    0.0,
                );
            }
        }
        for row in 0..rows {
            let k = row / bsz;
            let z = &mut logits[row * v..(row + 1) * v];
            let bias_out = &params[layout.head_for(batch.token(row % bsz, t)).1];
            match pert_head {
                None => {
                    for (x, &c) in z.iter_mut().zip(bias_out) {
                        *x += c;
                    }
                }
                Some(p) => {
                    let m = first + k;
                    let s = if rank1 {
                        p.mat_coef[m] * dot_up[(nl - 1) * rows + row]
                    } else {
                        let x = Lookup::Dense(&hs[row * w + top..row * w + top + h]);
                        correction(p, layout, m, head_ids.w, x, z, &mut u);
                        0.0
                    };
                    let b = factors(p, layout, m, head_ids.w).1;
                    let e = noise_out.as_ref().map_or(&[][..], |n| &n[k * v..(k + 1) * v]);
                    for (x, ((&c, &e), &bj)) in z.iter_mut().zip(bias_out.iter().zip(e).zip(&b[..v])) {
                        *x += c + e + s * bj;
                    }
                }
            }
            total[k] += nll_fast(z, batch.token(row % bsz, t + 1)) as f64;
        }
    }
    let per = (bsz * batch.seq_len()) as f64;
    total.into_iter().map(|s| (s / per) as f32).collect()
}
