//! ES learns: on text from a known first-order Markov chain, training drives
//! the held-out loss below the chain's unigram entropy (only possible by
//! learning transitions) and toward its entropy rate.

#![cfg(not(target_arch = "wasm32"))]

use rand_core::Rng;
use seedling_core::config::ModelConfig;
use seedling_core::rng::Stream;
use seedling_core::{NoiseKind, Replica, RunConfig, batch};

const SYMBOLS: usize = 20;
/// Each state moves to three successors with these probabilities.
const SUCC: [f64; 3] = [0.6, 0.3, 0.1];

struct Chain {
    next: Vec<[usize; 3]>,
}

impl Chain {
    fn new(rng: &mut Stream) -> Self {
        let next = (0..SYMBOLS)
            .map(|_| {
                let mut s = [0usize; 3];
                let mut i = 0;
                while i < 3 {
                    let c = (rng.next_u32() as usize) % SYMBOLS;
                    if !s[..i].contains(&c) {
                        s[i] = c;
                        i += 1;
                    }
                }
                s
            })
            .collect();
        Self { next }
    }

    fn sample(&self, n: usize, rng: &mut Stream) -> Vec<u16> {
        let mut s = 0usize;
        (0..n)
            .map(|_| {
                let u = (rng.next_u32() >> 8) as f64 / (1u64 << 24) as f64;
                let k = if u < SUCC[0] {
                    0
                } else if u < SUCC[0] + SUCC[1] {
                    1
                } else {
                    2
                };
                s = self.next[s][k];
                s as u16
            })
            .collect()
    }

    /// Stationary distribution by power iteration.
    fn stationary(&self) -> Vec<f64> {
        let mut pi = vec![1.0 / SYMBOLS as f64; SYMBOLS];
        for _ in 0..10_000 {
            let mut nx = vec![0.0; SYMBOLS];
            for (i, p) in pi.iter().enumerate() {
                for (k, &j) in self.next[i].iter().enumerate() {
                    nx[j] += p * SUCC[k];
                }
            }
            pi = nx;
        }
        pi
    }
}

fn entropy(p: &[f64]) -> f64 {
    p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum()
}

#[test]
fn es_learns_markov_transitions() {
    let mut rng = Stream::new(42);
    let chain = Chain::new(&mut rng);
    let pi = chain.stationary();
    let unigram = entropy(&pi);
    let rate = entropy(&SUCC);
    let train = chain.sample(100_000, &mut rng);
    let val = chain.sample(8_192, &mut rng);

    let mut cfg = RunConfig::rw256(SYMBOLS as u32);
    cfg.seed = 7;
    cfg.model = ModelConfig {
        vocab: SYMBOLS as u32,
        hidden: 32,
        layers: 1,
        head: Default::default(),
    };
    cfg.es.noise = NoiseKind::LowRank { rank: 1 };
    cfg.es.population = 128;
    cfg.es.batch = 8;
    cfg.es.seq_len = 16;
    cfg.es.sigma = 0.05;
    cfg.adam.lr = 0.02;
    let mut r = Replica::new(cfg).unwrap();
    let t = cfg.es.seq_len as usize;
    let val_windows = batch::window_count(val.len(), t);
    let val_tokens = batch::gather(&val, &(0..val_windows).collect::<Vec<_>>(), t);
    let start = r.loss(&val_tokens, t).unwrap() as f64;
    let mut curve = Vec::new();
    for step in 0..400 {
        let tokens = batch::step_batch(&train, cfg.seed, step, 8, t).unwrap();
        r.local_step(&tokens).unwrap();
        if step % 50 == 49 {
            curve.push(r.loss(&val_tokens, t).unwrap() as f64);
        }
    }
    let end = r.loss(&val_tokens, t).unwrap() as f64;
    println!("unigram {unigram:.3} rate {rate:.3} start {start:.3} curve {curve:.3?} end {end:.3}");
    // Below the unigram entropy means the model predicts from the previous
    // symbol; demand most of the way from there to the entropy rate.
    let target = rate + 0.4 * (unigram - rate);
    assert!(
        end < target,
        "held-out {end:.3} not below {target:.3} (unigram {unigram:.3}, rate {rate:.3})"
    );
    assert!(
        end > rate - 0.05,
        "held-out {end:.3} below the entropy rate {rate:.3}: the loss is wrong"
    );
}
