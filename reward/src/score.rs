//! Scoring with a trained reward model: in memory ([`Scorer`], [`score`])
//! for the CLI and later stages, and whole files ([`score_file`]) written
//! back as a table with reward columns (JSONL, CSV or Parquet by extension).

use crate::eval::{self, EvalReport};
use crate::model::RewardStats;
use anyhow::{bail, Context, Result};
use datasets::{Example, Format, ReadOptions, Record};
use lm::reward_score::{Conversation, RewardScorer};
use lm::Message;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// How a [`Scorer`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOptions {
    /// auto, cpu, cuda or cuda:N.
    pub device: String,
    /// f32 or bf16.
    pub dtype: String,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Longest sequence scored; longer ones lose their earliest prompt
    /// tokens. Default: the model's `max_position_embeddings`.
    pub max_seq_len: Option<usize>,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions { device: "auto".into(), dtype: "f32".into(), batch_size: 16, max_seq_len: None }
    }
}

/// The score of one record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scored {
    /// A prompt with one response (a prompt–completion row or a conversation,
    /// scored at its end).
    Response { reward: f64 },
    /// Both sides of a preference pair.
    Pair { chosen: f64, rejected: f64 },
}

/// A loaded reward model ready to score, with its statistics when the
/// directory has `reward_stats.json`: [`lm::reward_score::RewardScorer`]
/// (the one formatting, truncation and batching the RL reward and the
/// reward judge share, reached through `Deref`) plus the reading of
/// dataset records.
pub struct Scorer {
    pub inner: RewardScorer,
}

impl std::ops::Deref for Scorer {
    type Target = RewardScorer;
    fn deref(&self) -> &RewardScorer {
        &self.inner
    }
}

impl Scorer {
    /// Loads a reward model directory (one with `score.weight`; a causal LM
    /// is refused: it has no trained head).
    pub fn load(dir: &Path, opts: &ScoreOptions) -> Result<Self> {
        let device = lm::device::parse_device(&opts.device)?;
        let kind = lm::device::parse_dtype(&opts.dtype)?;
        Ok(Scorer { inner: RewardScorer::load(dir, device, kind, opts.batch_size, opts.max_seq_len)? })
    }

    /// `prompt` + `response` formatted and cut to `max_seq_len` on the
    /// prompt side; an error when the response alone is too long.
    pub fn format(&self, prompt: &[Message], response: &[Message]) -> Result<Vec<i64>> {
        Ok(self.inner.encode(&conversation(prompt, response))?.ids)
    }

    /// Rewards of (prompt, response) rows.
    pub fn score_responses(&self, rows: &[(Vec<Message>, Vec<Message>)]) -> Result<Vec<f64>> {
        let seqs: Vec<Vec<i64>> = rows
            .iter()
            .enumerate()
            .map(|(i, (p, r))| self.format(p, r).with_context(|| format!("row {i}")))
            .collect::<Result<_>>()?;
        self.inner.score_ids(&seqs.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    /// Scores records: a prompt–completion row or a conversation (at its
    /// end) gives one reward, a preference pair two (each side formatted and
    /// cut on its own, as any conversation). `where_` names record `i` in
    /// errors.
    fn score_with(
        &self,
        records: &[&Record],
        where_: &dyn Fn(usize) -> String,
    ) -> Result<(Vec<Scored>, usize)> {
        let mut seqs: Vec<Vec<i64>> = vec![];
        let mut slots = vec![];
        let mut truncated = 0;
        for (i, rec) in records.iter().enumerate() {
            let enc = |p: &[Message], r: &[Message], side: &str| {
                self.inner.encode(&conversation(p, r)).with_context(|| format!("{}{side}", where_(i)))
            };
            match rec {
                Record::Preference { prompt, chosen, rejected, .. } => {
                    let (c, r) = (enc(prompt, chosen, ", `chosen`")?, enc(prompt, rejected, ", `rejected`")?);
                    truncated += usize::from(c.truncated || r.truncated);
                    slots.push((seqs.len(), true));
                    seqs.push(c.ids);
                    seqs.push(r.ids);
                }
                Record::PromptCompletion { .. } | Record::Conversation { .. } => {
                    let all = rec.messages();
                    let (prompt, response) = datasets::record::split_last_response(&all);
                    if response.is_empty() {
                        bail!(
                            "{}: the conversation does not end with a model turn; nothing to score",
                            where_(i)
                        );
                    }
                    let e = enc(prompt, response, "")?;
                    truncated += usize::from(e.truncated);
                    slots.push((seqs.len(), false));
                    seqs.push(e.ids);
                }
                Record::PromptOnly { .. } => bail!(
                    "{}: a prompt without a response; scoring needs `completion`/`response`, `messages` \
                     ending with a model turn, or a preference pair (`chosen`, `rejected`)",
                    where_(i)
                ),
            }
        }
        let r = self.inner.score_ids(&seqs.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        let scored = slots
            .into_iter()
            .map(|(s, pair)| {
                if pair {
                    Scored::Pair { chosen: r[s], rejected: r[s + 1] }
                } else {
                    Scored::Response { reward: r[s] }
                }
            })
            .collect();
        Ok((scored, truncated))
    }

    /// Scores records (see [`Scored`]); errors name the record's index.
    pub fn score_records(&self, records: &[Record]) -> Result<Vec<Scored>> {
        let refs: Vec<&Record> = records.iter().collect();
        Ok(self.score_with(&refs, &|i| format!("record {i}"))?.0)
    }

    /// Scores examples read from files; errors name the file and row.
    /// Also returns how many were cut on the prompt side.
    pub fn score_examples(&self, examples: &[Example]) -> Result<(Vec<Scored>, usize)> {
        let refs: Vec<&Record> = examples.iter().map(|e| &e.record).collect();
        self.score_with(&refs, &|i| {
            format!("{} row {}", examples[i].origin.file.display(), examples[i].origin.row)
        })
    }
}

/// A dataset row's prompt and (closed) response turns as the shared path
/// scores them.
fn conversation<'a>(prompt: &'a [Message], response: &[Message]) -> Conversation<'a> {
    Conversation { prompt, response: response.to_vec(), closed: true }
}

/// Scores records with the reward model in `model_dir` (default
/// [`ScoreOptions`]): one reward per prompt/response row, two per
/// preference pair.
pub fn score(model_dir: &Path, records: &[Record]) -> Result<Vec<Scored>> {
    Scorer::load(model_dir, &ScoreOptions::default())?.score_records(records)
}

/// What scoring a file found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreReport {
    pub rows: usize,
    /// Prompt/response rows scored (one reward each).
    pub responses: usize,
    /// Preference pairs scored (two rewards each).
    pub pairs: usize,
    /// Rows whose prompt was cut to fit.
    pub truncated: usize,
    /// Over every reward.
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Accuracy, margins and per-category results of the pairs (when there are any).
    pub pair_eval: Option<EvalReport>,
    pub out: Option<PathBuf>,
}

/// Reads the rows to score. A bad row fails; the hint says so without the
/// readers' `on_bad_row`, which scoring does not have.
pub fn read_for_scoring(data: &Path) -> Result<datasets::Dataset> {
    datasets::read_dataset(data, &ReadOptions::default())
        .map_err(|e| match e.downcast_ref::<datasets::BadRowError>() {
            Some(b) => {
                anyhow::anyhow!("{}\n(fix the row: `align score` scores every row and skips none)", b.0)
            }
            None => e,
        })
        .with_context(|| format!("reading {} to score", data.display()))
}

/// Reads `data` (JSONL, JSON, Parquet or CSV; kind detected from the
/// columns) and scores every row. Returns the output table's rows (see
/// [`table_rows`]) and the report (its `out` unset).
pub fn score_table(scorer: &Scorer, data: &Path) -> Result<(Vec<Map<String, Value>>, ScoreReport)> {
    let ds = read_for_scoring(data)?;
    let (scored, truncated) = scorer.score_examples(&ds.examples)?;
    let rows = table_rows(&ds.examples, &scored);
    let mut all = vec![];
    let (mut labels, mut pair_rewards) = (vec![], vec![]);
    for (ex, s) in ds.examples.iter().zip(&scored) {
        match *s {
            Scored::Response { reward } => all.push(reward),
            Scored::Pair { chosen, rejected } => {
                all.extend([chosen, rejected]);
                let margin = match &ex.record {
                    Record::Preference { margin, .. } => margin.unwrap_or(0.0),
                    _ => 0.0,
                };
                labels.push((margin, ex.category.as_deref()));
                pair_rewards.push((chosen, rejected));
            }
        }
    }
    let stats = RewardStats::of(&all, "scored");
    let report = ScoreReport {
        rows: scored.len(),
        responses: scored.len() - pair_rewards.len(),
        pairs: pair_rewards.len(),
        truncated,
        reward_mean: stats.as_ref().map_or(f64::NAN, |s| s.mean),
        reward_std: stats.as_ref().map_or(f64::NAN, |s| s.std),
        pair_eval: (!pair_rewards.is_empty()).then(|| eval::report(&labels, &pair_rewards, 0.0)),
        out: None,
    };
    Ok((rows, report))
}

/// Scores the rows of `data` with the reward model in `model_dir` and, when
/// `out` is given, writes them back in canonical columns plus reward
/// columns: `reward` for prompt/response rows; `reward_chosen`,
/// `reward_rejected`, `reward_margin` (chosen − rejected) and `correct`
/// (chosen > rejected) for preference pairs. The format follows `out`'s
/// extension: `.jsonl`, `.csv` or `.parquet`.
pub fn score_file(
    model_dir: &Path,
    data: &Path,
    out: Option<&Path>,
    opts: &ScoreOptions,
) -> Result<ScoreReport> {
    // Check the output format, and that the output is not the input,
    // before the (slow) scoring.
    let out_format = out.map(output_format).transpose()?;
    if let Some(out) = out {
        lm::fsio::refuse_overwriting_input(out, "--out", data, "--data")?;
    }
    let scorer = Scorer::load(model_dir, opts)?;
    let (rows, mut report) = score_table(&scorer, data)?;
    if let (Some(path), Some(fmt)) = (out, out_format) {
        write_table(path, fmt, &rows)?;
        report.out = Some(path.to_path_buf());
    }
    Ok(report)
}

/// Output table formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    Jsonl,
    Csv,
    Parquet,
}

/// The table format an output path's extension names.
pub fn output_format(path: &Path) -> Result<TableFormat> {
    match Format::from_path(path) {
        Some(Format::Jsonl) => Ok(TableFormat::Jsonl),
        Some(Format::Csv) => Ok(TableFormat::Csv),
        Some(Format::Parquet) => Ok(TableFormat::Parquet),
        _ => bail!("{}: unknown output format; use a .jsonl, .csv or .parquet extension", path.display()),
    }
}

/// The output rows: each example in canonical columns plus its reward columns.
pub fn table_rows(examples: &[Example], scored: &[Scored]) -> Vec<Map<String, Value>> {
    examples
        .iter()
        .zip(scored)
        .map(|(ex, s)| {
            let mut row = match ex.to_json() {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            let num = |v: f64| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
            match *s {
                Scored::Response { reward } => {
                    row.insert("reward".into(), num(reward));
                }
                Scored::Pair { chosen, rejected } => {
                    row.insert("reward_chosen".into(), num(chosen));
                    row.insert("reward_rejected".into(), num(rejected));
                    row.insert("reward_margin".into(), num(chosen - rejected));
                    row.insert("correct".into(), Value::Bool(chosen > rejected));
                }
            }
            row
        })
        .collect()
}

/// Column order: the data columns as the rows have them, reward columns last.
fn column_names(rows: &[Map<String, Value>]) -> Vec<String> {
    const LAST: [&str; 5] = ["reward", "reward_chosen", "reward_rejected", "reward_margin", "correct"];
    let mut names: Vec<String> = vec![];
    for r in rows {
        for k in r.keys() {
            if !names.contains(k) && !LAST.contains(&k.as_str()) {
                names.push(k.clone());
            }
        }
    }
    names.extend(LAST.iter().filter(|c| rows.iter().any(|r| r.contains_key(**c))).map(|c| c.to_string()));
    names
}

/// Writes `rows` to `path` atomically in `fmt`. In CSV and Parquet a
/// column of numbers is numeric, of booleans boolean, anything else text
/// (message lists as JSON text, which the readers parse back).
pub fn write_table(path: &Path, fmt: TableFormat, rows: &[Map<String, Value>]) -> Result<()> {
    let bytes = match fmt {
        TableFormat::Jsonl => {
            let mut s = String::new();
            for r in rows {
                s.push_str(&serde_json::to_string(r)?);
                s.push('\n');
            }
            s.into_bytes()
        }
        TableFormat::Csv | TableFormat::Parquet => {
            use polars::prelude::{Column, CsvWriter, DataFrame, ParquetWriter, SerWriter};
            let mut columns = vec![];
            for name in column_names(rows) {
                let vals: Vec<&Value> = rows.iter().map(|r| r.get(&name).unwrap_or(&Value::Null)).collect();
                let col = if vals.iter().all(|v| v.is_number() || v.is_null()) {
                    Column::new(name.as_str().into(), vals.iter().map(|v| v.as_f64()).collect::<Vec<_>>())
                } else if vals.iter().all(|v| v.is_boolean() || v.is_null()) {
                    Column::new(name.as_str().into(), vals.iter().map(|v| v.as_bool()).collect::<Vec<_>>())
                } else {
                    let text: Vec<Option<String>> = vals
                        .iter()
                        .map(|v| match v {
                            Value::Null => None,
                            Value::String(s) => Some(s.clone()),
                            other => Some(other.to_string()),
                        })
                        .collect();
                    Column::new(name.as_str().into(), text)
                };
                columns.push(col);
            }
            let mut df = DataFrame::new(rows.len(), columns)
                .map_err(|e| anyhow::anyhow!("building the table for {}: {e}", path.display()))?;
            let mut buf: Vec<u8> = vec![];
            if fmt == TableFormat::Csv {
                CsvWriter::new(&mut buf).finish(&mut df)
            } else {
                ParquetWriter::new(&mut buf).finish(&mut df).map(|_| ())
            }
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            buf
        }
    };
    lm::fsio::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// `align reward --config FILE`: trains and prints the summary as JSON.
pub fn cli_train(config: &Path) -> Result<()> {
    let mut cfg = crate::RewardConfig::from_toml_file(config)?;
    let base = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    cfg.resolve_paths(&base);
    let s = crate::run(&cfg, &base)?;
    if let Some(e) = &s.eval {
        eprintln!(
            "held-out: accuracy {:.4} over {} pairs, mean margin {:.4}, reward mean {:.4} std {:.4}",
            e.accuracy, e.pairs, e.mean_margin, e.reward_mean, e.reward_std
        );
    }
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// `align score --reward-model DIR --data FILE [--out FILE]`: scores the
/// rows of `data`. With `out`, writes the table there (format by extension)
/// and prints the report as JSON on stdout; without, prints the rows as
/// JSONL on stdout and the report on stderr. Pair accuracy goes to stderr.
pub fn cli_score(reward_model: &Path, data: &Path, out: Option<&Path>) -> Result<()> {
    let report = match out {
        Some(_) => score_file(reward_model, data, out, &ScoreOptions::default())?,
        None => {
            let scorer = Scorer::load(reward_model, &ScoreOptions::default())?;
            let (rows, report) = score_table(&scorer, data)?;
            let mut text = String::new();
            for r in &rows {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            print!("{text}");
            report
        }
    };
    if let Some(e) = &report.pair_eval {
        eprintln!(
            "accuracy {:.4} over {} pairs (chosen > rejected), mean margin {:.4}",
            e.accuracy, e.pairs, e.mean_margin
        );
        for (cat, c) in &e.per_category {
            eprintln!("  {cat}: accuracy {:.4} over {} pairs", c.accuracy, c.pairs);
        }
    }
    let json = serde_json::to_string_pretty(&report)?;
    if out.is_some() {
        println!("{json}");
    } else {
        eprintln!("{json}");
    }
    Ok(())
}
