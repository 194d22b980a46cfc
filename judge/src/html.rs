//! `report.html`: one self-contained page per judge run, to look at the
//! evidence rather than read it.
//!
//! The page carries its CSS and JavaScript inline and loads nothing (no
//! CDN, font, image or script from anywhere), so it opens from disk, from a
//! CI artifact or on a machine without a network. Every judgment and the
//! summary are embedded as JSON in a `<script type="application/json">`
//! block, escaped by [`script_json`] so that no answer can end the block;
//! the script draws the page from it and puts every piece of data in
//! through `textContent` or attribute values, never as markup. Model
//! answers are untrusted text: an answer holding `<script>` or `</td>`
//! shows as those characters.
//!
//! It shows the win rates overall and per category with their intervals,
//! position agreement, the answer lengths (and how often the longer answer
//! won), oracle and human agreement when known; then every prompt, filtered
//! by category, outcome, "the two orders disagree" and a search over
//! prompts and answers, sorted by length difference, each row opening to
//! both answers side by side, the verdicts in both orders with the judge's
//! raw outputs, and the oracle's outcome. The filters live in the URL
//! fragment (`#cat=math&outcome=loss&disagree=1&q=…&sort=len-desc&open=0,3`),
//! so a view can be linked to.
//!
//! The helpers ([`escape`], [`script_json`], [`png_data_uri`], [`STYLE`])
//! also serve the page of a whole recipe run (`align run`'s `report.html`).

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;

/// The pages' shared style sheet.
pub const STYLE: &str = include_str!("html/style.css");
/// The judge page's script.
const SCRIPT: &str = include_str!("html/judge.js");

/// `s` as HTML text or a quoted attribute value: `&`, `<`, `>`, `"` and
/// `'` as character references.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `v` as JSON that can sit inside a `<script>` element: `<`, `>` and `&`
/// (which JSON has only inside strings) as `\u003c`, `\u003e`, `\u0026`,
/// so that no `</script>` or `<!--` can appear, and the line separators
/// U+2028/U+2029 as escapes too. `JSON.parse` reads it back unchanged.
pub fn script_json(v: &impl Serialize) -> Result<String> {
    let text = serde_json::to_string(v)?;
    let mut out = String::with_capacity(text.len() + text.len() / 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A PNG file as a `data:` URI (for an `<img src>`), `None` when the file
/// does not exist.
pub fn png_data_uri(path: &Path) -> Result<Option<String>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(format!("data:image/png;base64,{}", base64(&bytes))))
}

/// A whole page: `title`, the style sheet, `body` (markup the caller has
/// escaped) and an optional script.
pub fn page(title: &str, body: &str, script: Option<&str>) -> String {
    let script = script.map_or(String::new(), |s| format!("<script>\n{s}</script>\n"));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; \
         style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n\
         <title>{}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n{body}\n{script}</body>\n</html>\n",
        escape(title)
    )
}

/// The judge page of the judgments `rows` and their `summary` (the
/// harness's `Judgment`s and `Summary`, or anything serialised alike).
/// `total`: `None` for a finished run; `Some(n)` for a run that has judged
/// `rows.len()` of `n` prompts so far (the page says it is incomplete).
pub fn judge_page(rows: &[impl Serialize], summary: &impl Serialize, total: Option<usize>) -> Result<String> {
    let rows: Vec<Value> = rows.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
    judge_page_of(&serde_json::to_value(summary)?, &rows, total)
}

/// [`judge_page`] of the summary and judgments as JSON, as `summary.json`
/// and `judgments.jsonl` hold them.
pub fn judge_page_of(summary: &Value, rows: &[Value], total: Option<usize>) -> Result<String> {
    let data = json!({
        "summary": summary,
        "rows": rows,
        "complete": total.is_none(),
        "judged": rows.len(),
        "total": total.unwrap_or(rows.len()),
    });
    let name = |k: &str| summary[k].as_str().unwrap_or("?").to_string();
    let title = format!("Side-by-side: {} vs {}", name("candidate"), name("baseline"));
    let body = format!(
        "<main id=\"app\"></main>\n<noscript>This page draws its tables with JavaScript; the same data \
         is in judgments.jsonl and summary.json beside it.</noscript>\n\
         <script type=\"application/json\" id=\"data\">{}</script>",
        script_json(&data)?
    );
    Ok(page(&title, &body, Some(SCRIPT)))
}

/// Writes `report.html` into `out` (atomically): see [`judge_page`].
pub fn write_judge_page(
    out: &Path,
    rows: &[impl Serialize],
    summary: &impl Serialize,
    total: Option<usize>,
) -> Result<()> {
    let html = judge_page(rows, summary, total)?;
    lm::fsio::write_atomic(&out.join("report.html"), html.as_bytes())
}

/// Writes `report.html` into a judge run's directory from its
/// `summary.json` and `judgments.jsonl` when it has none (a run made before
/// the page existed). Whether the directory has a page now.
pub fn ensure_judge_page(dir: &Path) -> Result<bool> {
    let page = dir.join("report.html");
    if page.is_file() {
        return Ok(true);
    }
    let (sp, jp) = (dir.join("summary.json"), dir.join("judgments.jsonl"));
    if !sp.is_file() || !jp.is_file() {
        return Ok(false);
    }
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let summary: Value =
        serde_json::from_str(&read(&sp)?).with_context(|| format!("{} is not JSON", sp.display()))?;
    let rows: Vec<Value> = read(&jp)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}", jp.display(), i + 1)))
        .collect::<Result<_>>()?;
    lm::fsio::write_atomic(&page, judge_page_of(&summary, &rows, None)?.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_json_cannot_end_the_script_block() {
        let v = serde_json::json!({"a": "</script><script>alert(1)</script><!-- & \u{2028}\u{2029}"});
        let s = script_json(&v).unwrap();
        for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
            assert!(!s.contains(bad), "{bad:?} in {s}");
        }
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn escape_covers_text_and_attributes() {
        assert_eq!(escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x10]), "//4AEA==");
    }
}
