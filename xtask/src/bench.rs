//! `cargo xtask bench`: every benchmark figure, native and wasm, as JSON lines.
//!
//! The native figures come from seedling-core's `bench` example. The wasm
//! figure is the same RW-256 `es-lowrank` workload compiled to wasm
//! (`wasm-client/tests/bench.rs`), timed under Node and in headless Chromium,
//! because a volunteer's browser is where most of the evaluation runs: the
//! number that matters is how much of a native core a browser tab is worth.
//! So after both runs xtask prints each wasm line again with
//! `ratio_to_native`, its tokens/s over the native single-thread es-lowrank
//! figure (the target for Chromium is >= 0.35).
//!
//! Two system figures come from `seedling-sim bench` (seedling-tests):
//! `coordinator-1000`, the coordinator's time per step with 1,000 simulated
//! volunteers, and `wire-bytes`, the uplink bytes per member evaluation.

use std::process::ExitCode;

use crate::wasm::{self, WasmTarget, json_number, json_string};
use crate::{Ctx, setup};

/// The wasm/native throughput ratio Seedling aims for in Chromium.
const RATIO_TARGET: f64 = 0.35;

/// Entry point of `cargo xtask bench [--native-only|--wasm-only] [ARGS...]`;
/// other arguments go to the native bench example.
pub fn main(ctx: &Ctx, args: &[String]) -> ExitCode {
    match bench(ctx, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn bench(ctx: &Ctx, args: &[String]) -> Result<(), String> {
    let mut native = true;
    let mut wasm_too = true;
    let mut pass: Vec<&str> = Vec::new();
    for arg in args {
        match arg.as_str() {
            "--native-only" => wasm_too = false,
            "--wasm-only" => native = false,
            other => pass.push(other),
        }
    }
    // The wasm bench is es-lowrank only: skip it when `--only` leaves that out.
    wasm_too &= only_prefixes(&pass).is_none_or(|ps| ps.iter().any(|p| "es-lowrank".starts_with(p)));

    let mut native_1t = None;
    if native {
        let lines = wasm::run_lines(
            ctx.cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "seedling-core",
                    "--example",
                    "bench",
                    "--",
                ])
                .args(&pass),
        )?;
        native_1t = lines
            .iter()
            .find(|l| json_string(l, "bench") == Some("es-lowrank") && json_number(l, "threads") == Some(1.0))
            .and_then(|l| json_number(l, "tokens_per_s"));
        // The system benchmarks (coordinator-1000, wire-bytes): simulated
        // and native volunteers on loopback, from seedling-tests.
        let system: Vec<&str> = ["coordinator-1000", "wire-bytes"]
            .into_iter()
            .filter(|name| only_prefixes(&pass).is_none_or(|ps| ps.iter().any(|p| name.starts_with(p))))
            .collect();
        if !system.is_empty() {
            let args = [
                "run",
                "--release",
                "-p",
                "seedling-tests",
                "--bin",
                "seedling-sim",
                "--",
                "bench",
            ];
            let only = if system.len() == 1 {
                vec!["--only", system[0]]
            } else {
                Vec::new()
            };
            wasm::run_lines(ctx.cargo().args(args).args(only))?;
        }
    }
    if !wasm_too {
        return Ok(());
    }

    // Chromium and Node for the runs, the pinned wasm tools for the build.
    setup::apt_packages(ctx)?;
    setup::wasm_target(ctx)?;
    setup::wasm_bindgen_cli(ctx)?;
    setup::wasm_pack(ctx)?;
    // A failed target does not hide the other's figure: both run, and the
    // failure is reported (and fails the command) after the ratio lines.
    let mut wasm_lines = Vec::new();
    let mut failures = Vec::new();
    for target in [WasmTarget::Node, WasmTarget::Chromium] {
        match wasm::bench(ctx, target, "full_") {
            Ok(lines) if lines.is_empty() => failures.push(format!(
                "the {} bench passed but logged no JSON line (is its output captured?)",
                target.name()
            )),
            Ok(lines) => wasm_lines.extend(lines),
            Err(err) => failures.push(format!("the {} bench failed: {err}", target.name())),
        }
    }

    println!("\n==> wasm vs native (es-lowrank, RW-256, one thread)");
    for line in &wasm_lines {
        let ratio = native_1t
            .zip(json_number(line, "tokens_per_s"))
            .map(|(n, w)| w / n);
        match ratio {
            Some(r) => {
                let body = line.trim_end().trim_end_matches('}');
                println!(
                    "{body},\"native_tokens_per_s\":{:.0},\"ratio_to_native\":{r:.3},\"ratio_target\":{RATIO_TARGET}}}",
                    native_1t.unwrap_or_default()
                );
            }
            None => println!("{line}"),
        }
    }
    if native_1t.is_none() {
        println!("(no native single-thread es-lowrank line to compare with; run without --wasm-only)");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// The prefixes of the example's `--only` flag, if given.
fn only_prefixes<'a>(args: &[&'a str]) -> Option<Vec<&'a str>> {
    let i = args.iter().position(|a| *a == "--only")?;
    Some(args.get(i + 1).map_or(Vec::new(), |v| v.split(',').collect()))
}

/// The CI performance check's floors: ratios of figures measured in the same
/// run, never absolute times (the machine is shared and its speed varies), and
/// set far enough below what a quiet machine gives (about 0.95, 5 and 0.35)
/// that load alone does not trip them, while a lost optimization does.
const CHECKS: &[(&str, f64)] = &[
    ("es-lowrank / inference tokens/s (native, 1 thread)", 0.75),
    ("fast / reference forward (native, 1 thread)", 2.5),
    ("wasm-node / native es-lowrank tokens/s", 0.15),
];

/// `cargo xtask test`'s `perf-check` step: the quick native figures (low-rank
/// ES and inference interleaved, the fast kernels against the reference
/// ones) and the quick wasm figure under Node, in one run, with each ratio
/// checked against its floor in [`CHECKS`]. About half a minute.
pub fn perf_check(ctx: &Ctx) -> Result<String, String> {
    let native = wasm::run_lines(
        ctx.cargo()
            .args([
                "run",
                "--release",
                "-p",
                "seedling-core",
                "--example",
                "bench",
                "--",
            ])
            .args([
                "--quick",
                "--only",
                "inference,es-lowrank,fast-vs-reference",
                "--threads",
                "1",
            ]),
    )?;
    let wasm_lines = wasm::bench(ctx, WasmTarget::Node, "quick_")?;
    let find = |lines: &[String], bench: &str, key: &str| {
        lines
            .iter()
            .find(|l| json_string(l, "bench") == Some(bench))
            .and_then(|l| json_number(l, key))
            .ok_or_else(|| format!("no `{key}` of `{bench}` in the bench output"))
    };
    let es = find(&native, "es-lowrank", "tokens_per_s")?;
    let ratios = [
        es / find(&native, "inference", "tokens_per_s")?,
        find(&native, "fast-vs-reference", "ratio_fast_over_reference")?,
        find(&wasm_lines, "es-lowrank", "tokens_per_s")? / es,
    ];
    println!("\n==> performance ratios (this run)");
    let mut failed = Vec::new();
    for (&(what, floor), &r) in CHECKS.iter().zip(&ratios) {
        let ok = r >= floor;
        println!(
            "  {:<4} {what}: {r:.3} (floor {floor})",
            if ok { "ok" } else { "LOW" }
        );
        if !ok {
            failed.push(format!("{what} is {r:.3}, below its floor {floor}"));
        }
    }
    if failed.is_empty() {
        Ok(format!(
            "es/inference {:.2}, fast/reference {:.1}, wasm-node/native {:.2}",
            ratios[0], ratios[1], ratios[2]
        ))
    } else {
        Err(format!("performance regression: {}", failed.join("; ")))
    }
}
