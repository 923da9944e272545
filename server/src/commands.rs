//! The offline `seedling` actions (generate, eval, inspect) as library
//! functions.
//!
//! They take a loaded [`Checkpoint`] and plain values and return text, so
//! the CLI layer only parses arguments and prints, and tests call the very
//! same code without spawning a process.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::Backend;
use seedling_core::generate::{beam_search, sample_text};
use seedling_core::hash::weights_hash;
use seedling_core::model::Layout;
use seedling_core::rng::{DOMAIN_SAMPLE, Stream, derive};
use seedling_core::tokenizer::Token;

use crate::checkpoint::{self, Checkpoint};
use crate::data::{Corpus, VAL_SEQ_LEN, validation_windows};

/// Layout of a checkpoint's model, with its weights checked against it so
/// the core never sees a mismatched buffer.
fn layout_of(ckpt: &Checkpoint) -> Result<Layout> {
    let layout = Layout::new(ckpt.config.model);
    ensure!(
        ckpt.params.len() == layout.len,
        "checkpoint has {} weights, its model needs {}",
        ckpt.params.len(),
        layout.len
    );
    Ok(layout)
}

/// Encodes a prompt, naming a character the model has never seen. An empty
/// prompt starts from `"\n"` (the start of a line) when the vocabulary has
/// it, else from token 0; that start is then not echoed.
fn encode_prompt(ckpt: &Checkpoint, prompt: &str) -> Result<(Vec<Token>, bool)> {
    if prompt.is_empty() {
        let start = ckpt.tokenizer.id('\n').unwrap_or(0);
        return Ok((vec![start], false));
    }
    let mut out = Vec::with_capacity(prompt.len());
    for c in prompt.chars() {
        match ckpt.tokenizer.id(c) {
            Ok(t) => out.push(t),
            Err(_) => bail!(
                "the prompt has {c:?}, which is not among the model's {} characters: {:?}",
                ckpt.tokenizer.len(),
                ckpt.tokenizer.chars().iter().collect::<String>()
            ),
        }
    }
    Ok((out, true))
}

/// Continues `prompt` by `len` characters.
///
/// Without `beam`, samples at `temperature` (0 is greedy) from the `top_k`
/// most likely characters (0 = all), reproducibly for a given `seed`, and
/// returns the prompt followed by the continuation. With `beam = Some(w)`,
/// runs a width-`w` beam search and returns the beams, most likely first,
/// one per line as `<log-prob in nats> <text as a quoted, escaped string>`
/// (escaped so a newline in the text cannot break the one-per-line shape).
pub fn generate(
    ckpt: &Checkpoint,
    prompt: &str,
    len: usize,
    temperature: f32,
    top_k: usize,
    beam: Option<usize>,
    seed: u64,
) -> Result<String> {
    ensure!(
        temperature.is_finite() && temperature >= 0.0,
        "temperature must be a finite number >= 0, got {temperature}"
    );
    let layout = layout_of(ckpt)?;
    let (tokens, echo) = encode_prompt(ckpt, prompt)?;
    let shown = if echo { prompt } else { "" };
    let decode = |t: &[Token]| ckpt.tokenizer.decode(t).context("decoding generated tokens");
    match beam {
        None => {
            let mut rng = Stream::new(derive(&[DOMAIN_SAMPLE, seed]));
            let out = sample_text(&layout, &ckpt.params, &tokens, len, temperature, top_k, &mut rng)?;
            Ok(format!("{shown}{}", decode(&out)?))
        }
        Some(width) => {
            ensure!(width >= 1, "beam width must be at least 1");
            let mut s = String::new();
            for b in beam_search(&layout, &ckpt.params, &tokens, width, len)? {
                let text = format!("{shown}{}", decode(&b.tokens)?);
                writeln!(s, "{:>10.4} {text:?}", b.logprob)?;
            }
            Ok(s)
        }
    }
}

/// Result of [`eval`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean cross-entropy per predicted character, in nats (the unit the
    /// training curve and the n-gram baselines use).
    pub nats_per_char: f64,
    /// The same in bits, the unit char-level papers quote.
    pub bits_per_char: f64,
    /// Predicted characters the mean is over.
    pub tokens: usize,
}

/// Windows per forward call: bounds memory on a large validation set.
const EVAL_CHUNK: usize = 64;

/// Validation loss of the checkpoint's weights on the corpus's held-out
/// split: the same fixed windows ([`validation_windows`] of
/// [`VAL_SEQ_LEN`] + 1 characters, each starting from the zero state) the
/// training loop reports, so the numbers are comparable whatever sequence
/// length the run trained on.
pub fn eval(ckpt: &Checkpoint, corpus: &Corpus, max_windows: usize) -> Result<EvalReport> {
    if corpus.tokenizer != ckpt.tokenizer {
        bail!(
            "the corpus's vocabulary ({} characters) differs from the checkpoint's ({} characters); \
             evaluate on the text the model was trained on",
            corpus.tokenizer.len(),
            ckpt.tokenizer.len()
        );
    }
    let layout = layout_of(ckpt)?;
    let t = VAL_SEQ_LEN;
    let windows = validation_windows(&corpus.val, t, max_windows);
    let n = windows.len() / (t + 1);
    ensure!(
        n > 0,
        "the validation split has {} tokens, fewer than one window of {}",
        corpus.val.len(),
        t + 1
    );
    let mut total = 0.0f64;
    for chunk in windows.chunks(EVAL_CHUNK * (t + 1)) {
        let b = chunk.len() / (t + 1);
        let batch = Minibatch::new(chunk, b, t, layout.vocab())?;
        total += forward::loss(&layout, &ckpt.params, &batch, Backend::Fast)? as f64 * b as f64;
    }
    let nats = total / n as f64;
    Ok(EvalReport {
        nats_per_char: nats,
        bits_per_char: nats / std::f64::consts::LN_2,
        tokens: n * t,
    })
}

/// Most history rows `inspect` prints; longer histories are thinned evenly,
/// keeping the first and last point.
const INSPECT_ROWS: usize = 20;

/// A human-readable summary of a checkpoint: where it is, its run config,
/// step, parameter count and tensors, hashes and a compact loss history.
pub fn inspect(ckpt: &Checkpoint, path: &Path) -> String {
    let c = &ckpt.config;
    let layout = Layout::new(c.model);
    let mut s = String::new();
    // Writing to a String cannot fail; the `let _` keeps that visible.
    let _ = (|| -> std::fmt::Result {
        writeln!(s, "checkpoint   {}", path.display())?;
        writeln!(s, "step         {} (adam t = {})", ckpt.step, ckpt.adam.t)?;
        writeln!(s, "weights hash {:016x}", weights_hash(&ckpt.params))?;
        writeln!(s, "parameters   {}", ckpt.params.len())?;
        writeln!(
            s,
            "model        vocab {}, hidden {}, layers {}, head {:?}",
            c.model.vocab, c.model.hidden, c.model.layers, c.model.head
        )?;
        writeln!(
            s,
            "es           noise {:?}, sigma {}, population {}, batch {}, seq_len {}",
            c.es.noise, c.es.sigma, c.es.population, c.es.batch, c.es.seq_len
        )?;
        writeln!(
            s,
            "adam         lr {}, beta1 {}, beta2 {}, eps {}, weight_decay {}",
            c.adam.lr, c.adam.beta1, c.adam.beta2, c.adam.eps, c.adam.weight_decay
        )?;
        writeln!(s, "seed         {}, init_scale {}", c.seed, c.init_scale)?;
        writeln!(
            s,
            "vocabulary   {:?}",
            ckpt.tokenizer.chars().iter().collect::<String>()
        )?;
        writeln!(s, "tensors")?;
        // The shape the checkpoint file stores, and where `seedling export`
        // gives the tensor another shape, that one too.
        for t in &layout.tensors {
            let stored = checkpoint::shape(t);
            let exported = checkpoint::export::shape(&layout, t);
            let shape = if exported == stored {
                format!("{stored:?}")
            } else {
                format!("{stored:?} (exported as {exported:?})")
            };
            writeln!(s, "  {:<16} {shape}", t.name)?;
        }
        let h = &ckpt.history;
        writeln!(s, "history      {} points", h.len())?;
        if !h.is_empty() {
            writeln!(
                s,
                "  {:>10} {:>10} {:>12} {:>10} {:>10}",
                "step", "elapsed_s", "tokens", "train", "val"
            )?;
            let rows = h.len().min(INSPECT_ROWS);
            let mut last = usize::MAX;
            for i in 0..rows {
                let k = if rows == 1 {
                    0
                } else {
                    i * (h.len() - 1) / (rows - 1)
                };
                if k == last {
                    continue;
                }
                last = k;
                let p = &h[k];
                let val = p.val_loss.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
                writeln!(
                    s,
                    "  {:>10} {:>10.1} {:>12} {:>10.4} {:>10}",
                    p.step, p.elapsed_s, p.tokens, p.train_loss, val
                )?;
            }
        }
        Ok(())
    })();
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::{TEXT, trained};
    use crate::data::load_corpus;

    #[test]
    fn sampling_is_reproducible_and_starts_with_the_prompt() {
        let ckpt = trained(4);
        let a = generate(&ckpt, "the ", 40, 0.8, 0, None, 1).unwrap();
        assert!(a.starts_with("the "));
        assert_eq!(a.chars().count(), 44);
        assert_eq!(a, generate(&ckpt, "the ", 40, 0.8, 0, None, 1).unwrap());
        assert_ne!(a, generate(&ckpt, "the ", 40, 0.8, 0, None, 2).unwrap());
        // Every generated character is from the vocabulary.
        assert!(a.chars().all(|c| ckpt.tokenizer.id(c).is_ok()));
        // An empty prompt is not echoed; temperature 0 is greedy and seed-free.
        let g = generate(&ckpt, "", 10, 0.0, 0, None, 1).unwrap();
        assert_eq!(g.chars().count(), 10);
        assert_eq!(g, generate(&ckpt, "", 10, 0.0, 0, None, 9).unwrap());
    }

    #[test]
    fn beam_search_lists_beams_best_first() {
        let ckpt = trained(4);
        let out = generate(&ckpt, "dog", 6, 1.0, 0, Some(3), 0).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let scores: Vec<f32> = lines
            .iter()
            .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]) && scores[0] < 0.0,
            "{scores:?}"
        );
        assert!(
            lines
                .iter()
                .all(|l| l.trim_start().split_once(' ').unwrap().1.starts_with("\"dog"))
        );
        // Width 1 is greedy decoding.
        let greedy = generate(&ckpt, "dog", 6, 0.0, 0, None, 0).unwrap();
        let best = generate(&ckpt, "dog", 6, 1.0, 0, Some(1), 0).unwrap();
        assert!(
            best.trim_end().ends_with(&format!("{greedy:?}")),
            "{best} vs {greedy:?}"
        );
    }

    #[test]
    fn bad_prompts_and_settings_are_clear_errors() {
        let ckpt = trained(1);
        let e = generate(&ckpt, "the Zebra", 5, 1.0, 0, None, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'Z'") && e.contains("characters"), "{e}");
        assert!(generate(&ckpt, "the", 5, -1.0, 0, None, 0).is_err());
        assert!(generate(&ckpt, "the", 5, f32::NAN, 0, None, 0).is_err());
        assert!(generate(&ckpt, "the", 5, 1.0, 0, Some(0), 0).is_err());
    }

    fn corpus(text: &str) -> (tempfile::TempDir, Corpus) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        std::fs::write(&p, text).unwrap();
        let c = load_corpus(&[p]).unwrap();
        (dir, c)
    }

    #[test]
    fn eval_measures_the_held_out_windows() {
        let ckpt = trained(4);
        // The run trained on sequences of 8; eval still reads windows of 65
        // (VAL_SEQ_LEN + 1), the metric of every run whatever its seq_len.
        assert_eq!(ckpt.config.es.seq_len, 8);
        // 100 copies: the last 10% is 10 copies of TEXT (610 chars) = 9 windows of 65.
        let (_d, c) = corpus(&TEXT.repeat(100));
        let r = eval(&ckpt, &c, 100).unwrap();
        assert_eq!(r.tokens, 9 * VAL_SEQ_LEN);
        assert!((r.bits_per_char - r.nats_per_char / std::f64::consts::LN_2).abs() < 1e-12);
        // It equals the core's loss over the same windows.
        let layout = Layout::new(ckpt.config.model);
        let w = validation_windows(&c.val, VAL_SEQ_LEN, 100);
        let want = forward::loss(
            &layout,
            &ckpt.params,
            &Minibatch::new(&w, 9, VAL_SEQ_LEN, layout.vocab()).unwrap(),
            Backend::Reference,
        )
        .unwrap();
        assert!((r.nats_per_char - want as f64).abs() < 1e-4, "{r:?} vs {want}");
        // A budget of 2 windows reads only 2.
        assert_eq!(eval(&ckpt, &c, 2).unwrap().tokens, 2 * VAL_SEQ_LEN);
    }

    #[test]
    fn eval_refuses_another_vocabulary_or_too_little_text() {
        let ckpt = trained(1);
        let (_d, other) = corpus(&"abcdefgh ".repeat(30));
        let e = eval(&ckpt, &other, 10).unwrap_err().to_string();
        assert!(e.contains("vocabulary"), "{e}");
        let (_d, short) = corpus(TEXT);
        let e = eval(&ckpt, &short, 10).unwrap_err().to_string();
        assert!(e.contains("fewer than one window"), "{e}");
    }

    /// A per-input head's bias is one row per input character, in the file
    /// and in the listing; its matrix is listed with the export's shape.
    #[test]
    fn inspect_prints_a_per_input_heads_shapes() {
        let ckpt = crate::checkpoint::tests::trained_with(1, seedling_core::config::Head::ByInput);
        let v = ckpt.tokenizer.len();
        let out = inspect(&ckpt, Path::new("c"));
        assert!(out.contains(&format!("out.b            [{v}, {v}]\n")), "{out}");
        assert!(
            out.contains(&format!(
                "out.w            [{}, {v}] (exported as [{v}, 8, {v}])",
                v * 8
            )),
            "{out}"
        );
    }

    #[test]
    fn inspect_summarizes_the_checkpoint() {
        let mut ckpt = trained(3);
        ckpt.history = (0..100)
            .map(|s| crate::checkpoint::HistoryPoint {
                step: s,
                elapsed_s: s as f64,
                tokens: s * 10,
                train_loss: 4.0 - s as f32 * 0.01,
                val_loss: (s % 10 == 0).then_some(4.0),
            })
            .collect();
        let out = inspect(&ckpt, Path::new("/runs/x/ckpt-0000000003.safetensors"));
        assert!(out.contains("ckpt-0000000003.safetensors"));
        assert!(out.contains(&format!("{:016x}", weights_hash(&ckpt.params))));
        assert!(out.contains(&format!("parameters   {}", ckpt.params.len())));
        assert!(out.contains("hidden 8, layers 2") && out.contains("population 8"));
        assert!(out.contains("layers.0.w_ih") && out.contains("history      100 points"));
        let v = ckpt.tokenizer.len();
        assert!(out.contains(&format!("out.b            [{v}]\n")), "{out}");
        let rows: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.contains("elapsed_s"))
            .skip(1)
            .collect();
        assert_eq!(rows.len(), INSPECT_ROWS);
        assert!(rows[0].trim_start().starts_with("0 ") && rows[19].trim_start().starts_with("99 "));
        assert!(rows[0].ends_with("4.0000") && rows[19].ends_with('-'));
        // No history at all is fine too.
        ckpt.history.clear();
        assert!(inspect(&ckpt, Path::new("c")).contains("history      0 points"));
    }
}
