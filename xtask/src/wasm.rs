//! The browser volunteer's build (`www/pkg`) and the wasm half of
//! `cargo xtask bench`.
//!
//! `www/pkg` is generated, not committed (it is gitignored): the page's wasm
//! must come from the sources in this checkout, or a browser would join a run
//! with a different core than the server's. So every command that needs the
//! page builds it first: the `wasm-pack-build` test step (the whole-page
//! browser tests load it) and `cargo xtask run` (so the address it prints
//! serves a page that can contribute).

use std::fs;
use std::process::Command;

use seedling_bench_record::{Record, records};

use crate::cmd::{Ctx, run, run_lines};
use crate::setup::{self, CHROMEDRIVER};

/// Where wasm-pack writes the page's module, relative to the workspace root.
pub const PKG_DIR: &str = "www/pkg";
/// The optimized module inside [`PKG_DIR`]; the browser tests check for it.
pub const WASM_FILE: &str = "seedling_wasm_bg.wasm";

/// The set-up `wasm-pack build` needs (no browser, unlike the tests).
pub fn build_tools(ctx: &Ctx) -> Result<(), String> {
    setup::wasm_target(ctx)?;
    setup::wasm_bindgen_cli(ctx)?;
    setup::wasm_pack(ctx)?;
    setup::wasm_opt(ctx)?;
    Ok(())
}

/// Builds `www/pkg` in release, with wasm-opt, and returns a note with the
/// module's size.
///
/// `--mode no-install` keeps wasm-pack from downloading anything: it uses the
/// pinned wasm-bindgen and npm's wasm-opt found on [`Ctx::path`]. A stale
/// module is removed first, so a failed build can never leave an old one
/// behind for the browser tests to pass against.
pub fn build_pkg(ctx: &Ctx) -> Result<String, String> {
    let wasm = ctx.root.join(PKG_DIR).join(WASM_FILE);
    if wasm.exists() {
        fs::remove_file(&wasm).map_err(|err| format!("cannot remove stale {}: {err}", wasm.display()))?;
    }
    let mut cmd = ctx.cmd("wasm-pack");
    one_codegen_unit(&mut cmd)
        .args(["build", "--target", "web", "--release", "--mode", "no-install"])
        .args(["--out-dir", "../www/pkg", "wasm-client"]);
    run(&mut cmd)?;
    let bytes = fs::metadata(&wasm)
        .map_err(|err| format!("wasm-pack succeeded but {} is missing: {err}", wasm.display()))?
        .len();
    let note = format!(
        "{PKG_DIR}/{WASM_FILE}: {bytes} bytes ({:.1} KiB)",
        bytes as f64 / 1024.0
    );
    println!("{note}");
    Ok(note)
}

/// Compiles the wasm crates of `cmd` (a `wasm-pack build` or `test`) in one
/// codegen unit, so the page's module and the bench's are the same code.
///
/// With release's default 16 units, rustc splits `seedling-core` into units
/// by module and LLVM inlines only within a unit, so what the forward pass
/// inlines depends on unrelated code: a module the bench never calls can
/// decide whether the fused forward pass stays a function of its own or
/// becomes part of its caller, and that moves Chromium's figure by a fifth
/// with no change on its path. One unit makes the wasm depend only on the
/// code it runs. It is set for these commands alone, not in the root
/// `Cargo.toml`'s release profile, because the native build is faster with
/// many units (with one, the CI performance check's native es/inference
/// ratio falls below its floor). Build
/// scripts and proc macros, the host artifacts of a wasm build, take their
/// codegen units from the `build-override` profile, which this does not
/// set, so nothing native is rebuilt; wasm32 libraries get their own copies
/// beside the test steps' (the hash in their file names covers the
/// profile), and only `seedling-wasm`'s cdylib, whose file name has no
/// hash, is recompiled when a test step and a bench alternate.
fn one_codegen_unit(cmd: &mut Command) -> &mut Command {
    cmd.env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
}

/// The wasm-opt passes of the page's module (`wasm-client/Cargo.toml` gives
/// wasm-pack the same list; a test checks they agree), which the wasm bench
/// applies too, so its figure is the page's speed.
///
/// After `-O`, `--optimize-added-constants-propagate` folds `x + constant`
/// address arithmetic into the loads' offset field, which V8 folds into the
/// x86 addressing mode: LLVM's wasm backend leaves it as a separate add (its
/// loop strength reduction drops the no-wrap flag the fold needs), and V8
/// then spends an instruction on every such address, in the GEMM's inner
/// loop too (about 5% of the low-rank evaluation in Node). The fold is exact
/// unless `x + constant` wraps below 1 KiB, which `--low-memory-unused`
/// asserts never happens: Rust's wasm32 layout puts the stack first, growing
/// down towards address 0 from 1 MiB, so only a stack overflow reaches there.
pub const WASM_OPT_FLAGS: &[&str] = &[
    "-O",
    "--low-memory-unused",
    "--optimize-added-constants-propagate",
];

/// A directory to put first on `PATH` for `wasm-pack test`: its
/// `wasm-bindgen-test-runner` optimizes the test module with
/// [`WASM_OPT_FLAGS`] (as `wasm-pack build` does for the page; `wasm-pack
/// test` runs no wasm-opt) and then runs the real runner on it. wasm-pack
/// finds the runner next to `wasm-bindgen`, hence the link to the real one.
fn optimizing_runner(ctx: &Ctx) -> Result<std::path::PathBuf, String> {
    let find = |name: &str| {
        ctx.which(name)
            .ok_or_else(|| format!("`{name}` is not on the tool PATH"))
    };
    let (runner, bindgen, wasm_opt) = (
        find("wasm-bindgen-test-runner")?,
        find("wasm-bindgen")?,
        find("wasm-opt")?,
    );
    let dir = ctx.tools.join("bench-runner");
    let err = |what: &str, err: std::io::Error| format!("{what} in {}: {err}", dir.display());
    fs::create_dir_all(&dir).map_err(|e| err("cannot create the directory", e))?;
    // wasm-bindgen's DWARF reader rejects wasm-opt's rewritten line tables;
    // the bench needs no debug info.
    let script = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask bench` (xtask/src/wasm.rs): wasm-opt, then the real runner.\n\
         in=\"$1\"; shift\n\
         out=\"${{in%.wasm}}.opt.wasm\"\n\
         '{}' --strip-dwarf {} \"$in\" -o \"$out\" || exit 1\n\
         exec '{}' \"$out\" \"$@\"\n",
        wasm_opt.display(),
        WASM_OPT_FLAGS.join(" "),
        runner.display()
    );
    let path = dir.join("wasm-bindgen-test-runner");
    fs::write(&path, script).map_err(|e| err("cannot write the runner", e))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .map_err(|e| err("cannot chmod the runner", e))?;
    let link = dir.join("wasm-bindgen");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&bindgen, &link).map_err(|e| err("cannot link wasm-bindgen", e))?;
    Ok(dir)
}

/// Where a wasm bench runs.
#[derive(Clone, Copy)]
pub enum WasmTarget {
    Node,
    Chromium,
}

impl WasmTarget {
    /// The `target` value the bench's JSON line carries.
    pub fn name(self) -> &'static str {
        match self {
            WasmTarget::Node => "wasm-node",
            WasmTarget::Chromium => "wasm-chromium",
        }
    }
}

/// Runs the tests of `wasm-client/tests/bench.rs` whose names contain
/// `filter` (`full_` for `cargo xtask bench`, `quick_` for the CI
/// performance check) on `target` and returns the benchmark records they
/// logged, echoing all output.
///
/// `--test bench` selects the file; the other test steps pass `--test web`,
/// so the bench runs only when asked for.
pub fn bench(ctx: &Ctx, target: WasmTarget, filter: &str) -> Result<Vec<Record>, String> {
    setup::wasm_opt(ctx)?;
    let runner_dir = optimizing_runner(ctx)?;
    let path = std::env::join_paths(std::iter::once(runner_dir).chain(std::env::split_paths(&ctx.path)))
        .map_err(|err| format!("cannot build PATH: {err}"))?;
    let mut cmd = ctx.cmd("wasm-pack");
    one_codegen_unit(&mut cmd).env("PATH", path).arg("test");
    match target {
        WasmTarget::Node => {
            cmd.arg("--node");
        }
        WasmTarget::Chromium => {
            cmd.args(["--headless", "--chrome", "--chromedriver", CHROMEDRIVER])
                .env("CHROMEDRIVER", CHROMEDRIVER)
                .env("WASM_BINDGEN_TEST_WEBDRIVER_JSON", setup::webdriver_json(ctx)?)
                // In a dedicated Web Worker, as the volunteer page runs the
                // kernel. On the page's main thread the bench blocks the
                // renderer for its whole run (four RW-256 steps, 25 s on a
                // quiet machine), and chromedriver gives up on a renderer
                // that has not answered for 30 s ("Timed out receiving
                // message from renderer"): under load the browser run failed.
                .env("WASM_BINDGEN_USE_DEDICATED_WORKER", "1");
            // The runner allows chromedriver 5 s to bind its port, which a
            // machine busy compiling can exceed.
            if std::env::var_os("WASM_BINDGEN_TEST_DRIVER_TIMEOUT").is_none() {
                cmd.env("WASM_BINDGEN_TEST_DRIVER_TIMEOUT", "60");
            }
        }
    }
    cmd.args(["--release", "--mode", "no-install", "wasm-client"]);
    cmd.args(["--test", "bench"]);
    // One warm-up and three timed RW-256 steps take about half a minute, past
    // the runner's default 20 s for a whole binary.
    if std::env::var_os("WASM_BINDGEN_TEST_TIMEOUT").is_none() {
        cmd.env("WASM_BINDGEN_TEST_TIMEOUT", "600");
    }
    // The runner shows a passing test's console output only when told not to
    // capture it.
    cmd.args(["--", "--nocapture", filter]);
    records(&run_lines(&mut cmd)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_and_bench_use_the_same_wasm_opt_flags() {
        let manifest = include_str!("../../wasm-client/Cargo.toml");
        let quoted: Vec<String> = WASM_OPT_FLAGS.iter().map(|f| format!("\"{f}\"")).collect();
        let line = format!("wasm-opt = [{}]", quoted.join(", "));
        assert!(
            manifest.lines().any(|l| l.trim() == line),
            "wasm-client/Cargo.toml lacks `{line}`"
        );
    }
}
