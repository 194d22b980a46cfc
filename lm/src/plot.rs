//! PNG charts for the stages' reports, drawn with the `plotters` crate:
//!
//! - [`line_chart`] — one chart with one or more series (SFT train loss per
//!   step, faint, under its moving average; eval loss as points).
//! - [`line_charts`] — several charts stacked vertically in one picture,
//!   sharing the x axis (RL reward above KL).
//! - [`bar_chart`] — bars with error whiskers and an optional dashed
//!   reference line (judge win rates per category with 95% intervals and
//!   the 50% line).
//!
//! Pictures are RGB8 PNGs, 1000 px wide, on a white background with a grey
//! grid. Axes get "nice" ticks ({1, 2, 5} × 10^k, see [`nice_ticks`]) with
//! numeric labels; series get distinct colours (a palette of 8, repeated
//! after that) and a legend of their names above the plot, which lists
//! only the series that have a point to draw.
//!
//! Text is set in DejaVu Sans, read from [`FONT_FILE`] (Debian's package
//! [`FONT_PACKAGE`]; `make fonts` installs it) or from the file named by
//! `ALIGN_PLOT_FONT`. Without it a chart is an error that names the
//! package.
//!
//! Non-finite points (and bars with a non-finite value) are skipped. A chart
//! with nothing to draw — no series, or no finite point — is still written,
//! with empty axes and the note "no data", so a stage never fails over a
//! picture of an empty run. Files are written atomically: the PNG is encoded
//! in memory, written to a temp file in the destination directory (created
//! if missing) and renamed into place.

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How a [`Series`] is drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeriesStyle {
    /// Points joined by a 2 px line, in the given order.
    #[default]
    Line,
    /// A dot per point (e.g. eval loss every N steps).
    Points,
    /// Both: a line with a dot on every point.
    LinePoints,
    /// A thin pale line in the colour of the series after it: the raw
    /// values under their moving average (see [`ema`]).
    Faint,
}

/// One named series of (x, y) points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend entry; an empty name, or no finite point, leaves the
    /// series out of the legend.
    pub name: String,
    /// Drawn in this order; points with a non-finite coordinate are skipped.
    pub points: Vec<(f64, f64)>,
    pub style: SeriesStyle,
}

impl Series {
    /// A series drawn as a line.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, style: SeriesStyle::Line }
    }

    /// A series drawn as dots.
    pub fn points(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, style: SeriesStyle::Points }
    }

    /// A series drawn as a thin pale line in the colour of the next series.
    pub fn faint(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, style: SeriesStyle::Faint }
    }
}

/// One chart of [`line_charts`]: its title, y-axis label and series, and
/// optionally a range the y axis always spans (e.g. 0–1 for an accuracy;
/// points outside it widen the axis).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub y_range: Option<(f64, f64)>,
}

/// One bar of [`bar_chart`]: `value` with the interval `lo..=hi` drawn as
/// a whisker. A non-finite `value` draws "n/a" and no bar; a non-finite
/// `lo` or `hi` draws no whisker.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The font the charts are set in, and the Debian package that has it.
pub const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";

/// Writes one line chart to `path` (PNG, 1000 px wide): `title` on top, the
/// legend, the axes with their labels, and every series in its own colour.
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let panel = PanelRef { title: None, y_label, series, y_range: None };
    render_panels(path, title, x_label, &[panel], 420)
}

/// Writes several line charts stacked vertically to `path`, under one
/// `title`; they share the x axis (same range, `x_label` under the last
/// one). Each panel has its own title, y axis and legend. An empty `panels`
/// is an error.
pub fn line_charts(path: &Path, title: &str, x_label: &str, panels: &[Panel]) -> Result<()> {
    if panels.is_empty() {
        bail!("cannot draw the chart {}: no panels given", path.display());
    }
    let refs: Vec<PanelRef> = panels
        .iter()
        .map(|p| PanelRef {
            title: Some(&p.title),
            y_label: &p.y_label,
            series: &p.series,
            y_range: p.y_range,
        })
        .collect();
    render_panels(path, title, x_label, &refs, 260)
}

/// Writes a bar chart to `path`: one bar per entry of `bars` (in order) from
/// 0 to its value, a whisker with caps over `lo..=hi`, the value printed at
/// the end of the bar, and a dashed line at `reference` (e.g. 0.5 for win
/// rates) labelled with its value. The value axis always includes 0, every
/// finite value and interval end, and the reference.
///
/// Bars are vertical with the category labels under them when every label
/// fits under its bar; otherwise (long labels, many categories) they are
/// horizontal with the labels on their left and the value axis at the
/// bottom. Labels longer than 40 characters are cut with "...".
pub fn bar_chart(
    path: &Path,
    title: &str,
    value_label: &str,
    bars: &[Bar],
    reference: Option<f64>,
) -> Result<()> {
    render_bars(path, title, value_label, bars, reference)
}

/// The exponential moving average of the finite points of `points` with
/// the weight 2 / (`span` + 1) on each new value (pandas' `span`); the
/// average starts at the first value. A `span` of 0 or 1 returns the
/// points unchanged.
pub fn ema(points: &[(f64, f64)], span: usize) -> Vec<(f64, f64)> {
    let w = 2.0 / (span.max(1) as f64 + 1.0);
    let mut avg: Option<f64> = None;
    points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|&(x, y)| {
            let a = avg.map_or(y, |a| a + w * (y - a));
            avg = Some(a);
            (x, a)
        })
        .collect()
}

/// "Nice" tick values inside `lo..=hi`: the multiples of a step of 1, 2 or
/// 5 × 10^k chosen so that there are about `target` intervals (at most about
/// 1.5 × `target` + 1 ticks). Values are rounded to the step's decimals, so
/// 0.1 × 3 comes out as 0.3. Returns `[lo]` when `lo == hi`, and nothing
/// when a bound is not finite or `lo > hi`.
///
/// `nice_ticks(0.0, 7.3, 5)` is 0, 1, …, 7; `nice_ticks(0.0, 7.3, 3)` is
/// 0, 2, 4, 6; `nice_ticks(0.0, 1.0, 5)` is 0, 0.2, …, 1.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || lo > hi {
        return Vec::new();
    }
    if lo == hi {
        return vec![lo];
    }
    let step = nice_step((hi - lo) / target.max(1) as f64);
    if !(step.is_finite() && step > 0.0) {
        return vec![lo, hi];
    }
    let first = (lo / step - 1e-9).ceil();
    let last = (hi / step + 1e-9).floor();
    if last - first >= 1000.0 || last.is_nan() || first.is_nan() {
        return vec![lo, hi];
    }
    let d = decimals(step);
    (first as i64..=last as i64).map(|k| round_to(k as f64 * step, d)).collect()
}

/// The 1, 2, 5 or 10 × 10^k nearest to `raw` (Heckbert's thresholds).
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    let n = if f < 1.5 {
        1.0
    } else if f < 3.0 {
        2.0
    } else if f < 7.0 {
        5.0
    } else {
        10.0
    };
    n * p
}

/// How many decimals show multiples of `step` (a nice step) exactly.
fn decimals(step: f64) -> usize {
    if step.is_nan() || step <= 0.0 || step >= 1.0 {
        0
    } else {
        (-step.log10() - 1e-9).ceil().max(0.0) as usize
    }
}

fn round_to(v: f64, decimals: usize) -> f64 {
    let v = if decimals <= 15 {
        let p = 10f64.powi(decimals as i32);
        (v * p).round() / p
    } else {
        v
    };
    v + 0.0 // -0.0 becomes 0.0
}

/// Tick labels with the same number of decimals (those of the step), or in
/// exponent form (`1.5e6`) for very large or very small values.
fn tick_labels(ticks: &[f64]) -> Vec<String> {
    if ticks.len() < 2 {
        return ticks.iter().map(|&v| short(v)).collect();
    }
    let step = (ticks[1] - ticks[0]).abs();
    let max = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
    let d = decimals(step);
    if max < 1e6 && d <= 5 {
        return ticks.iter().map(|&v| format!("{v:.d$}")).collect();
    }
    let mut labels = Vec::new();
    for p in 0..=6 {
        labels = ticks.iter().map(|&v| format!("{v:.p$e}")).collect();
        let exact = |(l, v): (&String, &f64)| l.parse::<f64>().is_ok_and(|x| (x - v).abs() <= step * 1e-6);
        if labels.iter().zip(ticks).all(exact) {
            break;
        }
    }
    labels
}

/// `v` with three significant digits, trailing zeros dropped.
fn short(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{}", v + 0.0);
    }
    let mag = v.abs().log10().floor();
    if !(-4.0..6.0).contains(&mag) {
        return format!("{v:.2e}");
    }
    let d = (2.0 - mag).max(0.0) as usize;
    let s = format!("{v:.d$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

// ---------------------------------------------------------------- drawing

const WIDTH: usize = 1000;
/// Font sizes (px) of labels and of titles.
const TEXT: u32 = 19;
const TITLE: u32 = 28;
/// Height of a line of label text.
const LINE: i32 = 26;
const INK: RGBColor = RGBColor(25, 25, 25);
const MUTED: RGBColor = RGBColor(75, 75, 75);
const GRID: RGBColor = RGBColor(226, 226, 226);
const FRAME: RGBColor = RGBColor(150, 150, 150);
const REFERENCE: RGBColor = RGBColor(214, 39, 40);
/// Series colours, in order (Tableau's palette).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
const BAR: RGBColor = PALETTE[0];
const FAMILY: &str = "sans-serif";

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Registers the font with plotters, once per process.
fn font_ready() -> Result<()> {
    static READY: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let path =
                std::env::var_os("ALIGN_PLOT_FONT").map_or_else(|| PathBuf::from(FONT_FILE), PathBuf::from);
            let bytes = read_font(&path).map_err(|e| format!("{e:#}"))?;
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| format!("the chart font {} is not a TrueType font", path.display()))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The font file's bytes, kept for the life of the process (plotters wants
/// them `'static`).
fn read_font(path: &Path) -> Result<&'static [u8]> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "the charts need the font {}: install Debian's package {FONT_PACKAGE} \
             (`apt-get install {FONT_PACKAGE}`, or `make fonts`), or name another \
             TrueType file in ALIGN_PLOT_FONT",
            path.display()
        )
    })?;
    Ok(Box::leak(bytes.into_boxed_slice()))
}

fn font(size: u32, colour: RGBColor) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&colour)
}

/// Width of `s` set at `size` px.
fn text_width(s: &str, size: u32) -> i32 {
    (FAMILY, size)
        .into_font()
        .box_size(s)
        .map_or(s.chars().count() as i32 * size as i32 / 2, |(w, _)| w as i32)
}

/// A plotters error as an anyhow one.
fn de(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// Draws a `WIDTH` × `height` picture with `draw` and writes it to `path`.
fn render(path: &Path, height: usize, draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
    let mut px = vec![255u8; WIDTH * height * 3];
    {
        let root = BitMapBackend::with_buffer(&mut px, (WIDTH as u32, height as u32)).into_drawing_area();
        draw(&root)
            .and_then(|()| root.present().map_err(de))
            .with_context(|| format!("cannot draw the chart {}", path.display()))?;
    }
    save(path, height, &px)
}

/// An axis: its range, ticks and their labels.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

impl Axis {
    fn new(lo: f64, hi: f64, target: usize) -> Self {
        let ticks = nice_ticks(lo, hi, target);
        let labels = tick_labels(&ticks);
        Axis { lo, hi, ticks, labels }
    }

    /// The most ticks (up to 10 intervals) whose labels fit side by side in
    /// `len` pixels.
    fn fitting(lo: f64, hi: f64, len: i32) -> Self {
        for target in (3..=10).rev() {
            let a = Axis::new(lo, hi, target);
            if a.widest() + 24 <= len / a.ticks.len().max(1) as i32 {
                return a;
            }
        }
        Axis::new(lo, hi, 2)
    }

    fn widest(&self) -> i32 {
        self.labels.iter().map(|l| text_width(l, TEXT)).max().unwrap_or(0)
    }

    /// The label of the tick nearest to `v`.
    fn label(&self, v: f64) -> String {
        let near =
            self.ticks.iter().zip(&self.labels).min_by(|a, b| (a.0 - v).abs().total_cmp(&(b.0 - v).abs()));
        near.map_or_else(|| short(v), |(_, l)| l.clone())
    }

    fn range(&self) -> std::ops::Range<f64> {
        if self.hi > self.lo {
            self.lo..self.hi
        } else {
            self.lo - 0.5..self.lo + 0.5
        }
    }

    /// The axis as a plotters coordinate whose key points are our ticks.
    fn coord(&self) -> Ticked {
        Ticked { range: self.range(), ticks: self.ticks.clone() }
    }
}

/// A linear f64 coordinate whose grid lines and labels are at `ticks`.
struct Ticked {
    range: std::ops::Range<f64>,
    ticks: Vec<f64>,
}

impl Ranged for Ticked {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let frac = (v - self.range.start) / (self.range.end - self.range.start);
        let len = limit.1 - limit.0;
        if len == 0 {
            return limit.1;
        }
        limit.0 + (len as f64 * frac + 1e-3).floor() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.clone()
    }
}

/// The smallest and largest of the finite `vals`.
fn span(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    vals.filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((v.min(lo), v.max(hi))),
    })
}

/// `lo..hi` widened by `frac` of its length on each side; a single value is
/// widened by a tenth of itself (or 1 at zero).
fn pad(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if hi > lo {
        let d = (hi - lo) * frac;
        (lo - d, hi + d)
    } else {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - d, hi + d)
    }
}

fn finite_points(s: &Series) -> impl Iterator<Item = (f64, f64)> + '_ {
    s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite())
}

/// The series that get a legend entry: named, with a point to draw.
fn legend_entries(series: &[Series]) -> Vec<usize> {
    (0..series.len())
        .filter(|&i| !series[i].name.is_empty() && finite_points(&series[i]).next().is_some())
        .collect()
}

/// Each series' palette colour: in order, except that a faint series takes
/// the colour of the series after it.
fn colours(series: &[Series]) -> Vec<RGBColor> {
    let mut next = 0;
    series
        .iter()
        .map(|s| {
            let c = PALETTE[next % PALETTE.len()];
            if s.style != SeriesStyle::Faint {
                next += 1;
            }
            c
        })
        .collect()
}

const SWATCH: i32 = 26;
const RIGHT: i32 = 40;

/// Legend rows for `series` within `width` px: (series index, x offset).
fn legend_rows(series: &[Series], width: i32) -> Vec<Vec<(usize, i32)>> {
    let mut rows: Vec<Vec<(usize, i32)>> = Vec::new();
    let mut x = 0;
    for i in legend_entries(series) {
        let w = SWATCH + 8 + text_width(&series[i].name, TEXT);
        if rows.is_empty() || (x > 0 && x + w > width) {
            rows.push(Vec::new());
            x = 0;
        }
        if let Some(row) = rows.last_mut() {
            row.push((i, x));
        }
        x += w + 28;
    }
    rows
}

fn stroke(style: SeriesStyle, c: RGBColor) -> ShapeStyle {
    if style == SeriesStyle::Faint {
        c.mix(0.35).stroke_width(1)
    } else {
        c.stroke_width(2)
    }
}

fn draw_swatch(a: &Area, x: i32, cy: i32, style: SeriesStyle, c: RGBColor) -> Result<()> {
    if style != SeriesStyle::Points {
        let s = if style == SeriesStyle::Faint { c.mix(0.35).stroke_width(3) } else { c.stroke_width(3) };
        a.draw(&PathElement::new(vec![(x + 2, cy), (x + SWATCH - 2, cy)], s)).map_err(de)?;
    }
    if matches!(style, SeriesStyle::Points | SeriesStyle::LinePoints) {
        a.draw(&Circle::new((x + SWATCH / 2, cy), 4, c.filled())).map_err(de)?;
    }
    Ok(())
}

struct PanelRef<'a> {
    title: Option<&'a str>,
    y_label: &'a str,
    series: &'a [Series],
    y_range: Option<(f64, f64)>,
}

/// Left margin of a plot: the y label (turned), the tick labels and marks.
fn left_margin(tick_label_width: i32) -> i32 {
    14 + LINE + 10 + tick_label_width + 14
}

/// `panels` stacked under `title`, each plot `plot_h` px tall, sharing the
/// x range; the picture is as tall as they need.
fn render_panels(path: &Path, title: &str, x_label: &str, panels: &[PanelRef], plot_h: i32) -> Result<()> {
    font_ready()?;
    let y_target = (plot_h / 55).clamp(3, 8) as usize;
    let y_axes: Vec<Axis> = panels
        .iter()
        .map(|p| {
            let ys = p.series.iter().flat_map(|s| finite_points(s).map(|(_, y)| y));
            let (lo, hi) = match (span(ys), p.y_range) {
                (Some((lo, hi)), Some((a, b))) => (lo.min(a), hi.max(b)),
                (None, Some(r)) => r,
                (Some((lo, hi)), None) => pad(lo, hi, 0.05),
                (None, None) => pad(0.0, 1.0, 0.05),
            };
            Axis::new(lo, hi, y_target)
        })
        .collect();
    let left = left_margin(y_axes.iter().map(Axis::widest).max().unwrap_or(0));
    let plot_w = WIDTH as i32 - left - RIGHT;
    let xs = panels.iter().flat_map(|p| p.series.iter().flat_map(|s| finite_points(s).map(|(x, _)| x)));
    let (xlo, xhi) = span(xs).map_or((0.0, 1.0), |(lo, hi)| pad(lo, hi, 0.02));
    let x_axis = Axis::fitting(xlo, xhi, plot_w);
    let legends: Vec<_> = panels.iter().map(|p| legend_rows(p.series, plot_w)).collect();

    // Heights: title band; per panel its title, legend, plot, tick labels
    // (and the x label under the last one).
    let top = 16 + TITLE as i32 + 10;
    let x_area = |i: usize| if i + 1 == panels.len() { 34 + LINE + 4 } else { 34 };
    let head =
        |i: usize| if panels[i].title.is_some() { LINE + 4 } else { 0 } + legends[i].len() as i32 * LINE + 8;
    let gap = |i: usize| if i + 1 == panels.len() { 12 } else { 28 };
    let panel_h = |i: usize| head(i) + plot_h + x_area(i) + gap(i);
    let height = top + (0..panels.len()).map(panel_h).sum::<i32>();
    render(path, height as usize, |root| {
        root.fill(&WHITE).map_err(de)?;
        let centre = Pos::new(HPos::Center, VPos::Top);
        root.draw_text(title, &font(TITLE, INK).pos(centre), (WIDTH as i32 / 2, 14)).map_err(de)?;
        let mut rest = root.split_vertically(top).1;
        for (i, p) in panels.iter().enumerate() {
            let (area, below) = rest.split_vertically(panel_h(i));
            rest = below;
            let mut y = 0;
            if let Some(t) = p.title {
                area.draw_text(t, &font(TEXT, INK).pos(centre), (left + plot_w / 2, y)).map_err(de)?;
                y += LINE + 4;
            }
            let colours = colours(p.series);
            for row in &legends[i] {
                for &(k, off) in row {
                    let s = &p.series[k];
                    let cy = y + LINE / 2;
                    draw_swatch(&area, left + off, cy, s.style, colours[k])?;
                    let at = Pos::new(HPos::Left, VPos::Center);
                    area.draw_text(&s.name, &font(TEXT, MUTED).pos(at), (left + off + SWATCH + 8, cy))
                        .map_err(de)?;
                }
                y += LINE;
            }
            let area = area.split_vertically(head(i)).1.split_vertically(plot_h + x_area(i)).0;
            draw_panel(
                &area,
                p,
                &x_axis,
                &y_axes[i],
                left,
                x_area(i),
                (i + 1 == panels.len()).then_some(x_label),
            )?;
        }
        Ok(())
    })
}

/// One panel's axes, grid, series and frame in `area`.
fn draw_panel(
    area: &Area,
    p: &PanelRef,
    x: &Axis,
    y: &Axis,
    left: i32,
    x_area: i32,
    x_label: Option<&str>,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .margin_right(RIGHT)
        .x_label_area_size(x_area)
        .y_label_area_size(left)
        .build_cartesian_2d(x.coord(), y.coord())
        .map_err(de)?;
    let (xf, yf) = (|v: &f64| x.label(*v), |v: &f64| y.label(*v));
    let mut mesh = chart.configure_mesh();
    mesh.bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(FRAME)
        .set_all_tick_mark_size(6)
        .label_style(font(TEXT, MUTED))
        .axis_desc_style(font(TEXT, INK))
        .x_label_formatter(&xf)
        .y_label_formatter(&yf);
    if let Some(l) = x_label {
        mesh.x_desc(l);
    }
    mesh.draw().map_err(de)?;
    y_desc(area, chart.plotting_area(), p.y_label)?;
    let colours = colours(p.series);
    let mut any = false;
    for (k, s) in p.series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = finite_points(s).collect();
        any |= !pts.is_empty();
        let c = colours[k];
        if s.style != SeriesStyle::Points {
            if pts.len() == 1 {
                chart.draw_series([Circle::new(pts[0], 3, c.filled())]).map_err(de)?;
            } else {
                chart.draw_series([PathElement::new(pts.clone(), stroke(s.style, c))]).map_err(de)?;
            }
        }
        if matches!(s.style, SeriesStyle::Points | SeriesStyle::LinePoints) {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled()))).map_err(de)?;
        }
    }
    let plot = chart.plotting_area().strip_coord_spec();
    let (w, h) = plot.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    if !any {
        plot.draw_text(
            "no data",
            &font(TEXT, MUTED).pos(Pos::new(HPos::Center, VPos::Center)),
            (w / 2, h / 2),
        )
        .map_err(de)?;
    }
    plot.draw(&Rectangle::new([(0, 0), (w - 1, h - 1)], FRAME.stroke_width(1))).map_err(de)?;
    Ok(())
}

/// Writes `label` turned a quarter left (read upwards) in `area`, at its
/// left edge, centred on the height of `plot` (a drawing area inside it).
fn y_desc<C: CoordTranslate>(area: &Area, plot: &DrawingArea<BitMapBackend, C>, label: &str) -> Result<()> {
    let (_, ys) = plot.get_pixel_range();
    let base = area.get_base_pixel();
    let style = font(TEXT, INK).transform(FontTransform::Rotate270).pos(Pos::new(HPos::Center, VPos::Center));
    area.draw_text(label, &style, (14 + LINE / 2, (ys.start + ys.end) / 2 - base.1)).map_err(de)
}

/// Labels are cut to this many characters.
const MAX_LABEL: usize = 40;

fn cut(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL {
        label.to_string()
    } else {
        label.chars().take(MAX_LABEL - 3).chain("...".chars()).collect()
    }
}

/// `s` on a white box (so that grid and reference lines do not cross it),
/// anchored at `at` by `pos`.
fn boxed_text(a: &Area, s: &str, at: (i32, i32), pos: Pos) -> Result<()> {
    let w = text_width(s, TEXT);
    let h = TEXT as i32;
    let x0 = match pos.h_pos {
        HPos::Left => at.0,
        HPos::Center => at.0 - w / 2,
        HPos::Right => at.0 - w,
    };
    let y0 = match pos.v_pos {
        VPos::Top => at.1,
        VPos::Center => at.1 - h / 2,
        VPos::Bottom => at.1 - h,
    };
    a.draw(&Rectangle::new([(x0 - 3, y0 - 2), (x0 + w + 3, y0 + h + 2)], WHITE.filled())).map_err(de)?;
    a.draw_text(s, &font(TEXT, MUTED).pos(pos), at).map_err(de)
}

fn render_bars(
    path: &Path,
    title: &str,
    value_label: &str,
    bars: &[Bar],
    reference: Option<f64>,
) -> Result<()> {
    font_ready()?;
    let reference = reference.filter(|r| r.is_finite());
    let vals = bars.iter().flat_map(|b| [b.value, b.lo, b.hi]).chain(reference).chain([0.0]);
    let (mut lo, mut hi) = span(vals).unwrap_or((0.0, 1.0));
    let d = if hi > lo { (hi - lo) * 0.08 } else { 1.0 };
    if lo < 0.0 {
        lo -= d;
    }
    if hi > 0.0 || lo == hi {
        hi += d;
    }
    let labels: Vec<String> = bars.iter().map(|b| cut(&b.label)).collect();
    let widest = labels.iter().map(|l| text_width(l, TEXT)).max().unwrap_or(0);
    let values: Vec<String> =
        bars.iter().map(|b| if b.value.is_finite() { short(b.value) } else { "n/a".into() }).collect();
    let n = bars.len().max(1) as f64;
    let top = 16 + TITLE as i32 + 20;
    let right = 64;
    // Vertical bars if every label fits under its bar.
    let y_axis = Axis::new(lo, hi, 8);
    let left = left_margin(y_axis.widest());
    let slot = (WIDTH as i32 - left - right) / bars.len().max(1) as i32;
    let vertical = bars.is_empty() || widest + 12 <= slot;
    let row = 40;
    let (height, left) = if vertical {
        (600, left)
    } else {
        let ref_band = if reference.is_some() { LINE } else { 0 };
        (top + ref_band + row * bars.len() as i32 + 34 + LINE + 14, 16 + widest + 14)
    };
    render(path, height as usize, |root| {
        root.fill(&WHITE).map_err(de)?;
        let centre = Pos::new(HPos::Center, VPos::Top);
        root.draw_text(title, &font(TITLE, INK).pos(centre), (WIDTH as i32 / 2, 14)).map_err(de)?;
        let cats = Axis {
            lo: 0.0,
            hi: n,
            ticks: (0..bars.len())
                .map(|i| if vertical { i as f64 + 0.5 } else { n - i as f64 - 0.5 })
                .collect(),
            labels: labels.clone(),
        };
        let value_axis = if vertical { y_axis } else { Axis::fitting(lo, hi, WIDTH as i32 - left - right) };
        // Where bar `i` stands and where value `v` falls, as chart coordinates.
        let at = |i: usize, v: f64| if vertical { (cats.ticks[i], v) } else { (v, cats.ticks[i]) };
        let (xa, ya) = if vertical { (&cats, &value_axis) } else { (&value_axis, &cats) };
        let ref_band = if !vertical && reference.is_some() { LINE } else { 0 };
        let area = root.split_vertically(top + ref_band).1;
        let mut chart = ChartBuilder::on(&area)
            .margin_right(right)
            .x_label_area_size(if vertical { 40 } else { 34 + LINE + 4 })
            .y_label_area_size(left)
            .build_cartesian_2d(xa.coord(), ya.coord())
            .map_err(de)?;
        let (xf, yf) = (|v: &f64| xa.label(*v), |v: &f64| ya.label(*v));
        let mut mesh = chart.configure_mesh();
        mesh.bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .axis_style(FRAME)
            .set_all_tick_mark_size(6)
            .label_style(font(TEXT, MUTED))
            .axis_desc_style(font(TEXT, INK))
            .x_label_formatter(&xf)
            .y_label_formatter(&yf);
        if vertical {
            mesh.disable_x_mesh().x_label_style(font(TEXT, INK));
        } else {
            mesh.disable_y_mesh().y_label_style(font(TEXT, INK)).x_desc(value_label);
        }
        mesh.draw().map_err(de)?;
        if vertical {
            y_desc(&area, chart.plotting_area(), value_label)?;
        }
        let half = if vertical {
            let bar_px = (WIDTH as i32 - left - right) as f64 / n * 0.6;
            (bar_px.min(110.0) / 2.0) * n / (WIDTH as i32 - left - right) as f64
        } else {
            0.3
        };
        let cap = half * 0.35;
        let whisker = INK.stroke_width(2);
        for (i, b) in bars.iter().enumerate() {
            let c = cats.ticks[i];
            let box_at = |v: f64, dc: f64| if vertical { (c + dc, v) } else { (v, c + dc) };
            if b.value.is_finite() {
                chart
                    .draw_series([Rectangle::new([box_at(0.0, -half), box_at(b.value, half)], BAR.filled())])
                    .map_err(de)?;
            }
            if b.lo.is_finite() && b.hi.is_finite() {
                for seg in [
                    [box_at(b.lo, 0.0), box_at(b.hi, 0.0)],
                    [box_at(b.lo, -cap), box_at(b.lo, cap)],
                    [box_at(b.hi, -cap), box_at(b.hi, cap)],
                ] {
                    chart.draw_series([PathElement::new(seg.to_vec(), whisker)]).map_err(de)?;
                }
            }
        }
        // The zero line, across the plot.
        let (lo_px, hi_px) = (
            chart.backend_coord(&(xa.range().start, ya.range().start)),
            chart.backend_coord(&(xa.range().end, ya.range().end)),
        );
        let zero = chart.backend_coord(&(0.0, 0.0));
        let zero_line = if vertical {
            vec![(lo_px.0, zero.1), (hi_px.0, zero.1)]
        } else {
            vec![(zero.0, lo_px.1), (zero.0, hi_px.1)]
        };
        root.draw(&PathElement::new(zero_line, FRAME.stroke_width(1))).map_err(de)?;
        if let Some(r) = reference {
            let line = if vertical {
                vec![(xa.range().start, r), (xa.range().end, r)]
            } else {
                vec![(r, ya.range().start), (r, ya.range().end)]
            };
            chart
                .draw_series([DashedPathElement::new(line, 10, 6, REFERENCE.stroke_width(2))])
                .map_err(de)?;
            let (px, py) =
                chart.backend_coord(&if vertical { (xa.range().end, r) } else { (r, ya.range().end) });
            let (pos, at) = if vertical {
                (Pos::new(HPos::Left, VPos::Center), (px + 8, py))
            } else {
                (Pos::new(HPos::Center, VPos::Bottom), (px, py - 6))
            };
            root.draw_text(&short(r), &font(TEXT, REFERENCE).pos(pos), at).map_err(de)?;
        }
        // Each value beyond the end of its bar and whisker.
        for (i, b) in bars.iter().enumerate() {
            let far =
                [b.value, b.lo, b.hi, 0.0].into_iter().filter(|v| v.is_finite()).fold(f64::MIN, f64::max);
            let (ex, ey) = chart.backend_coord(&at(i, far));
            if vertical {
                boxed_text(root, &values[i], (ex, ey - 8), Pos::new(HPos::Center, VPos::Bottom))?;
            } else {
                boxed_text(root, &values[i], (ex + 10, ey), Pos::new(HPos::Left, VPos::Center))?;
            }
        }
        let plot = chart.plotting_area().strip_coord_spec();
        let (w, h) = plot.dim_in_pixel();
        let (w, h) = (w as i32, h as i32);
        if bars.is_empty() {
            plot.draw_text(
                "no data",
                &font(TEXT, MUTED).pos(Pos::new(HPos::Center, VPos::Center)),
                (w / 2, h / 2),
            )
            .map_err(de)?;
        }
        plot.draw(&Rectangle::new([(0, 0), (w - 1, h - 1)], FRAME.stroke_width(1))).map_err(de)?;
        Ok(())
    })
}

/// Encodes the RGB8 pixels `px` (`WIDTH` × `height`) and writes them
/// atomically to `path`.
fn save(path: &Path, height: usize, px: &[u8]) -> Result<()> {
    let encode = || -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, WIDTH as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(px)?;
        writer.finish()?;
        Ok(out)
    };
    let bytes = encode().with_context(|| format!("cannot encode the chart {}", path.display()))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    tmp.write_all(&bytes).with_context(|| format!("cannot write the chart {}", path.display()))?;
    // Temp files are private (0600); a picture is for everyone to look at.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
    }
    tmp.persist(path)
        .map_err(|e| anyhow!("cannot move the chart into place at {}: {}", path.display(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the PNG at `path`: width, height and RGB8 pixels.
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count(px: &[u8], c: RGBColor) -> usize {
        px.chunks(3).filter(|p| *p == [c.0, c.1, c.2]).count()
    }

    fn non_white(px: &[u8]) -> usize {
        px.chunks(3).filter(|p| *p != [255, 255, 255]).count()
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn ticks_are_nice_numbers_inside_the_range() {
        assert!(close(&nice_ticks(0.0, 7.3, 5), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]));
        assert!(close(&nice_ticks(0.0, 7.3, 3), &[0.0, 2.0, 4.0, 6.0]));
        assert_eq!(nice_ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(nice_ticks(-0.37, 0.81, 5), vec![-0.2, 0.0, 0.2, 0.4, 0.6, 0.8]);
        assert_eq!(nice_ticks(0.1, 0.35, 5), vec![0.1, 0.15, 0.2, 0.25, 0.3, 0.35]);
        assert_eq!(nice_ticks(13.0, 987.0, 4), vec![200.0, 400.0, 600.0, 800.0]);
        assert_eq!(nice_ticks(0.0, 3.0e6, 3), vec![0.0, 1.0e6, 2.0e6, 3.0e6]);
        assert_eq!(nice_ticks(2.5, 2.5, 5), vec![2.5]);
        assert!(nice_ticks(f64::NAN, 1.0, 5).is_empty());
        assert!(nice_ticks(0.0, f64::INFINITY, 5).is_empty());
        assert!(nice_ticks(1.0, 0.0, 5).is_empty());
        // No -0 and no 0.30000000000000004.
        let t = nice_ticks(-0.31, 0.31, 6);
        assert!(t.iter().all(|v| v.to_string().len() <= 4), "{t:?}");
        assert!(t.contains(&0.0) && t.iter().all(|v| !(*v == 0.0 && v.is_sign_negative())));
    }

    #[test]
    fn tick_labels_share_their_decimals() {
        assert_eq!(tick_labels(&nice_ticks(0.0, 1.0, 5)), ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(tick_labels(&nice_ticks(0.0, 1000.0, 4)), ["0", "200", "400", "600", "800", "1000"]);
        assert_eq!(tick_labels(&[0.0, 0.05, 0.1]), ["0.00", "0.05", "0.10"]);
        assert_eq!(tick_labels(&[0.0, 1.5e6, 3.0e6]), ["0.0e0", "1.5e6", "3.0e6"]);
        assert_eq!(tick_labels(&[1e-7, 2e-7]), ["1e-7", "2e-7"]);
        assert_eq!(short(0.6234), "0.623");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(1234.6), "1235");
        assert_eq!(short(-0.0), "0");
    }

    #[test]
    fn a_missing_font_is_an_error_naming_the_package() {
        let err = read_font(Path::new("/nonexistent/DejaVuSans.ttf")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(FONT_PACKAGE) && msg.contains("/nonexistent/DejaVuSans.ttf"), "{msg}");
        font_ready().unwrap();
        assert!(text_width("ab", TEXT) > 10 && text_width("abab", TEXT) > text_width("ab", TEXT));
    }

    #[test]
    fn ema_smooths_from_the_first_value() {
        let pts = [(0.0, 1.0), (1.0, 3.0), (2.0, f64::NAN), (3.0, 3.0)];
        assert_eq!(ema(&pts, 3), vec![(0.0, 1.0), (1.0, 2.0), (3.0, 2.5)]);
        assert_eq!(ema(&pts[..2], 1), pts[..2].to_vec());
        assert!(ema(&[], 10).is_empty());
    }

    #[test]
    fn legends_leave_out_unnamed_and_empty_series() {
        let series = [
            Series::line("train", vec![(0.0, 1.0), (1.0, 2.0)]),
            Series::points("eval oracle accuracy", vec![]),
            Series::points("only nan", vec![(f64::NAN, 1.0)]),
            Series::line("", vec![(0.0, 1.0)]),
            Series::points("eval", vec![(1.0, 1.5)]),
        ];
        assert_eq!(legend_entries(&series), vec![0, 4]);
        font_ready().unwrap();
        let rows = legend_rows(&series, 800);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 4]);
        // In the picture: no swatch in the empty series' colour.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("legend.png");
        line_chart(&path, "RL", "step", "reward", &series[..2]).unwrap();
        let (_, _, px) = decode(&path);
        assert!(count(&px, PALETTE[0]) > 300);
        assert_eq!(count(&px, PALETTE[1]), 0);
        // A faint series shares the colour of the one after it.
        let c = colours(&[
            Series::faint("raw", vec![]),
            Series::line("ema", vec![]),
            Series::line("eval", vec![]),
        ]);
        assert_eq!(c, vec![PALETTE[0], PALETTE[0], PALETTE[1]]);
    }

    #[test]
    fn every_chart_kind_writes_a_png_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let pts: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, (i as f64).sqrt())).collect();
        let one = dir.path().join("one.png");
        line_chart(&one, "one", "step", "y", &[Series::line("y", pts.clone())]).unwrap();
        let (w, h1, _) = decode(&one);
        assert_eq!(w as usize, WIDTH);
        let panel = |title: &str| Panel {
            title: title.into(),
            y_label: "y".into(),
            series: vec![Series::line("y", pts.clone())],
            ..Default::default()
        };
        let (two, three) = (dir.path().join("two.png"), dir.path().join("three.png"));
        line_charts(&two, "two", "step", &[panel("a"), panel("b")]).unwrap();
        line_charts(&three, "three", "step", &[panel("a"), panel("b"), panel("c")]).unwrap();
        let (w2, h2, _) = decode(&two);
        let (w3, h3, _) = decode(&three);
        assert_eq!((w2 as usize, w3 as usize), (WIDTH, WIDTH));
        // Each further panel adds the same height.
        assert!(h2 > h1 && h3 - h2 > 260, "{h1} {h2} {h3}");
        let bars = dir.path().join("bars.png");
        let b = |l: &str, v: f64| Bar { label: l.into(), value: v, lo: v - 0.1, hi: v + 0.1 };
        bar_chart(&bars, "bars", "win rate", &[b("a", 0.4), b("overall", 0.6)], Some(0.5)).unwrap();
        assert_eq!(decode(&bars).0 as usize, WIDTH);
        assert_eq!(decode(&bars).1, 600);
        // A fixed y range: an accuracy panel spans 0..1 even at 0.3..0.4.
        let acc = Panel {
            title: "oracle".into(),
            y_label: "accuracy".into(),
            series: vec![Series::points("eval oracle accuracy", vec![(0.0, 0.3), (10.0, 0.4)])],
            y_range: Some((0.0, 1.0)),
        };
        let (lo, hi) = (Axis::new(0.0, 1.0, 4).ticks[0], *Axis::new(0.0, 1.0, 4).ticks.last().unwrap());
        assert_eq!((lo, hi), (0.0, 1.0));
        line_charts(&two, "acc", "step", &[acc]).unwrap();
    }

    #[test]
    fn line_chart_draws_every_series_in_its_colour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/loss.png");
        let train: Vec<(f64, f64)> = (0..500)
            .map(|i| (i as f64, 3.0 * (-(i as f64) / 150.0).exp() + 0.4 + 0.1 * (i as f64).sin()))
            .collect();
        let mut eval: Vec<(f64, f64)> = (0..=5).map(|i| (i as f64 * 100.0, 2.5 - 0.3 * i as f64)).collect();
        eval.push((f64::NAN, 1.0));
        eval.push((300.0, f64::INFINITY));
        let series = [Series::line("train loss", train), Series::points("eval loss", eval)];
        line_chart(&path, "SFT loss", "step", "loss", &series).unwrap();
        let (w, h, px) = decode(&path);
        assert_eq!(w as usize, WIDTH);
        assert!(h > 400, "{h}");
        assert!(non_white(&px) > 20_000);
        // Far more than the legend swatches: the curves themselves.
        assert!(count(&px, PALETTE[0]) > 500, "{}", count(&px, PALETTE[0]));
        assert!(count(&px, PALETTE[1]) > 150, "{}", count(&px, PALETTE[1]));
        assert!(count(&px, GRID) > 1000);
        // Overwrites in place, leaving no temp file behind.
        line_chart(&path, "SFT loss again", "step", "loss", &series[..1]).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);
    }

    #[test]
    fn empty_line_charts_say_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        line_chart(&path, "nothing", "step", "loss", &[]).unwrap();
        let (w, _, px) = decode(&path);
        assert_eq!(w as usize, WIDTH);
        assert!(non_white(&px) > 1000);
        let only_nan = [Series::line("loss", vec![(f64::NAN, 1.0)])];
        line_chart(&path, "nothing", "step", "loss", &only_nan).unwrap();
        let (_, _, px) = decode(&path);
        assert!(count(&px, PALETTE[0]) < 200);
        let err = line_charts(&path, "nothing", "step", &[]).unwrap_err();
        assert!(err.to_string().contains("empty.png"), "{err}");
    }

    #[test]
    fn stacked_panels_share_one_picture() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rl.png");
        let steps = 0..200;
        let reward: Vec<_> = steps.clone().map(|i| (i as f64, (i as f64 / 40.0).tanh())).collect();
        let kl: Vec<_> = steps.map(|i| (i as f64, 0.002 * i as f64)).collect();
        let panels = [
            Panel {
                title: "reward".into(),
                y_label: "mean reward".into(),
                series: vec![
                    Series::line("reward", reward.clone()),
                    Series::line("baseline", vec![(0.0, 0.1), (199.0, 0.1)]),
                ],
                ..Default::default()
            },
            Panel {
                title: "KL".into(),
                y_label: "KL to reference".into(),
                series: vec![Series::line("kl", kl)],
                ..Default::default()
            },
        ];
        line_charts(&path, "RL", "step", &panels).unwrap();
        let (w, h, px) = decode(&path);
        assert_eq!(w as usize, WIDTH);
        assert!(h > 2 * 260, "{h}");
        assert!(count(&px, PALETTE[0]) > 2 * 300);
        assert!(count(&px, PALETTE[1]) > 300);
        let single = dir.path().join("one.png");
        line_chart(&single, "RL", "step", "mean reward", &[Series::line("reward", reward)]).unwrap();
        assert!(decode(&single).1 < h);
    }

    #[test]
    fn bar_charts_draw_bars_whiskers_and_the_reference() {
        let dir = tempfile::tempdir().unwrap();
        let bars = |labels: &[&str]| -> Vec<Bar> {
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let v = 0.3 + 0.1 * i as f64;
                    Bar { label: l.to_string(), value: v, lo: v - 0.08, hi: v + 0.08 }
                })
                .collect()
        };
        // Short labels: vertical bars, 600 px tall.
        let path = dir.path().join("short.png");
        bar_chart(&path, "win rate", "win rate", &bars(&["math", "code", "chat", "safety"]), Some(0.5))
            .unwrap();
        let (w, h, px) = decode(&path);
        assert_eq!((w as usize, h), (WIDTH, 600));
        assert!(count(&px, BAR) > 4 * 2000, "{}", count(&px, BAR));
        assert!(count(&px, REFERENCE) > 200, "{}", count(&px, REFERENCE));
        assert!(count(&px, INK) > 500);
        // Long labels: horizontal bars, as tall as the rows need.
        let long: Vec<String> = (0..12).map(|i| format!("category number {i} with a long name")).collect();
        let long: Vec<&str> = long.iter().map(String::as_str).collect();
        let mut many = bars(&long);
        many[3].value = f64::NAN;
        many[4].lo = f64::NAN;
        let path = dir.path().join("long.png");
        bar_chart(&path, "win rate", "win rate", &many, Some(0.5)).unwrap();
        let (w, h, px) = decode(&path);
        assert_eq!(w as usize, WIDTH);
        assert!(h as usize > 12 * 40, "{h}");
        assert!(count(&px, BAR) > 11 * 1000, "{}", count(&px, BAR));
        assert!(count(&px, REFERENCE) > 100);
        // No bars: a note, not an error.
        let path = dir.path().join("none.png");
        bar_chart(&path, "win rate", "win rate", &[], None).unwrap();
        let (_, _, px) = decode(&path);
        assert_eq!(count(&px, BAR), 0);
        assert!(non_white(&px) > 500);
    }

    /// Writes sample pictures into `$PLOT_SAMPLES` for a look by eye:
    /// `PLOT_SAMPLES=/tmp/plots cargo test -p lm --lib plot -- --ignored`.
    #[test]
    #[ignore]
    fn write_samples() {
        let Ok(dir) = std::env::var("PLOT_SAMPLES") else { return };
        let dir = Path::new(&dir);
        let noise = |i: usize| ((i * 7919 % 1000) as f64 / 1000.0 - 0.5) * 0.25;
        let train: Vec<_> =
            (1..=1200).map(|i| (i as f64, 2.2 * (-(i as f64) / 250.0).exp() + 0.9 + noise(i))).collect();
        let eval: Vec<_> =
            (0..=12).map(|i| (i as f64 * 100.0, 2.1 * (-(i as f64) / 2.6).exp() + 1.05)).collect();
        let series = [
            Series::faint("train loss", train.clone()),
            Series::line("train loss (EMA)", ema(&train, 50)),
            Series { name: "eval loss".into(), points: eval, style: SeriesStyle::LinePoints },
        ];
        line_chart(&dir.join("sft_loss.png"), "SFT loss (gemma-2b, lr 2e-5)", "step", "loss", &series)
            .unwrap();
        let reward: Vec<_> =
            (0..400).map(|i| (i as f64, (i as f64 / 90.0).tanh() * 1.4 - 0.3 + noise(i))).collect();
        let kl: Vec<_> = (0..400).map(|i| (i as f64, 0.00012 * i as f64 + noise(i).abs() * 0.004)).collect();
        let panels = [
            Panel {
                title: "Reward".into(),
                y_label: "reward".into(),
                series: vec![
                    Series::line("mean reward", reward),
                    Series::line("[ref] = 0.0", vec![(0.0, 0.0), (399.0, 0.0)]),
                    Series::points("eval oracle accuracy", vec![]),
                ],
                ..Default::default()
            },
            Panel {
                title: "Eval oracle accuracy".into(),
                y_label: "accuracy".into(),
                series: vec![Series {
                    style: SeriesStyle::LinePoints,
                    ..Series::line("eval", (0..5).map(|i| (i as f64 * 100.0, 0.2 + 0.1 * i as f64)).collect())
                }],
                y_range: Some((0.0, 1.0)),
            },
            Panel {
                title: "KL(policy || reference)".into(),
                y_label: "KL".into(),
                series: vec![Series::line("kl", kl)],
                ..Default::default()
            },
        ];
        line_charts(&dir.join("rl.png"), "RL: reward and KL", "step", &panels).unwrap();
        let cats = ["math", "code", "writing", "QA", "safety", "chat"];
        let bars: Vec<Bar> = cats
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let v = 0.35 + 0.07 * i as f64;
                Bar { label: c.to_string(), value: v, lo: v - 0.09, hi: (v + 0.09).min(1.0) }
            })
            .collect();
        bar_chart(&dir.join("judge.png"), "Win rate vs. SFT (95% CI)", "win rate", &bars, Some(0.5)).unwrap();
        let long: Vec<Bar> = [
            "creative_writing",
            "open-ended QA",
            "reasoning (multi-step)",
            "coding/python",
            "harmlessness",
            "summarisation",
            "brainstorming",
            "extraction: json",
            "n/a category",
        ]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let v = 0.28 + 0.06 * i as f64;
            Bar { label: c.to_string(), value: if i == 8 { f64::NAN } else { v }, lo: v - 0.1, hi: v + 0.1 }
        })
        .collect();
        bar_chart(&dir.join("judge_long.png"), "Win rate per category", "win rate vs. SFT", &long, Some(0.5))
            .unwrap();
        line_chart(&dir.join("empty.png"), "Nothing yet", "step", "loss", &[]).unwrap();
        let big: Vec<_> = (0..50).map(|i| (i as f64 * 6.0e4, 3e-7 * (i as f64).sqrt())).collect();
        let edge = [
            Series::line("tiny", big),
            Series::line("single point", vec![(1.5e6, 1e-6)]),
            Series::points("one dot", vec![(2.0e6, 0.5e-6)]),
        ];
        line_chart(&dir.join("edge.png"), "Large x, tiny y", "tokens", "gradient norm", &edge).unwrap();
        let neg: Vec<Bar> = [("a", -0.3), ("b", 0.2), ("c", 0.05)]
            .iter()
            .map(|&(l, v)| Bar { label: l.into(), value: v, lo: v - 0.1, hi: v + 0.1 })
            .collect();
        bar_chart(&dir.join("neg.png"), "Reward margin", "margin", &neg, Some(0.0)).unwrap();
        let font: String = (' '..='~').collect();
        let lines: Vec<Series> = font
            .as_bytes()
            .chunks(32)
            .map(|c| Series::line(String::from_utf8_lossy(c), vec![(0.0, 1.0)]))
            .collect();
        line_chart(&dir.join("font.png"), "The quick brown fox: 0.123456789", "x_label", "y_label", &lines)
            .unwrap();
    }

    #[test]
    fn unwritable_paths_are_errors_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = line_chart(dir.path(), "x", "step", "loss", &[]).unwrap_err();
        assert!(format!("{err:#}").contains(&dir.path().display().to_string()), "{err:#}");
    }
}
