//! The memorization test of the Gemma report: for sampled documents, the
//! prompt is `<bos>` and the document's first `prompt_tokens` tokens, and
//! `continuation_tokens` greedy tokens are compared with the document's next
//! ones. A document is
//! memorized exactly when every token matches, and approximately when the
//! token edit distance is at most 10% of the continuation (Gemma Team,
//! "Gemma: Open Models Based on Gemini Research and Technology", 2024;
//! after Anil et al., 2023 and Ippolito et al., 2022).

use anyhow::{bail, Context, Result};
use clap::Args;
use lm::checkpoint;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// `align eval memorization`.
#[derive(Args, Clone, Debug)]
pub struct MemArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Documents: a text file (one per line) or JSONL with a `text` field.
    #[arg(long)]
    pub data: PathBuf,
    /// Documents sampled (those long enough).
    #[arg(long, default_value_t = 100)]
    pub docs: usize,
    #[arg(long, default_value_t = 50)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 50)]
    pub continuation_tokens: usize,
    /// Largest edit distance, as a fraction of the continuation, that counts
    /// as approximate memorization.
    #[arg(long, default_value_t = 0.1)]
    pub approx_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Write the report (JSON) here as well as to stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One memorized document.
#[derive(Debug, Clone, Serialize)]
pub struct Match {
    pub doc: usize,
    pub distance: usize,
    pub exact: bool,
    pub continuation: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemReport {
    pub documents: usize,
    pub too_short: usize,
    pub exact: usize,
    pub approximate: usize,
    pub exact_rate: f64,
    pub approximate_rate: f64,
    pub matches: Vec<Match>,
}

/// Token-level Levenshtein distance.
pub fn edit_distance(a: &[i64], b: &[i64]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j + 1] + 1).min(cur[j] + 1).min(prev[j] + usize::from(x != y));
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn read_docs(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut docs = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let t = v["text"].as_str().with_context(|| {
                format!("{}:{}: field \"text\" missing or not a string", path.display(), i + 1)
            })?;
            docs.push(t.to_string());
        } else {
            docs.push(line.to_string());
        }
    }
    Ok(docs)
}

/// The prompt and the true continuation of one document, as the Gemma report
/// defines them: the prompt is `<bos>` and the document's first
/// `prompt_tokens` tokens, the continuation its next `continuation_tokens`.
/// `doc` holds the document's tokens (no `<bos>`); None when it is shorter
/// than both together.
pub fn split_document(
    bos: i64,
    doc: &[i64],
    prompt_tokens: usize,
    continuation_tokens: usize,
) -> Option<(Vec<i64>, Vec<i64>)> {
    let need = prompt_tokens + continuation_tokens;
    if doc.len() < need {
        return None;
    }
    let mut prompt = Vec::with_capacity(prompt_tokens + 1);
    prompt.push(bos);
    prompt.extend_from_slice(&doc[..prompt_tokens]);
    Some((prompt, doc[prompt_tokens..need].to_vec()))
}

/// Runs the test.
pub fn memorization(a: &MemArgs) -> Result<MemReport> {
    if a.prompt_tokens == 0 || a.continuation_tokens == 0 || a.docs == 0 {
        bail!("--docs, --prompt-tokens and --continuation-tokens must be at least 1");
    }
    let device = lm::device::parse_device(&a.device)?;
    let kind = lm::device::parse_dtype(&a.dtype)?;
    let m = checkpoint::load_causal_lm(&a.model, device, kind)?;
    let docs = read_docs(&a.data)?;
    let mut tokens = Vec::with_capacity(docs.len());
    for d in &docs {
        // As SFT's pretraining mode encodes a document: its text is text.
        tokens.push(m.tokenizer.encode_content(d)?);
    }
    let r = memorization_of(&m.model, &m.tokenizer, &tokens, a)?;
    if r.documents == 0 {
        bail!(
            "no document in {} has {} tokens (prompt + continuation)",
            a.data.display(),
            a.prompt_tokens + a.continuation_tokens
        );
    }
    Ok(r)
}

/// The test over tokenized documents (`docs[i]`: document `i`'s tokens,
/// without `<bos>`): samples `a.docs` of those long enough (from `a.seed`),
/// prompts with each one's [`split_document`] prompt and compares
/// `a.continuation_tokens` greedy tokens with its true continuation.
pub fn memorization_of(
    model: &lm::Gemma,
    tok: &lm::Tokenizer,
    docs: &[Vec<i64>],
    a: &MemArgs,
) -> Result<MemReport> {
    if a.prompt_tokens == 0 || a.continuation_tokens == 0 || a.docs == 0 {
        bail!("--docs, --prompt-tokens and --continuation-tokens must be at least 1");
    }
    let mut long = vec![];
    let mut too_short = 0;
    for (i, d) in docs.iter().enumerate() {
        match split_document(tok.special.bos, d, a.prompt_tokens, a.continuation_tokens) {
            Some((prompt, truth)) => long.push((i, prompt, truth)),
            None => too_short += 1,
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    long.shuffle(&mut rng);
    long.truncate(a.docs);
    let cfg = lm::GenerationConfig {
        max_new_tokens: a.continuation_tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: a.seed,
        eos_id: -1, // exactly `continuation_tokens` tokens, as the test defines
        end_of_turn_id: None,
        pad_id: tok.special.pad,
    };
    let limit = (a.approx_fraction * a.continuation_tokens as f64).floor() as usize;
    let (mut exact, mut approx, mut matches) = (0, 0, vec![]);
    let wt = lm::InferenceWeights::for_model(model); // once for all chunks
    for chunk in long.chunks(a.batch.max(1)) {
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|(_, prompt, _)| prompt.clone()).collect();
        let gens = lm::generate::generate_using(model, wt.as_ref(), &prompts, &cfg, |_, _| true)?;
        for ((doc, _, truth), g) in chunk.iter().zip(gens) {
            let d = edit_distance(&g.tokens, truth);
            let is_exact = d == 0;
            exact += usize::from(is_exact);
            if d <= limit {
                approx += 1;
                matches.push(Match {
                    doc: *doc,
                    distance: d,
                    exact: is_exact,
                    continuation: tok.decode(&g.tokens, false)?,
                });
            }
        }
    }
    let n = long.len();
    let rate = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    Ok(MemReport {
        documents: n,
        too_short,
        exact,
        approximate: approx,
        exact_rate: rate(exact),
        approximate_rate: rate(approx),
        matches,
    })
}

/// The CLI entry point: prints the report as JSON (and writes `--out`).
pub fn cli_memorization(a: MemArgs) -> Result<()> {
    let r = memorization(&a)?;
    let text = serde_json::to_string_pretty(&r)?;
    if let Some(p) = &a.out {
        lm::fsio::write_atomic(p, text.as_bytes())?;
    }
    println!("{text}");
    eprintln!(
        "memorization: {} documents, exact {:.1}% ({}), approximate {:.1}% ({}), {} too short",
        r.documents,
        100.0 * r.exact_rate,
        r.exact,
        100.0 * r.approximate_rate,
        r.approximate,
        r.too_short
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(edit_distance(&[1, 2, 3], &[1, 9, 3]), 1);
        assert_eq!(edit_distance(&[1, 2, 3], &[1, 3]), 1);
        assert_eq!(edit_distance(&[], &[4, 5]), 2);
        assert_eq!(edit_distance(&[1, 2, 3, 4], &[2, 3, 4, 5]), 2);
    }
}
