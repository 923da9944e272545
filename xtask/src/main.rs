//! `cargo xtask`: Seedling's project automation (matklad's xtask pattern).
//!
//! Why a Rust binary instead of shell scripts or a Makefile: it runs wherever
//! cargo runs, it is checked by the same fmt/clippy gate as the rest of the
//! workspace, and the alias in `.cargo/config.toml` makes it a plain
//! `cargo xtask <command>` with nothing else to install.
//!
//! Why so few dependencies (no clap, no xshell): `cargo xtask test` is the
//! first thing a fresh machine runs, so xtask itself must build in seconds
//! and never be the thing that fails. Three subcommands and a `--only` flag
//! do not need an argument parser, and `std::process::Command` is enough to
//! run programs. JSON is the exception: the benches' lines are read with
//! serde_json through `seedling-bench-record`, the schema the benches write
//! with, because a hand-written reader and writer drift apart.
//!
//! # Layout
//!
//! - `main.rs`: argument dispatch.
//! - [`cmd`]: the shared [`Ctx`] and the helpers that run programs (a leaf).
//! - [`test`]: the ordered step list behind `cargo xtask test` and its summary.
//! - [`setup`]: the idempotent tool installs the test steps depend on, and
//!   the browser's WebDriver capabilities.
//! - [`wasm`]: the browser volunteer's build (`www/pkg`) and the wasm benches.
//! - [`bench`]: `cargo xtask bench`, native and wasm figures side by side.
//! - [`peers`]: the JAX peer and OpenBLAS for `cargo xtask bench --peers`.
//! - [`report`]: the one benchmark table of a `cargo xtask bench` run.
//! - [`fleet`]: `cargo xtask fleet`, the fleet emulator, and the process
//!   handles [`screenshots`] reuses.
//! - [`screenshots`]: `cargo xtask screenshots`, the README's pictures of
//!   the page from a short real run.
//!
//! Modules depend on each other in one direction only (`main` -> `test` ->
//! `bench` -> `peers`, `report`, `wasm` -> `setup` -> `cmd`; `main` ->
//! `screenshots` -> `fleet`, `wasm`, `setup`); a test
//! in the core (`core/tests/layering.rs`) reads the sources and fails on an
//! import circle.

mod bench;
mod cmd;
mod fleet;
mod peers;
mod report;
mod screenshots;
mod setup;
mod test;
mod wasm;

use std::env;
use std::process::{Command, ExitCode};

use cmd::{Ctx, show};

const USAGE: &str = "\
usage: cargo xtask <command> [args...]

commands:
  test [--only STEP[,STEP...]]... [--list] [--soak]
        install whatever is missing (wasm target, wasm-bindgen-cli, wasm-pack,
        wasm-opt, chromium), then run every check; this is what CI runs.
        --only runs just the named steps (plus the set-up they need);
        --list prints the steps; --soak runs only the robustness suite at
        full size (about 15 minutes).
  run [--] [ARGS...]
        build the volunteer page's wasm (www/pkg), then train:
        cargo run --release -p seedling-server --bin seedling -- train ARGS
  bench [--native-only|--wasm-only] [--quick] [--peers PYTHON [--peer-script PATH]
        [--rounds N]] [--markdown FILE]... [ARGS...]
        cargo run --release -p seedling-core --example bench -- [--quick] ARGS,
        the system benchmarks (seedling-sim), then the same es-lowrank workload
        as wasm under Node and in headless Chromium, then the table of every
        figure with a target (printed; spliced into each FILE between its
        bench-table markers). --peers runs the JAX peer (PATH, default
        ../shared/peers/jax_es_step.py from the workspace root) and OpenBLAS
        with that Python, alternating with our step benches for N rounds
        (default 5, 1 with --quick)
";

/// The help: this file's commands, then those with a module of their own.
fn usage() -> String {
    format!("{USAGE}{}{}", fleet::USAGE, screenshots::USAGE)
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let ctx = Ctx::new();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    match command.as_str() {
        "test" => test::main(&ctx, rest),
        "run" => {
            // The trainer prints an address for browsers to join; without a
            // fresh www/pkg that page could not contribute (or would run an
            // older core than the server's).
            if let Err(err) = wasm::build_tools(&ctx).and_then(|()| wasm::build_pkg(&ctx)) {
                eprintln!(
                    "xtask run: could not build the volunteer page ({}): {err}\n\
                     `cargo xtask test --only wasm-pack-build` installs what the build needs; \
                     `cargo run --release -p seedling-server --bin seedling -- train` trains without it",
                    wasm::PKG_DIR
                );
                return ExitCode::FAILURE;
            }
            passthrough(
                ctx.cargo()
                    .args(["run", "--release", "-p", "seedling-server"])
                    .args(["--bin", "seedling", "--", "train"])
                    .args(trainer_args(rest)),
            )
        }
        "bench" => bench::main(&ctx, rest),
        "fleet" => fleet::main(&ctx, rest),
        "screenshots" => screenshots::main(&ctx, rest),
        "help" | "-h" | "--help" => {
            print!("{}", usage());
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n");
            eprint!("{}", usage());
            ExitCode::from(2)
        }
    }
}

/// The arguments of `cargo xtask run [--] ARGS...` for `seedling train`:
/// ARGS, without the `--` a user types out of habit to separate them (the
/// trainer would take it, and everything after it, as positional).
fn trainer_args(args: &[String]) -> &[String] {
    match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => args,
    }
}

/// Runs a long-lived command (the trainer, a benchmark) and exits with its
/// exit code, so `cargo xtask run` behaves like the command it wraps.
fn passthrough(cmd: &mut Command) -> ExitCode {
    let line = show(cmd);
    println!("$ {line}");
    match cmd.status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("xtask: `{line}` failed ({status})");
            let code = status.code().and_then(|c| u8::try_from(c).ok());
            ExitCode::from(code.filter(|&c| c != 0).unwrap_or(1))
        }
        Err(err) => {
            eprintln!("xtask: could not start `{line}`: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_drops_a_leading_separator() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            trainer_args(&args(&["--", "--port", "18080"])),
            args(&["--port", "18080"])
        );
        assert_eq!(
            trainer_args(&args(&["--port", "18080"])),
            args(&["--port", "18080"])
        );
        assert_eq!(trainer_args(&args(&[])), args(&[]));
        // Only the first: a later `--` is the trainer's business.
        assert_eq!(trainer_args(&args(&["--", "--"])), args(&["--"]));
    }
}
