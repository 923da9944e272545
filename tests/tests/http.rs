//! The HTTP surface: the page with cross-origin isolation headers, the JSON
//! status and the Prometheus metrics; and `--config` files.

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
        |s| s.finished,
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
    ] {
        assert!(body.contains(key), "status lacks {key}: {body}");
    }
    let (head, body) = http_get(server.addr, "/metrics").await;
    assert!(head.to_ascii_lowercase().contains("text/plain"));
    assert!(
        body.contains("# TYPE seedling_step gauge") && body.contains("seedling_step 5"),
        "{body}"
    );
    assert!(body.contains("seedling_divergences_total 0"));
    w.stop().await;
    server.shutdown().await.unwrap();
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
