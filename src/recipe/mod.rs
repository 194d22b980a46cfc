//! Recipes: one TOML file naming a base model, a tokenizer, named data and an
//! ordered list of stages, each referring to earlier stages by name.
//!
//! `align run RECIPE` resolves every stage into the typed config of its
//! crate (the stage's `config` table plus the paths the runner fills in:
//! `model`, `output_dir`, `data`, …), checks references before anything
//! runs, and runs the stages in order. A stage whose outputs are complete for
//! the same resolved configuration (hash in `manifest.json` beside its
//! outputs) is skipped; an interrupted stage resumes from its last
//! checkpoint (the stages do that themselves). A stage with `seeds = [...]`
//! runs once per seed into `<stage>/seed-<seed>/` (each seed with its own
//! manifest, skipped or resumed on its own; [`load::Loaded::with_seed`] is
//! the recipe seen from one seed), a later stage with seeds pairs with it
//! seed by seed, and the report gives mean ± std over the seeds.
//!
//! The parts, by concern; the arrows run `run → {check, plan, report} →
//! stages (the registry) → stages/* → the stage crates`, and every part uses
//! `load`, which uses none:
//!
//! - [`load`] — the TOML file and `--set` overrides → `Recipe { stages:
//!   Vec<StageSpec> }`; typing tables with errors that name the key.
//! - [`check`] — everything that can be checked before a stage runs.
//! - [`plan`] — each stage's state and hash, missing inputs, the dry run.
//! - [`run`] — `align run`.
//! - [`report`] — `report.md` and `align status`.
//! - [`html`] — `report.html` of the run (stages, pages of the judges,
//!   leaderboards, curves), written with `report.md`.
//! - [`stages`] — the registry of stage kinds, one file per kind behind the
//!   `StageKind` trait.

mod check;
mod html;
mod load;
mod plan;
mod report;
mod run;
mod stages;

pub use run::{load, print_status, run, RunOptions};
