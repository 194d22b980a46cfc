//! The state of a recipe's stages (`align status`, `--dry-run`): each
//! stage's resolved description and its hash against the manifest beside
//! its outputs, the inputs the stages to run read that do not exist, and
//! the printed plan.

use crate::recipe::load::{place, Loaded};
use crate::recipe::stages::{self, StageKind};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What `manifest.json` beside a stage's outputs records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    /// The kind's name.
    pub kind: String,
    pub config_hash: String,
    pub completed: bool,
    pub summary: serde_json::Value,
    /// Wall-clock seconds of the run that completed the stage (a resumed
    /// stage counts its last run only).
    #[serde(default)]
    pub seconds: Option<f64>,
}

pub fn read_manifest(dir: &Path) -> Option<Manifest> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).ok()?).ok()
}

/// The fully resolved description of a stage (what its hash covers): its
/// own settings and inputs, the hash of the stage before it (so that a
/// change reruns that stage and every stage after it), and the version of
/// the built-in task generator (whose `builtin:` specs name data by seed).
///
/// A stage repeated over seeds is described without its `seeds` list; in
/// the view of one seed ([`Loaded::with_seed`]) its description has that
/// seed (`stage_seed`) and its input model is that seed's. The stage before
/// it is described outside any seed's view.
fn resolved(l: &Loaded, i: usize) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    let data = s.data.as_ref().map(|d| l.recipe.data[d].clone());
    let upstream = match (i, l.seed) {
        (0, _) => String::new(),
        (_, None) => lm::train::config_hash(&resolved(l, i - 1)?)?,
        (_, Some(_)) => lm::train::config_hash(&resolved(&l.with_seed(None), i - 1)?)?,
    };
    let mut v = serde_json::json!({
        "stage": s.without_seeds(), "data": data, "input_model": stages::input_model(l, i),
        "seed": l.recipe.seed, "device": l.recipe.device, "tokenizer": l.recipe.tokenizer,
        "base_model": l.recipe.base_model, "upstream": upstream,
        "builtin_data_version": datasets::tasks::GENERATOR_VERSION,
    });
    if let (Some(seed), Some(_)) = (l.seed, &s.seeds) {
        v["stage_seed"] = serde_json::json!(seed);
    }
    Ok(v)
}

/// The hash of stage `i`'s resolved description (in the view of one seed
/// for a stage repeated over seeds).
pub fn stage_hash(l: &Loaded, i: usize) -> Result<String> {
    lm::train::config_hash(&resolved(l, i)?)
}

/// The settings that made a stage's outputs, as `config.toml` beside its
/// manifest records them: the stage (kind and references), its config as
/// the run reads it (`--set` overrides included, the recipe's seed and
/// device where it sets none; for a training stage every key with its
/// default, as its crate types it) and its named data.
pub fn settings(l: &Loaded, i: usize) -> toml::Table {
    let s = &l.recipe.stages[i];
    let text = |v: &str| toml::Value::String(v.to_string());
    let mut stage = toml::Table::new();
    stage.insert("name".into(), text(&s.name));
    stage.insert("kind".into(), text(&s.kind));
    for (f, v) in [
        ("from", &s.from),
        ("data", &s.data),
        ("reward", &s.reward),
        ("candidate", &s.candidate),
        ("baseline", &s.baseline),
    ] {
        if let Some(v) = v {
            stage.insert(f.into(), text(v));
        }
    }
    let mut t = toml::Table::new();
    t.insert("stage".into(), toml::Value::Table(stage));
    let ctx = stages::ctx(l, i);
    let config = stages::of(s).resolved_config(&ctx).unwrap_or_else(|| ctx.config_with_defaults());
    t.insert("config".into(), toml::Value::Table(config));
    if let Some((d, x)) = s.data.as_ref().and_then(|d| l.recipe.data.get(d).map(|x| (d, x))) {
        let mut data = toml::Table::new();
        data.insert(d.clone(), toml::Value::Table(x.clone()));
        t.insert("data".into(), toml::Value::Table(data));
    }
    t
}

/// Writes [`settings`] as `config.toml` into the stage's directory.
pub fn write_settings(l: &Loaded, i: usize, dir: &Path) -> Result<()> {
    let text = format!(
        "# The settings that made the outputs of stage {:?} of recipe {:?} (overrides included).\n\n{}",
        l.recipe.stages[i].name,
        l.recipe.name,
        toml::to_string_pretty(&settings(l, i))?
    );
    lm::fsio::write_atomic(&dir.join("config.toml"), text.as_bytes())
}

/// Every leaf of a settings table by its name: config keys as `--set`
/// names them (`rl.beta`), the stage's references (`stages.rl.from`), the
/// data (`data.prompts.sources`).
fn leaves(stage: &str, t: &toml::Table) -> std::collections::BTreeMap<String, String> {
    fn walk(prefix: String, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, x) in t {
                    walk(format!("{prefix}.{k}"), x, out);
                }
            }
            other => {
                out.insert(prefix, other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in t {
        let prefix = match k.as_str() {
            "config" => stage.to_string(),
            "stage" => format!("stages.{stage}"),
            other => other.to_string(),
        };
        walk(prefix, v, &mut out);
    }
    out
}

/// The keys whose values differ between the settings recorded in `dir`
/// (`config.toml`) and the recipe's: `rl.beta 0.1 → 0.05` (recorded →
/// recipe; `(default)` where one sets none). None when nothing is recorded.
pub fn changed_keys(l: &Loaded, i: usize, dir: &Path) -> Option<Vec<String>> {
    let recorded: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).ok()?).ok()?;
    let name = &l.recipe.stages[i].name;
    let (old, new) = (leaves(name, &recorded), leaves(name, &settings(l, i)));
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let unset = "(default)".to_string();
    Some(
        keys.into_iter()
            .filter(|k| old.get(*k) != new.get(*k))
            .map(|k| format!("{k} {} → {}", old.get(k).unwrap_or(&unset), new.get(k).unwrap_or(&unset)))
            .collect(),
    )
}

/// One row of [`status`]: a stage, or one seed of a stage repeated over
/// seeds.
pub struct StageStatus {
    pub name: String,
    /// The stage's index in the recipe.
    pub i: usize,
    /// The seed, for a stage repeated over seeds.
    pub seed: Option<u64>,
    pub kind: &'static dyn StageKind,
    /// `done`, `stale (config changed: rl.beta 0.1 → 0.05)`, `interrupted
    /// (resumes)` or `pending`.
    pub state: String,
    pub dir: PathBuf,
    /// The figures of the outputs there (also when stale).
    pub summary: serde_json::Value,
    /// For a stale stage, the keys the recipe changes from the settings
    /// that made its outputs ([`changed_keys`]).
    pub changed: Vec<String>,
}

/// The views a stage runs in: each of its seeds, or the recipe's own.
pub fn runs_of(l: &Loaded, i: usize) -> Vec<Loaded> {
    match &l.recipe.stages[i].seeds {
        Some(seeds) => seeds.iter().map(|s| l.with_seed(Some(*s))).collect(),
        None => vec![l.with_seed(None)],
    }
}

/// State of each stage for `--dry-run` and `align status`: one row per
/// stage, or per seed of a stage repeated over seeds, in order.
pub fn status(l: &Loaded) -> Result<Vec<StageStatus>> {
    let mut out: Vec<StageStatus> = vec![];
    for i in 0..l.recipe.stages.len() {
        for lv in runs_of(l, i) {
            out.push(status_of(&lv, i, &out)?);
        }
    }
    Ok(out)
}

/// The state of stage `i` in the view `l` (one seed's, or none), given the
/// rows before it.
fn status_of(l: &Loaded, i: usize, out: &[StageStatus]) -> Result<StageStatus> {
    let s = &l.recipe.stages[i];
    let dir = l.stage_dir(&s.name);
    let hash = stage_hash(l, i)?;
    let mut changed = vec![];
    let (state, summary) = match read_manifest(&dir) {
        Some(m) if m.completed && m.config_hash == hash => ("done".to_string(), m.summary),
        Some(m) if m.config_hash != hash => {
            changed = changed_keys(l, i, &dir).unwrap_or_default();
            let state = if !changed.is_empty() {
                format!("stale (config changed: {})", changed.join(", "))
            } else if out.iter().any(|o| o.state.starts_with("stale")) {
                "stale (an earlier stage changed)".to_string()
            } else {
                "stale (config changed)".to_string()
            };
            (state, m.summary)
        }
        _ if dir.join("checkpoints").exists() => {
            ("interrupted (resumes)".to_string(), serde_json::Value::Null)
        }
        _ => ("pending".to_string(), serde_json::Value::Null),
    };
    let seed = l.seed.filter(|_| s.seeds.is_some());
    Ok(StageStatus { name: s.name.clone(), i, seed, kind: stages::of(s), state, dir, summary, changed })
}

/// What a data source's path names: a file (it has an extension), or a
/// directory of shards.
fn data_noun(src: &toml::Value) -> &'static str {
    match src.get("path").and_then(|p| p.as_str()).map(|p| Path::new(p).extension().is_some()) {
        Some(true) => "file",
        _ => "directory",
    }
}

/// The input files and directories the given stages read that do not
/// exist, one message each naming the place in the recipe. `builtin:`
/// specs and paths inside the output directory (written by earlier stages)
/// are not checked.
pub fn missing_inputs(l: &Loaded, run: &[usize]) -> Vec<String> {
    let out_dir = l.out_dir();
    let specs = &l.recipe.stages;
    let file = |spec: &str| (!spec.starts_with("builtin:")).then(|| l.path(spec));
    let mut wanted: Vec<(String, PathBuf, &str)> = vec![];
    let mut of_stages: Vec<(usize, Vec<stages::Input>)> = vec![];
    for &i in run {
        let (recipe_wide, own): (Vec<_>, Vec<_>) =
            stages::of(&specs[i]).inputs(&stages::ctx(l, i)).into_iter().partition(|x| x.recipe_wide);
        wanted.extend(recipe_wide.into_iter().map(|x| (x.what, x.path, x.noun)));
        of_stages.push((i, own));
    }
    if let Some(c) = &l.recipe.base_model.checkpoint {
        let c = l.path(c);
        let user = run
            .iter()
            .find(|&&i| stages::of(&specs[i]).starts_from_model() && stages::input_model(l, i) == c);
        if let Some(&i) = user {
            let what = format!("base_model.checkpoint (the model {} starts from)", place(i, &specs[i].name));
            wanted.push((what, c, "directory"));
        }
    }
    for (i, own) in of_stages {
        let s = &specs[i];
        let at = place(i, &s.name);
        if let Some((d, t)) = s.data.as_ref().and_then(|d| l.recipe.data.get(d).map(|t| (d, t))) {
            for src in t.get("sources").and_then(|v| v.as_array()).into_iter().flatten() {
                let name = src.get("name").and_then(|n| n.as_str()).unwrap_or("?");
                if let Some(p) = src.get("path").and_then(|p| p.as_str()).and_then(file) {
                    wanted.push((format!("{at}: data source {name:?}"), p, data_noun(src)));
                }
            }
            if let Some(p) =
                t.get("held_out").and_then(|h| h.get("path")).and_then(|p| p.as_str()).and_then(file)
            {
                wanted.push((format!("{at}: data.{d}.held_out.path"), p, "file"));
            }
            for (k, v) in t.get("text").and_then(|v| v.as_array()).into_iter().flatten().enumerate() {
                if let Some(p) = v.as_str().and_then(file) {
                    wanted.push((format!("{at}: data.{d}.text[{k}]"), p, "file"));
                }
            }
        }
        for x in own {
            wanted.push((format!("{at}: {}", x.what), x.path, x.noun));
        }
    }
    let mut out = vec![];
    for (what, p, noun) in wanted {
        if p.starts_with(&out_dir) || p.exists() {
            continue;
        }
        let msg = format!("{what}: {noun} {} does not exist", p.display());
        if !out.contains(&msg) {
            out.push(msg);
        }
    }
    out
}

/// Prints the `--dry-run` plan: each stage's (or seed's) state, whether it
/// will run (`will_run` of its row's index in `states`), its directory and
/// input model, its kind's notes; then the missing inputs as warnings.
pub fn print_plan(
    l: &Loaded,
    states: &[StageStatus],
    will_run: &dyn Fn(usize) -> bool,
    missing: &[String],
) -> Result<()> {
    println!("recipe {} → {}", l.recipe.name, l.out_dir().display());
    for (k, st) in states.iter().enumerate() {
        let name = match st.seed {
            Some(seed) => format!("{} seed {seed}", st.name),
            None => st.name.clone(),
        };
        println!(
            "  {:<16} {:<9} {:<24} {}  {}",
            name,
            st.kind.name(),
            st.state,
            if will_run(k) { "will run" } else { "skip" },
            st.dir.display()
        );
        let lv = l.with_seed(st.seed);
        if st.kind.starts_from_model() {
            println!("      from {}", stages::input_model(&lv, st.i).display());
        }
        for note in st.kind.plan_notes(&stages::ctx(&lv, st.i))? {
            println!("      {note}");
        }
    }
    if !missing.is_empty() {
        println!(
            "warning: {} input(s) of the stages that would run do not exist here; \
             `align run` stops before any stage until they do:",
            missing.len()
        );
        for m in missing {
            println!("  - {m}");
        }
    }
    Ok(())
}
