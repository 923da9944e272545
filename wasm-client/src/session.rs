//! One volunteer connection's protocol state, free of JavaScript.
//!
//! This is the browser counterpart of the session loop in the server's
//! `worker.rs` (the native volunteer), reacting to the same messages in the
//! same way, so the coordinator cannot tell the two apart except by the
//! `kind` in the Hello. It is kept apart from the WebSocket plumbing in
//! [`crate::net`] for the reason mini-redis keeps framing apart from I/O:
//! it compiles and is unit-tested natively, and the browser tests drive it
//! through the exported handle with plain byte messages.

use seedling_core::generate::sample_text;
use seedling_core::noise::{DOMAIN_SAMPLE, Stream, derive};
use seedling_core::protocol::{
    self, ClientKind, ClientMsg, MAX_CLIENT_MESSAGE, PROTOCOL_VERSION, ServerMsg, SessionToken,
};
use seedling_core::tokenizer::Tokenizer;
use seedling_core::{Error, Replica, Result, RunConfig};

/// What the caller should do after a server message.
#[derive(Clone, Debug, PartialEq)]
pub enum Reaction {
    /// The server accepted the Hello (a Welcome); nothing to send yet, the
    /// snapshot follows.
    Joined {
        /// This connection's id on the server (matches `/api/status`).
        client: u64,
        /// The session token to present when reconnecting.
        session: SessionToken,
    },
    /// Nothing to send: a Resync, or a job this replica cannot do (no
    /// snapshot yet, or another step; the server reissues it).
    Quiet,
    /// Send `reply` (the job's losses); `members` members were evaluated.
    Evaluated {
        /// Encoded [`ClientMsg::Losses`].
        reply: Vec<u8>,
        /// The job's step.
        step: u64,
        /// How many members the job had.
        members: usize,
    },
    /// Send `reply` (the weights hash) after a snapshot or an update.
    Hashed {
        /// Encoded [`ClientMsg::Hash`].
        reply: Vec<u8>,
        /// The step the replica is now at.
        step: u64,
        /// Its weights hash.
        hash: u64,
    },
    /// The server refused this client and is closing the connection.
    Rejected {
        /// The server's reason, for the volunteer to read.
        reason: String,
        /// True when reconnecting cannot help (a protocol version mismatch:
        /// this page is older or newer than the server).
        fatal: bool,
    },
}

/// The state one connection builds up: the run's config and vocabulary from
/// the Welcome, and the replica from the Snapshot.
///
/// A new connection starts a new session, exactly like the native worker:
/// the server sends a fresh snapshot on every join, so nothing is carried
/// over that could be stale.
#[derive(Debug, Default)]
pub struct Session {
    /// The run id from the Welcome; it seeds the text samples so that two
    /// runs at the same step do not print the same sample.
    run: u64,
    /// The run's configuration, needed to turn a snapshot into a replica.
    config: Option<RunConfig>,
    /// The vocabulary, needed to print samples.
    tokenizer: Option<Tokenizer>,
    /// This volunteer's replica; `None` until a snapshot arrives and after a
    /// Resync.
    replica: Option<Replica>,
}

impl Session {
    /// A session that has not heard from the server yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handshake: a browser volunteer evaluating one member stream at a
    /// time (one Web Worker is one thread), with an optional speed estimate
    /// in members per second from an earlier connection (0 = unknown) so the
    /// server can size the first job, and the session token of an earlier
    /// connection so the trust it earned carries over.
    pub fn hello(speed: f32, session: Option<SessionToken>) -> Result<Vec<u8>> {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            0.0
        };
        let msg = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            kind: ClientKind::Browser,
            threads: 1,
            speed,
            session,
        };
        protocol::encode(&msg, MAX_CLIENT_MESSAGE)
    }

    /// Handles one binary frame from the server. An error means the server
    /// broke the protocol (or sent garbage): drop the connection and retry.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Reaction> {
        match protocol::decode_server(bytes)? {
            ServerMsg::Welcome {
                run,
                client,
                session,
                config,
                tokenizer,
            } => {
                self.run = run;
                self.config = Some(config);
                self.tokenizer = Some(tokenizer);
                self.replica = None;
                Ok(Reaction::Joined { client, session })
            }
            ServerMsg::Snapshot { step, params, adam } => {
                let config = self
                    .config
                    .ok_or_else(|| Error::Wire("snapshot before welcome".into()))?;
                let replica = Replica::from_snapshot(config, step, params, adam)?;
                let hash = replica.hash();
                self.replica = Some(replica);
                Ok(Reaction::Hashed {
                    reply: encode(&ClientMsg::Hash { step, hash })?,
                    step,
                    hash,
                })
            }
            ServerMsg::Job {
                step,
                job,
                members,
                tokens,
                ..
            } => {
                let Some(replica) = self.replica.as_ref().filter(|r| r.step == step) else {
                    return Ok(Reaction::Quiet);
                };
                let losses = replica.evaluate(&tokens, &members)?;
                let n = members.len();
                Ok(Reaction::Evaluated {
                    reply: encode(&ClientMsg::Losses { step, job, losses })?,
                    step,
                    members: n,
                })
            }
            ServerMsg::Update { step, lr, weights } => {
                let Some(replica) = self.replica.as_mut() else {
                    return Ok(Reaction::Quiet);
                };
                replica.apply(step, lr, &weights)?;
                let (step, hash) = (replica.step, replica.hash());
                Ok(Reaction::Hashed {
                    reply: encode(&ClientMsg::Hash { step, hash })?,
                    step,
                    hash,
                })
            }
            ServerMsg::Resync => {
                self.replica = None;
                Ok(Reaction::Quiet)
            }
            ServerMsg::Reject { reason } => {
                // The same test the native worker uses to stop retrying.
                let fatal = reason.contains("protocol version");
                Ok(Reaction::Rejected { reason, fatal })
            }
        }
    }

    /// The replica, once a snapshot has arrived.
    pub fn replica(&self) -> Option<&Replica> {
        self.replica.as_ref()
    }

    /// `len` characters sampled at `temperature` from the current local
    /// weights, after a one-character prompt (a newline when the vocabulary
    /// has one, as at the start of a paragraph). The random stream is keyed
    /// by run and step, so a sample is reproducible but changes as the model
    /// trains. `None` before the first snapshot.
    pub fn sample(&self, len: usize, temperature: f32) -> Result<Option<String>> {
        let (Some(replica), Some(tokenizer)) = (&self.replica, &self.tokenizer) else {
            return Ok(None);
        };
        let prompt = tokenizer.id('\n').unwrap_or(0);
        let mut rng = Stream::new(derive(&[DOMAIN_SAMPLE, self.run, replica.step]));
        let tokens = sample_text(
            &replica.layout,
            &replica.params,
            &[prompt],
            len,
            temperature,
            0,
            &mut rng,
        )?;
        tokenizer.decode(&tokens).map(Some)
    }
}

fn encode(msg: &ClientMsg) -> Result<Vec<u8>> {
    protocol::encode(msg, MAX_CLIENT_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seedling_core::adam::AdamState;
    use seedling_core::config::ModelConfig;
    use seedling_core::protocol::MAX_SERVER_MESSAGE;
    use seedling_core::shaping::centered_ranks;

    fn server(msg: &ServerMsg) -> Vec<u8> {
        protocol::encode(msg, MAX_SERVER_MESSAGE).unwrap()
    }

    fn setup() -> (Session, Replica, Tokenizer) {
        let tokenizer = Tokenizer::from_corpus("abc\nde").unwrap();
        let mut config = RunConfig::rw256(tokenizer.len() as u32);
        config.model = ModelConfig {
            vocab: tokenizer.len() as u32,
            hidden: 8,
            layers: 2,
        };
        config.es.population = 4;
        config.es.batch = 2;
        config.es.seq_len = 4;
        let server_replica = Replica::new(config).unwrap();
        let mut s = Session::new();
        let welcome = ServerMsg::Welcome {
            run: 7,
            client: 1,
            session: [9; 16],
            config,
            tokenizer: tokenizer.clone(),
        };
        assert_eq!(
            s.receive(&server(&welcome)).unwrap(),
            Reaction::Joined {
                client: 1,
                session: [9; 16]
            }
        );
        (s, server_replica, tokenizer)
    }

    #[test]
    fn hello_announces_a_browser_at_this_protocol_version() {
        let msg = protocol::decode_client(&Session::hello(f32::NAN, Some([3; 16])).unwrap()).unwrap();
        assert_eq!(
            msg,
            ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                kind: ClientKind::Browser,
                threads: 1,
                speed: 0.0,
                session: Some([3; 16]),
            }
        );
    }

    #[test]
    fn follows_the_server_replica_through_a_step() {
        let (mut s, mut want, _) = setup();
        let snap = ServerMsg::Snapshot {
            step: 0,
            params: want.params.clone(),
            adam: want.adam.clone(),
        };
        let Reaction::Hashed { step: 0, hash, .. } = s.receive(&server(&snap)).unwrap() else {
            panic!("a snapshot is answered with a hash");
        };
        assert_eq!(hash, want.hash());
        // A job for another step is ignored, as the native worker does.
        let tokens = vec![1u16; 2 * 5];
        let job = |step| ServerMsg::Job {
            step,
            job: 3,
            members: vec![2, 3],
            tokens: tokens.clone(),
            deadline_ms: 1000,
        };
        assert_eq!(s.receive(&server(&job(5))).unwrap(), Reaction::Quiet);
        let Reaction::Evaluated {
            reply, members: 2, ..
        } = s.receive(&server(&job(0))).unwrap()
        else {
            panic!("a job is answered with losses");
        };
        let losses = want.evaluate(&tokens, &[2, 3]).unwrap();
        assert_eq!(
            protocol::decode_client(&reply).unwrap(),
            ClientMsg::Losses {
                step: 0,
                job: 3,
                losses: vec![losses[0], losses[1]]
            }
        );
        let weights = centered_ranks(&[(0, 1.0), (1, 2.0), (2, losses[0]), (3, losses[1])]).unwrap();
        want.apply(0, 0.05, &weights).unwrap();
        let update = ServerMsg::Update {
            step: 0,
            lr: 0.05,
            weights,
        };
        let Reaction::Hashed { reply, step: 1, hash } = s.receive(&server(&update)).unwrap() else {
            panic!("an update is answered with a hash");
        };
        assert_eq!(hash, want.hash());
        assert_eq!(
            protocol::decode_client(&reply).unwrap(),
            ClientMsg::Hash { step: 1, hash }
        );
        let text = s.sample(40, 0.8).unwrap().unwrap();
        assert_eq!(text.chars().count(), 40);
        // Resync drops the replica; jobs are then left for others.
        assert_eq!(s.receive(&server(&ServerMsg::Resync)).unwrap(), Reaction::Quiet);
        assert!(s.replica().is_none());
        assert_eq!(s.receive(&server(&job(1))).unwrap(), Reaction::Quiet);
    }

    #[test]
    fn protocol_violations_are_errors_not_panics() {
        let mut s = Session::new();
        let snap = ServerMsg::Snapshot {
            step: 0,
            params: vec![0.0; 3],
            adam: AdamState::new(3),
        };
        assert!(s.receive(&server(&snap)).is_err(), "snapshot before welcome");
        assert!(s.receive(&[0xff, 0xff, 0xff]).is_err());
        let (mut s, _, _) = setup();
        assert!(s.receive(&server(&snap)).is_err(), "wrong-sized snapshot");
        assert_eq!(s.sample(10, 0.8).unwrap(), None);
    }

    #[test]
    fn only_a_version_mismatch_is_fatal() {
        let mut s = Session::new();
        let reject = |reason: &str| {
            server(&ServerMsg::Reject {
                reason: reason.into(),
            })
        };
        let r = s
            .receive(&reject("protocol version 9 is not supported (server speaks 1)"))
            .unwrap();
        assert!(matches!(r, Reaction::Rejected { fatal: true, .. }));
        let r = s.receive(&reject("send queue full")).unwrap();
        assert!(matches!(r, Reaction::Rejected { fatal: false, .. }));
    }
}
