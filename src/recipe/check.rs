//! Checks of a loaded recipe before anything runs: the base model, stage
//! names, references between stages (no cycles, no later stages, the right
//! kind), named data, then each stage's own check by its kind (what it
//! needs, its config typed as the run will type it). Input files are
//! checked by the planner, for the stages that will run.

use crate::recipe::load::{place, Loaded, StageSpec};
use crate::recipe::stages;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Reads a recipe, applies the overrides and checks it.
pub fn load(path: &Path, sets: &[String]) -> Result<Loaded> {
    let l = crate::recipe::load::load(path, sets, &stages::names())?;
    check(&l).with_context(|| format!("recipe {}", path.display()))?;
    for w in stages::warnings(&l) {
        eprintln!("warning: {w}");
    }
    Ok(l)
}

/// Catches bad references, unknown keys and wrong types before anything
/// runs.
pub fn check(l: &Loaded) -> Result<()> {
    let r = &l.recipe;
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
        for reference in stages::references(s) {
            let (field, n) = (&reference.field, &reference.name);
            let (j, t) = match l.stage(n) {
                Some(x) => x,
                // `lm:`/`reward:` judges name a stage or a directory.
                None if reference.may_be_dir => continue,
                None => bail!("{at}: {field} = {n:?} names no stage (stages: {names:?})"),
            };
            if j == i {
                bail!(
                    "{at}: {field} = {n:?} refers to the stage itself, which would be a cycle; \
                     a stage can only use the outputs of stages before it"
                );
            }
            if j > i {
                if let Some(back) = stages::references(t).into_iter().find(|b| b.name == s.name) {
                    bail!(
                        "{at}: {field} = {n:?} and {}: {} = {:?} form a cycle; a stage can only \
                         use the outputs of stages before it",
                        place(j, &t.name),
                        back.field,
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
            if stages::of(t).makes() != Some(reference.wants) {
                bail!(
                    "{at}: {field} = {n:?} is a {} stage; it must name a {} stage",
                    t.kind,
                    stages::makers(reference.wants).join(", ")
                );
            }
            check_seed_pairing(&at, s, &format!("{field} = {n:?}"), t)?;
        }
        if let Some(seeds) = &s.seeds {
            check_seeds(&at, s, seeds)?;
        }
        // The model a stage starts from without `from`: the previous
        // model-producing stage's, one per seed if it is repeated.
        if s.from.is_none() && stages::of(s).starts_from_model() {
            if let Some(t) = r.stages[..i].iter().rev().find(|t| stages::of(t).makes_model()) {
                let what = format!(
                    "the model it starts from (no `from`: that of {:?}, the previous stage that makes one)",
                    t.name
                );
                check_seed_pairing(&at, s, &what, t)?;
            }
        }
        if let Some(d) = &s.data {
            if !r.data.contains_key(d) {
                bail!("{at}: data = {d:?} is not in [data] (known: {:?})", r.data.keys().collect::<Vec<_>>());
            }
        }
        stages::of(s).check(&stages::ctx(l, i))?;
    }
    Ok(())
}

/// A stage `s` that uses the outputs of `t` (`what` says how): when `t` is
/// repeated over seeds, `s` must be too, over some of `t`'s seeds; each seed
/// of `s` then uses the same seed's outputs of `t`.
fn check_seed_pairing(at: &str, s: &StageSpec, what: &str, t: &StageSpec) -> Result<()> {
    let Some(theirs) = &t.seeds else { return Ok(()) };
    match &s.seeds {
        None => bail!(
            "{at}: {what}: {:?} is repeated over seeds {theirs:?}, so it has one output per seed; \
             give this stage `seeds = {theirs:?}` too (it then runs once per seed, each with the same \
             seed's {:?})",
            t.name,
            t.name
        ),
        Some(ours) => match ours.iter().find(|x| !theirs.contains(x)) {
            Some(x) => bail!(
                "{at}.seeds: seed {x} is not one of the seeds {:?} is repeated over ({theirs:?}); each \
                 seed of this stage uses the same seed's outputs of {:?} ({what})",
                t.name,
                t.name
            ),
            None => Ok(()),
        },
    }
}

/// A stage's `seeds` list: not empty, no seed twice, no `seed` in its
/// config beside it, a kind whose outputs can be repeated.
fn check_seeds(at: &str, s: &StageSpec, seeds: &[u64]) -> Result<()> {
    if seeds.is_empty() {
        bail!(
            "{at}.seeds is empty: list the seeds to repeat the stage over (`seeds = [0, 1, 2]`), or \
             remove the key to run it once with the recipe's seed"
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(x) = seeds.iter().find(|x| !seen.insert(**x)) {
        bail!("{at}.seeds: seed {x} is listed twice ({seeds:?}); list each seed once");
    }
    if let Some(v) = s.config.get("seed") {
        bail!(
            "{at}: config.seed = {v} and seeds = {seeds:?} both set the stage's seed; each run of \
             `seeds` has its seed, so remove config.seed"
        );
    }
    if stages::of(s).makes().is_none() && s.candidate.is_none() {
        bail!(
            "{at}.seeds: a {} stage cannot be repeated over seeds (it has one output for the whole \
             recipe); remove `seeds`",
            s.kind
        );
    }
    Ok(())
}
