//! One connection's protocol state and what each server message means.
//!
//! Bytes go in ([`Session::receive`]) and a [`Reaction`] with the encoded
//! reply comes out. The [`Volunteer`](super::Volunteer) lifecycle turns
//! reactions into I/O verbs for the drivers, which never see them.
//!
//! Evaluating a job is left to the driver ([`Reaction::Evaluate`]): the
//! browser evaluates on its one thread ([`Work::evaluate`]), the native
//! worker on its own threads off its async runtime. The job carries the
//! replica in an [`Arc`] so the caller can move it to those threads without
//! copying the weights, and [`Work::reply`] then encodes the losses.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::config::RunConfig;
use crate::error::{Error, Result, check_len};
use crate::protocol::{self, ClientMsg, MAX_CLIENT_MESSAGE, ServerMsg, SessionToken};
use crate::replica::Replica;
use crate::tokenizer::{Token, Tokenizer};

/// What the caller should do after a server message.
#[derive(Debug)]
pub enum Reaction {
    /// The server accepted the Hello (a Welcome); nothing to send yet, the
    /// snapshot follows.
    Joined {
        /// This connection's id on the server (matches `/api/status`).
        client: u64,
        /// The session token to present when reconnecting.
        session: SessionToken,
    },
    /// Nothing to send: a Resync, an update before any snapshot, or a job
    /// this replica cannot do (no snapshot yet, or a step whose weights
    /// version it does not hold; the server reissues it).
    Quiet,
    /// A job the replica holds the weights version of (its step, or with a
    /// lag any step still open): evaluate it, then send [`Work::reply`].
    Evaluate(Work),
    /// Send `reply` (the weights hash) after a snapshot or an update.
    Hashed {
        /// Encoded [`ClientMsg::Hash`].
        reply: Vec<u8>,
        /// The step the replica is now at.
        step: u64,
        /// Its weights hash.
        hash: u64,
        /// True after a snapshot (a join or a divergence), false after an
        /// update.
        snapshot: bool,
    },
    /// The server refused this client and is closing the connection.
    Rejected {
        /// The server's reason, for the volunteer to read.
        reason: String,
        /// False when reconnecting cannot help (this client speaks another
        /// protocol version, or its session is banned): the server's word.
        retry: bool,
    },
}

/// One job to evaluate, with the replica to evaluate it on (at the job's
/// step's weights version, which the replica holds). Holding a `Work` past the next server message costs one copy of
/// the replica when that message changes it, never a wrong answer.
pub struct Work {
    /// The job's step: the replica's, or with a lag any step whose weights
    /// version it holds.
    pub step: u64,
    /// The weights version the job's members perturb (for a floating
    /// job, the oldest it may use until [`Session::refresh`] moves it).
    pub version: u64,
    /// Whether any version from `version` to `step` may be used.
    pub floating: bool,
    /// The job id to quote in the reply.
    pub job: u64,
    /// The members to evaluate, in the order the losses must come back.
    pub members: Vec<u32>,
    /// The step's minibatch.
    pub tokens: Vec<Token>,
    /// The replica that holds `step`'s weights version, shared with the
    /// session.
    pub replica: Arc<Replica>,
}

impl Work {
    /// The members' losses evaluated on the calling thread.
    pub fn evaluate(&self) -> Result<Vec<f32>> {
        self.replica
            .evaluate_at(self.step, self.version, &self.tokens, &self.members)
    }

    /// The encoded [`ClientMsg::Losses`] for this job; `losses` must hold
    /// one loss per member, in the job's order.
    pub fn reply(&self, losses: Vec<f32>) -> Result<Vec<u8>> {
        check_len("job losses", self.members.len(), losses.len())?;
        encode(&ClientMsg::Losses {
            step: self.step,
            job: self.job,
            behind: self.step - self.version,
            losses,
        })
    }
}

impl fmt::Debug for Work {
    /// The job without the replica's weights.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Work")
            .field("step", &self.step)
            .field("job", &self.job)
            .field("members", &self.members)
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

/// The state one connection builds up: the run's id, config and vocabulary
/// from the Welcome, and the replica from the Snapshot.
///
/// A new connection starts a new session: the server sends a fresh snapshot
/// on every join, so nothing is carried over that could be stale.
#[derive(Debug, Default)]
pub struct Session {
    /// The run id from the Welcome.
    run: u64,
    /// The run's configuration, needed to turn a snapshot into a replica.
    config: Option<RunConfig>,
    /// The vocabulary.
    tokenizer: Option<Tokenizer>,
    /// This volunteer's replica; `None` until a snapshot arrives and after a
    /// Resync. Shared with the [`Work`] of a job being evaluated.
    replica: Option<Arc<Replica>>,
}

impl Session {
    /// A session that has not heard from the server yet.
    pub fn new() -> Self {
        Self::default()
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
            ServerMsg::Snapshot {
                step,
                params,
                adam,
                versions,
            } => {
                let config = self
                    .config
                    .ok_or_else(|| Error::Wire("snapshot before welcome".into()))?;
                let replica = Replica::from_snapshot(config, step, params, adam)?.with_versions(versions)?;
                let hash = replica.hash();
                self.replica = Some(Arc::new(replica));
                hashed(step, hash, true)
            }
            ServerMsg::Job {
                step,
                version,
                floating,
                job,
                members,
                tokens,
                ..
            } => match self.replica.as_ref().filter(|r| r.weights_at(version).is_some()) {
                Some(replica) => Ok(Reaction::Evaluate(Work {
                    step,
                    version,
                    floating,
                    job,
                    members,
                    tokens,
                    replica: Arc::clone(replica),
                })),
                None => Ok(Reaction::Quiet),
            },
            ServerMsg::Update {
                step,
                lr,
                weights,
                tokens,
            } => {
                let Some(replica) = self.replica.as_mut() else {
                    return Ok(Reaction::Quiet);
                };
                let replica = Arc::make_mut(replica);
                replica.apply(step, lr, &weights, &tokens)?;
                hashed(replica.step, replica.hash(), false)
            }
            ServerMsg::Resync => {
                self.replica = None;
                Ok(Reaction::Quiet)
            }
            ServerMsg::Reject { reason, retry } => Ok(Reaction::Rejected { reason, retry }),
        }
    }

    /// `work` moved onto the newest weights this session holds that its
    /// step may be evaluated at (at most the step itself): a job that
    /// waited in a queue is evaluated at weights as fresh as the updates
    /// that arrived meanwhile, so its staleness is the network's, not the
    /// queue's.
    /// A job that does not float is left as it is.
    pub fn refresh(&self, mut work: Work) -> Work {
        if !work.floating {
            return work;
        }
        if let Some(replica) = &self.replica {
            let newest = replica.step.min(work.step);
            // The evaluation point also reads the version before (see
            // `Replica::point`), unless the step is evaluated at its own.
            let held = |v: u64| replica.weights_at(v).is_some();
            let point = held(newest) && (newest == work.step || newest == 0 || held(newest - 1));
            if newest > work.version && point {
                work.version = newest;
                work.replica = Arc::clone(replica);
            }
        }
        work
    }

    /// The run id from the Welcome (0 before it).
    pub fn run(&self) -> u64 {
        self.run
    }

    /// The vocabulary, once welcomed.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The replica, once a snapshot has arrived.
    pub fn replica(&self) -> Option<&Replica> {
        self.replica.as_deref()
    }
}

fn hashed(step: u64, hash: u64, snapshot: bool) -> Result<Reaction> {
    Ok(Reaction::Hashed {
        reply: encode(&ClientMsg::Hash { step, hash })?,
        step,
        hash,
        snapshot,
    })
}

fn encode(msg: &ClientMsg) -> Result<Vec<u8>> {
    protocol::encode(msg, MAX_CLIENT_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adam::AdamState;
    use crate::config::ModelConfig;
    use crate::protocol::MAX_SERVER_MESSAGE;
    use crate::shaping::centered_ranks;
    use alloc::vec;

    fn server(msg: &ServerMsg) -> Vec<u8> {
        protocol::encode(msg, MAX_SERVER_MESSAGE).unwrap()
    }

    fn setup() -> (Session, Replica) {
        setup_with_lag(0)
    }

    fn setup_with_lag(lag: u32) -> (Session, Replica) {
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
        config.es.lag = lag;
        let server_replica = Replica::new(config).unwrap();
        let mut s = Session::new();
        let welcome = ServerMsg::Welcome {
            run: 7,
            client: 1,
            session: [9; 16],
            config,
            tokenizer: tokenizer.clone(),
        };
        let r = s.receive(&server(&welcome)).unwrap();
        assert!(
            matches!(
                r,
                Reaction::Joined {
                    client: 1,
                    session: [9, ..]
                }
            ),
            "{r:?}"
        );
        assert_eq!((s.run(), s.tokenizer()), (7, Some(&tokenizer)));
        (s, server_replica)
    }

    #[test]
    fn follows_the_server_replica_through_a_step() {
        let (mut s, mut want) = setup();
        let snap = ServerMsg::Snapshot {
            step: 0,
            params: want.params.clone(),
            adam: want.adam.clone(),
            versions: vec![],
        };
        let Reaction::Hashed { step: 0, hash, .. } = s.receive(&server(&snap)).unwrap() else {
            panic!("a snapshot is answered with a hash");
        };
        assert_eq!(hash, want.hash());
        // A job for another step is left for others.
        let tokens = vec![1u16; 2 * 5];
        let job = |step| ServerMsg::Job {
            step,
            version: step,
            floating: false,
            job: 3,
            members: vec![2, 3],
            tokens: tokens.clone(),
            deadline_ms: 1000,
        };
        assert!(matches!(s.receive(&server(&job(5))).unwrap(), Reaction::Quiet));
        let Reaction::Evaluate(work) = s.receive(&server(&job(0))).unwrap() else {
            panic!("a job at the replica's step is handed out to evaluate");
        };
        assert_eq!((work.step, work.job, &work.members[..]), (0, 3, &[2, 3][..]));
        let losses = want.evaluate(&tokens, &[2, 3]).unwrap();
        assert_eq!(work.evaluate().unwrap(), losses);
        assert!(work.reply(vec![1.0]).is_err(), "one loss per member");
        let reply = work.reply(losses.clone()).unwrap();
        assert_eq!(
            protocol::decode_client(&reply).unwrap(),
            ClientMsg::Losses {
                step: 0,
                job: 3,
                behind: 0,
                losses: vec![losses[0], losses[1]]
            }
        );
        drop(work);
        let weights = centered_ranks(&[(0, 1.0), (1, 2.0), (2, losses[0]), (3, losses[1])]).unwrap();
        want.apply(0, 0.05, &weights, &[]).unwrap();
        let update = ServerMsg::Update {
            step: 0,
            lr: 0.05,
            weights,
            tokens: Vec::new(),
        };
        let Reaction::Hashed {
            reply, step: 1, hash, ..
        } = s.receive(&server(&update)).unwrap()
        else {
            panic!("an update is answered with a hash");
        };
        assert_eq!(hash, want.hash());
        assert_eq!(
            protocol::decode_client(&reply).unwrap(),
            ClientMsg::Hash { step: 1, hash }
        );
        assert_eq!(s.replica().map(Replica::hash), Some(want.hash()));
        // Resync drops the replica; jobs and updates are then left for others.
        assert!(matches!(
            s.receive(&server(&ServerMsg::Resync)).unwrap(),
            Reaction::Quiet
        ));
        assert!(s.replica().is_none());
        assert!(matches!(s.receive(&server(&job(1))).unwrap(), Reaction::Quiet));
        let update = ServerMsg::Update {
            step: 1,
            lr: 0.05,
            weights: vec![],
            tokens: Vec::new(),
        };
        assert!(matches!(s.receive(&server(&update)).unwrap(), Reaction::Quiet));
    }

    #[test]
    fn an_update_while_a_job_is_held_leaves_the_job_on_its_step() {
        let (mut s, want) = setup();
        let snap = ServerMsg::Snapshot {
            step: 0,
            params: want.params.clone(),
            adam: want.adam.clone(),
            versions: vec![],
        };
        s.receive(&server(&snap)).unwrap();
        let job = ServerMsg::Job {
            step: 0,
            version: 0,
            floating: false,
            job: 1,
            members: vec![0, 1],
            tokens: vec![1u16; 2 * 5],
            deadline_ms: 1000,
        };
        let Reaction::Evaluate(work) = s.receive(&server(&job)).unwrap() else {
            panic!("a job at the replica's step is handed out to evaluate");
        };
        let update = ServerMsg::Update {
            step: 0,
            lr: 0.05,
            weights: vec![(0, 1.0), (1, -1.0)],
            tokens: Vec::new(),
        };
        let Reaction::Hashed { step: 1, hash, .. } = s.receive(&server(&update)).unwrap() else {
            panic!("an update is answered with a hash");
        };
        assert_ne!(hash, want.hash());
        assert_eq!((work.replica.step, work.replica.hash()), (0, want.hash()));
    }

    /// A job that waited while updates arrived: a floating one moves to the
    /// newest weights held (never past its step) and says so in its reply;
    /// a pinned one stays at its version.
    #[test]
    fn a_floating_job_moves_to_the_newest_weights_and_a_pinned_one_stays() {
        let (mut s, mut want) = setup_with_lag(4);
        s.receive(&server(&want.snapshot())).unwrap();
        let tokens = vec![1u16; 2 * 5];
        let job = |step, floating, job| ServerMsg::Job {
            step,
            version: 0,
            floating,
            job,
            members: vec![0, 1],
            tokens: tokens.clone(),
            deadline_ms: 1000,
        };
        let mut works = Vec::new();
        for (step, floating, id) in [(3, true, 1), (3, false, 2), (1, true, 3)] {
            let Reaction::Evaluate(work) = s.receive(&server(&job(step, floating, id))).unwrap() else {
                panic!("a job at a version the replica holds is handed out");
            };
            works.push(work);
        }
        for step in 0..2 {
            let weights = vec![(0, 1.0), (1, -1.0)];
            want.apply(step, 0.05, &weights, &[]).unwrap();
            let update = ServerMsg::Update {
                step,
                lr: 0.05,
                weights,
                tokens: Vec::new(),
            };
            s.receive(&server(&update)).unwrap();
        }
        let mut works = works.into_iter().map(|w| s.refresh(w));
        let (floating, pinned, early) = (
            works.next().unwrap(),
            works.next().unwrap(),
            works.next().unwrap(),
        );
        assert_eq!(
            (floating.version, floating.replica.step),
            (2, 2),
            "the newest held"
        );
        assert_eq!(pinned.version, 0, "a pinned job keeps its version");
        assert_eq!(early.version, 1, "never past the job's own step");
        let losses = floating.evaluate().unwrap();
        assert_eq!(losses, want.evaluate_at(3, 2, &tokens, &[0, 1]).unwrap());
        assert_ne!(losses, pinned.evaluate().unwrap(), "the versions differ");
        let reply = protocol::decode_client(&floating.reply(losses.clone()).unwrap()).unwrap();
        assert_eq!(
            reply,
            ClientMsg::Losses {
                step: 3,
                job: 1,
                behind: 1,
                losses
            }
        );
    }

    #[test]
    fn protocol_violations_are_errors_not_panics() {
        let mut s = Session::new();
        let snap = ServerMsg::Snapshot {
            step: 0,
            params: vec![0.0; 3],
            adam: AdamState::new(3),
            versions: vec![],
        };
        assert!(s.receive(&server(&snap)).is_err(), "snapshot before welcome");
        assert!(s.receive(&[0xff, 0xff, 0xff]).is_err());
        let (mut s, want) = setup();
        assert!(s.receive(&server(&snap)).is_err(), "wrong-sized snapshot");
        assert!(s.replica().is_none());
        let snap = ServerMsg::Snapshot {
            step: 4,
            params: want.params.clone(),
            adam: want.adam.clone(),
            versions: vec![],
        };
        s.receive(&server(&snap)).unwrap();
        let stale = ServerMsg::Update {
            step: 0,
            lr: 0.05,
            weights: vec![(0, 1.0)],
            tokens: Vec::new(),
        };
        assert!(s.receive(&server(&stale)).is_err(), "update for another step");
        // A job with a minibatch of the wrong shape fails when evaluated.
        let job = ServerMsg::Job {
            step: 4,
            version: 4,
            floating: false,
            job: 1,
            members: vec![0],
            tokens: vec![1u16; 3],
            deadline_ms: 1000,
        };
        let Reaction::Evaluate(work) = s.receive(&server(&job)).unwrap() else {
            panic!("a job at the replica's step is handed out to evaluate");
        };
        assert!(work.evaluate().is_err(), "minibatch of the wrong shape");
    }

    #[test]
    fn a_rejection_carries_the_servers_verdict() {
        let mut s = Session::new();
        for retry in [false, true] {
            let reject = server(&ServerMsg::Reject {
                reason: "send queue full".into(),
                retry,
            });
            let r = s.receive(&reject).unwrap();
            assert!(
                matches!(&r, Reaction::Rejected { reason, retry: r } if reason == "send queue full" && *r == retry),
                "{r:?}"
            );
        }
    }
}
