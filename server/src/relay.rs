//! `seedling relay`: an edge that serves the volunteer page and `/ws` to
//! volunteers and is one client of the coordinator, over NATS.
//!
//! The logic is [`hub::Hub`], free of I/O. This file is its thin driver:
//! the same WebSocket handler as the coordinator's (`app::volunteer_router`,
//! with its limits, heartbeats and hostile-frame handling), a NATS
//! connection publishing on the relay's up subject and reading its down
//! subject (frames in parts, heartbeats every second, the coordinator's
//! silence for [`nats::SILENCE`] taken as a lost connection, and a
//! presence every second, volunteers or not, that lists the relay at the
//! coordinator's `/api/relays`), and one task
//! that feeds both to the hub and carries out its [`Effect`]s.

pub mod hub;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures_util::StreamExt;
use seedling_core::protocol::relay::{self, Down, Joiner, Up};
use seedling_core::protocol::{MAX_SERVER_MESSAGE, SessionToken};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{self, error::TrySendError};

use self::hub::{Effect, Hub, HubSettings, HubStatus, VolReport};
use crate::app::{Gate, Limits, volunteer_router, without_nagle};
use crate::coordinator::types::{ClientId, Event, Input, Outgoing};
use crate::nats::{self, NatsOptions};

/// How often the hub checks deadlines and heartbeats.
const TICK: Duration = Duration::from_millis(50);

/// How often the relay's figures and reports are copied out for its HTTP
/// side and [`Relay::status`]: copying every volunteer's report on every
/// event would cost more than serving them.
pub const PUBLISH: Duration = Duration::from_millis(200);

/// Everything `seedling relay` needs.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// The NATS server, credentials and the run's subject prefix.
    pub nats: NatsOptions,
    /// This relay's id (one NATS subject token), unique among the run's relays.
    pub id: String,
    /// The volunteer page's directory, served at `/`.
    pub www: Option<PathBuf>,
    /// Limits on volunteer connections, as the coordinator's.
    pub limits: Limits,
    /// Chunk deadlines, replication, strikes, the public URL.
    pub hub: HubSettings,
}

/// The relay's figures and its volunteers' reports, for its HTTP side.
type Shared = Arc<Mutex<(HubStatus, BTreeMap<ClientId, VolReport>)>>;

/// A running relay.
pub struct Relay {
    /// The address volunteers connect to.
    pub addr: SocketAddr,
    shared: Shared,
    hub: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Relay {
    /// The relay's figures as last published (refreshed every [`PUBLISH`]).
    pub fn status(&self) -> HubStatus {
        self.shared.lock().unwrap().0.clone()
    }

    /// Every volunteer's last hash report, as last published (refreshed
    /// every [`PUBLISH`]).
    pub fn reports(&self) -> BTreeMap<ClientId, VolReport> {
        self.shared.lock().unwrap().1.clone()
    }

    /// Stops the relay at once, as a crash would: no goodbye upstream, the
    /// volunteers' sockets drop.
    pub fn kill(self) {
        self.hub.abort();
        self.http.abort();
    }
}

/// Connects to NATS and starts serving volunteers on `listener`.
pub async fn start(listener: TcpListener, opts: RelayOptions) -> anyhow::Result<Relay> {
    relay::check_relay_id(&opts.id)
        .map_err(|_| anyhow::anyhow!("--id {:?} must be letters, digits, '-' or '_'", opts.id))?;
    let client = nats::connect(&opts.nats, &format!("seedling relay {}", opts.id)).await?;
    let down = client
        .subscribe(relay::down_subject(&opts.nats.prefix, &opts.id))
        .await
        .context("subscribing to the relay's subject")?;
    let (events, rx) = mpsc::channel(4096);
    let gate = Gate::new(events, opts.limits.clone(), Arc::new(AtomicU64::new(1)));
    let shared: Shared = Arc::default();
    let driver = Driver {
        hub: Hub::new(
            opts.hub.clone(),
            u64::from_le_bytes(token()[..8].try_into().expect("8 bytes")),
        ),
        client,
        up_subject: relay::up_subject(&opts.nats.prefix, &opts.id),
        url: opts.hub.public_url.clone(),
        outboxes: HashMap::new(),
        joiner: Joiner::new(MAX_SERVER_MESSAGE),
        heard: Instant::now(),
        beat: Instant::now(),
        present: None,
        published: Instant::now(),
        shared: shared.clone(),
    };
    let hub = tokio::spawn(driver.run(rx, down));
    let router = Router::new()
        // Not /api/status: the page served here polls that for the run's
        // figures, which are the coordinator's, not the relay's.
        .route("/api/relay", get(status_handler))
        .route("/api/relay/clients", get(clients_handler))
        .with_state(shared.clone())
        .merge(volunteer_router(gate, opts.www.clone()));
    let addr = listener.local_addr()?;
    let http = tokio::spawn(async move {
        axum::serve(
            without_nagle(listener),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    tracing::info!(%addr, id = opts.id, "relay serving");
    Ok(Relay {
        addr,
        shared,
        hub,
        http,
    })
}

/// Serves until `shutdown` resolves or the coordinator refuses the relay
/// for good.
pub async fn run(
    listener: TcpListener,
    opts: RelayOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut relay = start(listener, opts).await?;
    tokio::select! {
        _ = shutdown => { relay.kill(); Ok(()) }
        r = &mut relay.hub => {
            relay.http.abort();
            r?
        }
    }
}

/// `/api/relay`: the relay's figures ([`HubStatus`]).
async fn status_handler(State(shared): State<Shared>) -> Response {
    Json(shared.lock().unwrap().0.clone()).into_response()
}

/// `/api/relay/clients`: each volunteer's last hash report, by its id here.
async fn clients_handler(State(shared): State<Shared>) -> Response {
    Json(shared.lock().unwrap().1.clone()).into_response()
}

/// The hub and its I/O.
struct Driver {
    hub: Hub,
    client: async_nats::Client,
    up_subject: String,
    url: String,
    outboxes: HashMap<ClientId, mpsc::Sender<Outgoing>>,
    /// Joins the coordinator's frames on the current connection.
    joiner: Joiner,
    /// When the coordinator was last heard from.
    heard: Instant,
    /// When the last heartbeat went out.
    beat: Instant,
    /// When the last [`Up::Presence`] went out (every [`nats::HEARTBEAT`],
    /// with or without an upstream connection, so the coordinator lists
    /// the relay while it lives).
    present: Option<Instant>,
    /// When the status was last published.
    published: Instant,
    shared: Shared,
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut down: async_nats::Subscriber,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let mut fx = Vec::new();
            let now = Instant::now();
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Event::Connected { client, out }) => {
                        self.outboxes.insert(client, out);
                        self.hub.connected(client, token());
                    }
                    Some(Event::Input(input)) => self.hub.input(input, now, &mut fx),
                    Some(Event::Admin { .. }) => {}
                    None => return Ok(()),
                },
                msg = down.next() => {
                    let Some(msg) = msg else { anyhow::bail!("the NATS subscription ended") };
                    self.on_coordinator(&msg.payload, now, &mut fx);
                }
                _ = tick.tick() => {
                    if self.present.is_none_or(|t| now.duration_since(t) >= nats::HEARTBEAT) {
                        self.present = Some(now);
                        let presence = Up::Presence { url: self.url.clone() };
                        nats::publish_control(&self.client, &self.up_subject, &presence).await;
                    }
                    if self.hub.up_open() {
                        if now.duration_since(self.heard) > nats::SILENCE {
                            self.hub.upstream_silent(now, &mut fx);
                        } else if now.duration_since(self.beat) >= nats::HEARTBEAT {
                            self.beat = now;
                            let conn = self.hub.conn();
                            nats::publish_control(&self.client, &self.up_subject, &Up::Heartbeat { conn }).await;
                        }
                    }
                    self.hub.tick(now, &mut fx);
                    if now.duration_since(self.published) >= PUBLISH {
                        self.published = now;
                        *self.shared.lock().unwrap() = (self.hub.status(), self.hub.reports());
                    }
                }
            }
            self.carry_out(fx).await?;
        }
    }

    /// One envelope from the coordinator.
    fn on_coordinator(&mut self, payload: &[u8], now: Instant, fx: &mut Vec<Effect>) {
        let (down, part) = match relay::open_down(payload) {
            Ok(x) => x,
            Err(e) => return tracing::warn!("bad envelope from the coordinator: {e}"),
        };
        if down.conn() != self.hub.conn() {
            return; // an earlier connection's
        }
        self.heard = now;
        match down {
            Down::Frame { index, count, .. } => match self.joiner.push(index, count, part) {
                Ok(Some(frame)) => self.hub.upstream_frame(self.hub.conn(), &frame, now, fx),
                Ok(None) => {}
                Err(e) => tracing::warn!("a frame from the coordinator lost a part: {e}"),
            },
            Down::Heartbeat { .. } => {}
            Down::Closed { conn, code, reason } => {
                tracing::warn!(code, reason, "the coordinator closed the relay's connection");
                self.hub.upstream_closed(conn, now, fx);
            }
        }
    }

    /// Carries out the hub's effects; a slow volunteer's full queue is fed
    /// back as [`Input::Slow`].
    async fn carry_out(&mut self, mut fx: Vec<Effect>) -> anyhow::Result<()> {
        while !fx.is_empty() {
            let mut slow = Vec::new();
            for effect in fx.drain(..) {
                match effect {
                    Effect::Send(id, item) => {
                        let full = self
                            .outboxes
                            .get(&id)
                            .is_some_and(|out| matches!(out.try_send(item), Err(TrySendError::Full(_))));
                        if full {
                            self.outboxes.remove(&id);
                            slow.push(id);
                        }
                    }
                    Effect::Gone(id) => {
                        self.outboxes.remove(&id);
                    }
                    Effect::Open(conn, hello) => {
                        self.joiner = Joiner::new(MAX_SERVER_MESSAGE);
                        self.heard = Instant::now();
                        self.beat = Instant::now();
                        let header = |index, count| Up::Frame { conn, index, count };
                        if let Err(e) =
                            nats::publish_frame(&self.client, &self.up_subject, &hello, header).await
                        {
                            tracing::warn!("NATS publish failed: {e}");
                        }
                    }
                    Effect::Up(frame) => {
                        let conn = self.hub.conn();
                        let header = |index, count| Up::Frame { conn, index, count };
                        if let Err(e) =
                            nats::publish_frame(&self.client, &self.up_subject, &frame, header).await
                        {
                            tracing::warn!("NATS publish failed: {e}");
                        }
                    }
                    Effect::Credit(earned) => {
                        let credit = Up::Credit {
                            conn: self.hub.conn(),
                            earned,
                        };
                        nats::publish_control(&self.client, &self.up_subject, &credit).await;
                    }
                    Effect::Capacity { threads, speed } => {
                        let capacity = Up::Capacity {
                            conn: self.hub.conn(),
                            threads,
                            speed,
                            url: self.url.clone(),
                        };
                        nats::publish_control(&self.client, &self.up_subject, &capacity).await;
                    }
                    Effect::Close => {
                        let conn = self.hub.conn();
                        nats::publish_control(&self.client, &self.up_subject, &Up::Close { conn }).await;
                    }
                    Effect::Stop(reason) => anyhow::bail!("the coordinator refused this relay: {reason}"),
                }
            }
            let now = Instant::now();
            for client in slow {
                self.hub.input(Input::Slow { client }, now, &mut fx);
            }
        }
        Ok(())
    }
}

/// A fresh session token for a volunteer (zeros if the OS has no
/// randomness: it still trains, it cannot resume its record).
fn token() -> SessionToken {
    let mut t = [0u8; 16];
    let _ = getrandom::fill(&mut t);
    t
}
