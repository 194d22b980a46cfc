//! `sft`: the supervised fine-tuning stage.
//!
//! - [`SftConfig`] — the typed `[sft]` section: start checkpoint, data (a
//!   `datasets` mixture of dialogues, or plain text in `pretrain` mode),
//!   sequence length, batching (length-grouped padding or packing),
//!   truncation policy, optimiser and schedule, evaluation and checkpoints.
//! - [`run`] — trains and writes `output_dir/{metrics.jsonl, summary.json,
//!   checkpoints/step-N, model/}`; resumes bit-identically on the CPU from
//!   the newest checkpoint. `summary.json` (`data`) and the end of the run
//!   report the rows each filter removed and the skipped bad rows; with
//!   `filters.keep_removed` the removed rows go to `filtered_out.jsonl`.
//! - [`masked_cross_entropy_sum`] — the loss: next-token cross-entropy over
//!   the formatter's trained spans, averaged per token over the batch.
//! - [`batch`] — sequences, packing with block-diagonal attention and
//!   per-example positions, and the deterministic epoch plan.

pub mod batch;
pub mod loss;
pub mod stage;

pub use batch::{Sequence, Truncation};
pub use loss::masked_cross_entropy_sum;
pub use stage::{
    batch_loss, data_report, evaluate, load_data, micro_step, run, Mode, SftConfig, SftSummary,
    FILTERED_OUT_FILE,
};
