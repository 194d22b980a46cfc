//! Recipes: one TOML file naming a base model, a tokenizer, named data and an
//! ordered list of stages, each referring to earlier stages by name.
//!
//! `align run RECIPE` resolves every stage into the typed config of its
//! crate (the stage's `config` table plus the paths the runner fills in:
//! `model`, `output_dir`, `data`, …), checks references before anything
//! runs, and runs the stages in order. A stage whose outputs are complete for
//! the same resolved configuration (hash in `manifest.json` beside its
//! outputs) is skipped; an interrupted stage resumes from its last
//! checkpoint (the stages do that themselves).

use anyhow::{anyhow, bail, Context, Result};
use lm::checkpoint;
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

/// The kinds of stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tokenizer,
    Pretrain,
    Sft,
    Reward,
    Rl,
    Judge,
    /// Variants of an SFT stage (data-mixture weights and/or settings), each
    /// trained briefly and judged against the baseline; the winner's model is
    /// the stage's output.
    Sweep,
}

impl Kind {
    /// Whether the stage's output is a causal LM (`<stage>/model`).
    pub fn makes_model(self) -> bool {
        matches!(self, Kind::Pretrain | Kind::Sft | Kind::Rl | Kind::Sweep)
    }
}

/// One stage of a recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    pub kind: Kind,
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
    pub stages: Vec<Stage>,
}

fn default_device() -> String {
    "auto".into()
}

/// Where a recipe lives and what it says.
pub struct Loaded {
    pub recipe: Recipe,
    pub base: PathBuf,
}

/// Applies `--set stage.key=value` overrides (the value parsed as TOML, a
/// bare string otherwise) to the raw recipe before it is typed.
fn apply_sets(doc: &mut toml::Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (path, raw) =
            s.split_once('=').with_context(|| format!("--set {s:?}: expected stage.key=value"))?;
        let (stage, key) =
            path.split_once('.').with_context(|| format!("--set {s:?}: expected stage.key=value"))?;
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

/// A serde path as recipe messages write it: `config.optim.lr`,
/// `sources[0].path`; a key with a dot in it is quoted.
fn path_text(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in p.iter() {
        let part = match seg {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                continue;
            }
            Segment::Map { key } if key.contains(['.', ' ', '"']) => format!("{key:?}"),
            Segment::Map { key } => key.clone(),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => "?".to_string(),
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(&part);
    }
    out
}

/// `prefix` and a key path below it: `a.b` + `c[0]` → `a.b.c[0]`.
pub(crate) fn join_path(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => path.to_string(),
        _ if path.starts_with('[') => format!("{prefix}{path}"),
        _ => format!("{prefix}.{path}"),
    }
}

/// Types a TOML value; an error gives the key path where it happened (empty
/// at the top) and serde's message.
pub(crate) fn typed_path<T: serde::de::DeserializeOwned>(
    v: toml::Value,
) -> std::result::Result<T, (String, String)> {
    serde_path_to_error::deserialize(v)
        .map_err(|e| (path_text(e.path()), e.inner().message().trim().to_string()))
}

/// Types a table; errors read `{prefix}.{key path}: {message}`.
pub(crate) fn typed_at<T: serde::de::DeserializeOwned>(t: toml::Table, prefix: &str) -> Result<T> {
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

/// Reads, overrides and checks a recipe.
pub fn load(path: &Path, sets: &[String]) -> Result<Loaded> {
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
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let l = Loaded { recipe, base };
    l.check().with_context(|| format!("recipe {}", path.display()))?;
    Ok(l)
}

impl Loaded {
    pub fn out_dir(&self) -> PathBuf {
        self.base.join(&self.recipe.output_dir)
    }

    pub fn stage_dir(&self, name: &str) -> PathBuf {
        self.out_dir().join(name)
    }

    fn stage(&self, name: &str) -> Option<(usize, &Stage)> {
        self.recipe.stages.iter().enumerate().find(|(_, s)| s.name == name)
    }

    /// Catches bad references, unknown keys and wrong types before anything
    /// runs (files are checked by [`Loaded::missing_inputs`], for the stages
    /// that will run).
    pub fn check(&self) -> Result<()> {
        let r = &self.recipe;
        if r.stages.is_empty() {
            bail!("stages: the recipe has no stages");
        }
        match (&r.base_model.preset, &r.base_model.checkpoint) {
            (Some(_), Some(_)) | (None, None) => bail!("base_model: set exactly one of preset or checkpoint"),
            (Some(p), None) => {
                lm::GemmaConfig::preset(p).context("base_model.preset")?;
            }
            _ => {}
        }
        let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in r.stages.iter().enumerate() {
            let at = place(i, &s.name);
            if !seen.insert(s.name.as_str()) {
                bail!("{at}: the name {:?} is used twice", s.name);
            }
            for (field, n) in references(s) {
                let spec = field == "config.judge";
                let (j, t) = match self.stage(&n) {
                    Some(x) => x,
                    // `lm:`/`reward:` judges name a stage or a directory.
                    None if spec => continue,
                    None => bail!("{at}: {field} = {n:?} names no stage (stages: {names:?})"),
                };
                if j == i {
                    bail!(
                        "{at}: {field} = {n:?} refers to the stage itself, which would be a cycle; \
                         a stage can only use the outputs of stages before it"
                    );
                }
                if j > i {
                    if let Some((back, _)) = references(t).into_iter().find(|(_, m)| *m == s.name) {
                        bail!(
                            "{at}: {field} = {n:?} and {}: {back} = {:?} form a cycle; a stage can only \
                             use the outputs of stages before it",
                            place(j, &t.name),
                            s.name
                        );
                    }
                    bail!(
                        "{at}: {field} = {n:?} comes later ({}); a stage can only use the outputs of \
                         stages before it: move {n:?} before {:?} or refer to an earlier stage",
                        place(j, &t.name),
                        s.name
                    );
                }
                let wanted = match field.as_str() {
                    "reward" => vec![Kind::Reward],
                    "config.judge"
                        if s.config
                            .get("judge")
                            .and_then(|v| v.as_str())
                            .is_some_and(|j| j.starts_with("reward:")) =>
                    {
                        vec![Kind::Reward]
                    }
                    _ => vec![Kind::Pretrain, Kind::Sft, Kind::Rl, Kind::Sweep],
                };
                if !wanted.contains(&t.kind) {
                    bail!(
                        "{at}: {field} = {n:?} is a {} stage; it must name a {} stage",
                        format!("{:?}", t.kind).to_lowercase(),
                        wanted.iter().map(|k| format!("{k:?}").to_lowercase()).collect::<Vec<_>>().join(", ")
                    );
                }
            }
            if let Some(d) = &s.data {
                if !r.data.contains_key(d) {
                    bail!(
                        "{at}: data = {d:?} is not in [data] (known: {:?})",
                        r.data.keys().collect::<Vec<_>>()
                    );
                }
            }
            let needs = |what: &str, v: bool| {
                if v {
                    Ok(())
                } else {
                    Err(anyhow!("{at}: a {} stage needs {what}", format!("{:?}", s.kind).to_lowercase()))
                }
            };
            match s.kind {
                Kind::Pretrain | Kind::Sft => needs("data", s.data.is_some())?,
                Kind::Reward => needs("data", s.data.is_some())?,
                Kind::Rl => {
                    needs("data", s.data.is_some())?;
                    needs(
                        "reward (a reward stage) or config.reward",
                        s.reward.is_some() || s.config.contains_key("reward"),
                    )?;
                }
                Kind::Judge => {
                    needs("candidate and baseline", s.candidate.is_some() && s.baseline.is_some())?
                }
                Kind::Sweep => {
                    needs("data", s.data.is_some())?;
                    needs("baseline", s.baseline.is_some())?;
                }
                Kind::Tokenizer => {}
            }
            self.validate_config(i)?;
        }
        Ok(())
    }

    /// Types a stage's config (with the runner's additions) as `T`. Errors
    /// name the key path under `prefix` (`stages[2] "sft".config.max_steps:
    /// …`), or the `[data.NAME]` entry for keys of the stage's data.
    pub(crate) fn typed_stage<T: serde::de::DeserializeOwned>(
        &self,
        i: usize,
        t: toml::Table,
        prefix: &str,
    ) -> Result<T> {
        let s = &self.recipe.stages[i];
        typed_path(toml::Value::Table(t)).map_err(|(p, msg)| {
            let data_key =
                p.strip_prefix("data").filter(|rest| rest.is_empty() || rest.starts_with(['.', '[']));
            match (data_key, &s.data) {
                (Some(rest), Some(d)) => anyhow!("data.{d}{rest}: {msg} (the data of {})", place(i, &s.name)),
                _ => anyhow!("{}: {msg}", join_path(prefix, &p)),
            }
        })
    }

    /// Types a stage's config the way running it will (with placeholder
    /// paths), so unknown keys and wrong types surface before any work.
    fn validate_config(&self, i: usize) -> Result<()> {
        let s = &self.recipe.stages[i];
        let at = format!("{}.config", place(i, &s.name));
        let x = || toml::Value::String("placeholder".into());
        let with = |t: &toml::Table, extra: Vec<(&str, toml::Value)>| {
            let mut t = t.clone();
            for (k, v) in extra {
                t.entry(k.to_string()).or_insert(v);
            }
            t
        };
        match s.kind {
            Kind::Pretrain => {
                let t = with(
                    &s.config,
                    vec![
                        ("model", x()),
                        ("output_dir", x()),
                        ("mode", toml::Value::String("pretrain".into())),
                        ("text_files", toml::Value::Array(vec![x()])),
                    ],
                );
                self.typed_stage::<sft::SftConfig>(i, t, &at)?.validate().with_context(|| at.clone())
            }
            Kind::Sft => {
                let t = with(
                    &s.config,
                    vec![("model", x()), ("output_dir", x()), ("data", data_value(self, &s.data)?)],
                );
                self.typed_stage::<sft::SftConfig>(i, t, &at)?.validate().with_context(|| at.clone())
            }
            Kind::Reward => {
                let t = with(
                    &s.config,
                    vec![("model", x()), ("output_dir", x()), ("data", data_value(self, &s.data)?)],
                );
                self.typed_stage::<reward::RewardConfig>(i, t, &at)?.validate().with_context(|| at.clone())
            }
            Kind::Rl => {
                let mut oracle = toml::Table::new();
                oracle.insert("kind".into(), toml::Value::String("oracle".into()));
                let t = with(
                    &s.config,
                    vec![
                        ("model", x()),
                        ("output_dir", x()),
                        ("data", data_value(self, &s.data)?),
                        ("reward", toml::Value::Table(oracle)),
                    ],
                );
                self.typed_stage::<rl::RlConfig>(i, t, &at)?.validate().with_context(|| at.clone())
            }
            Kind::Sweep => crate::recipe_ext::check_sweep(self, i),
            Kind::Judge => crate::recipe_ext::check_judge(self, i),
            Kind::Tokenizer => Ok(()),
        }
    }

    /// The input files and directories the given stages read that do not
    /// exist, one message each naming the place in the recipe. `builtin:`
    /// specs and paths inside the output directory (written by earlier
    /// stages) are not checked.
    pub fn missing_inputs(&self, run: &[usize]) -> Vec<String> {
        let out_dir = self.out_dir();
        let stages = &self.recipe.stages;
        let mut wanted: Vec<(String, PathBuf, &str)> = vec![];
        let file = |spec: &str| (!spec.starts_with("builtin:")).then(|| self.base.join(spec));
        let runs = |k: Kind| run.iter().any(|&i| stages[i].kind == k);
        let tok = &self.recipe.tokenizer;
        if let Some(f) = &tok.file {
            if runs(Kind::Tokenizer) || runs(Kind::Pretrain) {
                wanted.push(("tokenizer.file".into(), self.base.join(f), "file"));
            }
        } else if runs(Kind::Tokenizer) {
            for (k, spec) in tok.train_on.iter().enumerate() {
                if let Some(p) = file(spec) {
                    wanted.push((format!("tokenizer.train_on[{k}]"), p, "file"));
                }
            }
        }
        if let Some(c) = &self.recipe.base_model.checkpoint {
            let c = self.base.join(c);
            let user = run.iter().find(|&&i| {
                let k = stages[i].kind;
                (k.makes_model() || k == Kind::Reward) && self.input_model(i) == c
            });
            if let Some(&i) = user {
                let what =
                    format!("base_model.checkpoint (the model {} starts from)", place(i, &stages[i].name));
                wanted.push((what, c, "directory"));
            }
        }
        for &i in run {
            let s = &stages[i];
            let at = place(i, &s.name);
            if let Some(t) = s.data.as_ref().and_then(|d| self.recipe.data.get(d).map(|t| (d, t))) {
                let (d, t) = t;
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
            for (what, p, noun) in crate::recipe_ext::input_paths(self, i) {
                wanted.push((format!("{at}: {what}"), p, noun));
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

    /// The model directory a stage produces.
    pub fn model_of(&self, name: &str) -> PathBuf {
        self.stage_dir(name).join("model")
    }

    /// The model a stage starts from: `from`, else the previous
    /// model-producing stage, else the base model.
    pub fn input_model(&self, i: usize) -> PathBuf {
        let s = &self.recipe.stages[i];
        if let Some(f) = &s.from {
            return self.model_of(f);
        }
        let prev = self.recipe.stages[..i].iter().rev().find(|t| t.kind.makes_model());
        match (prev, &self.recipe.base_model.checkpoint) {
            (Some(t), _) => self.model_of(&t.name),
            (None, Some(c)) => self.base.join(c),
            (None, None) => self.out_dir().join("base-model"),
        }
    }

    fn tokenizer_path(&self) -> PathBuf {
        match &self.recipe.tokenizer.file {
            Some(f) => self.base.join(f),
            None => self.out_dir().join("tokenizer.json"),
        }
    }
}

/// What a data source's path names: a file (it has an extension), or a
/// directory of shards.
fn data_noun(src: &toml::Value) -> &'static str {
    match src.get("path").and_then(|p| p.as_str()).map(|p| Path::new(p).extension().is_some()) {
        Some(true) => "file",
        _ => "directory",
    }
}

/// The stages a stage refers to, as (field, name): `from`, `reward`,
/// `candidate`, `baseline`, and an `lm:`/`reward:` judge in its config
/// (which may name a directory instead of a stage).
pub fn references(s: &Stage) -> Vec<(String, String)> {
    let mut out = vec![];
    for (f, v) in
        [("from", &s.from), ("reward", &s.reward), ("candidate", &s.candidate), ("baseline", &s.baseline)]
    {
        if let Some(n) = v {
            out.push((f.to_string(), n.clone()));
        }
    }
    if matches!(s.kind, Kind::Judge | Kind::Sweep) {
        if let Some((kind, rest)) =
            s.config.get("judge").and_then(|v| v.as_str()).and_then(|j| j.split_once(':'))
        {
            if matches!(kind, "lm" | "reward") {
                out.push(("config.judge".to_string(), rest.to_string()));
            }
        }
    }
    out
}

/// What `manifest.json` beside a stage's outputs records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub kind: Kind,
    pub config_hash: String,
    pub completed: bool,
    pub summary: serde_json::Value,
    /// Wall-clock seconds of the run that completed the stage (a resumed
    /// stage counts its last run only).
    #[serde(default)]
    pub seconds: Option<f64>,
}

fn read_manifest(dir: &Path) -> Option<Manifest> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).ok()?).ok()
}

/// The fully resolved description of a stage (what its hash covers): its
/// own settings and inputs, the hash of the stage before it (so that a
/// change reruns that stage and every stage after it), and the version of
/// the built-in task generator (whose `builtin:` specs name data by seed).
fn resolved(l: &Loaded, i: usize) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    let data = s.data.as_ref().map(|d| l.recipe.data[d].clone());
    let upstream = if i == 0 { String::new() } else { lm::train::config_hash(&resolved(l, i - 1)?)? };
    Ok(serde_json::json!({
        "stage": s, "data": data, "input_model": l.input_model(i), "seed": l.recipe.seed,
        "device": l.recipe.device, "tokenizer": l.recipe.tokenizer, "base_model": l.recipe.base_model,
        "upstream": upstream, "builtin_data_version": datasets::tasks::GENERATOR_VERSION,
    }))
}

/// One row of [`status`]: name, kind, state, directory, summary.
pub type StageStatus = (String, Kind, &'static str, PathBuf, serde_json::Value);

/// State of each stage for `--dry-run` and `align status`.
pub fn status(l: &Loaded) -> Result<Vec<StageStatus>> {
    let mut out = vec![];
    for (i, s) in l.recipe.stages.iter().enumerate() {
        let dir = l.stage_dir(&s.name);
        let hash = lm::train::config_hash(&resolved(l, i)?)?;
        let (state, summary) = match read_manifest(&dir) {
            Some(m) if m.completed && m.config_hash == hash => ("done", m.summary),
            Some(m) if m.config_hash != hash => ("stale (config changed)", serde_json::Value::Null),
            _ if dir.join("checkpoints").exists() => ("interrupted (resumes)", serde_json::Value::Null),
            _ => ("pending", serde_json::Value::Null),
        };
        out.push((s.name.clone(), s.kind, state, dir, summary));
    }
    Ok(out)
}

/// Options of `align run`.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    pub stage: Option<String>,
    pub from: Option<String>,
    pub force: bool,
    pub dry_run: bool,
}

fn table_with(base: &toml::Table, extra: &[(&str, toml::Value)]) -> toml::Table {
    let mut t = base.clone();
    for (k, v) in extra {
        t.insert(k.to_string(), v.clone());
    }
    t
}

fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

fn text_docs(l: &Loaded, specs: &[String]) -> Result<Vec<String>> {
    let mut docs = vec![];
    for s in specs {
        if let Some(rest) = s.strip_prefix("builtin:pretrain") {
            let spec = datasets::tasks::parse_spec(&format!("builtin:pretrain{rest}"))?;
            docs.extend(datasets::tasks::pretrain_text(spec.n, spec.seed));
        } else {
            let p = l.base.join(s);
            let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            docs.extend(text.lines().filter(|x| !x.trim().is_empty()).map(String::from));
        }
    }
    if docs.is_empty() {
        bail!("no text in {specs:?}");
    }
    Ok(docs)
}

/// A named `[data]` entry as a mixture table, its paths (and the held-out
/// file's) resolved against the recipe's directory.
pub fn data_value(l: &Loaded, name: &Option<String>) -> Result<toml::Value> {
    let d = name.as_ref().context("no data")?;
    let mut t = l.recipe.data.get(d).with_context(|| format!("no [data.{d}]"))?.clone();
    let fix = |tab: &mut toml::Table| {
        if let Some(p) = tab.get("path").and_then(|p| p.as_str()) {
            let r = datasets::read::resolve(&l.base, Path::new(p));
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

fn run_stage(l: &Loaded, i: usize) -> Result<serde_json::Value> {
    let s = &l.recipe.stages[i];
    let dir = l.stage_dir(&s.name);
    std::fs::create_dir_all(&dir)?;
    let common = |t: &toml::Table| {
        let mut t = t.clone();
        t.entry("seed").or_insert(toml::Value::Integer(l.recipe.seed as i64));
        t.entry("device").or_insert(toml::Value::String(l.recipe.device.clone()));
        t
    };
    let data_table = |name: &Option<String>| data_value(l, name);
    let at = format!("{}.config", place(i, &s.name));
    match s.kind {
        Kind::Tokenizer => {
            let spec = &l.recipe.tokenizer;
            let out = l.tokenizer_path();
            if spec.file.is_none() {
                let docs = text_docs(l, &spec.train_on)?;
                let tok = lm::Tokenizer::train_bpe(docs.iter(), spec.vocab_size)?;
                tok.save(&out)?;
            }
            Ok(serde_json::json!({"tokenizer": out, "vocab": lm::Tokenizer::from_file(&out)?.vocab_size()}))
        }
        Kind::Pretrain => {
            // Initialise the base model when the recipe names a preset.
            let base_model = l.out_dir().join("base-model");
            let init = match (&l.recipe.base_model.preset, &l.recipe.base_model.checkpoint) {
                (Some(p), _) if s.from.is_none() => {
                    let tok = lm::Tokenizer::from_file(&l.tokenizer_path())?;
                    let mut cfg = lm::GemmaConfig::preset(p)?;
                    if !p.starts_with("gemma-") {
                        cfg.vocab_size = (tok.vocab_size() + 63) / 64 * 64;
                    }
                    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
                    let _m = lm::Gemma::new(&vs.root(), &cfg)?;
                    lm::init::init_seeded(&vs, cfg.initializer_range, l.recipe.seed)?;
                    checkpoint::save(&base_model, &vs, &cfg, &tok, &Default::default())?;
                    base_model
                }
                (_, Some(c)) if s.from.is_none() => l.base.join(c),
                _ => l.input_model(i),
            };
            let d = &l.recipe.data[s.data.as_ref().context("no data")?];
            let specs: Vec<String> = d
                .get("text")
                .and_then(|v| v.as_array())
                .context("pretrain data needs `text = [...]`")?
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            let text = dir.join("pretrain.txt");
            checkpoint::write_atomic(&text, text_docs(l, &specs)?.join("\n").as_bytes())?;
            let t = table_with(
                &common(&s.config),
                &[
                    ("model", path_value(&init)),
                    ("output_dir", path_value(&dir)),
                    ("mode", toml::Value::String("pretrain".into())),
                    ("text_files", toml::Value::Array(vec![path_value(&text)])),
                ],
            );
            let cfg: sft::SftConfig = l.typed_stage(i, t, &at)?;
            Ok(serde_json::to_value(sft::run(&cfg, &l.base)?)?)
        }
        Kind::Sft => {
            let t = table_with(
                &common(&s.config),
                &[
                    ("model", path_value(&l.input_model(i))),
                    ("output_dir", path_value(&dir)),
                    ("data", data_table(&s.data)?),
                ],
            );
            let cfg: sft::SftConfig = l.typed_stage(i, t, &at)?;
            Ok(serde_json::to_value(sft::run(&cfg, &l.base)?)?)
        }
        Kind::Reward => {
            let t = table_with(
                &common(&s.config),
                &[
                    ("model", path_value(&l.input_model(i))),
                    ("output_dir", path_value(&dir)),
                    ("data", data_table(&s.data)?),
                ],
            );
            let cfg: reward::RewardConfig = l.typed_stage(i, t, &at)?;
            Ok(serde_json::to_value(reward::run(&cfg, &l.base)?)?)
        }
        Kind::Rl | Kind::Judge | Kind::Sweep => crate::recipe_ext::run_stage(l, i, &dir),
    }
}

/// Runs the recipe (or the selected stages).
pub fn run(l: &Loaded, opts: &RunOptions) -> Result<()> {
    let names: Vec<&str> = l.recipe.stages.iter().map(|s| s.name.as_str()).collect();
    let start = match (&opts.stage, &opts.from) {
        (Some(_), Some(_)) => bail!("use --stage or --from, not both"),
        (Some(n), None) | (None, Some(n)) => names
            .iter()
            .position(|x| x == n)
            .with_context(|| format!("no stage named {n:?} (stages: {names:?})"))?,
        _ => 0,
    };
    let end = if opts.stage.is_some() { start + 1 } else { names.len() };
    let states = status(l)?;
    let will_run = |i: usize| (start..end).contains(&i) && (opts.force || states[i].2 != "done");
    let to_run: Vec<usize> = (0..names.len()).filter(|&i| will_run(i)).collect();
    let missing = l.missing_inputs(&to_run);
    if opts.dry_run {
        println!("recipe {} → {}", l.recipe.name, l.out_dir().display());
        for (i, (name, kind, state, dir, _)) in states.iter().enumerate() {
            println!(
                "  {:<16} {:<9} {:<24} {}  {}",
                name,
                format!("{kind:?}").to_lowercase(),
                state,
                if will_run(i) { "will run" } else { "skip" },
                dir.display()
            );
            if kind.makes_model() || *kind == Kind::Reward {
                println!("      from {}", l.input_model(i).display());
            }
            if *kind == Kind::Sweep {
                println!("      variants: {}", crate::recipe_ext::variant_names(l, i)?.join(", "));
            }
        }
        if !missing.is_empty() {
            println!(
                "warning: {} input(s) of the stages that would run do not exist here; \
                 `align run` stops before any stage until they do:",
                missing.len()
            );
            for m in &missing {
                println!("  - {m}");
            }
        }
        return Ok(());
    }
    if !missing.is_empty() {
        bail!(
            "{} input(s) do not exist, so no stage was run:\n  - {}\n\
             Fix these paths in the recipe (relative paths are read from the recipe's directory, {}), or see the plan with --dry-run.",
            missing.len(),
            missing.join("\n  - "),
            l.base.display()
        );
    }
    #[allow(clippy::needless_range_loop)]
    for i in start..end {
        let s = &l.recipe.stages[i];
        let dir = l.stage_dir(&s.name);
        let hash = lm::train::config_hash(&resolved(l, i)?)?;
        if !opts.force && states[i].2 == "done" {
            eprintln!("== {} ({:?}): done, skipped", s.name, s.kind);
            continue;
        }
        if opts.force || states[i].2.starts_with("stale") {
            // A new configuration starts over (no resume from another config).
            if dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
            }
        }
        eprintln!("== {} ({:?}) → {}", s.name, s.kind, dir.display());
        let t0 = std::time::Instant::now();
        let summary = run_stage(l, i).with_context(|| format!("stage {:?}", s.name))?;
        let seconds = Some(t0.elapsed().as_secs_f64());
        let m = Manifest {
            stage: s.name.clone(),
            kind: s.kind,
            config_hash: hash,
            completed: true,
            summary,
            seconds,
        };
        checkpoint::write_atomic(&dir.join("manifest.json"), serde_json::to_string_pretty(&m)?.as_bytes())?;
        eprintln!("== {} done in {:.0}s", s.name, t0.elapsed().as_secs_f64());
    }
    write_report(l)?;
    Ok(())
}

/// Key figures of a stage summary for the report.
fn key_figures(kind: Kind, s: &serde_json::Value) -> String {
    if s.is_null() {
        return String::new(); // not run, or stale
    }
    let f = |k: &str| s.get(k).and_then(|v| v.as_f64()).map(|v| format!("{v:.4}"));
    let parts: Vec<String> = match kind {
        Kind::Tokenizer => vec![format!("vocab {}", s["vocab"])],
        Kind::Pretrain | Kind::Sft => [
            ("steps", s.get("steps").map(|v| v.to_string())),
            ("final loss", f("final_loss")),
            ("eval loss", f("eval_loss")),
            ("eval ppl", f("eval_ppl")),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k} {v}")))
        .collect(),
        Kind::Reward => {
            let e = &s["eval"];
            vec![
                format!("steps {}", s["steps"]),
                format!("held-out accuracy {:.3}", e["accuracy"].as_f64().unwrap_or(f64::NAN)),
                format!("mean margin {:.3}", e["mean_margin"].as_f64().unwrap_or(f64::NAN)),
            ]
        }
        Kind::Rl | Kind::Judge | Kind::Sweep => crate::recipe_ext::key_figures(kind, s),
    };
    parts.join(", ")
}

/// `95s` → `1m35s`.
fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Writes `report.md` for the whole recipe.
pub fn write_report(l: &Loaded) -> Result<()> {
    let mut md = format!(
        "# {}\n\n| stage | kind | state | time | key figures |\n|---|---|---|---|---|\n",
        l.recipe.name
    );
    let mut pictures = vec![];
    let mut last_model = None;
    let mut total = 0.0;
    for (name, kind, state, dir, summary) in status(l)? {
        let secs = read_manifest(&dir).and_then(|m| m.seconds);
        total += secs.unwrap_or(0.0);
        let time = secs.map_or("–".to_string(), duration);
        md.push_str(&format!("| {name} | {kind:?} | {state} | {time} | {} |\n", key_figures(kind, &summary)));
        for png in ["loss.png", "rl.png", "winrate.png", "leaderboard.png"] {
            if dir.join(png).exists() {
                pictures.push(format!("![{name} {png}]({name}/{png})"));
            }
        }
        if kind.makes_model() && state == "done" {
            last_model = Some(dir.join("model"));
        }
    }
    md.push_str(&format!("\nTotal time of the stage runs: {}.\n\n", duration(total)));
    for p in pictures {
        md.push_str(&format!("{p}\n\n"));
    }
    if let Some(m) = last_model {
        md.push_str(&format!("Final weights: `{}` (a Hugging Face directory).\n", m.display()));
    }
    checkpoint::write_atomic(&l.out_dir().join("report.md"), md.as_bytes())
}

/// `align status RECIPE`.
pub fn print_status(l: &Loaded) -> Result<()> {
    for (name, kind, state, dir, summary) in status(l)? {
        println!("{name:<16} {:<9} {state:<24} {}", format!("{kind:?}").to_lowercase(), dir.display());
        if !summary.is_null() {
            println!("    {}", key_figures(kind, &summary));
        }
    }
    Ok(())
}
