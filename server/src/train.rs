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
    let args = args.with_file()?;
    if args.method() == Method::Bptt {
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
    for _ in 0..args.workers() {
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

    let started = Instant::now();
    let limit = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let mut progress = Progress::for_stderr(run.max_steps, limit, started);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let reading = |s: &crate::coordinator::Status| Reading {
        step: s.step,
        tokens: s.history.last().map_or(0, |h| h.tokens),
        train_loss: s.history.last().map(|h| h.train_loss),
        val_loss: s.val_loss,
        extra: format!(
            "{} volunteers, {} members/s",
            s.volunteers.total,
            fmt_rate(s.members_per_s)
        ),
    };
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let s = server.status();
        progress.update(&reading(&s), Instant::now());
        // `--minutes` is the run book's budget: the run is finished when it
        // is spent, on the clock the lr schedule decays over.
        if s.finished {
            break;
        }
    }
    progress.finish(&reading(&server.status()), Instant::now());
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
    if args.sample() > 0
        && let Some(dir) = &run.run_dir
    {
        let (path, ckpt) = checkpoint::open(dir)?;
        let text = commands::generate(&ckpt, "", args.sample(), 0.8, 0, None, 0)?;
        println!("Sample from {}:\n{text}", path.display());
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
    let started = Instant::now();
    let limit = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let mut progress = Progress::for_stderr(settings.max_steps, limit, started);
    let mut last = Reading::default();
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
        last = Reading {
            step,
            tokens: book.history().last().map_or(0, |h| h.tokens),
            train_loss: Some(loss),
            val_loss: book.val_loss(),
            extra: format!("|g| {norm:.2}"),
        };
        progress.update(&last, Instant::now());
    }
    // The final point always carries a validation loss, so every run ends
    // on a measured value.
    if book.last_needs_validation() {
        book.set_last_validation(val(&params)?);
    }
    last.val_loss = book.val_loss();
    progress.finish(&last, Instant::now());
    let path = checkpoint::save(&dir, &book.checkpoint(step, &params, &adam), settings.keep)?;
    println!(
        "Stopped at step {step} after {:.1} min; validation loss {}.",
        started.elapsed().as_secs_f64() / 60.0,
        book.val_loss()
            .map_or("-".into(), |v| format!("{v:.3} nats/char"))
    );
    if args.sample() > 0 {
        let (_, ckpt) = checkpoint::open(&path)?;
        let text = commands::generate(&ckpt, "", args.sample(), 0.8, 0, None, 0)?;
        println!("Sample from {}:\n{text}", path.display());
    }
    Ok(())
}

/// One reading of a run's progress, for [`Progress`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    /// Steps done.
    pub step: u64,
    /// Forward tokens evaluated so far (all members).
    pub tokens: u64,
    /// The latest step's training loss.
    pub train_loss: Option<f32>,
    /// The latest validation loss.
    pub val_loss: Option<f32>,
    /// Method-specific detail (volunteers and member rate, or the gradient norm).
    pub extra: String,
}

/// Seconds between progress lines when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// How progress reaches the operator: a live bar on a terminal, and a line
/// every [`LOG_EVERY`] otherwise (nohup, CI, a service), so a log shows the
/// run advancing rather than nothing between the banner and the end.
enum Sink {
    /// indicatif's bar (a spinner when there is neither budget nor step limit).
    Bar(ProgressBar),
    /// Plain lines to a writer.
    Log {
        out: Box<dyn std::io::Write + Send>,
        every: Duration,
        last: Option<Instant>,
    },
}

/// Progress of both methods. With `--minutes` the bar runs over the time
/// budget (its position is seconds), so its ETA is the real time left;
/// with only `--max-steps` it runs over steps.
pub struct Progress {
    sink: Sink,
    started: Instant,
    max_steps: Option<u64>,
    budget: Option<Duration>,
    /// The step and time the rate is measured from (moved every [`LOG_EVERY`]).
    mark: (Instant, u64),
    /// Steps per second over the latest window.
    rate: Option<f64>,
}

impl Progress {
    /// A bar if stderr is a terminal, else log lines on stderr.
    pub fn for_stderr(max_steps: Option<u64>, budget: Option<Duration>, started: Instant) -> Self {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            Self::bar(max_steps, budget, started)
        } else {
            Self::log(Box::new(std::io::stderr()), LOG_EVERY, max_steps, budget, started)
        }
    }

    /// Log lines to `out`, at most one per `every` (and one at the end).
    pub fn log(
        out: Box<dyn std::io::Write + Send>,
        every: Duration,
        max_steps: Option<u64>,
        budget: Option<Duration>,
        started: Instant,
    ) -> Self {
        let sink = Sink::Log {
            out,
            every,
            last: None,
        };
        Self::with_sink(sink, max_steps, budget, started)
    }

    fn bar(max_steps: Option<u64>, budget: Option<Duration>, started: Instant) -> Self {
        let len = budget.map(|b| b.as_secs().max(1)).or(max_steps);
        let bar = match len {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        let template = if len.is_some() {
            "{spinner} [{elapsed_precise}] {bar:20} {msg} | ETA {eta}"
        } else {
            "{spinner} [{elapsed_precise}] {msg}"
        };
        bar.set_style(ProgressStyle::with_template(template).expect("a valid template"));
        Self::with_sink(Sink::Bar(bar), max_steps, budget, started)
    }

    fn with_sink(sink: Sink, max_steps: Option<u64>, budget: Option<Duration>, started: Instant) -> Self {
        Self {
            sink,
            started,
            max_steps,
            budget,
            mark: (started, 0),
            rate: None,
        }
    }

    /// Time left: the budget's rest, or the steps left at the current
    /// rate, whichever ends first.
    fn time_left(&self, step: u64, now: Instant) -> Option<Duration> {
        let by_time = self.budget.map(|b| b.saturating_sub(now - self.started));
        let by_steps = match (self.max_steps, self.rate) {
            (Some(m), Some(r)) if r > 0.0 => Some(Duration::from_secs_f64(m.saturating_sub(step) as f64 / r)),
            _ => None,
        };
        match (by_time, by_steps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The progress line: step, steps/s, tokens, losses, the detail, time left.
    fn line(&self, r: &Reading, now: Instant) -> String {
        let step = match self.max_steps {
            Some(m) => format!("step {}/{m}", r.step),
            None => format!("step {}", r.step),
        };
        let rate = self.rate.map_or("-".into(), fmt_rate);
        let loss = |l: Option<f32>| l.map_or("-".into(), |v| format!("{v:.3}"));
        let mut line = format!(
            "{step} | {rate} steps/s | {} tokens | train {} val {} nats/char",
            fmt_count(r.tokens),
            loss(r.train_loss),
            loss(r.val_loss)
        );
        if !r.extra.is_empty() {
            line.push_str(&format!(" | {}", r.extra));
        }
        if let Some(left) = self.time_left(r.step, now) {
            line.push_str(&format!(" | {} left", fmt_duration(left)));
        }
        line
    }

    /// Shows a reading taken at `now`.
    pub fn update(&mut self, r: &Reading, now: Instant) {
        let since = now.saturating_duration_since(self.mark.0);
        if since >= Duration::from_secs(1) && r.step >= self.mark.1 {
            self.rate = Some((r.step - self.mark.1) as f64 / since.as_secs_f64());
            if since >= LOG_EVERY {
                self.mark = (now, r.step);
            }
        }
        let line = self.line(r, now);
        let elapsed = now.saturating_duration_since(self.started).as_secs();
        match &mut self.sink {
            Sink::Bar(bar) => {
                bar.set_position(if self.budget.is_some() { elapsed } else { r.step });
                bar.set_message(line);
            }
            Sink::Log { out, every, last } => {
                if last.is_none_or(|t| now.saturating_duration_since(t) >= *every) {
                    *last = Some(now);
                    let _ = writeln!(out, "[{}] {line}", fmt_duration(Duration::from_secs(elapsed)));
                }
            }
        }
    }

    /// Ends the bar, or logs the final line.
    pub fn finish(&mut self, r: &Reading, now: Instant) {
        match &mut self.sink {
            Sink::Bar(bar) => bar.finish(),
            Sink::Log { last, .. } => {
                *last = None;
                self.update(r, now);
            }
        }
    }
}

/// A rate with three significant digits (`0.123`, `12.3`, `1234`): enough
/// to compare runs, without the noise of `3.2134/s`.
pub fn fmt_rate(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// A count with a metric suffix: `950`, `12.3k`, `4.56M`, `1.20G`.
pub fn fmt_count(n: u64) -> String {
    let x = n as f64;
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{}k", fmt_rate(x / 1e3)),
        1_000_000..1_000_000_000 => format!("{}M", fmt_rate(x / 1e6)),
        _ => format!("{}G", fmt_rate(x / 1e9)),
    }
}

/// A duration as `45s`, `12m 05s` or `2h 03m`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s / 60 % 60),
    }
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

    /// A `Write` whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn reading(step: u64) -> Reading {
        Reading {
            step,
            tokens: step * 16_384,
            train_loss: Some(2.5),
            val_loss: (step >= 10).then_some(2.25),
            extra: "1 volunteers, 512 members/s".into(),
        }
    }

    /// Without a terminal, progress is a line every 5 s (not one per
    /// reading, not none), with the rate, tokens, losses and the real time
    /// left of a `--minutes` budget.
    #[test]
    fn a_log_gets_a_progress_line_every_five_seconds() {
        let out = Shared::default();
        let t0 = Instant::now();
        let budget = Some(Duration::from_secs(60));
        let mut p = Progress::log(Box::new(out.clone()), LOG_EVERY, None, budget, t0);
        // A reading every 250 ms for 12 s, two steps a second.
        for i in 0..=48u64 {
            p.update(&reading(i / 2), t0 + Duration::from_millis(250 * i));
        }
        p.finish(&reading(24), t0 + Duration::from_secs(12));
        let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 4, "{log}");
        assert!(
            lines[0].starts_with("[0s] step 0 | - steps/s | 0 tokens"),
            "{log}"
        );
        assert_eq!(
            lines[1],
            "[5s] step 10 | 2.00 steps/s | 164k tokens | train 2.500 val 2.250 nats/char \
             | 1 volunteers, 512 members/s | 55s left"
        );
        assert!(lines[2].starts_with("[10s] step 20 | 2.00 steps/s") && lines[2].ends_with("50s left"));
        assert!(lines[3].starts_with("[12s] step 24") && lines[3].ends_with("48s left"));
        // With a step limit too, the nearer end counts.
        let mut p = Progress::log(Box::new(Shared::default()), LOG_EVERY, Some(30), budget, t0);
        p.update(&reading(0), t0);
        p.update(&reading(10), t0 + Duration::from_secs(5));
        assert!(
            p.line(&reading(10), t0 + Duration::from_secs(5))
                .contains("step 10/30")
        );
        assert_eq!(
            p.time_left(10, t0 + Duration::from_secs(5)),
            Some(Duration::from_secs(10))
        );
    }

    /// On a terminal with `--minutes`, the bar runs over seconds, so its
    /// ETA is the budget's rest rather than a guess from steps.
    #[test]
    fn a_timed_bar_is_sized_by_time() {
        let t0 = Instant::now();
        let mut p = Progress::bar(Some(1000), Some(Duration::from_secs(120)), t0);
        p.update(&reading(3), t0 + Duration::from_secs(30));
        let Sink::Bar(bar) = &p.sink else {
            unreachable!("a bar")
        };
        assert_eq!((bar.length(), bar.position()), (Some(120), 30));
        let p = Progress::bar(Some(1000), None, t0);
        let Sink::Bar(bar) = &p.sink else {
            unreachable!("a bar")
        };
        assert_eq!(bar.length(), Some(1000));
    }

    #[test]
    fn rates_and_counts_have_three_significant_digits() {
        assert_eq!(fmt_rate(0.012345), "0.012");
        assert_eq!(fmt_rate(3.21345), "3.21");
        assert_eq!(fmt_rate(12.345), "12.3");
        assert_eq!(fmt_rate(1234.5), "1234");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_count(163_840), "164k");
        assert_eq!(fmt_count(4_560_000), "4.56M");
        assert_eq!(fmt_duration(Duration::from_secs(725)), "12m 05s");
        assert_eq!(fmt_duration(Duration::from_secs(7380)), "2h 03m");
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
