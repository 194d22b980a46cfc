//! `reward`: a Bradley-Terry reward model trained from the input model on
//! the stage's preference data (`reward::RewardConfig`).

use super::kind::{path_value, placeholder, Ctx, Output, StageKind};
use anyhow::Result;
use std::path::Path;

pub struct Reward;

impl StageKind for Reward {
    fn name(&self) -> &'static str {
        "reward"
    }

    fn title(&self) -> &'static str {
        "Reward"
    }

    fn makes(&self) -> Option<Output> {
        Some(Output::RewardModel)
    }

    fn check(&self, ctx: &Ctx) -> Result<()> {
        ctx.needs("data", ctx.spec().data.is_some())?;
        ctx.check_config::<reward::RewardConfig>(ctx.data_stage_fill(placeholder(), placeholder())?)
    }

    fn resolved_config(&self, ctx: &Ctx) -> Option<toml::Table> {
        let fill = ctx.data_stage_fill(placeholder(), placeholder()).ok()?;
        ctx.resolved_config_as::<reward::RewardConfig>(fill, &["model", "output_dir", "data"])
    }

    fn run(&self, ctx: &Ctx, dir: &Path) -> Result<serde_json::Value> {
        let fill = ctx.data_stage_fill(path_value(&ctx.input_model), path_value(dir))?;
        let cfg: reward::RewardConfig = ctx.run_config(&fill)?;
        Ok(serde_json::to_value(reward::run(&cfg, &ctx.l.base)?)?)
    }

    fn figures(&self, s: &serde_json::Value) -> Vec<String> {
        let e = &s["eval"];
        vec![
            format!("steps {}", s["steps"]),
            format!("held-out accuracy {:.3}", e["accuracy"].as_f64().unwrap_or(f64::NAN)),
            format!("mean margin {:.3}", e["mean_margin"].as_f64().unwrap_or(f64::NAN)),
        ]
    }
}
