//! Shared helpers for the sft integration tests: the tiny transformers
//! fixture model and a small reverse-the-word chat data set.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The tiny transformers-made Gemma (MQA) every sft test trains.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/mqa")
}

/// Writes `n` reverse-the-word dialogues (8 words × 5 suffixes) as
/// `dir/train.jsonl`.
pub fn write_data(dir: &Path, n: usize) -> PathBuf {
    let words = ["gemma", "align", "model", "reward", "policy", "judge", "token", "batch"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let w = format!("{}{}", words[i % words.len()], i % 5);
            let r: String = w.chars().rev().collect();
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Reverse the word: {w}")},
                {"role": "assistant", "content": r}]})
            .to_string()
        })
        .collect();
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}
