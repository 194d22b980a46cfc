//! `align bench lora`: LoRA fine-tuning at real size (a gemma-2b-shaped
//! model by default) against transformers + PEFT, and one RL step at that
//! size (`--rl`).
//!
//! Each side runs in a process of its own, so that each one's peak
//! resident memory (`VmHWM`) is its own: align re-runs itself as a worker
//! (`--worker`), the reference is `scripts/bench_lora_reference.py`. At
//! this size the two cannot be resident together on a 24 GiB machine, so
//! they alternate whole processes (align, the reference, again for each of
//! `--rounds`) instead of single steps as the small benchmarks do; the
//! medians of the timed steps are compared.

use super::util::{median, peak_rss_mib, python, scripts_dir};
use anyhow::{bail, Context, Result};
use clap::Args;
use lm::device::{parse_device, parse_dtype};
use lm::peft::TaskType;
use lm::train::session::{Trainable, Updater};
use lm::{Gemma, GemmaConfig, WeightInit};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Clone, Debug)]
pub struct LoraBench {
    /// Model preset (random weights).
    #[arg(long, default_value = "gemma-2b")]
    pub preset: String,
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    #[arg(long, default_value_t = 512)]
    pub seq: i64,
    /// LoRA rank (all linear layers; alpha = 2 × rank).
    #[arg(long, default_value_t = 16)]
    pub rank: i64,
    /// Untimed steps at the start of each process.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed optimiser steps per process (the median is reported).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Processes per side, alternating align and the reference.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// The frozen base's dtypes to run, comma-separated (f32, bf16); the
    /// adapters are f32 in both.
    #[arg(long, default_value = "f32,bf16")]
    pub base_dtype: String,
    /// Keep every layer's activations (no activation checkpointing).
    #[arg(long)]
    pub no_checkpointing: bool,
    /// Positions per chunk of the SFT loss over the vocabulary (default:
    /// `lm::chunked::chunk_size`, as `sft::micro_step` uses).
    #[arg(long)]
    pub loss_chunk: Option<i64>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// One RL step instead of SFT steps: a LoRA policy, the reference =
    /// the policy with its adapters off, a LoRA reward model over the same
    /// base weights (align only; no reference).
    #[arg(long)]
    pub rl: bool,
    /// Reward-model steps instead of SFT steps: LoRA and a trained score
    /// head, `--batch` preference pairs of `--seq` tokens each side (align
    /// only; no reference).
    #[arg(long, conflicts_with = "rl")]
    pub reward: bool,
    /// RL: prompts per step.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// RL: samples per prompt.
    #[arg(long, default_value_t = 2)]
    pub k: usize,
    /// RL: prompt length in tokens.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// RL: new tokens per sample.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Python with torch + transformers + peft for the reference; `none`
    /// skips it.
    #[arg(long)]
    pub python: Option<String>,
    /// Internal: run one side's steps in this process and print its JSON.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

/// What one worker process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    preset: String,
    batch: i64,
    seq: i64,
    rank: i64,
    warmup: usize,
    steps: usize,
    base_dtype: String,
    checkpointing: bool,
    device: String,
    threads: i64,
    rl: Option<RlShape>,
    #[serde(default)]
    reward: bool,
    #[serde(default)]
    loss_chunk: Option<i64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct RlShape {
    prompts: usize,
    k: usize,
    prompt_len: usize,
    new_tokens: usize,
}

/// One worker's figures (align's or the reference's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Outcome {
    /// Seconds of each timed step.
    step_seconds: Vec<f64>,
    /// Seconds to build the model and the trainer.
    setup_seconds: f64,
    peak_rss_mib: f64,
    /// Peak RSS when the model and trainer were built, before any step.
    #[serde(default)]
    setup_peak_rss_mib: f64,
    /// RL: the timed steps' generate/score/update split.
    #[serde(default)]
    split: Vec<[f64; 3]>,
    /// The reference's library versions.
    #[serde(default)]
    versions: Option<String>,
}

pub fn run(b: &LoraBench) -> Result<()> {
    if let Some(job) = &b.worker {
        let job: Job = serde_json::from_str(job).context("the worker's job")?;
        let out = if job.rl.is_some() {
            worker_rl(&job)?
        } else if job.reward {
            worker_reward(&job)?
        } else {
            worker_sft(&job)?
        };
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if b.steps == 0 || b.rounds == 0 || b.batch < 1 || b.seq < 2 || b.rank < 1 {
        bail!("--steps, --rounds, --batch and --rank must be at least 1 and --seq at least 2");
    }
    let cfg = GemmaConfig::preset(&b.preset)?;
    parse_device(&b.device)?;
    let dtypes: Vec<String> = b.base_dtype.split(',').map(|s| s.trim().to_string()).collect();
    for d in &dtypes {
        parse_dtype(d)?;
    }
    let threads = i64::from(tch::get_num_threads());
    let reference = if b.rl || b.reward {
        None
    } else {
        match b.python.as_deref() {
            Some("none") => None,
            other => Some(python(other)),
        }
    };
    println!("{}", machine(threads));
    let rl = b.rl.then_some(RlShape {
        prompts: b.prompts,
        k: b.k,
        prompt_len: b.prompt_len,
        new_tokens: b.new_tokens,
    });
    if let Some(r) = rl {
        println!(
            "bench lora --rl: {} ({:.2}B params), policy LoRA r {} on all linear layers, reference = adapters off, \
             LoRA reward model over the same base; {} prompts × {} samples, prompt {} + {} new tokens; \
             checkpointing {}; {} warm-up + {} timed steps",
            b.preset,
            cfg.num_parameters() as f64 / 1e9,
            b.rank,
            r.prompts,
            r.k,
            r.prompt_len,
            r.new_tokens,
            !b.no_checkpointing,
            b.warmup,
            b.steps
        );
    } else if b.reward {
        println!(
            "bench lora --reward: {} ({:.2}B params), {} pair(s) of {} tokens a side, LoRA r {} on all linear layers \
             + the score head, checkpointing {}; {} warm-up + {} timed steps",
            b.preset,
            cfg.num_parameters() as f64 / 1e9,
            b.batch,
            b.seq,
            b.rank,
            !b.no_checkpointing,
            b.warmup,
            b.steps
        );
    } else {
        println!(
            "bench lora: {} ({:.2}B params), batch {}, seq {}, LoRA r {} (alpha {}) on all linear layers, \
             checkpointing {}; per process {} warm-up + {} timed steps, {} round(s) of align then reference",
            b.preset,
            cfg.num_parameters() as f64 / 1e9,
            b.batch,
            b.seq,
            b.rank,
            2 * b.rank,
            !b.no_checkpointing,
            b.warmup,
            b.steps,
            b.rounds
        );
    }
    for dtype in &dtypes {
        let job = Job {
            preset: b.preset.clone(),
            batch: b.batch,
            seq: b.seq,
            rank: b.rank,
            warmup: b.warmup,
            steps: b.steps,
            base_dtype: dtype.clone(),
            checkpointing: !b.no_checkpointing,
            device: b.device.clone(),
            threads,
            rl,
            reward: b.reward,
            loss_chunk: b.loss_chunk,
        };
        let (mut ours, mut theirs) = (vec![], vec![]);
        for _ in 0..b.rounds {
            ours.push(run_align(&job)?);
            if let Some(py) = &reference {
                theirs.push(run_reference(py, &job, &cfg)?);
            }
        }
        report(dtype, &job, &ours, &theirs);
    }
    Ok(())
}

/// The CPU model and thread count (the figures depend on both).
fn machine(threads: i64) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("machine: {cpu}, {cores} cores visible, {threads} torch threads")
}

fn report(dtype: &str, job: &Job, ours: &[Outcome], theirs: &[Outcome]) {
    let all = |o: &[Outcome]| -> Vec<f64> { o.iter().flat_map(|x| x.step_seconds.iter().copied()).collect() };
    let peak = |o: &[Outcome]| o.iter().map(|x| x.peak_rss_mib).fold(0.0, f64::max);
    let setup_peak = |o: &[Outcome]| o.iter().map(|x| x.setup_peak_rss_mib).fold(0.0, f64::max);
    let gib = |mib: f64| mib / 1024.0;
    let s = median(all(ours));
    let tokens = (job.batch * job.seq * if job.reward { 2 } else { 1 }) as f64;
    if let Some(r) = job.rl {
        let split = |i: usize| median(ours.iter().flat_map(|o| o.split.iter().map(|x| x[i])).collect());
        println!(
            "{dtype} base  align RL step {s:>7.1} s (generate {:.1}, score {:.1}, update {:.1}; {:.1} rollout tokens/s)  \
             peak RSS {:.2} GiB (after setup {:.2})  setup {:.0} s",
            split(0),
            split(1),
            split(2),
            (r.prompts * r.k * r.new_tokens) as f64 / split(0),
            gib(peak(ours)),
            gib(setup_peak(ours)),
            ours[0].setup_seconds
        );
        return;
    }
    let what = if job.reward { "align reward" } else { "align       " };
    println!(
        "{dtype} base  {what} {s:>7.1} s/step  {:>7.1} tokens/s  peak RSS {:>6.2} GiB (after setup {:.2})  setup {:.0} s",
        tokens / s,
        gib(peak(ours)),
        gib(setup_peak(ours)),
        ours[0].setup_seconds
    );
    if theirs.is_empty() {
        return;
    }
    let rs = median(all(theirs));
    println!(
        "{dtype} base  peft         {rs:>7.1} s/step  {:>7.1} tokens/s  peak RSS {:>6.2} GiB  setup {:.0} s  ({})",
        tokens / rs,
        gib(peak(theirs)),
        theirs[0].setup_seconds,
        theirs[0].versions.as_deref().unwrap_or("?")
    );
    println!(
        "{dtype} base  ratio        {:>7.2}x speed, {:.2}x peak memory (align / peft)",
        rs / s,
        peak(ours) / peak(theirs)
    );
}

/// Runs `cmd`, its stderr shown as it goes; its last stdout line as JSON.
fn run_child(mut cmd: std::process::Command, what: &str) -> Result<Outcome> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{what} failed ({}):\n{stdout}", out.status);
    }
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{what} printed {last:?}, not its figures"))
}

fn run_align(job: &Job) -> Result<Outcome> {
    let exe = std::env::current_exe().context("cannot find the align executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["bench", "lora", "--worker", &serde_json::to_string(job)?]);
    run_child(cmd, "the align worker")
}

fn run_reference(py: &str, job: &Job, cfg: &GemmaConfig) -> Result<Outcome> {
    let script = scripts_dir().join("bench_lora_reference.py");
    let args = serde_json::json!({
        "config": cfg, "batch": job.batch, "seq": job.seq, "rank": job.rank, "alpha": 2 * job.rank,
        "warmup": job.warmup, "steps": job.steps, "base_dtype": job.base_dtype,
        "checkpointing": job.checkpointing, "threads": job.threads,
        "device": if parse_device(&job.device)?.is_cuda() { "cuda" } else { "cpu" },
    });
    let mut cmd = std::process::Command::new(py);
    cmd.arg(&script).arg(args.to_string());
    run_child(cmd, &format!("the reference {} (needs torch, transformers and peft)", script.display()))
}

/// The stage settings of a LoRA run over a random base.
fn settings(job: &Job, out: &Path) -> Result<lm::stage_settings::StageSettings> {
    let v = serde_json::json!({
        "model": "(random)", "output_dir": out, "device": job.device, "dtype": "f32",
        "base_dtype": job.base_dtype, "gradient_checkpointing": job.checkpointing, "seed": 0,
        "lora": {"rank": job.rank, "alpha": (2 * job.rank) as f64, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": 1e-4},
    });
    serde_json::from_value(v).context("building the bench's stage settings")
}

/// A random model of `job`'s preset built straight in the base dtype.
fn random_model(job: &Job) -> Result<(tch::nn::VarStore, Gemma, GemmaConfig)> {
    let cfg = GemmaConfig::preset(&job.preset)?;
    let device = parse_device(&job.device)?;
    tch::manual_seed(0);
    let mut vs = tch::nn::VarStore::new(device);
    vs.set_kind(parse_dtype(&job.base_dtype)?);
    let model = Gemma::with_init(&vs.root(), &cfg, WeightInit::Zeros)?;
    fill_random(&vs, cfg.initializer_range)?;
    Ok((vs, model, cfg))
}

/// Draws every weight but the norms (zero in Gemma) from normal(0, `std`)
/// in place, in its own dtype: allocated once, as a checkpoint load does.
/// (`WeightInit::Random` draws in f32 and casts, a transient f32 copy of
/// each tensor: 2 GiB more at the 256000 × 2048 embedding.)
fn fill_random(vs: &tch::nn::VarStore, std: f64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (name, v) in vs.variables() {
            if !name.contains("norm") {
                let _ = v.shallow_clone().f_normal_(0.0, std)?;
            }
        }
        Ok(())
    })
}

fn worker_sft(job: &Job) -> Result<Outcome> {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let s = settings(job, tmp.path())?;
    let (vs, mut model, cfg) = random_model(job)?;
    let mut t = Trainable::prepare(vs, &mut model, &s, TaskType::CausalLm)?;
    let mut up = Updater::new(&mut t, &s.optim)?;
    let device = parse_device(&job.device)?;
    let seqs: Vec<sft::Sequence> = (0..job.batch)
        .map(|r| {
            let ids: Vec<i64> =
                (0..=job.seq).map(|i| 10 + (r * 7919 + i * 104729) % (cfg.vocab_size - 10)).collect();
            sft::Sequence::from_ids(&ids, &vec![true; ids.len()])
        })
        .collect::<Option<_>>()
        .context("--seq must be at least 2")?;
    let rows: Vec<Vec<usize>> = (0..seqs.len()).map(|i| vec![i]).collect();
    let batch = sft::batch::make_batch(&seqs, &rows, 0, device)?;
    let setup_seconds = t0.elapsed().as_secs_f64();
    let setup_peak_rss_mib = peak_rss_mib();
    model.set_training(true);
    let mut step_seconds = vec![];
    let total = (job.warmup + job.steps) as u64;
    for step in 0..total {
        let t1 = Instant::now();
        let r = up.step(1, total, step, |_| match job.loss_chunk {
            None => sft::micro_step(&model, &batch, batch.trained as f64, job.checkpointing),
            // sft::micro_step with another chunk size.
            Some(chunk) => model.forward_backward(
                &batch.input,
                &batch.positions,
                batch.attn.as_ref(),
                job.checkpointing,
                |h| {
                    let picked = lm::chunked::select(h, &batch.mask)?;
                    let targets = batch.target.f_masked_select(&batch.mask)?;
                    lm::chunked::cross_entropy_sum(
                        &model,
                        &picked,
                        &targets,
                        1.0 / batch.trained as f64,
                        chunk,
                        true,
                    )
                },
            ),
        })?;
        let secs = t1.elapsed().as_secs_f64();
        eprintln!("align {} base: step {} {:.1} s, loss {:.4}", job.base_dtype, step + 1, secs, r.loss);
        if step as usize >= job.warmup {
            step_seconds.push(secs);
        }
    }
    Ok(Outcome {
        step_seconds,
        setup_seconds,
        peak_rss_mib: peak_rss_mib(),
        setup_peak_rss_mib,
        ..Default::default()
    })
}

fn worker_rl(job: &Job) -> Result<Outcome> {
    use rl::{Prompt, RewardModelFn, Specials};
    let shape = job.rl.context("an RL job without its shape")?;
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let (vs, model, cfg) = random_model(job)?;
    let device = parse_device(&job.device)?;
    let tok_path = tmp.path().join("tokenizer.json");
    lm::fsio::write_atomic(&tok_path, rl::bench::word_tokenizer_json(cfg.vocab_size).to_string().as_bytes())?;
    let tok = lm::Tokenizer::from_file(&tok_path)?;

    // The reward model: the policy's base tensors (no copy), LoRA adapters
    // and a score head of its own, frozen.
    let lora = lm::lora::LoraConfig { rank: job.rank, alpha: (2 * job.rank) as f64, ..Default::default() };
    let mut rm_vs = tch::nn::VarStore::new(device);
    let head = tch::Tensor::randn([1, cfg.hidden_size], (tch::Kind::Float, device)) * 0.02;
    let head = (&rm_vs.root() / "score").add("weight", head.to_kind(model.kind()), false);
    let score = lm::model::Linear { weight: head, lora: None };
    let mut rm = lm::reward_model::RewardModel::from_backbone(model.share_base(), score, &cfg)?;
    rm.backbone.attach_lora(&rm_vs.root(), &lora, 1)?;
    rm_vs.freeze();
    let n = shape.prompts * shape.k;
    let reward = RewardModelFn {
        scorer: lm::reward_score::RewardScorer {
            vs: rm_vs,
            model: rm,
            tokenizer: lm::Tokenizer::from_file(&tok_path)?,
            stats: None,
            batch_size: n,
            max_seq_len: shape.prompt_len + shape.new_tokens,
        },
        dir: PathBuf::from("(random)"),
    };
    let mut rl_cfg = rl::RlConfig::with_defaults(
        Path::new("(random)"),
        tmp.path(),
        rl::RewardConfig::Length { max_tokens: None, scale: 1.0 },
    )?;
    rl_cfg.stage = settings(job, tmp.path())?;
    rl_cfg.batch_size = shape.prompts;
    rl_cfg.num_samples = shape.k;
    rl_cfg.max_new_tokens = shape.new_tokens;
    rl_cfg.max_prompt_len = shape.prompt_len;
    rl_cfg.steps = 1000;
    rl_cfg.stage.optim.lr = 1e-5;
    let specials = Specials::of(&tok);
    let mut tr = rl::Trainer::new(rl_cfg, (vs, model), None, None, specials, Box::new(reward))?;
    let setup_seconds = t0.elapsed().as_secs_f64();
    let setup_peak_rss_mib = peak_rss_mib();
    // Random prompt ids (a fixed LCG: the same prompts every run).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next_id = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        6 + ((state >> 33) as i64) % (cfg.vocab_size - 6)
    };
    let (mut step_seconds, mut split) = (vec![], vec![]);
    for step in 0..(job.warmup + job.steps) as u64 {
        let prompts: Vec<Arc<Prompt>> = (0..shape.prompts)
            .map(|_| {
                let ids = (0..shape.prompt_len).map(|_| next_id()).collect();
                Arc::new(Prompt::from_ids(ids))
            })
            .collect();
        let t1 = Instant::now();
        let (st, _) = tr.step(step, &prompts)?;
        let secs = t1.elapsed().as_secs_f64();
        eprintln!(
            "align RL {} base: step {} {:.1} s (generate {:.1}, score {:.1}, update {:.1}), peak RSS so far {:.0} MiB",
            job.base_dtype,
            step + 1,
            secs,
            st.time_generate,
            st.time_score,
            st.time_update,
            peak_rss_mib()
        );
        if step as usize >= job.warmup {
            step_seconds.push(secs);
            split.push([st.time_generate, st.time_score, st.time_update]);
        }
    }
    Ok(Outcome {
        step_seconds,
        setup_seconds,
        peak_rss_mib: peak_rss_mib(),
        setup_peak_rss_mib,
        split,
        versions: None,
    })
}

fn worker_reward(job: &Job) -> Result<Outcome> {
    use tch::Kind;
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let s = settings(job, tmp.path())?;
    let cfg = GemmaConfig::preset(&job.preset)?;
    let device = parse_device(&job.device)?;
    tch::manual_seed(0);
    let mut vs = tch::nn::VarStore::new(device);
    vs.set_kind(parse_dtype(&job.base_dtype)?);
    let mut rm = lm::reward_model::RewardModel::with_init(&vs.root(), &cfg, 0.02, WeightInit::Zeros)?;
    fill_random(&vs, cfg.initializer_range)?;
    let mut t = Trainable::prepare(vs, &mut rm.backbone, &s, TaskType::SeqCls)?;
    let mut up = Updater::new(&mut t, &s.optim)?;
    // `batch` pairs: chosen rows then rejected rows, full length.
    let (p, n) = (job.batch, job.seq);
    let ids: Vec<i64> = (0..2 * p * n).map(|i| 10 + (i * 104729) % (cfg.vocab_size - 10)).collect();
    let ids = tch::Tensor::from_slice(&ids).view([2 * p, n]).to_device(device);
    let valid = tch::Tensor::ones([2 * p, n], (Kind::Bool, device));
    let (positions, mask) = lm::reward_model::RewardModel::inputs(&valid)?;
    let setup_seconds = t0.elapsed().as_secs_f64();
    let setup_peak_rss_mib = peak_rss_mib();
    rm.backbone.set_training(true);
    let mut step_seconds = vec![];
    let total = (job.warmup + job.steps) as u64;
    for step in 0..total {
        let t1 = Instant::now();
        let r = up.step(1, total, step, |_| {
            rm.backbone.forward_backward(&ids, &positions, Some(&mask), job.checkpointing, |h| {
                let r = rm.score_hidden(h, &valid)?; // (2P,)
                let (rc, rr) = (r.narrow(0, 0, p), r.narrow(0, p, p));
                let loss = (rc - rr).log_sigmoid().neg().sum(Kind::Float) / p as f64;
                loss.backward();
                Ok(loss.double_value(&[]))
            })
        })?;
        let secs = t1.elapsed().as_secs_f64();
        eprintln!(
            "align reward {} base: step {} {:.1} s, loss {:.4}",
            job.base_dtype,
            step + 1,
            secs,
            r.loss
        );
        if step as usize >= job.warmup {
            step_seconds.push(secs);
        }
    }
    Ok(Outcome {
        step_seconds,
        setup_seconds,
        peak_rss_mib: peak_rss_mib(),
        setup_peak_rss_mib,
        ..Default::default()
    })
}
