//! Idempotent installation of the tools the checks need.
//!
//! Each function first probes for the exact tool it wants and returns at once
//! when it is there (the common case costs a few milliseconds), and otherwise
//! installs it and probes again, so a "successful" install that still leaves
//! the wrong tool behind fails here rather than in a confusing later step.
//!
//! Versions are pinned because they must match things outside this file:
//! the wasm-bindgen CLI must equal the `wasm-bindgen` version in Cargo.lock
//! (`seedling-wasm` pins `=0.2.130`), and wasm-pack and binaryen are pinned so
//! that a new release can never break CI on a day nobody changed anything.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cmd::{Ctx, run, stdout_of};

/// The wasm target every browser build and wasm test compiles for.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// Must equal the `wasm-bindgen` version in Cargo.lock, or the test runner
/// and the generated glue disagree on the ABI and refuse to run.
pub const WASM_BINDGEN_VERSION: &str = "0.2.130";
/// wasm-pack drives `cargo test` on wasm and finds the runner and driver.
pub const WASM_PACK_VERSION: &str = "0.15.1";
/// npm's `binaryen` major version. Debian's binaryen (108) is too old for
/// wasm-bindgen's externref table, and wasm-pack's own download comes from
/// GitHub, which CI machines may not reach.
pub const BINARYEN_VERSION: &str = "132";
/// Debian's Chromium. Tests use the distribution's browser and driver
/// because they are the same version by construction and come from apt.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver, matching [`CHROMIUM`].
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Debian's NATS server (the `nats-server` package, 2.9 on bookworm): the
/// relay tests start it on a loopback port, a real broker rather than a mock.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// Flags Chromium needs to run headless in a container as root: no sandbox
/// (it refuses to start as root otherwise), no GPU, `/tmp` instead of a small
/// `/dev/shm`, and none of the background traffic (updates, sync, first-run
/// pages) that would wait on a network CI does not have.
pub const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
];

/// Writes the WebDriver capabilities for Debian's Chromium and returns the
/// file's path. wasm-bindgen-test-runner merges them into the new session
/// (it appends its own `headless`/`no-sandbox` arguments to ours).
pub fn webdriver_json(ctx: &Ctx) -> Result<PathBuf, String> {
    let caps = serde_json::json!({
        "goog:chromeOptions": { "binary": CHROMIUM, "args": CHROMIUM_ARGS }
    });
    let json = serde_json::to_string_pretty(&caps).expect("capabilities serialize") + "\n";
    let path = ctx.tools.join("webdriver.json");
    fs::create_dir_all(&ctx.tools)
        .and_then(|()| fs::write(&path, json))
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    Ok(path)
}

/// Debian packages the other steps rely on: the browser and its driver for
/// browser tests, Node for wasm tests under Node and for npm, a C compiler
/// for `cargo install` (some dependencies of the tools build C code), and the
/// NATS server the relay tests start.
pub fn apt_packages(ctx: &Ctx) -> Result<String, String> {
    let missing = missing_packages(ctx);
    if missing.is_empty() {
        return Ok("chromium, chromedriver, node, npm, cc, nats-server present".into());
    }
    let sudo = sudo_prefix(ctx);
    let apt = |args: &[&str]| {
        let mut cmd = ctx.cmd(sudo.unwrap_or("apt-get"));
        if sudo.is_some() {
            cmd.arg("apt-get");
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd
    };
    run(&mut apt(&["update"]))?;
    run(apt(&["install", "-y"]).args(&missing))?;
    let still_missing = missing_packages(ctx);
    if still_missing.is_empty() {
        Ok(format!("installed {}", missing.join(", ")))
    } else {
        Err(format!(
            "apt-get succeeded but these are still missing: {}",
            still_missing.join(", ")
        ))
    }
}

/// The Debian packages (by name) whose programs are not present.
fn missing_packages(ctx: &Ctx) -> Vec<&'static str> {
    let checks: [(&'static str, bool); 6] = [
        ("chromium", Path::new(CHROMIUM).is_file()),
        ("chromium-driver", Path::new(CHROMEDRIVER).is_file()),
        ("nodejs", ctx.which("node").is_some()),
        ("npm", ctx.which("npm").is_some()),
        ("build-essential", ctx.which("cc").is_some()),
        ("nats-server", Path::new(NATS_SERVER).is_file()),
    ];
    checks
        .into_iter()
        .filter(|&(_, present)| !present)
        .map(|(package, _)| package)
        .collect()
}

/// `Some("sudo")` when not root and sudo exists: apt needs root, and a
/// developer machine is usually not root while CI containers usually are.
fn sudo_prefix(ctx: &Ctx) -> Option<&'static str> {
    let uid = stdout_of(ctx.cmd("id").arg("-u"))?;
    (uid.trim() != "0" && ctx.which("sudo").is_some()).then_some("sudo")
}

/// The wasm32 standard library. `rust-toolchain.toml` lists the target, but
/// rustup only adds it when it installs the toolchain, not for one already
/// installed without it.
pub fn wasm_target(ctx: &Ctx) -> Result<String, String> {
    let installed = || {
        stdout_of(ctx.cmd("rustup").args(["target", "list", "--installed"]))
            .is_some_and(|out| out.lines().any(|line| line.trim() == WASM_TARGET))
    };
    if installed() {
        return Ok(format!("{WASM_TARGET} already installed"));
    }
    run(ctx.cmd("rustup").args(["target", "add", WASM_TARGET]))?;
    if installed() {
        Ok(format!("added {WASM_TARGET}"))
    } else {
        Err(format!(
            "`rustup target list --installed` still lacks {WASM_TARGET}"
        ))
    }
}

/// `wasm-bindgen` and `wasm-bindgen-test-runner`, at the version in Cargo.lock.
pub fn wasm_bindgen_cli(ctx: &Ctx) -> Result<String, String> {
    cargo_tool(
        ctx,
        "wasm-bindgen-cli",
        WASM_BINDGEN_VERSION,
        &["wasm-bindgen", "wasm-bindgen-test-runner"],
    )
}

/// wasm-pack, which runs the wasm tests under Node and in the browser.
pub fn wasm_pack(ctx: &Ctx) -> Result<String, String> {
    cargo_tool(ctx, "wasm-pack", WASM_PACK_VERSION, &["wasm-pack"])
}

/// Installs `krate` at exactly `version` with `cargo install` unless every
/// binary in `bins` already reports that version.
///
/// `--locked` is tried first (the versions the tool was released and tested
/// with), then dropped: wasm-bindgen-cli 0.2.130's lockfile pins a
/// webpki-roots release that is no longer in the registry, so a locked
/// install of it cannot succeed.
fn cargo_tool(ctx: &Ctx, krate: &str, version: &str, bins: &[&str]) -> Result<String, String> {
    let ok = || bins.iter().all(|bin| reports_version(ctx, bin, version));
    if ok() {
        return Ok(format!("{krate} {version} already installed"));
    }
    let exact = format!("={version}");
    let install = || {
        let mut cmd = ctx.cargo();
        cmd.args(["install", krate, "--version", &exact]);
        cmd
    };
    if let Err(err) = run(install().arg("--locked")) {
        println!("{err}; retrying without --locked");
        run(&mut install())?;
    }
    if ok() {
        Ok(format!("installed {krate} {version}"))
    } else {
        Err(format!(
            "after `cargo install`, one of {} does not report version {version}",
            bins.join(", ")
        ))
    }
}

/// True if `<bin> --version` prints `<bin> <version>`, the convention both
/// wasm-bindgen and wasm-pack follow (and the check wasm-pack itself uses).
fn reports_version(ctx: &Ctx, bin: &str, version: &str) -> bool {
    stdout_of(ctx.cmd(bin).arg("--version")).is_some_and(|out| out.split_whitespace().nth(1) == Some(version))
}

/// `wasm-opt` from npm's `binaryen`, installed under `target/tools`.
///
/// A project-local npm prefix needs no root and never shadows a system
/// binaryen for anything but our own child processes ([`Ctx::path`] puts its
/// `node_modules/.bin` first). wasm-pack uses a `wasm-opt` found on `PATH`
/// instead of downloading one.
pub fn wasm_opt(ctx: &Ctx) -> Result<String, String> {
    let modules = ctx.tools.join("node_modules");
    let bin = modules.join(".bin").join("wasm-opt");
    let wanted = format!("version {BINARYEN_VERSION}");
    // Reading the installed package's manifest costs nothing, whereas
    // `wasm-opt --version` starts Node (about half a second).
    let manifest = fs::read_to_string(modules.join("binaryen").join("package.json"));
    let prefix = format!("\"version\": \"{BINARYEN_VERSION}.");
    if bin.is_file() && manifest.is_ok_and(|json| json.contains(&prefix)) {
        return Ok(format!("wasm-opt {wanted} already installed"));
    }
    fs::create_dir_all(&ctx.tools).map_err(|err| format!("cannot create {}: {err}", ctx.tools.display()))?;
    run(ctx
        .cmd("npm")
        .args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(&ctx.tools)
        .arg(format!("binaryen@{BINARYEN_VERSION}")))?;
    // After an install, run the tool once: it must actually work, not just exist.
    if stdout_of(ctx.cmd(&bin).arg("--version")).is_some_and(|out| out.contains(&wanted)) {
        Ok(format!("installed wasm-opt {wanted}"))
    } else {
        Err(format!("{} --version does not report {wanted}", bin.display()))
    }
}

/// numpy for `scripts/seedling_eval.py` and the test that runs it
/// (`server/tests/cli.rs`); pinned like the other tools.
pub const NUMPY_VERSION: &str = "2.4.6";
/// safetensors (Python) for the same script.
pub const SAFETENSORS_VERSION: &str = "0.8.0";

/// The interpreter of the project's Python venv, `target/tools/pyenv`,
/// which `native-tests` hands to the tests as `SEEDLING_PYTHON`.
pub fn python(ctx: &Ctx) -> PathBuf {
    ctx.tools.join("pyenv").join("bin").join("python")
}

/// A Python venv under `target/tools` with pinned numpy and safetensors:
/// the test that checks a `seedling export` read from Python against
/// `seedling eval` needs them, and a venv of our own never touches the
/// system's Python packages.
pub fn python_venv(ctx: &Ctx) -> Result<String, String> {
    let python = python(ctx);
    let wanted = format!("{NUMPY_VERSION} {SAFETENSORS_VERSION}");
    let installed = || {
        stdout_of(ctx.cmd(&python).args([
            "-c",
            "import numpy, safetensors; print(numpy.__version__, safetensors.__version__)",
        ]))
        .is_some_and(|out| out.trim() == wanted)
    };
    if installed() {
        return Ok(format!(
            "numpy {NUMPY_VERSION}, safetensors {SAFETENSORS_VERSION} already in the venv"
        ));
    }
    let venv = ctx.tools.join("pyenv");
    fs::create_dir_all(&ctx.tools).map_err(|err| format!("cannot create {}: {err}", ctx.tools.display()))?;
    run(ctx.cmd("python3").args(["-m", "venv"]).arg(&venv))?;
    run(ctx.cmd(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("numpy=={NUMPY_VERSION}"),
        &format!("safetensors=={SAFETENSORS_VERSION}"),
    ]))?;
    if installed() {
        Ok(format!(
            "installed numpy {NUMPY_VERSION}, safetensors {SAFETENSORS_VERSION} into {}",
            venv.display()
        ))
    } else {
        Err(format!(
            "{} does not import numpy {NUMPY_VERSION} and safetensors {SAFETENSORS_VERSION}",
            python.display()
        ))
    }
}
