//! The volunteer lifecycle: connections, frames, jobs, rejections and
//! reconnections, as I/O verbs for a driver to perform.

use alloc::string::String;
use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::protocol::{self, ClientKind, ClientMsg, MAX_CLIENT_MESSAGE, SessionToken};
use crate::replica::Replica;

use super::backoff::Backoff;
use super::counters::Counters;
use super::hello::hello;
use super::session::{Reaction, Session, Work};

/// The one I/O verb a driver performs after telling the [`Volunteer`]
/// something.
#[derive(Debug)]
pub enum Action {
    /// Nothing to do; wait for the next frame.
    Nothing,
    /// Send these bytes as one binary frame on the current connection.
    Send(Vec<u8>),
    /// Evaluate this job's members (on as many threads as the driver likes)
    /// and hand the losses to [`Volunteer::evaluated`].
    Evaluate(Work),
    /// Close the current connection without acting on frames still in
    /// flight, then report it with [`Volunteer::closed`].
    Close,
    /// Wait this long, then open a new connection and report it with
    /// [`Volunteer::opened`].
    Reconnect {
        /// The pause, in milliseconds.
        after_ms: u64,
    },
    /// Stop for good: close the connection (if any) and do not reconnect.
    Stop {
        /// Why: the server's reason when it refused us for good.
        reason: String,
    },
}

/// Something the volunteer may want to see; drivers display it their way
/// (a log line, a notice to the page) and act on the [`Action`] alone.
#[derive(Debug)]
pub enum Event {
    /// The server accepted the Hello.
    Joined {
        /// This connection's id on the server (matches `/api/status`).
        client: u64,
    },
    /// The replica reported its weights hash, after a snapshot or an update.
    Hashed {
        /// The step the replica is now at.
        step: u64,
        /// Its weights hash.
        hash: u64,
    },
    /// A job's losses were sent.
    Evaluated {
        /// The job's step.
        step: u64,
        /// Its number of members.
        members: usize,
    },
    /// The server refused this volunteer and is closing the connection.
    Rejected {
        /// The server's reason.
        reason: String,
        /// Whether the volunteer reconnects (the server's verdict).
        retry: bool,
    },
    /// The server broke the protocol (or a job could not be evaluated): the
    /// connection is dropped and a new one made.
    Broken {
        /// What went wrong.
        error: Error,
    },
}

/// What a driver does after one call: perform `action`, show `event`.
#[derive(Debug)]
pub struct Outcome {
    /// The I/O verb to perform.
    pub action: Action,
    /// What to show the volunteer, if anything.
    pub event: Option<Event>,
}

impl Outcome {
    fn act(action: Action) -> Self {
        Self { action, event: None }
    }

    fn with(action: Action, event: Event) -> Self {
        Self {
            action,
            event: Some(event),
        }
    }
}

/// One volunteer across all its connections: the session token that keeps
/// its earned trust, the Hello, the current connection's [`Session`], the
/// reconnection [`Backoff`] and the [`Counters`] it displays.
///
/// Every input carries the time in milliseconds on the driver's clock (the
/// core has none), and [`Volunteer::closed`] a random fraction for the
/// backoff's jitter.
#[derive(Debug)]
pub struct Volunteer {
    /// The kind announced in the Hello.
    kind: ClientKind,
    /// Members evaluated in parallel, announced in the Hello.
    threads: u32,
    /// Whether the Hello carries the measured rate (a browser) or 0 (the
    /// native worker leaves the estimate to the server).
    announce_speed: bool,
    /// The token of the last Welcome, presented on every reconnection.
    token: Option<SessionToken>,
    /// The display name announced in the Hello (empty for none).
    name: String,
    /// The current connection's protocol state.
    session: Session,
    /// When to reconnect.
    backoff: Backoff,
    /// What this volunteer has done.
    counters: Counters,
    /// When the current connection opened.
    opened_ms: Option<u64>,
    /// Connections opened so far.
    connections: u64,
    /// True from the Welcome until the connection ends.
    joined: bool,
    /// Set once the volunteer stops for good, with the reason.
    stopped: Option<String>,
}

impl Volunteer {
    /// A volunteer of `kind` evaluating `threads` members in parallel, that
    /// has not connected yet; reconnections back off up to
    /// [`Backoff::DEFAULT_MAX_MS`].
    pub fn new(kind: ClientKind, threads: u32) -> Self {
        Self {
            kind,
            threads,
            announce_speed: false,
            token: None,
            name: String::new(),
            session: Session::new(),
            backoff: Backoff::default(),
            counters: Counters::default(),
            opened_ms: None,
            connections: 0,
            joined: false,
            stopped: None,
        }
    }

    /// Announces the measured members per second in the Hello, so the
    /// server can size the first job of a reconnection (a browser, whose
    /// speed the server cannot guess from a thread count).
    pub fn announce_speed(mut self) -> Self {
        self.announce_speed = true;
        self
    }

    /// Starts from the identity a driver kept from an earlier run (a
    /// browser's `localStorage`, the native worker's identity file): the
    /// session token presented in the first Hello, so trust and credit
    /// carry over, and the display name every Hello announces (cleaned as
    /// the server requires).
    pub fn identity(mut self, token: Option<SessionToken>, name: &str) -> Self {
        self.token = token;
        self.name = crate::protocol::clean_name(name);
        self
    }

    /// Backs off at most `max_ms` between reconnections.
    pub fn max_backoff(mut self, max_ms: u64) -> Self {
        self.backoff = Backoff::new(max_ms);
        self
    }

    /// The encoded Hello a connection opened at `now_ms` would send.
    pub fn hello(&self, now_ms: u64) -> Result<Vec<u8>> {
        let speed = if self.announce_speed {
            self.counters.rate(now_ms) as f32
        } else {
            0.0
        };
        hello(self.kind, self.threads, speed, self.token, &self.name)
    }

    /// The WebSocket URL to open at `now_ms`: `base` carrying the Hello
    /// ([`crate::protocol::handshake`]), so the server answers the upgrade
    /// with the Welcome, the snapshot and the first jobs, a round trip
    /// sooner than a Hello sent once the socket is open. Open it, then call
    /// [`Volunteer::opened_with_hello`].
    pub fn url(&self, base: &str, now_ms: u64) -> Result<String> {
        Ok(crate::protocol::handshake::hello_url(base, &self.hello(now_ms)?))
    }

    /// A new connection opened: it starts a new session (the server sends
    /// a fresh snapshot on every join, so nothing stale is carried over)
    /// with the Hello to send. For a transport with no URL (a relay's link
    /// to the coordinator).
    pub fn opened(&mut self, now_ms: u64) -> Outcome {
        self.open(now_ms, true)
    }

    /// A connection opened on a [`Volunteer::url`], whose Hello the server
    /// already has: the new session, with nothing to send.
    pub fn opened_with_hello(&mut self, now_ms: u64) -> Outcome {
        self.open(now_ms, false)
    }

    fn open(&mut self, now_ms: u64, send_hello: bool) -> Outcome {
        if let Some(reason) = &self.stopped {
            return Outcome::act(Action::Stop {
                reason: reason.clone(),
            });
        }
        if self.connections > 0 {
            self.counters.reconnects += 1;
        }
        self.connections += 1;
        self.session = Session::new();
        self.opened_ms = Some(now_ms);
        self.joined = false;
        if !send_hello {
            return Outcome::act(Action::Nothing);
        }
        match self.hello(now_ms) {
            Ok(bytes) => Outcome::act(Action::Send(bytes)),
            Err(error) => Outcome::with(Action::Close, Event::Broken { error }),
        }
    }

    /// One binary frame from the server.
    pub fn receive(&mut self, bytes: &[u8]) -> Outcome {
        let reaction = match self.session.receive(bytes) {
            Ok(reaction) => reaction,
            Err(error) => return Outcome::with(Action::Close, Event::Broken { error }),
        };
        match reaction {
            Reaction::Joined { client, session } => {
                self.token = Some(session);
                self.joined = true;
                Outcome::with(Action::Nothing, Event::Joined { client })
            }
            Reaction::Quiet => Outcome::act(Action::Nothing),
            Reaction::Evaluate(work) => Outcome::act(Action::Evaluate(work)),
            Reaction::Hashed {
                reply,
                step,
                hash,
                snapshot,
            } => {
                if snapshot {
                    self.counters.snapshots += 1;
                } else {
                    self.counters.steps += 1;
                }
                Outcome::with(Action::Send(reply), Event::Hashed { step, hash })
            }
            Reaction::Rejected { reason, retry } => {
                self.counters.rejections += 1;
                let action = if retry {
                    Action::Close
                } else {
                    self.stopped = Some(reason.clone());
                    Action::Stop {
                        reason: reason.clone(),
                    }
                };
                Outcome::with(action, Event::Rejected { reason, retry })
            }
        }
    }

    /// The losses of an [`Action::Evaluate`]'s job, evaluated at `now_ms`
    /// (an error if the evaluation failed: the job broke the protocol).
    pub fn evaluated(&mut self, work: Work, losses: Result<Vec<f32>>, now_ms: u64) -> Outcome {
        let members = work.members.len();
        match losses.and_then(|losses| work.reply(losses)) {
            Ok(reply) => {
                self.counters.answered(members, now_ms);
                let event = Event::Evaluated {
                    step: work.step,
                    members,
                };
                Outcome::with(Action::Send(reply), event)
            }
            Err(error) => Outcome::with(Action::Close, Event::Broken { error }),
        }
    }

    /// The connection ended at `now_ms` (refused, dropped, closed by either
    /// side, or it never opened): when to try again, drawn with `jitter`, a
    /// random fraction in `[0, 1]`; or stop, if the volunteer stopped.
    pub fn closed(&mut self, now_ms: u64, jitter: f64) -> Outcome {
        self.joined = false;
        let open_ms = self.opened_ms.take().map(|t| now_ms.saturating_sub(t));
        if let Some(reason) = &self.stopped {
            return Outcome::act(Action::Stop {
                reason: reason.clone(),
            });
        }
        let after_ms = self.backoff.pause(open_ms, jitter);
        Outcome::act(Action::Reconnect { after_ms })
    }

    /// The volunteer leaves for good: the encoded goodbye to send if a
    /// connection is open. Later calls answer [`Action::Stop`].
    pub fn leave(&mut self) -> Result<Vec<u8>> {
        self.stopped.get_or_insert_with(|| "stopped".into());
        protocol::encode(&ClientMsg::Bye, MAX_CLIENT_MESSAGE)
    }

    /// The session token of the last Welcome (or the one given to
    /// [`Volunteer::identity`] before any), for the driver to keep.
    pub fn token(&self) -> Option<SessionToken> {
        self.token
    }

    /// True from the Welcome until the connection ends.
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// True once the volunteer stopped for good.
    pub fn stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// What this volunteer has done.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The current connection's protocol state (the run, its vocabulary).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// `work` moved onto the newest weights held ([`Session::refresh`]).
    pub fn refresh(&self, work: Work) -> Work {
        self.session.refresh(work)
    }

    /// The replica, once a snapshot has arrived on this connection.
    pub fn replica(&self) -> Option<&Replica> {
        self.session.replica()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, RunConfig};
    use crate::protocol::{MAX_SERVER_MESSAGE, PROTOCOL_VERSION, ServerMsg, decode_client};
    use crate::tokenizer::Tokenizer;
    use alloc::vec;

    fn server(msg: &ServerMsg) -> Vec<u8> {
        protocol::encode(msg, MAX_SERVER_MESSAGE).unwrap()
    }

    fn client(action: &Action) -> ClientMsg {
        let Action::Send(bytes) = action else {
            panic!("not a Send: {action:?}");
        };
        decode_client(bytes).unwrap()
    }

    fn run() -> (Vec<u8>, Replica) {
        let tokenizer = Tokenizer::from_corpus("abc\nde").unwrap();
        let mut config = RunConfig::rw256(tokenizer.len() as u32);
        config.model = ModelConfig {
            vocab: tokenizer.len() as u32,
            hidden: 8,
            layers: 2,
            head: Default::default(),
        };
        config.es.population = 4;
        config.es.batch = 2;
        config.es.seq_len = 4;
        let welcome = server(&ServerMsg::Welcome {
            run: 7,
            client: 11,
            session: [9; 16],
            config,
            tokenizer,
        });
        (welcome, Replica::new(config).unwrap())
    }

    fn snapshot(r: &Replica) -> Vec<u8> {
        server(&r.snapshot())
    }

    fn reject(retry: bool) -> Vec<u8> {
        server(&ServerMsg::Reject {
            reason: "go away".into(),
            retry,
        })
    }

    #[test]
    fn a_volunteer_joins_works_reconnects_and_is_refused_for_good() {
        let (welcome, want) = run();
        let mut v = Volunteer::new(ClientKind::Native, 3).max_backoff(1_000);
        // The first Hello has no token.
        let hello = v.opened(0);
        assert_eq!(
            client(&hello.action),
            ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                kind: ClientKind::Native,
                threads: 3,
                speed: 0.0,
                session: None,
                name: String::new(),
            }
        );
        let joined = v.receive(&welcome);
        assert!(matches!(joined.action, Action::Nothing), "{joined:?}");
        assert!(
            matches!(joined.event, Some(Event::Joined { client: 11 })),
            "{joined:?}"
        );
        assert!(v.joined());
        assert_eq!(v.token(), Some([9; 16]));
        let hashed = v.receive(&snapshot(&want));
        assert_eq!(
            client(&hashed.action),
            ClientMsg::Hash {
                step: 0,
                hash: want.hash()
            }
        );
        assert!(matches!(hashed.event, Some(Event::Hashed { step: 0, hash }) if hash == want.hash()));
        // A job is handed out; its losses come back as the reply.
        let tokens = vec![1u16; 2 * 5];
        let job = server(&ServerMsg::Job {
            step: 0,
            version: 0,
            floating: false,
            job: 4,
            members: vec![1, 2],
            tokens: tokens.clone(),
            deadline_ms: 1000,
        });
        let Action::Evaluate(work) = v.receive(&job).action else {
            panic!("a job is evaluated");
        };
        let losses = work.evaluate();
        let answered = v.evaluated(work, losses, 500);
        assert_eq!(
            client(&answered.action),
            ClientMsg::Losses {
                step: 0,
                job: 4,
                behind: 0,
                losses: want.evaluate(&tokens, &[1, 2]).unwrap()
            }
        );
        assert!(matches!(
            answered.event,
            Some(Event::Evaluated { step: 0, members: 2 })
        ));
        let update = server(&ServerMsg::Update {
            step: 0,
            lr: 0.05,
            weights: vec![(0, 1.0), (1, -1.0)],
            tokens: Vec::new(),
        });
        assert!(matches!(v.receive(&update).action, Action::Send(_)));
        // Garbage drops the connection; the reconnection backs off.
        let broken = v.receive(&[0xff; 3]);
        assert!(matches!(broken.action, Action::Close), "{broken:?}");
        assert!(matches!(broken.event, Some(Event::Broken { .. })));
        let Action::Reconnect { after_ms } = v.closed(1_000, 0.0).action else {
            panic!("a dropped connection is retried");
        };
        assert_eq!(after_ms, 50, "half the first step at jitter 0");
        assert!(!v.joined());
        // The next Hello presents the token and starts a new session.
        let hello = v.opened(1_100);
        assert!(matches!(
            client(&hello.action),
            ClientMsg::Hello {
                session: Some([9, ..]),
                ..
            }
        ));
        assert!(v.replica().is_none(), "a new connection waits for its snapshot");
        v.receive(&welcome);
        // A rejection that may be retried closes and reconnects...
        let refused = v.receive(&reject(true));
        assert!(matches!(refused.action, Action::Close), "{refused:?}");
        assert!(matches!(refused.event, Some(Event::Rejected { retry: true, .. })));
        let Action::Reconnect { after_ms } = v.closed(1_200, 1.0).action else {
            panic!("a retriable rejection is retried");
        };
        assert_eq!(after_ms, 200);
        // ...a final one stops for good.
        v.opened(1_400);
        let refused = v.receive(&reject(false));
        assert!(
            matches!(&refused.action, Action::Stop { reason } if reason == "go away"),
            "{refused:?}"
        );
        assert!(matches!(
            refused.event,
            Some(Event::Rejected { retry: false, .. })
        ));
        assert!(v.stopped());
        assert!(matches!(v.closed(1_500, 0.5).action, Action::Stop { .. }));
        assert!(matches!(v.opened(1_600).action, Action::Stop { .. }));
        let c = v.counters();
        assert_eq!(
            (
                c.members,
                c.jobs,
                c.steps,
                c.snapshots,
                c.reconnects,
                c.rejections
            ),
            (2, 1, 1, 1, 2, 2)
        );
    }

    /// A connection opened on the URL carries the same Hello `opened`
    /// would send, and opening it sends nothing more: a second Hello would
    /// be refused.
    #[test]
    fn the_hello_travels_in_the_url_and_is_not_sent_again() {
        let (welcome, want) = run();
        let mut v = Volunteer::new(ClientKind::Native, 2).identity(Some([4; 16]), "ada");
        let url = v.url("ws://h:1/ws", 0).unwrap();
        let query = url.strip_prefix("ws://h:1/ws?").unwrap();
        let bytes = protocol::handshake::hello_in_query(query).unwrap().unwrap();
        assert_eq!(bytes, v.hello(0).unwrap());
        let opened = v.opened_with_hello(0);
        assert!(matches!(opened.action, Action::Nothing), "{opened:?}");
        assert!(matches!(
            v.receive(&welcome).event,
            Some(Event::Joined { client: 11 })
        ));
        assert!(matches!(v.receive(&snapshot(&want)).action, Action::Send(_)));
        // A reconnection counts as one, and a stopped volunteer stays stopped.
        v.closed(10, 0.0);
        v.opened_with_hello(20);
        assert_eq!(v.counters().reconnects, 1);
        v.leave().unwrap();
        assert!(matches!(v.opened_with_hello(30).action, Action::Stop { .. }));
    }

    #[test]
    fn a_healthy_connection_resets_the_backoff() {
        let mut v = Volunteer::new(ClientKind::Browser, 1);
        // Connections that never open climb the schedule.
        for want in [100, 200, 400] {
            assert!(matches!(v.closed(0, 1.0).action, Action::Reconnect { after_ms } if after_ms == want));
        }
        v.opened(1_000);
        let after = v.closed(1_000 + Backoff::HEALTHY_MS + 1, 1.0).action;
        assert!(matches!(after, Action::Reconnect { after_ms: 100 }), "{after:?}");
    }

    #[test]
    fn only_a_browser_announces_its_speed() {
        let (welcome, want) = run();
        for announce in [false, true] {
            let mut v = Volunteer::new(ClientKind::Browser, 1);
            if announce {
                v = v.announce_speed();
            }
            v.opened(0);
            v.receive(&welcome);
            v.receive(&snapshot(&want));
            let job = server(&ServerMsg::Job {
                step: 0,
                version: 0,
                floating: false,
                job: 1,
                members: vec![0, 1, 2, 3],
                tokens: vec![1u16; 2 * 5],
                deadline_ms: 1000,
            });
            let Action::Evaluate(work) = v.receive(&job).action else {
                panic!("a job is evaluated");
            };
            let losses = work.evaluate();
            v.evaluated(work, losses, 0);
            let ClientMsg::Hello { speed, .. } = decode_client(&v.hello(2_000).unwrap()).unwrap() else {
                panic!("not a Hello");
            };
            assert_eq!(speed, if announce { 2.0 } else { 0.0 });
        }
    }

    #[test]
    fn a_job_that_cannot_be_answered_drops_the_connection() {
        let (welcome, want) = run();
        let mut v = Volunteer::new(ClientKind::Native, 1);
        v.opened(0);
        v.receive(&welcome);
        v.receive(&snapshot(&want));
        let job = server(&ServerMsg::Job {
            step: 0,
            version: 0,
            floating: false,
            job: 1,
            members: vec![0, 1],
            tokens: vec![1u16; 3],
            deadline_ms: 1000,
        });
        for losses in [Err(Error::Wire("bad minibatch".into())), Ok(vec![1.0])] {
            let Action::Evaluate(work) = v.receive(&job).action else {
                panic!("a job is evaluated");
            };
            let o = v.evaluated(work, losses, 0);
            assert!(
                matches!((&o.action, &o.event), (Action::Close, Some(Event::Broken { .. }))),
                "{o:?}"
            );
        }
        assert_eq!(v.counters().members, 0);
    }

    #[test]
    fn leaving_says_goodbye_and_stops() {
        let mut v = Volunteer::new(ClientKind::Browser, 1);
        v.opened(0);
        assert_eq!(decode_client(&v.leave().unwrap()).unwrap(), ClientMsg::Bye);
        assert!(matches!(v.closed(10, 0.0).action, Action::Stop { .. }));
    }
}
