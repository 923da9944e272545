//! The native volunteer: `seedling worker --server ws://HOST:PORT/ws`.
//!
//! It speaks the same protocol as a browser tab, through tokio-tungstenite,
//! and evaluates each job's members on several threads (each thread runs
//! the population-batched forward over a contiguous share of the members).
//! When the server goes away it reconnects with exponential backoff and
//! rebuilds its replica from the snapshot the server sends on join.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use seedling_core::protocol::{
    self, ClientKind, ClientMsg, MAX_CLIENT_MESSAGE, MAX_SERVER_MESSAGE, PROTOCOL_VERSION, ServerMsg,
    SessionToken,
};
use seedling_core::tokenizer::Token;
use seedling_core::{Replica, RunConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// How a worker connects and how hard it works.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The server's WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`.
    pub url: String,
    /// Threads evaluating members.
    pub threads: usize,
    /// Print a progress line this often (None = silent).
    pub progress: Option<Duration>,
    /// Longest pause between reconnection attempts.
    pub max_backoff: Duration,
}

impl WorkerOptions {
    /// Defaults for `url`: all cores, progress every 10 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            progress: Some(Duration::from_secs(10)),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Members per unit of work in [`evaluate_parallel`]: whole antithetic
/// pairs, and two of the forward pass's L2-sized blocks (8 RW-256 members).
const PARALLEL_CHUNK: usize = 16;

/// Losses of `members` on `replica`, in order, on `threads` threads.
///
/// The members are cut into chunks of [`PARALLEL_CHUNK`] handed out in order
/// through one atomic counter, not into fixed shares: on a volunteer's
/// machine other programs share the cores, and a thread that gets less of
/// its core simply takes fewer chunks instead of holding up the whole job.
/// Each thread runs its own forward passes on its own buffers and keeps its
/// results in its own vector until the join, so the threads share no
/// written memory (no false sharing).
pub fn evaluate_parallel(
    replica: &Replica,
    tokens: &[Token],
    members: &[u32],
    threads: usize,
) -> anyhow::Result<Vec<f32>> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let threads = threads.clamp(1, members.len().div_ceil(PARALLEL_CHUNK).max(1));
    if threads == 1 {
        return Ok(replica.evaluate(tokens, members)?);
    }
    let chunks: Vec<&[u32]> = members.chunks(PARALLEL_CHUNK).collect();
    let next = AtomicUsize::new(0);
    let done: Vec<Vec<(usize, seedling_core::Result<Vec<f32>>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(chunk) = chunks.get(i) else {
                            break mine;
                        };
                        mine.push((i, replica.evaluate(tokens, chunk)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("evaluation thread panicked"))
            .collect()
    });
    // Every chunk index was handed out exactly once.
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; chunks.len()];
    for (i, losses) in done.into_iter().flatten() {
        slots[i] = Some(losses?);
    }
    Ok(slots.into_iter().flatten().flatten().collect())
}

/// Runs the worker until `shutdown` resolves, reconnecting whenever the
/// connection ends. Returns an error only when the server refuses us for a
/// reason reconnecting cannot fix (a protocol version mismatch).
pub async fn run(opts: WorkerOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    let mut stats = Stats::new();
    // The session token survives reconnections, so the trust this worker
    // earned survives them too.
    let mut token: Option<SessionToken> = None;
    loop {
        let started = Instant::now();
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            res = session(&opts, &mut stats, &mut token) => match res {
                Ok(()) => tracing::info!("server closed the connection"),
                Err(e) if e.to_string().contains("protocol version") => return Err(e),
                Err(e) => tracing::warn!("connection lost: {e:#}"),
            },
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(opts.max_backoff);
    }
}

struct Stats {
    members: u64,
    since: Instant,
    last_print: Instant,
    window_members: u64,
}

impl Stats {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            members: 0,
            since: now,
            last_print: now,
            window_members: 0,
        }
    }

    fn record(&mut self, n: usize, step: u64, every: Option<Duration>) {
        self.members += n as u64;
        self.window_members += n as u64;
        let Some(every) = every else { return };
        if self.last_print.elapsed() >= every {
            let rate = self.window_members as f64 / self.last_print.elapsed().as_secs_f64();
            println!(
                "step {step}  members evaluated {}  members/s {rate:.1}  up {:.0}s",
                self.members,
                self.since.elapsed().as_secs_f64()
            );
            self.last_print = Instant::now();
            self.window_members = 0;
        }
    }
}

async fn session(
    opts: &WorkerOptions,
    stats: &mut Stats,
    token: &mut Option<SessionToken>,
) -> anyhow::Result<()> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_SERVER_MESSAGE))
        .max_frame_size(Some(MAX_SERVER_MESSAGE));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(&opts.url, Some(config), true)
        .await
        .with_context(|| format!("connecting to {}", opts.url))?;
    let (mut sink, mut stream) = ws.split();
    let send = |msg: ClientMsg| -> anyhow::Result<Message> {
        Ok(Message::Binary(
            protocol::encode(&msg, MAX_CLIENT_MESSAGE)?.into(),
        ))
    };
    sink.send(send(ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind: ClientKind::Native,
        threads: opts.threads as u32,
        speed: 0.0,
        session: *token,
    })?)
    .await?;
    let mut config: Option<RunConfig> = None;
    let mut replica: Option<Replica> = None;
    while let Some(frame) = stream.next().await {
        let bytes = match frame? {
            Message::Binary(b) => b,
            Message::Close(_) => return Ok(()),
            _ => continue,
        };
        match protocol::decode_server(&bytes)? {
            ServerMsg::Welcome {
                config: c,
                client,
                session,
                ..
            } => {
                tracing::info!(client, "joined the run");
                config = Some(c);
                *token = Some(session);
            }
            ServerMsg::Snapshot { step, params, adam } => {
                let c = config.context("snapshot before welcome")?;
                let r = Replica::from_snapshot(c, step, params, adam)?;
                sink.send(send(ClientMsg::Hash { step, hash: r.hash() })?).await?;
                replica = Some(r);
            }
            ServerMsg::Job {
                step,
                job,
                members,
                tokens,
                ..
            } => {
                let Some(r) = replica.take() else { continue };
                if r.step != step {
                    replica = Some(r);
                    continue; // out of step; the server will reissue
                }
                let threads = opts.threads;
                let (r, losses) = tokio::task::spawn_blocking(move || {
                    let res = evaluate_parallel(&r, &tokens, &members, threads);
                    (r, res)
                })
                .await?;
                let losses = losses?;
                stats.record(losses.len(), step, opts.progress);
                replica = Some(r);
                sink.send(send(ClientMsg::Losses { step, job, losses })?).await?;
            }
            ServerMsg::Update { step, lr, weights } => {
                let Some(r) = replica.as_mut() else { continue };
                r.apply(step, lr, &weights)?;
                sink.send(send(ClientMsg::Hash {
                    step: r.step,
                    hash: r.hash(),
                })?)
                .await?;
            }
            ServerMsg::Resync => replica = None,
            ServerMsg::Reject { reason } => anyhow::bail!("server rejected us: {reason}"),
        }
    }
    Ok(())
}
