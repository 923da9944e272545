//! The native volunteer: `seedling worker --server ws://HOST:PORT/ws`.
//!
//! A thin driver of the lifecycle every client shares
//! ([`seedling_core::volunteer::Volunteer`]): this module owns the
//! transport (tokio-tungstenite), evaluates each job's members on several
//! threads off the async runtime (each thread runs the population-batched
//! forward over chunks of the members, cut by [`split::guided`]) and prints
//! progress. Everything else (the Hello, the session token, what each frame
//! means, when to reconnect, when to stop) the lifecycle decides.
//!
//! A worker's identity outlives the process in its identity file
//! ([`IdentityFile`]): the session token of its last Welcome, presented in
//! the next run's first Hello so the contributor's credit and trust carry
//! on, under the display name `--name` gives.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use seedling_core::Replica;
use seedling_core::protocol::{ClientKind, MAX_SERVER_MESSAGE, SessionToken};
use seedling_core::split;
use seedling_core::tokenizer::Token;
use seedling_core::volunteer::{Action, Event, Volunteer, Work};
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
    /// The display name on the contributors' leaderboard (empty for none;
    /// cleaned before it is sent).
    pub name: String,
    /// Where the session token is kept between runs; `None` starts a new
    /// contributor every run (the in-process workers of `seedling train`).
    pub identity: Option<PathBuf>,
}

/// The identity file `seedling worker` uses without `--identity-file`:
/// `seedling/identity` under the user's data directory
/// (`~/.local/share` on Linux, `~/Library/Application Support` on macOS,
/// `%APPDATA%` on Windows), or `.seedling-identity` in the working
/// directory where there is none.
pub fn default_identity_file() -> PathBuf {
    dirs::data_dir().map_or_else(
        || PathBuf::from(".seedling-identity"),
        |d| d.join("seedling").join("identity"),
    )
}

/// The file that keeps a worker's session token: 32 hex digits and a line
/// break, readable by its owner only (the token resumes the session's trust
/// and credit, so it is a secret). One file per running worker: two workers
/// presenting one token would replace each other's connection, so a worker
/// holds an OS lock on it while it runs ([`IdentityFile::claim`]).
#[derive(Debug)]
pub struct IdentityFile {
    path: PathBuf,
    /// The token the file holds.
    saved: Option<SessionToken>,
    /// The lock on `<path>.lock` while this worker uses the file (the file
    /// itself is replaced by a rename when the token changes, so the lock
    /// lives beside it).
    _lock: Option<std::fs::File>,
}

/// Identity files a worker tries, `path`, `path.2`, ... before it gives up.
const MAX_IDENTITIES: usize = 64;

impl IdentityFile {
    /// The identity file at `path` if no other running worker holds it, or
    /// else the first free one of `path.2`, `path.3`, ...: a second worker
    /// started with the same (default) file becomes a contributor of its
    /// own, the same one every time it is the second, instead of the two
    /// replacing each other's connection with the server for ever.
    pub fn claim(path: &Path) -> anyhow::Result<Self> {
        for i in 1..=MAX_IDENTITIES {
            let candidate = if i == 1 {
                path.to_path_buf()
            } else {
                let mut name = path.as_os_str().to_owned();
                name.push(format!(".{i}"));
                PathBuf::from(name)
            };
            let Some(lock) = lock_beside(&candidate)? else {
                continue;
            };
            if i > 1 {
                tracing::info!(
                    "{} is in use by another worker; this one is {}",
                    path.display(),
                    candidate.display()
                );
            }
            let mut file = Self::open(&candidate)?;
            file._lock = Some(lock);
            return Ok(file);
        }
        anyhow::bail!(
            "{} and {MAX_IDENTITIES} alternatives are all in use by running workers",
            path.display()
        )
    }

    /// Reads the token at `path`; a missing file is a new contributor, one
    /// that does not hold a token is an error (writing over it would lose
    /// that contributor's credit).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let saved = match std::fs::read_to_string(path) {
            Ok(text) => Some(parse_token(text.trim()).with_context(|| {
                format!(
                    "{} does not hold a session token; move it away to start afresh",
                    path.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self {
            path: path.to_path_buf(),
            saved,
            _lock: None,
        })
    }

    /// The token the file holds, if any.
    pub fn token(&self) -> Option<SessionToken> {
        self.saved
    }

    /// Keeps `token` if it is not the one saved: written to a temporary
    /// file beside the path, then renamed over it, so a crash leaves the
    /// old token or the new one.
    pub fn keep(&mut self, token: Option<SessionToken>) -> anyhow::Result<()> {
        let Some(token) = token.filter(|&t| Some(t) != self.saved) else {
            return Ok(());
        };
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tmp = tempfile::Builder::new().prefix(".identity-").tempfile_in(dir)?;
        std::io::Write::write_all(&mut tmp, format!("{}\n", hex_token(&token)).as_bytes())?;
        // tempfile creates the file readable by its owner only.
        tmp.persist(&self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.saved = Some(token);
        Ok(())
    }
}

/// An exclusive lock on `<path>.lock` (created with its directory), `None`
/// when another process holds it.
fn lock_beside(path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", lock_path.display()))
        }
    }
}

/// A token as 32 lowercase hex digits.
pub fn hex_token(token: &SessionToken) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads [`hex_token`]'s form back.
pub fn parse_token(hex: &str) -> anyhow::Result<SessionToken> {
    anyhow::ensure!(hex.len() == 32 && hex.is_ascii(), "not 32 hex digits");
    let mut token = [0u8; 16];
    for (i, b) in token.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(token)
}

impl WorkerOptions {
    /// Defaults for `url`: all cores, progress every 10 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            progress: Some(Duration::from_secs(10)),
            max_backoff: Duration::from_secs(10),
            name: String::new(),
            identity: None,
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
) -> seedling_core::Result<Vec<f32>> {
    evaluate_step_parallel(replica, replica.step, replica.step, tokens, members, threads)
}

/// [`evaluate_parallel`] for the members of `step` at the weights after
/// `version` updates, which with steps in flight may be any version the
/// replica holds ([`Replica::evaluate_at`]).
pub fn evaluate_step_parallel(
    replica: &Replica,
    step: u64,
    version: u64,
    tokens: &[Token],
    members: &[u32],
    threads: usize,
) -> seedling_core::Result<Vec<f32>> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let threads = threads.clamp(1, members.len().div_ceil(PARALLEL_MIN).max(1));
    // Each chunk is paced by the process's CPU share (`--cpu-percent`):
    // thread t rests after its chunks as duty cycle t says.
    let share = &crate::duty::CPU_SHARE;
    if threads == 1 {
        return share.paced(0, || replica.evaluate_at(step, version, tokens, members));
    }
    let point = replica.point(step, version)?;
    let point = &point[..];
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
                        mine.push((
                            i,
                            share.paced(t, || replica.evaluate_around(point, step, tokens, chunk)),
                        ));
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
/// connection ends, when and as long as the lifecycle says. Returns an
/// error only when the server refuses us for good (another protocol
/// version, a banned session).
pub async fn run(opts: WorkerOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let clock = Clock::new();
    let max_backoff = u64::try_from(opts.max_backoff.as_millis()).unwrap_or(u64::MAX);
    let mut identity = opts.identity.as_deref().map(IdentityFile::claim).transpose()?;
    let token = identity.as_ref().and_then(IdentityFile::token);
    let mut life = Volunteer::new(ClientKind::Native, opts.threads as u32)
        .max_backoff(max_backoff)
        .identity(token, &opts.name);
    let mut progress = Progress::new(opts.progress);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            res = connection(&opts, &mut life, &clock, &mut progress, &mut identity) => {
                if let Err(e) = res {
                    tracing::warn!("connection lost: {e:#}");
                }
            }
        }
        match life.closed(clock.now(), jitter()).action {
            Action::Reconnect { after_ms } => tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(after_ms)) => {}
            },
            Action::Stop { reason } => anyhow::bail!("server rejected us: {reason}"),
            other => tracing::error!(
                ?other,
                "the lifecycle asked for something else than a reconnection"
            ),
        }
    }
}

/// A random fraction in `[0, 1)` for the backoff's jitter; the middle of
/// the range if the system has no randomness to give.
fn jitter() -> f64 {
    getrandom::u64().map_or(0.5, |x| (x >> 11) as f64 / (1u64 << 53) as f64)
}

/// Milliseconds since the worker started: the lifecycle's clock.
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        Self(Instant::now())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// One connection: opens it, then [`converse`]s until it ends.
async fn connection(
    opts: &WorkerOptions,
    life: &mut Volunteer,
    clock: &Clock,
    progress: &mut Progress,
    identity: &mut Option<IdentityFile>,
) -> anyhow::Result<()> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_SERVER_MESSAGE))
        .max_frame_size(Some(MAX_SERVER_MESSAGE));
    // The Hello rides in the URL: the server answers with the Welcome and
    // the first jobs a round trip sooner.
    let url = life.url(&opts.url, clock.now()).context("encoding the Hello")?;
    let (ws, _) = tokio_tungstenite::connect_async_with_config(&url, Some(config), true)
        .await
        .with_context(|| format!("connecting to {}", opts.url))?;
    let (mut sink, mut stream) = ws.split();
    converse(
        life,
        &mut sink,
        &mut stream,
        opts.threads,
        clock,
        progress,
        identity,
    )
    .await
}

/// The native worker's side of one connection opened on the lifecycle's
/// URL (which carries the Hello): tells the lifecycle that it opened and
/// each frame that arrives, and performs what it asks,
/// until it asks to close or stop or the server ends the connection.
/// Generic over the socket's two halves so a test can script the server.
async fn converse<E1, E2>(
    life: &mut Volunteer,
    sink: &mut (impl Sink<Message, Error = E1> + Unpin),
    stream: &mut (impl Stream<Item = Result<Message, E2>> + Unpin),
    threads: usize,
    clock: &Clock,
    progress: &mut Progress,
    identity: &mut Option<IdentityFile>,
) -> anyhow::Result<()>
where
    E1: std::error::Error + Send + Sync + 'static,
    E2: std::error::Error + Send + Sync + 'static,
{
    let mut outcome = life.opened_with_hello(clock.now());
    // Frames that arrived while a job was being evaluated, in order.
    let mut inbox = Inbox::default();
    // Jobs received and not started, in order. A floating job starts once
    // every frame that has arrived is handled, so it is evaluated at the
    // newest weights the updates before it brought
    // ([`Volunteer::refresh`]); any other starts at once.
    let mut jobs: std::collections::VecDeque<Work> = std::collections::VecDeque::new();
    loop {
        if let (Some(Event::Joined { .. }), Some(file)) = (&outcome.event, identity.as_mut()) {
            // Not fatal: the worker trains on, as a new contributor next run.
            if let Err(e) = file.keep(life.token()) {
                tracing::warn!("cannot keep the session token: {e:#}");
            }
        }
        progress.show(outcome.event.take(), life, clock);
        match outcome.action {
            Action::Nothing => {}
            Action::Send(bytes) => sink.send(Message::Binary(bytes.into())).await?,
            Action::Evaluate(work) => {
                if jobs.len() >= MAX_INBOX {
                    anyhow::bail!("the server sent over {MAX_INBOX} jobs ahead");
                }
                jobs.push_back(work);
            }
            Action::Close | Action::Reconnect { .. } | Action::Stop { .. } => return Ok(()),
        }
        // Below a full CPU share the last job left a rest to take before
        // the next: take it here, reading what arrives, so the updates
        // that come meanwhile are applied before a floating job starts.
        if !jobs.is_empty() {
            let owed = crate::duty::CPU_SHARE.owed(0);
            if !owed.is_zero() {
                reading(tokio::time::sleep(owed), stream, &mut inbox).await?;
            }
        }
        let floating = jobs.front().is_some_and(|w| w.floating);
        if floating && inbox.frames.is_empty() && !inbox.ended {
            read_ready(stream, &mut inbox)?;
        }
        if jobs
            .front()
            .is_some_and(|w| !w.floating || inbox.frames.is_empty())
        {
            let work = life.refresh(jobs.pop_front().expect("a job is queued"));
            let (work, losses) = evaluate(work, threads, stream, &mut inbox).await?;
            outcome = life.evaluated(work, losses, clock.now());
            continue;
        }
        let bytes = match inbox.frames.pop_front() {
            Some(b) => b,
            None if inbox.ended => return Ok(()),
            None => loop {
                match stream.next().await {
                    None => return Ok(()),
                    Some(frame) => match frame? {
                        Message::Binary(b) => break b,
                        Message::Close(_) => {
                            tracing::info!("server closed the connection");
                            return Ok(());
                        }
                        _ => continue,
                    },
                }
            },
        };
        // Applying an update is CPU the volunteer gives too: it counts
        // against the share like evaluating does.
        let start = crate::timing::thread_time();
        outcome = life.receive(&bytes);
        crate::duty::CPU_SHARE.charge(0, crate::timing::thread_time().saturating_sub(start));
    }
}

/// Frames a server may queue at a worker while it evaluates: jobs sent
/// ahead (the server holds a volunteer to a few dozen) and updates. More is
/// a broken server, and the connection is dropped.
const MAX_INBOX: usize = 4096;

/// Frames read while a job was being evaluated, and whether the connection
/// ended meanwhile.
#[derive(Default)]
struct Inbox {
    frames: std::collections::VecDeque<bytes::Bytes>,
    ended: bool,
}

/// Moves the frames that have already arrived into `inbox`, without
/// waiting for more.
fn read_ready<E>(
    stream: &mut (impl Stream<Item = Result<Message, E>> + Unpin),
    inbox: &mut Inbox,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    use futures_util::FutureExt;
    while let Some(frame) = stream.next().now_or_never() {
        match frame {
            None | Some(Ok(Message::Close(_))) => {
                inbox.ended = true;
                return Ok(());
            }
            Some(Ok(Message::Binary(b))) => {
                if inbox.frames.len() >= MAX_INBOX {
                    anyhow::bail!("the server queued over {MAX_INBOX} frames");
                }
                inbox.frames.push_back(b);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Evaluates a job on `threads` threads off the async runtime. The socket
/// is read meanwhile (frames queue in `inbox`), so the WebSocket library
/// answers the server's pings at once: the server times the volunteer's
/// round trip with them and sends enough work ahead to cover it, and a
/// pong held behind queued jobs would count their compute as network.
async fn evaluate<E>(
    work: Work,
    threads: usize,
    stream: &mut (impl Stream<Item = Result<Message, E>> + Unpin),
    inbox: &mut Inbox,
) -> anyhow::Result<(Work, seedling_core::Result<Vec<f32>>)>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let task = tokio::task::spawn_blocking(move || {
        let losses = evaluate_step_parallel(
            &work.replica,
            work.step,
            work.version,
            &work.tokens,
            &work.members,
            threads,
        );
        (work, losses)
    });
    Ok(reading(task, stream, inbox).await??)
}

/// Awaits `task` while reading the socket: frames that arrive meanwhile
/// queue in `inbox` (up to [`MAX_INBOX`]), and the WebSocket library
/// answers pings at once.
async fn reading<T, E>(
    task: impl Future<Output = T>,
    stream: &mut (impl Stream<Item = Result<Message, E>> + Unpin),
    inbox: &mut Inbox,
) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::pin!(task);
    loop {
        tokio::select! {
            done = &mut task => return Ok(done),
            frame = stream.next(), if !inbox.ended => match frame {
                None | Some(Ok(Message::Close(_))) => inbox.ended = true,
                Some(Ok(Message::Binary(b))) => {
                    if inbox.frames.len() >= MAX_INBOX {
                        anyhow::bail!("the server queued over {MAX_INBOX} frames while the worker was busy");
                    }
                    inbox.frames.push_back(b);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            },
        }
    }
}

/// How the native worker displays the lifecycle's events: log lines, and
/// a progress line at most every `every`.
struct Progress {
    every: Option<Duration>,
    last_print: Instant,
}

impl Progress {
    fn new(every: Option<Duration>) -> Self {
        Self {
            every,
            last_print: Instant::now(),
        }
    }

    fn show(&mut self, event: Option<Event>, life: &Volunteer, clock: &Clock) {
        match event {
            None | Some(Event::Hashed { .. }) => {}
            Some(Event::Joined { client }) => tracing::info!(client, "joined the run"),
            Some(Event::Rejected { reason, retry }) => tracing::warn!(retry, "server rejected us: {reason}"),
            Some(Event::Broken { error }) => tracing::warn!("connection dropped: {error}"),
            Some(Event::Evaluated { step, .. }) => {
                let Some(every) = self.every else { return };
                if self.last_print.elapsed() >= every {
                    let now = clock.now();
                    let c = life.counters();
                    println!(
                        "step {step}  members evaluated {}  members/s {:.1}  reconnects {}  up {:.0}s",
                        c.members,
                        c.rate(now),
                        c.reconnects,
                        now as f64 / 1000.0
                    );
                    self.last_print = Instant::now();
                }
            }
        }
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

    /// Runs the native worker's [`converse`] over a scripted server:
    /// returns every frame it sent (the Hello went in the URL).
    async fn native(life: &mut Volunteer, frames: &[Vec<u8>], threads: usize) -> Vec<Vec<u8>> {
        let mut sent: Vec<Message> = Vec::new();
        let mut stream = futures_util::stream::iter(
            frames
                .iter()
                .map(|f| Ok::<_, std::io::Error>(Message::Binary(f.clone().into()))),
        );
        let (clock, mut progress) = (Clock::new(), Progress::new(None));
        converse(
            life,
            &mut sent,
            &mut stream,
            threads,
            &clock,
            &mut progress,
            &mut None,
        )
        .await
        .unwrap();
        sent.into_iter().map(|m| m.into_data().to_vec()).collect()
    }

    /// The browser's replies over the same script: the lifecycle it builds
    /// and the per-frame code its WebSocket handler runs
    /// (`seedling_wasm::session::frame`), until it is asked to close.
    fn browser(frames: &[Vec<u8>]) -> (Volunteer, Vec<Vec<u8>>) {
        let mut tab = seedling_wasm::session::volunteer();
        let mut sent = Vec::new();
        let mut outcome = tab.opened_with_hello(0);
        let mut frames = frames.iter();
        loop {
            match outcome.action {
                Action::Send(bytes) => sent.push(bytes),
                Action::Nothing => {}
                other => {
                    assert!(matches!(other, Action::Close), "{other:?}");
                    return (tab, sent);
                }
            }
            let frame = frames.next().expect("the script ends with a rejection");
            outcome = seedling_wasm::session::frame(&mut tab, frame, 0);
        }
    }

    /// The same server frames get byte-identical replies from the native
    /// worker (jobs split across three threads) and from the browser (one
    /// thread): the coordinator cannot tell them apart but by the Hello.
    /// The script: a welcome and a snapshot, jobs and updates for two
    /// steps, a divergence (Resync, then a new snapshot) and a rejection.
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

        let mut frames = vec![
            server(&ServerMsg::Welcome {
                run: 3,
                client: 8,
                session: [5; 16],
                config,
                tokenizer,
            }),
            server(&want.snapshot()),
        ];
        let mut expected = vec![ClientMsg::Hash {
            step: 1,
            hash: want.hash(),
        }];
        // Jobs of 40 members (eight chunks, of 8 members down to 4) and 5,
        // one for a step the replica is not at, and an update, for two
        // steps.
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
                    behind: 0,
                    losses: members.iter().map(|&m| losses[m as usize]).collect(),
                });
                frames.push(server(&ServerMsg::Job {
                    step,
                    version: step,
                    floating: false,
                    job,
                    members,
                    tokens: batch(step),
                    deadline_ms: 1000,
                }));
            }
            frames.push(server(&ServerMsg::Job {
                step: step + 1,
                version: step + 1,
                floating: false,
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
        // A divergence: the server resyncs the replica, a job arriving
        // meanwhile is left for others, and the new snapshot is hashed
        // and worked on.
        frames.push(server(&ServerMsg::Resync));
        frames.push(server(&ServerMsg::Job {
            step: 3,
            version: 3,
            floating: false,
            job: 40,
            members: vec![0, 1],
            tokens: batch(3),
            deadline_ms: 1000,
        }));
        want.local_step(&batch(3)).unwrap();
        frames.push(server(&want.snapshot()));
        expected.push(ClientMsg::Hash {
            step: 4,
            hash: want.hash(),
        });
        let members = vec![7, 3, 30];
        frames.push(server(&ServerMsg::Job {
            step: 4,
            version: 4,
            floating: false,
            job: 41,
            members: members.clone(),
            tokens: batch(4),
            deadline_ms: 1000,
        }));
        expected.push(ClientMsg::Losses {
            step: 4,
            job: 41,
            behind: 0,
            losses: want.evaluate(&batch(4), &members).unwrap(),
        });
        // A rejection the volunteer may retry: both close, and answer no
        // frame still in flight.
        frames.push(server(&ServerMsg::Reject {
            reason: "send queue full".into(),
            retry: true,
        }));
        frames.push(frames[1].clone());

        let mut life = Volunteer::new(ClientKind::Native, 3);
        let hellos = (
            life.hello(0).unwrap(),
            seedling_wasm::session::volunteer().hello(0).unwrap(),
        );
        let ours = native(&mut life, &frames, 3).await;
        let (tab, theirs) = browser(&frames);
        // The replies are byte-identical...
        assert_eq!(ours, theirs);
        // ...and not vacuous: a hash per snapshot, then two jobs' losses
        // and a hash per step, each what the server's replica computes.
        let replies: Vec<ClientMsg> = ours.iter().map(|r| protocol::decode_client(r).unwrap()).collect();
        assert_eq!(replies, expected);
        for v in [&life, &tab] {
            let c = v.counters();
            assert_eq!(v.token(), Some([5; 16]));
            assert_eq!(
                (c.members, c.jobs, c.steps, c.snapshots, c.rejections),
                (2 * 45 + 3, 5, 2, 2, 1)
            );
            assert!(!v.stopped(), "a retriable rejection does not stop");
        }

        // The Hellos differ only in kind and threads.
        let native_hello = protocol::decode_client(&hellos.0).unwrap();
        let ClientMsg::Hello {
            version,
            kind: ClientKind::Native,
            threads: 3,
            speed,
            session: None,
            ..
        } = native_hello
        else {
            panic!("not the native Hello: {native_hello:?}");
        };
        let as_browser = ClientMsg::Hello {
            version,
            kind: ClientKind::Browser,
            threads: 1,
            speed,
            session: None,
            name: String::new(),
        };
        assert_eq!(protocol::encode(&as_browser, 64).unwrap(), hellos.1);
    }

    /// A scripted server that refuses every connection that carries a
    /// Hello in its URL; returns its URL and a count of the Hellos it saw.
    async fn refusing_server(retry: bool) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let hellos = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = hellos.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let mut query = String::new();
                let read_url = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, res| {
                    query = req.uri().query().unwrap_or("").to_owned();
                    Ok(res)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, read_url).await else {
                    continue;
                };
                if let Ok(Some(hello)) = seedling_core::protocol::handshake::hello_in_query(&query) {
                    assert!(matches!(
                        protocol::decode_client(&hello),
                        Ok(ClientMsg::Hello { .. })
                    ));
                    seen.fetch_add(1, Ordering::SeqCst);
                    let reject = server(&ServerMsg::Reject {
                        reason: "not today".into(),
                        retry,
                    });
                    let _ = ws.send(Message::Binary(reject.into())).await;
                    let _ = ws.close(None).await;
                }
            }
        });
        (url, hellos)
    }

    /// Only a rejection the server calls final stops [`run`]; any other
    /// ends the connection and the worker comes back.
    #[tokio::test]
    async fn only_a_final_rejection_stops_the_worker() {
        use std::sync::atomic::Ordering;
        let (url, hellos) = refusing_server(false).await;
        let mut opts = WorkerOptions::new(url);
        opts.progress = None;
        let err = run(opts, std::future::pending()).await.unwrap_err();
        assert_eq!(err.to_string(), "server rejected us: not today");
        assert_eq!(hellos.load(Ordering::SeqCst), 1);

        let (url, hellos) = refusing_server(true).await;
        let mut opts = WorkerOptions::new(url);
        opts.progress = None;
        opts.max_backoff = Duration::from_millis(100);
        let seen = hellos.clone();
        let again = async move {
            while seen.load(Ordering::SeqCst) < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let ran = tokio::time::timeout(Duration::from_secs(30), run(opts, again)).await;
        assert!(matches!(ran, Ok(Ok(()))), "{ran:?}");
        assert!(hellos.load(Ordering::SeqCst) >= 3);
    }

    /// The identity file keeps the token of the last Welcome, refuses to
    /// overwrite a file that holds something else, and a missing one is a
    /// new contributor.
    #[test]
    fn the_identity_file_keeps_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("identity");
        let mut f = IdentityFile::open(&path).unwrap();
        assert_eq!(f.token(), None);
        f.keep(None).unwrap();
        assert!(!path.exists());
        f.keep(Some([0xa5; 16])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", "a5".repeat(16))
        );
        assert_eq!(IdentityFile::open(&path).unwrap().token(), Some([0xa5; 16]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "only its owner reads it");
        }
        std::fs::write(&path, "not a token").unwrap();
        let e = IdentityFile::open(&path).unwrap_err();
        assert!(
            format!("{e:#}").contains("does not hold a session token"),
            "{e:#}"
        );
        assert_eq!(parse_token(&hex_token(&[1; 16])).unwrap(), [1; 16]);
    }

    /// Two workers given one identity file: the first holds it, the second
    /// gets `.2` (the same one every time it is second), and the file is
    /// free again once its holder is gone.
    #[test]
    fn a_second_worker_on_one_identity_file_becomes_a_contributor_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("identity");
        let mut first = IdentityFile::claim(&path).unwrap();
        first.keep(Some([1; 16])).unwrap();
        let mut second = IdentityFile::claim(&path).unwrap();
        assert_eq!(second.path, dir.path().join("sub").join("identity.2"));
        assert_eq!(second.token(), None, "a contributor of its own");
        second.keep(Some([2; 16])).unwrap();
        let third = IdentityFile::claim(&path).unwrap();
        assert!(third.path.ends_with("identity.3"));
        drop((first, third));
        let again = IdentityFile::claim(&path).unwrap();
        assert_eq!((again.path.clone(), again.token()), (path.clone(), Some([1; 16])));
        drop(second);
        let back = IdentityFile::claim(&path).unwrap();
        assert_eq!(back.token(), Some([2; 16]), "the second is the second again");
    }

    /// A protocol violation drops the connection without stopping.
    #[tokio::test]
    async fn garbage_drops_the_connection_and_the_worker_comes_back() {
        let mut life = Volunteer::new(ClientKind::Native, 1);
        let sent = native(&mut life, &[vec![0xff; 3], server(&ServerMsg::Resync)], 1).await;
        assert!(sent.is_empty(), "nothing: the Hello went in the URL");
        assert!(matches!(
            life.closed(10, 0.5).action,
            Action::Reconnect { after_ms: 75 }
        ));
    }

    /// A floating job starts once the frames at hand are handled, so the
    /// update that arrived behind it is applied first and the job is
    /// evaluated at the newer weights (and says so); a pinned job starts at
    /// once, at its own version.
    #[tokio::test]
    async fn a_floating_job_waits_for_the_updates_at_hand() {
        let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n";
        let tokenizer = Tokenizer::from_corpus(text).unwrap();
        let corpus = tokenizer.encode(text).unwrap();
        let mut config = RunConfig::rw256(tokenizer.len() as u32);
        config.es.population = 16;
        config.es.batch = 2;
        config.es.seq_len = 8;
        config.es.lag = 2;
        let batch = |step| step_batch(&corpus, config.seed, step, 2, 8).unwrap();
        let before = Replica::new(config).unwrap();
        let weights = vec![(0, 1.0), (1, -1.0)];
        let mut after = before.clone();
        after.apply(0, 0.02, &weights, &[]).unwrap();
        let members: Vec<u32> = (0..8).collect();
        for floating in [true, false] {
            let frames = vec![
                server(&ServerMsg::Welcome {
                    run: 3,
                    client: 8,
                    session: [5; 16],
                    config,
                    tokenizer: tokenizer.clone(),
                }),
                server(&before.snapshot()),
                server(&ServerMsg::Job {
                    step: 1,
                    version: 0,
                    floating,
                    job: 7,
                    members: members.clone(),
                    tokens: batch(1),
                    deadline_ms: 1000,
                }),
                server(&ServerMsg::Update {
                    step: 0,
                    lr: 0.02,
                    weights: weights.clone(),
                    tokens: Vec::new(),
                }),
            ];
            let mut life = Volunteer::new(ClientKind::Native, 2);
            let replies: Vec<ClientMsg> = native(&mut life, &frames, 2)
                .await
                .iter()
                .map(|r| protocol::decode_client(r).unwrap())
                .collect();
            let hash = |r: &Replica| ClientMsg::Hash {
                step: r.step,
                hash: r.hash(),
            };
            let at = u64::from(floating);
            let losses = ClientMsg::Losses {
                step: 1,
                job: 7,
                behind: 1 - at,
                losses: after.evaluate_at(1, at, &batch(1), &members).unwrap(),
            };
            let want = if floating {
                vec![hash(&before), hash(&after), losses]
            } else {
                vec![hash(&before), losses, hash(&after)]
            };
            assert_eq!(replies, want, "floating: {floating}");
        }
    }
}
