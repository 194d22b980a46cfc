//! `sft`: supervised fine-tuning of the input model on the stage's data
//! (`sft::SftConfig`, the runner filling in `model`, `output_dir`, `data`).

use super::kind::{path_value, placeholder, Ctx, Output, StageKind};
use anyhow::Result;
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
        ctx.check_config::<sft::SftConfig>(ctx.data_stage_fill(placeholder(), placeholder())?)
    }

    fn resolved_config(&self, ctx: &Ctx) -> Option<toml::Table> {
        let fill = ctx.data_stage_fill(placeholder(), placeholder()).ok()?;
        ctx.resolved_config_as::<sft::SftConfig>(fill, &["model", "output_dir", "data"])
    }

    fn run(&self, ctx: &Ctx, dir: &Path) -> Result<serde_json::Value> {
        let fill = ctx.data_stage_fill(path_value(&ctx.input_model), path_value(dir))?;
        let cfg: sft::SftConfig = ctx.run_config(&fill)?;
        Ok(serde_json::to_value(sft::run(&cfg, &ctx.l.base)?)?)
    }

    fn figures(&self, s: &serde_json::Value) -> Vec<String> {
        lm_figures(s)
    }
}
