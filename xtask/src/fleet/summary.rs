//! What a fleet run measured: collected from the server's `/api/status`
//! while it runs, printed at the end as one JSON line and, on request, a
//! markdown row for BENCHMARKS.md.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The run's settings, as the JSON line and the table name them.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Volunteers in all, native workers and browser tabs.
    pub volunteers: usize,
    /// Of which headless Chromium tabs.
    pub browsers: usize,
    /// `native`, `browser` or `mixed`.
    pub kind: &'static str,
    pub threads: usize,
    pub cpu_percent: u8,
    pub rtt_ms: f64,
    pub jitter_ms: f64,
    /// Seconds between a volunteer leaving and another joining, if any.
    pub churn_s: Option<f64>,
    /// Members per step, as the server reports it.
    pub population: Option<u64>,
    pub budget_s: f64,
    pub seed: u64,
    pub eval_every: u64,
    /// Every argument `seedling serve` got.
    pub serve_args: Vec<String>,
}

/// Everything observed during a run.
#[derive(Debug, Default)]
pub struct Observed {
    /// Validation points by step: (the server's elapsed seconds, loss).
    pub validation: BTreeMap<u64, (f64, f64)>,
    /// The last status read.
    pub last: Option<Value>,
    /// Volunteers started and stopped by churn.
    pub joins: usize,
    pub leaves: usize,
    /// Volunteers that exited by themselves.
    pub exits: usize,
    /// Wall seconds from the server listening to the last status.
    pub wall_s: f64,
    /// Stopped by a signal before the budget ran out.
    pub interrupted: bool,
    /// The server's open steps at every status read: the steps-in-flight
    /// window it chose.
    pub steps_open: Vec<u64>,
}

impl Observed {
    /// Takes in one `/api/status` document with the newest history points
    /// under `history`: their validation points (the poller asks only for
    /// the points since the last validation, so it keeps the rest).
    pub fn record(&mut self, status: Value) {
        for point in status["history"].as_array().into_iter().flatten() {
            let (Some(step), Some(t), Some(loss)) = (
                point["step"].as_u64(),
                point["elapsed_s"].as_f64(),
                point["val_loss"].as_f64(),
            ) else {
                continue;
            };
            self.validation.insert(step, (t, loss));
        }
        if let Some(n) = status["steps_open"].as_u64() {
            self.steps_open.push(n);
        }
        self.last = Some(status);
    }

    fn counter(&self, key: &str) -> u64 {
        self.last.as_ref().and_then(|s| s[key].as_u64()).unwrap_or(0)
    }

    /// Steps the server closed.
    pub fn steps(&self) -> u64 {
        self.counter("steps_closed")
    }

    /// Replicas the server found diverged.
    pub fn divergences(&self) -> u64 {
        self.counter("divergences")
    }

    /// Members per step, from the server.
    pub fn population(&self) -> Option<u64> {
        self.last.as_ref().and_then(|s| s["population"].as_u64())
    }

    /// The server's elapsed seconds when validation first reached `loss`.
    pub fn time_to(&self, loss: f64) -> Option<f64> {
        self.validation
            .values()
            .find(|&&(_, l)| l <= loss)
            .map(|&(t, _)| t)
    }

    /// The last validation loss.
    pub fn final_loss(&self) -> Option<f64> {
        self.validation.values().next_back().map(|&(_, l)| l)
    }
}

/// A loss as a JSON key and a column name: "2.40".
fn loss_key(loss: f64) -> String {
    format!("{loss:.2}")
}

/// The JSON line. Rates are over the emulator's wall clock from the server
/// listening to the last status read; members/s counts every closed step
/// as a full population (with `--min-fraction` below 1 it is an upper
/// bound). Validation times are the server's own clock (`elapsed_s` of its
/// history, from its start), the clock `seedling train --minutes` runs on.
pub fn json_line(config: &Config, seen: &Observed, losses: &[f64]) -> Value {
    let steps = seen.steps();
    let per_s = |n: f64| (seen.wall_s > 0.0).then(|| n / seen.wall_s);
    let population = config.population.or(seen.population());
    let members = population.map(|p| (steps * p) as f64);
    let time_to: serde_json::Map<String, Value> = losses
        .iter()
        .map(|&l| (loss_key(l), json!(seen.time_to(l))))
        .collect();
    let validation: Vec<Value> = seen
        .validation
        .iter()
        .map(|(step, (t, loss))| json!({"t_s": t, "step": step, "loss": loss}))
        .collect();
    json!({
        "config": {
            "volunteers": config.volunteers,
            "browsers": config.browsers,
            "kind": config.kind,
            "threads": config.threads,
            "cpu_percent": config.cpu_percent,
            "rtt_ms": config.rtt_ms,
            "jitter_ms": config.jitter_ms,
            "churn_s": config.churn_s,
            "population": population,
            "budget_s": config.budget_s,
            "seed": config.seed,
            "eval_every": config.eval_every,
            "serve_args": config.serve_args,
        },
        "wall_s": seen.wall_s,
        "steps": steps,
        "steps_per_s": per_s(steps as f64),
        "members_per_s": members.and_then(per_s),
        "validation": validation,
        "time_to": time_to,
        "final_val_loss": seen.final_loss(),
        "steps_open_mean": (!seen.steps_open.is_empty())
            .then(|| seen.steps_open.iter().sum::<u64>() as f64 / seen.steps_open.len() as f64),
        "steps_open_max": seen.steps_open.iter().max(),
        "results_behind_mean": seen.last.as_ref().and_then(|s| s["results_behind"].as_f64()),
        "sequences_mean": seen.last.as_ref().and_then(|s| s["sequences_per_member"].as_f64()),
        "divergences": seen.divergences(),
        "reissued_jobs": seen.counter("reissued_jobs"),
        "stale_results": seen.counter("stale_results"),
        "joins": seen.joins,
        "leaves": seen.leaves,
        "volunteer_exits": seen.exits,
        "interrupted": seen.interrupted,
    })
}

/// The markdown table's header and separator, for `losses`.
pub fn table_header(losses: &[f64]) -> String {
    let mut cols: Vec<String> = [
        "fleet",
        "RTT",
        "churn",
        "population",
        "budget",
        "steps/s",
        "members/s",
    ]
    .map(String::from)
    .to_vec();
    cols.extend(losses.iter().map(|&l| format!("time to {}", loss_key(l))));
    cols.extend(["final validation", "divergences", "reissued jobs"].map(String::from));
    let sep = vec!["---"; cols.len()];
    format!("| {} |\n|{}|", cols.join(" | "), sep.join("|"))
}

/// The run as a markdown row under [`table_header`], from its JSON line.
pub fn table_row(line: &Value, losses: &[f64]) -> String {
    let c = &line["config"];
    let num = |v: &Value, digits: usize| v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"));
    let kind = c["kind"].as_str().unwrap_or("?");
    let threads = c["threads"].as_u64().unwrap_or(1);
    let mut cells = vec![
        format!(
            "{} {kind} x {}{}%",
            c["volunteers"],
            if threads == 1 {
                String::new()
            } else {
                format!("{threads} threads x ")
            },
            c["cpu_percent"]
        ),
        match c["jitter_ms"].as_f64() {
            Some(j) if j > 0.0 => format!("{} ms ± {}", num(&c["rtt_ms"], 0), num(&c["jitter_ms"], 0)),
            _ => format!("{} ms", num(&c["rtt_ms"], 0)),
        },
        c["churn_s"]
            .as_f64()
            .map_or("none".into(), |s| format!("every {s} s")),
        num(&c["population"], 0),
        format!("{} s", num(&c["budget_s"], 0)),
        num(&line["steps_per_s"], 1),
        num(&line["members_per_s"], 0),
    ];
    for &l in losses {
        let t = &line["time_to"][loss_key(l)];
        cells.push(t.as_f64().map_or("not reached".into(), |t| format!("{t:.1} s")));
    }
    cells.push(num(&line["final_val_loss"], 3));
    cells.push(line["divergences"].to_string());
    cells.push(line["reissued_jobs"].to_string());
    format!("| {} |", cells.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            volunteers: 8,
            browsers: 0,
            kind: "native",
            threads: 1,
            cpu_percent: 25,
            rtt_ms: 150.0,
            jitter_ms: 50.0,
            churn_s: Some(10.0),
            population: None,
            budget_s: 60.0,
            seed: 0,
            eval_every: 25,
            serve_args: vec!["--port".into(), "0".into()],
        }
    }

    fn status(steps: u64, history: Value) -> Value {
        json!({"steps_closed": steps, "population": 256, "divergences": 0,
               "reissued_jobs": 3, "stale_results": 1, "history": history})
    }

    #[test]
    fn the_curve_survives_the_status_keeping_only_recent_history() {
        let mut seen = Observed::default();
        seen.record(status(
            30,
            json!([
                {"step": 0, "elapsed_s": 0.1, "val_loss": 4.2},
                {"step": 25, "elapsed_s": 5.0, "val_loss": 2.5, "train_loss": 2.6},
                {"step": 26, "elapsed_s": 5.2, "val_loss": null},
            ]),
        ));
        seen.record(status(
            60,
            json!([{"step": 50, "elapsed_s": 10.0, "val_loss": 2.35}]),
        ));
        seen.wall_s = 12.0;
        assert_eq!(seen.validation.len(), 3);
        assert_eq!(seen.time_to(2.40), Some(10.0));
        assert_eq!(seen.time_to(2.5), Some(5.0));
        assert_eq!(seen.time_to(2.30), None);
        assert_eq!(seen.final_loss(), Some(2.35));

        let losses = [2.40, 2.30];
        let line = json_line(&config(), &seen, &losses);
        // What the run prints is one line that parses back.
        let text = serde_json::to_string(&line).unwrap();
        assert!(!text.contains('\n'));
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["steps"], 60);
        assert_eq!(back["steps_per_s"], 5.0);
        assert_eq!(back["members_per_s"], 60.0 * 256.0 / 12.0);
        assert_eq!(back["config"]["population"], 256);
        assert_eq!(back["time_to"]["2.40"], 10.0);
        assert_eq!(back["time_to"]["2.30"], Value::Null);
        assert_eq!(
            back["validation"][2],
            json!({"t_s": 10.0, "step": 50, "loss": 2.35})
        );
        assert_eq!(back["reissued_jobs"], 3);

        let header = table_header(&losses);
        let row = table_row(&back, &losses);
        assert_eq!(
            row,
            "| 8 native x 25% | 150 ms ± 50 | every 10 s | 256 | 60 s | 5.0 | 1280 \
             | 10.0 s | not reached | 2.350 | 0 | 3 |"
        );
        let columns = |s: &str| s.matches('|').count();
        assert!(header.lines().all(|l| columns(l) == columns(&row)), "{header}");
    }
}
