//! What every part of xtask shares: the machine's [`Ctx`] and the helpers
//! that run programs.
//!
//! A leaf: it imports no other module of xtask, so the modules that run
//! programs (every one of them) depend on it and never on each other for it.

use std::env;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    /// The context of this checkout and this process's `PATH`.
    pub fn new() -> Self {
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

/// Runs a command with stderr inherited and stdout echoed line by line as it
/// arrives (a bench takes minutes; nobody should stare at a silent terminal),
/// returning the stdout lines once it succeeded.
pub fn run_lines(cmd: &mut Command) -> Result<Vec<String>, String> {
    let line = show(cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|err| format!("could not start `{line}`: {err}"))?;
    let mut lines = Vec::new();
    for l in BufReader::new(child.stdout.take().expect("stdout is piped")).lines() {
        let l = l.map_err(|err| format!("reading the output of `{line}`: {err}"))?;
        println!("{l}");
        lines.push(l);
    }
    let status = child
        .wait()
        .map_err(|err| format!("waiting for `{line}`: {err}"))?;
    if status.success() {
        Ok(lines)
    } else {
        Err(format!("`{line}` failed ({status})"))
    }
}
