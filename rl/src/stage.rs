//! The RL stage: config → prompts → rollouts → rewards → updates →
//! checkpoints, evaluation, metrics and the final model.
//!
//! One step (see [`Trainer::step`]):
//!
//! 1. B prompts, k samples each from the policy (batched generation with the
//!    KV cache; the seed is a pure function of the run's seed and the step);
//! 2. the reward r_i of each sample ([`RewardFn`]), optionally normalised by
//!    a stored mean/std and clipped;
//! 3. per-token log-probabilities of each response under the policy and the
//!    frozen reference (teacher-forced over prompt + response, no gradient
//!    graph for the reference) and the per-token KL (k1 or k3);
//! 4. R_i = r_i − β·Σ_t KL_t (or the KL as a separate loss term) minus the
//!    penalty for a response without `<end_of_turn>`;
//! 5. leave-one-out advantages over each prompt's k samples, optionally
//!    whitened over the batch;
//! 6. one optimiser step on the REINFORCE loss (or several on its clipped
//!    importance-weighted form);
//! 7. the adaptive KL controller, when a target KL is set.

use crate::control::KlController;
use crate::loss::{
    clipped_reinforce_loss, kl_loss, kl_per_token, reinforce_loss, rloo_advantages, sequence_rewards, whiten,
    KlEstimator,
};
use crate::reward::{RewardConfig, RewardFn};
use crate::rollout::{self, Prompt, Rollout, Sampling, Specials, TeacherBatch, SALT_EVAL, SALT_TRAIN};
use anyhow::{bail, Context, Result};
use datasets::{Mixture, MixtureConfig};
use lm::checkpoint::{self, SaveOptions};
use lm::train::{self, AdamW, MetricsLog, OptimConfig, TrainerState};
use lm::{Gemma, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Kind, Tensor};

/// Where the KL to the reference enters the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KlMode {
    /// In the sequence reward: R_i = r_i − β Σ_t KL_t (Ziegler et al., 2019;
    /// TRL's RLOO).
    #[default]
    Reward,
    /// As a loss term β · mean_i mean_t KL_t with gradients (GRPO); use the
    /// k3 estimator.
    Loss,
}

/// The `[rl]` section of a recipe (or a standalone `align rl` config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    /// The SFT checkpoint the policy starts from (a Hugging Face directory).
    pub model: PathBuf,
    /// The reference model; default: `model` (the same weights, frozen).
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// Where checkpoints, metrics, samples and the final `model/` go.
    pub output_dir: PathBuf,
    pub reward: RewardConfig,
    /// The prompts: a mixture of any record kind (each record's prompt is
    /// used); its held-out split gives the evaluation prompts.
    pub data: MixtureConfig,
    /// RL steps (rollout batches).
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Prompts per step (B).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Samples per prompt (k ≥ 2, for the leave-one-out baseline).
    #[serde(default = "default_num_samples")]
    pub num_samples: usize,
    /// Longest response, in tokens.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Prompts longer than this (in tokens, template included) are skipped.
    #[serde(default = "default_max_prompt_len")]
    pub max_prompt_len: usize,
    #[serde(default = "one_f64")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// The KL coefficient β (the initial one with a `kl_target`).
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    #[serde(default)]
    pub kl_mode: KlMode,
    /// Target KL per sample for the adaptive controller; absent: β fixed.
    #[serde(default)]
    pub kl_target: Option<f64>,
    /// Horizon (in samples) of the adaptive controller.
    #[serde(default = "default_horizon")]
    pub kl_horizon: f64,
    /// Subtracted from the reward of a response that never emits
    /// `<end_of_turn>` (cut at `max_new_tokens`, or ended by `<eos>`).
    #[serde(default)]
    pub missing_eot_penalty: f64,
    /// Whiten the advantages over the batch (zero mean, unit variance).
    #[serde(default)]
    pub whiten_advantages: bool,
    /// Normalise rewards as (r − mean) / std, with `reward_mean` and
    /// `reward_std` or else the reward model's stored statistics.
    #[serde(default)]
    pub normalize_reward: bool,
    #[serde(default)]
    pub reward_mean: Option<f64>,
    #[serde(default)]
    pub reward_std: Option<f64>,
    /// Clip (normalised) rewards to [−c, c].
    #[serde(default)]
    pub reward_clip: Option<f64>,
    /// Optimiser steps per batch of rollouts; above 1 the loss is the
    /// clipped importance-weighted one.
    #[serde(default = "lm::train::defaults::one")]
    pub updates_per_batch: usize,
    /// The ratio clip ε when `updates_per_batch > 1`.
    #[serde(default = "default_clip_eps")]
    pub clip_eps: f64,
    /// Sequences per teacher-forced forward/backward pass (gradients are
    /// accumulated); 0: the whole batch at once. With one update per batch
    /// and the whole batch in one pass the policy is run once per step.
    #[serde(default)]
    pub micro_batch_size: usize,
    /// Sequences per generation call; 0: all B·k at once.
    #[serde(default)]
    pub generation_batch_size: usize,
    #[serde(default)]
    pub optim: OptimConfig,
    /// Evaluate on held-out prompts every N steps (0: never); also before
    /// the first step and after the last.
    #[serde(default)]
    pub eval_every: u64,
    /// Held-out prompts used for evaluation (the first N).
    #[serde(default = "default_eval_prompts")]
    pub eval_prompts: usize,
    /// Evaluation responses written to `samples-step-N.jsonl`.
    #[serde(default = "default_eval_samples")]
    pub eval_samples: usize,
    /// Sampling temperature of evaluation; default: `temperature`.
    #[serde(default)]
    pub eval_temperature: Option<f64>,
    /// Save a resumable checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub save_every: u64,
    #[serde(default = "lm::train::defaults::keep_last")]
    pub keep_last: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "lm::train::defaults::device")]
    pub device: String,
    /// f32, or bf16 (bf16 weights with fp32 master weights in the optimiser).
    #[serde(default = "lm::train::defaults::dtype")]
    pub dtype: String,
    /// Stop after this many steps as if killed (no final save): for resume
    /// tests. Not part of the config hash.
    #[serde(default, skip_serializing)]
    pub stop_after: Option<u64>,
}

fn default_steps() -> u64 {
    100
}
fn default_batch_size() -> usize {
    8
}
fn default_num_samples() -> usize {
    4
}
fn default_max_new_tokens() -> usize {
    128
}
fn default_max_prompt_len() -> usize {
    512
}
fn one_f64() -> f64 {
    1.0
}
fn default_beta() -> f64 {
    0.05
}
fn default_horizon() -> f64 {
    10000.0
}
fn default_clip_eps() -> f64 {
    0.2
}
fn default_eval_prompts() -> usize {
    32
}
fn default_eval_samples() -> usize {
    4
}

impl RlConfig {
    /// The checkpoints' config hash ([`train::checkpoint_hash`]);
    /// `stop_after` is never serialised.
    pub fn hash(&self) -> Result<String> {
        train::checkpoint_hash(self, |c| (c.eval_every, c.save_every, c.keep_last) = (0, 0, 0))
    }

    /// A config with every default, for programmatic use (benchmarks).
    pub fn with_defaults(model: &Path, output_dir: &Path, reward: RewardConfig) -> Result<Self> {
        let v = serde_json::json!({
            "model": model, "output_dir": output_dir, "reward": reward, "data": {"sources": []},
        });
        serde_json::from_value(v).context("building a default RL config")
    }

    /// Reads a TOML config; a top-level `[rl]` table or the fields alone.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let cfg: RlConfig = lm::train::read_stage_config(path, "rl")?;
        cfg.validate().with_context(|| format!("invalid RL config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.optim.validate()?;
        self.reward.validate()?;
        if self.batch_size == 0 {
            bail!("batch_size (prompts per step) must be at least 1");
        }
        if self.num_samples < 2 {
            bail!(
                "num_samples must be at least 2: the leave-one-out baseline needs k >= 2 samples per prompt"
            );
        }
        if self.max_new_tokens == 0 || self.max_prompt_len == 0 {
            bail!("max_new_tokens and max_prompt_len must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "temperature must be a positive number, got {} (greedy decoding would make the k samples identical)",
                self.temperature
            );
        }
        if let Some(t) = self.eval_temperature {
            if !(t.is_finite() && t >= 0.0) {
                bail!("eval_temperature must be a number >= 0, got {t}");
            }
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!("beta must be a number >= 0, got {}", self.beta);
        }
        if let Some(t) = self.kl_target {
            KlController::adaptive(self.beta, t, self.kl_horizon)?;
            if self.beta == 0.0 {
                bail!(
                    "kl_target needs beta > 0: the adaptive controller scales beta and cannot move it from 0"
                );
            }
        }
        if !self.missing_eot_penalty.is_finite() {
            bail!("missing_eot_penalty must be a finite number");
        }
        if self.updates_per_batch == 0 {
            bail!("updates_per_batch must be at least 1");
        }
        if !(self.clip_eps > 0.0 && self.clip_eps < 1.0) {
            bail!("clip_eps must be in (0, 1), got {}", self.clip_eps);
        }
        if let Some(c) = self.reward_clip {
            if !(c.is_finite() && c > 0.0) {
                bail!("reward_clip must be a positive number, got {c}");
            }
        }
        if let Some(s) = self.reward_std {
            if !(s.is_finite() && s > 0.0) {
                bail!("reward_std must be a positive number, got {s}");
            }
        }
        if self.reward_mean.is_some() != self.reward_std.is_some() {
            bail!("set both reward_mean and reward_std, or neither (then the reward model's stored statistics are used)");
        }
        if self.steps == 0 {
            bail!("steps must be at least 1");
        }
        Ok(())
    }

    /// Resolves relative paths against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.model);
        fix(&mut self.output_dir);
        if let Some(r) = self.reference.as_mut() {
            fix(r);
        }
        self.reward.resolve_paths(base);
    }

    fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            batch_size: self.generation_batch_size,
        }
    }
}

/// What one step measured (a row of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepStats {
    pub step: u64,
    /// The reward function's rewards (before normalisation and clipping).
    pub reward_mean: f64,
    pub reward_std: f64,
    pub reward_min: f64,
    pub reward_max: f64,
    /// After normalisation and clipping.
    pub score_mean: f64,
    /// The sequence reward R (score − β·KL in reward mode − penalty).
    pub total_reward_mean: f64,
    /// Mean over samples of Σ_t KL_t (the configured estimator).
    pub kl: f64,
    pub kl_per_token: f64,
    /// β used this step.
    pub beta: f64,
    /// Mean per-token entropy of the policy over the responses.
    pub entropy: f64,
    /// Mean response length in tokens (stop token included).
    pub response_len: f64,
    /// Fraction of responses ended with `<end_of_turn>`.
    pub ended_frac: f64,
    pub adv_mean: f64,
    pub adv_std: f64,
    pub adv_min: f64,
    pub adv_max: f64,
    /// Mean loss over the step's updates.
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// Fraction of response tokens whose ratio left [1 − ε, 1 + ε] (several
    /// updates per batch; 0 otherwise).
    pub clip_frac: f64,
    pub time_generate: f64,
    /// Reward, reference and (when separate) old-policy passes.
    pub time_score: f64,
    pub time_update: f64,
    /// Generated tokens and their rate.
    pub rollout_tokens: usize,
    pub rollout_tokens_per_s: f64,
}

/// Evaluation on held-out prompts: one sample each.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub step: u64,
    pub prompts: usize,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub ended_frac: f64,
    pub response_len: f64,
    /// Mean reward per category (prompts without one under "").
    pub per_category: BTreeMap<String, f64>,
    /// Share of correct answers among the prompts that are built-in tasks
    /// (`datasets::tasks`), when there are any.
    pub oracle_accuracy: Option<f64>,
    pub oracle_prompts: usize,
}

/// Holds the three roles and the optimiser, and runs steps.
pub struct Trainer {
    pub cfg: RlConfig,
    pub policy_vs: nn::VarStore,
    pub policy: Gemma,
    /// Frozen (no variable requires a gradient).
    pub reference_vs: nn::VarStore,
    pub reference: Gemma,
    /// Decodes responses for text rewards and sample files (optional).
    pub tokenizer: Option<Tokenizer>,
    pub specials: Specials,
    pub opt: AdamW,
    pub reward: Box<dyn RewardFn>,
    pub kl: KlController,
    /// (mean, std) used to normalise rewards.
    pub norm: Option<(f64, f64)>,
    /// For the non-finite-loss error: the checkpoint directory.
    pub ckpt_root: Option<PathBuf>,
}

fn stats(v: &[f64]) -> (f64, f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, std, min, max)
}

/// Waits for the device's queued work, so that phase timings on CUDA are
/// attributed to the phase that queued it.
fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu).flatten(0, -1))?)
}

impl Trainer {
    /// Sets up the roles: `policy` is trained (cast to the config's dtype,
    /// with fp32 master weights when that is not f32), `reference` is frozen.
    pub fn new(
        cfg: RlConfig,
        policy: (nn::VarStore, Gemma),
        reference: (nn::VarStore, Gemma),
        tokenizer: Option<Tokenizer>,
        specials: Specials,
        reward: Box<dyn RewardFn>,
    ) -> Result<Self> {
        cfg.validate()?;
        let (mut policy_vs, policy) = policy;
        let (mut reference_vs, reference) = reference;
        if policy.cfg.vocab_size != reference.cfg.vocab_size {
            bail!(
                "the policy has vocab_size {} and the reference {}; they must share a vocabulary",
                policy.cfg.vocab_size,
                reference.cfg.vocab_size
            );
        }
        let kind = lm::device::parse_dtype(&cfg.dtype)?;
        let exact: BTreeMap<String, Tensor> = if kind != Kind::Float && policy_vs.kind() == Kind::Float {
            policy_vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect()
        } else {
            BTreeMap::new()
        };
        if kind != policy_vs.kind() {
            policy_vs.set_kind(kind);
        }
        if kind != reference_vs.kind() {
            reference_vs.set_kind(kind);
        }
        reference_vs.freeze();
        let mut opt = AdamW::new(&policy_vs, &cfg.optim);
        opt.set_masters(exact)?;
        if cfg.kl_mode == KlMode::Loss && cfg.kl_estimator == KlEstimator::K1 && cfg.beta > 0.0 {
            eprintln!(
                "warning: kl_mode = \"loss\" with the k1 estimator: its gradient is zero in expectation; use kl_estimator = \"k3\""
            );
        }
        let kl = match cfg.kl_target {
            Some(t) => KlController::adaptive(cfg.beta, t, cfg.kl_horizon)?,
            None => KlController::fixed(cfg.beta),
        };
        let norm = if cfg.normalize_reward {
            match (cfg.reward_mean, cfg.reward_std, reward.stats()) {
                (Some(m), Some(s), _) => Some((m, s)),
                (_, _, Some(ms)) => Some(ms),
                _ => bail!(
                    "normalize_reward = true but neither reward_mean/reward_std are set nor does the reward ({}) have stored statistics",
                    reward.name()
                ),
            }
        } else {
            None
        };
        Ok(Trainer {
            cfg,
            policy_vs,
            policy,
            reference_vs,
            reference,
            tokenizer,
            specials,
            opt,
            reward,
            kl,
            norm,
            ckpt_root: None,
        })
    }

    /// Samples the step's rollouts (k per prompt) from the policy.
    pub fn rollouts(&self, step: u64, prompts: &[Arc<Prompt>]) -> Result<Vec<Rollout>> {
        rollout::sample(
            &self.policy,
            prompts,
            self.cfg.num_samples,
            &self.cfg.sampling(),
            self.specials,
            self.tokenizer.as_ref(),
            self.cfg.seed,
            step,
            SALT_TRAIN,
        )
    }

    /// Rewards of `rollouts` from the reward function, checked.
    fn score(&mut self, rollouts: &[Rollout]) -> Result<Vec<f64>> {
        let r =
            self.reward.score(rollouts).with_context(|| format!("scoring with {}", self.reward.name()))?;
        if r.len() != rollouts.len() {
            bail!(
                "the reward {} gave {} rewards for {} rollouts",
                self.reward.name(),
                r.len(),
                rollouts.len()
            );
        }
        if let Some(i) = r.iter().position(|x| !x.is_finite()) {
            bail!("the reward {} gave a non-finite reward ({}) for rollout {i}", self.reward.name(), r[i]);
        }
        Ok(r)
    }

    /// Normalisation and clipping of raw rewards.
    fn process(&self, raw: &[f64]) -> Vec<f64> {
        raw.iter()
            .map(|&r| {
                let r = match self.norm {
                    Some((m, s)) => (r - m) / s.max(1e-8),
                    None => r,
                };
                match self.cfg.reward_clip {
                    Some(c) => r.clamp(-c, c),
                    None => r,
                }
            })
            .collect()
    }

    /// One RL step on `prompts` (B of them): rollouts, rewards, log-probs,
    /// advantages, update(s), KL controller. Returns the metrics and the
    /// rollouts.
    pub fn step(&mut self, step: u64, prompts: &[Arc<Prompt>]) -> Result<(StepStats, Vec<Rollout>)> {
        let k = self.cfg.num_samples;
        let device = self.policy.device();
        let t0 = Instant::now();
        let rollouts = self.rollouts(step, prompts)?;
        let time_generate = t0.elapsed().as_secs_f64();
        let rollout_tokens: usize = rollouts.iter().map(|r| r.response_ids.len()).sum();

        // Scoring: reward, reference and (unless folded into the update) the
        // policy before the update; no gradient graph is kept.
        let t1 = Instant::now();
        let raw = self.score(&rollouts)?;
        let n = rollouts.len();
        let mb = if self.cfg.micro_batch_size == 0 { n } else { self.cfg.micro_batch_size };
        let ranges: Vec<Range<usize>> = (0..n).step_by(mb).map(|s| s..(s + mb).min(n)).collect();
        let batches: Vec<TeacherBatch> = ranges
            .iter()
            .map(|r| TeacherBatch::new(&rollouts, r.clone(), self.specials.pad, device))
            .collect::<Result<_>>()?;
        let ref_logp: Vec<Tensor> = {
            let _g = tch::no_grad_guard();
            batches
                .iter()
                .map(|b| Ok(rollout::response_logprobs(&self.reference, b, false)?.0))
                .collect::<Result<_>>()?
        };
        let updates = self.cfg.updates_per_batch;
        let single_pass = updates == 1 && batches.len() == 1;
        let mut old_logp: Vec<Tensor> = vec![];
        let mut entropy: Vec<Tensor> = vec![];
        if !single_pass {
            let _g = tch::no_grad_guard();
            for b in &batches {
                let (lp, ent) = rollout::response_logprobs(&self.policy, b, true)?;
                old_logp.push(lp);
                entropy.push(ent.context("entropy requested")?);
            }
        }
        sync(device);
        let mut time_score = t1.elapsed().as_secs_f64();

        // Single pass: the update's forward (with gradients) also gives the
        // policy's log-probs for the KL; timed as part of the update.
        let t2 = Instant::now();
        let mut graph: Option<Tensor> = None;
        if single_pass {
            let (lp, ent) = rollout::response_logprobs(&self.policy, &batches[0], true)?;
            old_logp.push(lp.detach());
            entropy.push(ent.context("entropy requested")?);
            graph = Some(lp);
        }
        sync(device);
        let mut time_update = t2.elapsed().as_secs_f64();

        // Sequence rewards and advantages, (N,).
        let t3 = Instant::now();
        let est = self.cfg.kl_estimator;
        let beta = self.kl.beta;
        let mut kl_seq = vec![];
        let mut ent_sum = 0.0;
        let mut tok_count = 0.0;
        for (i, b) in batches.iter().enumerate() {
            let kl = kl_per_token(&old_logp[i], &ref_logp[i], &b.mask, est)?; // (n, R)
            kl_seq.push(kl.sum_dim_intlist(-1, false, Kind::Float)); // (n,)
            ent_sum += entropy[i].sum(Kind::Double).double_value(&[]);
            tok_count += b.mask.sum(Kind::Double).double_value(&[]);
        }
        let kl_seq = Tensor::cat(&kl_seq, 0); // (N,)
        let processed = self.process(&raw);
        let score = Tensor::from_slice(&processed).to_kind(Kind::Float).to_device(device); // (N,)
        let ended: Vec<bool> = rollouts.iter().map(Rollout::ended).collect();
        let ended_t = Tensor::from_slice(&ended).to_device(device); // (N,)
        let beta_r = if self.cfg.kl_mode == KlMode::Reward { beta } else { 0.0 };
        let total =
            sequence_rewards(&score, &kl_seq.unsqueeze(-1), beta_r, &ended_t, self.cfg.missing_eot_penalty); // (N,)
        let mut adv = rloo_advantages(&total, k as i64)?; // (N,)
        if self.cfg.whiten_advantages {
            adv = whiten(&adv);
        }
        time_score += t3.elapsed().as_secs_f64();

        // Updates.
        let t4 = Instant::now();
        let total_opt_steps = self.cfg.steps * updates as u64;
        let (mut loss_sum, mut gnorm, mut lr) = (0.0, 0.0, 0.0);
        let (mut clipped, mut counted) = (0.0, 0.0);
        for _ in 0..updates {
            self.opt.zero_grad();
            let mut loss_u = 0.0;
            for (i, b) in batches.iter().enumerate() {
                let r = &ranges[i];
                let a = adv.narrow(0, r.start as i64, r.len() as i64); // (n,)
                let logp = match graph.take() {
                    Some(g) => g,
                    None => rollout::response_logprobs(&self.policy, b, false)?.0,
                }; // (n, R)
                let mut loss = if updates > 1 {
                    let ratio = (&logp - &old_logp[i]).exp().detach(); // (n, R)
                    let out = (ratio - 1.0).abs().gt(self.cfg.clip_eps).logical_and(&b.mask);
                    clipped += out.sum(Kind::Double).double_value(&[]);
                    counted += b.mask.sum(Kind::Double).double_value(&[]);
                    clipped_reinforce_loss(&logp, &old_logp[i], &b.mask, &a, self.cfg.clip_eps)
                } else {
                    reinforce_loss(&logp, &b.mask, &a)
                };
                if self.cfg.kl_mode == KlMode::Loss && beta > 0.0 {
                    loss += kl_loss(&logp, &ref_logp[i], &b.mask, est, beta)?;
                }
                let loss = loss * (r.len() as f64 / n as f64);
                let v = loss.double_value(&[]);
                if !v.is_finite() {
                    return Err(match &self.ckpt_root {
                        Some(root) => train::non_finite_loss(v, step + 1, root),
                        None => anyhow::anyhow!("non-finite loss ({v}) at step {}", step + 1),
                    });
                }
                loss.backward();
                loss_u += v;
            }
            lr = train::lr_at(self.opt.t, total_opt_steps, &self.cfg.optim);
            gnorm =
                self.opt.clip_and_step(self.cfg.optim.grad_clip, lr, step + 1, self.ckpt_root.as_deref())?;
            loss_sum += loss_u;
        }
        sync(device);
        time_update += t4.elapsed().as_secs_f64();

        let kl_v = to_vec(&kl_seq)?;
        let kl_mean = kl_v.iter().sum::<f64>() / n as f64;
        self.kl.update(kl_mean, n);
        let (reward_mean, reward_std, reward_min, reward_max) = stats(&raw);
        let (adv_mean, adv_std, adv_min, adv_max) = stats(&to_vec(&adv)?);
        let total_v = to_vec(&total)?;
        let st = StepStats {
            step: step + 1,
            reward_mean,
            reward_std,
            reward_min,
            reward_max,
            score_mean: processed.iter().sum::<f64>() / n as f64,
            total_reward_mean: total_v.iter().sum::<f64>() / n as f64,
            kl: kl_mean,
            kl_per_token: kl_v.iter().sum::<f64>() / tok_count.max(1.0),
            beta,
            entropy: ent_sum / tok_count.max(1.0),
            response_len: rollout_tokens as f64 / n as f64,
            ended_frac: ended.iter().filter(|&&e| e).count() as f64 / n as f64,
            adv_mean,
            adv_std,
            adv_min,
            adv_max,
            loss: loss_sum / updates as f64,
            grad_norm: gnorm,
            lr,
            clip_frac: if counted > 0.0 { clipped / counted } else { 0.0 },
            time_generate,
            time_score,
            time_update,
            rollout_tokens,
            rollout_tokens_per_s: rollout_tokens as f64 / time_generate.max(1e-9),
        };
        Ok((st, rollouts))
    }

    /// Evaluates the policy on `prompts`: one sample each (at
    /// `eval_temperature`, with the same seed at every evaluation), the mean
    /// reward. Returns the report and each rollout with its reward.
    pub fn evaluate(
        &mut self,
        step: u64,
        prompts: &[Arc<Prompt>],
    ) -> Result<(EvalReport, Vec<(Rollout, f64)>)> {
        let mut sampling = self.cfg.sampling();
        sampling.temperature = self.cfg.eval_temperature.unwrap_or(self.cfg.temperature);
        let rollouts = rollout::sample(
            &self.policy,
            prompts,
            1,
            &sampling,
            self.specials,
            self.tokenizer.as_ref(),
            self.cfg.seed,
            0,
            SALT_EVAL,
        )?;
        let rewards = if rollouts.is_empty() { vec![] } else { self.score(&rollouts)? };
        let n = rollouts.len().max(1) as f64;
        let (reward_mean, reward_std, _, _) = stats(&rewards);
        let mut cats: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for (r, &x) in rollouts.iter().zip(&rewards) {
            let e = cats.entry(r.prompt.category.clone().unwrap_or_default()).or_default();
            e.0 += x;
            e.1 += 1;
        }
        let verdicts: Vec<bool> = rollouts.iter().filter_map(crate::reward::oracle).collect();
        let report = EvalReport {
            oracle_accuracy: (!verdicts.is_empty())
                .then(|| verdicts.iter().filter(|&&v| v).count() as f64 / verdicts.len() as f64),
            oracle_prompts: verdicts.len(),
            step,
            prompts: rollouts.len(),
            reward_mean,
            reward_std,
            ended_frac: rollouts.iter().filter(|r| r.ended()).count() as f64 / n,
            response_len: rollouts.iter().map(|r| r.response_ids.len()).sum::<usize>() as f64 / n,
            per_category: cats.into_iter().map(|(c, (s, m))| (c, s / m as f64)).collect(),
        };
        Ok((report, rollouts.into_iter().zip(rewards).collect()))
    }
}

/// The training and evaluation prompts of a run.
pub struct Prompts {
    /// Every training row's prompt, by (source, row); rows skipped (empty,
    /// or longer than `max_prompt_len`) are absent.
    pub train: HashMap<(usize, usize), Arc<Prompt>>,
    pub eval: Vec<Arc<Prompt>>,
    pub mixture: Mixture,
    /// Rows skipped: empty prompt or longer than `max_prompt_len`.
    pub skipped: usize,
}

fn encode_prompt(tok: &Tokenizer, ex: &datasets::Example) -> Result<Option<Prompt>> {
    let msgs: Vec<lm::Message> =
        ex.record.prompt_messages().iter().map(|m| lm::Message::new(&m.role, &m.content)).collect();
    if msgs.is_empty() {
        return Ok(None);
    }
    let ids = lm::chat::prompt_ids(tok, &msgs).with_context(|| {
        format!("{} row {}: formatting the prompt", ex.origin.file.display(), ex.origin.row)
    })?;
    Ok(Some(Prompt { messages: msgs, ids, category: ex.category.clone() }))
}

/// Reads the prompt mixture of `cfg` (paths relative to `base`) and
/// formats every prompt with the chat template.
pub fn load_prompts(cfg: &RlConfig, tok: &Tokenizer, base: &Path) -> Result<Prompts> {
    let mixture = Mixture::load(&cfg.data, base)?;
    let mut train = HashMap::new();
    let mut skipped = 0;
    for s in 0..mixture.source_names().len() {
        for (i, ex) in mixture.train_rows(s).iter().enumerate() {
            match encode_prompt(tok, ex)? {
                Some(p) if p.ids.len() <= cfg.max_prompt_len => {
                    train.insert((s, i), Arc::new(p));
                }
                _ => skipped += 1,
            }
        }
    }
    if train.is_empty() {
        bail!(
            "no training prompt left: {skipped} rows are empty or longer than max_prompt_len ({} tokens)",
            cfg.max_prompt_len
        );
    }
    let mut eval = vec![];
    for ex in mixture.held_out() {
        if eval.len() >= cfg.eval_prompts {
            break;
        }
        if let Some(p) = encode_prompt(tok, ex)?.filter(|p| p.ids.len() <= cfg.max_prompt_len) {
            eval.push(Arc::new(p));
        }
    }
    Ok(Prompts { train, eval, mixture, skipped })
}

impl Prompts {
    /// The next `b` training prompts from the position (epoch, index within
    /// the epoch) in `state`, which advances; epochs follow one another.
    pub fn next_batch(&self, state: &mut TrainerState, b: usize) -> Result<Vec<Arc<Prompt>>> {
        let mut out = Vec::with_capacity(b);
        let mut order = self.mixture.epoch(state.epoch);
        let mut empty_epochs = 0;
        while out.len() < b {
            if state.batch_in_epoch as usize >= order.len() {
                if out.is_empty() {
                    empty_epochs += 1;
                    if empty_epochs > 100 {
                        bail!(
                            "100 epochs of the prompt mixture in a row gave no usable prompt (all skipped)"
                        );
                    }
                }
                state.epoch += 1;
                state.batch_in_epoch = 0;
                order = self.mixture.epoch(state.epoch);
                continue;
            }
            let d = order[state.batch_in_epoch as usize];
            state.batch_in_epoch += 1;
            if let Some(p) = self.train.get(&(d.source, d.index)) {
                out.push(Arc::clone(p));
            }
        }
        Ok(out)
    }
}

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RlSummary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    /// True when `stop_after` ended the run early (no final model).
    pub stopped_early: bool,
    pub reward: String,
    /// Mean reward of the first (up to 5) steps of this run.
    pub first_rewards: Vec<f64>,
    /// Mean reward of the last (up to 5) steps.
    pub last_rewards: Vec<f64>,
    pub final_kl: f64,
    pub final_beta: f64,
    pub eval: Vec<EvalReport>,
    pub train_prompts: usize,
    pub eval_prompts: usize,
    pub skipped_prompts: usize,
    /// Seconds spent in this run, by phase.
    pub time_generate: f64,
    pub time_score: f64,
    pub time_update: f64,
    pub rollout_tokens_per_s: f64,
    pub model_dir: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

const ARCH: &str = "GemmaForCausalLM";

/// Runs the stage with the reward the config names.
pub fn run(cfg: &RlConfig, base: &Path) -> Result<RlSummary> {
    let device = lm::device::parse_device(&cfg.device)?;
    let kind = lm::device::parse_dtype(&cfg.dtype)?;
    let reward = cfg.reward.build(device, kind)?;
    run_with_reward(cfg, base, reward)
}

fn write_samples(dir: &Path, step: u64, samples: &[(Rollout, f64)], n: usize) -> Result<()> {
    let mut text = String::new();
    for (r, reward) in samples.iter().take(n) {
        let v = serde_json::json!({
            "step": step,
            "prompt": r.prompt.messages,
            "response": r.text,
            "reward": reward,
            "stop_reason": r.stop_reason,
            "tokens": r.response_ids.len(),
            "category": r.prompt.category,
        });
        text.push_str(&v.to_string());
        text.push('\n');
    }
    checkpoint::write_atomic(&dir.join(format!("samples-step-{step}.jsonl")), text.as_bytes())
}

fn eval_row(e: &EvalReport) -> serde_json::Value {
    serde_json::json!({
        "step": e.step, "eval_reward": e.reward_mean, "eval_reward_std": e.reward_std,
        "eval_ended_frac": e.ended_frac, "eval_response_len": e.response_len,
        "eval_per_category": e.per_category, "eval_oracle_accuracy": e.oracle_accuracy,
    })
}

/// Draws `rl.png` from `metrics.jsonl`: the mean reward per step (and
/// the evaluation reward) above the KL to the reference.
pub fn plot_metrics(metrics: &Path, out: &Path) -> Result<()> {
    use lm::plot::{line_charts, Panel, Series};
    let rows = train::read_metrics(metrics)?;
    let pts = |key: &str| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?))).collect()
    };
    let panels = [
        Panel {
            title: "reward".into(),
            y_label: "mean reward".into(),
            series: vec![
                Series::line("train", pts("reward_mean")),
                Series::points("eval", pts("eval_reward")),
                Series::points("eval oracle accuracy", pts("eval_oracle_accuracy")),
            ],
        },
        Panel {
            title: "KL to the reference".into(),
            y_label: "KL per sample".into(),
            series: vec![Series::line("KL", pts("kl"))],
        },
    ];
    line_charts(out, "RL: reward and KL", "step", &panels)
}

/// Runs the stage with the reward function `reward` (the config's `reward`
/// section is then only recorded). Resumes from the newest checkpoint in
/// `output_dir/checkpoints` when its config hash matches.
pub fn run_with_reward(cfg: &RlConfig, base: &Path, reward: Box<dyn RewardFn>) -> Result<RlSummary> {
    cfg.validate()?;
    let device = lm::device::parse_device(&cfg.device)?;
    let loaded = checkpoint::load_causal_lm(&cfg.model, device, Kind::Float)
        .with_context(|| format!("loading the policy from {}", cfg.model.display()))?;
    let ref_dir = cfg.reference.clone().unwrap_or_else(|| cfg.model.clone());
    let reference = checkpoint::load_causal_lm(&ref_dir, device, Kind::Float)
        .with_context(|| format!("loading the reference from {}", ref_dir.display()))?;
    let tok = loaded.tokenizer;
    let prompts = load_prompts(cfg, &tok, base)?;
    let specials = Specials::of(&tok);
    let mut tr = Trainer::new(
        cfg.clone(),
        (loaded.vs, loaded.model),
        (reference.vs, reference.model),
        Some(tok),
        specials,
        reward,
    )?;
    let ckpt_root = cfg.output_dir.join("checkpoints");
    tr.ckpt_root = Some(ckpt_root.clone());

    let fresh = TrainerState {
        step: 0,
        total_steps: cfg.steps,
        epoch: 0,
        batch_in_epoch: 0,
        rng_word_pos: "0".into(),
        config_hash: cfg.hash()?,
        extra: serde_json::json!({"beta": tr.kl.beta, "beta_bits": tr.kl.beta_bits()}),
    };
    let (mut state, resumed_from) =
        train::resume_or_start(&ckpt_root, &tr.policy_vs, &mut tr.opt, fresh, &["lm_head.weight"])?;
    // One optimiser update per update of each batch.
    tr.opt.t = state.step * cfg.updates_per_batch as u64;
    if resumed_from.is_some() {
        let bits = state.extra["beta_bits"]
            .as_str()
            .context("the checkpoint's trainer_state.json has no extra.beta_bits (KL coefficient)")?;
        tr.kl.set_beta_bits(bits)?;
    }

    std::fs::create_dir_all(&cfg.output_dir)?;
    let metrics_path = cfg.output_dir.join("metrics.jsonl");
    let mut log = MetricsLog::open(&metrics_path, resumed_from)?;
    let pb = train::progress_bar(cfg.steps, state.step);
    pb.set_prefix("rl");
    let mut evals = vec![];
    let mut eval_now = |tr: &mut Trainer, step: u64, log: &mut MetricsLog| -> Result<()> {
        if prompts.eval.is_empty() {
            return Ok(());
        }
        let (rep, samples) = tr.evaluate(step, &prompts.eval)?;
        write_samples(&cfg.output_dir, step, &samples, cfg.eval_samples)?;
        log.write(&eval_row(&rep))?;
        evals.push(rep);
        Ok(())
    };
    if cfg.eval_every > 0 && prompts.eval.is_empty() {
        eprintln!("warning: eval_every is set but the mixture has no held-out prompts (data.held_out); no evaluation");
    }
    if cfg.eval_every > 0 && resumed_from.is_none() {
        eval_now(&mut tr, 0, &mut log)?;
    }
    let save = |tr: &Trainer, st: &mut TrainerState| -> Result<PathBuf> {
        st.extra = serde_json::json!({"beta": tr.kl.beta, "beta_bits": tr.kl.beta_bits()});
        let tok = tr.tokenizer.as_ref().context("the trainer has no tokenizer to save")?;
        train::save_checkpoint(
            &ckpt_root,
            &tr.policy_vs,
            &tr.policy.cfg,
            tok,
            &tr.opt,
            st,
            ARCH,
            cfg.keep_last,
            &[],
        )
    };

    let mut history: Vec<StepStats> = vec![];
    let (mut tg, mut ts, mut tu, mut gen_tokens) = (0.0, 0.0, 0.0, 0usize);
    let mut stopped_early = false;
    while state.step < cfg.steps {
        if cfg.stop_after.is_some_and(|s| state.step >= s) {
            stopped_early = true;
            break;
        }
        let batch = prompts.next_batch(&mut state, cfg.batch_size)?;
        let (st, _) = tr.step(state.step, &batch)?;
        state.step += 1;
        tg += st.time_generate;
        ts += st.time_score;
        tu += st.time_update;
        gen_tokens += st.rollout_tokens;
        let mut row = serde_json::to_value(&st)?;
        row["epoch"] = serde_json::json!(state.epoch);
        log.write(&row)?;
        pb.set_position(state.step);
        pb.set_message(format!(
            "reward {:.3} kl {:.3} β {:.3} len {:.0} (gen {:.1}s score {:.1}s update {:.1}s)",
            st.reward_mean, st.kl, st.beta, st.response_len, st.time_generate, st.time_score, st.time_update
        ));
        history.push(st);
        if cfg.eval_every > 0 && state.step % cfg.eval_every == 0 && state.step < cfg.steps {
            eval_now(&mut tr, state.step, &mut log)?;
        }
        if cfg.save_every > 0 && state.step % cfg.save_every == 0 && state.step < cfg.steps {
            save(&tr, &mut state)?;
        }
    }
    pb.finish_and_clear();
    let mut model_dir = None;
    let mut plot = None;
    if !stopped_early {
        if cfg.eval_every > 0 {
            eval_now(&mut tr, state.step, &mut log)?;
        }
        save(&tr, &mut state)?;
        let dir = cfg.output_dir.join("model");
        let tok = tr.tokenizer.as_ref().context("the trainer has no tokenizer to save")?;
        checkpoint::save(&dir, &tr.policy_vs, &tr.policy.cfg, tok, &SaveOptions::default())?;
        model_dir = Some(dir);
        let png = cfg.output_dir.join("rl.png");
        match plot_metrics(&metrics_path, &png) {
            Ok(()) => plot = Some(png),
            Err(e) => eprintln!("warning: could not draw {}: {e:#}", png.display()),
        }
    }
    let means: Vec<f64> = history.iter().map(|s| s.reward_mean).collect();
    let summary = RlSummary {
        steps: state.step,
        resumed_from,
        stopped_early,
        reward: tr.reward.name(),
        first_rewards: means.iter().take(5).copied().collect(),
        last_rewards: means[means.len().saturating_sub(5)..].to_vec(),
        final_kl: history.last().map_or(f64::NAN, |s| s.kl),
        final_beta: tr.kl.beta,
        eval: evals,
        train_prompts: prompts.train.len(),
        eval_prompts: prompts.eval.len(),
        skipped_prompts: prompts.skipped,
        time_generate: tg,
        time_score: ts,
        time_update: tu,
        rollout_tokens_per_s: gen_tokens as f64 / tg.max(1e-9),
        model_dir,
        plot,
    };
    if !stopped_early {
        checkpoint::write_atomic(
            &cfg.output_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
    }
    Ok(summary)
}

/// `align rl --config FILE`: reads the config (paths relative to its
/// directory), runs the stage and prints the summary as JSON.
pub fn cli_train(config: &Path) -> Result<()> {
    let mut cfg = RlConfig::from_toml_file(config)?;
    let base = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    cfg.resolve_paths(&base);
    let s = run(&cfg, &base)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_an_rl_table_with_defaults_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rl.toml");
        let body = r#"
[rl]
model = "sft/model"
output_dir = "out"
steps = 3
[rl.reward]
kind = "contains"
text = "thanks"
[rl.data]
[[rl.data.sources]]
name = "prompts"
path = "prompts.jsonl"
"#;
        std::fs::write(&p, body).unwrap();
        let mut c = RlConfig::from_toml_file(&p).unwrap();
        assert_eq!(
            (c.num_samples, c.beta, c.kl_estimator, c.kl_mode),
            (4, 0.05, KlEstimator::K1, KlMode::Reward)
        );
        c.resolve_paths(dir.path());
        assert_eq!(c.model, dir.path().join("sft/model"));
        std::fs::write(&p, body.replace("steps = 3", "steps = 3\nbeta_typo = 1")).unwrap();
        let err = format!("{:#}", RlConfig::from_toml_file(&p).unwrap_err());
        assert!(err.contains("beta_typo"), "{err}");
        std::fs::write(&p, body.replace("steps = 3", "num_samples = 1")).unwrap();
        let err = format!("{:#}", RlConfig::from_toml_file(&p).unwrap_err());
        assert!(err.contains("k >= 2"), "{err}");
    }

    #[test]
    fn the_example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/examples/rl.toml");
        let c = RlConfig::from_toml_file(&p).unwrap();
        assert!(matches!(c.reward, RewardConfig::Model { .. }));
        assert_eq!((c.batch_size, c.num_samples), (8, 4));
    }

    #[test]
    fn only_settings_that_shape_training_are_in_the_config_hash() {
        let mut c = RlConfig::with_defaults(
            Path::new("m"),
            Path::new("o"),
            RewardConfig::Length { max_tokens: None, scale: 1.0 },
        )
        .unwrap();
        let h = c.hash().unwrap();
        c.stop_after = Some(3);
        c.save_every = 7;
        c.eval_every = 5;
        c.keep_last = 9;
        assert_eq!(
            c.hash().unwrap(),
            h,
            "where a run stops, saves, evaluates and what it keeps may change on resume"
        );
        c.beta = 0.1;
        assert_ne!(c.hash().unwrap(), h);
    }
}
