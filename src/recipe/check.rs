//! Checks of a loaded recipe before anything runs: the base model, stage
//! names, references between stages (no cycles, no later stages, the right
//! kind), named data, then each stage's own check by its kind (what it
//! needs, its config typed as the run will type it). Input files are
//! checked by the planner, for the stages that will run.

use crate::recipe::load::{place, Loaded};
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
