//! Relays over a real NATS server: a coordinator with `--nats`, relays in
//! front of it, native workers on the relays; the run must end where the
//! same run done directly ends.

use std::time::{Duration, Instant};

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
    let start = Instant::now();
    loop {
        let s = server.status();
        let reports: Vec<_> = relays.iter().flat_map(|r| r.reports().into_values()).collect();
        let done = s.finished
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
    for w in workers {
        w.stop().await;
    }
    r1.kill();
    r2.kill();
    server.shutdown().await.unwrap();
}
