//! `cargo xtask screenshots`: the README's pictures of the volunteer page,
//! taken from a short real run, so they always show the current page and
//! the current default model.
//!
//! It builds the release `seedling` and the page's wasm (`www/pkg`), starts
//! `seedling serve --minutes 5` in a scratch run directory under
//! `target/screenshots/`, and opens the page in headless Chromium through
//! chromedriver (Debian's pair, as the browser tests use) with
//! `?autostart=1&workers=1`, so the tab itself is the run's volunteer. Once
//! the loss chart has points and the tab has sampled its own text, it saves
//! the viewport at a desktop and a phone size (see [`SHOTS`]). With
//! `--learning-curve` it then runs `xtask/scripts/learning-curve.sh`, which
//! trains what is missing of the 30-minute run and the BPTT baseline that
//! `docs/learning-curve.svg` shows (about 35 minutes) and plots them.
//!
//! Why WebDriver rather than `chromium --screenshot`: the picture must wait
//! for a condition inside the page (a curve with points, a sample), which a
//! fixed-delay screenshot cannot check. The WebDriver calls are a handful of
//! JSON requests, sent over a plain loopback socket so xtask needs no HTTP
//! client.
//!
//! Every process it starts is killed when its handle drops (the fleet
//! emulator's handles), whichever way the command ends.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::cmd::{Ctx, run};
use crate::fleet::procs::{Guarded, Server};
use crate::setup::{CHROMEDRIVER, CHROMIUM, CHROMIUM_ARGS};
use crate::wasm;

pub const USAGE: &str = "  screenshots [--learning-curve] [--no-build]
        build the release `seedling` and www/pkg, run `seedling serve` for a
        few minutes with the page itself contributing (one Web Worker in
        headless Chromium), and once its loss chart has points save
        docs/page-desktop.png (1280x1300) and docs/page-phone.png (390x844).
        --learning-curve then runs xtask/scripts/learning-curve.sh for
        docs/learning-curve.svg (trains the missing runs/default and
        runs/bptt first: about 35 minutes). Logs go to target/screenshots.
";

/// One picture: where it goes and the window it is taken in.
struct Shot {
    path: &'static str,
    width: u32,
    height: u32,
    /// Emulate a phone (a touch screen, the mobile viewport rules).
    phone: bool,
}

/// The README's two pictures of the page: a laptop's window and a phone's
/// (the page's one-column layout).
const SHOTS: &[Shot] = &[
    Shot {
        path: "docs/page-desktop.png",
        width: 1280,
        height: 1300,
        phone: false,
    },
    Shot {
        path: "docs/page-phone.png",
        width: 390,
        height: 844,
        phone: true,
    },
];

/// The run's budget: longer than the shots take, so the server is still
/// training (and the page says so) when the last one is taken.
const SERVE_MINUTES: &str = "5";

/// Validation points the loss chart must show before a shot (one every 25
/// steps by default): a curve of a few hundred steps, not a dot.
const MIN_VAL_POINTS: u32 = 12;

/// Bound on the wait for the page to be ready, per shot.
const READY_WAIT: Duration = Duration::from_secs(180);

/// True once the page is worth a picture: the chart has training points
/// and [`MIN_VAL_POINTS`] validation points, the run shows as
/// live (the server counts this tab), the tab is contributing and it has
/// sampled text of its own.
const READY_SCRIPT: &str = "\
const chart = document.getElementById('chart').dataset;
const points = Number(chart.points || 0);
const vals = Number(chart.valPoints || 0);
const sample = document.getElementById('sample');
const pressed = document.getElementById('contribute').getAttribute('aria-pressed') === 'true';
const live = document.getElementById('run-pill').classList.contains('live');
return points > 0 && vals >= arguments[0] && pressed && live
  && !sample.classList.contains('placeholder');";

/// Entry point of `cargo xtask screenshots`.
pub fn main(ctx: &Ctx, args: &[String]) -> ExitCode {
    let (mut build, mut curve) = (true, false);
    for arg in args {
        match arg.as_str() {
            "--no-build" => build = false,
            "--learning-curve" => curve = true,
            "-h" | "--help" => {
                print!("usage: cargo xtask\n{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("xtask screenshots: unknown argument `{other}`\n\nusage: cargo xtask\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let result = shoot(ctx, build).and_then(|()| {
        if curve {
            run(ctx.cmd("bash").arg("xtask/scripts/learning-curve.sh"))
        } else {
            Ok(())
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask screenshots: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Builds what the run needs (unless `build` is off), runs the server and
/// the browser, and writes every picture of [`SHOTS`].
fn shoot(ctx: &Ctx, build: bool) -> Result<(), String> {
    for bin in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(bin).is_file() {
            return Err(format!(
                "{bin} is missing (Debian packages chromium and chromium-driver; \
                 `cargo xtask test --only browser` installs them)"
            ));
        }
    }
    if build {
        run(ctx
            .cargo()
            .args(["build", "--release", "-p", "seedling-server", "--bin", "seedling"]))?;
        wasm::build_tools(ctx)?;
        wasm::build_pkg(ctx)?;
    }
    let bin = ctx.root.join("target").join("release").join("seedling");
    let pkg = ctx.root.join(wasm::PKG_DIR).join(wasm::WASM_FILE);
    for needed in [&bin, &pkg] {
        if !needed.is_file() {
            return Err(format!(
                "{} is missing (run without --no-build)",
                needed.display()
            ));
        }
    }
    // A fresh run each time: resuming an old one would show its history.
    let dir = ctx.root.join("target").join("screenshots");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;

    let stop = AtomicBool::new(false);
    let run_dir = dir.join("run").display().to_string();
    let serve_args = ["--port", "0", "--run-dir", &run_dir, "--minutes", SERVE_MINUTES].map(String::from);
    let server = Server::start(
        &bin,
        &serve_args,
        &dir.join("server.log"),
        Duration::from_secs(60),
        &stop,
    )?;
    let port = free_port()?;
    let _driver = Guarded::spawn(
        Command::new(CHROMEDRIVER).arg(format!("--port={port}")),
        &dir.join("chromedriver.log"),
        true,
    )?;
    let driver = WebDriver::connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let page = format!("http://{}/?autostart=1&workers=1", server.addr);
    for shot in SHOTS {
        let png = driver.capture(&page, shot)?;
        let path = ctx.root.join(shot.path);
        fs::write(&path, &png).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!(
            "{}: {}x{}, {} KiB",
            shot.path,
            shot.width,
            shot.height,
            png.len() / 1024
        );
    }
    Ok(())
}

/// A free loopback port for chromedriver (it takes a port, not a listener).
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// A chromedriver listening on a loopback address.
struct WebDriver {
    addr: SocketAddr,
}

impl WebDriver {
    /// Waits (at most 30 s) until the driver at `addr` answers ready.
    fn connect(addr: SocketAddr) -> Result<Self, String> {
        let driver = WebDriver { addr };
        let start = Instant::now();
        loop {
            if let Ok(status) = driver.call("GET", "/status", None)
                && status["ready"] == true
            {
                return Ok(driver);
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!("chromedriver did not start on {addr}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Opens `page` in a new browser of `shot`'s size, waits until it is
    /// ready for a picture ([`READY_SCRIPT`]) and returns the viewport as PNG.
    /// The browser is closed however this ends.
    fn capture(&self, page: &str, shot: &Shot) -> Result<Vec<u8>, String> {
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push("--hide-scrollbars".into());
        // The viewport is emulated, so the picture has exactly the shot's
        // size: a window's would lose the browser's frame, and headless
        // windows are at least 500 pixels wide.
        let metrics = json!({
            "width": shot.width, "height": shot.height, "pixelRatio": 1.0,
            "mobile": shot.phone, "touch": shot.phone,
        });
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "goog:chromeOptions": {
                "binary": CHROMIUM, "args": args,
                "mobileEmulation": { "deviceMetrics": metrics },
            }
        }}});
        let session = self.call("POST", "/session", Some(caps))?;
        let id = session["sessionId"]
            .as_str()
            .ok_or_else(|| format!("chromedriver gave no session id: {session}"))?
            .to_string();
        let result = self.wait_and_capture(&id, page);
        let _ = self.call("DELETE", &format!("/session/{id}"), None);
        result
    }

    fn wait_and_capture(&self, id: &str, page: &str) -> Result<Vec<u8>, String> {
        self.call(
            "POST",
            &format!("/session/{id}/url"),
            Some(json!({ "url": page })),
        )?;
        let start = Instant::now();
        let check = json!({ "script": READY_SCRIPT, "args": [MIN_VAL_POINTS] });
        while self.call(
            "POST",
            &format!("/session/{id}/execute/sync"),
            Some(check.clone()),
        )? != true
        {
            if start.elapsed() > READY_WAIT {
                return Err(format!(
                    "the page at {page} did not show its curve and a sample within {READY_WAIT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let png = self.call("GET", &format!("/session/{id}/screenshot"), None)?;
        let png = png.as_str().ok_or("the screenshot is not a string")?;
        base64::engine::general_purpose::STANDARD
            .decode(png)
            .map_err(|e| format!("decoding the screenshot: {e}"))
    }

    /// One WebDriver command: its `value`, or the driver's error message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .map_err(|e| format!("connecting to chromedriver: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(request.as_bytes())
            .map_err(|e| format!("{method} {path}: {e}"))?;
        // chromedriver keeps the connection open whatever the request says:
        // read the head, then exactly the body it announces.
        let mut reader = BufReader::new(s);
        let mut length = 0;
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| format!("{method} {path}: {e}"))?;
            let line = line.trim_end();
            if n == 0 || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{method} {path}: bad length"))?;
            }
        }
        let mut body = vec![0; length];
        reader
            .read_exact(&mut body)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let body = String::from_utf8_lossy(&body);
        let reply: Value =
            serde_json::from_str(&body).map_err(|e| format!("{method} {path}: bad JSON ({e}): {body}"))?;
        match reply["value"].get("error") {
            Some(error) => Err(format!("{method} {path}: {error}: {}", reply["value"]["message"])),
            None => Ok(reply["value"].clone()),
        }
    }
}
