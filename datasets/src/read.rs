//! Readers: JSONL, JSON, Parquet and CSV files, or directories of shards,
//! into typed [`Example`]s, with column remapping and a bad-row policy.
//!
//! JSONL and JSON are parsed with serde_json (so a bad line is reported by
//! its line number and the rest of the file still reads); Parquet and CSV go
//! through polars and are then handled row by row the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::record::{
    describe, detect_kind, parse_row, Example, FieldError, Origin, RecordKind, CANONICAL_COLUMNS,
};

/// A file format, normally detected from the extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line (`.jsonl`, `.ndjson`).
    Jsonl,
    /// A JSON array of objects, or an object holding one such array, or an
    /// object of equally long column arrays (`.json`).
    Json,
    /// Apache Parquet (`.parquet`, `.pq`).
    Parquet,
    /// Comma-separated values with a header row (`.csv`); message lists are
    /// JSON text in their cells.
    Csv,
}

impl Format {
    /// The format an extension names, if any.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "json" => Some(Format::Json),
            "parquet" | "pq" => Some(Format::Parquet),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Format::Jsonl => "line",
            _ => "row",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Jsonl => "jsonl",
            Format::Json => "json",
            Format::Parquet => "parquet",
            Format::Csv => "csv",
        })
    }
}

/// What to do with a row that does not parse as the expected record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Stop with an error naming the file, row, field and what was expected.
    #[default]
    Fail,
    /// Skip the row; it is counted and listed in the [`ReadReport`].
    Skip,
}

/// How to read a file or a directory of shards.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadOptions {
    /// The record kind wanted; detected from the columns when absent. A
    /// different kind is converted where possible (see [`crate::Record::convert`]).
    #[serde(default)]
    pub kind: Option<RecordKind>,
    /// The format; detected from the extension when absent.
    #[serde(default)]
    pub format: Option<Format>,
    /// Column renaming: canonical name (`prompt`, `chosen`, …) → the file's name.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    #[serde(default)]
    pub on_bad_row: OnBadRow,
}

/// A row that could not be read, with where and why.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRow {
    pub file: Arc<Path>,
    /// "line" for JSONL, "row" for the other formats.
    pub unit: &'static str,
    /// 1-based line or row number.
    pub number: usize,
    /// The field at fault (canonical name, or the file's name when remapped),
    /// `None` when the row as a whole is wrong.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}", self.file.display(), self.unit, self.number)?;
        match &self.field {
            Some(field) => write!(f, ", field `{field}`: {}", self.message),
            None => write!(f, ": {}", self.message),
        }
    }
}

/// The error for a bad row under `on_bad_row = "fail"`. Its message tells a
/// recipe's user how to skip such rows; a command line that spells the
/// setting as a flag can find it (`downcast_ref`) and say it its own way.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRowError(pub BadRow);

impl fmt::Display for BadRowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n(fix the row, or set on_bad_row = \"skip\" to skip such rows and list them in the report)",
            self.0
        )
    }
}

impl std::error::Error for BadRowError {}

/// What a read did: files, kind, rows seen and kept, and every skipped row.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadReport {
    pub files: Vec<PathBuf>,
    /// The kind the examples have (the wanted kind, or the detected one).
    pub kind: RecordKind,
    /// The kind detected from the columns (before any conversion).
    pub detected: RecordKind,
    pub rows: usize,
    pub kept: usize,
    pub skipped: Vec<BadRow>,
    /// The columns the files have, by their canonical names where renamed
    /// (union over shards).
    pub columns: BTreeSet<String>,
}

impl fmt::Display for ReadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files = match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!("{} files", many.len()),
        };
        write!(f, "{files}: {} rows, {} kept as {}", self.rows, self.kept, self.kind)?;
        if self.detected != self.kind {
            write!(f, " (converted from {})", self.detected)?;
        }
        if !self.skipped.is_empty() {
            write!(f, ", {} bad rows skipped:", self.skipped.len())?;
            for bad in self.skipped.iter().take(10) {
                write!(f, "\n  {bad}")?;
            }
            if self.skipped.len() > 10 {
                write!(f, "\n  … and {} more", self.skipped.len() - 10)?;
            }
        }
        Ok(())
    }
}

/// Examples read from one path, with the report of the read.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub report: ReadReport,
}

/// Resolves a data path against a recipe's directory; `builtin:` specs are
/// not paths and stay as they are.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.to_str().is_some_and(|s| s.starts_with("builtin:")) {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The built-in tasks (see [`crate::tasks`]), converted to the wanted kind.
fn read_builtin(spec: &str, opts: &ReadOptions) -> Result<Dataset> {
    let examples = crate::tasks::builtin_examples(spec)?;
    let detected = examples.first().map(|e| e.kind()).context("built-in data is empty")?;
    let kind = opts.kind.unwrap_or(detected);
    let examples = examples
        .into_iter()
        .map(|mut e| {
            e.record = e.record.convert(kind).map_err(|m| anyhow::anyhow!("{spec}: {m}"))?;
            Ok(e)
        })
        .collect::<Result<Vec<_>>>()?;
    let n = examples.len();
    Ok(Dataset {
        examples,
        report: ReadReport {
            files: vec![PathBuf::from(spec)],
            kind,
            detected,
            rows: n,
            kept: n,
            skipped: vec![],
            columns: BTreeSet::new(),
        },
    })
}

/// The files a path stands for: the file itself, or the files of a directory
/// (not recursive, hidden files ignored) in the given format or, without
/// one, in the one recognised format they share, sorted by name.
pub fn shard_files(path: &Path, format: Option<Format>) -> Result<Vec<(PathBuf, Format)>> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read dataset path {}", path.display()))?;
    if !meta.is_dir() {
        let fmt = match format.or_else(|| Format::from_path(path)) {
            Some(f) => f,
            None => bail!(
                "{}: unknown data format; use a .jsonl, .json, .parquet or .csv extension or set `format`",
                path.display()
            ),
        };
        return Ok(vec![(path.to_path_buf(), fmt)]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).with_context(|| format!("cannot list directory {}", path.display()))? {
        let entry = entry.with_context(|| format!("cannot list directory {}", path.display()))?;
        let p = entry.path();
        let hidden =
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') || n.starts_with('_'));
        if hidden || !p.is_file() {
            continue;
        }
        if let Some(f) = Format::from_path(&p) {
            if format.is_none_or(|want| want == f) {
                files.push((p, f));
            }
        }
    }
    files.sort();
    let formats: BTreeSet<Format> = files.iter().map(|(_, f)| *f).collect();
    if formats.len() > 1 {
        bail!(
            "{}: the directory mixes formats ({}); set `format` to pick one",
            path.display(),
            formats.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    if files.is_empty() {
        bail!(
            "{}: no data files in the directory (looked for {})",
            path.display(),
            match format {
                Some(f) => format!("the {f} format"),
                None => ".jsonl, .ndjson, .json, .parquet, .pq or .csv".to_string(),
            }
        );
    }
    Ok(files)
}

/// Read a file or directory of shards into examples.
///
/// The kind is detected per file from its columns (after renaming) and must
/// agree across shards. Bad rows fail the read or are skipped and reported,
/// per `opts.on_bad_row`. A read that keeps no example is an error.
pub fn read_dataset(path: &Path, opts: &ReadOptions) -> Result<Dataset> {
    if let Some(spec) = path.to_str().filter(|p| p.starts_with("builtin:")) {
        return read_builtin(spec, opts);
    }
    let renames = Renames::new(&opts.columns)?;
    let files = shard_files(path, opts.format)?;
    let mut examples = Vec::new();
    let mut skipped = Vec::new();
    let mut rows_total = 0;
    let mut detected: Option<(RecordKind, PathBuf)> = None;
    let mut all_columns = BTreeSet::new();
    for (file, format) in &files {
        let raw = read_rows(file, *format, &renames)
            .with_context(|| format!("cannot read {} as {format}", file.display()))?;
        let file_arc: Arc<Path> = Arc::from(file.as_path());
        let columns = renames.columns(&raw.columns, file)?;
        all_columns.extend(columns.iter().cloned());
        let file_kind = detect_kind(&columns).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        match &detected {
            None => detected = Some((file_kind, file.clone())),
            Some((k, first)) if *k != file_kind && opts.kind.is_none() => bail!(
                "{} holds {file_kind} records but {} holds {k} records; shards must agree (or set `kind`)",
                file.display(),
                first.display()
            ),
            Some(_) => {}
        }
        let want = opts.kind.unwrap_or(file_kind);
        // Prompts may come from conversations without a model turn: parse
        // those as prompts directly rather than as conversations first.
        let parse_as = if want == RecordKind::PromptOnly && file_kind == RecordKind::Conversational {
            RecordKind::PromptOnly
        } else {
            file_kind
        };
        for (number, row) in raw.rows {
            rows_total += 1;
            let parsed = row.and_then(|r| {
                let r = renames.apply(r);
                let (record, category) = parse_row(&r, parse_as)?;
                let record = record.convert(want).map_err(|message| FieldError { field: None, message })?;
                Ok((record, category))
            });
            match parsed {
                Ok((record, category)) => examples.push(Example {
                    record,
                    category,
                    origin: Origin { file: file_arc.clone(), row: number },
                }),
                Err(e) => {
                    let bad = BadRow {
                        file: file_arc.clone(),
                        unit: format.unit(),
                        number,
                        field: e.field.map(|f| renames.file_name(&f)),
                        message: e.message,
                    };
                    match opts.on_bad_row {
                        OnBadRow::Fail => return Err(BadRowError(bad).into()),
                        OnBadRow::Skip => skipped.push(bad),
                    }
                }
            }
        }
    }
    let Some((detected, _)) = detected else {
        bail!("{}: no data files", path.display());
    };
    let kind = opts.kind.unwrap_or(detected);
    let report = ReadReport {
        files: files.into_iter().map(|(p, _)| p).collect(),
        kind,
        detected,
        rows: rows_total,
        kept: examples.len(),
        skipped,
        columns: all_columns,
    };
    if examples.is_empty() {
        bail!(
            "{} has no usable rows ({} rows, {} skipped as bad{}); an empty dataset cannot be used",
            path.display(),
            report.rows,
            report.skipped.len(),
            report.skipped.first().map(|b| format!(", the first: {b}")).unwrap_or_default()
        );
    }
    Ok(Dataset { examples, report })
}

/// Write examples as JSONL in canonical columns (see [`Example::to_json`]);
/// [`read_dataset`] reads the file back to the same records.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    use std::io::Write;
    let file = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for ex in examples {
        serde_json::to_writer(&mut w, &ex.to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.write_all(b"\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    w.flush().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Write examples in `format`, or the one `path`'s extension names: JSONL,
/// a JSON array, CSV or Parquet, in canonical columns (see
/// [`Example::to_json`]). In CSV and Parquet a message list is JSON text in
/// its cell and `margin` a number; [`read_dataset`] reads every format back
/// to the same records.
pub fn write_dataset(path: &Path, examples: &[Example], format: Option<Format>) -> Result<()> {
    let Some(format) = format.or_else(|| Format::from_path(path)) else {
        bail!(
            "{}: cannot tell the output format from the extension; use .jsonl, .json, .csv or .parquet",
            path.display()
        );
    };
    match format {
        Format::Jsonl => write_jsonl(path, examples),
        Format::Json => {
            let rows = Value::Array(examples.iter().map(Example::to_json).collect());
            let file = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            let mut w = std::io::BufWriter::new(file);
            serde_json::to_writer_pretty(&mut w, &rows)
                .with_context(|| format!("cannot write {}", path.display()))?;
            std::io::Write::flush(&mut w).with_context(|| format!("cannot write {}", path.display()))
        }
        Format::Csv | Format::Parquet => {
            use polars::prelude::{
                Column, CsvWriter, DataFrame, NamedFrom, ParquetWriter, SerWriter, Series,
            };
            let rows: Vec<Value> = examples.iter().map(Example::to_json).collect();
            let mut columns: Vec<Column> = Vec::new();
            for &name in CANONICAL_COLUMNS {
                if !rows.iter().any(|r| r.get(name).is_some()) {
                    continue;
                }
                let column: Column = if name == "margin" {
                    let cells: Vec<Option<f64>> =
                        rows.iter().map(|r| r.get(name).and_then(Value::as_f64)).collect();
                    Series::new(name.into(), cells).into()
                } else {
                    let cells: Vec<Option<String>> = rows
                        .iter()
                        .map(|r| match r.get(name) {
                            None | Some(Value::Null) => None,
                            Some(Value::String(s)) => Some(s.clone()),
                            Some(other) => Some(other.to_string()),
                        })
                        .collect();
                    Series::new(name.into(), cells).into()
                };
                columns.push(column);
            }
            let mut df = DataFrame::new_infer_height(columns)
                .with_context(|| format!("cannot build the table for {}", path.display()))?;
            let file = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            if format == Format::Csv {
                CsvWriter::new(file)
                    .include_header(true)
                    .finish(&mut df)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            } else {
                ParquetWriter::new(file)
                    .finish(&mut df)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// Column renaming, checked.
struct Renames {
    /// canonical → file name
    to_file: BTreeMap<String, String>,
    /// file name → canonical
    to_canonical: BTreeMap<String, String>,
}

impl Renames {
    fn new(map: &BTreeMap<String, String>) -> Result<Renames> {
        let mut to_canonical = BTreeMap::new();
        for (canonical, file_name) in map {
            if !CANONICAL_COLUMNS.contains(&canonical.as_str()) {
                bail!(
                    "columns: `{canonical}` is not a column name the readers know; the map goes \
                     from one of [{}] to the file's column name",
                    CANONICAL_COLUMNS.join(", ")
                );
            }
            if let Some(prev) = to_canonical.insert(file_name.clone(), canonical.clone()) {
                bail!(
                    "columns: the file column `{file_name}` is mapped twice (to `{prev}` and `{canonical}`)"
                );
            }
        }
        Ok(Renames { to_file: map.clone(), to_canonical })
    }

    /// The canonical column set of a file; every mapped column must exist.
    fn columns(&self, file_columns: &BTreeSet<String>, file: &Path) -> Result<BTreeSet<String>> {
        for (canonical, name) in &self.to_file {
            if !file_columns.contains(name) {
                bail!(
                    "{}: column `{name}` (mapped to `{canonical}`) is not in the file; its columns are [{}]",
                    file.display(),
                    file_columns.iter().cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
        Ok(file_columns.iter().filter_map(|c| self.canonical(c)).collect())
    }

    /// The canonical name of a file column; `None` for a canonical name that
    /// another column was mapped onto (it is shadowed).
    fn canonical(&self, file_column: &str) -> Option<String> {
        if let Some(c) = self.to_canonical.get(file_column) {
            return Some(c.clone());
        }
        if self.to_file.contains_key(file_column) {
            return None;
        }
        Some(file_column.to_string())
    }

    fn apply(&self, row: Map<String, Value>) -> Map<String, Value> {
        if self.to_file.is_empty() {
            return row;
        }
        row.into_iter().filter_map(|(k, v)| self.canonical(&k).map(|c| (c, v))).collect()
    }

    /// The file's name for a (possibly nested, `messages[2].role`) canonical field.
    fn file_name(&self, field: &str) -> String {
        let head_len = field.find(['[', '.']).unwrap_or(field.len());
        let (head, tail) = field.split_at(head_len);
        match self.to_file.get(head) {
            Some(name) => format!("{name}{tail}"),
            None => field.to_string(),
        }
    }
}

/// One row before typing: its 1-based number and the row, or why it is bad.
type RawRow = (usize, Result<Map<String, Value>, FieldError>);

/// Rows of one file before typing: (1-based number, row or why it is bad).
struct RawRows {
    columns: BTreeSet<String>,
    rows: Vec<RawRow>,
}

fn read_rows(path: &Path, format: Format, renames: &Renames) -> Result<RawRows> {
    // Only columns that feed a record are converted from polars' types.
    let wanted =
        |name: &str| renames.canonical(name).is_some_and(|c| CANONICAL_COLUMNS.contains(&c.as_str()));
    match format {
        Format::Jsonl => read_jsonl(path),
        Format::Json => read_json(path),
        Format::Parquet => {
            let file = fs::File::open(path)?;
            let df = polars_io_read::parquet(file)?;
            frame_rows(&df, &wanted)
        }
        Format::Csv => {
            let df = polars_io_read::csv(path)?;
            frame_rows(&df, &wanted)
        }
    }
}

/// Every row of a table file (JSONL, JSON, Parquet or CSV, by extension)
/// as a JSON object with all its columns, untyped: for reading back tables
/// such as those `align score` writes. CSV cells are text. A row that is
/// not an object is an error naming the file and row.
pub fn read_table(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let format = Format::from_path(path).with_context(|| {
        format!("{}: unknown table format; use a .jsonl, .json, .parquet or .csv extension", path.display())
    })?;
    let all = |_: &str| true;
    let raw = match format {
        Format::Jsonl => read_jsonl(path),
        Format::Json => read_json(path),
        Format::Parquet => fs::File::open(path)
            .map_err(anyhow::Error::from)
            .and_then(polars_io_read::parquet)
            .and_then(|df| frame_rows(&df, &all)),
        Format::Csv => polars_io_read::csv(path).and_then(|df| frame_rows(&df, &all)),
    }
    .with_context(|| format!("cannot read {}", path.display()))?;
    raw.rows
        .into_iter()
        .map(|(n, row)| {
            row.map_err(|e| {
                let field = e.field.map(|f| format!(", field `{f}`")).unwrap_or_default();
                anyhow::anyhow!("{}: {} {n}{field}: {}", path.display(), format.unit(), e.message)
            })
        })
        .collect()
}

fn row_error(message: impl Into<String>) -> FieldError {
    FieldError { field: None, message: message.into() }
}

fn read_jsonl(path: &Path) -> Result<RawRows> {
    let reader = BufReader::new(fs::File::open(path)?);
    let mut columns = BTreeSet::new();
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("line {}: cannot read (not UTF-8?)", i + 1))?;
        // A UTF-8 byte-order mark (editors on Windows write one) is not data.
        let line = if i == 0 { line.strip_prefix(BOM).map(str::to_string).unwrap_or(line) } else { line };
        if line.trim().is_empty() {
            continue;
        }
        let row = match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(o)) => {
                columns.extend(o.keys().cloned());
                Ok(o)
            }
            Ok(other) => Err(row_error(format!("expected a JSON object, found {}", describe(&other)))),
            Err(e) => Err(row_error(format!("expected a JSON object, but the line does not parse: {e}"))),
        };
        rows.push((i + 1, row));
    }
    Ok(RawRows { columns, rows })
}

/// The UTF-8 byte-order mark, skipped at the start of a JSON or JSONL file.
const BOM: &str = "\u{feff}";

fn read_json(path: &Path) -> Result<RawRows> {
    let text = fs::read_to_string(path).context("cannot read the file (not UTF-8?)")?;
    let top: Value = serde_json::from_str(text.strip_prefix(BOM).unwrap_or(&text)).context(
        "the file is not valid JSON (if it holds one object per line, name it .jsonl or set format = \"jsonl\")",
    )?;
    let items: Vec<Value> = match top {
        Value::Array(items) => items,
        Value::Object(obj) => object_rows(obj)?,
        other => {
            bail!("expected a JSON array of objects or an object holding one, found {}", describe(&other))
        }
    };
    let mut columns = BTreeSet::new();
    let rows = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let row = match item {
                Value::Object(o) => {
                    columns.extend(o.keys().cloned());
                    Ok(o)
                }
                other => Err(row_error(format!("expected a JSON object, found {}", describe(&other)))),
            };
            (i + 1, row)
        })
        .collect();
    Ok(RawRows { columns, rows })
}

/// The rows of a top-level JSON object: its one array field (`{"data": [...]}`),
/// or, when every field is an array of the same length, its columns zipped.
fn object_rows(obj: Map<String, Value>) -> Result<Vec<Value>> {
    let arrays: Vec<&String> = obj.iter().filter(|(_, v)| v.is_array()).map(|(k, _)| k).collect();
    let keys = || obj.keys().cloned().collect::<Vec<_>>().join(", ");
    if arrays.len() == 1 {
        let key = arrays[0].clone();
        let mut obj = obj;
        if let Some(Value::Array(items)) = obj.remove(&key) {
            if items.iter().all(Value::is_object) || obj.is_empty() {
                return Ok(items);
            }
        }
        bail!("expected the list `{key}` to hold objects (one per row)");
    }
    if !arrays.is_empty() && arrays.len() == obj.len() {
        let len = obj.values().filter_map(Value::as_array).map(Vec::len).max().unwrap_or(0);
        if obj.values().filter_map(Value::as_array).all(|a| a.len() == len) {
            let mut rows = vec![Map::new(); len];
            for (k, v) in obj {
                if let Value::Array(items) = v {
                    for (row, item) in rows.iter_mut().zip(items) {
                        row.insert(k.clone(), item);
                    }
                }
            }
            return Ok(rows.into_iter().map(Value::Object).collect());
        }
        bail!("the object's column lists [{}] have different lengths", keys());
    }
    bail!(
        "expected a JSON array of objects, an object holding one list of objects, or an object of \
         equally long column lists; found an object with keys [{}]",
        keys()
    )
}

mod polars_io_read {
    use std::path::Path;

    use anyhow::Result;
    use polars::prelude::*;

    pub fn parquet(file: std::fs::File) -> Result<DataFrame> {
        Ok(ParquetReader::new(file).finish()?)
    }

    /// Every column as text: types are the record parser's business. A
    /// row with more fields than the header is an error naming the row.
    pub fn csv(path: &Path) -> Result<DataFrame> {
        let read = CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(0))
            .try_into_reader_with_file_path(Some(path.to_path_buf()))?
            .finish();
        match read {
            Ok(df) => Ok(df),
            Err(e) => {
                let text = std::fs::read(path)?;
                match super::ragged_csv_row(&String::from_utf8_lossy(&text)) {
                    Some((row, fields, header)) => anyhow::bail!(
                        "row {row} has {fields} fields but the header has {header} (a comma in an unquoted cell?)"
                    ),
                    None => Err(e.into()),
                }
            }
        }
    }
}

/// The first data row (1-based) of a CSV text whose field count differs
/// from the header's, with both counts. Quoted fields may hold commas, quotes
/// (`""`) and line breaks.
fn ragged_csv_row(text: &str) -> Option<(usize, usize, usize)> {
    let text = text.strip_prefix(BOM).unwrap_or(text);
    let mut counts = Vec::new();
    let (mut fields, mut in_quotes, mut empty_record) = (1usize, false, true);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, in_quotes) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
            }
            ('"', _) => in_quotes = !in_quotes,
            (',', false) => fields += 1,
            ('\n', false) => {
                if !empty_record {
                    counts.push(fields);
                }
                (fields, empty_record) = (1, true);
                continue;
            }
            ('\r', false) => continue,
            _ => {}
        }
        empty_record = false;
    }
    if !empty_record {
        counts.push(fields);
    }
    let header = *counts.first()?;
    counts.iter().skip(1).position(|&n| n != header).map(|i| (i + 1, counts[i + 1], header))
}

fn frame_rows(df: &polars::prelude::DataFrame, wanted: &dyn Fn(&str) -> bool) -> Result<RawRows> {
    let df = {
        let mut d = df.clone();
        d.rechunk_mut();
        d
    };
    let columns: BTreeSet<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    let height = df.height();
    let mut rows: Vec<RawRow> = (0..height).map(|i| (i + 1, Ok(Map::new()))).collect();
    for col in df.columns() {
        let name = col.name().to_string();
        if !wanted(&name) {
            continue;
        }
        let series = col.as_materialized_series();
        for (i, (_, row)) in rows.iter_mut().enumerate() {
            let Ok(map) = row else { continue };
            let av = series.get(i).with_context(|| format!("column `{name}` row {}", i + 1))?;
            match any_to_json(&av) {
                Ok(v) => {
                    map.insert(name.clone(), v);
                }
                Err(msg) => *row = Err(FieldError { field: Some(name.clone()), message: msg }),
            }
        }
    }
    Ok(RawRows { columns, rows })
}

fn any_to_json(av: &polars::prelude::AnyValue<'_>) -> Result<Value, String> {
    use polars::prelude::AnyValue as A;
    Ok(match av {
        A::Null => Value::Null,
        A::Boolean(b) => Value::Bool(*b),
        A::String(s) => Value::String(s.to_string()),
        A::StringOwned(s) => Value::String(s.to_string()),
        A::UInt8(v) => Value::from(*v),
        A::UInt16(v) => Value::from(*v),
        A::UInt32(v) => Value::from(*v),
        A::UInt64(v) => Value::from(*v),
        A::Int8(v) => Value::from(*v),
        A::Int16(v) => Value::from(*v),
        A::Int32(v) => Value::from(*v),
        A::Int64(v) => Value::from(*v),
        A::Float32(v) => serde_json::Number::from_f64(f64::from(*v)).map_or(Value::Null, Value::Number),
        A::Float64(v) => serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
        A::Binary(b) => Value::String(
            std::str::from_utf8(b)
                .map_err(|_| "expected text, found binary data that is not UTF-8".to_string())?
                .to_string(),
        ),
        A::BinaryOwned(b) => Value::String(
            String::from_utf8(b.clone())
                .map_err(|_| "expected text, found binary data that is not UTF-8".to_string())?,
        ),
        A::List(s) => {
            let mut items = Vec::with_capacity(s.len());
            for j in 0..s.len() {
                let item = s.get(j).map_err(|e| e.to_string())?;
                items.push(any_to_json(&item)?);
            }
            Value::Array(items)
        }
        A::Struct(_, _, fields) => {
            let mut obj = Map::new();
            for (field, value) in fields.iter().zip(av._iter_struct_av()) {
                obj.insert(field.name().to_string(), any_to_json(&value)?);
            }
            Value::Object(obj)
        }
        A::StructOwned(payload) => {
            let (values, fields) = &**payload;
            let mut obj = Map::new();
            for (field, value) in fields.iter().zip(values) {
                obj.insert(field.name().to_string(), any_to_json(value)?);
            }
            Value::Object(obj)
        }
        other => {
            return Err(format!("expected text, a number or a list, found a value of type {}", other.dtype()))
        }
    })
}
