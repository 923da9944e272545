//! The native volunteer: `seedling worker --server ws://HOST:PORT/ws`.
//!
//! It speaks the same protocol as a browser tab, through tokio-tungstenite:
//! the state machine is the one every client shares
//! ([`seedling_core::session`]); this module moves its bytes and evaluates
//! each job's members on several threads off the async runtime (each thread
//! runs the population-batched forward over chunks of the members).
//! When the server goes away it reconnects with exponential backoff and
//! rebuilds its replica from the snapshot the server sends on join.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use seedling_core::Replica;
use seedling_core::protocol::{ClientKind, MAX_SERVER_MESSAGE, SessionToken};
use seedling_core::session::{self, Reaction, Session};
use seedling_core::split;
use seedling_core::tokenizer::Token;
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

/// The smallest unit of work in [`evaluate_parallel`]: two antithetic pairs
/// (64 rows of an RW-256 job), small enough that the threads end a job
/// close together, large enough that a call's weight packing stays a
/// small part of it.
const PARALLEL_MIN: usize = 4;

/// Losses of `members` on `replica`, in order, on `threads` threads.
///
/// The members are cut into chunks handed out in order through one atomic
/// counter, not into fixed shares: on a volunteer's machine other programs
/// share the cores, and a thread that gets less of its core simply takes
/// fewer chunks instead of holding up the whole job. The chunks shrink as
/// the job goes ([`split::guided`]), so the last ones are small and the
/// threads finish together. Each thread runs its own forward passes on its
/// own buffers and keeps its results in its own vector until the join, so
/// the threads share no written memory (no false sharing).
pub fn evaluate_parallel(
    replica: &Replica,
    tokens: &[Token],
    members: &[u32],
    threads: usize,
) -> anyhow::Result<Vec<f32>> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let threads = threads.clamp(1, members.len().div_ceil(PARALLEL_MIN).max(1));
    // Each chunk is paced by the process's CPU share (`--cpu-percent`):
    // thread t rests after its chunks as duty cycle t says.
    let share = &crate::duty::CPU_SHARE;
    if threads == 1 {
        return Ok(share.paced(0, || replica.evaluate(tokens, members))?);
    }
    let chunks: Vec<&[u32]> = split::guided(members.len(), threads, PARALLEL_MIN, 2)
        .into_iter()
        .map(|r| &members[r])
        .collect();
    let next = AtomicUsize::new(0);
    let done: Vec<Vec<(usize, seedling_core::Result<Vec<f32>>)>> = std::thread::scope(|s| {
        let (next, chunks) = (&next, &chunks);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(chunk) = chunks.get(i) else {
                            break mine;
                        };
                        mine.push((i, share.paced(t, || replica.evaluate(tokens, chunk))));
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
                Err(e) if e.downcast_ref::<Rejected>().is_some_and(|r| r.fatal) => return Err(e),
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

/// The server refused this worker (a [`Reaction::Rejected`]); `fatal` when
/// reconnecting cannot help, the shared session's verdict.
#[derive(Debug)]
struct Rejected {
    reason: String,
    fatal: bool,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server rejected us: {}", self.reason)
    }
}

impl std::error::Error for Rejected {}

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
    sink.send(Message::Binary(hello(opts, *token)?.into())).await?;
    let mut session = Session::new();
    while let Some(frame) = stream.next().await {
        let bytes = match frame? {
            Message::Binary(b) => b,
            Message::Close(_) => return Ok(()),
            _ => continue,
        };
        if let Some(reply) = react(&mut session, &bytes, opts, stats, token).await? {
            sink.send(Message::Binary(reply.into())).await?;
        }
    }
    Ok(())
}

/// The native worker's Hello: its thread count, no speed estimate (the
/// server measures it), and the token of the previous connection, if any.
fn hello(opts: &WorkerOptions, token: Option<SessionToken>) -> seedling_core::Result<Vec<u8>> {
    session::hello(ClientKind::Native, opts.threads as u32, 0.0, token)
}

/// What the native worker does with one server frame: the shared session
/// reacts, a job is evaluated on `opts.threads` threads off the async
/// runtime, and the reply to send (if any) comes back. A rejection is a
/// [`Rejected`] error; any other error is a protocol violation.
async fn react(
    session: &mut Session,
    bytes: &[u8],
    opts: &WorkerOptions,
    stats: &mut Stats,
    token: &mut Option<SessionToken>,
) -> anyhow::Result<Option<Vec<u8>>> {
    match session.receive(bytes)? {
        Reaction::Joined { client, session } => {
            tracing::info!(client, "joined the run");
            *token = Some(session);
            Ok(None)
        }
        Reaction::Quiet => Ok(None),
        Reaction::Evaluate(work) => {
            let threads = opts.threads;
            let (work, losses) = tokio::task::spawn_blocking(move || {
                let res = evaluate_parallel(&work.replica, &work.tokens, &work.members, threads);
                (work, res)
            })
            .await?;
            let losses = losses?;
            stats.record(losses.len(), work.step, opts.progress);
            Ok(Some(work.reply(losses)?))
        }
        Reaction::Hashed { reply, .. } => Ok(Some(reply)),
        Reaction::Rejected { reason, fatal } => Err(Rejected { reason, fatal }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seedling_core::batch::step_batch;
    use seedling_core::protocol::{self, ClientMsg, ServerMsg};
    use seedling_core::shaping::centered_ranks;
    use seedling_core::tokenizer::Tokenizer;
    use seedling_core::{Replica, RunConfig};

    fn server(msg: &ServerMsg) -> Vec<u8> {
        protocol::encode(msg, MAX_SERVER_MESSAGE).unwrap()
    }

    /// The browser's reply to a frame, as its handle and job loop compute
    /// it (wasm-client's `lib.rs` and `net.rs`), with its own session.
    fn browser(s: &mut Session, bytes: &[u8]) -> Option<Vec<u8>> {
        match s.receive(bytes).unwrap() {
            Reaction::Evaluate(work) => Some(seedling_wasm::session::answer(&work).unwrap()),
            Reaction::Hashed { reply, .. } => Some(reply),
            Reaction::Joined { .. } | Reaction::Quiet => None,
            Reaction::Rejected { reason, .. } => panic!("rejected: {reason}"),
        }
    }

    /// The same server frames get byte-identical replies from the native
    /// worker (jobs split across three threads) and from the browser (one
    /// thread): the coordinator cannot tell them apart but by the Hello.
    #[tokio::test]
    async fn native_and_browser_replies_are_byte_identical() {
        let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n";
        let tokenizer = Tokenizer::from_corpus(text).unwrap();
        let corpus = tokenizer.encode(text).unwrap();
        let mut config = RunConfig::rw256(tokenizer.len() as u32);
        config.es.population = 64;
        config.es.batch = 2;
        config.es.seq_len = 8;
        let batch = |step| step_batch(&corpus, config.seed, step, 2, 8).unwrap();
        let mut want = Replica::new(config).unwrap();
        want.local_step(&batch(0)).unwrap();

        let mut opts = WorkerOptions::new("ws://unused");
        opts.threads = 3;
        opts.progress = None;
        let (mut stats, mut token) = (Stats::new(), None);
        let mut native = Session::new();
        let mut tab = Session::new();
        let mut frames = vec![
            server(&ServerMsg::Welcome {
                run: 3,
                client: 8,
                session: [5; 16],
                config,
                tokenizer,
            }),
            server(&ServerMsg::Snapshot {
                step: 1,
                params: want.params.clone(),
                adam: want.adam.clone(),
            }),
        ];
        let mut expected = vec![ClientMsg::Hash {
            step: 1,
            hash: want.hash(),
        }];
        // Jobs of 40 members (eight chunks, of 8 members down to 4) and 5,
        // one for a step the replica is not at, and an update, for two
        // steps; then a Resync and a job nobody can do.
        for step in 1..3u64 {
            let all: Vec<u32> = (0..64).collect();
            let losses = want.evaluate(&batch(step), &all).unwrap();
            for (job, members) in [
                (step * 10, (10..50).collect()),
                (step * 10 + 1, vec![0, 1, 63, 2, 62]),
            ] {
                expected.push(ClientMsg::Losses {
                    step,
                    job,
                    losses: members.iter().map(|&m| losses[m as usize]).collect(),
                });
                frames.push(server(&ServerMsg::Job {
                    step,
                    job,
                    members,
                    tokens: batch(step),
                    deadline_ms: 1000,
                }));
            }
            frames.push(server(&ServerMsg::Job {
                step: step + 1,
                job: 99,
                members: vec![4, 5],
                tokens: batch(step + 1),
                deadline_ms: 1000,
            }));
            let pairs: Vec<(u32, f32)> = all.iter().copied().zip(losses).collect();
            let weights = centered_ranks(&pairs).unwrap();
            want.apply(step, 0.02, &weights, &[]).unwrap();
            expected.push(ClientMsg::Hash {
                step: want.step,
                hash: want.hash(),
            });
            frames.push(server(&ServerMsg::Update {
                step,
                lr: 0.02,
                weights,
                tokens: Vec::new(),
            }));
        }
        frames.push(server(&ServerMsg::Resync));
        frames.push(server(&ServerMsg::Job {
            step: 3,
            job: 40,
            members: vec![0, 1],
            tokens: batch(3),
            deadline_ms: 1000,
        }));

        let mut replies = Vec::new();
        for frame in &frames {
            let ours = react(&mut native, frame, &opts, &mut stats, &mut token)
                .await
                .unwrap();
            assert_eq!(ours, browser(&mut tab, frame), "frame {frame:?}");
            replies.extend(ours.map(|r| protocol::decode_client(&r).unwrap()));
        }
        // Not vacuous: a hash for the snapshot, then two jobs' losses and a
        // hash per step, each what the server's replica computes.
        assert_eq!(replies, expected);
        assert_eq!((token, stats.members), (Some([5; 16]), 2 * 45));

        // The Hellos differ only in kind and threads.
        let native_hello = protocol::decode_client(&hello(&opts, token).unwrap()).unwrap();
        let browser_hello = seedling_wasm::session::hello(0.0, token).unwrap();
        let ClientMsg::Hello {
            kind: ClientKind::Native,
            threads: 3,
            ..
        } = native_hello
        else {
            panic!("not the native Hello: {native_hello:?}");
        };
        let as_browser = match native_hello {
            ClientMsg::Hello {
                version,
                speed,
                session,
                ..
            } => ClientMsg::Hello {
                version,
                kind: ClientKind::Browser,
                threads: 1,
                speed,
                session,
            },
            other => other,
        };
        assert_eq!(protocol::encode(&as_browser, 64).unwrap(), browser_hello);
    }

    /// A rejection ends the connection; only the shared session's fatal
    /// verdict (a version mismatch) stops [`run`] from reconnecting.
    #[tokio::test]
    async fn only_a_fatal_rejection_stops_the_worker() {
        let opts = WorkerOptions::new("ws://unused");
        let (mut stats, mut token) = (Stats::new(), None);
        for (reason, fatal) in [
            ("protocol version 9 is not supported (server speaks 2)", true),
            ("send queue full", false),
        ] {
            let frame = server(&ServerMsg::Reject {
                reason: reason.into(),
            });
            let err = react(&mut Session::new(), &frame, &opts, &mut stats, &mut token)
                .await
                .unwrap_err();
            let rejected = err.downcast_ref::<Rejected>().expect("a rejection");
            assert_eq!((rejected.reason.as_str(), rejected.fatal), (reason, fatal));
            assert_eq!(err.to_string(), format!("server rejected us: {reason}"));
        }
        // A protocol violation is an error too, but not a rejection.
        let err = react(&mut Session::new(), &[0xff; 3], &opts, &mut stats, &mut token)
            .await
            .unwrap_err();
        assert!(err.downcast_ref::<Rejected>().is_none(), "{err:#}");
    }
}
