//! ES estimates the gradient.
//!
//! On a tiny model, the true gradient of the minibatch loss is measured by
//! central finite differences; the ES estimate is then built exactly as the
//! system builds it (member losses at a step, centered ranks, `es_gradient`)
//! and must point along `-grad` (it is the ascent direction of fitness
//! `-loss`), more and more so as the population grows.
//!
//! What to expect. For a locally linear loss with gradient `g` in `d`
//! dimensions, an antithetic pair contributes `f(+eps) - f(-eps) = 2 sigma
//! eps.g`, so `N` members give an average over `N / 2` independent terms
//! `(eps.g) eps`. Each term has mean `g` and, in every direction orthogonal to
//! `g`, variance `|g|^2`, so the estimate is `g + e` with `|e|^2 ~ 2 d |g|^2 /
//! N` and `cos ~ 1 / sqrt(1 + 2d / N)`. Centered ranks replace `eps.g` by a
//! bounded monotone score, which costs a few percent (the rank of a Gaussian
//! correlates with it at sqrt(3 / pi) ~ 0.98). With `d = 157` here:
//!
//! | N   | predicted cos |
//! |-----|---------------|
//! | 8   | ~0.16         |
//! | 64  | ~0.41         |
//! | 512 | ~0.79         |
//!
//! Low-rank noise has the same identity covariance on matrices (`E[(A B^T /
//! sqrt r)_ij (A B^T / sqrt r)_kl] = delta_ik delta_jl`), so the same figures
//! hold up to its heavier tails. The assertions leave wide margins: each
//! per-step cosine has a spread of about `1 / sqrt(d) ~ 0.08`, and averaging
//! over `STEPS` independent noise draws shrinks that to ~0.015.
#![cfg(not(target_arch = "wasm32"))]

use seedling_core::config::{AdamConfig, EsConfig, ModelConfig, NoiseKind, RunConfig};
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::Backend;
use seedling_core::model::Layout;
use seedling_core::shaping::centered_ranks;
use seedling_core::tokenizer::Token;
use seedling_core::update::es_gradient;

const VOCAB: u32 = 5;
const BATCH: u32 = 4;
const SEQ_LEN: u32 = 6;
const SIGMA: f32 = 1e-2;
const STEPS: u64 = 32;
const POPULATIONS: [u32; 3] = [8, 64, 512];

fn config(noise: NoiseKind, population: u32) -> RunConfig {
    RunConfig {
        seed: 1234,
        model: ModelConfig {
            vocab: VOCAB,
            hidden: 8,
            layers: 1,
            head: Default::default(),
        },
        es: EsConfig {
            noise,
            sigma: SIGMA,
            population,
            batch: BATCH,
            seq_len: SEQ_LEN,
            lag: 0,
        },
        adam: AdamConfig::default(),
        init_scale: 1.0,
        recipe: Default::default(),
    }
}

/// A fixed minibatch with structure to learn (a noisy cycle through the vocabulary).
fn tokens() -> Vec<Token> {
    (0..BATCH * (SEQ_LEN + 1))
        .map(|i| ((i + i / 3 + (i * i) % 2) % VOCAB) as Token)
        .collect()
}

fn loss(layout: &Layout, params: &[f32], mb: &Minibatch) -> f64 {
    forward::loss(layout, params, mb, Backend::Reference).unwrap() as f64
}

/// Central differences with step `h`, one coordinate at a time.
fn fd_gradient(layout: &Layout, params: &[f32], mb: &Minibatch, h: f32) -> Vec<f64> {
    let mut p = params.to_vec();
    (0..p.len())
        .map(|i| {
            let x = p[i];
            p[i] = x + h;
            let up = loss(layout, &p, mb);
            p[i] = x - h;
            let down = loss(layout, &p, mb);
            p[i] = x;
            // The step actually taken, after f32 rounding of x +- h.
            let span = ((x + h) as f64) - ((x - h) as f64);
            (up - down) / span
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    dot(a, b) / (norm(a) * norm(b))
}

/// The system's ES step, up to the gradient: every member's loss at `step`,
/// centered ranks, `es_gradient`.
fn es_estimate(cfg: &RunConfig, layout: &Layout, params: &[f32], mb: &Minibatch, step: u64) -> Vec<f64> {
    let members: Vec<u32> = (0..cfg.es.population).collect();
    let losses = forward::member_losses(layout, params, cfg, step, mb, &members, Backend::Fast).unwrap();
    let pairs: Vec<(u32, f32)> = members.into_iter().zip(losses).collect();
    let weights = centered_ranks(&pairs).unwrap();
    let g = es_gradient(layout, cfg, step, &weights).unwrap();
    g.into_iter().map(f64::from).collect()
}

#[test]
fn es_estimates_the_gradient() {
    let start = std::time::Instant::now();
    let base = config(NoiseKind::Full, 2);
    let layout = Layout::new(base.model);
    let params = layout.init_params(7, 1.0);
    let toks = tokens();
    let mb = Minibatch::new(&toks, BATCH as usize, SEQ_LEN as usize, VOCAB as usize).unwrap();
    let l0 = loss(&layout, &params, &mb);
    let d = layout.len;
    assert_eq!(d, 157);

    // --- The finite-difference gradient, and checks that it is the gradient.
    let grad = fd_gradient(&layout, &params, &mb, 1e-3);
    let grad_coarse = fd_gradient(&layout, &params, &mb, 2e-3);
    let gnorm = norm(&grad);
    // Two step sizes agree: truncation (O(h^2)) and rounding (~1e-7 / h)
    // errors are both far below the gradient's size.
    let diff: Vec<f64> = grad.iter().zip(&grad_coarse).map(|(a, b)| a - b).collect();
    println!(
        "loss {l0:.5}, |grad| {gnorm:.4}, |fd(1e-3) - fd(2e-3)| {:.2e}",
        norm(&diff)
    );
    assert!(gnorm > 1e-2, "gradient too small to test against: {gnorm}");
    assert!(norm(&diff) < 1e-2 * gnorm, "finite differences disagree");
    // A small step along -grad lowers the loss by about eta * |grad|, and a
    // step along +grad raises it.
    let eta = 1e-2;
    let moved = |sign: f64| -> f64 {
        let p: Vec<f32> = params
            .iter()
            .zip(&grad)
            .map(|(&x, &g)| (x as f64 + sign * eta * g / gnorm) as f32)
            .collect();
        loss(&layout, &p, &mb)
    };
    let (down, up) = (l0 - moved(-1.0), moved(1.0) - l0);
    println!(
        "step of {eta} along -grad: loss -{down:.3e} (linear prediction {:.3e})",
        eta * gnorm
    );
    assert!(down > 0.0 && up > 0.0);
    assert!(
        (down / (eta * gnorm) - 1.0).abs() < 0.1,
        "descent {down} vs {}",
        eta * gnorm
    );
    assert!(
        (up / (eta * gnorm) - 1.0).abs() < 0.1,
        "ascent {up} vs {}",
        eta * gnorm
    );

    // --- ES against -grad.
    let descent: Vec<f64> = grad.iter().map(|g| -g).collect();
    println!("cosine(ES estimate, -grad), mean (min..max) over {STEPS} steps, d = {d}, sigma = {SIGMA}");
    println!("  predicted (Gaussian, linear loss) 1 / sqrt(1 + 2d/N):");
    for n in POPULATIONS {
        println!(
            "    N = {n:3}: {:.3}",
            1.0 / (1.0 + 2.0 * d as f64 / n as f64).sqrt()
        );
    }
    for noise in [NoiseKind::Full, NoiseKind::LowRank { rank: 1 }] {
        let mut means = Vec::new();
        for n in POPULATIONS {
            let cfg = config(noise, n);
            let cos: Vec<f64> = (0..STEPS)
                .map(|step| cosine(&es_estimate(&cfg, &layout, &params, &mb, step), &descent))
                .collect();
            let mean = cos.iter().sum::<f64>() / cos.len() as f64;
            let (lo, hi) = cos.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &c| {
                (a.min(c), b.max(c))
            });
            println!("  {noise:?} N = {n:3}: {mean:.3} ({lo:.3}..{hi:.3})");
            means.push(mean);
        }
        // Clearly positive at every size: well over 5 standard errors (~0.015) from 0.
        assert!(means[0] > 0.08, "{noise:?}: N = 8 mean cosine {:.3}", means[0]);
        // Rising with the population, each by far more than the noise.
        assert!(means[1] > means[0] + 0.1, "{noise:?}: {means:?}");
        assert!(means[2] > means[1] + 0.1, "{noise:?}: {means:?}");
        // Predicted ~0.79 at N = 512; 0.6 leaves room for ranks and tails.
        assert!(means[2] > 0.6, "{noise:?}: N = 512 mean cosine {:.3}", means[2]);
    }
    println!("elapsed {:.2?}", start.elapsed());
}

/// The exact gradient (BPTT) agrees with the finite differences above, and
/// lets the ES cosine be measured where finite differences are too costly:
/// on a 1x64 model of tiny-shakespeare's vocabulary size (d = 12,545, a
/// size the learning study trains), where the prediction is
/// `1 / sqrt(1 + 2d/N)`, about 0.14 at N = 512 and 0.36 at N = 4096.
#[test]
fn es_cosine_with_the_exact_gradient() {
    use seedling_core::backprop::loss_and_gradient;
    // The tiny model: BPTT against central differences.
    let base = config(NoiseKind::Full, 2);
    let layout = Layout::new(base.model);
    let params = layout.init_params(7, 1.0);
    let toks = tokens();
    let mb = Minibatch::new(&toks, BATCH as usize, SEQ_LEN as usize, VOCAB as usize).unwrap();
    let fd = fd_gradient(&layout, &params, &mb, 1e-3);
    let (_, exact) =
        loss_and_gradient(&layout, &params, &toks, SEQ_LEN as usize, Backend::Reference).unwrap();
    let exact: Vec<f64> = exact.into_iter().map(f64::from).collect();
    let diff: Vec<f64> = fd.iter().zip(&exact).map(|(a, b)| a - b).collect();
    // The finite differences themselves agree to ~1e-3 relative (see above).
    assert!(norm(&diff) < 1e-2 * norm(&fd), "BPTT {:.3e} off FD", norm(&diff));

    // A study-sized model on structured text.
    let vocab = 65u32;
    let mut cfg = config(NoiseKind::LowRank { rank: 1 }, 512);
    cfg.model = ModelConfig {
        vocab,
        hidden: 64,
        layers: 1,
        head: Default::default(),
    };
    cfg.es.batch = 1;
    cfg.es.seq_len = 64;
    cfg.es.sigma = 0.02;
    let layout = Layout::new(cfg.model);
    let d = layout.len;
    assert_eq!(d, 12_545);
    let params = layout.init_params(3, 1.0);
    let toks: Vec<Token> = (0..65u32).map(|i| ((i * 7 + i / 5) % vocab) as Token).collect();
    let mb = Minibatch::new(&toks, 1, 64, vocab as usize).unwrap();
    let (_, g) = loss_and_gradient(&layout, &params, &toks, 64, Backend::Fast).unwrap();
    let descent: Vec<f64> = g.into_iter().map(|x| -f64::from(x)).collect();
    let mut means = Vec::new();
    for n in [512u32, 4096] {
        cfg.es.population = n;
        let cos: Vec<f64> = (0..4)
            .map(|step| cosine(&es_estimate(&cfg, &layout, &params, &mb, step), &descent))
            .collect();
        let mean = cos.iter().sum::<f64>() / cos.len() as f64;
        let predicted = 1.0 / (1.0 + 2.0 * d as f64 / n as f64).sqrt();
        println!("d = {d}, N = {n}: cosine {mean:.3} (predicted {predicted:.3}), per step {cos:.3?}");
        means.push((mean, predicted));
    }
    // Each measured cosine is within a factor 1.3 of the prediction, and 8x
    // the members give a clearly better estimate.
    for &(m, p) in &means {
        assert!(m > p / 1.3 && m < p * 1.3, "{means:?}");
    }
    assert!(means[1].0 > 1.8 * means[0].0, "{means:?}");
}
