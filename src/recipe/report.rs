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

/// A figure cut into its text and its numbers: `win rate 66.2% [62.1,
/// 70.0]` → texts `["win rate ", "% [", ", ", "]"]`, numbers `["66.2",
/// "62.1", "70.0"]`. A number is digits with an optional sign and
/// fraction, not glued to a letter or a dash before it (`seed-0`, `e-3`
/// stay text).
fn split_numbers(f: &str) -> (Vec<String>, Vec<String>) {
    let b = f.as_bytes();
    let (mut texts, mut numbers, mut cur) = (vec![], vec![], String::new());
    let mut k = 0;
    while k < b.len() {
        let glued = k > 0 && (b[k - 1].is_ascii_alphanumeric() || matches!(b[k - 1], b'-' | b'_' | b'.'));
        let sign = b[k] == b'-' && b.get(k + 1).is_some_and(|c| c.is_ascii_digit());
        if (b[k].is_ascii_digit() || sign) && !glued {
            let start = k;
            k += usize::from(sign);
            while k < b.len() && b[k].is_ascii_digit() {
                k += 1;
            }
            if k + 1 < b.len() && b[k] == b'.' && b[k + 1].is_ascii_digit() {
                k += 1;
                while k < b.len() && b[k].is_ascii_digit() {
                    k += 1;
                }
            }
            texts.push(std::mem::take(&mut cur));
            numbers.push(f[start..k].to_string());
        } else {
            let c = f[k..].chars().next().unwrap_or(' ');
            cur.push(c);
            k += c.len_utf8();
        }
    }
    texts.push(cur);
    (texts, numbers)
}

/// The mean and the standard deviation (n − 1) of `v`.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// The key figures of a stage repeated over seeds, one list per seed, as
/// one list: each number that differs between seeds as `mean ± std` (the
/// standard deviation over seeds, n − 1), at the precision the figures
/// give it; numbers the seeds share as they are. A figure the seeds do not
/// all give alike is left out.
pub fn seed_figures(per_seed: &[Vec<String>]) -> Vec<String> {
    let Some(first) = per_seed.first() else { return vec![] };
    if per_seed.len() == 1 {
        return first.clone();
    }
    let mut out = vec![];
    for (p, f0) in first.iter().enumerate() {
        let (texts, nums0) = split_numbers(f0);
        let split: Vec<(Vec<String>, Vec<String>)> =
            per_seed.iter().filter_map(|figs| figs.get(p)).map(|f| split_numbers(f)).collect();
        if split.len() != per_seed.len() || split.iter().any(|(t, n)| *t != texts || n.len() != nums0.len()) {
            continue;
        }
        let mut text = texts[0].clone();
        for (slot, t) in texts[1..].iter().enumerate() {
            let values: Vec<&String> = split.iter().map(|(_, n)| &n[slot]).collect();
            if values.iter().all(|v| *v == values[0]) {
                text.push_str(values[0]);
            } else {
                let decimals = values.iter().map(|v| v.split_once('.').map_or(0, |(_, d)| d.len())).max();
                let decimals = decimals.unwrap_or(0);
                let x: Vec<f64> = values.iter().filter_map(|v| v.parse().ok()).collect();
                let (mean, std) = mean_std(&x);
                text.push_str(&format!("{mean:.decimals$} ± {std:.decimals$}"));
            }
            text.push_str(t);
        }
        out.push(text);
    }
    out
}

/// `rl seed 2` for one seed's row, the stage's name otherwise.
fn row_name(st: &StageStatus) -> String {
    match st.seed {
        Some(seed) => format!("{} seed {seed}", st.name),
        None => st.name.clone(),
    }
}

/// The report row of a stage repeated over seeds, before its seeds' rows:
/// how many seeds are done, their total time, their figures' means and
/// spreads.
fn seeds_row(rows: &[&StageStatus]) -> Option<String> {
    let first = rows.first()?;
    first.seed?;
    let done: Vec<&&StageStatus> = rows.iter().filter(|st| st.state == "done").collect();
    let state = if done.len() == rows.len() {
        "done".to_string()
    } else {
        format!("{} of {} seeds done", done.len(), rows.len())
    };
    let secs: Option<f64> =
        rows.iter().filter_map(|st| read_manifest(&st.dir).and_then(|m| m.seconds)).reduce(|a, b| a + b);
    let per_seed: Vec<Vec<String>> = done.iter().map(|st| first.kind.figures(&st.summary)).collect();
    let seeds: Vec<String> = done.iter().filter_map(|st| st.seed.map(|s| s.to_string())).collect();
    let figures = match seeds.len() {
        0 => String::new(),
        1 => format!("seed {}: {}", seeds[0], seed_figures(&per_seed).join(", ")),
        _ => format!("mean ± std over seeds {}: {}", seeds.join(", "), seed_figures(&per_seed).join(", ")),
    };
    Some(format!(
        "| **{} ({} seeds)** | {} | {state} | {} | {figures} |\n",
        first.name,
        rows.len(),
        first.kind.title(),
        secs.map_or("–".to_string(), duration)
    ))
}

/// Writes `report.md` for the whole recipe. A stage repeated over seeds has
/// a row with the mean ± standard deviation of its figures over the seeds
/// done, then a row per seed.
pub fn write_report(l: &Loaded) -> Result<()> {
    let mut md = format!(
        "# {}\n\n| stage | kind | state | time | key figures |\n|---|---|---|---|---|\n",
        l.recipe.name
    );
    let mut pictures = vec![];
    // The models of the last stage that made one (one per seed).
    let (mut last_model, mut last_stage): (Vec<std::path::PathBuf>, Option<usize>) = (vec![], None);
    let mut total = 0.0;
    let states = status(l)?;
    for (k, st) in states.iter().enumerate() {
        if st.seed.is_some() && (k == 0 || states[k - 1].i != st.i) {
            let rows: Vec<&StageStatus> = states.iter().filter(|x| x.i == st.i).collect();
            md.push_str(&seeds_row(&rows).unwrap_or_default());
        }
        let StageStatus { kind, state, dir, summary, .. } = st;
        let name = row_name(st);
        let secs = read_manifest(dir).and_then(|m| m.seconds);
        total += secs.unwrap_or(0.0);
        let time = secs.map_or("–".to_string(), duration);
        md.push_str(&format!(
            "| {name} | {} | {state} | {time} | {} |\n",
            kind.title(),
            key_figures(*kind, summary)
        ));
        let rel = dir.strip_prefix(l.out_dir()).unwrap_or(dir);
        for png in ["loss.png", "rl.png", "winrate.png", "leaderboard.png"] {
            if dir.join(png).exists() {
                pictures.push(format!("![{name} {png}]({}/{png})", rel.display()));
            }
        }
        if kind.makes_model() && state == "done" {
            if last_stage != Some(st.i) {
                last_model.clear();
                last_stage = Some(st.i);
            }
            last_model.push(dir.join("model"));
        }
    }
    md.push_str(&format!("\nTotal time of the stage runs: {}.\n", duration(total)));
    if states.iter().any(|st| st.seed.is_some()) {
        md.push_str(
            "\nA stage repeated over seeds (`seeds = [...]`) has a row in bold with each figure's mean \
             ± standard deviation (n − 1) over the seeds done, then a row per seed.\n",
        );
    }
    md.push('\n');
    for p in pictures {
        md.push_str(&format!("{p}\n\n"));
    }
    match last_model.as_slice() {
        [] => {}
        [m] => md.push_str(&format!("Final weights: `{}` (a Hugging Face directory).\n", m.display())),
        more => {
            let list: Vec<String> = more.iter().map(|m| format!("`{}`", m.display())).collect();
            md.push_str(&format!(
                "Final weights, one per seed: {} (Hugging Face directories).\n",
                list.join(", ")
            ));
        }
    }
    let warnings = stages::warnings(l);
    if !warnings.is_empty() {
        md.push_str("\n## Warnings\n\n");
        for w in warnings {
            md.push_str(&format!("- {w}\n"));
        }
    }
    lm::fsio::write_atomic(&l.out_dir().join("report.md"), md.as_bytes())?;
    crate::recipe::html::write_run_page(l)
}

/// `align status RECIPE`.
pub fn print_status(l: &Loaded) -> Result<()> {
    for st in status(l)? {
        let StageStatus { kind, state, dir, summary, .. } = &st;
        println!("{:<16} {:<9} {state:<24} {}", row_name(&st), kind.name(), dir.display());
        if !summary.is_null() {
            println!("    {}", key_figures(*kind, summary));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_cut_from_the_text_around_them() {
        let (_, n) = split_numbers("reward 0.5 → -1.25");
        assert_eq!(n, ["0.5", "-1.25"]);
        let (t, n) = split_numbers("win rate 66.2% [62.1, 70.0] over 210 prompts");
        assert_eq!(n, ["66.2", "62.1", "70.0", "210"]);
        assert_eq!(t, ["win rate ", "% [", ", ", "] over ", " prompts"]);
        let (t, n) = split_numbers("winner seed-0 x2 (74.3% vs baseline, 2 variants)");
        assert_eq!(n, ["74.3", "2"]);
        assert_eq!(t[0], "winner seed-0 x2 (");
    }

    #[test]
    fn seed_figures_give_mean_and_std_where_seeds_differ() {
        let per_seed = vec![
            vec!["steps 100".to_string(), "win rate 60.0% [55.0, 65.0]".to_string()],
            vec!["steps 100".to_string(), "win rate 62.0% [57.0, 67.0]".to_string()],
            vec!["steps 100".to_string(), "win rate 64.0% [59.0, 69.0]".to_string()],
        ];
        assert_eq!(seed_figures(&per_seed), ["steps 100", "win rate 62.0 ± 2.0% [57.0 ± 2.0, 67.0 ± 2.0]"]);
        // A figure not given alike by every seed is left out; one seed is itself.
        let odd = vec![vec!["a 1".to_string(), "b 2".to_string()], vec!["a 3".to_string()]];
        assert_eq!(seed_figures(&odd), ["a 2 ± 1"]);
        assert_eq!(seed_figures(&odd[1..]), ["a 3"]);
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12 && (s - 1.2909944487358056).abs() < 1e-12);
    }
}
