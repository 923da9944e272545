//! `seedling serve --minutes M`: the run decays its lr over the budget, as
//! `train --minutes` does, and stops by itself when the budget is spent,
//! with its status `finished` and a final checkpoint.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{spawn_server, status, wait_status, workers};
use seedling_server::checkpoint;

fn corpus(dir: &Path) -> std::path::PathBuf {
    let text = "the cat sat on a mat. the dog ran to me, ".repeat(500);
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn serve_stops_at_its_budget_with_a_decayed_lr() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let run_dir = tmp.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let budget = Duration::from_secs(6);
    let args: Vec<String> = [
        "serve",
        "--port",
        &port.to_string(),
        "--data",
        &data.display().to_string(),
        "--run-dir",
        &run_dir.display().to_string(),
        "--hidden",
        "8",
        "--population",
        "16",
        "--seq-len",
        "16",
        "--lr",
        "0.02",
        "--eval-every",
        "0",
        "--minutes",
        &(budget.as_secs_f64() / 60.0).to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut server = spawn_server(&args, &tmp.path().join("serve.log"));
    let t0 = Instant::now();
    let stop = workers(&rt, port, 1, Duration::from_millis(300));
    let first = wait_status(port, "the first step", Duration::from_millis(50), |s| {
        s["step"].as_u64() > Some(0)
    });
    let mut lrs = vec![(t0.elapsed(), first["lr"].as_f64().unwrap(), 1)];
    let mut finished = None;
    let exit = loop {
        if let Some(s) = status(port) {
            if let Some(lr) = s["lr"].as_f64() {
                lrs.push((t0.elapsed(), lr, s["step"].as_u64().unwrap_or(0)));
            }
            if s["finished"] == true && finished.is_none() {
                finished = Some(t0.elapsed());
            }
        }
        if let Some(code) = server.try_wait().unwrap() {
            break code;
        }
        if t0.elapsed() > budget + Duration::from_secs(60) {
            let _ = server.kill();
            panic!("serve did not stop by itself; lr seen: {lrs:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    let _ = stop.send(true);
    let log = std::fs::read_to_string(tmp.path().join("serve.log")).unwrap_or_default();
    assert!(exit.success(), "serve failed: {log}");
    // The server's clock starts before it listens (the corpus loads first),
    // so it may finish a little before `budget` on ours; the linger and the
    // final checkpoint follow.
    let finished = finished.expect("the status said `finished` before serve exited");
    assert!(
        finished >= budget - Duration::from_secs(2) && took <= budget + Duration::from_secs(10),
        "finished at {finished:?}, exited at {took:?}, budget {budget:?}"
    );
    // The lr decays over the budget: from the peak toward min-lr-ratio * lr.
    let early = lrs.iter().find(|&&(_, _, step)| step > 0).expect("a step closed");
    let late = lrs.last().unwrap();
    assert!(early.1 > 0.015, "the lr starts near its peak: {lrs:?}");
    assert!(late.1 < 0.5 * early.1, "the lr decays: {lrs:?}");
    let steps = late.2;
    assert!(steps > 0, "no step closed: {log}");
    let (_, ckpt) = checkpoint::open(&run_dir).unwrap();
    assert!(
        ckpt.step >= steps,
        "the final checkpoint is at the end: {} < {steps}",
        ckpt.step
    );
    assert!(matches!(
        ckpt.config.recipe.schedule,
        seedling_core::LrSchedule::CosineTime { .. }
    ));
}
