//! `align run`: the stages selected (`--stage`, `--from`) that are not
//! complete for their resolved configuration, after every check passes and
//! every input they read exists; then the report.

use crate::recipe::load::Loaded;
use crate::recipe::plan::{missing_inputs, print_plan, stage_hash, status, write_settings, Manifest};
use crate::recipe::stages;
use anyhow::{bail, Context, Result};

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
    let states = status(l)?;
    let will_run = |i: usize| (start..end).contains(&i) && (opts.force || states[i].state != "done");
    let to_run: Vec<usize> = (0..names.len()).filter(|&i| will_run(i)).collect();
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
    for &i in &to_run {
        let st = &states[i];
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
    #[allow(clippy::needless_range_loop)]
    for i in start..end {
        let s = &l.recipe.stages[i];
        let kind = stages::of(s);
        let dir = l.stage_dir(&s.name);
        let hash = stage_hash(l, i)?;
        if !opts.force && states[i].state == "done" {
            eprintln!("== {} ({}): done, skipped", s.name, kind.title());
            continue;
        }
        if opts.force || states[i].state.starts_with("stale") {
            // A new configuration starts over (no resume from another config).
            if dir.exists() {
                // Never under a run that holds it (the lock goes with the directory).
                let _lock = lm::output_dir::OutputLock::acquire(&dir)
                    .with_context(|| format!("stage {:?}", s.name))?;
                std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
            }
        }
        eprintln!("== {} ({}) → {}", s.name, kind.title(), dir.display());
        let t0 = std::time::Instant::now();
        let summary = std::fs::create_dir_all(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| kind.run(&stages::ctx(l, i), &dir))
            .with_context(|| format!("stage {:?}", s.name))?;
        let seconds = Some(t0.elapsed().as_secs_f64());
        write_settings(l, i, &dir)?;
        let m = Manifest {
            stage: s.name.clone(),
            kind: s.kind.clone(),
            config_hash: hash,
            completed: true,
            summary,
            seconds,
        };
        lm::fsio::write_atomic(&dir.join("manifest.json"), serde_json::to_string_pretty(&m)?.as_bytes())?;
        eprintln!("== {} done in {:.0}s", s.name, t0.elapsed().as_secs_f64());
    }
    crate::recipe::report::write_report(l)?;
    Ok(())
}
