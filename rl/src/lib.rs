//! `rl`: the KL-regularised REINFORCE stage with a leave-one-out baseline
//! (RLOO; Ahmadian et al., 2024).
//!
//! - [`loss`] — the pure pieces: k1/k3 KL estimators, sequence rewards with
//!   the end-of-turn penalty, leave-one-out or group-mean advantages scaled
//!   by nothing, the group's std (GRPO) or the batch's (whitening), the
//!   REINFORCE loss, its clipped importance-weighted variant, the KL loss
//!   term, each aggregated per sequence (sum or mean) or per token.
//! - [`control`] — the KL coefficient, fixed or adaptive (Ziegler et al., 2019).
//! - [`reward`] — the [`RewardFn`] trait rollouts are scored through; a
//!   trained reward model ([`RewardModelFn`], frozen, through the scoring
//!   path `align score` and the judge share), an external verifier over HTTP
//!   ([`HttpReward`]), a weighted sum of rewards ([`SumReward`]), the oracle
//!   of the built-in tasks, and rule rewards (`length`, `contains`).
//! - [`rollout`] — prompts, k samples per prompt from the policy with seeds
//!   that are a pure function of (seed, step), and teacher-forced per-token
//!   log-probabilities of the responses.
//! - [`config`] — [`RlConfig`] (the `[rl]` section), its defaults and
//!   validation, and [`KlMode`].
//! - [`prompts`] — [`Prompts`]: the training prompts in the mixture's epoch
//!   order and the held-out evaluation prompts, chat-formatted.
//! - [`trainer`] — the [`Trainer`] holding policy, frozen reference, reward
//!   and optimiser; [`Trainer::step`] is one step (rollouts → rewards →
//!   advantages → update → KL controller), [`Trainer::evaluate`] one
//!   evaluation.
//! - [`run`](mod@run) — [`run`](fn@run) and [`run_with_reward`]: the loop with
//!   metrics, evaluation, samples, checkpoints and bit-identical resumption,
//!   the final model, plot and summary; [`cli_train`] for `align rl --config`.
//! - [`bench`](mod@bench) — the time split of one RL step on a random model, for
//!   `align bench rl`.
//!
//! The modules form a DAG: `bench` and `run` use `trainer` (and `run`
//! `prompts`), which use `config`, which uses the pure pieces (`control`,
//! `loss`, `reward`, `rollout`); nothing points back up.

pub mod bench;
pub mod config;
pub mod control;
pub mod loss;
pub mod prompts;
pub mod reward;
pub mod rollout;
pub mod run;
pub mod trainer;

pub use config::{KlMode, RlConfig};
pub use control::KlController;
pub use loss::{
    advantages, aggregate, clipped_reinforce_loss, kl_loss, kl_per_token, reinforce_loss, rloo_advantages,
    sequence_rewards, whiten, AdvantageScale, Baseline, BatchSize, KlEstimator, LossAggregation,
};
pub use prompts::{load_prompts, Prompts};
pub use reward::{
    ContainsReward, HttpReward, LengthReward, OracleReward, RewardConfig, RewardFn, RewardModelFn,
    SharedBase, SumReward,
};
pub use rollout::{Prompt, Rollout, Specials};
pub use run::{cli_train, plot_metrics, run, run_with_reward, RlSummary};
pub use trainer::{EvalReport, Reference, StepStats, Trainer};
