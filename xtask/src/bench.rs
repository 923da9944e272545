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
        match wasm::bench(ctx, target) {
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
