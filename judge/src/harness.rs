//! `align judge`: both systems answer the prompts (or their answers come
//! from files), a judge compares every pair in both orders, and the results
//! are written to the output directory:
//!
//! - `judgments.jsonl` and `judgments.parquet` — one row per prompt: prompt,
//!   category, both answers, both orders' verdicts and raw outputs (and the
//!   first raw output of a verdict that was retried), outcome, and the
//!   oracle's and human outcomes when known;
//! - `summary.json` — win rates with 95% bootstrap intervals overall and per
//!   category, counts (wins, losses, ties, unparseable), mean answer lengths,
//!   order agreement, and agreement with an oracle when `--oracle` is given;
//! - `report.md` — the win-rate table; `winrate.png` — per-category bars;
//! - `report.html` — the side-by-side page ([`crate::html`]): figures, every
//!   prompt with both answers and verdicts, filters; while judging runs (and
//!   after a failure half-way) it shows the prompts judged so far, marked
//!   incomplete.

use crate::judges::{JudgeSpec, LmJudge, LmMode, OracleJudge, RewardJudge};
use crate::pairwise::{judge_pairs, judge_pairs_progress, Judge, Pair, PairResult};
use crate::stats::{summarize, Outcome, WinRate};
use crate::template::Template;
use anyhow::{bail, Context, Result};
use datasets::{Example, ReadOptions, RecordKind};
use lm::{GenerationConfig, Message};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// `align judge` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct JudgeArgs {
    /// Candidate model directory (answers are generated).
    #[arg(long)]
    pub candidate: Option<PathBuf>,
    /// Baseline model directory.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Candidate answers instead of a model: JSONL/JSON/Parquet/CSV with
    /// `prompt` and `completion` (or `response`/`output`), matched to the
    /// prompts by prompt text.
    #[arg(long)]
    pub candidate_answers: Option<PathBuf>,
    /// Baseline answers instead of a model (as --candidate-answers).
    #[arg(long)]
    pub baseline_answers: Option<PathBuf>,
    /// Prompts: `prompt` or `messages`, optional `category` and (JSONL/JSON)
    /// `reference` for oracles.
    #[arg(long)]
    pub prompts: PathBuf,
    /// lm:DIR, http:URL, reward:DIR or oracle:NAME.
    #[arg(long)]
    pub judge: String,
    #[arg(long, default_value = "runs/judge")]
    pub out: PathBuf,
    /// A built-in template (pairwise, rubric, constitution, choice) or a file.
    /// Default: choice for --lm-mode logprob, pairwise otherwise.
    #[arg(long)]
    pub template: Option<String>,
    #[arg(long, value_enum, default_value = "reason")]
    pub lm_mode: LmMode,
    /// Tokens the lm: and http: judges may write.
    #[arg(long, default_value_t = 512)]
    pub judge_max_new_tokens: usize,
    /// reward: judge — rewards this close are a tie.
    #[arg(long, default_value_t = 0.0)]
    pub tie_tolerance: f64,
    /// Also score every pair with this oracle and report the judge's
    /// agreement with it.
    #[arg(long)]
    pub oracle: Option<String>,
    /// Generation: tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Generation: 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<i64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of generation, sampling judges and the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 2000)]
    pub bootstrap: usize,
    /// Judge only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// http: judge — the model name sent in requests.
    #[arg(long, default_value = "default")]
    pub http_model: String,
    /// http: judge — the environment variable holding the API key (sent as
    /// a bearer token when set).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// http: judge — seconds per request.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// http: judge — retries of a failed request (with exponential backoff).
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// http: judge — requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub max_in_flight: usize,
}

/// One prompt to judge.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub messages: Vec<Message>,
    pub question: String,
    pub category: Option<String>,
    pub reference: Option<String>,
    /// Which answer a person preferred, when the prompts file says (`human`).
    pub human: Option<Outcome>,
}

/// The prompt as text: a single user turn as is, otherwise every turn as
/// `role: content` on its own paragraph.
pub fn question_text(messages: &[Message]) -> String {
    match messages {
        [m] if m.role == "user" => m.content.clone(),
        _ => messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n\n"),
    }
}

/// Reference answers of a JSONL or JSON file by 1-based row: the
/// `reference`, `answer` or `solution` field (numbers as text).
fn read_references(path: &Path) -> Result<HashMap<usize, String>> {
    Ok(read_json_rows(path)?
        .into_iter()
        .filter_map(|(row, v)| {
            ["reference", "answer", "solution"].iter().find_map(|key| match v.get(*key) {
                Some(Value::String(s)) => Some((row, s.clone())),
                Some(Value::Number(n)) => Some((row, n.to_string())),
                _ => None,
            })
        })
        .collect())
}

/// Human labels of a JSONL or JSON file by 1-based row: a `human` column
/// saying which answer a person preferred — `candidate` (or `a`, `win`),
/// `baseline` (`b`, `loss`) or `tie` (`c`).
fn read_human_labels(path: &Path) -> Result<HashMap<usize, Outcome>> {
    let mut out = HashMap::new();
    for (row, v) in read_json_rows(path)? {
        let Some(label) = v.get("human") else { continue };
        let o = match label.as_str().map(|x| x.trim().to_ascii_lowercase()).as_deref() {
            Some("candidate" | "a" | "win") => Outcome::Win,
            Some("baseline" | "b" | "loss") => Outcome::Loss,
            Some("tie" | "c") => Outcome::Tie,
            _ => bail!(
                "{} row {row}: field `human` is {label}; expected \"candidate\", \"baseline\" or \"tie\"",
                path.display()
            ),
        };
        out.insert(row, o);
    }
    Ok(out)
}

/// The rows of a JSONL or JSON prompts file as JSON objects by 1-based row
/// (other formats and `builtin:` specs: none).
fn read_json_rows(path: &Path) -> Result<Vec<(usize, Value)>> {
    if path.to_str().is_some_and(|p| p.starts_with("builtin:")) {
        return Ok(vec![]); // built-in tasks: the `tasks` oracle needs no reference
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rows: Vec<(usize, Value)> = match ext.as_str() {
        "jsonl" | "ndjson" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .filter_map(|(i, l)| serde_json::from_str(l).ok().map(|v| (i + 1, v)))
            .collect(),
        "json" => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(a)) => a.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect(),
            _ => vec![],
        },
        _ => vec![],
    };
    Ok(rows)
}

/// Reads the prompts file (any format the datasets crate reads; references
/// from JSONL/JSON files).
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let ds = datasets::read_dataset(
        path,
        &ReadOptions { kind: Some(RecordKind::PromptOnly), ..Default::default() },
    )
    .with_context(|| format!("reading the prompts {}", path.display()))?;
    let mut refs: HashMap<PathBuf, HashMap<usize, String>> = HashMap::new();
    let mut humans: HashMap<PathBuf, HashMap<usize, Outcome>> = HashMap::new();
    let mut out = vec![];
    for ex in ds.examples {
        let file = ex.origin.file.to_path_buf();
        if !refs.contains_key(&file) {
            refs.insert(file.clone(), read_references(&file)?);
            humans.insert(file.clone(), read_human_labels(&file)?);
        }
        let messages = ex.record.prompt_messages();
        out.push(PromptRow {
            question: question_text(&messages),
            messages,
            category: ex.category,
            reference: refs.get(&file).and_then(|m| m.get(&ex.origin.row)).cloned(),
            human: humans.get(&file).and_then(|m| m.get(&ex.origin.row)).copied(),
        });
    }
    if out.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(out)
}

/// Answers from a file, in the order of `prompts` (matched by prompt text).
pub fn read_answers(path: &Path, prompts: &[PromptRow]) -> Result<Vec<String>> {
    let ds = datasets::read_dataset(
        path,
        &ReadOptions { kind: Some(RecordKind::PromptCompletion), ..Default::default() },
    )
    .with_context(|| format!("reading the answers {}", path.display()))?;
    let mut by_prompt: HashMap<String, String> = HashMap::new();
    for ex in ds.examples {
        let Example { record, .. } = ex;
        if let datasets::Record::PromptCompletion { prompt, completion } = record {
            let answer = completion.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n");
            by_prompt.entry(question_text(&prompt)).or_insert(answer);
        }
    }
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            by_prompt.get(&p.question).cloned().with_context(|| {
                format!("{}: no answer for prompt {} ({:.60?})", path.display(), i + 1, p.question)
            })
        })
        .collect()
}

/// Generation settings for answering prompts.
#[derive(Debug, Clone)]
pub struct AnswerSettings {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub batch_size: usize,
}

/// A model's answers to the prompts (batched; each batch seeded with
/// `seed + batch index`).
pub fn generate_answers(
    dir: &Path,
    prompts: &[PromptRow],
    s: &AnswerSettings,
    device: tch::Device,
    kind: tch::Kind,
) -> Result<Vec<String>> {
    let l = lm::checkpoint::load_causal_lm(dir, device, kind)?;
    let wt = lm::InferenceWeights::for_model(&l.model); // once for all batches
    let sp = l.tokenizer.special;
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            lm::chat::prompt_ids(&l.tokenizer, &p.messages).with_context(|| format!("prompt {}", i + 1))
        })
        .collect::<Result<_>>()?;
    let mut out = vec![];
    for (b, chunk) in ids.chunks(s.batch_size.max(1)).enumerate() {
        let cfg = GenerationConfig {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed.wrapping_add(b as u64),
            eos_id: sp.eos,
            end_of_turn_id: Some(sp.end_of_turn),
            pad_id: sp.pad,
        };
        for g in lm::generate::generate_using(&l.model, wt.as_ref(), chunk, &cfg, |_, _| true)
            .with_context(|| format!("generating with {}", dir.display()))?
        {
            out.push(l.tokenizer.decode(g.content(), true)?);
        }
    }
    Ok(out)
}

/// Mean answer lengths of one side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lengths {
    pub candidate_chars: f64,
    pub baseline_chars: f64,
    pub candidate_words: f64,
    pub baseline_words: f64,
}

fn mean(v: impl Iterator<Item = usize>) -> f64 {
    let (s, n) = v.fold((0usize, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s as f64 / n as f64
    }
}

fn mean_f(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// The statistics of one group of pairs (all, or one category).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupSummary {
    pub prompts: usize,
    /// Pairs left out because a verdict stayed unparseable.
    pub excluded: usize,
    #[serde(flatten)]
    pub win_rate: WinRate,
    /// Share of judged pairs whose two orders agreed (1 = no position bias
    /// visible; a judge always picking the first position gives 0).
    pub order_agreement: f64,
    pub lengths: Lengths,
    /// Agreement with the oracle (share of judged pairs with the same outcome).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_win_rate: Option<WinRate>,
    /// The oracle's mean score of each side's answers on its own (accuracy
    /// for the 0/1 built-in oracles).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_score: Option<SideScores>,
    /// Agreement with the human labels (share of judged, labelled pairs
    /// with the same outcome).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub human_agreement: Option<f64>,
}

/// A mean score for each side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SideScores {
    pub candidate: f64,
    pub baseline: f64,
}

/// One judged prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgment {
    pub index: usize,
    pub category: Option<String>,
    pub prompt: String,
    pub reference: Option<String>,
    pub candidate: String,
    pub baseline: String,
    #[serde(flatten)]
    pub result: PairResult,
    /// The outcome with an oracle, when `--oracle` is given.
    pub oracle_outcome: Option<Outcome>,
    /// The oracle's scores of the two answers on their own.
    #[serde(skip)]
    pub oracle_scores: Option<SideScores>,
    /// The outcome a person chose, when the prompts carry `human` labels.
    pub human_outcome: Option<Outcome>,
}

/// Summarises judgments (the whole set, or one category's).
pub fn summarize_group(js: &[&Judgment], resamples: usize, seed: u64) -> GroupSummary {
    let outcomes: Vec<Outcome> = js.iter().filter_map(|j| j.result.outcome).collect();
    let agree: Vec<bool> = js.iter().filter_map(|j| j.result.orders_agree).collect();
    let has_oracle = js.iter().any(|j| j.oracle_outcome.is_some());
    let (oracle_agreement, oracle_win_rate) = if has_oracle {
        let both: Vec<bool> =
            js.iter().filter_map(|j| Some(j.result.outcome? == j.oracle_outcome?)).collect();
        let o: Vec<Outcome> = js.iter().filter_map(|j| j.oracle_outcome).collect();
        (Some(mean(both.iter().map(|&b| usize::from(b)))), Some(summarize(&o, resamples, seed)))
    } else {
        (None, None)
    };
    let scored: Vec<SideScores> = js.iter().filter_map(|j| j.oracle_scores).collect();
    let oracle_score = (!scored.is_empty()).then(|| SideScores {
        candidate: mean_f(scored.iter().map(|s| s.candidate)),
        baseline: mean_f(scored.iter().map(|s| s.baseline)),
    });
    let human: Vec<bool> = js.iter().filter_map(|j| Some(j.result.outcome? == j.human_outcome?)).collect();
    let human_agreement = (!human.is_empty()).then(|| mean(human.iter().map(|&b| usize::from(b))));
    GroupSummary {
        prompts: js.len(),
        excluded: js.len() - outcomes.len(),
        win_rate: summarize(&outcomes, resamples, seed),
        order_agreement: mean(agree.iter().map(|&b| usize::from(b))),
        lengths: Lengths {
            candidate_chars: mean(js.iter().map(|j| j.candidate.chars().count())),
            baseline_chars: mean(js.iter().map(|j| j.baseline.chars().count())),
            candidate_words: mean(js.iter().map(|j| j.candidate.split_whitespace().count())),
            baseline_words: mean(js.iter().map(|j| j.baseline.split_whitespace().count())),
        },
        oracle_agreement,
        oracle_win_rate,
        oracle_score,
        human_agreement,
    }
}

/// The whole summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub judge: String,
    pub candidate: String,
    pub baseline: String,
    pub oracle: Option<String>,
    /// Verdicts (of 2 per prompt) that were unparseable at first and retried.
    pub retried_verdicts: usize,
    /// Verdicts still unparseable after the retry.
    pub unparseable_verdicts: usize,
    pub seed: u64,
    pub bootstrap_resamples: usize,
    pub overall: GroupSummary,
    pub per_category: BTreeMap<String, GroupSummary>,
}

/// Runs the judge over answered prompts and builds the judgments.
pub fn judge_answers(
    judge: &dyn Judge,
    prompts: &[PromptRow],
    candidate: &[String],
    baseline: &[String],
    oracle: Option<&str>,
) -> Result<Vec<Judgment>> {
    judge_answers_progress(judge, prompts, candidate, baseline, oracle, &mut |_| {})
}

/// [`judge_answers`], calling `progress` with the judgments of the prompts
/// judged so far (first attempts, no oracle yet) whenever the judge has
/// finished a chunk of them ([`crate::pairwise::judge_pairs_progress`]).
pub fn judge_answers_progress(
    judge: &dyn Judge,
    prompts: &[PromptRow],
    candidate: &[String],
    baseline: &[String],
    oracle: Option<&str>,
    progress: &mut dyn FnMut(&[Judgment]),
) -> Result<Vec<Judgment>> {
    if candidate.len() != prompts.len() || baseline.len() != prompts.len() {
        bail!(
            "{} prompts but {} candidate and {} baseline answers",
            prompts.len(),
            candidate.len(),
            baseline.len()
        );
    }
    let pairs: Vec<Pair> = prompts
        .iter()
        .zip(candidate.iter().zip(baseline))
        .map(|(p, (c, b))| Pair {
            question: &p.question,
            prompt: &p.messages,
            candidate: c,
            baseline: b,
            reference: p.reference.as_deref(),
        })
        .collect();
    let judgment = |i: usize, result: PairResult| Judgment {
        index: i,
        category: prompts[i].category.clone(),
        prompt: prompts[i].question.clone(),
        reference: prompts[i].reference.clone(),
        candidate: candidate[i].clone(),
        baseline: baseline[i].clone(),
        result,
        oracle_outcome: None,
        oracle_scores: None,
        human_outcome: prompts[i].human,
    };
    let results = judge_pairs_progress(judge, &pairs, &mut |done| {
        progress(&done.iter().cloned().enumerate().map(|(i, r)| judgment(i, r)).collect::<Vec<_>>())
    })?;
    let oracle_results = match oracle {
        Some(name) => Some(judge_pairs(&OracleJudge::new(name)?, &pairs).context("scoring with the oracle")?),
        None => None,
    };
    let oracle_scores = match oracle {
        Some(name) => {
            let o = crate::oracle::get_oracle(name)?;
            let score = |p: &Pair, answer: &str| {
                o.score(p.question, answer, p.reference)
                    .with_context(|| format!("oracle {name} scoring an answer to {:?}", p.question))
            };
            let scores: Result<Vec<SideScores>> = pairs
                .iter()
                .map(|p| {
                    Ok(SideScores { candidate: score(p, p.candidate)?, baseline: score(p, p.baseline)? })
                })
                .collect();
            Some(scores?)
        }
        None => None,
    };
    Ok(results
        .into_iter()
        .enumerate()
        .map(|(i, result)| Judgment {
            oracle_outcome: oracle_results.as_ref().and_then(|o| o[i].outcome),
            oracle_scores: oracle_scores.as_ref().map(|o| o[i]),
            ..judgment(i, result)
        })
        .collect())
}

/// The category of prompts that have none.
pub const NO_CATEGORY: &str = "(none)";

/// The summary of judgments.
pub fn summarize_all(
    js: &[Judgment],
    names: (&str, &str, &str),
    oracle: Option<&str>,
    resamples: usize,
    seed: u64,
) -> Summary {
    let all: Vec<&Judgment> = js.iter().collect();
    let mut cats: BTreeMap<String, Vec<&Judgment>> = BTreeMap::new();
    for j in js {
        cats.entry(j.category.clone().unwrap_or_else(|| NO_CATEGORY.into())).or_default().push(j);
    }
    let orders = || js.iter().flat_map(|j| [&j.result.candidate_first, &j.result.baseline_first]);
    Summary {
        judge: names.0.into(),
        candidate: names.1.into(),
        baseline: names.2.into(),
        oracle: oracle.map(String::from),
        retried_verdicts: orders().filter(|o| o.first_raw.is_some()).count(),
        unparseable_verdicts: orders().filter(|o| o.verdict.is_none()).count(),
        seed,
        bootstrap_resamples: resamples,
        overall: summarize_group(&all, resamples, seed),
        per_category: cats.into_iter().map(|(k, v)| (k, summarize_group(&v, resamples, seed))).collect(),
    }
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}%", 100.0 * x)
    } else {
        "n/a".into()
    }
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "n/a".into()
    }
}

/// `report.md`.
pub fn report_markdown(s: &Summary) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "# Side-by-side: {} vs {}\n\nJudge: `{}`. Every pair judged in both orders; disagreeing orders count as a tie. \
         Win rate = (wins + ties/2)/n for the candidate, with a 95% bootstrap interval ({} resamples, seed {}).\n\n",
        s.candidate, s.baseline, s.judge, s.bootstrap_resamples, s.seed
    ));
    md.push_str("| category | n | win rate | 95% CI | W / L / T | excluded | order agreement | cand. chars | base. chars |");
    if s.oracle.is_some() {
        md.push_str(" oracle agreement |");
    }
    md.push('\n');
    md.push_str("|---|---|---|---|---|---|---|---|---|");
    if s.oracle.is_some() {
        md.push_str("---|");
    }
    md.push('\n');
    let row = |name: &str, g: &GroupSummary| {
        let w = &g.win_rate;
        let mut r = format!(
            "| {name} | {} | {} | {} – {} | {} / {} / {} | {} | {} | {} | {} |",
            w.n,
            pct(w.win_rate),
            pct(w.lo),
            pct(w.hi),
            w.wins,
            w.losses,
            w.ties,
            g.excluded,
            pct(g.order_agreement),
            num(g.lengths.candidate_chars),
            num(g.lengths.baseline_chars)
        );
        if s.oracle.is_some() {
            r.push_str(&format!(" {} |", g.oracle_agreement.map_or("n/a".into(), pct)));
        }
        r.push('\n');
        r
    };
    for (k, g) in &s.per_category {
        md.push_str(&row(k, g));
    }
    md.push_str(&row("**overall**", &s.overall));
    md.push_str(&format!(
        "\n{} verdicts were unparseable and retried; {} stayed unparseable (their pairs are excluded, never guessed).\n",
        s.retried_verdicts, s.unparseable_verdicts
    ));
    if let Some(o) = s.overall.oracle_score {
        md.push_str(&format!(
            "\nOracle score of the answers on their own (`{}`): candidate {}, baseline {}.\n",
            s.oracle.as_deref().unwrap_or(""),
            pct(o.candidate),
            pct(o.baseline)
        ));
    }
    if let Some(h) = s.overall.human_agreement {
        md.push_str(&format!("\nAgreement with the human labels (`human` column): {:.1}%.\n", 100.0 * h));
    }
    md.push_str("\nLength bias: compare the answer lengths beside each win rate; a judge that favours the longer answer shows wins tracking length.\n");
    md.push_str("\n![win rates](winrate.png)\n");
    md
}

/// Writes `judgments.jsonl`, `judgments.parquet`, `summary.json`,
/// `report.md`, `report.html` and `winrate.png` into `out`.
pub fn write_outputs(out: &Path, js: &[Judgment], s: &Summary) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let mut jsonl = String::new();
    for j in js {
        jsonl.push_str(&serde_json::to_string(j)?);
        jsonl.push('\n');
    }
    lm::fsio::write_atomic(&out.join("judgments.jsonl"), jsonl.as_bytes())?;
    write_parquet(&out.join("judgments.parquet"), js)?;
    lm::fsio::write_atomic(&out.join("summary.json"), serde_json::to_string_pretty(s)?.as_bytes())?;
    lm::fsio::write_atomic(&out.join("report.md"), report_markdown(s).as_bytes())?;
    crate::html::write_judge_page(out, js, s, None)?;
    lm::plot::bar_chart(
        &out.join("winrate.png"),
        &format!(
            "{} vs {} (judge {})",
            short_name(&s.candidate),
            short_name(&s.baseline),
            short_name(&s.judge)
        ),
        "candidate win rate",
        &winrate_bars(s),
        Some(0.5),
    )
}

/// The bars of `winrate.png`: one per category, then "overall". When no
/// prompt has a category, the one category ([`NO_CATEGORY`]) would repeat
/// "overall", so it is left out.
pub fn winrate_bars(s: &Summary) -> Vec<lm::plot::Bar> {
    let uncategorised = s.per_category.len() == 1 && s.per_category.contains_key(NO_CATEGORY);
    let bar = |label: &str, g: &GroupSummary| lm::plot::Bar {
        label: label.into(),
        value: g.win_rate.win_rate,
        lo: g.win_rate.lo,
        hi: g.win_rate.hi,
    };
    let cats = s.per_category.iter().filter(|_| !uncategorised).map(|(k, g)| bar(k, g));
    cats.chain([bar("overall", &s.overall)]).collect()
}

/// A model's short name for a picture's title: `runs/q/rl/model` → `rl`,
/// `reward:runs/q/judge-rm/model` → `reward:judge-rm`, a file → its name.
fn short_name(name: &str) -> String {
    let (prefix, path) = match name.split_once(':') {
        Some((p, rest)) if !p.contains('/') => (format!("{p}:"), rest),
        _ => (String::new(), name),
    };
    let path = Path::new(path.trim_end_matches('/'));
    let base = if path.file_name().is_some_and(|f| f == "model") { path.parent() } else { Some(path) };
    // One seed's outputs of a recipe stage repeated over seeds: `rl/seed-0`.
    let stage = |b: &Path| {
        let f = b.file_name()?.to_string_lossy().into_owned();
        let seed =
            f.strip_prefix("seed-").is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
        match b.parent().and_then(|p| p.file_name()).filter(|_| seed) {
            Some(p) => Some(format!("{}/{f}", p.to_string_lossy())),
            None => Some(f),
        }
    };
    match base.and_then(stage) {
        Some(f) => format!("{prefix}{f}"),
        None => name.to_string(),
    }
}

fn verdict_str(v: Option<crate::verdict::Verdict>) -> Option<String> {
    v.map(|v| v.letter().to_string())
}

fn outcome_str(o: Option<Outcome>) -> Option<String> {
    o.map(|o| serde_json::to_value(o).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default())
}

fn write_parquet(path: &Path, js: &[Judgment]) -> Result<()> {
    use polars::prelude::{Column, DataFrame, NamedFrom, ParquetWriter, Series};
    let s = |name: &str, v: Vec<Option<String>>| -> Column { Series::new(name.into(), v).into() };
    let columns = vec![
        Series::new("index".into(), js.iter().map(|j| j.index as u64).collect::<Vec<_>>()).into(),
        s("category", js.iter().map(|j| j.category.clone()).collect()),
        s("prompt", js.iter().map(|j| Some(j.prompt.clone())).collect()),
        s("reference", js.iter().map(|j| j.reference.clone()).collect()),
        s("candidate", js.iter().map(|j| Some(j.candidate.clone())).collect()),
        s("baseline", js.iter().map(|j| Some(j.baseline.clone())).collect()),
        s(
            "verdict_candidate_first",
            js.iter().map(|j| verdict_str(j.result.candidate_first.verdict)).collect(),
        ),
        s("raw_candidate_first", js.iter().map(|j| Some(j.result.candidate_first.raw.clone())).collect()),
        s(
            "first_raw_candidate_first",
            js.iter().map(|j| j.result.candidate_first.first_raw.clone()).collect(),
        ),
        s(
            "verdict_baseline_first",
            js.iter().map(|j| verdict_str(j.result.baseline_first.verdict)).collect(),
        ),
        s("raw_baseline_first", js.iter().map(|j| Some(j.result.baseline_first.raw.clone())).collect()),
        s("first_raw_baseline_first", js.iter().map(|j| j.result.baseline_first.first_raw.clone()).collect()),
        s("outcome", js.iter().map(|j| outcome_str(j.result.outcome)).collect()),
        Series::new("orders_agree".into(), js.iter().map(|j| j.result.orders_agree).collect::<Vec<_>>())
            .into(),
        s("oracle_outcome", js.iter().map(|j| outcome_str(j.oracle_outcome)).collect()),
        s("human_outcome", js.iter().map(|j| outcome_str(j.human_outcome)).collect()),
    ];
    let mut df = DataFrame::new_infer_height(columns)
        .with_context(|| format!("cannot build the table for {}", path.display()))?;
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    ParquetWriter::new(file).finish(&mut df).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))?;
    Ok(())
}

/// Builds the judge a spec names.
pub fn build_judge(args: &JudgeArgs, device: tch::Device, kind: tch::Kind) -> Result<Box<dyn Judge>> {
    let template = || -> Result<Template> {
        let default = if args.lm_mode == LmMode::Logprob { "choice" } else { "pairwise" };
        Template::load(args.template.as_deref().unwrap_or(default))
    };
    Ok(match JudgeSpec::parse(&args.judge)? {
        JudgeSpec::Oracle(name) => Box::new(OracleJudge::new(&name)?),
        JudgeSpec::Reward(dir) => {
            Box::new(RewardJudge::load(&dir, device, kind, args.tie_tolerance, args.batch_size)?)
        }
        JudgeSpec::Lm(dir) => {
            let mut j = LmJudge::load(&dir, device, kind, template()?, args.lm_mode)?;
            j.max_new_tokens = args.judge_max_new_tokens;
            j.batch_size = args.batch_size.max(1);
            j.seed = args.seed;
            Box::new(j)
        }
        JudgeSpec::Http(url) => {
            let settings = crate::http::HttpSettings {
                model: args.http_model.clone(),
                api_key_env: args.api_key_env.clone(),
                timeout: std::time::Duration::from_secs(args.timeout_s.max(1)),
                retries: args.retries,
                backoff: std::time::Duration::from_millis(500),
                max_in_flight: args.max_in_flight.max(1),
                max_tokens: args.judge_max_new_tokens,
                seed: args.seed,
            };
            Box::new(crate::http::HttpJudge::new(&url, template()?, settings)?)
        }
    })
}

/// Checks what judging needs before any answer is generated: the judge
/// spec, the oracles named (`oracle:NAME` and `--oracle`) and that the
/// prompts have the references they read, the judge's model directory and
/// the template of an `lm:`/`http:` judge.
pub fn check_before_answering(args: &JudgeArgs, prompts: &[PromptRow]) -> Result<()> {
    let spec = JudgeSpec::parse(&args.judge)?;
    let mut oracles = vec![];
    if let JudgeSpec::Oracle(name) = &spec {
        oracles.push((name.clone(), format!("--judge {}", args.judge)));
    }
    if let Some(o) = &args.oracle {
        oracles.push((o.clone(), format!("--oracle {o}")));
    }
    for (name, flag) in oracles {
        let o = crate::oracle::get_oracle(&name).with_context(|| flag.clone())?;
        let missing = prompts.iter().filter(|p| p.reference.is_none()).count();
        if o.needs_reference() && missing > 0 {
            bail!(
                "{flag}: oracle {name} compares each answer with the prompt's reference answer, and \
                 {missing} of {} prompts have none; add a `reference` column to {}",
                prompts.len(),
                args.prompts.display()
            );
        }
    }
    match &spec {
        JudgeSpec::Lm(dir) | JudgeSpec::Reward(dir) if !dir.is_dir() => {
            bail!("--judge {}: the judge's model directory {} does not exist", args.judge, dir.display())
        }
        JudgeSpec::Lm(_) | JudgeSpec::Http(_) => {
            let default = if args.lm_mode == LmMode::Logprob { "choice" } else { "pairwise" };
            Template::load(args.template.as_deref().unwrap_or(default)).context("--template")?;
        }
        _ => {}
    }
    Ok(())
}

fn side(model: &Option<PathBuf>, answers: &Option<PathBuf>, which: &str) -> Result<String> {
    match (model, answers) {
        (Some(m), None) => Ok(m.display().to_string()),
        (None, Some(a)) => Ok(a.display().to_string()),
        (Some(_), Some(_)) => bail!("give either --{which} or --{which}-answers, not both"),
        (None, None) => bail!("the {which} needs --{which} DIR (a model) or --{which}-answers FILE"),
    }
}

/// `align judge`.
/// What a judge run reads: the two sides (models or answer files), the
/// prompts, the judge's model directory and a template file.
fn judge_inputs(args: &JudgeArgs) -> Vec<(&'static str, &Path)> {
    let mut inputs: Vec<(&'static str, &Path)> = vec![("prompts", args.prompts.as_path())];
    let sides = [
        ("candidate", &args.candidate),
        ("baseline", &args.baseline),
        ("candidate answers", &args.candidate_answers),
        ("baseline answers", &args.baseline_answers),
    ];
    inputs.extend(sides.into_iter().filter_map(|(what, p)| p.as_deref().map(|p| (what, p))));
    if let Some(dir) = args.judge.strip_prefix("lm:").or_else(|| args.judge.strip_prefix("reward:")) {
        inputs.push(("judge model", Path::new(dir)));
    }
    if let Some(t) = args.template.as_deref().filter(|t| Path::new(t).is_file()) {
        inputs.push(("template", Path::new(t)));
    }
    inputs
}

/// Judges the answers; while it runs, and when it fails half-way,
/// `report.html` in the output directory shows the prompts judged so far,
/// marked incomplete (rewritten at most every two seconds, and once more
/// from the last progress on a failure).
fn judge_with_partial_pages(
    args: &JudgeArgs,
    judge: &dyn Judge,
    prompts: &[PromptRow],
    (cand, base): (&[String], &[String]),
    (cand_name, base_name): (&str, &str),
) -> Result<Vec<Judgment>> {
    let judge_name = judge.name();
    let page = |done: &[Judgment]| {
        let names = (judge_name.as_str(), cand_name, base_name);
        let s = summarize_all(done, names, args.oracle.as_deref(), args.bootstrap, args.seed);
        if let Err(e) = crate::html::write_judge_page(&args.out, done, &s, Some(prompts.len())) {
            eprintln!("warning: cannot write the page of the prompts judged so far: {e:#}");
        }
    };
    let mut last: Vec<Judgment> = vec![];
    let mut written: Option<std::time::Instant> = None;
    let result = judge_answers_progress(judge, prompts, cand, base, args.oracle.as_deref(), &mut |done| {
        if written.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(2)) {
            page(done);
            written = Some(std::time::Instant::now());
        }
        last = done.to_vec();
    });
    if result.is_err() && !last.is_empty() {
        page(&last);
        eprintln!(
            "judging failed after {} of {} prompts; {} shows them, marked incomplete",
            last.len(),
            prompts.len(),
            args.out.join("report.html").display()
        );
    }
    result
}

pub fn cli_judge(args: JudgeArgs) -> Result<()> {
    let cand_name = side(&args.candidate, &args.candidate_answers, "candidate")?;
    let base_name = side(&args.baseline, &args.baseline_answers, "baseline")?;
    let device = lm::device::parse_device(&args.device)?;
    let kind = lm::device::parse_dtype(&args.dtype)?;
    let mut prompts = read_prompts(&args.prompts)?;
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    check_before_answering(&args, &prompts)?;
    // The output directory is this run's alone (a lock), never someone
    // else's files or one of the inputs; debris of a killed run goes.
    let _claim = lm::output_dir::claim(&args.out, "judge", &judge_inputs(&args))?;
    let settings = AnswerSettings {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        batch_size: args.batch_size,
    };
    let answers = |model: &Option<PathBuf>, file: &Option<PathBuf>| -> Result<Vec<String>> {
        match (model, file) {
            (Some(m), _) => generate_answers(m, &prompts, &settings, device, kind),
            (None, Some(f)) => read_answers(f, &prompts),
            (None, None) => bail!("no answers"),
        }
    };
    eprintln!("answering {} prompts", prompts.len());
    let cand = answers(&args.candidate, &args.candidate_answers)?;
    let base = answers(&args.baseline, &args.baseline_answers)?;
    let judge = build_judge(&args, device, kind)?;
    eprintln!("judging {} pairs in both orders with {}", prompts.len(), judge.name());
    let js =
        judge_with_partial_pages(&args, judge.as_ref(), &prompts, (&cand, &base), (&cand_name, &base_name))?;
    let s = summarize_all(
        &js,
        (&judge.name(), &cand_name, &base_name),
        args.oracle.as_deref(),
        args.bootstrap,
        args.seed,
    );
    write_outputs(&args.out, &js, &s)?;
    let w = &s.overall.win_rate;
    println!(
        "{}",
        json!({"win_rate": w.win_rate, "lo": w.lo, "hi": w.hi, "n": w.n, "excluded": s.overall.excluded,
               "order_agreement": s.overall.order_agreement, "out": args.out.display().to_string()})
    );
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn picture_titles_use_short_model_names() {
        assert_eq!(super::short_name("recipes/../runs/quickstart/rl/model"), "rl");
        assert_eq!(super::short_name("runs/quickstart/rl/seed-2/model"), "rl/seed-2");
        assert_eq!(super::short_name("reward:runs/q/judge-rm/model/"), "reward:judge-rm");
        assert_eq!(super::short_name("answers/base.jsonl"), "base.jsonl");
        assert_eq!(super::short_name("oracle:tasks"), "oracle:tasks");
    }

    #[test]
    fn uncategorised_prompts_draw_no_none_bar() {
        let mut s = super::summarize_all(&[], ("j", "c", "b"), None, 10, 1);
        let labels =
            |s: &super::Summary| super::winrate_bars(s).into_iter().map(|b| b.label).collect::<Vec<_>>();
        assert_eq!(labels(&s), ["overall"]);
        s.per_category.insert(super::NO_CATEGORY.into(), s.overall.clone());
        assert_eq!(labels(&s), ["overall"]);
        // Beside real categories, the uncategorised prompts keep their bar.
        s.per_category.insert("math".into(), s.overall.clone());
        assert_eq!(labels(&s), ["(none)", "math", "overall"]);
    }
}
