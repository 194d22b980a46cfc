//! `report.md` for a whole recipe and `align status`: each stage's state,
//! time and key figures (each kind says which), pictures, the final weights.

use crate::recipe::load::Loaded;
use crate::recipe::plan::{read_manifest, status, StageStatus};
use crate::recipe::stages::{self, StageKind};
use anyhow::Result;

/// Key figures of a stage summary for the report.
fn key_figures(kind: &dyn StageKind, s: &serde_json::Value) -> String {
    if s.is_null() {
        return String::new(); // not run, or stale
    }
    kind.figures(s).join(", ")
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
    for StageStatus { name, kind, state, dir, summary, .. } in status(l)? {
        let secs = read_manifest(&dir).and_then(|m| m.seconds);
        total += secs.unwrap_or(0.0);
        let time = secs.map_or("–".to_string(), duration);
        md.push_str(&format!(
            "| {name} | {} | {state} | {time} | {} |\n",
            kind.title(),
            key_figures(kind, &summary)
        ));
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
    let warnings = stages::warnings(l);
    if !warnings.is_empty() {
        md.push_str("\n## Warnings\n\n");
        for w in warnings {
            md.push_str(&format!("- {w}\n"));
        }
    }
    lm::fsio::write_atomic(&l.out_dir().join("report.md"), md.as_bytes())
}

/// `align status RECIPE`.
pub fn print_status(l: &Loaded) -> Result<()> {
    for StageStatus { name, kind, state, dir, summary, .. } in status(l)? {
        println!("{name:<16} {:<9} {state:<24} {}", kind.name(), dir.display());
        if !summary.is_null() {
            println!("    {}", key_figures(kind, &summary));
        }
    }
    Ok(())
}
