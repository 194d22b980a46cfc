//! `pretrain`: causal-LM training on plain text (`sft::SftConfig` in
//! pretrain mode), from the base model (a preset initialised here, or a
//! checkpoint) or the stage named in `from`.

use super::kind::{path_value, placeholder, text_docs, tokenizer_file};
use super::kind::{Ctx, Input, Output, StageKind};
use anyhow::{Context, Result};
use lm::checkpoint;
use std::path::Path;

pub struct Pretrain;

/// The runner's keys: the model to train, the output directory, pretrain
/// mode and the one text file the stage writes.
fn fill(model: toml::Value, output_dir: toml::Value, text: toml::Value) -> Vec<(&'static str, toml::Value)> {
    vec![
        ("model", model),
        ("output_dir", output_dir),
        ("mode", toml::Value::String("pretrain".into())),
        ("text_files", toml::Value::Array(vec![text])),
    ]
}

impl StageKind for Pretrain {
    fn name(&self) -> &'static str {
        "pretrain"
    }

    fn title(&self) -> &'static str {
        "Pretrain"
    }

    fn makes(&self) -> Option<Output> {
        Some(Output::Model)
    }

    fn check(&self, ctx: &Ctx) -> Result<()> {
        ctx.needs("data", ctx.spec().data.is_some())?;
        ctx.check_config::<sft::SftConfig>(fill(placeholder(), placeholder(), placeholder()))
    }

    fn inputs(&self, ctx: &Ctx) -> Vec<Input> {
        tokenizer_file(ctx.l)
    }

    fn resolved_config(&self, ctx: &Ctx) -> Option<toml::Table> {
        let fill = fill(placeholder(), placeholder(), placeholder());
        ctx.resolved_config_as::<sft::SftConfig>(fill, &["model", "output_dir", "text_files"])
    }

    fn run(&self, ctx: &Ctx, dir: &Path) -> Result<serde_json::Value> {
        let (l, s) = (ctx.l, ctx.spec());
        // Initialise the base model when the recipe names a preset.
        // Repeated over seeds, each seed initialises its own.
        let base_model = match (l.seed, &s.seeds) {
            (Some(seed), Some(_)) => l.out_dir().join(format!("base-model-seed-{seed}")),
            _ => l.out_dir().join("base-model"),
        };
        let init = match (&l.recipe.base_model.preset, &l.recipe.base_model.checkpoint) {
            (Some(p), _) if s.from.is_none() => {
                let tok = lm::Tokenizer::from_file(&l.tokenizer_path())?;
                let cfg = lm::GemmaConfig::preset_for_tokenizer(p, tok.vocab_size())?;
                let vs = tch::nn::VarStore::new(tch::Device::Cpu);
                let _m = lm::Gemma::new(&vs.root(), &cfg)?;
                lm::init::init_seeded(&vs, cfg.initializer_range, ctx.seed())?;
                checkpoint::save(&base_model, &vs, &cfg, &tok, &Default::default())?;
                base_model
            }
            (_, Some(c)) if s.from.is_none() => l.path(c),
            _ => ctx.input_model.clone(),
        };
        let d = &l.recipe.data[s.data.as_ref().context("no data")?];
        let specs: Vec<String> = d
            .get("text")
            .and_then(|v| v.as_array())
            .context("pretrain data needs `text = [...]`")?
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        let text = dir.join("pretrain.txt");
        lm::fsio::write_atomic(&text, text_docs(l, &specs)?.join("\n").as_bytes())?;
        let cfg: sft::SftConfig =
            ctx.run_config(&fill(path_value(&init), path_value(dir), path_value(&text)))?;
        Ok(serde_json::to_value(sft::run(&cfg, &l.base)?)?)
    }

    fn figures(&self, s: &serde_json::Value) -> Vec<String> {
        super::sft::lm_figures(s)
    }
}
