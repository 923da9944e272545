//! `cargo xtask test`: the one command that checks everything.
//!
//! Steps run in a fixed order, cheapest and most likely to fail first after
//! set-up, and the run stops at the first failure: a later step's output would
//! only bury the cause. The final line is always `N passed, M failed`, which
//! CI logs and humans can both read at a glance.
//!
//! `--soak` runs only the robustness suite at full size (the [`SOAK`] step);
//! the default run covers the same tests at small sizes in `native-tests`.
//!
//! # How wasm tests run
//!
//! All of them go through `wasm-pack test --mode no-install`: wasm-pack builds
//! the tests for wasm32 and hands them to `wasm-bindgen-test-runner` as
//! cargo's target runner. `no-install` forbids wasm-pack from downloading
//! anything; it finds the pinned `wasm-bindgen-test-runner` on `PATH` (it
//! accepts it because its version equals the one in Cargo.lock) and is told
//! where Debian's chromedriver is with `--chromedriver`.
//!
//! The runner reads browser capabilities from the file named by
//! `WASM_BINDGEN_TEST_WEBDRIVER_JSON` (default: `webdriver.json` in the
//! crate being tested). xtask writes one into `target/tools` naming
//! Debian's Chromium binary and the flags it needs in a container, so no crate
//! has to carry a copy. Browser runs also set `WASM_BINDGEN_USE_BROWSER=1`:
//! a test binary without `wasm_bindgen_test_configure!(run_in_browser)`
//! (all of core's) counts as a Node test, which `--chrome` would silently skip.
//!
//! `chrome-wasm-client` names its targets (`--lib --test web`) because
//! `wasm-client/tests/bench.rs` is a benchmark, run only by
//! `cargo xtask bench`: minutes of timing would prove nothing here.
//!
//! # Python
//!
//! `python-venv` makes `target/tools/pyenv` with pinned numpy and
//! safetensors, and `native-tests` names its interpreter in
//! `SEEDLING_PYTHON`: `server/tests/cli.rs` checks that
//! `scripts/seedling_eval.py` scores a `seedling export` as `seedling eval`
//! does.
//!
//! # The whole page
//!
//! `wasm-pack-build` builds `www/pkg` exactly as `cargo xtask run` does, before
//! `native-tests`, because `tests/tests/browser.rs` (part of the native tests)
//! serves the real page to headless Chromium and fails without it.
//! `fleet-smoke` then runs the fleet emulator's smoke run, two native
//! workers and two headless tabs over delaying proxies with steps in
//! flight, on the release binary.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cmd::{Ctx, run, stdout_of};
use crate::setup::{self, CHROMEDRIVER, WASM_TARGET};
use crate::{bench, fleet, wasm};

/// One step of `cargo xtask test`.
struct Step {
    /// Name used by `--only` and in the summary.
    name: &'static str,
    /// One line saying what the step proves, printed when it starts.
    about: &'static str,
    /// Set-up steps this one cannot run without; `--only` pulls them in.
    /// They always come earlier in [`STEPS`].
    needs: &'static [&'static str],
    /// Runs the step; `Ok` carries an optional note for the summary.
    run: fn(&Ctx) -> Result<String, String>,
}

/// Tools the wasm test steps (under Node and in Chromium) need.
const WASM_TEST_TOOLS: &[&str] = &["apt-packages", "wasm32-target", "wasm-bindgen-cli", "wasm-pack"];

/// Every step, in the order it runs. Set-up comes first so that a missing
/// tool is reported as such, not as a confusing failure of a later check.
const STEPS: &[Step] = &[
    Step {
        name: "apt-packages",
        about: "Debian chromium, chromium-driver, nodejs, npm, C compiler",
        needs: &[],
        run: setup::apt_packages,
    },
    Step {
        name: "wasm32-target",
        about: "rustup target wasm32-unknown-unknown",
        needs: &[],
        run: setup::wasm_target,
    },
    Step {
        name: "wasm-bindgen-cli",
        about: "wasm-bindgen-cli, same version as Cargo.lock's wasm-bindgen",
        needs: &["apt-packages"],
        run: setup::wasm_bindgen_cli,
    },
    Step {
        name: "wasm-pack",
        about: "wasm-pack (pinned)",
        needs: &["apt-packages"],
        run: setup::wasm_pack,
    },
    Step {
        name: "wasm-opt",
        about: "wasm-opt from npm binaryen into target/tools",
        needs: &["apt-packages"],
        run: setup::wasm_opt,
    },
    Step {
        name: "python-venv",
        about: "Python venv in target/tools/pyenv with pinned numpy and safetensors",
        needs: &[],
        run: setup::python_venv,
    },
    Step {
        name: "fmt",
        about: "code is rustfmt-formatted",
        needs: &[],
        run: |ctx| cargo(ctx, &["fmt", "--all", "--", "--check"]),
    },
    Step {
        name: "clippy",
        about: "no clippy warnings in any crate or target",
        needs: &[],
        run: |ctx| {
            let args = ["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"];
            cargo(ctx, &args)
        },
    },
    Step {
        name: "no-std-wasm",
        about: "seedling-core builds without std for wasm32 (architecture invariant)",
        needs: &["wasm32-target"],
        run: |ctx| {
            let args = ["build", "-p", "seedling-core", "--no-default-features"];
            cargo(ctx, &[&args[..], &["--target", WASM_TARGET]].concat())
        },
    },
    Step {
        name: "wasm-pack-build",
        about: "the volunteer page's wasm (www/pkg), release, wasm-opt",
        needs: &["wasm32-target", "wasm-bindgen-cli", "wasm-pack", "wasm-opt"],
        run: wasm::build_pkg,
    },
    Step {
        name: "native-tests",
        about: "every crate's tests, natively, in release (with the whole-page browser tests)",
        // tests/tests/browser.rs drives the real page in Chromium: it needs
        // www/pkg and the browser, and fails (never skips) without them.
        // server/tests/cli.rs reads a `seedling export` with the venv's
        // numpy (SEEDLING_PYTHON), and likewise fails without it.
        needs: &["apt-packages", "python-venv", "wasm-pack-build"],
        run: |ctx| {
            let args = ["test", "--workspace", "--release"];
            run(ctx.cargo().args(args).env("SEEDLING_PYTHON", setup::python(ctx))).map(|()| String::new())
        },
    },
    Step {
        name: "fleet-smoke",
        about: "`cargo xtask fleet --smoke`: two native workers and two Chromium tabs at RTT 50 ms, then one of each at 150 ms (stretched minibatches), steps in flight, agree with the server",
        // The tab needs www/pkg and Chromium, like the browser tests.
        needs: &["apt-packages", "wasm-pack-build"],
        run: fleet::smoke,
    },
    Step {
        name: "wasm-node-core",
        about: "seedling-core's tests compiled to wasm, under Node",
        needs: WASM_TEST_TOOLS,
        run: |ctx| wasm_pack_test(ctx, "core", Browser::No, &[]),
    },
    Step {
        name: "chrome-core",
        about: "seedling-core's tests compiled to wasm, in headless Chromium",
        needs: WASM_TEST_TOOLS,
        run: |ctx| wasm_pack_test(ctx, "core", Browser::Chrome, &[]),
    },
    Step {
        name: "chrome-wasm-client",
        about: "seedling-wasm's tests in headless Chromium",
        needs: WASM_TEST_TOOLS,
        // Named targets only: tests/bench.rs is `cargo xtask bench`'s.
        run: |ctx| wasm_pack_test(ctx, "wasm-client", Browser::Chrome, &["--lib", "--test", "web"]),
    },
    Step {
        name: "perf-check",
        about: "quick benchmark ratios in one run: low-rank ES/inference, fast/reference, wasm/native",
        needs: WASM_TEST_TOOLS,
        run: bench::perf_check,
    },
];

/// The soak suite, run alone by `cargo xtask test --soak`: the robustness
/// tests (`tests/tests/soak.rs`, `server/tests/kill_loop.rs`) at full size
/// (`SEEDLING_SOAK=1`), one test at a time so the load test has the machine,
/// with their JSON figures shown. The default `native-tests` step runs the
/// same tests at small sizes.
const SOAK: Step = Step {
    name: "soak",
    about: "robustness suite at full size: 50x faults, liars, 100k garbage frames, 2,000 volunteers 5 min, 20 SIGKILLs",
    needs: &[],
    run: |ctx| {
        for (krate, test) in [("seedling-tests", "soak"), ("seedling-server", "kill_loop")] {
            let args = [
                "test",
                "--release",
                "-p",
                krate,
                "--test",
                test,
                "--",
                "--nocapture",
                "--test-threads",
                "1",
            ];
            run(ctx.cargo().args(args).env("SEEDLING_SOAK", "1"))?;
        }
        Ok(String::new())
    },
};

/// Entry point of `cargo xtask test [--only STEP[,STEP]]... [--list] [--soak]`.
pub fn main(ctx: &Ctx, args: &[String]) -> ExitCode {
    let soak = args.iter().any(|a| a == "--soak");
    let args: Vec<String> = args.iter().filter(|a| *a != "--soak").cloned().collect();
    let selected = match select(&args) {
        Ok(Some(selected)) => selected,
        Ok(None) => {
            for step in STEPS {
                println!("{:<20} {}", step.name, step.about);
            }
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("xtask test: {err}");
            return ExitCode::from(2);
        }
    };
    let steps: Vec<&Step> = if soak {
        vec![&SOAK]
    } else {
        STEPS
            .iter()
            .zip(selected)
            .filter(|&(_, on)| on)
            .map(|(s, _)| s)
            .collect()
    };

    let mut results: Vec<(&Step, Duration, Result<String, String>)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        println!("\n==> [{}/{}] {}: {}", i + 1, steps.len(), step.name, step.about);
        let start = Instant::now();
        let result = (step.run)(ctx);
        let failed = result.is_err();
        results.push((step, start.elapsed(), result));
        if failed {
            break;
        }
    }

    println!("\n==> summary");
    // A full disk makes rustc or the linker die with messages that do not
    // say so; the free space at the end tells that story at a glance.
    if let Some(free) = free_disk(ctx) {
        println!("  disk: {free} free in the workspace");
    }
    for (step, took, result) in &results {
        let (status, note) = match result {
            Ok(note) => ("ok", note.as_str()),
            Err(_) => ("FAILED", ""),
        };
        println!(
            "  {status:<7} {:<20} {:>7.1}s  {note}",
            step.name,
            took.as_secs_f64()
        );
    }
    for step in &steps[results.len()..] {
        println!("  {:<7} {:<20}", "skipped", step.name);
    }
    let passed = results.iter().filter(|(_, _, r)| r.is_ok()).count();
    match results
        .iter()
        .find_map(|(step, _, r)| r.as_ref().err().map(|e| (step, e)))
    {
        None => {
            println!("{passed} passed, 0 failed");
            ExitCode::SUCCESS
        }
        Some((step, err)) => {
            println!("error: step `{}` failed: {err}", step.name);
            println!("{passed} passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}

/// Free space on the file system holding `target/`, as `df -h` prints it,
/// or `None` where `df` is missing or says something unexpected.
fn free_disk(ctx: &Ctx) -> Option<String> {
    let out = stdout_of(ctx.cmd("df").args(["-hP", "."]))?;
    // POSIX format: a header, then `fs size used avail use% mount`.
    out.lines().nth(1)?.split_whitespace().nth(3).map(str::to_owned)
}

/// Parses the arguments into one flag per entry of [`STEPS`], or `None` for
/// `--list`. Without `--only` every step is on; with it, the named steps and
/// the set-up they need.
fn select(args: &[String]) -> Result<Option<Vec<bool>>, String> {
    let mut only: Vec<&str> = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--list" => return Ok(None),
            "--only" => {
                let names = args.next().ok_or("--only needs a step name (see --list)")?;
                only.extend(names.split(',').filter(|n| !n.is_empty()));
            }
            other => {
                return Err(format!(
                    "unknown argument `{other}` (usage: test [--only STEP[,STEP]]... [--list] [--soak])"
                ));
            }
        }
    }
    if only.is_empty() {
        return Ok(Some(vec![true; STEPS.len()]));
    }
    if let Some(unknown) = only.iter().find(|name| !STEPS.iter().any(|s| s.name == **name)) {
        return Err(format!("no step named `{unknown}` (see --list)"));
    }
    let mut on: Vec<bool> = STEPS.iter().map(|s| only.contains(&s.name)).collect();
    // `needs` only point backwards, so one reverse pass closes the set.
    for i in (0..STEPS.len()).rev() {
        if on[i] {
            for need in STEPS[i].needs {
                let j = STEPS
                    .iter()
                    .position(|s| s.name == *need)
                    .expect("`needs` names a step");
                on[j] = true;
            }
        }
    }
    Ok(Some(on))
}

/// Runs `cargo <args>` from the workspace root.
fn cargo(ctx: &Ctx, args: &[&str]) -> Result<String, String> {
    run(ctx.cargo().args(args)).map(|()| String::new())
}

/// Where a `wasm-pack test` run executes the tests.
#[derive(Clone, Copy)]
enum Browser {
    /// Node only.
    No,
    /// Headless Chromium through Debian's chromedriver.
    Chrome,
}

/// Default for `WASM_BINDGEN_TEST_TIMEOUT`, in seconds. The runner's own
/// default (20 s) is for a whole test binary, which release-mode training and
/// golden tests in a browser can exceed; a caller may still set it.
const WASM_TEST_TIMEOUT_SECS: &str = "600";

/// `wasm-pack test` for the crate in directory `krate`, in release (the
/// learning and golden tests need optimized code); `cargo_args` (such as
/// `--test web`) go to cargo and select the test targets.
fn wasm_pack_test(ctx: &Ctx, krate: &str, browser: Browser, cargo_args: &[&str]) -> Result<String, String> {
    let mut cmd = ctx.cmd("wasm-pack");
    cmd.arg("test");
    match browser {
        Browser::No => {
            cmd.arg("--node");
        }
        Browser::Chrome => {
            let caps = setup::webdriver_json(ctx)?;
            cmd.args(["--headless", "--chrome", "--chromedriver", CHROMEDRIVER])
                .env("CHROMEDRIVER", CHROMEDRIVER)
                .env("WASM_BINDGEN_TEST_WEBDRIVER_JSON", caps)
                // Test binaries that do not call
                // `wasm_bindgen_test_configure!(run_in_browser)` default to
                // Node, and `--chrome` would skip them; this makes them run
                // in the browser too. Binaries that do configure a mode keep it.
                .env("WASM_BINDGEN_USE_BROWSER", "1");
        }
    }
    // Flags must come before the crate path: wasm-pack passes everything
    // after the path through to cargo.
    cmd.args(["--release", "--mode", "no-install", krate])
        .args(cargo_args);
    if std::env::var_os("WASM_BINDGEN_TEST_TIMEOUT").is_none() {
        cmd.env("WASM_BINDGEN_TEST_TIMEOUT", WASM_TEST_TIMEOUT_SECS);
    }
    run(&mut cmd).map(|()| String::new())
}
