//! Programmatic checkers (`oracle:NAME`) for prompts with verifiable answers.
//!
//! An [`Oracle`] scores one answer, usually against the prompt's reference
//! answer (the `reference` column of the prompts file, also read from
//! `answer` or `solution`); as a judge, the answer with the higher score wins
//! and equal scores are a tie. Oracles live in a process-wide registry by
//! name. The built-in ones are generic:
//!
//! - `exact` — 1 when the answer equals the reference after normalising
//!   (case, surrounding white space and punctuation, runs of white space),
//!   else 0;
//! - `contains` — 1 when the normalised answer contains the normalised
//!   reference, else 0;
//! - `number` — 1 when the last number in the answer equals the reference
//!   number (within 1e-6 relative), else 0.
//!
//! A task with its own checker registers it before judging:
//!
//! ```
//! use judge::oracle::{register_oracle, Oracle};
//! struct EvenLength;
//! impl Oracle for EvenLength {
//!     fn score(&self, _q: &str, answer: &str, _reference: Option<&str>) -> anyhow::Result<f64> {
//!         Ok(if answer.len() % 2 == 0 { 1.0 } else { 0.0 })
//!     }
//!     fn needs_reference(&self) -> bool { false }
//! }
//! register_oracle("even-length", std::sync::Arc::new(EvenLength));
//! assert!(judge::oracle::get_oracle("even-length").is_ok());
//! ```

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A programmatic checker.
pub trait Oracle: Send + Sync {
    /// A score for `answer` to `question` (higher is better; the built-ins
    /// give 0 or 1). `reference` is the prompt's reference answer, if any.
    fn score(&self, question: &str, answer: &str, reference: Option<&str>) -> Result<f64>;
    /// Whether [`Oracle::score`] needs a reference answer (checked before
    /// judging starts, so a prompts file without one fails early).
    fn needs_reference(&self) -> bool {
        true
    }
}

type Registry = Mutex<BTreeMap<String, Arc<dyn Oracle>>>;

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        let mut m: BTreeMap<String, Arc<dyn Oracle>> = BTreeMap::new();
        m.insert("exact".into(), Arc::new(Exact));
        m.insert("tasks".into(), Arc::new(Tasks));
        m.insert("contains".into(), Arc::new(Contains));
        m.insert("number".into(), Arc::new(LastNumber));
        Mutex::new(m)
    })
}

/// Registers (or replaces) an oracle under `name`.
pub fn register_oracle(name: &str, oracle: Arc<dyn Oracle>) {
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    reg.insert(name.to_string(), oracle);
}

/// The names of the registered oracles, sorted.
pub fn oracle_names() -> Vec<String> {
    registry().lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
}

/// The oracle registered under `name`.
pub fn get_oracle(name: &str) -> Result<Arc<dyn Oracle>> {
    let reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    match reg.get(name) {
        Some(o) => Ok(o.clone()),
        None => bail!(
            "unknown oracle {name:?}; registered oracles: {}",
            reg.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Lower case, white space runs collapsed, surrounding white space and
/// punctuation removed.
pub fn normalize(s: &str) -> String {
    let words: Vec<String> = s.split_whitespace().map(str::to_lowercase).collect();
    words.join(" ").trim_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace()).to_string()
}

fn need<'a>(reference: Option<&'a str>, oracle: &str) -> Result<&'a str> {
    match reference {
        Some(r) => Ok(r),
        None => {
            bail!("oracle {oracle} needs a reference answer; add a `reference` column to the prompts file")
        }
    }
}

/// `exact`: see the module documentation.
pub struct Exact;
impl Oracle for Exact {
    fn score(&self, _q: &str, answer: &str, reference: Option<&str>) -> Result<f64> {
        let r = need(reference, "exact")?;
        Ok(f64::from(u8::from(normalize(answer) == normalize(r))))
    }
}

/// `tasks`: the built-in verifiable tasks (`datasets::tasks`); the reference
/// is recomputed from the question, so no reference column is needed.
pub struct Tasks;
impl Oracle for Tasks {
    fn score(&self, question: &str, answer: &str, _reference: Option<&str>) -> Result<f64> {
        let ok = datasets::tasks::check(question, answer).with_context(|| {
            format!("oracle tasks: {question:?} is not a built-in task prompt (see datasets::tasks)")
        })?;
        Ok(f64::from(u8::from(ok)))
    }
    fn needs_reference(&self) -> bool {
        false
    }
}

/// `contains`: see the module documentation.
pub struct Contains;
impl Oracle for Contains {
    fn score(&self, _q: &str, answer: &str, reference: Option<&str>) -> Result<f64> {
        let r = normalize(need(reference, "contains")?);
        Ok(f64::from(u8::from(!r.is_empty() && normalize(answer).contains(&r))))
    }
}

/// The numbers in `s` (optional sign, digits, optional decimals; thousands
/// separators `,` between digit groups are dropped).
pub fn numbers(s: &str) -> Vec<f64> {
    let mut out = vec![];
    let mut cur = String::new();
    let chars: Vec<char> = s.chars().collect();
    let flush = |cur: &mut String, out: &mut Vec<f64>| {
        let t = cur.trim_end_matches('.');
        if let Ok(v) = t.parse::<f64>() {
            out.push(v);
        }
        cur.clear();
    };
    for (i, &c) in chars.iter().enumerate() {
        let next_digit = chars.get(i + 1).is_some_and(|c| c.is_ascii_digit());
        let prev_digit = i > 0 && chars[i - 1].is_ascii_digit();
        let starts_negative = c == '-' && cur.is_empty() && next_digit;
        let decimal_point = c == '.' && prev_digit && next_digit && !cur.contains('.');
        if c.is_ascii_digit() || starts_negative || decimal_point {
            cur.push(c);
        } else if c == ',' && prev_digit && next_digit && !cur.is_empty() {
            // thousands separator
        } else if !cur.is_empty() {
            flush(&mut cur, &mut out);
        }
    }
    if !cur.is_empty() {
        flush(&mut cur, &mut out);
    }
    out
}

/// `number`: see the module documentation.
pub struct LastNumber;
impl Oracle for LastNumber {
    fn score(&self, _q: &str, answer: &str, reference: Option<&str>) -> Result<f64> {
        let r = need(reference, "number")?;
        let Some(want) = numbers(r).last().copied() else {
            bail!("oracle number: the reference {r:?} holds no number")
        };
        Ok(match numbers(answer).last() {
            Some(&got) => f64::from(u8::from((got - want).abs() <= 1e-6 * want.abs().max(1.0))),
            None => 0.0,
        })
    }
}
