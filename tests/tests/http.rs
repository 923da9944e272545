//! The HTTP surface: the page with cross-origin isolation headers, the lean
//! JSON status, the curve by increments, the clients' reports, the
//! Prometheus metrics; and `--config` files.

use seedling_server::cli::{Cli, Command};
use seedling_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_status_and_metrics() {
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "<h1>volunteer</h1>").unwrap();
    let mut opts = tiny_options(test_settings(5));
    opts.www = Some(www.path().to_path_buf());
    let server = start(opts).await;
    let w = spawn_worker(&ws_url(&server), 1);
    wait_for(
        &server,
        std::time::Duration::from_secs(60),
        "the run to finish",
        |s| s.finished && all_replicas_agree(s),
    )
    .await;

    let (head, body) = http_get(server.addr, "/").await;
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(body.contains("volunteer"));
    let head = head.to_ascii_lowercase();
    assert!(head.contains("cross-origin-opener-policy: same-origin"), "{head}");
    assert!(
        head.contains("cross-origin-embedder-policy: require-corp"),
        "{head}"
    );

    let (_, body) = http_get(server.addr, "/api/status").await;
    for key in [
        "\"step\":5",
        "\"volunteers\"",
        "\"members_per_s\"",
        "\"divergences\":0",
        "\"stale_results\"",
        "\"history_step\":5",
    ] {
        assert!(body.contains(key), "status lacks {key}: {body}");
    }
    assert!(
        !body.contains("client_hashes") && !body.contains("\"history\""),
        "{body}"
    );
    let (_, clients) = http_get(server.addr, "/api/clients").await;
    let clients: serde_json::Value = serde_json::from_str(&clients).unwrap();
    let clients = clients.as_object().unwrap();
    assert_eq!(clients.len(), 1, "{clients:?}");
    assert!(
        clients.values().all(|c| c["kind"] == "native" && c["step"] == 5),
        "{clients:?}"
    );
    w.stop().await;
    server.shutdown().await.unwrap();
}

/// One sample's value in an OpenMetrics scrape, by its exact name and labels.
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in\n{scrape}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_typed_labelled_and_count() {
    let server = start(tiny_options(test_settings(12))).await;
    let secs = std::time::Duration::from_secs(60);
    let (head, first) = http_get(server.addr, "/metrics").await;
    assert!(
        head.to_ascii_lowercase().contains("application/openmetrics-text"),
        "{head}"
    );
    let types = [
        ("steps", "counter"),
        ("members", "counter"),
        ("reissued_jobs", "counter"),
        ("stale_results", "counter"),
        ("rejected_clients", "counter"),
        ("disagreements", "counter"),
        ("divergences", "counter"),
        ("liars_disconnected", "counter"),
        ("idle_dropped", "counter"),
        ("slow_dropped", "counter"),
        ("volunteers", "gauge"),
        ("paused", "gauge"),
        ("lr", "gauge"),
        ("step", "gauge"),
        ("step_seconds", "histogram"),
        ("job_round_trip_seconds", "histogram"),
        ("build", "info"),
    ];
    for (name, kind) in types {
        let line = format!("# TYPE seedling_{name} {kind}\n");
        assert!(first.contains(&line), "no {line:?} in\n{first}");
    }
    // Counters' samples end in `_total`; labels and the build's version.
    assert_eq!(sample(&first, "seedling_divergences_total"), 0.0);
    assert_eq!(sample(&first, "seedling_steps_total"), 0.0);
    assert_eq!(sample(&first, "seedling_volunteers{kind=\"native\"}"), 0.0);
    assert_eq!(sample(&first, "seedling_volunteers{kind=\"browser\"}"), 0.0);
    assert_eq!(sample(&first, "seedling_paused"), 0.0);
    assert!(sample(&first, "seedling_lr") > 0.0);
    let version = format!(
        "seedling_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(first.contains(&version), "no {version:?} in\n{first}");
    assert!(first.ends_with("# EOF\n"), "{first}");

    let w = spawn_worker(&ws_url(&server), 1);
    wait_for(&server, secs, "the run to finish", |s| s.finished).await;
    let (_, last) = http_get(server.addr, "/metrics").await;
    assert_eq!(sample(&last, "seedling_volunteers{kind=\"native\"}"), 1.0);
    // Every metric the shipped dashboard and docs query is served.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for doc in ["docs/grafana-dashboard.json", "docs/METRICS.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for (at, _) in text.match_indices("seedling_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.ends_with('_') {
                continue; // a pattern such as `seedling_(a|b)_total`
            }
            let family = ["_total", "_bucket", "_count", "_sum", "_info"]
                .iter()
                .fold(name.as_str(), |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
            let line = format!("# TYPE {family} ");
            assert!(last.contains(&line), "{doc} queries {name}, which /metrics lacks");
        }
    }
    let steps = |t: &str| sample(t, "seedling_steps_total");
    assert!(
        steps(&last) > steps(&first),
        "steps_total grows: {} then {}",
        steps(&first),
        steps(&last)
    );
    assert_eq!(steps(&last), 12.0);
    let members = sample(&last, "seedling_members_total");
    assert!(members >= 12.0 * 32.0, "{members}");
    assert_eq!(
        sample(&last, "seedling_step_seconds_count"),
        11.0,
        "a time between each two closes"
    );
    assert_eq!(sample(&last, "seedling_step_seconds_bucket{le=\"+Inf\"}"), 11.0);
    let jobs = sample(&last, "seedling_job_round_trip_seconds_count");
    assert!(jobs >= 12.0, "at least a job per step: {jobs}");
    assert!(sample(&last, "seedling_val_loss") > 0.0);
    w.stop().await;
    server.shutdown().await.unwrap();
}

/// A run resumed with thousands of steps of history and joined by a crowd:
/// the polled status stays under 4 KB, and `/api/history?since=` answers
/// exactly the newer points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_stays_small_and_the_curve_comes_by_increments() {
    use seedling_server::checkpoint::{self, Checkpoint, HistoryPoint};
    const START: u64 = 3000;
    let run = tempfile::tempdir().unwrap();
    let mut settings = test_settings(START + 6);
    settings.run_dir = Some(run.path().to_path_buf());
    let opts = tiny_options(settings);
    let replica = seedling_core::Replica::new(opts.config).unwrap();
    // A point's step is the step count after its update: 1 to START.
    let history: Vec<HistoryPoint> = (1..=START)
        .map(|step| HistoryPoint {
            step,
            elapsed_s: step as f64 * 0.1,
            tokens: step * 64,
            train_loss: 3.0 - step as f32 * 1e-4,
            val_loss: (step % 5 == 0).then_some(3.1 - step as f32 * 1e-4),
        })
        .collect();
    let ckpt = Checkpoint {
        config: opts.config,
        tokenizer: opts.data.tokenizer.clone(),
        step: START,
        params: replica.params.clone(),
        adam: replica.adam.clone(),
        history,
        lr_override: None,
        versions: Vec::new(),
        contributors: Vec::new(),
    };
    checkpoint::save(run.path(), &ckpt, 3).unwrap();
    let server = start(opts).await;
    let w = spawn_worker(&ws_url(&server), 1);
    let secs = std::time::Duration::from_secs(60);
    wait_for(&server, secs, "the run to finish", |s| s.finished).await;
    // A crowd joins (the step is done, so they hold up nothing).
    let mut crowd = Vec::new();
    for _ in 0..40 {
        crowd.push(RawClient::join(&ws_url(&server)).await);
    }
    wait_for(&server, secs, "the crowd", |s| s.volunteers.total == 41).await;

    let (_, body) = http_get(server.addr, "/api/status").await;
    assert!(body.len() < 4096, "the status is {} bytes: {body}", body.len());
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["history_step"], START + 6);
    assert_eq!(status["volunteers"]["total"], 41);

    let addr = server.addr;
    let get = |since: &str| {
        let path = format!("/api/history{since}");
        async move {
            let (head, body) = http_get(addr, &path).await;
            assert!(head.contains(" 200 "), "{path}: {head}");
            serde_json::from_str::<Vec<HistoryPoint>>(&body).unwrap()
        }
    };
    let newest = get("?since=2990").await;
    let all = get("").await;
    let none = get(&format!("?since={}", START + 6)).await;
    let (bad, _) = http_get(server.addr, "/api/history?since=x").await;
    for c in crowd {
        drop(c);
    }
    w.stop().await;
    server.shutdown().await.unwrap();

    // The run's own curve, as its final checkpoint keeps it.
    let (_, ckpt) = checkpoint::latest(run.path()).unwrap().unwrap();
    assert_eq!(ckpt.history.len() as u64, START + 6);
    assert_eq!(ckpt.history.last().unwrap().step, START + 6);
    let after: Vec<HistoryPoint> = ckpt.history.iter().filter(|h| h.step > 2990).copied().collect();
    assert_eq!(newest.len(), 16);
    assert_eq!(newest, after, "exactly the points after step 2990");
    assert!(none.is_empty(), "{none:?}");
    assert!(bad.contains(" 400 "), "{bad}");
    // The whole curve comes thinned, newest point included.
    assert!((500..=1000).contains(&all.len()), "{} points", all.len());
    assert_eq!(all.last(), ckpt.history.last());
    assert!(all.windows(2).all(|p| p[0].step < p[1].step));
    assert!(all.iter().all(|p| ckpt.history.contains(p)));
}

#[test]
fn config_file_sets_flags_and_the_command_line_wins() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(
        &file,
        "hidden = 32\nlayers = 3\nsigma = 0.05\nnoise = \"full\"\nmax-steps = 9\n",
    )
    .unwrap();
    let cli = Cli::try_parse_from([
        "seedling",
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--layers",
        "1",
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    let args = args.run_args().unwrap();
    let c = args.run_config(20).unwrap();
    assert_eq!((c.model.hidden, c.model.layers, c.es.sigma), (32, 1, 0.05));
    assert_eq!(c.es.noise, seedling_core::NoiseKind::Full);
    assert_eq!(args.settings().max_steps, Some(9));
    std::fs::write(&file, "hiden = 32\n").unwrap();
    let cli = Cli::try_parse_from(["seedling", "serve", "--config", file.to_str().unwrap()]).unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    let err = format!("{:#}", args.run_args().unwrap_err());
    assert!(err.contains("hiden"), "a typo is reported: {err}");
}
