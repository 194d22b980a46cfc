//! PNG charts for the stages' reports, drawn without a plotting library:
//!
//! - [`line_chart`] — one chart with one or more series (SFT train loss per
//!   step as a line, eval loss as points).
//! - [`line_charts`] — several charts stacked vertically in one picture,
//!   sharing the x axis (RL reward above KL).
//! - [`bar_chart`] — bars with error whiskers and an optional dashed
//!   reference line (judge win rates per category with 95% intervals and
//!   the 50% line).
//!
//! Pictures are RGB8 PNGs, 1000 px wide, on a white background with a grey
//! grid. Axes get "nice" ticks ({1, 2, 5} × 10^k, see [`nice_ticks`]) with
//! numeric labels; series get distinct colours (a palette of 8, repeated
//! after that) and a legend of their names above the plot. Text uses a
//! built-in 5×7 bitmap font (with descenders) drawn ×2, ×3 for titles; it
//! covers printable ASCII, and any other character is drawn as `?`. Series
//! lines are anti-aliased and 2 px thick.
//!
//! Non-finite points (and bars with a non-finite value) are skipped. A chart
//! with nothing to draw — no series, or no finite point — is still written,
//! with empty axes and the note "no data", so a stage never fails over a
//! picture of an empty run. Files are written atomically: the PNG is encoded
//! in memory, written to a temp file in the destination directory (created
//! if missing) and renamed into place.

use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::path::Path;

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
}

/// One named series of (x, y) points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend entry; an empty name leaves the series out of the legend.
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
}

/// One chart of [`line_charts`]: its title, y-axis label and series.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
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

/// Writes one line chart to `path` (PNG, 1000 px wide): `title` on top, the
/// legend, the axes with their labels, and every series in its own colour.
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let panel = PanelRef { title: None, y_label, series };
    save(path, &render_panels(title, x_label, &[panel], 420))
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
        .map(|p| PanelRef { title: Some(&p.title), y_label: &p.y_label, series: &p.series })
        .collect();
    save(path, &render_panels(title, x_label, &refs, 260))
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
    save(path, &render_bars(title, value_label, bars, reference))
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

type Rgb = [u8; 3];

const WIDTH: usize = 1000;
/// Scale of labels and of titles (font pixels per glyph pixel).
const TEXT: usize = 2;
const TITLE: usize = 3;
const INK: Rgb = [25, 25, 25];
const MUTED: Rgb = [75, 75, 75];
const GRID: Rgb = [226, 226, 226];
const FRAME: Rgb = [150, 150, 150];
const REFERENCE: Rgb = [214, 39, 40];
/// Series colours, in order (Tableau's palette).
const PALETTE: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];
const BAR: Rgb = PALETTE[0];

/// Glyph cell: 5 columns × 9 rows (7 above the baseline, 2 descender rows);
/// characters advance by 6 columns and lines by 11 rows.
const GLYPH_ROWS: usize = 9;
const CAP: usize = 7;
const ADVANCE: usize = 6;
const LINE: usize = 11;

fn glyph(c: char) -> &'static [u8; GLYPH_ROWS] {
    let i = c as usize;
    let i = if (32..127).contains(&i) { i - 32 } else { '?' as usize - 32 };
    &FONT[i]
}

fn text_width(s: &str, scale: usize) -> usize {
    let n = s.chars().count();
    if n == 0 {
        0
    } else {
        (n * ADVANCE - 1) * scale
    }
}

fn text_height(scale: usize) -> usize {
    LINE * scale
}

/// An RGB8 picture.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas { w, h, px: vec![255; w * h * 3] }
    }

    fn blend(&mut self, x: i64, y: i64, c: Rgb, a: f32) {
        if x < 0 || y < 0 || x >= self.w as i64 || y >= self.h as i64 || a <= 0.0 {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        let a = a.min(1.0);
        for (p, &c) in self.px[i..i + 3].iter_mut().zip(&c) {
            let old = *p as f32;
            *p = (old + (c as f32 - old) * a).round() as u8;
        }
    }

    /// Fills `x0..x1` × `y0..y1` (clipped).
    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        let (x0, x1) = (x0.max(0), x1.min(self.w as i64));
        let (y0, y1) = (y0.max(0), y1.min(self.h as i64));
        for y in y0..y1 {
            for x in x0..x1 {
                let i = (y as usize * self.w + x as usize) * 3;
                self.px[i..i + 3].copy_from_slice(&c);
            }
        }
    }

    /// `s` with the top of its capitals at `y`, starting at `x`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        let k = scale as i64;
        for (i, ch) in s.chars().enumerate() {
            let x0 = x + (i * ADVANCE) as i64 * k;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        let (gx, gy) = (x0 + col * k, y + row as i64 * k);
                        self.rect(gx, gy, gx + k, gy + k, c);
                    }
                }
            }
        }
    }

    /// `s` on a white box (so that grid and reference lines do not cross
    /// it), starting at `x`.
    fn text_boxed(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        let (w, k) = (text_width(s, scale) as i64, scale as i64);
        self.rect(x - 2 * k, y - 2 * k, x + w + 2 * k, y + (CAP + 2) as i64 * k, [255, 255, 255]);
        self.text(x, y, s, scale, c);
    }

    /// `s` centred on `cx`.
    fn text_centred(&mut self, cx: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        self.text(cx - text_width(s, scale) as i64 / 2, y, s, scale, c);
    }

    /// `s` ending at `x`.
    fn text_right(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        self.text(x - text_width(s, scale) as i64, y, s, scale, c);
    }

    /// `s` turned a quarter left (read upwards), in the box whose top-left
    /// corner is (`x`, `y`); the box is `text_width` tall.
    fn text_up(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        let k = scale as i64;
        let tw = text_width(s, scale) as i64;
        for (i, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        let u = (i * ADVANCE) as i64 + col;
                        let (gx, gy) = (x + row as i64 * k, y + tw - (u + 1) * k);
                        self.rect(gx, gy, gx + k, gy + k, c);
                    }
                }
            }
        }
    }

    /// Paints `c` through the coverage of `m`.
    fn paint(&mut self, m: &Mask, c: Rgb) {
        for y in 0..m.h {
            for x in 0..m.w {
                let a = m.cov[(y * m.w + x) as usize];
                if a > 0.0 {
                    self.blend(m.x0 + x, m.y0 + y, c, a);
                }
            }
        }
    }

    fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.px)?;
        writer.finish()?;
        Ok(out)
    }
}

/// Anti-aliased coverage (0..=1) over a rectangle of the canvas, built up
/// with `max` so that overlapping strokes of one colour do not darken.
struct Mask {
    x0: i64,
    y0: i64,
    w: i64,
    h: i64,
    cov: Vec<f32>,
}

impl Mask {
    /// Covers `x0..x1` × `y0..y1`; strokes outside are clipped.
    fn new(x0: i64, y0: i64, x1: i64, y1: i64) -> Self {
        let (w, h) = ((x1 - x0).max(0), (y1 - y0).max(0));
        Mask { x0, y0, w, h, cov: vec![0.0; (w * h) as usize] }
    }

    /// The pixels within `r` (+1 for the soft edge) of the box `a`..`b`, in
    /// mask coordinates, clipped.
    fn span(&self, lo: (f64, f64), hi: (f64, f64), r: f64) -> (i64, i64, i64, i64) {
        let clip = |v: f64, off: i64, n: i64| (v.floor() as i64 - off).clamp(0, n);
        (
            clip(lo.0 - r - 1.0, self.x0, self.w),
            clip(lo.1 - r - 1.0, self.y0, self.h),
            clip(hi.0 + r + 2.0, self.x0, self.w),
            clip(hi.1 + r + 2.0, self.y0, self.h),
        )
    }

    fn cover(&mut self, x: i64, y: i64, a: f64) {
        let i = (y * self.w + x) as usize;
        self.cov[i] = self.cov[i].max(a.clamp(0.0, 1.0) as f32);
    }

    /// A stroke `2 × half` px wide from `a` to `b` (round ends); pixel
    /// centres are at `i + 0.5`.
    fn segment(&mut self, a: (f64, f64), b: (f64, f64), half: f64) {
        let (x0, y0, x1, y1) = self.span((a.0.min(b.0), a.1.min(b.1)), (a.0.max(b.0), a.1.max(b.1)), half);
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len2 = dx * dx + dy * dy;
        for y in y0..y1 {
            for x in x0..x1 {
                let (px, py) = ((x + self.x0) as f64 + 0.5, (y + self.y0) as f64 + 0.5);
                let t = if len2 > 0.0 {
                    (((px - a.0) * dx + (py - a.1) * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let (qx, qy) = (a.0 + t * dx - px, a.1 + t * dy - py);
                self.cover(x, y, half + 0.5 - (qx * qx + qy * qy).sqrt());
            }
        }
    }

    /// A filled disc of radius `r` around `c`.
    fn disc(&mut self, c: (f64, f64), r: f64) {
        self.segment(c, c, r);
    }

    /// A dashed stroke from `a` to `b`: dashes of `on` px, gaps of `off` px.
    fn dashed(&mut self, a: (f64, f64), b: (f64, f64), half: f64, on: f64, off: f64) {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len = (dx * dx + dy * dy).sqrt();
        if len.is_nan() || len <= 0.0 {
            return;
        }
        let (ux, uy) = (dx / len, dy / len);
        let mut s = 0.0;
        while s < len {
            let e = (s + on).min(len);
            self.segment((a.0 + ux * s, a.1 + uy * s), (a.0 + ux * e, a.1 + uy * e), half);
            s += on + off;
        }
    }
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
    fn fitting(lo: f64, hi: f64, len: usize) -> Self {
        for target in (3..=10).rev() {
            let a = Axis::new(lo, hi, target);
            if a.widest() + 24 <= len / a.ticks.len().max(1) {
                return a;
            }
        }
        Axis::new(lo, hi, 2)
    }

    fn widest(&self) -> usize {
        self.labels.iter().map(|l| text_width(l, TEXT)).max().unwrap_or(0)
    }

    /// Where `v` falls, 0 at `lo` and 1 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        let span = self.hi - self.lo;
        if span > 0.0 && span.is_finite() {
            (v - self.lo) / span
        } else {
            0.5
        }
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

/// The plot rectangle `x0..x1` × `y0..y1` with its axes, mapping data to
/// pixel-centre coordinates.
struct Frame<'a> {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
    x: &'a Axis,
    y: &'a Axis,
}

impl Frame<'_> {
    fn px(&self, v: f64) -> f64 {
        self.x0 as f64 + 0.5 + self.x.frac(v) * (self.x1 - self.x0 - 1) as f64
    }

    fn py(&self, v: f64) -> f64 {
        self.y1 as f64 - 0.5 - self.y.frac(v) * (self.y1 - self.y0 - 1) as f64
    }

    fn mask(&self) -> Mask {
        Mask::new(self.x0, self.y0, self.x1, self.y1)
    }

    /// Grid lines and tick marks; labels under the x ticks and left of the
    /// y ticks (`x_labels` false leaves the x labels out).
    fn grid(&self, c: &mut Canvas, x_labels: bool) {
        let half = (CAP * TEXT / 2) as i64;
        for (t, l) in self.y.ticks.iter().zip(&self.y.labels) {
            let y = self.py(*t).floor() as i64;
            c.rect(self.x0, y, self.x1, y + 1, GRID);
            c.rect(self.x0 - 6, y, self.x0, y + 1, FRAME);
            c.text_right(self.x0 - 10, y - half, l, TEXT, MUTED);
        }
        for (t, l) in self.x.ticks.iter().zip(&self.x.labels) {
            let x = self.px(*t).floor() as i64;
            c.rect(x, self.y0, x + 1, self.y1, GRID);
            c.rect(x, self.y1, x + 1, self.y1 + 6, FRAME);
            if x_labels {
                c.text_centred(x, self.y1 + 10, l, TEXT, MUTED);
            }
        }
    }

    fn border(&self, c: &mut Canvas) {
        c.rect(self.x0 - 1, self.y0 - 1, self.x1 + 1, self.y0, FRAME);
        c.rect(self.x0 - 1, self.y1, self.x1 + 1, self.y1 + 1, FRAME);
        c.rect(self.x0 - 1, self.y0 - 1, self.x0, self.y1 + 1, FRAME);
        c.rect(self.x1, self.y0 - 1, self.x1 + 1, self.y1 + 1, FRAME);
    }

    fn note(&self, c: &mut Canvas, s: &str) {
        let y = (self.y0 + self.y1) / 2 - (CAP * TEXT / 2) as i64;
        c.text_centred((self.x0 + self.x1) / 2, y, s, TEXT, MUTED);
    }
}

/// Margin left of a plot: the y label (turned), its gap, the tick labels
/// and the tick marks.
fn left_margin(tick_label_width: usize) -> usize {
    16 + GLYPH_ROWS * TEXT + 14 + tick_label_width + 10
}

/// Writes a rotated `label` centred along the left edge of `f`.
fn y_label(c: &mut Canvas, f: &Frame, label: &str) {
    let tw = text_width(label, TEXT) as i64;
    c.text_up(16, (f.y0 + f.y1) / 2 - tw / 2, label, TEXT, INK);
}

const SWATCH: usize = 26;

/// Legend rows for `series` within `width` px: (series index, x offset).
fn legend_rows(series: &[Series], width: usize) -> Vec<Vec<(usize, usize)>> {
    let mut rows: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut x = 0;
    for (i, s) in series.iter().enumerate() {
        if s.name.is_empty() {
            continue;
        }
        let w = SWATCH + 8 + text_width(&s.name, TEXT);
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

fn draw_swatch(c: &mut Canvas, x: i64, cy: i64, style: SeriesStyle, colour: Rgb) {
    let mut m = Mask::new(x, cy - 8, x + SWATCH as i64, cy + 8);
    let (a, b) = ((x as f64 + 2.0, cy as f64), ((x + SWATCH as i64) as f64 - 2.0, cy as f64));
    if style != SeriesStyle::Points {
        m.segment(a, b, 1.5);
    }
    if style != SeriesStyle::Line {
        m.disc(((a.0 + b.0) / 2.0, cy as f64), 4.0);
    }
    c.paint(&m, colour);
}

fn draw_series(c: &mut Canvas, f: &Frame, s: &Series, colour: Rgb) {
    let pts: Vec<(f64, f64)> = finite_points(s).map(|(x, y)| (f.px(x), f.py(y))).collect();
    let mut m = f.mask();
    if s.style != SeriesStyle::Points {
        for w in pts.windows(2) {
            m.segment(w[0], w[1], 1.0);
        }
        if pts.len() == 1 {
            m.disc(pts[0], 2.0);
        }
    }
    if s.style != SeriesStyle::Line {
        for &p in &pts {
            m.disc(p, 3.5);
        }
    }
    c.paint(&m, colour);
}

struct PanelRef<'a> {
    title: Option<&'a str>,
    y_label: &'a str,
    series: &'a [Series],
}

/// `panels` stacked under `title`, each plot `plot_h` px tall, sharing the
/// x range; the picture is as tall as they need.
fn render_panels(title: &str, x_label: &str, panels: &[PanelRef], plot_h: usize) -> Canvas {
    let line = text_height(TEXT) as i64;
    let y_target = (plot_h / 55).clamp(3, 8);
    let y_axes: Vec<Axis> = panels
        .iter()
        .map(|p| {
            let ys = p.series.iter().flat_map(|s| finite_points(s).map(|(_, y)| y));
            let (lo, hi) = span(ys).map_or(pad(0.0, 1.0, 0.05), |(lo, hi)| pad(lo, hi, 0.05));
            Axis::new(lo, hi, y_target)
        })
        .collect();
    let left = left_margin(y_axes.iter().map(Axis::widest).max().unwrap_or(0));
    let right = 40;
    let plot_w = WIDTH - left - right;
    let xs = panels.iter().flat_map(|p| p.series.iter().flat_map(|s| finite_points(s).map(|(x, _)| x)));
    let (xlo, xhi) = span(xs).map_or((0.0, 1.0), |(lo, hi)| pad(lo, hi, 0.02));
    let x_axis = Axis::fitting(xlo, xhi, plot_w);
    let legends: Vec<_> = panels.iter().map(|p| legend_rows(p.series, plot_w)).collect();

    // Heights: title band; per panel its title, legend, plot, tick labels
    // (and the x label under the last one).
    let top = 14 + text_height(TITLE) as i64 + 4;
    let panel_h = |i: usize| -> i64 {
        let title = if panels[i].title.is_some() { line + 2 } else { 0 };
        let x_label = if i + 1 == panels.len() { line + 6 } else { 0 };
        title + legends[i].len() as i64 * line + 10 + plot_h as i64 + 10 + line + x_label + 14
    };
    let height = top + (0..panels.len()).map(panel_h).sum::<i64>();
    let mut c = Canvas::new(WIDTH, height.max(1) as usize);
    c.text_centred(WIDTH as i64 / 2, 14, title, TITLE, INK);

    let mut y = top;
    for (i, p) in panels.iter().enumerate() {
        let next = y + panel_h(i);
        let cx = (left + plot_w / 2) as i64;
        if let Some(t) = p.title {
            c.text_centred(cx, y, t, TEXT, INK);
            y += line + 2;
        }
        for row in &legends[i] {
            for &(k, off) in row {
                let s = &p.series[k];
                let x = (left + off) as i64;
                draw_swatch(&mut c, x, y + (CAP * TEXT / 2) as i64, s.style, PALETTE[k % PALETTE.len()]);
                c.text(x + SWATCH as i64 + 8, y, &s.name, TEXT, MUTED);
            }
            y += line;
        }
        y += 10;
        let f = Frame {
            x0: left as i64,
            y0: y,
            x1: (left + plot_w) as i64,
            y1: y + plot_h as i64,
            x: &x_axis,
            y: &y_axes[i],
        };
        f.grid(&mut c, true);
        let mut any = false;
        for (k, s) in p.series.iter().enumerate() {
            any |= finite_points(s).next().is_some();
            draw_series(&mut c, &f, s, PALETTE[k % PALETTE.len()]);
        }
        if !any {
            f.note(&mut c, "no data");
        }
        f.border(&mut c);
        y_label(&mut c, &f, p.y_label);
        if i + 1 == panels.len() {
            c.text_centred(cx, f.y1 + 10 + line + 6, x_label, TEXT, INK);
        }
        y = next;
    }
    c
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

fn render_bars(title: &str, value_label: &str, bars: &[Bar], reference: Option<f64>) -> Canvas {
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

    let top = 14 + text_height(TITLE) as i64 + 16;
    let line = text_height(TEXT) as i64;
    let right = 64;
    // Vertical bars if every label fits under its bar.
    let y_axis = Axis::new(lo, hi, 8);
    let left = left_margin(y_axis.widest());
    let slot = (WIDTH - left - right) / bars.len().max(1);
    if bars.is_empty() || widest + 12 <= slot {
        let height = 600;
        let mut c = Canvas::new(WIDTH, height);
        c.text_centred(WIDTH as i64 / 2, 14, title, TITLE, INK);
        let x_axis = Axis { lo: 0.0, hi: 1.0, ticks: Vec::new(), labels: Vec::new() };
        let f = Frame {
            x0: left as i64,
            y0: top,
            x1: (WIDTH - right) as i64,
            y1: height as i64 - 14 - line - 14,
            x: &x_axis,
            y: &y_axis,
        };
        f.grid(&mut c, false);
        let slot = (f.x1 - f.x0) as f64 / bars.len().max(1) as f64;
        let bar_w = (slot * 0.6).min(110.0);
        let zero = f.py(0.0);
        let mut m = f.mask();
        let mut whiskers = f.mask();
        let mut text_after = Vec::new();
        for (i, b) in bars.iter().enumerate() {
            let cx = f.x0 as f64 + slot * (i as f64 + 0.5);
            let mut top_y = zero;
            if b.value.is_finite() {
                let v = f.py(b.value);
                fill(&mut m, (cx - bar_w / 2.0, zero.min(v)), (cx + bar_w / 2.0, zero.max(v)));
                top_y = top_y.min(v);
            }
            if b.lo.is_finite() && b.hi.is_finite() {
                let (a, e) = (f.py(b.lo), f.py(b.hi));
                let cap = (bar_w * 0.2).max(6.0);
                whiskers.segment((cx, a), (cx, e), 1.0);
                whiskers.segment((cx - cap, a), (cx + cap, a), 1.0);
                whiskers.segment((cx - cap, e), (cx + cap, e), 1.0);
                top_y = top_y.min(a).min(e);
            }
            let ty = top_y as i64 - 8 - (CAP * TEXT) as i64;
            let tx = cx as i64 - text_width(&values[i], TEXT) as i64 / 2;
            text_after.push((tx, ty, i));
            c.text_centred(cx as i64, f.y1 + 12, &labels[i], TEXT, INK);
        }
        c.paint(&m, BAR);
        c.paint(&whiskers, INK);
        if let Some(r) = reference {
            let mut m = f.mask();
            let y = f.py(r);
            m.dashed((f.x0 as f64, y), (f.x1 as f64, y), 1.0, 10.0, 6.0);
            c.paint(&m, REFERENCE);
            c.text(f.x1 + 8, y as i64 - (CAP * TEXT / 2) as i64, &short(r), TEXT, REFERENCE);
        }
        c.rect(f.x0, zero.floor() as i64, f.x1, zero.floor() as i64 + 1, FRAME);
        for (x, y, i) in text_after {
            c.text_boxed(x, y, &values[i], TEXT, MUTED);
        }
        if bars.is_empty() {
            f.note(&mut c, "no data");
        }
        f.border(&mut c);
        y_label(&mut c, &f, value_label);
        return c;
    }

    // Horizontal bars: labels on the left, the value axis at the bottom.
    let row = 40i64;
    let left = 16 + widest + 14;
    let plot_w = WIDTH - left - right;
    let x_axis = Axis::fitting(lo, hi, plot_w);
    let no_y = Axis { lo: 0.0, hi: 1.0, ticks: Vec::new(), labels: Vec::new() };
    let plot_top = top + if reference.is_some() { line } else { 0 };
    let plot_bottom = plot_top + row * bars.len() as i64;
    let height = plot_bottom + 10 + line + 6 + line + 14;
    let mut c = Canvas::new(WIDTH, height as usize);
    c.text_centred(WIDTH as i64 / 2, 14, title, TITLE, INK);
    let f = Frame {
        x0: left as i64,
        y0: plot_top,
        x1: (left + plot_w) as i64,
        y1: plot_bottom,
        x: &x_axis,
        y: &no_y,
    };
    f.grid(&mut c, true);
    let zero = f.px(0.0);
    let bar_h = row as f64 * 0.6;
    let mut m = f.mask();
    let mut whiskers = f.mask();
    let mut text_after = Vec::new();
    let half = (CAP * TEXT / 2) as i64;
    for (i, b) in bars.iter().enumerate() {
        let cy = f.y0 as f64 + row as f64 * (i as f64 + 0.5);
        let mut end = zero;
        if b.value.is_finite() {
            let v = f.px(b.value);
            fill(&mut m, (zero.min(v), cy - bar_h / 2.0), (zero.max(v), cy + bar_h / 2.0));
            end = end.max(v);
        }
        if b.lo.is_finite() && b.hi.is_finite() {
            let (a, e) = (f.px(b.lo), f.px(b.hi));
            let cap = bar_h * 0.3;
            whiskers.segment((a, cy), (e, cy), 1.0);
            whiskers.segment((a, cy - cap), (a, cy + cap), 1.0);
            whiskers.segment((e, cy - cap), (e, cy + cap), 1.0);
            end = end.max(a).max(e);
        }
        text_after.push((end as i64 + 10, cy as i64 - half, i));
        c.text_right(f.x0 - 10, cy as i64 - half, &labels[i], TEXT, INK);
    }
    c.paint(&m, BAR);
    c.paint(&whiskers, INK);
    if let Some(r) = reference {
        let mut m = f.mask();
        let x = f.px(r);
        m.dashed((x, f.y0 as f64), (x, f.y1 as f64), 1.0, 10.0, 6.0);
        c.paint(&m, REFERENCE);
        c.text_centred(x as i64, f.y0 - 6 - (CAP * TEXT) as i64, &short(r), TEXT, REFERENCE);
    }
    c.rect(zero.floor() as i64, f.y0, zero.floor() as i64 + 1, f.y1, FRAME);
    for (x, y, i) in text_after {
        c.text_boxed(x, y, &values[i], TEXT, MUTED);
    }
    f.border(&mut c);
    c.text_centred((f.x0 + f.x1) / 2, f.y1 + 10 + line + 6, value_label, TEXT, INK);
    c
}

/// Covers the box `a`..`b` (pixel-centre coordinates), with soft edges
/// where its sides fall between pixels.
fn fill(m: &mut Mask, a: (f64, f64), b: (f64, f64)) {
    let (x0, y0, x1, y1) = m.span(a, b, 0.0);
    for y in y0..y1 {
        for x in x0..x1 {
            let (px, py) = ((x + m.x0) as f64, (y + m.y0) as f64);
            // Overlap of the pixel px..px+1 with the box a..b (edges at
            // centre coordinates, so shifted by half a pixel).
            let ox = ((px + 1.0).min(b.0 + 0.5) - px.max(a.0 - 0.5)).clamp(0.0, 1.0);
            let oy = ((py + 1.0).min(b.1 + 0.5) - py.max(a.1 - 0.5)).clamp(0.0, 1.0);
            m.cover(x, y, ox * oy);
        }
    }
}

/// Encodes `c` and writes it atomically to `path`.
fn save(path: &Path, c: &Canvas) -> Result<()> {
    let bytes = c.encode().with_context(|| format!("cannot encode the chart {}", path.display()))?;
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

/// The font: printable ASCII from ' ' (32) to '~' (126), one glyph per
/// character as 9 rows of 5 bits (the high bit is the left column). Rows
/// 0–6 stand on the baseline; rows 7–8 hold descenders.
#[rustfmt::skip]
const FONT: [[u8; GLYPH_ROWS]; 95] = [
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // space
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100, 0b00000, 0b00000], // !
    [0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // "
    [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010, 0b00000, 0b00000], // #
    [0b00100, 0b01111, 0b10100, 0b01110, 0b00101, 0b11110, 0b00100, 0b00000, 0b00000], // $
    [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011, 0b00000, 0b00000], // %
    [0b01100, 0b10010, 0b10100, 0b01000, 0b10101, 0b10010, 0b01101, 0b00000, 0b00000], // &
    [0b00100, 0b00100, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // quote
    [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010, 0b00000, 0b00000], // (
    [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000, 0b00000, 0b00000], // )
    [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000, 0b00000, 0b00000], // *
    [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000, 0b00000, 0b00000], // +
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00100, 0b01000], // ,
    [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // -
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00000, 0b00000], // .
    [0b00001, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b10000, 0b00000, 0b00000], // /
    [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110, 0b00000, 0b00000], // 0
    [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000, 0b00000], // 1
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000, 0b00000], // 2
    [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110, 0b00000, 0b00000], // 3
    [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010, 0b00000, 0b00000], // 4
    [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110, 0b00000, 0b00000], // 5
    [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // 6
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00000, 0b00000], // 7
    [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // 8
    [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100, 0b00000, 0b00000], // 9
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000, 0b00000, 0b00000], // :
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00100, 0b01000, 0b00000], // ;
    [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00000, 0b00000], // <
    [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000, 0b00000], // =
    [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000, 0b00000, 0b00000], // >
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100, 0b00000, 0b00000], // ?
    [0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110, 0b00000, 0b00000], // @
    [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // A
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110, 0b00000, 0b00000], // B
    [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000, 0b00000], // C
    [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100, 0b00000, 0b00000], // D
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111, 0b00000, 0b00000], // E
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000, 0b00000], // F
    [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111, 0b00000, 0b00000], // G
    [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // H
    [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000, 0b00000], // I
    [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100, 0b00000, 0b00000], // J
    [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001, 0b00000, 0b00000], // K
    [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111, 0b00000, 0b00000], // L
    [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // M
    [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001, 0b00000, 0b00000], // N
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // O
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000, 0b00000], // P
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101, 0b00000, 0b00000], // Q
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001, 0b00000, 0b00000], // R
    [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110, 0b00000, 0b00000], // S
    [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00000], // T
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // U
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000, 0b00000], // V
    [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010, 0b00000, 0b00000], // W
    [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001, 0b00000, 0b00000], // X
    [0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00000], // Y
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111, 0b00000, 0b00000], // Z
    [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110, 0b00000, 0b00000], // [
    [0b10000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00001, 0b00001, 0b00000, 0b00000], // backslash
    [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110, 0b00000, 0b00000], // ]
    [0b00100, 0b01010, 0b10001, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // ^
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111, 0b00000], // _
    [0b01000, 0b00100, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // `
    [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111, 0b00000, 0b00000], // a
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110, 0b00000, 0b00000], // b
    [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000, 0b00000], // c
    [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111, 0b00000, 0b00000], // d
    [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110, 0b00000, 0b00000], // e
    [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000, 0b00000, 0b00000], // f
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // g
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // h
    [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000, 0b00000], // i
    [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100], // j
    [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b00000, 0b00000], // k
    [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00011, 0b00000, 0b00000], // l
    [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10101, 0b10101, 0b00000, 0b00000], // m
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000, 0b00000], // n
    [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000, 0b00000], // o
    [0b00000, 0b00000, 0b11110, 0b10001, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000], // p
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001], // q
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000, 0b00000, 0b00000], // r
    [0b00000, 0b00000, 0b01111, 0b10000, 0b01110, 0b00001, 0b11110, 0b00000, 0b00000], // s
    [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110, 0b00000, 0b00000], // t
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101, 0b00000, 0b00000], // u
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000, 0b00000], // v
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010, 0b00000, 0b00000], // w
    [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b00000, 0b00000], // x
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // y
    [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000, 0b00000], // z
    [0b00011, 0b00100, 0b00100, 0b01000, 0b00100, 0b00100, 0b00011, 0b00000, 0b00000], // {
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100], // |
    [0b11000, 0b00100, 0b00100, 0b00010, 0b00100, 0b00100, 0b11000, 0b00000, 0b00000], // }
    [0b00000, 0b00000, 0b01000, 0b10101, 0b00010, 0b00000, 0b00000, 0b00000, 0b00000], // ~
];

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

    fn count(px: &[u8], c: Rgb) -> usize {
        px.chunks(3).filter(|p| *p == c).count()
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
    fn the_font_covers_printable_ascii_with_distinct_glyphs() {
        for c in '!'..='~' {
            assert!(glyph(c).iter().any(|&r| r != 0), "{c:?} is blank");
            assert!(glyph(c).iter().all(|&r| r < 32), "{c:?} is wider than 5");
            for d in '!'..c {
                assert_ne!(glyph(c), glyph(d), "{c:?} looks like {d:?}");
            }
        }
        assert!(glyph(' ').iter().all(|&r| r == 0));
        assert_eq!(glyph('é'), glyph('?'));
        assert_eq!(text_width("ab", 2), 22);
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
            },
            Panel {
                title: "KL".into(),
                y_label: "KL to reference".into(),
                series: vec![Series::line("kl", kl)],
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
            Series::line("train loss", train),
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
                ],
            },
            Panel {
                title: "KL(policy || reference)".into(),
                y_label: "KL".into(),
                series: vec![Series::line("kl", kl)],
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
        let lines: Vec<Series> =
            font.as_bytes().chunks(32).map(|c| Series::line(String::from_utf8_lossy(c), vec![])).collect();
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
