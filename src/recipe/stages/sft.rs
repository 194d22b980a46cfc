//! `sft`: supervised fine-tuning of the input model on the stage's data
//! (`sft::SftConfig`, the runner filling in `model`, `output_dir`, `data`).

use super::kind::{path_value, placeholder, resolved_as, table_or, table_with, Ctx, Output, StageKind};
use anyhow::{Context, Result};
use std::path::Path;

pub struct Sft;

/// Key figures of an SFT or pretraining summary.
pub fn lm_figures(s: &serde_json::Value) -> Vec<String> {
    let f = |k: &str| s.get(k).and_then(|v| v.as_f64()).map(|v| format!("{v:.4}"));
    [
        ("steps", s.get("steps").map(|v| v.to_string())),
        ("final loss", f("final_loss")),
        ("eval loss", f("eval_loss")),
        ("eval ppl", f("eval_ppl")),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k} {v}")))
    .collect()
}

impl StageKind for Sft {
    fn name(&self) -> &'static str {
        "sft"
    }

    fn title(&self) -> &'static str {
        "Sft"
    }

    fn makes(&self) -> Option<Output> {
        Some(Output::Model)
    }

    fn check(&self, ctx: &Ctx) -> Result<()> {
        ctx.needs("data", ctx.spec().data.is_some())?;
        let at = ctx.config_at();
        let t = table_or(
            &ctx.spec().config,
            vec![("model", placeholder()), ("output_dir", placeholder()), ("data", ctx.data()?)],
        );
        ctx.typed::<sft::SftConfig>(t, &at)?.validate().with_context(|| at.clone())
    }

    fn resolved_config(&self, ctx: &Ctx) -> Option<toml::Table> {
        let t = table_or(
            &ctx.config_with_defaults(),
            vec![("model", placeholder()), ("output_dir", placeholder()), ("data", ctx.data().ok()?)],
        );
        resolved_as::<sft::SftConfig>(ctx, t, &["model", "output_dir", "data"])
    }

    fn run(&self, ctx: &Ctx, dir: &Path) -> Result<serde_json::Value> {
        let t = table_with(
            &ctx.config_with_defaults(),
            &[
                ("model", path_value(&ctx.input_model)),
                ("output_dir", path_value(dir)),
                ("data", ctx.data()?),
            ],
        );
        let cfg: sft::SftConfig = ctx.typed(t, &ctx.config_at())?;
        Ok(serde_json::to_value(sft::run(&cfg, &ctx.l.base)?)?)
    }

    fn figures(&self, s: &serde_json::Value) -> Vec<String> {
        lm_figures(s)
    }
}
