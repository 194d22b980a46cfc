//! Rollouts: k sampled responses per prompt from the policy, and the
//! per-token log-probabilities of those responses under a model
//! (teacher-forced over prompt + response).

use anyhow::{bail, ensure, Context, Result};
use lm::{Gemma, GenerationConfig, StopReason, Tokenizer};
use std::ops::Range;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// One prompt: its messages, its token ids (the chat template with the
/// generation prompt) and its category.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub messages: Vec<lm::Message>,
    pub ids: Vec<i64>,
    pub category: Option<String>,
}

impl Prompt {
    /// A prompt of ready-made token ids (benchmarks, tests): no messages.
    pub fn from_ids(ids: Vec<i64>) -> Self {
        Prompt { messages: vec![], ids, category: None }
    }
}

/// One sampled response to a prompt.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index of the prompt within the step's batch; the k samples of a
    /// prompt are consecutive.
    pub group: usize,
    pub prompt: Arc<Prompt>,
    /// Generated ids, the stop token (if any) included as the last one.
    pub response_ids: Vec<i64>,
    /// log π_T(token) at sampling time: `log_softmax(logits / T)` at the
    /// sampling temperature T, without top-k/top-p renormalisation (see
    /// [`lm::generate::sampling_log_softmax`]), one per response id.
    pub sample_logprobs: Vec<f32>,
    /// The response without the stop token, decoded with special tokens
    /// skipped (empty when no tokenizer was given).
    pub text: String,
    pub stop_reason: StopReason,
}

impl Rollout {
    /// The generated ids without the stop token.
    pub fn content(&self) -> &[i64] {
        match self.stop_reason {
            StopReason::Length => &self.response_ids,
            _ => &self.response_ids[..self.response_ids.len().saturating_sub(1)],
        }
    }

    /// Whether the response ended properly, with `<end_of_turn>`.
    pub fn ended(&self) -> bool {
        self.stop_reason == StopReason::EndOfTurn
    }
}

/// The special ids generation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    pub eos: i64,
    pub end_of_turn: i64,
    pub pad: i64,
}

impl Specials {
    pub fn of(tok: &Tokenizer) -> Self {
        Specials { eos: tok.special.eos, end_of_turn: tok.special.end_of_turn, pad: tok.special.pad }
    }
}

/// Sampling settings of a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    /// Sequences per `generate` call; 0: all at once.
    pub batch_size: usize,
}

/// SplitMix64 (Steele et al., 2014): a bijective 64-bit mixer.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generation seed of one sample: a pure function of the run's seed,
/// the step, a salt (training or evaluation) and the sample's index in the
/// step's global batch (prompt by prompt, k samples each), so a resumed run
/// draws exactly what an uninterrupted one does, and a sample draws the
/// same tokens whichever rank, or generation chunk, it falls in.
pub fn generation_seed(seed: u64, step: u64, salt: u64, index: u64) -> u64 {
    splitmix64(seed ^ splitmix64(step ^ splitmix64(salt ^ splitmix64(index))))
}

/// Salt of training rollouts' seeds.
pub const SALT_TRAIN: u64 = 0x0054_5241_494e;
/// Salt of evaluation rollouts' seeds.
pub const SALT_EVAL: u64 = 0x4556_414c;

/// Samples `k` responses to each prompt (laid out prompt by prompt: the k
/// samples of prompt 0, then of prompt 1, …) with the policy, in chunks of
/// `sampling.batch_size` sequences; sample `j` is seeded by
/// [`generation_seed`]`(seed, step, salt, j)`.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    policy: &Gemma,
    prompts: &[Arc<Prompt>],
    k: usize,
    sampling: &Sampling,
    specials: Specials,
    tok: Option<&Tokenizer>,
    seed: u64,
    step: u64,
    salt: u64,
) -> Result<Vec<Rollout>> {
    sample_from(policy, prompts, k, sampling, specials, tok, (seed, step, salt), 0)
}

/// [`sample`] for a share of a larger batch whose first sample has the
/// global index `first` (a data-parallel rank's prompts): sample `j` of
/// this share is seeded by [`generation_seed`]`(seed, step, salt, first +
/// j)`, so the shares of all ranks draw what one process draws for the
/// whole batch. `key` is `(seed, step, salt)`.
#[allow(clippy::too_many_arguments)]
pub fn sample_from(
    policy: &Gemma,
    prompts: &[Arc<Prompt>],
    k: usize,
    sampling: &Sampling,
    specials: Specials,
    tok: Option<&Tokenizer>,
    key: (u64, u64, u64),
    first: u64,
) -> Result<Vec<Rollout>> {
    ensure!(k >= 1, "k must be at least 1");
    let (seed, step, salt) = key;
    let n = prompts.len() * k;
    let chunk = if sampling.batch_size == 0 { n.max(1) } else { sampling.batch_size };
    let mut out = Vec::with_capacity(n);
    let flat: Vec<(usize, &Arc<Prompt>)> =
        prompts.iter().enumerate().flat_map(|(g, p)| std::iter::repeat_n((g, p), k)).collect();
    for (c, rows) in flat.chunks(chunk).enumerate() {
        let ids: Vec<Vec<i64>> = rows.iter().map(|(_, p)| p.ids.clone()).collect();
        let start = first + (c * chunk) as u64;
        let seeds: Vec<u64> =
            (0..rows.len() as u64).map(|j| generation_seed(seed, step, salt, start + j)).collect();
        let gcfg = GenerationConfig {
            max_new_tokens: sampling.max_new_tokens,
            temperature: sampling.temperature,
            top_k: sampling.top_k,
            top_p: sampling.top_p,
            seed: 0,
            eos_id: specials.eos,
            end_of_turn_id: Some(specials.end_of_turn),
            pad_id: specials.pad,
        };
        let gens = lm::generate::generate_seeded(policy, &ids, &gcfg, &seeds)
            .with_context(|| format!("sampling rollouts of step {step}"))?;
        for ((g, p), gen) in rows.iter().zip(gens) {
            let mut r = Rollout {
                group: *g,
                prompt: Arc::clone(p),
                response_ids: gen.tokens,
                sample_logprobs: gen.logprobs,
                text: String::new(),
                stop_reason: gen.stop_reason,
            };
            if let Some(t) = tok {
                r.text = decode(t, r.content())?;
            }
            out.push(r);
        }
    }
    Ok(out)
}

/// Decodes ids, skipping special tokens and ids the tokenizer does not have
/// (a model's vocabulary may be padded beyond the tokenizer's).
pub fn decode(tok: &Tokenizer, ids: &[i64]) -> Result<String> {
    let v = tok.vocab_size();
    let known: Vec<i64> = ids.iter().copied().filter(|&i| i >= 0 && i < v).collect();
    tok.decode(&known, true)
}

/// A teacher-forced batch of prompt + response rows, right-padded so that
/// plain causal attention sees no padding before a real token.
pub struct TeacherBatch {
    /// (n, T) int64: prompt ++ response without its last token.
    pub ids: Tensor,
    /// (n, T) int64: 0..T.
    pub positions: Tensor,
    /// (n, R) int64: the position whose hidden state predicts response token j.
    pub gather: Tensor,
    /// (n, R) int64: the response tokens (pad beyond each response).
    pub targets: Tensor,
    /// (n, R) bool: real response tokens.
    pub mask: Tensor,
    /// Real tokens in the batch (prompt + response).
    pub tokens: usize,
}

impl TeacherBatch {
    /// The rows `range` of `rollouts`.
    pub fn new(rollouts: &[Rollout], range: Range<usize>, pad: i64, device: Device) -> Result<Self> {
        let rows = &rollouts[range];
        ensure!(!rows.is_empty(), "a teacher-forced batch needs at least one rollout");
        let n = rows.len() as i64;
        let t = rows.iter().map(|r| r.prompt.ids.len() + r.response_ids.len() - 1).max().unwrap_or(1) as i64;
        let rmax = rows.iter().map(|r| r.response_ids.len()).max().unwrap_or(1) as i64;
        let mut ids = vec![pad; (n * t) as usize];
        let mut gather = vec![0i64; (n * rmax) as usize];
        let mut targets = vec![pad; (n * rmax) as usize];
        let mut mask = vec![false; (n * rmax) as usize];
        let mut tokens = 0;
        for (i, r) in rows.iter().enumerate() {
            if r.prompt.ids.is_empty() || r.response_ids.is_empty() {
                bail!("rollout {i} has an empty prompt or response; nothing to score");
            }
            let p = r.prompt.ids.len();
            let row = &mut ids[i * t as usize..];
            row[..p].copy_from_slice(&r.prompt.ids);
            let rl = r.response_ids.len();
            row[p..p + rl - 1].copy_from_slice(&r.response_ids[..rl - 1]);
            for (j, &y) in r.response_ids.iter().enumerate() {
                let o = i * rmax as usize + j;
                gather[o] = (p + j - 1) as i64;
                targets[o] = y;
                mask[o] = true;
            }
            tokens += p + rl;
        }
        let ids = Tensor::from_slice(&ids).view([n, t]).to_device(device); // (n, T)
        let positions = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([n, t], true); // (n, T)
        let gather = Tensor::from_slice(&gather).view([n, rmax]).to_device(device); // (n, R)
        let targets = Tensor::from_slice(&targets).view([n, rmax]).to_device(device); // (n, R)
        let mask = Tensor::from_slice(&mask).view([n, rmax]).to_device(device); // (n, R)
        Ok(TeacherBatch { ids, positions, gather, targets, mask, tokens })
    }
}

impl TeacherBatch {
    /// The hidden states that predict the response tokens: the rows of
    /// `hidden` (n, T, H) at `gather` where `mask` holds, (N, H) in
    /// row-major order (keeping the graph), and their targets (N,).
    pub fn response_rows(&self, hidden: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, r) = self.gather.size2()?;
        let h = *hidden.size().last().context("hidden states of no dimension")?;
        let idx = self.gather.unsqueeze(-1).expand([n, r, h], false); // (n, R, H)
        let picked = hidden.f_gather(1, &idx, false)?; // (n, R, H)
        let rows = lm::chunked::select(&picked, &self.mask)?; // (N, H)
        Ok((rows, self.targets.masked_select(&self.mask))) // (N,)
    }

    /// Per-row values (N,) of the response tokens back at their places,
    /// (n, R) f32, zero where masked out.
    pub fn scatter(&self, values: &Tensor) -> Result<Tensor> {
        let z = Tensor::zeros(self.mask.size(), (Kind::Float, self.mask.device()));
        Ok(z.f_masked_scatter(&self.mask, &values.f_to_kind(Kind::Float)?)?)
    }
}

/// Per-token log-probabilities (n, R) f32 of the responses of `batch` under
/// `model`'s sampling distribution at `temperature`, `log_softmax(logits /
/// T)`, zero where masked out, and with `entropy` the per-token entropy
/// (n, R) of that distribution. Values only, never a gradient graph: the
/// LM head and log-softmax run over chunks of the response positions alone
/// ([`lm::chunked::token_logprobs`]), so the (n, T, V) logits are never
/// built. The update computes the same values (and their gradients) in the
/// trainer, through [`TeacherBatch::response_rows`] and the same chunks.
///
/// Top-k/top-p are not applied: as in TRL and OpenRLHF, the log-probs (and
/// so the KL, the importance ratio and the entropy) are those of the
/// temperature-scaled distribution over the whole vocabulary; the filters
/// only restrict which tokens are drawn. These equal the log-probs stored
/// at generation ([`Rollout::sample_logprobs`]) for the same tokens.
pub fn response_logprobs(
    model: &Gemma,
    batch: &TeacherBatch,
    entropy: bool,
    temperature: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let _g = tch::no_grad_guard();
    let hidden = model.forward_hidden(&batch.ids, &batch.positions, None, None)?; // (n, T, H)
    let (rows, targets) = batch.response_rows(&hidden)?; // (N, H), (N,)
    drop(hidden);
    let (lp, ent) = lm::chunked::token_logprobs(
        model,
        &rows,
        &targets,
        temperature,
        lm::chunked::chunk_size(model),
        entropy,
    )?;
    Ok((batch.scatter(&lp)?, ent.map(|e| batch.scatter(&e)).transpose()?))
}
