//! Losses and log-probabilities over the vocabulary that never build the
//! (N, V) f32 logits of all N positions at once.
//!
//! At V = 256000 the f32 logits of 512 positions take 0.5 GB, and their
//! log-softmax as much again. The technique is that of Liger Kernel's fused
//! linear cross-entropy (Hsu et al. 2024) and torchtune's chunked
//! cross-entropy: run the LM head and the log-softmax over chunks of
//! positions, and only at the positions that count ([`select`]: trained
//! tokens, response tokens, a judge's one choice position).
//!
//! With gradients, each chunk is backpropagated at once, so only one
//! chunk's logits are alive: the chunk of hidden states is detached into a
//! leaf requiring grad, its loss's `backward()` accumulates the head
//! weight's gradient and the leaf's, and the leaves' gradients, joined,
//! are pushed into the caller's `h` once at the end
//! ([`crate::recompute::push_gradient`]). `h` may be anything with a graph:
//! [`select`] over the leaf that [`crate::Gemma::forward_backward`] hands
//! its head, or a plain forward's hidden states.
//!
//! Values and gradients equal the unchunked computation up to the order of
//! floating-point sums (the head's weight gradient is summed per chunk).

use crate::generate::sampling_log_softmax;
use crate::model::Gemma;
use crate::recompute::push_gradient;
use anyhow::{ensure, Result};
use tch::{Device, Kind, Reduction, Tensor};

/// Positions per chunk at Gemma's vocabulary when sized by [`chunk_size`]
/// (64 positions × 256000 × 4 bytes = 62.5 MiB of f32 logits; with their
/// bf16 copy and the gradients one chunk's forward and backward stays near
/// 0.25 GiB). Tests use it as a chunk size that does not divide N.
pub const DEFAULT_CHUNK: i64 = 64;

/// The f32 logits one chunk may hold: [`chunk_size`]'s budget.
pub const CHUNK_BYTES: i64 = 64 << 20;

/// Positions per chunk for `model`: as many as keep one chunk's f32 logits
/// within [`CHUNK_BYTES`] (65 at a 256000-token vocabulary; a small
/// vocabulary's batch fits in one chunk), between 16 and 4096.
pub fn chunk_size(model: &Gemma) -> i64 {
    (CHUNK_BYTES / (4 * model.cfg.vocab_size.max(1))).clamp(16, 4096)
}

/// The rows of `hidden` (B, T, H) where `mask` (B, T) bool is true, in
/// row-major order, as (N, H), keeping the graph. The matching targets are
/// `targets.masked_select(mask)`.
pub fn select(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden
        .size3()
        .map_err(|_| anyhow::anyhow!("hidden states must be (B, T, H), got shape {:?}", hidden.size()))?;
    ensure!(mask.size() == [b, t], "mask must be (B, T) = ({b}, {t}), got {:?}", mask.size());
    let idx = mask.f_reshape([-1])?.f_to_kind(Kind::Bool)?.f_nonzero()?.f_reshape([-1])?; // (N,)
    Ok(hidden.f_reshape([b * t, h])?.f_index_select(0, &idx)?)
}

/// Whether autograd records operations now (no `no_grad` in force).
pub fn grad_enabled() -> bool {
    let probe = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    (probe * 2.0).requires_grad()
}

/// The LM head's weight (the tied embeddings or `lm_head`), (V, H).
pub fn head_weight(model: &Gemma) -> &Tensor {
    match &model.lm_head {
        Some(l) => &l.weight,
        None => &model.model.embed_tokens,
    }
}

fn check(h: &Tensor, targets: &Tensor, chunk: i64) -> Result<i64> {
    let (n, _) =
        h.size2().map_err(|_| anyhow::anyhow!("hidden states must be (N, H), got shape {:?}", h.size()))?;
    ensure!(targets.size() == [n], "targets must be (N,) = ({n},), got {:?}", targets.size());
    ensure!(chunk > 0, "chunk size must be positive, got {chunk}");
    Ok(n)
}

/// Chunks `(start, len)` covering `0..n`.
fn chunks(n: i64, chunk: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..n).step_by(chunk as usize).map(move |s| (s, chunk.min(n - s)))
}

/// The f32 logits of `h` (C, H), scaled by 1/temperature when that is
/// neither 0 nor 1, log-softmaxed (C, V).
fn chunk_logp(model: &Gemma, h: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = model.logits(h).f_to_kind(Kind::Float)?;
    Ok(sampling_log_softmax(&logits, temperature))
}

/// A chunk of `h` for a backward pass of its own: detached, requiring grad
/// when `h` does.
fn chunk_leaf(h: &Tensor, s: i64, len: i64) -> Result<Tensor> {
    Ok(h.f_narrow(0, s, len)?.detach().set_requires_grad(h.requires_grad()))
}

/// `Σ −log softmax(h Wᵀ)[target] × scale` over the N rows of `h` (N, H),
/// `targets` (N,) int64 (−100: ignored), in f32, computed `chunk` rows at
/// a time. With `backward`, each chunk's loss is backpropagated at once
/// (into the head weight's gradient and, through `h`, into whatever `h`
/// was computed from); without, nothing is recorded. Returns the loss.
pub fn cross_entropy_sum(
    model: &Gemma,
    h: &Tensor,
    targets: &Tensor,
    scale: f64,
    chunk: i64,
    backward: bool,
) -> Result<f64> {
    let n = check(h, targets, chunk)?;
    let per_chunk = |hc: &Tensor, tc: &Tensor| -> Result<Tensor> {
        let logits = model.logits(hc).f_to_kind(Kind::Float)?; // (C, V)
        Ok(logits.f_cross_entropy_loss::<Tensor>(tc, None, Reduction::Sum, -100, 0.0)?.f_mul_scalar(scale)?)
    };
    let mut total = 0.0;
    if !backward {
        let _g = tch::no_grad_guard();
        for (s, len) in chunks(n, chunk) {
            total += per_chunk(&h.f_narrow(0, s, len)?, &targets.f_narrow(0, s, len)?)?.f_double_value(&[])?;
        }
        return Ok(total);
    }
    tch::with_grad(|| {
        let mut grads = vec![];
        for (s, len) in chunks(n, chunk) {
            let hc = chunk_leaf(h, s, len)?;
            let loss = per_chunk(&hc, &targets.f_narrow(0, s, len)?)?;
            total += loss.f_double_value(&[])?;
            if loss.requires_grad() {
                loss.f_backward()?;
            }
            grads.push(grad_or_zeros(&hc));
        }
        finish(h, &grads)?;
        Ok(total)
    })
}

/// `hc.grad()`, or zeros when none was computed.
fn grad_or_zeros(hc: &Tensor) -> Tensor {
    let g = hc.grad();
    if g.defined() {
        g
    } else {
        hc.zeros_like()
    }
}

/// Pushes the chunks' gradients, joined, into `h`'s graph.
fn finish(h: &Tensor, grads: &[Tensor]) -> Result<()> {
    if h.requires_grad() && !grads.is_empty() {
        push_gradient(h, &Tensor::f_cat(grads, 0)?)?;
    }
    Ok(())
}

/// `log_softmax(h Wᵀ / T)[target]` (N,) f32 for the rows of `h` (N, H)
/// and `targets` (N,) int64, the log-probabilities of the sampling
/// distribution at `temperature` ([`sampling_log_softmax`]: T = 0 means
/// 1), and with `entropy` that distribution's entropy per row (N,) f32.
/// Values only (no graph), computed `chunk` rows at a time.
pub fn token_logprobs(
    model: &Gemma,
    h: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: i64,
    entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let n = check(h, targets, chunk)?;
    let _g = tch::no_grad_guard();
    let (mut lps, mut ents) = (vec![], vec![]);
    for (s, len) in chunks(n, chunk) {
        let logp = chunk_logp(model, &h.f_narrow(0, s, len)?, temperature)?; // (C, V)
        let tc = targets.f_narrow(0, s, len)?.f_unsqueeze(-1)?; // (C, 1)
        lps.push(logp.f_gather(-1, &tc, false)?.f_squeeze_dim(-1)?);
        if entropy {
            ents.push(row_entropy(&logp)?);
        }
    }
    let empty = || Tensor::zeros([0], (Kind::Float, h.device()));
    let cat =
        |v: &[Tensor]| -> Result<Tensor> { Ok(if v.is_empty() { empty() } else { Tensor::f_cat(v, 0)? }) };
    Ok((cat(&lps)?, if entropy { Some(cat(&ents)?) } else { None }))
}

/// −Σ p log p per row of `logp` (C, V).
fn row_entropy(logp: &Tensor) -> Result<Tensor> {
    Ok(logp.f_exp()?.f_mul(logp)?.f_sum_dim_intlist(-1, false, Kind::Float)?.f_neg()?)
}

/// The backward pass of [`token_logprobs`]: recomputes each chunk with a
/// graph and backpropagates `grad` (N,), the gradient of some loss with
/// respect to the log-probabilities, into the head weight and through `h`.
/// So: values from [`token_logprobs`] → a leaf `lp` requiring grad → any
/// loss over `lp` → `loss.backward()` → `token_logprobs_backward(…,
/// &lp.grad())`. An undefined `grad` (the loss did not use `lp`) does
/// nothing.
pub fn token_logprobs_backward(
    model: &Gemma,
    h: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: i64,
    grad: &Tensor,
) -> Result<()> {
    token_logprobs_backward_with(model, h, targets, temperature, chunk, Some(grad), None)
}

/// [`token_logprobs_backward`] with the gradient with respect to the
/// entropies too (an entropy bonus): `grad_logp` and `grad_entropy` (N,)
/// each optional.
pub fn token_logprobs_backward_with(
    model: &Gemma,
    h: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: i64,
    grad_logp: Option<&Tensor>,
    grad_entropy: Option<&Tensor>,
) -> Result<()> {
    let n = check(h, targets, chunk)?;
    let grad_logp = grad_logp.filter(|g| g.defined());
    let grad_entropy = grad_entropy.filter(|g| g.defined());
    for g in [grad_logp, grad_entropy].into_iter().flatten() {
        ensure!(g.size() == [n], "a gradient for {n} log-probabilities must be ({n},), got {:?}", g.size());
    }
    if grad_logp.is_none() && grad_entropy.is_none() {
        return Ok(());
    }
    tch::with_grad(|| {
        let mut grads = vec![];
        for (s, len) in chunks(n, chunk) {
            let hc = chunk_leaf(h, s, len)?;
            let logp = chunk_logp(model, &hc, temperature)?; // (C, V)
            let mut obj = Tensor::zeros([], (Kind::Float, h.device()));
            if let Some(g) = grad_logp {
                let tc = targets.f_narrow(0, s, len)?.f_unsqueeze(-1)?; // (C, 1)
                let lp = logp.f_gather(-1, &tc, false)?.f_squeeze_dim(-1)?; // (C,)
                obj = obj
                    .f_add(&lp.f_mul(&g.f_narrow(0, s, len)?.f_to_kind(Kind::Float)?)?.f_sum(Kind::Float)?)?;
            }
            if let Some(g) = grad_entropy {
                let ent = row_entropy(&logp)?; // (C,)
                obj = obj.f_add(
                    &ent.f_mul(&g.f_narrow(0, s, len)?.f_to_kind(Kind::Float)?)?.f_sum(Kind::Float)?,
                )?;
            }
            if obj.requires_grad() {
                obj.f_backward()?;
            }
            grads.push(grad_or_zeros(&hc));
        }
        finish(h, &grads)
    })
}
