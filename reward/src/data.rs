//! From preference records to token sequences and batches.
//!
//! A side of a pair is `prompt + response` rendered by the dialogue formatter
//! (`<bos>`, the prompt turns, then the response turns each ending with
//! `<end_of_turn>\n`). A pair longer than the maximum length is either
//! truncated on the prompt side — the earliest prompt tokens after `<bos>`
//! are dropped, the same number from both sides, so that chosen and rejected
//! keep the same context and the responses stay whole — or dropped.
//!
//! A batch holds the chosen sides of its pairs, then their rejected sides,
//! right-padded: chosen and rejected go through the model together.

use anyhow::{bail, Context, Result};
use datasets::{Example, Record};
use lm::{Message, Tokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// What to do with a pair longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Drop the earliest prompt tokens after `<bos>` (the responses stay
    /// whole); a pair whose responses alone are too long is dropped.
    #[default]
    TruncatePrompt,
    /// Leave the pair out.
    Drop,
}

/// A formatted sequence and its prompt length: the one formatting of the
/// shared scoring path ([`lm::reward_score`]), which training uses too.
pub use lm::reward_score::Formatted;

/// Formats and tokenizes `prompt` followed by `response` (closed turns), as
/// [`lm::reward_score::format`] does for scoring.
pub fn format(tok: &Tokenizer, prompt: &[Message], response: &[Message]) -> Result<Formatted> {
    lm::reward_score::format(tok, prompt, response, true)
}

/// One preference pair ready for training or evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct PairTokens {
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
    pub margin: f64,
    pub category: Option<String>,
}

impl PairTokens {
    /// The longer side's length.
    pub fn len(&self) -> usize {
        self.chosen.len().max(self.rejected.len())
    }

    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty() && self.rejected.is_empty()
    }
}

/// What became of a pair under the length limit.
#[derive(Debug, Clone, PartialEq)]
pub enum Fit {
    Kept(PairTokens),
    Truncated(PairTokens),
    /// Too long under the `drop` policy.
    Dropped,
    /// Too long even with the whole prompt cut (the responses alone exceed
    /// the limit).
    ResponseTooLong,
}

/// Applies the length limit to a pair of formatted sides (which share their
/// prompt).
pub fn fit_pair(
    chosen: Formatted,
    rejected: Formatted,
    margin: f64,
    category: Option<String>,
    max_len: usize,
    policy: Truncation,
) -> Fit {
    let len = chosen.ids.len().max(rejected.ids.len());
    let pair =
        |c: Vec<i64>, r: Vec<i64>| PairTokens { chosen: c, rejected: r, margin, category: category.clone() };
    if len <= max_len {
        return Fit::Kept(pair(chosen.ids, rejected.ids));
    }
    if policy == Truncation::Drop {
        return Fit::Dropped;
    }
    let excess = len - max_len;
    let cuttable = chosen.prompt_len.min(rejected.prompt_len).saturating_sub(1);
    if excess > cuttable {
        return Fit::ResponseTooLong;
    }
    let cut = |mut ids: Vec<i64>| {
        ids.drain(1..1 + excess);
        ids
    };
    Fit::Truncated(pair(cut(chosen.ids), cut(rejected.ids)))
}

/// Formats both sides of a preference example.
pub fn format_pair(tok: &Tokenizer, ex: &Example) -> Result<(Formatted, Formatted, f64)> {
    let Record::Preference { prompt, chosen, rejected, margin } = &ex.record else {
        bail!(
            "{} row {}: a {} record, expected a preference pair (prompt, chosen, rejected)",
            ex.origin.file.display(),
            ex.origin.row,
            ex.record.kind()
        );
    };
    let at = |side: &str| format!("{} row {}, `{side}`", ex.origin.file.display(), ex.origin.row);
    let c = format(tok, prompt, chosen).with_context(|| at("chosen"))?;
    let r = format(tok, prompt, rejected).with_context(|| at("rejected"))?;
    Ok((c, r, margin.unwrap_or(0.0)))
}

/// Pairs ready to train on, with the counts of the length policy.
#[derive(Debug, Clone, Default)]
pub struct EncodedPairs {
    /// One entry per input example; `None` where the pair was left out.
    pub pairs: Vec<Option<PairTokens>>,
    pub truncated: usize,
    /// Left out under `drop`, or because the responses alone are too long.
    pub dropped: usize,
}

impl EncodedPairs {
    pub fn kept(&self) -> impl Iterator<Item = &PairTokens> {
        self.pairs.iter().flatten()
    }

    pub fn kept_count(&self) -> usize {
        self.pairs.iter().flatten().count()
    }
}

/// Formats `examples` and applies the length policy.
pub fn encode_pairs(
    tok: &Tokenizer,
    examples: &[&Example],
    max_len: usize,
    policy: Truncation,
) -> Result<EncodedPairs> {
    let mut out = EncodedPairs::default();
    for ex in examples {
        let (c, r, margin) = format_pair(tok, ex)?;
        match fit_pair(c, r, margin, ex.category.clone(), max_len, policy) {
            Fit::Kept(p) => out.pairs.push(Some(p)),
            Fit::Truncated(p) => {
                out.truncated += 1;
                out.pairs.push(Some(p));
            }
            Fit::Dropped | Fit::ResponseTooLong => {
                out.dropped += 1;
                out.pairs.push(None);
            }
        }
    }
    Ok(out)
}

/// The batches of one epoch as lists of pair indices: `order` is cut into
/// windows of `64 × batch_size` pairs, each sorted by length (longest first)
/// so that padding is small, then chunked into batches whose order is
/// shuffled from `seed` — a pure function of its inputs, so a resumed run
/// sees the same batches.
pub fn plan_epoch(lens: &[usize], order: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut sorted = Vec::with_capacity(order.len());
    for window in order.chunks(batch_size.max(1) * 64) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        sorted.extend(w);
    }
    let mut batches: Vec<Vec<usize>> = sorted.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect();
    batches.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    batches
}

/// Right-pads `seqs` into `ids` (B, T) int64 and `valid` (B, T) bool.
pub fn pad_right(seqs: &[&[i64]], pad: i64, device: Device) -> Result<(Tensor, Tensor)> {
    if seqs.is_empty() {
        bail!("empty batch");
    }
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        bail!("sequence {i} of the batch is empty");
    }
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let b = seqs.len();
    let mut ids = vec![pad; b * t];
    let mut valid = vec![false; b * t];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
        valid[r * t..r * t + s.len()].iter_mut().for_each(|v| *v = true);
    }
    let shape = [b as i64, t as i64];
    Ok((
        Tensor::from_slice(&ids).view(shape).to_device(device), // (B, T)
        Tensor::from_slice(&valid).view(shape).to_device(device), // (B, T)
    ))
}

/// Tensors of one micro-batch of P pairs.
pub struct PairBatch {
    /// (2P, T): rows 0..P the chosen sides, rows P..2P the rejected ones.
    pub ids: Tensor,
    /// (2P, T) bool: real tokens.
    pub valid: Tensor,
    /// (P,) f32.
    pub margin: Tensor,
    pub pairs: usize,
    /// Real tokens in the batch.
    pub tokens: usize,
}

/// Builds the batch of `pairs` (chosen sides, then rejected sides).
pub fn make_pair_batch(pairs: &[&PairTokens], pad: i64, device: Device) -> Result<PairBatch> {
    let mut seqs: Vec<&[i64]> = pairs.iter().map(|p| p.chosen.as_slice()).collect();
    seqs.extend(pairs.iter().map(|p| p.rejected.as_slice()));
    let (ids, valid) = pad_right(&seqs, pad, device)?;
    let margins: Vec<f32> = pairs.iter().map(|p| p.margin as f32).collect();
    Ok(PairBatch {
        ids,
        valid,
        margin: Tensor::from_slice(&margins).to_kind(Kind::Float).to_device(device),
        pairs: pairs.len(),
        tokens: seqs.iter().map(|s| s.len()).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formatted(n: usize, prompt_len: usize) -> Formatted {
        Formatted { ids: (0..n as i64).collect(), prompt_len }
    }

    #[test]
    fn prompt_side_truncation_keeps_bos_and_responses() {
        // 10 and 8 tokens, prompt = ids 0..6 (bos + 5 prompt tokens); max 7.
        match fit_pair(formatted(10, 6), formatted(8, 6), 0.0, None, 7, Truncation::TruncatePrompt) {
            Fit::Truncated(p) => {
                assert_eq!(p.chosen, vec![0, 4, 5, 6, 7, 8, 9]);
                assert_eq!(p.rejected, vec![0, 4, 5, 6, 7]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fit_pair(formatted(10, 6), formatted(8, 6), 0.0, None, 7, Truncation::Drop), Fit::Dropped);
        assert_eq!(
            fit_pair(formatted(10, 3), formatted(8, 3), 0.0, None, 7, Truncation::TruncatePrompt),
            Fit::ResponseTooLong
        );
        assert!(matches!(
            fit_pair(formatted(7, 3), formatted(5, 3), 0.0, None, 7, Truncation::Drop),
            Fit::Kept(_)
        ));
    }

    #[test]
    fn epoch_plan_is_a_pure_function_of_the_seed_and_covers_every_pair() {
        let lens: Vec<usize> = (0..50).map(|i| (i * 7) % 13 + 1).collect();
        let order: Vec<usize> = (0..50).collect();
        let a = plan_epoch(&lens, &order, 4, 3);
        assert_eq!(a, plan_epoch(&lens, &order, 4, 3));
        assert_ne!(a, plan_epoch(&lens, &order, 4, 4));
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, order);
    }

    #[test]
    fn pair_batch_puts_chosen_rows_first_and_pads_right() {
        let p = PairTokens { chosen: vec![2, 5, 6], rejected: vec![2, 7], margin: 0.5, category: None };
        let b = make_pair_batch(&[&p], 0, Device::Cpu).unwrap();
        assert_eq!(b.ids.size(), vec![2, 3]);
        let ids: Vec<i64> = Vec::try_from(b.ids.view([-1])).unwrap();
        assert_eq!(ids, vec![2, 5, 6, 2, 7, 0]);
        let valid: Vec<bool> = Vec::try_from(b.valid.view([-1])).unwrap();
        assert_eq!(valid, vec![true, true, true, true, true, false]);
        assert_eq!(b.tokens, 5);
    }
}
