//! `rl`: the KL-regularised REINFORCE stage with a leave-one-out baseline
//! (RLOO; Ahmadian et al., 2024).
//!
//! - [`loss`] — the pure pieces: k1/k3 KL estimators, sequence rewards with
//!   the end-of-turn penalty, leave-one-out advantages, whitening, the
//!   REINFORCE loss, its clipped importance-weighted variant, the KL loss term.
//! - [`control`] — the KL coefficient, fixed or adaptive (Ziegler et al., 2019).
//! - [`reward`] — the [`RewardFn`] trait rollouts are scored through; a
//!   trained reward model ([`RewardModelFn`], frozen), the oracle of the
//!   built-in tasks, and rule rewards (`length`, `contains`) for tests.
//! - [`rollout`] — prompts, k samples per prompt from the policy with seeds
//!   that are a pure function of (seed, step), and teacher-forced per-token
//!   log-probabilities of the responses.
//! - [`stage`] — [`RlConfig`] (the `[rl]` section), the [`Trainer`] holding
//!   policy, frozen reference, reward and optimiser, [`run`] with metrics,
//!   evaluation, samples, checkpoints and bit-identical resumption, and
//!   [`cli_train`] for `align rl --config`.
//! - [`bench`] — the time split of one RL step on a random model, for
//!   `align bench rl`.

pub mod bench;
pub mod control;
pub mod loss;
pub mod reward;
pub mod rollout;
pub mod stage;

pub use control::KlController;
pub use loss::{
    clipped_reinforce_loss, kl_loss, kl_per_token, reinforce_loss, rloo_advantages, sequence_rewards, whiten,
    KlEstimator,
};
pub use reward::{ContainsReward, LengthReward, OracleReward, RewardConfig, RewardFn, RewardModelFn};
pub use rollout::{Prompt, Rollout, Specials};
pub use stage::{
    cli_train, load_prompts, run, run_with_reward, EvalReport, KlMode, RlConfig, RlSummary, StepStats,
    Trainer,
};
