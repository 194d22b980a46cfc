//! The `http:` judge against a fake OpenAI-compatible server (axum in the
//! test) that fails on purpose, counts requests in flight, checks the
//! API key and answers with a verdict.

mod common;
use clap::Parser;
use common::{answer_file_args, read_jsonl, summary, write_jsonl, Cli};
use judge::harness::cli_judge;
use judge::http::{HttpJudge, HttpSettings};
use judge::pairwise::{Judge, Shown};
use judge::template::Template;
use judge::verdict::Verdict;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the fake server saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    authorization: Mutex<Vec<Option<String>>>,
}

struct Fake {
    url: String,
    seen: Arc<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

#[derive(Clone)]
struct FakeState {
    seen: Arc<Seen>,
    failures: Arc<Vec<u16>>,
    delay: Duration,
    answer: fn(&str) -> String,
}

async fn fake_completion(
    axum::extract::State(st): axum::extract::State<FakeState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> (axum::http::StatusCode, String) {
    let seen = &st.seen;
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let n = seen.requests.fetch_add(1, Ordering::SeqCst);
    let auth = headers.get("Authorization").map(|v| v.to_str().unwrap().to_string());
    seen.authorization.lock().unwrap().push(auth);
    tokio::time::sleep(st.delay).await;
    let (status, reply) = match st.failures.get(n) {
        Some(&s) => (s, json!({"error": {"message": format!("try again ({s})")}})),
        None => {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["model"], "fake-judge");
            let prompt = v["messages"][0]["content"].as_str().unwrap();
            (
                200,
                json!({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": (st.answer)(prompt)}}]}),
            )
        }
    };
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
    (axum::http::StatusCode::from_u16(status).unwrap(), reply.to_string())
}

/// A fake `/v1/chat/completions`: the first `failures.len()` requests get
/// those statuses, later ones `answer(prompt)` as the message content after
/// `delay`. Asynchronous, so that it never limits concurrency itself.
fn fake(failures: Vec<u16>, delay: Duration, answer: fn(&str) -> String) -> Fake {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let state = FakeState { seen: seen.clone(), failures: Arc::new(failures), delay, answer };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new()
                .route("/v1/chat/completions", axum::routing::post(fake_completion))
                .with_state(state);
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    Fake { url, seen, stop: Some(stop), thread: Some(thread) }
}

fn settings(key_env: &str, retries: u32, max_in_flight: usize) -> HttpSettings {
    HttpSettings {
        model: "fake-judge".into(),
        api_key_env: key_env.into(),
        timeout: Duration::from_secs(20),
        retries,
        backoff: Duration::from_millis(20),
        max_in_flight,
        max_tokens: 16,
        seed: 0,
    }
}

fn template() -> Template {
    Template::parse("t", "{question}\nA: {answer_a}\nB: {answer_b}\nReply [[A]], [[B]] or [[C]].").unwrap()
}

/// Prefers the answer that says "good"; reasons first, as judges do.
fn prefers_good(prompt: &str) -> String {
    let a = prompt.lines().find_map(|l| l.strip_prefix("A: ")).unwrap_or("");
    let b = prompt.lines().find_map(|l| l.strip_prefix("B: ")).unwrap_or("");
    let pick = match (a.contains("good"), b.contains("good")) {
        (true, false) => "[[A]]",
        (false, true) => "[[B]]",
        _ => "[[C]]",
    };
    format!("Both answers address the question. Weighing accuracy, the better one is {pick}")
}

#[test]
fn retries_429_and_5xx_with_backoff_then_succeeds_with_the_api_key() {
    let f = fake(vec![429, 503, 500], Duration::ZERO, prefers_good);
    std::env::set_var("ALIGN_TEST_HTTP_KEY_RETRY", "sk-test-123");
    let j = HttpJudge::new(&format!("{}/v1", f.url), template(), settings("ALIGN_TEST_HTTP_KEY_RETRY", 3, 2))
        .unwrap();
    let t0 = Instant::now();
    let text = j.complete("Q\nA: good\nB: bad", 0).unwrap();
    let took = t0.elapsed();
    assert!(text.ends_with("[[A]]"), "{text}");
    assert_eq!(f.seen.requests.load(Ordering::SeqCst), 4, "three failures, then the answer");
    assert!(took >= Duration::from_millis(20 + 40 + 80), "backoff 20, 40, 80 ms; took {took:?}");
    let auth = f.seen.authorization.lock().unwrap().clone();
    assert_eq!(auth, vec![Some("Bearer sk-test-123".to_string()); 4], "the key on every request");
}

#[test]
fn gives_up_after_the_configured_retries_and_sends_no_key_when_unset() {
    let f = fake(vec![502; 10], Duration::ZERO, prefers_good);
    let j = HttpJudge::new(&f.url, template(), settings("ALIGN_TEST_HTTP_KEY_NEVER_SET", 2, 1)).unwrap();
    let e = j.complete("Q\nA: good\nB: bad", 0).unwrap_err().to_string();
    assert!(e.contains("after 2 retries") && e.contains("502"), "{e}");
    assert_eq!(f.seen.requests.load(Ordering::SeqCst), 3);
    assert!(f.seen.authorization.lock().unwrap().iter().all(Option::is_none));
    // Other 4xx are not retried: the server's message comes back at once.
    let f = fake(vec![401], Duration::ZERO, prefers_good);
    let j = HttpJudge::new(&f.url, template(), settings("ALIGN_TEST_HTTP_KEY_NEVER_SET", 5, 1)).unwrap();
    let e = j.complete("Q", 0).unwrap_err().to_string();
    assert!(e.contains("HTTP 401") && e.contains("try again (401)"), "{e}");
    assert_eq!(f.seen.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn never_more_requests_in_flight_than_configured_and_verdicts_parsed() {
    let f = fake(vec![], Duration::from_millis(80), prefers_good);
    let j = HttpJudge::new(&f.url, template(), settings("ALIGN_TEST_HTTP_KEY_NEVER_SET", 0, 3)).unwrap();
    let prompt: Vec<lm::Message> = vec![lm::Message::user("Q")];
    let answers: Vec<(String, String)> = (0..10)
        .map(|i| if i % 2 == 0 { ("good".into(), "bad".into()) } else { ("bad".into(), "good".into()) })
        .collect();
    let items: Vec<Shown> = answers
        .iter()
        .map(|(a, b)| Shown { question: "Q", prompt: &prompt, answer_a: a, answer_b: b, reference: None })
        .collect();
    let t0 = Instant::now();
    let out = j.judge(&items, 0).unwrap();
    let took = t0.elapsed();
    assert_eq!(f.seen.requests.load(Ordering::SeqCst), 10);
    let most = f.seen.max_in_flight.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} requests in flight, more than 3");
    assert!(most >= 2, "requests ran one at a time ({most} at most)");
    // 10 requests of 80 ms, 3 at a time: at least 4 rounds.
    assert!(took >= Duration::from_millis(4 * 80), "{took:?}");
    for (i, v) in out.iter().enumerate() {
        let want = if i % 2 == 0 { Verdict::A } else { Verdict::B };
        assert_eq!(v.verdict, Some(want), "item {i}: {}", v.raw);
        assert!(v.raw.starts_with("Both answers"));
    }
}

#[test]
fn align_judge_with_parsed_http_verdicts() {
    // One 503 on the way: retried inside the client, not a verdict retry.
    let f = fake(vec![503], Duration::ZERO, prefers_good);
    let dir = tempfile::tempdir().unwrap();
    let (p, c, b) = (dir.path().join("p.jsonl"), dir.path().join("c.jsonl"), dir.path().join("b.jsonl"));
    let qs = ["2+2?", "Red or blue?", "Largest planet?", "Capital of Peru?"];
    write_jsonl(&p, &qs.iter().map(|q| json!({"prompt": q})).collect::<Vec<_>>());
    // The candidate is good on three prompts; on the last both are good (a tie).
    let cand = ["good: 4", "good: red", "good: Jupiter", "good: Lima"];
    let base = ["bad: 5", "bad: green", "bad: Mars", "good: Lima!"];
    write_jsonl(
        &c,
        &qs.iter().zip(cand).map(|(q, a)| json!({"prompt": q, "completion": a})).collect::<Vec<_>>(),
    );
    write_jsonl(
        &b,
        &qs.iter().zip(base).map(|(q, a)| json!({"prompt": q, "completion": a})).collect::<Vec<_>>(),
    );
    let t = dir.path().join("t.txt");
    std::fs::write(&t, "{question}\nA: {answer_a}\nB: {answer_b}\nReply [[A]], [[B]] or [[C]].").unwrap();
    let out = dir.path().join("out");
    let judge = format!("http:{}/v1", f.url);
    let mut argv = vec!["judge"];
    argv.extend(answer_file_args(&p, &c, &b, &out));
    argv.extend([
        "--judge",
        &judge,
        "--http-model",
        "fake-judge",
        "--template",
        t.to_str().unwrap(),
        "--max-in-flight",
        "2",
        "--bootstrap",
        "200",
    ]);
    let args = Cli::parse_from(argv).args;
    cli_judge(args).unwrap();
    assert_eq!(f.seen.requests.load(Ordering::SeqCst), 9, "8 verdicts, one 503 retried");
    let s = summary(&out);
    assert_eq!(s["unparseable_verdicts"].as_u64(), Some(0), "{s}");
    assert_eq!(s["retried_verdicts"].as_u64(), Some(0), "{s}");
    let o = &s["overall"];
    assert_eq!(o["n"].as_u64(), Some(4));
    assert!((o["win_rate"].as_f64().unwrap() - 3.5 / 4.0).abs() < 1e-12, "{o}");
    assert_eq!(o["order_agreement"].as_f64(), Some(1.0));
    let rows = read_jsonl(&out.join("judgments.jsonl"));
    assert_eq!(rows[0]["candidate_first"]["verdict"], "A");
    assert_eq!(rows[0]["baseline_first"]["verdict"], "B");
    assert_eq!(rows[0]["outcome"], "win");
    assert_eq!(rows[3]["outcome"], "tie");
    assert!(rows[0]["candidate_first"]["raw"].as_str().unwrap().ends_with("[[A]]"));
}
