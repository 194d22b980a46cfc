//! `reward`: a Bradley-Terry reward model trained from the input model on
//! the stage's preference data (`reward::RewardConfig`).

use super::kind::{path_value, placeholder, resolved_as, table_or, table_with, Ctx, Output, StageKind};
use anyhow::{Context, Result};
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
        let at = ctx.config_at();
        let t = table_or(
            &ctx.spec().config,
            vec![("model", placeholder()), ("output_dir", placeholder()), ("data", ctx.data()?)],
        );
        ctx.typed::<reward::RewardConfig>(t, &at)?.validate().with_context(|| at.clone())
    }

    fn resolved_config(&self, ctx: &Ctx) -> Option<toml::Table> {
        let t = table_or(
            &ctx.config_with_defaults(),
            vec![("model", placeholder()), ("output_dir", placeholder()), ("data", ctx.data().ok()?)],
        );
        resolved_as::<reward::RewardConfig>(ctx, t, &["model", "output_dir", "data"])
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
        let cfg: reward::RewardConfig = ctx.typed(t, &ctx.config_at())?;
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
