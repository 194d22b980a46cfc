//! The [`Trainer`]: policy, frozen reference, reward and optimiser, and one
//! RL step on a batch of prompts; evaluation on held-out prompts.
//!
//! One step (see [`Trainer::step`]):
//!
//! 1. B prompts, k samples each from the policy (batched generation with the
//!    KV cache; the seed is a pure function of the run's seed and the step);
//! 2. the reward r_i of each sample ([`RewardFn`]), optionally normalised by
//!    a stored mean/std and clipped;
//! 3. per-token log-probabilities of each response under the policy and the
//!    frozen reference (teacher-forced over prompt + response, no gradient
//!    graph for the reference) and the per-token KL (k1 or k3), all of the
//!    sampling distribution `log_softmax(logits / T)` (no top-k/top-p
//!    renormalisation, as TRL and OpenRLHF);
//! 4. R_i = r_i − β·Σ_t KL_t (or the KL as a separate loss term) minus the
//!    penalty for a response without `<end_of_turn>`;
//! 5. advantages over each prompt's k samples: a leave-one-out or group-mean
//!    baseline, scaled by nothing, the group's std (GRPO) or the batch's
//!    (whitening); a group of equal rewards gets zero;
//! 6. one optimiser step on the REINFORCE loss (or several on its clipped
//!    importance-weighted form), aggregated per sequence or per token
//!    (`loss_aggregation`);
//! 7. the adaptive KL controller, when a target KL is set.

use crate::config::{KlMode, RlConfig};
use crate::control::KlController;
use crate::loss::{
    advantages, clipped_reinforce_loss, kl_loss, kl_per_token, reinforce_loss, sequence_rewards, BatchSize,
    KlEstimator,
};
use crate::reward::RewardFn;
use crate::rollout::{self, Prompt, Rollout, Specials, TeacherBatch, SALT_EVAL, SALT_TRAIN};
use anyhow::{bail, Context, Result};
use lm::train::{self, AdamW};
use lm::{Gemma, StopReason, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Kind, Tensor};

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
    /// Fraction of responses cut at `max_new_tokens`: they are scored as
    /// they are (no `<end_of_turn>` appended) and get the missing
    /// end-of-turn penalty.
    #[serde(default)]
    pub truncated_frac: f64,
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

/// The step's rollouts cut into teacher-forced micro-batches.
struct MicroBatches {
    /// Each micro-batch's rows among the N rollouts.
    ranges: Vec<Range<usize>>,
    batches: Vec<TeacherBatch>,
    /// N, the number of rollouts.
    n: usize,
}

/// Per-token log-probabilities of the responses before the update, one
/// (n, R) tensor per micro-batch, without gradient graphs.
struct Logprobs {
    /// Under the frozen reference.
    reference: Vec<Tensor>,
    /// Under the policy before the update.
    old: Vec<Tensor>,
    /// The policy's per-token entropy.
    entropy: Vec<Tensor>,
}

/// Sequence rewards and advantages of the step's N rollouts.
struct Advantages {
    /// Σ_t KL_t per sample, (N,).
    kl_seq: Tensor,
    /// The rewards after normalisation and clipping.
    processed: Vec<f64>,
    /// The sequence rewards R, (N,).
    total: Tensor,
    /// Advantages (baseline and scale as configured; zero in a flat
    /// group), (N,).
    adv: Tensor,
    /// Whether each response ended with `<end_of_turn>`.
    ended: Vec<bool>,
    /// Σ of the policy's per-token entropy over the response tokens, and
    /// their number.
    ent_sum: f64,
    tok_count: f64,
}

/// Response tokens whose importance ratio left [1 − ε, 1 + ε], of those
/// counted (several updates per batch).
#[derive(Default)]
struct ClipCount {
    clipped: f64,
    counted: f64,
}

/// What the step's optimiser updates measured.
struct UpdateStats {
    /// Mean loss over the updates.
    loss: f64,
    grad_norm: f64,
    lr: f64,
    clip_frac: f64,
}

/// Seconds spent in each phase of a step.
struct Times {
    generate: f64,
    score: f64,
    update: f64,
}

impl StepStats {
    /// The metrics row of step `step` (0-based; recorded as `step + 1`).
    fn of(
        step: u64,
        rollouts: &[Rollout],
        raw: &[f64],
        adv: &Advantages,
        beta: f64,
        upd: &UpdateStats,
        times: &Times,
    ) -> Result<Self> {
        let n = rollouts.len() as f64;
        let rollout_tokens: usize = rollouts.iter().map(|r| r.response_ids.len()).sum();
        let kl_v = to_vec(&adv.kl_seq)?;
        let (reward_mean, reward_std, reward_min, reward_max) = stats(raw);
        let (adv_mean, adv_std, adv_min, adv_max) = stats(&to_vec(&adv.adv)?);
        let total_v = to_vec(&adv.total)?;
        Ok(StepStats {
            step: step + 1,
            reward_mean,
            reward_std,
            reward_min,
            reward_max,
            score_mean: adv.processed.iter().sum::<f64>() / n,
            total_reward_mean: total_v.iter().sum::<f64>() / n,
            kl: kl_v.iter().sum::<f64>() / n,
            kl_per_token: kl_v.iter().sum::<f64>() / adv.tok_count.max(1.0),
            beta,
            entropy: adv.ent_sum / adv.tok_count.max(1.0),
            response_len: rollout_tokens as f64 / n,
            ended_frac: adv.ended.iter().filter(|&&e| e).count() as f64 / n,
            truncated_frac: rollouts.iter().filter(|r| r.stop_reason == StopReason::Length).count() as f64
                / n,
            adv_mean,
            adv_std,
            adv_min,
            adv_max,
            loss: upd.loss,
            grad_norm: upd.grad_norm,
            lr: upd.lr,
            clip_frac: upd.clip_frac,
            time_generate: times.generate,
            time_score: times.score,
            time_update: times.update,
            rollout_tokens,
            rollout_tokens_per_s: rollout_tokens as f64 / times.generate.max(1e-9),
        })
    }
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
        let kind = lm::device::parse_dtype(&cfg.stage.dtype)?;
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
        let mut opt = AdamW::new(&policy_vs, &cfg.stage.optim);
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
            self.cfg.stage.seed,
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
        let device = self.policy.device();
        let t0 = Instant::now();
        let rollouts = self.rollouts(step, prompts)?;
        let generate = t0.elapsed().as_secs_f64();

        // Scoring: reward, reference and (unless folded into the update) the
        // policy before the update; no gradient graph is kept.
        let t1 = Instant::now();
        let raw = self.score(&rollouts)?;
        let micro = self.micro_batches(&rollouts)?;
        let single_pass = self.cfg.updates_per_batch == 1 && micro.batches.len() == 1;
        let mut lp = self.logprobs_before_update(&micro.batches, single_pass)?;
        sync(device);
        let mut score = t1.elapsed().as_secs_f64();

        // Single pass: the update's forward (with gradients) also gives the
        // policy's log-probs for the KL; timed as part of the update.
        let t2 = Instant::now();
        let graph = match single_pass {
            true => Some(self.policy_pass_with_graph(&micro.batches[0], &mut lp)?),
            false => None,
        };
        sync(device);
        let mut update = t2.elapsed().as_secs_f64();

        let t3 = Instant::now();
        let beta = self.kl.beta;
        let adv = self.advantages(&rollouts, &raw, &micro.batches, &lp, beta)?;
        score += t3.elapsed().as_secs_f64();

        let t4 = Instant::now();
        let upd = self.update(step, &micro, &adv.adv, &lp, graph)?;
        sync(device);
        update += t4.elapsed().as_secs_f64();

        let times = Times { generate, score, update };
        let st = StepStats::of(step, &rollouts, &raw, &adv, beta, &upd, &times)?;
        self.kl.update(st.kl, rollouts.len());
        Ok((st, rollouts))
    }

    /// Cuts the rollouts into teacher-forced micro-batches of
    /// `micro_batch_size` sequences (0: one batch).
    fn micro_batches(&self, rollouts: &[Rollout]) -> Result<MicroBatches> {
        let n = rollouts.len();
        let mb = if self.cfg.micro_batch_size == 0 { n } else { self.cfg.micro_batch_size };
        let ranges: Vec<Range<usize>> = (0..n).step_by(mb).map(|s| s..(s + mb).min(n)).collect();
        let batches = ranges
            .iter()
            .map(|r| TeacherBatch::new(rollouts, r.clone(), self.specials.pad, self.policy.device()))
            .collect::<Result<_>>()?;
        Ok(MicroBatches { ranges, batches, n })
    }

    /// The reference's log-probs and, unless `single_pass` (then the
    /// update's forward gives them), the policy's log-probs and entropy
    /// before the update; without gradient graphs.
    fn logprobs_before_update(&self, batches: &[TeacherBatch], single_pass: bool) -> Result<Logprobs> {
        let _g = tch::no_grad_guard();
        let reference = batches
            .iter()
            .map(|b| Ok(rollout::response_logprobs(&self.reference, b, false, self.cfg.temperature)?.0))
            .collect::<Result<_>>()?;
        let mut lp = Logprobs { reference, old: vec![], entropy: vec![] };
        if !single_pass {
            for b in batches {
                let (old, ent) = rollout::response_logprobs(&self.policy, b, true, self.cfg.temperature)?;
                lp.old.push(old);
                lp.entropy.push(ent.context("entropy requested")?);
            }
        }
        Ok(lp)
    }

    /// The policy's forward with gradients on the only micro-batch: records
    /// its detached log-probs and entropy in `lp` and returns the log-probs
    /// with their graph for the update.
    fn policy_pass_with_graph(&self, batch: &TeacherBatch, lp: &mut Logprobs) -> Result<Tensor> {
        let (logp, ent) = rollout::response_logprobs(&self.policy, batch, true, self.cfg.temperature)?;
        lp.old.push(logp.detach());
        lp.entropy.push(ent.context("entropy requested")?);
        Ok(logp)
    }

    /// Per-sample KL, sequence rewards R = score − β_r·KL − penalty, and the
    /// advantages over each prompt's k samples (`baseline`, then `scale`;
    /// zero for a group of equal rewards), all (N,).
    fn advantages(
        &self,
        rollouts: &[Rollout],
        raw: &[f64],
        batches: &[TeacherBatch],
        lp: &Logprobs,
        beta: f64,
    ) -> Result<Advantages> {
        let device = self.policy.device();
        let mut kl_seq = vec![];
        let mut ent_sum = 0.0;
        let mut tok_count = 0.0;
        for (i, b) in batches.iter().enumerate() {
            let kl = kl_per_token(&lp.old[i], &lp.reference[i], &b.mask, self.cfg.kl_estimator)?; // (n, R)
            kl_seq.push(kl.sum_dim_intlist(-1, false, Kind::Float)); // (n,)
            ent_sum += lp.entropy[i].sum(Kind::Double).double_value(&[]);
            tok_count += b.mask.sum(Kind::Double).double_value(&[]);
        }
        let kl_seq = Tensor::cat(&kl_seq, 0); // (N,)
        let processed = self.process(raw);
        let score = Tensor::from_slice(&processed).to_kind(Kind::Float).to_device(device); // (N,)
        let ended: Vec<bool> = rollouts.iter().map(Rollout::ended).collect();
        let ended_t = Tensor::from_slice(&ended).to_device(device); // (N,)
        let beta_r = if self.cfg.kl_mode == KlMode::Reward { beta } else { 0.0 };
        let total =
            sequence_rewards(&score, &kl_seq.unsqueeze(-1), beta_r, &ended_t, self.cfg.missing_eot_penalty); // (N,)
        let k = self.cfg.num_samples as i64;
        let adv = advantages(&total, k, self.cfg.baseline, self.cfg.advantage_scale())?; // (N,)
        Ok(Advantages { kl_seq, processed, total, adv, ended, ent_sum, tok_count })
    }

    /// The `updates_per_batch` optimiser steps on the advantages `adv`, the
    /// gradients of each accumulated over the micro-batches. `graph`: the
    /// policy's log-probs with their graph from a single pass, used by the
    /// first forward instead of running the policy again.
    fn update(
        &mut self,
        step: u64,
        micro: &MicroBatches,
        adv: &Tensor,
        lp: &Logprobs,
        mut graph: Option<Tensor>,
    ) -> Result<UpdateStats> {
        let updates = self.cfg.updates_per_batch;
        let total_opt_steps = self.cfg.steps * updates as u64;
        let (mut loss_sum, mut gnorm, mut lr) = (0.0, 0.0, 0.0);
        let mut clip = ClipCount::default();
        // The whole batch's sizes: each micro-batch's loss is normalised by
        // them, so the accumulated gradient is that of the whole batch.
        let sizes = BatchSize {
            sequences: micro.n as f64,
            tokens: micro.batches.iter().map(|b| BatchSize::of(&b.mask).tokens).sum(),
        };
        for _ in 0..updates {
            self.opt.zero_grad();
            let mut loss_u = 0.0;
            for (i, b) in micro.batches.iter().enumerate() {
                let r = &micro.ranges[i];
                let a = adv.narrow(0, r.start as i64, r.len() as i64); // (n,)
                let logp = match graph.take() {
                    Some(g) => g,
                    None => rollout::response_logprobs(&self.policy, b, false, self.cfg.temperature)?.0,
                }; // (n, R)
                let loss = self.micro_loss(&logp, i, lp, b, &a, sizes, &mut clip)?;
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
            lr = train::lr_at(self.opt.t, total_opt_steps, &self.cfg.stage.optim);
            gnorm = self.opt.clip_and_step(
                self.cfg.stage.optim.grad_clip,
                lr,
                step + 1,
                self.ckpt_root.as_deref(),
            )?;
            loss_sum += loss_u;
        }
        Ok(UpdateStats {
            loss: loss_sum / updates as f64,
            grad_norm: gnorm,
            lr,
            clip_frac: if clip.counted > 0.0 { clip.clipped / clip.counted } else { 0.0 },
        })
    }

    /// The loss of micro-batch `i` (log-probs `logp`, advantages `a`):
    /// REINFORCE, or its clipped importance-weighted form with several
    /// updates per batch (counting the clipped tokens), plus the KL term in
    /// loss mode (at the current β); both aggregated as `loss_aggregation`
    /// says, normalised by the whole batch's `sizes`.
    #[allow(clippy::too_many_arguments)]
    fn micro_loss(
        &self,
        logp: &Tensor,
        i: usize,
        lp: &Logprobs,
        b: &TeacherBatch,
        a: &Tensor,
        sizes: BatchSize,
        clip: &mut ClipCount,
    ) -> Result<Tensor> {
        let agg = self.cfg.loss_aggregation;
        let mut loss = if self.cfg.updates_per_batch > 1 {
            let ratio = (logp - &lp.old[i]).exp().detach(); // (n, R)
            let out = (ratio - 1.0).abs().gt(self.cfg.clip_eps).logical_and(&b.mask);
            clip.clipped += out.sum(Kind::Double).double_value(&[]);
            clip.counted += b.mask.sum(Kind::Double).double_value(&[]);
            clipped_reinforce_loss(logp, &lp.old[i], &b.mask, a, self.cfg.clip_eps, agg, sizes)
        } else {
            reinforce_loss(logp, &b.mask, a, agg, sizes)
        };
        let beta = self.kl.beta;
        if self.cfg.kl_mode == KlMode::Loss && beta > 0.0 {
            loss += kl_loss(logp, &lp.reference[i], &b.mask, self.cfg.kl_estimator, beta, agg, sizes)?;
        }
        Ok(loss)
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
            self.cfg.stage.seed,
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
