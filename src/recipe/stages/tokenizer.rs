//! `tokenizer`: the recipe's tokenizer file, or a byte-level BPE trained on
//! the recipe's `[tokenizer]` text.

use super::kind::{spec_file, text_docs, tokenizer_file, Ctx, Input, StageKind};
use anyhow::Result;
use std::path::Path;

pub struct Tokenizer;

impl StageKind for Tokenizer {
    fn name(&self) -> &'static str {
        "tokenizer"
    }

    fn title(&self) -> &'static str {
        "Tokenizer"
    }

    fn check(&self, _ctx: &Ctx) -> Result<()> {
        Ok(())
    }

    fn inputs(&self, ctx: &Ctx) -> Vec<Input> {
        let l = ctx.l;
        let tok = &l.recipe.tokenizer;
        if tok.file.is_some() {
            return tokenizer_file(l);
        }
        let mut out = vec![];
        for (k, spec) in tok.train_on.iter().enumerate() {
            if let Some(p) = spec_file(l, spec) {
                let what = format!("tokenizer.train_on[{k}]");
                out.push(Input { what, path: p, noun: "file", recipe_wide: true });
            }
        }
        out
    }

    fn run(&self, ctx: &Ctx, _dir: &Path) -> Result<serde_json::Value> {
        let l = ctx.l;
        let spec = &l.recipe.tokenizer;
        let out = l.tokenizer_path();
        if spec.file.is_none() {
            let docs = text_docs(l, &spec.train_on)?;
            let tok = lm::Tokenizer::train_bpe(docs.iter(), spec.vocab_size)?;
            tok.save(&out)?;
        }
        Ok(serde_json::json!({"tokenizer": out, "vocab": lm::Tokenizer::from_file(&out)?.vocab_size()}))
    }

    fn figures(&self, s: &serde_json::Value) -> Vec<String> {
        vec![format!("vocab {}", s["vocab"])]
    }
}
