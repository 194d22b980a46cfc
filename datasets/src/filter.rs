//! Filters in the spirit of the Gemma report's synthetic-data filtering:
//! length bounds, personal information, wrong self-identification,
//! decontamination against evaluation prompts, exact and near duplicates.
//!
//! A [`FilterConfig`] (a recipe section) compiles into [`Filters`], which
//! run in a fixed order, cheapest first: length → pii → self_identification
//! → decontaminate → exact_dedup → near_dedup. A row is checked by each
//! filter in turn and removed by the first that objects, so every removed row
//! has exactly one reason, and the deduplicators only remember rows that
//! survived every earlier filter (the first occurrence is kept).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::read::{read_dataset, ReadOptions};
use crate::record::{Example, Message, Record, RecordKind};
use crate::text::{hash128, mix64, ngram_hashes, normalize, word_count, word_hashes};

/// Which messages a filter looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextScope {
    /// Every message.
    #[default]
    All,
    /// Messages that are not the model's (user and system turns).
    Prompt,
    /// The model's messages (including chosen and rejected responses).
    Response,
}

impl TextScope {
    fn includes(self, m: &Message) -> bool {
        match self {
            TextScope::All => true,
            TextScope::Prompt => !m.is_model(),
            TextScope::Response => m.is_model(),
        }
    }
}

/// The filters to run; each is off unless its section is present.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    #[serde(default)]
    pub length: Option<LengthConfig>,
    #[serde(default)]
    pub pii: Option<PiiConfig>,
    #[serde(default)]
    pub self_identification: Option<SelfIdConfig>,
    #[serde(default)]
    pub decontaminate: Option<DecontaminateConfig>,
    #[serde(default)]
    pub exact_dedup: Option<ExactDedupConfig>,
    #[serde(default)]
    pub near_dedup: Option<NearDedupConfig>,
    /// Keep removed rows (with their reasons) in the report for review.
    #[serde(default)]
    pub keep_removed: bool,
}

/// What length is measured in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthUnit {
    Chars,
    #[default]
    Words,
}

/// Length bounds, inclusive. Measured per sequence (prompt + response; a
/// preference pair has two, chosen and rejected, and both must fit) over the
/// messages in `scope`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthConfig {
    #[serde(default)]
    pub unit: LengthUnit,
    #[serde(default)]
    pub min: Option<usize>,
    #[serde(default)]
    pub max: Option<usize>,
    #[serde(default)]
    pub scope: TextScope,
}

/// Personal-information patterns; each kind can be turned off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiiConfig {
    /// Email addresses (except at `allow_email_domains`).
    #[serde(default = "yes")]
    pub emails: bool,
    /// Phone numbers: 9–15 digits written with `+`, parentheses, or `-`/`.`
    /// separators (digit groups separated only by spaces are not counted).
    #[serde(default = "yes")]
    pub phones: bool,
    /// Card-like numbers: 13–19 digits, plain or in groups of four (or
    /// 4-6-5), that pass the Luhn check.
    #[serde(default = "yes")]
    pub cards: bool,
    /// Id-like numbers: US social security numbers (AAA-GG-SSSS, valid
    /// ranges) and IBANs that pass the mod-97 check.
    #[serde(default = "yes")]
    pub ids: bool,
    /// Placeholder domains whose addresses are not personal.
    #[serde(default = "default_allow_domains")]
    pub allow_email_domains: Vec<String>,
    #[serde(default)]
    pub scope: TextScope,
}

impl Default for PiiConfig {
    fn default() -> Self {
        PiiConfig {
            emails: true,
            phones: true,
            cards: true,
            ids: true,
            allow_email_domains: default_allow_domains(),
            scope: TextScope::All,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_allow_domains() -> Vec<String> {
    ["example.com", "example.org", "example.net"].map(String::from).to_vec()
}

/// Wrong self-identification: a model turn in which the model says it is,
/// or was made by, one of `names` ("I am ChatGPT", "As an AI language model
/// developed by OpenAI", "I'm a large language model trained by Anthropic",
/// "my creators at Meta"). Negations ("I am not ChatGPT") and mentions that
/// are not first-person claims ("ChatGPT is a chatbot") are kept. Checked in
/// the turns the model is trained towards: conversation and completion model
/// turns, model turns of a prompt, and a preference pair's chosen response
/// (a rejected response that claims another identity is a useful negative).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfIdConfig {
    /// The identities that are wrong for this model (case-insensitive).
    #[serde(default = "default_wrong_names")]
    pub names: Vec<String>,
    /// More names, added to `names` (so the defaults need not be repeated).
    #[serde(default)]
    pub extra_names: Vec<String>,
}

impl Default for SelfIdConfig {
    fn default() -> Self {
        SelfIdConfig { names: default_wrong_names(), extra_names: Vec::new() }
    }
}

/// The default list of identities a Gemma model must not claim.
pub fn default_wrong_names() -> Vec<String> {
    [
        "ChatGPT",
        "GPT-3",
        "GPT-3.5",
        "GPT-4",
        "GPT-4o",
        "GPT",
        "OpenAI",
        "Claude",
        "Anthropic",
        "LLaMA",
        "Meta AI",
        "Meta",
        "Bard",
        "Gemini",
        "PaLM",
        "Mistral",
        "Mixtral",
        "Vicuna",
        "Qwen",
        "Alibaba",
        "DeepSeek",
        "Copilot",
        "Bing",
        "Microsoft",
        "Grok",
        "xAI",
    ]
    .map(String::from)
    .to_vec()
}

/// Decontamination: remove rows that share an n-gram of words with an
/// evaluation prompt. With texts shorter than `n` words the n-gram is the
/// shorter text itself: a pair overlaps when they share a run of
/// `min(n, len(train text), len(eval prompt))` words, which must be at least
/// `min_words` long (shorter texts are never matched).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecontaminateConfig {
    /// Files of evaluation prompts (any format and kind; their prompts are used).
    #[serde(default)]
    pub against: Vec<PathBuf>,
    #[serde(default = "default_ngram")]
    pub n: usize,
    #[serde(default = "default_min_words")]
    pub min_words: usize,
    #[serde(default)]
    pub scope: TextScope,
}

impl Default for DecontaminateConfig {
    fn default() -> Self {
        DecontaminateConfig {
            against: Vec::new(),
            n: default_ngram(),
            min_words: default_min_words(),
            scope: TextScope::All,
        }
    }
}

fn default_ngram() -> usize {
    13
}

fn default_min_words() -> usize {
    5
}

/// Exact duplicates: the same normalised text (lower case, punctuation
/// dropped, whitespace collapsed; roles included) by a 128-bit hash.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactDedupConfig {
    #[serde(default)]
    pub scope: TextScope,
}

/// Near duplicates: MinHash signatures over word shingles, candidates found
/// by LSH banding, then removed when the signatures' estimated Jaccard
/// similarity with an earlier kept row is at least `threshold`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NearDedupConfig {
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Words per shingle.
    #[serde(default = "default_shingle")]
    pub shingle: usize,
    /// MinHash permutations (signature length).
    #[serde(default = "default_permutations")]
    pub permutations: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub scope: TextScope,
}

impl Default for NearDedupConfig {
    fn default() -> Self {
        NearDedupConfig {
            threshold: default_threshold(),
            shingle: default_shingle(),
            permutations: default_permutations(),
            seed: 0,
            scope: TextScope::All,
        }
    }
}

fn default_threshold() -> f64 {
    0.8
}

fn default_shingle() -> usize {
    5
}

fn default_permutations() -> usize {
    128
}

/// Why a row was removed.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The filter's name: `length`, `pii`, `self_identification`,
    /// `decontaminate`, `exact_dedup`, `near_dedup`.
    pub filter: &'static str,
    pub reason: String,
}

/// A removed row with its reason, for review.
#[derive(Clone, Debug)]
pub struct Removed {
    pub example: Example,
    pub filter: &'static str,
    pub reason: String,
}

impl Removed {
    /// One JSON object: filter, reason, file, row, and the record in
    /// canonical columns.
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("filter".into(), Value::from(self.filter));
        o.insert("reason".into(), Value::from(self.reason.clone()));
        o.insert("file".into(), Value::from(self.example.origin.file.display().to_string()));
        o.insert("row".into(), Value::from(self.example.origin.row));
        o.insert("record".into(), self.example.to_json());
        Value::Object(o)
    }
}

/// Counts per filter, and the removed rows when asked for.
#[derive(Clone, Debug, Default)]
pub struct FilterReport {
    pub input: usize,
    pub kept: usize,
    /// Rows removed per filter, in pipeline order (filters that ran and
    /// removed nothing are listed with 0).
    pub removed_by: Vec<(&'static str, usize)>,
    /// The removed rows, when `keep_removed` is set.
    pub removed: Vec<Removed>,
}

impl FilterReport {
    pub fn total_removed(&self) -> usize {
        self.removed_by.iter().map(|(_, n)| n).sum()
    }

    /// Count one removal (and keep the row if `keep`).
    pub fn record(&mut self, rejection: Rejection, example: &Example, keep: bool) {
        if let Some(slot) = self.removed_by.iter_mut().find(|(f, _)| *f == rejection.filter) {
            slot.1 += 1;
        } else {
            self.removed_by.push((rejection.filter, 1));
        }
        if keep {
            self.removed.push(Removed {
                example: example.clone(),
                filter: rejection.filter,
                reason: rejection.reason,
            });
        }
    }

    /// Removed rows as JSONL for review (see [`Removed::to_json`]).
    pub fn write_removed(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let file =
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        for r in &self.removed {
            serde_json::to_writer(&mut w, &r.to_json())
                .and_then(|_| w.write_all(b"\n").map_err(serde_json::Error::io))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        w.flush().with_context(|| format!("cannot write {}", path.display()))
    }
}

impl fmt::Display for FilterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "filters: {} rows in, {} kept, {} removed", self.input, self.kept, self.total_removed())?;
        for (name, n) in &self.removed_by {
            write!(f, "\n  {name:<20} {n:>8}")?;
        }
        Ok(())
    }
}

/// Filters compiled from a [`FilterConfig`], with the dedup state.
pub struct Filters {
    length: Option<LengthConfig>,
    pii: Option<Pii>,
    self_id: Option<SelfId>,
    decontaminate: Option<Decontaminator>,
    exact: Option<ExactDedup>,
    near: Option<NearDedup>,
    keep_removed: bool,
}

impl Filters {
    /// Compile the configuration; decontamination files are read from
    /// paths relative to `base_dir`.
    pub fn new(config: &FilterConfig, base_dir: &Path) -> Result<Filters> {
        let decontaminate = match &config.decontaminate {
            None => None,
            Some(d) => {
                if d.against.is_empty() {
                    bail!("decontaminate: `against` names no evaluation files; list the files whose prompts training data must not overlap");
                }
                let mut prompts = Vec::new();
                for p in &d.against {
                    let path = base_dir.join(p);
                    let data = read_dataset(
                        &path,
                        &ReadOptions { kind: Some(RecordKind::PromptOnly), ..ReadOptions::default() },
                    )
                    .with_context(|| {
                        format!("decontaminate: cannot read evaluation prompts from {}", path.display())
                    })?;
                    prompts.extend(data.examples.iter().map(|e| {
                        e.record
                            .prompt_messages()
                            .iter()
                            .map(|m| m.content.as_str())
                            .collect::<Vec<_>>()
                            .join("\n")
                    }));
                }
                Some(Decontaminator::new(&prompts, d)?)
            }
        };
        Self::build(config, decontaminate)
    }

    /// Compile with the evaluation prompts given directly (the config's
    /// `against` files, if any, are not read).
    pub fn with_eval_prompts(config: &FilterConfig, eval_prompts: &[String]) -> Result<Filters> {
        let decontaminate = match &config.decontaminate {
            None => None,
            Some(d) => Some(Decontaminator::new(eval_prompts, d)?),
        };
        Self::build(config, decontaminate)
    }

    fn build(config: &FilterConfig, decontaminate: Option<Decontaminator>) -> Result<Filters> {
        if let Some(l) = &config.length {
            if let (Some(min), Some(max)) = (l.min, l.max) {
                if min > max {
                    bail!("length: min ({min}) is larger than max ({max})");
                }
            }
            if l.min.is_none() && l.max.is_none() {
                bail!("length: set `min`, `max` or both");
            }
        }
        Ok(Filters {
            length: config.length.clone(),
            pii: config.pii.as_ref().map(Pii::new).transpose()?,
            self_id: config.self_identification.as_ref().map(SelfId::new).transpose()?,
            decontaminate,
            exact: config.exact_dedup.as_ref().map(|c| ExactDedup { scope: c.scope, seen: HashMap::new() }),
            near: config.near_dedup.as_ref().map(NearDedup::new).transpose()?,
            keep_removed: config.keep_removed,
        })
    }

    /// The names of the filters that run, in order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.length.is_some() {
            v.push("length");
        }
        if self.pii.is_some() {
            v.push("pii");
        }
        if self.self_id.is_some() {
            v.push("self_identification");
        }
        if self.decontaminate.is_some() {
            v.push("decontaminate");
        }
        if self.exact.is_some() {
            v.push("exact_dedup");
        }
        if self.near.is_some() {
            v.push("near_dedup");
        }
        v
    }

    pub fn keep_removed(&self) -> bool {
        self.keep_removed
    }

    /// An empty report listing the filters that run.
    pub fn new_report(&self) -> FilterReport {
        FilterReport {
            removed_by: self.names().into_iter().map(|n| (n, 0)).collect(),
            ..FilterReport::default()
        }
    }

    /// Check one row; `None` keeps it (and the deduplicators remember it).
    pub fn check(&mut self, ex: &Example) -> Option<Rejection> {
        if let Some(l) = &self.length {
            if let Some(reason) = check_length(l, &ex.record) {
                return Some(Rejection { filter: "length", reason });
            }
        }
        if let Some(p) = &self.pii {
            if let Some(reason) = p.check(&ex.record) {
                return Some(Rejection { filter: "pii", reason });
            }
        }
        if let Some(s) = &self.self_id {
            if let Some(reason) = s.check(&ex.record) {
                return Some(Rejection { filter: "self_identification", reason });
            }
        }
        if let Some(d) = &self.decontaminate {
            if let Some(reason) = d.check(&ex.record) {
                return Some(Rejection { filter: "decontaminate", reason });
            }
        }
        // The deduplicators look before they remember, and only remember
        // rows that every filter keeps.
        let exact_key = match &self.exact {
            Some(e) => {
                let key = e.key(&ex.record);
                if let Some(first) = e.seen.get(&key) {
                    return Some(Rejection {
                        filter: "exact_dedup",
                        reason: format!("exact duplicate of {first}"),
                    });
                }
                Some(key)
            }
            None => None,
        };
        if let Some(n) = &mut self.near {
            if let Some(reason) = n.check_and_insert(ex) {
                return Some(Rejection { filter: "near_dedup", reason });
            }
        }
        if let (Some(e), Some(key)) = (&mut self.exact, exact_key) {
            e.seen.insert(key, format!("{} row {}", ex.origin.file.display(), ex.origin.row));
        }
        None
    }

    /// Filter a list; an empty result is an error that says which filter
    /// removed how much.
    pub fn apply(&mut self, examples: Vec<Example>) -> Result<(Vec<Example>, FilterReport)> {
        let mut report = self.new_report();
        report.input = examples.len();
        let mut kept = Vec::with_capacity(examples.len());
        for ex in examples {
            match self.check(&ex) {
                None => kept.push(ex),
                Some(r) => report.record(r, &ex, self.keep_removed),
            }
        }
        report.kept = kept.len();
        if kept.is_empty() {
            bail!("the filters removed every row ({report}); loosen them or check the data");
        }
        Ok((kept, report))
    }
}

fn scoped(record: &Record, scope: TextScope) -> impl Iterator<Item = &Message> {
    record.all_messages().into_iter().filter(move |m| scope.includes(m))
}

fn check_length(cfg: &LengthConfig, record: &Record) -> Option<String> {
    let unit = match cfg.unit {
        LengthUnit::Chars => "characters",
        LengthUnit::Words => "words",
    };
    let sequences = record.sequences();
    let many = sequences.len() > 1;
    for (i, seq) in sequences.iter().enumerate() {
        let len: usize = seq
            .iter()
            .filter(|m| cfg.scope.includes(m))
            .map(|m| match cfg.unit {
                LengthUnit::Chars => m.content.chars().count(),
                LengthUnit::Words => word_count(&m.content),
            })
            .sum();
        let which = match (many, i) {
            (false, _) => String::new(),
            (true, 0) => " (chosen)".to_string(),
            (true, _) => " (rejected)".to_string(),
        };
        if let Some(min) = cfg.min {
            if len < min {
                return Some(format!("{len} {unit}{which}, below the minimum {min}"));
            }
        }
        if let Some(max) = cfg.max {
            if len > max {
                return Some(format!("{len} {unit}{which}, above the maximum {max}"));
            }
        }
    }
    None
}

/// Mask all but the first and last characters of a match for reports.
fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 4 {
        return "*".repeat(chars.len());
    }
    let mut out = String::new();
    for (i, c) in chars.iter().enumerate() {
        if i < 2 || i + 2 >= chars.len() || !c.is_alphanumeric() {
            out.push(*c);
        } else {
            out.push('*');
        }
    }
    out
}

struct Pii {
    cfg: PiiConfig,
    email: Regex,
    phone: Regex,
    card: Regex,
    ssn: Regex,
    iban: Regex,
}

impl Pii {
    fn new(cfg: &PiiConfig) -> Result<Pii> {
        let re = |p: &str| Regex::new(p).with_context(|| format!("pii pattern {p}"));
        Ok(Pii {
            cfg: cfg.clone(),
            email: re(r"(?i)\b[a-z0-9._%+-]+@([a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,})\b")?,
            phone: re(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}")?,
            card: re(r"\b(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{1,7}|\d{4}[ -]\d{6}[ -]\d{5})\b")?,
            ssn: re(r"\b(\d{3})-(\d{2})-(\d{4})\b")?,
            iban: re(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")?,
        })
    }

    fn check(&self, record: &Record) -> Option<String> {
        for m in scoped(record, self.cfg.scope) {
            if let Some(found) = self.find(&m.content) {
                return Some(format!("{found} in a {} message", m.role));
            }
        }
        None
    }

    /// The first kind of personal information in `text`, described with a
    /// masked copy of the match.
    fn find(&self, text: &str) -> Option<String> {
        if self.cfg.emails {
            for c in self.email.captures_iter(text) {
                let domain = c.get(1).map_or("", |d| d.as_str()).to_lowercase();
                let allowed = self.cfg.allow_email_domains.iter().any(|a| {
                    let a = a.to_lowercase();
                    domain == a || domain.ends_with(&format!(".{a}"))
                });
                if !allowed {
                    return Some(format!("email address {}", mask(&c[0])));
                }
            }
        }
        if self.cfg.cards {
            for m in self.card.find_iter(text) {
                let digits: Vec<u32> = m.as_str().chars().filter_map(|c| c.to_digit(10)).collect();
                if (13..=19).contains(&digits.len())
                    && digits.iter().any(|d| *d != digits[0])
                    && luhn_valid(&digits)
                {
                    return Some(format!("card-like number {}", mask(m.as_str())));
                }
            }
        }
        if self.cfg.ids {
            for c in self.ssn.captures_iter(text) {
                let area: u32 = c[1].parse().unwrap_or(0);
                let group: u32 = c[2].parse().unwrap_or(0);
                let serial: u32 = c[3].parse().unwrap_or(0);
                if area != 0 && area != 666 && area < 900 && group != 0 && serial != 0 {
                    return Some(format!("social-security-like number {}", mask(&c[0])));
                }
            }
            for m in self.iban.find_iter(text) {
                if iban_valid(m.as_str()) {
                    return Some(format!("IBAN-like number {}", mask(m.as_str())));
                }
            }
        }
        if self.cfg.phones {
            for m in self.phone.find_iter(text) {
                let s = m.as_str();
                let before = text[..m.start()].chars().next_back();
                let after = text[m.end()..].chars().next();
                if before.is_some_and(|c| c.is_alphanumeric()) || after.is_some_and(|c| c.is_alphanumeric()) {
                    continue;
                }
                let digits = s.chars().filter(char::is_ascii_digit).count();
                let marked = s.contains('+') || s.contains('(') || s.matches(['-', '.']).count() >= 2;
                if (9..=15).contains(&digits) && marked {
                    return Some(format!("phone number {}", mask(s)));
                }
            }
        }
        None
    }
}

/// The Luhn checksum of a card number's digits.
pub fn luhn_valid(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    !digits.is_empty() && sum % 10 == 0
}

/// The IBAN mod-97 check (spaces ignored).
pub fn iban_valid(s: &str) -> bool {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&s.len()) || !s.is_ascii() {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem: u64 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c.to_digit(36) {
            Some(v) => v as u64,
            None => return false,
        };
        rem = if v >= 10 { (rem * 100 + v) % 97 } else { (rem * 10 + v) % 97 };
    }
    rem == 1
}

struct SelfId {
    claim: Regex,
    creators: Regex,
}

impl SelfId {
    fn new(cfg: &SelfIdConfig) -> Result<SelfId> {
        let mut names: Vec<String> = cfg
            .names
            .iter()
            .chain(&cfg.extra_names)
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            bail!("self_identification: `names` is empty; list the identities the model must not claim");
        }
        // Longest first, so "GPT-4o" wins over "GPT-4".
        names.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        names.dedup();
        let alt = names
            .iter()
            .map(|n| regex::escape(n).replace(r"\ ", r"\s+").replace(' ', r"\s+"))
            .collect::<Vec<_>>()
            .join("|");
        // Words that may stand between a first-person opener and the name.
        let filler = "an?|the|large|ai|language|model|models|assistant|chatbot|chat|bot|system|\
                      trained|developed|created|made|built|designed|programmed|by|version|of|\
                      based|on|powered|from|called|named|known|as|virtual|helpful|conversational|\
                      research|team|at|company|engineers|researchers|product";
        let claim = format!(
            r"(?i)\b(?:i\s+am|i'm|i’m|i\s+was|my\s+name\s+is|call\s+me|this\s+is|as\s+an?)\s+(?:(?:{filler})[\s,]+){{0,8}}(?:{alt})(?:\b|$)"
        );
        let creators = format!(
            r"(?i)\bmy\s+(?:creators?|developers?|makers?|trainers?|training\s+team)\s+(?:at|from|is|are|was|were)\s+(?:{alt})(?:\b|$)"
        );
        Ok(SelfId {
            claim: Regex::new(&claim).context("self_identification: a name makes a bad pattern")?,
            creators: Regex::new(&creators).context("self_identification: a name makes a bad pattern")?,
        })
    }

    fn check(&self, record: &Record) -> Option<String> {
        let trained: Vec<&Message> = match record {
            Record::Preference { prompt, chosen, .. } => prompt.iter().chain(chosen).collect(),
            other => other.all_messages(),
        };
        for m in trained.into_iter().filter(|m| m.is_model()) {
            if let Some(hit) = self.claim.find(&m.content).or_else(|| self.creators.find(&m.content)) {
                let snippet: String = hit.as_str().chars().take(80).collect();
                return Some(format!("the model claims another identity: {snippet:?}"));
            }
        }
        None
    }
}

/// N-gram overlap with evaluation prompts.
pub struct Decontaminator {
    n: usize,
    min_words: usize,
    scope: TextScope,
    /// n-grams of eval prompts with at least n words.
    long: HashSet<u64>,
    /// Whole short eval prompts (min_words ≤ len < n), by length.
    short: BTreeMap<usize, HashSet<u64>>,
    /// Word hashes of every eval prompt, to match short training texts.
    evals: Vec<Vec<u64>>,
    /// L-grams of all eval prompts, built on demand per length L < n.
    by_len: std::cell::RefCell<HashMap<usize, HashSet<u64>>>,
}

impl Decontaminator {
    pub fn new(eval_prompts: &[String], cfg: &DecontaminateConfig) -> Result<Decontaminator> {
        if cfg.n == 0 {
            bail!("decontaminate: `n` must be at least 1");
        }
        if cfg.min_words == 0 || cfg.min_words > cfg.n {
            bail!("decontaminate: `min_words` ({}) must be between 1 and n ({})", cfg.min_words, cfg.n);
        }
        let mut long = HashSet::new();
        let mut short: BTreeMap<usize, HashSet<u64>> = BTreeMap::new();
        let mut evals = Vec::with_capacity(eval_prompts.len());
        for p in eval_prompts {
            let w = word_hashes(p);
            if w.len() >= cfg.n {
                long.extend(ngram_hashes(&w, cfg.n));
            } else if w.len() >= cfg.min_words {
                short.entry(w.len()).or_default().extend(ngram_hashes(&w, w.len()));
            }
            evals.push(w);
        }
        Ok(Decontaminator {
            n: cfg.n,
            min_words: cfg.min_words,
            scope: cfg.scope,
            long,
            short,
            evals,
            by_len: std::cell::RefCell::new(HashMap::new()),
        })
    }

    /// Whether a text overlaps an evaluation prompt, and on how many words.
    pub fn overlaps(&self, text: &str) -> Option<usize> {
        let w = word_hashes(text);
        if w.len() < self.min_words {
            return None;
        }
        if w.len() >= self.n && ngram_hashes(&w, self.n).iter().any(|h| self.long.contains(h)) {
            return Some(self.n);
        }
        // Short eval prompts inside the text.
        for (&len, set) in &self.short {
            if len > w.len() {
                break;
            }
            if ngram_hashes(&w, len).iter().any(|h| set.contains(h)) {
                return Some(len);
            }
        }
        // A short text inside an eval prompt.
        if w.len() < self.n {
            let len = w.len();
            let whole = ngram_hashes(&w, len)[0];
            let mut cache = self.by_len.borrow_mut();
            let set = cache
                .entry(len)
                .or_insert_with(|| self.evals.iter().flat_map(|e| ngram_hashes(e, len)).collect());
            if set.contains(&whole) {
                return Some(len);
            }
        }
        None
    }

    fn check(&self, record: &Record) -> Option<String> {
        for m in scoped(record, self.scope) {
            if let Some(k) = self.overlaps(&m.content) {
                return Some(format!("a {} message shares a {k}-word run with an evaluation prompt", m.role));
            }
        }
        None
    }
}

struct ExactDedup {
    scope: TextScope,
    /// hash → where it was first seen
    seen: HashMap<u128, String>,
}

impl ExactDedup {
    fn key(&self, record: &Record) -> u128 {
        let mut s = String::new();
        for m in scoped(record, self.scope) {
            s.push_str(&m.role);
            s.push('\u{1}');
            s.push_str(&normalize(&m.content));
            s.push('\u{2}');
        }
        hash128(&s)
    }
}

struct NearDedup {
    threshold: f64,
    shingle: usize,
    scope: TextScope,
    seeds: Vec<u64>,
    bands: usize,
    rows: usize,
    /// (band, band hash) → indices into `kept`
    buckets: HashMap<(usize, u64), Vec<usize>>,
    kept: Vec<(Vec<u64>, String)>,
}

impl NearDedup {
    fn new(cfg: &NearDedupConfig) -> Result<NearDedup> {
        if !(cfg.threshold > 0.0 && cfg.threshold <= 1.0) {
            bail!("near_dedup: threshold {} must be in (0, 1]", cfg.threshold);
        }
        if cfg.shingle == 0 || cfg.permutations < 2 {
            bail!("near_dedup: `shingle` must be ≥ 1 and `permutations` ≥ 2");
        }
        let (bands, rows) = lsh_params(cfg.threshold, cfg.permutations);
        let seeds = (0..cfg.permutations as u64)
            .map(|i| mix64(cfg.seed ^ mix64(i.wrapping_add(0x6e65_6172))))
            .collect();
        Ok(NearDedup {
            threshold: cfg.threshold,
            shingle: cfg.shingle,
            scope: cfg.scope,
            seeds,
            bands,
            rows,
            buckets: HashMap::new(),
            kept: Vec::new(),
        })
    }

    fn signature(&self, record: &Record) -> Option<Vec<u64>> {
        let mut shingles: HashSet<u64> = HashSet::new();
        for m in scoped(record, self.scope) {
            let w = word_hashes(&m.content);
            if w.is_empty() {
                continue;
            }
            let k = self.shingle.min(w.len());
            shingles.extend(ngram_hashes(&w, k));
        }
        if shingles.is_empty() {
            return None;
        }
        Some(
            self.seeds
                .iter()
                .map(|&seed| shingles.iter().map(|&s| mix64(s ^ seed)).min().unwrap_or(u64::MAX))
                .collect(),
        )
    }

    fn check_and_insert(&mut self, ex: &Example) -> Option<String> {
        let sig = self.signature(&ex.record)?;
        let band_keys: Vec<(usize, u64)> = (0..self.bands)
            .map(|b| {
                let part = &sig[b * self.rows..(b + 1) * self.rows];
                let h = part.iter().fold(0x62616e64u64 ^ b as u64, |acc, &x| mix64(acc ^ x));
                (b, h)
            })
            .collect();
        let mut best: Option<(f64, usize)> = None;
        let mut seen = HashSet::new();
        for key in &band_keys {
            if let Some(list) = self.buckets.get(key) {
                for &j in list {
                    if !seen.insert(j) {
                        continue;
                    }
                    let other = &self.kept[j].0;
                    let same = sig.iter().zip(other).filter(|(a, b)| a == b).count();
                    let sim = same as f64 / sig.len() as f64;
                    if sim >= self.threshold && best.is_none_or(|(s, _)| sim > s) {
                        best = Some((sim, j));
                    }
                }
            }
        }
        if let Some((sim, j)) = best {
            return Some(format!(
                "near duplicate of {} (estimated Jaccard similarity {sim:.2})",
                self.kept[j].1
            ));
        }
        let idx = self.kept.len();
        for key in band_keys {
            self.buckets.entry(key).or_default().push(idx);
        }
        self.kept.push((sig, format!("{} row {}", ex.origin.file.display(), ex.origin.row)));
        None
    }
}

/// LSH bands and rows for a similarity threshold: the (b, r) with b·r ≤
/// permutations that minimise the weighted false-positive and false-negative
/// areas of the candidate curve 1 − (1 − s^r)^b, false negatives weighted 4×
/// (candidates are verified on the full signature, so a false positive only
/// costs time).
pub fn lsh_params(threshold: f64, permutations: usize) -> (usize, usize) {
    let integrate = |a: f64, b: f64, f: &dyn Fn(f64) -> f64| {
        let steps = 200;
        let h = (b - a) / steps as f64;
        (0..steps).map(|i| f(a + (i as f64 + 0.5) * h) * h).sum::<f64>()
    };
    let mut best = (1, permutations, f64::INFINITY);
    for b in 1..=permutations {
        let max_r = permutations / b;
        for r in 1..=max_r {
            let p = |s: f64| 1.0 - (1.0 - s.powi(r as i32)).powi(b as i32);
            let fp = integrate(0.0, threshold, &|s| p(s));
            let fneg = integrate(threshold, 1.0, &|s| 1.0 - p(s));
            let cost = 0.2 * fp + 0.8 * fneg;
            if cost < best.2 {
                best = (b, r, cost);
            }
        }
    }
    (best.0, best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_and_iban_checks() {
        let d = |s: &str| s.chars().filter_map(|c| c.to_digit(10)).collect::<Vec<_>>();
        assert!(luhn_valid(&d("4539 1488 0343 6467")));
        assert!(!luhn_valid(&d("4539 1488 0343 6468")));
        assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
        assert!(!iban_valid("GB82 WEST 1234 5698 7654 33"));
    }

    #[test]
    fn lsh_params_fit_the_signature() {
        for t in [0.5, 0.7, 0.8, 0.9] {
            let (b, r) = lsh_params(t, 128);
            assert!(b * r <= 128 && b >= 1 && r >= 1);
            // At twice the threshold's distance below it, few candidates; near 1, nearly all.
            let p = |s: f64| 1.0 - (1.0 - s.powi(r as i32)).powi(b as i32);
            assert!(p((t + 1.0) / 2.0) > 0.9, "t={t} b={b} r={r}");
        }
    }
}
