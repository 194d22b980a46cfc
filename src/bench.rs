//! `align bench …`: align against the PyTorch/transformers reference, run on
//! the same machine in the same command, reported as a ratio.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use lm::device::{parse_device, parse_dtype};
use lm::reference::Reference;
use lm::{GemmaConfig, GenerationConfig};
use std::time::Instant;

mod args;
mod family;
mod floor;
mod lora;
mod util;

pub use args::GenerateBench;
use floor::MatmulFloor;

pub use util::python;
use util::{median, peak_rss_mib, scripts_dir};

#[derive(Args, Clone, Debug)]
pub struct SftBench {
    #[arg(long, default_value = "bench-50m")]
    pub preset: String,
    #[arg(long, default_value_t = 4)]
    pub batch: i64,
    #[arg(long, default_value_t = 512)]
    pub seq: i64,
    /// Timed optimiser steps after one warm-up step, each side's alternating
    /// with the reference's; the medians are reported.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, or bf16 (align: bf16 weights with fp32 masters; PyTorch: bf16 autocast).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Python with torch + transformers for the reference; `none` skips it.
    #[arg(long)]
    pub python: Option<String>,
}

#[derive(Args, Clone, Debug)]
pub struct RlBench {
    #[arg(long, default_value = "small-20m")]
    pub preset: String,
    /// Prompts per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Python with torch + transformers + trl for TRL's RLOOTrainer; `none` skips it.
    #[arg(long)]
    pub python: Option<String>,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time split of one RL step and rollout tokens/s, beside TRL's RLOOTrainer.
    Rl(RlBench),
    /// Tokens/s of batched greedy generation with the KV cache.
    Generate(GenerateBench),
    /// Training tokens/s, peak memory and achieved FLOP/s of SFT steps.
    Sft(SftBench),
    /// LoRA fine-tuning at real size (gemma-2b shapes) against
    /// transformers + PEFT, f32 and bf16 base; `--rl`: one RL step.
    Lora(lora::LoraBench),
    /// A tiny random model's f32 logits on `--device` against the CPU's
    /// (the GPU check); fails beyond the tolerance.
    Parity(ParityBench),
}

#[derive(Args, Clone, Debug)]
pub struct ParityBench {
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Largest allowed absolute difference of any logit.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
}

/// [`ParityBench`]: one random model, its weights copied to the device,
/// the same ids through both; the largest logit difference.
fn parity(b: &ParityBench) -> Result<()> {
    let cfg = GemmaConfig::preset(&b.preset)?;
    let device = parse_device(&b.device)?;
    tch::manual_seed(0);
    let cpu_vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cpu = lm::Gemma::new(&cpu_vs.root(), &cfg)?;
    let mut dev_vs = tch::nn::VarStore::new(device);
    let dev = lm::Gemma::with_init(&dev_vs.root(), &cfg, lm::WeightInit::Zeros)?;
    dev_vs.copy(&cpu_vs)?;
    let (rows, t) = (2i64, 24i64);
    let ids: Vec<i64> = (0..rows * t).map(|i| 2 + (i * 7919) % (cfg.vocab_size - 2)).collect();
    let ids = tch::Tensor::from_slice(&ids).view([rows, t]);
    let (a, d) = tch::no_grad(|| -> Result<_> {
        Ok((cpu.forward(&ids)?, dev.forward(&ids.to_device(device))?.to_device(tch::Device::Cpu)))
    })?;
    let diff = (&a - &d).abs().max().double_value(&[]);
    let scale = a.abs().max().double_value(&[]);
    let same_argmax = a.argmax(-1, false).equal(&d.argmax(-1, false));
    println!(
        "parity {} ({} × {} tokens): {:?} vs CPU f32 logits, max |diff| {diff:.2e} (logits up to {scale:.2}), \
         same argmax {same_argmax}, tolerance {:.0e}",
        b.preset, rows, t, device, b.tolerance
    );
    if diff.is_nan() || diff > b.tolerance {
        bail!("the logits on {:?} differ from the CPU's by {diff:e} > {:e}", device, b.tolerance);
    }
    Ok(())
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(b) => bench_generate(&b),
        BenchCommand::Sft(b) => bench_sft(&b),
        BenchCommand::Lora(b) => lora::run(&b),
        BenchCommand::Parity(b) => parity(&b),
        BenchCommand::Rl(b) => {
            let python = match b.python.as_deref() {
                Some("none") => None,
                other => Some(python(other)),
            };
            let o = rl::bench::BenchOptions {
                preset: b.preset,
                batch: b.batch,
                k: b.k,
                prompt_len: b.prompt_len,
                new_tokens: b.new_tokens,
                steps: b.steps,
                device: b.device,
                dtype: b.dtype,
                python,
                ..Default::default()
            };
            println!("{}", rl::bench::bench(&o)?);
            Ok(())
        }
    }
}

/// The machine's matmul rate in GFLOP/s for `kind` (f32 or bf16 operands,
/// 2048³, best of 5 after a warm-up).
fn matmul_peak_gflops(device: tch::Device, kind: tch::Kind) -> f64 {
    let n = 2048;
    let a = tch::Tensor::randn([n, n], (tch::Kind::Float, device)).to_kind(kind);
    let b = tch::Tensor::randn([n, n], (tch::Kind::Float, device)).to_kind(kind);
    let _ = a.matmul(&b).double_value(&[0, 0]);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        let c = a.matmul(&b);
        let _ = c.double_value(&[0, 0]);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}

/// The matmul peaks a training benchmark is measured against: f32 always,
/// and the training dtype's own when it is not f32 (bf16 runs its matmuls
/// in bf16, whose peak is several times f32's on CPUs with AVX512-BF16).
/// Returns the line describing them and the peak to take fractions of.
fn matmul_peaks(device: tch::Device, kind: tch::Kind, dtype: &str) -> (String, f64) {
    let f32_peak = matmul_peak_gflops(device, tch::Kind::Float);
    if kind == tch::Kind::Float {
        return (format!("f32 matmul peak {f32_peak:.0} GFLOP/s (fractions of it)"), f32_peak);
    }
    let own = matmul_peak_gflops(device, kind);
    (
        format!("f32 matmul peak {f32_peak:.0} GFLOP/s, {dtype} matmul peak {own:.0} GFLOP/s (fractions of the {dtype} peak)"),
        own,
    )
}

fn bench_sft(b: &SftBench) -> Result<()> {
    let device = parse_device(&b.device)?;
    let cfg = GemmaConfig::preset(&b.preset)?;
    if b.steps == 0 || b.batch < 1 || b.seq < 2 {
        bail!("--steps, --batch must be at least 1 and --seq at least 2");
    }
    let kind = parse_dtype(&b.dtype)?;
    let (peaks, peak) = matmul_peaks(device, kind, &b.dtype);
    tch::manual_seed(0);
    let mut vs = tch::nn::VarStore::new(device);
    let model = lm::Gemma::new(&vs.root(), &cfg)?;
    vs.set_kind(kind);
    let optim = lm::train::OptimConfig { lr: 1e-4, ..Default::default() };
    let mut opt = lm::train::AdamW::new(&vs, &optim);
    let seqs: Vec<sft::Sequence> = (0..b.batch)
        .map(|r| {
            let ids: Vec<i64> =
                (0..=b.seq).map(|i| 10 + (r * 7919 + i * 104729) % (cfg.vocab_size - 10)).collect();
            sft::Sequence::from_ids(&ids, &vec![true; ids.len()]).expect("seq >= 2")
        })
        .collect();
    let rows: Vec<Vec<usize>> = (0..seqs.len()).map(|i| vec![i]).collect();
    let batch = sft::batch::make_batch(&seqs, &rows, 0, device)?;
    let mut step = || -> Result<f64> {
        let t0 = Instant::now();
        opt.zero_grad();
        let loss = sft::batch_loss(&model, &batch, batch.trained as f64)?;
        loss.backward();
        opt.clip_grad_norm(1.0)?;
        opt.step(1e-4)?;
        let _ = loss.double_value(&[]);
        Ok(t0.elapsed().as_secs_f64())
    };
    let mut reference = match b.python.as_deref() {
        Some("none") => None,
        other => {
            let args = serde_json::json!({
                "config": cfg, "batch": b.batch, "seq": b.seq,
                "device": if device.is_cuda() { "cuda" } else { "cpu" }, "threads": tch::get_num_threads(),
                "dtype": b.dtype,
            });
            Some(Reference::start(&python(other), &scripts_dir().join("bench_sft.py"), &args)?)
        }
    };
    step()?; // warm-up

    // Interleaved (one align step, one PyTorch step, again), so that both
    // see the same state of a shared machine.
    let (mut times, mut ref_times) = (vec![], vec![]);
    for _ in 0..b.steps {
        times.push(step()?);
        if let Some(r) = reference.as_mut() {
            ref_times.push(r.time()?);
        }
    }
    let tokens = (b.batch * b.seq) as f64;
    let tps = tokens / median(times);
    let n = cfg.num_parameters() as f64;
    let gflops = 6.0 * n * tps / 1e9;
    println!(
        "model {} ({:.1}M params), batch {}, seq {}, {:?} {}, threads {}, {} interleaved steps; {peaks}",
        b.preset,
        n / 1e6,
        b.batch,
        b.seq,
        device,
        b.dtype,
        tch::get_num_threads(),
        b.steps,
    );
    println!(
        "align        {:>9.1} tokens/s  {:>6.1} GFLOP/s ({:.0}% of peak)  peak RSS {:.0} MiB",
        tps,
        gflops,
        100.0 * gflops / peak,
        peak_rss_mib()
    );
    let Some(r) = reference else { return Ok(()) };
    let v = r.finish()?;
    let ref_tps = tokens / median(ref_times);
    let ref_gflops = 6.0 * n * ref_tps / 1e9;
    println!(
        "pytorch      {:>9.1} tokens/s  {:>6.1} GFLOP/s ({:.0}% of peak)  peak RSS {:.0} MiB  (transformers {}, torch {})",
        ref_tps,
        ref_gflops,
        100.0 * ref_gflops / peak,
        v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        v["transformers"].as_str().unwrap_or("?"),
        v["torch"].as_str().unwrap_or("?")
    );
    println!("ratio        {:>9.2}x", tps / ref_tps);
    Ok(())
}

fn bench_generate(b: &GenerateBench) -> Result<()> {
    if b.family != "gemma" {
        return family::run(b, &b.family);
    }
    let preset = b.preset.as_deref().unwrap_or("small-20m");
    let (batch, prompt_len, new_tokens) =
        (b.batch.unwrap_or(8), b.prompt_len.unwrap_or(32), b.new_tokens.unwrap_or(64));
    if new_tokens < 0 {
        bail!("--new-tokens must not be negative");
    }
    let new_tokens = new_tokens as usize;
    let device = parse_device(&b.device)?;
    let kind = parse_dtype(&b.dtype)?;
    let cfg = GemmaConfig::preset(preset)?;
    if b.repeats == 0 || batch < 1 || prompt_len < 1 {
        bail!("--repeats, --batch and --prompt-len must be at least 1");
    }
    tch::manual_seed(0);
    let mut vs = tch::nn::VarStore::new(device);
    let model = lm::Gemma::new(&vs.root(), &cfg)?;
    vs.set_kind(kind);
    let prompts: Vec<Vec<i64>> = (0..batch)
        .map(|r| (0..prompt_len).map(|i| 10 + (r * 7919 + i * 104729) % (cfg.vocab_size - 10)).collect())
        .collect();
    let gcfg = GenerationConfig {
        max_new_tokens: new_tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        eos_id: -1, // never stop early: every run generates exactly new_tokens
        end_of_turn_id: None,
        pad_id: 0,
    };
    let tokens = (batch as usize * new_tokens) as f64;
    let mut reference = match b.python.as_deref() {
        Some("none") => None,
        other => {
            let args = serde_json::json!({
                "config": cfg, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                "device": if device.is_cuda() { "cuda" } else { "cpu" },
                "dtype": b.dtype, "threads": tch::get_num_threads(),
            });
            Some(Reference::start(&python(other), &scripts_dir().join("bench_generate.py"), &args)?)
        }
    };
    lm::generate(&model, &prompts, &gcfg)?; // warm-up
    let floor = MatmulFloor::new(&cfg, batch, prompt_len, new_tokens, device, kind);
    floor.time()?; // warm-up

    // Interleaved (align, the matmuls alone, transformers, again), so that
    // all three see the same state of a shared machine.
    let (mut times, mut floor_times, mut ref_times) = (vec![], vec![], vec![]);
    for _ in 0..b.repeats {
        let t0 = Instant::now();
        let out = lm::generate(&model, &prompts, &gcfg)?;
        times.push(t0.elapsed().as_secs_f64());
        debug_assert!(out.iter().all(|g| g.tokens.len() == new_tokens));
        floor_times.push(floor.time()?);
        if let Some(r) = reference.as_mut() {
            ref_times.push(r.time()?);
        }
    }
    let align_tps = tokens / median(times);
    let floor_tps = tokens / median(floor_times);
    println!(
        "model {} ({:.1}M params), batch {}, prompt {}, new {}, {:?} {}, threads {}, {} interleaved rounds",
        preset,
        cfg.num_parameters() as f64 / 1e6,
        batch,
        prompt_len,
        new_tokens,
        device,
        b.dtype,
        tch::get_num_threads(),
        b.repeats
    );
    println!(
        "align        {:>10.1} tokens/s  ({:.0}% of the matmul-only rate)",
        align_tps,
        100.0 * align_tps / floor_tps
    );
    println!(
        "matmul only  {:>10.1} tokens/s  (the same projections and head alone, libtorch kernels: the ceiling with them)",
        floor_tps
    );
    let Some(r) = reference else { return Ok(()) };
    let v = r.finish()?;
    let ref_tps = tokens / median(ref_times);
    println!(
        "transformers {:>10.1} tokens/s  (transformers {}, torch {})",
        ref_tps,
        v["transformers"].as_str().unwrap_or("?"),
        v["torch"].as_str().unwrap_or("?")
    );
    println!("ratio        {:>10.2}x", align_tps / ref_tps);
    Ok(())
}
