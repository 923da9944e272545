//! Runs a parsed `seedling` command line: the top of the crate, above the
//! flags ([`crate::cli`]) and every command it starts.

use std::fmt::Display;
use std::io::{ErrorKind, Write};
use std::path::Path;

use anyhow::Context;

use crate::app::ServeOptions;
use crate::cli::{Cli, Command, data_paths, shutdown_signal};
use crate::{checkpoint, commands, data};

/// Writes `text` and a newline to `out`. A closed pipe
/// (`seedling inspect RUN | head -1`) ends the output quietly, as in any
/// Unix filter: the reader has what it wanted, so it is not an error.
pub fn print_to(out: &mut dyn Write, text: impl Display) -> anyhow::Result<()> {
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// [`print_to`] on stdout.
fn print(text: impl Display) -> anyhow::Result<()> {
    print_to(&mut std::io::stdout().lock(), text)
}

/// What an operator should hear before `serve` starts: a page directory
/// that does not exist (every page request would 404), one without the
/// wasm build in `pkg/` (the page loads but cannot compute), no page at
/// all, and no `--run-dir` (no checkpoints, so a restart starts over).
pub fn serve_warnings(opts: &ServeOptions) -> Vec<String> {
    let mut out = Vec::new();
    match &opts.www {
        None => out.push(
            "no volunteer page found (no --www and no www/ here): browsers that open the address get 404s".into(),
        ),
        Some(dir) if !dir.is_dir() => out.push(format!(
            "--www {} does not exist: browsers that open the address get 404s",
            dir.display()
        )),
        Some(dir) if !dir.join("pkg").is_dir() => out.push(format!(
            "{} is missing: the page loads but cannot run; build it with `cargo xtask run` (or `cargo xtask test --only wasm-pack-build`)",
            dir.join("pkg").display()
        )),
        Some(_) => {}
    }
    if opts.settings.run_dir.is_none() {
        out.push(
            "no --run-dir: this run writes no checkpoints, and a restart starts it over from step 0".into(),
        );
    }
    out
}

/// `seedling export`: the checkpoint's weights for other tools.
fn export(checkpoint_path: &Path, out: &Path) -> anyhow::Result<()> {
    let (path, ckpt) = checkpoint::open(checkpoint_path)?;
    checkpoint::export::export(&ckpt, out)?;
    print(format_args!(
        "wrote {} (step {} of {}, {} weights)",
        out.display(),
        ckpt.step,
        path.display(),
        ckpt.params.len()
    ))
}

/// Runs a parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => crate::train::train(args).await,
        Command::Serve(serve) => {
            let args = serve.run_args()?;
            let mut opts = args.serve_options()?;
            opts.nats = serve.nats_options()?;
            for w in serve_warnings(&opts) {
                tracing::warn!("{w}");
            }
            let listener = tokio::net::TcpListener::bind(args.address())
                .await
                .with_context(|| format!("binding {}", args.address()))?;
            println!(
                "Seedling server at http://{}/ (volunteers: ws://{}/ws)",
                listener.local_addr()?,
                listener.local_addr()?
            );
            crate::app::run(listener, opts, shutdown_signal()).await
        }
        Command::Relay(args) => {
            let opts = args.relay_options()?;
            let address = format!("{}:{}", args.bind, args.port);
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .with_context(|| format!("binding {address}"))?;
            println!(
                "Seedling relay {} at http://{}/ (volunteers: ws://{}/ws), coordinator over {}",
                opts.id,
                listener.local_addr()?,
                listener.local_addr()?,
                opts.nats.url
            );
            crate::relay::run(listener, opts, shutdown_signal()).await
        }
        Command::Worker(args) => {
            let mut opts = crate::worker::WorkerOptions::new(args.server);
            if let Some(t) = args.threads {
                opts.threads = t.max(1);
            }
            crate::duty::CPU_SHARE.set_percent(args.cpu_percent);
            opts.name = args.name;
            opts.identity = Some(
                args.identity_file
                    .unwrap_or_else(crate::worker::default_identity_file),
            );
            crate::worker::run(opts, shutdown_signal()).await
        }
        Command::Generate(a) => {
            let (_, ckpt) = checkpoint::open(&a.checkpoint)?;
            let text = commands::generate(&ckpt, &a.prompt, a.len, a.temperature, a.top_k, a.beam, a.seed)?;
            print(text)
        }
        Command::Eval(a) => {
            let (_, ckpt) = checkpoint::open(&a.checkpoint)?;
            let paths = if a.data.is_empty() {
                vec![data::find_default_corpus()?]
            } else {
                a.data
            };
            let corpus = data::load_corpus(&paths)?;
            let r = commands::eval(&ckpt, &corpus, a.windows)?;
            print(format_args!(
                "validation loss {:.6} nats/char ({:.6} bits/char) over {} characters",
                r.nats_per_char, r.bits_per_char, r.tokens
            ))
        }
        Command::Inspect(a) => {
            let (path, ckpt) = checkpoint::open(&a.path)?;
            print(commands::inspect(&ckpt, &path))
        }
        Command::Export(a) => export(&a.checkpoint, &a.out),
        Command::Plot(a) => {
            let mut runs = Vec::new();
            for (i, path) in a.checkpoint.iter().enumerate() {
                let (_, ckpt) = checkpoint::open(path)?;
                let name = a.label.get(i).cloned().unwrap_or_else(|| {
                    let p = if path.is_dir() {
                        path.as_path()
                    } else {
                        path.parent().unwrap_or(path)
                    };
                    p.file_name()
                        .map_or("run".into(), |n| n.to_string_lossy().into_owned())
                });
                runs.push((name, ckpt.history));
            }
            let corpus = data::load_corpus(&data_paths(a.data)?)?;
            let v = corpus.tokenizer.len();
            let baselines = [
                ("unigram", data::ngram_baseline(&corpus.train, &corpus.val, v, 1)),
                ("bigram", data::ngram_baseline(&corpus.train, &corpus.val, v, 2)),
            ];
            let curves: Vec<_> = runs
                .iter()
                .map(|(name, history)| crate::plot::Curve { name, history })
                .collect();
            crate::plot::learning_curve(&curves, &baselines, a.x, &a.out)?;
            print(format_args!("wrote {}", a.out.display()))
        }
        Command::Baseline(a) => {
            let corpus = data::load_corpus(&data_paths(a.data)?)?;
            let v = corpus.tokenizer.len();
            let nats = data::ngram_baseline(&corpus.train, &corpus.val, v, a.ngram);
            print(format_args!(
                "{}-gram (add-one) validation loss {nats:.4} nats/char ({:.4} bits/char)",
                a.ngram,
                nats / std::f64::consts::LN_2
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cli::RunArgs;

    /// The options `serve --data TEXT --www WWW [--run-dir]` would run with.
    fn options(dir: &Path, www: PathBuf, run_dir: bool) -> ServeOptions {
        let text = dir.join("t.txt");
        std::fs::write(&text, "the quick brown fox jumps over the lazy dog.\n".repeat(30)).unwrap();
        RunArgs {
            data: vec![text],
            www: Some(www),
            run_dir: run_dir.then(|| dir.join("run")),
            ..RunArgs::default()
        }
        .serve_options()
        .unwrap()
    }

    #[test]
    fn serve_warns_of_a_missing_page_build_or_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www");
        let w = serve_warnings(&options(dir.path(), www.clone(), true));
        assert!(w.len() == 1 && w[0].contains("does not exist"), "{w:?}");
        std::fs::create_dir(&www).unwrap();
        let w = serve_warnings(&options(dir.path(), www.clone(), true));
        assert!(w.len() == 1 && w[0].contains("pkg is missing"), "{w:?}");
        std::fs::create_dir(www.join("pkg")).unwrap();
        assert!(serve_warnings(&options(dir.path(), www.clone(), true)).is_empty());
        let w = serve_warnings(&options(dir.path(), www, false));
        assert!(w.len() == 1 && w[0].contains("no --run-dir"), "{w:?}");
    }

    #[test]
    fn a_closed_pipe_is_not_an_error() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        assert!(print_to(&mut Closed, "text").is_ok());
    }
}
