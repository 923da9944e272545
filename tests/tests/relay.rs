//! Relays over a real NATS server: a coordinator with `--nats`, relays in
//! front of it, native workers on the relays; the run must end where the
//! same run done directly ends.

use std::time::{Duration, Instant};

use seedling_core::protocol::{ClientKind, ClientMsg, PROTOCOL_VERSION, ServerMsg};
use seedling_server::app::ServeOptions;
use seedling_server::app::Server;
use seedling_server::relay::Relay;
use seedling_tests::nats::*;
use seedling_tests::*;

const LONG: Duration = Duration::from_secs(120);

/// The tiny run with a fixed lag: which weights a step is evaluated at,
/// and (all members counted) which members count, depend on the step
/// alone, so a relayed run, a direct run and a faulty run agree bit for bit.
fn options(steps: u64) -> ServeOptions {
    let mut opts = tiny_options(test_settings(steps));
    opts.config.es.lag = 2;
    opts.settings.fixed_lag = true;
    opts
}

/// Waits until the run is finished and every volunteer on `relays` reports
/// the coordinator's final hash at its final step; returns that hash.
async fn wait_relayed_end(server: &Server, relays: &[&Relay], volunteers: usize, what: &str) -> String {
    wait_relayed_agree(server, relays, volunteers, what, |s| s.finished).await
}

/// Waits until `settled` holds for the coordinator's status and every
/// replica, the relays' and their `volunteers` volunteers', reports the
/// coordinator's hash at its step; returns that hash.
async fn wait_relayed_agree(
    server: &Server,
    relays: &[&Relay],
    volunteers: usize,
    what: &str,
    settled: impl Fn(&seedling_server::coordinator::types::Status) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let s = server.status();
        let reports: Vec<_> = relays.iter().flat_map(|r| r.reports().into_values()).collect();
        let done = settled(&s)
            && reports.len() == volunteers
            && reports.iter().all(|r| r.step == s.step && r.hash == s.hash)
            && relays.iter().all(|r| r.status().hash == s.hash);
        if done {
            return s.hash;
        }
        assert!(
            start.elapsed() < LONG,
            "timed out waiting for {what}: step {} finished {} hash {} relays {:?} reports {reports:?}",
            s.step,
            s.finished,
            s.hash,
            relays.iter().map(|r| r.status()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (1) Two relays with two workers each train as one server would: every
/// volunteer ends at the coordinator's hash, which is the direct run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_train_like_one_server() {
    let steps = 12;
    let want = clean_run_hash(options(steps), &[1, 2]).await;
    let nats = NatsServer::start();
    let server = start(with_nats(options(steps), &nats, "t1")).await;
    let r1 = start_relay(&nats, "t1", "r1", test_hub()).await;
    let r2 = start_relay(&nats, "t1", "r2", test_hub()).await;
    let workers = [
        spawn_worker(&relay_url(&r1), 1),
        spawn_worker(&relay_url(&r1), 2),
        spawn_worker(&relay_url(&r2), 1),
        spawn_worker(&relay_url(&r2), 1),
    ];
    let hash = wait_relayed_end(&server, &[&r1, &r2], 4, "the relayed run to finish").await;
    let s = server.status();
    assert_eq!(hash, want, "the relayed run ends where the direct run does");
    assert_eq!(
        s.volunteers.relay, 2,
        "the coordinator sees two clients, both relays"
    );
    assert_eq!(s.rejected_clients, 0);
    assert!(
        s.client_hashes
            .values()
            .all(|c| c.kind == "relay" && c.members > 0)
    );
    // Each relay checks its strangers' first chunks, and fewer as they
    // earn trust (`max(replicate, 4 / (4 + trust))`), as the coordinator does.
    for r in [&r1, &r2] {
        let (st, reports) = (r.status(), r.reports());
        assert!(
            st.replicated > 0 && st.replicated < st.chunks,
            "some chunks checked, not all: {st:?}"
        );
        assert!(
            reports.values().all(|v| v.trust > 0),
            "every volunteer earned trust: {reports:?}"
        );
        assert_eq!(st.disagreements, 0);
    }
    for w in workers {
        w.stop().await;
    }
    r1.kill();
    r2.kill();
    server.shutdown().await.unwrap();
}

/// (2) A relay killed mid-run: the coordinator reissues its jobs, its
/// volunteers start again on the other relay, and the run ends at the
/// fault-free hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_run_changes_nothing() {
    let steps = 40;
    let want = clean_run_hash(options(steps), &[1, 2]).await;
    let nats = NatsServer::start();
    let server = start(with_nats(options(steps), &nats, "t2")).await;
    let r1 = start_relay(&nats, "t2", "r1", test_hub()).await;
    let r2 = start_relay(&nats, "t2", "r2", test_hub()).await;
    let on_r1 = [spawn_worker(&relay_url(&r1), 1), spawn_worker(&relay_url(&r1), 1)];
    let on_r2 = spawn_worker(&relay_url(&r2), 1);
    let at = wait_for(&server, LONG, "step 8", |s| s.step >= 8).await.step;
    assert!(at < steps, "the run ended before the fault");
    r1.kill();
    for w in on_r1 {
        w.kill();
    }
    // Its volunteers come back through the other relay.
    let moved = [spawn_worker(&relay_url(&r2), 1), spawn_worker(&relay_url(&r2), 1)];
    let hash = wait_relayed_end(&server, &[&r2], 3, "the run to finish on one relay").await;
    assert_eq!(hash, want, "killing a relay changed the weights");
    let s = server.status();
    assert!(
        s.reissued_jobs > 0 || s.step > at,
        "the dead relay's work was redone"
    );
    // The dead relay counts as gone once it has been silent for a while,
    // which may be after the run's end.
    wait_for(&server, LONG, "the dead relay to be dropped", |s| {
        s.volunteers.relay == 1
    })
    .await;
    for w in moved {
        w.stop().await;
    }
    on_r2.stop().await;
    r2.kill();
    server.shutdown().await.unwrap();
}

/// (3) Hostile frames to a relay drop only their sender: the relay
/// rejects each as the coordinator would, the coordinator sees nothing
/// wrong with the relay, and training goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_frames_to_a_relay_drop_only_their_sender() {
    let nats = NatsServer::start();
    let server = start(with_nats(tiny_options(test_settings(1_000_000)), &nats, "t3")).await;
    let relay = start_relay(&nats, "t3", "r1", test_hub()).await;
    let url = relay_url(&relay);
    let honest = spawn_worker(&url, 1);
    wait_for(&server, LONG, "step 2", |s| s.step >= 2).await;
    let mut reasons = Vec::new();

    // A non-finite loss.
    let mut c = RawClient::join(&url).await;
    let (step, job, members) = c.next_job().await.unwrap();
    let losses = vec![f32::NAN; members.len()];
    c.answer(step, job, losses).await;
    reasons.push(("NaN loss", c.expect_rejection().await, "NaN or infinite"));

    // More losses than the chunk has members.
    let mut c = RawClient::join(&url).await;
    let (step, job, members) = c.next_job().await.unwrap();
    let losses = vec![1.0; members.len() + 1];
    c.answer(step, job, losses).await;
    reasons.push(("too many losses", c.expect_rejection().await, "losses"));

    // An oversized frame.
    let mut c = RawClient::join(&url).await;
    c.send_bytes(oversized_frame()).await;
    reasons.push(("oversized frame", c.expect_rejection().await, "exceeds"));

    // Random bytes.
    let mut c = RawClient::connect(&url).await;
    c.send_bytes(vec![0xff, 0x13, 0x37, 0x00, 0xee]).await;
    reasons.push(("random bytes", c.expect_rejection().await, "decode"));

    // A volunteer claiming to be a relay.
    let mut c = RawClient::connect(&url).await;
    c.send(&ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind: ClientKind::Relay,
        threads: 1_000_000,
        speed: 0.0,
        session: None,
        name: String::new(),
    })
    .await;
    reasons.push(("relay kind", c.expect_rejection().await, "relay"));

    // Work before the handshake.
    let mut c = RawClient::connect(&url).await;
    c.send(&ClientMsg::Hash { step: 0, hash: 0 }).await;
    reasons.push(("no handshake", c.expect_rejection().await, "Hello"));

    for (what, (got, _), want) in &reasons {
        assert!(
            got.contains(want),
            "{what}: reason {got:?} does not mention {want:?}"
        );
    }
    let before = server.status().step;
    let s = wait_for(&server, LONG, "training to go on", |s| s.step >= before + 5).await;
    assert_eq!(s.rejected_clients, 0, "the coordinator kept the relay");
    assert_eq!(s.volunteers.relay, 1);
    // The relay publishes its figures every `relay::PUBLISH`: wait for
    // the ones that count the rejections.
    let status = wait_relay(&relay, LONG, "the relay's figures", |r| {
        r.rejected >= reasons.len() as u64
    })
    .await;
    assert_eq!(status.rejected, reasons.len() as u64);
    assert_eq!(relay.reports().len(), 1, "only the honest worker is left");
    // A stranger cannot claim to be a relay on the coordinator's /ws either.
    let mut c = RawClient::connect(&ws_url(&server)).await;
    c.send(&ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind: ClientKind::Relay,
        threads: 1,
        speed: 0.0,
        session: None,
        name: String::new(),
    })
    .await;
    let (reason, _) = c.expect_rejection().await;
    assert!(reason.contains("NATS"), "{reason}");
    // A replica that diverges again from every snapshot its relay sends:
    // refused for good after `max_resyncs` of them. (It never answers its
    // chunks either: see `a_volunteer_that_never_answers_cannot_stall_its_relay`.)
    let r2 = start_relay(&nats, "t3", "r2", test_hub()).await;
    let honest2 = spawn_worker(&relay_url(&r2), 1);
    let mut c = RawClient::join(&relay_url(&r2)).await;
    let (snapshots, (reason, retry)) = c.diverge_until_refused().await;
    assert_eq!(snapshots, test_hub().max_resyncs, "one per divergence");
    assert!(reason.contains("diverged again") && !retry, "{reason}");
    honest2.stop().await;
    r2.kill();
    honest.stop().await;
    relay.kill();
    server.shutdown().await.unwrap();
}

/// A volunteer lying to its relay is outvoted there and banned, and the run
/// ends at the fault-free hash: the relay checks its volunteers as the
/// coordinator checks its clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_liar_behind_a_relay_is_outvoted_and_banned() {
    let steps = 30;
    let want = clean_run_hash(options(steps), &[1, 2]).await;
    let nats = NatsServer::start();
    let server = start(with_nats(options(steps), &nats, "t4")).await;
    let hub = seedling_server::relay::hub::HubSettings {
        replicate: 1.0,
        ..test_hub()
    };
    let relay = start_relay(&nats, "t4", "r1", hub).await;
    let url = relay_url(&relay);
    let mut liar = RawClient::join(&url).await;
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let banned = tokio::spawn(async move {
        let mut wait = Some(wait);
        loop {
            match liar.recv_or_close().await {
                Ok(ServerMsg::Job {
                    step, job, members, ..
                }) => {
                    // The first lie waits for the honest workers: alone,
                    // its results would have nobody to check them.
                    if let Some(wait) = wait.take() {
                        let _ = wait.await;
                    }
                    let losses = members.iter().map(|&m| (m % 7) as f32).collect();
                    liar.answer(step, job, losses).await;
                }
                Ok(ServerMsg::Reject { reason, retry }) => return (reason, retry),
                Ok(_) => {}
                Err(close) => return (format!("closed: {close}"), true),
            }
        }
    });
    let honest = [spawn_worker(&url, 1), spawn_worker(&url, 1)];
    let start = Instant::now();
    while relay.status().volunteers < 3 {
        assert!(start.elapsed() < LONG, "the honest workers did not join");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = go.send(());
    let (reason, retry) = banned.await.unwrap();
    assert!(reason.contains("disagreed"), "the liar left with {reason:?}");
    assert!(!retry, "a liar's ban is final");
    let hash = wait_relayed_end(&server, &[&relay], 2, "the run to finish").await;
    assert_eq!(hash, want, "the liar changed the weights");
    assert!(relay.status().disagreements >= 2);
    for w in honest {
        w.stop().await;
    }
    relay.kill();
    server.shutdown().await.unwrap();
}

/// A volunteer that takes chunks and never answers, on a relay that checks
/// every chunk: once it let a chunk expire it does not get that chunk again,
/// so a claimed chunk that only it could check is accepted as it is, and
/// the run ends at the fault-free hash while it stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volunteer_that_never_answers_cannot_stall_its_relay() {
    let steps = 10;
    let want = clean_run_hash(options(steps), &[1, 2]).await;
    let nats = NatsServer::start();
    let server = start(with_nats(options(steps), &nats, "t11")).await;
    let hub = seedling_server::relay::hub::HubSettings {
        replicate: 1.0,
        chunk_timeout: Duration::from_millis(300),
        ..test_hub()
    };
    let relay = start_relay(&nats, "t11", "r1", hub).await;
    let url = relay_url(&relay);
    let mut silent = RawClient::join(&url).await;
    let jobs = tokio::spawn(async move {
        // Reads everything (a full socket would get it dropped as slow),
        // answers nothing.
        let mut jobs = 0u32;
        while let Ok(msg) = silent.recv_or_close().await {
            jobs += matches!(msg, ServerMsg::Job { .. }) as u32;
        }
        jobs
    });
    let honest = spawn_worker(&url, 1);
    let hash = wait_relayed_end(
        &server,
        &[&relay],
        1,
        "the run to finish past the silent volunteer",
    )
    .await;
    assert_eq!(hash, want, "the silent volunteer changed the weights");
    let st = wait_relay(&relay, LONG, "the last figures", |st| st.step == steps).await;
    assert_eq!(
        st.volunteers, 2,
        "the silent volunteer is still connected: {st:?}"
    );
    assert!(st.reissued > 0, "its chunks were taken back: {st:?}");
    honest.stop().await;
    relay.kill();
    assert!(jobs.await.unwrap() > 0, "the silent volunteer was given chunks");
    server.shutdown().await.unwrap();
}

/// (4) The NATS server killed and restarted mid-run: the run stalls, then
/// resumes once NATS is back (relays and the coordinator reconnect on their
/// own) and ends at the fault-free hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_restarted_mid_run_changes_nothing() {
    let steps = 40;
    let want = clean_run_hash(options(steps), &[1, 2]).await;
    let mut nats = NatsServer::start();
    let server = start(with_nats(options(steps), &nats, "t5")).await;
    let relay = start_relay(&nats, "t5", "r1", test_hub()).await;
    let workers = [
        spawn_worker(&relay_url(&relay), 1),
        spawn_worker(&relay_url(&relay), 2),
    ];
    wait_for(&server, LONG, "step 8", |s| s.step >= 8).await;
    nats.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stalled = server.status().step;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.status().step, stalled, "no step closes without NATS");
    assert!(stalled < steps, "the run ended before the fault");
    nats.restart();
    let back = Instant::now();
    wait_for(&server, Duration::from_secs(30), "the run to resume", |s| {
        s.step > stalled
    })
    .await;
    let resumed = back.elapsed();
    assert!(
        resumed < Duration::from_secs(10),
        "resumed {resumed:?} after NATS came back"
    );
    let hash = wait_relayed_end(&server, &[&relay], 2, "the run to finish").await;
    assert_eq!(hash, want, "the NATS restart changed the weights");
    for w in workers {
        w.stop().await;
    }
    relay.kill();
    server.shutdown().await.unwrap();
}

/// A relay that lies about its volunteers' losses is caught at the
/// coordinator like a lying volunteer: to the coordinator a relay is one
/// client, its claims replicated on other clients (other relays) like any
/// volunteer's, so it is outvoted, struck and banned, and the run ends at
/// the fault-free hash through the honest relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lying_relay_is_outvoted_and_banned_at_the_coordinator() {
    let steps = 60;
    let want = clean_run_hash(options(steps), &[1, 2]).await;
    let nats = NatsServer::start();
    let server = start(with_nats(options(steps), &nats, "t6")).await;
    let hub = seedling_server::relay::hub::HubSettings {
        lie: 1.0,
        ..test_hub()
    };
    let liar = start_relay(&nats, "t6", "liar", hub).await;
    let r1 = start_relay(&nats, "t6", "r1", test_hub()).await;
    let r2 = start_relay(&nats, "t6", "r2", test_hub()).await;
    // The liar's volunteer first: the lying relay gets work before anyone
    // can check it, as the liar in the direct test does.
    let behind_liar = spawn_worker(&relay_url(&liar), 1);
    let honest = [spawn_worker(&relay_url(&r1), 1), spawn_worker(&relay_url(&r2), 1)];
    let s = wait_for(&server, LONG, "the lying relay's ban", |s| {
        s.liars_disconnected == 1 && s.banned_sessions == 1
    })
    .await;
    assert!(s.disagreements >= 1);
    let hash = wait_relayed_end(&server, &[&r1, &r2], 2, "the run to finish").await;
    assert_eq!(hash, want, "the lying relay changed the weights");
    let s = server.status();
    assert_eq!(s.volunteers.relay, 2, "the lying relay stays out");
    assert_eq!(s.liars_disconnected, 1);
    for w in honest {
        w.stop().await;
    }
    behind_liar.kill();
    liar.kill();
    r1.kill();
    r2.kill();
    server.shutdown().await.unwrap();
}

/// The training suite's faults through a relay: volunteers of the relay
/// killed mid-job, silent, or answering long after their deadline, and a
/// worker killed mid-run; the relay reissues their chunks and the run ends
/// at the fault-free hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_behind_a_relay_end_at_the_clean_hash() {
    let steps = 12;
    let want = clean_run_hash(options(steps), &[1, 2]).await;
    let nats = NatsServer::start();
    let server = start(with_nats(options(steps), &nats, "t7")).await;
    let relay = start_relay(&nats, "t7", "r1", test_hub()).await;
    let url = relay_url(&relay);
    let (sleeper, workers) = inject_faults(&server, &url).await;
    let hash = wait_relayed_end(&server, &[&relay], 2, "the faulty run to finish").await;
    assert_eq!(hash, want, "faults behind the relay changed the weights");
    let r = wait_relay(&relay, LONG, "the relay's figures", |r| r.reissued >= 2).await;
    assert_eq!(r.divergences, 0);
    assert_eq!(server.status().divergences, 0);
    drop(sleeper);
    for w in workers {
        w.stop().await;
    }
    relay.kill();
    server.shutdown().await.unwrap();
}

/// A volunteer joining a relay mid-run, with steps in flight by the fixed
/// rule, catches up from the relay's snapshot (which carries the past
/// weight versions the open steps use) and ends on the coordinator's hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_joiner_behind_a_relay_catches_up_with_steps_in_flight() {
    late_joiner_behind_a_relay(2, true, "t8").await;
}

/// The same with the window of steps in flight following the volunteers:
/// the coordinator names each job's version, and the relay's snapshot
/// carries the versions its open steps use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_joiner_behind_a_relay_catches_up_with_an_adaptive_window() {
    late_joiner_behind_a_relay(4, false, "t9").await;
}

/// The training suite's `late_joiner` through a relay: a worker trains
/// through the relay, a second joins it at step 6 or later, and once the
/// operator pauses the run every replica (the relay's and both workers')
/// holds the coordinator's hash.
async fn late_joiner_behind_a_relay(lag: u32, fixed: bool, prefix: &str) {
    // An unbounded run, frozen by the operator at the end: a bounded one
    // can finish before the joiner connects when the test thread starves.
    let mut opts = tiny_options(test_settings(1_000_000));
    opts.config.es.lag = lag;
    opts.settings.fixed_lag = fixed;
    opts.admin_token = Some("late".into());
    let nats = NatsServer::start();
    let server = start(with_nats(opts, &nats, prefix)).await;
    let relay = start_relay(&nats, prefix, "r1", test_hub()).await;
    let url = relay_url(&relay);
    let first = spawn_worker(&url, 1);
    let k = wait_for(&server, LONG, "step 6", |s| s.step >= 6).await.step;
    let joiner = spawn_worker(&url, 1);
    // The joiner reports the snapshot's step, then after each update; the
    // relay checks every report against its own replica's history.
    let start = Instant::now();
    loop {
        let reports = relay.reports();
        if reports.len() == 2 && reports.values().all(|r| r.step > k + 2) {
            break;
        }
        assert!(
            start.elapsed() < LONG,
            "the joiner did not report past step {}: {reports:?}",
            k + 2
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let auth = "Authorization: Bearer late\r\n";
    let (head, _) = http_request(server.addr, "POST", "/admin/pause", auth).await;
    assert!(head.contains("200"), "{head}");
    // Paused, the steps in flight close and every replica settles on them.
    wait_relayed_agree(&server, &[&relay], 2, "every replica to agree", |s| s.paused).await;
    assert_eq!(server.status().divergences, 0);
    assert_eq!(relay.status().divergences, 0, "the late joiner diverged");
    assert_eq!(relay.status().rejected, 0);
    first.stop().await;
    joiner.stop().await;
    relay.kill();
    server.shutdown().await.unwrap();
}

/// `/api/relays` lists a relay as long as it lives, before any volunteer
/// reaches it (so a page can find a fresh relay) and after its last one
/// leaves, and drops it within seconds of its death.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_relay_is_listed_and_a_dead_one_is_not() {
    let nats = NatsServer::start();
    let server = start(with_nats(tiny_options(test_settings(1_000_000)), &nats, "t10")).await;
    let relays = async || -> serde_json::Value {
        let (_, body) = http_get(server.addr, "/api/relays").await;
        serde_json::from_str(&body).unwrap()
    };
    let listed = async |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let start = Instant::now();
        loop {
            let list = relays().await;
            if pred(&list) {
                return start.elapsed();
            }
            assert!(start.elapsed() < LONG, "timed out waiting for {what}: {list}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let relay = start_relay(&nats, "t10", "r1", test_hub()).await;
    let url = format!("http://{}", relay.addr);
    let took = listed("the fresh relay's listing", &|l| l["r1"]["url"] == url.as_str()).await;
    assert!(took < Duration::from_secs(5), "listed after {took:?}");
    assert!(relays().await["r1"]["client"].is_null(), "no connection yet");
    // A volunteer makes it join the coordinator; once it leaves, the relay
    // leaves the coordinator and stays listed.
    let worker = spawn_worker(&relay_url(&relay), 1);
    listed("the relay's connection", &|l| l["r1"]["client"].is_u64()).await;
    worker.stop().await;
    listed("the relay's connection to end", &|l| l["r1"]["client"].is_null()).await;
    tokio::time::sleep(seedling_server::nats::PRESENCE + Duration::from_secs(1)).await;
    assert_eq!(
        relays().await["r1"]["url"],
        url.as_str(),
        "an idle relay stays listed"
    );
    relay.kill();
    let took = listed("the dead relay to leave the list", &|l| l.get("r1").is_none()).await;
    assert!(
        took < Duration::from_secs(6),
        "still listed {took:?} after its death"
    );
    server.shutdown().await.unwrap();
}
