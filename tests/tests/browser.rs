//! The volunteer page, whole, in headless Chromium: the real `www/` served by a
//! real server, the real wasm module in Web Workers, driven through WebDriver
//! the way a person would (type a worker count, press Contribute, press Stop).
//!
//! Why these tests exist next to the wasm unit tests: those prove the wasm
//! core computes the right numbers, but a volunteer's tab also needs the page,
//! its Web Workers, the module's loading (COOP/COEP headers, MIME types), the
//! WebSocket loop and the DOM updates to work together with the server. Only a
//! browser on the served page exercises all of that.
//!
//! The tests share one binary because each starts Chromium, which two busy
//! cores cannot run twice at once without timeouts; a lock runs them one at a
//! time.
//! - `the_page_trains_alone_and_agrees`: browser workers only (no native
//!   worker at all) train; the chart and the text sample update, a
//!   screenshot goes to `target/test-output/browser-page.png`, the run is
//!   paused and the tab's replicas hold the server's weights, and Stop
//!   leaves the run.
//! - `browser_and_native_workers_train_together`: browser and native workers
//!   share one run to its last step, and every replica, of both kinds, ends
//!   on the server's weights (their forward kernels differ in the last bits;
//!   the update path must not).
//! - `the_page_shows_the_leaderboard_and_a_reload_keeps_its_credit`: a name
//!   with markup in it is shown as text on the leaderboard, the tab's row
//!   is its own, and a reload joins as the same contributor (same public
//!   id, growing credit).
//! - `the_page_keeps_its_cpu_share_and_pauses_while_hidden`: a tab opened
//!   with `?share=25&workers=1&autostart=1` starts by itself, its worker is
//!   busy about a quarter of the time, and the tab pauses (its worker
//!   leaves the run) while hidden and resumes by itself when shown.
//! - `a_tab_moves_to_another_relay_when_its_relay_goes_away`: scaled out
//!   (NATS, the coordinator, two relays with a native worker each), the
//!   page served by the coordinator joins a relay it found in
//!   `/api/relays`; that relay is killed, and the tab goes on training
//!   through the other one.
//!
//! Prerequisites are never skipped: without `www/pkg` (built by
//! `cargo xtask test`'s `wasm-pack-build` step), Chromium or chromedriver the
//! tests fail and say what is missing, so a machine that cannot run them can
//! never pass `cargo xtask test` by accident.

use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use seedling_server::app::Server;
use seedling_server::coordinator::{Settings, Status};
use seedling_tests::*;
use serde_json::{Value, json};

/// Debian's Chromium and its driver (the versions match by construction);
/// `cargo xtask test` installs both.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Headless in a container, as root: no sandbox (Chromium refuses to start as
/// root otherwise), no GPU, `/tmp` instead of a small `/dev/shm`, and none of
/// the background traffic that would wait on a network the tests do not have.
/// The window size fixes the layout the screenshot shows.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,800",
];

/// Bound on every single wait: generous for two busy cores (a passing test
/// needs about 10 s in all).
const WAIT: Duration = Duration::from_secs(60);
/// Bound on a whole test's time in the browser, so that several slow waits
/// cannot add up past two minutes.
const BUDGET: Duration = Duration::from_secs(100);

/// One Chromium at a time (see the module docs). A tokio mutex, because it is
/// held across awaits; it works across the tests' separate runtimes.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The repository's `www/`, after checking that everything a browser test
/// needs is there; panics naming what is missing and how to get it.
fn prerequisites() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let www = root.join("www");
    let wasm = www.join("pkg").join("seedling_wasm_bg.wasm");
    let mut missing = Vec::new();
    if !wasm.is_file() {
        missing.push(format!(
            "{} (build it with `cargo xtask test --only wasm-pack-build`)",
            wasm.display()
        ));
    }
    for (bin, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        if !Path::new(bin).is_file() {
            missing.push(format!(
                "{bin} (Debian package {package}; `cargo xtask test` installs it)"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "the browser tests cannot run; missing:\n  {}",
        missing.join("\n  ")
    );
    www
}

/// Where tests leave files for people to look at: `target/test-output/`.
fn output_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target>/tmp`, so this follows CARGO_TARGET_DIR.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A chromedriver process on a free loopback port. Dropping it kills its
/// whole process group, so a Chromium it started cannot outlive a failed test.
struct Driver {
    child: Child,
    port: u16,
    /// Set once chromedriver exited and was reaped: its pid (the group id)
    /// may then belong to someone else, so the group is left alone.
    exited: bool,
}

impl Driver {
    fn spawn() -> Self {
        // Bind to learn a free port, then release it for chromedriver; nothing
        // else on this machine races for loopback ports in between.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, which Chromium's processes join.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        Self {
            child,
            port,
            exited: false,
        }
    }

    /// A new headless Chromium session. chromedriver needs a moment before it
    /// listens, so connection errors are retried for a while.
    async fn session(&self) -> Client {
        let Value::Object(caps) = json!({
            "goog:chromeOptions": { "binary": CHROMIUM, "args": CHROMIUM_ARGS }
        }) else {
            unreachable!()
        };
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let url = format!("http://127.0.0.1:{}", self.port);
        let start = Instant::now();
        loop {
            match builder.connect(&url).await {
                Ok(client) => return client,
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    panic!("no Chromium session through chromedriver at {url}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Driver {
    /// Asks chromedriver to quit (it ends its browsers and reaps them) and
    /// waits a little for it; [`Drop`] kills whatever is left.
    async fn shutdown(mut self) {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let _ = tokio::time::timeout(Duration::from_secs(5), http_get(addr, "/shutdown")).await;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.exited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.exited {
            return;
        }
        // The group id is chromedriver's pid (`process_group(0)`), still ours
        // while it is unreaped: this ends the processes this test started
        // (the driver and its browser) and nothing else.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `body` with a fresh Chromium session, then closes the session and
/// the driver whether `body` passed, panicked (the panic is re-raised) or
/// overran [`BUDGET`].
async fn in_browser(body: impl AsyncFnOnce(&Client)) {
    let _one = ONE_BROWSER.lock().await;
    let driver = Driver::spawn();
    let client = driver.session().await;
    let result = AssertUnwindSafe(tokio::time::timeout(BUDGET, body(&client)))
        .catch_unwind()
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
    driver.shutdown().await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the browser test ran over its budget of {BUDGET:?}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Evaluates a JavaScript expression in the page.
async fn js(page: &Client, expr: &str) -> Value {
    page.execute(&format!("return {expr};"), vec![])
        .await
        .unwrap_or_else(|e| panic!("evaluating `{expr}` in the page: {e}"))
}

/// Polls `expr` in the page until `pred` holds; panics with the last value.
async fn page_wait(page: &Client, what: &str, expr: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = js(page, expr).await;
        if pred(&v) {
            return v;
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; `{expr}` is {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens the server's page and waits for its script to start.
async fn open(page: &Client, server: &Server) {
    page.goto(&format!("http://{}/", server.addr)).await.unwrap();
    page_wait(page, "the page script", "typeof window.seedling", |v| {
        v == "object"
    })
    .await;
}

/// Sets the worker count the way a person would, with the page's − and +
/// buttons (typing into the field fires `change` on clear, which the page
/// clamps back to 1), and presses Contribute.
async fn contribute(page: &Client, workers: u32) {
    let max: u32 = js(page, "+document.getElementById('workers').max")
        .await
        .as_u64()
        .unwrap() as u32;
    assert!(workers <= max, "the page allows at most {max} workers here");
    let minus = page.find(Locator::Id("workers-minus")).await.unwrap();
    for _ in 1..max {
        minus.click().await.unwrap();
    }
    let plus = page.find(Locator::Id("workers-plus")).await.unwrap();
    for _ in 1..workers {
        plus.click().await.unwrap();
    }
    let input = page.find(Locator::Id("workers")).await.unwrap();
    assert_eq!(input.prop("value").await.unwrap(), Some(workers.to_string()));
    let button = page.find(Locator::Id("contribute")).await.unwrap();
    assert_eq!(button.text().await.unwrap(), "Contribute");
    button.click().await.unwrap();
    assert_eq!(button.text().await.unwrap(), "Stop", "the button toggles");
    let running = js(page, "[window.seedling.running, window.seedling.workers]").await;
    assert_eq!(
        running,
        json!([true, workers]),
        "the page runs the workers asked for"
    );
}

/// Presses Stop and waits for the tab's volunteers to leave the server.
async fn stop(page: &Client, server: &Server) {
    let button = page.find(Locator::Id("contribute")).await.unwrap();
    button.click().await.unwrap();
    assert_eq!(
        button.text().await.unwrap(),
        "Contribute",
        "the button toggles back"
    );
    assert_eq!(js(page, "window.seedling.running").await, json!(false));
    wait_for(server, WAIT, "the tab's volunteers to leave", |s| {
        s.volunteers.browser == 0
    })
    .await;
}

/// Pauses the run through the admin route (the server must have been started
/// with `admin_token = Some(TOKEN)`) and waits until it is paused.
async fn pause(server: &Server) {
    let (head, _) = http_request(server.addr, "POST", "/admin/pause", AUTH).await;
    assert!(head.contains("200"), "pause: {head}");
    wait_for(server, WAIT, "the pause", |s| s.paused).await;
}

/// The operator token of the tests' servers, and its header line.
const TOKEN: &str = "browser-tests";
const AUTH: &str = "Authorization: Bearer browser-tests\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_trains_alone_and_agrees() {
    let www = prerequisites();
    // Open-ended: a tiny run takes about 80 steps/s here and could end before
    // the page shows a second sample (samples are at least 2 s apart), and
    // on a faster machine any fixed step count is a race. The test pauses the
    // run once it has seen the page work, then compares the replicas.
    let mut opts = tiny_options(test_settings(1_000_000));
    opts.www = Some(www);
    opts.admin_token = Some(TOKEN.into());
    let server = start(opts).await;
    let started = Instant::now();
    in_browser(async |page| {
        let workers = 2;
        open(page, &server).await;
        let placeholder = js(page, "document.getElementById('sample').textContent").await;
        contribute(page, workers).await;

        // Only this tab is connected, so every member of every step is the
        // browser's work; the predicate also watches that no other kind of
        // client ever shows up.
        let intruder = AtomicBool::new(false);
        let only_browsers = |s: &Status| {
            if s.volunteers.native + s.volunteers.simulated > 0 {
                intruder.store(true, Ordering::Relaxed);
            }
        };
        wait_for(&server, WAIT, "the tab's workers to join", |s| {
            only_browsers(s);
            s.volunteers.browser == workers as usize
        })
        .await;
        let joined = Instant::now();
        let sample = "document.getElementById('sample').textContent";
        let first = page_wait(page, "a first text sample", sample, |v| {
            v.as_str().is_some_and(|t| !t.trim().is_empty()) && *v != placeholder
        })
        .await;

        // The DOM follows the run: a newer sample from later weights, the
        // loss chart (the page polls the status every 1.5 s), the step.
        page_wait(page, "a newer text sample", sample, |v| {
            v.as_str().is_some_and(|t| !t.trim().is_empty()) && *v != first
        })
        .await;
        let chart = "+document.getElementById('chart').getAttribute('data-points')";
        page_wait(page, "the loss chart", chart, |v| {
            v.as_f64().is_some_and(|n| n > 0.0)
        })
        .await;
        let step_shown = "+document.getElementById('step').textContent.replace(/,/g, '')";
        page_wait(page, "a step past 5 on the page", step_shown, |v| {
            v.as_f64().is_some_and(|n| n > 5.0)
        })
        .await;
        // The page polls the lean status (no curve, no client map) and
        // fetches the curve by increments: the chart keeps growing.
        let lean = js(page, "JSON.stringify(window.seedling.status).length").await;
        assert!(lean.as_f64().is_some_and(|n| n > 0.0 && n < 4096.0), "status of {lean} bytes");
        let drawn = js(page, chart).await.as_f64().unwrap_or(0.0);
        page_wait(page, "the chart growing", chart, |v| {
            v.as_f64().is_some_and(|n| n > drawn)
        })
        .await;
        // However fast the run goes, workers' notices (two per worker per
        // step) redraw the page at most every 250 ms; the 1 s clock and the
        // status and leaderboard answers redraw it too, about two a second
        // more. A redraw per notice cost the tab's main thread more CPU
        // than its volunteer.
        let renders = "window.seedling.renders";
        let (r0, s0, t0) = (js(page, renders).await, server.status().steps_closed, Instant::now());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (r1, s1) = (js(page, renders).await, server.status().steps_closed);
        let secs = t0.elapsed().as_secs_f64();
        let redraws = r1.as_f64().unwrap() - r0.as_f64().unwrap();
        let notices = 2.0 * f64::from(workers) * (s1 - s0) as f64;
        eprintln!("{redraws} redraws for about {notices} notices in {secs:.1} s");
        assert!(notices >= 10.0 * secs, "the run went too slowly to tell: {notices} notices in {secs:.1} s");
        assert!(redraws <= 10.0 * secs, "{redraws} redraws in {secs:.1} s for {notices} notices");
        let png = page.screenshot().await.unwrap();
        let path = output_dir().join("browser-page.png");
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot of the page: {}", path.display());

        // Freeze the run and compare every replica with the server's weights:
        // the server's record of the tab's reports and the page's own record
        // (one {step, hash} per worker) must both equal the server's hash at
        // the paused step. Jobs already out when the pause lands may still
        // close one more step, so the two are read together until they agree.
        pause(&server).await;
        let deadline = Instant::now() + WAIT;
        let s = loop {
            let s = server.status();
            only_browsers(&s);
            let hashes = js(page, "window.seedling.hashes").await;
            let want = json!({ "step": s.step, "hash": s.hash });
            let agree = s.client_hashes.len() == workers as usize
                && s.client_hashes.values().all(|c| c.kind == "browser")
                && all_replicas_agree(&s)
                && hashes
                    .as_array()
                    .is_some_and(|h| h.len() == workers as usize && h.iter().all(|x| *x == want));
            if agree && server.status().step == s.step {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "replicas disagree with the paused server at step {} ({}): server saw {:?}, the page has {hashes}",
                s.step,
                s.hash,
                s.client_hashes
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let secs = joined.elapsed().as_secs_f64();
        eprintln!(
            "browser-only: {} steps in {secs:.1} s ({:.1} steps/s)",
            s.steps_closed,
            s.steps_closed as f64 / secs
        );
        assert!(!intruder.load(Ordering::Relaxed), "a non-browser client joined");
        assert!(s.steps_closed >= 5, "only {} steps closed", s.steps_closed);
        let members: u64 = s.client_hashes.values().map(|c| c.members).sum();
        assert!(
            members >= s.steps_closed * u64::from(s.population),
            "the browser evaluated {members} members over {} steps of {}",
            s.steps_closed,
            s.population
        );
        assert!(
            s.client_hashes.values().all(|c| c.members > 0),
            "every worker evaluated members: {:?}",
            s.client_hashes
        );
        assert_eq!((s.divergences, s.rejected_clients), (0, 0));

        // The tab counts every member it evaluated; the server only those
        // that counted (a late answer is dropped), so the tab's is not less.
        // The page redraws its figures on a timer while the tab keeps
        // working, so the counter and the DOM are compared until they agree.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (evaluated, shown) = loop {
            let evaluated = js(page, "window.seedling.membersEvaluated")
                .await
                .as_u64()
                .unwrap();
            let shown = page
                .find(Locator::Id("tab-members"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if shown.replace(',', "") == evaluated.to_string() || Instant::now() > deadline {
                break (evaluated, shown);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            evaluated >= members,
            "the tab counted {evaluated}, the server {members}"
        );
        assert_eq!(shown.replace(',', ""), evaluated.to_string(), "#tab-members");

        stop(page, &server).await;
        let s = server.status();
        assert_eq!(
            s.volunteers.total, 0,
            "Stop left volunteers behind: {:?}",
            s.volunteers
        );
    })
    .await;
    eprintln!("the page test took {:.1?}", started.elapsed());
    server.shutdown().await.unwrap();
}

/// Steps of the mixed run.
const MIXED_STEPS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_and_native_workers_train_together() {
    let www = prerequisites();
    let mut opts = tiny_options(test_settings(MIXED_STEPS));
    opts.www = Some(www);
    // Paused until both kinds have joined: a tiny run is so fast that
    // whichever joins first could otherwise finish it alone.
    opts.admin_token = Some(TOKEN.into());
    let server = start(opts).await;
    pause(&server).await;
    let url = ws_url(&server);
    in_browser(async |page| {
        open(page, &server).await;
        contribute(page, 1).await;
        let natives = [spawn_worker(&url, 1), spawn_worker(&url, 1)];
        wait_for(&server, WAIT, "browser and native workers to join", |s| {
            s.volunteers.browser == 1 && s.volunteers.native == 2
        })
        .await;
        let (head, _) = http_request(server.addr, "POST", "/admin/resume", AUTH).await;
        assert!(head.contains("200"), "resume: {head}");
        let s = wait_for(
            &server,
            WAIT,
            "the mixed run to finish with agreeing replicas",
            |s| s.finished && s.client_hashes.len() == 3 && all_replicas_agree(s),
        )
        .await;
        let kinds = |k: &str| s.client_hashes.values().filter(|c| c.kind == k).count();
        assert_eq!(
            (kinds("browser"), kinds("native")),
            (1, 2),
            "{:?}",
            s.client_hashes
        );
        assert!(
            s.client_hashes.values().all(|c| c.members > 0),
            "every replica evaluated members: {:?}",
            s.client_hashes
        );
        assert_eq!((s.divergences, s.rejected_clients), (0, 0));
        // The tab's own view agrees too.
        let want = json!([{ "step": s.step, "hash": s.hash }]);
        page_wait(
            page,
            "the tab's hash at the final step",
            "window.seedling.hashes",
            |v| *v == want,
        )
        .await;
        stop(page, &server).await;
        for w in natives {
            w.stop().await;
        }
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Credit that lasts, on the page: the name typed in (hostile markup
/// included) is kept in `localStorage` and shown as text on the
/// leaderboard, the tab's row is marked as its own, and after a reload the
/// tab joins as the same contributor (the same public id, whose credit
/// keeps growing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_leaderboard_and_a_reload_keeps_its_credit() {
    let www = prerequisites();
    let mut opts = tiny_options(test_settings(1_000_000));
    opts.www = Some(www);
    let server = start(opts).await;
    in_browser(async |page| {
        open(page, &server).await;
        let typed = js(
            page,
            "(() => { const n = document.getElementById('name'); \
             n.value = ' <img src=x onerror=pwned=1>\\u202e Ada\\n'; \
             n.dispatchEvent(new Event('change')); return n.value; })()",
        )
        .await;
        let name = "<img src=x onerror=pwned=1> Ada";
        assert_eq!(typed, json!(name), "the field shows the name as the server will");
        contribute(page, 1).await;
        let ids = page_wait(page, "the tab's public id", "window.seedling.identity.ids", |v| {
            v.as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
        let id = ids[0].as_str().unwrap().to_string();
        assert_eq!(id.len(), 12);
        let mine = "(() => { const r = document.querySelector('#leaderboard tr.mine'); \
                    return r ? [r.dataset.id, r.cells[1].textContent, \
                    +r.cells[3].textContent.replace(/,/g, '')] : null; })()";
        let row = page_wait(page, "the tab's credited row", mine, |v| {
            v[2].as_u64().is_some_and(|m| m > 0)
        })
        .await;
        assert_eq!(
            (row[0].as_str(), row[1].as_str()),
            (Some(id.as_str()), Some(name))
        );
        assert_eq!(
            js(
                page,
                "[document.querySelectorAll('#leaderboard img').length, window.pwned === undefined]"
            )
            .await,
            json!([0, true]),
            "the name is text, never markup"
        );
        let board = server.status().contributors;
        let on_server = board
            .contributors
            .iter()
            .find(|c| c.id == id)
            .expect("the server lists the tab");
        assert_eq!(on_server.name, name);
        page_wait(
            page,
            "the stored token",
            "localStorage.getItem('seedling.token.0')",
            |v| v.as_str().is_some_and(|t| t.len() == 32),
        )
        .await;
        let before = row[2].as_u64().unwrap();

        page.refresh().await.unwrap();
        open(page, &server).await;
        assert_eq!(
            js(page, "document.getElementById('name').value").await,
            json!(name),
            "the name is kept"
        );
        contribute(page, 1).await;
        let ids = page_wait(
            page,
            "the tab's public id after the reload",
            "window.seedling.identity.ids",
            |v| v.as_array().is_some_and(|a| a.len() == 1),
        )
        .await;
        assert_eq!(ids[0], json!(id), "a reload keeps the public id");
        page_wait(page, "more credit after the reload", mine, |v| {
            v[0] == json!(id) && v[2].as_u64().is_some_and(|m| m > before)
        })
        .await;
        let named = server
            .status()
            .contributors
            .contributors
            .iter()
            .filter(|c| c.name == name)
            .count();
        assert_eq!(named, 1, "one contributor across the reload");
        stop(page, &server).await;
    })
    .await;
    server.shutdown().await.unwrap();
}

/// The page's CPU share and pause: see the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_keeps_its_cpu_share_and_pauses_while_hidden() {
    let www = prerequisites();
    // Jobs long enough (a wider model, a whole population) that a worker's
    // time goes to evaluating and resting rather than to round trips.
    let mut opts = corpus_options(
        Settings {
            eval_every: 0,
            checkpoint_every: 0,
            ..Settings::default()
        },
        |vocab| {
            let mut c = seedling_core::RunConfig::rw256(vocab);
            c.model.hidden = 64;
            c.es.batch = 1;
            c
        },
    );
    opts.www = Some(www);
    let server = start(opts).await;
    in_browser(async |page| {
        // The query presets the controls and starts at once, as the fleet
        // emulator's tabs do.
        page.goto(&format!("http://{}/?share=25&workers=1&autostart=1", server.addr))
            .await
            .unwrap();
        page_wait(page, "the page script", "typeof window.seedling", |v| v == "object").await;
        assert_eq!(js(page, "self.crossOriginIsolated").await, json!(true));
        assert_eq!(
            js(page, "document.getElementById('cpu-share').value").await,
            json!("25")
        );
        wait_for(&server, WAIT, "the tab's worker to join", |s| {
            s.volunteers.browser == 1 && s.steps_closed >= 1
        })
        .await;
        // The page measures busy time per worker over its last 5 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let cpu = js(page, "window.seedling.cpu").await;
        let fraction = cpu["busyFraction"].as_f64().unwrap_or(-1.0);
        eprintln!("at a 25 % share the tab was busy {fraction:.3} of the time: {cpu}");
        assert_eq!(cpu["share"], json!(0.25));
        assert!(
            (0.1..=0.45).contains(&fraction),
            "busy {fraction:.3} of the time at a 25 % share: {cpu}"
        );

        // Hidden: the page holds its workers back, and they leave the run.
        let set_visibility = |state: &str| {
            format!(
                "Object.defineProperty(document, 'visibilityState', {{ configurable: true, get: () => '{state}' }});
                 Object.defineProperty(document, 'hidden', {{ configurable: true, get: () => {} }});
                 document.dispatchEvent(new Event('visibilitychange'));",
                state == "hidden"
            )
        };
        page.execute(&set_visibility("hidden"), vec![]).await.unwrap();
        let cpu = js(page, "window.seedling.cpu").await;
        assert_eq!(
            (&cpu["paused"], &cpu["pauseReason"]),
            (&json!(true), &json!("hidden")),
            "{cpu}"
        );
        assert_eq!(js(page, "window.seedling.running").await, json!(false));
        wait_for(&server, WAIT, "the hidden tab's worker to leave", |s| {
            s.volunteers.browser == 0
        })
        .await;
        let shown = js(page, "document.getElementById('state-line').textContent").await;
        assert!(shown.as_str().unwrap().contains("hidden"), "{shown}");

        // Shown again: it resumes by itself and works on.
        page.execute(&set_visibility("visible"), vec![]).await.unwrap();
        let cpu = js(page, "window.seedling.cpu").await;
        assert_eq!(cpu["paused"], json!(false), "{cpu}");
        assert_eq!(js(page, "window.seedling.running").await, json!(true));
        let before = server.status().steps_closed;
        wait_for(&server, WAIT, "the shown tab to work again", |s| {
            s.volunteers.browser == 1 && s.steps_closed > before
        })
        .await;
        let button = page.find(Locator::Id("contribute")).await.unwrap();
        button.click().await.unwrap();
        wait_for(&server, WAIT, "the tab to leave", |s| s.volunteers.browser == 0).await;
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Scaled out, the page joins one of the run's relays (from `/api/relays`)
/// and, when that relay goes away, moves to another and trains on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_moves_to_another_relay_when_its_relay_goes_away() {
    use seedling_tests::nats::*;
    let www = prerequisites();
    let nats = NatsServer::start();
    let mut opts = with_nats(tiny_options(test_settings(1_000_000)), &nats, "tab");
    opts.www = Some(www);
    let server = start(opts).await;
    // Relays whose public URLs the coordinator lists for the page.
    let mut relays = Vec::new();
    for id in ["r1", "r2"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hub = seedling_server::relay::hub::HubSettings {
            public_url: format!("http://{}", listener.local_addr().unwrap()),
            ..test_hub()
        };
        let opts = seedling_server::relay::RelayOptions {
            nats: nats_options(&nats, "tab"),
            id: id.into(),
            www: None,
            limits: Default::default(),
            hub,
        };
        relays.push(Some(seedling_server::relay::start(listener, opts).await.unwrap()));
    }
    // A native worker on each relay: the tab's relay is then the one with
    // two volunteers. (A relay is listed from its start, volunteers or not.)
    let mut natives: Vec<_> = relays
        .iter()
        .map(|r| Some(spawn_worker(&relay_url(r.as_ref().unwrap()), 1)))
        .collect();
    let start = Instant::now();
    loop {
        let (_, body) = http_get(server.addr, "/api/relays").await;
        if body.matches("http://").count() == 2 {
            break;
        }
        assert!(start.elapsed() < WAIT, "the relays were not listed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    in_browser(async |page| {
        open(page, &server).await;
        contribute(page, 1).await;
        let start = Instant::now();
        let first = loop {
            let on = relays
                .iter()
                .position(|r| r.as_ref().is_some_and(|r| r.status().volunteers == 2));
            if let Some(i) = on {
                break i;
            }
            assert!(start.elapsed() < WAIT, "the tab joined no relay");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let doomed = relays[first].take().unwrap();
        let other = relays[1 - first].as_ref().unwrap();
        assert_eq!(other.status().volunteers, 1, "one tab, one relay");
        // The tab evaluates through its relay.
        wait_relay(&doomed, WAIT, "the tab's first jobs", |s| s.jobs_done > 0).await;
        doomed.kill();
        natives[first].take().unwrap().kill();
        let moved = wait_relay(other, WAIT, "the tab on the other relay", |s| s.volunteers == 2).await;
        // ...and the run goes on with it, its replica on the server's weights.
        let at = server.status().step;
        let s = wait_for(&server, WAIT, "steps after the move", |s| s.step > at + 5).await;
        assert_eq!(s.divergences, 0);
        assert_eq!(moved.divergences, 0);
        page_wait(
            page,
            "the tab to report a step past the move",
            "window.seedling.hashes",
            |v| v[0]["step"].as_u64().is_some_and(|step| step > at),
        )
        .await;
        let button = page.find(Locator::Id("contribute")).await.unwrap();
        button.click().await.unwrap();
    })
    .await;
    for w in natives.into_iter().flatten() {
        w.stop().await;
    }
    for r in relays.into_iter().flatten() {
        r.kill();
    }
    server.shutdown().await.unwrap();
}
