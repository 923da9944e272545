//! The state machine driven directly: inputs in, outputs read back per
//! connection, no sockets and no runtime.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use seedling_core::protocol::{self, ClientKind, ClientMsg, PROTOCOL_VERSION, ServerMsg, SessionToken};
use seedling_core::tokenizer::Tokenizer;
use seedling_core::{NoiseKind, Replica, RunConfig};

use super::scheduler::MAX_HELD;
use super::*;
use crate::runbook::Cadence;

/// The connections as a test sees them: what was sent to each, in order,
/// until the coordinator was done with it.
#[derive(Default)]
struct Wires {
    sent: HashMap<ClientId, Vec<Outgoing>>,
    live: BTreeSet<ClientId>,
    /// Fresh session tokens handed out so far.
    tokens: u64,
}

impl Outputs for Wires {
    fn push(&mut self, out: Output) {
        match out {
            Output::Send(id, item) if self.live.contains(&id) => self.sent.entry(id).or_default().push(item),
            Output::Gone(id) => {
                self.live.remove(&id);
            }
            _ => {}
        }
    }
}

impl Wires {
    /// A fresh session token, as the driver would draw (distinct, never
    /// the `[7; 16]` the hostile test presents).
    fn token(&mut self) -> SessionToken {
        self.tokens += 1;
        let mut t = [0xA5; 16];
        t[..8].copy_from_slice(&self.tokens.to_le_bytes());
        t
    }

    /// Forgets everything sent so far.
    fn clear(&mut self) {
        self.sent.clear();
    }
}

fn coordinator() -> Coordinator {
    lagged_coordinator(0, false)
}

/// [`coordinator`] with up to `lag` steps in flight (always `lag` if
/// `fixed`).
fn lagged_coordinator(lag: u32, fixed: bool) -> Coordinator {
    let text = "abcdefghij ".repeat(200);
    let tokenizer = Tokenizer::from_corpus(&text).unwrap();
    let tokens = tokenizer.encode(&text).unwrap();
    let mut cfg = RunConfig::rw256(tokenizer.len() as u32);
    cfg.model.hidden = 8;
    cfg.model.layers = 1;
    cfg.es.noise = NoiseKind::LowRank { rank: 1 };
    cfg.es.population = 8;
    cfg.es.batch = 2;
    cfg.es.seq_len = 8;
    cfg.es.lag = lag;
    let data = RunData {
        tokenizer,
        train: Arc::new(tokens),
        val_windows: Vec::new(),
        val_seq_len: 8,
        name: "test".into(),
    };
    let settings = Settings {
        job_timeout_min: Duration::from_millis(5),
        fixed_lag: fixed,
        ..Settings::default()
    };
    let replica = Replica::new(cfg).unwrap();
    let now = Instant::now();
    let cadence = Cadence {
        eval_every: settings.eval_every,
        checkpoint_every: settings.checkpoint_every,
    };
    let book = RunBook::new(cfg, data.tokenizer.clone(), cadence, Vec::new(), None, now);
    Coordinator::new(settings, data, replica, book, 42, now)
}

/// Arbitrary client behaviour, honest or not.
fn event(clients: u64) -> impl Strategy<Value = (u64, u8, u64, u64, Vec<f32>)> {
    (
        0..clients,
        0u8..8,
        0u64..4,
        0u64..40,
        prop::collection::vec(-1.0f32..10.0, 0..6),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever clients send, in any order, the coordinator neither
    /// panics nor breaks its bookkeeping.
    #[test]
    fn any_message_sequence_keeps_the_books_straight(events in prop::collection::vec(event(4), 1..120)) {
        any_message_sequence(coordinator(), events)?;
    }

    /// The same with two steps in flight: every open step's books stay
    /// straight, and no job outlives its step.
    #[test]
    fn any_message_sequence_keeps_every_open_step_straight(events in prop::collection::vec(event(4), 1..120)) {
        any_message_sequence(lagged_coordinator(2, false), events)?;
    }

    /// The same with the lag fixed: always three steps open.
    #[test]
    fn any_message_sequence_keeps_a_fixed_lag_straight(events in prop::collection::vec(event(4), 1..120)) {
        any_message_sequence(lagged_coordinator(2, true), events)?;
    }
}

/// Feeds `events` to `c`, checking the books after each.
fn any_message_sequence(
    mut c: Coordinator,
    events: Vec<(u64, u8, u64, u64, Vec<f32>)>,
) -> Result<(), TestCaseError> {
    let mut w = Wires::default();
    let t0 = Instant::now();
    for (i, (client, kind, step, job, losses)) in events.into_iter().enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 3);
        if !c.clients.contains_key(&client) && kind != 7 {
            connect(&mut c, &mut w, client, now);
        }
        let ev = match kind {
            0 | 1 => Input::Message {
                client,
                msg: ClientMsg::Hello {
                    version: PROTOCOL_VERSION,
                    kind: ClientKind::Simulated,
                    threads: 1,
                    speed: 0.0,
                    session: None,
                    name: String::new(),
                },
            },
            2 | 3 => {
                // Sometimes a correct answer to the client's live job.
                let live = c
                    .clients
                    .get(&client)
                    .and_then(|cl| cl.jobs.first().copied())
                    .and_then(|j| c.sched.jobs.get(j).map(|jb| (j, jb.step, jb.members.to_vec())));
                match (kind, live) {
                    (2, Some((j, s, members))) => Input::Message {
                        client,
                        msg: reply(&c, s, j, members.iter().map(|&m| m as f32 * 0.1).collect()),
                    },
                    _ => Input::Message {
                        client,
                        msg: reply(&c, step, job, losses),
                    },
                }
            }
            4 if job % 2 == 0 => Input::Message {
                client,
                msg: ClientMsg::Hash { step, hash: job },
            },
            // A round trip long enough that the client holds several jobs.
            4 => Input::RoundTrip {
                client,
                rtt: Duration::from_millis(step * 400),
            },
            5 => Input::Tick,
            6 => Input::Invalid {
                client,
                reason: "garbage".into(),
                code: close::INVALID,
            },
            _ => Input::Disconnected { client },
        };
        c.handle(ev, now, &mut w);
        w.clear();
        check_books(&c)?;
    }
    Ok(())
}

/// The bookkeeping invariants that must hold after every event.
fn check_books(c: &Coordinator) -> Result<(), TestCaseError> {
    let n = c.replica.config.es.population;
    let lag = c.replica.config.es.lag as u64;
    prop_assert!(
        (1..=lag + 1).contains(&(c.open.len() as u64)),
        "{} steps open",
        c.open.len()
    );
    if c.settings.fixed_lag {
        prop_assert_eq!(c.open.len() as u64, lag + 1, "a fixed lag keeps every step open");
    }
    for (i, o) in c.open.iter().enumerate() {
        prop_assert_eq!(
            o.step,
            c.replica.step + i as u64,
            "open steps are consecutive from the replica's"
        );
        prop_assert!(
            o.version <= c.replica.step && o.version + lag >= c.replica.step,
            "step {} at version {}, which replicas at step {} do not hold",
            o.step,
            o.version,
            c.replica.step
        );
        prop_assert!(o.books.results().all(|(m, _)| m < n));
        prop_assert!(o.pool.iter().all(|m| !o.books.is_counted(m)));
        prop_assert!(o.verify.iter().all(|m| !o.pool.contains(m)));
    }
    let s = &c.sched;
    for (jid, job) in s.jobs.iter() {
        prop_assert!(c.clients.contains_key(&job.client), "a job outlived its client");
        prop_assert!(
            c.clients[&job.client].jobs.contains(&jid),
            "a live job its client does not hold"
        );
        let i = c.open_index(job.step);
        prop_assert!(i.is_some(), "a job of a closed step is live");
        let o = &c.open[i.unwrap()];
        prop_assert!(job.members.iter().all(|&m| !o.pool.contains(m)));
    }
    for (id, cl) in &c.clients {
        prop_assert!(
            cl.jobs
                .iter()
                .all(|&j| s.jobs.get(j).is_some_and(|jb| jb.client == *id))
        );
        prop_assert!(
            cl.jobs.len() <= c.settings.jobs_ahead.max(1).max(MAX_HELD),
            "a client holds too many jobs"
        );
    }
    for rec in c.sessions.map.values() {
        prop_assert!(
            rec.live.is_none_or(|id| c.clients.contains_key(&id)),
            "a session outlived its client"
        );
    }
    prop_assert_eq!(c.sessions.map.len(), c.sessions.order.len());
    // The idle queue holds every client short of its least jobs exactly
    // once, perhaps others with room for more, and nobody else. (Room past
    // the least jobs moves with the fleet's size; a client without it is
    // dropped from the queue when reached, and queued again at its next
    // result.)
    let must: BTreeSet<ClientId> = c
        .clients
        .iter()
        .filter(|(_, cl)| cl.hello.is_some() && cl.jobs.len() < c.settings.jobs_ahead.max(1))
        .map(|(&id, _)| id)
        .collect();
    let queued: BTreeSet<ClientId> = s.idle.iter().copied().collect();
    prop_assert_eq!(s.idle.len(), queued.len(), "a client is queued twice");
    prop_assert!(
        must.is_subset(&queued),
        "the idle queue drifted: {must:?} not in {queued:?}"
    );
    for id in &queued {
        prop_assert!(
            c.clients[id].hello.is_some(),
            "a client queued before its handshake"
        );
    }
    for (id, cl) in &c.clients {
        prop_assert_eq!(cl.queued, queued.contains(id));
    }
    prop_assert_eq!(
        c.ready,
        c.clients.values().filter(|cl| cl.hello.is_some()).count()
    );
    Ok(())
}

/// One client's connection as the coordinator sees it.
fn connect(c: &mut Coordinator, w: &mut Wires, id: ClientId, now: Instant) {
    w.live.insert(id);
    let token = Some(w.token());
    c.handle(Input::Connected { client: id, token }, now, w);
}

/// Everything queued for a client: decoded messages and the close code, if any.
fn drain(w: &mut Wires, id: ClientId) -> (Vec<ServerMsg>, Option<u16>) {
    let (mut msgs, mut code) = (Vec::new(), None);
    for out in w.sent.remove(&id).unwrap_or_default() {
        match out {
            Outgoing::Frame(b) => msgs.push(protocol::decode_server(&b).unwrap()),
            Outgoing::Job(j) => msgs.push(protocol::decode_server(&j.join()).unwrap()),
            Outgoing::Close(c, _) => code = Some(c),
        }
    }
    (msgs, code)
}

fn simulated(session: Option<SessionToken>) -> ClientMsg {
    ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind: ClientKind::Simulated,
        threads: 1,
        speed: 0.0,
        session,
        name: String::new(),
    }
}

/// Ways to damage a real encoding, or replace it.
#[derive(Clone, Debug)]
enum Damage {
    Intact,
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Append(Vec<u8>),
    Random(Vec<u8>),
    Text(String),
}

fn damage() -> impl Strategy<Value = Damage> {
    use prop::sample::Index;
    let bytes = || prop::collection::vec(any::<u8>(), 1..24);
    prop_oneof![
        2 => Just(Damage::Intact),
        2 => any::<Index>().prop_map(Damage::Truncate),
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
        2 => (any::<Index>(), bytes()).prop_map(|(i, b)| Damage::Insert(i, b)),
        1 => bytes().prop_map(Damage::Append),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Damage::Random),
        1 => ".{0,16}".prop_map(Damage::Text),
    ]
}

fn apply_damage(mut bytes: Vec<u8>, d: &Damage) -> crate::ws::Message {
    use crate::ws::Message;
    match d {
        Damage::Intact => {}
        Damage::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Damage::Flip(i, x) => {
            let at = i.index(bytes.len());
            bytes[at] ^= x;
        }
        Damage::Insert(i, b) => {
            let at = i.index(bytes.len() + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Damage::Append(b) => bytes.extend_from_slice(b),
        Damage::Random(b) => bytes = b.clone(),
        Damage::Text(t) => return Message::Text(t.as_str().into()),
    }
    Message::Binary(bytes.into())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Frames from a hostile client, random or mutated from real
    /// encodings, go through the server's frame path into the
    /// coordinator: nothing panics, every undecodable frame gets its
    /// sender a Reject and the close code that names the fault, the
    /// books stay straight, and an honest client keeps closing steps.
    #[test]
    fn hostile_frames_are_rejected_and_the_run_goes_on(
        frames in prop::collection::vec((0u8..5, damage()), 1..40),
    ) {
        let mut c = coordinator();
        let mut w = Wires::default();
        let t0 = Instant::now();
        let mut now = t0;
        let honest = 1;
        connect(&mut c, &mut w, honest, now);
        c.handle(Input::Message { client: honest, msg: simulated(None) }, now, &mut w);
        let mut offender = 100;
        connect(&mut c, &mut w, offender, now);
        let start_step = c.replica.step;
        for (which, damage) in frames {
            now += Duration::from_millis(2);
            if !c.clients.contains_key(&offender) {
                offender += 1;
                connect(&mut c, &mut w, offender, now);
            }
            // A real message of the offender's, then damaged.
            let job = c.clients[&offender].jobs.first().copied().and_then(|j| c.sched.jobs.get(j).map(|jb| (j, jb.members.len())));
            let msg = match (which, job) {
                (0, _) => simulated(None),
                (1, Some((job, n))) => reply(&c, c.replica.step, job, vec![0.5; n]),
                (1, None) => reply(&c, c.replica.step, 1, vec![0.5; 2]),
                (2, _) => ClientMsg::Hash { step: c.replica.step, hash: c.replica.hash() },
                (3, _) => ClientMsg::Bye,
                _ => simulated(Some([7; 16])),
            };
            let bytes = protocol::encode(&msg, protocol::MAX_CLIENT_MESSAGE).unwrap();
            let frame = apply_damage(bytes, &damage);
            let Some(ev) = crate::app::frame_event(offender, frame) else { continue };
            let invalid = match &ev {
                Input::Invalid { code, .. } => Some(*code),
                _ => None,
            };
            c.handle(ev, now, &mut w);
            let (msgs, closed) = drain(&mut w, offender);
            if let Some(code) = invalid {
                prop_assert!(!c.clients.contains_key(&offender), "an undecodable frame was let through");
                prop_assert!(matches!(msgs.last(), Some(ServerMsg::Reject { .. })), "no Reject: {:?}", msgs);
                prop_assert_eq!(closed, Some(code));
            }
            if closed.is_some() {
                prop_assert!(!c.clients.contains_key(&offender));
            }
            // The honest client answers whatever it holds, correctly.
            let live = c.clients[&honest].jobs.first().copied().and_then(|j| c.sched.jobs.get(j).map(|jb| (j, jb.members.to_vec())));
            if let Some((job, members)) = live {
                let losses = members.iter().map(|&m| m as f32 * 0.1).collect();
                c.handle(Input::Message { client: honest, msg: reply(&c, c.replica.step, job, losses) }, now, &mut w);
            }
            c.handle(Input::Tick, now, &mut w);
            let _ = drain(&mut w, honest);
            check_books(&c)?;
            prop_assert!(c.clients.contains_key(&honest) || c.counters.liars > 0, "the honest client was dropped");
        }
        // Once the offender is gone, the honest client alone closes steps.
        c.handle(Input::Disconnected { client: offender }, now, &mut w);
        for _ in 0..200 {
            if c.replica.step >= start_step + 2 || !c.clients.contains_key(&honest) {
                break;
            }
            now += Duration::from_millis(10);
            c.handle(Input::Tick, now, &mut w);
            let live = c.clients[&honest].jobs.first().copied().and_then(|j| c.sched.jobs.get(j).map(|jb| (j, jb.members.to_vec())));
            if let Some((job, members)) = live {
                let losses = members.iter().map(|&m| m as f32 * 0.1).collect();
                c.handle(Input::Message { client: honest, msg: reply(&c, c.replica.step, job, losses) }, now, &mut w);
            }
            check_books(&c)?;
        }
        prop_assert!(c.replica.step >= start_step + 2 || c.counters.liars > 0, "the run stalled at step {}", c.replica.step);
    }
}

/// The Losses answering job `job` of `step`, at the weights version the
/// job names.
fn reply(c: &Coordinator, step: u64, job: u64, losses: Vec<f32>) -> ClientMsg {
    let version = c.sched.jobs.get(job).map_or(step, |j| j.version);
    ClientMsg::Losses {
        step,
        job,
        behind: step.saturating_sub(version),
        losses,
    }
}

/// A lone client that let its job expire gets the same members again:
/// nobody else can take them, and the step must not stall.
#[test]
fn a_lone_slow_client_gets_its_expired_members_back() {
    let mut c = coordinator();
    let (mut w, t0) = join_one(&mut c);
    // Every member of the client's jobs (two: one sent ahead), in order.
    let members = |w: &mut Wires| {
        let jobs = jobs_sent(w, 1);
        let n = jobs.len() as u64;
        (n, jobs.into_iter().flat_map(|j| j.members).collect::<Vec<u32>>())
    };
    let (jobs, first) = members(&mut w);
    assert_eq!(jobs, c.settings.jobs_ahead as u64, "a job and one sent ahead");
    // Past the deadline: the jobs expire and are reissued, to the same client.
    let later = t0 + Duration::from_secs(1);
    c.handle(Input::Tick, later, &mut w);
    let (_, again) = members(&mut w);
    let sorted = |mut v: Vec<u32>| {
        v.sort_unstable();
        v
    };
    assert_eq!(sorted(again), sorted(first), "the members again");
    assert_eq!(c.counters.reissued, jobs);
}

/// Credit is verified members only: two honest clients and a liar answer
/// their jobs for several steps. The liar (its claims always replicated,
/// never agreed with) earns nothing and, once banned, shows as void; the
/// honest ones earn at least every counted member of the closed steps
/// between them, and never more than they claimed.
#[test]
fn credit_goes_to_agreeing_claims_and_a_liar_is_void() {
    let (c, tokens) = credit_run(coordinator());
    let mut w = Wires::default();
    let t0 = Instant::now();
    // The tally goes into checkpoints; a banned token stays refused after
    // a restart (the sessions are gone, the credit is not).
    let mut back = coordinator();
    back.credit = credit::Credit::from_records(c.credit.records());
    connect(&mut back, &mut w, 9, t0);
    back.handle(
        Input::Message {
            client: 9,
            msg: simulated(Some(tokens[2])),
        },
        t0,
        &mut w,
    );
    assert_eq!(
        drain(&mut w, 9).1,
        Some(close::POLICY),
        "a banned contributor is refused"
    );
    // An honest one resumes under its own token, and keeps accumulating.
    connect(&mut back, &mut w, 10, t0);
    back.handle(
        Input::Message {
            client: 10,
            msg: simulated(Some(tokens[0])),
        },
        t0,
        &mut w,
    );
    let welcome = drain(&mut w, 10).0.into_iter().find_map(|m| match m {
        ServerMsg::Welcome { session, .. } => Some(session),
        _ => None,
    });
    assert_eq!(welcome, Some(tokens[0]));
    assert_eq!(back.clients[&10].session, Some(tokens[0]));
}

/// Two honest clients and a liar answer their jobs until at least five
/// steps closed and the liar was banned; checks the credit they earned
/// (see the callers) and returns the coordinator and their tokens.
fn credit_run(mut c: Coordinator) -> (Coordinator, Vec<SessionToken>) {
    let mut w = Wires::default();
    let t0 = Instant::now();
    let names = ["honest a", "honest b", "<b>liar</b>"];
    for id in 1..=3u64 {
        connect(&mut c, &mut w, id, t0);
        let hello = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            kind: ClientKind::Simulated,
            threads: 1,
            speed: 0.0,
            session: None,
            name: names[id as usize - 1].into(),
        };
        c.handle(
            Input::Message {
                client: id,
                msg: hello,
            },
            t0,
            &mut w,
        );
    }
    let tokens: Vec<SessionToken> = (1..=3u64).map(|id| c.clients[&id].session.unwrap()).collect();
    let mut claimed = [0u64; 3];
    let start = c.replica.step;
    for round in 0..400 {
        let now = t0 + Duration::from_millis(round);
        for id in 1..=3u64 {
            for msg in drain(&mut w, id).0 {
                let ServerMsg::Job {
                    step, job, members, ..
                } = msg
                else {
                    continue;
                };
                let losses: Vec<f32> = members
                    .iter()
                    .map(|&m| {
                        if id == 3 {
                            50.0 + m as f32
                        } else {
                            1.0 + m as f32 * 0.01 + step as f32
                        }
                    })
                    .collect();
                claimed[id as usize - 1] += members.len() as u64;
                let msg = reply(&c, step, job, losses);
                c.handle(Input::Message { client: id, msg }, now, &mut w);
            }
        }
        c.handle(Input::Tick, now, &mut w);
        if c.replica.step >= start + 5 && !c.clients.contains_key(&3) {
            break;
        }
    }
    let closed = c.replica.step - start;
    assert!(closed >= 5, "only {closed} steps closed");
    assert!(!c.clients.contains_key(&3), "the liar was not caught");
    let board = c.credit.board();
    let row = |t: &SessionToken| {
        let id = credit::public_id(&credit::key_of(t));
        board.contributors.iter().find(|r| r.id == id).cloned().unwrap()
    };
    let liar = row(&tokens[2]);
    assert_eq!(
        (liar.members, liar.banned, liar.name.as_str()),
        (0, true, "<b>liar</b>")
    );
    let (a, b) = (row(&tokens[0]), row(&tokens[1]));
    assert!(!a.banned && !b.banned);
    assert_eq!(a.name, "honest a");
    let population = c.replica.config.es.population as u64;
    // The step open now has credited nobody yet.
    assert!(a.members + b.members >= closed * population, "{a:?} {b:?}");
    assert!(
        a.members <= claimed[0] && b.members <= claimed[1],
        "{a:?} {b:?} {claimed:?}"
    );
    (c, tokens)
}

/// The same with two steps in flight: each closing step credits its own
/// claims, and the liar's claims in every open step are void.
#[test]
fn credit_with_steps_in_flight_counts_each_closed_step() {
    credit_run(lagged_coordinator(2, true));
}

/// A volunteer is never left waiting a round trip for work: it holds a job
/// and the one sent ahead, and each result it returns brings another while
/// it is still busy with the one it holds.
#[test]
fn the_next_job_travels_while_the_client_computes() {
    let mut c = coordinator();
    let (mut w, t0) = join_one(&mut c);
    let jobs = |w: &mut Wires| -> Vec<(u64, u64, usize)> {
        jobs_sent(w, 1)
            .into_iter()
            .map(|j| (j.step, j.job, j.members.len()))
            .collect()
    };
    let sent = jobs(&mut w);
    assert_eq!(sent.len(), 2, "a job and one sent ahead: {sent:?}");
    let (step, job, n) = sent[0];
    let t1 = t0 + Duration::from_millis(100);
    let losses = vec![1.0; n];
    c.handle(
        Input::Message {
            client: 1,
            msg: reply(&c, step, job, losses),
        },
        t1,
        &mut w,
    );
    let next = jobs(&mut w);
    assert_eq!(next.len(), 1, "one more job as the first comes back: {next:?}");
    assert_eq!(c.clients[&1].jobs.len(), 2, "still holding two");
    assert_eq!(
        c.clients[&1].jobs[0], sent[1].1,
        "the job sent ahead is the older"
    );
    // The job sent ahead began when the first came back: its speed is its
    // members over the time since then, not since it was sent.
    let (step, job, n) = sent[1];
    let t2 = t1 + Duration::from_millis(50);
    let before = c.clients[&1].speed;
    c.handle(
        Input::Message {
            client: 1,
            msg: reply(&c, step, job, vec![1.0; n]),
        },
        t2,
        &mut w,
    );
    let rate = n as f64 / 0.05;
    let want = 0.7 * before + 0.3 * rate;
    assert!(
        (c.clients[&1].speed - want).abs() < 1e-6 * want,
        "{} != {want}",
        c.clients[&1].speed
    );
}

/// A volunteer far away holds enough work to cover its round trip: its
/// speed times the round trip, plus the job it evaluates; close by, the
/// least two jobs.
#[test]
fn a_distant_volunteer_holds_work_for_its_round_trip() {
    let mut c = lagged_coordinator(8, true);
    let (mut w, t0) = join_one(&mut c);
    let first = jobs_sent(&mut w, 1);
    assert_eq!(first.len(), 2, "speed unknown, no round trip: the least two jobs");
    c.clients.get_mut(&1).unwrap().speed = 50.0;
    c.handle(
        Input::RoundTrip {
            client: 1,
            rtt: Duration::from_millis(400),
        },
        t0,
        &mut w,
    );
    let more = jobs_sent(&mut w, 1);
    // Jobs of a full share of a step (8 members: a lone volunteer takes it
    // all), until it holds 8 + 50 * 0.4 = 28 members.
    assert!(
        more.iter().all(|j| j.members.len() <= 8),
        "a share of one step at most"
    );
    let held = c.held(&c.clients[&1]);
    assert!((28..28 + 8).contains(&held), "holds {held} members");
    assert_eq!(c.clients[&1].jobs.len(), first.len() + more.len());
    // Back close by: a result frees room for nothing more (it holds more
    // than two jobs' worth).
    c.handle(
        Input::RoundTrip {
            client: 1,
            rtt: Duration::ZERO,
        },
        t0,
        &mut w,
    );
    c.clients.get_mut(&1).unwrap().rtt = 0.0;
    let j = &first[0];
    let losses = vec![1.0; j.members.len()];
    let msg = reply(&c, j.step, j.job, losses);
    c.handle(
        Input::Message { client: 1, msg },
        t0 + Duration::from_millis(30),
        &mut w,
    );
    assert!(
        jobs_sent(&mut w, 1).is_empty(),
        "no job past what covers the trip"
    );
}

/// The window opens the steps that hold what the volunteers want, plus
/// the one being finished: many steps for a fleet far away, one or two
/// close by.
#[test]
fn the_window_follows_the_fleets_round_trip() {
    let mut c = lagged_coordinator(16, false);
    let (mut w, t0) = join_one(&mut c);
    // Answer the oldest job each time, as a volunteer evaluating its queue.
    let mut held: std::collections::VecDeque<SentJob> = jobs_sent(&mut w, 1).into();
    // A job every 0.1 s: 80 members/s for a full share of a step.
    let mut now = t0;
    let mut answer = |c: &mut Coordinator, w: &mut Wires, rounds: usize, rtt: f64| {
        for _ in 0..rounds {
            now += Duration::from_millis(100);
            let j = held.pop_front().expect("the volunteer always holds work");
            let msg = reply(c, j.step, j.job, vec![1.0; j.members.len()]);
            c.clients.get_mut(&1).unwrap().rtt = rtt;
            c.handle(Input::Message { client: 1, msg }, now, w);
            held.extend(jobs_sent(w, 1));
            held.retain(|j| c.sched.jobs.contains(j.job));
        }
    };
    answer(&mut c, &mut w, 200, 0.5);
    assert!(c.replica.step >= 100, "steps closed: {}", c.replica.step);
    // 8 members a job, 8 + 80 * 0.5 = 48 wanted: 6 steps, plus one (the
    // measured speed wanders around 80).
    let far = c.window.open();
    assert!((6..=8).contains(&far), "window {far}");
    answer(&mut c, &mut w, 100, 0.0);
    // Close by, two jobs of a step: two steps plus one.
    assert_eq!(c.window.open(), 3);
}

/// Steps opened while the volunteers want more work than the window holds
/// (far away, their CPU would otherwise wait on the round trip) hold more
/// sequences; close by, or with a fixed lag, the config's batch. A
/// stretched job's members count as that much more work.
#[test]
fn a_far_fleet_gets_longer_minibatches() {
    // The test config: batch 2, seq_len 8.
    let window = 9;
    // One volunteer close by wants two jobs of at most a step each, which
    // a window of 4 steps behind holds; 160 ms away it wants its speed
    // (members per millisecond here) times the round trip, many windows.
    for (fixed, rtt, want) in [(false, 0.0, 2), (false, 0.16, 6), (true, 0.16, 2)] {
        let mut c = lagged_coordinator(4, fixed);
        let (mut w, mut now) = join_one(&mut c);
        c.clients.get_mut(&1).unwrap().rtt = rtt;
        let mut late = Vec::new();
        while c.replica.step < 12 {
            now += Duration::from_millis(1);
            let (msgs, _) = drain(&mut w, 1);
            for m in msgs {
                let ServerMsg::Job {
                    step,
                    job,
                    members,
                    tokens,
                    ..
                } = m
                else {
                    continue;
                };
                assert!(tokens.len().is_multiple_of(window), "whole sequences");
                // Steps opened after the first close know the round trip.
                if step >= 6 {
                    late.push(tokens.len() / window);
                    let stretch = c.sched.jobs.get(job).unwrap().stretch;
                    assert_eq!(stretch * 2, tokens.len() / window);
                }
                let msg = reply(&c, step, job, vec![1.0; members.len()]);
                c.handle(Input::Message { client: 1, msg }, now, &mut w);
            }
        }
        assert!(!late.is_empty());
        assert!(
            late.iter().all(|&n| n == want),
            "fixed {fixed}, rtt {rtt}: {late:?}"
        );
        let status = c.status(now);
        assert!(status.sequences_per_member >= 2.0);
        if want > 2 {
            assert!(
                status.sequences_per_member > 2.0,
                "{}",
                status.sequences_per_member
            );
        }
    }
}

/// With one job at a time a client gets its next job only after a result.
#[test]
fn one_job_at_a_time_when_asked() {
    let mut c = coordinator();
    c.settings.jobs_ahead = 1;
    let (mut w, _) = join_one(&mut c);
    assert_eq!(jobs_sent(&mut w, 1).len(), 1);
    assert_eq!(c.clients[&1].jobs.len(), 1);
}

/// A volunteer that waits on every close (it answers all it holds, then
/// has nothing) keeps the window open past one step: later steps open at
/// the weights the replicas hold, each job naming that version, never past
/// the lag.
#[test]
fn a_starved_volunteer_opens_steps_in_flight_at_held_versions() {
    let lag = 3;
    let mut c = lagged_coordinator(lag, false);
    let (mut w, mut now) = join_one(&mut c);
    assert_eq!(c.window.open(), lag as usize + 1, "a run starts at the cap");
    let mut behind = 0;
    while c.replica.step < 20 {
        now += Duration::from_millis(1);
        let jobs: Vec<(u64, u64, u64, usize)> = jobs_sent(&mut w, 1)
            .into_iter()
            .map(|j| (j.step, j.version, j.job, j.members.len()))
            .collect();
        assert!(!jobs.is_empty(), "the volunteer always gets work back");
        for (step, version, job, n) in jobs {
            assert!(
                version <= step && version + lag as u64 >= c.replica.step,
                "step {step} at version {version}"
            );
            assert!(
                version <= c.replica.step,
                "a version the replicas do not have yet"
            );
            behind = behind.max(step - version);
            let losses = vec![1.0; n];
            c.handle(
                Input::Message {
                    client: 1,
                    msg: reply(&c, step, job, losses),
                },
                now,
                &mut w,
            );
        }
    }
    assert!(c.window.open() > 1, "the window grew");
    assert!(
        (1..=lag as u64).contains(&behind),
        "steps in flight were evaluated {behind} updates behind"
    );
}

/// Client 1 connected and past its Hello, at the returned time.
fn join_one(c: &mut Coordinator) -> (Wires, Instant) {
    let mut w = Wires::default();
    let t0 = Instant::now();
    connect(c, &mut w, 1, t0);
    let hello = Input::Message {
        client: 1,
        msg: simulated(None),
    };
    c.handle(hello, t0, &mut w);
    (w, t0)
}

/// A job as a client received it.
#[derive(Debug)]
struct SentJob {
    step: u64,
    version: u64,
    floating: bool,
    job: u64,
    members: Vec<u32>,
}

/// The jobs sent to `id` since the last drain, in order.
fn jobs_sent(w: &mut Wires, id: ClientId) -> Vec<SentJob> {
    drain(w, id)
        .0
        .into_iter()
        .filter_map(|m| match m {
            ServerMsg::Job {
                step,
                version,
                floating,
                job,
                members,
                ..
            } => Some(SentJob {
                step,
                version,
                floating,
                job,
                members,
            }),
            _ => None,
        })
        .collect()
}

/// A relay's Hello, before its first Capacity.
fn relay_hello() -> ClientMsg {
    ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind: ClientKind::Relay,
        threads: 1,
        speed: 0.0,
        session: None,
        name: String::new(),
    }
}

/// A relay is one client sized by its volunteers together: its Capacity
/// raises its threads past a volunteer's cap and sets its speed, so its
/// jobs grow to whole steps; a volunteer's Capacity changes nothing.
#[test]
fn a_relays_capacity_sizes_its_jobs() {
    let mut c = coordinator();
    let (mut w, t0) = join_one(&mut c);
    let population = c.replica.config.es.population as usize;
    c.handle(
        Input::Capacity {
            client: 1,
            threads: 5_000,
            speed: 1e6,
        },
        t0,
        &mut w,
    );
    assert_eq!(
        c.clients[&1].hello,
        Some((ClientKind::Simulated, 1)),
        "not a relay"
    );
    connect(&mut c, &mut w, 2, t0);
    c.handle(
        Input::Message {
            client: 2,
            msg: relay_hello(),
        },
        t0,
        &mut w,
    );
    c.handle(
        Input::Capacity {
            client: 2,
            threads: 5_000,
            speed: 1e6,
        },
        t0,
        &mut w,
    );
    assert_eq!(c.clients[&2].hello, Some((ClientKind::Relay, 5_000)));
    assert_eq!(c.clients[&2].speed, 1e6);
    assert_eq!(c.job_size(&c.clients[&2]), population, "a whole step");
}

/// A volunteer much slower than the median (a tab among native workers)
/// gets part of a step, sized to take about `SPREAD` times the median's
/// whole step; one within `SPREAD` of it, or faster, and a relay however
/// slow, get whole steps. One volunteer far faster than the rest (a job on
/// saved-up CPU share) does not move the median.
#[test]
fn a_slow_volunteer_gets_part_of_a_step() {
    let mut c = lagged_coordinator(7, true);
    let population = c.replica.config.es.population as usize;
    let (mut w, t0) = join_one(&mut c);
    for id in 2..=5 {
        connect(&mut c, &mut w, id, t0);
        let msg = if id == 5 { relay_hello() } else { simulated(None) };
        c.handle(Input::Message { client: id, msg }, t0, &mut w);
    }
    for (id, speed) in [(1, 1000.0), (2, 1000.0), (3, 700.0), (4, 20_000.0), (5, 100.0)] {
        c.clients.get_mut(&id).unwrap().speed = speed;
    }
    assert_eq!(
        c.job_size(&c.clients[&3]),
        population,
        "no median yet: whole steps"
    );
    c.note_typical();
    assert_eq!(
        c.typical_speed, 1000.0,
        "the relay does not count, the fast one is one of four"
    );
    assert_eq!(c.job_size(&c.clients[&1]), population);
    assert_eq!(c.job_size(&c.clients[&4]), population);
    assert_eq!(
        c.job_size(&c.clients[&3]),
        population,
        "0.7 of the median is within SPREAD"
    );
    assert_eq!(
        c.job_size(&c.clients[&5]),
        population,
        "a relay balances its own volunteers"
    );
    c.clients.get_mut(&3).unwrap().speed = 250.0;
    let part = c.job_size(&c.clients[&3]);
    let want = (population as f64 * super::scheduler::SPREAD * 0.25).ceil() as usize;
    assert!(
        part < population,
        "a quarter of the median's speed: part of a step ({part})"
    );
    assert_eq!(part, want.max(2));
}

/// A client that announces its speed: it takes whole steps.
fn fast() -> ClientMsg {
    ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind: ClientKind::Simulated,
        threads: 1,
        speed: 1e6,
        session: None,
        name: String::new(),
    }
}

/// A job of a whole step with no member replicated (here: handed out
/// while its volunteer was alone) floats; its result may be at any version
/// from the job's to the step that the coordinator has made, and that
/// version becomes the step's: members checked once a second volunteer
/// has joined are checked at it (pinned), and a check at another version,
/// or a result at a version not made yet, drops its sender.
#[test]
fn a_floating_step_binds_at_its_first_result() {
    let join = |c: &mut Coordinator, w: &mut Wires, id, now| {
        connect(c, w, id, now);
        c.handle(
            Input::Message {
                client: id,
                msg: fast(),
            },
            now,
            w,
        );
    };
    // Two steps open from the start: the second is evaluated at version 0.
    let two_open = || {
        let mut c = lagged_coordinator(1, false);
        c.window.closed(3.0, true);
        c.open_steps(Instant::now());
        assert_eq!(c.open.len(), 2);
        c
    };
    // A result at a version the coordinator has not made is a lie.
    let t0 = Instant::now();
    let mut liar = two_open();
    let mut lw = Wires::default();
    join(&mut liar, &mut lw, 1, t0);
    let lj = jobs_sent(&mut lw, 1);
    assert_eq!((lj[1].step, lj[1].version), (1, 0), "{lj:?}");
    let msg = ClientMsg::Losses {
        step: 1,
        job: lj[1].job,
        behind: 0,
        losses: vec![1.0; 8],
    };
    liar.handle(Input::Message { client: 1, msg }, t0, &mut lw);
    assert!(!liar.clients.contains_key(&1), "version 1 is not made yet");

    let mut c = two_open();
    let mut w = Wires::default();
    join(&mut c, &mut w, 1, t0);
    let first = jobs_sent(&mut w, 1);
    assert!(
        first.iter().all(|j| j.floating && j.members.len() == 8),
        "whole steps float: {first:?}"
    );
    let (j0, j1) = (&first[0], &first[1]);
    assert_eq!((j0.step, j1.step, j1.version), (0, 1, 0));
    // Step 0 closes at its own version (one client: nobody checks it).
    c.handle(
        Input::Message {
            client: 1,
            msg: reply(&c, 0, j0.job, vec![1.0; 8]),
        },
        t0,
        &mut w,
    );
    assert_eq!(c.replica.step, 1);
    // A second client joins with nothing to do (client 1 holds both open
    // steps); client 1 answers step 1 at version 1, which it now holds,
    // and its claims are checked by the second.
    join(&mut c, &mut w, 2, t0);
    w.clear();
    let msg = ClientMsg::Losses {
        step: 1,
        job: j1.job,
        behind: 0,
        losses: vec![1.0; 8],
    };
    c.handle(Input::Message { client: 1, msg }, t0, &mut w);
    assert!(c.clients.contains_key(&1), "version 1 is allowed");
    let step1 = &c.open[c.open_index(1).expect("open: its claims await a check")];
    assert!(
        step1.bound && step1.version == 1,
        "bound at the first result's version"
    );
    let checks: Vec<SentJob> = jobs_sent(&mut w, 2).into_iter().filter(|j| j.step == 1).collect();
    assert!(!checks.is_empty(), "the claims are checked");
    assert!(
        checks.iter().all(|j| !j.floating && j.version == 1),
        "checked at the version they were made at: {checks:?}"
    );
    // A check answered at another version drops its sender.
    let msg = ClientMsg::Losses {
        step: 1,
        job: checks[0].job,
        behind: 1,
        losses: vec![1.0; checks[0].members.len()],
    };
    c.handle(Input::Message { client: 2, msg }, t0, &mut w);
    assert!(
        !c.clients.contains_key(&2),
        "a pinned job answered at another version"
    );
}

/// The jobs sent to clients 1 and 2 since the last drain, with whom.
fn both_sent(w: &mut Wires) -> Vec<(ClientId, SentJob)> {
    [1, 2]
        .into_iter()
        .flat_map(|id| jobs_sent(w, id).into_iter().map(move |j| (id, j)))
        .collect()
}

/// With a second volunteer ready, a whole step handed out has members
/// replicated, so it does not float, and their checks go to the other
/// volunteer at once, at the same version, before any result: over a
/// network the step then waits one round trip, not two.
#[test]
fn replicated_members_go_out_with_their_step() {
    let mut c = lagged_coordinator(1, false);
    let mut w = Wires::default();
    let t0 = Instant::now();
    for id in [1, 2] {
        connect(&mut c, &mut w, id, t0);
        let hello = Input::Message {
            client: id,
            msg: fast(),
        };
        c.handle(hello, t0, &mut w);
    }
    // Client 1 got the steps open at the start alone (its hello came
    // first): its members are checked by client 2 once it answers. Answer
    // them in full; step 2 opens with both volunteers ready.
    let mut sent: Vec<(ClientId, SentJob)> = Vec::new();
    while c.replica.step < 2 {
        sent.extend(both_sent(&mut w));
        let step = c.replica.step;
        let (id, j) = sent.remove(
            sent.iter()
                .position(|(_, j)| j.step == step)
                .expect("the oldest open step has a job out"),
        );
        let losses = j.members.iter().map(|&m| m as f32).collect();
        c.handle(
            Input::Message {
                client: id,
                msg: reply(&c, step, j.job, losses),
            },
            t0,
            &mut w,
        );
    }
    sent.extend(both_sent(&mut w));
    let step1: Vec<&(ClientId, SentJob)> = sent.iter().filter(|(_, j)| j.step == 2).collect();
    assert_eq!(step1.len(), 2, "a copy and its check: {sent:?}");
    assert_ne!(step1[0].0, step1[1].0, "on two volunteers");
    assert!(
        step1
            .iter()
            .all(|(_, j)| !j.floating && j.version == step1[0].1.version),
        "{step1:?}"
    );
    // Each has been confirmed a few times by now: some of its members are
    // checked, not all.
    let (whole, check) = if step1[0].1.members.len() == 8 {
        (&step1[0].1, &step1[1].1)
    } else {
        (&step1[1].1, &step1[0].1)
    };
    assert_eq!(whole.members.len(), 8, "one copy of the whole step: {step1:?}");
    assert!(
        !check.members.is_empty() && check.members.iter().all(|m| whole.members.contains(m)),
        "{step1:?}"
    );
    // Both answer alike: the step closes on the two results.
    for (id, j) in step1 {
        assert_eq!(c.replica.step, 2);
        let losses = j.members.iter().map(|&m| m as f32).collect();
        c.handle(
            Input::Message {
                client: *id,
                msg: reply(&c, 2, j.job, losses),
            },
            t0,
            &mut w,
        );
    }
    assert_eq!(c.replica.step, 3, "closed without another round trip");
    assert!(c.clients.values().all(|cl| cl.agreed > 0), "both confirmed");
}

/// Answers client 1's live jobs until the replica's step moves past
/// `step`; returns the hash every replica must have there.
fn close_through(c: &mut Coordinator, w: &mut Wires, step: u64, now: Instant) -> u64 {
    while c.replica.step <= step {
        let live: Vec<(u64, u64, Vec<u32>)> = c.clients[&1]
            .jobs
            .iter()
            .filter_map(|&j| c.sched.jobs.get(j).map(|jb| (j, jb.step, jb.members.to_vec())))
            .collect();
        assert!(!live.is_empty(), "a lone volunteer always holds work");
        for (job, s, members) in live {
            let losses = members.iter().map(|&m| (m % 7) as f32).collect();
            let msg = reply(c, s, job, losses);
            c.handle(Input::Message { client: 1, msg }, now, w);
        }
    }
    c.replica.hash()
}

/// Snapshots and the close code sent to client 1 since the last drain.
fn snapshots(w: &mut Wires) -> (usize, Option<u16>, Option<bool>) {
    let (msgs, code) = drain(w, 1);
    let snaps = msgs
        .iter()
        .filter(|m| matches!(m, ServerMsg::Snapshot { .. }))
        .count();
    let retry = msgs.iter().find_map(|m| match m {
        ServerMsg::Reject { retry, .. } => Some(*retry),
        _ => None,
    });
    (snaps, code, retry)
}

/// Every update is hashed, so a diverged replica's reports from before its
/// snapshot landed are on the wire: they get no second snapshot. A replica
/// that matches after its snapshot starts afresh; one that diverges from
/// `max_resyncs` snapshots in a row is refused, not sent the model again
/// at every step.
#[test]
fn a_diverged_replica_gets_one_snapshot_and_one_that_keeps_diverging_is_refused() {
    let mut c = coordinator();
    let (mut w, t0) = join_one(&mut c);
    let hash = |c: &mut Coordinator, w: &mut Wires, step: u64, hash: u64| {
        let msg = ClientMsg::Hash { step, hash };
        c.handle(Input::Message { client: 1, msg }, t0, w);
    };
    assert_eq!(snapshots(&mut w), (1, None, None), "the joiner's snapshot");
    let right = close_through(&mut c, &mut w, 0, t0);
    assert_eq!(c.replica.step, 1);
    hash(&mut c, &mut w, 1, right);
    assert_eq!(snapshots(&mut w).0, 0, "a matching hash");
    hash(&mut c, &mut w, 1, right ^ 1);
    assert_eq!(snapshots(&mut w), (1, None, None), "diverged: one snapshot");
    hash(&mut c, &mut w, 1, right ^ 2);
    assert_eq!(
        snapshots(&mut w),
        (0, None, None),
        "from before the snapshot: nothing"
    );
    let right = close_through(&mut c, &mut w, 1, t0);
    hash(&mut c, &mut w, 2, right);
    assert_eq!(c.counters.divergences, 1);
    // Diverging again and again, from each fresh snapshot.
    assert_eq!(c.settings.max_resyncs, 3);
    for (k, step) in (2..=4).enumerate() {
        let right = close_through(&mut c, &mut w, step, t0);
        hash(&mut c, &mut w, step + 1, right ^ 1);
        assert_eq!(snapshots(&mut w), (1, None, None), "snapshot {} in a row", k + 1);
    }
    let right = close_through(&mut c, &mut w, 5, t0);
    hash(&mut c, &mut w, 6, right ^ 1);
    let (snaps, code, retry) = snapshots(&mut w);
    assert_eq!(
        (snaps, code, retry),
        (0, Some(close::POLICY), Some(false)),
        "refused"
    );
    assert!(!c.clients.contains_key(&1));
    assert_eq!(c.counters.divergences, 1 + c.settings.max_resyncs as u64);
}
