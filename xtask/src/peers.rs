//! The peers of `cargo xtask bench --peers PYTHON`: the JAX peer script and
//! OpenBLAS's sgemm, run by a Python interpreter the user supplies.
//!
//! Why a user-supplied interpreter: JAX and numpy are never project
//! dependencies (the project builds and tests without Python); the figures
//! only say how Seedling compares with the usual tools on the same machine.
//! The peer script lives outside the repository, beside the corpus
//! (`../shared/peers/jax_es_step.py` from the workspace root, the same
//! `../shared` layout the corpus search path uses).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use seedling_bench_record::{PeerStep, Record, records};

use crate::cmd::{Ctx, run_lines};

/// The peer script's default path, relative to the workspace root.
pub const DEFAULT_SCRIPT: &str = "../shared/peers/jax_es_step.py";

/// OpenBLAS's float32 sgemm at the shape of one population-batched step,
/// [N*B, H] x [H, H] = [4096,256]x[256,256], as numpy's `x @ w`: one warm-up,
/// then the median of `reps` calls, as one JSON line. The thread count comes
/// from `OPENBLAS_NUM_THREADS` (set by the caller before numpy loads) and, if
/// threadpoolctl is installed, is enforced and reported through it.
const SGEMM: &str = r#"# Written by `cargo xtask bench --peers` (xtask/src/peers.rs).
import json, statistics, sys, time
import numpy as np
threads, reps = int(sys.argv[1]), int(sys.argv[2])
info = {}
try:
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(limits=threads, user_api="blas")
    info = next((i for i in threadpool_info() if i.get("user_api") == "blas"), {})
except ImportError:
    pass
M, K, N = 4096, 256, 256
rng = np.random.default_rng(0)
x = rng.standard_normal((M, K), dtype=np.float32)
w = rng.standard_normal((K, N), dtype=np.float32)
x @ w
ts = []
for _ in range(reps):
    t0 = time.perf_counter()
    x @ w
    ts.append(time.perf_counter() - t0)
t = statistics.median(ts)
print(json.dumps({"bench": "openblas-sgemm", "shape": "[4096,256]x[256,256]", "threads": threads,
    "seconds_per_call": round(t, 7), "gflops": round(2 * M * K * N / t / 1e9, 2), "reps": reps,
    "blas": info.get("internal_api"), "blas_version": info.get("version"),
    "architecture": info.get("architecture"), "blas_threads": info.get("num_threads"),
    "numpy_version": np.__version__}, separators=(",", ":")), flush=True)
"#;

/// The JAX peer's modes, in the order a round runs them: the two-thread
/// low-rank step first, right after our own step benches, since it is the
/// comparison with the tightest target.
const JAX_RUNS: &[(&str, u32)] = &[
    ("lowrank", 2),
    ("lowrank", 1),
    ("inference", 2),
    ("inference", 1),
    ("fullrank", 2),
    ("fullrank", 1),
];

/// The interpreter and script of one run.
pub struct Peers {
    pub python: PathBuf,
    pub script: PathBuf,
    /// `--quick`: fewer timed steps and sgemm calls.
    pub quick: bool,
}

impl Peers {
    /// `script` as given, or [`DEFAULT_SCRIPT`] under the workspace root.
    pub fn new(ctx: &Ctx, python: PathBuf, script: Option<PathBuf>, quick: bool) -> Peers {
        let script = script.unwrap_or_else(|| {
            let p = ctx.root.join(DEFAULT_SCRIPT);
            p.canonicalize().unwrap_or(p)
        });
        Peers {
            python,
            script,
            quick,
        }
    }

    /// Fails in a second, before minutes of benchmarks, if the script is
    /// missing or the interpreter cannot import jax and numpy.
    pub fn check(&self, ctx: &Ctx) -> Result<(), String> {
        if !self.script.is_file() {
            return Err(format!(
                "no JAX peer script at {} (pass --peer-script PATH)",
                self.script.display()
            ));
        }
        let out = self
            .cmd(ctx)
            .args([
                "-c",
                "import jax, numpy; print(jax.__version__, numpy.__version__)",
            ])
            .output()
            .map_err(|err| format!("cannot start {}: {err}", self.python.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} cannot import jax and numpy (install them with `pip install \"jax[cpu]\" numpy threadpoolctl`): {}",
                self.python.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The interpreter, with the environment of a fair peer measurement.
    fn cmd(&self, ctx: &Ctx) -> Command {
        let mut cmd = ctx.cmd(&self.python);
        // Set on some machines, these pick a slower OpenBLAS kernel or
        // blocking than OpenBLAS's own detection, which would flatter us.
        cmd.env_remove("OPENBLAS_CORETYPE").env_remove("OPENBLAS_L2_SIZE");
        cmd
    }

    /// OpenBLAS's sgemm at 1 and 2 threads: the records, and any failures.
    pub fn openblas(&self, ctx: &Ctx) -> (Vec<Record>, Vec<String>) {
        let reps = if self.quick { "10" } else { "30" };
        let mut lines = Vec::new();
        let mut failures = Vec::new();
        // A file rather than `-c`, so the echoed command stays one line.
        let script = ctx.tools.join("openblas_sgemm.py");
        if let Err(err) = fs::create_dir_all(&ctx.tools).and_then(|()| fs::write(&script, SGEMM)) {
            failures.push(format!("cannot write {}: {err}", script.display()));
            return (lines, failures);
        }
        for threads in ["1", "2"] {
            let mut cmd = self.cmd(ctx);
            cmd.env("OPENBLAS_NUM_THREADS", threads)
                .arg(&script)
                .args([threads, reps]);
            match run_lines(&mut cmd).and_then(|l| records(&l)) {
                Ok(l) => lines.extend(l),
                Err(err) => failures.push(format!("OpenBLAS sgemm, {threads} threads: {err}")),
            }
        }
        (lines, failures)
    }

    /// One round of the JAX peer ([`JAX_RUNS`]): its steps, and any
    /// failures (a failed mode does not stop the others).
    pub fn jax_round(&self, ctx: &Ctx) -> (Vec<PeerStep>, Vec<String>) {
        let mut lines = Vec::new();
        let mut failures = Vec::new();
        for &(mode, threads) in JAX_RUNS {
            let mut cmd = self.cmd(ctx);
            cmd.arg(&self.script)
                .args(["--mode", mode, "--threads", &threads.to_string()]);
            if self.quick {
                // The first step compiles; one more untimed, two timed.
                cmd.args(["--warmup", "2", "--steps", "2"]);
            }
            let steps =
                run_lines(&mut cmd).map(|l| l.iter().filter_map(|l| PeerStep::parse(l)).collect::<Vec<_>>());
            match steps {
                Ok(l) if l.is_empty() => {
                    failures.push(format!("JAX {mode}, {threads} threads: no JSON line"))
                }
                Ok(l) => lines.extend(l),
                Err(err) => failures.push(format!("JAX {mode}, {threads} threads: {err}")),
            }
        }
        (lines, failures)
    }
}

/// A path given on the command line: relative to the directory xtask was
/// started from, like any command's argument.
pub fn user_path(p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    std::env::current_dir().map_or_else(|_| path.to_path_buf(), |d| d.join(path))
}
