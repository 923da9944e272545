//! Operator routes behind a token, connection limits and close codes.

use std::time::Duration;

use seedling_server::app::Limits;
use seedling_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_token() {
    let mut opts = tiny_options(test_settings(100_000));
    opts.admin_token = Some("s3cret".into());
    let server = start(opts).await;
    let auth = "Authorization: Bearer s3cret\r\n";
    for (headers, want) in [
        ("", "401"),
        ("Authorization: Bearer nope\r\n", "401"),
        (auth, "200"),
    ] {
        let (head, body) = http_request(server.addr, "POST", "/admin/pause", headers).await;
        assert!(head.contains(want), "pause with {headers:?}: {head} {body}");
    }
    assert!(
        server.status().paused
            || wait_for(&server, Duration::from_secs(5), "paused", |s| s.paused)
                .await
                .paused
    );
    // Paused: a volunteer joins but gets no work.
    let mut c = RawClient::join(&ws_url(&server)).await;
    let step = server.status().step;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.status().step, step);
    let (head, _) = http_request(server.addr, "POST", "/admin/resume", auth).await;
    assert!(head.contains("200"), "{head}");
    assert!(c.next_job().await.is_some(), "work resumes");
    // No run dir: checkpoint is refused with a reason.
    let (head, body) = http_request(server.addr, "POST", "/admin/checkpoint", auth).await;
    assert!(head.contains("409") && body.contains("run-dir"), "{head} {body}");
    // Kick the only client.
    let id = c.id;
    let (head, _) = http_request(server.addr, "POST", &format!("/admin/kick?client={id}"), auth).await;
    assert!(head.contains("200"), "{head}");
    assert!(c.expect_rejected().await.contains("operator"));
    let (head, _) = http_request(server.addr, "POST", "/admin/kick?client=424242", auth).await;
    assert!(head.contains("409"), "{head}");
    server.shutdown().await.unwrap();

    // A server without a token has no admin at all.
    let server = start(tiny_options(test_settings(10))).await;
    for path in ["/admin/pause", "/admin/lr?value=0.01"] {
        let (head, _) = http_request(server.addr, "POST", path, auth).await;
        assert!(head.contains("403"), "{path}: {head}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_and_close_codes() {
    let mut opts = tiny_options(test_settings(100_000));
    opts.limits = Limits {
        max_per_ip: 3,
        ..Limits::default()
    };
    let server = start(opts).await;
    let url = ws_url(&server);
    let mut a = RawClient::connect(&url).await;
    let mut b = RawClient::connect(&url).await;
    let mut c = RawClient::connect(&url).await;
    let refused = tokio_tungstenite::connect_async(&url).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!(
            "a fourth connection from one address was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    a.send_bytes(vec![0xde, 0xad]).await;
    assert_eq!(a.close_code().await, 1007, "undecodable bytes");
    b.send_bytes(oversized_frame()).await;
    assert_eq!(b.close_code().await, 1009, "oversized frame");
    c.send_text("hello").await;
    assert_eq!(c.close_code().await, 1003, "text frame");
    // The slots are free again once the closed connections are gone (each
    // waits up to a second for the peer's close frame, which these raw
    // clients never send). The first connection that gets one joins on it
    // (a probe connection would hold a slot of its own for a moment).
    let start = std::time::Instant::now();
    let _d = loop {
        if let Some(d) = RawClient::try_join_by_url(&url).await {
            break d;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the slots stayed taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lr_changes_the_rate_and_replicas_agree() {
    // Long enough that the run cannot finish between "step 5" and the pause.
    let steps = 300;
    let auth = "Authorization: Bearer s3cret\r\n";
    let run_dir = tempfile::tempdir().unwrap();
    let options = |run_dir: Option<std::path::PathBuf>| {
        let mut settings = test_settings(steps);
        settings.run_dir = run_dir;
        let mut opts = tiny_options(settings);
        opts.admin_token = Some("s3cret".into());
        opts
    };
    // The same run without the change, for comparison.
    let unchanged = {
        let server = start(options(None)).await;
        let w = spawn_worker(&ws_url(&server), 1);
        let s = wait_for(&server, Duration::from_secs(120), "the unchanged run", |s| {
            s.finished && all_replicas_agree(s)
        })
        .await;
        assert!(!s.lr_override);
        assert_eq!(s.lr, server_config_lr(), "the config's rate");
        w.stop().await;
        server.shutdown().await.unwrap();
        s.hash
    };

    let server = start(options(Some(run_dir.path().to_path_buf()))).await;
    let w = spawn_worker(&ws_url(&server), 1);
    wait_for(&server, Duration::from_secs(60), "step 5", |s| s.step >= 5).await;
    let (head, _) = http_request(server.addr, "POST", "/admin/pause", auth).await;
    assert!(head.contains("200"), "{head}");
    for (path, headers, want) in [
        ("/admin/lr?value=0.005", "", "401"),
        ("/admin/lr", auth, "400"),
        ("/admin/lr?value=fast", auth, "400"),
        ("/admin/lr?value=-0.01", auth, "400"),
        ("/admin/lr?value=0", auth, "400"),
        ("/admin/lr?value=NaN", auth, "400"),
        ("/admin/lr?value=inf", auth, "400"),
        ("/admin/lr?value=0.005", auth, "200"),
    ] {
        let (head, body) = http_request(server.addr, "POST", path, headers).await;
        assert!(head.contains(want), "{path} with {headers:?}: {head} {body}");
    }
    let s = server.status();
    assert!(s.lr_override);
    assert_eq!(s.lr, 0.005);
    // /api/status over HTTP says the same.
    let (_, body) = http_get(server.addr, "/api/status").await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["lr"].as_f64().map(|v| v as f32), Some(0.005), "{body}");
    let (head, _) = http_request(server.addr, "POST", "/admin/resume", auth).await;
    assert!(head.contains("200"), "{head}");
    let s = wait_for(&server, Duration::from_secs(120), "the changed run", |s| {
        s.finished && all_replicas_agree(s)
    })
    .await;
    assert_eq!(s.divergences, 0, "the worker applied the same rate");
    assert_ne!(s.hash, unchanged, "the new rate changed the trajectory");
    w.stop().await;
    server.shutdown().await.unwrap();

    // A restart resumes from the final checkpoint with the operator's rate.
    let server = start(options(Some(run_dir.path().to_path_buf()))).await;
    let s = server.status();
    assert_eq!((s.step, s.lr, s.lr_override), (steps, 0.005, true));
    server.shutdown().await.unwrap();
}

/// The learning rate of [`tiny_options`]' config.
fn server_config_lr() -> f32 {
    tiny_options(test_settings(1)).config.adam.lr
}
