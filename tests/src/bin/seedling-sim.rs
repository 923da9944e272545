//! `seedling-sim`: simulated volunteers and the system benchmarks.
//!
//! - `seedling-sim crowd --url URL --clients N [--verifiers K]`: N
//!   compute-free volunteers until stdin closes (the load test runs the crowd
//!   in its own process so the server's memory can be measured apart).
//! - `seedling-sim bench [--only NAME] [--seconds S]`: `coordinator-1000`
//!   `wire-bytes` and `downlink-bytes`, one JSON line each, for `cargo
//!   xtask bench` (`--only downlink-bytes` prints the downlink figures
//!   alone, in a second: they are computed, not timed). `--only relay`
//!   runs `relay-N` instead: `--relay-volunteers` compute-free volunteers
//!   over `--relays` relay processes, NATS and a coordinator.
//! - `seedling-sim relay --nats URL --prefix P --id ID`: one relay of that
//!   bench, in its own process.

use clap::{Parser, Subcommand};
use seedling_tests::sim;

#[derive(Parser)]
#[command(name = "seedling-sim", about = "Simulated volunteers and system benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute-free volunteers until stdin closes; then their counters as JSON.
    Crowd {
        /// The server's WebSocket URL.
        #[arg(long)]
        url: String,
        /// How many volunteers.
        #[arg(long)]
        clients: usize,
        /// How many of them keep a replica and report hashes.
        #[arg(long, default_value_t = 0)]
        verifiers: usize,
    },
    /// One relay for the relay bench, until stdin closes (NATS credentials
    /// from the environment); prints `addr ADDR` once it listens.
    Relay {
        /// The NATS server's URL.
        #[arg(long)]
        nats: String,
        /// The run's subject prefix.
        #[arg(long)]
        prefix: String,
        /// The relay's id.
        #[arg(long)]
        id: String,
    },
    /// The system benchmarks, as JSON lines.
    Bench {
        /// Run only benchmarks whose name starts with this.
        #[arg(long)]
        only: Option<String>,
        /// Measured seconds of the coordinator benchmark.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Volunteers of the relay benchmark (`relay-N`, which runs only
        /// when `--only` names it).
        #[arg(long, default_value_t = 20_000)]
        relay_volunteers: usize,
        /// Relays of the relay benchmark.
        #[arg(long, default_value_t = 4)]
        relays: usize,
        /// The relay benchmark on RW-256 (2.7 MiB snapshots) rather than
        /// the tiny model.
        #[arg(long)]
        relay_rw256: bool,
    },
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Command::Crowd {
            url,
            clients,
            verifiers,
        } => sim::crowd_main(&url, clients, verifiers).await,
        Command::Relay { nats, prefix, id } => sim::relay_main(&nats, &prefix, &id).await,
        Command::Bench {
            only,
            seconds,
            relay_volunteers,
            relays,
            relay_rw256,
        } => {
            let on = |name: &str| only.as_deref().is_none_or(|o| name.starts_with(o));
            if on("coordinator-1000") {
                println!("{}", sim::coordinator_bench(1000, seconds).await);
            }
            if on("wire-bytes") {
                println!("{}", sim::wire_bytes_bench(6).await);
            }
            if on("downlink-bytes") {
                println!("{}", sim::downlink_bytes_bench());
            }
            // Minutes of CPU on every core and 20,000 sockets: only on request.
            if only.as_deref().is_some_and(|o| o.starts_with("relay")) {
                println!(
                    "{}",
                    sim::relay_bench(relay_volunteers, relays, seconds, relay_rw256).await
                );
            }
        }
    }
}
