//! The arguments of `align bench generate`, shared by the Gemma path
//! (`bench.rs`) and the family path (`family.rs`).

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct GenerateBench {
    /// The family member: `gemma` (a preset, a random model on each side),
    /// or `gemma2` / `gemma3`: their bench shapes (sliding windows of 512),
    /// the weights align makes loaded by transformers, greedy ids compared,
    /// KV-cache bytes reported.
    #[arg(long, default_value = "gemma")]
    pub family: String,
    /// Model preset for `--family gemma` (random weights; default small-20m).
    #[arg(long)]
    pub preset: Option<String>,
    /// Default: 8 (gemma), 1 (gemma2, gemma3).
    #[arg(long)]
    pub batch: Option<i64>,
    /// Default: 32 (gemma), 2048 (gemma2, gemma3).
    #[arg(long)]
    pub prompt_len: Option<i64>,
    /// Default: 64 (gemma), 256 (gemma2, gemma3).
    #[arg(long)]
    pub new_tokens: Option<i64>,
    /// Timed runs after one warm-up, alternating with the reference's; the
    /// medians are reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Python with torch + transformers for the reference (default: the
    /// project venv, then python3). `--python none` skips the reference.
    #[arg(long)]
    pub python: Option<String>,
    /// gemma2 / gemma3: before the rounds, time align's parts apart (the
    /// inference layout, the prefill whole and in window-sized chunks, one
    /// decoding step).
    #[arg(long)]
    pub profile: bool,
}
