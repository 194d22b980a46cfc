//! `judge`: the stage's `candidate` against its `baseline`, judged on
//! prompts (`judge::config::JudgeConfig`, the runner giving the two models
//! and the output directory).

use super::kind::{Ctx, Input, Output, Reference, StageKind};
use crate::recipe::load::{typed_at, typed_path, Loaded, StageSpec};
use anyhow::{anyhow, bail, Context, Result};
use judge::config::{JudgeConfig, FIELDS};
use std::path::Path;

pub struct Judge;

/// `align judge` options the runner sets from the stage itself.
const RUNNER_SET: [&str; 5] = ["candidate", "baseline", "out", "candidate_answers", "baseline_answers"];

use lm::stage_settings::did_you_mean;

/// A judge spec as the judge runs it: `lm:`/`reward:` naming a stage → that
/// stage's model, another directory → resolved against the recipe's
/// directory; other specs as they are.
pub fn resolve_judge_spec(l: &Loaded, spec: &str) -> String {
    match spec.split_once(':') {
        Some((kind @ ("lm" | "reward"), rest)) if l.stage(rest).is_some() => {
            format!("{kind}:{}", l.model_of(rest).display())
        }
        Some((kind @ ("lm" | "reward"), rest)) => format!("{kind}:{}", l.path(rest).display()),
        _ => spec.to_string(),
    }
}

/// A judge template as the judge loads it: a built-in name, or a file
/// resolved against the recipe's directory.
fn resolve_template(l: &Loaded, t: &str) -> String {
    if judge::template::BUILTIN.iter().any(|(n, _)| *n == t) {
        t.to_string()
    } else {
        l.path(t).display().to_string()
    }
}

/// Checks a judge spec (`at` names its place): the kind, and an oracle's
/// name. Stage names are checked with the other references, directories
/// with the other inputs.
pub fn check_judge_spec(at: &str, spec: &str) -> Result<()> {
    use judge::judges::JudgeSpec;
    if let JudgeSpec::Oracle(name) = JudgeSpec::parse(spec).map_err(|e| anyhow!("{at}: {e}"))? {
        judge::oracle::get_oracle(&name).map_err(|e| anyhow!("{at}: {e}"))?;
    }
    Ok(())
}

/// An `lm:`/`reward:` judge in a judge or sweep config: a reference to a
/// stage (or a model directory).
pub fn judge_reference(spec: &StageSpec) -> Vec<Reference> {
    let judge = spec.config.get("judge").and_then(|v| v.as_str()).and_then(|j| j.split_once(':'));
    match judge {
        Some((kind @ ("lm" | "reward"), rest)) => vec![Reference {
            field: "config.judge".into(),
            name: rest.to_string(),
            wants: if kind == "reward" { Output::RewardModel } else { Output::Model },
            may_be_dir: true,
        }],
        _ => vec![],
    }
}

/// The files and directories a judge or sweep config reads: prompts, a
/// template, a judge's model directory.
pub fn judge_inputs(ctx: &Ctx) -> Vec<Input> {
    let l = ctx.l;
    let text = |k: &str| ctx.spec().config.get(k).and_then(|v| v.as_str());
    let mut out = vec![];
    if let Some(p) = text("prompts").filter(|p| !p.starts_with("builtin:")) {
        out.push(Input::of_stage("config.prompts", l.path(p), "file"));
    }
    if let Some(t) = text("template") {
        if resolve_template(l, t) != t {
            out.push(Input::of_stage("config.template", l.path(t), "file"));
        }
    }
    if let Some((_, rest)) =
        text("judge").and_then(|j| j.split_once(':')).filter(|(k, _)| matches!(*k, "lm" | "reward"))
    {
        if l.stage(rest).is_none() {
            let what = "config.judge (names no stage, so a model directory)";
            out.push(Input::of_stage(what, l.path(rest), "directory"));
        }
    }
    out
}

/// A warning when the judge is the reward model the candidate was
/// optimised against (`judge = "reward:NAME"`, the candidate an RL stage
/// with `reward = "NAME"`): its win rate then measures how well RL learned
/// that model's taste, not quality.
fn own_reward_judge(ctx: &Ctx) -> Option<String> {
    let s = ctx.spec();
    let rm = s.config.get("judge")?.as_str()?.strip_prefix("reward:")?;
    let cand = s.candidate.as_deref()?;
    let (_, c) = ctx.l.stage(cand)?;
    (c.reward.as_deref() == Some(rm)).then(|| {
        format!(
            "{}: judge = \"reward:{rm}\" is the reward model {cand:?} was optimised against, so its \
             win rate measures how well {cand:?} learned that model's taste, not quality; judge with \
             an independent model (lm:DIR, http:URL) or an oracle (oracle:exact, …) on prompts with \
             references",
            ctx.config_at()
        )
    })
}

/// Types a judge stage's config table; a wrong value names its key:
/// `config.max_new_tokens: invalid value 'eight': expected usize`.
fn judge_config(t: &toml::Table, at: &str) -> Result<JudgeConfig> {
    typed_path(toml::Value::Table(t.clone())).map_err(|(p, msg)| {
        let key = p.split(['.', '[']).next().unwrap_or_default();
        match t.get(key) {
            Some(v) => {
                let value = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let why = msg.split_once(", expected ").map_or(msg.clone(), |(_, e)| format!("expected {e}"));
                anyhow!("{at}.{p}: invalid value '{value}': {why}")
            }
            None => anyhow!("{}: {msg}", crate::recipe::load::join_path(at, &p)),
        }
    })
}

/// Checks a judge stage's config before anything runs: known keys, the
/// required ones, the values typed as the run types them (an error names
/// its key), the judge spec, the oracle and the template.
fn check_judge(ctx: &Ctx) -> Result<()> {
    let (l, s) = (ctx.l, ctx.spec());
    let at = ctx.config_at();
    for k in s.config.keys() {
        if RUNNER_SET.contains(&k.as_str()) {
            bail!(
                "{at}.{k}: the runner sets this from the stage's `candidate` and `baseline` and its \
                 directory; remove it from the config"
            );
        }
        if !FIELDS.contains(&k.as_str()) {
            let hint = match did_you_mean(k, &FIELDS) {
                Some((c, true)) => format!(" (did you mean {c:?}? TRL's {k:?} is {c:?} here)"),
                Some((c, false)) => format!(" (did you mean {c:?}?)"),
                None => String::new(),
            };
            bail!("{at}: unknown key {k:?}{hint}; a judge stage's config takes {}", FIELDS.join(", "));
        }
    }
    for k in ["prompts", "judge"] {
        if !s.config.contains_key(k) {
            bail!(
                "{at}.{k} is missing: a judge stage needs `prompts` (a file, or builtin:eval?n=…&seed=…) \
                 and `judge` (oracle:NAME, http:URL, or lm:/reward: with a directory or an earlier \
                 stage's name)"
            );
        }
    }
    let cfg = judge_config(&s.config, &at)?;
    check_judge_spec(&format!("{at}.judge"), &cfg.judge)?;
    if let Some(o) = &cfg.oracle {
        judge::oracle::get_oracle(o).map_err(|e| anyhow!("{at}.oracle: {e}"))?;
    }
    if let Some(t) = &cfg.template {
        let path = resolve_template(l, t);
        if Path::new(&path).exists() || path == *t {
            judge::template::Template::load(&path).map_err(|e| anyhow!("{at}.template: {e}"))?;
        }
    }
    Ok(())
}

impl StageKind for Judge {
    fn name(&self) -> &'static str {
        "judge"
    }

    fn title(&self) -> &'static str {
        "Judge"
    }

    fn config_references(&self, spec: &StageSpec) -> Vec<Reference> {
        judge_reference(spec)
    }

    fn check(&self, ctx: &Ctx) -> Result<()> {
        let s = ctx.spec();
        ctx.needs("candidate and baseline", s.candidate.is_some() && s.baseline.is_some())?;
        check_judge(ctx)
    }

    fn inputs(&self, ctx: &Ctx) -> Vec<Input> {
        judge_inputs(ctx)
    }

    fn warnings(&self, ctx: &Ctx) -> Vec<String> {
        own_reward_judge(ctx).into_iter().collect()
    }

    fn run(&self, ctx: &Ctx, dir: &Path) -> Result<serde_json::Value> {
        let (l, s) = (ctx.l, ctx.spec());
        let cand = s.candidate.as_ref().context("judge stage needs candidate")?;
        let base = s.baseline.as_ref().context("judge stage needs baseline")?;
        let mut cfg: JudgeConfig = typed_at(ctx.config_with_defaults(), &ctx.config_at())?;
        cfg.prompts = datasets::read::resolve(&l.base, &cfg.prompts);
        cfg.template = cfg.template.map(|t| resolve_template(l, &t));
        cfg.judge = resolve_judge_spec(l, &cfg.judge);
        judge::cli_judge(cfg.into_args(l.model_of(cand), l.model_of(base), dir.to_path_buf()))?;
        let text =
            std::fs::read_to_string(dir.join("summary.json")).context("the judge wrote no summary.json")?;
        Ok(serde_json::from_str(&text)?)
    }

    fn figures(&self, s: &serde_json::Value) -> Vec<String> {
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
        let o = &s["overall"]["oracle_score"];
        if let (Some(c), Some(b)) = (o["candidate"].as_f64(), o["baseline"].as_f64()) {
            v.push(format!("oracle accuracy {:.1}% vs {:.1}% (baseline)", 100.0 * c, 100.0 * b));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lm::stage_settings::edit_distance;

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("max_new_tokns", "max_new_tokens"), 1);
        assert_eq!(edit_distance("oracle", "oracle"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn a_wrong_value_names_its_key_and_what_was_expected() {
        let t: toml::Table =
            toml::from_str("prompts = \"p\"\njudge = \"j\"\nmax_new_tokens = \"eight\"\n").unwrap();
        let e = judge_config(&t, "stages[6] \"judge\".config").unwrap_err().to_string();
        assert_eq!(e, "stages[6] \"judge\".config.max_new_tokens: invalid value 'eight': expected usize");
        let t: toml::Table = toml::from_str("prompts = \"p\"\njudge = \"j\"\nlm_mode = \"guess\"\n").unwrap();
        let e = judge_config(&t, "c").unwrap_err().to_string();
        assert!(e.starts_with("c.lm_mode: invalid value 'guess': expected"), "{e}");
    }
}
