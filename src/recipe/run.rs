//! `align run`: the stages selected (`--stage`, `--from`) that are not
//! complete for their resolved configuration, after every check passes and
//! every input they read exists; then the report.

use crate::recipe::load::Loaded;
use crate::recipe::plan::{missing_inputs, print_plan, stage_hash, status, write_settings, Manifest};
use crate::recipe::stages;
use anyhow::{bail, Context, Result};
use std::path::Path;

pub use crate::recipe::check::load;
pub use crate::recipe::report::print_status;

/// Options of `align run`.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    pub stage: Option<String>,
    pub from: Option<String>,
    pub force: bool,
    pub dry_run: bool,
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
    // One row per stage, or per seed of a stage repeated over seeds.
    let states = status(l)?;
    let will_run = |k: usize| {
        let st = &states[k];
        (start..end).contains(&st.i) && (opts.force || st.state != "done")
    };
    let mut to_run: Vec<usize> = (0..states.len()).filter(|&k| will_run(k)).map(|k| states[k].i).collect();
    to_run.dedup();
    let missing = missing_inputs(l, &to_run);
    if opts.dry_run {
        return print_plan(l, &states, &will_run, &missing);
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
    // Say what a rerun changes back (a `--set` run's settings) before
    // anything runs.
    for st in (0..states.len()).filter(|&k| will_run(k)).map(|k| &states[k]) {
        if !st.changed.is_empty() {
            eprintln!(
                "note: stage {:?}: its outputs in {} were made with other settings; this run \
                 changes {} and reruns it",
                st.name,
                st.dir.display(),
                st.changed.join(", ")
            );
        }
    }
    for (k, st) in states.iter().enumerate() {
        let i = st.i;
        if !(start..end).contains(&i) {
            continue;
        }
        let lv = l.with_seed(st.seed);
        let s = &l.recipe.stages[i];
        let kind = stages::of(s);
        let dir = st.dir.clone();
        let name = match st.seed {
            Some(seed) => format!("{} seed {seed}", s.name),
            None => s.name.clone(),
        };
        if !will_run(k) {
            eprintln!("== {name} ({}): done, skipped", kind.title());
            continue;
        }
        clear_other_form(&l.stage_dir(&s.name), s.seeds.is_some())
            .with_context(|| format!("stage {:?}", s.name))?;
        let hash = stage_hash(&lv, i)?;
        if opts.force || st.state.starts_with("stale") {
            // A new configuration starts over (no resume from another config).
            if dir.exists() {
                // Never under a run that holds it (the lock goes with the directory).
                let _lock = lm::output_dir::OutputLock::acquire(&dir)
                    .with_context(|| format!("stage {:?}", s.name))?;
                std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
            }
        }
        eprintln!("== {name} ({}) → {}", kind.title(), dir.display());
        let t0 = std::time::Instant::now();
        let summary = std::fs::create_dir_all(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| kind.run(&stages::ctx(&lv, i), &dir))
            .with_context(|| format!("stage {name:?}"))?;
        let seconds = Some(t0.elapsed().as_secs_f64());
        write_settings(&lv, i, &dir)?;
        let m = Manifest {
            stage: s.name.clone(),
            kind: s.kind.clone(),
            config_hash: hash,
            completed: true,
            summary,
            seconds,
        };
        lm::fsio::write_atomic(&dir.join("manifest.json"), serde_json::to_string_pretty(&m)?.as_bytes())?;
        eprintln!("== {name} done in {:.0}s", t0.elapsed().as_secs_f64());
    }
    crate::recipe::report::write_report(l)?;
    Ok(())
}

/// Whether `name` is the directory of one seed's outputs (`seed-3`).
fn is_seed_dir(name: &str) -> bool {
    name.strip_prefix("seed-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A stage's directory holds either the outputs of one run or one
/// directory per seed. Before a stage runs, the other form's outputs, left
/// by a run of the recipe with (or without) `seeds`, are removed: for a
/// stage repeated over seeds, the files of a run without seeds; for one
/// without, the seed directories. Never under a run that holds them.
fn clear_other_form(dir: &Path, seeded: bool) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let lock_name = lm::output_dir::LOCK_FILE;
    let other: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n != lock_name && is_seed_dir(&n) != seeded
        })
        .map(|e| e.path())
        .collect();
    if other.is_empty() {
        return Ok(());
    }
    let _lock = lm::output_dir::OutputLock::acquire(dir)?;
    eprintln!(
        "note: removing the outputs of a run {} seeds in {}",
        if seeded { "without" } else { "with" },
        dir.display()
    );
    for p in other {
        if p.is_dir() {
            // A seed's directory may be held by a run of its own.
            let _seed_lock = if seeded { None } else { Some(lm::output_dir::OutputLock::acquire(&p)?) };
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        } else {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    Ok(())
}
