//! `seedling train`: a whole run on one machine in one command.
//!
//! With ES (the default) it is `serve` plus in-process native workers
//! connected over loopback, so it exercises exactly the distributed path
//! (and browsers can join the same run at the printed address), with a
//! progress bar on top. With `--method bptt` it trains the same model with
//! exact gradients instead, the baseline the ES curve is compared against.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use seedling_core::adam;
use seedling_core::backprop;
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::Backend;
use seedling_core::model::Layout;

use crate::checkpoint;
use crate::cli::{Method, TrainArgs, shutdown_signal};
use crate::runbook::{Cadence, Opened, RunBook};
use crate::{app, commands, worker};

/// Runs `seedling train` until `--max-steps`, `--minutes` or Ctrl-C, with
/// ES through the server (the default) or the BPTT baseline.
pub async fn train(args: TrainArgs) -> anyhow::Result<()> {
    if args.method == Method::Bptt {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            flag.store(true, Ordering::Relaxed);
        });
        return tokio::task::spawn_blocking(move || train_bptt(args, stop)).await?;
    }
    let mut run = args.run_args()?;
    if run.run_dir.is_none() {
        run.run_dir = Some("runs/default".into());
    }
    let opts = run.serve_options()?;
    let listener = match tokio::net::TcpListener::bind(run.address()).await {
        Ok(l) => l,
        Err(e) if run.port.is_none() => {
            tracing::warn!("port 8080 is busy ({e}); using a free port");
            tokio::net::TcpListener::bind((run.bind.as_deref().unwrap_or("127.0.0.1"), 0)).await?
        }
        Err(e) => return Err(e).with_context(|| format!("binding {}", run.address())),
    };
    let params = opts.config;
    let server = app::start(listener, opts).await?;
    let addr = server.addr;
    println!(
        "Seedling: training a {} ({} parameters) on {}.",
        model_name(&params.model),
        server.status().params,
        server.status().data
    );
    println!("Open http://{addr}/ in a browser to add its CPU to this run. Ctrl-C stops and checkpoints.");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..args.workers.max(1) {
        let mut w = worker::WorkerOptions::new(format!("ws://{addr}/ws"));
        w.progress = None;
        if let Some(t) = args.threads {
            w.threads = t.max(1);
        }
        let mut rx = stop_rx.clone();
        workers.push(tokio::spawn(worker::run(w, async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
    }

    let bar = progress_bar(run.max_steps);
    let started = Instant::now();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let s = server.status();
        bar.set_position(s.step);
        let train = s.history.last().map_or(f32::NAN, |h| h.train_loss);
        let val = s.val_loss.map_or("-".to_string(), |v| format!("{v:.3}"));
        bar.set_message(format!(
            "train {train:.3} val {val} nats/char | {} volunteers, {:.0} members/s",
            s.volunteers.total, s.members_per_s
        ));
        // `--minutes` is the run book's budget: the run is finished when it
        // is spent, on the clock the lr schedule decays over.
        if s.finished {
            break;
        }
    }
    bar.finish();
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    let status = server.status();
    server.shutdown().await?;
    println!(
        "Stopped at step {} after {:.1} min; validation loss {}.",
        status.step,
        started.elapsed().as_secs_f64() / 60.0,
        status
            .val_loss
            .map_or("-".into(), |v| format!("{v:.3} nats/char"))
    );
    if args.sample > 0 {
        if let Some(dir) = &run.run_dir {
            let (path, ckpt) = checkpoint::open(dir)?;
            let text = commands::generate(&ckpt, "", args.sample, 0.8, 0, None, 0)?;
            println!("Sample from {}:\n{text}", path.display());
        }
    }
    Ok(())
}

/// Sequences per BPTT step when `--batch` is not given: an exact gradient
/// needs no population, so the tokens go into the minibatch instead.
pub const BPTT_BATCH: u32 = 32;

/// Largest global gradient norm of a BPTT step; longer gradients are scaled
/// down to it. Tanh RNNs now and then produce an exploding gradient, and
/// clipping is the standard guard (Pascanu et al. 2013).
pub const BPTT_CLIP: f32 = 5.0;

/// `seedling train --method bptt`: the same model trained with the exact
/// gradient (backpropagation through time) and Adam, on one thread, no
/// server. It writes the same checkpoints, with the same history (forward
/// tokens are `batch * seq_len` per step), so `seedling plot`, `eval` and
/// `generate` treat it like an ES run.
pub fn train_bptt(args: TrainArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut run = args.run_args()?;
    if run.run_dir.is_none() {
        run.run_dir = Some("runs/bptt".into());
    }
    if run.batch.is_none() {
        run.batch = Some(BPTT_BATCH);
    }
    let opts = run.serve_options()?;
    let (data, settings) = (opts.data, opts.settings);
    let dir = settings.run_dir.clone().expect("set above");
    let cadence = Cadence {
        eval_every: settings.eval_every,
        checkpoint_every: settings.checkpoint_every,
    };
    let Opened {
        mut book,
        start,
        resumed,
    } = RunBook::open(
        Some(&dir),
        &opts.config,
        &data.tokenizer,
        &data.train,
        settings.unigram_bias,
        cadence,
        Instant::now(),
    )?;
    if let Some(path) = &resumed {
        println!("Resuming {} at step {}.", path.display(), start.step);
    }
    let (mut params, mut adam, mut step) = (start.params, start.adam, start.step);
    let cfg = *book.config();
    let layout = Layout::new(cfg.model);
    println!(
        "Seedling: BPTT baseline, a {} ({} parameters) on {}, {} sequences per step.",
        model_name(&cfg.model),
        layout.len,
        data.name,
        cfg.es.batch
    );
    let t = cfg.es.seq_len as usize;
    let vt = data.val_seq_len;
    let val_batch = data.val_windows.len() / (vt + 1);
    let val = |p: &[f32]| -> anyhow::Result<Option<f32>> {
        if val_batch == 0 {
            return Ok(None);
        }
        let mb = Minibatch::new(&data.val_windows, val_batch, vt, layout.vocab())?;
        Ok(Some(forward::loss(&layout, p, &mb, Backend::Fast)?))
    };
    let bar = progress_bar(settings.max_steps);
    let started = Instant::now();
    let limit = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    while !stop.load(Ordering::Relaxed)
        && settings.max_steps.is_none_or(|m| step < m)
        && limit.is_none_or(|l| started.elapsed() < l)
    {
        let batch = seedling_core::batch::step_batch(&data.train, cfg.seed, step, cfg.es.batch as usize, t)?;
        let (loss, mut g) = backprop::loss_and_gradient(&layout, &params, &batch, t, Backend::Fast)?;
        anyhow::ensure!(loss.is_finite(), "the BPTT loss diverged at step {step}");
        let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
        // Adam takes the ascent direction of fitness, i.e. minus the gradient.
        let k = -(BPTT_CLIP / norm).min(1.0);
        g.iter_mut().for_each(|x| *x *= k);
        let lr = book.lr_for(step, Instant::now());
        adam::step(&cfg.adam, lr, &mut params, &mut adam, &g);
        step += 1;
        let v = if book.validates_at(step) {
            val(&params)?
        } else {
            None
        };
        let tokens = (cfg.es.batch * cfg.es.seq_len) as u64;
        book.record(step, Instant::now(), tokens, loss, v);
        if book.checkpoints_at(step) {
            checkpoint::save(&dir, &book.checkpoint(step, &params, &adam), settings.keep)?;
        }
        bar.set_position(step);
        let shown = book.val_loss().map_or("-".into(), |v| format!("{v:.3}"));
        bar.set_message(format!("train {loss:.3} val {shown} nats/char | |g| {norm:.2}"));
    }
    bar.finish();
    // The final point always carries a validation loss, so every run ends
    // on a measured value.
    if book.last_needs_validation() {
        book.set_last_validation(val(&params)?);
    }
    let path = checkpoint::save(&dir, &book.checkpoint(step, &params, &adam), settings.keep)?;
    println!(
        "Stopped at step {step} after {:.1} min; validation loss {}.",
        started.elapsed().as_secs_f64() / 60.0,
        book.val_loss()
            .map_or("-".into(), |v| format!("{v:.3} nats/char"))
    );
    if args.sample > 0 {
        let (_, ckpt) = checkpoint::open(&path)?;
        let text = commands::generate(&ckpt, "", args.sample, 0.8, 0, None, 0)?;
        println!("Sample from {}:\n{text}", path.display());
    }
    Ok(())
}

/// The progress bar of both methods: a bar with a known step budget, else a
/// spinner.
fn progress_bar(max_steps: Option<u64>) -> ProgressBar {
    let bar = match max_steps {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] step {pos}{len} {per_sec} {msg} ETA {eta}",
        )
        .unwrap()
        .with_key(
            "len",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                if let Some(n) = s.len() {
                    let _ = write!(w, "/{n}");
                }
            },
        ),
    );
    bar
}

/// The model as the banners name it, e.g. "1x24 tanh RNN with a head per
/// input character".
fn model_name(m: &seedling_core::ModelConfig) -> String {
    let head = match m.head {
        seedling_core::Head::Shared => "",
        seedling_core::Head::ByInput => " with a head per input character",
    };
    format!("{}x{} tanh RNN{head}", m.layers, m.hidden)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    /// `seedling train --method bptt` with a tiny model on `text`, in `run_dir`.
    fn bptt(text_file: &std::path::Path, run_dir: &std::path::Path, steps: u64) -> anyhow::Result<()> {
        let (data, dir, steps) = (
            text_file.to_str().unwrap(),
            run_dir.to_str().unwrap(),
            steps.to_string(),
        );
        let cli = Cli::try_parse_from([
            "seedling",
            "train",
            "--method",
            "bptt",
            "--data",
            data,
            "--run-dir",
            dir,
            "--hidden",
            "8",
            "--batch",
            "2",
            "--seq-len",
            "8",
            "--max-steps",
            &steps,
            "--sample",
            "0",
        ])?;
        let Command::Train(args) = cli.command else {
            unreachable!("parsed a train command")
        };
        train_bptt(args, Arc::new(AtomicBool::new(false)))
    }

    /// BPTT resumes through the same run book as ES: it continues its own
    /// checkpoint and refuses one of another vocabulary, even of the same
    /// size (which the config check alone would let through).
    #[test]
    fn bptt_resume_refuses_another_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, run) = (
            dir.path().join("a.txt"),
            dir.path().join("b.txt"),
            dir.path().join("run"),
        );
        let text = "the quick brown fox jumps over the lazy dog.\n".repeat(40);
        std::fs::write(&a, &text).unwrap();
        // The same number of characters, one of them another.
        std::fs::write(&b, text.replace('z', "Z")).unwrap();
        bptt(&a, &run, 2).unwrap();
        assert_eq!(checkpoint::latest(&run).unwrap().unwrap().1.step, 2);
        bptt(&a, &run, 3).unwrap();
        let (_, ckpt) = checkpoint::latest(&run).unwrap().unwrap();
        assert_eq!((ckpt.step, ckpt.history.len()), (3, 3));
        let e = format!("{:#}", bptt(&b, &run, 4).unwrap_err());
        assert!(e.contains("vocabulary"), "{e}");
        assert_eq!(checkpoint::latest(&run).unwrap().unwrap().1.step, 3);
    }
}
