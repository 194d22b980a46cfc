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

/// Whitens advantages over the batch: (A − mean) / (std + 1e-8).
pub fn whiten(a: &Tensor) -> Tensor {
    let mean = a.mean(Kind::Float);
    let std = a.std(false);
    (a - mean) / (std + 1e-8)
}

/// The policy-gradient loss: −mean_i A_i · (Σ_t log π(y_{i,t}) / |y_i|).
/// `logp` (N, T) with gradients, `mask` (N, T), `adv` (N,) without.
pub fn reinforce_loss(logp: &Tensor, mask: &Tensor, adv: &Tensor) -> Tensor {
    let m = mask.to_kind(Kind::Float);
    let len = m.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0); // (N,)
    let mean_logp = (logp * &m).sum_dim_intlist(-1, false, Kind::Float) / len; // (N,)
    -(adv.detach() * mean_logp).mean(Kind::Float)
}

/// The clipped importance-weighted variant for more than one update per batch
/// of rollouts: per-token ratios ρ = exp(logp − old_logp) clipped to
/// [1−ε, 1+ε] as in PPO (Schulman et al., 2017), sequence-mean per sample.
pub fn clipped_reinforce_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    mask: &Tensor,
    adv: &Tensor,
    eps: f64,
) -> Tensor {
    let m = mask.to_kind(Kind::Float);
    let len = m.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0); // (N,)
    let ratio = (logp - old_logp.detach()).exp(); // (N, T)
    let a = adv.detach().unsqueeze(-1); // (N, 1)
    let unclipped = &ratio * &a;
    let clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * &a;
    let per_tok = unclipped.minimum(&clipped); // (N, T)
    -((per_tok * &m).sum_dim_intlist(-1, false, Kind::Float) / len).mean(Kind::Float)
}

/// The KL penalty as a loss term (instead of inside the reward), as in
/// GRPO (Shao et al., "DeepSeekMath", 2024): β · mean_i (Σ_t KL_{i,t} / |y_i|)
/// with per-token estimates from [`kl_per_token`] on `logp` (N, T) *with*
/// gradients. Use the k3 estimator here: the gradient of the k1 sample
/// estimate is the score function alone, zero in expectation.
pub fn kl_loss(
    logp: &Tensor,
    ref_logp: &Tensor,
    mask: &Tensor,
    est: KlEstimator,
    beta: f64,
) -> Result<Tensor> {
    let m = mask.to_kind(Kind::Float);
    let len = m.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0); // (N,)
    let kl = kl_per_token(logp, &ref_logp.detach(), mask, est)?; // (N, T)
    Ok((kl.sum_dim_intlist(-1, false, Kind::Float) / len).mean(Kind::Float) * beta)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let loss = reinforce_loss(&logp, &mask, &adv);
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
        let a = reinforce_loss(&plain, &mask, &adv);
        let clipped = lp.copy().set_requires_grad(true);
        let b = clipped_reinforce_loss(&clipped, &lp, &mask, &adv, 0.2);
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
        let loss = clipped_reinforce_loss(&logp, &old, &mask, &adv, 0.2);
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
        let l = kl_loss(&logp, &rp, &mask, KlEstimator::K1, 0.5).unwrap();
        // k1: row 0 (0.5 − 1.0)/2 = −0.25, row 1 0/1 = 0 → 0.5 · mean = −0.0625.
        assert!((l.double_value(&[]) + 0.0625).abs() < 1e-6);
        l.backward();
        // ∂/∂logp = β / (N |y_i|) on masked tokens for k1.
        close(&vals(&logp.grad()), &[0.125, 0.125, 0.25, 0.0]);
    }
}
