//! A real NATS server for the relay tests: Debian's `nats-server` (which
//! `cargo xtask test` installs, like Chromium) on a free loopback port,
//! requiring a user and password, killed when the handle drops.
//!
//! No mock broker: the relays and the coordinator's bridge are tested
//! against the same server operators run. A missing `nats-server` fails the
//! test that asked for one (it never skips).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's package puts the server (xtask's `setup::NATS_SERVER`).
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// The user the test servers require.
pub const USER: &str = "seedling";
/// Its password (a test secret; real deployments take theirs from the
/// environment, see `seedling_server::nats::Credentials`).
pub const PASSWORD: &str = "relay-test-secret";

/// A running `nats-server` on 127.0.0.1, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    /// The client port.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it accepts
    /// connections. Panics (failing the test) when `nats-server` is missing.
    pub fn start() -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut server = Self {
            child: None,
            port,
            dir,
        };
        server.restart();
        server
    }

    /// The URL clients connect to (credentials travel separately).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The credentials the server requires, as a relay or coordinator takes
    /// them.
    pub fn credentials(&self) -> seedling_server::nats::Credentials {
        seedling_server::nats::Credentials::UserPassword {
            user: USER.into(),
            password: PASSWORD.into(),
        }
    }

    /// Kills the server at once (SIGKILL): every client's connection drops.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`NatsServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            Path::new(NATS_SERVER).is_file(),
            "{NATS_SERVER} is missing: install Debian's nats-server package \
             (cargo xtask test does, through its setup step)"
        );
        let conf = self.dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\nauthorization {{\n  user: {USER}\n  password: \"{PASSWORD}\"\n}}\n",
                self.port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(NATS_SERVER)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {NATS_SERVER}: {e}"));
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nats-server did not listen on port {} within 10 s; its log:\n{}",
                self.port,
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nobody listens on (bound to port 0, then released; the
/// server binds it a moment later, and binds the same one on a restart).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Coordinator options that take relays over `nats` under `prefix`.
pub fn with_nats(
    mut opts: seedling_server::app::ServeOptions,
    nats: &NatsServer,
    prefix: &str,
) -> seedling_server::app::ServeOptions {
    opts.nats = Some(nats_options(nats, prefix));
    opts
}

/// How a relay or coordinator in a test reaches `nats`.
pub fn nats_options(nats: &NatsServer, prefix: &str) -> seedling_server::nats::NatsOptions {
    seedling_server::nats::NatsOptions {
        url: nats.url(),
        credentials: nats.credentials(),
        prefix: prefix.into(),
    }
}

/// Starts relay `id` on a free loopback port, over `nats` under `prefix`,
/// with `hub` settings (short chunk deadlines for tests); its public URL,
/// unless `hub` names one, is `http://` and its address.
pub async fn start_relay(
    nats: &NatsServer,
    prefix: &str,
    id: &str,
    mut hub: seedling_server::relay::hub::HubSettings,
) -> seedling_server::relay::Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    if hub.public_url.is_empty() {
        hub.public_url = format!("http://{}", listener.local_addr().unwrap());
    }
    let opts = seedling_server::relay::RelayOptions {
        nats: nats_options(nats, prefix),
        id: id.into(),
        www: None,
        limits: Default::default(),
        hub,
    };
    seedling_server::relay::start(listener, opts).await.unwrap()
}

/// Test relay settings: deadlines short enough for a test's faults.
pub fn test_hub() -> seedling_server::relay::hub::HubSettings {
    seedling_server::relay::hub::HubSettings {
        chunk_timeout: Duration::from_millis(1500),
        credit_every: Duration::from_millis(500),
        ..Default::default()
    }
}

/// The volunteer URL of a relay.
pub fn relay_url(relay: &seedling_server::relay::Relay) -> String {
    format!("ws://{}/ws", relay.addr)
}

/// Polls a relay's published figures until `pred` holds; panics with the
/// last figures after `timeout`. (A relay publishes them every
/// [`seedling_server::relay::PUBLISH`], so a figure lags its event.)
pub async fn wait_relay(
    relay: &seedling_server::relay::Relay,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&seedling_server::relay::hub::HubStatus) -> bool,
) -> seedling_server::relay::hub::HubStatus {
    let start = Instant::now();
    loop {
        let s = relay.status();
        if pred(&s) {
            return s;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
