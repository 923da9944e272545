//! The cell comparison of docs/LEARNING.md: the tanh RNN against a minGRU
//! ([`seedling_core::mingru`]) at about the same parameter count, trained by
//! the same ES on tiny-shakespeare for the same forward-token budget.
//!
//! Both cells get identical machinery, so only the cell differs: full-rank
//! antithetic Gaussian noise (the minGRU has no low-rank kernel), centered
//! ranks, Adam, one training sequence per step shared by every member (the
//! server's recipe), and the server's validation metric (256 fixed windows
//! of 65 characters from the zero state). One thread; members run one after
//! the other, so wall times are not comparable with `seedling train`'s.
//!
//! `--rank1` draws EGGROLL's rank-1 noise (materialized) instead of
//! full-rank noise, as the server does. Two switches test what limits
//! learning per token: `--pair-data` gives
//! every antithetic pair its own training sequence (the step's minibatch has
//! `population / 2` sequences) instead of one shared by all members, and
//! `--pair-ranks` ranks the pairs' loss differences instead of the members'
//! losses (with a sequence per pair, the members' losses mostly rank the
//! sequences' difficulty).
//!
//! `--exact-readout` replaces ES's estimate for the tanh RNN's readout by
//! its exact gradient on the step's sequence, as the server's default recipe
//! does ([`seedling_core::readout`]); members are still perturbed there
//! unless `--no-readout-noise` also takes the readout out of the noise, as
//! the server's recipe does. `--seen-rows` keeps ES's estimate for the
//! input matrix to the rows of characters the step's sequences read, as the
//! server's recipe does ([`seedling_core::update::keep_seen_rows`]).
//! `--unigram` starts the output bias at the training text's character
//! log-frequencies, the server's default.
//!
//! ```sh
//! cargo run --release -p seedling-server --example cells -- --cell mingru --hidden 12
//! ```

use std::time::Instant;

use anyhow::{Context, Result, bail};
use seedling_core::adam::{self, AdamState};
use seedling_core::batch::step_batch;
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::Backend;
use seedling_core::mingru::MinGru;
use seedling_core::model::Layout;
use seedling_core::rng::{derive, fill_normal};
use seedling_core::shaping::centered_ranks;
use seedling_core::tokenizer::Token;
use seedling_core::{AdamConfig, ModelConfig};
use seedling_server::data::{self, VAL_SEQ_LEN};

/// Noise domain of this study, apart from the run's streams.
const DOMAIN_CELLS: u64 = 0xce11;

enum Cell {
    Tanh(Layout),
    MinGru(MinGru),
}

impl Cell {
    fn len(&self) -> usize {
        match self {
            Cell::Tanh(l) => l.len,
            Cell::MinGru(m) => m.len(),
        }
    }

    /// `(rows, cols)` of each tensor in layout order; one row is a vector.
    fn shapes(&self) -> Vec<(usize, usize)> {
        match self {
            Cell::Tanh(l) => l
                .tensors
                .iter()
                .map(|t| {
                    if t.is_matrix {
                        (t.rows, t.cols)
                    } else {
                        (1, t.len())
                    }
                })
                .collect(),
            Cell::MinGru(m) => m.shapes().to_vec(),
        }
    }

    fn init(&self, seed: u64) -> Vec<f32> {
        match self {
            Cell::Tanh(l) => l.init_params(seed, 1.0),
            Cell::MinGru(m) => m.init_params(seed, 1.0),
        }
    }

    fn loss(&self, params: &[f32], tokens: &[Token], seq_len: usize) -> Result<f32> {
        Ok(match self {
            Cell::Tanh(l) => {
                let mb = Minibatch::new(tokens, tokens.len() / (seq_len + 1), seq_len, l.vocab())?;
                forward::loss(l, params, &mb, Backend::Fast)?
            }
            Cell::MinGru(m) => m.loss(params, tokens, seq_len)?,
        })
    }
}

/// EGGROLL's rank-1 noise, materialized: each matrix gets the outer product
/// `a b^T` of two Gaussian vectors, each vector plain Gaussian noise. Same
/// covariance as full-rank noise, fewer random numbers, and the structure
/// the server's kernels use.
fn rank1_noise(shapes: &[(usize, usize)], key: u64, out: &mut [f32], factors: &mut Vec<f32>) {
    let mut at = 0;
    for (id, &(rows, cols)) in shapes.iter().enumerate() {
        let dst = &mut out[at..at + rows * cols];
        let key = derive(&[key, id as u64]);
        if rows == 1 {
            fill_normal(key, dst);
        } else {
            factors.resize(rows + cols, 0.0);
            fill_normal(key, factors);
            let (a, b) = factors.split_at(rows);
            for (row, &ai) in dst.chunks_exact_mut(cols).zip(a) {
                for (d, &bj) in row.iter_mut().zip(b) {
                    *d = ai * bj;
                }
            }
        }
        at += rows * cols;
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} needs a value")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cell_name: String = flag(&args, "--cell", "tanh".to_string())?;
    let hidden: usize = flag(&args, "--hidden", 16)?;
    let population: usize = flag(&args, "--population", 512)?;
    let seq_len: usize = flag(&args, "--seq-len", 64)?;
    let budget: u64 = flag(&args, "--budget", 20_000_000)?;
    let sigma: f32 = flag(&args, "--sigma", 0.02)?;
    let seed: u64 = flag(&args, "--seed", 0)?;
    let adam_cfg = AdamConfig {
        lr: flag(&args, "--lr", 1e-2)?,
        ..AdamConfig::default()
    };
    let pair_data = args.iter().any(|a| a == "--pair-data");
    let pair_ranks = args.iter().any(|a| a == "--pair-ranks");
    let rank1 = args.iter().any(|a| a == "--rank1");
    let exact_readout = args.iter().any(|a| a == "--exact-readout");
    let no_readout_noise = args.iter().any(|a| a == "--no-readout-noise");
    let unigram = args.iter().any(|a| a == "--unigram");
    let seen_rows = args.iter().any(|a| a == "--seen-rows");
    if population < 2 || !population.is_multiple_of(2) {
        bail!("--population must be even and at least 2");
    }
    let corpus = data::load_corpus(&[data::find_default_corpus()?])?;
    let vocab = corpus.tokenizer.len();
    let cell = match cell_name.as_str() {
        "tanh" => Cell::Tanh(Layout::new(ModelConfig {
            vocab: vocab as u32,
            hidden: hidden as u32,
            layers: 1,
            head: Default::default(),
        })),
        "mingru" => Cell::MinGru(MinGru { vocab, hidden }),
        other => bail!("--cell must be `tanh` or `mingru`, not `{other}`"),
    };
    let bigram = data::ngram_baseline(&corpus.train, &corpus.val, vocab, 2);
    let val_windows = data::validation_windows(&corpus.val, VAL_SEQ_LEN, 256);
    let d = cell.len();
    let mut params = cell.init(seed);
    // The readout (W_out, b_out) of the tanh RNN: its exact gradient needs
    // no backward pass through time, only the forward's hidden states.
    let readout = match &cell {
        Cell::Tanh(l) if exact_readout => Some(l.w_out().offset..l.len),
        _ if exact_readout => bail!("--exact-readout needs --cell tanh"),
        _ => None,
    };
    if unigram {
        let Cell::Tanh(l) = &cell else {
            bail!("--unigram needs --cell tanh")
        };
        data::set_unigram_output_bias(l, &mut params, &corpus.train);
    }
    let mut state = AdamState::new(d);
    let per_step = (population * seq_len) as u64;
    let steps = budget / per_step;
    let every = (steps / 20).max(1);
    let (mut best, mut crossed) = (f32::INFINITY, None);
    let started = Instant::now();
    let mut eps = vec![0.0f32; population / 2 * d];
    let mut member = vec![0.0f32; d];
    let mut losses = Vec::with_capacity(population);
    let mut grad = vec![0.0f32; d];
    let mut coefs = Vec::with_capacity(population / 2);
    println!(
        "{cell_name} 1x{hidden}: {d} parameters, {steps} steps of {population} members x {seq_len} tokens{}{}{}",
        if pair_data { ", a sequence per pair" } else { "" },
        if pair_ranks { ", pair ranks" } else { "" },
        if rank1 { ", rank-1 noise" } else { "" }
    );
    let w = seq_len + 1;
    let shapes = cell.shapes();
    let mut factors = Vec::new();
    for step in 0..steps {
        let sequences = if pair_data { population / 2 } else { 1 };
        let tokens = step_batch(&corpus.train, seed, step, sequences, seq_len)?;
        losses.clear();
        for (pair, e) in eps.chunks_exact_mut(d).enumerate() {
            let key = derive(&[DOMAIN_CELLS, seed, step, pair as u64]);
            if rank1 {
                rank1_noise(&shapes, key, e, &mut factors);
            } else {
                fill_normal(key, e);
            }
            if let (Some(r), true) = (&readout, no_readout_noise) {
                e[r.clone()].fill(0.0);
            }
            let seq = &tokens[(pair % sequences) * w..(pair % sequences + 1) * w];
            for sign in [1.0f32, -1.0] {
                for ((m, p), x) in member.iter_mut().zip(&params).zip(e.iter()) {
                    *m = p + sign * sigma * x;
                }
                let m = losses.len() as u32;
                losses.push((m, cell.loss(&member, seq, seq_len)?));
            }
        }
        // Each pair's coefficient: the + member's weight minus the - one's.
        coefs.clear();
        if pair_ranks {
            let diffs: Vec<(u32, f32)> = losses
                .chunks_exact(2)
                .zip(0..)
                .map(|(l, p)| (p, l[0].1 - l[1].1))
                .collect();
            coefs.extend(centered_ranks(&diffs)?.into_iter().map(|(_, q)| q));
        } else {
            let weights = centered_ranks(&losses)?;
            coefs.extend(weights.chunks_exact(2).map(|w| w[0].1 - w[1].1));
        }
        grad.fill(0.0);
        let scale = 1.0 / (population as f32 * sigma);
        for (e, c) in eps.chunks_exact(d).zip(&coefs) {
            let c = c * scale;
            for (g, x) in grad.iter_mut().zip(e) {
                *g += c * x;
            }
        }
        if let (true, Cell::Tanh(l)) = (seen_rows, &cell) {
            let mb = Minibatch::new(&tokens, sequences, seq_len, l.vocab())?;
            seedling_core::update::keep_seen_rows(l, &mb, &mut grad)?;
        }
        if let (Some(_), Cell::Tanh(l)) = (&readout, &cell) {
            let mb = Minibatch::new(&tokens[..w], 1, seq_len, l.vocab())?;
            seedling_core::readout::overwrite_readout(l, &params, &mb, &mut grad)?;
        }
        adam::step(&adam_cfg, adam_cfg.lr, &mut params, &mut state, &grad);
        if (step + 1) % every == 0 || step + 1 == steps {
            let v = cell.loss(&params, &val_windows, VAL_SEQ_LEN)?;
            let tokens = (step + 1) * per_step;
            best = best.min(v);
            if crossed.is_none() && (v as f64) <= bigram {
                crossed = Some(tokens);
            }
            println!("{:>7.1}M tokens  val {v:.3}", tokens as f64 / 1e6);
        }
    }
    let last = cell.loss(&params, &val_windows, VAL_SEQ_LEN)?;
    println!(
        "{cell_name} 1x{hidden} ({d} parameters): {:.1}M tokens, val {last:.3}, best {best:.3}, \
         bigram ({bigram:.3}) passed at {}, {:.1} min",
        (steps * per_step) as f64 / 1e6,
        crossed.map_or("-".to_string(), |t| format!("{:.1}M tokens", t as f64 / 1e6)),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
