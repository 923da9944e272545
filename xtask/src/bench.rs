//! `cargo xtask bench`: every benchmark figure, native and wasm, as JSON lines,
//! then the one table of every figure with a target ([`crate::report`]).
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
//! Every line is a `seedling_bench_record::Record`: the benches print them
//! and this module reads them back, so both sides share one schema.
//!
//! Three system figures come from `seedling-sim bench` (seedling-tests):
//! `coordinator-1000`, the coordinator's time per step with 1,000 simulated
//! volunteers, `wire-bytes`, the uplink bytes per member evaluation, and
//! `downlink-bytes`, the bytes every volunteer receives per step.
//!
//! `--peers PYTHON` adds the JAX peer and OpenBLAS ([`crate::peers`]) in the
//! same run, in rounds: round 1 is the whole native bench, later rounds only
//! its step benches, and each is followed by OpenBLAS's sgemm and the JAX
//! peer in every mode at 1 and 2 threads, so that both sides of each ratio
//! are measured in the same minutes (5 rounds by default, 1 with `--quick`:
//! on a shared machine a step's time moves by tens of percent within
//! minutes, so the table takes medians over rounds and shows their range).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use seedling_bench_record::{Record, records};

use crate::cmd::{Ctx, run, run_lines};
use crate::peers::{self, Peers};
use crate::wasm::{self, WasmTarget};
use crate::{report, setup};

/// The wasm/native throughput ratio Seedling aims for in Chromium.
const RATIO_TARGET: f64 = 0.35;

/// Entry point of `cargo xtask bench [--native-only|--wasm-only] [--peers
/// PYTHON [--peer-script PATH] [--rounds N]] [--markdown FILE]... [ARGS...]`;
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

/// The options of `cargo xtask bench` that xtask itself reads; the rest go
/// to the native bench example.
struct Options<'a> {
    native: bool,
    wasm: bool,
    quick: bool,
    peers: Option<PathBuf>,
    peer_script: Option<PathBuf>,
    rounds: Option<usize>,
    markdown: Vec<PathBuf>,
    /// For the native bench example.
    pass: Vec<&'a str>,
}

impl<'a> Options<'a> {
    fn parse(args: &'a [String]) -> Result<Self, String> {
        let mut o = Options {
            native: true,
            wasm: true,
            quick: false,
            peers: None,
            peer_script: None,
            rounds: None,
            markdown: Vec::new(),
            pass: Vec::new(),
        };
        let mut it = args.iter().map(String::as_str);
        while let Some(arg) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
            match arg {
                "--native-only" => o.wasm = false,
                "--wasm-only" => o.native = false,
                // A bare name is looked up on PATH; anything with a slash is a path.
                "--peers" => {
                    let v = value()?;
                    o.peers = Some(if v.contains('/') {
                        peers::user_path(v)
                    } else {
                        v.into()
                    });
                }
                "--peer-script" => o.peer_script = Some(peers::user_path(value()?)),
                "--rounds" => {
                    let v = value()?;
                    o.rounds = Some(
                        v.parse()
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or(format!("bad --rounds {v}"))?,
                    );
                }
                "--markdown" => o.markdown.push(peers::user_path(value()?)),
                other => {
                    o.quick |= other == "--quick";
                    o.pass.push(other);
                }
            }
        }
        Ok(o)
    }
}

fn bench(ctx: &Ctx, args: &[String]) -> Result<(), String> {
    let o = Options::parse(args)?;
    let machine = report::Machine::read(args);
    if o.native {
        // Built first, so no compile runs between rounds and the run's time
        // and load average are the measurements'.
        run(ctx
            .cargo()
            .args(["build", "--release", "-p", "seedling-core", "--example", "bench"]))?;
        run(ctx.cargo().args([
            "build",
            "--release",
            "-p",
            "seedling-tests",
            "--bin",
            "seedling-sim",
        ]))?;
    }
    let start = report::Moment::now();
    let peers = o
        .peers
        .clone()
        .map(|python| Peers::new(ctx, python, o.peer_script.clone(), o.quick));
    if let Some(p) = &peers {
        p.check(ctx)?;
    }
    let mut m = report::Measurements {
        peers_requested: peers.is_some(),
        ..Default::default()
    };
    // A failed part does not hide the others' figures: everything runs, the
    // table shows what was measured, and the failures fail the command.
    let mut failures = Vec::new();
    // The wasm bench is es-lowrank and the update: skip it when `--only`
    // leaves both out.
    let in_wasm = |p: &str| ["es-lowrank", "apply-default"].iter().any(|b| b.starts_with(p));
    let wasm_too = o.wasm && only_prefixes(&o.pass).is_none_or(|ps| ps.iter().any(|p| in_wasm(p)));

    if o.native {
        // Round 1 is the whole native bench; later rounds repeat the step
        // benches (unless `--only` says which), each followed by the peers.
        let rounds = o
            .rounds
            .unwrap_or(if peers.is_some() && !o.quick { 5 } else { 1 });
        let mut again: Vec<&str> = o.pass.clone();
        if only_prefixes(&o.pass).is_none() {
            again.extend(["--only", "inference,es-lowrank,es-full"]);
        }
        for round in 1..=rounds {
            let native_args = if round == 1 { &o.pass } else { &again };
            if rounds > 1 {
                println!("\n==> round {round} of {rounds}");
            }
            let mut r = report::Round {
                native: native_bench(ctx, native_args)?,
                ..Default::default()
            };
            if let Some(p) = &peers {
                let (lines, failed) = p.openblas(ctx);
                r.openblas = lines;
                failures.extend(failed);
                let (lines, failed) = p.jax_round(ctx);
                r.jax = lines;
                failures.extend(failed);
            }
            m.rounds.push(r);
        }
        match system_bench(ctx, &o) {
            Ok(lines) => m.system = lines,
            Err(err) => failures.push(format!("the system benchmarks failed: {err}")),
        }
    }
    if wasm_too {
        let native_1t = m.rounds.first().and_then(|r| {
            r.native
                .iter()
                .find(|l| l.bench == "es-lowrank" && l.threads == 1)
                .and_then(|l| l.tokens_per_s)
        });
        match wasm_bench(ctx, o.quick, native_1t) {
            Ok((lines, failed)) => {
                m.wasm = lines;
                failures.extend(failed);
            }
            Err(err) => failures.push(err),
        }
    }

    let table = report::render(&m, &machine, start, report::Moment::now());
    println!("\n==> the benchmark table\n\n{table}");
    for file in &o.markdown {
        if let Err(err) = write_table(file, &table) {
            failures.push(err);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// seedling-core's bench example with `args`: its records.
fn native_bench(ctx: &Ctx, args: &[&str]) -> Result<Vec<Record>, String> {
    records(&run_lines(
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
            .args(args),
    )?)
}

/// The system benchmarks (coordinator-1000, wire-bytes, downlink-bytes):
/// simulated and native volunteers on loopback, from seedling-tests.
fn system_bench(ctx: &Ctx, o: &Options) -> Result<Vec<Record>, String> {
    let system: Vec<&str> = ["coordinator-1000", "wire-bytes", "downlink-bytes"]
        .into_iter()
        .filter(|name| only_prefixes(&o.pass).is_none_or(|ps| ps.iter().any(|p| name.starts_with(p))))
        .collect();
    if system.is_empty() {
        return Ok(Vec::new());
    }
    let mut cmd = ctx.cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "seedling-tests",
        "--bin",
        "seedling-sim",
        "--",
        "bench",
    ]);
    if system.len() == 1 {
        cmd.args(["--only", system[0]]);
    }
    if o.quick {
        cmd.args(["--seconds", "10"]);
    }
    records(&run_lines(&mut cmd)?)
}

/// The es-lowrank workload as wasm under Node and in headless Chromium
/// (`quick_` under `--quick`), each line printed again with its ratio to
/// `native_1t`, the native one-thread es-lowrank tokens/s. Returns the
/// records and the targets that failed.
fn wasm_bench(ctx: &Ctx, quick: bool, native_1t: Option<f64>) -> Result<(Vec<Record>, Vec<String>), String> {
    // Chromium and Node for the runs, the pinned wasm tools for the build.
    setup::apt_packages(ctx)?;
    setup::wasm_target(ctx)?;
    setup::wasm_bindgen_cli(ctx)?;
    setup::wasm_pack(ctx)?;
    let filter = if quick { "quick_" } else { "full_" };
    let mut wasm_lines = Vec::new();
    let mut failures = Vec::new();
    for target in [WasmTarget::Node, WasmTarget::Chromium] {
        match wasm::bench(ctx, target, filter) {
            Ok(lines) if lines.is_empty() => failures.push(format!(
                "the {} bench passed but logged no JSON line (is its output captured?)",
                target.name()
            )),
            Ok(lines) => wasm_lines.extend(lines),
            Err(err) => failures.push(format!("the {} bench failed: {err}", target.name())),
        }
    }

    println!("\n==> wasm vs native (es-lowrank, RW-256, one thread)");
    for record in &wasm_lines {
        let mut line = record.clone();
        if let (Some(native), Some(wasm)) = (native_1t, record.tokens_per_s) {
            line.set_num("native_tokens_per_s", native)
                .set_num("ratio_to_native", wasm / native)
                .set_num("ratio_target", RATIO_TARGET);
        }
        println!("{}", line.to_line());
    }
    if native_1t.is_none() {
        println!("(no native single-thread es-lowrank line to compare with; run without --wasm-only)");
    }
    Ok((wasm_lines, failures))
}

/// Puts the table into `file`, between its markers (BENCHMARKS.md,
/// README.md); a new or empty file becomes the table.
fn write_table(file: &Path, table: &str) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", file.display());
    let text = match fs::read_to_string(file) {
        Ok(old) if old.trim().is_empty() => table.to_string(),
        // Never overwrite prose: a file with text needs the markers.
        Ok(old) => report::splice(&old, table).ok_or_else(|| {
            format!(
                "{} has no `{}` ... `{}` lines to put the table between",
                file.display(),
                report::BEGIN,
                report::END
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => table.to_string(),
        Err(e) => return Err(err("read", e)),
    };
    fs::write(file, text).map_err(|e| err("write", e))?;
    println!("(table written to {})", file.display());
    Ok(())
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
    let native = records(&run_lines(
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
    )?)?;
    let wasm_lines = wasm::bench(ctx, WasmTarget::Node, "quick_")?;
    let find = |lines: &[Record], bench: &str, key: &str| {
        lines
            .iter()
            .find(|l| l.bench == bench)
            .and_then(|l| l.num(key))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_xtask_options_from_the_example_arguments() {
        let args: Vec<String> = [
            "--quick",
            "--peers",
            "python3",
            "--only",
            "es-lowrank",
            "--rounds",
            "2",
            "--markdown",
            "/tmp/a.md",
            "--native-only",
            "--peer-script",
            "/p/jax.py",
        ]
        .map(String::from)
        .to_vec();
        let o = Options::parse(&args).unwrap();
        assert!(o.quick && o.native && !o.wasm);
        // A bare interpreter name stays a name, for the PATH lookup.
        assert_eq!(o.peers, Some(PathBuf::from("python3")));
        assert_eq!(o.peer_script, Some(PathBuf::from("/p/jax.py")));
        assert_eq!(
            (o.rounds, o.markdown),
            (Some(2), vec![PathBuf::from("/tmp/a.md")])
        );
        assert_eq!(o.pass, ["--quick", "--only", "es-lowrank"]);
        assert_eq!(only_prefixes(&o.pass), Some(vec!["es-lowrank"]));
        let bad = |a: &[&str]| Options::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).err();
        assert_eq!(bad(&["--rounds", "0"]), Some("bad --rounds 0".into()));
        assert_eq!(bad(&["--peers"]), Some("--peers needs a value".into()));
    }
}
