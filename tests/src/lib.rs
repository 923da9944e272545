//! seedling-tests: end-to-end tests that span crates.
//!
//! Unit tests inside each crate cannot catch the failures that matter most in
//! Seedling: a browser and the server disagreeing on the wire format, on the
//! vocabulary, or on the weights after a step. The tests in `tests/` drive
//! the real crates together, the way a deployment does. This library holds
//! the helpers those tests share: a small run on a synthetic corpus, a
//! server on a loopback port 0, in-process workers, and a raw protocol
//! client that can misbehave on purpose.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use seedling_core::protocol::{
    self, ClientKind, ClientMsg, MAX_CLIENT_MESSAGE, PROTOCOL_VERSION, ServerMsg, SessionToken,
};
use seedling_core::tokenizer::Tokenizer;
use seedling_core::{NoiseKind, RunConfig};
use seedling_server::app::{self, ServeOptions, Server};
use seedling_server::coordinator::{RunData, Settings, Status};
use seedling_server::{data, worker};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod nats;
pub mod sim;

/// A deterministic text with learnable structure: words drawn from a small
/// vocabulary by a fixed generator.
pub fn tiny_corpus(chars: usize) -> String {
    const WORDS: [&str; 12] = [
        "the ", "cat ", "sat ", "on ", "a ", "mat. ", "dog ", "ran ", "to ", "me, ", "and ", "then ",
    ];
    let mut out = String::new();
    let mut x = 12345u64;
    while out.len() < chars {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
    }
    out.truncate(chars);
    out
}

/// A small run's config for `vocab` characters: fast enough for many steps in a test.
pub fn tiny_config(vocab: u32, noise: NoiseKind) -> RunConfig {
    let mut c = RunConfig::rw256(vocab);
    c.seed = 11;
    c.model.hidden = 24;
    c.model.layers = 1;
    c.es.noise = noise;
    c.es.population = 32;
    c.es.batch = 4;
    c.es.seq_len = 16;
    c.es.sigma = 0.05;
    c.adam.lr = 0.02;
    c
}

/// Server options for a tiny run on the synthetic corpus.
pub fn tiny_options(settings: Settings) -> ServeOptions {
    corpus_options(settings, |vocab| {
        tiny_config(vocab, NoiseKind::LowRank { rank: 1 })
    })
}

/// Server options on the synthetic corpus for the config that `config`
/// builds from the vocabulary size (load tests use the RW-256 shape).
pub fn corpus_options(settings: Settings, config: impl FnOnce(u32) -> RunConfig) -> ServeOptions {
    let text = tiny_corpus(20_000);
    let tokenizer = Tokenizer::from_corpus(&text).unwrap();
    let tokens = tokenizer.encode(&text).unwrap();
    let split = tokens.len() * 9 / 10;
    let config = config(tokenizer.len() as u32);
    let val_windows = data::validation_windows(&tokens[split..], config.es.seq_len as usize, 64);
    ServeOptions {
        config,
        settings,
        data: RunData {
            tokenizer,
            train: Arc::new(tokens[..split].to_vec()),
            val_windows,
            val_seq_len: config.es.seq_len as usize,
            name: "synthetic test corpus".into(),
        },
        www: None,
        limits: Default::default(),
        admin_token: None,
        nats: None,
    }
}

/// Test-friendly coordinator settings: short deadlines, frequent evals.
pub fn test_settings(max_steps: u64) -> Settings {
    Settings {
        min_fraction: 1.0,
        job_target: Duration::from_millis(50),
        job_timeout_min: Duration::from_millis(1500),
        eval_every: 5,
        checkpoint_every: 0,
        max_steps: Some(max_steps),
        ..Settings::default()
    }
}

/// Starts a server on a free loopback port.
pub async fn start(opts: ServeOptions) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    app::start(listener, opts).await.unwrap()
}

/// The server's volunteer URL.
pub fn ws_url(server: &Server) -> String {
    format!("ws://{}/ws", server.addr)
}

/// A running in-process native worker; dropping the handle does not stop it,
/// [`WorkerHandle::stop`] does.
pub struct WorkerHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl WorkerHandle {
    /// Stops the worker gracefully.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Kills the worker's task at once: its socket drops with no close frame.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// Starts a native worker with `threads` threads.
pub fn spawn_worker(url: &str, threads: usize) -> WorkerHandle {
    spawn_worker_as(url, threads, "", None)
}

/// [`spawn_worker`] under a display name, keeping its session token in the
/// identity file at `identity` (as `seedling worker --name --identity-file`).
pub fn spawn_worker_as(
    url: &str,
    threads: usize,
    name: &str,
    identity: Option<&std::path::Path>,
) -> WorkerHandle {
    let mut opts = worker::WorkerOptions::new(url);
    opts.name = name.into();
    opts.identity = identity.map(|p| p.to_path_buf());
    opts.threads = threads;
    opts.progress = None;
    opts.max_backoff = Duration::from_millis(500);
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(worker::run(opts, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    WorkerHandle { stop, task }
}

/// The final hash of a fault-free run with `opts`, one native worker per
/// entry of `threads` (with that many threads) on the server: the hash
/// runs with faults, liars or relays must end at.
pub async fn clean_run_hash(opts: ServeOptions, threads: &[usize]) -> String {
    let server = start(opts).await;
    let workers: Vec<_> = threads
        .iter()
        .map(|&t| spawn_worker(&ws_url(&server), t))
        .collect();
    let s = wait_for(
        &server,
        Duration::from_secs(120),
        "the clean run to finish",
        |s| s.finished && all_replicas_agree(s),
    )
    .await;
    for w in workers {
        w.stop().await;
    }
    server.shutdown().await.unwrap();
    s.hash
}

/// Polls the server's status until `pred` holds; panics with the last
/// status after `timeout`.
pub async fn wait_for(
    server: &Server,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Status) -> bool,
) -> Status {
    let start = Instant::now();
    loop {
        let s = server.status();
        if pred(&s) {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}; status: step {} volunteers {} reissued {} stale {} rejected {} clients {:?}",
            s.step,
            s.volunteers.total,
            s.reissued_jobs,
            s.stale_results,
            s.rejected_clients,
            s.client_hashes
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True when every connected client reported the server's final hash at the final step.
pub fn all_replicas_agree(s: &Status) -> bool {
    !s.client_hashes.is_empty()
        && s.client_hashes
            .values()
            .all(|c| c.step == s.step && c.hash == s.hash)
}

/// A protocol client driven by hand, for faults and hostile input.
pub struct RawClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The id from the server's Welcome (0 before the handshake).
    pub id: u64,
    /// The session token from the server's Welcome (zeros before the handshake).
    pub session: SessionToken,
    /// The weights version of each job received.
    versions: std::collections::HashMap<u64, u64>,
}

/// The Hello of a simulated client, resuming `session` if given.
pub fn hello(session: Option<SessionToken>) -> ClientMsg {
    ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind: ClientKind::Simulated,
        threads: 1,
        speed: 0.0,
        session,
        name: String::new(),
    }
}

impl RawClient {
    /// Connects without saying anything.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Self {
            ws,
            id: 0,
            session: [0; 16],
            versions: Default::default(),
        }
    }

    /// Connects with `msg`, the encoded Hello (or anything else), in the
    /// URL (`seedling_core::protocol::handshake`), saying nothing more.
    pub async fn connect_saying(url: &str, msg: &ClientMsg) -> Self {
        let bytes = protocol::encode(msg, usize::MAX).unwrap();
        Self::connect(&protocol::handshake::hello_url(url, &bytes)).await
    }

    /// Joins with the Hello in the URL (Welcome and Snapshot consumed,
    /// nothing sent); None if the server refused the upgrade.
    pub async fn try_join_by_url(url: &str) -> Option<Self> {
        let bytes = protocol::encode(&hello(None), usize::MAX).unwrap();
        let (ws, _) = tokio_tungstenite::connect_async(protocol::handshake::hello_url(url, &bytes))
            .await
            .ok()?;
        let mut c = Self {
            ws,
            id: 0,
            session: [0; 16],
            versions: Default::default(),
        };
        match c.recv().await {
            Some(ServerMsg::Welcome { client, session, .. }) => (c.id, c.session) = (client, session),
            other => panic!("expected Welcome, got {other:?}"),
        }
        assert!(matches!(c.recv().await, Some(ServerMsg::Snapshot { .. })));
        Some(c)
    }

    /// Connects and completes the handshake (Welcome and Snapshot consumed).
    pub async fn join(url: &str) -> Self {
        Self::resume(url, None).await
    }

    /// [`RawClient::join`], presenting an earlier connection's session token.
    pub async fn resume(url: &str, session: Option<SessionToken>) -> Self {
        let mut c = Self::connect(url).await;
        c.send(&hello(session)).await;
        match c.recv().await {
            Some(ServerMsg::Welcome { client, session, .. }) => (c.id, c.session) = (client, session),
            other => panic!("expected Welcome, got {other:?}"),
        }
        assert!(matches!(c.recv().await, Some(ServerMsg::Snapshot { .. })));
        c
    }

    /// Sends a message.
    pub async fn send(&mut self, msg: &ClientMsg) {
        let bytes = protocol::encode(msg, usize::MAX).unwrap();
        self.send_bytes(bytes).await;
    }

    /// Sends raw bytes as one binary frame (ignoring a closed socket).
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) {
        let _ = self.ws.send(Message::Binary(bytes.into())).await;
    }

    /// Sends a text frame, which the protocol does not allow.
    pub async fn send_text(&mut self, text: &str) {
        let _ = self.ws.send(Message::Text(text.into())).await;
    }

    /// The next server message; None once the connection is closed.
    pub async fn recv(&mut self) -> Option<ServerMsg> {
        self.recv_or_close().await.ok()
    }

    /// The next server message, or the close reason once the server closes.
    pub async fn recv_or_close(&mut self) -> Result<ServerMsg, String> {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    let msg = protocol::decode_server(&b).unwrap();
                    if let ServerMsg::Job { job, version, .. } = &msg {
                        self.versions.insert(*job, *version);
                    }
                    return Ok(msg);
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    return Err(f.map(|f| f.reason.to_string()).unwrap_or_default());
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => return Err("closed".into()),
                Err(_) => return Err("timed out".into()),
            }
        }
    }

    /// Waits for the next job, skipping other messages.
    pub async fn next_job(&mut self) -> Option<(u64, u64, Vec<u32>)> {
        loop {
            match self.recv().await? {
                ServerMsg::Job {
                    step, job, members, ..
                } => return Some((step, job, members)),
                _ => continue,
            }
        }
    }

    /// Sends `losses` as the result of job `job` of `step`, at the weights
    /// version the job named (the step itself for a job never received).
    pub async fn answer(&mut self, step: u64, job: u64, losses: Vec<f32>) {
        let version = self.versions.get(&job).copied().unwrap_or(step);
        self.send(&ClientMsg::Losses {
            step,
            job,
            behind: step.saturating_sub(version),
            losses,
        })
        .await;
    }

    /// Plays a replica that diverges again from every snapshot it is sent:
    /// after each update it reports a hash no honest replica has, until the
    /// server (or relay) refuses it. Returns the snapshots it got after
    /// joining, and the Reject's reason and retry.
    pub async fn diverge_until_refused(&mut self) -> (u32, (String, bool)) {
        let mut snapshots = 0;
        loop {
            match self.recv_or_close().await {
                Ok(ServerMsg::Snapshot { .. }) => snapshots += 1,
                Ok(ServerMsg::Update { step, .. }) => {
                    let wrong = ClientMsg::Hash {
                        step: step + 1,
                        hash: 0x5eed_1ee5,
                    };
                    self.send(&wrong).await;
                }
                Ok(ServerMsg::Reject { reason, retry }) => return (snapshots, (reason, retry)),
                Ok(_) => {}
                Err(close) => panic!("closed without a Reject after {snapshots} snapshots: {close}"),
            }
        }
    }

    /// Reads until the server closes the connection; returns the Reject reason seen.
    pub async fn expect_rejected(&mut self) -> String {
        self.expect_rejection().await.0
    }

    /// Reads until the server closes the connection; returns the Reject seen:
    /// its reason, and whether it lets the client retry.
    pub async fn expect_rejection(&mut self) -> (String, bool) {
        let mut seen = (String::new(), true);
        loop {
            match self.recv_or_close().await {
                Ok(ServerMsg::Reject { reason, retry }) => seen = (reason, retry),
                Ok(_) => continue,
                Err(close) => {
                    assert!(close != "timed out", "server did not close the connection");
                    assert!(!seen.0.is_empty(), "closed without a Reject (close: {close})");
                    return seen;
                }
            }
        }
    }

    /// Reads until the server closes; returns the close frame's code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => return f.map_or(0, |f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Drops the TCP connection without a close frame.
    pub fn vanish(self) {
        drop(self.ws);
    }
}

/// A frame larger than any client message may be.
pub fn oversized_frame() -> Vec<u8> {
    vec![0u8; MAX_CLIENT_MESSAGE + 1]
}

/// A plain HTTP/1.0 GET on loopback: (status line and headers, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    http_request(addr, "GET", path, "").await
}

/// A plain HTTP/1.0 request with extra header lines (each ending in CRLF).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (head.to_string(), body.to_string())
}

/// The training suite's faults, on a run at `url` (the server's `/ws` or a
/// relay's) that `server` coordinates: a client killed mid-job (no close
/// frame), one that never answers, one that answers long past its
/// deadline, and a worker killed mid-run, among two honest workers. The
/// faulty clients join first, so they hold the first jobs. Returns the
/// silent client (dropping it closes its connection) and the honest
/// workers, for the caller to stop once it has checked the run.
pub async fn inject_faults(server: &Server, url: &str) -> (RawClient, [WorkerHandle; 2]) {
    let mut vanisher = RawClient::join(url).await;
    let mut sleeper = RawClient::join(url).await;
    let mut late = RawClient::join(url).await;
    let _ = vanisher.next_job().await.expect("a job for the vanisher");
    vanisher.vanish();
    let _ = sleeper.next_job().await.expect("a job for the sleeper");
    let (step, job, members) = late.next_job().await.expect("a job for the late client");
    let workers = [spawn_worker(url, 1), spawn_worker(url, 1)];
    let doomed = spawn_worker(url, 1);
    wait_for(server, Duration::from_secs(120), "step 3", |s| s.step >= 3).await;
    doomed.kill();
    // Long after the deadline: dropped as stale, not counted.
    late.answer(step, job, vec![0.0; members.len()]).await;
    (sleeper, workers)
}
