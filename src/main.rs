//! `align`: the command line. Arguments are parsed once into typed values
//! here and handed to the library crates; no stage logic lives in this crate.

mod bench;
mod commands;
mod data_cmd;
mod recipe;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "align", version, about = "Alignment pipeline for Gemma-architecture language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Read special-token strings in message content (`<end_of_turn>`,
    /// `<start_of_turn>`, ...) as control tokens, as transformers'
    /// `apply_chat_template` does. Off by default: content is text, so a
    /// user's text cannot forge a turn.
    #[arg(long, global = true)]
    parse_special_tokens: bool,
}

/// Device and dtype, shared by every command that runs a model.
#[derive(Args, Clone, Debug)]
pub struct RunOpts {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Decoding settings.
#[derive(Args, Clone, Debug)]
pub struct SamplingOpts {
    /// At least 1.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one user prompt (rendered with Gemma's dialogue format).
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingOpts,
        #[command(flatten)]
        run: RunOpts,
        /// Print one JSON object: prompt_ids, token_ids, text, stop_reason.
        #[arg(long)]
        json: bool,
        /// With --json: add `logprobs`, one per entry of token_ids, the
        /// log-prob of that token under the sampling distribution,
        /// log_softmax(logits / T) (T = 1 when greedy; before top-k/top-p).
        #[arg(long, requires = "json")]
        logprobs: bool,
    },
    /// Interactive multi-turn chat (/reset clears the history, /quit leaves).
    Chat {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingOpts,
        #[command(flatten)]
        run: RunOpts,
    },
    /// Show a conversation as the model sees it, trained spans marked.
    Inspect {
        /// A model directory (its tokenizer is used).
        #[arg(long)]
        model: PathBuf,
        /// JSON: a list of {role, content} or {"messages": [...]}.
        #[arg(long)]
        messages: PathBuf,
        /// Also list every token with its id and whether it is trained.
        #[arg(long)]
        tokens: bool,
    },
    /// Write a freshly initialised checkpoint directory.
    Init {
        /// A preset: gemma-2b, gemma-7b, gemma2-9b, gemma3-1b, gemma4-e2b, … (a
        /// published size), tiny, tiny-gemma2/3/4, small-20m, … (sized by the
        /// tokenizer); an unknown name lists them all.
        #[arg(long)]
        preset: String,
        /// tokenizer.json to ship with the model.
        #[arg(long)]
        tokenizer: PathBuf,
        /// A new or empty directory (see --force).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Replace --out even when it holds other files (they are deleted).
        #[arg(long, alias = "overwrite")]
        force: bool,
        /// Weight dtype: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Largest safetensors shard, as transformers writes it: "5GB",
        /// "500MB", "2GiB" or bytes.
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
    },
    /// Run a recipe's stages in order (complete stages are skipped).
    Run {
        recipe: PathBuf,
        /// Run only this stage.
        #[arg(long)]
        stage: Option<String>,
        /// Run from this stage on.
        #[arg(long)]
        from: Option<String>,
        /// Rerun stages even when complete.
        #[arg(long)]
        force: bool,
        /// Print the resolved plan and stop.
        #[arg(long)]
        dry_run: bool,
        /// Override a stage setting: stage.key=value (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Each stage's state, key figures and outputs.
    Status {
        recipe: PathBuf,
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Supervised fine-tuning (or pretraining) from a TOML config.
    Sft {
        #[arg(long)]
        config: PathBuf,
    },
    /// KL-regularised REINFORCE (RLOO) from a TOML config.
    Rl {
        #[arg(long)]
        config: PathBuf,
    },
    /// Train a Bradley-Terry reward model from a TOML config.
    Reward {
        #[arg(long)]
        config: PathBuf,
    },
    /// Score prompt/response rows or preference pairs with a reward model.
    Score {
        #[arg(long)]
        reward_model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// A table with reward columns (.jsonl, .csv or .parquet); stdout when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Compare two systems' answers side by side with a judge (both orders).
    Judge(Box<judge::JudgeArgs>),
    /// Serve a checkpoint with an OpenAI-compatible chat-completions API on loopback.
    Serve(serve::ServeArgs),
    /// Data tools: inspect, filter, mix.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
    /// Merge a PEFT LoRA adapter into its base: a full HF checkpoint.
    Merge {
        /// The base model directory (a causal LM; for a SEQ_CLS adapter, a
        /// reward model or the causal LM it was trained from).
        #[arg(long)]
        base: PathBuf,
        /// The adapter directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// A new or empty directory.
        #[arg(long)]
        out: PathBuf,
        /// f32 or bf16 (default: the dtype the base declares).
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Where libtorch is, whether CUDA is usable, threads: a smoke check.
    Info,
    /// Evaluations.
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Speed benchmarks against the PyTorch/transformers reference.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// The Gemma report's memorization test: 50-token prompts, 50 greedy tokens.
    Memorization(judge::MemArgs),
    /// Oracle accuracy on held-out built-in task prompts (greedy answers).
    Tasks {
        #[arg(long)]
        model: PathBuf,
        /// Prompts: a `builtin:eval?…` spec or a file of built-in task prompts.
        #[arg(long, default_value = "builtin:eval?n=210&seed=6")]
        prompts: String,
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[command(flatten)]
        run: RunOpts,
        /// Also write every answer with its verdict (JSONL).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE with Gemma's special tokens on text files.
    Train {
        /// Text files (one document per line).
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long, default_value_t = 1024)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate { model, prompt, system, sampling, run, json, logprobs } => {
            commands::generate(&model, &prompt, system.as_deref(), &sampling, &run, json, logprobs)
        }
        Command::Chat { model, system, sampling, run } => {
            commands::chat(&model, system.as_deref(), &sampling, &run)
        }
        Command::Inspect { model, messages, tokens } => commands::inspect(&model, &messages, tokens),
        Command::Init { preset, tokenizer, out, seed, force, dtype, max_shard_size } => {
            commands::init(&preset, &tokenizer, &out, seed, force, &dtype, &max_shard_size)
        }
        Command::Tokenizer { command: TokenizerCommand::Train { input, vocab_size, out } } => {
            commands::train_tokenizer(&input, vocab_size, &out)
        }
        Command::Bench { command } => bench::run(command),
        Command::Sft { config } => commands::sft(&config),
        Command::Merge { base, adapter, out, dtype } => {
            commands::merge(&base, &adapter, &out, dtype.as_deref())
        }
        Command::Info => commands::info(),
        Command::Eval { command: EvalCommand::Memorization(a) } => judge::cli_memorization(a),
        Command::Eval { command: EvalCommand::Tasks { model, prompts, max_new_tokens, batch, run, out } } => {
            let r = commands::eval_tasks(&model, &prompts, max_new_tokens, batch, &run, out.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::Run { recipe, stage, from, force, dry_run, sets } => {
            let l = recipe::load(&recipe, &sets)?;
            recipe::run(&l, &recipe::RunOptions { stage, from, force, dry_run })
        }
        Command::Status { recipe, sets } => recipe::print_status(&recipe::load(&recipe, &sets)?),
        Command::Reward { config } => reward::cli_train(&config),
        Command::Rl { config } => rl::cli_train(&config),
        Command::Judge(args) => judge::cli_judge(*args),
        Command::Serve(args) => serve::cli_serve(args),
        Command::Score { reward_model, data, out } => reward::cli_score(&reward_model, &data, out.as_deref()),
        Command::Data { command } => data_cmd::run(command),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lm::tokenizer::set_parse_special_tokens_default(cli.parse_special_tokens);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
