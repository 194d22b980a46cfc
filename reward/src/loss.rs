//! The reward model's loss: Bradley-Terry on preference pairs, with an
//! optional margin and an optional reward-centring term.
//!
//! Bradley & Terry ("Rank Analysis of Incomplete Block Designs: I. The
//! Method of Paired Comparisons", Biometrika 39, 1952) model the probability
//! that `a` is preferred to `b` as σ(r_a − r_b); fitting rewards by maximum
//! likelihood on human comparisons is the reward-model objective of Ouyang et
//! al. ("Training language models to follow instructions with human
//! feedback", 2022). The per-pair margin (how strongly a pair is preferred)
//! enters as in Llama 2 (Touvron et al., 2023) and TRL's `RewardTrainer`:
//! −log σ(r_c − r_r − m). The centring term, coefficient × mean((r_c + r_r)²),
//! is TRL's `center_rewards_coefficient`, after Eisenstein et al. ("Helping
//! or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
//! Hacking", 2023): it pins the rewards' scale, which the BT loss alone
//! leaves free.
//!
//! The `*_sum` functions return sums over pairs so that gradient accumulation
//! can divide by the pair count of the whole accumulated batch.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

fn check(chosen: &Tensor, rejected: &Tensor, margin: Option<&Tensor>) -> Result<()> {
    if chosen.size() != rejected.size() || chosen.dim() != 1 {
        bail!(
            "chosen and rejected rewards must both be (P,), got {:?} and {:?}",
            chosen.size(),
            rejected.size()
        );
    }
    if let Some(m) = margin {
        if m.size() != chosen.size() {
            bail!("margins have shape {:?}, the rewards {:?}", m.size(), chosen.size());
        }
    }
    Ok(())
}

/// Σ over pairs of −log σ(r_c − r_r − margin) (computed with `log_sigmoid`,
/// stable for large differences). `chosen`, `rejected`, `margin` (P,); no
/// margin means 0. Returns a scalar f32.
pub fn bradley_terry_sum(chosen: &Tensor, rejected: &Tensor, margin: Option<&Tensor>) -> Result<Tensor> {
    check(chosen, rejected, margin)?;
    let diff = chosen.to_kind(Kind::Float) - rejected.to_kind(Kind::Float); // (P,)
    let diff = match margin {
        Some(m) => diff - m.to_kind(Kind::Float),
        None => diff,
    };
    Ok(diff.log_sigmoid().neg().sum(Kind::Float))
}

/// Σ over pairs of (r_c + r_r)²: the centring term before its coefficient.
pub fn centring_sum(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor> {
    check(chosen, rejected, None)?;
    let s = chosen.to_kind(Kind::Float) + rejected.to_kind(Kind::Float); // (P,)
    Ok(s.square().sum(Kind::Float))
}

/// The training loss of one micro-batch: (BT sum + `center_coef` ×
/// centring sum) / `denom`, where `denom` is the number of pairs in the
/// whole accumulated batch. With `denom` = P this is TRL's loss,
/// mean(−log σ(r_c − r_r − m)) + coef × mean((r_c + r_r)²).
pub fn reward_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_coef: f64,
    denom: f64,
) -> Result<Tensor> {
    let bt = bradley_terry_sum(chosen, rejected, margin)?;
    let loss = if center_coef != 0.0 { bt + centring_sum(chosen, rejected)? * center_coef } else { bt };
    Ok(loss / denom)
}

/// The mean loss over the P pairs given: [`reward_loss`] with `denom` = P.
pub fn bradley_terry_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_coef: f64,
) -> Result<Tensor> {
    let p = chosen.size().first().copied().unwrap_or(0).max(1);
    reward_loss(chosen, rejected, margin, center_coef, p as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn leaf(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).to_kind(Kind::Float).set_requires_grad(true)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f32>::try_from(t).unwrap().into_iter().map(f64::from).collect()
    }

    /// Loss and gradients (d/dr_c, d/dr_r) computed by hand:
    /// l_i = −log σ(d_i), d_i = c_i − r_i − m_i, dl_i/dc_i = −(1 − σ(d_i)) / P
    /// (and the opposite for r_i); centring adds k(c_i + r_i)² / P, whose
    /// gradient is 2k(c_i + r_i) / P on both.
    fn by_hand(c: &[f64], r: &[f64], m: &[f64], k: f64) -> (f64, Vec<f64>, Vec<f64>) {
        let p = c.len() as f64;
        let mut loss = 0.0;
        let (mut gc, mut gr) = (vec![], vec![]);
        for i in 0..c.len() {
            let d = c[i] - r[i] - m[i];
            let s = c[i] + r[i];
            loss += (-sigmoid(d).ln() + k * s * s) / p;
            let g = -(1.0 - sigmoid(d)) / p;
            gc.push(g + 2.0 * k * s / p);
            gr.push(-g + 2.0 * k * s / p);
        }
        (loss, gc, gr)
    }

    fn check_case(c: &[f64], r: &[f64], m: Option<&[f64]>, k: f64) {
        let (tc, tr) = (leaf(c), leaf(r));
        let mt = m.map(Tensor::from_slice);
        let loss = bradley_terry_loss(&tc, &tr, mt.as_ref(), k).unwrap();
        loss.backward();
        let zeros = vec![0.0; c.len()];
        let (want, gc, gr) = by_hand(c, r, m.unwrap_or(&zeros), k);
        assert!((loss.double_value(&[]) - want).abs() < 1e-6, "loss {} vs {want}", loss.double_value(&[]));
        for (got, want) in values(&tc.grad()).iter().zip(&gc).chain(values(&tr.grad()).iter().zip(&gr)) {
            assert!((got - want).abs() < 1e-6, "grad {got} vs {want}");
        }
    }

    #[test]
    fn bt_loss_and_gradient_match_a_hand_computation() {
        check_case(&[1.0, -0.5, 2.0], &[0.0, 0.5, 2.5], None, 0.0);
    }

    #[test]
    fn with_margin() {
        check_case(&[1.0, -0.5, 2.0], &[0.0, 0.5, 2.5], Some(&[0.5, 0.0, 2.0]), 0.0);
    }

    #[test]
    fn with_margin_and_centring() {
        check_case(&[1.0, -0.5, 2.0], &[0.0, 0.5, 2.5], Some(&[0.5, 0.0, 2.0]), 0.01);
        check_case(&[0.3], &[-0.2], None, 1.0);
    }

    #[test]
    fn large_differences_stay_finite() {
        let loss = bradley_terry_loss(&leaf(&[-200.0, 200.0]), &leaf(&[0.0, 0.0]), None, 0.0).unwrap();
        // −log σ(−200) = 200 (+ e^-200); −log σ(200) ≈ 0.
        assert!((loss.double_value(&[]) - 100.0).abs() < 1e-4);
    }

    #[test]
    fn accumulated_sums_equal_the_mean_over_all_pairs() {
        let (c, r) = ([0.1, 0.7, -0.3, 1.2], [0.4, -0.1, 0.2, 0.0]);
        let whole = bradley_terry_loss(&leaf(&c), &leaf(&r), None, 0.1).unwrap().double_value(&[]);
        let a = reward_loss(&leaf(&c[..1]), &leaf(&r[..1]), None, 0.1, 4.0).unwrap().double_value(&[]);
        let b = reward_loss(&leaf(&c[1..]), &leaf(&r[1..]), None, 0.1, 4.0).unwrap().double_value(&[]);
        assert!((a + b - whole).abs() < 1e-6);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        assert!(bradley_terry_sum(&leaf(&[1.0]), &leaf(&[1.0, 2.0]), None).is_err());
    }
}
