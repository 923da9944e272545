//! Simulated volunteers: compute-free clients for load tests and system
//! benchmarks, and the few measuring tools those need.
//!
//! A simulated volunteer does everything a real one does on the wire (a real
//! WebSocket, the handshake, a reply to every job) except compute: its loss
//! for a member is a hash of (step, member). Two simulated clients that
//! evaluate the same member therefore agree, so replicated validation sees
//! honest volunteers, while the server does all of its real work:
//! bookkeeping, replication, shaping, the update and its broadcast. Thousands
//! of them fit on one machine, which is what a test of the coordinator's
//! scaling needs and real workers could never give.
//!
//! A client does not decode the Update broadcasts (two thousand clients
//! decoding every update would measure the clients, not the server), except
//! a *verifier*: it keeps a real replica, applies every update and reports
//! its hash, so a load run still checks that replicas agree.

use seedling_bench_record::Record;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use seedling_core::protocol::{self, ClientMsg, ServerMsg};
use seedling_core::{Replica, RunConfig};
use seedling_server::app::Server;
use seedling_server::coordinator::{Settings, Status};
use seedling_server::timing::Quantiles;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// The loss a simulated client reports for `member` at `step`: a fixed
/// function of the two, so every simulated client agrees, spread over
/// [1, 2) so centered ranks see distinct values.
pub fn synthetic_loss(step: u64, member: u32) -> f32 {
    let h = seedling_core::rng::derive(&[0x51u64, step, member as u64]);
    1.0 + (h >> 40) as f32 / (1u64 << 24) as f32
}

/// The reply to job `job` of `step` at weights `version`: one loss per
/// member, in the job's order. The one place a test builds a Losses
/// message.
pub fn losses(step: u64, job: u64, version: u64, members: &[u32], loss: impl Fn(u32) -> f32) -> ClientMsg {
    ClientMsg::Losses {
        step,
        job,
        behind: step.saturating_sub(version),
        losses: members.iter().map(|&m| loss(m)).collect(),
    }
}

/// The first byte of an encoded Update: postcard writes the variant index
/// first, so a client can skip an update without decoding it.
fn update_tag() -> u8 {
    let update = ServerMsg::Update {
        step: 0,
        lr: 0.0,
        weights: Vec::new(),
        tokens: Vec::new(),
    };
    protocol::encode(&update, usize::MAX).expect("an update encodes")[0]
}

/// What a crowd of simulated clients did; shared by their tasks.
#[derive(Debug, Default)]
pub struct SimCounters {
    /// Clients that completed the handshake.
    pub joined: AtomicU64,
    /// Jobs answered.
    pub jobs: AtomicU64,
    /// Member losses sent.
    pub members: AtomicU64,
    /// Hash reports sent by verifiers.
    pub hashes: AtomicU64,
    /// Clients the server rejected or disconnected (none should be).
    pub dropped: AtomicU64,
    /// Connection attempts refused (retried after a pause).
    pub refused: AtomicU64,
}

impl SimCounters {
    /// The counters as one JSON object.
    pub fn json(&self) -> String {
        format!(
            "{{\"joined\":{},\"jobs\":{},\"members\":{},\"hashes\":{},\"dropped\":{},\"refused\":{}}}",
            self.joined.load(Relaxed),
            self.jobs.load(Relaxed),
            self.members.load(Relaxed),
            self.hashes.load(Relaxed),
            self.dropped.load(Relaxed),
            self.refused.load(Relaxed),
        )
    }
}

/// One simulated volunteer: connects (retrying a refused connection),
/// completes the handshake and answers jobs until `stop` turns true or the
/// server closes the connection.
pub async fn sim_client(
    url: String,
    verifier: bool,
    counters: Arc<SimCounters>,
    mut stop: watch::Receiver<bool>,
) {
    let update = update_tag();
    let mut ws = loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => break ws,
            Err(_) => {
                counters.refused.fetch_add(1, Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stopped(&mut stop) => return,
                }
            }
        }
    };
    let encode = |m: &ClientMsg| Message::Binary(protocol::encode(m, usize::MAX).unwrap().into());
    if ws.send(encode(&crate::hello(None))).await.is_err() {
        counters.dropped.fetch_add(1, Relaxed);
        return;
    }
    let mut config = None;
    let mut replica: Option<Replica> = None;
    loop {
        let frame = tokio::select! {
            f = ws.next() => f,
            _ = stopped(&mut stop) => {
                let _ = ws.close(None).await;
                return;
            }
        };
        let bytes = match frame {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        if !verifier && bytes.first() == Some(&update) {
            continue;
        }
        let reply = match protocol::decode_server(&bytes) {
            Ok(ServerMsg::Welcome { config: c, .. }) => {
                counters.joined.fetch_add(1, Relaxed);
                config = Some(c);
                None
            }
            Ok(ServerMsg::Snapshot {
                step,
                params,
                adam,
                versions,
            }) if verifier => {
                let c = config.expect("Welcome comes before Snapshot");
                let r = Replica::from_snapshot(c, step, params, adam)
                    .and_then(|r| r.with_versions(versions))
                    .expect("a valid snapshot");
                let hash = ClientMsg::Hash { step, hash: r.hash() };
                replica = Some(r);
                Some(hash)
            }
            Ok(ServerMsg::Update {
                step,
                lr,
                weights,
                tokens,
            }) => replica.as_mut().and_then(|r| {
                r.apply(step, lr, &weights, &tokens).ok()?;
                Some(ClientMsg::Hash {
                    step: r.step,
                    hash: r.hash(),
                })
            }),
            Ok(ServerMsg::Job {
                step,
                version,
                job,
                members,
                ..
            }) => {
                counters.jobs.fetch_add(1, Relaxed);
                counters.members.fetch_add(members.len() as u64, Relaxed);
                Some(losses(step, job, version, &members, |m| synthetic_loss(step, m)))
            }
            Ok(ServerMsg::Reject { .. }) | Err(_) => break,
            Ok(_) => None,
        };
        if let Some(msg) = reply {
            if matches!(msg, ClientMsg::Hash { .. }) {
                counters.hashes.fetch_add(1, Relaxed);
            }
            if ws.send(encode(&msg)).await.is_err() {
                break;
            }
        }
    }
    if !*stop.borrow() {
        counters.dropped.fetch_add(1, Relaxed);
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Starts `clients` simulated volunteers (the first `verifiers` of them
/// verifiers), at most `per_s` new connections a second so the listen
/// backlog never overflows. They run until `stop` turns true.
pub fn spawn_crowd(
    url: &str,
    clients: usize,
    verifiers: usize,
    per_s: f64,
    stop: watch::Receiver<bool>,
) -> (Arc<SimCounters>, tokio::task::JoinHandle<()>) {
    let counters = Arc::new(SimCounters::default());
    let (url, c) = (url.to_string(), counters.clone());
    let task = tokio::spawn(async move {
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(clients);
        for i in 0..clients {
            let due = started + Duration::from_secs_f64(i as f64 / per_s);
            tokio::time::sleep_until(due.into()).await;
            tasks.push(tokio::spawn(sim_client(
                url.clone(),
                i < verifiers,
                c.clone(),
                stop.clone(),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    (counters, task)
}

/// Resident set size of this process, in KiB (Linux `/proc/self/status`).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Raises this process's soft limit on open files to its hard limit, and
/// returns the new soft limit: thousands of loopback connections need two
/// descriptors each (both ends live in one process in the tests).
pub fn raise_nofile_limit() -> u64 {
    // libc rather than a wrapper crate: it is already in the dependency tree
    // (through tokio) and this is two calls.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// A TCP stream that adds every byte written through it to a counter.
struct Counted<S> {
    inner: S,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A loopback TCP relay to `upstream` that counts the bytes clients send
/// through it (the uplink), WebSocket framing, masks and the HTTP upgrade
/// included. Returns its address and the counter.
pub async fn uplink_meter(upstream: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let uplink = Arc::new(AtomicU64::new(0));
    let counter = uplink.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let written = counter.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut up = Counted { inner: sw, written };
                let mut sr = sr;
                tokio::select! {
                    _ = tokio::io::copy(&mut cr, &mut up) => {}
                    _ = tokio::io::copy(&mut sr, &mut cw) => {}
                }
            });
        }
    });
    (addr, uplink)
}

/// The coordinator's overhead, (CPU, wall) ms, for every step closed while
/// polling, until `until`, by step (the status carries the last closed
/// The steady state of a run everyone has joined: waits out two full steps
/// (those begun before the last joins are not representative), then
/// collects the coordinator's per-step overheads for `secs`. Returns the
/// status before and after, the overheads, and the seconds measured.
async fn steady_steps(server: &Server, secs: u64) -> (Status, BTreeMap<u64, (f64, f64)>, Status, f64) {
    let k = server.status().step;
    crate::wait_for(server, Duration::from_secs(120), "two full steps", |s| {
        s.step >= k + 2
    })
    .await;
    let first = server.status();
    let started = Instant::now();
    let overheads = collect_overheads(server, started + Duration::from_secs(secs)).await;
    (first, overheads, server.status(), started.elapsed().as_secs_f64())
}

/// step's figure).
pub async fn collect_overheads(server: &Server, until: Instant) -> BTreeMap<u64, (f64, f64)> {
    let mut out = BTreeMap::new();
    while Instant::now() < until {
        let s = server.status();
        if s.step_overhead_ms.steps > 0 {
            let figures = (s.step_overhead_ms.last, s.step_overhead_wall_ms.last);
            out.insert(s.step.saturating_sub(1), figures);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// Quantiles of what [`collect_overheads`] collected: (CPU, wall).
pub fn overhead_quantiles(overheads: &BTreeMap<u64, (f64, f64)>) -> (Quantiles, Quantiles) {
    (
        Quantiles::of(overheads.values().map(|o| o.0)),
        Quantiles::of(overheads.values().map(|o| o.1)),
    )
}

/// `seedling-sim crowd`: `clients` simulated volunteers against `url` until
/// stdin closes, then one JSON line of counters on stdout.
pub async fn crowd_main(url: &str, clients: usize, verifiers: usize) {
    raise_nofile_limit();
    let (stop, rx) = watch::channel(false);
    let (counters, task) = spawn_crowd(url, clients, verifiers, 500.0, rx);
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .unwrap();
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    println!("{}", counters.json());
}

/// Settings for a benchmark run: real job sizing, no validation or checkpoints.
fn bench_settings() -> Settings {
    Settings {
        min_fraction: 1.0,
        eval_every: 0,
        checkpoint_every: 0,
        max_steps: None,
        ..Settings::default()
    }
}

/// The RW-256 workload with `population` members, on the synthetic corpus.
fn rw256(population: u32, settings: Settings) -> seedling_server::app::ServeOptions {
    let mut opts = crate::corpus_options(settings, |vocab| {
        let mut c = RunConfig::rw256(vocab);
        c.es.population = population;
        c
    });
    opts.limits = seedling_server::app::Limits {
        max_connections: 100_000,
        max_per_ip: 100_000,
        handshakes_per_s: 1e6,
        handshake_burst: 1e6,
        ..Default::default()
    };
    opts
}

/// `coordinator-1000`: the coordinator's busy time per step, without the
/// replica's update, with `clients` compute-free volunteers at N = 4096.
/// One JSON line.
pub async fn coordinator_bench(clients: usize, secs: u64) -> String {
    raise_nofile_limit();
    let server = crate::start(rw256(4096, bench_settings())).await;
    let (stop, rx) = watch::channel(false);
    let (counters, task) = spawn_crowd(&crate::ws_url(&server), clients, 0, 500.0, rx);
    crate::wait_for(&server, Duration::from_secs(120), "the crowd to join", |s| {
        s.volunteers.total == clients
    })
    .await;
    let (first, overheads, s, elapsed) = steady_steps(&server, secs).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    server.shutdown().await.unwrap();
    let (q, wall) = overhead_quantiles(&overheads);
    let steps = s.step - first.step;
    let mut r = Record::new(format!("coordinator-{clients}"), "native", 1);
    r.seconds_per_step = Some(elapsed / steps.max(1) as f64);
    r.set_num("p50_ms", q.p50)
        .set_num("p99_ms", q.p99)
        .set_num("wall_p50_ms", wall.p50)
        .set_num("wall_p99_ms", wall.p99)
        .set_num("steps", steps as f64)
        .set_num("steps_sampled", q.steps as f64)
        .set_num("update_p50_ms", s.update_ms.p50)
        .set_num("delivery_p50_ms", s.step_delivery_ms.p50)
        .set_num("population", 4096.0)
        .set_num("clients", clients as f64)
        .set_num("dropped", counters.dropped.load(Relaxed) as f64)
        .set_text(
            "note",
            "coordinator thread CPU time per step without the replica's update and hash (wall_*: the same \
             on the wall clock, preempted time included; delivery_*: the courier task's CPU time handing \
             frames to connections, off the coordinator thread); compute-free simulated volunteers on \
             loopback, in-process on the same cores; target p50 <= 5 ms",
        );
    r.to_line()
}

/// `wire-bytes`: uplink bytes per member evaluation, amortized over a short
/// RW-256 run with two native workers (jobs sized by their real speed),
/// counted on the TCP stream: WebSocket frame headers, masks, the upgrade
/// request, hash reports and the close all included. One JSON line.
pub async fn wire_bytes_bench(steps: u64) -> String {
    let server = crate::start(rw256(256, bench_settings())).await;
    let (relay, uplink) = uplink_meter(server.addr).await;
    let url = format!("ws://{relay}/ws");
    let workers = [crate::spawn_worker(&url, 1), crate::spawn_worker(&url, 1)];
    let started = Instant::now();
    crate::wait_for(&server, Duration::from_secs(600), "the steps", |s| {
        s.step >= steps
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    for w in workers {
        w.stop().await;
    }
    let s = server.status();
    server.shutdown().await.unwrap();
    // Every evaluation sent: the counted ones, second opinions, and those
    // of the step in flight when the workers stopped.
    let evaluations = s.steps_closed * 256 + s.replicated_members + s.members_done as u64;
    let bytes = uplink.load(Relaxed);
    let mut r = Record::new("wire-bytes", "native", 1);
    r.seconds_per_step = Some(elapsed / s.steps_closed.max(1) as f64);
    r.set_num("bytes_per_member", bytes as f64 / evaluations.max(1) as f64)
        .set_num("uplink_bytes", bytes as f64)
        .set_num("member_evaluations", evaluations as f64)
        .set_num("workers", 2.0)
        .set_text(
            "note",
            "client-to-server bytes on the TCP stream (frame headers, masks, upgrade, hashes, close) per \
             member evaluation; target <= 8",
        );
    r.to_line()
}

/// The populations `downlink-bytes` measures.
pub const DOWNLINK_POPULATIONS: [u32; 3] = [256, 4096, 65_536];

/// Bytes of one server-to-client WebSocket message carrying `payload`
/// bytes: the payload and an unmasked header per frame (RFC 6455 section
/// 5.2: 2 bytes, 2 more for a length over 125, 8 more instead over
/// 65,535), in fragments of at most `seedling_server::ws::FRAGMENT` bytes
/// as the server sends a long message.
pub fn ws_frame_bytes(payload: usize) -> usize {
    let header = |len: usize| match len {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    };
    let fragment = seedling_server::ws::FRAGMENT;
    let (whole, rest) = (payload / fragment, payload % fragment);
    let last = if rest > 0 || whole == 0 {
        header(rest) + rest
    } else {
        0
    };
    whole * (header(fragment) + fragment) + last
}

/// The Update frame a volunteer receives for one step of an RW-256 run at
/// `population`: the coordinator's own message (centered ranks of
/// [`synthetic_loss`]es, shaped by the core's `shape` as the coordinator
/// shapes) with the members for which `counted` holds, encoded as the
/// coordinator encodes it. Its length on the WebSocket, header included.
pub fn update_frame_bytes(
    population: u32,
    step: u64,
    counted: impl Fn(u32) -> bool,
    minibatch: bool,
) -> usize {
    let config = RunConfig::rw256(1);
    let losses: Vec<(u32, f32)> = (0..population)
        .filter(|&m| counted(m))
        .map(|m| (m, synthetic_loss(step, m)))
        .collect();
    let weights = seedling_core::shaping::shape(config.recipe.shaping, &losses).expect("finite losses");
    let tokens = if minibatch {
        let len = (config.es.batch * (config.es.seq_len + 1)) as u64;
        (0..len)
            .map(|i| (seedling_core::rng::derive(&[0x7a, step, i]) % config.model.vocab as u64) as _)
            .collect()
    } else {
        Vec::new()
    };
    let update = ServerMsg::Update {
        step,
        lr: config.adam.lr,
        weights,
        tokens,
    };
    let frame = protocol::encode(&update, protocol::MAX_SERVER_MESSAGE).expect("an update encodes");
    ws_frame_bytes(frame.len())
}

/// `downlink-bytes`: the bytes every volunteer receives per step, at
/// populations of 256, 4,096 and 65,536: one Update frame (jobs go to one
/// volunteer each, snapshots only on joining, so neither is counted), with
/// RW-256's default recipe (no minibatch in the update), its WebSocket
/// headers (one per fragment) included, TCP/IP headers not. `bytes_N`: every member counted;
/// `missing_bytes_N`: a tenth of the members, scattered, missing, as a step
/// that closes at its deadline under `--min-fraction 0.9` sends;
/// `minibatch_bytes_N`: every member counted with the minibatch in the
/// update (`--readout exact` or `--input-rows seen`). Computed, not timed:
/// one JSON line.
pub fn downlink_bytes_bench() -> String {
    let step = 10_000;
    let mut r = Record::new("downlink-bytes", "native", 1);
    for n in DOWNLINK_POPULATIONS {
        let all = update_frame_bytes(n, step, |_| true, false);
        let missing = update_frame_bytes(
            n,
            step,
            |m| !seedling_core::rng::derive(&[0x3b, step, m as u64]).is_multiple_of(10),
            false,
        );
        let minibatch = update_frame_bytes(n, step, |_| true, true);
        r.set_num(&format!("bytes_{n}"), all as f64)
            .set_num(&format!("bytes_per_member_{n}"), all as f64 / n as f64)
            .set_num(&format!("missing_bytes_{n}"), missing as f64)
            .set_num(&format!("minibatch_bytes_{n}"), minibatch as f64);
    }
    r.set_text(
        "note",
        "bytes each volunteer receives per step: the Update message with its WebSocket headers (jobs and \
         snapshots are per volunteer and not counted; TCP/IP headers not counted); bytes_N every member \
         counted, missing_bytes_N a scattered tenth missing, minibatch_bytes_N with the minibatch",
    );
    r.to_line()
}

/// `seedling-sim relay`: one relay for the `relay-*` bench, in a process of
/// its own so its memory can be read apart (credentials from the
/// environment, as `seedling relay` takes them). Prints `addr <ADDR>` once
/// it listens, serves until stdin closes, then exits.
pub async fn relay_main(nats_url: &str, prefix: &str, id: &str) {
    raise_nofile_limit();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = seedling_server::relay::RelayOptions {
        nats: seedling_server::nats::NatsOptions {
            url: nats_url.into(),
            credentials: seedling_server::nats::Credentials::from_env().unwrap(),
            prefix: prefix.into(),
        },
        id: id.into(),
        www: None,
        limits: open_limits(),
        hub: Default::default(),
    };
    let relay = seedling_server::relay::start(listener, opts).await.unwrap();
    println!("addr {}", relay.addr);
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .unwrap();
    relay.kill();
}

/// Connection limits that let a whole simulated crowd in from loopback.
fn open_limits() -> seedling_server::app::Limits {
    seedling_server::app::Limits {
        max_connections: 100_000,
        max_per_ip: 100_000,
        handshakes_per_s: 1e6,
        handshake_burst: 1e6,
        ..Default::default()
    }
}

/// Resident set size of process `pid`, in KiB (0 if it is gone).
pub fn rss_kib_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A child process of this binary, killed (and reaped) on drop so a
/// failing bench leaves nothing running.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this binary with `args` (stdin and stdout piped), with the test
/// NATS server's credentials in its environment.
fn spawn_self(args: &[&str]) -> Child {
    let exe = std::env::current_exe().expect("the bench's own path");
    let child = std::process::Command::new(exe)
        .args(args)
        .env("SEEDLING_NATS_USER", crate::nats::USER)
        .env("SEEDLING_NATS_PASSWORD", crate::nats::PASSWORD)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting a seedling-sim process");
    Child(child)
}

/// The relay's `/api/relay` figures, as JSON.
async fn relay_status(addr: &str) -> serde_json::Value {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let (_, body) = crate::http_get(addr, "/api/relay").await;
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

/// `relay-N`: `volunteers` compute-free volunteers over `relays` relays (each
/// its own process, with its crowd in another), a coordinator (`serve
/// --nats`, in this process) and a real `nats-server`, at a population of
/// 16,384. Reports the coordinator's CPU time per step (without the
/// replica's update, as `coordinator-1000`) and the relays' resident memory
/// per volunteer. One JSON line; everything it started is stopped.
///
/// `rw256` runs RW-256 instead of the tiny model: every joining volunteer
/// then gets a snapshot of about 2.7 MiB (parameters and Adam's moments).
pub async fn relay_bench(volunteers: usize, relays: usize, secs: u64, rw256: bool) -> String {
    let population = 16_384;
    let nats = crate::nats::NatsServer::start();
    let prefix = "bench";
    // The tiny model by default: a joining volunteer's snapshot is a few
    // KiB, so the relays' memory is the connections' (see the note).
    let opts = crate::corpus_options(bench_settings(), |vocab| {
        let mut c = if rw256 {
            RunConfig::rw256(vocab)
        } else {
            crate::tiny_config(vocab, seedling_core::NoiseKind::LowRank { rank: 1 })
        };
        c.es.population = population;
        c
    });
    let server = crate::start(crate::nats::with_nats(opts, &nats, prefix)).await;
    let mut procs = Vec::new();
    for r in 0..relays {
        let id = format!("r{r}");
        let mut child = spawn_self(&["relay", "--nats", &nats.url(), "--prefix", prefix, "--id", &id]);
        let stdout = child.0.stdout.take().unwrap();
        let addr = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
            line.trim()
                .strip_prefix("addr ")
                .expect("the relay's address")
                .to_string()
        })
        .await
        .unwrap();
        let idle = rss_kib_of(child.0.id());
        procs.push((child, addr, idle));
    }
    let per_relay = volunteers / relays;
    let mut crowds = Vec::new();
    for (_, addr, _) in &procs {
        let url = format!("ws://{addr}/ws");
        crowds.push(spawn_self(&[
            "crowd",
            "--url",
            &url,
            "--clients",
            &per_relay.to_string(),
        ]));
    }
    // Every volunteer joined, on every relay.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(180) {
        let mut joined = 0;
        for (_, addr, _) in &procs {
            joined += relay_status(addr).await["volunteers"].as_u64().unwrap_or(0) as usize;
        }
        if joined >= per_relay * relays {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let join_s = start.elapsed().as_secs_f64();
    let (first, overheads, s, elapsed) = steady_steps(&server, secs).await;
    // Memory after the measured steps: every connection has carried jobs
    // and updates by now.
    let rss: Vec<(u64, u64)> = procs
        .iter()
        .map(|(c, _, idle)| (rss_kib_of(c.0.id()), *idle))
        .collect();
    let mut on_relays = Vec::new();
    for (_, addr, _) in &procs {
        on_relays.push(relay_status(addr).await["volunteers"].as_u64().unwrap_or(0));
    }
    // Stop the crowds (their stdin closes), then the relays, then the rest.
    let mut dropped = 0;
    for mut c in crowds {
        drop(c.0.stdin.take());
        let out = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            if let Some(mut o) = c.0.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut o, &mut s);
            }
            drop(c);
            s
        })
        .await
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap_or_default();
        dropped += v["dropped"].as_u64().unwrap_or(0);
    }
    drop(procs);
    server.shutdown().await.unwrap();
    drop(nats);

    let (q, wall) = overhead_quantiles(&overheads);
    let steps = s.step - first.step;
    let kib = |f: &dyn Fn(&(u64, u64)) -> u64| {
        rss.iter().map(f).sum::<u64>() as f64 / on_relays.iter().sum::<u64>().max(1) as f64
    };
    let per_volunteer = kib(&|&(full, idle)| full.saturating_sub(idle));
    let all_in = kib(&|&(full, _)| full);
    let mut r = Record::new(format!("relay-{volunteers}"), "native", 1);
    r.workload = if rw256 {
        format!("RW-256, N = {population}")
    } else {
        format!("tiny (H = 24), N = {population}")
    };
    r.seconds_per_step = Some(elapsed / steps.max(1) as f64);
    r.set_num("p50_ms", q.p50)
        .set_num("p99_ms", q.p99)
        .set_num("wall_p50_ms", wall.p50)
        .set_num("wall_p99_ms", wall.p99)
        .set_num("steps", steps as f64)
        .set_num("steps_sampled", q.steps as f64)
        .set_num("update_p50_ms", s.update_ms.p50)
        .set_num("relays", relays as f64)
        .set_num("volunteers", on_relays.iter().sum::<u64>() as f64)
        .set_num("joined_after_s", join_s)
        .set_num("relay_rss_kib_per_volunteer", per_volunteer)
        .set_num("relay_rss_kib_per_volunteer_all_in", all_in)
        .set_num(
            "relay_rss_mib_max",
            rss.iter().map(|r| r.0).max().unwrap_or(0) as f64 / 1024.0,
        )
        .set_num("coordinator_clients", s.volunteers.total as f64)
        .set_num("dropped", dropped as f64)
        .set_text(
            "note",
            "coordinator thread CPU time per step without the replica's update (as coordinator-1000), its \
             clients the relays; relays and their crowds of compute-free volunteers in separate processes \
             on loopback, with nats-server, on the same cores; relay RSS per volunteer: (RSS after the \
             measured steps - RSS before any volunteer) / volunteers (_all_in: RSS / volunteers); see the \
             workload for the model (the tiny one's snapshots are a few KiB); targets p50 <= 5 ms, <= 100 \
             KiB per volunteer",
        );
    r.to_line()
}
