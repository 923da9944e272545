//! `/metrics`: the run's figures for Prometheus, in the OpenMetrics text
//! format of the `prometheus-client` crate.
//!
//! The coordinator is sans-I/O and already counts what an operator needs
//! in the status it publishes ([`Status`]); this module reads that status at
//! each scrape (a [`Collector`]), so nothing else in the server holds a
//! metric handle. Counters are exported as OpenMetrics counters (samples
//! named `seedling_*_total`), volunteers as one gauge with a `kind` label,
//! step and job round-trip times as histograms, and the version as
//! `seedling_build_info{version=...} 1`. `docs/METRICS.md` lists them with
//! the PromQL of an operator's panels.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::coordinator::types::{Histogram, Status};

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The server's metric registry: the build info and the status collector.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Metrics read from the `status` the coordinator's driver publishes.
    pub fn new(status: Arc<Mutex<Status>>) -> Self {
        let mut registry = Registry::with_prefix("seedling");
        registry.register(
            "build",
            "The server's version.",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(StatusCollector { status }));
        Self { registry }
    }

    /// The current figures, as a scrape answers them.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Encodes the published status at each scrape.
#[derive(Debug)]
struct StatusCollector {
    status: Arc<Mutex<Status>>,
}

/// A cumulative histogram from the coordinator's counters, as a metric.
struct Buckets<'a>(&'a Histogram);

impl EncodeMetric for Buckets<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.0;
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().copied())
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum, h.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Encoding is quick; the driver waits for it to publish the next status.
        let s = self.status.lock().unwrap();
        let counters: [(&str, &str, u64); 12] = [
            ("steps", "Steps closed by this server process.", s.steps_closed),
            (
                "members",
                "Members counted in the closed steps.",
                s.members_counted,
            ),
            (
                "reissued_jobs",
                "Jobs reissued after their deadline or their client leaving.",
                s.reissued_jobs,
            ),
            (
                "stale_results",
                "Results dropped because their job was reissued or its step closed.",
                s.stale_results,
            ),
            (
                "rejected_clients",
                "Clients rejected for bad input.",
                s.rejected_clients,
            ),
            (
                "replicated_members",
                "Members evaluated a second time by another client.",
                s.replicated_members,
            ),
            (
                "disagreements",
                "Replicated members whose losses disagreed.",
                s.disagreements,
            ),
            (
                "divergences",
                "Replicas found diverged (and resynced).",
                s.divergences,
            ),
            (
                "liars_disconnected",
                "Clients disconnected for disagreeing too often.",
                s.liars_disconnected,
            ),
            (
                "banned_sessions",
                "Session tokens refused after their client lied.",
                s.banned_sessions,
            ),
            (
                "idle_dropped",
                "Clients dropped for silence past the idle timeout.",
                s.idle_dropped,
            ),
            (
                "slow_dropped",
                "Clients dropped because their send queue filled.",
                s.slow_dropped,
            ),
        ];
        for (name, help, value) in counters {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }

        let mut by_kind = encoder.encode_descriptor(
            "volunteers",
            "Volunteers past the handshake, by kind.",
            None,
            MetricType::Gauge,
        )?;
        let v = &s.volunteers;
        for (kind, n) in [
            ("browser", v.browser),
            ("native", v.native),
            ("simulated", v.simulated),
            ("relay", v.relay),
        ] {
            let labels = [("kind", kind)];
            ConstGauge::new(n as i64).encode(by_kind.encode_family(&labels)?)?;
        }

        let mut gauges: Vec<(&str, &str, f64)> = vec![
            ("step", "The step being evaluated.", s.step as f64),
            ("population", "Members per step.", s.population as f64),
            (
                "steps_open",
                "Steps open now (more than one with steps in flight).",
                s.steps_open as f64,
            ),
            (
                "paused",
                "1 while the operator has paused the run.",
                f64::from(u8::from(s.paused)),
            ),
            (
                "lr",
                "The learning rate of the current step's update.",
                f64::from(s.lr),
            ),
            (
                "lr_override",
                "1 when the learning rate is the operator's.",
                f64::from(u8::from(s.lr_override)),
            ),
            ("params", "Parameters of the model.", s.params as f64),
        ];
        if let Some(v) = s.val_loss {
            gauges.push((
                "val_loss",
                "Latest validation loss, nats per character.",
                f64::from(v),
            ));
        }
        if let Some(t) = s.train_loss {
            gauges.push((
                "train_loss",
                "Mean population loss of the last step, nats per character.",
                f64::from(t),
            ));
        }
        for (name, help, value) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)?;
        }

        let histograms = [
            (
                "step_seconds",
                "Seconds between consecutive step closes.",
                &s.step_seconds,
            ),
            (
                "job_round_trip_seconds",
                "Seconds from a job being sent to its result being counted.",
                &s.job_round_trip_seconds,
            ),
        ];
        for (name, help, h) in histograms {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            Buckets(h).encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::types::Volunteers;

    #[test]
    fn the_status_becomes_typed_metrics() {
        let mut step_seconds = Histogram::new(&[0.1, 1.0]);
        step_seconds.observe(0.05);
        step_seconds.observe(0.5);
        step_seconds.observe(5.0);
        let status = Status {
            step: 7,
            steps_closed: 7,
            disagreements: 2,
            volunteers: Volunteers {
                total: 3,
                browser: 2,
                native: 1,
                simulated: 0,
                relay: 0,
            },
            val_loss: Some(2.5),
            step_seconds,
            job_round_trip_seconds: Histogram::new(&[1.0]),
            ..Status::default()
        };
        let text = Metrics::new(Arc::new(Mutex::new(status))).render();
        for line in [
            "# TYPE seedling_steps counter",
            "seedling_steps_total 7",
            "seedling_disagreements_total 2",
            "# TYPE seedling_volunteers gauge",
            "seedling_volunteers{kind=\"browser\"} 2",
            "seedling_volunteers{kind=\"native\"} 1",
            "seedling_step 7",
            "seedling_val_loss 2.5",
            "# TYPE seedling_step_seconds histogram",
            "seedling_step_seconds_bucket{le=\"0.1\"} 1",
            "seedling_step_seconds_bucket{le=\"1.0\"} 2",
            "seedling_step_seconds_bucket{le=\"+Inf\"} 3",
            "seedling_step_seconds_count 3",
            "seedling_job_round_trip_seconds_count 0",
            "# TYPE seedling_build info",
            "seedling_build_info{version=",
            "# EOF",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
