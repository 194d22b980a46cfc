//! `report.html` without a browser: what the file holds (escaping, size,
//! no network references), that `align judge` writes it, and that a judge
//! failing half-way leaves a page of what it judged, marked incomplete.

mod common;
mod html_support;
use clap::Parser;
use common::{answer_file_args, write_jsonl, Cli};
use html_support::*;
use judge::harness::cli_judge;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};

/// The JSON the page embeds, parsed back.
fn embedded(html: &str) -> Value {
    let start = html.find("<script type=\"application/json\" id=\"data\">").expect("the data block")
        + "<script type=\"application/json\" id=\"data\">".len();
    let end = start + html[start..].find("</script>").expect("the end of the data block");
    serde_json::from_str(&html[start..end]).expect("the data block is JSON")
}

/// No reference to anything on a network: no http(s) URL at all, and
/// `src`/`href` only as `data:` URIs or relative files.
fn assert_offline(html: &str) {
    assert!(!html.contains("http://") && !html.contains("https://"), "a network URL in the page");
    assert!(!html.contains("//cdn") && !html.contains("@import") && !html.contains("url("));
    assert!(!html.contains("<link"), "a <link> element");
    assert!(!html.contains("<script src"), "an external script");
}

#[test]
fn hostile_answers_cannot_end_the_data_block_and_come_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut js = judgments(12, 50, 50);
    let big: String = "<td>".repeat(25_000); // 100 kB of tags
    js[7].candidate = big.clone();
    js[8].baseline = "</script>".repeat(100);
    let page = write_page(dir.path(), &js, None);
    let html = std::fs::read_to_string(&page).unwrap();
    for h in HOSTILE {
        assert!(!html.contains(h), "{h:?} appears unescaped");
    }
    assert!(!html.contains("<td><td>"), "the 100 kB answer appears unescaped");
    // Two scripts (the data, the code), each ended once.
    assert_eq!(html.matches("</script").count(), 2, "a </script> inside the data");
    assert_eq!(html.matches("<script").count(), 2);
    assert!(!html.contains('\u{2028}') && !html.contains('\u{2029}'));
    let data = embedded(&html);
    let rows = data["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 12);
    for (i, h) in HOSTILE.iter().enumerate() {
        assert_eq!(rows[i]["candidate"], *h);
    }
    assert_eq!(rows[7]["candidate"].as_str().unwrap(), big);
    assert_eq!(rows[8]["baseline"].as_str().unwrap(), "</script>".repeat(100));
    assert_eq!(rows[0]["prompt"], "<b>bold?</b> What is 6 × 7?");
    assert_eq!(data["complete"], true);
    assert_offline(&html);
}

#[test]
fn the_page_of_210_prompts_stays_under_2_mb() {
    let dir = tempfile::tempdir().unwrap();
    // Answers of 256 tokens (about 1000 characters) and judges that reason
    // for 512 (about 1500 characters) in each order.
    let page = write_page(dir.path(), &judgments(210, 1000, 1500), None);
    let size = std::fs::metadata(&page).unwrap().len();
    eprintln!("report.html of 210 prompts: {size} bytes");
    assert!(size < 2_000_000, "{size} bytes");
    assert_offline(&std::fs::read_to_string(&page).unwrap());
}

#[test]
fn align_judge_writes_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (p, c, b, out) = (d.join("p.jsonl"), d.join("c.jsonl"), d.join("b.jsonl"), d.join("out"));
    let rows =
        [("2+2?", "math", "4", "4", "5"), ("Capital of France?", "trivia", "Paris", "<b>Paris</b>", "Paris")];
    write_jsonl(&p, &rows.map(|(q, cat, r, _, _)| json!({"prompt": q, "category": cat, "reference": r})));
    write_jsonl(&c, &rows.map(|(q, _, _, a, _)| json!({"prompt": q, "completion": a})));
    write_jsonl(&b, &rows.map(|(q, _, _, _, a)| json!({"prompt": q, "completion": a})));
    let mut v =
        vec!["judge", "--device", "cpu", "--bootstrap", "50", "--judge", "oracle:exact", "--oracle", "exact"];
    v.extend(answer_file_args(&p, &c, &b, &out));
    cli_judge(Cli::parse_from(v).args).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let data = embedded(&html);
    assert_eq!(data["complete"], true);
    assert_eq!(data["rows"][1]["candidate"], "<b>Paris</b>");
    assert_eq!(data["rows"][0]["oracle_outcome"], "win");
    assert_eq!(data["summary"]["overall"]["n"], 2);
    assert!(!html.contains("<b>Paris</b>"));
    // A directory of an older run without a page gets one from its files.
    std::fs::remove_file(out.join("report.html")).unwrap();
    assert!(judge::html::ensure_judge_page(&out).unwrap());
    assert_eq!(embedded(&std::fs::read_to_string(out.join("report.html")).unwrap())["rows"], data["rows"]);
    assert!(!judge::html::ensure_judge_page(d).unwrap(), "no judge run there");
}

/// A fake OpenAI-compatible server: the first `ok` requests are answered
/// with a verdict, every later one is refused (HTTP 400, not retried).
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
                let content = "Answer A is <b>better</b>. [[A]]";
                (
                    "200 OK",
                    json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}),
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
fn a_judge_failing_half_way_leaves_a_page_of_what_it_judged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (p, c, b, out) = (d.join("p.jsonl"), d.join("c.jsonl"), d.join("b.jsonl"), d.join("out"));
    let n = 20;
    let q = |i: usize| format!("Question {i}?");
    write_jsonl(
        &p,
        &(0..n).map(|i| json!({"prompt": q(i), "category": (["a", "b"][i % 2])})).collect::<Vec<_>>(),
    );
    write_jsonl(
        &c,
        &(0..n).map(|i| json!({"prompt": q(i), "completion": format!("cand {i}")})).collect::<Vec<_>>(),
    );
    write_jsonl(
        &b,
        &(0..n).map(|i| json!({"prompt": q(i), "completion": format!("base {i}")})).collect::<Vec<_>>(),
    );
    // One request in flight: chunks of 8 pairs (16 requests); the server
    // answers 20, so the second chunk fails.
    let url = format!("http:{}", fake_judge(20));
    let mut v = vec!["judge", "--bootstrap", "50", "--judge", &url, "--max-in-flight", "1", "--retries", "0"];
    v.extend(answer_file_args(&p, &c, &b, &out));
    let err = cli_judge(Cli::parse_from(v).args).unwrap_err();
    assert!(format!("{err:#}").contains("quota exceeded"), "{err:#}");
    assert!(!out.join("summary.json").exists(), "no summary of a failed run");
    let html = std::fs::read_to_string(out.join("report.html")).expect("a page of what was judged");
    let data = embedded(&html);
    assert_eq!(data["complete"], false);
    assert_eq!((data["judged"].as_u64(), data["total"].as_u64()), (Some(8), Some(n as u64)));
    let rows = data["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    assert_eq!(rows[3]["candidate"], "cand 3");
    // [[A]] in both orders: the orders disagree, a tie.
    assert_eq!(rows[3]["outcome"], "tie");
    assert_eq!(rows[3]["candidate_first"]["raw"], "Answer A is <b>better</b>. [[A]]");
    assert_eq!(data["summary"]["overall"]["n"], 8);
}
