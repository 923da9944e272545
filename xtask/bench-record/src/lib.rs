//! The benchmark JSON lines of `cargo xtask bench`: one typed schema that
//! every bench writes and xtask reads.
//!
//! The benches are separate programs in separate crates (seedling-core's
//! `bench` example, the wasm bench in `wasm-client/tests/bench.rs`, the
//! system benches of `seedling-sim`) and xtask reads what they print, so the
//! line's shape is a contract between crates. Keeping it as one serde type
//! here, written by [`Record::to_line`] and read by [`Record::parse`], means
//! a writer and the reader cannot disagree about a key or its spelling, and
//! the round trip is tested once, below. serde_json does the JSON, so
//! whitespace, escapes and `null` are handled the same on both sides.
//!
//! A line is one JSON object: the fields of [`Record`] (figures with no
//! meaning for a bench are `null`), then any extra keys that say what the
//! line is compared with. The JAX peer's lines come from a Python script
//! outside this workspace and have their own shape, [`PeerStep`].

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Number, Value};

/// The workload every Seedling bench line is measured on (ARCHITECTURE.md,
/// "Reference workload RW-256").
pub const WORKLOAD: &str = "RW-256";

/// One benchmark figure, as a bench prints it and xtask reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What was measured (`es-lowrank`, `inference`, `gemm`, ...): the name
    /// the benchmark table finds the line by.
    pub bench: String,
    /// The workload, [`WORKLOAD`] for Seedling's own lines (empty when a
    /// line read back has none, such as the OpenBLAS probe's).
    #[serde(default)]
    pub workload: String,
    /// Where it ran: `native`, `wasm-node` or `wasm-chromium` (empty when a
    /// line read back has none).
    #[serde(default)]
    pub target: String,
    /// Threads the measurement used.
    pub threads: u32,
    /// Predicted tokens per second, where the bench evaluates tokens.
    #[serde(default, serialize_with = "figure")]
    pub tokens_per_s: Option<f64>,
    /// Seconds per ES step of the workload (or per call, for a kernel).
    #[serde(default, serialize_with = "figure")]
    pub seconds_per_step: Option<f64>,
    /// Forward-matmul GFLOP/s (or the kernel's).
    #[serde(default, serialize_with = "figure")]
    pub gflops: Option<f64>,
    /// Every other key of the line: ratios, notes, CPU times, latencies.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Record {
    /// A line of `bench` on [`WORKLOAD`] at `target` and `threads`, with no
    /// figures yet.
    pub fn new(bench: impl Into<String>, target: impl Into<String>, threads: u32) -> Self {
        Record {
            bench: bench.into(),
            workload: WORKLOAD.into(),
            target: target.into(),
            threads,
            tokens_per_s: None,
            seconds_per_step: None,
            gflops: None,
            extra: Map::new(),
        }
    }

    /// Sets the extra figure `key` (rounded as [`round`] does; `null` when
    /// not finite).
    pub fn set_num(&mut self, key: &str, x: f64) -> &mut Self {
        self.extra.insert(key.into(), number(x));
        self
    }

    /// Sets the extra text `key`.
    pub fn set_text(&mut self, key: &str, text: impl Into<String>) -> &mut Self {
        self.extra.insert(key.into(), Value::String(text.into()));
        self
    }

    /// The number at `key`, a typed figure or an extra one; `None` when it
    /// is missing or `null`.
    pub fn num(&self, key: &str) -> Option<f64> {
        match key {
            "threads" => Some(self.threads.into()),
            "tokens_per_s" => self.tokens_per_s,
            "seconds_per_step" => self.seconds_per_step,
            "gflops" => self.gflops,
            _ => self.extra.get(key)?.as_f64(),
        }
    }

    /// The text at `key`, a typed field or an extra one; `None` when it is
    /// missing, `null` or not text.
    pub fn text(&self, key: &str) -> Option<&str> {
        match key {
            "bench" => Some(&self.bench),
            "workload" => Some(&self.workload),
            "target" => Some(&self.target),
            _ => self.extra.get(key)?.as_str(),
        }
    }

    /// The line a bench prints: one compact JSON object, figures rounded.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a record always serializes")
    }

    /// The record in `line`, which may carry text before it (a test
    /// runner's prefix) or after it; `None` when the line holds no JSON
    /// object with this shape.
    pub fn parse(line: &str) -> Option<Record> {
        first_object(line)
    }
}

/// Every record in `lines`, a bench's output; other lines are skipped. A
/// line that starts a record (`{"bench"`) but does not parse is an error:
/// its writer broke the schema, and a figure would silently go missing.
pub fn records<S: AsRef<str>>(lines: &[S]) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for line in lines.iter().map(AsRef::as_ref) {
        match Record::parse(line) {
            Some(r) => out.push(r),
            None if line.contains("{\"bench\"") => {
                return Err(format!("a benchmark line that does not parse: {line}"));
            }
            None => {}
        }
    }
    Ok(out)
}

/// One line of the JAX peer script (`jax_es_step.py --mode MODE --threads
/// N`, Python's `json.dumps`): the keys the benchmark table reads.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PeerStep {
    /// `lowrank`, `fullrank` or `inference`.
    pub mode: String,
    /// Threads the peer was allowed (CPU affinity).
    pub threads: u32,
    /// The median step time in seconds.
    pub step_seconds_median: Option<f64>,
    /// The JAX version, for the table's notes.
    pub jax_version: Option<String>,
}

impl PeerStep {
    /// The peer's step in `line`, if it holds one.
    pub fn parse(line: &str) -> Option<PeerStep> {
        first_object(line)
    }
}

/// The first JSON value of type `T` starting at the line's first `{`.
fn first_object<T: for<'de> Deserialize<'de>>(line: &str) -> Option<T> {
    let start = line.find('{')?;
    serde_json::Deserializer::from_str(&line[start..])
        .into_iter::<T>()
        .next()?
        .ok()
}

/// `x` to the precision the lines carry: four significant digits below
/// 1,000 (plenty for timings, and free of float noise such as
/// `0.30000000000000004`), whole numbers above; `None` when not finite.
pub fn round(x: f64) -> Option<f64> {
    if !x.is_finite() {
        return None;
    }
    let digits = if x == 0.0 {
        0
    } else {
        x.abs().log10().floor() as i32
    };
    let decimals = (3 - digits).clamp(0, 12) as usize;
    format!("{x:.decimals$}").parse().ok()
}

/// [`round`]ed `x` as a JSON number (an integer when it has no fraction),
/// or `null`.
fn number(x: f64) -> Value {
    match round(x) {
        None => Value::Null,
        // Whole numbers print as integers (`48290`, not `48290.0`).
        Some(r) if r.fract() == 0.0 && r.abs() < 9.0e15 => Value::Number(Number::from(r as i64)),
        Some(r) => Number::from_f64(r).map_or(Value::Null, Value::Number),
    }
}

fn figure<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    x.map_or(Value::Null, number).serialize(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut r = Record::new("es-lowrank", "native", 2);
        r.tokens_per_s = Some(255_805.37);
        r.seconds_per_step = Some(1.024_782);
        r.gflops = None;
        r.set_num("ratio_to_inference", 0.953_21)
            .set_num("cpu_seconds_per_step", f64::NAN)
            .set_text("note", "median of 7, \"quoted\", a\\b");
        r
    }

    #[test]
    fn the_reader_reads_exactly_what_the_writer_writes() {
        let r = sample();
        let line = r.to_line();
        assert_eq!(
            line,
            r#"{"bench":"es-lowrank","workload":"RW-256","target":"native","threads":2,"tokens_per_s":255805,"seconds_per_step":1.025,"gflops":null,"cpu_seconds_per_step":null,"note":"median of 7, \"quoted\", a\\b","ratio_to_inference":0.9532}"#
        );
        let back = Record::parse(&line).unwrap();
        assert_eq!(back.to_line(), line, "a second round trip changes nothing");
        assert_eq!(back.num("tokens_per_s"), Some(255_805.0));
        assert_eq!(back.num("seconds_per_step"), Some(1.025));
        assert_eq!(back.num("gflops"), None);
        assert_eq!(back.num("threads"), Some(2.0));
        assert_eq!(back.num("ratio_to_inference"), Some(0.9532));
        assert_eq!(back.num("cpu_seconds_per_step"), None);
        assert_eq!(back.text("note"), Some("median of 7, \"quoted\", a\\b"));
        assert_eq!(
            (back.text("bench"), back.text("target")),
            (Some("es-lowrank"), Some("native"))
        );
        assert_eq!(back.text("missing"), None);
    }

    #[test]
    fn rounds_to_four_significant_digits_below_a_thousand() {
        assert_eq!(round(0.008_714_9), Some(0.008715));
        assert_eq!(round(111.803_367), Some(111.8));
        assert_eq!(round(48_290.4), Some(48_290.0));
        assert_eq!(round(0.0), Some(0.0));
        assert_eq!(round(-2.345_67), Some(-2.346));
        assert_eq!(round(f64::INFINITY), None);
        assert_eq!(number(48_290.4).to_string(), "48290");
        assert_eq!(number(0.1 + 0.2).to_string(), "0.3");
    }

    #[test]
    fn reads_lines_of_every_writer() {
        // seedling-sim's system bench, as it prints it.
        let sim = r#"{"bench":"coordinator-1000","workload":"RW-256","target":"native","threads":1,"seconds_per_step":0.6977,"p50_ms":9.012,"p99_ms":11.800,"steps":40,"note":"x, y"}"#;
        let r = Record::parse(sim).unwrap();
        assert_eq!((r.bench.as_str(), r.threads), ("coordinator-1000", 1));
        assert_eq!((r.tokens_per_s, r.num("p50_ms")), (None, Some(9.012)));
        // The OpenBLAS probe (Python, compact), with nulls and no workload.
        let blas = r#"{"bench":"openblas-sgemm","shape":"[4096,256]x[256,256]","threads":2,"gflops":120.5,"blas":null,"blas_version":"0.3.31"}"#;
        let r = Record::parse(blas).unwrap();
        assert_eq!((r.workload.as_str(), r.gflops), ("", Some(120.5)));
        assert_eq!((r.text("blas"), r.text("blas_version")), (None, Some("0.3.31")));
        // The wasm bench's line behind the test runner's prefix.
        let wasm = r#"console.log: {"bench":"es-lowrank","workload":"RW-256","target":"wasm-node","threads":1,"tokens_per_s":48290,"seconds_per_step":5.429,"gflops":20.59} trailing"#;
        assert_eq!(Record::parse(wasm).unwrap().tokens_per_s, Some(48_290.0));
        // Not a record.
        assert_eq!(Record::parse("test result: ok. 1 passed"), None);
        assert_eq!(Record::parse(r#"{"mode": "lowrank", "threads": 1}"#), None);
        assert_eq!(Record::parse(r#"{"bench":"x","threads":"two"}"#), None);
    }

    #[test]
    fn picks_the_records_out_of_a_run() {
        let lines = [
            "running 1 test".to_string(),
            Record::new("gemm", "native", 1).to_line(),
            r#"{"other":"json"}"#.to_string(),
        ];
        let rs = records(&lines).unwrap();
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].bench, "gemm");
        let broken = [r#"{"bench":"gemm","threads":null}"#];
        assert!(records(&broken).unwrap_err().contains("does not parse"));
    }

    #[test]
    fn reads_the_jax_peer() {
        let line = r#"{"mode": "lowrank", "step_seconds_median": 2.81387, "tokens_per_s": 1.0, "jax_version": "0.10.2", "threads": 1, "thread_info": {"cpus_in_affinity": 1, "env": {}}}"#;
        assert_eq!(
            PeerStep::parse(line),
            Some(PeerStep {
                mode: "lowrank".into(),
                threads: 1,
                step_seconds_median: Some(2.81387),
                jax_version: Some("0.10.2".into()),
            })
        );
        assert_eq!(PeerStep::parse(r#"{"bench":"gemm","threads":1}"#), None);
    }
}
