//! Reading a recipe: the TOML file, `--set` overrides, and the typed
//! recipe (`Recipe { stages: Vec<StageSpec> }`, each stage's own settings
//! kept as its raw `config` table for its kind to type). Also the helpers
//! every other part of the recipe module uses: where outputs go, how a
//! message names a place, and typing a table with errors that name the key.
//!
//! This module imports none of the others.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The base model: a preset initialised here, or an existing checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseModel {
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
}

/// The tokenizer: a file, or trained (byte-level BPE) on named text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Text to train on: files, or `builtin:pretrain?n=…` specs.
    #[serde(default)]
    pub train_on: Vec<String>,
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
}

fn default_vocab() -> usize {
    1024
}

/// One stage of a recipe: its kind's name, its references to other stages,
/// and its own settings as a raw table (typed by its kind). Serialized as it
/// is read: the manifest hash covers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub name: String,
    /// The kind's name (`tokenizer`, `pretrain`, `sft`, …), checked against
    /// the kinds [`load`] is given.
    pub kind: String,
    /// The stage whose model this one starts from (default: the previous
    /// model-producing stage; for `pretrain`, the base model).
    #[serde(default)]
    pub from: Option<String>,
    /// A named entry of `[data]` (a mixture), or text specs for `pretrain`.
    #[serde(default)]
    pub data: Option<String>,
    /// `rl`: the reward stage.
    #[serde(default)]
    pub reward: Option<String>,
    /// `judge`: the stages compared.
    #[serde(default)]
    pub candidate: Option<String>,
    #[serde(default)]
    pub baseline: Option<String>,
    /// The stage's own settings: the fields of its config type.
    #[serde(default)]
    pub config: toml::Table,
    /// Repeats the stage once per seed (`seeds = [0, 1, 2]`): each run has
    /// its config's `seed` set to that seed and its outputs in
    /// `<stage>/seed-<seed>/`. A later stage that uses this one's outputs
    /// must list seeds too (a subset of these): it runs seed by seed, each
    /// with the same seed's outputs. Absent from the manifest hash (each
    /// seed's hash covers its seed), so adding a seed keeps finished ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Vec<u64>>,
}

impl StageSpec {
    /// The stage as its manifest hash describes it: without `seeds`.
    pub fn without_seeds(&self) -> StageSpec {
        StageSpec { seeds: None, ..self.clone() }
    }
}

/// The directory of one seed's outputs inside a stage's directory.
pub fn seed_dir_name(seed: u64) -> String {
    format!("seed-{seed}")
}

/// A recipe file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub output_dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: String,
    pub base_model: BaseModel,
    pub tokenizer: TokenizerSpec,
    /// Named data: mixtures (`datasets::MixtureConfig` tables) or, for
    /// pretraining, `{ text = ["file or builtin:pretrain?…", …] }`.
    #[serde(default)]
    pub data: BTreeMap<String, toml::Table>,
    pub stages: Vec<StageSpec>,
}

fn default_device() -> String {
    "auto".into()
}

/// Where a recipe lives and what it says.
#[derive(Clone)]
pub struct Loaded {
    pub recipe: Recipe,
    pub base: PathBuf,
    /// The seed whose outputs the stages repeated over seeds name (see
    /// [`Loaded::with_seed`]); None outside such a run.
    pub seed: Option<u64>,
}

/// Applies `--set stage.key=value` overrides (the value parsed as TOML, a
/// bare string otherwise) to the raw recipe before it is typed: keys of the
/// stage's config, and `seeds` (`--set rl.seeds=[0,1,2]`), the stage's own.
fn apply_sets(doc: &mut toml::Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (path, raw) =
            s.split_once('=').with_context(|| format!("--set {s:?}: expected stage.key=value"))?;
        let (stage, key) =
            path.split_once('.').with_context(|| format!("--set {s:?}: expected stage.key=value"))?;
        if let Some(rest) = key.strip_prefix("config.") {
            bail!(
                "--set {s:?}: the form is --set {stage}.{rest}={raw} (stage.key=value, the key as in \
                 the stage's config table, without `config.`)"
            );
        }
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let stages =
            doc.get_mut("stages").and_then(|v| v.as_array_mut()).context("the recipe has no [[stages]]")?;
        let st = stages
            .iter_mut()
            .filter_map(|v| v.as_table_mut())
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(stage))
            .with_context(|| format!("--set {s:?}: no stage named {stage:?}"))?;
        // `seeds` is the stage's own key, beside `kind` and `from`.
        if key == "seeds" {
            st.insert(key.to_string(), value);
            continue;
        }
        let mut table = st.entry("config").or_insert_with(|| toml::Value::Table(Default::default()));
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            table = table
                .as_table_mut()
                .context("--set: not a table")?
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
        table.as_table_mut().context("--set: not a table")?.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(())
}

/// How messages name a stage: `stages[2] "sft"`.
pub fn place(i: usize, name: &str) -> String {
    format!("stages[{i}] {name:?}")
}

/// `prefix` and a key path below it: `a.b` + `c[0]` → `a.b.c[0]`.
pub fn join_path(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => path.to_string(),
        _ if path.starts_with('[') => format!("{prefix}{path}"),
        _ => format!("{prefix}.{path}"),
    }
}

/// Types a TOML value; an error gives the key path where it happened (empty
/// at the top) and serde's message.
pub use lm::stage_settings::typed_path;

/// Types a table; errors read `{prefix}.{key path}: {message}`.
pub fn typed_at<T: serde::de::DeserializeOwned>(t: toml::Table, prefix: &str) -> Result<T> {
    typed_path(toml::Value::Table(t)).map_err(|(p, msg)| anyhow!("{}: {msg}", join_path(prefix, &p)))
}

/// Names the stage in a key path of the whole recipe: `stages[2].kind` →
/// `stages[2] "sft".kind`.
fn name_stage_in_path(path: &str, names: &[Option<String>]) -> String {
    let Some(rest) = path.strip_prefix("stages[") else { return path.to_string() };
    let Some((idx, tail)) = rest.split_once(']') else { return path.to_string() };
    match idx.parse::<usize>().ok().and_then(|i| Some((i, names.get(i)?.as_ref()?))) {
        Some((i, name)) => format!("{}{tail}", place(i, name)),
        None => path.to_string(),
    }
}

/// serde's message for an unknown enum variant, for a kind name not in
/// `kinds`.
fn unknown_kind(kind: &str, kinds: &[&str]) -> String {
    let quoted: Vec<String> = kinds.iter().map(|k| format!("`{k}`")).collect();
    let expected = match quoted.as_slice() {
        [] => "no variants".to_string(),
        [one] => format!("expected {one}"),
        [a, b] => format!("expected {a} or {b}"),
        more => format!("expected one of {}", more.join(", ")),
    };
    format!("unknown variant `{kind}`, {expected}")
}

/// Reads a recipe and applies the overrides: the typed recipe, each stage's
/// kind one of `kinds`. What the stages say is checked elsewhere.
pub fn load(path: &Path, sets: &[String], kinds: &[&str]) -> Result<Loaded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
    let mut doc: toml::Table = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    apply_sets(&mut doc, sets)?;
    let names: Vec<Option<String>> = doc
        .get("stages")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|s| s.get("name").and_then(|n| n.as_str()).map(String::from)).collect())
        .unwrap_or_default();
    let recipe: Recipe = typed_path(toml::Value::Table(doc)).map_err(|(p, msg)| {
        if p.is_empty() {
            anyhow!("recipe {}: {msg}", path.display())
        } else {
            anyhow!("recipe {}: {}: {msg}", path.display(), name_stage_in_path(&p, &names))
        }
    })?;
    for (i, s) in recipe.stages.iter().enumerate() {
        if !kinds.contains(&s.kind.as_str()) {
            bail!("recipe {}: {}.kind: {}", path.display(), place(i, &s.name), unknown_kind(&s.kind, kinds));
        }
    }
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    Ok(Loaded { recipe, base, seed: None })
}

fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

impl Loaded {
    pub fn out_dir(&self) -> PathBuf {
        self.base.join(&self.recipe.output_dir)
    }

    /// A stage's directory; for a stage repeated over seeds, in the view of
    /// a seed ([`Loaded::with_seed`]), that seed's directory inside it.
    pub fn stage_dir(&self, name: &str) -> PathBuf {
        let dir = self.out_dir().join(name);
        match (self.seed, self.stage(name).is_some_and(|(_, s)| s.seeds.is_some())) {
            (Some(seed), true) => dir.join(seed_dir_name(seed)),
            _ => dir,
        }
    }

    /// The recipe in the view of one seed (`Some`) of the stages repeated
    /// over seeds: their directories and models are that seed's. `None`:
    /// their top directories.
    pub fn with_seed(&self, seed: Option<u64>) -> Loaded {
        Loaded { seed, ..self.clone() }
    }

    /// The seed a stage runs with in this view: its repetition's seed, else
    /// the recipe's.
    pub fn seed_of(&self, i: usize) -> u64 {
        match (self.seed, &self.recipe.stages[i].seeds) {
            (Some(seed), Some(_)) => seed,
            _ => self.recipe.seed,
        }
    }

    /// The stage of that name and its index.
    pub fn stage(&self, name: &str) -> Option<(usize, &StageSpec)> {
        self.recipe.stages.iter().enumerate().find(|(_, s)| s.name == name)
    }

    /// The model directory a stage produces.
    pub fn model_of(&self, name: &str) -> PathBuf {
        self.stage_dir(name).join("model")
    }

    /// The tokenizer file: the recipe's, or the one the tokenizer stage
    /// trains.
    pub fn tokenizer_path(&self) -> PathBuf {
        match &self.recipe.tokenizer.file {
            Some(f) => self.base.join(f),
            None => self.out_dir().join("tokenizer.json"),
        }
    }

    /// A path of the recipe as the runner reads it: relative to the
    /// recipe's directory.
    pub fn path(&self, p: impl AsRef<Path>) -> PathBuf {
        self.base.join(p)
    }

    /// Types a stage's config (with the runner's additions) as `T`. Errors
    /// name the key path under `prefix` (`stages[2] "sft".config.max_steps:
    /// …`), or the `[data.NAME]` entry for keys of the stage's data.
    pub fn typed_stage<T: serde::de::DeserializeOwned + serde::Serialize>(
        &self,
        i: usize,
        t: toml::Table,
        prefix: &str,
    ) -> Result<T> {
        let s = &self.recipe.stages[i];
        // Stage configs embed lm's StageSettings with `flatten`: its typer
        // keeps key paths and unknown-key lists that serde loses there.
        lm::stage_settings::typed_toml(toml::Value::Table(t)).map_err(|(p, msg)| {
            let data_key =
                p.strip_prefix("data").filter(|rest| rest.is_empty() || rest.starts_with(['.', '[']));
            match (data_key, &s.data) {
                (Some(rest), Some(d)) => anyhow!("data.{d}{rest}: {msg} (the data of {})", place(i, &s.name)),
                _ => anyhow!("{}: {msg}", join_path(prefix, &p)),
            }
        })
    }

    /// A named `[data]` entry as a mixture table, its paths (and the
    /// held-out file's) resolved against the recipe's directory.
    pub fn data_value(&self, name: &Option<String>) -> Result<toml::Value> {
        let d = name.as_ref().context("no data")?;
        let mut t = self.recipe.data.get(d).with_context(|| format!("no [data.{d}]"))?.clone();
        let fix = |tab: &mut toml::Table| {
            if let Some(p) = tab.get("path").and_then(|p| p.as_str()) {
                let r = datasets::read::resolve(&self.base, Path::new(p));
                tab.insert("path".into(), path_value(&r));
            }
        };
        if let Some(srcs) = t.get_mut("sources").and_then(|v| v.as_array_mut()) {
            srcs.iter_mut().filter_map(|v| v.as_table_mut()).for_each(fix);
        }
        if let Some(h) = t.get_mut("held_out").and_then(|v| v.as_table_mut()) {
            fix(h);
        }
        Ok(toml::Value::Table(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage serializes as before the recipe module was split (kind as
    /// its lowercase name, every reference, null when unset): the manifest
    /// hash covers it, so existing run directories stay complete.
    #[test]
    fn a_stage_serializes_as_the_manifest_hash_expects() {
        let r: Recipe = toml::from_str(
            "name = \"r\"\noutput_dir = \"out\"\n[base_model]\npreset = \"tiny\"\n[tokenizer]\n\
             [[stages]]\nname = \"s\"\nkind = \"sft\"\ndata = \"d\"\nconfig = { max_steps = 3 }\n",
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&r.stages[0]).unwrap(),
            r#"{"name":"s","kind":"sft","from":null,"data":"d","reward":null,"candidate":null,"baseline":null,"config":{"max_steps":3}}"#
        );
    }

    #[test]
    fn an_unknown_kind_reads_as_serde_wrote_it() {
        let kinds = ["tokenizer", "pretrain", "sft", "reward", "rl", "judge", "sweep"];
        assert_eq!(
            unknown_kind("swep", &kinds),
            "unknown variant `swep`, expected one of `tokenizer`, `pretrain`, `sft`, `reward`, `rl`, \
             `judge`, `sweep`"
        );
        assert_eq!(unknown_kind("x", &["a", "b"]), "unknown variant `x`, expected `a` or `b`");
    }
}
