//! Loss evaluation: the forward pass over a population of perturbed models.
//!
//! Low-rank noise is population-batched (EGGROLL): the K members a caller asks
//! for share one minibatch, their `K * B` sequences are stacked as rows, and
//! every layer and time step is one `[K*B, H] x [H, H]` GEMM with the shared
//! base weights, followed by each member's rank-r correction
//! `sigma_k (x A_k) B_k^T / sqrt(r)` and its perturbed bias. `W + eps` is
//! never formed. Full-rank noise forms each member's perturbed weights (one
//! noise draw serves both members of an antithetic pair) and runs the same
//! kernel with no correction.
//!
//! Rows are member-major: row `k * B + b` is sequence `b` of the k-th member
//! in the caller's list.

use alloc::vec;
use alloc::vec::Vec;

use crate::activation::{nll, tanh_into};
use crate::config::RunConfig;
use crate::error::{Error, Result, check_len};
use crate::gemm::{Backend, sgemm};
use crate::model::{Layout, TensorId};
use crate::perturb::{pair_noise, pair_noise_offsets, perturbs};
use crate::tokenizer::Token;

mod fused;

/// A minibatch: `batch` sequences of `seq_len + 1` tokens, row-major. Position
/// t predicts token t + 1.
#[derive(Clone, Copy, Debug)]
pub struct Minibatch<'a> {
    tokens: &'a [Token],
    batch: usize,
    seq_len: usize,
}

impl<'a> Minibatch<'a> {
    /// Checks the shape and that every token is in the vocabulary, so the
    /// forward pass can index without further checks.
    pub fn new(tokens: &'a [Token], batch: usize, seq_len: usize, vocab: usize) -> Result<Self> {
        check_len("minibatch tokens", batch * (seq_len + 1), tokens.len())?;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::UnknownToken(t as u32));
        }
        Ok(Self {
            tokens,
            batch,
            seq_len,
        })
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Predicted positions per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    #[inline]
    pub(crate) fn token(&self, b: usize, t: usize) -> usize {
        self.tokens[b * (self.seq_len + 1) + t] as usize
    }

    /// Every token read as an input (each sequence's positions
    /// `0..seq_len`; the last token is only a target): the characters
    /// whose embeddings and per-input heads the minibatch touches.
    pub(crate) fn inputs(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.batch).flat_map(move |b| (0..self.seq_len).map(move |t| self.token(b, t)))
    }

    /// Sequences `first..first + n` as a minibatch of their own.
    fn rows(&self, first: usize, n: usize) -> Minibatch<'a> {
        let len = self.seq_len + 1;
        Minibatch {
            tokens: &self.tokens[first * len..(first + n) * len],
            batch: n,
            seq_len: self.seq_len,
        }
    }
}

/// The low-rank perturbations of the members being evaluated.
struct LowRankPop {
    rank: usize,
    /// Noise of each member's pair, `per_member` floats each (see [`pair_noise`]).
    noise: Vec<f32>,
    per_member: usize,
    /// Offset of each tensor's noise inside one member's block, by
    /// [`TensorId::index`].
    offsets: Vec<usize>,
    /// `±sigma / sqrt(rank)`: the scale of a matrix correction.
    mat_coef: Vec<f32>,
    /// `±sigma`: the scale of a bias perturbation.
    vec_coef: Vec<f32>,
    /// Whether the head (the readout) is perturbed; when it is not, its
    /// noise is not in the buffer ([`crate::perturb::noise_len`]).
    head: bool,
    /// `hidden` zeros: the head's `a` factor when it is not perturbed.
    zeros: Vec<f32>,
}

impl LowRankPop {
    fn new(layout: &Layout, cfg: &RunConfig, rank: usize, step: u64, members: &[u32]) -> Self {
        let (offsets, per_member) = pair_noise_offsets(layout, cfg);
        let mut noise = Vec::with_capacity(per_member * members.len());
        let mut buf = Vec::new();
        let sigma = cfg.es.sigma;
        let scale = sigma / libm::sqrtf(rank as f32);
        let (mut mat_coef, mut vec_coef) = (Vec::new(), Vec::new());
        for &m in members {
            pair_noise(layout, cfg, step, (m / 2) as u64, &mut buf);
            noise.extend_from_slice(&buf);
            let sign = if m % 2 == 0 { 1.0 } else { -1.0 };
            mat_coef.push(sign * scale);
            vec_coef.push(sign * sigma);
        }
        Self {
            rank,
            noise,
            per_member,
            offsets,
            mat_coef,
            vec_coef,
            head: perturbs(layout, cfg, layout.head().w),
            zeros: vec![0.0; layout.hidden()],
        }
    }

    fn tensor(&self, member: usize, tensor: TensorId, len: usize) -> &[f32] {
        let start = member * self.per_member + self.offsets[tensor.index()];
        &self.noise[start..start + len]
    }

    /// `out[row] += c_k * (x[row] A_k) B_k^T` for every row of every member.
    fn add_matmul(
        &self,
        layout: &Layout,
        tensor: TensorId,
        x: &[f32],
        rows_per_member: usize,
        out: &mut [f32],
        u: &mut [f32],
    ) {
        let t = layout.tensor(tensor);
        let (m, n, r) = (t.rows, t.cols, self.rank);
        for k in 0..self.mat_coef.len() {
            let ab = self.tensor(k, tensor, (m + n) * r);
            let (a, b) = ab.split_at(m * r);
            let c = self.mat_coef[k];
            for row in k * rows_per_member..(k + 1) * rows_per_member {
                let xr = &x[row * m..(row + 1) * m];
                if r == 1 {
                    u[0] = dot(xr, a);
                } else {
                    u.fill(0.0);
                    for (i, &xi) in xr.iter().enumerate() {
                        for (uq, &aq) in u.iter_mut().zip(&a[i * r..(i + 1) * r]) {
                            *uq += xi * aq;
                        }
                    }
                }
                add_rank_r(&mut out[row * n..(row + 1) * n], b, u, c);
            }
        }
    }

    /// The layer-0 input correction: x is one-hot, so `x A` is a row of A.
    fn add_lookup(
        &self,
        layout: &Layout,
        tensor: TensorId,
        batch: &Minibatch,
        t: usize,
        out: &mut [f32],
        u: &mut [f32],
    ) {
        let spec = layout.tensor(tensor);
        let (m, n, r) = (spec.rows, spec.cols, self.rank);
        let bsz = batch.batch();
        for k in 0..self.mat_coef.len() {
            let ab = self.tensor(k, tensor, (m + n) * r);
            let (a, b) = ab.split_at(m * r);
            for s in 0..bsz {
                let row = k * bsz + s;
                let tok = batch.token(s, t);
                u.copy_from_slice(&a[tok * r..(tok + 1) * r]);
                add_rank_r(&mut out[row * n..(row + 1) * n], b, u, self.mat_coef[k]);
            }
        }
    }

    fn bias(&self, member: usize, tensor: TensorId, len: usize) -> (&[f32], f32) {
        (self.tensor(member, tensor, len), self.vec_coef[member])
    }
}

/// A dot product with eight independent partial sums, so the compiler keeps
/// it in SIMD registers instead of one serial chain of adds. The forward path
/// may reorder sums (losses only feed ranks).
#[inline]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[j] += c * sum_q u[q] * b[j, q]` with `b` row-major `[n, r]`.
#[inline]
fn add_rank_r(out: &mut [f32], b: &[f32], u: &[f32], c: f32) {
    if let [u0] = u {
        let cu = c * u0;
        for (o, &bj) in out.iter_mut().zip(b) {
            *o += cu * bj;
        }
    } else {
        let r = u.len();
        for (j, o) in out.iter_mut().enumerate() {
            let dot: f32 = b[j * r..(j + 1) * r].iter().zip(u).map(|(x, y)| x * y).sum();
            *o += c * dot;
        }
    }
}

/// Runs the RNN over `batch.batch() * members` rows and returns each
/// member's mean cross-entropy (nats per predicted token): the fused pass
/// for [`Backend::Fast`], the fixed-order loop below for
/// [`Backend::Reference`].
fn forward(
    layout: &Layout,
    params: &[f32],
    batch: &Minibatch,
    members: usize,
    pert: Option<&LowRankPop>,
    backend: Backend,
) -> Vec<f32> {
    match backend {
        Backend::Fast => fused::forward(layout, params, batch, members, pert),
        Backend::Reference => forward_reference(layout, params, batch, members, pert),
    }
}

/// The reference forward pass: one operation order on every target (the
/// cross-platform golden hashes losses computed by it). Each step and layer
/// is a GEMM per input, each member's rank-r corrections, the bias, and
/// libm's tanh, in that order.
fn forward_reference(
    layout: &Layout,
    params: &[f32],
    batch: &Minibatch,
    members: usize,
    pert: Option<&LowRankPop>,
) -> Vec<f32> {
    let backend = Backend::Reference;
    let (h, v, layers) = (layout.hidden(), layout.vocab(), layout.layers());
    let bsz = batch.batch();
    let rows = members * bsz;
    let mut hs: Vec<Vec<f32>> = (0..layers).map(|_| vec![0.0; rows * h]).collect();
    let mut pre = vec![0.0f32; rows * h];
    let mut logits = vec![0.0f32; rows * v];
    let mut u = vec![0.0f32; pert.map_or(1, |p| p.rank)];
    let mut total = vec![0.0f64; members];
    for t in 0..batch.seq_len() {
        for l in 0..layers {
            let ids = layout.layer(l);
            let (w_ih, w_hh, b) = (
                layout.tensor(ids.w_ih),
                layout.tensor(ids.w_hh),
                layout.tensor(ids.b),
            );
            let (below, here) = hs.split_at_mut(l);
            let hl = &mut here[0];
            if l == 0 {
                for row in 0..rows {
                    let tok = batch.token(row % bsz, t);
                    let src = w_ih.offset + tok * h;
                    pre[row * h..(row + 1) * h].copy_from_slice(&params[src..src + h]);
                }
                if let Some(p) = pert {
                    p.add_lookup(layout, ids.w_ih, batch, t, &mut pre, &mut u);
                }
            } else {
                let x = &below[l - 1];
                sgemm(
                    backend,
                    rows,
                    h,
                    h,
                    x,
                    h,
                    &params[w_ih.range()],
                    h,
                    &mut pre,
                    h,
                    0.0,
                );
                if let Some(p) = pert {
                    p.add_matmul(layout, ids.w_ih, x, bsz, &mut pre, &mut u);
                }
            }
            sgemm(
                backend,
                rows,
                h,
                h,
                hl,
                h,
                &params[w_hh.range()],
                h,
                &mut pre,
                h,
                1.0,
            );
            if let Some(p) = pert {
                p.add_matmul(layout, ids.w_hh, hl, bsz, &mut pre, &mut u);
            }
            let bias = &params[b.range()];
            for k in 0..members {
                let block = &mut pre[k * bsz * h..(k + 1) * bsz * h];
                for row in block.chunks_exact_mut(h) {
                    for (x, &bj) in row.iter_mut().zip(bias) {
                        *x += bj;
                    }
                    if let Some(p) = pert {
                        let (e, c) = p.bias(k, ids.b, h);
                        for (x, &ej) in row.iter_mut().zip(e) {
                            *x += c * ej;
                        }
                    }
                }
            }
            tanh_into(false, &pre, hl);
        }
        let top = &hs[layers - 1];
        // Sequence s's rows (one per member, `bsz` apart) share its input
        // token, so they share its head (see `Layout::head_for`).
        for s in 0..bsz {
            let (w_out, _) = layout.head_for(batch.token(s, t));
            sgemm(
                backend,
                members,
                h,
                v,
                &top[s * h..],
                bsz * h,
                &params[w_out],
                v,
                &mut logits[s * v..],
                bsz * v,
                0.0,
            );
        }
        let pert_head = pert.filter(|p| p.head);
        if let Some(p) = pert_head {
            p.add_matmul(layout, layout.head().w, top, bsz, &mut logits, &mut u);
        }
        for (row, z) in logits.chunks_exact_mut(v).enumerate() {
            let k = row / bsz;
            let (_, b_out) = layout.head_for(batch.token(row % bsz, t));
            for (x, &bj) in z.iter_mut().zip(&params[b_out]) {
                *x += bj;
            }
            if let Some(p) = pert_head {
                let (e, c) = p.bias(k, layout.head().b, v);
                for (x, &ej) in z.iter_mut().zip(e) {
                    *x += c * ej;
                }
            }
            total[k] += nll(z, batch.token(row % bsz, t + 1)) as f64;
        }
    }
    let per = (bsz * batch.seq_len()) as f64;
    total.into_iter().map(|s| (s / per) as f32).collect()
}

fn check_params(layout: &Layout, params: &[f32]) -> Result<()> {
    check_len("parameters", layout.len, params.len())
}

/// Mean cross-entropy of the unperturbed model on a minibatch: validation
/// loss, and the inference ceiling ES throughput is compared against.
pub fn loss(layout: &Layout, params: &[f32], batch: &Minibatch, backend: Backend) -> Result<f32> {
    check_params(layout, params)?;
    Ok(forward(layout, params, batch, 1, None, backend)[0])
}

/// Each listed member's loss on the step's minibatch, in the order given.
///
/// Members must be `< population`; repeats are allowed (a replicated member
/// is simply evaluated twice).
pub fn member_losses(
    layout: &Layout,
    params: &[f32],
    cfg: &RunConfig,
    step: u64,
    batch: &Minibatch,
    members: &[u32],
    backend: Backend,
) -> Result<Vec<f32>> {
    check_params(layout, params)?;
    if let Some(&m) = members.iter().find(|&&m| m >= cfg.es.population) {
        return Err(Error::Member(m));
    }
    if members.is_empty() {
        return Ok(Vec::new());
    }
    match cfg.es.noise.rank() {
        Some(rank) => {
            let pop = LowRankPop::new(layout, cfg, rank, step, members);
            Ok(forward(layout, params, batch, members.len(), Some(&pop), backend))
        }
        None => {
            let mut eps = Vec::new();
            let mut eps_pair = u32::MAX;
            let mut perturbed = vec![0.0f32; params.len()];
            let mut out = Vec::with_capacity(members.len());
            for &m in members {
                if m / 2 != eps_pair {
                    pair_noise(layout, cfg, step, (m / 2) as u64, &mut eps);
                    eps_pair = m / 2;
                }
                let s = if m % 2 == 0 { cfg.es.sigma } else { -cfg.es.sigma };
                for ((q, &p), &e) in perturbed.iter_mut().zip(params).zip(&eps) {
                    *q = p + s * e;
                }
                out.push(forward(layout, &perturbed, batch, 1, None, backend)[0]);
            }
            Ok(out)
        }
    }
}

/// Materializes one member's perturbed weights, `theta + s * sigma * eps`.
/// The population-batched kernel never does this; tests use it to check that
/// kernel against plain forwards of explicit weights.
pub fn perturbed_params(
    layout: &Layout,
    params: &[f32],
    cfg: &RunConfig,
    step: u64,
    member: u32,
) -> Vec<f32> {
    let rank = cfg.es.noise.rank();
    let mut buf = Vec::new();
    pair_noise(layout, cfg, step, (member / 2) as u64, &mut buf);
    let sign = if member.is_multiple_of(2) { 1.0 } else { -1.0 };
    let sigma = sign * cfg.es.sigma;
    let mut out = params.to_vec();
    let (offsets, _) = pair_noise_offsets(layout, cfg);
    for ((id, t), &off) in layout.iter().zip(&offsets) {
        if !perturbs(layout, cfg, id) {
            continue;
        }
        let dst = &mut out[t.range()];
        match rank {
            Some(r) if t.is_matrix => {
                let (a, b) = buf[off..off + (t.rows + t.cols) * r].split_at(t.rows * r);
                let c = sigma / libm::sqrtf(r as f32);
                for i in 0..t.rows {
                    for j in 0..t.cols {
                        let dot: f32 = (0..r).map(|q| a[i * r + q] * b[j * r + q]).sum();
                        dst[i * t.cols + j] += c * dot;
                    }
                }
            }
            _ => {
                for (d, &e) in dst.iter_mut().zip(&buf[off..off + t.len()]) {
                    *d += sigma * e;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Head, ModelConfig, NoiseKind, Readout};

    fn tiny(noise: NoiseKind) -> (RunConfig, Layout, Vec<f32>, Vec<Token>) {
        tiny_with(noise, Head::Shared)
    }

    /// A per-input head needs the exact readout (`RunConfig::validate`).
    fn tiny_with(noise: NoiseKind, head: Head) -> (RunConfig, Layout, Vec<f32>, Vec<Token>) {
        let mut cfg = RunConfig::rw256(11);
        cfg.model = ModelConfig {
            vocab: 11,
            hidden: 24,
            layers: 2,
            head,
        };
        if head == Head::ByInput {
            cfg.recipe.readout = Readout::Exact;
        }
        cfg.es.noise = noise;
        cfg.es.population = 8;
        cfg.es.batch = 3;
        cfg.es.seq_len = 5;
        cfg.es.sigma = 0.1;
        let layout = Layout::new(cfg.model);
        let params = layout.init_params(3, 1.0);
        let tokens: Vec<Token> = (0..18).map(|i| ((i * 7 + 3) % 11) as Token).collect();
        (cfg, layout, params, tokens)
    }

    #[test]
    fn batched_lowrank_equals_materialized_weights() {
        for (rank, readout, head) in [
            (1, Readout::Es, Head::Shared),
            (3, Readout::Es, Head::Shared),
            (1, Readout::Exact, Head::Shared),
            (3, Readout::Exact, Head::Shared),
            (1, Readout::Exact, Head::ByInput),
            (3, Readout::Exact, Head::ByInput),
        ] {
            let (mut cfg, layout, params, tokens) = tiny_with(NoiseKind::LowRank { rank }, head);
            cfg.recipe.readout = readout;
            let mb = Minibatch::new(&tokens, 3, 5, 11).unwrap();
            let members = [5u32, 0, 1, 7];
            for backend in [Backend::Fast, Backend::Reference] {
                let got = member_losses(&layout, &params, &cfg, 4, &mb, &members, backend).unwrap();
                for (&m, &g) in members.iter().zip(&got) {
                    let p = perturbed_params(&layout, &params, &cfg, 4, m);
                    let want = loss(&layout, &p, &mb, Backend::Reference).unwrap();
                    assert!(
                        (g - want).abs() < 1e-5,
                        "rank {rank} {readout:?} {head:?} member {m}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_blocks_match_the_reference_pass() {
        // Enough rows that the fast pass splits members (and, for inference,
        // sequences) into several blocks, the last one partial.
        for head in [Head::Shared, Head::ByInput] {
            let (mut cfg, layout, params, _) = tiny_with(NoiseKind::LowRank { rank: 1 }, head);
            cfg.es.batch = 50;
            let tokens: Vec<Token> = (0..300 * 6).map(|i| ((i * 7 + i / 5) % 11) as Token).collect();
            let mb = Minibatch::new(&tokens[..50 * 6], 50, 5, 11).unwrap();
            let members = [0u32, 1, 2, 3, 4, 5, 6];
            let fast = member_losses(&layout, &params, &cfg, 3, &mb, &members, Backend::Fast).unwrap();
            let slow = member_losses(&layout, &params, &cfg, 3, &mb, &members, Backend::Reference).unwrap();
            for (f, s) in fast.iter().zip(&slow) {
                assert!((f - s).abs() < 1e-5, "{head:?}: {f} vs {s}");
            }
            let big = Minibatch::new(&tokens, 300, 5, 11).unwrap();
            let f = loss(&layout, &params, &big, Backend::Fast).unwrap();
            let s = loss(&layout, &params, &big, Backend::Reference).unwrap();
            assert!((f - s).abs() < 1e-5, "{head:?}: {f} vs {s}");
        }
    }

    /// A per-input head reads the block of the character just read: with
    /// every block a copy of a shared head it is that model exactly, and
    /// changing a block changes the loss only if its character is read.
    #[test]
    fn a_per_input_head_reads_the_input_s_block() {
        let (_, shared, params, tokens) = tiny(NoiseKind::LowRank { rank: 1 });
        let (_, by_input, _, _) = tiny_with(NoiseKind::LowRank { rank: 1 }, Head::ByInput);
        let (w, b) = (shared.w_out().range(), shared.b_out().range());
        let mut copied = params[..w.start].to_vec();
        for _ in 0..11 {
            copied.extend_from_slice(&params[w.clone()]);
        }
        for _ in 0..11 {
            copied.extend_from_slice(&params[b.clone()]);
        }
        assert_eq!(copied.len(), by_input.len);
        // Inputs from 0..7 only, and 9 as every sequence's last target:
        // characters 7 to 10 are never read.
        let mut tokens: Vec<Token> = tokens.iter().map(|&t| t % 7).collect();
        for s in 0..3 {
            tokens[s * 6 + 5] = 9;
        }
        let mb = Minibatch::new(&tokens, 3, 5, 11).unwrap();
        let read: Vec<usize> = (0..15).map(|i| mb.token(i / 5, i % 5)).collect();
        assert!(read.contains(&6) && !read.contains(&9));
        for backend in [Backend::Fast, Backend::Reference] {
            let base = loss(&shared, &params, &mb, backend).unwrap();
            assert_eq!(
                loss(&by_input, &copied, &mb, backend).unwrap(),
                base,
                "{backend:?}"
            );
            for tok in 0..11 {
                let mut p = copied.clone();
                p[by_input.head_for(tok).0.start + 5] += 0.5;
                p[by_input.head_for(tok).1.start + 2] -= 0.5;
                let changed = loss(&by_input, &p, &mb, backend).unwrap() != base;
                assert_eq!(changed, read.contains(&tok), "{backend:?} token {tok}");
            }
        }
    }

    #[test]
    fn full_noise_members_match_materialized_weights() {
        for (readout, head) in [
            (Readout::Es, Head::Shared),
            (Readout::Exact, Head::Shared),
            (Readout::Exact, Head::ByInput),
        ] {
            let (mut cfg, layout, params, tokens) = tiny_with(NoiseKind::Full, head);
            cfg.recipe.readout = readout;
            let mb = Minibatch::new(&tokens, 3, 5, 11).unwrap();
            let got = member_losses(&layout, &params, &cfg, 2, &mb, &[2, 3, 6], Backend::Fast).unwrap();
            for (m, g) in [2u32, 3, 6].into_iter().zip(got) {
                let p = perturbed_params(&layout, &params, &cfg, 2, m);
                let want = loss(&layout, &p, &mb, Backend::Reference).unwrap();
                assert!(
                    (g - want).abs() < 1e-5,
                    "{readout:?} {head:?} member {m}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_exact_readout_is_never_perturbed() {
        for noise in [
            NoiseKind::LowRank { rank: 1 },
            NoiseKind::LowRank { rank: 2 },
            NoiseKind::Full,
        ] {
            let (mut cfg, layout, params, tokens) = tiny(noise);
            let mb = Minibatch::new(&tokens, 3, 5, 11).unwrap();
            let es = member_losses(&layout, &params, &cfg, 1, &mb, &[0, 1, 4], Backend::Fast).unwrap();
            cfg.recipe.readout = Readout::Exact;
            let exact = member_losses(&layout, &params, &cfg, 1, &mb, &[0, 1, 4], Backend::Fast).unwrap();
            assert_ne!(es, exact, "{noise:?}: the readout's noise changed no loss");
            let p = perturbed_params(&layout, &params, &cfg, 1, 4);
            let g = crate::update::es_gradient(&layout, &cfg, 1, &[(0, 1.0), (1, -1.0), (4, 0.5)]).unwrap();
            for (id, t) in layout.iter() {
                let (moved, estimated) = (
                    p[t.range()] != params[t.range()],
                    g[t.range()].iter().any(|&x| x != 0.0),
                );
                let want = !layout.is_readout(id);
                assert_eq!((moved, estimated), (want, want), "{noise:?} {}", t.name);
            }
        }
    }

    #[test]
    fn random_init_loss_is_near_log_vocab() {
        let (_, layout, params, tokens) = tiny(NoiseKind::Full);
        let mb = Minibatch::new(&tokens, 3, 5, 11).unwrap();
        let l = loss(&layout, &params, &mb, Backend::Fast).unwrap();
        assert!((l - libm::logf(11.0)).abs() < 0.3, "{l}");
    }

    #[test]
    fn bad_input_is_an_error() {
        let (cfg, layout, params, tokens) = tiny(NoiseKind::Full);
        assert!(Minibatch::new(&tokens[1..], 3, 5, 11).is_err());
        let mut bad = tokens.clone();
        bad[4] = 11;
        assert_eq!(
            Minibatch::new(&bad, 3, 5, 11).unwrap_err(),
            Error::UnknownToken(11)
        );
        let mb = Minibatch::new(&tokens, 3, 5, 11).unwrap();
        assert_eq!(
            member_losses(&layout, &params, &cfg, 0, &mb, &[8], Backend::Fast).unwrap_err(),
            Error::Member(8)
        );
        assert!(loss(&layout, &params[1..], &mb, Backend::Fast).is_err());
    }
}
