//! `report.html` of `align run`: a tiny recipe (tokenizer → pretraining →
//! SFT → a sweep of two variants → a judge stage) writes a page beside
//! `report.md` with the stage table, the pictures as `data:` URIs, links to
//! every judge's side-by-side page and the sweep's leaderboard; nothing on
//! it comes from a network. A judge stage whose judge fails half-way
//! leaves the page of what it judged, marked incomplete. Where Chromium is
//! installed (`make chromium`), the run's page is also opened in it.

mod common;
use common::{align_in, recipe, stderr, write_recipe};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

/// Tokenizer → pretraining → SFT → (where `sweep`) a sweep of two
/// variants → a judge stage with `judge` as its judge.
fn html_recipe(judge: &str, sweep: bool) -> String {
    let sweep = if sweep {
        recipe::sweep(
            "builtin:eval?n=12&seed=6",
            6,
            r#"[{ name = "lr low", set = { "optim.lr" = 1e-4 } }, { name = "lr=high", set = { "optim.lr" = 3e-3 } }]"#,
        )
    } else {
        String::new()
    };
    [
        recipe::tiny("tiny <html> & co", 1, 200),
        recipe::data("sft", Some(0.1), "builtin:sft?n=100&seed=3"),
        recipe::tokenizer_and_base("max_seq_len = 48, batch_size = 8, max_steps = 3, packing = true"),
        recipe::sft("max_seq_len = 48, batch_size = 8, max_steps = 3"),
        sweep,
        recipe::judge(
            "sft",
            "base",
            &[],
            &format!(
                r#"prompts = "builtin:eval?n=12&seed=6", judge = "{judge}", oracle = "tasks", max_new_tokens = 6, max_in_flight = 1, retries = 0"#
            ),
        ),
    ]
    .concat()
}

/// The `href`s of a page, in order.
fn hrefs(html: &str) -> Vec<String> {
    html.match_indices("href=\"")
        .map(|(i, _)| html[i + 6..i + 6 + html[i + 6..].find('"').unwrap()].to_string())
        .collect()
}

/// `%XX` escapes decoded.
fn unpercent(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut k = 0;
    while k < b.len() {
        if b[k] == b'%' && k + 2 < b.len() {
            out.push(u8::from_str_radix(&s[k + 1..k + 3], 16).unwrap());
            k += 3;
        } else {
            out.push(b[k]);
            k += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The JSON a judge page embeds.
fn embedded(html: &str) -> Value {
    let tag = "<script type=\"application/json\" id=\"data\">";
    let start = html.find(tag).unwrap() + tag.len();
    serde_json::from_str(&html[start..start + html[start..].find("</script>").unwrap()]).unwrap()
}

/// Headless Chromium (`$CHROMIUM` or on the PATH), if installed.
fn chromium() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("CHROMIUM").map(Into::into).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("chromium")).find(|c| c.is_file())
    });
    if found.is_none() {
        eprintln!("SKIPPED the browser part: Chromium is not installed (`make chromium` installs it)");
    }
    found
}

#[test]
fn a_recipe_run_writes_a_page_with_its_stages_judges_leaderboard_and_curves() {
    let dir = tempfile::tempdir().unwrap();
    write_recipe(dir.path(), &html_recipe("oracle:tasks", true));
    let out = align_in(dir.path(), &["run", "recipe.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.path().join("out");
    assert!(run.join("report.md").is_file());
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    // Text from the recipe is escaped.
    assert!(html.contains("<h1>tiny &lt;html&gt; &amp; co</h1>"), "{html:.400}");
    for stage in ["tokenizer", "base", "sft", "sweep", "judge"] {
        assert!(html.contains(&format!("<tr><td>{stage}</td>")), "{stage} row");
    }
    assert!(html.contains("win rate "), "the judge's key figures");
    // Links to each judge's page, all there; the sweep's variants by name.
    let links = hrefs(&html);
    assert!(links.contains(&"judge/report.html".to_string()), "{links:?}");
    assert!(links.contains(&"sweep/variants/lr%20low/judge/report.html".to_string()), "{links:?}");
    assert!(links.contains(&"sweep/variants/lr%3Dhigh/judge/report.html".to_string()), "{links:?}");
    for l in &links {
        let page = run.join(unpercent(l));
        assert!(page.is_file(), "{l} → {}", page.display());
        let data = embedded(&std::fs::read_to_string(&page).unwrap());
        assert_eq!(data["complete"], true, "{l}");
    }
    assert!(html.contains("<h2>Sweep leaderboard</h2>") && html.contains("winner: "));
    // The curves, embedded.
    for png in ["loss.png", "winrate.png", "leaderboard.png"] {
        assert!(html.contains(&format!("(<code>{png}</code>)")), "{png}");
    }
    assert!(html.matches("src=\"data:image/png;base64,iVBORw0KGgo").count() >= 4);
    assert!(!html.contains("http://") && !html.contains("https://"), "a network URL");
    assert!(!html.contains("<script"), "no script on the run's page");

    let Some(bin) = chromium() else { return };
    let profile = tempfile::tempdir().unwrap();
    let b = Command::new(bin)
        .args(["--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0"])
        .args(["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", run.join("report.html").display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (dom, log) = (String::from_utf8_lossy(&b.stdout), String::from_utf8_lossy(&b.stderr));
    assert!(dom.contains("Sweep leaderboard"), "{log}");
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("net::ERR_") || l.contains("Refused"))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

/// A fake OpenAI-compatible server: the first `ok` requests get a verdict,
/// later ones are refused (HTTP 400, not retried).
fn fake_judge(ok: usize) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let (status, reply) = if n < ok {
                (
                    "200 OK",
                    json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "[[B]]"}}]}),
                )
            } else {
                ("400 Bad Request", json!({"error": {"message": "quota exceeded"}}))
            };
            let reply = reply.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    url
}

#[test]
fn a_judge_stage_failing_half_way_leaves_a_page_of_what_it_judged() {
    let dir = tempfile::tempdir().unwrap();
    // Chunks of 8 pairs (16 requests, one in flight); the 20th request fails.
    // Only what the judge stage needs: no sweep.
    write_recipe(dir.path(), &html_recipe(&format!("http:{}", fake_judge(19)), false));
    let out = align_in(dir.path(), &["run", "recipe.toml"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("quota exceeded"), "{err}");
    assert!(err.contains("judging failed after 8 of 12 prompts"), "{err}");
    let page = dir.path().join("out/judge/report.html");
    let data = embedded(&std::fs::read_to_string(page).unwrap());
    assert_eq!(data["complete"], false);
    assert_eq!((data["judged"].as_u64(), data["total"].as_u64()), (Some(8), Some(12)));
    assert_eq!(data["rows"].as_array().unwrap().len(), 8);
}
