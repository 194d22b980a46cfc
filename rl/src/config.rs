//! [`RlConfig`]: the `[rl]` section of a recipe (or a standalone `align rl`
//! config), its defaults and its validation.

use crate::control::KlController;
use crate::loss::{AdvantageScale, Baseline, KlEstimator, LossAggregation};
use crate::reward::RewardConfig;
use crate::rollout::Sampling;
use anyhow::{bail, Context, Result};
use datasets::MixtureConfig;
use lm::stage_settings::StageSettings;
use lm::train;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the KL to the reference enters the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KlMode {
    /// In the sequence reward: R_i = r_i − β Σ_t KL_t (Ziegler et al., 2019;
    /// TRL's RLOO).
    #[default]
    Reward,
    /// As a loss term β · KL_t with gradients (GRPO), aggregated as the
    /// policy-gradient term (`loss_aggregation`); use the k3 estimator.
    Loss,
}

/// The `[rl]` section of a recipe (or a standalone `align rl` config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    /// The settings every stage has; `model` is the SFT checkpoint the
    /// policy starts from, `output_dir` also gets the evaluation samples,
    /// and `eval_every` evaluates on held-out prompts every N steps (0:
    /// never), also before the first step and after the last.
    #[serde(flatten)]
    pub stage: StageSettings,
    /// The reference model; default: `model` (the same weights, frozen).
    #[serde(default)]
    pub reference: Option<PathBuf>,
    pub reward: RewardConfig,
    /// The prompts: a mixture of any record kind (each record's prompt is
    /// used); its held-out split gives the evaluation prompts.
    pub data: MixtureConfig,
    /// RL steps (rollout batches).
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Prompts per step (B), per rank in a data-parallel run (a step then
    /// takes B × world prompts).
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
    /// Sampling temperature T (> 0; greedy decoding is refused). Every
    /// log-prob of the stage (stored at sampling, teacher-forced, the
    /// reference's, hence the KL, the importance ratio and the entropy) is
    /// that of the sampling distribution `log_softmax(logits / T)`; top-k
    /// and top-p only restrict the draw and do not renormalise these (as
    /// TRL and OpenRLHF).
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
    /// Default 1.0: a response that never ends is not a good one (TRL's
    /// `missing_eos_penalty`); 0 turns it off.
    #[serde(default = "one_f64")]
    pub missing_eot_penalty: f64,
    /// How the per-token loss terms (policy gradient and, in `kl_mode =
    /// "loss"`, the KL) are reduced: `"token_mean"` (the default: no
    /// per-sequence length bias, Dr. GRPO / DAPO), `"sequence_mean"` or
    /// `"sequence_sum"` (the RLOO paper); see [`LossAggregation`].
    #[serde(default)]
    pub loss_aggregation: LossAggregation,
    /// The advantages' baseline over a prompt's k samples:
    /// `"leave_one_out"` (RLOO, the default) or `"group_mean"` (GRPO).
    #[serde(default)]
    pub baseline: Baseline,
    /// The advantages' scale: `"none"`, `"group_std"` (with `group_mean`:
    /// GRPO) or `"batch_std"` (whitening over the batch). Unset: as
    /// `whiten_advantages` says. A group of (nearly) equal rewards gets zero
    /// advantage whatever the scale.
    #[serde(default)]
    pub scale: Option<AdvantageScale>,
    /// Whiten the advantages over the batch (zero mean, unit variance): the
    /// older spelling of `scale = "batch_std"` (false: `"none"`), used only
    /// when `scale` is not set.
    #[serde(default = "yes")]
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
    /// Held-out prompts used for evaluation (the first N).
    #[serde(default = "default_eval_prompts")]
    pub eval_prompts: usize,
    /// Evaluation responses written to `samples-step-N.jsonl`.
    #[serde(default = "default_eval_samples")]
    pub eval_samples: usize,
    /// Sampling temperature of evaluation; default: `temperature`.
    #[serde(default)]
    pub eval_temperature: Option<f64>,
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
fn yes() -> bool {
    true
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
        train::checkpoint_hash(self, |c| c.stage.clear_run_only())
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
        let cfg: RlConfig = lm::stage_settings::read_stage_config(path, "rl")?;
        cfg.validate().with_context(|| format!("invalid RL config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.stage.validate()?;
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
                "temperature must be a positive number for RL, got {}: greedy decoding (temperature = 0) would make the k samples of a prompt identical, and the log-probs, KL and importance ratio are those of the sampling distribution log_softmax(logits / temperature)",
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
        self.stage.resolve_paths(base);
        if let Some(r) = self.reference.as_mut() {
            fix(r);
        }
        self.reward.resolve_paths(base);
    }

    /// The advantages' scale: `scale`, or else `batch_std` when
    /// `whiten_advantages` and `none` otherwise.
    pub fn advantage_scale(&self) -> AdvantageScale {
        match (self.scale, self.whiten_advantages) {
            (Some(s), _) => s,
            (None, true) => AdvantageScale::BatchStd,
            (None, false) => AdvantageScale::None,
        }
    }

    pub(crate) fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            batch_size: self.generation_batch_size,
        }
    }
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
        assert_eq!(c.stage.model, dir.path().join("sft/model"));
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
        c.stage.save_every = 7;
        c.stage.eval_every = 5;
        c.stage.keep_last = 9;
        assert_eq!(
            c.hash().unwrap(),
            h,
            "where a run stops, saves, evaluates and what it keeps may change on resume"
        );
        c.beta = 0.1;
        assert_ne!(c.hash().unwrap(), h);
    }
}
