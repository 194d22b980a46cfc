//! Batched generation with a KV cache.
//!
//! Prompts of different lengths are left-padded into one batch; positions
//! restart at 0 on each prompt's first real token and padding is never
//! attended to, so a batch gives the same tokens as one prompt at a time.
//! Decoding is greedy (`temperature == 0`) or sampled with temperature,
//! top-k and top-p; the random draws come from a ChaCha stream seeded by the
//! caller, so results are reproducible on every device. Each sequence stops at
//! its first stop token (`<end_of_turn>` or `<eos>`).

use crate::model::{padded_causal_mask, Gemma, InferenceWeights, KvCache};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{Kind, Tensor};

/// Decoding settings.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// `<eos>`: always ends a sequence.
    pub eos_id: i64,
    /// `<end_of_turn>`: ends a sequence in dialogue mode (None for plain text).
    pub end_of_turn_id: Option<i64>,
    /// Id fed for finished sequences and used for left padding.
    pub pad_id: i64,
}

impl GenerationConfig {
    pub fn validate(&self) -> Result<()> {
        if self.temperature.is_nan() || self.temperature < 0.0 || !self.temperature.is_finite() {
            bail!("temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if let Some(k) = self.top_k {
            if k < 1 {
                bail!("top_k must be at least 1, got {k}");
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("top_p must be in (0, 1], got {p}");
            }
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    EndOfTurn,
    Length,
}

/// One generated sequence.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, the stop token (if any) included as the last one.
    pub tokens: Vec<i64>,
    /// log π_T(token) = `log_softmax(logits / T)` at the sampled token, one
    /// per entry of `tokens`: the sampling distribution's temperature T
    /// (T = 1 when decoding greedily), without the top-k/top-p
    /// renormalisation, as TRL and OpenRLHF compute it (the filters only
    /// restrict which tokens can be drawn).
    pub logprobs: Vec<f32>,
    /// With [`generate_detailed`]'s `top_logprobs` = N > 0: one list per
    /// entry of `tokens`, the N most likely tokens of that step's sampling
    /// distribution (the same `log_softmax(logits / T)` as `logprobs`) as
    /// `(id, log-prob)`, most likely first. Empty otherwise.
    pub top_logprobs: Vec<Vec<(i64, f32)>>,
    pub stop_reason: StopReason,
}

/// One token just generated, as [`generate_detailed`]'s callback sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepToken {
    pub id: i64,
    /// As in [`Generation::logprobs`].
    pub logprob: f32,
    /// As in [`Generation::top_logprobs`] (empty when not asked for).
    pub top: Vec<(i64, f32)>,
}

impl Generation {
    /// The generated ids without the stop token.
    pub fn content(&self) -> &[i64] {
        match self.stop_reason {
            StopReason::Length => &self.tokens,
            _ => &self.tokens[..self.tokens.len() - 1],
        }
    }
}

/// Keeps the `k` largest logits of each row, the rest −inf. `logits` (B, V).
pub fn top_k_filter(logits: &Tensor, k: i64) -> Tensor {
    let v = logits.size()[1];
    if k >= v {
        return logits.shallow_clone();
    }
    let (vals, _) = logits.topk(k, -1, true, true); // (B, k)
    let thresh = vals.narrow(1, k - 1, 1); // (B, 1)
    logits.masked_fill(&logits.lt_tensor(&thresh), f64::NEG_INFINITY)
}

/// Nucleus filter: keeps the smallest set of most likely tokens whose
/// probability reaches `p` (at least one). `logits` (B, V).
pub fn top_p_filter(logits: &Tensor, p: f64) -> Tensor {
    let (sorted, idx) = logits.sort(-1, true); // (B, V) descending
    let probs = sorted.softmax(-1, Kind::Float);
    let cum = probs.cumsum(-1, Kind::Float);
    // Remove a token when the mass before it already reaches p.
    let remove_sorted = (cum - &probs).ge(p); // (B, V)
    let remove = remove_sorted.scatter(-1, &idx, &remove_sorted);
    logits.masked_fill(&remove, f64::NEG_INFINITY)
}

/// `log_softmax(logits / T)` over the last dimension: the log-probabilities
/// of the sampling distribution at temperature `temperature` (T = 0, greedy,
/// gives those of T = 1), without top-k/top-p renormalisation (as TRL and
/// OpenRLHF). Teacher-forced log-probs that must agree with
/// [`Generation::logprobs`] use this same function.
pub fn sampling_log_softmax(logits: &Tensor, temperature: f64) -> Tensor {
    if temperature > 0.0 && temperature != 1.0 {
        (logits / temperature).log_softmax(-1, Kind::Float)
    } else {
        logits.log_softmax(-1, Kind::Float)
    }
}

/// The `n` largest entries of each row of `log_probs` (B, V) as `(id,
/// log-prob)`, largest first; nothing is computed when `n` = 0.
fn top_n(log_probs: &Tensor, n: i64) -> Result<Vec<Vec<(i64, f32)>>> {
    if n <= 0 {
        return Ok(vec![]);
    }
    let (vals, idx) = log_probs.topk(n, -1, true, true); // (B, n)
    let b = vals.size()[0];
    let vals: Vec<f32> = Vec::<f32>::try_from(vals.to_device(tch::Device::Cpu).reshape([-1]))?;
    let idx: Vec<i64> = Vec::<i64>::try_from(idx.to_device(tch::Device::Cpu).reshape([-1]))?;
    let n = n as usize;
    Ok((0..b as usize).map(|r| (r * n..(r + 1) * n).map(|j| (idx[j], vals[j])).collect()).collect())
}

/// Picks the next token of each row. `logits` (B, V) f32; `uniform` one draw
/// in [0, 1) per row, used only when sampling.
fn choose(logits: &Tensor, cfg: &GenerationConfig, uniform: &[f64]) -> Tensor {
    if cfg.temperature == 0.0 {
        return logits.argmax(-1, false); // (B,)
    }
    let mut l = logits / cfg.temperature;
    if let Some(k) = cfg.top_k {
        l = top_k_filter(&l, k);
    }
    if let Some(p) = cfg.top_p {
        if p < 1.0 {
            l = top_p_filter(&l, p);
        }
    }
    let probs = l.softmax(-1, Kind::Float); // (B, V)
    let cdf = probs.cumsum(-1, Kind::Float);
    let u = Tensor::from_slice(uniform).to_kind(Kind::Float).to_device(logits.device()).unsqueeze(1); // (B, 1)
    let u = u * cdf.narrow(1, cdf.size()[1] - 1, 1); // scale by the total mass (≈ 1)
    let idx = cdf.lt_tensor(&u).sum_dim_intlist(-1, false, Kind::Int64); // (B,)
                                                                         // Never pick a token the filters removed (cdf flat at the end).
    let last_allowed = probs.gt(0.0).to_kind(Kind::Int64).cumsum(-1, Kind::Int64).argmax(-1, false);
    idx.minimum(&last_allowed)
}

/// Generates continuations of `prompts` (token ids, each non-empty) in one
/// batch. Runs without gradients.
pub fn generate(model: &Gemma, prompts: &[Vec<i64>], cfg: &GenerationConfig) -> Result<Vec<Generation>> {
    generate_with(model, prompts, cfg, |_, _| true)
}

/// [`generate`] with a callback after every decoding step, for streaming.
///
/// `on_step(step, new)` is called once per step (0, 1, …) with one entry per
/// prompt: `Some(id)` for the token that sequence just generated (its stop
/// token included, as in [`Generation::tokens`]), `None` for a sequence that
/// had already stopped. Returning `false` stops generation after that step;
/// the sequences still running then keep [`StopReason::Length`]. The tokens
/// and log-probabilities are those of [`generate`] with the same arguments,
/// bit for bit (the callback only observes).
pub fn generate_with<F>(
    model: &Gemma,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    on_step: F,
) -> Result<Vec<Generation>>
where
    F: FnMut(usize, &[Option<i64>]) -> bool,
{
    let wt = InferenceWeights::for_model(model); // the CPU's fast layout for few-row matmuls
    generate_using(model, wt.as_ref(), prompts, cfg, on_step)
}

/// [`generate_with`] with an inference layout made beforehand, for a model
/// whose weights do not change between calls (serving, chat, judging): the
/// layout is then made once instead of on every call, which for a model
/// near [`InferenceWeights::MAX_BYTES`] saves a copy of all its weights per
/// request. `wt` must come from [`InferenceWeights::for_model`] on `model`
/// with its current weights; None generates with the training layout.
pub fn generate_using<F>(
    model: &Gemma,
    wt: Option<&InferenceWeights>,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    mut on_step: F,
) -> Result<Vec<Generation>>
where
    F: FnMut(usize, &[Option<i64>]) -> bool,
{
    generate_detailed(model, wt, prompts, cfg, 0, |step, new| {
        let ids: Vec<Option<i64>> = new.iter().map(|t| t.as_ref().map(|t| t.id)).collect();
        on_step(step, &ids)
    })
}

/// [`generate_using`] that also reports, when `top_logprobs` = N > 0, the N
/// most likely tokens of each step's sampling distribution
/// ([`Generation::top_logprobs`]; N is capped at the vocabulary), and whose
/// callback sees each new token with its log-prob ([`StepToken`]), for
/// OpenAI's `logprobs`/`top_logprobs`. With N = 0 nothing more is computed
/// than by [`generate_using`]; the tokens and log-probs are the same bit for
/// bit whatever N.
pub fn generate_detailed<F>(
    model: &Gemma,
    wt: Option<&InferenceWeights>,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    top_logprobs: usize,
    on_step: F,
) -> Result<Vec<Generation>>
where
    F: FnMut(usize, &[Option<StepToken>]) -> bool,
{
    generate_core(model, wt, prompts, cfg, top_logprobs, None, on_step)
}

/// [`generate`] with one random stream per prompt: the draws of row `r`
/// come from a ChaCha stream seeded by `seeds[r]` (`cfg.seed` is not
/// used), so a row's tokens do not depend on which rows share its batch
/// (RL rollouts seeded per sample, split across data-parallel ranks).
pub fn generate_seeded(
    model: &Gemma,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    seeds: &[u64],
) -> Result<Vec<Generation>> {
    if seeds.len() != prompts.len() {
        bail!("{} seeds for {} prompts; give one seed per prompt", seeds.len(), prompts.len());
    }
    let wt = InferenceWeights::for_model(model);
    generate_core(model, wt.as_ref(), prompts, cfg, 0, Some(seeds), |_, _| true)
}

/// The prompt through the model into `cache`; the final hidden states
/// (B, C, H) of its last C positions. With sliding-window layers and a
/// prompt longer than the smallest window W, the prompt goes in chunks of
/// W positions: each chunk's sliding layers then attend over W cached and W
/// new keys (2·W per query instead of the whole prompt and the empty
/// ring), and the full layers over the positions so far, aligned
/// bottom-right. The same attention as one pass (keys outside a query's
/// window or in its future are masked either way), less of it computed:
/// a 2048-token prompt with windows of 512 (`align bench generate --family
/// gemma3 --profile`) prefilled 1.2–1.7× faster than in one pass on the
/// 2-core machine.
/// `mask` (B, 1, P, P) or None, as for one pass.
fn prefill(
    model: &Gemma,
    ids: &Tensor,
    positions: &Tensor,
    mask: Option<&Tensor>,
    cache: &mut KvCache,
    wt: Option<&InferenceWeights>,
) -> Result<Tensor> {
    let plen = ids.size()[1];
    let specs = crate::family::layer_specs(&model.cfg, model.cfg.family()?)?;
    let window = specs
        .iter()
        .filter_map(|s| match s.span {
            crate::family::Span::Sliding(w) => Some(w),
            crate::family::Span::Full => None,
        })
        .min();
    let chunk = match window {
        Some(w) if w >= 1 && plen > w => w,
        _ => return model.forward_hidden_with(ids, positions, mask, Some(cache), wt),
    };
    let mut hidden = None;
    let mut c0 = 0;
    while c0 < plen {
        let n = chunk.min(plen - c0);
        // The chunk's rows of the prompt's mask, over every position so far.
        let m = mask.map(|m| m.narrow(2, c0, n).narrow(3, 0, c0 + n));
        hidden = Some(model.forward_hidden_with(
            &ids.narrow(1, c0, n),
            &positions.narrow(1, c0, n),
            m.as_ref(),
            Some(cache),
            wt,
        )?);
        c0 += n;
    }
    hidden.ok_or_else(|| anyhow::anyhow!("empty prompt"))
}

/// [`generate_detailed`], with per-row random streams when `seeds` is given
/// (one stream seeded by `cfg.seed` for the whole batch otherwise).
fn generate_core<F>(
    model: &Gemma,
    wt: Option<&InferenceWeights>,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    top_logprobs: usize,
    seeds: Option<&[u64]>,
    mut on_step: F,
) -> Result<Vec<Generation>>
where
    F: FnMut(usize, &[Option<StepToken>]) -> bool,
{
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty; a prompt needs at least one token");
    }
    let vocab = model.cfg.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if let Some(&bad) = p.iter().find(|&&t| t < 0 || t >= vocab) {
            bail!("prompt {i} has token id {bad} outside the vocabulary (0..{vocab})");
        }
    }
    let _guard = tch::no_grad_guard();
    let dev = model.device();
    let b = prompts.len() as i64;
    let plen = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let max_new = cfg.max_new_tokens as i64;
    let capacity = plen + max_new;
    if capacity > model.cfg.max_position_embeddings {
        bail!(
            "prompt ({plen} tokens) + max_new_tokens ({max_new}) exceeds the model's max_position_embeddings ({})",
            model.cfg.max_position_embeddings
        );
    }

    // Left-pad: (B, P) ids and validity.
    let mut ids = vec![cfg.pad_id; (b * plen) as usize];
    let mut valid = vec![false; (b * plen) as usize];
    for (r, p) in prompts.iter().enumerate() {
        let off = r * plen as usize + (plen as usize - p.len());
        ids[off..off + p.len()].copy_from_slice(p);
        valid[off..off + p.len()].iter_mut().for_each(|v| *v = true);
    }
    let ids = Tensor::from_slice(&ids).view([b, plen]).to_device(dev); // (B, P)
    let valid_p = Tensor::from_slice(&valid).view([b, plen]).to_device(dev); // (B, P)
                                                                             // Key validity over the whole cache; generated tokens are always valid.
    let valid_all = Tensor::cat(&[valid_p.shallow_clone(), Tensor::ones([b, max_new], (Kind::Bool, dev))], 1); // (B, P+N)
    let positions = (valid_p.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0); // (B, P)
    let mut next_pos = positions.narrow(1, plen - 1, 1) + 1; // (B, 1)

    let mut cache = KvCache::new(&model.cfg, b, capacity, model.kind(), dev)?;
    // Without padding, plain causal attention (and, when decoding, attention
    // to every cached key) needs no mask: the fast path.
    let padded = prompts.iter().any(|p| p.len() as i64 != plen);
    let mask = if padded { Some(padded_causal_mask(&valid_p, plen)?) } else { None }; // (B, 1, P, P)
    let hidden = prefill(model, &ids, &positions, mask.as_ref(), &mut cache, wt)?; // (B, C, H)
    let last = hidden.size()[1] - 1;
    let mut logits = model.logits_with(&hidden.narrow(1, last, 1), wt).squeeze_dim(1).to_kind(Kind::Float); // (B, V)

    let top_n_count = (top_logprobs as i64).min(vocab);
    // One stream for the batch, or one per row.
    let mut rngs: Vec<ChaCha8Rng> = match seeds {
        Some(s) => s.iter().map(|&s| ChaCha8Rng::seed_from_u64(s)).collect(),
        None => vec![ChaCha8Rng::seed_from_u64(cfg.seed)],
    };
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            tokens: vec![],
            logprobs: vec![],
            top_logprobs: vec![],
            stop_reason: StopReason::Length,
        })
        .collect();
    let mut done = vec![false; b as usize];
    for step in 0..max_new {
        let uniform: Vec<f64> = match seeds {
            Some(_) => rngs.iter_mut().map(|r| r.random::<f64>()).collect(),
            None => (0..b).map(|_| rngs[0].random::<f64>()).collect(),
        };
        let next = choose(&logits, cfg, &uniform); // (B,)
        let log_probs = sampling_log_softmax(&logits, cfg.temperature); // (B, V)
        let lp = log_probs.gather(1, &next.unsqueeze(1), false).squeeze_dim(1); // (B,)
        let next_v: Vec<i64> = Vec::<i64>::try_from(next.to_device(tch::Device::Cpu))?;
        let lp_v: Vec<f32> = Vec::<f32>::try_from(lp.to_device(tch::Device::Cpu))?;
        let top_v = top_n(&log_probs, top_n_count)?;
        let mut feed = next_v.clone();
        let mut new: Vec<Option<StepToken>> = vec![None; b as usize];
        for r in 0..b as usize {
            if done[r] {
                feed[r] = cfg.pad_id;
                continue;
            }
            let t = next_v[r];
            let top = top_v.get(r).cloned().unwrap_or_default();
            new[r] = Some(StepToken { id: t, logprob: lp_v[r], top: top.clone() });
            out[r].tokens.push(t);
            out[r].logprobs.push(lp_v[r]);
            if top_n_count > 0 {
                out[r].top_logprobs.push(top);
            }
            if t == cfg.eos_id {
                done[r] = true;
                out[r].stop_reason = StopReason::Eos;
            } else if Some(t) == cfg.end_of_turn_id {
                done[r] = true;
                out[r].stop_reason = StopReason::EndOfTurn;
            }
        }
        let go_on = on_step(step as usize, &new);
        if !go_on || done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        let x = Tensor::from_slice(&feed).view([b, 1]).to_device(dev); // (B, 1)
        let s = cache.len + 1;
        let step_mask = padded.then(|| valid_all.narrow(1, 0, s).view([b, 1, 1, s])); // (B, 1, 1, S)
        let hidden = model.forward_hidden_with(&x, &next_pos, step_mask.as_ref(), Some(&mut cache), wt)?; // (B, 1, H)
        logits = model.logits_with(&hidden, wt).squeeze_dim(1).to_kind(Kind::Float);
        next_pos += 1;
    }
    Ok(out)
}
