//! `align serve` on loopback with the fixture model, a real client, and the
//! `http:` judge against it.

use clap::Parser;
use judge::harness::{cli_judge, JudgeArgs};
use judge::http::{HttpJudge, HttpSettings};
use judge::server::{start, ServerHandle};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/mqa")
}

fn serve() -> ServerHandle {
    let model = lm::checkpoint::load_causal_lm(&fixture(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    start(model, "mqa", 0, 4, 64).unwrap()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn post(url: &str, body: &str) -> (u16, String) {
    let mut r = agent()
        .post(&format!("{url}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn error_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    v["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn validates_completes_and_streams() {
    let h = serve();
    let url = h.url();
    assert!(h.addr.ip().is_loopback());

    let (s, b) = post(&url, "{not json");
    assert_eq!(s, 400);
    assert!(error_message(&b).contains("not valid JSON"));
    let (s, b) =
        post(&url, &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).to_string());
    assert_eq!(s, 404);
    assert!(error_message(&b).contains("gpt-9"));
    let (s, b) = post(&url, &json!({"model": "mqa"}).to_string());
    assert_eq!(s, 400);
    assert!(error_message(&b).contains("messages"));
    let long = "word ".repeat(400);
    let (s, b) =
        post(&url, &json!({"model": "mqa", "messages": [{"role": "user", "content": long}]}).to_string());
    assert_eq!(s, 400);
    assert!(error_message(&b).contains("context"), "{b}");
    let bad_params = [
        json!({"model": "mqa", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
        json!({"model": "mqa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
        json!({"model": "mqa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}),
        json!({"model": "mqa", "messages": [{"role": "robot", "content": "hi"}]}),
        json!({"model": "mqa", "messages": [{"role": "user"}]}),
    ];
    for p in bad_params {
        let (s, b) = post(&url, &p.to_string());
        assert_eq!(s, 400, "{p} -> {b}");
    }
    let mut r = agent().get(&format!("{url}/nope")).call().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let _ = r.body_mut().read_to_string();

    let mut r = agent().get(&format!("{url}/v1/models")).call().unwrap();
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["data"][0]["id"], "mqa");

    let req = json!({"model": "mqa", "messages": [{"role": "user", "content": "Say hi"}],
                     "max_tokens": 8, "temperature": 0});
    let (s, b) = post(&url, &req.to_string());
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (s, b) = post(&url, &sreq.to_string());
    assert_eq!(s, 200);
    let events: Vec<&str> = b.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk");
            v["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(streamed, text, "greedy stream = greedy completion");

    // Concurrent clients after all the malformed requests.
    let results: Vec<(u16, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8).map(|_| s.spawn(|| post(&url, &req.to_string()))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (s, b) in results {
        assert_eq!(s, 200);
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), text);
    }
    h.shutdown();
    // The port is closed after shutdown.
    assert!(agent().get(&format!("{url}/v1/models")).call().is_err());
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: JudgeArgs,
}

#[test]
fn http_judge_against_align_serve() {
    let h = serve();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("prompts.jsonl");
    let c = dir.path().join("c.jsonl");
    let b = dir.path().join("b.jsonl");
    std::fs::write(&p, "{\"prompt\": \"2+2?\"}\n{\"prompt\": \"Red or blue?\"}\n").unwrap();
    std::fs::write(&c, "{\"prompt\": \"2+2?\", \"completion\": \"4\"}\n{\"prompt\": \"Red or blue?\", \"completion\": \"Red\"}\n").unwrap();
    std::fs::write(&b, "{\"prompt\": \"2+2?\", \"completion\": \"5\"}\n{\"prompt\": \"Red or blue?\", \"completion\": \"Blue\"}\n").unwrap();
    let t = dir.path().join("t.txt");
    std::fs::write(&t, "{question}\nA: {answer_a}\nB: {answer_b}\nVerdict [[A]], [[B]] or [[C]]?").unwrap();
    let out = dir.path().join("out");
    let judge = format!("http:{}/v1", h.url());
    let args = Cli::parse_from([
        "judge",
        "--prompts",
        p.to_str().unwrap(),
        "--candidate-answers",
        c.to_str().unwrap(),
        "--baseline-answers",
        b.to_str().unwrap(),
        "--judge",
        &judge,
        "--http-model",
        "mqa",
        "--template",
        t.to_str().unwrap(),
        "--judge-max-new-tokens",
        "6",
        "--max-in-flight",
        "3",
        "--timeout-s",
        "30",
        "--api-key-env",
        "ALIGN_TEST_UNSET_KEY",
        "--out",
        out.to_str().unwrap(),
    ])
    .args;
    cli_judge(args).unwrap();
    let s: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // The tiny random model writes no verdict marker: every verdict is
    // retried once over HTTP and then reported as unparseable.
    assert_eq!(s["retried_verdicts"].as_u64(), Some(4));
    assert_eq!(s["unparseable_verdicts"].as_u64(), Some(4));
    let row: Value = serde_json::from_str(
        std::fs::read_to_string(out.join("judgments.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    assert!(row["candidate_first"]["raw"].is_string());

    // A wrong model name is a 4xx: fails at once with the server's message.
    let settings = HttpSettings {
        model: "other".into(),
        api_key_env: "ALIGN_TEST_UNSET_KEY".into(),
        timeout: Duration::from_secs(10),
        retries: 3,
        backoff: Duration::from_millis(10),
        max_in_flight: 2,
        max_tokens: 4,
        seed: 0,
    };
    let tmpl = judge::template::Template::load("choice").unwrap();
    let j = HttpJudge::new(&h.url(), tmpl.clone(), settings.clone()).unwrap();
    let e = j.complete("hi", 0).unwrap_err().to_string();
    assert!(e.contains("404") && e.contains("other"), "{e}");
    let dead_url = h.url();
    h.shutdown();

    // Nothing listening: retried with backoff, then an error.
    let dead = HttpJudge::new(&dead_url, tmpl, HttpSettings { model: "mqa".into(), ..settings }).unwrap();
    let t0 = std::time::Instant::now();
    let e = dead.complete("hi", 0).unwrap_err().to_string();
    assert!(e.contains("after 3 retries"), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(70), "backoff 10+20+40 ms");
}
