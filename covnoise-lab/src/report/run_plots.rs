//! Plots of training runs: per-run curves, seed-averaged bands, one line
//! per seed grouped by arm, and per-arm bar charts.
//!
//! Every function writes PNG or SVG, chosen by the output's extension; any
//! other extension is an error. Both need a TrueType font
//! ([`crate::report::font::ensure_fonts`]): plotters measures text with it to
//! lay out the chart, even for SVG, whose viewer then renders the text.
//! Errors are one line naming the output file.

use std::ops::Range;
use std::path::Path;

use anyhow::bail;
use plotters::coord::Shift;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::report::output::{Format, drawing_error, format_of, prepare_output, render};
use crate::report::runs::{RunRecord, RunStatus};

/// One curve of a seed-averaged plot: the mean over seeds at each x, drawn as
/// a line, and the standard deviation, drawn as a shaded band mean +- std.
#[derive(Debug, Clone)]
pub struct BandSeries {
    /// Legend label (the study arm).
    pub label: String,
    /// x positions (epochs).
    pub x: Vec<f64>,
    /// Mean at each x.
    pub mean: Vec<f64>,
    /// Standard deviation at each x (0 draws no band).
    pub std: Vec<f64>,
}

/// One group of lines drawn in one colour with one legend entry: a study
/// arm, each of whose seeds is a line of its own.
#[derive(Debug, Clone)]
pub struct SeedLines {
    /// Legend label (the study arm).
    pub label: String,
    /// One line per seed, as (x, y) points in order of x; a non-finite
    /// point (a diverged or unevaluated epoch) leaves a gap.
    pub lines: Vec<Vec<(f64, f64)>>,
}

/// Categorical colours (matplotlib's tab10): distinct and readable on
/// white; beyond ten series we fall back to plotters' palette.
fn colour(index: usize) -> RGBColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = TAB10
        .get(index)
        .copied()
        .unwrap_or_else(|| Palette99::pick(index).rgb());
    RGBColor(r, g, b)
}

/// Tick labels that stay short over many decades: plain decimals for
/// ordinary magnitudes, exponent notation otherwise.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if !(1e-3..1e4).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        // Three significant digits, trailing zeros dropped.
        let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// [lo, hi] of the finite values with 5% margin either side; `fallback`
/// when there are none, and widened when they are all equal.
fn linear_range(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return fallback;
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        let pad = 0.05 * hi.abs().max(1e-3);
        return (lo - pad, hi + pad);
    }
    let pad = 0.05 * (hi - lo);
    (lo - pad, hi + pad)
}

/// Positive [lo, hi] of the values with margin on the log scale; `None` when
/// any finite value is not positive (the axis must then be linear).
fn log_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let mut lo = f64::MAX;
    let mut hi = f64::MIN;
    for v in values.filter(|v| v.is_finite()) {
        if v <= 0.0 {
            return None;
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    // At least a factor of 2 overall, so a flat curve still gets ticks.
    let widen = (2.0 / (hi / lo)).sqrt().max(1.1);
    Some((lo / widen, hi * widen))
}

/// Tick values for a log axis over [lo, hi] (0 < lo < hi): 1, 2, 5 times
/// powers of ten, every integer mantissa within one decade and powers of ten
/// only over many; plotters' own choice sometimes leaves the top decade
/// unlabelled.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades = (hi / lo).log10();
    let mantissas: &[f64] = if decades <= 1.0 {
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    } else if decades <= 3.0 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let first = lo.log10().floor() as i32;
    let last = hi.log10().ceil() as i32;
    let mut ticks: Vec<f64> = (first..=last)
        .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
        .filter(|v| (lo..=hi).contains(v))
        .collect();
    // More than a dozen decades: keep every few powers, so labels do not
    // collide.
    let stride = ticks.len().div_ceil(12).max(1);
    if stride > 1 {
        ticks = ticks.into_iter().step_by(stride).collect();
    }
    // A narrow range (0.11 to 0.22) may hold one round value or none: label
    // its ends as well, so that the axis can still be read.
    if ticks.len() < 2 {
        ticks.extend([lo, hi]);
        ticks.sort_by(f64::total_cmp);
    }
    ticks
}

/// Splits points into runs of finite values: a line through NaN would be
/// drawn to nowhere, so NaN (a diverged epoch) leaves a gap instead.
fn finite_segments(points: impl Iterator<Item = (f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let mut segments = vec![Vec::new()];
    for (x, y) in points {
        if x.is_finite() && y.is_finite() {
            segments.last_mut().expect("never empty").push((x, y));
        } else if !segments.last().expect("never empty").is_empty() {
            segments.push(Vec::new());
        }
    }
    segments.retain(|s| !s.is_empty());
    segments
}

/// One curve on a line panel.
struct Curve {
    label: String,
    colour: RGBColor,
    segments: Vec<Vec<(f64, f64)>>,
    /// Line width in pixels (the dots are one pixel wider in radius).
    width: u32,
    /// Whether the curve has its own legend entry (one per arm when each
    /// seed is a curve).
    legend: bool,
}

/// A panel of curves against a numeric x.
struct LinePanel<'a> {
    caption: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x_range: Range<f64>,
    /// Only whole-number ticks on x (epochs).
    integer_x: bool,
    legend: SeriesLabelPosition,
}

/// Draws `curves` (and their `bands`, lower and upper edges, if any) on
/// `area` with the y coordinate `y` (linear or log).
fn draw_line_panel<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    panel: &LinePanel,
    y: Y,
    curves: &[Curve],
    bands: &[Vec<(f64, f64, f64)>],
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    // Plotters' ticks may miss zero by rounding (-3e-17); on an axis that
    // crosses zero, snap such ticks to 0.
    let y_span = y.range();
    let zero_snap = if y_span.start < 0.0 && y_span.end > 0.0 {
        1e-9 * (y_span.end - y_span.start)
    } else {
        0.0
    };
    let y_format = move |v: &f64| {
        if v.abs() < zero_snap {
            "0".to_string()
        } else {
            tick(*v)
        }
    };
    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(panel.x_range.clone(), y)
        .map_err(drawing_error)?;
    let x_span = panel.x_range.end - panel.x_range.start;
    let x_labels = if panel.integer_x {
        // One tick per epoch up to ten epochs; plotters thins beyond.
        (x_span.ceil() as usize + 1).clamp(2, 11)
    } else {
        10
    };
    let integer_x = panel.integer_x;
    let x_format = move |v: &f64| {
        if !integer_x {
            tick(*v)
        } else if (v - v.round()).abs() < 1e-9 {
            format!("{v:.0}")
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_desc(panel.x_desc)
        .y_desc(panel.y_desc)
        .x_labels(x_labels)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format)
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(drawing_error)?;

    // Bands first, so that every line lies on top of every band.
    for (curve, band) in curves.iter().zip(bands) {
        let fill = curve.colour.mix(0.2).filled();
        for piece in band_pieces(band) {
            let polygon: Vec<(f64, f64)> = piece
                .iter()
                .map(|&(x, lo, _)| (x, lo))
                .chain(piece.iter().rev().map(|&(x, _, hi)| (x, hi)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(polygon, fill)))
                .map_err(drawing_error)?;
        }
    }
    for curve in curves {
        let col = curve.colour;
        let style = col.stroke_width(curve.width);
        let mut first = curve.legend;
        for segment in &curve.segments {
            let series = chart
                .draw_series(LineSeries::new(segment.iter().copied(), style))
                .map_err(drawing_error)?;
            // Label only the first segment, so a curve with gaps appears in
            // the legend once.
            if first {
                series
                    .label(&curve.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                first = false;
            }
            // Dots at the points: with few epochs a line alone hides where
            // the measurements are.
            chart
                .draw_series(
                    segment
                        .iter()
                        .map(|&p| Circle::new(p, curve.width + 1, col.filled())),
                )
                .map_err(drawing_error)?;
        }
    }
    chart
        .configure_series_labels()
        .position(panel.legend.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(drawing_error)?;
    Ok(())
}

/// Splits a band (x, lower, upper) into pieces of finite points, like
/// [`finite_segments`]; pieces of one point have no area and are dropped.
fn band_pieces(band: &[(f64, f64, f64)]) -> Vec<Vec<(f64, f64, f64)>> {
    let mut pieces = vec![Vec::new()];
    for &(x, lo, hi) in band {
        if x.is_finite() && lo.is_finite() && hi.is_finite() {
            pieces.last_mut().expect("never empty").push((x, lo, hi));
        } else if !pieces.last().expect("never empty").is_empty() {
            pieces.push(Vec::new());
        }
    }
    pieces.retain(|p| p.len() >= 2);
    pieces
}

/// Draws a line panel with a log y axis when every finite value is
/// positive, else a linear one.
fn draw_auto_log_panel<DB>(
    area: &DrawingArea<DB, Shift>,
    panel: &LinePanel,
    curves: &[Curve],
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let values = || {
        curves
            .iter()
            .flat_map(|c| c.segments.iter().flatten().map(|p| p.1))
    };
    match log_range(values()) {
        Some((lo, hi)) => {
            let y = LogCoord::from((lo..hi).log_scale()).with_key_points(log_ticks(lo, hi));
            draw_line_panel(area, panel, y, curves, &[])
        }
        None => {
            let (lo, hi) = linear_range(values(), (0.0, 1.0));
            let y: RangedCoordf64 = (lo..hi).into();
            draw_line_panel(area, panel, y, curves, &[])
        }
    }
}

/// Epoch axis from 1 to the last epoch, with half an epoch of margin so
/// that the first and last points are not on the frame.
fn epoch_range(max_epoch: f64) -> Range<f64> {
    0.5..(max_epoch.max(1.0) + 0.5)
}

/// Legend labels of the runs: each run's label, followed by "(diverged)"
/// when its summary says so, and by its directory when two runs would
/// otherwise share a label.
fn legend_labels(runs: &[RunRecord]) -> Vec<String> {
    runs.iter()
        .map(|run| {
            let shared = runs.iter().filter(|r| r.label == run.label).count() > 1;
            let mut label = if shared {
                format!("{} ({})", run.label, run.dir.display())
            } else {
                run.label.clone()
            };
            if run.summary.as_ref().map(|s| s.status) == Some(RunStatus::Diverged) {
                label.push_str(" (diverged)");
            }
            label
        })
        .collect()
}

/// Draws test accuracy (left, in percent) and training loss (right, log
/// scale when all losses are positive) against epoch, one coloured line per
/// run with its label in the legend. The format follows `out`'s extension
/// (`.png` or `.svg`). Errors if `runs` is empty or a run has no epochs;
/// non-finite values (diverged epochs) are left out of the lines.
pub fn plot_runs(runs: &[RunRecord], out: &Path) -> anyhow::Result<()> {
    let format = format_of(out)?;
    if runs.is_empty() {
        bail!("no runs to plot");
    }
    for run in runs {
        if run.metrics.is_empty() {
            bail!(
                "run {} ({}) has no epochs in its metrics.jsonl; nothing to plot",
                run.label,
                run.dir.display()
            );
        }
    }
    let labels = legend_labels(runs);
    let curves = |value: fn(&crate::report::runs::EpochMetrics) -> f64| -> Vec<Curve> {
        runs.iter()
            .zip(&labels)
            .enumerate()
            .map(|(i, (run, label))| Curve {
                label: label.clone(),
                colour: colour(i),
                segments: finite_segments(run.metrics.iter().map(|m| (m.epoch as f64, value(m)))),
                width: 2,
                legend: true,
            })
            .collect()
    };
    let accuracy = curves(|m| 100.0 * m.test_accuracy);
    let loss = curves(|m| m.train_loss);
    let max_epoch = runs
        .iter()
        .flat_map(|r| r.metrics.iter().map(|m| m.epoch))
        .max()
        .unwrap_or(1) as f64;
    let title = match runs.len() {
        1 => format!("Training run: {}", labels[0]),
        n => format!("Training runs ({n})"),
    };
    prepare_output(out)?;
    render!(out, format, (1500, 650), |root: DrawingArea<_, Shift>| {
        root.fill(&WHITE).map_err(drawing_error)?;
        let root = root
            .titled(&title, ("sans-serif", 24))
            .map_err(drawing_error)?;
        let panels = root.split_evenly((1, 2));
        let (lo, hi) = linear_range(
            accuracy
                .iter()
                .flat_map(|c| c.segments.iter().flatten().map(|p| p.1)),
            (0.0, 100.0),
        );
        let acc_y: RangedCoordf64 = (lo.max(0.0)..hi.min(100.0)).into();
        draw_line_panel(
            &panels[0],
            &LinePanel {
                caption: "test accuracy",
                x_desc: "epoch",
                y_desc: "test accuracy (%)",
                x_range: epoch_range(max_epoch),
                integer_x: true,
                legend: SeriesLabelPosition::LowerRight,
            },
            acc_y,
            &accuracy,
            &[],
        )?;
        draw_auto_log_panel(
            &panels[1],
            &LinePanel {
                caption: "training loss",
                x_desc: "epoch",
                y_desc: "train loss",
                x_range: epoch_range(max_epoch),
                integer_x: true,
                legend: SeriesLabelPosition::UpperRight,
            },
            &loss,
        )?;
        root.present().map_err(drawing_error)
    })
}

/// Draws each series' mean against x as a line over a shaded band of
/// mean +- std (for example test accuracy averaged over seeds, one series
/// per study arm). The x axis is labelled "epoch". Errors if `series` is
/// empty, or a series' `x`, `mean` and `std` differ in length or are empty.
/// Non-finite points are left out.
pub fn plot_bands(
    series: &[BandSeries],
    title: &str,
    y_label: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let format = format_of(out)?;
    if series.is_empty() {
        bail!("no series to plot for {}", out.display());
    }
    for s in series {
        if s.x.len() != s.mean.len() || s.x.len() != s.std.len() {
            bail!(
                "series {}: x, mean and std have different lengths ({}, {}, {})",
                s.label,
                s.x.len(),
                s.mean.len(),
                s.std.len()
            );
        }
        if s.x.is_empty() {
            bail!("series {} has no points", s.label);
        }
    }
    let curves: Vec<Curve> = series
        .iter()
        .enumerate()
        .map(|(i, s)| Curve {
            label: s.label.clone(),
            colour: colour(i),
            segments: finite_segments(s.x.iter().copied().zip(s.mean.iter().copied())),
            width: 2,
            legend: true,
        })
        .collect();
    // A NaN std (one seed) draws no band but keeps the mean.
    let bands: Vec<Vec<(f64, f64, f64)>> = series
        .iter()
        .map(|s| {
            (0..s.x.len())
                .map(|i| {
                    let sd = if s.std[i].is_finite() {
                        s.std[i].abs()
                    } else {
                        0.0
                    };
                    (s.x[i], s.mean[i] - sd, s.mean[i] + sd)
                })
                .collect()
        })
        .collect();
    let (x_lo, x_hi) = linear_range(series.iter().flat_map(|s| s.x.iter().copied()), (0.0, 1.0));
    let (y_lo, y_hi) = linear_range(
        bands.iter().flatten().flat_map(|&(_, lo, hi)| [lo, hi]),
        (0.0, 1.0),
    );
    // Integer ticks when x is whole numbers (epochs), as it usually is.
    let integer_x = series.iter().all(|s| s.x.iter().all(|x| x.fract() == 0.0));
    let panel = LinePanel {
        caption: title,
        x_desc: "epoch",
        y_desc: y_label,
        x_range: x_lo..x_hi,
        integer_x,
        legend: SeriesLabelPosition::LowerRight,
    };
    render_line_panel(out, format, &panel, y_lo..y_hi, &curves, &bands)
}

/// Writes one panel of `curves` (over their `bands`, if any), y linear over
/// `y_range`, as the whole 1000 x 650 figure at `out`.
fn render_line_panel(
    out: &Path,
    format: Format,
    panel: &LinePanel,
    y_range: Range<f64>,
    curves: &[Curve],
    bands: &[Vec<(f64, f64, f64)>],
) -> anyhow::Result<()> {
    prepare_output(out)?;
    render!(out, format, (1000, 650), |root: DrawingArea<_, Shift>| {
        root.fill(&WHITE).map_err(drawing_error)?;
        let y: RangedCoordf64 = y_range.clone().into();
        draw_line_panel(&root, panel, y, curves, bands)?;
        root.present().map_err(drawing_error)
    })
}

/// Draws every line of every group as a thin line of its own (for example
/// test accuracy of each seed against epochs or optimizer steps, one colour
/// per study arm), so that a seed that collapsed stays visible instead of
/// widening a band. Each group has one legend entry. The format follows
/// `out`'s extension (`.png` or `.svg`). Errors if `groups` is empty or
/// holds no finite point; non-finite points are left out of the lines.
pub fn plot_seed_lines(
    groups: &[SeedLines],
    title: &str,
    x_label: &str,
    y_label: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let format = format_of(out)?;
    if groups.is_empty() {
        bail!("no lines to plot for {}", out.display());
    }
    let mut curves = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let mut legend = true;
        for line in &group.lines {
            let segments = finite_segments(line.iter().copied());
            if segments.is_empty() {
                continue;
            }
            curves.push(Curve {
                label: group.label.clone(),
                colour: colour(i),
                segments,
                width: 1,
                legend,
            });
            legend = false;
        }
    }
    if curves.is_empty() {
        bail!("no finite point to plot for {}", out.display());
    }
    let points = || curves.iter().flat_map(|c| c.segments.iter().flatten());
    let (x_lo, x_hi) = linear_range(points().map(|p| p.0), (0.0, 1.0));
    let (y_lo, y_hi) = linear_range(points().map(|p| p.1), (0.0, 1.0));
    let integer_x = points().all(|p| p.0.fract() == 0.0);
    let panel = LinePanel {
        caption: title,
        x_desc: x_label,
        y_desc: y_label,
        x_range: x_lo..x_hi,
        integer_x,
        legend: SeriesLabelPosition::LowerRight,
    };
    render_line_panel(out, format, &panel, y_lo..y_hi, &curves, &[])
}

/// Draws one point per label at its mean with a +- std error bar (for
/// example final test accuracy per study arm over seeds). Points rather than
/// bars from zero: arms often differ by a fraction of a percent, which bars
/// starting at zero would hide. Errors if the three slices differ in length
/// or are empty; a non-finite mean is left out, a non-finite std draws no bar.
pub fn plot_bars(
    labels: &[String],
    means: &[f64],
    stds: &[f64],
    title: &str,
    y_label: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let format = format_of(out)?;
    if labels.len() != means.len() || labels.len() != stds.len() {
        bail!(
            "labels, means and stds have different lengths ({}, {}, {})",
            labels.len(),
            means.len(),
            stds.len()
        );
    }
    if labels.is_empty() {
        bail!("no values to plot for {}", out.display());
    }
    let n = labels.len();
    let sd = |i: usize| {
        if stds[i].is_finite() {
            stds[i].abs()
        } else {
            0.0
        }
    };
    let (y_lo, y_hi) = linear_range(
        (0..n).flat_map(|i| [means[i] - sd(i), means[i] + sd(i)]),
        (0.0, 1.0),
    );
    // Room for each arm's label under its point.
    let width = (200 + 170 * n as u32).max(800);
    prepare_output(out)?;
    render!(out, format, (width, 650), |root: DrawingArea<_, Shift>| {
        root.fill(&WHITE).map_err(drawing_error)?;
        // Arm i sits at x = i. With n + 1 labels allowed over a span of n,
        // plotters' tick step is 1, so the ticks fall on the arms.
        let x = -0.5..n as f64 - 0.5;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x, y_lo..y_hi)
            .map_err(drawing_error)?;
        let x_format = |v: &f64| {
            let i = v.round();
            if (v - i).abs() < 1e-9 && i >= 0.0 && (i as usize) < n {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n + 1)
            .y_desc(y_label)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .x_label_formatter(&x_format)
            .y_label_formatter(&|v| tick(*v))
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(drawing_error)?;
        for i in (0..n).filter(|&i| means[i].is_finite()) {
            let col = colour(i);
            let (x, m, s) = (i as f64, means[i], sd(i));
            if s > 0.0 {
                // Error bars drawn as paths: plotters' ErrorBar needs a
                // feature we do not enable.
                let bar = [
                    vec![(x, m - s), (x, m + s)],
                    vec![(x - 0.08, m - s), (x + 0.08, m - s)],
                    vec![(x - 0.08, m + s), (x + 0.08, m + s)],
                ];
                chart
                    .draw_series(
                        bar.into_iter()
                            .map(|p| PathElement::new(p, col.stroke_width(2))),
                    )
                    .map_err(drawing_error)?;
            }
            chart
                .draw_series(std::iter::once(Circle::new((x, m), 6, col.filled())))
                .map_err(drawing_error)?;
        }
        root.present().map_err(drawing_error)
    })
}
