//! The judge interface and the both-orders method.
//!
//! Every pair is shown to the judge twice: candidate as A and baseline as B,
//! then swapped. A verdict that cannot be parsed is asked again once (with
//! `attempt` = 1, which sampling judges use to draw differently); if it still
//! cannot be parsed it is recorded as unparseable and the pair is excluded
//! from the win rate, never guessed. Two verdicts that agree give the
//! outcome; two that disagree (including a win against a tie) give a tie.

use crate::stats::Outcome;
use crate::verdict::Verdict;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// What a judge sees: the question and two answers in the order shown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shown<'a> {
    /// The prompt as text (turns joined; see [`crate::harness::question_text`]).
    pub question: &'a str,
    /// The prompt's turns, for judges that score dialogues (reward models).
    pub prompt: &'a [lm::Message],
    pub answer_a: &'a str,
    pub answer_b: &'a str,
    pub reference: Option<&'a str>,
}

/// One judge output: the verdict, `None` when unparseable, and the raw text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawVerdict {
    pub verdict: Option<Verdict>,
    pub raw: String,
}

impl RawVerdict {
    pub fn new(verdict: Option<Verdict>, raw: impl Into<String>) -> Self {
        RawVerdict { verdict, raw: raw.into() }
    }
}

/// A pairwise judge.
pub trait Judge {
    /// The spec it was built from, for reports.
    fn name(&self) -> String;
    /// One verdict per item, in order. `attempt` is 0, then 1 for the
    /// retry of unparseable verdicts.
    fn judge(&self, items: &[Shown], attempt: u32) -> Result<Vec<RawVerdict>>;
    /// How many items the judge may be given per call with verdicts that
    /// do not depend on the other items of the call (its batch size, a
    /// multiple of it, or any number for independent requests), so that
    /// judging can report progress between calls; `None` (the default):
    /// all items in one call.
    fn chunk_items(&self) -> Option<usize> {
        None
    }
}

/// A pair to judge: the candidate's and the baseline's answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair<'a> {
    pub question: &'a str,
    pub prompt: &'a [lm::Message],
    pub candidate: &'a str,
    pub baseline: &'a str,
    pub reference: Option<&'a str>,
}

/// One order's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderResult {
    /// The verdict as the judge gave it (A = the answer shown first).
    pub verdict: Option<Verdict>,
    /// The judge's raw output (the retry's, when retried).
    pub raw: String,
    /// The first attempt's raw output, when it was unparseable and retried.
    pub first_raw: Option<String>,
}

/// Both orders of one pair and the outcome for the candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairResult {
    /// Candidate shown as A.
    pub candidate_first: OrderResult,
    /// Baseline shown as A.
    pub baseline_first: OrderResult,
    /// None when either order stayed unparseable (the pair is excluded).
    pub outcome: Option<Outcome>,
    /// Whether the two orders gave the same preference (None when excluded).
    pub orders_agree: Option<bool>,
}

/// The candidate's outcome from a verdict in which the candidate was shown
/// first (`candidate_first`) or second.
pub fn outcome_of(v: Verdict, candidate_first: bool) -> Outcome {
    let v = if candidate_first { v } else { v.swapped() };
    match v {
        Verdict::A => Outcome::Win,
        Verdict::B => Outcome::Loss,
        Verdict::Tie => Outcome::Tie,
    }
}

/// Combines the two orders: agreement gives the shared outcome, anything
/// else a tie; `None` when either is unparseable.
pub fn combine(
    candidate_first: Option<Verdict>,
    baseline_first: Option<Verdict>,
) -> (Option<Outcome>, Option<bool>) {
    match (candidate_first, baseline_first) {
        (Some(a), Some(b)) => {
            let (x, y) = (outcome_of(a, true), outcome_of(b, false));
            if x == y {
                (Some(x), Some(true))
            } else {
                (Some(Outcome::Tie), Some(false))
            }
        }
        _ => (None, None),
    }
}

fn checked(judge: &dyn Judge, items: &[Shown], attempt: u32) -> Result<Vec<RawVerdict>> {
    let out = judge.judge(items, attempt)?;
    if out.len() != items.len() {
        bail!("judge {} returned {} verdicts for {} items", judge.name(), out.len(), items.len());
    }
    Ok(out)
}

/// Judges every pair in both orders, retrying unparseable verdicts once.
pub fn judge_pairs(judge: &dyn Judge, pairs: &[Pair]) -> Result<Vec<PairResult>> {
    judge_pairs_progress(judge, pairs, &mut |_| {})
}

/// The pair results of the verdicts of the first `2 × k` items (`k`
/// pairs, both orders each), before any retry.
fn first_results(verdicts: &[RawVerdict]) -> Vec<PairResult> {
    verdicts
        .chunks_exact(2)
        .map(|ab| {
            let (a, b) = (&ab[0], &ab[1]);
            let (outcome, orders_agree) = combine(a.verdict, b.verdict);
            PairResult {
                candidate_first: OrderResult { verdict: a.verdict, raw: a.raw.clone(), first_raw: None },
                baseline_first: OrderResult { verdict: b.verdict, raw: b.raw.clone(), first_raw: None },
                outcome,
                orders_agree,
            }
        })
        .collect()
}

/// [`judge_pairs`], calling `progress` with the results of the pairs
/// judged so far (first attempts, before retries) after each call of a
/// judge that takes its items in chunks ([`Judge::chunk_items`]), so that
/// a run that fails half-way can show what it judged. The verdicts are
/// the same as [`judge_pairs`]'s.
pub fn judge_pairs_progress(
    judge: &dyn Judge,
    pairs: &[Pair],
    progress: &mut dyn FnMut(&[PairResult]),
) -> Result<Vec<PairResult>> {
    let mut shown = Vec::with_capacity(pairs.len() * 2);
    for p in pairs {
        let base = Shown {
            question: p.question,
            prompt: p.prompt,
            answer_a: p.candidate,
            answer_b: p.baseline,
            reference: p.reference,
        };
        shown.push(base);
        shown.push(Shown { answer_a: p.baseline, answer_b: p.candidate, ..base });
    }
    let mut first = match judge.chunk_items() {
        // Whole pairs per call, a multiple of the judge's chunk.
        Some(c) if shown.len() > 2 * c.max(1) => {
            let mut out = Vec::with_capacity(shown.len());
            for chunk in shown.chunks(2 * c.max(1)) {
                out.extend(checked(judge, chunk, 0)?);
                progress(&first_results(&out));
            }
            out
        }
        _ => checked(judge, &shown, 0)?,
    };
    let retry: Vec<usize> = (0..first.len()).filter(|&i| first[i].verdict.is_none()).collect();
    let mut first_raw: Vec<Option<String>> = vec![None; first.len()];
    if !retry.is_empty() {
        let again: Vec<Shown> = retry.iter().map(|&i| shown[i]).collect();
        let second = checked(judge, &again, 1)?;
        for (&i, r) in retry.iter().zip(second) {
            first_raw[i] = Some(std::mem::replace(&mut first[i], r).raw);
        }
    }
    let mut it = first.into_iter().zip(first_raw);
    let mut out = Vec::with_capacity(pairs.len());
    for _ in pairs {
        let (Some((a, a_first)), Some((b, b_first))) = (it.next(), it.next()) else {
            bail!("internal error: verdict count does not match the pairs");
        };
        let (outcome, orders_agree) = combine(a.verdict, b.verdict);
        out.push(PairResult {
            candidate_first: OrderResult { verdict: a.verdict, raw: a.raw, first_raw: a_first },
            baseline_first: OrderResult { verdict: b.verdict, raw: b.raw, first_raw: b_first },
            outcome,
            orders_agree,
        });
    }
    Ok(out)
}
