//! `lm`: everything about the language model that the stages share.
//!
//! - [`GemmaConfig`] — hyper-parameters with Hugging Face `config.json` names
//!   for every family member (`gemma`, `gemma2`, `gemma3_text`,
//!   `gemma4_text`; the text model of a multimodal `gemma3`/`gemma4`
//!   checkpoint), and presets.
//! - [`family`] — what each member computes, one file per member, read into
//!   a `LayerSpec` per layer (window, heads, scale, soft-cap, norms, RoPE).
//! - [`Gemma`] — the one decoder running them, exact to transformers'
//!   `Gemma*ForCausalLM` (`model.rs`), with a [`KvCache`] for generation
//!   (sliding layers in a ring of `window` slots).
//! - [`Tokenizer`] — `tokenizer.json` with Gemma's special tokens found by
//!   their strings; byte-level BPE training for the built-in demo.
//! - [`chat`] — the dialogue formatter: Gemma's chat template, token ids and
//!   the loss mask over the model's turns. Its [`Message`] is the one the
//!   `datasets` readers produce (`lm` depends on `datasets`, never the reverse).
//! - [`checkpoint`] — Hugging Face checkpoint directories, read with name and
//!   shape checks and written atomically (optionally sharded).
//! - [`safetensors_io`] — safetensors at any size: streamed, sharded writes and memory-mapped, tensor-by-tensor loads.
//! - [`fsio`] — atomic writes: a file through a temp file and a rename, a
//!   directory built beside its destination and swapped into place.
//! - [`output_dir`] — a stage's output directory: locked for one run at a
//!   time, refused when it holds someone else's files, crash debris removed.
//! - [`generate()`] — batched, seeded generation: greedy, temperature, top-k,
//!   top-p, per-sequence stopping, per-token log-probabilities.
//! - [`train`] — what every training stage shares: AdamW, the LR schedule,
//!   clipping, resumable training checkpoints, metrics and progress.
//! - [`stage_settings`] — [`stage_settings::StageSettings`], the settings
//!   every stage config embeds (model, output_dir, optim, seed, …), and the
//!   one strict reader of stage configs.
//! - [`reward_model`] — a Gemma backbone with a `score` head
//!   (`GemmaForSequenceClassification`): the reward model the reward stage
//!   trains and the RL stage and the judge use.
//! - [`reward_score`] — the one reward-scoring path (formatting, prompt-side
//!   truncation from the left, batching) `align score`, the RL reward and
//!   the reward judge share.
//! - [`lora`] — LoRA adapters on the decoder's projections: config, the
//!   adapter's maths, the switches (enabled, training) a model's adapters share.
//! - [`peft`] — LoRA on the model: attach, switch off (the RL reference),
//!   PEFT's adapter directories, merging into a full checkpoint.
//! - [`recompute`] — [`Gemma::forward_backward`]: one forward and backward
//!   pass with or without activation checkpointing (layers recomputed in the
//!   backward pass), the loss computed by the caller on the final hidden states.
//! - [`chunked`] — cross-entropy, log-probabilities and entropy over chunks of
//!   positions, only where they count: never the (N, V) logits at once.
//! - [`init`] — seeded initialisation that ignores torch's global generator.
//! - [`device`] — `--device` / `--dtype` parsing.
//! - [`plot`] — PNG line charts (loss, reward, KL) and bar charts with
//!   error whiskers (win rates), drawn without a plotting library.

pub mod chat;
pub mod checkpoint;
pub mod chunked;
pub mod config;
pub mod device;
pub mod dist;
pub mod family;
pub mod fsio;
pub mod generate;
pub mod http;
pub mod init;
pub mod lora;
pub mod model;
pub mod output_dir;
pub mod peft;
pub mod plot;
pub mod recompute;
pub mod reference;
pub mod reward_model;
pub mod reward_score;
pub mod safetensors_io;
pub mod stage_settings;
pub mod tokenizer;
pub mod train;

pub use chat::{Encoded, Message};
pub use config::GemmaConfig;
pub use generate::{generate, Generation, GenerationConfig, StopReason};
pub use model::{Gemma, InferenceWeights, KvCache, WeightInit};
pub use tokenizer::Tokenizer;
