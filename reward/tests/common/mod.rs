//! Shared helpers for the reward tests: a tiny causal LM built here with the
//! lm fixtures' tokenizer, synthetic preference data, configs.
#![allow(dead_code)]

use lm::checkpoint;
use lm::{Gemma, GemmaConfig, Tokenizer};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{nn, Device};

pub fn tokenizer_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/mqa/tokenizer.json")
}

pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&tokenizer_path()).unwrap()
}

/// A ~100k-parameter Gemma (MQA, head_dim ≠ hidden/heads).
pub fn tiny_config(tok: &Tokenizer) -> GemmaConfig {
    let mut c = GemmaConfig::preset("test-mqa").unwrap();
    c.vocab_size = (tok.vocab_size() + 63) / 64 * 64;
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(1);
    c.head_dim = Some(16);
    c.max_position_embeddings = 256;
    c.pad_token_id = Some(tok.special.pad);
    c
}

/// Writes a randomly initialised causal LM (`GemmaForCausalLM`) to `dir`.
pub fn write_lm(dir: &Path, seed: i64, tie: bool) -> GemmaConfig {
    let tok = tokenizer();
    let mut cfg = tiny_config(&tok);
    cfg.tie_word_embeddings = tie;
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = Gemma::new(&vs.root(), &cfg).unwrap();
    lm::init::init_seeded(&vs, cfg.initializer_range, seed as u64).unwrap();
    checkpoint::save(dir, &vs, &cfg, &tok, &Default::default()).unwrap();
    cfg
}

const WORDS: [&str; 16] = [
    "apple", "river", "stone", "cloud", "green", "music", "paper", "light", "table", "horse", "water",
    "chair", "plant", "sugar", "metal", "tiger",
];

/// A small deterministic generator (xorshift) so the data needs no crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
    pub fn word(&mut self) -> &'static str {
        WORDS[self.below(WORDS.len())]
    }
}

/// Preference rows: a prompt about two words; both responses are three
/// random words with a marker word at a random place — `good` in the chosen
/// response, `bad` in the rejected one. Categories alternate `a`, `b`.
pub fn synthetic_rows(n: usize, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = Rng::new(seed);
    let response = |rng: &mut Rng, marker: &str| {
        let mut w: Vec<&str> = (0..3).map(|_| rng.word()).collect();
        w.insert(rng.below(4), marker);
        w.join(" ")
    };
    (0..n)
        .map(|i| {
            let prompt = format!("Say {} {}.", rng.word(), rng.word());
            let chosen = response(&mut rng, "good");
            let rejected = response(&mut rng, "bad");
            let category = if i % 2 == 0 { "a" } else { "b" };
            serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected, "category": category})
        })
        .collect()
}

pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
}

/// A reward config in `dir` (model `dir/init`, data `dir/pairs.jsonl`,
/// output `dir/out`), with `extra` TOML lines inside `[reward]`.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"[reward]
model = "init"
output_dir = "out"
max_seq_len = 96
device = "cpu"
seed = 1
{extra}

[reward.optim]
lr = 3e-3
warmup_steps = 10
weight_decay = 0.01

[reward.data]
seed = 0

[[reward.data.sources]]
name = "synthetic"
path = "pairs.jsonl"

[reward.data.held_out]
fraction = 0.2
"#
    );
    let p = dir.join("reward.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Loads and resolves a config written by [`write_config`].
pub fn load_config(path: &Path) -> reward::RewardConfig {
    let mut cfg = reward::RewardConfig::from_toml_file(path).unwrap();
    cfg.resolve_paths(path.parent().unwrap());
    cfg
}
