//! Shared helpers for the rl integration tests: the tiny transformers
//! fixture model as the SFT checkpoint, prompt files, configs and a toy
//! reward.
#![allow(dead_code)]

use rl::{RewardFn, RlConfig, Rollout};
use std::path::{Path, PathBuf};

/// The 2-layer, 64-wide Gemma fixture (vocabulary 512) of the lm tests.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/mqa")
}

/// Writes `n` prompt-only rows as JSONL, with two categories.
pub fn write_prompts(dir: &Path, n: usize) -> PathBuf {
    let topics = ["rivers", "stars", "bread", "clocks", "trains", "maps", "bees", "salt"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let cat = if i % 2 == 0 { "facts" } else { "chat" };
            serde_json::json!({"prompt": format!("Tell me about {} {i}", topics[i % topics.len()]), "category": cat})
                .to_string()
        })
        .collect();
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// A config on the fixture: 4 prompts × 4 samples, 12 new tokens, the
/// `length` reward, held-out prompts for evaluation; `extra` TOML lines
/// (`key = value`) are added to the `[rl]` table and override these.
pub fn config(dir: &Path, prompts: &Path, extra: &str) -> RlConfig {
    let defaults = [
        ("batch_size", "4"),
        ("num_samples", "4"),
        ("max_new_tokens", "12"),
        ("max_prompt_len", "64"),
        ("device", "\"cpu\""),
        ("seed", "7"),
        // The defaults these tests were written against (before the
        // defaults became a penalty of 1.0 and whitened advantages).
        ("missing_eot_penalty", "0.0"),
        ("whiten_advantages", "false"),
    ];
    let given: Vec<&str> = extra.lines().filter_map(|l| l.split('=').next()).map(str::trim).collect();
    let mut body: Vec<String> =
        defaults.iter().filter(|(k, _)| !given.contains(k)).map(|(k, v)| format!("{k} = {v}")).collect();
    body.push(extra.to_string());
    let lr = std::env::var("RL_LR").unwrap_or("5e-3".into());
    let toml = format!(
        r#"
[rl]
model = "{model}"
output_dir = "{out}"
{body}
[rl.optim]
lr = {lr}
[rl.reward]
kind = "length"
[rl.data]
seed = 1
held_out = {{ fraction = 0.25 }}
[[rl.data.sources]]
name = "prompts"
path = "{prompts}"
"#,
        model = fixture().display(),
        out = dir.join("out").display(),
        body = body.join("\n"),
        prompts = prompts.display(),
    );
    let p = dir.join("rl.toml");
    std::fs::write(&p, toml).unwrap();
    RlConfig::from_toml_file(&p).unwrap()
}

/// The toy reward: the fraction of response tokens (stop token excluded)
/// whose id is below `below`. A random policy scores about below / vocab.
pub struct LowIds {
    pub below: i64,
}

impl RewardFn for LowIds {
    fn name(&self) -> String {
        format!("fraction of ids < {}", self.below)
    }
    fn score(&mut self, batch: &[Rollout]) -> anyhow::Result<Vec<f64>> {
        Ok(batch
            .iter()
            .map(|r| {
                let c = r.content();
                c.iter().filter(|&&t| t < self.below).count() as f64 / c.len().max(1) as f64
            })
            .collect())
    }
}

/// The metrics rows of the training steps (those with a `reward_mean`).
pub fn steps(out: &Path) -> Vec<serde_json::Value> {
    lm::train::read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.get("reward_mean").is_some())
        .collect()
}

pub fn mean(rows: &[serde_json::Value], key: &str) -> f64 {
    rows.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
}

/// A trainer on the fixture (policy and reference loaded separately) with
/// the toy reward, and a few formatted prompts.
pub fn trainer(cfg: rl::RlConfig) -> (rl::Trainer, Vec<std::sync::Arc<rl::Prompt>>) {
    use lm::checkpoint::load_causal_lm;
    use tch::{Device, Kind};
    let p = load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let r = load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let specials = rl::Specials::of(&p.tokenizer);
    let prompts = ["Tell me about rivers", "Name a star", "Why is bread soft?", "Hi"]
        .iter()
        .map(|q| {
            let messages = vec![lm::Message::user(*q)];
            let ids = lm::chat::prompt_ids(&p.tokenizer, &messages).unwrap();
            std::sync::Arc::new(rl::Prompt { messages, ids, category: None })
        })
        .collect();
    let t = rl::Trainer::new(
        cfg,
        (p.vs, p.model),
        Some((r.vs, r.model)),
        Some(p.tokenizer),
        specials,
        Box::new(LowIds { below: 128 }),
    )
    .unwrap();
    (t, prompts)
}

/// Every variable of a var store, sorted by name.
pub fn weights(vs: &tch::nn::VarStore) -> Vec<(String, tch::Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The per-token log-probs (n, R) of `batch`'s responses computed the way
/// the trainer did before its update ran on chunked log-probs: the full
/// (n, R, V) logits, with a gradient graph (unless under no_grad).
pub fn full_logprobs(model: &lm::Gemma, batch: &rl::rollout::TeacherBatch, temperature: f64) -> tch::Tensor {
    use tch::Kind;
    let hidden = model.forward_hidden(&batch.ids, &batch.positions, None, None).unwrap(); // (n, T, H)
    let (n, r) = batch.gather.size2().unwrap();
    let h = hidden.size()[2];
    let idx = batch.gather.unsqueeze(-1).expand([n, r, h], false); // (n, R, H)
    let picked = hidden.gather(1, &idx, false); // (n, R, H)
    let logits = model.logits(&picked).to_kind(Kind::Float); // (n, R, V)
    let logp_all = lm::generate::sampling_log_softmax(&logits, temperature);
    let m = batch.mask.to_kind(Kind::Float);
    logp_all.gather(-1, &batch.targets.unsqueeze(-1), false).squeeze_dim(-1) * &m
    // (n, R)
}
