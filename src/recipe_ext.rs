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

/// One variant of a sweep.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// Settings of the trained stage to override: dotted keys (`"optim.lr"`).
    #[serde(default)]
    pub set: toml::Table,
    /// Mixture weights to override, by source name.
    #[serde(default)]
    pub weights: std::collections::BTreeMap<String, f64>,
}

/// A sweep stage's `config` table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// The SFT settings every variant starts from.
    #[serde(default)]
    pub base: toml::Table,
    pub variants: Vec<Variant>,
    /// Prompts the variants are judged on (against the stage's `baseline`).
    pub prompts: String,
    pub judge: String,
    #[serde(default)]
    pub oracle: Option<String>,
    #[serde(default = "default_judge_tokens")]
    pub max_new_tokens: usize,
}

fn default_judge_tokens() -> usize {
    32
}

pub fn check_sweep(l: &Loaded, s: &crate::recipe::Stage) -> Result<()> {
    let cfg: SweepConfig = toml::Value::Table(s.config.clone())
        .try_into()
        .map_err(|e: toml::de::Error| anyhow!("config: {e}"))?;
    if cfg.variants.is_empty() {
        bail!("config.variants is empty");
    }
    let mut names = std::collections::BTreeSet::new();
    let data = s.data.as_ref().and_then(|d| l.recipe.data.get(d));
    let sources: Vec<String> = data
        .and_then(|d| d.get("sources"))
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.get("name")?.as_str().map(String::from)).collect())
        .unwrap_or_default();
    for v in &cfg.variants {
        if !names.insert(v.name.as_str()) {
            bail!("config.variants: the name {:?} is used twice", v.name);
        }
        for w in v.weights.keys() {
            if !sources.contains(w) {
                bail!(
                    "variant {:?}: weights name source {w:?}, not in the stage's data (sources: {sources:?})",
                    v.name
                );
            }
        }
    }
    Ok(())
}

fn set_dotted(t: &mut toml::Table, key: &str, v: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = t;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("{key}: {p} is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), v);
    Ok(())
}

fn run_sweep(l: &Loaded, i: usize, dir: &Path) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    let cfg: SweepConfig = toml::Value::Table(s.config.clone())
        .try_into()
        .map_err(|e: toml::de::Error| anyhow!("stage {:?} config: {e}", s.name))?;
    let baseline = l.model_of(s.baseline.as_ref().context("sweep needs baseline")?);
    let mut board = vec![];
    for v in &cfg.variants {
        let vdir = dir.join("variants").join(&v.name);
        let done = vdir.join("judge/summary.json");
        if !done.exists() {
            // Train (resuming if interrupted) …
            let mut t = cfg.base.clone();
            for (k, val) in &v.set {
                set_dotted(&mut t, k, val.clone())?;
            }
            let mut data = crate::recipe::data_value(l, &s.data)?;
            if let Some(srcs) = data.get_mut("sources").and_then(|x| x.as_array_mut()) {
                for src in srcs.iter_mut().filter_map(|x| x.as_table_mut()) {
                    let name = src.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
                    if let Some(w) = v.weights.get(&name) {
                        src.insert("weight".into(), toml::Value::Float(*w));
                    }
                }
            }
            t.insert("model".into(), toml::Value::String(l.input_model(i).display().to_string()));
            t.insert("output_dir".into(), toml::Value::String(vdir.display().to_string()));
            t.insert("data".into(), data);
            t.entry("seed").or_insert(toml::Value::Integer(l.recipe.seed as i64));
            t.entry("device").or_insert(toml::Value::String(l.recipe.device.clone()));
            let sc: sft::SftConfig = toml::Value::Table(t)
                .try_into()
                .map_err(|e: toml::de::Error| anyhow!("sweep {:?} variant {:?}: {e}", s.name, v.name))?;
            eprintln!("-- variant {}", v.name);
            sft::run(&sc, &l.base)?;
            // … then judge it against the baseline.
            let mut argv: Vec<String> = vec!["judge".into()];
            let mut flags_t = toml::Table::new();
            flags_t.insert("candidate".into(), toml::Value::String(vdir.join("model").display().to_string()));
            flags_t.insert("baseline".into(), toml::Value::String(baseline.display().to_string()));
            flags_t.insert("out".into(), toml::Value::String(vdir.join("judge").display().to_string()));
            let prompts = datasets::read::resolve(&l.base, Path::new(&cfg.prompts));
            flags_t.insert("prompts".into(), toml::Value::String(prompts.display().to_string()));
            flags_t.insert("judge".into(), toml::Value::String(cfg.judge.clone()));
            flags_t.insert("max_new_tokens".into(), toml::Value::Integer(cfg.max_new_tokens as i64));
            flags_t.insert("device".into(), toml::Value::String(l.recipe.device.clone()));
            if let Some(o) = &cfg.oracle {
                flags_t.insert("oracle".into(), toml::Value::String(o.clone()));
            }
            argv.extend(flags(&flags_t)?);
            let cli = JudgeCli::try_parse_from(&argv).map_err(|e| anyhow!("sweep judge flags: {e}"))?;
            judge::cli_judge(cli.args)?;
        }
        let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&done)?)?;
        let o = &summary["overall"];
        board.push(serde_json::json!({
            "variant": v.name, "win_rate": o["win_rate"], "lo": o["lo"], "hi": o["hi"], "n": o["n"],
            "per_category": summary["per_category"].as_object().map(|m| m.iter().map(|(k, c)| (k.clone(), c["win_rate"].clone())).collect::<serde_json::Map<_, _>>()),
            "model": vdir.join("model"),
        }));
    }
    board.sort_by(|a, b| {
        b["win_rate"].as_f64().unwrap_or(0.0).total_cmp(&a["win_rate"].as_f64().unwrap_or(0.0))
    });
    let winner = board.first().context("no variants")?.clone();
    // The winner's checkpoint becomes the stage's output.
    let src = Path::new(winner["model"].as_str().context("winner model path")?).to_path_buf();
    lm::checkpoint::write_dir_atomic(&dir.join("model"), |tmp| {
        for e in std::fs::read_dir(&src)? {
            let e = e?;
            std::fs::copy(e.path(), tmp.join(e.file_name()))?;
        }
        Ok(())
    })?;
    let mut md = format!(
        "# Sweep {}\n\nEach variant judged against `{}` by `{}`.\n\n| rank | variant | win rate | 95% CI | n |\n|---|---|---|---|---|\n",
        s.name,
        baseline.display(),
        cfg.judge
    );
    let mut bars = vec![];
    for (r, b) in board.iter().enumerate() {
        let f = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
        md.push_str(&format!(
            "| {} | {} | {:.1}% | {:.1} – {:.1} | {} |\n",
            r + 1,
            b["variant"].as_str().unwrap_or("?"),
            100.0 * f("win_rate"),
            100.0 * f("lo"),
            100.0 * f("hi"),
            b["n"]
        ));
        bars.push(lm::plot::Bar {
            label: b["variant"].as_str().unwrap_or("?").to_string(),
            value: f("win_rate"),
            lo: f("lo"),
            hi: f("hi"),
        });
    }
    md.push_str(&format!(
        "\nWinner: **{}** (its model is `{}/model`).\n",
        winner["variant"].as_str().unwrap_or("?"),
        dir.display()
    ));
    lm::checkpoint::write_atomic(&dir.join("leaderboard.md"), md.as_bytes())?;
    lm::plot::bar_chart(
        &dir.join("leaderboard.png"),
        &format!("Sweep {}: win rate vs baseline", s.name),
        "win rate",
        &bars,
        Some(0.5),
    )?;
    let out = serde_json::json!({"winner": winner["variant"], "leaderboard": board});
    lm::checkpoint::write_atomic(
        &dir.join("leaderboard.json"),
        serde_json::to_string_pretty(&out)?.as_bytes(),
    )?;
    Ok(out)
}

pub fn run_stage(l: &Loaded, i: usize, dir: &Path) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    match s.kind {
        Kind::Sweep => run_sweep(l, i, dir),
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
            let o = &s["overall"]["oracle_score"];
            if let (Some(c), Some(b)) = (o["candidate"].as_f64(), o["baseline"].as_f64()) {
                v.push(format!("oracle accuracy {:.1}% vs {:.1}% (baseline)", 100.0 * c, 100.0 * b));
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
        Kind::Sweep => {
            let b = &s["leaderboard"];
            let best = b.as_array().and_then(|a| a.first()).cloned().unwrap_or_default();
            vec![format!(
                "winner {} ({:.1}% vs baseline, {} variants)",
                s["winner"].as_str().unwrap_or("?"),
                100.0 * best["win_rate"].as_f64().unwrap_or(f64::NAN),
                b.as_array().map_or(0, |a| a.len())
            )]
        }
        _ => vec![],
    }
}
