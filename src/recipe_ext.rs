//! The recipe runner's glue for the RL and judge stages.

use crate::recipe::{Kind, Loaded};
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use std::path::Path;

#[derive(Parser)]
struct JudgeCli {
    #[command(flatten)]
    args: judge::JudgeArgs,
}

/// Turns a config table into command-line flags (`max_new_tokens = 8` →
/// `--max-new-tokens 8`; `true` → a bare flag).
fn flags(t: &toml::Table) -> Result<Vec<String>> {
    let mut out = vec![];
    for (k, v) in t {
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => out.extend([flag, s.clone()]),
            toml::Value::Integer(i) => out.extend([flag, i.to_string()]),
            toml::Value::Float(f) => out.extend([flag, f.to_string()]),
            other => bail!("config key {k}: {other} is not a flag value"),
        }
    }
    Ok(out)
}

fn run_judge(l: &Loaded, i: usize, dir: &Path) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    let mut t = s.config.clone();
    let cand = s.candidate.as_ref().context("judge stage needs candidate")?;
    let base = s.baseline.as_ref().context("judge stage needs baseline")?;
    t.insert("candidate".into(), toml::Value::String(l.model_of(cand).display().to_string()));
    t.insert("baseline".into(), toml::Value::String(l.model_of(base).display().to_string()));
    t.insert("out".into(), toml::Value::String(dir.display().to_string()));
    t.entry("device").or_insert(toml::Value::String(l.recipe.device.clone()));
    t.entry("seed").or_insert(toml::Value::Integer(l.recipe.seed as i64));
    if let Some(toml::Value::String(p)) = t.get("prompts").cloned() {
        let r = datasets::read::resolve(&l.base, Path::new(&p));
        t.insert("prompts".into(), toml::Value::String(r.display().to_string()));
    }
    if let Some(toml::Value::String(j)) = t.get("judge").cloned() {
        // lm:/reward: judges may name an earlier stage: `reward:rm`.
        if let Some((kind, name)) = j.split_once(':') {
            if matches!(kind, "lm" | "reward") && l.recipe.stages.iter().any(|x| x.name == name) {
                t.insert(
                    "judge".into(),
                    toml::Value::String(format!("{kind}:{}", l.model_of(name).display())),
                );
            }
        }
    }
    let mut argv = vec!["judge".to_string()];
    argv.extend(flags(&t)?);
    let cli = JudgeCli::try_parse_from(&argv).map_err(|e| anyhow!("stage {:?} config: {e}", s.name))?;
    judge::cli_judge(cli.args)?;
    let text =
        std::fs::read_to_string(dir.join("summary.json")).context("the judge wrote no summary.json")?;
    Ok(serde_json::from_str(&text)?)
}

fn run_rl(l: &Loaded, i: usize, dir: &Path) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    let mut t = s.config.clone();
    t.insert("model".into(), toml::Value::String(l.input_model(i).display().to_string()));
    t.insert("output_dir".into(), toml::Value::String(dir.display().to_string()));
    t.insert("data".into(), crate::recipe::data_value(l, &s.data)?);
    t.entry("seed").or_insert(toml::Value::Integer(l.recipe.seed as i64));
    t.entry("device").or_insert(toml::Value::String(l.recipe.device.clone()));
    if !t.contains_key("reward") {
        let rm = s
            .reward
            .as_ref()
            .context("an rl stage needs `reward` (a reward stage) or a [config.reward] table")?;
        let mut r = toml::Table::new();
        r.insert("kind".into(), toml::Value::String("model".into()));
        r.insert("path".into(), toml::Value::String(l.model_of(rm).display().to_string()));
        t.insert("reward".into(), toml::Value::Table(r));
    }
    let cfg: rl::RlConfig = toml::Value::Table(t)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow!("stage {:?} config: {e}", s.name))?;
    Ok(serde_json::to_value(rl::run(&cfg, &l.base)?)?)
}

pub fn run_stage(l: &Loaded, i: usize, dir: &Path) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    match s.kind {
        Kind::Judge => run_judge(l, i, dir),
        Kind::Rl => run_rl(l, i, dir),
        _ => bail!("stage {:?}: {:?} stages are not wired into the runner yet", s.name, s.kind),
    }
}

pub fn key_figures(kind: Kind, s: &serde_json::Value) -> Vec<String> {
    match kind {
        Kind::Judge => {
            let w = &s["overall"];
            let mut v = vec![format!(
                "win rate {:.1}% [{:.1}, {:.1}] over {} prompts",
                100.0 * w["win_rate"].as_f64().unwrap_or(f64::NAN),
                100.0 * w["lo"].as_f64().unwrap_or(f64::NAN),
                100.0 * w["hi"].as_f64().unwrap_or(f64::NAN),
                w["n"]
            )];
            if let Some(a) = s["overall"]["oracle_agreement"].as_f64() {
                v.push(format!("agreement with the oracle {:.1}%", 100.0 * a));
            }
            v
        }
        Kind::Rl => {
            let mean = |k: &str| {
                let v: Vec<f64> = s[k]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                    .unwrap_or_default();
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
        _ => vec![],
    }
}
