//! The HTTP side of the server: routes, the WebSocket handler and `run`.
//!
//! Shaped after axum's websocket and chat examples: [`app`] builds the
//! router apart from any socket, [`handle_socket`] splits a connection into
//! a send task and a receive task that end each other, and [`run`] serves
//! with graceful shutdown. Tests start the very same [`start`] on port 0.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use seedling_core::Replica;
use seedling_core::RunConfig;
use seedling_core::protocol::{MAX_CLIENT_MESSAGE, decode_client};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::checkpoint;
use crate::coordinator::{ClientId, Coordinator, Event, Outgoing, RunData, Settings, Status};

/// Frames queued per client before it counts as too slow and is dropped.
const OUTBOX: usize = 256;

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(20);

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
}

#[derive(Clone)]
struct AppState {
    events: mpsc::Sender<Event>,
    status: Arc<Mutex<Status>>,
    next_id: Arc<AtomicU64>,
}

/// A running server.
pub struct Server {
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
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

    /// Stops accepting, closes every connection, writes the final checkpoint
    /// and waits for all of it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.events.send(Event::Shutdown).await;
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

/// Builds the authoritative replica: resumed from the newest valid checkpoint
/// in the run dir when there is one (refusing a different config), else fresh.
pub fn initial_replica(
    config: &RunConfig,
    settings: &Settings,
    data: &RunData,
) -> anyhow::Result<(Replica, Vec<checkpoint::HistoryPoint>)> {
    if let Some(dir) = &settings.run_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating run dir {}", dir.display()))?;
        if let Some((path, ckpt)) = checkpoint::latest(dir)? {
            checkpoint::check_compatible(&ckpt, config)
                .with_context(|| format!("cannot resume from {}", path.display()))?;
            anyhow::ensure!(
                ckpt.tokenizer == data.tokenizer,
                "cannot resume from {}: its vocabulary differs from the data's",
                path.display()
            );
            let replica = Replica::from_snapshot(ckpt.config, ckpt.step, ckpt.params, ckpt.adam)?;
            tracing::info!(step = ckpt.step, hash = format!("{:016x}", replica.hash()), path = %path.display(), "resumed");
            return Ok((replica, ckpt.history));
        }
    }
    Ok((Replica::new(*config)?, Vec::new()))
}

/// Starts the coordinator and the HTTP server on `listener`.
pub async fn start(listener: TcpListener, opts: ServeOptions) -> anyhow::Result<Server> {
    anyhow::ensure!(
        opts.data.tokenizer.len() == opts.config.model.vocab as usize,
        "the config's vocab ({}) differs from the data's ({})",
        opts.config.model.vocab,
        opts.data.tokenizer.len()
    );
    let (replica, history) = initial_replica(&opts.config, &opts.settings, &opts.data)?;
    let coordinator = Coordinator::new(opts.settings.clone(), opts.data.clone(), replica, history);
    let status = coordinator.status();
    let (events, rx) = mpsc::channel(4096);
    let coordinator = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || coordinator.run(rx))?;
    let ticker = events.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            if ticker.send(Event::Tick).await.is_err() {
                break;
            }
        }
    });
    let state = AppState {
        events: events.clone(),
        status: status.clone(),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let addr = listener.local_addr()?;
    let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = app(state, opts.www.clone());
    let http = tokio::spawn(async move {
        axum::serve(listener, router)
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

/// Serves until `shutdown` resolves, then stops cleanly (final checkpoint).
pub async fn run(
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let server = start(listener, opts).await?;
    shutdown.await;
    server.shutdown().await
}

/// The router: `/ws` for volunteers, the JSON status, Prometheus metrics and
/// the volunteer page. Every response carries COOP/COEP so the page is
/// cross-origin isolated (shared memory for multi-threaded wasm) when the
/// browser supports it.
fn app(state: AppState, www: Option<PathBuf>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws_handler))
        .route("/api/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(state);
    if let Some(dir) = www {
        router = router.fallback_service(ServeDir::new(dir));
    }
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

async fn status_handler(State(state): State<AppState>) -> Json<Status> {
    Json(state.status.lock().unwrap().clone())
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let s = state.status.lock().unwrap().clone();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!(
            "# HELP seedling_{name} {help}\n# TYPE seedling_{name} {kind}\n"
        ));
        out.push_str(&format!("seedling_{name} {value}\n"));
    };
    metric("step", "gauge", "Step being evaluated.", s.step as f64);
    metric(
        "volunteers",
        "gauge",
        "Clients past the handshake.",
        s.volunteers.total as f64,
    );
    metric(
        "members_per_second",
        "gauge",
        "Member evaluations per second.",
        s.members_per_s,
    );
    metric(
        "steps_per_second",
        "gauge",
        "Steps closed per second.",
        s.steps_per_s,
    );
    metric(
        "divergences_total",
        "counter",
        "Replicas found diverged.",
        s.divergences as f64,
    );
    metric(
        "stale_results_total",
        "counter",
        "Stale results dropped.",
        s.stale_results as f64,
    );
    metric(
        "reissued_jobs_total",
        "counter",
        "Jobs reissued.",
        s.reissued_jobs as f64,
    );
    metric(
        "rejected_clients_total",
        "counter",
        "Clients rejected for bad input.",
        s.rejected_clients as f64,
    );
    if let Some(v) = s.val_loss {
        metric(
            "val_loss",
            "gauge",
            "Validation loss, nats per character.",
            v as f64,
        );
    }
    if let Some(h) = s.history.last() {
        metric(
            "train_loss",
            "gauge",
            "Mean population loss of the last step.",
            h.train_loss as f64,
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn ws_handler(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    // Frames up to 4x the cap reach the decoder, which rejects an oversized
    // message with a clear reason; larger ones are cut off by the socket.
    ws.max_message_size(4 * MAX_CLIENT_MESSAGE)
        .max_frame_size(4 * MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| handle_socket(socket, state))
}

/// One volunteer connection: decodes frames into events and drains the
/// client's outbox into the socket. Either side ending ends the other.
async fn handle_socket(socket: WebSocket, state: AppState) {
    let id: ClientId = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (out, mut outbox) = mpsc::channel(OUTBOX);
    if state
        .events
        .send(Event::Connected { client: id, out })
        .await
        .is_err()
    {
        return;
    }
    let (mut sink, mut stream) = socket.split();
    let mut send_task = tokio::spawn(async move {
        while let Some(item) = outbox.recv().await {
            let res = match item {
                Outgoing::Frame(bytes) => sink.send(Message::Binary(bytes)).await,
                Outgoing::Close(reason) => {
                    let frame = CloseFrame {
                        code: close_code::POLICY,
                        reason: reason.into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
            };
            if res.is_err() {
                break;
            }
        }
    });
    let events = state.events.clone();
    let mut recv_task = tokio::spawn(async move {
        while let Some(frame) = stream.next().await {
            let ev = match frame {
                Ok(Message::Binary(bytes)) => match decode_client(&bytes) {
                    Ok(msg) => Event::Message { client: id, msg },
                    Err(e) => Event::Invalid {
                        client: id,
                        reason: e.to_string(),
                    },
                },
                Ok(Message::Text(_)) => Event::Invalid {
                    client: id,
                    reason: "text frames are not part of the protocol".into(),
                },
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            };
            let invalid = matches!(ev, Event::Invalid { .. });
            if events.send(ev).await.is_err() || invalid {
                break;
            }
        }
    });
    let started = Instant::now();
    tokio::select! {
        _ = &mut send_task => recv_task.abort(),
        _ = &mut recv_task => {
            // Let queued frames (a Reject and its close) go out first.
            let _ = state.events.send(Event::Disconnected { client: id }).await;
            if tokio::time::timeout(Duration::from_secs(2), &mut send_task).await.is_err() {
                send_task.abort();
            }
        }
    }
    let _ = state.events.send(Event::Disconnected { client: id }).await;
    tracing::debug!(
        client = id,
        secs = started.elapsed().as_secs_f64(),
        "connection closed"
    );
}
