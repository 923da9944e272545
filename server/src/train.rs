//! `seedling train`: a whole run on one machine in one command.
//!
//! It is `serve` plus in-process native workers connected over loopback, so
//! it exercises exactly the distributed path (and browsers can join the same
//! run at the printed address), with a progress bar on top.

use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{TrainArgs, open_checkpoint, shutdown_signal};
use crate::{app, commands, worker};

/// Runs `seedling train` until `--max-steps`, `--minutes` or Ctrl-C.
pub async fn train(args: TrainArgs) -> anyhow::Result<()> {
    let mut run = args.run.clone().with_file()?;
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
        "Seedling: training a {}x{} tanh RNN ({} parameters) on {}.",
        params.model.layers,
        params.model.hidden,
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

    let bar = match run.max_steps {
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
    let started = Instant::now();
    let limit = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
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
        if s.finished || limit.is_some_and(|l| started.elapsed() >= l) {
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
            let (path, ckpt) = open_checkpoint(dir)?;
            let text = commands::generate(&ckpt, "", args.sample, 0.8, 0, None, 0)?;
            println!("Sample from {}:\n{text}", path.display());
        }
    }
    Ok(())
}
