//! Bad input: every hostile client is rejected with a clear reason and
//! disconnected, while an honest worker keeps training undisturbed.

use std::time::Duration;

use seedling_core::protocol::{ClientKind, ClientMsg, ServerMsg, SessionToken};
use seedling_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_rejected_and_nobody_else_notices() {
    // Unbounded and frozen by the operator at the end: a bounded run could
    // finish before the hostile clients get their jobs.
    let mut opts = tiny_options(test_settings(1_000_000));
    opts.admin_token = Some("hostile".into());
    let server = start(opts).await;
    let url = ws_url(&server);
    let honest = spawn_worker(&url, 1);
    wait_for(&server, Duration::from_secs(60), "step 2", |s| s.step >= 2).await;

    let mut reasons = Vec::new();

    // A non-finite loss.
    let mut c = RawClient::join(&url).await;
    let (step, job, members) = c.next_job().await.unwrap();
    let losses = vec![f32::NAN; members.len()];
    c.answer(step, job, losses).await;
    reasons.push(("NaN loss", c.expect_rejection().await, "NaN or infinite", true));

    // More losses than the job has members.
    let mut c = RawClient::join(&url).await;
    let (step, job, members) = c.next_job().await.unwrap();
    let losses = vec![1.0; members.len() + 1];
    c.answer(step, job, losses).await;
    reasons.push(("too many losses", c.expect_rejection().await, "members", true));

    // Fewer.
    let mut c = RawClient::join(&url).await;
    let (step, job, members) = c.next_job().await.unwrap();
    let losses = vec![1.0; members.len() - 1];
    c.answer(step, job, losses).await;
    reasons.push(("too few losses", c.expect_rejection().await, "members", true));

    // A result for a step and job never issued to this client.
    let mut c = RawClient::join(&url).await;
    c.send(&ClientMsg::Losses {
        step: 9_999,
        job: 1,
        behind: 0,
        losses: vec![1.0],
    })
    .await;
    reasons.push(("forged step", c.expect_rejection().await, "never issued", true));

    // An oversized frame.
    let mut c = RawClient::join(&url).await;
    c.send_bytes(oversized_frame()).await;
    reasons.push(("oversized frame", c.expect_rejection().await, "exceeds", true));

    // Random bytes.
    let mut c = RawClient::connect(&url).await;
    c.send_bytes(vec![0xff, 0x13, 0x37, 0x00, 0xee]).await;
    reasons.push(("random bytes", c.expect_rejection().await, "decode", true));

    // A wrong protocol version, in the first frame and in the URL.
    let wrong = ClientMsg::Hello {
        version: 999,
        kind: ClientKind::Native,
        threads: 1,
        speed: 0.0,
        session: None,
        name: String::new(),
    };
    let mut c = RawClient::connect(&url).await;
    c.send(&wrong).await;
    let in_frame = c.expect_rejection().await;
    let in_url = RawClient::connect_saying(&url, &wrong)
        .await
        .expect_rejection()
        .await;
    for (what, got) in [("wrong version", in_frame), ("wrong version in the URL", in_url)] {
        reasons.push((what, got, "protocol version", false));
    }

    // Something else than a Hello in the URL.
    let mut c = RawClient::connect_saying(&url, &ClientMsg::Hash { step: 0, hash: 0 }).await;
    reasons.push(("no Hello in the URL", c.expect_rejection().await, "Hello", true));

    // A Hello in the URL and another in the first frame.
    let mut c = RawClient::connect_saying(&url, &hello(None)).await;
    assert!(matches!(c.recv().await, Some(ServerMsg::Welcome { .. })));
    c.send(&hello(None)).await;
    reasons.push(("two Hellos", c.expect_rejection().await, "second Hello", true));

    // A hello parameter that is not base64 is refused before the upgrade.
    for query in ["hello=%%%", "hello=AAAA&hello=AAAA"] {
        let refused = tokio_tungstenite::connect_async(format!("{url}?{query}")).await;
        assert!(
            matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 400),
            "{query}: {refused:?}"
        );
    }

    // Work before the handshake.
    let mut c = RawClient::connect(&url).await;
    c.send(&ClientMsg::Hash { step: 0, hash: 0 }).await;
    reasons.push(("no handshake", c.expect_rejection().await, "Hello", true));

    // A replica that diverges again from every snapshot it is sent: a few
    // snapshots, then refused for good (another would not help).
    let mut c = RawClient::join(&url).await;
    let (snapshots, rejection) = c.diverge_until_refused().await;
    let resyncs = seedling_server::coordinator::Settings::default().max_resyncs;
    assert_eq!(snapshots, resyncs, "one per divergence");
    reasons.push(("diverging", rejection, "diverged again", false));

    // Only another protocol version and a broken replica are refused for
    // good: reconnecting cannot help them, while the other faults may be
    // one bad connection.
    for (what, (got, retry), want, want_retry) in &reasons {
        assert!(
            got.contains(want),
            "{what}: reason {got:?} does not mention {want:?}"
        );
        assert_eq!(retry, want_retry, "{what}: may it retry?");
    }

    let auth = "Authorization: Bearer hostile\r\n";
    let (head, _) = http_request(server.addr, "POST", "/admin/pause", auth).await;
    assert!(head.contains("200"), "{head}");
    let s = wait_for(
        &server,
        Duration::from_secs(120),
        "the honest worker to agree with the paused server",
        all_replicas_agree,
    )
    .await;
    assert_eq!(s.rejected_clients, reasons.len() as u64);
    assert_eq!(s.divergences, resyncs as u64, "the diverging client's only");
    assert_eq!(s.client_hashes.len(), 1, "only the honest worker is left");
    honest.stop().await;
    server.shutdown().await.unwrap();
}

/// A volunteer that answers every job with made-up losses. Returns why it
/// was disconnected and its session token.
async fn liar(
    url: String,
    lie: fn(u32) -> f32,
    go: tokio::sync::oneshot::Receiver<()>,
) -> (String, SessionToken) {
    let mut c = RawClient::join(&url).await;
    let mut go = Some(go);
    loop {
        match c.recv_or_close().await {
            Ok(ServerMsg::Job {
                step, job, members, ..
            }) => {
                // The first answer waits for the honest workers: a lone
                // volunteer's results have nobody to check them and count
                // as they are (a run must progress with one volunteer), so
                // a liar answering alone would be testing that, not this.
                if let Some(go) = go.take() {
                    let _ = go.await;
                }
                let losses = members.iter().map(|&m| lie(m)).collect();
                c.answer(step, job, losses).await;
            }
            Ok(ServerMsg::Reject { reason, retry }) => {
                // Banned: reconnecting cannot help.
                assert!(!retry, "a liar's ban is final: {reason}");
                return (reason, c.session);
            }
            Ok(_) => {}
            Err(close) => return (format!("closed: {close}"), c.session),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liars_are_outvoted_and_disconnected() {
    let steps = 15;
    let clean = clean_run_hash(tiny_options(test_settings(steps)), &[1, 1, 1, 1]).await;
    for (name, lie) in [
        ("lowest loss", (|_| 0.0) as fn(u32) -> f32),
        ("random losses", |m| (m % 7) as f32),
    ] {
        let server = start(tiny_options(test_settings(steps))).await;
        let url = ws_url(&server);
        // The liar joins first, so it is handed work before anyone can check it.
        let (go, ready) = tokio::sync::oneshot::channel();
        let liar = tokio::spawn(liar(url.clone(), lie, ready));
        wait_for(&server, Duration::from_secs(10), "the liar", |s| {
            s.volunteers.total == 1
        })
        .await;
        let w: Vec<_> = (0..4).map(|_| spawn_worker(&url, 1)).collect();
        wait_for(&server, Duration::from_secs(30), "the honest workers", |s| {
            s.volunteers.total == 5
        })
        .await;
        let _ = go.send(());
        let (reason, token) = liar.await.unwrap();
        assert!(reason.contains("disagreed"), "{name}: liar left with {reason:?}");
        let at = server.status().step;
        // Coming back with its session token does not wash its record.
        let mut again = RawClient::connect(&url).await;
        again.send(&hello(Some(token))).await;
        match again.recv_or_close().await {
            Ok(ServerMsg::Reject { reason, retry }) => {
                assert!(reason.contains("cannot rejoin"), "{name}: {reason:?}");
                assert!(!retry, "{name}: a banned session is refused for good");
            }
            other => panic!("{name}: a banned session was not refused: {other:?}"),
        }
        assert_eq!(again.close_code().await, 1008, "{name}: policy violation");
        wait_for(&server, Duration::from_secs(5), "the ban in the status", |s| {
            s.banned_sessions == 1
        })
        .await;
        let s = wait_for(&server, Duration::from_secs(120), "the run to finish", |s| {
            s.finished && all_replicas_agree(s)
        })
        .await;
        println!(
            "{name}: liar disconnected at step {at}, {} disagreements",
            s.disagreements
        );
        assert!(at <= 2, "{name}: liar detected only at step {at}");
        assert_eq!(s.liars_disconnected, 1);
        assert_eq!(s.rejected_clients, 2, "{name}: the liar, then its banned session");
        assert_eq!(s.hash, clean, "{name}: the liar changed the weights");
        for w in w {
            w.stop().await;
        }
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_reconnect_keeps_its_trust() {
    let mut opts = tiny_options(test_settings(100_000));
    opts.admin_token = Some("s3cret".into());
    let auth = "Authorization: Bearer s3cret\r\n";
    let server = start(opts).await;
    let url = ws_url(&server);
    // Three workers: new ones' results are checked by each other, and every
    // agreement is trust.
    let workers: Vec<_> = (0..3).map(|_| spawn_worker(&url, 1)).collect();
    wait_for(&server, Duration::from_secs(60), "some trust", |s| {
        s.client_hashes.values().filter(|c| c.trust >= 3).count() == 3
    })
    .await;
    // Freeze the books: no new jobs, and what was in flight lands.
    let (head, _) = http_request(server.addr, "POST", "/admin/pause", auth).await;
    assert!(head.contains("200"), "{head}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.status();
    let (&id, report) = before.client_hashes.iter().next().unwrap();
    let trust = report.trust;
    assert!(trust >= 3);
    let (head, _) = http_request(server.addr, "POST", &format!("/admin/kick?client={id}"), auth).await;
    assert!(head.contains("200"), "{head}");
    // The worker reconnects on its own, presenting its session token.
    let s = wait_for(&server, Duration::from_secs(30), "the worker to come back", |s| {
        s.client_hashes.len() == 3 && !s.client_hashes.contains_key(&id)
    })
    .await;
    let new = s
        .client_hashes
        .keys()
        .find(|k| !before.client_hashes.contains_key(k))
        .unwrap();
    assert_eq!(
        s.client_hashes[new].trust, trust,
        "the session's trust carried over"
    );
    // A newcomer starts from nothing, and a token the server never issued
    // buys nothing either: it gets a fresh one.
    let mut fresh = RawClient::resume(&url, Some([1; 16])).await;
    assert_ne!(fresh.session, [1; 16]);
    let hash = u64::from_str_radix(&s.hash, 16).unwrap();
    fresh.send(&ClientMsg::Hash { step: s.step, hash }).await;
    let s = wait_for(&server, Duration::from_secs(10), "the newcomer's report", |s| {
        s.client_hashes.contains_key(&fresh.id)
    })
    .await;
    assert_eq!(s.client_hashes[&fresh.id].trust, 0);
    // Presenting a live session's token takes the session over (a reconnect
    // that beats the old connection's timeout); the old connection is closed.
    let twin = RawClient::resume(&url, Some(fresh.session)).await;
    assert_eq!(twin.session, fresh.session);
    assert_eq!(fresh.close_code().await, 1008);
    assert_eq!(server.status().banned_sessions, 0);
    for w in workers {
        w.stop().await;
    }
    server.shutdown().await.unwrap();
}
