//! A server and native workers training together over loopback.

use std::time::Duration;

use seedling_core::protocol::ServerMsg;
use seedling_core::{Replica, Shaping, batch};
use seedling_server::app::ServeOptions;
use seedling_tests::*;

const LONG: Duration = Duration::from_secs(120);

/// The tiny run's options with `lag` steps in flight.
fn lagged_options(steps: u64, lag: u32) -> ServeOptions {
    let mut opts = tiny_options(test_settings(steps));
    opts.config.es.lag = lag;
    // The fixed rule: which weights a step is evaluated at depends on the
    // step alone, so runs with and without faults can end at one hash.
    opts.settings.fixed_lag = true;
    opts
}

/// Final hash of a fault-free run of `steps` steps with two workers.
async fn clean_run(steps: u64, lag: u32) -> String {
    clean_run_hash(lagged_options(steps, lag), &[1, 2]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_train_and_agree() {
    let server = start(tiny_options(test_settings(40))).await;
    let url = ws_url(&server);
    let workers: Vec<_> = (0..3).map(|_| spawn_worker(&url, 1)).collect();
    let s = wait_for(&server, LONG, "40 steps with agreeing replicas", |s| {
        s.finished && s.client_hashes.len() == 3 && all_replicas_agree(s)
    })
    .await;
    let vals: Vec<f32> = s.history.iter().filter_map(|h| h.val_loss).collect();
    assert!(vals.len() >= 4, "validation ran {} times", vals.len());
    assert!(
        vals.last().unwrap() < &(vals[0] - 0.2),
        "validation loss did not fall: {vals:?}"
    );
    assert_eq!(s.divergences, 0);
    assert_eq!(s.rejected_clients, 0);
    assert!(
        s.client_hashes.values().all(|c| c.members > 0),
        "every worker evaluated members"
    );
    for w in workers {
        w.stop().await;
    }
    server.shutdown().await.unwrap();
}

/// The final hash of `steps` steps on one replica alone under the lag rule:
/// step `s`'s members evaluated at the weights before update `s - lag`,
/// updates applied in order. What every replica of a lagged run must hold.
fn lagged_reference(opts: &ServeOptions, steps: u64) -> String {
    let c = opts.config;
    let mut r = Replica::new(c).unwrap();
    for s in 0..steps {
        let tokens = batch::step_batch(
            &opts.data.train,
            c.seed,
            s,
            c.es.batch as usize,
            c.es.seq_len as usize,
        )
        .unwrap();
        r.local_step(&tokens).unwrap();
    }
    format!("{:016x}", r.hash())
}

/// Steps in flight through the coordinator: two steps ahead of the one
/// closing, with two native workers, every replica ends bit-identical to a
/// single process that applies the same lag rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_in_flight_match_a_single_process_reference() {
    let steps = 14;
    let opts = lagged_options(steps, 2);
    let want = lagged_reference(&opts, steps);
    assert_ne!(
        want,
        lagged_reference(&lagged_options(steps, 0), steps),
        "the lag changes the trajectory"
    );
    let server = start(opts).await;
    let url = ws_url(&server);
    let w = [spawn_worker(&url, 1), spawn_worker(&url, 2)];
    let s = wait_for(&server, LONG, "the lagged run to finish", |s| {
        s.finished && s.client_hashes.len() == 2 && all_replicas_agree(s)
    })
    .await;
    assert_eq!(s.step, steps);
    assert_eq!(s.hash, want, "the lagged run left the lag rule");
    assert_eq!(s.divergences, 0);
    assert_eq!(s.rejected_clients, 0);
    for w in w {
        w.stop().await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_do_not_change_the_weights() {
    faults_end_at_the_clean_hash(0).await;
}

/// Killed workers, silent clients and late answers with two steps in
/// flight: the run still ends at the fault-free hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_do_not_change_the_weights_with_steps_in_flight() {
    faults_end_at_the_clean_hash(2).await;
}

async fn faults_end_at_the_clean_hash(lag: u32) {
    let steps = 12;
    let clean = clean_run(steps, lag).await;

    let mut opts = lagged_options(steps, lag);
    opts.settings.job_timeout_min = Duration::from_millis(300);
    let server = start(opts).await;
    let url = ws_url(&server);
    let (sleeper, workers) = inject_faults(&server, &url).await;
    let s = wait_for(&server, LONG, "the faulty run to finish", |s| s.finished).await;
    assert_eq!(s.hash, clean, "faults changed the final weights");
    assert!(
        s.reissued_jobs >= 2,
        "expected reissued jobs, got {}",
        s.reissued_jobs
    );
    assert!(s.stale_results >= 1, "expected the late result to be stale");
    assert_eq!(s.divergences, 0);
    drop(sleeper);
    for w in workers {
        w.stop().await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_catches_up() {
    late_joiner(0, true).await;
}

/// A joiner's snapshot carries the past weight versions, so it evaluates
/// every open step from its first job on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_catches_up_with_steps_in_flight() {
    late_joiner(2, true).await;
}

/// The same with the window of steps in flight following the volunteers:
/// the joiner's snapshot carries the versions the open steps use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_catches_up_with_an_adaptive_window() {
    late_joiner(4, false).await;
}

async fn late_joiner(lag: u32, fixed: bool) {
    // An unbounded run, frozen by the operator at the end: a bounded one can
    // finish before the joiner connects when the test thread is starved.
    let mut opts = lagged_options(1_000_000, lag);
    opts.settings.fixed_lag = fixed;
    opts.admin_token = Some("late".into());
    let auth = "Authorization: Bearer late\r\n";
    let server = start(opts).await;
    let url = ws_url(&server);
    let first = spawn_worker(&url, 1);
    let k = wait_for(&server, LONG, "step 6", |s| s.step >= 6).await.step;
    let joiner = spawn_worker(&url, 1);
    // The joiner reports a hash for the snapshot step, then after each update;
    // every report is checked by the server against its own history.
    wait_for(&server, LONG, "the joiner to report past its join step", |s| {
        s.client_hashes.len() == 2 && s.client_hashes.values().all(|c| c.step > k + 2)
    })
    .await;
    let (head, _) = http_request(server.addr, "POST", "/admin/pause", auth).await;
    assert!(head.contains("200"), "{head}");
    // Paused, the step in flight closes and both replicas settle on it.
    let s = wait_for(&server, LONG, "both replicas to agree", all_replicas_agree).await;
    assert_eq!(s.client_hashes.len(), 2);
    assert_eq!(s.divergences, 0, "the late joiner diverged");
    assert!(
        s.client_hashes.values().all(|c| c.members > 0),
        "both workers evaluated members: {:?}",
        s.client_hashes
    );
    first.stop().await;
    joiner.stop().await;
    server.shutdown().await.unwrap();
}

/// Steps that close at their deadline with members missing (their holder
/// never answers) send the counted members' centered ranks as ranks over a
/// member set, z-scores send the list, and with either every replica ends
/// on the server's hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_steps_and_z_scores_keep_replicas_agreeing() {
    for shaping in [Shaping::CenteredRanks, Shaping::ZScores] {
        let mut opts = tiny_options(test_settings(12));
        opts.config.recipe.shaping = shaping;
        opts.settings.min_fraction = 0.5;
        opts.settings.step_timeout = Duration::from_millis(300);
        let population = opts.config.es.population as usize;
        let server = start(opts).await;
        let url = ws_url(&server);
        // Takes jobs, never answers, and decodes every update it receives.
        let mut silent = RawClient::join(&url).await;
        let counted = tokio::spawn(async move {
            let mut counted = Vec::new();
            while let Some(msg) = silent.recv().await {
                if let ServerMsg::Update { weights, .. } = msg {
                    counted.push(weights.len());
                }
            }
            counted
        });
        let workers = [spawn_worker(&url, 1), spawn_worker(&url, 1)];
        let s = wait_for(&server, LONG, "the run to finish with agreeing replicas", |s| {
            s.finished && s.client_hashes.len() == 2 && all_replicas_agree(s)
        })
        .await;
        assert_eq!(s.divergences, 0, "{shaping:?}");
        for w in workers {
            w.stop().await;
        }
        server.shutdown().await.unwrap();
        let counted = counted.await.unwrap();
        assert!(
            counted.iter().any(|&n| n < population),
            "{shaping:?}: no step closed with members missing: {counted:?}"
        );
    }
}
