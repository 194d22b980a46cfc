//! The recipe runner's glue for the RL, judge and sweep stages, and the
//! checks of their configs that run before any stage does.

use crate::recipe::{place, Kind, Loaded};
use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Parser)]
struct JudgeCli {
    #[command(flatten)]
    args: judge::JudgeArgs,
}

/// `align judge` options the runner sets from the stage itself.
const RUNNER_SET: [&str; 5] = ["candidate", "baseline", "out", "candidate_answers", "baseline_answers"];

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
            other => bail!("{k}: {other} is not a flag value (a string, number or boolean)"),
        }
    }
    Ok(out)
}

/// A TOML scalar as command-line text.
fn scalar_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid value");
    line.trim_start_matches("error: ").to_string()
}

/// Levenshtein distance, for suggesting a key.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The keys a judge stage's config may hold: the `align judge` options
/// (with underscores) less those the runner sets.
fn judge_keys() -> Vec<String> {
    JudgeCli::command()
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .filter(|k| k != "help" && !RUNNER_SET.contains(&k.as_str()))
        .collect()
}

/// A judge spec as the judge runs it: `lm:`/`reward:` naming a stage → that
/// stage's model, another directory → resolved against the recipe's
/// directory; other specs as they are.
fn resolve_judge_spec(l: &Loaded, spec: &str) -> String {
    match spec.split_once(':') {
        Some((kind @ ("lm" | "reward"), rest)) if l.recipe.stages.iter().any(|x| x.name == rest) => {
            format!("{kind}:{}", l.model_of(rest).display())
        }
        Some((kind @ ("lm" | "reward"), rest)) => format!("{kind}:{}", l.base.join(rest).display()),
        _ => spec.to_string(),
    }
}

/// A judge template as the judge loads it: a built-in name, or a file
/// resolved against the recipe's directory.
fn resolve_template(l: &Loaded, t: &str) -> String {
    if judge::template::BUILTIN.iter().any(|(n, _)| *n == t) {
        t.to_string()
    } else {
        l.base.join(t).display().to_string()
    }
}

/// Checks a judge spec (`at` names its place): the kind, and an oracle's
/// name. Stage names are checked with the other references, directories
/// with the other inputs.
fn check_judge_spec(at: &str, spec: &str) -> Result<()> {
    use judge::judges::JudgeSpec;
    if let JudgeSpec::Oracle(name) = JudgeSpec::parse(spec).map_err(|e| anyhow!("{at}: {e}"))? {
        judge::oracle::get_oracle(&name).map_err(|e| anyhow!("{at}: {e}"))?;
    }
    Ok(())
}

/// Checks a judge stage's config before anything runs: known keys, the
/// required ones, every value through the parser the run uses (one key at a
/// time, so an error names its key), the judge spec, the oracle and the
/// template.
pub fn check_judge(l: &Loaded, i: usize) -> Result<()> {
    let s = &l.recipe.stages[i];
    let at = format!("{}.config", place(i, &s.name));
    let known = judge_keys();
    for (k, v) in &s.config {
        if RUNNER_SET.contains(&k.as_str()) {
            bail!(
                "{at}.{k}: the runner sets this from the stage's `candidate` and `baseline` and its \
                 directory; remove it from the config"
            );
        }
        if !known.contains(k) {
            let near = known.iter().min_by_key(|c| edit_distance(c, k)).filter(|c| edit_distance(c, k) <= 2);
            let hint = near.map(|c| format!(" (did you mean {c:?}?)")).unwrap_or_default();
            bail!("{at}: unknown key {k:?}{hint}; a judge stage's config takes {}", known.join(", "));
        }
        if scalar_text(v).is_none() {
            bail!("{at}.{k}: expected a string, number or boolean, found {}", v.type_str());
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
    for (k, v) in &s.config {
        let mut t = toml::Table::new();
        t.insert("prompts".into(), toml::Value::String("placeholder".into()));
        t.insert("judge".into(), toml::Value::String("oracle:exact".into()));
        t.insert(k.clone(), v.clone());
        let mut argv: Vec<String> =
            ["judge", "--candidate", "x", "--baseline", "x"].map(String::from).to_vec();
        argv.extend(flags(&t).map_err(|e| anyhow!("{at}.{e}"))?);
        JudgeCli::try_parse_from(&argv).map_err(|e| anyhow!("{at}.{k}: {}", clap_message(&e)))?;
    }
    let text = |k: &str| s.config.get(k).and_then(scalar_text);
    if let Some(j) = text("judge") {
        check_judge_spec(&format!("{at}.judge"), &j)?;
    }
    if let Some(o) = text("oracle") {
        judge::oracle::get_oracle(&o).map_err(|e| anyhow!("{at}.oracle: {e}"))?;
    }
    if let Some(t) = text("template") {
        let path = resolve_template(l, &t);
        if Path::new(&path).exists() || path == t {
            judge::template::Template::load(&path).map_err(|e| anyhow!("{at}.template: {e}"))?;
        }
    }
    Ok(())
}

/// The files and directories stage `i`'s config reads (beside its data), as
/// (where in the recipe, path, "file" or "directory"): prompts, a template, a
/// judge's model directory, an RL reward model or reference.
pub fn input_paths(l: &Loaded, i: usize) -> Vec<(String, PathBuf, &'static str)> {
    let s = &l.recipe.stages[i];
    let text = |k: &str| s.config.get(k).and_then(|v| v.as_str());
    let mut out = vec![];
    match s.kind {
        Kind::Judge | Kind::Sweep => {
            if let Some(p) = text("prompts").filter(|p| !p.starts_with("builtin:")) {
                out.push(("config.prompts".to_string(), l.base.join(p), "file"));
            }
            if let Some(t) = text("template") {
                if resolve_template(l, t) != t {
                    out.push(("config.template".to_string(), l.base.join(t), "file"));
                }
            }
            if let Some((_, rest)) =
                text("judge").and_then(|j| j.split_once(':')).filter(|(k, _)| matches!(*k, "lm" | "reward"))
            {
                if !l.recipe.stages.iter().any(|x| x.name == rest) {
                    let what = "config.judge (names no stage, so a model directory)".to_string();
                    out.push((what, l.base.join(rest), "directory"));
                }
            }
        }
        Kind::Rl => {
            if let Some(r) = s.config.get("reward").and_then(|r| r.as_table()) {
                if let Some(p) = r.get("path").and_then(|p| p.as_str()) {
                    out.push(("config.reward.path".to_string(), l.base.join(p), "directory"));
                }
            }
            if let Some(p) = text("reference") {
                out.push(("config.reference".to_string(), l.base.join(p), "directory"));
            }
        }
        _ => {}
    }
    out
}

fn run_judge(l: &Loaded, i: usize, dir: &Path) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    let at = format!("{}.config", place(i, &s.name));
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
    if let Some(toml::Value::String(p)) = t.get("template").cloned() {
        t.insert("template".into(), toml::Value::String(resolve_template(l, &p)));
    }
    if let Some(toml::Value::String(j)) = t.get("judge").cloned() {
        t.insert("judge".into(), toml::Value::String(resolve_judge_spec(l, &j)));
    }
    let mut argv = vec!["judge".to_string()];
    argv.extend(flags(&t).map_err(|e| anyhow!("{at}.{e}"))?);
    let cli = JudgeCli::try_parse_from(&argv).map_err(|e| anyhow!("{at}: {}", clap_message(&e)))?;
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
    // A reward model or reference named in the config is read from the
    // recipe's directory, as the missing-input check looked for it.
    if let Some(r) = t.get_mut("reward").and_then(|r| r.as_table_mut()) {
        if let Some(p) = r.get("path").and_then(|p| p.as_str()).map(|p| l.base.join(p)) {
            r.insert("path".into(), toml::Value::String(p.display().to_string()));
        }
    }
    if let Some(p) = t.get("reference").and_then(|p| p.as_str()).map(|p| l.base.join(p)) {
        t.insert("reference".into(), toml::Value::String(p.display().to_string()));
    }
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
    let cfg: rl::RlConfig = l.typed_stage(i, t, &format!("{}.config", place(i, &s.name)))?;
    Ok(serde_json::to_value(rl::run(&cfg, &l.base)?)?)
}

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
    crate::recipe::typed_at(s.config.clone(), &format!("{}.config", place(i, &s.name)))
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
    let mut data = crate::recipe::data_value(l, &s.data)?;
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
    t.entry("seed").or_insert(toml::Value::Integer(l.recipe.seed as i64));
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

fn run_sweep(l: &Loaded, i: usize, dir: &Path) -> Result<serde_json::Value> {
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
            let t = variant_table(l, i, &cfg, v, &l.input_model(i), &vdir)?;
            let vat = format!("{} variant {:?}: config", place(i, &s.name), v.name);
            let sc: sft::SftConfig = l.typed_stage(i, t, &vat)?;
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
            flags_t.insert("judge".into(), toml::Value::String(judge_spec.clone()));
            flags_t.insert("max_new_tokens".into(), toml::Value::Integer(cfg.max_new_tokens as i64));
            flags_t.insert("device".into(), toml::Value::String(l.recipe.device.clone()));
            if let Some(o) = &cfg.oracle {
                flags_t.insert("oracle".into(), toml::Value::String(o.clone()));
            }
            argv.extend(flags(&flags_t)?);
            let cli = JudgeCli::try_parse_from(&argv).map_err(|e| anyhow!("sweep judge flags: {e}"))?;
            judge::cli_judge(cli.args)?;
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

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("max_new_tokns", "max_new_tokens"), 1);
        assert_eq!(edit_distance("oracle", "oracle"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
