//! The coordinator's side of NATS (`seedling serve --nats URL`), and the
//! connection both sides make.
//!
//! [`bridge`] is a thin driver like the WebSocket handler in `app.rs`: it
//! turns each relay's connection into a client of the coordinator, with a
//! `ClientId` from the same counter, the same [`Event::Connected`] and
//! [`Input`]s, and an outbox whose sink is a NATS publish instead of a
//! socket. The coordinator, its delivery courier and its scheduler do not
//! know a relay from a volunteer, except by the kind in its Hello and the
//! [`Input::Capacity`] only this bridge sends.
//!
//! NATS has no per-publisher disconnect signal, so relays heartbeat every
//! [`HEARTBEAT`] and the bridge counts [`SILENCE`] without a word from a
//! relay as its disconnection (its jobs are reissued). Every message names
//! the relay's connection number; a message of a connection the bridge does
//! not know is answered with [`Down::Closed`], so a relay cut off (by a
//! restart of the NATS server, say) reconnects with a fresh Hello.
//!
//! Apart from connections, every relay says [`Up::Presence`] every second
//! while it lives, with or without volunteers: `/api/relays` lists the
//! relays heard from within [`PRESENCE`], so a page finds a fresh relay
//! and stops being sent to a dead one within seconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use seedling_core::protocol::relay::{self, Down, Joiner, Up};
use seedling_core::protocol::{MAX_CLIENT_MESSAGE, decode_client};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::coordinator::types::{ClientId, Event, Input, Outgoing, close};

/// How often a relay says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Silence after which a relay (or, seen from a relay, the coordinator)
/// counts as gone.
pub const SILENCE: Duration = Duration::from_secs(5);

/// Silence after which a relay is no longer listed at `/api/relays`:
/// three missed [`Up::Presence`] beats. Shorter than [`SILENCE`], which
/// reissues the relay's jobs: a page that misses a relay loses nothing, a
/// page sent to a dead relay loses a reconnection.
pub const PRESENCE: Duration = Duration::from_secs(3);

/// Frames queued for one relay before the coordinator counts it as too slow
/// (a relay takes a step's update and a few jobs per step, like one
/// volunteer, so a volunteer's outbox size would do; this leaves room for
/// bursts of reissued jobs).
const RELAY_OUTBOX: usize = 4096;

/// Room left in a NATS message for the envelope's header.
const HEADER_ROOM: usize = 64;

/// How a process authenticates to the NATS server. Taken from the
/// environment ([`Credentials::from_env`]), never from the command line,
/// which other users and test logs can read.
#[derive(Clone, Debug, Default)]
pub enum Credentials {
    /// None (a server without authorization).
    #[default]
    None,
    /// A user and password (`SEEDLING_NATS_USER`, `SEEDLING_NATS_PASSWORD`).
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token (`SEEDLING_NATS_TOKEN`).
    Token(String),
}

impl Credentials {
    /// The credentials in the environment: `SEEDLING_NATS_USER` and
    /// `SEEDLING_NATS_PASSWORD`, or `SEEDLING_NATS_TOKEN`, or the same
    /// read from the files named by `SEEDLING_NATS_PASSWORD_FILE` /
    /// `SEEDLING_NATS_TOKEN_FILE` (trailing whitespace trimmed); none if
    /// none is set.
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str| -> anyhow::Result<Option<String>> {
            if let Ok(v) = std::env::var(name) {
                return Ok(Some(v));
            }
            match std::env::var(format!("{name}_FILE")) {
                Ok(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {name}_FILE {path}"))?;
                    Ok(Some(text.trim_end().to_string()))
                }
                Err(_) => Ok(None),
            }
        };
        Ok(
            match (
                std::env::var("SEEDLING_NATS_USER").ok(),
                var("SEEDLING_NATS_PASSWORD")?,
                var("SEEDLING_NATS_TOKEN")?,
            ) {
                (Some(user), Some(password), _) => Self::UserPassword { user, password },
                (Some(_), None, _) => {
                    anyhow::bail!("SEEDLING_NATS_USER is set without SEEDLING_NATS_PASSWORD")
                }
                (None, _, Some(token)) => Self::Token(token),
                (None, _, None) => Self::None,
            },
        )
    }
}

/// Where and how to reach NATS.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// The server's URL (`nats://host:4222`).
    pub url: String,
    /// How to authenticate.
    pub credentials: Credentials,
    /// The run's subject prefix: relays and a coordinator meet on
    /// `seedling.<prefix>.…` (so one NATS server can carry several runs).
    pub prefix: String,
}

/// Connects to NATS as `name`, reconnecting on its own after a loss (every
/// 100 ms to 1 s, for ever: a restarted server is found again within a
/// second).
pub async fn connect(opts: &NatsOptions, name: &str) -> anyhow::Result<async_nats::Client> {
    let mut connect = async_nats::ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 100).min(1000)));
    connect = match &opts.credentials {
        Credentials::None => connect,
        Credentials::UserPassword { user, password } => {
            connect.user_and_password(user.clone(), password.clone())
        }
        Credentials::Token(token) => connect.token(token.clone()),
    };
    connect
        .connect(opts.url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", opts.url))
}

/// The largest frame part one NATS message carries on this server (its
/// `max_payload`, 1 MiB by default, less the envelope's header).
pub fn part_size(client: &async_nats::Client) -> usize {
    client
        .server_info()
        .max_payload
        .saturating_sub(HEADER_ROOM)
        .max(1024)
}

/// Publishes one frame as envelopes of at most [`part_size`] bytes; `header`
/// builds each part's header from its index and count.
pub async fn publish_frame<H: Serialize>(
    client: &async_nats::Client,
    subject: &str,
    frame: &[u8],
    header: impl Fn(u32, u32) -> H,
) -> anyhow::Result<()> {
    for (index, count, part) in relay::parts(frame, part_size(client)) {
        let bytes = relay::envelope(&header(index, count), part)?;
        client.publish(subject.to_string(), Bytes::from(bytes)).await?;
    }
    Ok(())
}

/// Publishes one header-only envelope.
pub async fn publish_control<H: Serialize>(client: &async_nats::Client, subject: &str, header: &H) {
    match relay::envelope(header, &[]) {
        Ok(bytes) => {
            if let Err(e) = client.publish(subject.to_string(), Bytes::from(bytes)).await {
                tracing::debug!("NATS publish on {subject}: {e}");
            }
        }
        Err(e) => tracing::error!("cannot encode a relay control message: {e}"),
    }
}

/// A live relay, as `/api/relays` lists it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RelayInfo {
    /// Its client id on the coordinator while it has a connection (that
    /// is, while it has volunteers); none otherwise.
    pub client: Option<ClientId>,
    /// Where volunteers reach its page (`seedling relay --public-url`),
    /// empty when it announced none.
    pub url: String,
    /// Its volunteers' threads, summed (0 without a connection).
    pub threads: u32,
    /// When the relay was last heard from.
    #[serde(skip)]
    seen: Option<Instant>,
}

/// The live relays (heard from within [`PRESENCE`]), by relay id (shared
/// with `/api/relays`).
pub type Relays = Arc<Mutex<BTreeMap<String, RelayInfo>>>;

/// One relay connection the bridge knows.
struct Link {
    client: ClientId,
    conn: u64,
    joiner: Joiner,
    seen: Instant,
}

/// The coordinator's NATS side: what it shares with the HTTP side.
pub struct Bridge {
    client: async_nats::Client,
    prefix: String,
    events: mpsc::Sender<Event>,
    next_id: Arc<AtomicU64>,
    relays: Relays,
    links: HashMap<String, Link>,
    /// The newest connection number seen per relay, so a message of an
    /// older one is answered with a close rather than opening a client.
    newest: HashMap<String, u64>,
}

impl Bridge {
    /// A bridge feeding `events`, drawing client ids from `next_id` (the
    /// WebSocket handler's counter, so ids stay unique).
    pub fn new(
        client: async_nats::Client,
        prefix: &str,
        events: mpsc::Sender<Event>,
        next_id: Arc<AtomicU64>,
        relays: Relays,
    ) -> Self {
        Self {
            client,
            prefix: prefix.to_string(),
            events,
            next_id,
            relays,
            links: HashMap::new(),
            newest: HashMap::new(),
        }
    }

    /// Runs until the coordinator stops taking events.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut sub = self
            .client
            .subscribe(relay::up_wildcard(&self.prefix))
            .await
            .context("subscribing to the relays' subject")?;
        let (gone_tx, mut gone) = mpsc::unbounded_channel::<(String, u64)>();
        let mut check = tokio::time::interval(HEARTBEAT);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { anyhow::bail!("the NATS subscription ended") };
                    let Some(relay) = relay::relay_of(&self.prefix, msg.subject.as_str()) else { continue };
                    let relay = relay.to_string();
                    if !self.on_message(relay, &msg.payload, &gone_tx).await {
                        return Ok(());
                    }
                }
                _ = check.tick() => {
                    let now = Instant::now();
                    self.relays
                        .lock()
                        .unwrap()
                        .retain(|_, r| r.seen.is_some_and(|t| now.duration_since(t) <= PRESENCE));
                    let silent: Vec<String> = self
                        .links
                        .iter()
                        .filter(|(_, l)| now.duration_since(l.seen) > SILENCE)
                        .map(|(r, _)| r.clone())
                        .collect();
                    for relay in silent {
                        tracing::warn!(relay, "relay silent for {SILENCE:?}; dropping it");
                        if let Some(link) = self.forget(&relay) {
                            let idle = Input::Idle { client: link.client };
                            if self.events.send(Event::Input(idle)).await.is_err() {
                                return Ok(());
                            }
                            self.closed(&relay, link.conn, close::POLICY, "no heartbeat").await;
                        }
                    }
                }
                Some((relay, conn)) = gone.recv() => {
                    // The coordinator is done with this connection (its
                    // outbox closed): forget it; the relay's next message
                    // is answered with a close.
                    if self.links.get(&relay).is_some_and(|l| l.conn == conn) {
                        self.forget(&relay);
                    }
                }
            }
        }
    }

    /// Handles one envelope from `relay`; false once the coordinator is gone.
    async fn on_message(
        &mut self,
        relay: String,
        payload: &[u8],
        gone: &mpsc::UnboundedSender<(String, u64)>,
    ) -> bool {
        let (up, part) = match relay::open_up(payload) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(relay, "bad relay envelope: {e}");
                return true;
            }
        };
        {
            let mut relays = self.relays.lock().unwrap();
            let info = relays.entry(relay.clone()).or_default();
            info.seen = Some(Instant::now());
            if let Up::Presence { url } = &up {
                // Only a listing: it belongs to no connection.
                info.url.clone_from(url);
                return true;
            }
        }
        let conn = up.conn();
        let live = self.links.get(&relay).map(|l| l.conn);
        if live.is_some_and(|c| c < conn) {
            // The relay reconnected before its old connection timed out.
            let link = self.forget(&relay).expect("live");
            let ev = Event::Input(Input::Disconnected { client: link.client });
            if self.events.send(ev).await.is_err() {
                return false;
            }
        }
        let known = self.links.get(&relay).is_some_and(|l| l.conn == conn);
        if !known {
            let newer = self.newest.get(&relay).is_none_or(|&n| n < conn);
            match up {
                Up::Frame { index: 0, .. } if newer => {
                    if !self.open(&relay, conn, gone).await {
                        return false;
                    }
                }
                Up::Close { .. } => return true,
                _ => {
                    self.closed(&relay, conn, close::GOING_AWAY, "unknown connection")
                        .await;
                    return true;
                }
            }
        }
        let link = self.links.get_mut(&relay).expect("known or opened");
        link.seen = Instant::now();
        let client = link.client;
        let input = match up {
            Up::Frame { index, count, .. } => match link.joiner.push(index, count, part) {
                Ok(None) => return true,
                Ok(Some(frame)) => match decode_client(&frame) {
                    Ok(msg) => Input::Message { client, msg },
                    Err(e) => Input::Invalid {
                        client,
                        code: if frame.len() > MAX_CLIENT_MESSAGE {
                            close::TOO_BIG
                        } else {
                            close::INVALID
                        },
                        reason: e.to_string(),
                    },
                },
                Err(e) => Input::Invalid {
                    client,
                    code: close::INVALID,
                    reason: e.to_string(),
                },
            },
            Up::Capacity {
                threads, speed, url, ..
            } => {
                if let Some(info) = self.relays.lock().unwrap().get_mut(&relay) {
                    info.url = url;
                    info.threads = threads;
                }
                Input::Capacity {
                    client,
                    threads,
                    speed,
                }
            }
            Up::Credit { earned, .. } => Input::Credit { client, earned },
            Up::Heartbeat { conn } => {
                publish_control(
                    &self.client,
                    &relay::down_subject(&self.prefix, &relay),
                    &Down::Heartbeat { conn },
                )
                .await;
                return true;
            }
            Up::Close { .. } => {
                self.forget(&relay);
                Input::Disconnected { client }
            }
            Up::Presence { .. } => return true, // handled above
        };
        self.events.send(Event::Input(input)).await.is_ok()
    }

    /// Opens a client for `relay`'s connection `conn`: a fresh id, an
    /// outbox drained into NATS, and the coordinator's Connected event.
    async fn open(&mut self, relay: &str, conn: u64, gone: &mpsc::UnboundedSender<(String, u64)>) -> bool {
        let client = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (out, outbox) = mpsc::channel(RELAY_OUTBOX);
        tokio::spawn(drain(
            self.client.clone(),
            relay::down_subject(&self.prefix, relay),
            conn,
            outbox,
            gone.clone(),
            relay.to_string(),
        ));
        self.links.insert(
            relay.to_string(),
            Link {
                client,
                conn,
                joiner: Joiner::new(MAX_CLIENT_MESSAGE + 1),
                seen: Instant::now(),
            },
        );
        self.newest.insert(relay.to_string(), conn);
        {
            let mut relays = self.relays.lock().unwrap();
            let info = relays.entry(relay.to_string()).or_default();
            info.client = Some(client);
            info.seen = Some(Instant::now());
        }
        tracing::info!(relay, conn, client, "relay connected");
        self.events.send(Event::Connected { client, out }).await.is_ok()
    }

    /// Drops `relay`'s connection. The relay stays listed while it is
    /// heard from ([`PRESENCE`]).
    fn forget(&mut self, relay: &str) -> Option<Link> {
        if let Some(info) = self.relays.lock().unwrap().get_mut(relay) {
            info.client = None;
            info.threads = 0;
        }
        self.links.remove(relay)
    }

    async fn closed(&self, relay: &str, conn: u64, code: u16, reason: &str) {
        let closed = Down::Closed {
            conn,
            code,
            reason: reason.into(),
        };
        publish_control(&self.client, &relay::down_subject(&self.prefix, relay), &closed).await;
    }
}

/// A relay connection's outbox, published on its subject: frames in parts,
/// a close as [`Down::Closed`]. Ends when the coordinator drops the queue
/// or closes the connection, and says so on `gone`.
async fn drain(
    client: async_nats::Client,
    subject: String,
    conn: u64,
    mut outbox: mpsc::Receiver<Outgoing>,
    gone: mpsc::UnboundedSender<(String, u64)>,
    relay: String,
) {
    while let Some(item) = outbox.recv().await {
        let frame = match item {
            Outgoing::Frame(bytes) => bytes,
            Outgoing::Job(job) => job.join(),
            Outgoing::Close(code, reason) => {
                publish_control(&client, &subject, &Down::Closed { conn, code, reason }).await;
                break;
            }
        };
        let header = |index, count| Down::Frame { conn, index, count };
        if let Err(e) = publish_frame(&client, &subject, &frame, header).await {
            tracing::warn!(relay, "NATS publish failed: {e}");
        }
    }
    let _ = gone.send((relay, conn));
}
