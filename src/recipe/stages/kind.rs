//! The [`StageKind`] trait every kind of stage implements, the context a
//! stage is checked, planned and run in, and helpers the kinds share.

use crate::recipe::load::{place, Loaded, StageSpec};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// What a stage leaves for later stages in `<stage>/model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A causal LM.
    Model,
    /// A reward model.
    RewardModel,
}

/// A reference from a stage to an earlier one: the field that holds it, the
/// name, and what the named stage must make.
pub struct Reference {
    pub field: String,
    pub name: String,
    pub wants: Output,
    /// The name may be a directory instead of a stage (`lm:`/`reward:` judges).
    pub may_be_dir: bool,
}

/// An input file or directory a stage reads: where in the recipe it is
/// named, its path, `"file"` or `"directory"`. A recipe-wide input (the
/// tokenizer file) is named without the stage.
pub struct Input {
    pub what: String,
    pub path: PathBuf,
    pub noun: &'static str,
    pub recipe_wide: bool,
}

impl Input {
    pub fn of_stage(what: impl Into<String>, path: PathBuf, noun: &'static str) -> Input {
        Input { what: what.into(), path, noun, recipe_wide: false }
    }
}

/// A stage as its kind sees it: the recipe, its index, the model it starts
/// from.
pub struct Ctx<'a> {
    pub l: &'a Loaded,
    pub i: usize,
    /// The model the stage starts from: `from`, else the previous
    /// model-producing stage, else the base model.
    pub input_model: PathBuf,
}

impl Ctx<'_> {
    pub fn spec(&self) -> &StageSpec {
        &self.l.recipe.stages[self.i]
    }

    /// `stages[2] "sft"`.
    pub fn at(&self) -> String {
        place(self.i, &self.spec().name)
    }

    /// `stages[2] "sft".config`.
    pub fn config_at(&self) -> String {
        format!("{}.config", self.at())
    }

    /// Fails with `{at}: a {kind} stage needs {what}` unless `ok`.
    pub fn needs(&self, what: &str, ok: bool) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(anyhow!("{}: a {} stage needs {what}", self.at(), self.spec().kind))
        }
    }

    /// Types a config table of this stage (see [`Loaded::typed_stage`]).
    pub fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
        &self,
        t: toml::Table,
        prefix: &str,
    ) -> Result<T> {
        self.l.typed_stage(self.i, t, prefix)
    }

    /// The stage's data as a mixture table, paths resolved.
    pub fn data(&self) -> Result<toml::Value> {
        self.l.data_value(&self.spec().data)
    }

    /// The seed the stage runs with where its config sets none: the seed
    /// of its repetition (`seeds`), else the recipe's.
    pub fn seed(&self) -> u64 {
        self.l.seed_of(self.i)
    }

    /// The stage's config with the recipe's seed (its repetition's, for a
    /// stage repeated over seeds) and device where it sets none.
    pub fn config_with_defaults(&self) -> toml::Table {
        let mut t = self.spec().config.clone();
        t.entry("seed").or_insert(toml::Value::Integer(self.seed() as i64));
        t.entry("device").or_insert(toml::Value::String(self.l.recipe.device.clone()));
        t
    }
}

/// The config of a training stage (SFT and pretraining, reward, RL): its
/// crate's typed config, which the recipe types from the stage's `config`
/// table plus the paths the runner fills in, then validates.
pub trait TrainingConfig: serde::de::DeserializeOwned + serde::Serialize {
    fn validate(&self) -> Result<()>;
}

impl TrainingConfig for sft::SftConfig {
    fn validate(&self) -> Result<()> {
        sft::SftConfig::validate(self)
    }
}

impl TrainingConfig for reward::RewardConfig {
    fn validate(&self) -> Result<()> {
        reward::RewardConfig::validate(self)
    }
}

impl TrainingConfig for rl::RlConfig {
    fn validate(&self) -> Result<()> {
        rl::RlConfig::validate(self)
    }
}

impl Ctx<'_> {
    /// Types and validates the stage's config as `T`, with `fill` (the
    /// runner's keys, placeholders here) where the config sets none.
    pub fn check_config<T: TrainingConfig>(&self, fill: Vec<(&str, toml::Value)>) -> Result<()> {
        let at = self.config_at();
        let t = table_or(&self.spec().config, fill);
        self.typed::<T>(t, &at)?.validate().with_context(|| at.clone())
    }

    /// What [`StageKind::resolved_config`] records for a training stage: the
    /// config with the recipe's defaults and `fill` where it sets none,
    /// typed as `T`, less the runner's keys `drop`.
    pub fn resolved_config_as<T: TrainingConfig>(
        &self,
        fill: Vec<(&str, toml::Value)>,
        drop: &[&str],
    ) -> Option<toml::Table> {
        resolved_as::<T>(self, table_or(&self.config_with_defaults(), fill), drop)
    }

    /// The config the stage's crate runs with: the config with the recipe's
    /// defaults, and `fill` (the runner's keys) replacing what it sets.
    pub fn run_config<T: TrainingConfig>(&self, fill: &[(&str, toml::Value)]) -> Result<T> {
        self.typed(table_with(&self.config_with_defaults(), fill), &self.config_at())
    }

    /// The runner's keys of a stage trained on its `data`: `model`,
    /// `output_dir` and the data mixture.
    pub fn data_stage_fill(
        &self,
        model: toml::Value,
        output_dir: toml::Value,
    ) -> Result<Vec<(&'static str, toml::Value)>> {
        Ok(vec![("model", model), ("output_dir", output_dir), ("data", self.data()?)])
    }
}

/// A kind of stage. The check, plan, run and report parts of the recipe
/// module reach every kind through the registry (`stages::all`) and never
/// name one; each kind types its own `config` table (the judge and sweep
/// with their serde configs, the training stages with their crate's config
/// plus the paths the runner fills in).
pub trait StageKind: Sync {
    /// The name recipes use (`kind = "sft"`).
    fn name(&self) -> &'static str;
    /// The name in the report and the run's log (`Sft`).
    fn title(&self) -> &'static str;
    /// What the stage leaves in `<stage>/model`, if anything.
    fn makes(&self) -> Option<Output> {
        None
    }
    /// References to other stages inside its config (beside the stage's
    /// `from`, `reward`, `candidate` and `baseline`).
    fn config_references(&self, _spec: &StageSpec) -> Vec<Reference> {
        vec![]
    }
    /// Checks the stage before anything runs: what it needs, its config
    /// typed as the run will type it.
    fn check(&self, ctx: &Ctx) -> Result<()>;
    /// The files and directories its config reads (its data is looked at by
    /// the planner).
    fn inputs(&self, _ctx: &Ctx) -> Vec<Input> {
        vec![]
    }
    /// What the check warns about without refusing the stage (a judge that
    /// is the reward its candidate was optimised against); also in the
    /// report.
    fn warnings(&self, _ctx: &Ctx) -> Vec<String> {
        vec![]
    }
    /// The stage's config as its crate reads it, every key with its value
    /// (defaults filled in), less the paths the runner fills in; None
    /// where the kind keeps the config as written (or it cannot be typed).
    fn resolved_config(&self, _ctx: &Ctx) -> Option<toml::Table> {
        None
    }
    /// Extra lines of the dry-run plan (a sweep's variants).
    fn plan_notes(&self, _ctx: &Ctx) -> Result<Vec<String>> {
        Ok(vec![])
    }
    /// Runs the stage into `dir`; its summary goes to the manifest.
    fn run(&self, ctx: &Ctx, dir: &Path) -> Result<serde_json::Value>;
    /// Key figures of a summary for the report row.
    fn figures(&self, summary: &serde_json::Value) -> Vec<String>;
}

impl dyn StageKind {
    /// Whether the stage's output is a causal LM (`<stage>/model`).
    pub fn makes_model(&self) -> bool {
        self.makes() == Some(Output::Model)
    }

    /// Whether the stage starts from a model (every kind that makes one).
    pub fn starts_from_model(&self) -> bool {
        self.makes().is_some()
    }
}

/// Types `t` (the stage's config with the runner's keys) as `T` and gives
/// it back as a table, less the runner's keys `drop`: what
/// [`StageKind::resolved_config`] records.
pub fn resolved_as<T: serde::de::DeserializeOwned + serde::Serialize>(
    ctx: &Ctx,
    t: toml::Table,
    drop: &[&str],
) -> Option<toml::Table> {
    let cfg: T = ctx.typed(t, &ctx.config_at()).ok()?;
    match toml::Value::try_from(&cfg).ok()? {
        toml::Value::Table(mut t) => {
            for k in drop {
                t.remove(*k);
            }
            Some(t)
        }
        _ => None,
    }
}

/// Inserts (replacing) the given keys into a copy of `base`.
pub fn table_with(base: &toml::Table, extra: &[(&str, toml::Value)]) -> toml::Table {
    let mut t = base.clone();
    for (k, v) in extra {
        t.insert(k.to_string(), v.clone());
    }
    t
}

/// Adds the given keys to a copy of `base` where it has none.
pub fn table_or(base: &toml::Table, extra: Vec<(&str, toml::Value)>) -> toml::Table {
    let mut t = base.clone();
    for (k, v) in extra {
        t.entry(k.to_string()).or_insert(v);
    }
    t
}

pub fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

/// A placeholder path for typing a config before the run.
pub fn placeholder() -> toml::Value {
    toml::Value::String("placeholder".into())
}

/// A text spec (file or `builtin:`) that is a file to check: its path.
pub fn spec_file(l: &Loaded, spec: &str) -> Option<PathBuf> {
    (!spec.starts_with("builtin:")).then(|| l.path(spec))
}

/// The documents of text specs: files (one document per non-empty line) or
/// `builtin:pretrain?…` specs.
pub fn text_docs(l: &Loaded, specs: &[String]) -> Result<Vec<String>> {
    let mut docs = vec![];
    for s in specs {
        if let Some(rest) = s.strip_prefix("builtin:pretrain") {
            let spec = datasets::tasks::parse_spec(&format!("builtin:pretrain{rest}"))?;
            docs.extend(datasets::tasks::pretrain_text(spec.n, spec.seed));
        } else {
            let p = l.path(s);
            let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            docs.extend(text.lines().filter(|x| !x.trim().is_empty()).map(String::from));
        }
    }
    if docs.is_empty() {
        bail!("no text in {specs:?}");
    }
    Ok(docs)
}

/// The recipe-wide tokenizer file, when the recipe names one, as an input.
pub fn tokenizer_file(l: &Loaded) -> Vec<Input> {
    l.recipe
        .tokenizer
        .file
        .iter()
        .map(|f| Input { what: "tokenizer.file".into(), path: l.path(f), noun: "file", recipe_wide: true })
        .collect()
}
