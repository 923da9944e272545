//! Runs a parsed `seedling` command line: the top of the crate, above the
//! flags ([`crate::cli`]) and every command it starts.

use anyhow::Context;

use crate::cli::{Cli, Command, data_paths, shutdown_signal};
use crate::{checkpoint, commands, data};

/// Runs a parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => crate::train::train(args).await,
        Command::Serve(args) => {
            let args = args.with_file()?;
            let opts = args.serve_options()?;
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
            println!("{text}");
            Ok(())
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
            println!(
                "validation loss {:.4} nats/char ({:.4} bits/char) over {} characters",
                r.nats_per_char, r.bits_per_char, r.tokens
            );
            Ok(())
        }
        Command::Inspect(a) => {
            let (path, ckpt) = checkpoint::open(&a.path)?;
            println!("{}", commands::inspect(&ckpt, &path));
            Ok(())
        }
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
            let x = match a.x.as_str() {
                "minutes" => crate::plot::XAxis::Minutes,
                "tokens" => crate::plot::XAxis::Tokens,
                "both" => crate::plot::XAxis::Both,
                other => anyhow::bail!("--x must be `minutes`, `tokens` or `both`, not `{other}`"),
            };
            let curves: Vec<_> = runs
                .iter()
                .map(|(name, history)| crate::plot::Curve { name, history })
                .collect();
            crate::plot::learning_curve(&curves, &baselines, x, &a.out)?;
            println!("wrote {}", a.out.display());
            Ok(())
        }
        Command::Baseline(a) => {
            let corpus = data::load_corpus(&data_paths(a.data)?)?;
            let v = corpus.tokenizer.len();
            let nats = data::ngram_baseline(&corpus.train, &corpus.val, v, a.ngram);
            println!(
                "{}-gram (add-one) validation loss {nats:.4} nats/char ({:.4} bits/char)",
                a.ngram,
                nats / std::f64::consts::LN_2
            );
            Ok(())
        }
    }
}
