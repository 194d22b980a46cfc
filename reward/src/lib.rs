//! `reward`: the Bradley-Terry reward model stage.
//!
//! - [`RewardModel`] (in `lm::reward_model`, re-exported as [`model`]) — the Gemma backbone plus a linear `score` head [1,
//!   hidden] without bias, laid out as transformers'
//!   `GemmaForSequenceClassification` (`num_labels = 1`). The reward of a
//!   sequence is the head's output at its last real token, found from the
//!   validity mask (any padding side). [`model::load`] starts from a causal
//!   LM (the head is new and logged) or loads a reward model as it is;
//!   [`model::save`] writes a directory transformers loads.
//! - [`loss`] — −log σ(r_chosen − r_rejected − margin) with an optional
//!   reward-centring term (Bradley & Terry 1952; Ouyang et al. 2022;
//!   Eisenstein et al. 2023), as pure functions.
//! - [`data`] — preference pairs through the dialogue formatter, prompt-side
//!   truncation or dropping of over-long pairs, length-grouped epoch plans,
//!   and batches holding the chosen sides then the rejected sides.
//! - [`RewardConfig`] and [`run`] — the training stage on the shared
//!   machinery of `lm::train` (AdamW, warmup + cosine, accumulation,
//!   clipping, checkpoints that resume bit-identically, metrics, progress,
//!   NaN stop). Writes `output_dir/{metrics.jsonl, summary.json,
//!   checkpoints/step-N, model/}`; `model/reward_stats.json` holds the
//!   held-out reward mean and std for normalisation downstream, and every
//!   checkpoint saved after an evaluation holds that evaluation's.
//! - [`eval`] — accuracy (r_c > r_r), mean margin, reward mean/std and
//!   accuracy per category.
//! - [`score`](mod@score) — [`Scorer`] and [`score()`] for prompt/response rows
//!   and pairs (used by the CLI and the RL stage), [`score_file`] writing a
//!   table with reward columns (JSONL, CSV or Parquet), and the CLI entry
//!   points [`cli_train`] and [`cli_score`].

pub mod data;
pub mod eval;
pub mod loss;
/// The model lives in `lm` (the RL stage and the judge use it too).
pub use lm::reward_model as model;
pub mod score;
pub mod stage;

pub use data::{PairTokens, Truncation};
pub use eval::{CategoryReport, EvalReport};
pub use loss::{bradley_terry_loss, bradley_terry_sum, centring_sum, reward_loss};
pub use model::{RewardModel, RewardStats};
pub use score::{cli_score, cli_train, score, score_file, ScoreOptions, ScoreReport, Scored, Scorer};
pub use stage::{load_data, run, RewardConfig, RewardSummary};
