//! Mixtures: named sources with weights, sampled deterministically from a
//! seed, with a held-out split and a report of what each source gave.
//!
//! # Semantics
//!
//! 1. Each source is read (and, with `filters`, all sources are filtered
//!    together in source order, so a duplicate across sources keeps its first
//!    occurrence).
//! 2. Held-out split, before any sampling so that held-out rows never reach
//!    training however a source is upsampled: with `held_out.fraction = f`,
//!    each source holds out `round(f · n)` of its rows (at least 1 when f > 0,
//!    and at least 1 row stays for training), chosen by a seeded shuffle that
//!    depends on the seed and the source's *name* (adding a source leaves the
//!    other sources' splits alone). With `held_out.path` the held-out rows are
//!    that file's and the sources are not split.
//! 3. Sampling one epoch, for source i with n_i training rows and weight w_i:
//!    - without `total`, the weight is a number of passes: source i gives
//!      round(w_i · n_i) rows (at least 1): ⌊w_i⌋ full passes plus a random
//!      (w_i − ⌊w_i⌋) fraction of its rows without replacement (2.0 = every
//!      row twice, 0.5 = a random half, 1.5 = all once and a random half again);
//!    - with `total = N`, the weights are proportions: source i gives
//!      N · w_i / Σw rows (largest-remainder rounding, so the counts add up
//!      to N), drawn as full passes plus a random remainder as above.
//!
//!    The partial pass differs from epoch to epoch (it is seeded by seed,
//!    source name and epoch), so over several epochs a downsampled source
//!    shows different rows. The sampled rows of all sources are then shuffled
//!    together with a seed derived from seed and epoch.
//!
//! Everything is a function of the seed and the data: the same config gives
//! the same epochs on every run and machine.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::filter::{FilterConfig, FilterReport, Filters};
use crate::read::{read_dataset, BadRow, Format, OnBadRow, ReadOptions, ReadReport};
use crate::record::{Example, RecordKind};
use crate::text::name_seed;
use std::collections::BTreeMap;

/// One named source of a mixture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    /// A file or a directory of shards, relative to the recipe's directory.
    pub path: PathBuf,
    /// Passes over the source (without `total`) or its share (with `total`).
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub kind: Option<RecordKind>,
    #[serde(default)]
    pub format: Option<Format>,
    /// Canonical column name → this source's column name.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Overrides the mixture's `on_bad_row` for this source.
    #[serde(default)]
    pub on_bad_row: Option<OnBadRow>,
}

fn one() -> f64 {
    1.0
}

/// The held-out split: a fraction of each source, or a separate file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldOutConfig {
    #[serde(default)]
    pub fraction: Option<f64>,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub kind: Option<RecordKind>,
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

/// A mixture section of a recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureConfig {
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub seed: u64,
    /// Rows per epoch; absent: weights are numbers of passes.
    #[serde(default)]
    pub total: Option<usize>,
    /// The record kind every source is read as (a source's own `kind` wins).
    #[serde(default)]
    pub kind: Option<RecordKind>,
    #[serde(default)]
    pub on_bad_row: OnBadRow,
    #[serde(default)]
    pub held_out: Option<HeldOutConfig>,
    #[serde(default)]
    pub filters: Option<FilterConfig>,
}

/// A source with its examples, for building a mixture in memory.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub weight: f64,
    pub examples: Vec<Example>,
}

/// One sampled row: which source, which of its training rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Draw {
    pub source: usize,
    pub index: usize,
}

/// What a source gave.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceReport {
    pub name: String,
    pub weight: f64,
    /// Rows read (before bad rows were skipped).
    pub rows: usize,
    pub skipped_bad_rows: usize,
    pub filtered_out: usize,
    pub held_out: usize,
    /// Training rows available to sample from.
    pub train: usize,
    /// Rows per epoch.
    pub per_epoch: usize,
    /// Share of an epoch.
    pub share: f64,
}

/// What a mixture is made of.
#[derive(Clone, Debug)]
pub struct MixtureReport {
    pub sources: Vec<SourceReport>,
    pub per_epoch: usize,
    pub held_out: usize,
    /// Every skipped bad row, of every source and the held-out file.
    pub skipped: Vec<BadRow>,
    pub filters: Option<FilterReport>,
    pub reads: Vec<ReadReport>,
}

impl fmt::Display for MixtureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<20} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7}",
            "source", "weight", "rows", "bad", "filtered", "held", "per epoch", "share"
        )?;
        for s in &self.sources {
            writeln!(
                f,
                "{:<20} {:>7.3} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6.1}%",
                s.name,
                s.weight,
                s.rows,
                s.skipped_bad_rows,
                s.filtered_out,
                s.held_out,
                s.per_epoch,
                100.0 * s.share
            )?;
        }
        write!(f, "{} rows per epoch, {} held out", self.per_epoch, self.held_out)?;
        if let Some(fr) = &self.filters {
            write!(f, "\n{fr}")?;
        }
        if !self.skipped.is_empty() {
            write!(f, "\n{} bad rows skipped:", self.skipped.len())?;
            for b in self.skipped.iter().take(10) {
                write!(f, "\n  {b}")?;
            }
            if self.skipped.len() > 10 {
                write!(f, "\n  … and {} more", self.skipped.len() - 10)?;
            }
        }
        Ok(())
    }
}

/// How many filter removals by one filter (pipeline order is kept).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilterCount {
    pub filter: String,
    pub removed: usize,
}

/// What the filters did, for a stage's `summary.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterSummary {
    /// Rows the filters saw, kept and removed.
    pub input: usize,
    pub kept: usize,
    pub removed: usize,
    /// Rows removed per filter, in pipeline order.
    pub removed_by: Vec<FilterCount>,
}

/// One skipped bad row, for a stage's `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BadRowEntry {
    pub file: String,
    /// "line" (JSONL) or "row" (other formats).
    pub unit: String,
    /// 1-based line or row number.
    pub number: usize,
    pub field: Option<String>,
    pub reason: String,
}

impl From<&BadRow> for BadRowEntry {
    fn from(b: &BadRow) -> Self {
        BadRowEntry {
            file: b.file.display().to_string(),
            unit: b.unit.to_string(),
            number: b.number,
            field: b.field.clone(),
            reason: b.message.clone(),
        }
    }
}

impl fmt::Display for BadRowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}", self.file, self.unit, self.number)?;
        match &self.field {
            Some(field) => write!(f, ", field `{field}`: {}", self.reason),
            None => write!(f, ": {}", self.reason),
        }
    }
}

/// What a mixture removed before training, as a stage reports it at the end
/// and in `summary.json`: the filters' counts per filter, and the skipped
/// bad rows (all counted, the first [`DataReportSummary::MAX_LISTED`]
/// listed with file, line or row, field and reason).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataReportSummary {
    /// `None` when no filters were configured.
    pub filters: Option<FilterSummary>,
    /// Where the removed rows were written for review (`keep_removed`).
    #[serde(default)]
    pub removed_rows_file: Option<PathBuf>,
    pub skipped_bad_rows: usize,
    pub bad_rows: Vec<BadRowEntry>,
}

impl DataReportSummary {
    /// Bad rows listed one by one; the rest are counted.
    pub const MAX_LISTED: usize = 100;

    pub fn from_report(report: &MixtureReport) -> Self {
        DataReportSummary {
            filters: report.filters.as_ref().map(|fr| FilterSummary {
                input: fr.input,
                kept: fr.kept,
                removed: fr.total_removed(),
                removed_by: fr
                    .removed_by
                    .iter()
                    .map(|(name, n)| FilterCount { filter: name.to_string(), removed: *n })
                    .collect(),
            }),
            removed_rows_file: None,
            skipped_bad_rows: report.skipped.len(),
            bad_rows: report.skipped.iter().take(Self::MAX_LISTED).map(BadRowEntry::from).collect(),
        }
    }
}

impl fmt::Display for DataReportSummary {
    /// A few lines for the end of a stage: filter counts and the first ten
    /// skipped rows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.filters {
            None => write!(f, "filters: none configured")?,
            Some(fs) => {
                write!(f, "filters: {} rows in, {} kept, {} removed", fs.input, fs.kept, fs.removed)?;
                for c in &fs.removed_by {
                    write!(f, "\n  {:<20} {:>8} removed", c.filter, c.removed)?;
                }
            }
        }
        if let Some(p) = &self.removed_rows_file {
            write!(f, "\n  removed rows written to {}", p.display())?;
        }
        write!(f, "\nbad rows skipped: {}", self.skipped_bad_rows)?;
        for b in self.bad_rows.iter().take(10) {
            write!(f, "\n  {b}")?;
        }
        if self.skipped_bad_rows > 10 {
            write!(
                f,
                "\n  … and {} more (listed in summary.json up to {})",
                self.skipped_bad_rows - 10,
                Self::MAX_LISTED
            )?;
        }
        Ok(())
    }
}

/// Sampling settings for [`Mixture::from_sources`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MixSettings {
    pub seed: u64,
    pub total: Option<usize>,
    /// Held-out fraction per source (ignored when `held_out` rows are given).
    pub held_out_fraction: Option<f64>,
}

/// A mixture ready to sample: per-source training rows and weights, the
/// held-out rows, and the report.
#[derive(Clone, Debug)]
pub struct Mixture {
    names: Vec<String>,
    weights: Vec<f64>,
    train: Vec<Vec<Example>>,
    counts: Vec<usize>,
    held_out: Vec<Example>,
    held_out_sources: Vec<usize>,
    seed: u64,
    report: MixtureReport,
}

const SALT_SPLIT: u64 = 0x0053_504c_4954;
const SALT_SAMPLE: u64 = 0x5341_4d50;
const SALT_SHUFFLE: u64 = 0x5348_5546;

impl Mixture {
    /// Read, filter, split and size a mixture from its config; relative paths
    /// are resolved against `base_dir` (the recipe's directory).
    pub fn load(cfg: &MixtureConfig, base_dir: &Path) -> Result<Mixture> {
        if cfg.sources.is_empty() {
            bail!("mixture: `sources` is empty; list at least one [[sources]] with a name and a path");
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &cfg.sources {
            if !seen.insert(s.name.as_str()) {
                bail!("mixture: two sources are named `{}`; names must be unique", s.name);
            }
        }
        let held_cfg = cfg.held_out.clone().unwrap_or_default();
        if held_cfg.fraction.is_some() && held_cfg.path.is_some() {
            bail!("mixture.held_out: set `fraction` or `path`, not both");
        }
        if cfg.held_out.is_some() && held_cfg.fraction.is_none() && held_cfg.path.is_none() {
            bail!("mixture.held_out: set `fraction` (a share of each source) or `path` (a separate file)");
        }
        let mut reads = Vec::new();
        let mut skipped = Vec::new();
        let mut sources = Vec::new();
        for s in &cfg.sources {
            let path = crate::read::resolve(base_dir, &s.path);
            let data = read_dataset(
                &path,
                &ReadOptions {
                    kind: s.kind.or(cfg.kind),
                    format: s.format,
                    columns: s.columns.clone(),
                    on_bad_row: s.on_bad_row.unwrap_or(cfg.on_bad_row),
                },
            )
            .with_context(|| format!("mixture source `{}`", s.name))?;
            skipped.extend(data.report.skipped.iter().cloned());
            reads.push(data.report);
            sources.push(Source { name: s.name.clone(), weight: s.weight, examples: data.examples });
        }
        let held_out = match &held_cfg.path {
            None => None,
            Some(p) => {
                let path = crate::read::resolve(base_dir, p);
                let data = read_dataset(
                    &path,
                    &ReadOptions {
                        kind: held_cfg.kind.or(cfg.kind),
                        format: held_cfg.format,
                        columns: held_cfg.columns.clone(),
                        on_bad_row: cfg.on_bad_row,
                    },
                )
                .context("mixture held-out file")?;
                skipped.extend(data.report.skipped.iter().cloned());
                reads.push(data.report);
                Some(data.examples)
            }
        };
        let mut filters = match &cfg.filters {
            Some(fc) => Some(Filters::new(fc, base_dir)?),
            None => None,
        };
        let settings = MixSettings { seed: cfg.seed, total: cfg.total, held_out_fraction: held_cfg.fraction };
        let mut m = Self::build(sources, &settings, held_out, filters.as_mut())?;
        for (i, r) in reads.iter().enumerate().take(m.report.sources.len()) {
            m.report.sources[i].rows = r.rows;
            m.report.sources[i].skipped_bad_rows = r.skipped.len();
        }
        m.report.skipped = skipped;
        m.report.reads = reads;
        Ok(m)
    }

    /// Build a mixture from sources in memory (no filters).
    pub fn from_sources(sources: Vec<Source>, settings: &MixSettings) -> Result<Mixture> {
        Self::build(sources, settings, None, None)
    }

    /// Build a mixture from sources in memory, filtering them together.
    pub fn from_sources_filtered(
        sources: Vec<Source>,
        settings: &MixSettings,
        filters: &mut Filters,
    ) -> Result<Mixture> {
        Self::build(sources, settings, None, Some(filters))
    }

    fn build(
        sources: Vec<Source>,
        settings: &MixSettings,
        held_out_rows: Option<Vec<Example>>,
        filters: Option<&mut Filters>,
    ) -> Result<Mixture> {
        if sources.is_empty() {
            bail!("mixture: no sources");
        }
        for s in &sources {
            if !(s.weight.is_finite() && s.weight > 0.0) {
                bail!(
                    "mixture source `{}`: weight {} must be a positive number (remove the source to leave it out)",
                    s.name,
                    s.weight
                );
            }
        }
        if let Some(f) = settings.held_out_fraction {
            if !(0.0..1.0).contains(&f) {
                bail!("mixture.held_out.fraction {f} must be in [0, 1)");
            }
        }
        let n_sources = sources.len();
        let mut names = Vec::with_capacity(n_sources);
        let mut weights = Vec::with_capacity(n_sources);
        let mut pools = Vec::with_capacity(n_sources);
        let mut rows_in = Vec::with_capacity(n_sources);
        for s in sources {
            names.push(s.name);
            weights.push(s.weight);
            rows_in.push(s.examples.len());
            pools.push(s.examples);
        }

        // Filters see all sources in order.
        let mut filtered_out = vec![0; n_sources];
        let filter_report = match filters {
            None => None,
            Some(f) => {
                let mut report = f.new_report();
                for (i, pool) in pools.iter_mut().enumerate() {
                    report.input += pool.len();
                    let mut kept = Vec::with_capacity(pool.len());
                    for ex in pool.drain(..) {
                        match f.check(&ex) {
                            None => kept.push(ex),
                            Some(r) => {
                                filtered_out[i] += 1;
                                report.record(r, &ex, f.keep_removed());
                            }
                        }
                    }
                    report.kept += kept.len();
                    *pool = kept;
                }
                Some(report)
            }
        };
        for (i, pool) in pools.iter().enumerate() {
            if pool.is_empty() {
                bail!(
                    "mixture source `{}` has no rows left after filtering ({} read, {} filtered out){}",
                    names[i],
                    rows_in[i],
                    filtered_out[i],
                    filter_report.as_ref().map(|r| format!("\n{r}")).unwrap_or_default()
                );
            }
        }

        // Held-out split.
        let mut held_out = Vec::new();
        let mut held_out_sources = Vec::new();
        let mut held_counts = vec![0; n_sources];
        let use_fraction = held_out_rows.is_none();
        if let Some(rows) = held_out_rows {
            held_out = rows;
        }
        let mut train = Vec::with_capacity(n_sources);
        for (i, pool) in pools.into_iter().enumerate() {
            let fraction = if use_fraction { settings.held_out_fraction.unwrap_or(0.0) } else { 0.0 };
            if fraction <= 0.0 {
                train.push(pool);
                continue;
            }
            let n = pool.len();
            if n < 2 {
                bail!("mixture source `{}` has {n} row; a held-out split needs at least 2", names[i]);
            }
            let k = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(name_seed(settings.seed, &names[i], SALT_SPLIT));
            order.shuffle(&mut rng);
            let mut is_held = vec![false; n];
            for &j in &order[..k] {
                is_held[j] = true;
            }
            let mut tr = Vec::with_capacity(n - k);
            // Keep file order within both parts.
            for (j, ex) in pool.into_iter().enumerate() {
                if is_held[j] {
                    held_out.push(ex);
                    held_out_sources.push(i);
                } else {
                    tr.push(ex);
                }
            }
            held_counts[i] = k;
            train.push(tr);
        }

        // Rows per epoch.
        let counts: Vec<usize> = match settings.total {
            None => train
                .iter()
                .zip(&weights)
                .map(|(t, w)| (w * t.len() as f64).round().max(1.0) as usize)
                .collect(),
            Some(total) => {
                if total == 0 {
                    bail!("mixture.total must be at least 1");
                }
                apportion(total, &weights)
            }
        };
        let per_epoch: usize = counts.iter().sum();
        let sources_report = (0..n_sources)
            .map(|i| SourceReport {
                name: names[i].clone(),
                weight: weights[i],
                rows: rows_in[i],
                skipped_bad_rows: 0,
                filtered_out: filtered_out[i],
                held_out: held_counts[i],
                train: train[i].len(),
                per_epoch: counts[i],
                share: counts[i] as f64 / per_epoch.max(1) as f64,
            })
            .collect();
        let report = MixtureReport {
            sources: sources_report,
            per_epoch,
            held_out: held_out.len(),
            skipped: Vec::new(),
            filters: filter_report,
            reads: Vec::new(),
        };
        Ok(Mixture { names, weights, train, counts, held_out, held_out_sources, seed: settings.seed, report })
    }

    /// The rows of one epoch, in training order (see the module docs).
    pub fn epoch(&self, epoch: u64) -> Vec<Draw> {
        let mut draws = Vec::with_capacity(self.counts.iter().sum());
        for (i, pool) in self.train.iter().enumerate() {
            let n = pool.len();
            let want = self.counts[i];
            let passes = want / n;
            let rest = want % n;
            for _ in 0..passes {
                draws.extend((0..n).map(|index| Draw { source: i, index }));
            }
            if rest > 0 {
                let mut rng = ChaCha8Rng::seed_from_u64(name_seed(
                    self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    &self.names[i],
                    SALT_SAMPLE,
                ));
                let picked = rand::seq::index::sample(&mut rng, n, rest);
                let mut picked: Vec<usize> = picked.into_iter().collect();
                picked.sort_unstable();
                draws.extend(picked.into_iter().map(|index| Draw { source: i, index }));
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(name_seed(self.seed, "", SALT_SHUFFLE ^ epoch));
        draws.shuffle(&mut rng);
        draws
    }

    /// The example a draw stands for.
    pub fn get(&self, draw: Draw) -> &Example {
        &self.train[draw.source][draw.index]
    }

    /// The examples of one epoch, in training order.
    pub fn epoch_examples(&self, epoch: u64) -> Vec<&Example> {
        self.epoch(epoch).into_iter().map(|d| self.get(d)).collect()
    }

    pub fn source_names(&self) -> &[String] {
        &self.names
    }

    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The training rows of source `i` (after filtering and the split).
    pub fn train_rows(&self, source: usize) -> &[Example] {
        &self.train[source]
    }

    /// Rows per epoch from each source.
    pub fn per_epoch(&self) -> &[usize] {
        &self.counts
    }

    /// The held-out rows: the held-out file's, or each source's held-out
    /// fraction in source order (file order within a source).
    pub fn held_out(&self) -> &[Example] {
        &self.held_out
    }

    /// The source of each held-out row when split by fraction (empty for a
    /// held-out file).
    pub fn held_out_sources(&self) -> &[usize] {
        &self.held_out_sources
    }

    pub fn report(&self) -> &MixtureReport {
        &self.report
    }
}

/// Split `total` in proportion to `weights` (largest remainder, ties to the
/// earlier source), so the parts add up to `total`.
pub fn apportion(total: usize, weights: &[f64]) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut left = total.saturating_sub(counts.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apportion_adds_up_and_follows_weights() {
        assert_eq!(apportion(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(apportion(100, &[3.0, 1.0]), vec![75, 25]);
        assert_eq!(apportion(7, &[0.5, 0.25, 0.25]).iter().sum::<usize>(), 7);
    }
}
