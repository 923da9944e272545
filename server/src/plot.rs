//! The learning-curve plot: validation and training loss of a run against
//! wall time or forward tokens, beside the n-gram baselines.
//!
//! SVG through `plotters`, so the committed picture is text, diffs sanely
//! and needs no font files to render.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::checkpoint::HistoryPoint;

/// What the horizontal axis measures (`seedling plot --x`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XAxis {
    /// Wall-clock minutes since the run started.
    #[default]
    Minutes,
    /// Millions of forward tokens evaluated (all members), on a log scale:
    /// ES and BPTT spend tokens at rates orders of magnitude apart.
    Tokens,
    /// Two panels side by side: tokens on the left, minutes on the right.
    Both,
}

/// One curve's source: a name and a run's history.
pub struct Curve<'a> {
    /// Legend label.
    pub name: &'a str,
    /// The run's history (from a checkpoint).
    pub history: &'a [HistoryPoint],
}

/// Writes the plot to `out` (SVG). With one curve the training loss is drawn
/// too (faint); with several only validation, which is what they share.
pub fn learning_curve(
    curves: &[Curve],
    baselines: &[(&str, f64)],
    x: XAxis,
    out: &Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        curves
            .iter()
            .any(|c| c.history.iter().any(|h| h.val_loss.is_some())),
        "nothing to plot: no validation point in the history"
    );
    let width = if x == XAxis::Both { 1400 } else { 900 };
    let root = SVGBackend::new(out, (width, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Seedling learning curve (tiny-shakespeare, validation = last 10%)",
        ("sans-serif", 20),
    )?;
    match x {
        XAxis::Both => {
            let (left, right) = root.split_horizontally(width / 2);
            panel(&left, curves, baselines, XAxis::Tokens)?;
            panel(&right, curves, baselines, XAxis::Minutes)?;
        }
        x => panel(&root, curves, baselines, x)?,
    }
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// A curve's validation points and (maybe empty) training points.
type Series = (Vec<(f64, f64)>, Vec<(f64, f64)>);

/// The colour of curve `i`.
fn color(i: usize) -> RGBColor {
    [BLUE, RED, GREEN, MAGENTA, CYAN][i % 5]
}

/// One chart of every curve against one axis.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    curves: &[Curve],
    baselines: &[(&str, f64)],
    x: XAxis,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let xval = |h: &HistoryPoint| match x {
        XAxis::Tokens => h.tokens as f64 / 1e6,
        _ => h.elapsed_s / 60.0,
    };
    let with_train = curves.len() == 1;
    let points = |c: &Curve| -> Series {
        let val = c
            .history
            .iter()
            .filter_map(|h| h.val_loss.map(|v| (xval(h), v as f64)))
            .filter(|p| p.0 > 0.0 && p.1.is_finite())
            .collect();
        let train = c
            .history
            .iter()
            .filter(|h| with_train && h.train_loss.is_finite())
            .map(|h| (xval(h), h.train_loss as f64))
            .filter(|p| p.0 > 0.0)
            .collect();
        (val, train)
    };
    let series: Vec<_> = curves.iter().map(points).collect();
    let all = || series.iter().flat_map(|(v, t)| v.iter().chain(t));
    let xmax = all().map(|p| p.0).fold(1e-3, f64::max) * 1.05;
    let xmin = all().map(|p| p.0).fold(f64::INFINITY, f64::min).min(xmax / 10.0);
    let ys = all().map(|p| p.1).chain(baselines.iter().map(|b| b.1));
    let (ymin, ymax) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let yrange = (ymin - 0.1).max(0.0)..ymax + 0.1;
    let mut builder = ChartBuilder::on(area);
    builder.margin(16).x_label_area_size(40).y_label_area_size(56);
    match x {
        XAxis::Tokens => {
            let mut chart = builder.build_cartesian_2d((xmin..xmax).log_scale(), yrange)?;
            chart
                .configure_mesh()
                .x_desc("forward tokens (millions, log scale)")
                .y_desc("loss (nats/char)")
                .draw()?;
            draw(&mut chart, curves, &series, baselines, (xmin, xmax))
        }
        _ => {
            let mut chart = builder.build_cartesian_2d(0.0..xmax, yrange)?;
            chart
                .configure_mesh()
                .x_desc("wall time (minutes)")
                .y_desc("loss (nats/char)")
                .draw()?;
            draw(&mut chart, curves, &series, baselines, (0.0, xmax))
        }
    }
}

/// The lines of a panel: each curve's validation (and maybe train) loss,
/// the baselines across the whole width, and the legend.
fn draw<'a, DB: DrawingBackend + 'a, X>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    curves: &[Curve],
    series: &[Series],
    baselines: &[(&str, f64)],
    (x0, x1): (f64, f64),
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
{
    for (i, (c, (val, train))) in curves.iter().zip(series).enumerate() {
        let color = color(i);
        chart
            .draw_series(LineSeries::new(val.clone(), color.stroke_width(2)))?
            .label(format!("{} validation", c.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(train.clone(), color.mix(0.35)))?
                .label(format!("{} population mean (train)", c.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.35)));
        }
    }
    for (i, (name, y)) in baselines.iter().enumerate() {
        let y = *y;
        let style = BLACK.mix(0.6 - 0.25 * (i % 2) as f64);
        chart
            .draw_series(LineSeries::new(vec![(x0, y), (x1, y)], style))?
            .label(format!("{name} baseline {y:.2}"))
            .legend(move |(x, yy)| PathElement::new(vec![(x, yy), (x + 20, yy)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
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
        assert!(svg.contains("population mean"));
        // Two runs on both axes: validation lines only, two panels.
        let two = [
            Curve {
                name: "ES",
                history: &history,
            },
            Curve {
                name: "BPTT",
                history: &history[..10],
            },
        ];
        learning_curve(&two, &[("unigram", 3.3), ("bigram", 2.48)], XAxis::Both, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.contains("BPTT validation") && !svg.contains("population mean"));
        assert!(svg.contains("forward tokens") && svg.contains("wall time"));
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
