//! `align data …`: inspect, filter and mix datasets.
//!
//! - `inspect FILE`: the record kind, rows, columns, categories, skipped bad
//!   rows, one example as Gemma's formatter renders it with the trained spans
//!   between ⟦ and ⟧, and (with a tokenizer) token-length percentiles.
//! - `filter FILE --out FILE`: the `datasets` filters chosen by flags; kept
//!   rows are written in the format `--out`'s extension names, removed rows
//!   with their reasons to `--removed`.
//! - `mix CONFIG.toml`: a mixture section of a recipe loaded as a stage
//!   would load it; the per-source report, and optionally one epoch's rows in
//!   training order.
//!
//! The work is done by the `datasets` and `lm` crates; this module parses
//! flags into their configs and prints what they report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use datasets::record::CANONICAL_COLUMNS;
use datasets::{
    read_dataset, write_dataset, BadRow, DecontaminateConfig, ExactDedupConfig, Example, FilterConfig,
    FilterReport, Filters, Format, LengthConfig, LengthUnit, Mixture, MixtureConfig, NearDedupConfig,
    OnBadRow, Origin, PiiConfig, ReadOptions, Record, RecordKind, SelfIdConfig, TextScope,
};
use lm::chat::{self, Rendered};
use lm::fsio::same_file;
use lm::Tokenizer;
use serde_json::{json, Map, Value};

/// How many bad rows, reasons or unformattable rows are listed by name.
const LIST_FIRST: usize = 5;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Show what a data file holds: kind, rows, columns, categories, bad rows,
    /// a formatted example with the trained spans marked, token lengths.
    Inspect(InspectArgs),
    /// Remove rows by length, personal information, wrong
    /// self-identification, overlap with evaluation prompts and duplicates.
    Filter(FilterArgs),
    /// Load a data mixture from a TOML config and report what each source gives.
    Mix(MixArgs),
}

/// How a data file is read (shared by inspect and filter).
#[derive(Args)]
pub struct ReadArgs {
    /// The record kind wanted: conversational, prompt_completion, preference
    /// or prompt_only (detected from the columns when absent).
    #[arg(long, value_parser = parse_kind)]
    kind: Option<RecordKind>,
    /// Column renaming, CANONICAL=ACTUAL (e.g. prompt=question); repeatable.
    #[arg(long = "column", value_name = "CANONICAL=ACTUAL", value_parser = parse_column)]
    columns: Vec<(String, String)>,
    /// jsonl, json, parquet or csv (from the extension when absent).
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// What to do with a row that does not parse: fail, or skip it and list it.
    #[arg(long, value_enum, default_value_t = BadRowPolicy::Fail)]
    on_bad_row: BadRowPolicy,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BadRowPolicy {
    Fail,
    Skip,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A data file (JSONL, JSON, Parquet, CSV) or a directory of shards.
    file: PathBuf,
    #[command(flatten)]
    read: ReadArgs,
    /// A tokenizer.json: print token-length percentiles of the formatted rows.
    #[arg(long, conflicts_with = "model")]
    tokenizer: Option<PathBuf>,
    /// A model directory whose tokenizer.json gives the token lengths.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Which usable row to show formatted (1 = the first).
    #[arg(long, default_value_t = 1)]
    example: usize,
    /// Show the example in full (otherwise its first 2000 characters).
    #[arg(long)]
    full: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct FilterArgs {
    /// A data file (JSONL, JSON, Parquet, CSV) or a directory of shards.
    file: PathBuf,
    /// Where the kept rows go; the extension picks the format (.jsonl, .json, .csv, .parquet).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    read: ReadArgs,
    /// Remove rows with fewer words than this (per formatted sequence).
    #[arg(long)]
    min_words: Option<usize>,
    /// Remove rows with more words than this (per formatted sequence).
    #[arg(long)]
    max_words: Option<usize>,
    /// Remove rows with personal information (emails, phone, card and id numbers).
    #[arg(long)]
    pii: bool,
    /// Remove rows whose model turns claim to be another assistant (ChatGPT, Claude, …).
    #[arg(long)]
    self_id: bool,
    /// Another identity the model must not claim (with --self-id); repeatable.
    #[arg(long = "wrong-name", value_name = "NAME", requires = "self_id")]
    wrong_names: Vec<String>,
    /// Remove rows sharing a word n-gram with a prompt of this evaluation file; repeatable.
    #[arg(long, value_name = "EVALFILE")]
    decontaminate: Vec<PathBuf>,
    /// The n-gram length for --decontaminate (default 13 words).
    #[arg(long, requires = "decontaminate")]
    ngram: Option<usize>,
    /// Remove exact duplicates (normalised text), keeping the first.
    #[arg(long)]
    dedup: bool,
    /// Remove near duplicates (MinHash), keeping the first.
    #[arg(long)]
    near_dedup: bool,
    /// Estimated Jaccard similarity from which rows are near duplicates (default 0.8).
    #[arg(long, requires = "near_dedup")]
    near_threshold: Option<f64>,
    /// Write the removed rows, each with its filter and reason, here (JSONL).
    #[arg(long)]
    removed: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct MixArgs {
    /// A TOML file holding a mixture config (`sources = [...]`, `seed`, …).
    config: PathBuf,
    /// The table holding the mixture, dotted (e.g. `sft` or `sft.data`); the
    /// top level when absent. A table without `sources` but with a `data`
    /// table uses that.
    #[arg(long)]
    section: Option<String>,
    /// Write one epoch's rows, in training order, here (.jsonl, .json, .csv, .parquet).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The epoch written to --out (0 = the first, as the stages count).
    #[arg(long, default_value_t = 0, requires = "out")]
    epoch: u64,
    /// Write the held-out rows here.
    #[arg(long, value_name = "FILE")]
    held_out: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Inspect(a) => inspect(&a),
        DataCommand::Filter(a) => filter(&a),
        DataCommand::Mix(a) => mix(&a),
    }
}

// ---------------------------------------------------------------- arguments

fn parse_kind(s: &str) -> Result<RecordKind, String> {
    let name = s.trim().to_ascii_lowercase().replace('-', "_");
    serde_json::from_value(Value::String(name)).map_err(|_| {
        format!("unknown record kind {s:?}; expected conversational, prompt_completion, preference or prompt_only")
    })
}

fn parse_format(s: &str) -> Result<Format, String> {
    serde_json::from_value(Value::String(s.trim().to_ascii_lowercase()))
        .map_err(|_| format!("unknown format {s:?}; expected jsonl, json, parquet or csv"))
}

fn parse_column(s: &str) -> Result<(String, String), String> {
    let Some((canonical, actual)) = s.split_once('=') else {
        return Err(format!("{s:?} is not CANONICAL=ACTUAL (e.g. prompt=question)"));
    };
    let (canonical, actual) = (canonical.trim(), actual.trim());
    if !CANONICAL_COLUMNS.contains(&canonical) {
        return Err(format!(
            "`{canonical}` is not a column the readers know; the left side is one of [{}]",
            CANONICAL_COLUMNS.join(", ")
        ));
    }
    if actual.is_empty() {
        return Err(format!("{s:?} names no file column after `=`"));
    }
    Ok((canonical.to_string(), actual.to_string()))
}

impl ReadArgs {
    fn options(&self) -> Result<ReadOptions> {
        let mut columns = BTreeMap::new();
        for (canonical, actual) in &self.columns {
            if let Some(prev) = columns.insert(canonical.clone(), actual.clone()) {
                bail!(
                    "--column: `{canonical}` is renamed twice (to `{prev}` and `{actual}`); give each canonical column once"
                );
            }
        }
        let on_bad_row = match self.on_bad_row {
            BadRowPolicy::Fail => OnBadRow::Fail,
            BadRowPolicy::Skip => OnBadRow::Skip,
        };
        Ok(ReadOptions { kind: self.kind, format: self.format, columns, on_bad_row })
    }

    /// Read the dataset; a bad-row failure says how to skip such rows instead.
    fn read(&self, path: &Path) -> Result<datasets::Dataset> {
        let opts = self.options()?;
        read_dataset(path, &opts).map_err(|e| match e.downcast_ref::<datasets::BadRowError>() {
            // The reader's message names the recipe key; here it is a flag.
            Some(b) => anyhow::anyhow!(
                "{}\n(fix the row, or pass --on-bad-row skip to skip such rows and list them)",
                b.0
            ),
            None => e,
        })
    }
}

/// "FILE line N" for JSONL, "FILE row N" otherwise.
fn place(origin: &Origin, format: Option<Format>) -> String {
    let unit = match format.or_else(|| Format::from_path(&origin.file)) {
        Some(Format::Jsonl) => "line",
        _ => "row",
    };
    format!("{} {unit} {}", origin.file.display(), origin.row)
}

/// The output format of `path`, checked before any work is done.
fn output_format(path: &Path, flag: &str) -> Result<Format> {
    Format::from_path(path).ok_or_else(|| {
        anyhow!(
            "{flag} {}: cannot tell the format from the extension; use .jsonl, .json, .csv or .parquet",
            path.display()
        )
    })
}

/// Print to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}

fn emit_json(v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).context("cannot print the JSON report")?;
    emit(&format!("{text}\n"))
}

fn bad_rows_json(rows: &[BadRow]) -> Value {
    json!({
        "count": rows.len(),
        "first": rows.iter().take(LIST_FIRST).map(|b| b.to_string()).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------- inspect

/// One formatted sequence of a row: a label (`chosen`, `rejected`, or empty),
/// the messages, and whether the generation prompt ends it.
struct Sequence {
    label: &'static str,
    messages: Vec<lm::Message>,
    generation_prompt: bool,
}

/// What a stage formats from a row: the dialogue (conversation,
/// prompt–completion), chosen and rejected (preference), or the prompt with
/// the generation prompt (prompt only).
fn sequences(record: &Record) -> Vec<Sequence> {
    match record {
        Record::Conversation { .. } | Record::PromptCompletion { .. } => {
            vec![Sequence { label: "", messages: record.messages(), generation_prompt: false }]
        }
        Record::Preference { .. } => vec![
            Sequence {
                label: "chosen",
                messages: record.chosen_messages().unwrap_or_default(),
                generation_prompt: false,
            },
            Sequence {
                label: "rejected",
                messages: record.rejected_messages().unwrap_or_default(),
                generation_prompt: false,
            },
        ],
        Record::PromptOnly { prompt } => {
            vec![Sequence { label: "prompt", messages: prompt.clone(), generation_prompt: true }]
        }
    }
}

/// The rendered text with ⟦ and ⟧ around each trained span.
fn mark_trained(r: &Rendered) -> Result<String> {
    let mut out = String::with_capacity(r.text.len() + 8 * r.trained.len());
    let mut at = 0;
    for span in &r.trained {
        let (Some(before), Some(inside)) = (r.text.get(at..span.start), r.text.get(span.clone())) else {
            bail!("internal error: trained span {span:?} does not fit the rendered text");
        };
        out.push_str(before);
        out.push('⟦');
        out.push_str(inside);
        out.push('⟧');
        at = span.end;
    }
    out.push_str(r.text.get(at..).unwrap_or_default());
    Ok(out)
}

/// Characters of an example `data inspect` shows without `--full`.
const EXAMPLE_MAX_CHARS: usize = 2000;

/// `text` cut to its first `max` characters, with a note of how many more
/// there are.
fn clip_example(text: String, max: usize) -> String {
    let total = text.chars().count();
    match text.char_indices().nth(max) {
        Some((cut, _)) => {
            format!("{}\n… ({} more characters not shown; --full shows all)", &text[..cut], total - max)
        }
        None => text,
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied().unwrap_or(0)
}

struct Stats {
    p50: usize,
    p90: usize,
    p99: usize,
    max: usize,
    mean: f64,
}

impl Stats {
    fn of(mut values: Vec<usize>) -> Stats {
        values.sort_unstable();
        let mean =
            if values.is_empty() { 0.0 } else { values.iter().sum::<usize>() as f64 / values.len() as f64 };
        Stats {
            p50: percentile(&values, 50.0),
            p90: percentile(&values, 90.0),
            p99: percentile(&values, 99.0),
            max: values.last().copied().unwrap_or(0),
            mean,
        }
    }

    fn json(&self) -> Value {
        json!({"p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max, "mean": self.mean})
    }

    fn line(&self) -> String {
        format!(
            "p50 {}  p90 {}  p99 {}  max {}  (mean {:.1})",
            self.p50, self.p90, self.p99, self.max, self.mean
        )
    }
}

fn inspect(a: &InspectArgs) -> Result<()> {
    let tokenizer_path = match (&a.tokenizer, &a.model) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(m)) => Some(m.join("tokenizer.json")),
        (None, None) => None,
    };
    // Load the tokenizer first: a wrong path should not wait for a big read.
    let tokenizer = match &tokenizer_path {
        Some(p) => Some(Tokenizer::from_file(p).with_context(|| match &a.model {
            Some(m) => format!("--model {}: cannot load its tokenizer", m.display()),
            None => format!("--tokenizer {}", p.display()),
        })?),
        None => None,
    };
    if a.example == 0 {
        bail!("--example counts from 1 (the first usable row)");
    }
    let data = a.read.read(&a.file)?;
    let report = &data.report;
    let skip = a.read.on_bad_row == BadRowPolicy::Skip;

    // Format every row: a row the formatter rejects would stop a stage.
    let mut unformattable: Vec<String> = Vec::new();
    let mut lengths = Vec::new();
    let mut trained = Vec::new();
    for ex in &data.examples {
        for seq in sequences(&ex.record) {
            let res = match &tokenizer {
                Some(tok) => chat::encode(tok, &seq.messages, seq.generation_prompt).map(|e| {
                    lengths.push(e.ids.len());
                    trained.push(e.loss_mask.iter().filter(|&&m| m).count());
                }),
                None => chat::render(&seq.messages, seq.generation_prompt).map(|_| ()),
            };
            if let Err(e) = res {
                let what = if seq.label.is_empty() { String::new() } else { format!(" ({})", seq.label) };
                let msg = format!("{}{what}: cannot be formatted: {e:#}", place(&ex.origin, a.read.format));
                if !skip {
                    bail!("{msg}\n(fix the row, or pass --on-bad-row skip to list such rows instead)");
                }
                unformattable.push(msg);
            }
        }
    }

    let Some(ex) = data.examples.get(a.example - 1) else {
        bail!("--example {}: {} has only {} usable rows", a.example, a.file.display(), data.examples.len());
    };
    let mut shown = Vec::new();
    for seq in sequences(&ex.record) {
        let rendered = match &tokenizer {
            Some(tok) => chat::render_for(tok, &seq.messages, seq.generation_prompt),
            None => chat::render(&seq.messages, seq.generation_prompt),
        };
        let text = match rendered {
            Ok(r) => Ok(clip_example(mark_trained(&r)?, if a.full { usize::MAX } else { EXAMPLE_MAX_CHARS })),
            Err(e) => Err(format!("{e:#}")),
        };
        shown.push((seq.label, text));
    }

    let canonical: Vec<&String> =
        report.columns.iter().filter(|c| CANONICAL_COLUMNS.contains(&c.as_str())).collect();
    let ignored: Vec<&String> =
        report.columns.iter().filter(|c| !CANONICAL_COLUMNS.contains(&c.as_str())).collect();
    let mut categories: BTreeMap<&str, usize> = BTreeMap::new();
    let mut uncategorised = 0;
    for e in &data.examples {
        match &e.category {
            Some(c) => *categories.entry(c.as_str()).or_default() += 1,
            None => uncategorised += 1,
        }
    }
    let length_stats = tokenizer.as_ref().map(|_| (Stats::of(lengths.clone()), Stats::of(trained.clone())));

    if a.json {
        let example = json!({
            "index": a.example,
            "file": ex.origin.file.display().to_string(),
            "row": ex.origin.row,
            "category": ex.category,
            "sequences": shown.iter().map(|(label, text)| match text {
                Ok(t) => json!({"label": label, "text": t}),
                Err(e) => json!({"label": label, "error": e}),
            }).collect::<Vec<_>>(),
        });
        let tokens = match (&length_stats, &tokenizer_path) {
            (Some((len, tr)), Some(p)) => json!({
                "tokenizer": p.display().to_string(),
                "sequences": lengths.len(),
                "length": len.json(),
                "trained": tr.json(),
            }),
            _ => Value::Null,
        };
        let out = json!({
            "files": report.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "kind": report.kind,
            "detected": report.detected,
            "rows": report.rows,
            "usable": report.kept,
            "columns": canonical,
            "ignored_columns": ignored,
            "categories": if categories.is_empty() { Value::Null } else { json!(categories) },
            "uncategorised": uncategorised,
            "bad_rows": bad_rows_json(&report.skipped),
            "unformattable": {
                "count": unformattable.len(),
                "first": unformattable.iter().take(LIST_FIRST).collect::<Vec<_>>(),
            },
            "example": example,
            "tokens": tokens,
        });
        return emit_json(&out);
    }

    let mut s = String::new();
    let files = match report.files.as_slice() {
        [one] => one.display().to_string(),
        many => format!("{} ({} files)", a.file.display(), many.len()),
    };
    let _ = writeln!(s, "file        {files}");
    let _ = write!(s, "kind        {}", report.kind);
    if report.detected != report.kind {
        let _ = write!(s, " (converted from {})", report.detected);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "rows        {} ({} usable, {} skipped as bad)",
        report.rows,
        report.kept,
        report.skipped.len()
    );
    let join = |v: &[&String]| v.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ");
    let _ = writeln!(s, "columns     {}", join(&canonical));
    if !ignored.is_empty() {
        let _ = writeln!(s, "ignored     {}  (no record field reads them)", join(&ignored));
    }
    if !categories.is_empty() {
        let mut line = categories.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ");
        if uncategorised > 0 {
            let _ = write!(line, ", (none) {uncategorised}");
        }
        let _ = writeln!(s, "categories  {line}");
    }
    if !report.skipped.is_empty() {
        let _ = writeln!(s, "bad rows skipped: {}", report.skipped.len());
        for b in report.skipped.iter().take(LIST_FIRST) {
            let _ = writeln!(s, "  {b}");
        }
        if report.skipped.len() > LIST_FIRST {
            let _ = writeln!(s, "  … and {} more", report.skipped.len() - LIST_FIRST);
        }
    }
    if !unformattable.is_empty() {
        let _ = writeln!(s, "rows the formatter rejects: {}", unformattable.len());
        for u in unformattable.iter().take(LIST_FIRST) {
            let _ = writeln!(s, "  {u}");
        }
    }
    let category = ex.category.as_deref().map(|c| format!(", category {c}")).unwrap_or_default();
    let _ = writeln!(
        s,
        "\nexample {} ({}{category}), trained spans between ⟦ and ⟧:",
        a.example,
        place(&ex.origin, a.read.format)
    );
    for (label, text) in &shown {
        if !label.is_empty() {
            let _ = writeln!(s, "--- {label} ---");
        }
        match text {
            Ok(t) => {
                s.push_str(t);
                if !t.ends_with('\n') {
                    s.push('\n');
                }
            }
            Err(e) => {
                let _ = writeln!(s, "(cannot be formatted: {e})");
            }
        }
    }
    if let (Some((len, tr)), Some(p)) = (&length_stats, &tokenizer_path) {
        let _ = writeln!(
            s,
            "\ntoken lengths ({} formatted sequences, tokenizer {}):",
            lengths.len(),
            p.display()
        );
        let _ = writeln!(s, "  total     {}", len.line());
        let _ = writeln!(s, "  trained   {}", tr.line());
    }
    emit(&s)
}

// ---------------------------------------------------------------- filter

fn filter_config(a: &FilterArgs) -> Result<FilterConfig> {
    let length = match (a.min_words, a.max_words) {
        (None, None) => None,
        (min, max) => {
            if let (Some(lo), Some(hi)) = (min, max) {
                if lo > hi {
                    bail!("--min-words {lo} is larger than --max-words {hi}; no row could pass");
                }
            }
            Some(LengthConfig { unit: LengthUnit::Words, min, max, scope: TextScope::All })
        }
    };
    let decontaminate = if a.decontaminate.is_empty() {
        None
    } else {
        let defaults = DecontaminateConfig::default();
        let n = a.ngram.unwrap_or(defaults.n);
        if n == 0 {
            bail!("--ngram must be at least 1 (words per n-gram)");
        }
        Some(DecontaminateConfig {
            against: a.decontaminate.clone(),
            n,
            min_words: defaults.min_words.min(n),
            ..defaults
        })
    };
    let near_dedup = if a.near_dedup {
        let defaults = NearDedupConfig::default();
        let threshold = a.near_threshold.unwrap_or(defaults.threshold);
        if !(threshold > 0.0 && threshold <= 1.0) {
            bail!("--near-threshold {threshold} must be in (0, 1] (an estimated Jaccard similarity)");
        }
        Some(NearDedupConfig { threshold, ..defaults })
    } else {
        None
    };
    let config = FilterConfig {
        length,
        pii: a.pii.then(PiiConfig::default),
        self_identification: a
            .self_id
            .then(|| SelfIdConfig { extra_names: a.wrong_names.clone(), ..SelfIdConfig::default() }),
        decontaminate,
        exact_dedup: a.dedup.then(ExactDedupConfig::default),
        near_dedup,
        keep_removed: true,
    };
    if config.length.is_none()
        && config.pii.is_none()
        && config.self_identification.is_none()
        && config.decontaminate.is_none()
        && config.exact_dedup.is_none()
        && config.near_dedup.is_none()
    {
        bail!(
            "no filter chosen; pass at least one of --min-words, --max-words, --pii, --self-id, \
             --decontaminate EVALFILE, --dedup, --near-dedup"
        );
    }
    Ok(config)
}

fn filter_report_json(report: &FilterReport) -> Value {
    let by: Map<String, Value> =
        report.removed_by.iter().map(|(name, n)| (name.to_string(), Value::from(*n))).collect();
    json!({"input": report.input, "kept": report.kept, "removed": report.total_removed(), "removed_by": by})
}

fn filter(a: &FilterArgs) -> Result<()> {
    let config = filter_config(a)?;
    output_format(&a.out, "--out")?;
    if let Some(r) = &a.removed {
        if same_file(r, &a.out) {
            bail!(
                "--removed and --out are the same file ({}); give the removed rows their own file",
                r.display()
            );
        }
    }
    lm::fsio::refuse_overwriting_input(&a.out, "--out", &a.file, "FILE")?;
    if let Some(r) = &a.removed {
        lm::fsio::refuse_overwriting_input(r, "--removed", &a.file, "FILE")?;
    }
    // Evaluation files are named on the command line: relative to the
    // working directory.
    let mut filters = Filters::new(&config, Path::new("")).context("cannot set up the filters")?;
    let data = a.read.read(&a.file)?;
    let read_report = data.report.clone();
    let mut report = filters.new_report();
    report.input = data.examples.len();
    let mut kept: Vec<Example> = Vec::with_capacity(data.examples.len());
    for ex in data.examples {
        match filters.check(&ex) {
            None => kept.push(ex),
            Some(r) => report.record(r, &ex, true),
        }
    }
    report.kept = kept.len();

    if let Some(path) = &a.removed {
        report.write_removed(path).context("--removed")?;
    }
    if kept.is_empty() {
        bail!(
            "the filters removed every row of {} ({}); nothing was written to {}; loosen the filters or check the data",
            a.file.display(),
            report.removed_by.iter().map(|(n, c)| format!("{n}: {c}")).collect::<Vec<_>>().join(", "),
            a.out.display()
        );
    }
    write_dataset(&a.out, &kept, None).context("--out")?;

    if a.json {
        let mut reasons: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for r in &report.removed {
            let list = reasons.entry(r.filter).or_default();
            if list.len() < LIST_FIRST {
                list.push(format!("{}: {}", place(&r.example.origin, a.read.format), r.reason));
            }
        }
        let mut out = filter_report_json(&report);
        if let Value::Object(o) = &mut out {
            o.insert("rows".into(), json!(read_report.rows));
            o.insert("bad_rows".into(), bad_rows_json(&read_report.skipped));
            o.insert("first_reasons".into(), json!(reasons));
            o.insert("out".into(), json!(a.out.display().to_string()));
            o.insert("removed_file".into(), json!(a.removed.as_ref().map(|p| p.display().to_string())));
        }
        return emit_json(&out);
    }

    let mut s = String::new();
    let _ = writeln!(s, "read {read_report}");
    let _ = writeln!(
        s,
        "filters: {} rows in, {} kept, {} removed",
        report.input,
        report.kept,
        report.total_removed()
    );
    for (name, n) in &report.removed_by {
        let _ = writeln!(s, "  {name:<20} {n:>8} removed");
        let why: Vec<_> = report.removed.iter().filter(|r| r.filter == *name).collect();
        for r in why.iter().take(LIST_FIRST) {
            let _ = writeln!(s, "      {}: {}", place(&r.example.origin, a.read.format), r.reason);
        }
        if why.len() > LIST_FIRST {
            let _ = writeln!(s, "      … and {} more", why.len() - LIST_FIRST);
        }
    }
    let _ = writeln!(s, "wrote {} rows to {}", kept.len(), a.out.display());
    if let Some(p) = &a.removed {
        let _ =
            writeln!(s, "wrote {} removed rows with their reasons to {}", report.removed.len(), p.display());
    }
    emit(&s)
}

// ---------------------------------------------------------------- mix

/// The tables of a TOML value, for error messages.
fn table_names(v: &toml::Value) -> String {
    match v.as_table() {
        Some(t) => {
            let names: Vec<&str> = t.iter().filter(|(_, v)| v.is_table()).map(|(k, _)| k.as_str()).collect();
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        }
        None => "none".to_string(),
    }
}

/// The mixture config at `section` of a TOML document, and the section's
/// name as resolved (`data` appended when it was used).
fn mixture_section(doc: toml::Table, section: Option<&str>, file: &Path) -> Result<(MixtureConfig, String)> {
    let mut value = toml::Value::Table(doc);
    let mut path: Vec<&str> = Vec::new();
    if let Some(section) = section {
        for key in section.split('.') {
            if key.is_empty() {
                bail!("--section {section:?}: empty key; write table names joined by dots, e.g. sft.data");
            }
            let here =
                if path.is_empty() { "the top level".to_string() } else { format!("[{}]", path.join(".")) };
            let next = match value.as_table().and_then(|t| t.get(key)) {
                Some(v) if v.is_table() => v.clone(),
                Some(_) => bail!("{}: `{key}` in {here} is not a table", file.display()),
                None => bail!(
                    "{}: no table `{key}` in {here}; its tables are: {}",
                    file.display(),
                    table_names(&value)
                ),
            };
            value = next;
            path.push(key);
        }
    }
    let holds_sources = value.as_table().is_some_and(|t| t.contains_key("sources"));
    if !holds_sources {
        if let Some(data) = value.as_table().and_then(|t| t.get("data")).filter(|d| d.is_table()) {
            value = data.clone();
            path.push("data");
        }
    }
    let name = if path.is_empty() { "the top level".to_string() } else { format!("[{}]", path.join(".")) };
    if !value.as_table().is_some_and(|t| t.contains_key("sources")) {
        bail!(
            "{}: {name} holds no mixture (no `sources` list); pick the table with --section (tables here: {})",
            file.display(),
            table_names(&value)
        );
    }
    let cfg: MixtureConfig = value
        .try_into()
        .map_err(|e| anyhow!("{}: {name} is not a valid mixture config: {e}", file.display()))?;
    Ok((cfg, name))
}

fn mix(a: &MixArgs) -> Result<()> {
    if let Some(out) = &a.out {
        output_format(out, "--out")?;
    }
    if let Some(held) = &a.held_out {
        output_format(held, "--held-out")?;
    }
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read the mixture config {}", a.config.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", a.config.display()))?;
    let (cfg, name) = mixture_section(doc, a.section.as_deref(), &a.config)?;
    let base_dir = a.config.parent().unwrap_or(Path::new(""));
    // Neither output may be one of the mixture's files (nor its config).
    for (out, flag) in [(&a.out, "--out"), (&a.held_out, "--held-out")] {
        let Some(out) = out else { continue };
        lm::fsio::refuse_overwriting_input(out, flag, &a.config, "CONFIG")?;
        for src in &cfg.sources {
            let input = base_dir.join(&src.path);
            lm::fsio::refuse_overwriting_input(out, flag, &input, &format!("source {:?}", src.name))?;
            if input.is_dir() && lm::fsio::canonical(out).starts_with(lm::fsio::canonical(&input)) {
                bail!(
                    "{flag} {} is inside the directory of source {:?} ({}); it would become part of it. Write elsewhere",
                    out.display(),
                    src.name,
                    input.display()
                );
            }
        }
        if let Some(held) = cfg.held_out.as_ref().and_then(|h| h.path.as_ref()) {
            lm::fsio::refuse_overwriting_input(out, flag, &base_dir.join(held), "held_out.path")?;
        }
    }
    if let (Some(o), Some(h)) = (&a.out, &a.held_out) {
        if same_file(o, h) {
            bail!("--out and --held-out are the same file ({}); give each its own", o.display());
        }
    }
    let mixture = Mixture::load(&cfg, base_dir)
        .with_context(|| format!("cannot load the mixture in {name} of {}", a.config.display()))?;
    let report = mixture.report();

    let mut written = None;
    if let Some(out) = &a.out {
        let rows: Vec<Example> = mixture.epoch_examples(a.epoch).into_iter().cloned().collect();
        write_dataset(out, &rows, None).context("--out")?;
        written = Some(rows.len());
    }
    if let Some(held) = &a.held_out {
        if mixture.held_out().is_empty() {
            bail!(
                "--held-out {}: the mixture has no held-out rows; set held_out.fraction or held_out.path in {name}",
                held.display()
            );
        }
        write_dataset(held, mixture.held_out(), None).context("--held-out")?;
    }

    if a.json {
        let out = json!({
            "config": a.config.display().to_string(),
            "section": name,
            "seed": cfg.seed,
            "sources": report.sources,
            "per_epoch": report.per_epoch,
            "held_out": report.held_out,
            "bad_rows": bad_rows_json(&report.skipped),
            "filters": report.filters.as_ref().map(filter_report_json),
            "epoch": written.map(|n| json!({
                "epoch": a.epoch,
                "rows": n,
                "file": a.out.as_ref().map(|p| p.display().to_string()),
            })),
        });
        return emit_json(&out);
    }
    let mut s = format!("mixture {name} of {} (seed {})\n{report}\n", a.config.display(), cfg.seed);
    if let (Some(n), Some(out)) = (written, &a.out) {
        let _ = writeln!(s, "wrote epoch {} ({n} rows, in training order) to {}", a.epoch, out.display());
    }
    if let Some(held) = &a.held_out {
        let _ = writeln!(s, "wrote {} held-out rows to {}", mixture.held_out().len(), held.display());
    }
    emit(&s)
}
