//! `align bench rl`: the time split of one RL step (generation; scoring by
//! the reward model and the reference; the update) and the rollout
//! generation rate, on randomly initialised models of a preset, beside the
//! same step run by TRL's `RLOOTrainer` (`scripts/bench_rl.py`) on the same
//! machine, reported as a ratio.
//!
//! Both sides get the same problem: a random policy, a frozen copy as the
//! reference, a random reward model (`GemmaForSequenceClassification`) of
//! the same config, B prompts of `prompt_len` random words, k samples of
//! exactly up to `new_tokens` tokens at temperature 1, β in the reward (k1),
//! one AdamW update per batch, fp32 by default. The tokenizer is a
//! word-level one (Gemma's six special tokens, then one word per id) that
//! both sides load from the same file, so TRL's decode and re-encode for
//! its reward model reproduces the ids align scores directly. The two run
//! interleaved (one align step, one TRL step, in turn; `lm::reference`),
//! so that a shared machine's changing speed sways both alike.
//!
//! The recipe for the CLI: build [`BenchOptions`] from the flags, call
//! [`bench`](fn@bench), print the report (its `Display` is the table).

use crate::config::RlConfig;
use crate::reward::RewardModelFn;
use crate::rollout::{Prompt, Specials};
use crate::trainer::{StepStats, Trainer};
use crate::RewardConfig;
use anyhow::{bail, Context, Result};
use lm::reference::Reference;
use lm::reward_model::RewardModel;
use lm::{Gemma, GemmaConfig, Tokenizer};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What to benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Model preset (random weights); its vocabulary is the word tokenizer's.
    pub preset: String,
    /// Prompts per step (B).
    pub batch: usize,
    /// Samples per prompt.
    pub k: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Timed steps after one warm-up step, align's and TRL's in turn; the
    /// medians are reported.
    pub steps: usize,
    pub beta: f64,
    pub device: String,
    /// f32 or bf16 (align only; the TRL reference runs in fp32).
    pub dtype: String,
    /// Python with torch + transformers + trl for the reference; `None`
    /// skips it.
    pub python: Option<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            preset: "small-20m".into(),
            batch: 4,
            k: 4,
            prompt_len: 32,
            new_tokens: 64,
            steps: 3,
            beta: 0.05,
            device: "cpu".into(),
            dtype: "f32".into(),
            python: None,
        }
    }
}

/// The time split of one step, in seconds (medians over the timed steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    pub generate: f64,
    /// The reward model and the reference (and TRL's separate no-grad
    /// policy pass).
    pub score: f64,
    pub update: f64,
    pub total: f64,
    /// Generated tokens per step and their rate during generation.
    pub rollout_tokens: f64,
    pub rollout_tokens_per_s: f64,
}

/// What [`bench`](fn@bench) measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub preset: String,
    pub parameters: i64,
    pub batch: usize,
    pub k: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub device: String,
    pub dtype: String,
    pub threads: i32,
    pub align: StepTimes,
    pub trl: Option<StepTimes>,
    /// TRL, transformers and torch versions of the reference.
    pub trl_versions: Option<String>,
    /// TRL's step time over align's.
    pub speedup: Option<f64>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "RL step: {} ({:.1}M params), {} prompts x {} samples, prompt {} + {} new tokens, {} {}, threads {}",
            self.preset,
            self.parameters as f64 / 1e6,
            self.batch,
            self.k,
            self.prompt_len,
            self.new_tokens,
            self.device,
            self.dtype,
            self.threads
        )?;
        writeln!(
            f,
            "{:<8} {:>10} {:>10} {:>10} {:>10} {:>14}",
            "", "generate", "score", "update", "total", "rollout tok/s"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, t: &StepTimes| {
            writeln!(
                f,
                "{:<8} {:>9.3}s {:>9.3}s {:>9.3}s {:>9.3}s {:>14.1}",
                name, t.generate, t.score, t.update, t.total, t.rollout_tokens_per_s
            )
        };
        row(f, "align", &self.align)?;
        if let Some(t) = &self.trl {
            row(f, "trl", t)?;
        }
        if let Some(s) = self.speedup {
            write!(f, "speedup  {s:.2}x (TRL step time / align step time)")?;
            if let Some(v) = &self.trl_versions {
                write!(f, "; {v}")?;
            }
        }
        Ok(())
    }
}

/// A word-level `tokenizer.json`: Gemma's special tokens at ids 0..5
/// (`<pad>`, `<eos>`, `<bos>`, `<unk>`, `<start_of_turn>`,
/// `<end_of_turn>`), then `w6` … `w{vocab−1}`, split on white space and
/// decoded joined by spaces.
pub fn word_tokenizer_json(vocab: i64) -> serde_json::Value {
    let specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"];
    let mut map = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        map.insert(s.to_string(), serde_json::json!(i));
    }
    for i in specials.len() as i64..vocab {
        map.insert(format!("w{i}"), serde_json::json!(i));
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": map, "unk_token": "<unk>"},
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The reference script, `scripts/bench_rl.py` of the workspace.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_rl.py")
}

/// Runs the benchmark: align's steps and (with `python`) TRL's, in turn.
pub fn bench(o: &BenchOptions) -> Result<BenchReport> {
    if o.batch == 0 || o.k < 2 || o.prompt_len == 0 || o.new_tokens == 0 || o.steps == 0 {
        bail!("bench rl needs batch >= 1, k >= 2, prompt_len, new_tokens and steps >= 1");
    }
    let device = lm::device::parse_device(&o.device)?;
    let cfg = GemmaConfig::preset(&o.preset)?;
    let tmp = std::env::temp_dir().join(format!("align-bench-rl-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let tok_path = tmp.join("tokenizer.json");
    std::fs::write(&tok_path, word_tokenizer_json(cfg.vocab_size).to_string())?;
    let tok = Tokenizer::from_file(&tok_path)?;

    // The three roles, random: policy, its frozen copy, a reward model.
    tch::manual_seed(0);
    let policy_vs = tch::nn::VarStore::new(device);
    let policy = Gemma::new(&policy_vs.root(), &cfg)?;
    let mut ref_vs = tch::nn::VarStore::new(device);
    let reference = Gemma::new(&ref_vs.root(), &cfg)?;
    ref_vs.copy(&policy_vs)?;
    let mut rm_vs = tch::nn::VarStore::new(device);
    let rm = RewardModel::new(&rm_vs.root(), &cfg, cfg.initializer_range)?;
    rm_vs.set_kind(lm::device::parse_dtype(&o.dtype)?);
    rm_vs.freeze();
    let n = o.batch * o.k;
    let reward = RewardModelFn {
        scorer: lm::reward_score::RewardScorer {
            vs: rm_vs,
            model: rm,
            tokenizer: Tokenizer::from_file(&tok_path)?,
            stats: None,
            batch_size: n,
            max_seq_len: (o.prompt_len + o.new_tokens).max(2),
        },
        dir: PathBuf::from("(random)"),
    };
    let mut rl_cfg = RlConfig::with_defaults(
        Path::new("(random)"),
        &tmp,
        RewardConfig::Length { max_tokens: None, scale: 1.0 },
    )?;
    rl_cfg.batch_size = o.batch;
    rl_cfg.num_samples = o.k;
    rl_cfg.max_new_tokens = o.new_tokens;
    rl_cfg.max_prompt_len = o.prompt_len;
    rl_cfg.beta = o.beta;
    rl_cfg.stage.device = o.device.clone();
    rl_cfg.stage.dtype = o.dtype.clone();
    rl_cfg.steps = 1000;
    rl_cfg.stage.optim.lr = 1e-6;
    // TRL's RLOOTrainer defaults: no missing-EOS penalty, no whitening.
    rl_cfg.missing_eot_penalty = 0.0;
    rl_cfg.whiten_advantages = false;
    let specials = Specials::of(&tok);
    let mut tr = Trainer::new(
        rl_cfg,
        (policy_vs, policy),
        Some((ref_vs, reference)),
        None,
        specials,
        Box::new(reward),
    )?;

    // TRL's trainer, started now: it sets up and runs its warm-up step.
    let mut reference = match &o.python {
        Some(py) => {
            let args = serde_json::json!({
                "config": cfg, "tokenizer": tok_path, "batch": o.batch, "k": o.k, "prompt_len": o.prompt_len,
                "new_tokens": o.new_tokens, "steps": o.steps, "beta": o.beta, "threads": tch::get_num_threads(),
                "device": if device.is_cuda() { "cuda" } else { "cpu" },
            });
            let r = Reference::start(py, &script_path(), &args).with_context(|| {
                format!("the TRL reference failed; is trl installed (`{py} -m pip install trl`)?")
            })?;
            Some(r)
        }
        None => None,
    };

    // Step 0 is align's warm-up; then one align step and one TRL step in
    // turn, so that both see the same state of a shared machine.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut runs, mut trl_runs) = (vec![], vec![]);
    for step in 0..=o.steps as u64 {
        let prompts: Vec<Arc<Prompt>> = (0..o.batch)
            .map(|_| {
                let ids = (0..o.prompt_len).map(|_| rng.random_range(6..cfg.vocab_size)).collect();
                Arc::new(Prompt::from_ids(ids))
            })
            .collect();
        let t0 = Instant::now();
        let (st, _) = tr.step(step, &prompts)?;
        let total = t0.elapsed().as_secs_f64();
        if step == 0 {
            continue;
        }
        runs.push((st, total));
        if let Some(r) = reference.as_mut() {
            let v = r.run()?;
            let t: StepTimes = serde_json::from_value(v.clone())
                .with_context(|| format!("the TRL reference answered {v}"))?;
            trl_runs.push(t);
        }
    }
    let pick = |f: &dyn Fn(&(StepStats, f64)) -> f64| median(runs.iter().map(f).collect());
    let align = StepTimes {
        generate: pick(&|r| r.0.time_generate),
        score: pick(&|r| r.0.time_score),
        update: pick(&|r| r.0.time_update),
        total: pick(&|r| r.1),
        rollout_tokens: pick(&|r| r.0.rollout_tokens as f64),
        rollout_tokens_per_s: pick(&|r| r.0.rollout_tokens_per_s),
    };
    let (mut trl, mut trl_versions) = (None, None);
    if let Some(r) = reference {
        let v = r.finish()?;
        trl_versions = Some(format!(
            "trl {}, transformers {}, torch {}",
            v["trl"].as_str().unwrap_or("?"),
            v["transformers"].as_str().unwrap_or("?"),
            v["torch"].as_str().unwrap_or("?")
        ));
        let pick = |f: &dyn Fn(&StepTimes) -> f64| median(trl_runs.iter().map(f).collect());
        trl = Some(StepTimes {
            generate: pick(&|t| t.generate),
            score: pick(&|t| t.score),
            update: pick(&|t| t.update),
            total: pick(&|t| t.total),
            rollout_tokens: pick(&|t| t.rollout_tokens),
            rollout_tokens_per_s: pick(&|t| t.rollout_tokens_per_s),
        });
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(BenchReport {
        preset: o.preset.clone(),
        parameters: cfg.num_parameters(),
        batch: o.batch,
        k: o.k,
        prompt_len: o.prompt_len,
        new_tokens: o.new_tokens,
        device: o.device.clone(),
        dtype: o.dtype.clone(),
        threads: tch::get_num_threads(),
        align,
        speedup: trl.map(|t| t.total / align.total),
        trl,
        trl_versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_tokenizer_round_trips_ids_through_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, word_tokenizer_json(64).to_string()).unwrap();
        let tok = Tokenizer::from_file(&p).unwrap();
        assert_eq!(tok.vocab_size(), 64);
        assert_eq!((tok.special.pad, tok.special.end_of_turn), (0, 5));
        let ids = vec![6, 63, 17, 17];
        let text = tok.decode(&ids, true).unwrap();
        assert_eq!(text, "w6 w63 w17 w17");
        assert_eq!(tok.encode(&text).unwrap(), ids);
    }
}
