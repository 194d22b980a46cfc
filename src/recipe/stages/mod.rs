//! The registry of stage kinds: every kind, one file each, behind the
//! [`StageKind`] trait. The check, plan, run and report parts of the recipe
//! module reach the kinds only through here.

mod judge;
mod kind;
mod pretrain;
mod reward;
mod rl;
mod sft;
mod sweep;
mod tokenizer;

pub use kind::{Ctx, Input, Output, Reference, StageKind};

use crate::recipe::load::{Loaded, StageSpec};
use std::path::PathBuf;

/// Every kind, in the order messages list them.
static KINDS: [&dyn StageKind; 7] = [
    &tokenizer::Tokenizer,
    &pretrain::Pretrain,
    &sft::Sft,
    &reward::Reward,
    &rl::Rl,
    &judge::Judge,
    &sweep::Sweep,
];

/// The names of the kinds (`kind = "…"` in a recipe).
pub fn names() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name()).collect()
}

/// The kind of a stage. The loader let through only the names of
/// [`names`].
pub fn of(spec: &StageSpec) -> &'static dyn StageKind {
    KINDS.iter().copied().find(|k| k.name() == spec.kind).unwrap_or(&UNKNOWN)
}

/// Stands in for a kind the loader would have refused.
struct Unknown;

static UNKNOWN: Unknown = Unknown;

impl StageKind for Unknown {
    fn name(&self) -> &'static str {
        "unknown"
    }
    fn title(&self) -> &'static str {
        "Unknown"
    }
    fn check(&self, ctx: &Ctx) -> anyhow::Result<()> {
        anyhow::bail!("{}.kind: unknown kind {:?}", ctx.at(), ctx.spec().kind)
    }
    fn run(&self, ctx: &Ctx, _dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
        self.check(ctx)?;
        Ok(serde_json::Value::Null)
    }
    fn figures(&self, _summary: &serde_json::Value) -> Vec<String> {
        vec![]
    }
}

/// The model a stage starts from: `from`, else the previous
/// model-producing stage, else the base model.
pub fn input_model(l: &Loaded, i: usize) -> PathBuf {
    let s = &l.recipe.stages[i];
    if let Some(f) = &s.from {
        return l.model_of(f);
    }
    let prev = l.recipe.stages[..i].iter().rev().find(|t| of(t).makes_model());
    match (prev, &l.recipe.base_model.checkpoint) {
        (Some(t), _) => l.model_of(&t.name),
        (None, Some(c)) => l.path(c),
        (None, None) => l.out_dir().join("base-model"),
    }
}

/// Stage `i` as its kind sees it.
pub fn ctx(l: &Loaded, i: usize) -> Ctx<'_> {
    Ctx { l, i, input_model: input_model(l, i) }
}

/// The stages a stage refers to: `from`, `reward`, `candidate`, `baseline`,
/// and those in its config (an `lm:`/`reward:` judge, which may name a
/// directory instead).
pub fn references(s: &StageSpec) -> Vec<Reference> {
    let mut out = vec![];
    for (f, v) in
        [("from", &s.from), ("reward", &s.reward), ("candidate", &s.candidate), ("baseline", &s.baseline)]
    {
        if let Some(n) = v {
            let wants = if f == "reward" { Output::RewardModel } else { Output::Model };
            out.push(Reference { field: f.to_string(), name: n.clone(), wants, may_be_dir: false });
        }
    }
    out.extend(of(s).config_references(s));
    out
}

/// Every stage's warnings (see [`StageKind::warnings`]), in stage order.
pub fn warnings(l: &Loaded) -> Vec<String> {
    (0..l.recipe.stages.len()).flat_map(|i| of(&l.recipe.stages[i]).warnings(&ctx(l, i))).collect()
}

/// The names of the kinds that make `what`, for messages.
pub fn makers(what: Output) -> Vec<&'static str> {
    KINDS.iter().filter(|k| k.makes() == Some(what)).map(|k| k.name()).collect()
}
