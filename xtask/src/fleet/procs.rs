//! The processes a fleet run starts: the server and the volunteers (native
//! workers and headless Chromium tabs), each killed when its handle drops,
//! so every way out of a run (its end, an error, Ctrl-C, a panic) leaves
//! nothing running. Only these handles are ever killed: the emulator never
//! looks processes up by name. A tab's Chromium starts its own helper
//! processes, so it runs in a process group of its own, and its handle
//! kills that group (by the id it was given, never by name).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::proxy::{Link, Proxy};

/// A child process, killed and reaped on drop.
#[derive(Debug)]
pub struct Guarded {
    child: Child,
    /// Its log file, for error messages.
    pub log: PathBuf,
    /// It leads a process group of its own, killed whole on drop.
    group: bool,
    /// It was reaped: its pid, and so its group id, may be someone else's.
    reaped: bool,
}

impl Guarded {
    /// Starts `cmd` with its output in `log`; with `group`, in a process
    /// group of its own that drop kills whole.
    pub fn spawn(cmd: &mut Command, log: &Path, group: bool) -> Result<Self, String> {
        if group {
            cmd.process_group(0);
        }
        let out = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("could not start `{}`: {e}", crate::show(cmd)))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
            group,
            reaped: false,
        })
    }

    /// Whether the process has exited by itself.
    pub fn exited(&mut self) -> bool {
        let gone = !matches!(self.child.try_wait(), Ok(None));
        self.reaped |= gone;
        gone
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.group && !self.reaped {
            // The group id is the leader's pid, still ours while it is
            // unreaped: this ends the processes it started and nothing else.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
        }
        // SIGKILL to this pid; an error means it is already gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `seedling serve`, listening on a port it picked.
#[derive(Debug)]
pub struct Server {
    pub process: Guarded,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `bin serve ARGS` with `--port 0` and waits (at most `wait`,
    /// or until `stop`) for the line that names its address.
    pub fn start(
        bin: &Path,
        args: &[String],
        log: &Path,
        wait: Duration,
        stop: &AtomicBool,
    ) -> Result<Self, String> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve").args(args);
        // The server prints its address on stdout; a thread reads it and
        // copies the rest, with stderr, into the log.
        let err = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let mut copy = err.try_clone().map_err(|e| e.to_string())?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("could not start `{}`: {e}", crate::show(&cmd)))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let process = Guarded {
            child,
            log: log.to_path_buf(),
            group: false,
            reaped: false,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = server_address(&line) {
                    let _ = tx.send(addr);
                }
                let _ = std::io::Write::write_all(&mut copy, format!("{line}\n").as_bytes());
            }
        });
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => return Ok(Server { process, addr }),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "the server exited before listening (log: {})",
                        log.display()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if stop.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            if start.elapsed() > wait {
                return Err(format!(
                    "the server did not listen within {wait:?} (log: {})",
                    log.display()
                ));
            }
        }
    }
}

/// The address in the server's first line, "Seedling server at
/// http://127.0.0.1:PORT/ (volunteers: ...)".
fn server_address(line: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("Seedling server at http://")?;
    rest.split('/').next()?.parse().ok()
}

/// Debian's Chromium, which the browser tests use too.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Headless in a container, possibly as root: no sandbox, no GPU, `/tmp`
/// instead of a small `/dev/shm`, none of the background traffic that would
/// wait on a network the fleet does not have, and no throttling of a tab
/// nobody looks at (a headless tab is visible, so the page does not pause).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-port=0",
];

/// What a volunteer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `seedling worker --threads T --cpu-percent P`.
    Native {
        /// Evaluating threads.
        threads: usize,
        /// Share of each thread's core.
        cpu_percent: u8,
    },
    /// A headless Chromium tab on the volunteer page, opened through the
    /// volunteer's proxy (`http://PROXY/?autostart=1&...`): the proxy is
    /// plain TCP, so the page, its wasm and its WebSocket all go through
    /// the volunteer's link. The page starts by itself with `workers` Web
    /// Workers at its CPU-share control's `cpu_percent`.
    Browser {
        /// Web Workers of the tab.
        workers: usize,
        /// The page's CPU share (25, 50, 75 or 100).
        cpu_percent: u8,
    },
}

impl Kind {
    /// The name in the JSON line and the table.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Native { .. } => "native",
            Kind::Browser { .. } => "browser",
        }
    }

    /// The page a tab opens through `proxy`.
    pub fn page_url(proxy: SocketAddr, workers: usize, cpu_percent: u8) -> String {
        format!("http://{proxy}/?autostart=1&workers={workers}&share={cpu_percent}")
    }

    /// The command of volunteer `id`; a tab keeps its profile under `dir`.
    fn command(self, bin: &Path, proxy: SocketAddr, dir: &Path, id: usize) -> Command {
        match self {
            Kind::Browser { workers, cpu_percent } => {
                let mut cmd = Command::new(CHROMIUM);
                cmd.args(CHROMIUM_ARGS)
                    .arg(format!(
                        "--user-data-dir={}",
                        dir.join(format!("chromium-{id}")).display()
                    ))
                    .arg(Self::page_url(proxy, workers, cpu_percent));
                cmd
            }
            Kind::Native { threads, cpu_percent } => {
                let mut cmd = Command::new(bin);
                cmd.arg("worker")
                    .arg("--server")
                    .arg(format!("ws://{proxy}/ws"))
                    .arg("--threads")
                    .arg(threads.to_string())
                    .arg("--cpu-percent")
                    .arg(cpu_percent.to_string())
                    // Each volunteer its own identity: with the default
                    // file every worker on this machine would present one
                    // session token, and the server hands a session to the
                    // newest connection that presents it.
                    .arg("--identity-file")
                    .arg(dir.join(format!("volunteer-{id}.identity")));
                cmd
            }
        }
    }
}

/// One volunteer: its process and its own link to the server. The process
/// is declared first, so it dies before its link closes.
#[derive(Debug)]
pub struct Volunteer {
    pub process: Guarded,
    /// Its link: held so it lives as long as the volunteer.
    pub link: Proxy,
    pub kind: Kind,
    /// Its number in the run (0, 1, ... in order of joining).
    pub id: usize,
}

/// What every volunteer of a run is started with.
#[derive(Debug)]
pub struct Launcher<'a> {
    /// Runs the proxies.
    pub rt: &'a tokio::runtime::Runtime,
    /// The `seedling` binary.
    pub bin: &'a Path,
    /// Where the volunteers' logs go.
    pub dir: &'a Path,
    /// The server's address, behind every proxy.
    pub server: SocketAddr,
    /// Each volunteer's link.
    pub link: Link,
    /// Roots the links' jitter.
    pub seed: u64,
}

impl Launcher<'_> {
    /// Starts volunteer `id` of `kind` behind a new proxy.
    pub fn volunteer(&self, kind: Kind, id: usize) -> Result<Volunteer, String> {
        let seed = self.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let proxy = self
            .rt
            .block_on(Proxy::start(self.server, self.link, seed))
            .map_err(|e| format!("starting volunteer {id}'s proxy: {e}"))?;
        let log = self.dir.join(format!("volunteer-{id}.log"));
        let group = matches!(kind, Kind::Browser { .. });
        let mut cmd = kind.command(self.bin, proxy.addr(), self.dir, id);
        let process = Guarded::spawn(&mut cmd, &log, group)?;
        Ok(Volunteer {
            process,
            link: proxy,
            kind,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_server_address() {
        let line = "Seedling server at http://127.0.0.1:40123/ (volunteers: ws://127.0.0.1:40123/ws)";
        assert_eq!(server_address(line), Some("127.0.0.1:40123".parse().unwrap()));
        assert_eq!(server_address("loading corpus"), None);
    }

    #[test]
    fn a_native_volunteer_runs_the_worker_through_its_proxy() {
        let kind = Kind::Native {
            threads: 1,
            cpu_percent: 25,
        };
        let cmd = kind.command(
            Path::new("seedling"),
            "127.0.0.1:9".parse().unwrap(),
            Path::new("d"),
            0,
        );
        assert_eq!(
            crate::show(&cmd),
            "seedling worker --server ws://127.0.0.1:9/ws --threads 1 --cpu-percent 25 \
             --identity-file d/volunteer-0.identity"
        );
    }

    #[test]
    fn a_browser_volunteer_opens_the_page_through_its_proxy() {
        let kind = Kind::Browser {
            workers: 1,
            cpu_percent: 25,
        };
        let cmd = kind.command(
            Path::new("seedling"),
            "127.0.0.1:9".parse().unwrap(),
            Path::new("/r"),
            3,
        );
        let shown = crate::show(&cmd);
        assert!(shown.starts_with(CHROMIUM), "{shown}");
        assert!(
            shown.contains("--headless=new") && shown.contains("--user-data-dir=/r/chromium-3"),
            "{shown}"
        );
        assert!(
            shown.ends_with("http://127.0.0.1:9/?autostart=1&workers=1&share=25"),
            "{shown}"
        );
        assert_eq!(kind.name(), "browser");
    }
}
