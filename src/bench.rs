//! `align bench …`: align against the PyTorch/transformers reference, run on
//! the same machine in the same command, reported as a ratio.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lm::device::{parse_device, parse_dtype};
use lm::{GemmaConfig, GenerationConfig};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Clone, Debug)]
pub struct GenerateBench {
    /// Model preset (random weights).
    #[arg(long, default_value = "small-20m")]
    pub preset: String,
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: i64,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Python with torch + transformers for the reference (default: the
    /// project venv, then python3). `--python none` skips the reference.
    #[arg(long)]
    pub python: Option<String>,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tokens/s of batched greedy generation with the KV cache.
    Generate(GenerateBench),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(b) => bench_generate(&b),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The reference interpreter: `--python`, else `$ALIGN_PYTHON`, else the
/// project venv, else `python3`.
pub fn python(explicit: Option<&str>) -> String {
    if let Some(p) = explicit {
        return p.to_string();
    }
    if let Ok(p) = std::env::var("ALIGN_PYTHON") {
        return p;
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}

fn bench_generate(b: &GenerateBench) -> Result<()> {
    let device = parse_device(&b.device)?;
    let kind = parse_dtype(&b.dtype)?;
    let cfg = GemmaConfig::preset(&b.preset)?;
    if b.repeats == 0 || b.batch < 1 || b.prompt_len < 1 {
        bail!("--repeats, --batch and --prompt-len must be at least 1");
    }
    tch::manual_seed(0);
    let mut vs = tch::nn::VarStore::new(device);
    let model = lm::Gemma::new(&vs.root(), &cfg)?;
    vs.set_kind(kind);
    let prompts: Vec<Vec<i64>> = (0..b.batch)
        .map(|r| (0..b.prompt_len).map(|i| 10 + (r * 7919 + i * 104729) % (cfg.vocab_size - 10)).collect())
        .collect();
    let gcfg = GenerationConfig {
        max_new_tokens: b.new_tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        eos_id: -1, // never stop early: every run generates exactly new_tokens
        end_of_turn_id: None,
        pad_id: 0,
    };
    let tokens = (b.batch as usize * b.new_tokens) as f64;
    lm::generate(&model, &prompts, &gcfg)?; // warm-up
    let mut times = vec![];
    for _ in 0..b.repeats {
        let t0 = Instant::now();
        let out = lm::generate(&model, &prompts, &gcfg)?;
        times.push(t0.elapsed().as_secs_f64());
        debug_assert!(out.iter().all(|g| g.tokens.len() == b.new_tokens));
    }
    let align_tps = tokens / median(times);
    println!(
        "model {} ({:.1}M params), batch {}, prompt {}, new {}, {:?} {}, threads {}",
        b.preset,
        cfg.num_parameters() as f64 / 1e6,
        b.batch,
        b.prompt_len,
        b.new_tokens,
        device,
        b.dtype,
        tch::get_num_threads()
    );
    println!("align        {:>10.1} tokens/s", align_tps);
    if b.python.as_deref() == Some("none") {
        return Ok(());
    }
    let py = python(b.python.as_deref());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_generate.py");
    let args = serde_json::json!({
        "config": cfg, "batch": b.batch, "prompt_len": b.prompt_len, "new_tokens": b.new_tokens,
        "repeats": b.repeats, "device": if device.is_cuda() { "cuda" } else { "cpu" },
        "dtype": b.dtype, "threads": tch::get_num_threads(),
    });
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg(args.to_string())
        .output()
        .with_context(|| format!("cannot run the reference with {py}"))?;
    if !out.status.success() {
        bail!(
            "the transformers reference failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reference output is not JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    let ref_tps = v["tokens_per_s"].as_f64().context("reference output has no tokens_per_s")?;
    println!(
        "transformers {:>10.1} tokens/s  (transformers {}, torch {})",
        ref_tps,
        v["transformers"].as_str().unwrap_or("?"),
        v["torch"].as_str().unwrap_or("?")
    );
    println!("ratio        {:>10.2}x", align_tps / ref_tps);
    Ok(())
}
