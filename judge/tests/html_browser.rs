//! `report.html` in a real browser: Debian's Chromium, headless, with
//! networking off (every host name resolves to nothing, a proxy that does
//! not exist takes any request). Each test loads the page with a URL
//! fragment that sets the view (`#cat=math`, `#open=3`), lets its script
//! run, and reads the DOM back (`--dump-dom`) and Chromium's console log.
//! Skipped, with a message, where Chromium is not installed (`make
//! chromium` installs it).

mod html_support;
use html_support::*;
use judge::harness::Judgment;
use std::path::{Path, PathBuf};

/// The page of `js` rendered with `fragment`: the DOM after its script ran,
/// with the checks every view must pass (the script finished, no console
/// message, no error, no request).
fn render(bin: &Path, page: &Path, fragment: &str) -> String {
    let b = run_chromium(bin, page, fragment, &["--dump-dom"]);
    let dom = b.stdout;
    assert!(dom.contains("data-ready=\"1\""), "the script did not finish (#{fragment}):\n{}", b.stderr);
    let error = attr(&dom, "body", "data-js-error");
    assert!(error.is_none(), "a script error (#{fragment}): {error:?}");
    let errors = console_errors(&b.stderr);
    assert!(errors.is_empty(), "console messages (#{fragment}):\n{}", errors.join("\n"));
    // Reported, not asserted: timings on a shared machine vary.
    let ms = |k: &str| attr(&dom, "body", k).unwrap_or_else(|| "?".into());
    eprintln!(
        "#{fragment}: loaded {} ms after navigation began (its script drew it in {} ms); chromium ran {:.2} s in all",
        ms("data-loaded-ms"),
        ms("data-render-ms"),
        b.elapsed.as_secs_f64()
    );
    dom
}

/// The value of `name` on the first `<tag …>` of `dom`.
fn attr(dom: &str, tag: &str, name: &str) -> Option<String> {
    let start = dom.find(&format!("<{tag} "))?;
    let end = start + dom[start..].find('>')?;
    let open = &dom[start..end];
    let k = open.find(&format!("{name}=\""))? + name.len() + 2;
    Some(open[k..k + open[k..].find('"')?].to_string())
}

/// The opening tags `<tr class="row…">` of the prompts shown, in order.
fn shown_rows(dom: &str) -> Vec<String> {
    dom.match_indices("<tr class=\"row")
        .map(|(i, _)| dom[i..i + dom[i..].find('>').unwrap()].to_string())
        .collect()
}

fn data_attr(tag: &str, name: &str) -> String {
    let k = tag.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
    tag[k..k + tag[k..].find('"').unwrap()].to_string()
}

fn indices(dom: &str) -> Vec<usize> {
    shown_rows(dom).iter().map(|t| data_attr(t, "data-index").parse().unwrap()).collect()
}

/// `s` as the DOM serialises text.
fn as_text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\u{a0}', "&nbsp;")
}

fn chars(s: &str) -> i64 {
    s.chars().count() as i64
}

#[test]
fn renders_offline_without_console_errors_and_filters_by_category() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let js = judgments(210, 1000, 1500);
    let page = write_page(dir.path(), &js, None);
    let html = std::fs::read_to_string(&page).unwrap();
    eprintln!("report.html of 210 prompts: {} bytes", html.len());
    let dom = render(&bin, &page, "");
    assert_eq!(shown_rows(&dom).len(), 210);
    // Nothing on a network: no URL in the file or in the DOM the script built.
    for text in [&html, &dom] {
        assert!(!text.contains("http://") && !text.contains("https://"));
    }
    assert!(dom.contains("showing 210 of 210 prompts"));
    // Filtering by category shows that category's rows, all of them.
    for cat in ["math", "reverse", "trivia"] {
        let dom = render(&bin, &page, &format!("cat={cat}"));
        let rows = shown_rows(&dom);
        let want: Vec<usize> =
            js.iter().filter(|j| j.category.as_deref() == Some(cat)).map(|j| j.index).collect();
        assert!(rows.iter().all(|t| data_attr(t, "data-category") == cat), "{cat}: {rows:?}");
        assert_eq!(indices(&dom), want, "{cat}");
    }
}

#[test]
fn filters_by_outcome_disagreement_and_search_and_sorts_by_length() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let js = judgments(40, 80, 60);
    let page = write_page(dir.path(), &js, None);
    let outcome = |j: &Judgment| {
        j.result
            .outcome
            .map_or("unparseable".to_string(), |o| serde_json::to_value(o).unwrap().as_str().unwrap().into())
    };
    for o in ["win", "loss", "tie", "unparseable"] {
        let want: Vec<usize> = js.iter().filter(|j| outcome(j) == o).map(|j| j.index).collect();
        assert!(!want.is_empty());
        assert_eq!(indices(&render(&bin, &page, &format!("outcome={o}"))), want, "{o}");
    }
    let want: Vec<usize> =
        js.iter().filter(|j| j.result.orders_agree == Some(false)).map(|j| j.index).collect();
    assert!(!want.is_empty());
    let dom = render(&bin, &page, "disagree=1");
    assert_eq!(indices(&dom), want);
    assert!(shown_rows(&dom).iter().all(|t| data_attr(t, "data-disagree") == "1"));
    // Category and outcome together.
    let want: Vec<usize> = js
        .iter()
        .filter(|j| j.category.as_deref() == Some("trivia") && outcome(j) == "tie")
        .map(|j| j.index)
        .collect();
    assert_eq!(indices(&render(&bin, &page, "cat=trivia&outcome=tie")), want);
    // The search box reads prompts and answers, case aside.
    assert_eq!(indices(&render(&bin, &page, "q=PLAIN%20BASELINE%20answer%203")), [3]);
    assert_eq!(indices(&render(&bin, &page, "q=%3Cb%3Ebold")), [0]);
    // Sorted by length difference, the candidate's longest lead first.
    let mut want: Vec<(i64, usize)> =
        js.iter().map(|j| (chars(&j.candidate) - chars(&j.baseline), j.index)).collect();
    want.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let want: Vec<usize> = want.into_iter().map(|(_, i)| i).collect();
    assert_eq!(indices(&render(&bin, &page, "sort=len-desc")), want);
}

#[test]
fn an_open_row_shows_both_answers_and_the_verdicts_of_both_orders() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let js = judgments(20, 200, 300);
    let page = write_page(dir.path(), &js, None);
    let dom = render(&bin, &page, "");
    assert!(!dom.contains("class=\"detail\""), "rows start closed");
    let dom = render(&bin, &page, "open=9");
    assert_eq!(dom.matches("<tr class=\"detail\"").count(), 1);
    let at = dom.find("<tr class=\"detail\" data-index=\"9\"").expect("row 9 open");
    let detail = &dom[at..at + dom[at..].find("</tr>").unwrap()];
    let j = &js[9];
    for text in
        [&j.prompt, &j.candidate, &j.baseline, &j.result.candidate_first.raw, &j.result.baseline_first.raw]
    {
        assert!(detail.contains(&as_text(text)), "{text:?} not shown");
    }
    let cand = detail.find("class=\"answer candidate\"").unwrap();
    let base = detail.find("class=\"answer baseline\"").unwrap();
    assert!(cand < base, "candidate on the left");
    assert!(detail.contains("Candidate shown first (A)") && detail.contains("Baseline shown first (A)"));
    // Unparseable at first: the first attempt is shown as well.
    assert!(detail.contains("I cannot decide.") && detail.contains("unparseable"));
    assert!(detail.contains("Oracle: "), "the oracle's outcome");
    assert!(detail.contains("Reference: "));
}

#[test]
fn hostile_answers_render_as_text() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut js = judgments(10, 50, 50);
    let big = format!("<i>{}</i> unbalanced <td> end", "x<b>".repeat(25_000)); // over 100 kB
    js[7].baseline = big.clone();
    let page = write_page(dir.path(), &js, None);
    let dom = render(&bin, &page, "open=all");
    assert_eq!(attr(&dom, "body", "data-pwned"), None, "an answer's script ran");
    // The answers made no elements: no image, no heading, no stray cell.
    let body = &dom[dom.find("<main").unwrap()..dom.find("</main>").unwrap()];
    assert!(!body.contains("<img") && !body.contains("<h1 id=\"escaped\"") && !body.contains("<b>"));
    assert_eq!(shown_rows(&dom).len(), 10, "the table holds");
    assert_eq!(dom.matches("<tr class=\"detail\"").count(), 10);
    for h in HOSTILE {
        assert!(body.contains(&format!("<pre>{}</pre>", as_text(h))), "{h:?} not shown as text");
    }
    assert!(body.contains(&format!("<pre>{}</pre>", as_text(&big))), "the 100 kB answer, in full");
    assert!(body.contains("&lt;b&gt;bold?&lt;/b&gt; What is 6 × 7?"), "the prompt as text");
}

#[test]
fn an_incomplete_run_says_so() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let page = write_page(dir.path(), &judgments(12, 40, 40), Some(30));
    let dom = render(&bin, &page, "");
    assert!(dom.contains("id=\"incomplete\""));
    assert!(dom.contains("judging stopped after 12 of 30 prompts"), "the banner");
    assert!(dom.contains("showing 12 of 12 prompts (of 30)"));
}

/// Judgments that look like a real comparison, for the README's picture:
/// the candidate (RL) against the baseline (SFT), judged by an LM that
/// reasons, with the oracle's verdict.
fn showcase() -> Vec<Judgment> {
    use judge::verdict::Verdict::{Tie, A, B};
    let rows = [
        ("add", "Add: 17 + 25", "42", "The answer is 42.", (Some(Tie), Some(Tie)),
         "Both answers give 42, which is correct; the second only adds words. Neither is better."),
        ("reverse", "Reverse: b a d g e", "e g d a b", "e g d b a", (Some(A), Some(B)),
         "Reversing b a d g e gives e g d a b. Answer A matches exactly; answer B swaps the last two letters."),
        ("sort_numbers", "Sort the numbers: 9 2 7 4", "2 4 7 9", "Sure! Here are the numbers in order: 2 4 7 9. Sorting them was easy because each one is different.", (Some(B), Some(A)),
         "Both orders are correct. Answer B explains more, so it is more helpful."),
        ("count", "Count the letters: a b c d e f", "6", "There are 5 letters.", (Some(A), Some(B)),
         "There are six letters. Answer A is right, answer B is wrong."),
        ("upper", "Uppercase: hello world", "HELLO WORLD", "HELLO WORLD", (Some(Tie), Some(Tie)),
         "The two answers are identical."),
        ("sort_letters", "Sort the letters: d b a c", "a b c d", "a b c d d", (Some(A), Some(A)),
         "Answer A is sorted and complete; answer B repeats d. Wait, the first answer shown is better."),
        ("add", "Add: 8 + 5", "13", "The answer is 12.", (Some(A), Some(B)),
         "8 + 5 = 13: the first answer is right."),
        ("reverse", "Reverse: x y z", "z y x", "z y x", (Some(Tie), Some(Tie)), "Same answer."),
    ];
    rows.iter()
        .enumerate()
        .map(|(i, (cat, q, c, b, v, why))| {
            let mut j = judgment(i, cat, q, (c, b), *v, why);
            j.reference = None;
            for o in [&mut j.result.candidate_first, &mut j.result.baseline_first] {
                o.first_raw = None;
            }
            j
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|mut j| {
            // The oracle checks each answer: both sorts are right (a tie
            // the judge called a loss), and so is only A's sort of letters.
            j.oracle_outcome = match j.index {
                2 => Some(judge::stats::Outcome::Tie),
                5 => Some(judge::stats::Outcome::Win),
                _ => j.oracle_outcome,
            };
            j
        })
        .collect()
}

#[test]
fn screenshot_for_the_readme() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let js = showcase();
    let s = judge::harness::summarize_all(
        &js,
        ("lm:runs/quickstart/judge-lm/model", "runs/quickstart/rl/model", "runs/quickstart/sft/model"),
        Some("tasks"),
        2000,
        0,
    );
    judge::html::write_judge_page(dir.path(), &js, &s, None).unwrap();
    let page = dir.path().join("report.html");
    render(&bin, &page, "open=2");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-html.png");
    let _ = std::fs::remove_file(&shot);
    let b = run_chromium(&bin, &page, "open=2", &[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}):\n{}", b.stderr));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000, "an empty picture? {} bytes", png.len());
    eprintln!("screenshot: {}", shot.display());
    // `ALIGN_UPDATE_SCREENSHOT=1` puts it where the README shows it.
    if std::env::var_os("ALIGN_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/report-html.png");
        std::fs::copy(&shot, &docs).unwrap();
        eprintln!("updated {}", docs.display());
    }
}
