//! `report.html` of a whole recipe run, beside `report.md`: one
//! self-contained page (inline CSS, pictures as `data:` URIs, no script,
//! nothing loaded from a network) with the stage table and its key figures,
//! links to each judge stage's side-by-side page (`judge::html`), every
//! sweep's leaderboard with links to its variants' pages, and the training
//! curves the stages drew. Every text from the recipe or the stages is
//! escaped.

use crate::recipe::load::Loaded;
use crate::recipe::plan::{read_manifest, status, StageStatus};
use crate::recipe::stages;
use anyhow::Result;
use judge::html::{ensure_judge_page, escape, page, png_data_uri};
use std::path::Path;

/// The pictures a stage may draw, in the order shown, with what they show.
const PICTURES: [(&str, &str); 4] = [
    ("loss.png", "training curves"),
    ("rl.png", "RL curves"),
    ("winrate.png", "win rate by category"),
    ("leaderboard.png", "sweep leaderboard"),
];

/// `95s` → `1m35s`.
fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// A relative path as an `href`: `/`-separated, every byte but the
/// unreserved ones percent-encoded (a variant named `lr=1e-3,n=2` or `a#b`
/// stays one path).
fn href(rel: &Path) -> String {
    let mut out = String::new();
    for (k, part) in rel.iter().enumerate() {
        if k > 0 {
            out.push('/');
        }
        for b in part.to_string_lossy().bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// A link to the side-by-side page of the judge run in `dir` (written from
/// its files when an older run left none), `None` when there is no page;
/// marked "(incomplete)" for a stage not done (a judge that failed
/// half-way leaves a page of what it judged) and "(stale)" for outputs of
/// other settings.
fn judge_link(out: &Path, dir: &Path, text: &str, state: &str) -> Option<String> {
    match ensure_judge_page(dir) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            eprintln!("warning: no side-by-side page for {}: {e:#}", dir.display());
            return None;
        }
    }
    let rel = dir.strip_prefix(out).unwrap_or(dir).join("report.html");
    let note = match state {
        "done" => "",
        s if s.starts_with("stale") => " (stale)",
        _ => " (incomplete)",
    };
    Some(format!("<a href=\"{}\">{}{note}</a>", escape(&href(&rel)), escape(text)))
}

/// `rl seed 2` for one seed's row, the stage's name otherwise.
fn row_name(st: &StageStatus) -> String {
    match st.seed {
        Some(seed) => format!("{} seed {seed}", st.name),
        None => st.name.clone(),
    }
}

fn pct(v: &serde_json::Value) -> String {
    v.as_f64().filter(|x| x.is_finite()).map_or("–".into(), |x| format!("{:.1}%", 100.0 * x))
}

/// A sweep's leaderboard as a table, each variant linking to its page.
fn leaderboard(out: &Path, st: &StageStatus) -> Option<String> {
    let board = st.summary["leaderboard"].as_array()?;
    let mut h = format!(
        "<h3>{} <span class=\"muted\">winner: {}</span></h3>\n<table class=\"leaderboard\">\n<thead><tr><th \
         class=\"num\">rank</th><th>variant</th><th class=\"num\">win rate</th><th class=\"num\">95% CI</th>\
         <th class=\"num\">n</th><th>side by side</th></tr></thead>\n<tbody>\n",
        escape(&row_name(st)),
        escape(st.summary["winner"].as_str().unwrap_or("?"))
    );
    for (r, b) in board.iter().enumerate() {
        let variant = b["variant"].as_str().unwrap_or("?");
        let link = judge_link(out, &st.dir.join("variants").join(variant).join("judge"), "page", &st.state);
        h.push_str(&format!(
            "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{} – {}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>\n",
            r + 1,
            escape(variant),
            pct(&b["win_rate"]),
            pct(&b["lo"]),
            pct(&b["hi"]),
            escape(&b["n"].to_string()),
            link.unwrap_or_default()
        ));
    }
    h.push_str("</tbody>\n</table>\n");
    Some(h)
}

/// The page's body.
fn body(l: &Loaded) -> Result<String> {
    let out = l.out_dir();
    let states = status(l)?;
    let mut h = format!(
        "<main>\n<h1>{}</h1>\n<p class=\"meta\">Recipe run in <code>{}</code>. The same figures are in \
         report.md; each stage's files are in its directory.</p>\n<h2>Stages</h2>\n<table class=\"stages\">\n\
         <thead><tr><th>stage</th><th>kind</th><th>state</th><th class=\"num\">time</th><th>key figures</th>\
         <th>pages</th></tr></thead>\n<tbody>\n",
        escape(&l.recipe.name),
        escape(&out.display().to_string())
    );
    let (mut boards, mut pictures, mut total) = (vec![], vec![], 0.0);
    for st in &states {
        let secs = read_manifest(&st.dir).and_then(|m| m.seconds);
        total += secs.unwrap_or(0.0);
        let figures = if st.summary.is_null() { vec![] } else { st.kind.figures(&st.summary) };
        let link = judge_link(&out, &st.dir, "side by side", &st.state);
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"fig\">{}</td><td>{}</td></tr>\n",
            escape(&row_name(st)),
            escape(st.kind.title()),
            escape(&st.state),
            secs.map_or("–".to_string(), duration),
            escape(&figures.join(", ")),
            link.unwrap_or_default()
        ));
        if let Some(b) = leaderboard(&out, st) {
            boards.push(b);
        }
        for (png, what) in PICTURES {
            if let Some(uri) = png_data_uri(&st.dir.join(png))? {
                pictures.push(format!(
                    "<figure><img alt=\"{name} {what}\" src=\"{uri}\"><figcaption>{name}: {what} \
                     (<code>{png}</code>)</figcaption></figure>\n",
                    name = escape(&row_name(st))
                ));
            }
        }
    }
    h.push_str(&format!(
        "</tbody>\n</table>\n<p class=\"muted\">Total time of the stage runs: {}.</p>\n",
        duration(total)
    ));
    if !boards.is_empty() {
        h.push_str("<h2>Sweep leaderboard</h2>\n");
        h.push_str(&boards.concat());
    }
    if !pictures.is_empty() {
        h.push_str("<h2>Curves and charts</h2>\n<div class=\"curves\">\n");
        h.push_str(&pictures.concat());
        h.push_str("</div>\n");
    }
    let warnings = stages::warnings(l);
    if !warnings.is_empty() {
        h.push_str("<h2>Warnings</h2>\n<ul>\n");
        for w in warnings {
            h.push_str(&format!("<li>{}</li>\n", escape(&w)));
        }
        h.push_str("</ul>\n");
    }
    h.push_str("</main>");
    Ok(h)
}

/// Writes `report.html` for the whole recipe beside `report.md`.
pub fn write_run_page(l: &Loaded) -> Result<()> {
    let html = page(&l.recipe.name, &body(l)?, None);
    lm::fsio::write_atomic(&l.out_dir().join("report.html"), html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::href;
    use std::path::Path;

    #[test]
    fn hrefs_keep_each_name_one_path_part() {
        assert_eq!(href(Path::new("judge/report.html")), "judge/report.html");
        assert_eq!(
            href(Path::new("sw/variants/lr=1e-3,n=2/judge/report.html")),
            "sw/variants/lr%3D1e-3%2Cn%3D2/judge/report.html"
        );
        assert_eq!(href(Path::new("a b#c?/x")), "a%20b%23c%3F/x");
    }
}
