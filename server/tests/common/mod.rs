//! Helpers shared by the tests that drive the real `seedling` binary: start
//! it, read its status over plain HTTP, and attach in-process workers.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use seedling_server::worker::{self, WorkerOptions};

pub const BIN: &str = env!("CARGO_BIN_EXE_seedling");

/// Starts the binary with `args`, its log (RUST_LOG=info) in `log`.
pub fn spawn_server(args: &[String], log: &Path) -> Child {
    spawn_with_env(args, log, &[])
}

/// [`spawn_server`] with `env` added to the environment (NATS credentials,
/// say, which never go on the command line).
pub fn spawn_with_env(args: &[String], log: &Path, env: &[(&str, &str)]) -> Child {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// `path` over plain HTTP/1.0, as JSON; None while the server is down.
pub fn get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    serde_json::from_str(raw.split_once("\r\n\r\n")?.1).ok()
}

/// `/api/status` with the clients' last reports (`/api/clients`, which the
/// lean status leaves out) under `client_hashes`; None while the server is
/// down.
pub fn status(port: u16) -> Option<serde_json::Value> {
    let mut status = get_json(port, "/api/status")?;
    status["client_hashes"] = get_json(port, "/api/clients")?;
    Some(status)
}

/// Polls the status every `every` until `pred` holds (at most 120 s); returns it.
pub fn wait_status(
    port: u16,
    what: &str,
    every: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(s) = status(port).filter(&pred) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

/// `n` in-process native workers that reconnect (backoff up to
/// `max_backoff`) whenever the server dies, until the sender says stop.
pub fn workers(
    rt: &tokio::runtime::Runtime,
    port: u16,
    n: usize,
    max_backoff: Duration,
) -> tokio::sync::watch::Sender<bool> {
    let (stop, rx) = tokio::sync::watch::channel(false);
    for _ in 0..n {
        let mut opts = WorkerOptions::new(format!("ws://127.0.0.1:{port}/ws"));
        opts.threads = 1;
        opts.progress = None;
        opts.max_backoff = max_backoff;
        let mut rx = rx.clone();
        rt.spawn(worker::run(opts, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
    }
    stop
}
