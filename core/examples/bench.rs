//! `cargo xtask bench [--quick]`: the figures ARCHITECTURE.md's "Reference
//! workload RW-256" asks for, on that workload (vocab 65, H = 256, 2 tanh
//! layers, T = 64, B = 16, N = 256, sigma 0.02, low-rank rank 1), as one JSON
//! object per line.
//!
//! Every line is a `seedling_bench_record::Record`, the schema xtask reads
//! back: `bench`, `workload`, `target`, `threads`, `tokens_per_s`,
//! `seconds_per_step` and `gflops` (`null` where a figure has no meaning for
//! that bench); extra keys say what a line is compared with. A "step" is one
//! ES step of RW-256: N * B * T = 262,144 predicted tokens, and
//! 2 * N * B * T * (H^2 + 2 H^2 + H V) = 111.8 GFLOP of forward matmuls (layer
//! 0's input is one-hot, so its `x W_ih` is a row lookup and is not counted).
//!
//! Why each figure exists:
//! - `inference`: [`forward::loss`] of the unperturbed model over N * B = 4096
//!   sequences, the ES minibatch repeated N times, so it reads exactly the
//!   tokens an ES step reads. No ES method can beat plain inference on the
//!   same tokens; this is the ceiling the others are divided by.
//! - `es-lowrank`: [`forward::member_losses`] for all 256 members (EGGROLL,
//!   population-batched: one `[N*B, H] x [H, H]` GEMM per layer and time step
//!   plus rank-1 corrections). `ratio_to_inference` is its tokens/s over
//!   inference's; EGGROLL reports 0.91, and Seedling's target is >= 0.90.
//!   Inference and es-lowrank repetitions are interleaved, so that both see
//!   the same machine load.
//! - `es-full`: the same with full-rank (OpenAI-ES) noise, where every member
//!   runs its own `[B, H] x [H, H]` GEMMs. It is slow, so a subset of whole
//!   antithetic pairs is timed and scaled to N (`note` says how many). Its
//!   `ratio_to_inference` is the number EGGROLL quotes as 0.41% for OpenAI-ES.
//! - `update-lowrank-N256`, `update-lowrank-N4096`, `update-full-N256`:
//!   [`update::es_gradient`] plus [`adam::step`] for a list of N centered
//!   ranks. Every replica (browser tabs included) pays this per step on one
//!   core, whatever share of the evaluation it did, so it must stay small
//!   next to evaluation: `ratio_to_eval_one_core` for N = 4096 is the update
//!   time over 16 x the single-thread es-lowrank step (the time one core
//!   needs to evaluate 4096 members); the target is <= 0.05. `gflops` counts
//!   the 2 flops per parameter and pair of the accumulation.
//! - `apply-default-N256`: [`seedling_core::Replica::apply`] and the weights
//!   hash on the recipe `seedling train`/`serve` use by default (not
//!   RW-256): what every replica pays per step at the fleet's step rate.
//! - `noise`: [`rng::fill_normal`] samples/s (also in `tokens_per_s`).
//!   `seconds_per_step` is the time to draw one full-rank step's noise once
//!   (128 pairs x 230,465 values): the floor of full-rank ES's noise cost.
//! - `gemm`: [`gemm::sgemm`] with [`Backend::Fast`] at [4096,256]x[256,256],
//!   the shape of one population-batched step, to set beside OpenBLAS's sgemm
//!   at the same shape (measured by `../shared/peers/jax_es_step.py`).
//!   `seconds_per_step` is one call.
//! - `fast-vs-reference`: 16 members' low-rank losses with [`Backend::Fast`]
//!   and with [`Backend::Reference`] (plain loops, libm), interleaved;
//!   `ratio_fast_over_reference` is what the fused kernels are worth, and
//!   the CI performance check (`cargo xtask test --only perf-check`) fails
//!   if it collapses.
//! - `threads: 2`: inference and es-lowrank again on two `std::thread`s that
//!   claim chunks of members (es-lowrank) or of the same rows' sequences
//!   (inference) from an atomic counter, shrinking from 64 members to 4
//!   (`split::guided`), the way the native worker splits a job. The core
//!   itself has no threads.
//!
//! Timing: one warm-up, then the median of several repetitions. `--quick`
//! uses fewer repetitions and smaller subsets (about half a minute); the
//! default takes about a minute and a half on two cores; `--reps N` sets the
//! number of whole-step repetitions. `--only a,b` runs the
//! benches whose names start with one of the prefixes; `--threads 1` or
//! `--threads 2` restricts the inference/es-lowrank thread counts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Instant;

use seedling_core::adam::{self, AdamState};
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::{self, Backend};
use seedling_core::model::Layout;
use seedling_core::rng;
use seedling_core::shaping::centered_ranks;
use seedling_core::split;
use seedling_core::tokenizer::Token;
use seedling_core::update;
use seedling_core::{NoiseKind, RunConfig};

use seedling_bench_record::Record;

const VOCAB: u32 = 65;

/// A JSON value of an extra key.
enum Val {
    Num(f64),
    Str(String),
}

/// One output line.
struct Line {
    bench: String,
    threads: usize,
    tokens_per_s: Option<f64>,
    seconds_per_step: f64,
    gflops: Option<f64>,
    extra: Vec<(&'static str, Val)>,
}

impl Line {
    /// Prints the line as the [`Record`] `cargo xtask bench` reads back.
    fn print(&self) {
        let mut r = Record::new(&self.bench, "native", self.threads as u32);
        r.tokens_per_s = self.tokens_per_s;
        r.seconds_per_step = Some(self.seconds_per_step);
        r.gflops = self.gflops;
        for (k, v) in &self.extra {
            match v {
                Val::Num(x) => r.set_num(k, *x),
                Val::Str(t) => r.set_text(k, t.as_str()),
            };
        }
        println!("{}", r.to_line());
    }
}

/// Command-line options.
struct Opts {
    quick: bool,
    /// Repetitions of a whole ES step, when given (`--reps`).
    reps: Option<usize>,
    only: Vec<String>,
    threads: Vec<usize>,
}

impl Opts {
    fn parse() -> Result<Self, String> {
        let mut o = Opts {
            quick: false,
            reps: None,
            only: Vec::new(),
            threads: vec![1, 2],
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                // `cargo xtask bench -- ARGS` passes the separator through.
                "--" => {}
                "--quick" => o.quick = true,
                "--reps" => {
                    let v = args.next().ok_or("--reps needs a count")?;
                    o.reps = Some(
                        v.parse()
                            .ok()
                            .filter(|&r| r > 0)
                            .ok_or(format!("bad --reps {v}"))?,
                    );
                }
                "--only" => {
                    let v = args.next().ok_or("--only needs a list")?;
                    o.only = v.split(',').map(str::to_owned).collect();
                }
                "--threads" => {
                    let v = args.next().ok_or("--threads needs a list")?;
                    o.threads = v
                        .split(',')
                        .map(|t| t.parse().map_err(|_| format!("bad thread count {t}")))
                        .collect::<Result<_, _>>()?;
                    if o.threads.iter().any(|&t| t != 1 && t != 2) {
                        return Err("--threads takes 1 and/or 2".into());
                    }
                }
                "-h" | "--help" => {
                    println!(
                        "usage: bench [--quick] [--reps N] [--only PREFIX[,PREFIX...]] [--threads 1|2|1,2]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(o)
    }

    fn wants(&self, bench: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| bench.starts_with(p.as_str()))
    }

    /// (repetitions of a whole ES step, of a sub-second kernel)
    fn reps(&self) -> (usize, usize) {
        let (steps, kernels) = if self.quick { (2, 10) } else { (7, 30) };
        (self.reps.unwrap_or(steps), kernels)
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Seconds taken by `f`, and its result.
fn timed<R>(f: impl FnOnce() -> R) -> (f64, R) {
    let t0 = Instant::now();
    let r = f();
    (t0.elapsed().as_secs_f64(), r)
}

/// One warm-up call, then the median time of `reps` calls.
fn median_time<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    std::hint::black_box(f());
    median((0..reps).map(|_| timed(|| std::hint::black_box(f())).0).collect())
}

/// RW-256's model, weights and tokens.
struct Rw {
    cfg: RunConfig,
    layout: Layout,
    params: Vec<f32>,
    /// The ES minibatch: B sequences of T + 1 random tokens.
    tokens: Vec<Token>,
    /// The minibatch repeated N times: the N * B sequences inference reads.
    big: Vec<Token>,
}

impl Rw {
    fn new() -> Self {
        let cfg = RunConfig::rw256(VOCAB);
        let layout = Layout::new(cfg.model);
        let params = layout.init_params(cfg.seed, cfg.init_scale);
        let key = rng::derive(&[0xBE4C]);
        let tokens: Vec<Token> = (0..cfg.batch_tokens() as u64)
            .map(|j| (rng::mix64(key ^ j) % VOCAB as u64) as Token)
            .collect();
        let big = tokens.repeat(cfg.es.population as usize);
        Self {
            cfg,
            layout,
            params,
            tokens,
            big,
        }
    }

    fn n(&self) -> usize {
        self.cfg.es.population as usize
    }
    fn b(&self) -> usize {
        self.cfg.es.batch as usize
    }
    fn t(&self) -> usize {
        self.cfg.es.seq_len as usize
    }

    /// Predicted tokens per ES step.
    fn tokens_per_step(&self) -> f64 {
        (self.n() * self.b() * self.t()) as f64
    }

    /// Forward matmul FLOPs per ES step (ARCHITECTURE.md, "Reference workload
    /// RW-256").
    fn flops_per_step(&self) -> f64 {
        let (h, v) = (self.layout.hidden() as f64, self.layout.vocab() as f64);
        2.0 * self.tokens_per_step() * (h * h + 2.0 * h * h + h * v)
    }

    /// Mean loss of the plain model over the N * B sequences, on `threads`
    /// threads that take chunks of sequences as they go, planned as
    /// es-lowrank's are (the same rows per chunk). Also returns the CPU
    /// seconds its threads took.
    fn inference(&self, threads: usize) -> (f32, f64) {
        let len = self.t() + 1;
        let b = self.b();
        let chunks: Vec<&[Token]> = if threads == 1 {
            self.big.chunks(CHUNK_SEQS * len).collect()
        } else {
            split::guided(self.n(), threads, MIN_MEMBERS, 2)
                .into_iter()
                .map(|r| &self.big[r.start * b * len..r.end * b * len])
                .collect()
        };
        let (losses, cpu) = par_chunks(chunks.len(), threads, |i| {
            let n = chunks[i].len() / len;
            let mb = Minibatch::new(chunks[i], n, self.t(), VOCAB as usize).unwrap();
            let l = forward::loss(&self.layout, &self.params, &mb, Backend::Fast).unwrap();
            (l as f64 * n as f64, n)
        });
        let (sum, n) = losses.iter().fold((0.0, 0), |(s, c), &(l, n)| (s + l, c + n));
        ((sum / n as f64) as f32, cpu)
    }

    /// Every listed member's loss, in order, on `threads` threads taking
    /// chunks of members as they go, planned by [`split::guided`] as the
    /// native worker's `evaluate_parallel` does. Also returns the CPU
    /// seconds taken.
    fn members(&self, cfg: &RunConfig, members: &[u32], threads: usize) -> (Vec<f32>, f64) {
        let mb = Minibatch::new(&self.tokens, self.b(), self.t(), VOCAB as usize).unwrap();
        if threads == 1 {
            let c0 = thread_cpu();
            let l = forward::member_losses(&self.layout, &self.params, cfg, 1, &mb, members, Backend::Fast)
                .unwrap();
            return (l, thread_cpu() - c0);
        }
        let chunks: Vec<&[u32]> = split::guided(members.len(), threads, MIN_MEMBERS, 2)
            .into_iter()
            .map(|r| &members[r])
            .collect();
        let (l, cpu) = par_chunks(chunks.len(), threads, |i| {
            forward::member_losses(&self.layout, &self.params, cfg, 1, &mb, chunks[i], Backend::Fast).unwrap()
        });
        (l.concat(), cpu)
    }
}

/// The smallest chunk of two-thread work, in members, as the native
/// worker's (server/src/worker.rs, `PARALLEL_MIN`).
const MIN_MEMBERS: usize = 4;
/// The `chunk` bench's unit of work: 16 members, two of the forward pass's
/// L2-sized blocks.
const CHUNK_MEMBERS: usize = 16;
/// Sequences per call of one-thread inference, and in the `chunk` bench:
/// as many rows as [`CHUNK_MEMBERS`] members.
const CHUNK_SEQS: usize = 256;

/// CPU seconds the calling thread has run so far (Linux's scheduler
/// statistics, nanosecond resolution; 0 where they cannot be read). On a
/// machine shared with other work, wall time counts the time other
/// processes hold the cores; CPU time does not, so the bench reports both.
fn thread_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 * 1e-9)
}

/// `f(0..n)` on `threads` threads that claim indices from one atomic counter
/// (a thread slowed by other work on its core takes fewer), results in index
/// order, and the CPU seconds the threads took. Each thread keeps its
/// results to itself until the join.
fn par_chunks<R: Send>(n: usize, threads: usize, f: impl Fn(usize) -> R + Sync) -> (Vec<R>, f64) {
    let next = AtomicUsize::new(0);
    let done: Vec<(Vec<(usize, R)>, f64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let c0 = thread_cpu();
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break (mine, thread_cpu() - c0);
                        }
                        mine.push((i, f(i)));
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cpu = done.iter().map(|d| d.1).sum();
    let mut all: Vec<(usize, R)> = done.into_iter().flat_map(|d| d.0).collect();
    all.sort_by_key(|&(i, _)| i);
    (all.into_iter().map(|(_, r)| r).collect(), cpu)
}

/// The 1-minute load average (Linux), for the notes: figures taken on a
/// busy machine are not comparable with quiet ones.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn mean(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64
}

/// Figures later lines are compared with.
#[derive(Default)]
struct Seen {
    /// Single-thread inference and es-lowrank step times.
    inference_1t: Option<f64>,
    lowrank_1t: Option<f64>,
}

fn bench_gemm(o: &Opts) {
    let (m, k, n) = (4096, 256, 256);
    let mut a = vec![0.0f32; m * k];
    let mut b = vec![0.0f32; k * n];
    let mut c = vec![0.0f32; m * n];
    rng::fill_normal(rng::derive(&[1]), &mut a);
    rng::fill_normal(rng::derive(&[2]), &mut b);
    let reps = o.reps().1;
    let t = median_time(reps, || {
        gemm::sgemm(Backend::Fast, m, k, n, &a, k, &b, n, &mut c, n, 0.0);
        c[0]
    });
    Line {
        bench: "gemm".into(),
        threads: 1,
        tokens_per_s: None,
        seconds_per_step: t,
        gflops: Some(2.0 * (m * k * n) as f64 / t / 1e9),
        extra: vec![
            ("shape", Val::Str("[4096,256]x[256,256]".into())),
            (
                "note",
                Val::Str(format!(
                    "matrixmultiply sgemm (Backend::Fast); seconds_per_step = one call, median of {reps}"
                )),
            ),
        ],
    }
    .print();
}

/// One layer's GEMM of the fused forward pass on one block: [128, 512] x
/// [512, 256] (layer 1's `[h_0, h_1] x [W_ih; W_hh]`) and the head's [128,
/// 256] x [256, 65], with the weights prepared once ([`gemm::PackedB`], as
/// the forward pass does per block) against `matrixmultiply`'s sgemm, which
/// packs per call, with B out of L2. The fastest of the repetitions, calls interleaved: a
/// kernel's speed is its best run, and the minimum shrugs off other load.
fn bench_gemm_block(o: &Opts) {
    for (k, n) in [(512, 256), (256, 65)] {
        let m = 128;
        let mut a = vec![0.0f32; m * k];
        let mut c = vec![0.0f32; m * n];
        rng::fill_normal(rng::derive(&[3]), &mut a);
        // Calls rotate over four weight matrices, 2 MiB at k = 512, so B
        // comes from L3 as in the forward pass (whose three packed weight
        // matrices and block state overflow a 1 MiB L2), not from a warm L2.
        let bs: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                let mut b = vec![0.0f32; k * n];
                rng::fill_normal(rng::derive(&[4, i]), &mut b);
                b
            })
            .collect();
        let packed: Vec<gemm::PackedB> = bs
            .iter()
            .map(|b| gemm::PackedB::new(Backend::Fast, k, n, b, n))
            .collect();
        let reps = o.reps().1 * 10;
        let (mut tp, mut tm) = (f64::INFINITY, f64::INFINITY);
        for rep in 0..=reps {
            let (b, packed) = (&bs[rep % 4], &packed[rep % 4]);
            tp = tp.min(timed(|| gemm::sgemm_packed(m, &a, k, packed, &mut c, n, 0.0)).0);
            tm = tm.min(timed(|| gemm::sgemm(Backend::Fast, m, k, n, &a, k, b, n, &mut c, n, 0.0)).0);
        }
        let flops = 2.0 * (m * k * n) as f64;
        Line {
            bench: format!("gemm-block-{m}x{k}x{n}"),
            threads: 1,
            tokens_per_s: None,
            seconds_per_step: tp,
            gflops: Some(flops / tp / 1e9),
            extra: vec![
                ("unpacked_gflops", Val::Num(flops / tm / 1e9)),
                (
                    "note",
                    Val::Str(format!(
                        "sgemm_packed with PackedB (gflops) against sgemm (unpacked_gflops), \
                         fastest of {reps}, interleaved"
                    )),
                ),
            ],
        }
        .print();
    }
}

/// One unit of two-thread work on one thread: es-lowrank's chunk of
/// [`CHUNK_MEMBERS`] members and inference's chunk of [`CHUNK_SEQS`]
/// sequences (the same rows), interleaved, the fastest of the repetitions
/// each. On a machine shared with other work the minimum is the steadiest
/// figure for comparing two builds of the forward pass.
fn bench_chunk(o: &Opts, rw: &Rw) {
    let members: Vec<u32> = (0..CHUNK_MEMBERS as u32).collect();
    let mb = Minibatch::new(&rw.tokens, rw.b(), rw.t(), VOCAB as usize).unwrap();
    let len = rw.t() + 1;
    let seqs = &rw.big[..CHUNK_SEQS * len];
    let inf = Minibatch::new(seqs, CHUNK_SEQS, rw.t(), VOCAB as usize).unwrap();
    let reps = o.reps().1;
    let (mut te, mut ti) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..=reps {
        let es = || forward::member_losses(&rw.layout, &rw.params, &rw.cfg, 1, &mb, &members, Backend::Fast);
        te = te.min(timed(|| std::hint::black_box(es().unwrap())).0);
        let plain = || forward::loss(&rw.layout, &rw.params, &inf, Backend::Fast);
        ti = ti.min(timed(|| std::hint::black_box(plain().unwrap())).0);
    }
    let scale = rw.n() as f64 / CHUNK_MEMBERS as f64;
    Line {
        bench: "chunk".into(),
        threads: 1,
        tokens_per_s: Some(rw.tokens_per_step() / (te * scale)),
        seconds_per_step: te * scale,
        gflops: Some(rw.flops_per_step() / (te * scale) / 1e9),
        extra: vec![
            ("inference_seconds_per_step", Val::Num(ti * scale)),
            ("ratio_to_inference", Val::Num(ti / te)),
            (
                "note",
                Val::Str(format!(
                    "es-lowrank members 0..{CHUNK_MEMBERS} and inference of {CHUNK_SEQS} sequences, \
                     interleaved, fastest of {reps} each, scaled x{scale} to N = {}",
                    rw.n()
                )),
            ),
        ],
    }
    .print();
}

fn bench_noise(o: &Opts, rw: &Rw) {
    let mut buf = vec![0.0f32; 1 << 20];
    let reps = o.reps().1;
    let mut key = 0;
    let t = median_time(reps, || {
        key += 1;
        rng::fill_normal(key, &mut buf);
        buf[0]
    });
    let rate = buf.len() as f64 / t;
    let step_samples = (rw.n() / 2 * rw.layout.len) as f64;
    Line {
        bench: "noise".into(),
        threads: 1,
        tokens_per_s: Some(rate),
        seconds_per_step: step_samples / rate,
        gflops: None,
        extra: vec![
            ("samples_per_s", Val::Num(rate)),
            (
                "note",
                Val::Str(format!(
                    "fill_normal of 2^20 values, median of {reps}; tokens_per_s holds samples/s; \
                     seconds_per_step = one step's full-rank noise ({} pairs x {} params) drawn once",
                    rw.n() / 2,
                    rw.layout.len
                )),
            ),
        ],
    }
    .print();
}

/// Inference and es-lowrank at one thread count, repetitions interleaved.
fn bench_lowrank(o: &Opts, rw: &Rw, threads: usize, seen: &mut Seen) {
    let do_inf = o.wants("inference");
    let do_es = o.wants("es-lowrank");
    let members: Vec<u32> = (0..rw.cfg.es.population).collect();
    let reps = o.reps().0;
    let (mut ti, mut te, mut ci, mut ce) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut inf_loss, mut es_loss) = (0.0, 0.0);
    let load0 = load_average();
    for rep in 0..=reps {
        if do_inf {
            let (t, (l, c)) = timed(|| rw.inference(threads));
            inf_loss = l as f64;
            if rep > 0 {
                ti.push(t);
                ci.push(c);
            }
        }
        if do_es {
            let (t, (l, c)) = timed(|| rw.members(&rw.cfg, &members, threads));
            es_loss = mean(&l);
            if rep > 0 {
                te.push(t);
                ce.push(c);
            }
        }
    }
    let load = match (load0, load_average()) {
        (Some(a), Some(b)) => format!("; load average {a:.2} at the start, {b:.2} at the end"),
        _ => String::new(),
    };
    let note = format!(
        "median of {reps} after 1 warm-up, inference and es-lowrank interleaved; \
         cpu_seconds_per_step = CPU time of the threads{load}"
    );
    let ti = do_inf.then(|| median(ti));
    let te = do_es.then(|| median(te));
    let ci = do_inf.then(|| median(ci));
    let ce = do_es.then(|| median(ce));
    if threads == 1 {
        seen.inference_1t = ti;
        seen.lowrank_1t = te;
    }
    if let Some(t) = ti {
        Line {
            bench: "inference".into(),
            threads,
            tokens_per_s: Some(rw.tokens_per_step() / t),
            seconds_per_step: t,
            gflops: Some(rw.flops_per_step() / t / 1e9),
            extra: vec![
                ("cpu_seconds_per_step", Val::Num(ci.unwrap_or(f64::NAN))),
                ("loss", Val::Num(inf_loss)),
                ("note", Val::Str(note.clone())),
            ],
        }
        .print();
    }
    if let Some(t) = te {
        let mut extra = Vec::new();
        if let Some(i) = ti {
            extra.push(("ratio_to_inference", Val::Num(i / t)));
        }
        let c = ce.unwrap_or(f64::NAN);
        extra.push(("cpu_seconds_per_step", Val::Num(c)));
        if let Some(i) = ci {
            extra.push(("cpu_ratio_to_inference", Val::Num(i / c)));
        }
        extra.push(("mean_member_loss", Val::Num(es_loss)));
        extra.push(("note", Val::Str(note)));
        Line {
            bench: "es-lowrank".into(),
            threads,
            tokens_per_s: Some(rw.tokens_per_step() / t),
            seconds_per_step: t,
            gflops: Some(rw.flops_per_step() / t / 1e9),
            extra,
        }
        .print();
    }
}

fn bench_full(o: &Opts, rw: &Rw, seen: &Seen) {
    let mut cfg = rw.cfg;
    cfg.es.noise = NoiseKind::Full;
    let subset: u32 = if o.quick { 8 } else { 32 };
    let members: Vec<u32> = (0..subset).collect();
    let reps = if o.quick { 2 } else { 5 };
    let mut loss = 0.0;
    let t_sub = median_time(reps, || {
        loss = mean(&rw.members(&cfg, &members, 1).0);
    });
    let t = t_sub * rw.n() as f64 / subset as f64;
    let mut extra = Vec::new();
    if let Some(i) = seen.inference_1t {
        extra.push(("ratio_to_inference", Val::Num(i / t)));
    }
    extra.push(("mean_member_loss", Val::Num(loss)));
    extra.push((
        "note",
        Val::Str(format!(
            "timed members 0..{subset} ({} pairs, median of {reps}), scaled x{} to N = {}",
            subset / 2,
            rw.n() as u32 / subset,
            rw.n()
        )),
    ));
    Line {
        bench: "es-full".into(),
        threads: 1,
        tokens_per_s: Some(rw.tokens_per_step() / t),
        seconds_per_step: t,
        gflops: Some(rw.flops_per_step() / t / 1e9),
        extra,
    }
    .print();
}

fn bench_update(o: &Opts, rw: &Rw, noise_kind: NoiseKind, n: u32, seen: &Seen) {
    let kind = if noise_kind == NoiseKind::Full {
        "full"
    } else {
        "lowrank"
    };
    let name = format!("update-{kind}-N{n}");
    if !o.wants(&name) {
        return;
    }
    let mut cfg = rw.cfg;
    cfg.es.noise = noise_kind;
    cfg.es.population = n;
    let key = rng::derive(&[0x1055, n as u64]);
    let losses: Vec<(u32, f32)> = (0..n)
        .map(|m| (m, 4.0 + (rng::mix64(key ^ m as u64) >> 40) as f32 / 16_777_216.0))
        .collect();
    let weights = centered_ranks(&losses).unwrap();
    let mut params = rw.params.clone();
    let mut state = AdamState::new(rw.layout.len);
    let reps = if n > 256 { o.reps().0 } else { o.reps().1 / 2 };
    let t = median_time(reps, || {
        let g = update::es_gradient(&rw.layout, &cfg, 1, &weights).unwrap();
        adam::step(&cfg.adam, cfg.adam.lr, &mut params, &mut state, &g);
    });
    let pairs = (n / 2) as f64;
    let mut extra = Vec::new();
    if n == 4096
        && let Some(e) = seen.lowrank_1t
    {
        let eval = 16.0 * e;
        extra.push(("ratio_to_eval_one_core", Val::Num(t / eval)));
        extra.push(("eval_4096_one_core_seconds", Val::Num(eval)));
    }
    extra.push((
        "note",
        Val::Str(format!(
            "es_gradient + adam::step over {n} centered ranks, median of {reps}; \
             gflops = 2 flops x {} params x {} pairs",
            rw.layout.len, pairs
        )),
    ));
    Line {
        bench: name,
        threads: 1,
        tokens_per_s: None,
        seconds_per_step: t,
        gflops: Some(2.0 * pairs * rw.layout.len as f64 / t / 1e9),
        extra,
    }
    .print();
}

include!("shared/apply_workload.rs");

/// `apply-default-N256`: one whole [`seedling_core::Replica::apply`] plus the weights
/// hash, as every replica does per step, on the recipe `seedling train` and
/// `serve` use by default (1 x 24 tanh layer, a per-input head, the exact
/// readout, the seen input rows, 256 members, one 64-character sequence,
/// a lag of 16), not RW-256. That model is small, so the update (Adam over
/// every weight, the readout's gradient, the hash, the version ring) costs
/// as much as evaluating tens of members; and every replica pays it at the
/// fleet's step rate whatever share of the members it evaluates, so it caps
/// the step rate a volunteer's share can follow. `seconds_per_step` is one
/// apply and hash; `core_share_at_100_steps_per_s` is what 100 steps/s
/// cost one core.
fn bench_apply_default(o: &Opts) {
    let name = "apply-default-N256";
    if !o.wants(name) {
        return;
    }
    let reps = 20 * o.reps().1;
    let (mut replica, weights, batches) = apply_workload(reps);
    let lr = replica.config.adam.lr;
    let mut i = 0;
    let t = median_time(reps, || {
        let s = replica.step;
        replica
            .apply(s, lr, &weights, &batches[i % batches.len()])
            .unwrap();
        i += 1;
        replica.hash()
    });
    Line {
        bench: name.into(),
        threads: 1,
        tokens_per_s: None,
        seconds_per_step: t,
        gflops: None,
        extra: vec![
            ("core_share_at_100_steps_per_s", Val::Num(100.0 * t)),
            (
                "note",
                Val::Str(format!(
                    "Replica::apply + hash, default recipe ({} weights), median of {reps}",
                    replica.params.len()
                )),
            ),
        ],
    }
    .print();
}

/// The fast forward path against the reference one on the same members:
/// what the fused kernels buy over plain loops (the CI performance check
/// fails if this ratio collapses, e.g. when a change loses the
/// vectorization or the AVX2 dispatch).
fn bench_fast_vs_reference(o: &Opts, rw: &Rw) {
    let members: Vec<u32> = (0..16).collect();
    let mb = Minibatch::new(&rw.tokens, rw.b(), rw.t(), VOCAB as usize).unwrap();
    let run =
        |backend| forward::member_losses(&rw.layout, &rw.params, &rw.cfg, 1, &mb, &members, backend).unwrap();
    let reps = if o.quick { 2 } else { 5 };
    let (mut tf, mut tr) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let f = timed(|| run(Backend::Fast)).0;
        let r = timed(|| run(Backend::Reference)).0;
        if rep > 0 {
            tf.push(f);
            tr.push(r);
        }
    }
    let (tf, tr) = (median(tf), median(tr));
    let scale = rw.n() as f64 / members.len() as f64;
    let t = tf * scale;
    Line {
        bench: "fast-vs-reference".into(),
        threads: 1,
        tokens_per_s: Some(rw.tokens_per_step() / t),
        seconds_per_step: t,
        gflops: Some(rw.flops_per_step() / t / 1e9),
        extra: vec![
            ("ratio_fast_over_reference", Val::Num(tr / tf)),
            ("reference_seconds_per_step", Val::Num(tr * scale)),
            (
                "note",
                Val::Str(format!(
                    "low-rank member_losses of members 0..{}, Backend::Fast vs Backend::Reference \
                     interleaved, median of {reps}, scaled x{scale} to N = {}",
                    members.len(),
                    rw.n()
                )),
            ),
        ],
    }
    .print();
}

fn main() {
    let o = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let rw = Rw::new();
    let mut seen = Seen::default();
    if o.wants("gemm") {
        bench_gemm(&o);
    }
    if o.wants("gemm-block") {
        bench_gemm_block(&o);
    }
    if o.wants("chunk") {
        bench_chunk(&o, &rw);
    }
    if o.wants("noise") {
        bench_noise(&o, &rw);
    }
    for &threads in &o.threads {
        if o.wants("inference") || o.wants("es-lowrank") {
            bench_lowrank(&o, &rw, threads, &mut seen);
        }
    }
    if o.wants("es-full") {
        bench_full(&o, &rw, &seen);
    }
    if o.wants("fast-vs-reference") {
        bench_fast_vs_reference(&o, &rw);
    }
    let lowrank = NoiseKind::LowRank { rank: 1 };
    bench_update(&o, &rw, lowrank, 256, &seen);
    bench_update(&o, &rw, lowrank, 4096, &seen);
    bench_update(&o, &rw, NoiseKind::Full, 256, &seen);
    bench_apply_default(&o);
}
