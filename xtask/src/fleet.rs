//! `cargo xtask fleet`: a volunteer fleet on this machine, over emulated
//! network links, driving the real `seedling serve` and `seedling worker`.
//!
//! Seedling's promise is that more volunteers train the model faster, and
//! volunteers are 20-150 ms away from the server. This emulator measures
//! that promise where it can be repeated: V volunteers, each with its own
//! CPU share (`seedling worker --cpu-percent`) and its own delaying proxy
//! ([`proxy`]: one-way delay plus jitter, both ways), optional churn (one
//! volunteer leaves and a new one joins every so often), and a wall-clock
//! budget, which is serve's own (`seedling serve --minutes`: the lr decays
//! over it as in `train --minutes`, and the server finishes at it). B of
//! the volunteers may be headless Chromium tabs on the volunteer page
//! (`--browsers B`), opened through their proxies so the page and its
//! WebSocket both cross the emulated link. It polls the server's `/api/status` and prints one JSON line
//! ([`summary`]): steps/s, members/s, the validation curve against the
//! server's clock, the time to given losses, the final validation loss,
//! divergences and reissued jobs; `--table` adds a markdown row for
//! BENCHMARKS.md.
//!
//! Everything stays on loopback, and the run stops by itself at its budget
//! (the server's; the emulator gives it [`BUDGET_GRACE`] more before it
//! stops the server itself).
//! It kills only what it started: each process is held by a handle that
//! kills it on drop ([`procs`]), so an error, a panic or Ctrl-C (caught,
//! and turned into an early end) leaves nothing behind.
//!
//! `--smoke` is a tiny mixed run (two native workers and two tabs, RTT
//! 50 ms, 20 s) that fails unless steps were closed in flight (more than
//! one open) without a divergence and every volunteer's replica ends on the
//! server's hash: the `fleet-smoke` step of `cargo xtask test`.

pub(crate) mod procs;
mod proxy;
mod summary;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use procs::{CHROMIUM, Kind, Launcher, Server, Volunteer};
use proxy::Link;
use summary::{Config, Observed};

use crate::cmd::{Ctx, run};

/// How often the emulator reads `/api/status` and checks on its processes.
const POLL: Duration = Duration::from_millis(250);

/// How long the server may take to load its corpus and listen.
const SERVER_START: Duration = Duration::from_secs(120);

/// How long past the budget the emulator waits for the server to finish by
/// itself (its budget runs from when it opened the run, and its last step
/// and final checkpoint take a moment) before it ends the run itself.
const BUDGET_GRACE: Duration = Duration::from_secs(30);

/// How long after the server finished the emulator waits for every
/// volunteer to report the server's final hash.
const SETTLE: Duration = Duration::from_secs(10);

/// The flags of `seedling serve` the emulator sets itself.
const OWN_SERVE_FLAGS: [&str; 6] = [
    "--port",
    "--run-dir",
    "--seed",
    "--eval-every",
    "--population",
    "--minutes",
];

/// The usage of `cargo xtask fleet`.
pub const USAGE: &str = "  fleet [--volunteers V] [--browsers B] [--cpu-percent P] [--threads T] [--rtt MS]
        [--jitter MS] [--churn SECS] [--budget SECS] [--population N]
        [--eval-every STEPS] [--seed N] [--losses L[,L...]] [--table] [--smoke]
        [--no-build] [--keep] [-- SERVE_ARGS...]
        build the release `seedling`, run `seedling serve --minutes BUDGET/60`
        and V native volunteers (`seedling worker --threads T --cpu-percent
        P`, default 8 x 1 thread x 25%) plus B headless Chromium tabs on the
        volunteer page (T Web Workers at a CPU share of P, which the page
        rounds up to 25/50/75/100; default B = 0), each behind its own
        loopback proxy that delays every chunk by RTT/2 +- JITTER/2 each way
        (default 0 +- 0); with --churn one volunteer leaves and a new one of
        its kind joins every SECS; the server finishes at the budget
        (default 60 s) and the run prints one JSON line: steps/s, members/s,
        the validation curve, the time to each loss (default 2.40,2.30),
        divergences, reissued jobs. --table also prints a BENCHMARKS.md row
        (its header on stderr). --smoke: 2 native workers and 2 tabs x 50%,
        RTT 50 ms, population 64, 20 s; fails unless steps > 0 with more
        than one open at a time, 0 divergences and every volunteer ends on
        the server's hash.
        Logs go to target/fleet/RUN (kept with --keep or on failure).
";

/// Entry point of `cargo xtask fleet`.
pub fn main(ctx: &Ctx, args: &[String]) -> ExitCode {
    if args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--help" || a == "-h")
    {
        print!("usage: cargo xtask\n{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match Options::parse(args) {
        Ok(o) => o,
        Err(err) => {
            eprintln!("xtask fleet: {err}\n\nusage: cargo xtask\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match fleet(ctx, &options) {
        Ok(failures) if failures.is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("xtask fleet: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask fleet --smoke`, for `cargo xtask test`'s `fleet-smoke` step:
/// `Ok` with a note, or what failed.
///
/// Two runs: the mixed fleet at RTT 50 ms, then a worker and a tab 150 ms
/// away, whose steps hold stretched minibatches (`coordinator/stretch.rs`)
/// that the tab's wasm replica must apply to the same hash. The far run's
/// lag is 4: two volunteers want more than twice what so short a window
/// holds, as eight do with the default lag.
pub fn smoke(ctx: &Ctx) -> Result<String, String> {
    let near = Options::parse(&["--smoke".to_string()])?;
    let far = Options::parse(
        &[
            "--smoke",
            "--volunteers",
            "1",
            "--browsers",
            "1",
            "--rtt",
            "150",
            "--budget",
            "15",
            "--",
            "--lag",
            "4",
        ]
        .map(String::from),
    )?;
    let mut failures = fleet(ctx, &near)?;
    if failures.is_empty() {
        failures = fleet(ctx, &far)?
            .into_iter()
            .map(|f| format!("at RTT 150 ms: {f}"))
            .collect();
    }
    if failures.is_empty() {
        Ok("2 workers + 2 tabs at RTT 50 ms, then 1 + 1 at 150 ms with stretched minibatches, steps in flight: 0 divergences, every replica on the server's hash".into())
    } else {
        Err(failures.join("; "))
    }
}

/// The flags of `cargo xtask fleet`.
#[derive(Clone, Debug, PartialEq)]
struct Options {
    /// Native workers.
    volunteers: usize,
    /// Headless Chromium tabs.
    browsers: usize,
    cpu_percent: u8,
    threads: usize,
    rtt: Duration,
    jitter: Duration,
    churn: Option<Duration>,
    budget: Duration,
    population: Option<u32>,
    eval_every: u64,
    seed: u64,
    losses: Vec<f64>,
    table: bool,
    smoke: bool,
    build: bool,
    keep: bool,
    /// Passed to `seedling serve` after the emulator's own flags (so they win).
    serve: Vec<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let (ours, serve) = match args.iter().position(|a| a == "--") {
            Some(i) => (&args[..i], args[i + 1..].to_vec()),
            None => (args, Vec::new()),
        };
        let smoke = ours.iter().any(|a| a == "--smoke");
        let mut o = Options {
            volunteers: if smoke { 2 } else { 8 },
            browsers: if smoke { 2 } else { 0 },
            cpu_percent: if smoke { 50 } else { 25 },
            threads: 1,
            rtt: Duration::from_millis(if smoke { 50 } else { 0 }),
            jitter: Duration::ZERO,
            churn: None,
            budget: Duration::from_secs(if smoke { 20 } else { 60 }),
            population: smoke.then_some(64),
            eval_every: if smoke { 10 } else { 25 },
            seed: 0,
            losses: vec![2.40, 2.30],
            table: false,
            smoke,
            build: true,
            keep: false,
            serve,
        };
        let mut it = ours.iter().map(String::as_str);
        while let Some(arg) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
            match arg {
                "--volunteers" => o.volunteers = number(arg, value()?)?,
                "--browsers" => o.browsers = number(arg, value()?)?,
                "--cpu-percent" => {
                    o.cpu_percent = number(arg, value()?)?;
                    if !(1..=100).contains(&o.cpu_percent) {
                        return Err("--cpu-percent must be 1-100".into());
                    }
                }
                "--threads" => o.threads = number::<usize>(arg, value()?)?.max(1),
                "--rtt" => o.rtt = millis(arg, value()?)?,
                "--jitter" => o.jitter = millis(arg, value()?)?,
                "--churn" => o.churn = Some(seconds(arg, value()?)?).filter(|d| !d.is_zero()),
                "--budget" => o.budget = seconds(arg, value()?)?,
                "--population" => o.population = Some(number(arg, value()?)?),
                "--eval-every" => o.eval_every = number(arg, value()?)?,
                "--seed" => o.seed = number(arg, value()?)?,
                "--losses" => {
                    o.losses = value()?
                        .split(',')
                        .map(|l| number(arg, l))
                        .collect::<Result<_, _>>()?;
                }
                "--table" => o.table = true,
                "--smoke" => {}
                "--no-build" => o.build = false,
                "--keep" => o.keep = true,
                other => return Err(format!("unknown flag `{other}` (flags for serve go after `--`)")),
            }
        }
        if o.volunteers + o.browsers == 0 {
            return Err("the fleet needs a volunteer (--volunteers or --browsers)".into());
        }
        if o.budget.is_zero() {
            return Err("--budget must be positive".into());
        }
        // serve refuses a flag given twice, and the JSON line reports these
        // from the emulator's own flags.
        for flag in OWN_SERVE_FLAGS {
            if o.passes(flag) {
                return Err(format!(
                    "{flag} after `--`: the fleet sets it (use its own flag if it has one)"
                ));
            }
        }
        Ok(o)
    }

    /// Whether `flag` is among the arguments for serve.
    fn passes(&self, flag: &str) -> bool {
        self.serve
            .iter()
            .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|rest| rest.starts_with('=')))
    }

    /// The volunteers to start, in order: the native workers, then the tabs.
    fn roster(&self) -> Vec<Kind> {
        let native = Kind::Native {
            threads: self.threads,
            cpu_percent: self.cpu_percent,
        };
        // The page offers 25/50/75/100 %: the share at or above P.
        let browser = Kind::Browser {
            workers: self.threads,
            cpu_percent: (self.cpu_percent.div_ceil(25) * 25).clamp(25, 100),
        };
        let mut kinds = vec![native; self.volunteers];
        kinds.extend(std::iter::repeat_n(browser, self.browsers));
        kinds
    }

    /// `native`, `browser` or `mixed`.
    fn kind(&self) -> &'static str {
        let roster = self.roster();
        match roster.first() {
            Some(first) if roster.iter().all(|k| k.name() == first.name()) => first.name(),
            _ => "mixed",
        }
    }

    /// The arguments of `seedling serve`.
    fn serve_args(&self, run_dir: &Path) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--port".into(),
            "0".into(),
            "--run-dir".into(),
            run_dir.display().to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--eval-every".into(),
            self.eval_every.to_string(),
            // The server's own budget: the lr decays over it and the server
            // finishes at it.
            "--minutes".into(),
            (self.budget.as_secs_f64() / 60.0).to_string(),
        ];
        if !self.passes("--max-per-ip") {
            // Every volunteer comes from 127.0.0.1.
            args.extend(["--max-per-ip".into(), "100000".into()]);
        }
        if let Some(p) = self.population {
            args.extend(["--population".into(), p.to_string()]);
        }
        args.extend(self.serve.iter().cloned());
        args
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.trim().parse().map_err(|_| format!("bad {flag} `{v}`"))
}

fn millis(flag: &str, v: &str) -> Result<Duration, String> {
    let ms: f64 = number(flag, v)?;
    Duration::try_from_secs_f64(ms / 1e3).map_err(|_| format!("bad {flag} `{v}`"))
}

fn seconds(flag: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = number(flag, v)?;
    Duration::try_from_secs_f64(s).map_err(|_| format!("bad {flag} `{v}`"))
}

/// The whole run; `Ok` carries what failed (a smoke check, an
/// interruption; empty when all is well), `Err` a run that could not take
/// place.
fn fleet(ctx: &Ctx, o: &Options) -> Result<Vec<String>, String> {
    if o.browsers > 0 {
        let pkg = ctx.root.join("www").join("pkg").join("seedling_wasm_bg.wasm");
        if !pkg.is_file() {
            return Err(format!(
                "{} is missing: build it with `cargo xtask test --only wasm-pack-build`",
                pkg.display()
            ));
        }
        if !Path::new(CHROMIUM).is_file() {
            return Err(format!("{CHROMIUM} is missing (Debian package chromium)"));
        }
    }
    if o.build {
        run(ctx
            .cargo()
            .args(["build", "--release", "-p", "seedling-server", "--bin", "seedling"]))?;
    }
    let bin = ctx.root.join("target").join("release").join("seedling");
    if !bin.is_file() {
        return Err(format!("{} is missing (run without --no-build)", bin.display()));
    }
    let dir = run_dir(&ctx.root)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the proxies' runtime: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    rt.spawn(stop_on_signal(stop.clone()));

    let serve_args = o.serve_args(&dir.join("run"));
    let result = drive(o, &rt, &bin, &dir, &serve_args, &stop);
    // Every process is gone by now (dropped in `drive`).
    let seen = match result {
        Ok(seen) => seen,
        Err(err) => {
            return Err(format!("{err}\n(logs kept in {})", dir.display()));
        }
    };
    let config = Config {
        volunteers: o.volunteers + o.browsers,
        browsers: o.browsers,
        kind: o.kind(),
        threads: o.threads,
        cpu_percent: o.cpu_percent,
        rtt_ms: o.rtt.as_secs_f64() * 1e3,
        jitter_ms: o.jitter.as_secs_f64() * 1e3,
        churn_s: o.churn.map(|d| d.as_secs_f64()),
        population: o.population.map(u64::from),
        budget_s: o.budget.as_secs_f64(),
        seed: o.seed,
        eval_every: o.eval_every,
        serve_args,
    };
    let line = summary::json_line(&config, &seen, &o.losses);
    let text = serde_json::to_string(&line).map_err(|e| e.to_string())?;
    println!("{text}");
    if o.table {
        eprintln!("{}", summary::table_header(&o.losses));
        println!("{}", summary::table_row(&line, &o.losses));
    }

    let mut failures = Vec::new();
    if o.smoke {
        // Checked on the printed line, parsed back: what a reader gets.
        let back: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("the JSON line does not parse: {e}"))?;
        if back["steps"].as_u64().unwrap_or(0) == 0 {
            failures.push("no step closed".to_string());
        }
        if back["divergences"].as_u64() != Some(0) {
            failures.push(format!("divergences: {}", back["divergences"]));
        }
        if back["validation"].as_array().is_none_or(Vec::is_empty) {
            failures.push("no validation point".to_string());
        }
        // serve keeps steps in flight as its volunteers need: a round trip
        // of 50 ms needs more than one open step.
        if back["steps_open_max"].as_u64().unwrap_or(0) < 2 {
            failures.push(format!(
                "no steps in flight (at most {} open)",
                back["steps_open_max"]
            ));
        }
        // 150 ms away serve stretches each step's minibatch.
        let stretched = back["sequences_mean"].as_f64().unwrap_or(0.0);
        if o.rtt >= Duration::from_millis(150) && stretched <= 1.0 {
            failures.push(format!(
                "no stretched minibatches ({stretched} sequences per member)"
            ));
        }
        if let Some(why) = seen.last.as_ref().and_then(|s| disagreement(s, o)) {
            failures.push(why);
        }
    }
    if seen.interrupted {
        failures.push("interrupted".into());
    }
    if failures.is_empty() && !o.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("xtask fleet: logs in {}", dir.display());
    }
    if !failures.is_empty() {
        eprintln!("xtask fleet: {}", failures.join("; "));
    }
    Ok(failures)
}

/// Why the final status does not show every volunteer of the fleet on the
/// server's step and hash (as many native workers and tabs as started,
/// each having evaluated members), or `None` when it does.
fn disagreement(status: &serde_json::Value, o: &Options) -> Option<String> {
    let clients = status["client_hashes"].as_object()?;
    let kinds = |k: &str| clients.values().filter(|c| c["kind"] == k).count();
    let (natives, tabs) = (kinds("native"), kinds("browser"));
    if (natives, tabs) != (o.volunteers, o.browsers) {
        return Some(format!(
            "{natives} native and {tabs} browser replicas reported, not {} and {}",
            o.volunteers, o.browsers
        ));
    }
    let off: Vec<String> = clients
        .iter()
        .filter(|(_, c)| {
            c["step"] != status["step"] || c["hash"] != status["hash"] || c["members"].as_u64() == Some(0)
        })
        .map(|(id, c)| format!("{id} ({}) at step {} hash {}", c["kind"], c["step"], c["hash"]))
        .collect();
    (!off.is_empty()).then(|| {
        format!(
            "replicas off the server's step {} hash {}: {}",
            status["step"],
            status["hash"],
            off.join(", ")
        )
    })
}

/// Whether every reporting volunteer holds the server's step and hash.
fn settled(status: &serde_json::Value) -> bool {
    status["client_hashes"].as_object().is_some_and(|clients| {
        clients
            .values()
            .all(|c| c["step"] == status["step"] && c["hash"] == status["hash"])
    })
}

/// A fresh directory for the run's logs and checkpoints under
/// `target/fleet`, named by the time and this process's id.
fn run_dir(root: &Path) -> Result<PathBuf, String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = root
        .join("target")
        .join("fleet")
        .join(format!("{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Sets `stop` on SIGINT or SIGTERM: the run then ends at its next poll,
/// through the same path as at its budget, so its processes are killed.
async fn stop_on_signal(stop: Arc<AtomicBool>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    stop.store(true, Ordering::Relaxed);
}

/// Starts the server and the fleet, runs until the server finishes at its
/// budget (or a signal, or the budget plus [`BUDGET_GRACE`]), waits up to
/// [`SETTLE`] for every volunteer to hold the server's final weights, and
/// returns what was observed. Every process it started
/// is killed when this returns, whichever way.
fn drive(
    o: &Options,
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    dir: &Path,
    serve_args: &[String],
    stop: &AtomicBool,
) -> Result<Observed, String> {
    let mut server = Server::start(bin, serve_args, &dir.join("server.log"), SERVER_START, stop)?;
    let t0 = Instant::now();
    let launcher = Launcher {
        rt,
        bin,
        dir,
        server: server.addr,
        link: Link::from_rtt(o.rtt, o.jitter),
        seed: o.seed,
    };
    // Declared after `server`, so dropped (killed) before it.
    let mut fleet: VecDeque<Volunteer> = VecDeque::new();
    let mut next_id = 0;
    let roster = o.roster();
    for &kind in &roster {
        fleet.push_back(launcher.volunteer(kind, next_id)?);
        next_id += 1;
    }
    let mut seen = Observed {
        joins: roster.len(),
        ..Observed::default()
    };
    let mut next_churn = o.churn.map(|c| t0 + c);
    loop {
        if let Some(status) = status(server.addr, seen.validation.keys().next_back().copied()) {
            let finished = status["finished"].as_bool() == Some(true);
            seen.record(status);
            seen.wall_s = t0.elapsed().as_secs_f64();
            if finished {
                break;
            }
        }
        if t0.elapsed() >= o.budget + BUDGET_GRACE {
            eprintln!("xtask fleet: the server did not finish at its budget; stopping it");
            break;
        }
        if stop.load(Ordering::Relaxed) {
            seen.interrupted = true;
            break;
        }
        if server.process.exited() {
            return Err(format!(
                "the server exited during the run (log: {})",
                server.process.log.display()
            ));
        }
        // A volunteer that exited by itself is counted and replaced, so the
        // fleet keeps its size; its log says why.
        for v in fleet.iter_mut() {
            if v.process.exited() {
                seen.exits += 1;
                eprintln!(
                    "xtask fleet: volunteer {} (through {}) exited (log: {})",
                    v.id,
                    v.link.addr(),
                    v.process.log.display()
                );
                *v = launcher.volunteer(v.kind, next_id)?;
                next_id += 1;
                seen.joins += 1;
            }
        }
        if let (Some(at), Some(every)) = (next_churn, o.churn)
            && Instant::now() >= at
        {
            // The longest-serving volunteer leaves (killed, with its
            // link) and a new one of its kind joins.
            if let Some(old) = fleet.pop_front() {
                let kind = old.kind;
                drop(old);
                seen.leaves += 1;
                fleet.push_back(launcher.volunteer(kind, next_id)?);
                next_id += 1;
                seen.joins += 1;
            }
            next_churn = Some(at + every);
        }
        std::thread::sleep(POLL);
    }
    // The final figures: the server lingers a few seconds after it
    // finished, while the last update reaches every volunteer and their
    // hashes come back; read until they agree or it is gone.
    let finished_at = Instant::now();
    while finished_at.elapsed() < SETTLE {
        let Some(status) = status(server.addr, seen.validation.keys().next_back().copied()) else {
            break;
        };
        let done = settled(&status);
        seen.record(status);
        seen.wall_s = t0.elapsed().as_secs_f64();
        if done {
            break;
        }
        std::thread::sleep(POLL);
    }
    drop(fleet);
    drop(server);
    Ok(seen)
}

/// `/api/status`, with the learning curve's points after step `since`
/// (from `/api/history`: the status itself stays small) under `history`,
/// and every client's last report (from `/api/clients`) under
/// `client_hashes`; `None` if the server does not answer.
fn status(server: SocketAddr, since: Option<u64>) -> Option<serde_json::Value> {
    let mut status = get(server, "/api/status")?;
    let since = since.map_or(-1, |s| s as i64);
    status["history"] = get(server, &format!("/api/history?since={since}"))?;
    status["client_hashes"] = get(server, "/api/clients")?;
    Some(status)
}

/// `path` over plain HTTP/1.0 as JSON (the server closes the connection
/// after the answer); `None` if the server does not answer.
fn get(server: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_override_the_defaults_and_serve_gets_the_rest() {
        let o = Options::parse(&args(
            "--volunteers 4 --cpu-percent 30 --rtt 150 --jitter 50 --churn 10 --budget 600 \
             --losses 2.5,2.2 --table -- --lr 0.02",
        ))
        .unwrap();
        assert_eq!(o.volunteers, 4);
        assert_eq!(o.cpu_percent, 30);
        assert_eq!(Link::from_rtt(o.rtt, o.jitter).delay, Duration::from_millis(75));
        assert_eq!(o.churn, Some(Duration::from_secs(10)));
        assert_eq!(o.budget, Duration::from_secs(600));
        assert_eq!(o.losses, vec![2.5, 2.2]);
        assert!(o.table && o.build && !o.smoke);
        let serve = o.serve_args(Path::new("/tmp/run"));
        assert_eq!(&serve[..4], &args("--port 0 --run-dir /tmp/run")[..]);
        assert_eq!(&serve[serve.len() - 2..], &args("--lr 0.02")[..]);
        assert!(serve.windows(2).any(|w| w == ["--max-per-ip", "100000"]));
        assert!(!serve.contains(&"--population".to_string()));
        // serve refuses a flag given twice: the user's --max-per-ip replaces
        // ours, and the flags the fleet sets itself are refused after `--`.
        let o = Options::parse(&args("-- --max-per-ip=9")).unwrap();
        assert_eq!(
            o.serve_args(Path::new("r"))
                .iter()
                .filter(|a| a.starts_with("--max-per-ip"))
                .count(),
            1
        );
        for own in ["--seed 3", "--population=4096", "--port 1"] {
            assert!(Options::parse(&args(&format!("-- {own}"))).is_err(), "{own}");
        }
    }

    #[test]
    fn smoke_is_a_small_fast_fleet_whose_flags_still_win() {
        let o = Options::parse(&args("--smoke --budget 15")).unwrap();
        assert_eq!(
            (o.volunteers, o.browsers, o.population, o.rtt),
            (2, 2, Some(64), Duration::from_millis(50))
        );
        assert_eq!(o.kind(), "mixed");
        let native = Kind::Native {
            threads: 1,
            cpu_percent: 50,
        };
        let tab = Kind::Browser {
            workers: 1,
            cpu_percent: 50,
        };
        assert_eq!(o.roster(), vec![native, native, tab, tab]);
        assert!(
            o.serve_args(Path::new("r"))
                .windows(2)
                .any(|w| w == ["--minutes", "0.25"])
        );
        assert_eq!(o.budget, Duration::from_secs(15));
        assert!(
            o.serve_args(Path::new("r"))
                .windows(2)
                .any(|w| w == ["--population", "64"])
        );
    }

    #[test]
    fn bad_flags_are_refused() {
        for bad in [
            "--cpu-percent 0",
            "--cpu-percent 101",
            "--volunteers 0",
            "--volunteers 0 --browsers 0",
            "--budget 0",
            "-- --minutes 2",
            "--rtt x",
            "--bogus",
            "--budget",
        ] {
            assert!(Options::parse(&args(bad)).is_err(), "{bad}");
        }
        assert_eq!(Options::parse(&args("--churn 0")).unwrap().churn, None);
        let tabs = Options::parse(&args("--volunteers 0 --browsers 2 --cpu-percent 30")).unwrap();
        assert_eq!(tabs.kind(), "browser");
        assert_eq!(
            tabs.roster(),
            vec![
                Kind::Browser {
                    workers: 1,
                    cpu_percent: 50
                };
                2
            ]
        );
    }
}
