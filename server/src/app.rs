//! The HTTP side of the server: routes, the WebSocket handler and `run`.
//!
//! Shaped after axum's websocket and chat examples: [`app`] builds the
//! router apart from any socket, [`handle_socket`] splits a connection into
//! a send task and a receive task that end each other, and [`run`] serves
//! with graceful shutdown. Tests start the very same [`start`] on port 0.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use seedling_core::Replica;
use seedling_core::RunConfig;
use seedling_core::protocol::{ClientKind, ClientMsg, MAX_CLIENT_MESSAGE, decode_client};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::checkpoint::HistoryPoint;
use crate::coordinator::Coordinator;
use crate::coordinator::driver::{self, Driver};
use crate::coordinator::types::{
    AdminCommand, ClientId, Event, Input, Leaderboard, Outgoing, RunData, Settings, Status, close,
};
use crate::delivery::{self, Postbox};
use crate::metrics::{self, Metrics};
use crate::nats::{self, Bridge, NatsOptions, Relays};
use crate::runbook::{Cadence, Opened, RunBook};
use crate::ws::{self, CloseFrame, Message, Socket, Upgrade};

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(20);

/// How long a connection whose close frame went out waits for the peer's
/// close before dropping the socket (RFC 6455 section 7.1.1: the server
/// closes TCP after the client's close). Bounded, so a peer that never
/// answers cannot hold the connection.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Most points one `/api/history` answer holds: a longer stretch is thinned
/// to about this many, so an answer stays small however long the run.
pub const HISTORY_POINTS: usize = 1000;

/// Everything `seedling serve` needs to start.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The run to train (ignored for the shape check when resuming: it must match).
    pub config: RunConfig,
    /// Coordinator knobs.
    pub settings: Settings,
    /// Tokenized data.
    pub data: RunData,
    /// The volunteer page's directory, served at `/`.
    pub www: Option<PathBuf>,
    /// Connection limits and heartbeat.
    pub limits: Limits,
    /// Bearer token for the admin routes; `None` disables them.
    pub admin_token: Option<String>,
    /// Relays reach the coordinator over this NATS server (`serve --nats`);
    /// `None`, the default, is the one-process server.
    pub nats: Option<NatsOptions>,
}

/// What one server accepts from the open internet.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open volunteer connections in total.
    pub max_connections: usize,
    /// Open volunteer connections from one IP address.
    pub max_per_ip: usize,
    /// Sustained WebSocket handshakes per second, all clients together.
    pub handshakes_per_s: f64,
    /// Handshakes allowed in a burst above that rate.
    pub handshake_burst: f64,
    /// The server pings every connection this often: a heartbeat, and the
    /// round trip the scheduler sends work ahead to cover.
    pub ping_every: Duration,
    /// A connection silent for this long (no frame, no pong) is dropped.
    pub idle_timeout: Duration,
    /// Frames queued per client before it counts as too slow to read and is
    /// dropped (a snapshot is one frame).
    pub outbox: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_per_ip: 64,
            handshakes_per_s: 200.0,
            handshake_burst: 400.0,
            ping_every: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(45),
            outbox: 256,
        }
    }
}

/// Open connections per IP and a token bucket for handshakes.
#[derive(Debug)]
struct Admission {
    limits: Limits,
    state: Mutex<AdmissionState>,
}

#[derive(Debug)]
struct AdmissionState {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    tokens: f64,
    refilled: Instant,
}

/// Releases a connection's slot when the connection ends.
struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.admission.state.lock().unwrap();
        st.total -= 1;
        if let Some(n) = st.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    fn new(limits: Limits) -> Self {
        let tokens = limits.handshake_burst;
        Self {
            limits,
            state: Mutex::new(AdmissionState {
                total: 0,
                per_ip: HashMap::new(),
                tokens,
                refilled: Instant::now(),
            }),
        }
    }

    /// A slot for a new connection from `ip`, or why not.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, (StatusCode, &'static str)> {
        let l = &self.limits;
        let mut st = self.state.lock().unwrap();
        let now = Instant::now();
        let dt = now.saturating_duration_since(st.refilled).as_secs_f64();
        st.tokens = (st.tokens + dt * l.handshakes_per_s).min(l.handshake_burst);
        st.refilled = now;
        if st.tokens < 1.0 {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                "too many new connections; retry in a few seconds",
            ));
        }
        if st.total >= l.max_connections {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "the server is full; retry later"));
        }
        if st.per_ip.get(&ip).copied().unwrap_or(0) >= l.max_per_ip {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address",
            ));
        }
        st.tokens -= 1.0;
        st.total += 1;
        *st.per_ip.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            admission: self.clone(),
            ip,
        })
    }
}

/// What the `/ws` handler needs: where its events go, the id counter and
/// the admission limits. The coordinator's router and a relay's
/// (`crate::relay`) serve volunteers through the same handler, each with
/// its own gate.
#[derive(Clone)]
pub(crate) struct Gate {
    events: mpsc::Sender<Event>,
    next_id: Arc<AtomicU64>,
    admission: Arc<Admission>,
}

impl Gate {
    /// A gate feeding `events` (connections, their frames, their ends) as
    /// the coordinator's driver takes them, admitting by `limits`, with
    /// client ids from `next_id`.
    pub(crate) fn new(events: mpsc::Sender<Event>, limits: Limits, next_id: Arc<AtomicU64>) -> Self {
        Self {
            events,
            next_id,
            admission: Arc::new(Admission::new(limits)),
        }
    }
}

#[derive(Clone)]
struct AppState {
    events: mpsc::Sender<Event>,
    status: Arc<Mutex<Status>>,
    curve: Arc<Mutex<Vec<HistoryPoint>>>,
    metrics: Arc<Metrics>,
    gate: Gate,
    admin_token: Option<Arc<str>>,
    relays: Relays,
}

impl axum::extract::FromRef<AppState> for Gate {
    fn from_ref(state: &AppState) -> Gate {
        state.gate.clone()
    }
}

/// A running server.
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    status: Arc<Mutex<Status>>,
    events: mpsc::Sender<Event>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_http: tokio::sync::oneshot::Sender<()>,
    coordinator: std::thread::JoinHandle<()>,
}

impl Server {
    /// A copy of the current status.
    pub fn status(&self) -> Status {
        self.status.lock().unwrap().clone()
    }

    /// Resolves once the run is finished: its max steps done or its time
    /// budget spent.
    pub async fn finished(&self) {
        while !self.status().finished {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops accepting, closes every connection, writes the final checkpoint
    /// and waits for all of it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.events.send(Event::Input(Input::Shutdown)).await;
        let _ = self.stop_http.send(());
        let coordinator = self.coordinator;
        tokio::task::spawn_blocking(move || coordinator.join())
            .await?
            .map_err(|_| anyhow::anyhow!("coordinator thread panicked"))?;
        match tokio::time::timeout(Duration::from_secs(5), self.http).await {
            Ok(r) => r??,
            Err(_) => tracing::warn!("HTTP connections did not close in time"),
        }
        Ok(())
    }
}

/// Builds the authoritative replica and the run's books: resumed from the
/// newest valid checkpoint in the run dir when there is one (refusing one
/// that does not continue this run, see [`crate::runbook::check_resumable`]), else
/// fresh.
pub fn initial_replica(
    config: &RunConfig,
    settings: &Settings,
    data: &RunData,
) -> anyhow::Result<(Replica, RunBook)> {
    let cadence = Cadence {
        eval_every: settings.eval_every,
        checkpoint_every: settings.checkpoint_every,
    };
    let Opened { book, start, resumed } = RunBook::open(
        settings.run_dir.as_deref(),
        config,
        &data.tokenizer,
        &data.train,
        settings.unigram_bias,
        cadence,
        Instant::now(),
    )?;
    let book = book.with_budget(settings.time_budget_s);
    let replica = Replica::from_snapshot(*book.config(), start.step, start.params, start.adam)?
        .with_versions(start.versions)?;
    if let Some(path) = resumed {
        tracing::info!(step = replica.step, hash = format!("{:016x}", replica.hash()), path = %path.display(), "resumed");
    }
    Ok((replica, book))
}

/// Starts the coordinator and the HTTP server on `listener`.
pub async fn start(listener: TcpListener, opts: ServeOptions) -> anyhow::Result<Server> {
    anyhow::ensure!(
        opts.data.tokenizer.len() == opts.config.model.vocab as usize,
        "the config's vocab ({}) differs from the data's ({})",
        opts.config.model.vocab,
        opts.data.tokenizer.len()
    );
    let (replica, book) = initial_replica(&opts.config, &opts.settings, &opts.data)?;
    let run = driver::run_id(&replica);
    let coordinator = Coordinator::new(
        opts.settings.clone(),
        opts.data.clone(),
        replica,
        book,
        run,
        Instant::now(),
    );
    let (events, rx) = mpsc::channel(4096);
    let (batches, parcels) = mpsc::unbounded_channel();
    let spent = Arc::new(AtomicU64::new(0));
    tokio::spawn(delivery::courier(parcels, events.clone(), spent.clone()));
    let driver = Driver::new(coordinator, Postbox::with_courier(batches, spent), &opts.settings);
    let status = driver.status();
    let curve = driver.curve();
    let coordinator = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || driver.run(rx))?;
    let ticker = events.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            if ticker.send(Event::Input(Input::Tick)).await.is_err() {
                break;
            }
        }
    });
    let state = AppState {
        events: events.clone(),
        status: status.clone(),
        curve,
        metrics: Arc::new(Metrics::new(status.clone())),
        gate: Gate::new(events.clone(), opts.limits.clone(), Arc::new(AtomicU64::new(1))),
        admin_token: opts.admin_token.clone().filter(|t| !t.is_empty()).map(Arc::from),
        relays: Relays::default(),
    };
    if let Some(nats_opts) = &opts.nats {
        let client = nats::connect(nats_opts, "seedling coordinator").await?;
        let bridge = Bridge::new(
            client,
            &nats_opts.prefix,
            events.clone(),
            state.gate.next_id.clone(),
            state.relays.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = bridge.run().await {
                tracing::error!("the NATS bridge stopped: {e:#}");
            }
        });
        tracing::info!(
            url = nats_opts.url,
            prefix = nats_opts.prefix,
            "relays connect over NATS"
        );
    }
    let addr = listener.local_addr()?;
    let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = app(state, opts.www.clone());
    let http = tokio::spawn(async move {
        axum::serve(
            without_nagle(listener),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stopped.await;
        })
        .await
    });
    tracing::info!(%addr, "serving");
    Ok(Server {
        addr,
        status,
        events,
        http,
        stop_http,
        coordinator,
    })
}

/// How long a run that finished by its time budget keeps answering
/// `/api/status` before it stops: long enough for the last step's update to
/// reach every volunteer and their hashes to come back, and for whoever
/// watches the run to read its final figures.
pub const FINISHED_LINGER: Duration = Duration::from_secs(3);

/// Serves until `shutdown` resolves or, for a run with a time budget, until
/// the budget is spent (plus [`FINISHED_LINGER`]), then stops cleanly
/// (final checkpoint).
pub async fn run(
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let timed = opts.settings.time_budget_s.is_some();
    let server = start(listener, opts).await?;
    tokio::select! {
        _ = shutdown => {}
        _ = server.finished(), if timed => {
            let s = server.status();
            println!("The time budget is spent at step {}; stopping.", s.step);
            tokio::time::sleep(FINISHED_LINGER).await;
        }
    }
    server.shutdown().await
}

/// The router: `/ws` for volunteers, the JSON status (small, for polling),
/// the learning curve by increments, the clients' last reports, the
/// contributors' leaderboard, Prometheus metrics and the volunteer page.
/// Every response carries COOP/COEP so the page is
/// cross-origin isolated (shared memory for multi-threaded wasm) when the
/// browser supports it.
fn app(state: AppState, www: Option<PathBuf>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws_handler))
        .route("/api/status", get(status_handler))
        .route("/api/contributors", get(contributors_handler))
        .route("/api/history", get(history_handler))
        .route("/api/clients", get(clients_handler))
        .route("/api/relays", get(relays_handler))
        .route("/metrics", get(metrics_handler))
        .route("/admin/{command}", post(admin_handler))
        .with_state(state);
    if let Some(dir) = www {
        router = router.fallback_service(ServeDir::new(dir));
    }
    isolated(router)
}

/// `listener` with Nagle's algorithm off on every connection it accepts
/// (`TCP_NODELAY`), which axum leaves on.
///
/// Why: a step sends a volunteer several small frames back to back (the
/// update, then its next job). With Nagle's algorithm a small frame
/// written while an earlier one is unacknowledged waits for that
/// acknowledgement: on a real link a whole round trip, plus the peer's delayed ACK (40 ms on Linux, up to
/// 200 ms on Windows), added to the job that follows every update. Steps
/// in flight exist to hide the round trip; this would add it back. The
/// native worker and browsers already turn it off on their side. Even
/// the fleet emulator, whose proxy acknowledges on loopback, ran 9% more
/// steps a second at 150 ms with it off (docs/LEARNING.md, "Nagle's
/// algorithm was on at the server").
pub(crate) fn without_nagle(listener: TcpListener) -> axum::serve::TapIo<TcpListener, fn(&mut TcpStream)> {
    fn nodelay(tcp: &mut TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot turn Nagle's algorithm off on a connection: {e}");
        }
    }
    axum::serve::ListenerExt::tap_io(listener, nodelay)
}

/// `/ws` and the volunteer page alone, behind `gate`: what a relay serves.
pub(crate) fn volunteer_router(gate: Gate, www: Option<PathBuf>) -> Router {
    let mut router = Router::new().route("/ws", get(ws_handler)).with_state(gate);
    if let Some(dir) = www {
        router = router.fallback_service(ServeDir::new(dir));
    }
    isolated(router)
}

/// Every response with COOP/COEP, so the page is cross-origin isolated.
fn isolated(router: Router) -> Router {
    router
        .layer(SetResponseHeaderLayer::overriding(
            header::HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::HeaderName::from_static("cross-origin-embedder-policy"),
            HeaderValue::from_static("require-corp"),
        ))
}

/// The run's figures, without the curve or the clients: what every page
/// polls, so a few KB whatever the run's length or crowd.
async fn status_handler(State(state): State<AppState>) -> Response {
    // The history and the client map are not serialized (`serde(skip)`).
    let body = serde_json::to_vec(&*state.status.lock().unwrap());
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `GET /api/history?since=STEP`: the curve's points after `STEP` (all of
/// them without `since`), oldest first, thinned to about
/// [`HISTORY_POINTS`].
async fn history_handler(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let since = match query.get("since").map(|s| s.parse::<i64>()) {
        None => None,
        Some(Ok(step)) => Some(step),
        Some(Err(_)) => return (StatusCode::BAD_REQUEST, "since needs a step number").into_response(),
    };
    let points = {
        let curve = state.curve.lock().unwrap();
        let from = match since {
            Some(step) if step >= 0 => curve.partition_point(|h| h.step <= step as u64),
            _ => 0,
        };
        thin(&curve[from..], HISTORY_POINTS)
    };
    Json(points).into_response()
}

/// At most about `max` of `points`: all when they fit, else an even
/// selection of the training points and of the validation points (each
/// held to half of `max`), always with the newest point, in step order.
pub fn thin(points: &[HistoryPoint], max: usize) -> Vec<HistoryPoint> {
    if points.len() <= max {
        return points.to_vec();
    }
    let half = (max / 2).max(1);
    let vals = points.iter().filter(|h| h.val_loss.is_some()).count();
    let trains = points.len() - vals;
    let (val_every, train_every) = (vals.div_ceil(half).max(1), trains.div_ceil(half).max(1));
    let (mut v, mut t) = (vals, trains);
    let mut kept: Vec<HistoryPoint> = points
        .iter()
        .rev()
        .filter(|h| {
            // Counted from the newest point, so it is always kept.
            let (left, every) = if h.val_loss.is_some() {
                v -= 1;
                (vals - 1 - v, val_every)
            } else {
                t -= 1;
                (trains - 1 - t, train_every)
            };
            left % every == 0
        })
        .copied()
        .collect();
    kept.reverse();
    kept
}

/// Every reporting client's last hash report, by client id: for the
/// end-to-end tests and operators (it grows with the crowd, so the polled
/// status leaves it out).
async fn clients_handler(State(state): State<AppState>) -> Response {
    let clients = state.status.lock().unwrap().client_hashes.clone();
    Json(clients).into_response()
}

/// The live relays (`serve --nats`; heard from within `nats::PRESENCE`),
/// by relay id: each one's client id while it has a connection, public URL
/// (`seedling relay --public-url`, empty when it gave none) and its
/// volunteers' threads. The page picks a relay from here; empty for a
/// one-process server.
async fn relays_handler(State(state): State<AppState>) -> Response {
    let relays = state.relays.lock().unwrap().clone();
    Json(relays).into_response()
}

/// The contributors' leaderboard: the top 100 by verified members, each
/// with its public id, display name, members and banned flag, and how many
/// contributors there are in all. Names are untrusted text, which serde
/// escapes for JSON; whoever displays them must treat them as text.
async fn contributors_handler(State(state): State<AppState>) -> Json<Leaderboard> {
    let board = state.status.lock().unwrap().contributors.clone();
    Json(Leaderboard::clone(&board))
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

/// Operator commands: `POST /admin/pause|resume|checkpoint`, `POST
/// /admin/kick?client=ID`, `POST /admin/lr?value=LR` (from the next closed
/// step on), with `Authorization: Bearer TOKEN`. Refused with 403 when the
/// server has no token, 401 without the right one, 400 on a bad argument.
async fn admin_handler(
    State(state): State<AppState>,
    Path(command): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(token) = &state.admin_token else {
        return (
            StatusCode::FORBIDDEN,
            "admin routes are off: start the server with --admin-token",
        )
            .into_response();
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "missing or wrong admin token").into_response();
    }
    let command = match command.as_str() {
        "pause" => AdminCommand::Pause,
        "resume" => AdminCommand::Resume,
        "checkpoint" => AdminCommand::Checkpoint,
        "kick" => match query.get("client").and_then(|c| c.parse().ok()) {
            Some(id) => AdminCommand::Kick(id),
            None => return (StatusCode::BAD_REQUEST, "kick needs ?client=ID").into_response(),
        },
        "lr" => match query.get("value").and_then(|v| v.parse::<f32>().ok()) {
            Some(lr) if lr.is_finite() && lr > 0.0 => AdminCommand::SetLr(lr),
            _ => {
                return (StatusCode::BAD_REQUEST, "lr needs ?value=LR, a finite number > 0").into_response();
            }
        },
        _ => return (StatusCode::NOT_FOUND, "unknown admin command").into_response(),
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if state.events.send(Event::Admin { command, reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down").into_response();
    }
    match answer.await {
        Ok(Ok(msg)) => (StatusCode::OK, msg).into_response(),
        Ok(Err(msg)) => (StatusCode::CONFLICT, msg).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down").into_response(),
    }
}

/// Compares secrets without an early exit that would leak their prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Each connection's WebSocket read buffer. tungstenite zero-fills the
/// whole buffer before its first read, so its default (128 KiB) would be
/// resident for every connection; a volunteer's frames are small (a job's
/// losses), and a larger one grows the buffer as it arrives.
const READ_BUFFER: usize = 8 * 1024;

async fn ws_handler(
    upgrade: Upgrade,
    State(state): State<Gate>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let slot = match state.admission.admit(peer.ip()) {
        Ok(slot) => slot,
        Err((code, why)) => return (code, why).into_response(),
    };
    // Frames up to 4x the cap reach the decoder, which rejects an oversized
    // message with a clear reason; larger ones are cut off by the socket.
    let config = WebSocketConfig::default()
        .max_message_size(Some(4 * MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(4 * MAX_CLIENT_MESSAGE))
        .read_buffer_size(READ_BUFFER);
    upgrade
        .config(config)
        .on_upgrade(move |socket, hello| async move {
            handle_socket(socket, state, hello).await;
            drop(slot);
        })
}

/// What a received data frame means to the coordinator: a decoded message,
/// or the offence (with the close code that names it) that ends the
/// connection. `None` for control frames, which only count as a heartbeat.
pub(crate) fn frame_event(client: ClientId, frame: Message) -> Option<Input> {
    Some(match frame {
        Message::Binary(bytes) => match decode_client(&bytes) {
            // Relays are operators' machines and reach the coordinator over
            // NATS, authenticated; a stranger on /ws cannot claim to be one.
            Ok(ClientMsg::Hello {
                kind: ClientKind::Relay,
                ..
            }) => Input::Invalid {
                client,
                code: close::POLICY,
                reason: "relays connect over NATS, not /ws".into(),
            },
            Ok(msg) => Input::Message { client, msg },
            Err(e) => Input::Invalid {
                client,
                code: if bytes.len() > MAX_CLIENT_MESSAGE {
                    close::TOO_BIG
                } else {
                    close::INVALID
                },
                reason: e.to_string(),
            },
        },
        Message::Text(_) => Input::Invalid {
            client,
            code: close::UNSUPPORTED,
            reason: "text frames are not part of the protocol".into(),
        },
        Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => return None,
    })
}

/// The round trip a pong times: from the latest ping, if it answers that
/// one (a pong to an older ping, or an unsolicited one, times nothing).
fn round_trip(pinged: &(u64, Instant), payload: &[u8]) -> Option<Duration> {
    let nonce = u64::from_le_bytes(payload.try_into().ok()?);
    (nonce == pinged.0 && nonce > 0).then(|| pinged.1.elapsed())
}

/// One volunteer connection: decodes frames into events and drains the
/// client's outbox into the socket. Either side ending ends the other.
/// `hello`, the Hello the upgrade's URL carried, is taken as the first
/// frame, so the Welcome and the first jobs go out at once.
async fn handle_socket(socket: Socket, state: Gate, hello: Option<Vec<u8>>) {
    let id: ClientId = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (out, mut outbox) = mpsc::channel(state.admission.limits.outbox.max(1));
    if state
        .events
        .send(Event::Connected { client: id, out })
        .await
        .is_err()
    {
        return;
    }
    let mut offended = false;
    if let Some(ev) = hello.and_then(|bytes| frame_event(id, Message::Binary(bytes.into()))) {
        offended = matches!(ev, Input::Invalid { .. });
        if state.events.send(Event::Input(ev)).await.is_err() {
            return;
        }
    }
    let (mut sink, mut stream) = socket.split();
    let limits = state.admission.limits.clone();
    let last_seen = Arc::new(Mutex::new(Instant::now()));
    let seen = last_seen.clone();
    // The latest ping: its nonce and when it went out. Its pong times the
    // round trip, which the scheduler covers with work sent ahead.
    let pinged = Arc::new(Mutex::new((0u64, Instant::now())));
    let ping_out = pinged.clone();
    let events = state.events.clone();
    let mut send_task = tokio::spawn(async move {
        // The first tick is at once: the round trip is known early.
        let mut ping = tokio::time::interval(limits.ping_every);
        let mut nonce = 0u64;
        // A peer that stopped reading blocks a send once the socket buffers
        // are full; such a send gives up after the idle timeout, so the
        // connection (and its queued frames) cannot outlive it.
        let idle = limits.idle_timeout;
        let closing = |code: u16, reason: String| {
            Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: reason.into(),
            }))
        };
        loop {
            let msg = tokio::select! {
                item = outbox.recv() => match item {
                    Some(Outgoing::Frame(bytes)) => Message::Binary(bytes),
                    Some(Outgoing::Job(job)) => Message::Binary(job.join()),
                    Some(Outgoing::Close(code, reason)) => closing(code, reason),
                    None => break,
                },
                _ = ping.tick() => {
                    if seen.lock().unwrap().elapsed() > idle {
                        let _ = events.try_send(Event::Input(Input::Idle { client: id }));
                        closing(close::POLICY, "no heartbeat".into())
                    } else {
                        nonce += 1;
                        *ping_out.lock().unwrap() = (nonce, Instant::now());
                        Message::Ping(nonce.to_le_bytes().to_vec().into())
                    }
                }
            };
            let last = matches!(msg, Message::Close(_));
            if !ws::send(&mut sink, msg, idle).await || last {
                break;
            }
        }
    });
    let events = state.events.clone();
    let mut recv_task = tokio::spawn(async move {
        let mut told = None::<Duration>;
        // After an offence the connection is being closed: what the peer
        // still sends is read and dropped until its close, so the socket
        // is not shut with unread bytes (the kernel would answer them with
        // a reset, and the peer could lose the Reject and close frame).
        let mut closing = offended;
        while let Some(frame) = stream.next().await {
            *last_seen.lock().unwrap() = Instant::now();
            if closing && !matches!(frame, Ok(Message::Close(_)) | Err(_)) {
                continue;
            }
            let ev = match frame {
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(Message::Pong(payload)) => {
                    let Some(rtt) = round_trip(&pinged.lock().unwrap(), &payload) else {
                        continue;
                    };
                    // Only a change worth acting on reaches the coordinator.
                    if told.is_some_and(|t| rtt.abs_diff(t) * 10 < t) {
                        continue;
                    }
                    told = Some(rtt);
                    Input::RoundTrip { client: id, rtt }
                }
                Ok(frame) => match frame_event(id, frame) {
                    Some(ev) => ev,
                    None => continue,
                },
            };
            let invalid = matches!(ev, Input::Invalid { .. });
            if events.send(Event::Input(ev)).await.is_err() {
                break;
            }
            closing |= invalid;
        }
    });
    let started = Instant::now();
    tokio::select! {
        _ = &mut send_task => {
            // The close frame is out (or the peer stopped reading): wait a
            // moment for the peer's close before dropping the socket.
            if tokio::time::timeout(CLOSE_LINGER, &mut recv_task).await.is_err() {
                recv_task.abort();
            }
        }
        _ = &mut recv_task => {
            // Let queued frames (a Reject and its close) go out first.
            let _ = state.events.send(Event::Input(Input::Disconnected { client: id })).await;
            if tokio::time::timeout(Duration::from_secs(2), &mut send_task).await.is_err() {
                send_task.abort();
            }
        }
    }
    let _ = state
        .events
        .send(Event::Input(Input::Disconnected { client: id }))
        .await;
    tracing::debug!(
        client = id,
        secs = started.elapsed().as_secs_f64(),
        "connection closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use seedling_core::tokenizer::Tokenizer;

    /// Every connection the server (and a relay) accepts has Nagle's
    /// algorithm off, so a job written right after an update is not held
    /// for the update's acknowledgement.
    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_acknowledgements() {
        use axum::serve::Listener;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plain = TcpStream::connect(addr);
        let (accepted, _peer) = tokio::join!(listener.accept(), plain);
        assert!(
            !accepted.unwrap().0.nodelay().unwrap(),
            "a plain accept keeps Nagle on"
        );

        let mut listener = without_nagle(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = Listener::local_addr(&listener).unwrap();
        for _ in 0..3 {
            let peer = TcpStream::connect(addr);
            let ((stream, from), peer) = tokio::join!(listener.accept(), peer);
            assert_eq!(from, peer.unwrap().local_addr().unwrap());
            assert!(stream.nodelay().unwrap(), "Nagle's algorithm is off");
        }
    }

    fn point(step: u64, val: bool) -> HistoryPoint {
        HistoryPoint {
            step,
            elapsed_s: step as f64,
            tokens: step * 100,
            train_loss: 2.5,
            val_loss: val.then_some(2.4),
        }
    }

    #[test]
    fn the_polled_status_stays_small_with_a_long_run_and_a_crowd() {
        use crate::coordinator::types::ClientReport;
        let report = |i: u64| ClientReport {
            kind: "browser",
            step: i,
            hash: format!("{i:016x}"),
            members: i,
            trust: i,
        };
        let status = Status {
            history: (1..=crate::checkpoint::HISTORY_CAP as u64)
                .map(|s| point(s, s % 10 == 0))
                .collect(),
            client_hashes: (0..10_000).map(|i| (i, report(i))).collect(),
            data: "x".repeat(200),
            hash: format!("{:016x}", u64::MAX),
            val_loss: Some(1.0),
            train_loss: Some(1.0),
            history_step: Some(u64::MAX),
            ..Status::default()
        };
        let json = serde_json::to_vec(&status).unwrap();
        assert!(json.len() < 4096, "{} bytes", json.len());
    }

    #[test]
    fn thinning_keeps_everything_that_fits_and_the_newest_point() {
        let few: Vec<_> = (1..=10).map(|s| point(s, s % 3 == 0)).collect();
        assert_eq!(thin(&few, 10), few);
        let many: Vec<_> = (1..=10_000).map(|s| point(s, s % 7 == 0)).collect();
        let kept = thin(&many, 1000);
        assert!((500..=1000).contains(&kept.len()), "{}", kept.len());
        assert_eq!(kept.last(), many.last());
        assert!(kept.windows(2).all(|p| p[0].step < p[1].step));
        let vals = kept.iter().filter(|p| p.val_loss.is_some()).count();
        assert!((250..=500).contains(&vals), "{vals} validation points");
    }

    #[test]
    fn a_fresh_run_starts_from_the_unigram_bias_when_asked() {
        let text = "aaaaaaab bbc\n".repeat(50);
        let tokenizer = Tokenizer::from_corpus(&text).unwrap();
        let train = tokenizer.encode(&text).unwrap();
        let mut config = RunConfig::rw256(tokenizer.len() as u32);
        config.model.hidden = 8;
        config.model.layers = 1;
        let data = RunData {
            tokenizer,
            train: Arc::new(train),
            val_windows: Vec::new(),
            val_seq_len: 8,
            name: "test".into(),
        };
        let plain = Replica::new(config).unwrap();
        let off = Settings::default();
        assert_eq!(
            initial_replica(&config, &off, &data).unwrap().0.params,
            plain.params
        );
        let on = Settings {
            unigram_bias: true,
            ..Settings::default()
        };
        let (r, book) = initial_replica(&config, &on, &data).unwrap();
        let out = plain.layout.b_out().range();
        let bias = crate::data::unigram_output_bias(&data.train, config.model.vocab as usize);
        assert_eq!(r.params[out.clone()], bias[..]);
        // 'a' is the commonest character, so its bias is the largest.
        let a = data.tokenizer.encode("a").unwrap()[0] as usize;
        assert!(bias.iter().all(|&b| b <= bias[a]));
        // Everything else is the seed's usual start.
        assert_eq!(r.params[..out.start], plain.params[..out.start]);
        assert_eq!(r.params[out.end..], plain.params[out.end..]);
        assert_eq!((r.step, book.history().len()), (0, 0));
    }
}
