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
        if let Some(r) = config.get("reward") {
            let mut paths = vec![];
            reward_paths(r, "config.reward", &mut paths);
            out.extend(paths.into_iter().map(|(at, p)| Input::of_stage(at, ctx.l.path(p), "directory")));
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
        t.entry("seed").or_insert(toml::Value::Integer(ctx.seed() as i64));
        t.entry("device").or_insert(toml::Value::String(l.recipe.device.clone()));
        // A reward model or reference named in the config is read from the
        // recipe's directory, as the missing-input check looked for it.
        if let Some(r) = t.get_mut("reward") {
            resolve_reward_paths(r, &|p| path_value(&l.path(p)));
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

/// The reward-model directories a `[config.reward]` table names, with where:
/// its `path`, and those of the rewards of a `sum` (`rewards = [...]`).
fn reward_paths(r: &toml::Value, at: &str, out: &mut Vec<(String, String)>) {
    if let Some(p) = r.get("path").and_then(|p| p.as_str()) {
        out.push((format!("{at}.path"), p.to_string()));
    }
    if let Some(rs) = r.get("rewards").and_then(|v| v.as_array()) {
        for (i, r) in rs.iter().enumerate() {
            reward_paths(r, &format!("{at}.rewards[{i}]"), out);
        }
    }
}

/// Replaces every reward-model `path` of a `[config.reward]` table (a `sum`'s
/// included) with `resolve(path)`.
fn resolve_reward_paths(r: &mut toml::Value, resolve: &dyn Fn(&str) -> toml::Value) {
    if let Some(t) = r.as_table_mut() {
        if let Some(p) = t.get("path").and_then(|p| p.as_str()).map(resolve) {
            t.insert("path".into(), p);
        }
        if let Some(rs) = t.get_mut("rewards").and_then(|v| v.as_array_mut()) {
            rs.iter_mut().for_each(|r| resolve_reward_paths(r, resolve));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sums_reward_model_paths_are_inputs_and_are_resolved() {
        let mut r: toml::Value = toml::from_str(
            r#"
            kind = "sum"
            rewards = [{ kind = "model", path = "rm" }, { kind = "oracle" },
                       { kind = "sum", rewards = [{ kind = "model", path = "rm2" }] }]
            "#,
        )
        .unwrap();
        let mut paths = vec![];
        reward_paths(&r, "config.reward", &mut paths);
        assert_eq!(
            paths,
            vec![
                ("config.reward.rewards[0].path".to_string(), "rm".to_string()),
                ("config.reward.rewards[2].rewards[0].path".to_string(), "rm2".to_string()),
            ]
        );
        resolve_reward_paths(&mut r, &|p| toml::Value::String(format!("/recipes/{p}")));
        assert_eq!(r["rewards"][0]["path"].as_str(), Some("/recipes/rm"));
        assert_eq!(r["rewards"][2]["rewards"][0]["path"].as_str(), Some("/recipes/rm2"));
        assert!(r["rewards"][1].get("path").is_none());
    }
}
