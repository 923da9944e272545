//! Credit that lasts: named native workers earn verified members on the
//! leaderboard (`/api/contributors`), keep earning under the same public id
//! when they reconnect with their identity file, and keep their credit
//! across a server restart; hostile names never break the JSON.

use std::path::Path;
use std::time::{Duration, Instant};

use seedling_core::protocol::{self, ClientKind, ClientMsg, PROTOCOL_VERSION, clean_name};
use seedling_server::coordinator::credit::{key_of, public_id};
use seedling_server::worker::parse_token;
use seedling_tests::*;

/// The leaderboard as JSON, checked to be served as JSON.
async fn contributors(server: &seedling_server::app::Server) -> serde_json::Value {
    let (head, body) = http_get(server.addr, "/api/contributors").await;
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The row of the contributor whose identity file is `identity`.
fn row<'a>(board: &'a serde_json::Value, identity: &Path) -> Option<&'a serde_json::Value> {
    let token = parse_token(std::fs::read_to_string(identity).ok()?.trim()).ok()?;
    let id = public_id(&key_of(&token));
    board["contributors"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == id.as_str())
}

fn members(board: &serde_json::Value, identity: &Path) -> u64 {
    row(board, identity)
        .and_then(|r| r["members"].as_u64())
        .unwrap_or(0)
}

/// Polls the leaderboard until `pred` holds.
async fn wait_board(
    server: &seedling_server::app::Server,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let board = contributors(server).await;
        if pred(&board) {
            return board;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}: {board}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leaderboard once it has stopped changing for a while: a stopped
/// worker's last results, and the steps in flight that hold its claims,
/// may still be on their way into the books (and the published board is
/// rebuilt at most every second), while the final checkpoint holds them all.
async fn settled(server: &seedling_server::app::Server) -> serde_json::Value {
    let start = Instant::now();
    let mut last = contributors(server).await;
    let mut same_since = Instant::now();
    while same_since.elapsed() < Duration::from_millis(2500) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the board never settled: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let board = contributors(server).await;
        if board != last {
            (last, same_since) = (board, Instant::now());
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_workers_earn_credit_that_lasts() {
    let dir = tempfile::tempdir().unwrap();
    let (ada, bob) = (dir.path().join("ada.id"), dir.path().join("bob.id"));
    let run_dir = dir.path().join("run");
    let settings = || {
        let mut s = test_settings(u64::MAX);
        s.run_dir = Some(run_dir.clone());
        s
    };
    let server = start(tiny_options(settings())).await;
    let url = ws_url(&server);
    let a = spawn_worker_as(&url, 1, "ada", Some(&ada));
    let b = spawn_worker_as(&url, 1, "  <b>bob</b>\u{202e} ", Some(&bob));
    let board = wait_board(&server, "both workers credited", |b| {
        members(b, &ada) > 0 && members(b, &bob) > 0
    })
    .await;
    assert_eq!(row(&board, &ada).unwrap()["name"], "ada");
    assert_eq!(
        row(&board, &bob).unwrap()["name"],
        "<b>bob</b>",
        "cleaned, not escaped"
    );
    assert_eq!(row(&board, &ada).unwrap()["banned"], false);
    let body = board.to_string();
    let token = std::fs::read_to_string(&ada).unwrap();
    assert!(!body.contains(token.trim()), "the board shows a token");

    // A reconnection with the same identity file is the same contributor,
    // and its credit keeps growing.
    a.stop().await;
    let before = members(&contributors(&server).await, &ada);
    let token_before = std::fs::read_to_string(&ada).unwrap();
    let a = spawn_worker_as(&url, 1, "ada", Some(&ada));
    let board = wait_board(&server, "ada credited again", |b| members(b, &ada) > before).await;
    assert_eq!(std::fs::read_to_string(&ada).unwrap(), token_before, "same token");
    let adas = board["contributors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == "ada")
        .count();
    assert_eq!(adas, 1, "one contributor, not two: {board}");

    // A restart keeps the tally (the final checkpoint holds it), and the
    // same identity goes on earning on the restarted server.
    a.stop().await;
    b.stop().await;
    let kept = settled(&server).await;
    server.shutdown().await.unwrap();
    let server = start(tiny_options(settings())).await;
    let board = contributors(&server).await;
    for id in [&ada, &bob] {
        assert_eq!(members(&board, id), members(&kept, id), "{board}");
    }
    let a = spawn_worker_as(&ws_url(&server), 1, "ada", Some(&ada));
    let was = members(&board, &ada);
    wait_board(&server, "ada credited after the restart", |b| {
        members(b, &ada) > was
    })
    .await;
    assert_eq!(std::fs::read_to_string(&ada).unwrap(), token_before, "same token");
    a.stop().await;
    server.shutdown().await.unwrap();
}

/// Credit through a relay: a named worker that earned credit directly
/// keeps its token and its one row when it trains through a relay, and
/// its credit keeps growing there; its fellow volunteer on the relay gets
/// a row of its own, and the relay, one client of the coordinator, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_earned_through_a_relay_goes_to_its_volunteers() {
    let dir = tempfile::tempdir().unwrap();
    let (ada, bob) = (dir.path().join("ada.id"), dir.path().join("bob.id"));
    let nats = seedling_tests::nats::NatsServer::start();
    let server = start(seedling_tests::nats::with_nats(
        tiny_options(test_settings(u64::MAX)),
        &nats,
        "c1",
    ))
    .await;
    let a = spawn_worker_as(&ws_url(&server), 1, "ada", Some(&ada));
    wait_board(&server, "ada credited directly", |b| members(b, &ada) > 0).await;
    a.stop().await;
    let token = std::fs::read_to_string(&ada).unwrap();
    let before = members(&settled(&server).await, &ada);

    let relay = seedling_tests::nats::start_relay(&nats, "c1", "r1", seedling_tests::nats::test_hub()).await;
    let url = seedling_tests::nats::relay_url(&relay);
    let a = spawn_worker_as(&url, 1, "ada", Some(&ada));
    let b = spawn_worker_as(&url, 1, "bob", Some(&bob));
    let board = wait_board(&server, "both credited through the relay", |b| {
        members(b, &ada) > before + 50 && members(b, &bob) > 50
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&ada).unwrap(),
        token,
        "same token through the relay"
    );
    assert_eq!(row(&board, &bob).unwrap()["name"], "bob");
    let rows = board["contributors"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "ada and bob, and no row for the relay: {board}");
    assert_eq!(
        server.status().volunteers.relay,
        1,
        "they trained through the relay"
    );
    a.stop().await;
    b.stop().await;
    relay.kill();
    server.shutdown().await.unwrap();
}

fn named_hello(name: &str) -> ClientMsg {
    ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        kind: ClientKind::Simulated,
        threads: 1,
        speed: 0.0,
        session: None,
        name: name.into(),
    }
}

#[tokio::test]
async fn hostile_names_are_cleaned_escaped_or_refused() {
    let server = start(tiny_options(test_settings(u64::MAX))).await;
    let url = ws_url(&server);
    let hostile = [
        "<script>alert('x')</script>",
        "\"},{\"rank\":0,\"id\":\"forged\"",
        "<img src=x onerror=alert(1)>&amp;",
        "evil\u{202e}txt.exe\u{2066}",
        "tab\tnew\nline\u{0}nul\u{7f}\u{1b}[31m",
        &"x".repeat(5_000),
        "\u{200b}\u{feff}",
        "日本語 العربية 🌱",
    ];
    // A well-behaved client cleans the name before sending it.
    let mut kept = Vec::new();
    for raw in hostile {
        let mut c = RawClient::connect(&url).await;
        c.send(&named_hello(&clean_name(raw))).await;
        assert!(
            matches!(c.recv().await, Some(protocol::ServerMsg::Welcome { .. })),
            "{raw:?}"
        );
        kept.push(c);
    }
    // A Hello whose name is not clean (over-long, control or bidi
    // characters) is refused cleanly: a Reject, then the close.
    for dirty in [
        "x".repeat(protocol::MAX_NAME_CHARS + 1),
        "y".repeat(200_000),
        "a\u{202e}b".into(),
        "line\nbreak".into(),
    ] {
        let mut c = RawClient::connect(&url).await;
        c.send(&named_hello(&dirty)).await;
        let (reason, _) = c.expect_rejection().await;
        assert!(reason.contains("name"), "{reason}");
    }
    let want: Vec<String> = hostile.iter().map(|r| clean_name(r)).collect();
    let board = wait_board(&server, "every hostile name listed", |b| {
        b["total"].as_u64() == Some(hostile.len() as u64)
    })
    .await;
    let rows = board["contributors"].as_array().unwrap();
    let mut names: Vec<String> = rows
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut sorted = want.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for r in rows {
        let name = r["name"].as_str().unwrap();
        assert!(name.chars().count() <= protocol::MAX_NAME_CHARS, "{name:?}");
        assert!(
            !name
                .chars()
                .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
            "{name:?}"
        );
        assert_eq!(r["id"].as_str().unwrap().len(), 12, "no forged ids: {r}");
        assert_eq!(r.as_object().unwrap().len(), 5, "no forged fields: {r}");
    }
    // The raw body carries no raw control character either (serde escapes).
    let (_, body) = http_get(server.addr, "/api/contributors").await;
    assert!(!body.chars().any(|c| c.is_control() && c != '\n'), "{body:?}");
    drop(kept);
    server.shutdown().await.unwrap();
}
