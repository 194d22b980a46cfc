//! The SFT loss.

use anyhow::Result;
use tch::{Kind, Reduction, Tensor};

/// Next-token cross-entropy summed over the tokens the mask selects.
///
/// `logits` (B, T, V), `targets` (B, T) int64 (the token each position must
/// predict), `mask` (B, T) bool or 0/1. Returns the *sum* of −log p(target)
/// over masked positions (a scalar f32) so that the caller can divide by the
/// number of trained tokens of the whole (accumulated) batch: the loss is
/// averaged per token over the batch, not per sequence then per batch — the
/// normalisation of the instruction-tuning literature (e.g. Ouyang et al.,
/// "Training language models to follow instructions with human feedback",
/// 2022; Gemma Team, "Gemma: Open Models Based on Gemini Research and
/// Technology", 2024), and what TRL's SFTTrainer computes.
pub fn masked_cross_entropy_sum(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let v = logits.size().last().copied().unwrap_or(0);
    let flat = logits.f_reshape([-1, v])?.f_to_kind(Kind::Float)?; // (B*T, V)
    let tgt = targets.f_reshape([-1])?; // (B*T,)
    let per_token = flat.f_cross_entropy_loss::<Tensor>(&tgt, None, Reduction::None, -100, 0.0)?; // (B*T,)
    let m = mask.f_reshape([-1])?.f_to_kind(Kind::Float)?;
    Ok((per_token * m).sum(Kind::Float))
}
