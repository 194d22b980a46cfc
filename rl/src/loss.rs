//! The estimators and the loss of KL-regularised REINFORCE with a
//! leave-one-out baseline (RLOO).
//!
//! References: Williams, "Simple statistical gradient-following algorithms
//! for connectionist reinforcement learning", 1992 (REINFORCE); Kool et al.,
//! "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019 (leave-one-out
//! baseline); Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style
//! Optimization for Learning from Human Feedback in LLMs", 2024 (RLOO for
//! RLHF); Schulman, "Approximating KL Divergence", 2020 (the k1 and k3
//! estimators). All functions are pure: tensors in, tensors out.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The per-token KL estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// k1 = log π(y) − log π_ref(y): unbiased, can be negative.
    #[default]
    K1,
    /// k3 = (r − 1) − log r with r = π_ref(y)/π(y): unbiased, always ≥ 0.
    K3,
}

/// Per-token KL estimates (B, T) from the policy's and the reference's
/// log-probabilities of the sampled tokens, zero where `mask` is false.
pub fn kl_per_token(logp: &Tensor, ref_logp: &Tensor, mask: &Tensor, est: KlEstimator) -> Result<Tensor> {
    ensure!(logp.size() == ref_logp.size(), "logp {:?} vs ref_logp {:?}", logp.size(), ref_logp.size());
    let d = logp - ref_logp; // log π − log π_ref
    let kl = match est {
        KlEstimator::K1 => d,
        KlEstimator::K3 => {
            let log_r = -d; // log(π_ref/π)
            log_r.exp() - 1.0 - log_r
        }
    };
    Ok(kl * mask.to_kind(Kind::Float))
}

/// Sequence rewards R_i = r_i − β Σ_t KL_t − penalty·[no end_of_turn].
/// `reward` (N,), `kl` (N, T) masked per-token KL, `ended` (N,) bool.
pub fn sequence_rewards(reward: &Tensor, kl: &Tensor, beta: f64, ended: &Tensor, penalty: f64) -> Tensor {
    let not_ended = ended.logical_not().to_kind(Kind::Float);
    reward - kl.sum_dim_intlist(-1, false, Kind::Float) * beta - not_ended * penalty
}

/// Leave-one-out advantages: for `k` samples per prompt laid out prompt by
/// prompt (N = B·k), A_i = R_i − mean_{j≠i} R_j = k/(k−1) · (R_i − mean_j R_j).
pub fn rloo_advantages(rewards: &Tensor, k: i64) -> Result<Tensor> {
    if k < 2 {
        bail!("the leave-one-out baseline needs k >= 2 samples per prompt, got {k}");
    }
    let n = rewards.size()[0];
    ensure!(n % k == 0, "{n} rewards are not a whole number of groups of {k}");
    let r = rewards.view([n / k, k]); // (B, k)
    let sum = r.sum_dim_intlist(-1, true, Kind::Float); // (B, 1)
    let baseline = (sum - &r) / (k - 1) as f64; // (B, k): mean of the others
    Ok((r - baseline).view([n]))
}

/// The baseline subtracted from each sample's sequence reward, over the k
/// samples of its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// The mean of the prompt's other k − 1 samples (RLOO; Kool et al.,
    /// 2019; Ahmadian et al., 2024).
    #[default]
    LeaveOneOut,
    /// The mean of all k samples of the prompt (GRPO; Shao et al., 2024).
    GroupMean,
}

/// How the advantages are scaled after the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageScale {
    /// Not scaled.
    #[default]
    None,
    /// Divided by the standard deviation (unbiased, k − 1) of the prompt's k
    /// rewards; with `group_mean` this is GRPO's (r − mean) / std.
    GroupStd,
    /// Whitened over the whole batch ([`whiten`]): zero mean, unit variance
    /// (`whiten_advantages = true`).
    BatchStd,
}

/// A group whose rewards have a standard deviation at or below this is
/// flat: its k samples are equally good and get a zero advantage (dividing
/// by such a std would blow noise up into huge advantages; NeMo-RL saw
/// −2075 from a std of 4.6e-4).
pub const FLAT_GROUP_STD: f64 = 1e-6;

/// Advantages of sequence rewards `rewards` (N,) laid out prompt by prompt
/// in groups of `k`: the reward minus the `baseline` of its group, then
/// scaled as `scale` says; every sample of a flat group (reward std ≤
/// [`FLAT_GROUP_STD`]) gets exactly zero. With `leave_one_out` and `none`
/// this is [`rloo_advantages`]; `group_mean` with `group_std` is GRPO:
/// A_i = (R_i − mean_g R) / std_g R.
pub fn advantages(rewards: &Tensor, k: i64, baseline: Baseline, scale: AdvantageScale) -> Result<Tensor> {
    advantages_in(rewards, k, baseline, scale, &|v| Ok(v.to_vec()))
}

/// Sums of per-process values over the processes of a data-parallel run
/// (the values themselves in one process).
pub type GlobalSum<'a> = dyn Fn(&[f64]) -> Result<Vec<f64>> + 'a;

/// [`advantages`] of one process's share of a batch (whole groups of `k`):
/// the baselines and group scales stay within each group; whitening
/// (`batch_std`) uses the mean and std of the whole batch, from the sums
/// over processes that `sum` gives ([`whiten_in`]).
pub fn advantages_in(
    rewards: &Tensor,
    k: i64,
    baseline: Baseline,
    scale: AdvantageScale,
    sum: &GlobalSum,
) -> Result<Tensor> {
    let centred = match baseline {
        Baseline::LeaveOneOut => rloo_advantages(rewards, k)?,
        Baseline::GroupMean => {
            ensure!(k >= 1, "groups need at least one sample");
            let n = rewards.size()[0];
            ensure!(n % k == 0, "{n} rewards are not a whole number of groups of {k}");
            let r = rewards.view([n / k, k]); // (B, k)
            (&r - r.mean_dim(-1, true, rewards.kind())).view([n])
        }
    };
    let n = rewards.size()[0];
    let groups = rewards.to_kind(Kind::Double).view([n / k, k]); // (B, k)
    let std = if k > 1 { groups.std_dim(-1, true, true) } else { groups.zeros_like().narrow(1, 0, 1) }; // (B, 1)
    let flat = std.le(FLAT_GROUP_STD).expand([n / k, k], false).reshape([n]).to_device(rewards.device()); // (N,)
    let scaled = match scale {
        AdvantageScale::None => centred,
        AdvantageScale::GroupStd => {
            let s = std.clamp_min(FLAT_GROUP_STD).expand([n / k, k], false).reshape([n]);
            centred / s.to_kind(rewards.kind()).to_device(rewards.device())
        }
        AdvantageScale::BatchStd => whiten_in(&centred, sum)?,
    };
    Ok(scaled.masked_fill(&flat, 0.0))
}

/// Whitens advantages over the batch: (A − mean) / (std + 1e-8), with the
/// population std.
pub fn whiten(a: &Tensor) -> Tensor {
    let mean = a.mean(Kind::Float);
    let std = a.std(false);
    (a - mean) / (std + 1e-8)
}

/// [`whiten`] of one process's share `a` of the batch: the mean and the
/// population std are the whole batch's, summed in f64 over the processes
/// by `sum` (two passes: the count and sum, then the squared deviations).
pub fn whiten_in(a: &Tensor, sum: &GlobalSum) -> Result<Tensor> {
    let v = Vec::<f64>::try_from(a.to_kind(Kind::Double).to_device(tch::Device::Cpu).flatten(0, -1))?;
    let s = sum(&[v.len() as f64, v.iter().sum::<f64>()])?;
    ensure!(s.len() == 2 && s[0] > 0.0, "whitening an empty batch");
    let mean = s[1] / s[0];
    let q = sum(&[v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>()])?;
    let std = (q[0] / s[0]).sqrt();
    Ok((a - mean) / (std + 1e-8))
}

/// How the per-token terms of the loss (the policy-gradient term and, in
/// `kl_mode = "loss"`, the KL term) are reduced to one number over a batch of
/// N responses y_i of |y_i| tokens.
///
/// The default is `token_mean`: per-sequence means weight a token of a short
/// response more than one of a long response, a length bias that Dr. GRPO
/// (Liu et al., "Understanding R1-Zero-Like Training", 2025) shows and DAPO
/// (Yu et al., 2025) removes with this token-level mean, while keeping the
/// loss's scale independent of the response length (unlike `sequence_sum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// (1/N) Σ_i Σ_t x_{i,t}: the sequence log-prob, as in the RLOO paper
    /// (Ahmadian et al., 2024) and REINFORCE on whole sequences.
    SequenceSum,
    /// (1/N) Σ_i (Σ_t x_{i,t} / |y_i|): per-sequence means (the stage's
    /// only form before this option; GRPO as in Shao et al., 2024).
    SequenceMean,
    /// Σ_i Σ_t x_{i,t} / Σ_i |y_i|: one mean over all the batch's tokens
    /// (DAPO, Yu et al., 2025; Dr. GRPO, Liu et al., 2025).
    #[default]
    TokenMean,
}

/// The size of the whole batch a loss is normalised by: its number of
/// sequences N and of (masked-in) tokens Σ_i |y_i|. A micro-batch's loss
/// divided by the whole batch's sizes sums, over the micro-batches, to the
/// whole batch's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSize {
    pub sequences: f64,
    pub tokens: f64,
}

impl BatchSize {
    /// The sizes of the batch of `mask` (N, T).
    pub fn of(mask: &Tensor) -> Self {
        BatchSize {
            sequences: mask.size()[0] as f64,
            tokens: mask.to_kind(Kind::Float).sum(Kind::Double).double_value(&[]),
        }
    }
}

/// Reduces per-token values `x` (n, T) of the rows `mask` (n, T) keeps, as
/// `agg` says, normalised by the whole batch's sizes `batch` (see
/// [`LossAggregation`] for the three formulas).
pub fn aggregate(x: &Tensor, mask: &Tensor, agg: LossAggregation, batch: BatchSize) -> Tensor {
    let m = mask.to_kind(Kind::Float);
    let xm = x * &m; // (n, T)
    match agg {
        LossAggregation::SequenceSum => xm.sum(Kind::Float) / batch.sequences.max(1.0),
        LossAggregation::SequenceMean => {
            let len = m.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0); // (n,)
            (xm.sum_dim_intlist(-1, false, Kind::Float) / len).sum(Kind::Float) / batch.sequences.max(1.0)
        }
        LossAggregation::TokenMean => xm.sum(Kind::Float) / batch.tokens.max(1.0),
    }
}

/// The policy-gradient loss: the aggregate ([`aggregate`]) of
/// −A_i · log π(y_{i,t}); with `sequence_mean` that is
/// −mean_i A_i · (Σ_t log π(y_{i,t}) / |y_i|). `logp` (n, T) with
/// gradients, `mask` (n, T), `adv` (n,) without.
pub fn reinforce_loss(
    logp: &Tensor,
    mask: &Tensor,
    adv: &Tensor,
    agg: LossAggregation,
    batch: BatchSize,
) -> Tensor {
    let per_tok = -(logp * adv.detach().unsqueeze(-1)); // (n, T)
    aggregate(&per_tok, mask, agg, batch)
}

/// The clipped importance-weighted variant for more than one update per batch
/// of rollouts: per-token ratios ρ = exp(logp − old_logp) clipped to
/// [1−ε, 1+ε] as in PPO (Schulman et al., 2017), the per-token terms
/// −min(ρA, clip(ρ)A) aggregated as `agg` says.
pub fn clipped_reinforce_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    mask: &Tensor,
    adv: &Tensor,
    eps: f64,
    agg: LossAggregation,
    batch: BatchSize,
) -> Tensor {
    let ratio = (logp - old_logp.detach()).exp(); // (n, T)
    let a = adv.detach().unsqueeze(-1); // (n, 1)
    let unclipped = &ratio * &a;
    let clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * &a;
    let per_tok = -unclipped.minimum(&clipped); // (n, T)
    aggregate(&per_tok, mask, agg, batch)
}

/// The KL penalty as a loss term (instead of inside the reward), as in
/// GRPO (Shao et al., "DeepSeekMath", 2024): β times the per-token
/// estimates from [`kl_per_token`] on `logp` (n, T) *with* gradients,
/// aggregated as the policy-gradient term is (`agg`; with `sequence_mean`
/// β · mean_i (Σ_t KL_{i,t} / |y_i|)). Use the k3 estimator here: the
/// gradient of the k1 sample estimate is the score function alone, zero in
/// expectation.
pub fn kl_loss(
    logp: &Tensor,
    ref_logp: &Tensor,
    mask: &Tensor,
    est: KlEstimator,
    beta: f64,
    agg: LossAggregation,
    batch: BatchSize,
) -> Result<Tensor> {
    let kl = kl_per_token(logp, &ref_logp.detach(), mask, est)?; // (n, T)
    Ok(aggregate(&kl, mask, agg, batch) * beta)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SM: LossAggregation = LossAggregation::SequenceMean;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }
    fn vals(x: &Tensor) -> Vec<f32> {
        Vec::try_from(x.flatten(0, -1)).unwrap()
    }
    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn k1_and_k3_match_hand_computation() {
        let lp = t(&[-1.0, -2.0, -0.5]).view([1, 3]);
        let rp = t(&[-1.5, -1.0, -0.5]).view([1, 3]);
        let mask = Tensor::from_slice(&[true, true, false]).view([1, 3]);
        close(&vals(&kl_per_token(&lp, &rp, &mask, KlEstimator::K1).unwrap()), &[0.5, -1.0, 0.0]);
        // k3 with log r = ref − logp: r = e^-0.5 → (e^-0.5 − 1) + 0.5; r = e^1 → (e − 1) − 1.
        let k3 = [(-0.5f32).exp() - 1.0 + 0.5, 1f32.exp() - 2.0, 0.0];
        close(&vals(&kl_per_token(&lp, &rp, &mask, KlEstimator::K3).unwrap()), &k3);
    }

    #[test]
    fn rloo_baseline_is_the_mean_of_the_other_samples() {
        // Two prompts, k = 3.
        let r = t(&[1.0, 2.0, 6.0, 0.0, 0.0, 3.0]);
        let a = rloo_advantages(&r, 3).unwrap();
        close(&vals(&a), &[1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5, 0.0 - 1.5, 0.0 - 1.5, 3.0 - 0.0]);
        // k = 2: each sample's baseline is the other one.
        let a = rloo_advantages(&t(&[1.0, 4.0]), 2).unwrap();
        close(&vals(&a), &[-3.0, 3.0]);
        assert!(rloo_advantages(&t(&[1.0]), 1).is_err());
        assert!(rloo_advantages(&t(&[1.0, 2.0, 3.0]), 2).is_err());
    }

    #[test]
    fn end_of_turn_penalty_and_kl_enter_the_sequence_reward() {
        let reward = t(&[1.0, 1.0]);
        let kl = t(&[0.1, 0.2, 0.3, 0.0]).view([2, 2]);
        let ended = Tensor::from_slice(&[true, false]);
        let r = sequence_rewards(&reward, &kl, 0.5, &ended, 2.0);
        close(&vals(&r), &[1.0 - 0.5 * 0.3, 1.0 - 0.5 * 0.3 - 2.0]);
    }

    #[test]
    fn whitening_gives_zero_mean_unit_std() {
        let w = whiten(&t(&[1.0, 2.0, 3.0, 6.0]));
        let v = vals(&w);
        let mean: f32 = v.iter().sum::<f32>() / 4.0;
        let var: f32 = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var.sqrt() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn reinforce_loss_and_gradient_match_hand_computation() {
        let logp = t(&[-1.0, -3.0, -2.0, -4.0]).view([2, 2]).set_requires_grad(true);
        let mask = Tensor::from_slice(&[true, true, true, false]).view([2, 2]);
        let adv = t(&[2.0, -1.0]);
        let loss = reinforce_loss(&logp, &mask, &adv, SM, BatchSize::of(&mask));
        // −mean(2·(−4/2), −1·(−2/1)) = −mean(−4, 2) = 1.
        assert!((loss.double_value(&[]) - 1.0).abs() < 1e-6);
        loss.backward();
        // ∂/∂logp_{i,t} = −A_i / (N |y_i|) on masked tokens.
        close(&vals(&logp.grad()), &[-0.5, -0.5, 0.5, 0.0]);
    }

    #[test]
    fn clipped_loss_equals_plain_loss_when_policy_unchanged() {
        let lp = t(&[-1.0, -3.0, -2.0, -4.0]).view([2, 2]);
        let mask = Tensor::from_slice(&[true, true, true, false]).view([2, 2]);
        let adv = t(&[2.0, -1.0]);
        let plain = lp.copy().set_requires_grad(true);
        let a = reinforce_loss(&plain, &mask, &adv, SM, BatchSize::of(&mask));
        let clipped = lp.copy().set_requires_grad(true);
        let b = clipped_reinforce_loss(&clipped, &lp, &mask, &adv, 0.2, SM, BatchSize::of(&mask));
        // With ρ = 1 the clipped loss is −mean(A · mean_t 1) — a different
        // value from the plain loss ...
        assert!((b.double_value(&[]) - (-(2.0 - 1.0) / 2.0)).abs() < 1e-6, "{}", b.double_value(&[]));
        assert!((a.double_value(&[]) - 1.0).abs() < 1e-6);
        // ... but the same gradient at this point: ∂ρ/∂logp = ρ = 1.
        a.backward();
        b.backward();
        close(&vals(&clipped.grad()), &vals(&plain.grad()));
        close(&vals(&clipped.grad()), &[-0.5, -0.5, 0.5, 0.0]);
    }

    #[test]
    fn clipped_loss_and_gradient_match_hand_computation_inside_and_outside_the_clip() {
        // old log-probs 0, so ρ = exp(logp). ε = 0.2: the clip range is [0.8, 1.2].
        // Row 0, A = +2: ρ = 1.1 (inside), 1.5 (above: clipped), 0.5 (below:
        // for A > 0 the unclipped term is the smaller, so it counts), 0.9 (inside).
        // Row 1, A = −1: ρ = 1.1 (inside), 1.5 (above: for A < 0 the unclipped
        // term is the smaller, so it counts), 0.5 (below: clipped), and a
        // masked token with ρ = 3.
        let ratios = [1.1f32, 1.5, 0.5, 0.9, 1.1, 1.5, 0.5, 3.0];
        let logp = Tensor::from_slice(&ratios.map(f32::ln)).view([2, 4]).set_requires_grad(true);
        let old = Tensor::zeros([2, 4], (Kind::Float, tch::Device::Cpu));
        let mask = Tensor::from_slice(&[true, true, true, true, true, true, true, false]).view([2, 4]);
        let adv = t(&[2.0, -1.0]);
        let loss = clipped_reinforce_loss(&logp, &old, &mask, &adv, 0.2, SM, BatchSize::of(&mask));
        // Per token min(ρA, clip(ρ)A):
        //   row 0: min(2.2, 2.2), min(3.0, 2.4), min(1.0, 1.6), min(1.8, 1.8) = 2.2, 2.4, 1.0, 1.8 → mean 7.4/4
        //   row 1: min(−1.1, −1.1), min(−1.5, −1.2), min(−0.5, −0.8) = −1.1, −1.5, −0.8 → mean −3.4/3
        // loss = −(7.4/4 − 3.4/3) / 2.
        let want = -(7.4 / 4.0 - 3.4 / 3.0) / 2.0;
        assert!((loss.double_value(&[]) - want).abs() < 1e-5, "{} vs {want}", loss.double_value(&[]));
        loss.backward();
        // Where the unclipped term counts, ∂/∂logp (ρA) = ρA, so the gradient
        // is −ρA / (N |y_i|); a clipped token gives exactly zero.
        let g = |r: f32, a: f32, len: f32| -r * a / (2.0 * len);
        let want_grad = [
            g(1.1, 2.0, 4.0),
            0.0, // clipped above with A > 0
            g(0.5, 2.0, 4.0),
            g(0.9, 2.0, 4.0),
            g(1.1, -1.0, 3.0),
            g(1.5, -1.0, 3.0),
            0.0, // clipped below with A < 0
            0.0, // masked
        ];
        let got = vals(&logp.grad());
        close(&got, &want_grad);
        assert_eq!((got[1], got[6], got[7]), (0.0, 0.0, 0.0), "clipped tokens have exactly zero gradient");
        // The old log-probs get no gradient (they are constants).
        assert!(!old.grad().defined());
    }
    #[test]
    fn kl_loss_is_beta_times_the_mean_per_token_kl() {
        let logp = t(&[-1.0, -2.0, -0.5, -3.0]).view([2, 2]).set_requires_grad(true);
        let rp = t(&[-1.5, -1.0, -0.5, -3.0]).view([2, 2]);
        let mask = Tensor::from_slice(&[true, true, true, false]).view([2, 2]);
        let l = kl_loss(&logp, &rp, &mask, KlEstimator::K1, 0.5, SM, BatchSize::of(&mask)).unwrap();
        // k1: row 0 (0.5 − 1.0)/2 = −0.25, row 1 0/1 = 0 → 0.5 · mean = −0.0625.
        assert!((l.double_value(&[]) + 0.0625).abs() < 1e-6);
        l.backward();
        // ∂/∂logp = β / (N |y_i|) on masked tokens for k1.
        close(&vals(&logp.grad()), &[0.125, 0.125, 0.25, 0.0]);
    }

    #[test]
    fn each_loss_aggregation_and_its_gradient_match_hand_computation() {
        // Two responses of 3 and 2 tokens; A = (2, −1). Per-token terms
        // −A·logp: row 0: 2, 4, 6 (sum 12); row 1: −4, −5 (sum −9).
        let lp = t(&[-1.0, -2.0, -3.0, -4.0, -5.0, -7.0]).view([2, 3]);
        let mask = Tensor::from_slice(&[true, true, true, true, true, false]).view([2, 3]);
        let adv = t(&[2.0, -1.0]);
        let cases = [
            // sequence_sum: (12 − 9)/2; ∂ = −A_i / N.
            (LossAggregation::SequenceSum, 1.5, [-1.0, -1.0, -1.0, 0.5, 0.5, 0.0]),
            // sequence_mean: (12/3 − 9/2)/2; ∂ = −A_i / (N |y_i|).
            (LossAggregation::SequenceMean, -0.25, [-1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 0.25, 0.25, 0.0]),
            // token_mean: (12 − 9)/5; ∂ = −A_i / Σ|y|.
            (LossAggregation::TokenMean, 0.6, [-0.4, -0.4, -0.4, 0.2, 0.2, 0.0]),
        ];
        for (agg, want, want_grad) in cases {
            let logp = lp.copy().set_requires_grad(true);
            let loss = reinforce_loss(&logp, &mask, &adv, agg, BatchSize::of(&mask));
            assert!((loss.double_value(&[]) - want).abs() < 1e-6, "{agg:?}: {}", loss.double_value(&[]));
            loss.backward();
            close(&vals(&logp.grad()), &want_grad);
            // Micro-batches normalised by the whole batch's sizes add up to it.
            let whole = BatchSize::of(&mask);
            let parts: f64 = (0..2)
                .map(|i| {
                    let l = reinforce_loss(
                        &lp.narrow(0, i, 1),
                        &mask.narrow(0, i, 1),
                        &adv.narrow(0, i, 1),
                        agg,
                        whole,
                    );
                    l.double_value(&[])
                })
                .sum();
            assert!((parts - want).abs() < 1e-6, "{agg:?} over micro-batches: {parts}");
            // The clipped loss at ρ = 1 has the same gradient.
            let logp = lp.copy().set_requires_grad(true);
            clipped_reinforce_loss(&logp, &lp, &mask, &adv, 0.2, agg, whole).backward();
            close(&vals(&logp.grad()), &want_grad);
        }
    }

    #[test]
    fn the_kl_loss_term_is_aggregated_like_the_policy_gradient_term() {
        // k1 per token: row 0: 0.5, −1.0, 0.0; row 1: 2.0, (masked).
        let lp = t(&[-1.0, -2.0, -0.5, -1.0, -3.0, -3.0]).view([2, 3]);
        let rp = t(&[-1.5, -1.0, -0.5, -3.0, -1.0, -1.0]).view([2, 3]);
        let mask = Tensor::from_slice(&[true, true, true, true, false, false]).view([2, 3]);
        let beta = 0.5;
        let cases = [
            (LossAggregation::SequenceSum, beta * (-0.5 + 2.0) / 2.0, [0.25, 0.25, 0.25, 0.25, 0.0, 0.0]),
            (
                LossAggregation::SequenceMean,
                beta * (-0.5 / 3.0 + 2.0) / 2.0,
                [0.25 / 3.0, 0.25 / 3.0, 0.25 / 3.0, 0.25, 0.0, 0.0],
            ),
            (LossAggregation::TokenMean, beta * 1.5 / 4.0, [0.125, 0.125, 0.125, 0.125, 0.0, 0.0]),
        ];
        for (agg, want, want_grad) in cases {
            let logp = lp.copy().set_requires_grad(true);
            let l = kl_loss(&logp, &rp, &mask, KlEstimator::K1, beta, agg, BatchSize::of(&mask)).unwrap();
            assert!((l.double_value(&[]) - want).abs() < 1e-6, "{agg:?}: {} vs {want}", l.double_value(&[]));
            l.backward();
            close(&vals(&logp.grad()), &want_grad);
        }
    }

    #[test]
    fn group_normalised_advantages_match_hand_computation_and_flat_groups_get_zero() {
        // Group 0: 1, 2, 3, 6 (mean 3, unbiased std sqrt(14/3)); group 1
        // constant; group 2 nearly constant (std ~5e-10).
        let r = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0, 0.7, 0.7 + 1e-9, 0.7, 0.7]);
        let s = (14.0f64 / 3.0).sqrt();
        let grpo = advantages(&r, 4, Baseline::GroupMean, AdvantageScale::GroupStd).unwrap();
        let got: Vec<f64> = Vec::try_from(&grpo).unwrap();
        let want = [-2.0 / s, -1.0 / s, 0.0, 3.0 / s, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        let mean_only: Vec<f64> =
            Vec::try_from(advantages(&r, 4, Baseline::GroupMean, AdvantageScale::None).unwrap()).unwrap();
        assert_eq!(&mean_only[..4], &[-2.0, -1.0, 0.0, 3.0]);
        // Leave-one-out: k/(k−1)·(R − mean) = (−8/3, −4/3, 0, 4); over the std.
        let loo: Vec<f64> =
            Vec::try_from(advantages(&r, 4, Baseline::LeaveOneOut, AdvantageScale::None).unwrap()).unwrap();
        let loo_std: Vec<f64> =
            Vec::try_from(advantages(&r, 4, Baseline::LeaveOneOut, AdvantageScale::GroupStd).unwrap())
                .unwrap();
        for (i, w) in [-8.0 / 3.0, -4.0 / 3.0, 0.0, 4.0].iter().enumerate() {
            assert!((loo[i] - w).abs() < 1e-12 && (loo_std[i] - w / s).abs() < 1e-12, "{loo:?} {loo_std:?}");
        }
        // Every combination gives a (nearly) constant group exactly zero.
        for b in [Baseline::LeaveOneOut, Baseline::GroupMean] {
            for sc in [AdvantageScale::None, AdvantageScale::GroupStd, AdvantageScale::BatchStd] {
                let a: Vec<f64> = Vec::try_from(advantages(&r, 4, b, sc).unwrap()).unwrap();
                assert!(a[4..].iter().all(|&x| x == 0.0), "{b:?} {sc:?}: {a:?}");
                assert!(a[..4].iter().all(|x| x.is_finite() && x.abs() < 10.0), "{b:?} {sc:?}: {a:?}");
            }
        }
        // batch_std is today's whitening of the leave-one-out advantages
        // (outside flat groups).
        let r2 = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 6.0, 0.0, 4.0, 1.0, 1.0]);
        let w = vals(&advantages(&r2, 4, Baseline::LeaveOneOut, AdvantageScale::BatchStd).unwrap());
        close(&w, &vals(&whiten(&rloo_advantages(&r2, 4).unwrap())));
    }
}
