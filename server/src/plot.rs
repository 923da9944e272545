//! The learning-curve plot: validation and training loss of a run against
//! wall time or forward tokens, beside the n-gram baselines.
//!
//! SVG through `plotters`, so the committed picture is text, diffs sanely
//! and needs no font files to render.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::checkpoint::HistoryPoint;

/// What the horizontal axis measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// Wall-clock minutes since the run started.
    Minutes,
    /// Millions of forward tokens evaluated (all members).
    Tokens,
}

/// One curve's source: a name and a run's history.
pub struct Curve<'a> {
    /// Legend label.
    pub name: &'a str,
    /// The run's history (from a checkpoint).
    pub history: &'a [HistoryPoint],
}

/// Writes the plot to `out` (SVG).
pub fn learning_curve(
    curves: &[Curve],
    baselines: &[(&str, f64)],
    x: XAxis,
    out: &Path,
) -> anyhow::Result<()> {
    let xval = |h: &HistoryPoint| match x {
        XAxis::Minutes => h.elapsed_s / 60.0,
        XAxis::Tokens => h.tokens as f64 / 1e6,
    };
    let xmax = curves
        .iter()
        .flat_map(|c| c.history.iter().map(xval))
        .fold(1e-3, f64::max);
    let ys = curves
        .iter()
        .flat_map(|c| {
            c.history
                .iter()
                .flat_map(|h| [h.val_loss.map(f64::from), Some(h.train_loss as f64)])
        })
        .flatten()
        .chain(baselines.iter().map(|b| b.1))
        .filter(|y| y.is_finite());
    let (ymin, ymax) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    anyhow::ensure!(ymin.is_finite(), "nothing to plot: the history is empty");
    let root = SVGBackend::new(out, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let xlabel = match x {
        XAxis::Minutes => "wall time (minutes)",
        XAxis::Tokens => "forward tokens (millions)",
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Seedling learning curve (tiny-shakespeare, validation = last 10%)",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..xmax * 1.02, (ymin - 0.1).max(0.0)..ymax + 0.1)?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc("loss (nats/char)")
        .draw()?;
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, c) in curves.iter().enumerate() {
        let color = palette[i % palette.len()];
        let val: Vec<(f64, f64)> = c
            .history
            .iter()
            .filter_map(|h| h.val_loss.map(|v| (xval(h), v as f64)))
            .collect();
        chart
            .draw_series(LineSeries::new(val, color.stroke_width(2)))?
            .label(format!("{} validation", c.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        let train: Vec<(f64, f64)> = c
            .history
            .iter()
            .filter(|h| h.train_loss.is_finite())
            .map(|h| (xval(h), h.train_loss as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(train, color.mix(0.35)))?
            .label(format!("{} population mean (train)", c.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.35)));
    }
    for (name, y) in baselines {
        let y = *y;
        chart
            .draw_series(LineSeries::new(vec![(0.0, y), (xmax * 1.02, y)], BLACK.mix(0.6)))?
            .label(format!("{name} baseline {y:.2}"))
            .legend(move |(x, yy)| PathElement::new(vec![(x, yy), (x + 20, yy)], BLACK.mix(0.6)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_every_series() {
        let history: Vec<HistoryPoint> = (1..=20)
            .map(|i| HistoryPoint {
                step: i,
                elapsed_s: i as f64 * 3.0,
                tokens: i * 1000,
                train_loss: 4.0 - i as f32 * 0.05,
                val_loss: (i % 5 == 0).then_some(4.0 - i as f32 * 0.04),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c.svg");
        let curves = [Curve {
            name: "ES",
            history: &history,
        }];
        learning_curve(&curves, &[("bigram", 2.48)], XAxis::Minutes, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.starts_with("<svg") || svg.contains("<svg"));
        assert!(svg.contains("ES validation") && svg.contains("bigram baseline 2.48"));
        assert!(
            learning_curve(
                &[Curve {
                    name: "x",
                    history: &[]
                }],
                &[],
                XAxis::Tokens,
                &out
            )
            .is_err()
        );
    }
}
