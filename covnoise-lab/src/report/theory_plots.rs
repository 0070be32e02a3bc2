//! Plots of the quadratic theory: expected loss against step (exact curves
//! with Monte-Carlo points) and the four-panel one-step illustration.
//!
//! Both write PNG or SVG, chosen by the file extension. Both need a TrueType
//! font registered ([`crate::report::font::ensure_fonts`]): PNG to render
//! text, SVG because plotters (with `ab_glyph`) measures text with the font to
//! lay out labels, and fails with "FontUnavailable" without one.

use std::path::Path;

use nalgebra::{SymmetricEigen, Vector2};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::output::{drawing_error, format_of, prepare_output, render};
use crate::theory::{Analysis, Illustration};

/// Exact expected loss of one noise structure on a dense grid of steps, and
/// optionally its Monte-Carlo estimate at a few steps.
#[derive(Debug, Clone)]
pub struct LossCurve {
    /// Legend label ("full", "diag", "isotropic", ...).
    pub label: String,
    /// Steps k of the exact curve (k = 0 is skipped on the log axis).
    pub k: Vec<u64>,
    /// Exact E\[L_k\] at those steps.
    pub total: Vec<f64>,
    /// Exact noise part of E\[L_k\] at those steps.
    pub noise: Vec<f64>,
    /// Monte-Carlo points, if any were simulated.
    pub monte_carlo: Option<MonteCarloPoints>,
}

/// Monte-Carlo estimates at a few steps.
#[derive(Debug, Clone)]
pub struct MonteCarloPoints {
    /// Steps k.
    pub k: Vec<u64>,
    /// Mean simulated loss.
    pub mean: Vec<f64>,
    /// Its standard error.
    pub stderr: Vec<f64>,
    /// The exact deterministic part at the same steps, subtracted to place
    /// the points on the noise-part panel.
    pub deterministic: Vec<f64>,
}

/// The curves of an [`Analysis`] for [`draw_loss_curves`]: the exact ones on
/// its dense grid, with the Monte-Carlo points (if any) at the requested
/// steps. Draw them with `analysis.dense.deterministic` as the noiseless
/// loss.
pub fn loss_curves(analysis: &Analysis) -> Vec<LossCurve> {
    let dense = &analysis.dense;
    analysis
        .results
        .iter()
        .enumerate()
        .map(|(i, r)| LossCurve {
            label: r.structure.clone(),
            k: dense.k.clone(),
            total: dense.total[i].clone(),
            noise: dense.noise[i].clone(),
            monte_carlo: (!r.mc_mean.is_empty()).then(|| MonteCarloPoints {
                k: analysis.steps.clone(),
                mean: r.mc_mean.clone(),
                stderr: r.mc_stderr.clone(),
                deterministic: analysis.deterministic_loss.clone(),
            }),
        })
        .collect()
}

/// Colour of a structure's curve; the same in every plot.
fn colour(label: &str, index: usize) -> RGBColor {
    match label {
        "full" => RGBColor(200, 30, 30),
        "diag" => RGBColor(30, 80, 200),
        "isotropic" => RGBColor(20, 140, 40),
        _ => {
            let (r, g, b) = Palette99::pick(index + 3).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// Draws E\[L_k\] (left) and its noise part (right) against k on log-log axes:
/// exact curves as lines, Monte-Carlo means as dots with ±1 standard error
/// bars, and the noiseless loss as a grey line on the left. `deterministic`
/// is the exact noiseless loss on the same grid as the curves.
pub fn draw_loss_curves(
    path: &Path,
    title: &str,
    curves: &[LossCurve],
    deterministic: &[f64],
) -> anyhow::Result<()> {
    let format = format_of(path)?;
    prepare_output(path)?;
    render!(path, format, (1500, 650), |root| draw_loss_panels(
        root,
        title,
        curves,
        deterministic
    ))
}

/// Axis label: plain decimals between 0.01 and 10^5, otherwise scientific,
/// at most 3 significant digits.
fn compact(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (0.01..1e5).contains(&a) {
        let digits = (2 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        format!("{v:.1e}")
    }
}

/// Positive range [lo, hi] of the values, widened by a margin on the log
/// scale; (1e-3, 1) when there is nothing positive.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (1e-3, 1.0);
    }
    let (lo, hi) = if hi / lo < 10.0 {
        (lo / 3.0, hi * 3.0)
    } else {
        (lo / 1.5, hi * 1.5)
    };
    (lo, hi)
}

fn draw_loss_panels<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    curves: &[LossCurve],
    deterministic: &[f64],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(drawing_error)?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(drawing_error)?;
    let panels = root.split_evenly((1, 2));
    let k_max = curves
        .iter()
        .flat_map(|c| c.k.iter().copied())
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let grid: &[u64] = curves.first().map(|c| c.k.as_slice()).unwrap_or(&[]);

    for (p, panel) in panels.iter().enumerate() {
        let noise_panel = p == 1;
        // The values this panel shows, for its y range.
        let mut shown: Vec<f64> = Vec::new();
        for c in curves {
            for (i, &k) in c.k.iter().enumerate() {
                if k >= 1 {
                    shown.push(if noise_panel { c.noise[i] } else { c.total[i] });
                }
            }
            if let Some(mc) = &c.monte_carlo {
                for i in 0..mc.k.len() {
                    if mc.k[i] >= 1 {
                        let base = if noise_panel {
                            mc.deterministic[i]
                        } else {
                            0.0
                        };
                        shown.push(mc.mean[i] - base);
                    }
                }
            }
        }
        if !noise_panel {
            shown.extend(
                grid.iter()
                    .zip(deterministic)
                    .filter(|(k, _)| **k >= 1)
                    .map(|(_, v)| *v),
            );
        }
        let (mut y_lo, y_hi) = log_range(shown.into_iter());
        // Noiseless loss decays geometrically to 1e-20 and below; showing all
        // of it would flatten the noisy curves, which are the subject. Keep
        // three decades below the smallest noisy value.
        let noisy_min = curves
            .iter()
            .flat_map(|c| {
                c.k.iter()
                    .zip(if noise_panel { &c.noise } else { &c.total })
                    .filter(|(k, v)| **k >= 1 && **v > 0.0)
                    .map(|(_, v)| *v)
            })
            .fold(f64::MAX, f64::min);
        if noisy_min < f64::MAX {
            y_lo = y_lo.max(noisy_min / 1e3);
        }
        let caption = if noise_panel {
            "noise part: E[L_k] - L(E[e_k])"
        } else {
            "expected loss E[L_k]"
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 22))
            .margin(15)
            .margin_right(35)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d((1.0..k_max).log_scale(), (y_lo..y_hi).log_scale())
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .x_desc("step k")
            .y_desc(if noise_panel { "noise part" } else { "E[L_k]" })
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .x_label_formatter(&|v| compact(*v))
            .y_label_formatter(&|v| compact(*v))
            .draw()
            .map_err(drawing_error)?;

        if !noise_panel && !deterministic.is_empty() {
            let grey = RGBColor(120, 120, 120);
            chart
                .draw_series(LineSeries::new(
                    grid.iter()
                        .zip(deterministic)
                        .filter(|(k, v)| **k >= 1 && **v >= y_lo)
                        .map(|(k, v)| (*k as f64, *v)),
                    grey.stroke_width(2),
                ))
                .map_err(drawing_error)?
                .label("no noise")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2))
                });
        }
        for (index, c) in curves.iter().enumerate() {
            let col = colour(&c.label, index);
            let values = if noise_panel { &c.noise } else { &c.total };
            let line: Vec<(f64, f64)> =
                c.k.iter()
                    .zip(values)
                    .filter(|(k, v)| **k >= 1 && **v > 0.0)
                    .map(|(k, v)| (*k as f64, *v))
                    .collect();
            // Diagonal and isotropic noise can nearly coincide (a randomly
            // rotated Fisher has an almost constant diagonal): draw diag wide
            // and isotropic dashed on top so both stay visible.
            let width = if c.label == "diag" { 4 } else { 2 };
            let style = col.stroke_width(width);
            let series = if c.label == "isotropic" {
                chart.draw_series(DashedLineSeries::new(line, 10, 6, style))
            } else {
                chart.draw_series(LineSeries::new(line, style))
            };
            series
                .map_err(drawing_error)?
                .label(format!("{} (exact)", c.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            let Some(mc) = &c.monte_carlo else { continue };
            let points: Vec<(f64, f64, f64)> = (0..mc.k.len())
                .filter(|&i| mc.k[i] >= 1)
                .map(|i| {
                    let base = if noise_panel {
                        mc.deterministic[i]
                    } else {
                        0.0
                    };
                    (mc.k[i] as f64, mc.mean[i] - base, mc.stderr[i])
                })
                .filter(|(_, m, _)| *m > 0.0)
                .collect();
            // Error bars (drawn as paths: plotters' ErrorBar needs a feature
            // we do not enable) are clipped at the panel's floor: on a log
            // axis a bar reaching zero or below has no position. Caps span
            // +-6% of k, a constant width on the log axis.
            for &(k, m, s) in &points {
                let (lo, hi) = ((m - s).max(y_lo), m + s);
                let bar = [
                    vec![(k, lo), (k, hi)],
                    vec![(k / 1.06, lo), (k * 1.06, lo)],
                    vec![(k / 1.06, hi), (k * 1.06, hi)],
                ];
                chart
                    .draw_series(
                        bar.into_iter()
                            .map(|p| PathElement::new(p, col.stroke_width(2))),
                    )
                    .map_err(drawing_error)?;
            }
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(k, m, _)| Circle::new((k, m), 4, col.filled())),
                )
                .map_err(drawing_error)?
                .label(format!("{} (Monte-Carlo ± 1 s.e.)", c.label))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, col.filled()));
        }
        // Lower right is empty on the noise panel (its curves rise to the
        // right); lower left on the loss panel (its curves start high).
        chart
            .configure_series_labels()
            .position(if noise_panel {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::LowerLeft
            })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(drawing_error)?;
    }
    root.present().map_err(drawing_error)?;
    Ok(())
}

/// Draws the four clouds of one-step updates of `illustration`, one panel
/// each, over the same loss contours and window.
pub fn draw_illustration(path: &Path, illustration: &Illustration) -> anyhow::Result<()> {
    let format = format_of(path)?;
    prepare_output(path)?;
    render!(path, format, (1300, 1300), |root| draw_illustration_panels(
        root,
        illustration
    ))
}

/// Points of the contour { w : (w - w*)^T H (w - w*) = s^2 }, an ellipse with
/// semi-axes s / sqrt(lambda_i) along H's eigenvectors.
fn contour(illustration: &Illustration, s: f64) -> Vec<(f64, f64)> {
    let eig = SymmetricEigen::new(illustration.hessian);
    let axes: Vec<Vector2<f64>> = (0..2)
        .map(|i| eig.eigenvectors.column(i) * (s / eig.eigenvalues[i].max(1e-300).sqrt()))
        .collect();
    (0..=720)
        .map(|j| {
            let t = j as f64 / 720.0 * std::f64::consts::TAU;
            let w = illustration.optimum + axes[0] * t.cos() + axes[1] * t.sin();
            (w.x, w.y)
        })
        .collect()
}

fn draw_illustration_panels<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    ill: &Illustration,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(drawing_error)?;
    let title = format!(
        "One step from the same point (lr = {}, noise scale c = 1/{} - 1/{})",
        ill.config.lr, ill.config.small_batch, ill.config.large_batch
    );
    let root = root
        .titled(&title, ("sans-serif", 26))
        .map_err(drawing_error)?;

    let e = ill.start - ill.optimum;
    let s_start = e.dot(&(ill.hessian * e)).sqrt();
    // One square window for all panels, so the clouds compare directly: it
    // holds the start, the middle 99% of every cloud (a few outliers should
    // not shrink the picture) and a small contour around the optimum (so the
    // optimum is not pinned to the frame).
    let mut xs = vec![ill.start.x];
    let mut ys = vec![ill.start.y];
    for (x, y) in contour(ill, 0.4 * s_start) {
        xs.push(x);
        ys.push(y);
    }
    for cloud in &ill.clouds {
        let mut cx: Vec<f64> = cloud.points.iter().map(|p| p.x).collect();
        let mut cy: Vec<f64> = cloud.points.iter().map(|p| p.y).collect();
        for v in [&mut cx, &mut cy] {
            v.sort_by(f64::total_cmp);
        }
        let lo = cx.len() / 200;
        let hi = cx.len() - 1 - lo;
        xs.extend([cx[lo], cx[hi]]);
        ys.extend([cy[lo], cy[hi]]);
    }
    let span = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let hi = v.iter().cloned().fold(f64::MIN, f64::max);
        (lo, hi)
    };
    let (x0, x1) = span(&xs);
    let (y0, y1) = span(&ys);
    let half = 0.5 * (x1 - x0).max(y1 - y0) * 1.15;
    let (cx, cy) = (0.5 * (x0 + x1), 0.5 * (y0 + y1));
    let x_range = (cx - half)..(cx + half);
    let y_range = (cy - half)..(cy + half);

    let contour_levels = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0];
    let colours = [
        RGBColor(220, 110, 0),
        RGBColor(20, 140, 40),
        RGBColor(200, 30, 30),
        RGBColor(30, 80, 200),
    ];
    let panels = root.split_evenly((2, 2));
    for (i, (panel, cloud)) in panels.iter().zip(&ill.clouds).enumerate() {
        let mut chart = ChartBuilder::on(panel)
            .caption(&cloud.label, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(x_range.clone(), y_range.clone())
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("w1")
            .y_desc("w2")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()
            .map_err(drawing_error)?;
        let contour_style = RGBColor(150, 150, 150).stroke_width(1);
        for level in contour_levels {
            // plotters pins points outside the window to its frame, which
            // would draw phantom lines along the edges; draw only the runs of
            // the contour that lie inside.
            let inside = |p: &(f64, f64)| x_range.contains(&p.0) && y_range.contains(&p.1);
            let points = contour(ill, level * s_start);
            for run in points.split(|p| !inside(p)).filter(|r| r.len() > 1) {
                chart
                    .draw_series(LineSeries::new(run.iter().copied(), contour_style))
                    .map_err(drawing_error)?;
            }
        }
        let col = colours[i % colours.len()];
        chart
            .draw_series(
                cloud
                    .points
                    .iter()
                    .map(|p| Circle::new((p.x, p.y), 2, col.mix(0.35).filled())),
            )
            .map_err(drawing_error)?
            .label("w after one step")
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, col.filled()));
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (ill.start.x, ill.start.y),
                    (ill.full_batch_step.x, ill.full_batch_step.y),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(drawing_error)?;
        chart
            .draw_series(std::iter::once(Circle::new(
                (ill.start.x, ill.start.y),
                7,
                BLACK.filled(),
            )))
            .map_err(drawing_error)?
            .label("start w0")
            .legend(|(x, y)| Circle::new((x + 10, y), 6, BLACK.filled()));
        chart
            .draw_series(std::iter::once(Cross::new(
                (ill.full_batch_step.x, ill.full_batch_step.y),
                9,
                BLACK.stroke_width(3),
            )))
            .map_err(drawing_error)?
            .label("full-batch step")
            .legend(|(x, y)| Cross::new((x + 10, y), 6, BLACK.stroke_width(3)));
        chart
            .draw_series(std::iter::once(TriangleMarker::new(
                (ill.optimum.x, ill.optimum.y),
                9,
                RGBColor(120, 0, 160).filled(),
            )))
            .map_err(drawing_error)?
            .label("optimum w*")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 7, RGBColor(120, 0, 160).filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(drawing_error)?;
    }
    root.present().map_err(drawing_error)?;
    Ok(())
}
