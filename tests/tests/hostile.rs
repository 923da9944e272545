//! Bad input: every hostile client is rejected with a clear reason and
//! disconnected, while an honest worker keeps training undisturbed.

use std::time::Duration;

use seedling_core::protocol::{ClientKind, ClientMsg};
use seedling_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_rejected_and_nobody_else_notices() {
    let server = start(tiny_options(test_settings(300))).await;
    let url = ws_url(&server);
    let honest = spawn_worker(&url, 1);
    wait_for(&server, Duration::from_secs(60), "step 2", |s| s.step >= 2).await;

    let mut reasons = Vec::new();

    // A non-finite loss.
    let mut c = RawClient::join(&url).await;
    let (step, job, members) = c.next_job().await.unwrap();
    let losses = members.iter().map(|&m| (m, f32::NAN)).collect();
    c.send(&ClientMsg::Losses { step, job, losses }).await;
    reasons.push(("NaN loss", c.expect_rejected().await, "NaN or infinite"));

    // A member that was never assigned.
    let mut c = RawClient::join(&url).await;
    let (step, job, members) = c.next_job().await.unwrap();
    let losses = members.iter().map(|&m| (m + 1000, 1.0)).collect();
    c.send(&ClientMsg::Losses { step, job, losses }).await;
    reasons.push(("unassigned member", c.expect_rejected().await, "not assigned"));

    // A result for a step and job never issued to this client.
    let mut c = RawClient::join(&url).await;
    c.send(&ClientMsg::Losses {
        step: 9_999,
        job: 1,
        losses: vec![(0, 1.0)],
    })
    .await;
    reasons.push(("forged step", c.expect_rejected().await, "never issued"));

    // An oversized frame.
    let mut c = RawClient::join(&url).await;
    c.send_bytes(oversized_frame()).await;
    reasons.push(("oversized frame", c.expect_rejected().await, "exceeds"));

    // Random bytes.
    let mut c = RawClient::connect(&url).await;
    c.send_bytes(vec![0xff, 0x13, 0x37, 0x00, 0xee]).await;
    reasons.push(("random bytes", c.expect_rejected().await, "decode"));

    // A wrong protocol version.
    let mut c = RawClient::connect(&url).await;
    c.send(&ClientMsg::Hello {
        version: 999,
        kind: ClientKind::Native,
        threads: 1,
        speed: 0.0,
    })
    .await;
    reasons.push(("wrong version", c.expect_rejected().await, "protocol version"));

    // Work before the handshake.
    let mut c = RawClient::connect(&url).await;
    c.send(&ClientMsg::Hash { step: 0, hash: 0 }).await;
    reasons.push(("no handshake", c.expect_rejected().await, "Hello"));

    for (what, got, want) in &reasons {
        assert!(
            got.contains(want),
            "{what}: reason {got:?} does not mention {want:?}"
        );
    }

    let s = wait_for(
        &server,
        Duration::from_secs(120),
        "the honest run to finish",
        |s| s.finished && all_replicas_agree(s),
    )
    .await;
    assert_eq!(s.rejected_clients, reasons.len() as u64);
    assert_eq!(s.divergences, 0);
    assert_eq!(s.client_hashes.len(), 1, "only the honest worker is left");
    honest.stop().await;
    server.shutdown().await.unwrap();
}

/// A volunteer that answers every job with made-up losses.
async fn liar(url: String, lie: fn(u32) -> f32) -> String {
    let mut c = RawClient::join(&url).await;
    loop {
        match c.recv_or_close().await {
            Ok(seedling_core::protocol::ServerMsg::Job {
                step, job, members, ..
            }) => {
                let losses = members.iter().map(|&m| (m, lie(m))).collect();
                c.send(&ClientMsg::Losses { step, job, losses }).await;
            }
            Ok(seedling_core::protocol::ServerMsg::Reject { reason }) => return reason,
            Ok(_) => {}
            Err(close) => return format!("closed: {close}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liars_are_outvoted_and_disconnected() {
    let steps = 15;
    let clean = {
        let server = start(tiny_options(test_settings(steps))).await;
        let url = ws_url(&server);
        let w: Vec<_> = (0..4).map(|_| spawn_worker(&url, 1)).collect();
        let s = wait_for(&server, Duration::from_secs(120), "the clean run", |s| {
            s.finished && all_replicas_agree(s)
        })
        .await;
        for w in w {
            w.stop().await;
        }
        server.shutdown().await.unwrap();
        s.hash
    };
    for (name, lie) in [
        ("lowest loss", (|_| 0.0) as fn(u32) -> f32),
        ("random losses", |m| (m % 7) as f32),
    ] {
        let server = start(tiny_options(test_settings(steps))).await;
        let url = ws_url(&server);
        // The liar joins first, so it is handed work before anyone can check it.
        let liar = tokio::spawn(liar(url.clone(), lie));
        wait_for(&server, Duration::from_secs(10), "the liar", |s| {
            s.volunteers.total == 1
        })
        .await;
        let w: Vec<_> = (0..4).map(|_| spawn_worker(&url, 1)).collect();
        let reason = liar.await.unwrap();
        assert!(reason.contains("disagreed"), "{name}: liar left with {reason:?}");
        let at = server.status().step;
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
        assert_eq!(s.hash, clean, "{name}: the liar changed the weights");
        for w in w {
            w.stop().await;
        }
        server.shutdown().await.unwrap();
    }
}
