//! The real `seedling` binary: SIGKILL and restart on the same run dir,
//! graceful shutdown on SIGTERM, and the checkpoint commands.

mod common;
/// The relay tests' real `nats-server` on a free loopback port.
#[path = "../../tests/src/nats.rs"]
#[allow(dead_code)]
mod nats;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use common::{BIN, get_json, spawn_server, spawn_with_env, wait_status};
use seedling_server::checkpoint;
use seedling_server::cli::{Cli, Command as Sub};

/// How often the tests poll the status.
const POLL: Duration = Duration::from_millis(20);

fn corpus(dir: &Path) -> PathBuf {
    const WORDS: [&str; 10] = [
        "the ", "cat ", "sat ", "on ", "a ", "mat. ", "dog ", "ran ", "to ", "me, ",
    ];
    let mut text = String::new();
    let mut x = 7u64;
    while text.len() < 20_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

/// A listener on a free loopback port, for an in-process server, and its
/// port: bound from the start, since a port picked and released
/// ([`free_port`]) may be taken by a test running beside this one before
/// it is bound again (CI once failed so, `AddrInUse`).
fn held_port(rt: &tokio::runtime::Runtime) -> (tokio::net::TcpListener, u16) {
    let l = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A free loopback port for a server binary to bind (and bind again when
/// restarted), released at once: only where the port must outlive a process.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_args(data: &Path, run_dir: &Path, port: u16, max_steps: u64) -> Vec<String> {
    let s = |x: &str| x.to_string();
    vec![
        s("serve"),
        s("--port"),
        port.to_string(),
        s("--data"),
        data.display().to_string(),
        s("--run-dir"),
        run_dir.display().to_string(),
        s("--hidden"),
        s("24"),
        s("--layers"),
        s("1"),
        s("--population"),
        s("32"),
        s("--batch"),
        s("4"),
        s("--seq-len"),
        s("16"),
        s("--sigma"),
        s("0.05"),
        s("--lr"),
        s("0.02"),
        s("--seed"),
        s("11"),
        s("--checkpoint-every"),
        s("5"),
        s("--eval-every"),
        s("0"),
        s("--max-steps"),
        max_steps.to_string(),
        s("--job-timeout"),
        s("2"),
    ]
}

fn agree(s: &serde_json::Value) -> bool {
    let clients = s["client_hashes"].as_object().unwrap();
    s["finished"] == true
        && !clients.is_empty()
        && clients
            .values()
            .all(|c| c["step"] == s["step"] && c["hash"] == s["hash"])
}

fn run_cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "seedling {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What [`kill_and_resume`] leaves running: the restarted server and the
/// files of the run.
struct Resumed {
    rt: tokio::runtime::Runtime,
    tmp: tempfile::TempDir,
    data: PathBuf,
    run_dir: PathBuf,
    second: std::process::Child,
    steps: u64,
    /// The final hash of the uninterrupted reference run.
    reference: String,
}

/// Runs `steps` steps uninterrupted, then the same run (with `extra`
/// flags) SIGKILLed after step 12 and restarted from its checkpoint, and
/// checks both end at the same weights.
fn kill_and_resume(extra: &[&str]) -> Resumed {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let steps = 20;
    let run_args = |data: &Path, run_dir: &Path, port: u16, steps: u64| {
        let mut a = run_args(data, run_dir, port, steps);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };

    // Uninterrupted reference, in-process, same flags.
    let ref_dir = tmp.path().join("reference");
    let (listener, port) = held_port(&rt);
    let reference = {
        let cli = Cli::try_parse_from(
            std::iter::once("seedling".to_string()).chain(run_args(&data, &ref_dir, port, steps)),
        )
        .unwrap();
        let Sub::Serve(args) = cli.command else {
            unreachable!()
        };
        let opts = args.run_args().unwrap().serve_options().unwrap();
        let server = rt.block_on(seedling_server::app::start(listener, opts)).unwrap();
        let stop = common::workers(&rt, port, 2, Duration::from_millis(300));
        let s = wait_status(port, "the reference run", POLL, agree);
        let _ = stop.send(true);
        rt.block_on(server.shutdown()).unwrap();
        s["hash"].as_str().unwrap().to_string()
    };

    // The same run, SIGKILLed after step 12 and restarted.
    let run_dir = tmp.path().join("run");
    let port = free_port();
    let args = run_args(&data, &run_dir, port, steps);
    let mut first = spawn_server(&args, &tmp.path().join("first.log"));
    let stop = common::workers(&rt, port, 2, Duration::from_millis(300));
    wait_status(port, "step 12", POLL, |s| s["step"].as_u64().unwrap() >= 12);
    first.kill().unwrap();
    first.wait().unwrap();
    let (_, ckpt) = checkpoint::latest(&run_dir)
        .unwrap()
        .expect("a checkpoint before the kill");
    assert!(
        ckpt.step >= 10 && ckpt.step % 5 == 0,
        "checkpoint at step {}",
        ckpt.step
    );
    let want_hash = format!("{:016x}", seedling_core::hash::weights_hash(&ckpt.params));

    let log = tmp.path().join("second.log");
    let second = spawn_server(&args, &log);
    let s = wait_status(port, "the restarted run to finish", POLL, agree);
    assert_eq!(
        s["hash"].as_str().unwrap(),
        reference,
        "restarted run differs from the uninterrupted one"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed"))
        .expect("a resume log line");
    assert!(
        resumed.contains(&format!("step={}", ckpt.step)) && resumed.contains(&want_hash),
        "{resumed}"
    );
    let _ = stop.send(true);
    Resumed {
        rt,
        tmp,
        data,
        run_dir,
        second,
        steps,
        reference,
    }
}

/// With two steps in flight by the fixed rule a restart reproduces the
/// uninterrupted run too: the checkpoint keeps the past weight versions the
/// open steps need (each step's version and the one before). (With the adaptive window which weights a step is
/// evaluated at depends on timing, so only the replicas' agreement holds.)
#[test]
fn sigkill_restart_with_steps_in_flight_matches_an_uninterrupted_run() {
    let r = kill_and_resume(&["--lag", "2", "--fixed-lag"]);
    let (_, ckpt) = checkpoint::latest(&r.run_dir).unwrap().unwrap();
    assert_eq!(ckpt.config.es.lag, 2);
    assert_eq!(
        ckpt.versions.len(),
        3,
        "lag + 1: a step is evaluated around two versions"
    );
    let mut second = r.second;
    second.kill().unwrap();
    second.wait().unwrap();
    drop(r.rt);
}

#[test]
fn sigkill_restart_resumes_and_matches_an_uninterrupted_run() {
    let Resumed {
        rt,
        tmp: _tmp,
        data,
        run_dir,
        mut second,
        steps,
        reference,
    } = kill_and_resume(&["--lag", "0"]);
    drop(rt);

    // SIGTERM: graceful stop with a final checkpoint at the last step.
    let _ = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status();
    assert!(second.wait().unwrap().success());
    let (_, last) = checkpoint::latest(&run_dir).unwrap().unwrap();
    assert_eq!(last.step, steps);

    // The checkpoint commands on the real binary.
    let dir = run_dir.display().to_string();
    let inspect = run_cli(&["inspect", &dir]);
    assert!(inspect.contains(&reference), "inspect shows the hash: {inspect}");
    let eval = run_cli(&[
        "eval",
        "--checkpoint",
        &dir,
        "--data",
        &data.display().to_string(),
    ]);
    assert!(eval.contains("nats/char") && eval.contains("bits/char"), "{eval}");
    let text = run_cli(&[
        "generate",
        "--checkpoint",
        &dir,
        "--prompt",
        "the ",
        "--len",
        "40",
    ]);
    assert!(
        text.starts_with("the ") && text.trim_end().chars().count() >= 40,
        "{text:?}"
    );
    let beams = run_cli(&[
        "generate",
        "--checkpoint",
        &dir,
        "--prompt",
        "the ",
        "--len",
        "10",
        "--beam",
        "3",
    ]);
    assert_eq!(
        beams.lines().filter(|l| !l.trim().is_empty()).count(),
        3,
        "{beams}"
    );
}

/// A child process killed (and reaped) on drop, so a failing test leaves
/// nothing running.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The admin token of the relayed restart's coordinator.
const ADMIN: &str = "restart-admin";

/// POSTs to admin route `path` of the coordinator on `port`; panics
/// unless it answers 200.
fn admin(port: u16, path: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\nAuthorization: Bearer {ADMIN}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.split_whitespace().nth(1) == Some("200"), "{path}: {raw}");
}

/// The status of a paused run once its last steps closed: every client
/// reports its step and hash, and still does half a second later.
fn settled(port: u16) -> serde_json::Value {
    let agree = |s: &serde_json::Value| {
        s["paused"] == true
            && s["client_hashes"].as_object().is_some_and(|c| {
                !c.is_empty()
                    && c.values()
                        .all(|c| c["step"] == s["step"] && c["hash"] == s["hash"])
            })
    };
    loop {
        let s = wait_status(port, "the paused run to settle", POLL, agree);
        std::thread::sleep(Duration::from_millis(500));
        if common::status(port).is_some_and(|t| agree(&t) && t["step"] == s["step"]) {
            return s;
        }
    }
}

/// Polls a relay's volunteers' reports (`/api/relay/clients`) until
/// `volunteers` of them report `step` and `hash` (at most 120 s).
fn wait_relay_clients(port: u16, volunteers: usize, step: u64, hash: &str) {
    let start = std::time::Instant::now();
    loop {
        let clients = get_json(port, "/api/relay/clients").unwrap_or_default();
        let done = clients.as_object().is_some_and(|c| {
            c.len() == volunteers && c.values().all(|r| r["step"] == step && r["hash"] == hash)
        });
        if done {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the relay's volunteers did not reach step {step} hash {hash}: {clients}"
        );
        std::thread::sleep(POLL);
    }
}

/// SIGKILL and restart scaled out: `seedling serve --nats` with a
/// `seedling relay` process in front of it and two native workers on the
/// relay. The relay and its workers carry on with the restarted
/// coordinator by themselves (the relay reconnects, finds the
/// coordinator's state back at its checkpoint and resynchronises its
/// volunteers), and the run ends at the hash of an uninterrupted run with
/// the same flags.
#[test]
fn sigkill_restart_behind_a_relay_matches_an_uninterrupted_run() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // Enough steps that the run is paused well before its end: with
    // cheaper updates a loaded CI machine once ran all of 100 before the
    // pause found a step between checkpoints.
    let steps = 300;
    let nats = nats::NatsServer::start();
    let with_nats = |prefix: &str, run_dir: &Path, port: u16| {
        let mut a = run_args(&data, run_dir, port, steps);
        let flags = [
            "--lag",
            "2",
            "--fixed-lag",
            "--nats",
            &nats.url(),
            "--nats-prefix",
            prefix,
        ];
        a.extend(flags.iter().map(|x| x.to_string()));
        a
    };

    // Uninterrupted reference, in-process, same flags, through a relay.
    let (listener, port) = held_port(&rt);
    let reference = {
        let cli = Cli::try_parse_from(std::iter::once("seedling".to_string()).chain(with_nats(
            "reference",
            &tmp.path().join("reference"),
            port,
        )))
        .unwrap();
        let Sub::Serve(args) = cli.command else {
            unreachable!()
        };
        let mut opts = args.run_args().unwrap().serve_options().unwrap();
        // The credentials the binary takes from its environment.
        opts.nats = Some(nats::nats_options(&nats, "reference"));
        let (server, relay) = rt.block_on(async {
            let server = seedling_server::app::start(listener, opts).await.unwrap();
            let relay = nats::start_relay(&nats, "reference", "r1", nats::test_hub()).await;
            (server, relay)
        });
        let stop = common::workers(&rt, relay.addr.port(), 2, Duration::from_millis(300));
        let s = wait_status(port, "the reference run", POLL, agree);
        let hash = s["hash"].as_str().unwrap().to_string();
        wait_relay_clients(relay.addr.port(), 2, steps, &hash);
        let _ = stop.send(true);
        relay.kill();
        rt.block_on(server.shutdown()).unwrap();
        hash
    };

    // The same run from the binaries: the coordinator, SIGKILLed after
    // step 12 and restarted, and a relay that stays up throughout.
    let run_dir = tmp.path().join("run");
    let port = free_port();
    let args = with_nats("run", &run_dir, port);
    let secrets = [
        ("SEEDLING_NATS_USER", nats::USER),
        ("SEEDLING_NATS_PASSWORD", nats::PASSWORD),
        ("SEEDLING_ADMIN_TOKEN", ADMIN),
    ];
    let mut first = Reaped(spawn_with_env(&args, &tmp.path().join("first.log"), &secrets));
    let relay_port = free_port();
    let relay_args: Vec<String> = [
        "relay",
        "--nats",
        &nats.url(),
        "--nats-prefix",
        "run",
        "--id",
        "r1",
        "--port",
        &relay_port.to_string(),
        "--chunk-timeout",
        "1.5",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let mut relay = Reaped(spawn_with_env(
        &relay_args,
        &tmp.path().join("relay.log"),
        &secrets,
    ));
    let stop = common::workers(&rt, relay_port, 2, Duration::from_millis(300));
    // Killed while paused between two checkpoints, so the relay's replica
    // and volunteers are ahead of the checkpoint the coordinator resumes
    // from (a run this small is too fast to aim a kill at by the clock).
    let mut at = 12;
    let paused = loop {
        wait_status(port, "the run to go on", POLL, |s| {
            s["step"].as_u64().unwrap() >= at
        });
        admin(port, "/admin/pause");
        // Paused, the steps whose members are all out close and the relay
        // catches up: settled once the replicas agree twice in a row.
        let s = settled(port);
        let step = s["step"].as_u64().unwrap();
        assert!(
            step < steps,
            "the run ended before the fault (paused at step {step}, aiming at {at})"
        );
        if !step.is_multiple_of(5) {
            wait_relay_clients(relay_port, 2, step, s["hash"].as_str().unwrap());
            break step;
        }
        admin(port, "/admin/resume");
        at = step + 1;
    };
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_, ckpt) = checkpoint::latest(&run_dir)
        .unwrap()
        .expect("a checkpoint before the kill");
    assert_eq!(
        ckpt.step,
        paused / 5 * 5,
        "the last checkpoint before step {paused}"
    );

    let _second = Reaped(spawn_with_env(&args, &tmp.path().join("second.log"), &secrets));
    let s = wait_status(port, "the restarted run to finish", POLL, agree);
    let hash = s["hash"].as_str().unwrap();
    assert_eq!(
        hash, reference,
        "the restarted run differs from the uninterrupted one"
    );
    assert_eq!(
        s["volunteers"]["relay"], 1,
        "the coordinator's one client is the relay"
    );
    wait_relay_clients(relay_port, 2, steps, hash);
    assert!(relay.0.try_wait().unwrap().is_none(), "the relay stayed up");
    let figures = get_json(relay_port, "/api/relay").unwrap();
    assert!(
        figures["resynced"].as_u64().unwrap() >= 1,
        "the relay resynchronised its volunteers to the restarted coordinator: {figures}"
    );
    assert_eq!(figures["rejected"], 0, "no volunteer was rejected: {figures}");
    let _ = stop.send(true);
    drop(rt);
}
