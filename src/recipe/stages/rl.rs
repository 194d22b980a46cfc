//! `rl`: KL-regularised REINFORCE (RLOO) from the input model on the
//! stage's prompts (`rl::RlConfig`), rewarded by the stage named in
//! `reward` or by the config's own `[config.reward]`.

use super::kind::{path_value, placeholder, Ctx, Input, Output, StageKind};
use anyhow::{Context, Result};
use std::path::Path;

pub struct Rl;

/// The runner's keys as placeholders, with an oracle standing in for the
/// reward a `reward` stage gives.
fn placeholders(ctx: &Ctx) -> Result<Vec<(&'static str, toml::Value)>> {
    let mut fill = ctx.data_stage_fill(placeholder(), placeholder())?;
    let mut oracle = toml::Table::new();
    oracle.insert("kind".into(), toml::Value::String("oracle".into()));
    fill.push(("reward", toml::Value::Table(oracle)));
    Ok(fill)
}

impl StageKind for Rl {
    fn name(&self) -> &'static str {
        "rl"
    }

    fn title(&self) -> &'static str {
        "Rl"
    }

    fn makes(&self) -> Option<Output> {
        Some(Output::Model)
    }

    fn check(&self, ctx: &Ctx) -> Result<()> {
        let s = ctx.spec();
        ctx.needs("data", s.data.is_some())?;
        ctx.needs(
            "reward (a reward stage) or config.reward",
            s.reward.is_some() || s.config.contains_key("reward"),
        )?;
        ctx.check_config::<rl::RlConfig>(placeholders(ctx)?)
    }

    fn inputs(&self, ctx: &Ctx) -> Vec<Input> {
        let config = &ctx.spec().config;
        let mut out = vec![];
        if let Some(r) = config.get("reward").and_then(|r| r.as_table()) {
            if let Some(p) = r.get("path").and_then(|p| p.as_str()) {
                out.push(Input::of_stage("config.reward.path", ctx.l.path(p), "directory"));
            }
        }
        if let Some(p) = config.get("reference").and_then(|v| v.as_str()) {
            out.push(Input::of_stage("config.reference", ctx.l.path(p), "directory"));
        }
        out
    }

    fn resolved_config(&self, ctx: &Ctx) -> Option<toml::Table> {
        // The reward a `reward` stage gives is the stage's (in [stage]).
        let runner: &[&str] = if ctx.spec().config.contains_key("reward") {
            &["model", "output_dir", "data"]
        } else {
            &["model", "output_dir", "data", "reward"]
        };
        ctx.resolved_config_as::<rl::RlConfig>(placeholders(ctx).ok()?, runner)
    }

    fn run(&self, ctx: &Ctx, dir: &Path) -> Result<serde_json::Value> {
        let (l, s) = (ctx.l, ctx.spec());
        let mut t = s.config.clone();
        t.insert("model".into(), path_value(&ctx.input_model));
        t.insert("output_dir".into(), path_value(dir));
        t.insert("data".into(), ctx.data()?);
        t.entry("seed").or_insert(toml::Value::Integer(l.recipe.seed as i64));
        t.entry("device").or_insert(toml::Value::String(l.recipe.device.clone()));
        // A reward model or reference named in the config is read from the
        // recipe's directory, as the missing-input check looked for it.
        if let Some(r) = t.get_mut("reward").and_then(|r| r.as_table_mut()) {
            if let Some(p) = r.get("path").and_then(|p| p.as_str()).map(|p| l.path(p)) {
                r.insert("path".into(), path_value(&p));
            }
        }
        if let Some(p) = t.get("reference").and_then(|p| p.as_str()).map(|p| l.path(p)) {
            t.insert("reference".into(), path_value(&p));
        }
        if !t.contains_key("reward") {
            let rm = s
                .reward
                .as_ref()
                .context("an rl stage needs `reward` (a reward stage) or a [config.reward] table")?;
            let mut r = toml::Table::new();
            r.insert("kind".into(), toml::Value::String("model".into()));
            r.insert("path".into(), path_value(&l.model_of(rm)));
            t.insert("reward".into(), toml::Value::Table(r));
        }
        let cfg: rl::RlConfig = ctx.typed(t, &ctx.config_at())?;
        Ok(serde_json::to_value(rl::run(&cfg, &l.base)?)?)
    }

    fn figures(&self, s: &serde_json::Value) -> Vec<String> {
        let mean = |k: &str| {
            let v: Vec<f64> =
                s[k].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let mut v = vec![
            format!("steps {}", s["steps"]),
            format!("reward {:.3} → {:.3}", mean("first_rewards"), mean("last_rewards")),
            format!("final KL {:.4}", s["final_kl"].as_f64().unwrap_or(f64::NAN)),
        ];
        if let Some(acc) =
            s["eval"].as_array().and_then(|e| e.last()).and_then(|e| e["oracle_accuracy"].as_f64())
        {
            v.push(format!("held-out oracle accuracy {:.1}%", 100.0 * acc));
        }
        v
    }
}
