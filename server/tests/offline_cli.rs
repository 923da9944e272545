//! The offline path end to end through the public API, as the `seedling`
//! CLI drives it: load a corpus, train a little, checkpoint, resume the
//! newest checkpoint, then generate, eval and inspect from it.

use std::fs;

use seedling_core::batch::step_batch;
use seedling_core::config::{AdamConfig, EsConfig, ModelConfig, NoiseKind, RunConfig};
use seedling_core::replica::Replica;
use seedling_server::checkpoint::{self, Checkpoint, HistoryPoint};
use seedling_server::commands;
use seedling_server::data::{self, load_corpus};
use seedling_server::runbook;

#[test]
fn train_checkpoint_resume_generate_eval_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let text = "It is a truth universally acknowledged, that a single man in possession \
                of a good fortune, must be in want of a wife.\n"
        .repeat(20);
    fs::write(dir.path().join("book.txt"), &text).unwrap();
    let corpus = load_corpus(&[dir.path().join("book.txt")]).unwrap();
    let vocab = corpus.tokenizer.len();
    let config = RunConfig {
        seed: 3,
        model: ModelConfig {
            vocab: vocab as u32,
            hidden: 16,
            layers: 1,
            head: Default::default(),
        },
        es: EsConfig {
            noise: NoiseKind::LowRank { rank: 1 },
            sigma: 0.05,
            population: 16,
            batch: 4,
            seq_len: 16,
            lag: 0,
        },
        adam: AdamConfig {
            lr: 0.02,
            ..AdamConfig::default()
        },
        init_scale: 1.0,
        recipe: Default::default(),
    };

    let ckpts = dir.path().join("ckpts");
    let mut replica = Replica::new(config).unwrap();
    let mut history = Vec::new();
    for s in 0..6u64 {
        let batch = step_batch(&corpus.train, config.seed, s, 4, 16).unwrap();
        let train_loss = replica.local_step(&batch).unwrap();
        history.push(HistoryPoint {
            step: s,
            elapsed_s: s as f64,
            tokens: (s + 1) * config.batch_tokens() as u64,
            train_loss,
            val_loss: None,
        });
        if s % 2 == 1 {
            let ckpt = Checkpoint {
                config,
                tokenizer: corpus.tokenizer.clone(),
                step: replica.step,
                params: replica.params.clone(),
                adam: replica.adam.clone(),
                history: history.clone(),
                lr_override: None,
                versions: Vec::new(),
                contributors: Vec::new(),
            };
            checkpoint::save(&ckpts, &ckpt, 2).unwrap();
        }
    }
    assert_eq!(checkpoint::list(&ckpts).unwrap().len(), 2);

    // Resume: the newest checkpoint is the replica as it is now.
    let (path, ckpt) = checkpoint::latest(&ckpts).unwrap().unwrap();
    assert_eq!(path, ckpts.join(checkpoint::file_name(6)));
    runbook::check_resumable(&ckpt, &config, &corpus.tokenizer).unwrap();
    let resumed =
        Replica::from_snapshot(ckpt.config, ckpt.step, ckpt.params.clone(), ckpt.adam.clone()).unwrap();
    assert_eq!(resumed.hash(), replica.hash());
    assert_eq!(ckpt.history.len(), 6);

    let out = commands::generate(&ckpt, "a single", 30, 0.7, 10, None, 42).unwrap();
    assert!(out.starts_with("a single") && out.chars().count() == 38);
    let beams = commands::generate(&ckpt, "a", 5, 1.0, 0, Some(2), 0).unwrap();
    assert_eq!(beams.lines().count(), 2);

    let report = commands::eval(&ckpt, &corpus, 8).unwrap();
    // Windows of 65 characters whatever the training seq_len: the 236
    // held-out characters hold 3.
    assert!(report.nats_per_char.is_finite() && report.tokens == 3 * data::VAL_SEQ_LEN);
    // A fresh model is near uniform; the eval is of the same order.
    assert!(report.nats_per_char < 2.0 * (vocab as f64).ln(), "{report:?}");
    let unigram = data::ngram_baseline(&corpus.train, &corpus.val, vocab, 1);
    assert!(unigram < (vocab as f64).ln());

    let summary = commands::inspect(&ckpt, &path);
    assert!(summary.contains("step         6") && summary.contains("history      6 points"));
}
