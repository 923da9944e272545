//! Connection limits that need time to show: the heartbeat (a silent client
//! is dropped after the idle timeout) and the bounded outbox (a client that
//! does not read its socket is dropped once its queue fills). In both cases
//! an honest worker keeps training and the server's memory stays bounded.
//! (They measure this process's memory, so nothing large runs beside them.)

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use seedling_core::protocol::{self, ClientMsg, MAX_CLIENT_MESSAGE};
use seedling_server::app::Limits;
use seedling_tests::*;
use tokio_tungstenite::tungstenite::Message;

/// A client that says Hello and then neither reads nor answers anything
/// unless told to: its socket is left alone.
async fn mute_client(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = protocol::encode(&hello(None), MAX_CLIENT_MESSAGE).unwrap();
    ws.send(Message::Binary(hello.into())).await.unwrap();
    ws
}

/// Resident memory of this process (the server runs in it), in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_the_idle_timeout() {
    let idle = Duration::from_millis(600);
    let mut opts = tiny_options(test_settings(100_000));
    opts.limits = Limits {
        ping_every: Duration::from_millis(100),
        idle_timeout: idle,
        ..Limits::default()
    };
    let server = start(opts).await;
    let url = ws_url(&server);
    let honest = spawn_worker(&url, 1);
    wait_for(&server, Duration::from_secs(60), "step 2", |s| s.step >= 2).await;

    // A client that reads (so its WebSocket answers pings) but never sends:
    // alive by the heartbeat's rules.
    let mut listener = RawClient::join(&url).await;
    let listening = tokio::spawn(async move {
        loop {
            match listener.recv_or_close().await {
                Ok(_) => {}
                Err(e) if e == "timed out" => {}
                Err(e) => return e,
            }
        }
    });
    // A client that neither reads nor sends: no pong ever comes back.
    let silent_since = Instant::now();
    let silent = mute_client(&url).await;
    let s = wait_for(
        &server,
        Duration::from_secs(10),
        "the silent client's drop",
        |s| s.idle_dropped == 1,
    )
    .await;
    let took = silent_since.elapsed();
    println!("silent client dropped after {took:?} (idle timeout {idle:?}, pings every 100 ms)");
    assert!(took >= idle, "dropped before the timeout: {took:?}");
    assert!(took < idle * 4, "dropped late: {took:?}");
    // The honest worker and the listener stay, and steps keep closing.
    let step = s.step;
    let s = wait_for(&server, Duration::from_secs(60), "more steps", |s| {
        s.step >= step + 5
    })
    .await;
    assert_eq!(s.volunteers.total, 2, "the worker and the listener stay");
    assert_eq!(s.idle_dropped, 1, "nobody else was idle");
    assert!(!listening.is_finished(), "the listener was dropped");
    drop(silent);
    listening.abort();
    honest.stop().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_dropped_when_its_outbox_fills() {
    let outbox = 8;
    // Snapshots are the largest thing a client can ask for: every wrong
    // claim for a step past its last snapshot gets one (a real server
    // refuses a replica that keeps diverging; here it may not).
    let mut settings = test_settings(100_000);
    settings.max_resyncs = u32::MAX;
    // The readers hold jobs they never answer: each step waits for their
    // deadline before the honest worker gets the members.
    settings.job_timeout_min = Duration::from_millis(100);
    let mut opts = tiny_options(settings);
    opts.limits = Limits {
        outbox,
        // Long enough for the claims, one a step, to fill the queues.
        idle_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let server = start(opts).await;
    let url = ws_url(&server);
    let honest = spawn_worker(&url, 1);
    let s = wait_for(&server, Duration::from_secs(60), "step 2", |s| s.step >= 2).await;
    let params = s.params as u64;
    let before = rss();

    // Each slow reader claims a wrong hash at every new step without
    // reading: every claim is answered with a full snapshot (weights and
    // both Adam moments). Unbounded, the server would queue all of them.
    let readers = 4;
    let claims = 3000u64;
    let mut clients = Vec::new();
    for _ in 0..readers {
        clients.push(mute_client(&url).await);
    }
    let (mut last, mut sent) = (0, 0);
    while sent < claims && server.status().slow_dropped < readers {
        let step = server.status().step;
        if step == last {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        (last, sent) = (step, sent + 1);
        let claim = protocol::encode(&ClientMsg::Hash { step, hash: 1 }, MAX_CLIENT_MESSAGE).unwrap();
        for ws in &mut clients {
            // A failed send means the server already closed us.
            let _ = ws.send(Message::Binary(claim.clone().into())).await;
        }
    }
    let s = wait_for(&server, Duration::from_secs(60), "the slow readers' drop", |s| {
        s.slow_dropped == readers
    })
    .await;
    let grew = rss().saturating_sub(before);
    let unbounded = readers * sent * 12 * params;
    println!(
        "{readers} slow readers asking for {sent} snapshots of {} KiB each: dropped, RSS grew {} MiB \
         (unbounded queues would hold {} MiB)",
        12 * params / 1024,
        grew >> 20,
        unbounded >> 20
    );
    assert!(
        grew < unbounded / 4,
        "memory grew by {grew} bytes; the queues look unbounded"
    );
    // The honest worker never noticed: it kept up, and every hash it
    // reported matched the server's (a steady-state snapshot of the status
    // rarely shows both at the same step while steps close this fast).
    // (The readers' wrong claims were counted as divergences before they
    // were dropped; none may be added after.)
    let (step, divergences) = (s.step, s.divergences);
    let s = wait_for(&server, Duration::from_secs(60), "more steps", |s| {
        s.step >= step + 5 && s.client_hashes.values().all(|c| c.step >= step + 5)
    })
    .await;
    assert_eq!(s.divergences, divergences, "the honest worker's replica diverged");
    assert_eq!(s.volunteers.total, 1, "only the honest worker is left");
    assert_eq!(s.client_hashes.len(), 1);
    drop(clients);
    honest.stop().await;
    server.shutdown().await.unwrap();
}
