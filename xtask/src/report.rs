//! The one benchmark table of `cargo xtask bench`: every figure the project
//! has a target for, measured in one run, with the machine it ran on.
//!
//! Everything here is pure (records in, markdown out) except [`Moment::now`]
//! and [`Machine::read`], so the table's arithmetic is unit-tested. The
//! records are the benches' own lines, read as `seedling_bench_record`
//! types: seedling-core's `bench` example, `seedling-sim bench`, the wasm
//! bench and the OpenBLAS probe of [`crate::peers`] as [`Record`]s, the JAX
//! peer script (`jax_es_step.py`) as [`PeerStep`]s.
//!
//! Why rounds: on a shared machine one step's time moves by tens of percent
//! from one run to the next, so a ratio of two single runs taken minutes
//! apart says little. `cargo xtask bench --peers` alternates our
//! step benches and the peer's in rounds; each figure here is the median over
//! the rounds and its range is shown, and a ratio's range is that of the
//! rounds' own ratios (both sides measured in the same minutes).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use seedling_bench_record::{PeerStep, Record};

/// RW-256's population: the N of one step, which the update and wasm figures
/// are scaled to.
const POPULATION: f64 = 256.0;

/// The median and range of a set of measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    /// `None` for no samples; NaNs are dropped.
    pub fn of(xs: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// `"1.074 (1.031-1.102)"`, or just the median for one sample or no spread.
    fn show(&self, fmt: fn(f64) -> String) -> String {
        let (lo, mid, hi) = (fmt(self.min), fmt(self.median), fmt(self.max));
        if lo == hi {
            mid
        } else {
            format!("{mid} ({lo}-{hi})")
        }
    }
}

/// One round of `cargo xtask bench`: our bench records and the peers'
/// measured right after them. Round 1's native records are the whole native
/// bench; later rounds repeat only the step benches.
#[derive(Default)]
pub struct Round {
    pub native: Vec<Record>,
    pub jax: Vec<PeerStep>,
    pub openblas: Vec<Record>,
}

/// Everything one run measured, as the benches printed it.
#[derive(Default)]
pub struct Measurements {
    pub rounds: Vec<Round>,
    /// `seedling-sim bench`: coordinator-1000, wire-bytes and downlink-bytes.
    pub system: Vec<Record>,
    /// The wasm bench's es-lowrank records (Node and Chromium).
    pub wasm: Vec<Record>,
    /// Whether the peers were asked for (`--peers`): else their columns say
    /// so instead of looking like failed measurements.
    pub peers_requested: bool,
}

impl Measurements {
    /// Per round, the `key` of our native record `bench` at `threads`.
    fn ours(&self, bench: &str, threads: u32, key: &str) -> Vec<Option<f64>> {
        let pick = |r: &Round| find(&r.native, bench, threads).and_then(|l| l.num(key));
        self.rounds.iter().map(pick).collect()
    }

    /// Per round, the JAX peer's median step in `mode` at `threads`.
    fn jax(&self, mode: &str, threads: u32) -> Vec<Option<f64>> {
        let pick = |r: &Round| {
            r.jax
                .iter()
                .find(|p| p.mode == mode && p.threads == threads)
                .and_then(|p| p.step_seconds_median)
        };
        self.rounds.iter().map(pick).collect()
    }

    /// Per round, OpenBLAS's sgemm GFLOP/s at `threads`.
    fn openblas(&self, threads: u32) -> Vec<Option<f64>> {
        let pick = |r: &Round| find(&r.openblas, "openblas-sgemm", threads).and_then(|l| l.gflops);
        self.rounds.iter().map(pick).collect()
    }

    /// The first value of `key` in any of our native records `bench` (the
    /// benches round 1 runs alone: gemm, the updates).
    fn once(&self, bench: &str, key: &str) -> Option<f64> {
        self.ours(bench, 1, key).into_iter().flatten().next()
    }

    fn system(&self, bench: &str, key: &str) -> Option<f64> {
        self.system
            .iter()
            .find(|l| l.bench == bench)
            .and_then(|l| l.num(key))
    }

    fn wasm(&self, target: &str) -> Option<f64> {
        self.wasm_of("es-lowrank", target, |l| l.tokens_per_s)
    }

    /// A figure of the wasm record of `bench` on `target`.
    fn wasm_of(&self, bench: &str, target: &str, key: impl Fn(&Record) -> Option<f64>) -> Option<f64> {
        self.wasm
            .iter()
            .find(|l| l.bench == bench && l.target == target)
            .and_then(key)
    }
}

/// The record of `bench` at `threads`.
fn find<'a>(records: &'a [Record], bench: &str, threads: u32) -> Option<&'a Record> {
    records.iter().find(|r| r.bench == bench && r.threads == threads)
}

fn stat(xs: &[Option<f64>]) -> Option<Stat> {
    Stat::of(&xs.iter().flatten().copied().collect::<Vec<_>>())
}

/// `a / b` over the medians, with the range of the per-round ratios (rounds
/// where both sides were measured).
fn ratio(a: &[Option<f64>], b: &[Option<f64>]) -> Option<Stat> {
    let (sa, sb) = (stat(a)?, stat(b)?);
    let pairs: Vec<f64> = a.iter().zip(b).filter_map(|(x, y)| Some((*x)? / (*y)?)).collect();
    let spread = Stat::of(&pairs);
    Some(Stat {
        median: sa.median / sb.median,
        min: spread.map_or(sa.median / sb.median, |s| s.min),
        max: spread.map_or(sa.median / sb.median, |s| s.max),
        n: pairs.len().max(1),
    })
}

/// A fixed value per round.
fn plus(xs: &[Option<f64>], c: Option<f64>) -> Vec<Option<f64>> {
    xs.iter().map(|x| Some((*x)? + c?)).collect()
}

fn scale(xs: &[Option<f64>], c: f64) -> Vec<Option<f64>> {
    xs.iter().map(|x| x.map(|x| x * c)).collect()
}

/// What a figure must stay within.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    pub fn met(self, v: f64) -> bool {
        match self {
            Target::AtMost(t) => v <= t,
            Target::AtLeast(t) => v >= t,
        }
    }
}

/// One row of the table.
pub struct Row {
    pub figure: &'static str,
    pub ours: String,
    pub peer: String,
    pub openblas: String,
    /// The judged figure: a ratio, or a value (ms, bytes) with `unit`.
    pub value: Option<Stat>,
    pub unit: &'static str,
    pub target: Option<Target>,
}

impl Row {
    /// A row of our figures alone (no peer column), judged as a ratio.
    fn ours(figure: &'static str, ours: String, value: Option<Stat>, target: Option<Target>) -> Row {
        Row {
            figure,
            ours,
            peer: String::new(),
            openblas: String::new(),
            value,
            unit: "",
            target,
        }
    }

    /// `met`, `missed`, `not measured`, or empty for a row without target
    /// (judged on the median).
    pub fn status(&self) -> &'static str {
        match (self.target, self.value) {
            (None, _) => "",
            (Some(_), None) => "not measured",
            (Some(t), Some(v)) if t.met(v.median) => "met",
            _ => "**missed**",
        }
    }

    fn value_cell(&self) -> String {
        match self.value {
            None => "-".into(),
            Some(v) if self.unit.is_empty() => v.show(|x| format!("{x:.3}")),
            Some(v) => format!("{} {}", v.show(|x| format!("{x:.1}")), self.unit),
        }
    }

    fn target_cell(&self) -> String {
        let unit = if self.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        match self.target {
            None => String::new(),
            Some(Target::AtMost(t)) => format!("<= {t}{unit}"),
            Some(Target::AtLeast(t)) => format!(">= {t}{unit}"),
        }
    }
}

fn secs(x: f64) -> String {
    format!("{x:.3}")
}

fn gflops(x: f64) -> String {
    format!("{x:.1}")
}

/// `133710.4` -> `"133,710"`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < -0.5 { format!("-{out}") } else { out }
}

fn cell(s: Option<Stat>, fmt: fn(f64) -> String) -> String {
    s.map_or_else(|| "-".into(), |s| s.show(fmt))
}

/// The median alone, for cells that hold two figures (their ratio's cell
/// shows the range).
fn median(s: Option<Stat>, fmt: fn(f64) -> String) -> String {
    s.map_or_else(|| "-".into(), |s| fmt(s.median))
}

/// Every row, computed from one run's lines.
pub fn rows(m: &Measurements) -> Vec<Row> {
    let es = |t| m.ours("es-lowrank", t, "seconds_per_step");
    let es_tps = |t| m.ours("es-lowrank", t, "tokens_per_s");
    let inf = |t| m.ours("inference", t, "seconds_per_step");
    let inf_gflops = |t| m.ours("inference", t, "gflops");
    let full = |t| m.ours("es-full", t, "seconds_per_step");
    let up_low = m.once("update-lowrank-N256", "seconds_per_step");
    let up_full = m.once("update-full-N256", "seconds_per_step");
    let mut rows = Vec::new();

    // ES steps against the JAX peer: evaluation + update, like its jitted step.
    let step = |figure, ours: Vec<Option<f64>>, mode, threads, target| Row {
        figure,
        ours: cell(stat(&ours), secs),
        peer: cell(stat(&m.jax(mode, threads)), secs),
        openblas: String::new(),
        value: ratio(&ours, &m.jax(mode, threads)),
        unit: "",
        target,
    };
    let t07 = Some(Target::AtMost(0.7));
    rows.push(step(
        "low-rank ES step, 2 threads, s (evaluation + update)",
        plus(&es(2), up_low),
        "lowrank",
        2,
        t07,
    ));
    rows.push(step(
        "low-rank ES step, 1 thread, s",
        plus(&es(1), up_low),
        "lowrank",
        1,
        None,
    ));
    rows.push(step(
        "full-rank ES step, 1 thread, s (evaluation + update)",
        plus(&full(1), up_full),
        "fullrank",
        1,
        t07,
    ));
    let full2 = plus(&full(2), up_full);
    let mut row = step(
        "full-rank ES step, 2 threads, s",
        full2.clone(),
        "fullrank",
        2,
        t07,
    );
    if stat(&full2).is_none() {
        // Our es-full bench runs one thread: the peer's two-thread figure is
        // context, not a comparison.
        row.ours = "(one thread only)".into();
        row.target = None;
    }
    rows.push(row);
    rows.push(step("inference, 2 threads, s/step", inf(2), "inference", 2, None));
    rows.push(step("inference, 1 thread, s/step", inf(1), "inference", 1, None));

    for (t, figure) in [
        (1, "low-rank ES / inference throughput, 1 thread"),
        (2, "low-rank ES / inference throughput, 2 threads"),
    ] {
        let ours = format!(
            "{} / {} tokens/s",
            median(stat(&es_tps(t)), thousands),
            median(stat(&m.ours("inference", t, "tokens_per_s")), thousands)
        );
        rows.push(Row::ours(
            figure,
            ours,
            ratio(&inf(t), &es(t)),
            Some(Target::AtLeast(0.95)),
        ));
    }
    for (t, figure) in [
        (
            1,
            "forward GFLOP/s / OpenBLAS sgemm [4096,256]x[256,256], 1 thread",
        ),
        (
            2,
            "forward GFLOP/s / OpenBLAS sgemm [4096,256]x[256,256], 2 threads",
        ),
    ] {
        let ours = cell(stat(&inf_gflops(t)), gflops);
        let mut row = Row::ours(
            figure,
            ours,
            ratio(&inf_gflops(t), &m.openblas(t)),
            Some(Target::AtLeast(0.8)),
        );
        row.openblas = cell(stat(&m.openblas(t)), gflops);
        rows.push(row);
    }
    let gemm = m.ours("gemm", 1, "gflops");
    let mut row = Row::ours(
        "sgemm [4096,256]x[256,256] alone, 1 thread, GFLOP/s",
        cell(stat(&gemm), gflops),
        ratio(&gemm, &m.openblas(1)),
        // Context for the forward rows: what the GEMM alone reaches.
        None,
    );
    row.openblas = cell(stat(&m.openblas(1)), gflops);
    rows.push(row);
    let ours = format!(
        "{} / {} tokens/s",
        median(stat(&es_tps(2)), thousands),
        median(stat(&es_tps(1)), thousands)
    );
    rows.push(Row::ours(
        "2-thread / 1-thread throughput, native worker (low-rank ES)",
        ours,
        ratio(&es(1), &es(2)),
        Some(Target::AtLeast(1.85)),
    ));

    let native_tps = stat(&es_tps(1));
    for (figure, target, goal) in [
        (
            "wasm (simd128, headless Chromium, 1 worker) / native, 1 thread",
            "wasm-chromium",
            true,
        ),
        ("wasm (simd128, Node) / native, 1 thread", "wasm-node", false),
    ] {
        let w = m.wasm(target);
        let ours = format!(
            "{} / {} tokens/s",
            w.map_or("-".into(), thousands),
            median(native_tps, thousands)
        );
        let value = w.zip(native_tps).and_then(|(w, n)| Stat::of(&[w / n.median]));
        rows.push(Row::ours(
            figure,
            ours,
            value,
            goal.then_some(Target::AtLeast(0.35)),
        ));
    }

    // One core evaluates N = 4096 members in 4096 / 256 single-thread steps.
    let update = m.once("update-lowrank-N4096", "seconds_per_step");
    let eval_4096 = stat(&scale(&es(1), 4096.0 / POPULATION));
    let ours = format!(
        "{} s / {} s",
        update.map_or("-".into(), secs),
        median(eval_4096, gflops)
    );
    let value = ratio(&[update], &[eval_4096.map(|s| s.median)]);
    rows.push(Row::ours(
        "update, low-rank N = 4096 / evaluating 4096 members on one core",
        ours,
        value,
        Some(Target::AtMost(0.05)),
    ));

    // No target: every replica pays it at the fleet's step rate.
    let apply = m.once("apply-default-N256", "seconds_per_step");
    let wasm_apply = |t| m.wasm_of("apply-default-N256", t, |l| l.seconds_per_step);
    let us = |s: Option<f64>| s.map_or("-".into(), |s| format!("{:.0}", s * 1e6));
    let mut row = Row::ours(
        "update and hash per step, default recipe, us: native / Node / Chromium (every replica, one core)",
        format!(
            "{} / {} / {}",
            us(apply),
            us(wasm_apply("wasm-node")),
            us(wasm_apply("wasm-chromium"))
        ),
        apply.and_then(|s| Stat::of(&[s * 1e6])),
        None,
    );
    row.unit = "us";
    rows.push(row);

    let (p50, p99, wall) = (
        m.system("coordinator-1000", "p50_ms"),
        m.system("coordinator-1000", "p99_ms"),
        m.system("coordinator-1000", "wall_p50_ms"),
    );
    let opt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
    let mut row = Row::ours(
        "coordinator time per step, 1,000 compute-free clients, N = 4096, p50 (CPU)",
        format!(
            "p50 {} / p99 {} ms CPU, p50 {} ms wall",
            opt(p50),
            opt(p99),
            opt(wall)
        ),
        p50.and_then(|x| Stat::of(&[x])),
        Some(Target::AtMost(5.0)),
    );
    row.unit = "ms";
    rows.push(row);
    let bytes = m.system("wire-bytes", "bytes_per_member");
    let mut row = Row::ours(
        "uplink wire bytes per member evaluation (amortized)",
        bytes.map_or("-".into(), |b| format!("{b:.2}")),
        bytes.and_then(|x| Stat::of(&[x])),
        Some(Target::AtMost(8.0)),
    );
    row.unit = "bytes";
    rows.push(row);
    // No target: how the downlink grows with the population is the figure
    // (BENCHMARKS.md, "Downlink bytes").
    let per_step = |n: u32| m.system("downlink-bytes", &format!("bytes_{n}"));
    rows.push(Row::ours(
        "downlink bytes per volunteer per step (the update), N = 256 / 4,096 / 65,536",
        format!(
            "{} / {} / {}",
            per_step(256).map_or("-".into(), thousands),
            per_step(4096).map_or("-".into(), thousands),
            per_step(65_536).map_or("-".into(), thousands)
        ),
        None,
        None,
    ));
    rows
}

/// Time and load at one end of the run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Moment {
    /// Seconds since the Unix epoch.
    pub unix: u64,
    /// The one-minute load average (`/proc/loadavg`), where there is one.
    pub load: Option<f64>,
}

impl Moment {
    pub fn now() -> Moment {
        Moment {
            unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            load: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok()),
        }
    }
}

/// The machine and the command, for the lines above the table.
pub struct Machine {
    /// `/proc/cpuinfo`'s first "model name".
    pub cpu: String,
    /// CPUs this process may use.
    pub cpus: usize,
    /// The process's nice value (a final run is asked to use `nice -n 10`).
    pub nice: i32,
    /// The command as typed: `cargo xtask bench ...`.
    pub command: String,
}

impl Machine {
    pub fn read(args: &[String]) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        Machine {
            cpu: cpu_model(&cpuinfo).unwrap_or("unknown CPU").to_string(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            nice: nice_of(&stat).unwrap_or(0),
            command: command_line(args),
        }
    }
}

/// The first `model name` of a `/proc/cpuinfo` text.
pub fn cpu_model(cpuinfo: &str) -> Option<&str> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim())
}

/// The nice value (field 19) of a `/proc/<pid>/stat` text; the command name
/// (field 2, in parentheses) may hold spaces, so fields count from its end.
pub fn nice_of(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(16)?.parse().ok()
}

/// `cargo xtask bench` and its arguments, quoted where a shell would need it.
pub fn command_line(args: &[String]) -> String {
    let mut line = String::from("cargo xtask bench");
    for a in args {
        let plain = !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@".contains(c));
        if plain {
            write!(line, " {a}").unwrap();
        } else {
            write!(line, " '{}'", a.replace('\'', "'\\''")).unwrap();
        }
    }
    line
}

/// (year, month, day, hour, minute) in UTC of a Unix time (Howard Hinnant's
/// days-to-civil algorithm: xtask has no date crate on purpose).
pub fn utc(unix: u64) -> (i64, u32, u32, u32, u32) {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (secs / 3600) as u32, (secs % 3600 / 60) as u32)
}

/// `"2026-11-28 11:20-11:36 UTC"` (both dates when the run crossed midnight).
fn span(start: u64, end: u64) -> String {
    let (y0, mo0, d0, h0, mi0) = utc(start);
    let (y1, mo1, d1, h1, mi1) = utc(end);
    if (y0, mo0, d0) == (y1, mo1, d1) {
        format!("{y0}-{mo0:02}-{d0:02} {h0:02}:{mi0:02}-{h1:02}:{mi1:02} UTC")
    } else {
        format!("{y0}-{mo0:02}-{d0:02} {h0:02}:{mi0:02} to {y1}-{mo1:02}-{d1:02} {h1:02}:{mi1:02} UTC")
    }
}

/// Where the generated block starts and ends in a markdown file, so
/// `--markdown FILE` can refresh the table in BENCHMARKS.md and README.md and
/// leave the prose around it alone.
pub const BEGIN: &str = "<!-- bench-table: generated by `cargo xtask bench`, do not edit by hand -->";
pub const END: &str = "<!-- bench-table: end -->";

/// The markdown block: the run's facts, the command, then the table.
pub fn render(m: &Measurements, machine: &Machine, start: Moment, end: Moment) -> String {
    let load = |x: Option<f64>| x.map_or("unknown".into(), |l| format!("{l:.2}"));
    let rounds = m.rounds.len();
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "{BEGIN}").unwrap();
    writeln!(
        w,
        "- Measured {} on {} ({} CPUs); load average (1 min) {} at the start, {} at the end{}.",
        span(start.unix, end.unix),
        machine.cpu,
        machine.cpus,
        load(start.load),
        load(end.load),
        if machine.nice == 0 {
            String::new()
        } else {
            format!("; run at nice {}", machine.nice)
        }
    )
    .unwrap();
    writeln!(w, "- Command: `{}`.", machine.command).unwrap();
    // Past one runnable task per two CPUs, another program held a core for
    // part of the run: say so beside the figures it skews.
    let busy = [start.load, end.load]
        .into_iter()
        .flatten()
        .any(|l| l > 0.5 * machine.cpus as f64);
    if busy {
        writeln!(
            w,
            "- The machine was busy (see the load averages): two-thread figures and absolute times \
             are unreliable; ratios of interleaved figures less so."
        )
        .unwrap();
    }
    let peers = m
        .rounds
        .iter()
        .any(|r| !r.jax.is_empty() || !r.openblas.is_empty());
    let mut threads = String::from(
        "- Threads: ours 1 and 2 (`std::thread`s claiming chunks of 64 members shrinking to 4, as the native worker)",
    );
    if peers {
        let jax = m
            .rounds
            .iter()
            .flat_map(|r| &r.jax)
            .find_map(|p| p.jax_version.clone())
            .unwrap_or_else(|| "?".into());
        let blas = |key: &str| {
            m.rounds
                .iter()
                .flat_map(|r| &r.openblas)
                .find_map(|l| l.text(key).map(str::to_string))
                .unwrap_or_else(|| "?".into())
        };
        write!(
            threads,
            "; JAX peer {jax} 1 and 2 (CPU affinity); OpenBLAS {} ({}, numpy {}) 1 and 2 (`OPENBLAS_NUM_THREADS`)",
            blas("blas_version"),
            blas("architecture"),
            blas("numpy_version"),
        )
        .unwrap();
    }
    writeln!(w, "{threads}.").unwrap();
    if peers {
        writeln!(
            w,
            "- Step and throughput figures: median (range) of {rounds} round{}, ours and the peers alternating; \
             a ratio's range is that of the rounds' own ratios.",
            if rounds == 1 { "" } else { "s" }
        )
        .unwrap();
    } else if m.peers_requested {
        writeln!(
            w,
            "- JAX peer and OpenBLAS: asked for, but no figure came back (see the run's output)."
        )
        .unwrap();
    } else {
        writeln!(
            w,
            "- JAX peer and OpenBLAS: not measured in this run (`--peers PYTHON` measures them)."
        )
        .unwrap();
    }
    writeln!(w).unwrap();
    writeln!(w, "| figure | ours | JAX peer | OpenBLAS | ratio | target | |").unwrap();
    writeln!(w, "|---|---|---|---|---|---|---|").unwrap();
    for r in rows(m) {
        writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.figure,
            r.ours,
            r.peer,
            r.openblas,
            r.value_cell(),
            r.target_cell(),
            r.status()
        )
        .unwrap();
    }
    writeln!(w, "{END}").unwrap();
    out
}

/// `text` with the block between [`BEGIN`] and [`END`] replaced by `block`
/// (which carries both markers), or `None` if `text` has no such block.
pub fn splice(text: &str, block: &str) -> Option<String> {
    let start = text.find(BEGIN)?;
    let end = start + text[start..].find(END)? + END.len();
    let tail = text[end..].strip_prefix('\n').unwrap_or(&text[end..]);
    Some(format!("{}{}{}", &text[..start], block, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record read from a line as a bench prints it.
    fn rec(line: &str) -> Record {
        Record::parse(line).unwrap_or_else(|| panic!("not a record: {line}"))
    }

    /// Records from lines as the benches print them (values from a quiet
    /// run of 2026-11-28, trimmed to the keys the table reads).
    fn native(es1: f64, inf1: f64, es2: f64, inf2: f64) -> Vec<Record> {
        let step = 262_144.0;
        let line = |bench: &str, t: u32, s: f64| {
            rec(&format!(
                r#"{{"bench":"{bench}","workload":"RW-256","target":"native","threads":{t},"tokens_per_s":{:.0},"seconds_per_step":{s},"gflops":{:.2},"note":"x"}}"#,
                step / s,
                111.8 / s
            ))
        };
        vec![
            line("inference", 1, inf1),
            line("es-lowrank", 1, es1),
            line("inference", 2, inf2),
            line("es-lowrank", 2, es2),
        ]
    }

    /// The JAX peer's line: Python's `json.dumps`, spaces and nested objects.
    fn jax_line(mode: &str, t: u32, s: f64) -> String {
        format!(
            r#"{{"mode": "{mode}", "step_seconds_median": {s}, "tokens_per_s": 1.0, "jax_version": "0.10.2", "threads": {t}, "thread_info": {{"cpus_in_affinity": {t}, "env": {{}}}}, "sgemm_4096x256x256_gflops": {{"numpy": 132.4, "jax": 106.0}}}}"#
        )
    }

    fn jax(mode: &str, t: u32, s: f64) -> PeerStep {
        PeerStep::parse(&jax_line(mode, t, s)).unwrap()
    }

    fn openblas(t: u32, g: f64) -> Record {
        rec(&format!(
            r#"{{"bench":"openblas-sgemm","threads":{t},"gflops":{g},"blas_version":"0.3.31","architecture":"Haswell","numpy_version":"2.4.6"}}"#
        ))
    }

    fn measurements() -> Measurements {
        let mut r1 = Round {
            native: native(2.0, 2.1, 1.0, 1.05),
            jax: vec![
                jax("lowrank", 2, 1.5),
                jax("lowrank", 1, 2.8),
                jax("fullrank", 1, 6.4),
                jax("fullrank", 2, 6.0),
            ],
            openblas: vec![openblas(1, 60.0), openblas(2, 120.0)],
        };
        r1.native.extend(
            [
            r#"{"bench":"gemm","workload":"RW-256","target":"native","threads":1,"tokens_per_s":null,"seconds_per_step":0.008715,"gflops":61.61}"#.to_string(),
            r#"{"bench":"es-full","workload":"RW-256","target":"native","threads":1,"seconds_per_step":3.0}"#.to_string(),
            r#"{"bench":"update-lowrank-N256","threads":1,"tokens_per_s":null,"seconds_per_step":0.05,"gflops":2.5}"#.to_string(),
            r#"{"bench":"update-full-N256","threads":1,"tokens_per_s":null,"seconds_per_step":0.06}"#.to_string(),
            r#"{"bench":"update-lowrank-N4096","threads":1,"tokens_per_s":null,"seconds_per_step":0.4,"ratio_to_eval_one_core":0.01}"#.to_string(),
            r#"{"bench":"apply-default-N256","target":"native","threads":1,"tokens_per_s":null,"seconds_per_step":0.00031}"#.to_string(),
        ]
            .map(|l| rec(&l)),
        );
        let r2 = Round {
            native: native(2.2, 2.2, 1.2, 1.1),
            jax: vec![jax("lowrank", 2, 1.1)],
            openblas: vec![openblas(1, 50.0)],
        };
        let r3 = Round {
            native: native(2.1, 2.0, 1.1, 1.2),
            jax: vec![jax("lowrank", 2, 1.3)],
            openblas: vec![],
        };
        Measurements {
            rounds: vec![r1, r2, r3],
            system: vec![
                rec(
                    r#"{"bench":"coordinator-1000","workload":"RW-256","target":"native","threads":1,"seconds_per_step":0.6977,"p50_ms":9.012,"p99_ms":11.8,"wall_p50_ms":7.6}"#,
                ),
                rec(r#"{"bench":"wire-bytes","threads":1,"bytes_per_member":4.713}"#),
                rec(
                    r#"{"bench":"downlink-bytes","threads":1,"bytes_256":1234,"bytes_4096":20480,"bytes_65536":163846}"#,
                ),
            ],
            wasm: vec![rec(
                r#"{"bench":"es-lowrank","workload":"RW-256","target":"wasm-chromium","threads":1,"tokens_per_s":48290,"seconds_per_step":5.4}"#,
            )],
            peers_requested: true,
        }
    }

    fn row<'a>(rows: &'a [Row], prefix: &str) -> &'a Row {
        rows.iter().find(|r| r.figure.starts_with(prefix)).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn reads_both_json_styles() {
        let ours =
            rec(r#"{"bench":"es-lowrank","threads":2,"tokens_per_s":255805,"gflops":null,"note":"a, b"}"#);
        assert_eq!((ours.bench.as_str(), ours.threads), ("es-lowrank", 2));
        assert_eq!((ours.tokens_per_s, ours.gflops), (Some(255_805.0), None));
        assert_eq!((ours.text("note"), ours.text("missing")), (Some("a, b"), None));
        // Python's spacing and nested objects; `threads` is the top-level
        // key, not `thread_info`'s nested affinity.
        let peer = jax("lowrank", 1, 2.81387);
        assert_eq!((peer.mode.as_str(), peer.threads), ("lowrank", 1));
        assert_eq!(peer.step_seconds_median, Some(2.81387));
        assert_eq!(peer.jax_version.as_deref(), Some("0.10.2"));
    }

    #[test]
    fn medians_and_ranges() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stat::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Stat::of(&[]), None);
        assert_eq!(Stat::of(&[f64::NAN]), None);
        assert_eq!(s.show(secs), "2.000 (1.000-3.000)");
        assert_eq!(Stat::of(&[1.5]).unwrap().show(secs), "1.500");
        assert_eq!(thousands(133_710.4), "133,710");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn ratios_come_from_medians_over_rounds() {
        let rows = rows(&measurements());
        // Ours: es-lowrank 2 threads 1.0 / 1.2 / 1.1 s plus the 0.05 s update
        // -> median 1.15; JAX 1.5 / 1.1 / 1.3 -> 1.3; per round 0.7, 1.136, 0.885.
        let low = row(&rows, "low-rank ES step, 2 threads");
        let v = low.value.unwrap();
        assert!(close(v.median, 1.15 / 1.3), "{v:?}");
        assert!(close(v.min, 1.05 / 1.5) && close(v.max, 1.25 / 1.1), "{v:?}");
        assert_eq!(low.ours, "1.150 (1.050-1.250)");
        assert_eq!(low.peer, "1.300 (1.100-1.500)");
        assert_eq!(low.status(), "**missed**");
        // Full rank, one thread: (3.0 + 0.06) / 6.4, measured in round 1 only.
        let full = row(&rows, "full-rank ES step, 1 thread");
        assert!(close(full.value.unwrap().median, 3.06 / 6.4));
        assert_eq!(full.status(), "met");
        let full2 = row(&rows, "full-rank ES step, 2 threads");
        assert_eq!(
            (full2.ours.as_str(), full2.peer.as_str()),
            ("(one thread only)", "6.000")
        );
        assert_eq!(full2.status(), "");
        // es-lowrank / inference throughput = inference time / ES time:
        // medians 2.1 / 2.1 at one thread, 1.1 / 1.1 at two.
        let tput = row(&rows, "low-rank ES / inference throughput, 1 thread");
        assert!(close(tput.value.unwrap().median, 1.0));
        assert_eq!(tput.ours, "124,830 / 124,830 tokens/s");
        assert_eq!(tput.status(), "met");
        // Scaling: 2.1 s on one thread against 1.1 s on two.
        let scaling = row(&rows, "2-thread / 1-thread");
        assert!(close(scaling.value.unwrap().median, 2.1 / 1.1));
        assert_eq!(scaling.status(), "met");
        // Forward GFLOP/s at one thread: 111.8 / 2.1 (median over rounds of
        // 111.8 / {2.1, 2.2, 2.0}) against OpenBLAS median(60, 50) = 55.
        let fwd = row(
            &rows,
            "forward GFLOP/s / OpenBLAS sgemm [4096,256]x[256,256], 1 thread",
        );
        assert!((fwd.value.unwrap().median - 111.8 / 2.1 / 55.0).abs() < 1e-3);
        assert_eq!(fwd.openblas, "55.0 (50.0-60.0)");
        let gemm = row(&rows, "sgemm");
        assert!(close(gemm.value.unwrap().median, 61.61 / 55.0));
        // wasm: 48,290 tokens/s against the median one-thread ES tokens/s
        // (262,144 / 2.1).
        let wasm = row(&rows, "wasm (simd128, headless");
        assert!((wasm.value.unwrap().median - 48_290.0 / (262_144.0 / 2.1)).abs() < 1e-4);
        assert_eq!(wasm.status(), "met");
        assert_eq!(row(&rows, "wasm (simd128, Node)").value, None);
        // Update: 0.4 s against 16 x 2.1 s.
        let update = row(&rows, "update");
        assert!(close(update.value.unwrap().median, 0.4 / (16.0 * 2.1)));
        assert_eq!(update.ours, "0.400 s / 33.6 s");
        let coord = row(&rows, "coordinator");
        assert_eq!(
            (coord.value_cell().as_str(), coord.status()),
            ("9.0 ms", "**missed**")
        );
        let bytes = row(&rows, "uplink");
        assert_eq!(
            (bytes.value_cell().as_str(), bytes.status()),
            ("4.7 bytes", "met")
        );
        let down = row(&rows, "downlink");
        assert_eq!(down.ours, "1,234 / 20,480 / 163,846");
        assert_eq!((down.value_cell().as_str(), down.status()), ("-", ""));
    }

    #[test]
    fn missing_figures_say_not_measured() {
        let m = Measurements::default();
        let rows = rows(&m);
        let low = row(&rows, "low-rank ES step, 2 threads");
        assert_eq!((low.ours.as_str(), low.status()), ("-", "not measured"));
        assert_eq!(row(&rows, "inference, 1 thread").status(), "");
        let table = render(
            &m,
            &Machine {
                cpu: "AMD EPYC".into(),
                cpus: 2,
                nice: 0,
                command: command_line(&[]),
            },
            Moment { unix: 0, load: None },
            Moment { unix: 60, load: None },
        );
        assert!(
            table.contains("JAX peer and OpenBLAS: not measured in this run"),
            "{table}"
        );
    }

    #[test]
    fn renders_the_table_with_the_run_facts() {
        let machine = Machine {
            cpu: cpu_model("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t: fpu\n")
                .unwrap()
                .into(),
            cpus: 2,
            nice: nice_of("123 (my prog) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 20 10 1 0").unwrap(),
            command: command_line(&["--peers".into(), "/tmp/jax venv/python".into()]),
        };
        assert_eq!(machine.nice, 10);
        let start = Moment {
            unix: 1_795_864_805,
            load: Some(0.93),
        };
        let end = Moment {
            unix: 1_795_864_805 + 16 * 60,
            load: Some(1.2),
        };
        let table = render(&measurements(), &machine, start, end);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], BEGIN);
        assert_eq!(
            lines[1],
            "- Measured 2026-11-28 11:20-11:36 UTC on AMD EPYC (2 CPUs); load average (1 min) 0.93 at the start, \
             1.20 at the end; run at nice 10."
        );
        assert_eq!(
            lines[2],
            "- Command: `cargo xtask bench --peers '/tmp/jax venv/python'`."
        );
        assert!(lines[3].starts_with("- The machine was busy"), "{}", lines[3]);
        assert!(
            lines[4].contains("JAX peer 0.10.2 1 and 2") && lines[4].contains("OpenBLAS 0.3.31 (Haswell")
        );
        assert!(lines[5].starts_with("- Step and throughput figures: median (range) of 3 rounds"));
        assert!(table.contains(
            "| low-rank ES step, 2 threads, s (evaluation + update) | 1.150 (1.050-1.250) | 1.300 (1.100-1.500) \
             |  | 0.885 (0.700-1.136) | <= 0.7 | **missed** |"
        ));
        assert!(table.contains("| 9.0 ms | <= 5 ms | **missed** |"));
        assert_eq!(*lines.last().unwrap(), END);
        // One row per figure, all with seven cells.
        let rows: Vec<&&str> = lines.iter().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 1 + 19);
        // The update's row: native, then the wasm targets that ran it.
        assert!(
            table.contains("| 310 / - / - |"),
            "{}",
            rows.iter().find(|r| r.contains("default recipe")).unwrap()
        );
        assert!(rows.iter().all(|l| l.matches(" | ").count() == 6), "{rows:?}");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0));
        assert_eq!(utc(1_795_864_805), (2026, 11, 28, 11, 20));
        // 2024-02-29 23:59 (leap day) and the next minute.
        assert_eq!(utc(1_709_251_140), (2024, 2, 29, 23, 59));
        assert_eq!(utc(1_709_251_200), (2024, 3, 1, 0, 0));
        assert_eq!(
            span(1_709_251_140, 1_709_251_200),
            "2024-02-29 23:59 to 2024-03-01 00:00 UTC"
        );
    }

    #[test]
    fn splices_the_block_into_a_file() {
        let old = format!("# Benchmarks\n\n{BEGIN}\nold table\n{END}\n\n## Method\n");
        let block = format!("{BEGIN}\nnew table\n{END}\n");
        assert_eq!(
            splice(&old, &block).unwrap(),
            format!("# Benchmarks\n\n{BEGIN}\nnew table\n{END}\n\n## Method\n")
        );
        assert_eq!(splice("no markers here", &block), None);
    }
}
