//! Helpers of the `report.html` tests: judgments made up to cover every
//! case (categories, outcomes, disagreeing orders, retries, hostile text),
//! and headless Chromium.
#![allow(dead_code)]

use judge::harness::{summarize_all, Judgment};
use judge::pairwise::{combine, OrderResult, PairResult};
use judge::verdict::Verdict;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Answers a model might write to break a page.
pub const HOSTILE: [&str; 6] = [
    "<script>document.body.setAttribute('data-pwned','script')</script>",
    "\"><img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
    "</td></tr></table><h1 id=\"escaped\">out of the table</h1>",
    "<div><b>unbalanced <i>tags <!-- never closed",
    "</script><script>document.body.setAttribute('data-pwned','end-script')</script>",
    "ampersands &amp; &lt;entities&gt; and \u{2028}line\u{2029}separators",
];

/// One judgment: verdicts in both orders (None = unparseable).
pub fn judgment(
    index: usize,
    category: &str,
    prompt: &str,
    (candidate, baseline): (&str, &str),
    (cand_first, base_first): (Option<Verdict>, Option<Verdict>),
    raw: &str,
) -> Judgment {
    let (outcome, orders_agree) = combine(cand_first, base_first);
    let order = |v: Option<Verdict>| OrderResult {
        verdict: v,
        raw: format!("{raw} [[{}]]", v.map_or("?", |v| v.letter())),
        first_raw: v.is_none().then(|| "I cannot decide.".to_string()),
    };
    Judgment {
        index,
        category: Some(category.to_string()),
        prompt: prompt.to_string(),
        reference: Some(format!("ref {index}")),
        candidate: candidate.to_string(),
        baseline: baseline.to_string(),
        result: PairResult {
            candidate_first: order(cand_first),
            baseline_first: order(base_first),
            outcome,
            orders_agree,
        },
        oracle_outcome: outcome,
        oracle_scores: None,
        human_outcome: None,
    }
}

/// `n` judgments over three categories with every outcome, disagreeing
/// orders, unparseable verdicts, the hostile answers, and answers of
/// `answer_chars` and judge outputs of `raw_chars` characters.
pub fn judgments(n: usize, answer_chars: usize, raw_chars: usize) -> Vec<Judgment> {
    use Verdict::{Tie, A, B};
    let cats = ["math", "reverse", "trivia"];
    let verdicts =
        [(Some(A), Some(B)), (Some(B), Some(A)), (Some(Tie), Some(Tie)), (Some(A), Some(A)), (None, Some(B))];
    let filler = |seed: usize, len: usize| -> String {
        let words = ["the", "answer", "is", "forty", "two", "because", "we", "add", "numbers", "carefully"];
        let mut s = String::new();
        let mut k = seed;
        while s.len() < len {
            s.push_str(words[k % words.len()]);
            s.push(if k.is_multiple_of(13) { '\n' } else { ' ' });
            k = k.wrapping_mul(31).wrapping_add(7);
        }
        s.truncate(len);
        s
    };
    (0..n)
        .map(|i| {
            let cand = match i {
                i if i < HOSTILE.len() => HOSTILE[i].to_string(),
                _ => filler(i, answer_chars + (i % 7) * 10),
            };
            let base = match i {
                i if i < HOSTILE.len() => format!("plain baseline answer {i}"),
                _ => filler(i + 1, answer_chars.saturating_sub((i % 5) * 10)),
            };
            let prompt = if i == 0 {
                "<b>bold?</b> What is 6 × 7?".to_string()
            } else {
                format!("Question {i}: {}", filler(i + 2, 120))
            };
            judgment(
                i,
                cats[i % 3],
                &prompt,
                (&cand, &base),
                verdicts[i % verdicts.len()],
                &filler(i + 3, raw_chars),
            )
        })
        .collect()
}

/// `report.html` of `js` (complete, or `total` prompts of which `js` were judged) in `dir`.
pub fn write_page(dir: &Path, js: &[Judgment], total: Option<usize>) -> PathBuf {
    let s = summarize_all(js, ("lm:judge", "runs/x/rl/model", "runs/x/sft/model"), Some("exact"), 200, 0);
    judge::html::write_judge_page(dir, js, &s, total).unwrap();
    dir.join("report.html")
}

/// The Chromium binary (`$CHROMIUM`, or `chromium` on the PATH), or a
/// message saying the browser tests are skipped.
pub fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("CHROMIUM").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
                .find(|c| c.is_file())
        })
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED: the browser tests of report.html need Chromium, which is not installed; \
             `make chromium` installs Debian's package (or set CHROMIUM=/path/to/chromium)"
        );
    }
    found
}

/// What one headless Chromium run gave.
pub struct Browser {
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs headless Chromium on `page` (with `#fragment` when not empty) and
/// `what` (`--dump-dom`, `--screenshot=…`), networking off: every host
/// resolves to nothing and a proxy that does not exist takes any request.
pub fn run_chromium(bin: &Path, page: &Path, fragment: &str, what: &[&str]) -> Browser {
    let profile = tempfile::tempdir().unwrap();
    let mut url = format!("file://{}", page.canonicalize().unwrap().display());
    if !fragment.is_empty() {
        url.push('#');
        url.push_str(fragment);
    }
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
        ])
        .arg(if what.iter().any(|w| w.starts_with("--screenshot")) {
            "--window-size=1400,1480"
        } else {
            "--window-size=1400,1000"
        })
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(what)
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("chromium did not finish in 90 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = t0.elapsed();
    Browser { stdout: reader.join().unwrap(), stderr: err_reader.join().unwrap(), elapsed }
}

/// The console messages Chromium logged (`…:CONSOLE…` lines) and any line
/// of an uncaught exception or a failed load.
pub fn console_errors(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| {
            l.contains(":CONSOLE")
                || l.contains("Uncaught")
                || l.contains("Refused to")
                || l.contains("net::ERR_")
                || l.contains("Failed to load")
        })
        .map(String::from)
        .collect()
}
