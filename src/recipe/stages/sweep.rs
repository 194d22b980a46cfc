//! `sweep`: variants of an SFT configuration (mixture weights and/or
//! settings, listed or as a grid), each trained briefly from the input model
//! and judged against the stage's `baseline`; the winner's model is the
//! stage's output.

use super::judge::{check_judge_spec, judge_inputs, judge_reference, resolve_judge_spec};
use super::kind::{Ctx, Input, Output, Reference, StageKind};
use crate::recipe::load::{place, typed_at, Loaded, StageSpec};
use anyhow::{anyhow, bail, Context, Result};
use judge::config::JudgeConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub struct Sweep;

/// One variant of a sweep.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// Settings of the trained stage to override: dotted keys (`"optim.lr"`).
    #[serde(default)]
    pub set: toml::Table,
    /// Mixture weights to override, by source name.
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
}

/// A sweep stage's `config` table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// The SFT settings every variant starts from.
    #[serde(default)]
    pub base: toml::Table,
    /// Variants listed one by one.
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// Variants as a grid: a dotted setting (`"optim.lr"`) or a mixture
    /// weight (`"weights.NAME"`, also written `"mixture.weights.NAME"`) →
    /// its values; every combination is a variant, named after its values
    /// (`lr=1e-3,numbers=2`). May be given beside `variants`.
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<toml::Value>>,
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

impl SweepConfig {
    /// The listed variants, then the grid's, names checked (unique, usable
    /// as directory names).
    pub fn all_variants(&self) -> Result<Vec<Variant>> {
        let mut out = self.variants.clone();
        out.extend(expand_grid(&self.grid)?);
        if out.is_empty() {
            bail!("no variants: give `variants = [{{ name = …, set = {{…}} }}, …]` or a [grid] of values");
        }
        let mut names = BTreeSet::new();
        for v in &out {
            if v.name.is_empty() || v.name.contains(['/', '\\']) || v.name == "." || v.name == ".." {
                bail!("variant name {:?} cannot be a directory name", v.name);
            }
            if !names.insert(v.name.as_str()) {
                bail!("the variant name {:?} is used twice", v.name);
            }
        }
        Ok(out)
    }
}

/// The source a grid key weights, if it is a mixture weight:
/// `weights.x` or `mixture.weights.x` → `x`.
fn weight_key(k: &str) -> Option<&str> {
    k.strip_prefix("mixture.weights.").or_else(|| k.strip_prefix("weights."))
}

/// A grid value as it appears in a variant's name: `0.001` → `1e-3`,
/// `2.0` → `2`, strings as they are.
fn value_label(v: &toml::Value) -> String {
    let label = match v {
        toml::Value::Float(f) if *f != 0.0 && (f.abs() < 1e-2 || f.abs() >= 1e5) => format!("{f:e}"),
        toml::Value::Float(f) => format!("{f}"),
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    label.replace(['/', '\\'], "_")
}

/// The variants of a grid: the cartesian product of its values, keys in
/// order (the last key varies fastest), each named `key=value,…` with the
/// last part of each key (the whole key where two last parts clash).
pub fn expand_grid(grid: &BTreeMap<String, Vec<toml::Value>>) -> Result<Vec<Variant>> {
    if grid.is_empty() {
        return Ok(vec![]);
    }
    let last = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    let labels: Vec<String> = grid
        .keys()
        .map(|k| if grid.keys().filter(|o| last(o) == last(k)).count() > 1 { k.clone() } else { last(k) })
        .collect();
    let mut combos: Vec<Vec<(usize, &toml::Value)>> = vec![vec![]];
    for (ki, (k, values)) in grid.iter().enumerate() {
        if values.is_empty() {
            bail!("grid.{k:?}: no values");
        }
        if k.is_empty() || k.split('.').any(str::is_empty) || weight_key(k) == Some("") {
            bail!("grid.{k:?}: not a dotted setting (`optim.lr`) or a mixture weight (`weights.NAME`)");
        }
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((ki, v));
                    c
                })
            })
            .collect();
    }
    let keys: Vec<&String> = grid.keys().collect();
    combos
        .into_iter()
        .map(|combo| {
            let mut v = Variant { name: String::new(), set: toml::Table::new(), weights: BTreeMap::new() };
            let mut parts = vec![];
            for (ki, val) in combo {
                let k = keys[ki];
                parts.push(format!("{}={}", labels[ki], value_label(val)));
                match weight_key(k) {
                    Some(src) => {
                        let w = match val {
                            toml::Value::Integer(i) => *i as f64,
                            toml::Value::Float(f) => *f,
                            other => bail!("grid.{k:?}: a mixture weight must be a number, not {other}"),
                        };
                        v.weights.insert(src.to_string(), w);
                    }
                    None => {
                        v.set.insert(k.clone(), val.clone());
                    }
                }
            }
            v.name = parts.join(",");
            Ok(v)
        })
        .collect()
}

/// The sweep config of stage `i`, its errors naming the key path.
fn sweep_config(l: &Loaded, i: usize) -> Result<SweepConfig> {
    let s = &l.recipe.stages[i];
    typed_at(s.config.clone(), &format!("{}.config", place(i, &s.name)))
}

/// The names of a sweep stage's variants, listed ones first.
pub fn variant_names(l: &Loaded, i: usize) -> Result<Vec<String>> {
    Ok(sweep_config(l, i)?.all_variants()?.into_iter().map(|v| v.name).collect())
}

/// The SFT config table a variant trains with: the sweep's `base`, the
/// variant's settings, the stage's data with the variant's weights.
fn variant_table(
    l: &Loaded,
    i: usize,
    cfg: &SweepConfig,
    v: &Variant,
    model: &Path,
    out: &Path,
) -> Result<toml::Table> {
    let s = &l.recipe.stages[i];
    let mut t = cfg.base.clone();
    for (k, val) in &v.set {
        set_dotted(&mut t, k, val.clone())
            .with_context(|| format!("{} variant {:?}", place(i, &s.name), v.name))?;
    }
    let mut data = l.data_value(&s.data)?;
    if let Some(srcs) = data.get_mut("sources").and_then(|x| x.as_array_mut()) {
        for src in srcs.iter_mut().filter_map(|x| x.as_table_mut()) {
            let name = src.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
            if let Some(w) = v.weights.get(&name) {
                src.insert("weight".into(), toml::Value::Float(*w));
            }
        }
    }
    t.insert("model".into(), toml::Value::String(model.display().to_string()));
    t.insert("output_dir".into(), toml::Value::String(out.display().to_string()));
    t.insert("data".into(), data);
    t.entry("seed").or_insert(toml::Value::Integer(l.seed_of(i) as i64));
    t.entry("device").or_insert(toml::Value::String(l.recipe.device.clone()));
    Ok(t)
}

/// Checks a sweep stage before anything runs: its config, every variant
/// (list and grid) typed as the SFT config it trains with, the weights'
/// sources, the judge spec and the oracle.
pub fn check_sweep(l: &Loaded, i: usize) -> Result<()> {
    let s = &l.recipe.stages[i];
    let at = format!("{}.config", place(i, &s.name));
    let cfg = sweep_config(l, i)?;
    let variants = cfg.all_variants().map_err(|e| anyhow!("{at}: {e}"))?;
    let data = s.data.as_ref().and_then(|d| l.recipe.data.get(d));
    let sources: Vec<String> = data
        .and_then(|d| d.get("sources"))
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.get("name")?.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let x = Path::new("placeholder");
    // The shared settings first, so that their errors name `config.base`.
    let base = Variant { name: String::new(), set: toml::Table::new(), weights: BTreeMap::new() };
    let t = variant_table(l, i, &cfg, &base, x, x)?;
    l.typed_stage::<sft::SftConfig>(i, t, &format!("{at}.base"))?
        .validate()
        .with_context(|| format!("{at}.base"))?;
    for v in &variants {
        for w in v.weights.keys() {
            if !sources.contains(w) {
                bail!(
                    "{at}: variant {:?}: weights name source {w:?}, not in the stage's data (sources: {sources:?})",
                    v.name
                );
            }
        }
        let vat = format!("{} variant {:?}: config", place(i, &s.name), v.name);
        let t = variant_table(l, i, &cfg, v, x, x)?;
        l.typed_stage::<sft::SftConfig>(i, t, &vat)?.validate().with_context(|| vat.clone())?;
    }
    check_judge_spec(&format!("{at}.judge"), &cfg.judge)?;
    if let Some(o) = &cfg.oracle {
        judge::oracle::get_oracle(o).map_err(|e| anyhow!("{at}.oracle: {e}"))?;
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

/// A rate and its interval as a table cell: `62.5% (41.7–79.2), n 8`.
fn rate_cell(c: &serde_json::Value) -> String {
    let f = |k: &str| c[k].as_f64();
    match (f("win_rate"), f("lo"), f("hi")) {
        (Some(w), Some(lo), Some(hi)) => {
            format!("{:.1}% ({:.1}–{:.1}), n {}", 100.0 * w, 100.0 * lo, 100.0 * hi, c["n"])
        }
        _ => format!("– (n {})", c["n"]),
    }
}

fn run_sweep(ctx: &Ctx, dir: &Path) -> Result<serde_json::Value> {
    let (l, i) = (ctx.l, ctx.i);
    let s = &l.recipe.stages[i];
    let cfg = sweep_config(l, i)?;
    let variants = cfg.all_variants().map_err(|e| anyhow!("{}.config: {e}", place(i, &s.name)))?;
    let baseline = l.model_of(s.baseline.as_ref().context("sweep needs baseline")?);
    let judge_spec = resolve_judge_spec(l, &cfg.judge);
    let mut board = vec![];
    for v in &variants {
        let vdir = dir.join("variants").join(&v.name);
        let done = vdir.join("judge/summary.json");
        if done.exists() {
            eprintln!("-- variant {}: judged already, kept", v.name);
        } else {
            // Train (resuming if interrupted) …
            let t = variant_table(l, i, &cfg, v, &ctx.input_model, &vdir)?;
            let vat = format!("{} variant {:?}: config", place(i, &s.name), v.name);
            let sc: sft::SftConfig = l.typed_stage(i, t, &vat)?;
            eprintln!("-- variant {}", v.name);
            sft::run(&sc, &l.base)?;
            // … then judge it against the baseline.
            let prompts = datasets::read::resolve(&l.base, Path::new(&cfg.prompts));
            let mut jc = JudgeConfig::new(prompts, judge_spec.clone());
            jc.max_new_tokens = cfg.max_new_tokens;
            jc.device = l.recipe.device.clone();
            jc.oracle = cfg.oracle.clone();
            judge::cli_judge(jc.into_args(vdir.join("model"), baseline.clone(), vdir.join("judge")))?;
        }
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&done).with_context(|| format!("cannot read {}", done.display()))?,
        )?;
        let o = &summary["overall"];
        let per_category: serde_json::Map<String, serde_json::Value> = summary["per_category"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, c)| {
                        let stats = serde_json::json!({
                            "win_rate": c["win_rate"], "lo": c["lo"], "hi": c["hi"], "n": c["n"],
                        });
                        (k.clone(), stats)
                    })
                    .collect()
            })
            .unwrap_or_default();
        board.push(serde_json::json!({
            "variant": v.name, "win_rate": o["win_rate"], "lo": o["lo"], "hi": o["hi"], "n": o["n"],
            "per_category": per_category,
            "model": vdir.join("model"),
        }));
    }
    board.sort_by(|a, b| {
        b["win_rate"].as_f64().unwrap_or(0.0).total_cmp(&a["win_rate"].as_f64().unwrap_or(0.0))
    });
    let winner = board.first().context("no variants")?.clone();
    // The winner's checkpoint becomes the stage's output.
    let src = Path::new(winner["model"].as_str().context("winner model path")?).to_path_buf();
    lm::fsio::write_dir_atomic(&dir.join("model"), |tmp| {
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
    let categories: BTreeSet<String> =
        board.iter().filter_map(|b| b["per_category"].as_object()).flat_map(|m| m.keys().cloned()).collect();
    if !categories.is_empty() {
        md.push_str(
            "\n## Per category\n\nWin rate against the baseline within each category, with its 95% \
             bootstrap interval and the number of judged prompts.\n\n",
        );
        md.push_str(&format!(
            "| variant | {} |\n",
            categories.iter().cloned().collect::<Vec<_>>().join(" | ")
        ));
        md.push_str(&format!("|---|{}\n", "---|".repeat(categories.len())));
        for b in &board {
            let cells: Vec<String> = categories
                .iter()
                .map(|c| match b["per_category"].get(c) {
                    Some(stats) => rate_cell(stats),
                    None => "–".to_string(),
                })
                .collect();
            md.push_str(&format!("| {} | {} |\n", b["variant"].as_str().unwrap_or("?"), cells.join(" | ")));
        }
    }
    md.push_str(&format!(
        "\nWinner: **{}** (its model is `{}/model`).\n",
        winner["variant"].as_str().unwrap_or("?"),
        dir.display()
    ));
    lm::fsio::write_atomic(&dir.join("leaderboard.md"), md.as_bytes())?;
    lm::plot::bar_chart(
        &dir.join("leaderboard.png"),
        &format!("Sweep {}: win rate vs baseline", s.name),
        "win rate",
        &bars,
        Some(0.5),
    )?;
    let out = serde_json::json!({"winner": winner["variant"], "leaderboard": board});
    lm::fsio::write_atomic(&dir.join("leaderboard.json"), serde_json::to_string_pretty(&out)?.as_bytes())?;
    Ok(out)
}

impl StageKind for Sweep {
    fn name(&self) -> &'static str {
        "sweep"
    }

    fn title(&self) -> &'static str {
        "Sweep"
    }

    fn makes(&self) -> Option<Output> {
        Some(Output::Model)
    }

    fn config_references(&self, spec: &StageSpec) -> Vec<Reference> {
        judge_reference(spec)
    }

    fn check(&self, ctx: &Ctx) -> Result<()> {
        let s = ctx.spec();
        ctx.needs("data", s.data.is_some())?;
        ctx.needs("baseline", s.baseline.is_some())?;
        check_sweep(ctx.l, ctx.i)
    }

    fn inputs(&self, ctx: &Ctx) -> Vec<Input> {
        judge_inputs(ctx)
    }

    fn plan_notes(&self, ctx: &Ctx) -> Result<Vec<String>> {
        Ok(vec![format!("variants: {}", variant_names(ctx.l, ctx.i)?.join(", "))])
    }

    fn run(&self, ctx: &Ctx, dir: &Path) -> Result<serde_json::Value> {
        run_sweep(ctx, dir)
    }

    fn figures(&self, s: &serde_json::Value) -> Vec<String> {
        let b = &s["leaderboard"];
        let best = b.as_array().and_then(|a| a.first()).cloned().unwrap_or_default();
        vec![format!(
            "winner {} ({:.1}% vs baseline, {} variants)",
            s["winner"].as_str().unwrap_or("?"),
            100.0 * best["win_rate"].as_f64().unwrap_or(f64::NAN),
            b.as_array().map_or(0, |a| a.len())
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(text: &str) -> BTreeMap<String, Vec<toml::Value>> {
        toml::from_str(text).expect("a grid table")
    }

    #[test]
    fn grid_expands_to_the_cartesian_product_with_readable_names() {
        let g = grid("\"optim.lr\" = [1e-3, 3e-4]\n\"weights.numbers\" = [1, 2.5]\n");
        let v = expand_grid(&g).unwrap();
        let names: Vec<&str> = v.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            ["lr=1e-3,numbers=1", "lr=1e-3,numbers=2.5", "lr=3e-4,numbers=1", "lr=3e-4,numbers=2.5"]
        );
        assert_eq!(v[1].set.get("optim.lr"), Some(&toml::Value::Float(1e-3)));
        assert_eq!(v[1].weights.get("numbers"), Some(&2.5));
        assert_eq!(v[2].set.get("optim.lr"), Some(&toml::Value::Float(3e-4)));
        assert_eq!(v[2].weights.get("numbers"), Some(&1.0));
        // A mixture weight is a weight, never a setting of the trained stage.
        assert!(v.iter().all(|x| x.set.len() == 1 && x.weights.len() == 1));
    }

    #[test]
    fn grid_accepts_mixture_weights_spelled_in_full_and_three_keys() {
        let g = grid(
            "\"mixture.weights.letters\" = [1.0, 2.0]\n\"max_steps\" = [10, 20, 30]\n\"optim.warmup_steps\" = [0]\n",
        );
        let v = expand_grid(&g).unwrap();
        assert_eq!(v.len(), 2 * 3);
        // Keys in sorted order, the last varying fastest.
        assert_eq!(v[0].name, "max_steps=10,letters=1,warmup_steps=0");
        assert_eq!(v[1].name, "max_steps=10,letters=2,warmup_steps=0");
        assert_eq!(v[5].name, "max_steps=30,letters=2,warmup_steps=0");
        assert_eq!(v[5].weights.get("letters"), Some(&2.0));
        assert_eq!(v[5].set.get("max_steps"), Some(&toml::Value::Integer(30)));
        // Each combination once.
        let names: BTreeSet<&str> = v.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names.len(), 6);
    }

    #[test]
    fn grid_names_use_whole_keys_where_last_parts_clash() {
        let g = grid("\"optim.lr\" = [0.1]\n\"head.lr\" = [0.5]\n");
        let v = expand_grid(&g).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "head.lr=0.5,optim.lr=0.1");
    }

    #[test]
    fn grid_errors_name_the_key() {
        let e = expand_grid(&grid("\"optim.lr\" = []\n")).unwrap_err().to_string();
        assert!(e.contains("optim.lr") && e.contains("no values"), "{e}");
        let e = expand_grid(&grid("\"weights.x\" = [\"heavy\"]\n")).unwrap_err().to_string();
        assert!(e.contains("weights.x") && e.contains("must be a number"), "{e}");
        let e = expand_grid(&grid("\"weights.\" = [1]\n")).unwrap_err().to_string();
        assert!(e.contains("weights.") && e.contains("mixture weight"), "{e}");
    }

    #[test]
    fn sweep_config_takes_a_list_a_grid_or_both() {
        let both: SweepConfig = toml::from_str(
            r#"
prompts = "builtin:dev?n=10&seed=1"
judge = "oracle:tasks"
variants = [{ name = "plain" }]
[grid]
"optim.lr" = [1e-3, 3e-4]
"#,
        )
        .unwrap();
        let names: Vec<String> = both.all_variants().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["plain", "lr=1e-3", "lr=3e-4"]);
        let clash: SweepConfig = toml::from_str(
            "prompts = \"p\"\njudge = \"oracle:tasks\"\nvariants = [{ name = \"lr=1e-3\" }]\n[grid]\n\"optim.lr\" = [1e-3]\n",
        )
        .unwrap();
        let e = clash.all_variants().unwrap_err().to_string();
        assert!(e.contains("\"lr=1e-3\" is used twice"), "{e}");
        let none: SweepConfig = toml::from_str("prompts = \"p\"\njudge = \"oracle:tasks\"\n").unwrap();
        assert!(none.all_variants().unwrap_err().to_string().contains("no variants"));
    }
}
