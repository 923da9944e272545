//! The real `seedling` binary SIGKILLed again and again while it writes
//! checkpoints: every restart resumes from the newest checkpoint, which is
//! always valid, loses at most `--checkpoint-every` steps, and the run still
//! ends at the uninterrupted run's hash.
//!
//! 3 kills by default, 20 under `cargo xtask test --soak` (`SEEDLING_SOAK=1`);
//! the figures are printed as one JSON line.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::{spawn_server, status};
use seedling_server::checkpoint;

/// Checkpoint interval: small, so the kills often land during a write.
const EVERY: u64 = 2;

fn serve(data: &Path, run_dir: &Path, port: u16, max_steps: u64, log: &Path) -> Child {
    let args = [
        "serve",
        "--port",
        &port.to_string(),
        "--data",
        &data.display().to_string(),
        "--run-dir",
        &run_dir.display().to_string(),
        "--hidden",
        "16",
        "--layers",
        "1",
        "--population",
        "16",
        "--batch",
        "2",
        "--seq-len",
        "8",
        "--seed",
        "5",
        "--checkpoint-every",
        &EVERY.to_string(),
        "--eval-every",
        "0",
        "--max-steps",
        &max_steps.to_string(),
        "--job-timeout",
        "2",
        // Steps in flight by the fixed rule: which weights each step is
        // evaluated at is a function of the step, so the killed run can
        // end where the uninterrupted one does.
        "--lag",
        "3",
        "--fixed-lag",
    ]
    .map(String::from);
    spawn_server(&args, log)
}

/// Polls the status (tightly: the kills aim at moments) until `pred`.
fn poll(port: u16, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    common::wait_status(port, what, Duration::from_millis(2), pred)
}

fn step(s: &serde_json::Value) -> u64 {
    s["step"].as_u64().unwrap()
}

/// Finished, and every worker reports the server's hash.
fn done(s: &serde_json::Value) -> bool {
    let clients = s["client_hashes"].as_object().unwrap();
    s["finished"] == true && !clients.is_empty() && clients.values().all(|c| c["hash"] == s["hash"])
}

#[test]
fn sigkill_loop_resumes_from_the_newest_valid_checkpoint() {
    let kills: u64 = if std::env::var("SEEDLING_SOAK").is_ok_and(|v| v == "1") {
        20
    } else {
        3
    };
    let max_steps = 12 * kills + 20;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("corpus.txt");
    std::fs::write(&data, "the quick brown fox jumps over the lazy dog; ".repeat(400)).unwrap();
    let log = tmp.path().join("server.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stop = common::workers(&rt, port, 2, Duration::from_millis(100));

    let mut reference = serve(&data, &tmp.path().join("reference"), port, max_steps, &log);
    let want = poll(port, "the uninterrupted run", done)["hash"].clone();
    reference.kill().unwrap();
    reference.wait().unwrap();

    let run_dir = tmp.path().join("run");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut random = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut server = serve(&data, &run_dir, port, max_steps, &log);
    let mut resumed_at = 0;
    let mut lost = Vec::new();
    let mut resumes = Vec::new();
    for k in 0..kills {
        // Run a random number of steps, then kill at a random moment.
        let target = resumed_at + 1 + random(6);
        let seen = step(&poll(port, "progress", |s| step(s) >= target));
        std::thread::sleep(Duration::from_micros(random(5_000)));
        let seen = status(port).map_or(seen, |s| step(&s));
        server.kill().unwrap();
        server.wait().unwrap();
        assert!(seen < max_steps, "the run finished before kill {k}");

        // The newest checkpoint on disk is whole (writes are atomic); before
        // the first one, a restart begins at step 0.
        let files = checkpoint::list(&run_dir).unwrap();
        let newest = files.iter().max_by_key(|(s, _)| *s).map(|(_, path)| {
            checkpoint::load(path).unwrap_or_else(|e| panic!("kill {k}: newest checkpoint torn: {e:#}"))
        });
        let at = newest.as_ref().map_or(0, |c| c.step);
        assert_eq!(at % EVERY, 0);
        assert!(
            seen <= at + EVERY,
            "kill {k}: seen step {seen}, newest checkpoint at {at}"
        );
        lost.push(seen - at.min(seen));

        // The restart resumes from exactly that checkpoint.
        server = serve(&data, &run_dir, port, max_steps, &log);
        let s = poll(port, "the restart", |_| true);
        assert_eq!(step(&s), at, "kill {k}: resumed at another step");
        if newest.is_some() {
            let text = std::fs::read_to_string(&log).unwrap();
            let line = text
                .lines()
                .find(|l| l.contains("resumed"))
                .expect("a resume log line");
            assert!(line.contains(&format!("step={at}")), "{line}");
        }
        resumed_at = at;
        resumes.push(at);
    }
    let s = poll(port, "the run to finish after the kills", done);
    let _ = stop.send(true);
    server.kill().unwrap();
    server.wait().unwrap();
    println!(
        "{{\"soak\":\"sigkill-loop\",\"kills\":{kills},\"checkpoint_every\":{EVERY},\"max_steps_lost\":{},\"steps_lost\":{lost:?},\"resumed_at\":{resumes:?},\"same_hash_as_uninterrupted\":{}}}",
        lost.iter().max().unwrap(),
        s["hash"] == want
    );
    assert_eq!(s["hash"], want, "the killed run ended at another hash");
}
