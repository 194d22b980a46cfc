//! Evaluation of a reward model on preference pairs: accuracy, margins,
//! reward statistics and accuracy per category.

use crate::data::{make_pair_batch, PairTokens};
use crate::model::{RewardModel, RewardStats};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Results on one category of pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryReport {
    pub pairs: usize,
    /// Fraction of pairs with r_chosen > r_rejected.
    pub accuracy: f64,
    /// Mean of r_chosen − r_rejected.
    pub mean_margin: f64,
}

/// Results on a set of pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub pairs: usize,
    /// Fraction of pairs with r_chosen > r_rejected (a tie counts as wrong).
    pub accuracy: f64,
    /// Mean of r_chosen − r_rejected.
    pub mean_margin: f64,
    /// The training loss (BT with the pairs' margins, plus centring) on these pairs.
    pub loss: f64,
    /// Mean and population std of all rewards, chosen and rejected pooled.
    pub reward_mean: f64,
    pub reward_std: f64,
    pub chosen_mean: f64,
    pub rejected_mean: f64,
    /// Per `category` (pairs without one are not listed).
    pub per_category: BTreeMap<String, CategoryReport>,
}

/// Rewards of each pair, (chosen, rejected), computed in batches of
/// `batch_size` pairs without gradients.
pub fn pair_rewards(
    model: &RewardModel,
    pairs: &[&PairTokens],
    batch_size: usize,
    pad: i64,
) -> Result<Vec<(f64, f64)>> {
    let _g = tch::no_grad_guard();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let b = make_pair_batch(chunk, pad, model.device())?;
        let r: Vec<f32> = Vec::try_from(model.forward(&b.ids, &b.valid)?.to_device(tch::Device::Cpu))?; // (2P,)
        let p = chunk.len();
        out.extend((0..p).map(|i| (f64::from(r[i]), f64::from(r[p + i]))));
    }
    Ok(out)
}

/// Summarises the rewards of pairs: `labels` holds each pair's label margin
/// and category, `rewards` its (chosen, rejected) rewards.
pub fn report(labels: &[(f64, Option<&str>)], rewards: &[(f64, f64)], center_coef: f64) -> EvalReport {
    let n = rewards.len().max(1) as f64;
    let (mut correct, mut margin, mut loss_sum) = (0usize, 0.0, 0.0);
    let mut per: BTreeMap<String, (usize, usize, f64)> = BTreeMap::new();
    for (&(label_margin, category), &(c, r)) in labels.iter().zip(rewards) {
        let ok = c > r;
        correct += usize::from(ok);
        margin += c - r;
        let d = c - r - label_margin;
        // −log σ(d) = softplus(−d), written to stay finite for large |d|.
        loss_sum += (-d).max(0.0) + (-d.abs()).exp().ln_1p() + center_coef * (c + r) * (c + r);
        if let Some(cat) = category {
            let e = per.entry(cat.to_string()).or_default();
            e.0 += 1;
            e.1 += usize::from(ok);
            e.2 += c - r;
        }
    }
    let all: Vec<f64> = rewards.iter().flat_map(|&(c, r)| [c, r]).collect();
    let stats = RewardStats::of(&all, "eval");
    let mean_of = |f: fn(&(f64, f64)) -> f64| rewards.iter().map(f).sum::<f64>() / n;
    EvalReport {
        pairs: rewards.len(),
        accuracy: correct as f64 / n,
        mean_margin: margin / n,
        loss: loss_sum / n,
        reward_mean: stats.as_ref().map_or(f64::NAN, |s| s.mean),
        reward_std: stats.as_ref().map_or(f64::NAN, |s| s.std),
        chosen_mean: mean_of(|x| x.0),
        rejected_mean: mean_of(|x| x.1),
        per_category: per
            .into_iter()
            .map(|(k, (n, ok, m))| {
                (k, CategoryReport { pairs: n, accuracy: ok as f64 / n as f64, mean_margin: m / n as f64 })
            })
            .collect(),
    }
}

/// Scores `pairs` and summarises; also returns every reward (chosen and
/// rejected pooled) for [`RewardStats`].
pub fn evaluate(
    model: &RewardModel,
    pairs: &[&PairTokens],
    batch_size: usize,
    pad: i64,
    center_coef: f64,
) -> Result<(EvalReport, Vec<f64>)> {
    let rewards = pair_rewards(model, pairs, batch_size, pad)?;
    let all = rewards.iter().flat_map(|&(c, r)| [c, r]).collect();
    let labels: Vec<(f64, Option<&str>)> = pairs.iter().map(|p| (p.margin, p.category.as_deref())).collect();
    Ok((report(&labels, &rewards, center_coef), all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_accuracy_margin_and_categories() {
        let labels = [(0.0, Some("math")), (0.0, Some("math")), (0.0, Some("chat"))];
        let r = report(&labels, &[(1.0, 0.0), (0.0, 1.0), (2.0, 0.0)], 0.0);
        assert_eq!(r.pairs, 3);
        assert!((r.accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.mean_margin - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.per_category["math"].pairs, 2);
        assert_eq!(r.per_category["math"].accuracy, 0.5);
        assert_eq!(r.per_category["chat"].accuracy, 1.0);
        assert!((r.reward_mean - 4.0 / 6.0).abs() < 1e-12);
        // Pair 1: −log σ(1); pair 2: −log σ(−1); pair 3: −log σ(2).
        let nll = |d: f64| -(1.0 / (1.0 + (-d).exp())).ln();
        assert!((r.loss - (nll(1.0) + nll(-1.0) + nll(2.0)) / 3.0).abs() < 1e-12);
    }
}
