//! `cargo xtask`: Seedling's project automation (matklad's xtask pattern).
//!
//! Why a Rust binary instead of shell scripts or a Makefile: it runs wherever
//! cargo runs, it is checked by the same fmt/clippy gate as the rest of the
//! workspace, and the alias in `.cargo/config.toml` makes it a plain
//! `cargo xtask <command>` with nothing else to install.
//!
//! Why no dependencies (no clap, no xshell): `cargo xtask test` is the first
//! thing a fresh machine runs, so xtask itself must build in seconds and never
//! be the thing that fails. Three subcommands and a `--only` flag do not need
//! an argument parser, and `std::process::Command` is enough to run programs.
//!
//! # Layout
//!
//! - `main.rs`: argument dispatch, the shared [`Ctx`] and command helpers.
//! - [`test`]: the ordered step list behind `cargo xtask test` and its summary.
//! - [`setup`]: the idempotent tool installs the test steps depend on.
//! - [`wasm`]: the browser volunteer's build (`www/pkg`) and the wasm benches.
//! - [`bench`]: `cargo xtask bench`, native and wasm figures side by side.
//! - [`peers`]: the JAX peer and OpenBLAS for `cargo xtask bench --peers`.
//! - [`report`]: the one benchmark table of a `cargo xtask bench` run.

mod bench;
mod fleet;
mod peers;
mod report;
mod setup;
mod test;
mod wasm;

use std::env;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

const USAGE: &str = "\
usage: cargo xtask <command> [args...]

commands:
  test [--only STEP[,STEP...]]... [--list] [--soak]
        install whatever is missing (wasm target, wasm-bindgen-cli, wasm-pack,
        wasm-opt, chromium), then run every check; this is what CI runs.
        --only runs just the named steps (plus the set-up they need);
        --list prints the steps; --soak runs only the robustness suite at
        full size (about 15 minutes).
  run [ARGS...]
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

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let ctx = Ctx::new();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
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
                    .args(rest),
            )
        }
        "bench" => bench::main(&ctx, rest),
        "fleet" => fleet::main(&ctx, rest),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n");
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// What every step needs to know about the machine, computed once.
///
/// Child processes get an explicit `PATH` instead of xtask mutating its own
/// environment (which is `unsafe` in edition 2024 and invisible to readers):
/// every command is built through [`Ctx::cmd`], so they all see the same tools.
pub struct Ctx {
    /// Workspace root: commands run here whatever directory xtask was started
    /// from, so relative paths such as `core` mean the same thing everywhere.
    pub root: PathBuf,
    /// Project-local tool directory (`target/tools`): npm packages and the
    /// generated `webdriver.json` live here, so they need no root, never touch
    /// the system and vanish with `cargo clean`.
    pub tools: PathBuf,
    /// `PATH` for children: npm's `.bin` (for `wasm-opt`) and cargo's bin
    /// directory come first, so a tool just installed by `cargo install` or
    /// npm is found even if the user's shell `PATH` lacks those directories.
    pub path: OsString,
}

impl Ctx {
    fn new() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask lives one level below the workspace root")
            .to_path_buf();
        let tools = root.join("target").join("tools");
        let mut dirs = vec![tools.join("node_modules").join(".bin"), cargo_bin_dir()];
        dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        let path = env::join_paths(dirs).expect("PATH entries never contain ':'");
        Ctx { root, tools, path }
    }

    /// A command run from the workspace root with the tool `PATH`.
    ///
    /// std resolves the program through the child's `PATH` when it is set with
    /// `env`, so freshly installed tools are found by name.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", &self.path);
        cmd
    }

    /// `cargo` through the rustup proxy, so `rust-toolchain.toml` picks the
    /// toolchain, exactly as when a developer types the command.
    pub fn cargo(&self) -> Command {
        self.cmd("cargo")
    }

    /// The first `name` on the tool `PATH`, like `which`.
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        env::split_paths(&self.path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    }
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, else `~/.cargo/bin`.
fn cargo_bin_dir() -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    home.unwrap_or_else(|| PathBuf::from(".cargo")).join("bin")
}

/// The command as a shell-like line, for logs and error messages.
pub fn show(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs a command with inherited stdio, echoing it first; any failure
/// (cannot start, non-zero exit, killed) becomes an error naming the command.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let line = show(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .map_err(|err| format!("could not start `{line}`: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{line}` failed ({status})"))
    }
}

/// The stdout of a command that succeeded, or `None`: used to probe for tools
/// (a missing program is an answer here, not an error).
pub fn stdout_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
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
