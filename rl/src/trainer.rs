//! The [`Trainer`]: policy, frozen reference, reward and optimiser, and one
//! RL step on a batch of prompts; evaluation on held-out prompts.
//!
//! One step (see [`Trainer::step`]):
//!
//! 1. B prompts, k samples each from the policy (batched generation with the
//!    KV cache; each sample's seed is a pure function of the run's seed, the
//!    step and the sample's index in the step's global batch);
//! 2. the reward r_i of each sample ([`RewardFn`]), optionally normalised by
//!    a stored mean/std and clipped;
//! 3. per-token log-probabilities of each response under the policy and the
//!    frozen reference (teacher-forced over prompt + response, no gradient
//!    graph for the reference) and the per-token KL (k1 or k3), all of the
//!    sampling distribution `log_softmax(logits / T)` (no top-k/top-p
//!    renormalisation, as TRL and OpenRLHF), computed over chunks of the
//!    response positions only (never the (n, T, V) logits). With LoRA and
//!    no `reference` in the config, the reference is the policy with its
//!    adapters switched off: no second copy of the weights;
//! 4. R_i = r_i − β·Σ_t KL_t (or the KL as a separate loss term) minus the
//!    penalty for a response without `<end_of_turn>`;
//! 5. advantages over each prompt's k samples: a leave-one-out or group-mean
//!    baseline, scaled by nothing, the group's std (GRPO) or the batch's
//!    (whitening); a group of equal rewards gets zero;
//! 6. one optimiser step on the REINFORCE loss (or several on its clipped
//!    importance-weighted form), aggregated per sequence or per token
//!    (`loss_aggregation`). Each micro-batch runs
//!    [`Gemma::forward_backward`] (activation checkpointing when
//!    `gradient_checkpointing`): its head takes the response positions'
//!    hidden states, computes their log-probs in chunks
//!    ([`lm::chunked::token_logprobs`]), the loss on those values as a leaf,
//!    and backpropagates the leaf's gradient through the chunks
//!    ([`lm::chunked::token_logprobs_backward`]) and the model;
//! 7. the adaptive KL controller, when a target KL is set.
//!
//! Data-parallel (launched by torchrun, [`lm::dist`]): each rank runs the
//! step on its own share of the prompts (whole groups of k samples, seeded
//! by their global indices); the reward, reference and old-policy passes
//! see only its samples; whitening, the loss denominators, the clipped
//! fraction, the KL the controller sees and every metric are sums (or
//! maxima) over ranks; the gradients are summed by [`Updater::step`]. So
//! N ranks with B prompts each compute the update of one process with N·B.

use crate::config::{KlMode, RlConfig};
use crate::control::KlController;
use crate::loss::{
    self, clipped_reinforce_loss, kl_loss, kl_per_token, reinforce_loss, sequence_rewards, BatchSize,
    KlEstimator,
};
use crate::reward::RewardFn;
use crate::rollout::{self, Prompt, Rollout, Specials, TeacherBatch, SALT_EVAL, SALT_TRAIN};
use anyhow::{bail, ensure, Context, Result};
use lm::dist::Dist;
use lm::peft::TaskType;
use lm::train::session::{Precision, Trainable, Updater};
use lm::{chunked, Gemma, StopReason, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
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
    /// Of `time_update`, the seconds in the gradients' all-reduce (0 in
    /// one process; the slowest rank's).
    #[serde(default)]
    pub time_allreduce: f64,
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

/// The frozen reference policy the KL is measured against.
pub enum Reference {
    /// A model of its own (the config's `reference`, or the policy's
    /// starting weights in a full fine-tune), frozen: no variable requires
    /// a gradient.
    Model { vs: nn::VarStore, model: Box<Gemma> },
    /// The policy with its LoRA adapters switched off
    /// ([`Gemma::adapters_disabled`]): the base weights it starts from,
    /// without a second copy.
    AdaptersOff,
}

/// Holds the three roles and the optimiser, and runs steps.
pub struct Trainer {
    pub cfg: RlConfig,
    /// The policy's weights and what of them is trained (every weight, or
    /// LoRA adapters over a frozen base).
    pub policy_weights: Trainable,
    pub policy: Gemma,
    pub reference: Reference,
    /// Decodes responses for text rewards and sample files (optional).
    pub tokenizer: Option<Tokenizer>,
    pub specials: Specials,
    /// The optimiser and the guarded update (it knows the checkpoint
    /// directory for its errors once the run sets it).
    pub updater: Updater,
    pub reward: Box<dyn RewardFn>,
    pub kl: KlController,
    /// (mean, std) used to normalise rewards.
    pub norm: Option<(f64, f64)>,
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
    /// Seconds in the updates' collectives over the gradients.
    comm_s: f64,
}

/// Seconds spent in each phase of a step.
struct Times {
    generate: f64,
    score: f64,
    update: f64,
    allreduce: f64,
}

impl StepStats {
    /// The metrics row of step `step` (0-based; recorded as `step + 1`)
    /// and the number of samples: over the whole batch of every rank in a
    /// data-parallel run (sums, maxima and squared deviations summed over
    /// ranks; the phase times are the slowest rank's).
    #[allow(clippy::too_many_arguments)]
    fn of(
        dist: &Dist,
        step: u64,
        rollouts: &[Rollout],
        raw: &[f64],
        adv: &Advantages,
        beta: f64,
        upd: &UpdateStats,
        times: &Times,
    ) -> Result<(Self, usize)> {
        let kl_v = to_vec(&adv.kl_seq)?;
        let adv_v = to_vec(&adv.adv)?;
        let total_v = to_vec(&adv.total)?;
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        let count = |f: &dyn Fn(&Rollout) -> bool| rollouts.iter().filter(|r| f(r)).count() as f64;
        let local = [
            rollouts.len() as f64,
            sum(raw),
            sum(&adv.processed),
            sum(&total_v),
            sum(&kl_v),
            adv.tok_count,
            adv.ent_sum,
            rollouts.iter().map(|r| r.response_ids.len()).sum::<usize>() as f64,
            count(&|r| r.ended()),
            count(&|r| r.stop_reason == StopReason::Length),
            sum(&adv_v),
        ];
        let g = dist.sum(&local)?;
        let n = g[0].max(1.0);
        let (reward_mean, adv_mean) = (g[1] / n, g[10] / n);
        let fold = |v: &[f64], f: fn(f64, f64) -> f64, init: f64| v.iter().copied().fold(init, f);
        let m = dist.max(&[
            fold(raw, f64::max, f64::NEG_INFINITY),
            -fold(raw, f64::min, f64::INFINITY),
            fold(&adv_v, f64::max, f64::NEG_INFINITY),
            -fold(&adv_v, f64::min, f64::INFINITY),
            times.generate,
            times.score,
            times.update,
            times.allreduce,
        ])?;
        let sq = |v: &[f64], mean: f64| v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>();
        let q = dist.sum(&[sq(raw, reward_mean), sq(&adv_v, adv_mean)])?;
        let rollout_tokens = g[7] as usize;
        let st = StepStats {
            step: step + 1,
            reward_mean,
            reward_std: (q[0] / n).sqrt(),
            reward_min: -m[1],
            reward_max: m[0],
            score_mean: g[2] / n,
            total_reward_mean: g[3] / n,
            kl: g[4] / n,
            kl_per_token: g[4] / g[5].max(1.0),
            beta,
            entropy: g[6] / g[5].max(1.0),
            response_len: g[7] / n,
            ended_frac: g[8] / n,
            truncated_frac: g[9] / n,
            adv_mean,
            adv_std: (q[1] / n).sqrt(),
            adv_min: -m[3],
            adv_max: m[2],
            loss: upd.loss,
            grad_norm: upd.grad_norm,
            lr: upd.lr,
            clip_frac: upd.clip_frac,
            time_generate: m[4],
            time_score: m[5],
            time_update: m[6],
            time_allreduce: m[7],
            rollout_tokens,
            rollout_tokens_per_s: rollout_tokens as f64 / m[4].max(1e-9),
        };
        Ok((st, g[0] as usize))
    }
}

impl Trainer {
    /// Sets up the roles: `policy` (loaded in
    /// [`Precision::load_kind`]) is trained as the stage's settings say
    /// ([`Trainable::prepare`]: every weight, cast to the config's dtype
    /// with f32 master weights when that is not f32, or LoRA adapters over
    /// the frozen base); `reference` is frozen. Without a `reference` the
    /// policy must have LoRA adapters, and the reference is the policy with
    /// them switched off.
    pub fn new(
        cfg: RlConfig,
        policy: (nn::VarStore, Gemma),
        reference: Option<(nn::VarStore, Gemma)>,
        tokenizer: Option<Tokenizer>,
        specials: Specials,
        reward: Box<dyn RewardFn>,
    ) -> Result<Self> {
        cfg.validate()?;
        let (policy_vs, mut policy) = policy;
        let precision = Precision::of(&cfg.stage)?;
        let reference = match reference {
            Some((mut vs, model)) => {
                if policy.cfg.vocab_size != model.cfg.vocab_size {
                    bail!(
                        "the policy has vocab_size {} and the reference {}; they must share a vocabulary",
                        policy.cfg.vocab_size,
                        model.cfg.vocab_size
                    );
                }
                if precision.compute != vs.kind() {
                    vs.set_kind(precision.compute);
                }
                vs.freeze();
                Reference::Model { vs, model: Box::new(model) }
            }
            None if cfg.stage.uses_lora() => Reference::AdaptersOff,
            None => bail!(
                "no reference model: a full fine-tune needs one (the reference is the policy with its adapters off only under LoRA)"
            ),
        };
        let mut policy_weights = Trainable::prepare(policy_vs, &mut policy, &cfg.stage, TaskType::CausalLm)?;
        let updater = Updater::new(&mut policy_weights, &cfg.stage.optim)?;
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
        Ok(Trainer { cfg, policy_weights, policy, reference, tokenizer, specials, updater, reward, kl, norm })
    }

    /// This process's place in a data-parallel run (one process unless
    /// launched by torchrun).
    pub fn dist(&self) -> &'static Dist {
        self.updater.dist
    }

    /// Samples the step's rollouts (k per prompt) from the policy. In a
    /// data-parallel run `prompts` is this rank's share of the step's
    /// prompts (every rank has as many), and each sample is seeded by its
    /// index in the global batch ([`rollout::sample_from`]).
    pub fn rollouts(&self, step: u64, prompts: &[Arc<Prompt>]) -> Result<Vec<Rollout>> {
        let k = self.cfg.num_samples;
        rollout::sample_from(
            &self.policy,
            prompts,
            k,
            &self.cfg.sampling(),
            self.specials,
            self.tokenizer.as_ref(),
            (self.cfg.stage.seed, step, SALT_TRAIN),
            (self.dist().rank * prompts.len() * k) as u64,
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

    /// The model the reference pass runs: the separate reference, or the
    /// policy (whose adapters [`Trainer::reference_logprobs`] switches off).
    pub fn reference_model(&self) -> &Gemma {
        match &self.reference {
            Reference::Model { model, .. } => model.as_ref(),
            Reference::AdaptersOff => &self.policy,
        }
    }

    /// The reference's per-token log-probs (n, R) of `batch`'s responses,
    /// without a gradient graph.
    pub fn reference_logprobs(&self, batch: &TeacherBatch) -> Result<Tensor> {
        let t = self.cfg.temperature;
        Ok(match &self.reference {
            Reference::Model { model, .. } => rollout::response_logprobs(model, batch, false, t)?.0,
            Reference::AdaptersOff => {
                let _off = self.policy.adapters_disabled();
                rollout::response_logprobs(&self.policy, batch, false, t)?.0
            }
        })
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
        // policy before the update, and then the advantages; no gradient
        // graph is kept.
        let t1 = Instant::now();
        let raw = self.score(&rollouts)?;
        let micro = self.micro_batches(&rollouts)?;
        let single_pass = self.cfg.updates_per_batch == 1 && micro.batches.len() == 1;
        let mut lp = self.logprobs_before_update(&micro.batches, single_pass)?;
        let beta = self.kl.beta;
        let mut adv = match single_pass {
            // The update's forward gives the policy's log-probs, and the
            // advantages are computed there.
            true => None,
            false => Some(advantages(
                &self.cfg,
                self.norm,
                self.dist(),
                &rollouts,
                &raw,
                &micro.batches,
                &lp,
                beta,
            )?),
        };
        sync(device);
        let score = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        let upd = self.update(step, &micro, (&rollouts, &raw), &mut lp, &mut adv)?;
        sync(device);
        let update = t2.elapsed().as_secs_f64();
        let adv = adv.context("the update computed no advantages")?;

        let times = Times { generate, score, update, allreduce: upd.comm_s };
        let (st, samples) = StepStats::of(self.dist(), step, &rollouts, &raw, &adv, beta, &upd, &times)?;
        // The whole batch's KL and size (every rank updates β alike).
        self.kl.update(st.kl, samples);
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
        let reference = batches.iter().map(|b| self.reference_logprobs(b)).collect::<Result<_>>()?;
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

    /// The `updates_per_batch` optimiser steps, the gradients of each
    /// accumulated over the micro-batches. Each micro-batch is one
    /// [`Gemma::forward_backward`] of the policy (see [`micro_step`]).
    /// `adv` None (a single pass: one update, one micro-batch): the first
    /// forward records the policy's log-probs and entropy in `lp` and
    /// computes the advantages of `scored` (the rollouts and their raw
    /// rewards) into `adv`.
    fn update(
        &mut self,
        step: u64,
        micro: &MicroBatches,
        scored: (&[Rollout], &[f64]),
        lp: &mut Logprobs,
        adv: &mut Option<Advantages>,
    ) -> Result<UpdateStats> {
        let updates = self.cfg.updates_per_batch;
        let total_opt_steps = self.cfg.steps * updates as u64;
        let (mut loss_sum, mut gnorm, mut lr, mut comm_s) = (0.0, 0.0, 0.0, 0.0);
        let mut clip = ClipCount::default();
        // The whole batch's sizes (over every rank of a data-parallel run):
        // each micro-batch's loss is normalised by them, so the accumulated
        // (and summed over ranks) gradient is that of the whole batch.
        let local = [micro.n as f64, micro.batches.iter().map(|b| BatchSize::of(&b.mask).tokens).sum()];
        let global = self.updater.global_sums(&local)?;
        let sizes = BatchSize { sequences: global[0], tokens: global[1] };
        // The adapters' dropout applies to the update's passes only.
        let _training = Training::on(&self.policy);
        for _ in 0..updates {
            let ctx = MicroContext {
                cfg: &self.cfg,
                policy: &self.policy,
                beta: self.kl.beta,
                norm: self.norm,
                sizes,
                dist: self.updater.dist,
            };
            let r = self.updater.step(micro.batches.len(), total_opt_steps, step, |i| {
                micro_step(&ctx, micro, i, scored, lp, adv, &mut clip)
            })?;
            (lr, gnorm) = (r.lr, r.grad_norm);
            loss_sum += r.loss;
            comm_s += r.comm_s;
        }
        let c = self.updater.global_sums(&[clip.clipped, clip.counted])?;
        Ok(UpdateStats {
            loss: loss_sum / updates as f64,
            grad_norm: gnorm,
            lr,
            clip_frac: if c[1] > 0.0 { c[0] / c[1] } else { 0.0 },
            comm_s,
        })
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
        // A data-parallel run splits the prompts into contiguous shares, one
        // per rank, and gathers every rank's samples and rewards.
        let dist = self.dist();
        let share = prompts.len().div_ceil(dist.world);
        let lo = (dist.rank * share).min(prompts.len());
        let hi = (lo + share).min(prompts.len());
        let rollouts = rollout::sample_from(
            &self.policy,
            &prompts[lo..hi],
            1,
            &sampling,
            self.specials,
            self.tokenizer.as_ref(),
            (self.cfg.stage.seed, 0, SALT_EVAL),
            lo as u64,
        )?;
        let rewards = if rollouts.is_empty() { vec![] } else { self.score(&rollouts)? };
        let (rollouts, rewards) = match dist.world {
            1 => (rollouts, rewards),
            _ => self.gather_eval(prompts, share, &rollouts, &rewards)?,
        };
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

impl Trainer {
    /// Every rank's evaluation samples and rewards, in prompt order: rank
    /// r's `rollouts` answer `prompts[r·share..]`. Each sample travels as
    /// one row of numbers (reward, stop reason, length, token ids) and is
    /// rebuilt, its text decoded, on every rank (without the sampling
    /// log-probs, which evaluation does not use).
    fn gather_eval(
        &self,
        prompts: &[Arc<Prompt>],
        share: usize,
        rollouts: &[Rollout],
        rewards: &[f64],
    ) -> Result<(Vec<Rollout>, Vec<f64>)> {
        const HEAD: usize = 4; // valid, reward, stop reason, length
        let width = HEAD + self.cfg.max_new_tokens;
        let mut rows = vec![0f64; share.max(1) * width];
        for (j, (r, &x)) in rollouts.iter().zip(rewards).enumerate() {
            let row = &mut rows[j * width..(j + 1) * width];
            let stop = match r.stop_reason {
                StopReason::Eos => 0.0,
                StopReason::EndOfTurn => 1.0,
                StopReason::Length => 2.0,
            };
            ensure!(r.response_ids.len() <= self.cfg.max_new_tokens, "a response longer than max_new_tokens");
            row[..HEAD].copy_from_slice(&[1.0, x, stop, r.response_ids.len() as f64]);
            for (d, &id) in row[HEAD..].iter_mut().zip(&r.response_ids) {
                *d = id as f64;
            }
        }
        let local = Tensor::from_slice(&rows).view([share.max(1) as i64, width as i64]);
        let all = self.dist().all_gather_cat(&local)?; // (world · share, width)
        let all = Vec::<f64>::try_from(all.to_kind(Kind::Double).flatten(0, -1))?;
        let (mut out, mut out_rewards) = (vec![], vec![]);
        for (i, row) in all.chunks(width).enumerate() {
            if row[0] != 1.0 || i >= prompts.len() {
                continue;
            }
            let len = row[3] as usize;
            let mut r = Rollout {
                group: i,
                prompt: Arc::clone(&prompts[i]),
                response_ids: row[HEAD..HEAD + len].iter().map(|&v| v as i64).collect(),
                sample_logprobs: vec![],
                text: String::new(),
                stop_reason: match row[2] as i64 {
                    0 => StopReason::Eos,
                    1 => StopReason::EndOfTurn,
                    _ => StopReason::Length,
                },
            };
            if let Some(t) = &self.tokenizer {
                r.text = rollout::decode(t, r.content())?;
            }
            out.push(r);
            out_rewards.push(row[1]);
        }
        Ok((out, out_rewards))
    }
}

/// The adapters' training mode (dropout) on until dropped.
struct Training<'a>(&'a Gemma);

impl<'a> Training<'a> {
    fn on(model: &'a Gemma) -> Self {
        model.set_training(true);
        Training(model)
    }
}

impl Drop for Training<'_> {
    fn drop(&mut self) {
        self.0.set_training(false);
    }
}

/// Normalisation (by the stored `norm` = (mean, std)) and clipping of raw
/// rewards.
fn process(cfg: &RlConfig, norm: Option<(f64, f64)>, raw: &[f64]) -> Vec<f64> {
    raw.iter()
        .map(|&r| {
            let r = match norm {
                Some((m, s)) => (r - m) / s.max(1e-8),
                None => r,
            };
            match cfg.reward_clip {
                Some(c) => r.clamp(-c, c),
                None => r,
            }
        })
        .collect()
}

/// Per-sample KL, sequence rewards R = score − β_r·KL − penalty, and the
/// advantages over each prompt's k samples (`baseline`, then `scale`;
/// zero for a group of equal rewards), all (N,).
#[allow(clippy::too_many_arguments)]
fn advantages(
    cfg: &RlConfig,
    norm: Option<(f64, f64)>,
    dist: &Dist,
    rollouts: &[Rollout],
    raw: &[f64],
    batches: &[TeacherBatch],
    lp: &Logprobs,
    beta: f64,
) -> Result<Advantages> {
    let device = batches.first().context("no micro-batch")?.mask.device();
    let mut kl_seq = vec![];
    let mut ent_sum = 0.0;
    let mut tok_count = 0.0;
    for (i, b) in batches.iter().enumerate() {
        let kl = kl_per_token(&lp.old[i], &lp.reference[i], &b.mask, cfg.kl_estimator)?; // (n, R)
        kl_seq.push(kl.sum_dim_intlist(-1, false, Kind::Float)); // (n,)
        ent_sum += lp.entropy[i].sum(Kind::Double).double_value(&[]);
        tok_count += b.mask.sum(Kind::Double).double_value(&[]);
    }
    let kl_seq = Tensor::cat(&kl_seq, 0); // (N,)
    let processed = process(cfg, norm, raw);
    let score = Tensor::from_slice(&processed).to_kind(Kind::Float).to_device(device); // (N,)
    let ended: Vec<bool> = rollouts.iter().map(Rollout::ended).collect();
    let ended_t = Tensor::from_slice(&ended).to_device(device); // (N,)
    let beta_r = if cfg.kl_mode == KlMode::Reward { beta } else { 0.0 };
    let total = sequence_rewards(&score, &kl_seq.unsqueeze(-1), beta_r, &ended_t, cfg.missing_eot_penalty); // (N,)
    let k = cfg.num_samples as i64;
    // Baselines within each group (a group's k samples are on one rank);
    // whitening over the whole batch of every rank.
    let adv = loss::advantages_in(&total, k, cfg.baseline, cfg.advantage_scale(), &|v| dist.sum(v))?; // (N,)
    Ok(Advantages { kl_seq, processed, total, adv, ent_sum, tok_count })
}

/// What every micro-batch of an update shares.
struct MicroContext<'a> {
    cfg: &'a RlConfig,
    policy: &'a Gemma,
    /// The KL coefficient of the step.
    beta: f64,
    /// The reward normalisation.
    norm: Option<(f64, f64)>,
    /// The whole batch's sizes, which every micro-batch's loss is normalised by.
    sizes: BatchSize,
    /// The data-parallel context (whitening over every rank's samples).
    dist: &'a Dist,
}

/// Micro-batch `i`'s forward and backward: [`Gemma::forward_backward`]
/// whose head takes the hidden states at the response positions (N, H),
/// computes their log-probs over chunks of the vocabulary's logits (values
/// only), scatters them to (n, R) as a leaf requiring grad, computes the
/// loss ([`micro_loss`]) on the leaf, backpropagates it to the leaf, and
/// the leaf's gradient through the chunks
/// ([`lm::chunked::token_logprobs_backward`]) into the model. On a single
/// pass (`adv` None) it first records the policy's log-probs and entropy
/// in `lp` and computes the advantages. Returns the loss.
#[allow(clippy::too_many_arguments)]
fn micro_step(
    ctx: &MicroContext,
    micro: &MicroBatches,
    i: usize,
    (rollouts, raw): (&[Rollout], &[f64]),
    lp: &mut Logprobs,
    adv: &mut Option<Advantages>,
    clip: &mut ClipCount,
) -> Result<f64> {
    let (cfg, policy) = (ctx.cfg, ctx.policy);
    let b = &micro.batches[i];
    let range = &micro.ranges[i];
    let temp = cfg.temperature;
    policy.forward_backward(&b.ids, &b.positions, None, cfg.stage.gradient_checkpointing, |h| {
        let (rows, targets) = b.response_rows(h)?; // (N, H), (N,)
        let first = adv.is_none();
        let (values, ent) =
            chunked::token_logprobs(policy, &rows, &targets, temp, chunked::chunk_size(policy), first)?;
        let logp = b.scatter(&values)?; // (n, R)
        if first {
            lp.old.push(logp.detach());
            lp.entropy.push(b.scatter(&ent.context("entropy requested")?)?);
            *adv = Some(advantages(cfg, ctx.norm, ctx.dist, rollouts, raw, &micro.batches, lp, ctx.beta)?);
        }
        let a = adv.as_ref().context("no advantages")?.adv.narrow(0, range.start as i64, range.len() as i64); // (n,)
        let leaf = logp.detach().set_requires_grad(true);
        let loss = micro_loss(cfg, ctx.beta, &leaf, i, lp, b, &a, ctx.sizes, clip)?;
        let v = loss.double_value(&[]);
        if v.is_finite() && loss.requires_grad() {
            loss.backward();
            let g = leaf.grad();
            if g.defined() {
                let g = g.masked_select(&b.mask); // (N,)
                chunked::token_logprobs_backward(
                    policy,
                    &rows,
                    &targets,
                    temp,
                    chunked::chunk_size(policy),
                    &g,
                )?;
            }
        }
        Ok(v)
    })
}

/// The loss of micro-batch `i` (log-probs `logp`, advantages `a`):
/// REINFORCE, or its clipped importance-weighted form with several
/// updates per batch (counting the clipped tokens), plus the KL term in
/// loss mode (at β); both aggregated as `loss_aggregation`
/// says, normalised by the whole batch's `sizes`.
#[allow(clippy::too_many_arguments)]
fn micro_loss(
    cfg: &RlConfig,
    beta: f64,
    logp: &Tensor,
    i: usize,
    lp: &Logprobs,
    b: &TeacherBatch,
    a: &Tensor,
    sizes: BatchSize,
    clip: &mut ClipCount,
) -> Result<Tensor> {
    let agg = cfg.loss_aggregation;
    let mut loss = if cfg.updates_per_batch > 1 {
        let ratio = (logp - &lp.old[i]).exp().detach(); // (n, R)
        let out = (ratio - 1.0).abs().gt(cfg.clip_eps).logical_and(&b.mask);
        clip.clipped += out.sum(Kind::Double).double_value(&[]);
        clip.counted += b.mask.sum(Kind::Double).double_value(&[]);
        clipped_reinforce_loss(logp, &lp.old[i], &b.mask, a, cfg.clip_eps, agg, sizes)
    } else {
        reinforce_loss(logp, &b.mask, a, agg, sizes)
    };
    if cfg.kl_mode == KlMode::Loss && beta > 0.0 {
        loss += kl_loss(logp, &lp.reference[i], &b.mask, cfg.kl_estimator, beta, agg, sizes)?;
    }
    Ok(loss)
}
