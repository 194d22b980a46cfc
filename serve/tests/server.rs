//! `align serve` on loopback with the fixture model, a real client, and the
//! `http:` judge against it.

mod common;
use clap::Parser;
use judge::harness::{cli_judge, JudgeArgs};
use judge::http::{HttpJudge, HttpSettings};
use serde_json::{json, Value};
use serve::{start, ServerHandle};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/mqa")
}

fn serve() -> ServerHandle {
    serve_with_limit(64)
}

fn serve_with_limit(max_tokens_limit: usize) -> ServerHandle {
    let model = lm::checkpoint::load_causal_lm(&fixture(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    start(model, "mqa", 0, 4, max_tokens_limit).unwrap()
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
    // The Parquet table has the first (unparseable) outputs too.
    let firsts: Vec<Option<String>> = std::fs::read_to_string(out.join("judgments.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["baseline_first"]["first_raw"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(firsts.iter().all(Option::is_some));
    let parquet = out.join("judgments.parquet");
    assert_eq!(common::string_column(&parquet, "first_raw_baseline_first"), firsts);
    assert_eq!(common::string_column(&parquet, "first_raw_candidate_first").iter().flatten().count(), 2);

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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A streaming response read from the socket as it comes.
struct Streamed {
    head: String,
    /// Each SSE event (without `data: `) and the number of the socket read
    /// that completed it.
    events: Vec<(String, usize)>,
}

/// Sends `body` to /v1/chat/completions over HTTP/1.1 and reads the chunked
/// event stream incrementally; with `stop_after_content`, hangs up after the
/// first content event.
fn stream_raw(addr: SocketAddr, body: &str, stop_after_content: bool) -> Streamed {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let (mut raw, mut pos, mut reads) = (Vec::new(), 0, 0);
    let mut head = None;
    let (mut sse, mut events) = (String::new(), vec![]);
    let mut buf = [0u8; 4096];
    'read: loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed the stream before its end");
        reads += 1;
        raw.extend_from_slice(&buf[..n]);
        if head.is_none() {
            let Some(i) = find(&raw, b"\r\n\r\n") else { continue };
            head = Some(String::from_utf8(raw[..i].to_vec()).unwrap());
            pos = i + 4;
        }
        loop {
            let rest = &raw[pos..];
            let Some(eol) = find(rest, b"\r\n") else { continue 'read };
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break 'read;
            }
            if rest.len() < eol + 2 + size + 2 {
                continue 'read;
            }
            sse.push_str(std::str::from_utf8(&rest[eol + 2..eol + 2 + size]).unwrap());
            pos += eol + 2 + size + 2;
            while let Some(j) = sse.find("\n\n") {
                let e = sse[..j].strip_prefix("data: ").expect("an SSE data line").to_string();
                sse.drain(..j + 2);
                let content = e.contains("\"content\"");
                events.push((e, reads));
                if stop_after_content && content {
                    break 'read;
                }
            }
        }
    }
    Streamed { head: head.unwrap(), events }
}

fn delta(event: &str) -> String {
    let v: Value = serde_json::from_str(event).unwrap();
    v["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string()
}

#[test]
fn streams_token_by_token_over_a_socket() {
    let h = serve_with_limit(256);
    let req = json!({"model": "mqa", "messages": [{"role": "user", "content": "Tell me a long story"}],
                     "max_tokens": 160, "temperature": 0});
    let (s, b) = post(&h.url(), &req.to_string());
    assert_eq!(s, 200, "{b}");
    let whole: Value = serde_json::from_str(&b).unwrap();
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let n_tokens = whole["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n_tokens >= 20, "the greedy answer is long enough to stream ({n_tokens} tokens)");

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let t0 = std::time::Instant::now();
    let st = stream_raw(h.addr, &sreq.to_string(), false);
    let head = st.head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked") && head.contains("text/event-stream"), "{head}");
    let (events, last) = st.events.split_at(st.events.len() - 1);
    assert_eq!(last[0].0, "[DONE]");
    let first: Value = serde_json::from_str(&events[0].0).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let fin: Value = serde_json::from_str(&events[events.len() - 1].0).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    let content: Vec<&(String, usize)> = events.iter().filter(|(e, _)| !delta(e).is_empty()).collect();
    assert!(content.len() > 1, "{} content chunks", content.len());
    let streamed: String = content.iter().map(|(e, _)| delta(e)).collect();
    assert_eq!(streamed, text, "the deltas add up to the non-streaming answer");
    // Sent as generated: the content chunks came in over several reads of the
    // socket, not in one piece at the end.
    let mut reads: Vec<usize> = content.iter().map(|(_, r)| *r).collect();
    reads.dedup();
    assert!(reads.len() > 1, "all {} content chunks arrived in one read", content.len());
    eprintln!(
        "{} tokens, {} content chunks over {} reads in {:?}",
        n_tokens,
        content.len(),
        reads.len(),
        t0.elapsed()
    );

    // A client that hangs up mid-stream does not hurt the server.
    let cut = stream_raw(h.addr, &sreq.to_string(), true);
    assert!(cut.events.iter().any(|(e, _)| !delta(e).is_empty()));
    let (s, b) = post(&h.url(), &req.to_string());
    assert_eq!(s, 200);
    let again: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(again["choices"][0]["message"]["content"].as_str(), Some(text.as_str()));

    // An HTTP/1.0 client (no chunked transfer) gets the same events in one body.
    let mut s10 = TcpStream::connect(h.addr).unwrap();
    let body = sreq.to_string();
    write!(
        s10,
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s10.read_to_string(&mut resp).unwrap();
    let (head10, body10) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head10.to_ascii_lowercase().contains("content-length"), "{head10}");
    let streamed10: String = body10
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(delta)
        .collect();
    assert_eq!(streamed10, text);
    assert!(body10.ends_with("data: [DONE]\n\n"));

    // Errors of a streaming request are still plain JSON with a 4xx.
    let mut bad = sreq.clone();
    bad["model"] = json!("other");
    let (s, b) = post(&h.url(), &bad.to_string());
    assert_eq!(s, 404);
    assert!(error_message(&b).contains("other"));
}

#[test]
fn text_deltas_hold_back_incomplete_utf8() {
    let loaded = lm::checkpoint::load_causal_lm(&fixture(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let tok = &loaded.tokenizer;
    let text = "naïve café – 東京 😀 ok";
    let ids = tok.encode(text).unwrap();
    let mut ts = serve::TextStream::new();
    let mut deltas = vec![];
    for &id in &ids {
        deltas.push(ts.push(tok, id).unwrap());
    }
    deltas.push(ts.finish(tok).unwrap());
    assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
    assert_eq!(deltas.concat(), text, "byte-level BPE round trip");
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    // Multi-byte characters span several tokens: some steps had nothing stable.
    assert!(deltas[..ids.len()].iter().any(String::is_empty), "{deltas:?}");
    assert_eq!(ts.text(), text);
    // A sequence cut inside a character ends with the replacement character
    // once finished, as the non-streaming answer does.
    let emoji = tok.encode("😀").unwrap();
    assert!(emoji.len() > 1, "the emoji is several byte tokens: {emoji:?}");
    let mut ts = serve::TextStream::new();
    let mut partial = String::new();
    for &id in &emoji[..emoji.len() - 1] {
        partial.push_str(&ts.push(tok, id).unwrap());
    }
    assert_eq!(partial, "", "held back");
    let rest = ts.finish(tok).unwrap();
    assert_eq!(rest, tok.decode(&emoji[..emoji.len() - 1], true).unwrap());
    assert!(rest.contains('\u{FFFD}'));
}

#[test]
fn max_tokens_defaults_to_what_the_context_leaves() {
    // The limit (512) is above the fixture's context (256 tokens).
    let h = serve_with_limit(512);
    let url = h.url();
    let loaded = lm::checkpoint::load_causal_lm(&fixture(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let ctx = loaded.model.cfg.max_position_embeddings as usize;
    let prompt_len =
        |text: &str| lm::chat::prompt_ids(&loaded.tokenizer, &[lm::Message::user(text)]).unwrap().len();
    // A prompt that leaves a little room: 1 to 12 tokens.
    let mut words = 1;
    while prompt_len(&"ab ".repeat(words + 1)) < ctx {
        words += 1;
    }
    let mut content = "ab ".repeat(words);
    while ctx - prompt_len(&content) > 12 {
        content.push('c');
    }
    let room = ctx - prompt_len(&content);
    assert!((1..=12).contains(&room), "room {room}");
    let msgs = json!([{"role": "user", "content": content}]);

    // Short prompt, no max_tokens: fine (it used to ask for 512 and fail).
    let (s, b) = post(
        &url,
        &json!({"model": "mqa", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
            .to_string(),
    );
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    let used =
        v["usage"]["prompt_tokens"].as_u64().unwrap() + v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used as usize <= ctx);

    // Near-full prompt, no max_tokens: the answer gets what is left.
    for stream in [false, true] {
        let req = json!({"model": "mqa", "messages": msgs, "temperature": 0, "stream": stream});
        let (s, b) = post(&url, &req.to_string());
        assert_eq!(s, 200, "stream {stream}: {b}");
        if !stream {
            let v: Value = serde_json::from_str(&b).unwrap();
            assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some((ctx - room) as u64));
            let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
            match v["choices"][0]["finish_reason"].as_str().unwrap() {
                "length" => assert_eq!(n, room),
                _ => assert!(n < room),
            }
        } else {
            assert!(b.ends_with("data: [DONE]\n\n"), "{b}");
        }
    }
    // An explicit max_tokens that does not fit is a 400 saying how much fits.
    let req = json!({"model": "mqa", "messages": msgs, "max_tokens": room + 1});
    let (s, b) = post(&url, &req.to_string());
    assert_eq!(s, 400);
    let m = error_message(&b);
    assert!(m.contains("context") && m.contains(&format!("at most {room}")), "{m}");
    let req = json!({"model": "mqa", "messages": msgs, "max_tokens": room, "temperature": 0});
    assert_eq!(post(&url, &req.to_string()).0, 200);
    // Over the server's limit: a 400 naming it.
    let req = json!({"model": "mqa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600});
    let (s, b) = post(&url, &req.to_string());
    assert_eq!(s, 400);
    assert!(error_message(&b).contains("limit 512"), "{b}");
    // A prompt that fills the context leaves no room even by default.
    let full = "ab ".repeat(words + 40);
    let req = json!({"model": "mqa", "messages": [{"role": "user", "content": full}]});
    let (s, b) = post(&url, &req.to_string());
    assert_eq!(s, 400);
    assert!(error_message(&b).contains("context"), "{b}");
}

/// Sends `request` on a new connection and reads the reply to its end.
fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(request)?;
    let mut reply = vec![];
    s.read_to_end(&mut reply)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn status_of(reply: &str) -> u16 {
    reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn models_request(addr: SocketAddr) -> Vec<u8> {
    format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes()
}

fn assert_still_answers(h: &ServerHandle) {
    let reply = raw(h.addr, &models_request(h.addr)).unwrap();
    assert_eq!(status_of(&reply), 200, "{reply}");
    let req = json!({"model": "mqa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    assert_eq!(post(&h.url(), &req.to_string()).0, 200);
}

/// Abusive bodies: a declared 10^12 bytes (then a hang-up, and once read
/// back), and a chunked body past the limit. None of them is read or
/// allocated in full, and the server answers the next request.
#[test]
fn huge_bodies_are_refused_before_they_are_read() {
    let h = serve();
    let addr = h.addr;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000000000\r\n\r\n{{\"model\": \"mqa\", "
    );
    // 1. Declares 10^12 bytes, sends a few, hangs up.
    {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Both).unwrap();
    }
    assert_still_answers(&h);
    // 2. The same, waiting for the answer: a 413 in the usual error shape, at once.
    let t0 = std::time::Instant::now();
    let reply = raw(addr, head.as_bytes()).unwrap();
    assert_eq!(status_of(&reply), 413, "{reply}");
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    assert!(error_message(body).contains("over 1048576 bytes"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // 3. Chunked, no declared length: refused once past 1 MiB.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let piece = vec![b' '; 64 * 1024];
    for _ in 0..24 {
        // The server may close as soon as it has refused.
        if write!(s, "{:x}\r\n", piece.len())
            .and_then(|_| s.write_all(&piece))
            .and_then(|_| s.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    let mut reply = vec![];
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.is_empty() || status_of(&reply) == 413, "{reply}");
    drop(s);
    assert_still_answers(&h);
}

/// Idle sockets, headers that never end and bodies that never come are
/// closed after the timeouts, and the server goes on answering.
#[test]
fn idle_and_slow_connections_are_timed_out() {
    let model = lm::checkpoint::load_causal_lm(&fixture(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let mut opts = serve::Options::new("mqa", 0, 2, 64);
    opts.timeouts = serve::Timeouts {
        header_read: Duration::from_millis(300),
        body_read: Duration::from_millis(300),
        write: Duration::from_secs(5),
        close: Duration::from_secs(5),
    };
    let h = serve::start_with(model, opts).unwrap();
    let addr = h.addr;
    let closed_within = |s: &mut TcpStream, limit: Duration| -> String {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut reply = vec![];
        s.read_to_end(&mut reply).expect("the server closed the connection");
        String::from_utf8_lossy(&reply).into_owned()
    };
    // A socket that sends nothing.
    let mut idle = TcpStream::connect(addr).unwrap();
    // Headers that never end.
    let mut partial = TcpStream::connect(addr).unwrap();
    write!(partial, "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\n").unwrap();
    // A body that never comes: a 408.
    let mut slow = TcpStream::connect(addr).unwrap();
    write!(
        slow,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 100\r\n\r\n{{\"model\""
    )
    .unwrap();
    // A keep-alive connection that goes idle after one request.
    let mut kept = TcpStream::connect(addr).unwrap();
    write!(kept, "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();

    assert_eq!(closed_within(&mut idle, Duration::from_secs(10)), "");
    assert_eq!(closed_within(&mut partial, Duration::from_secs(10)), "");
    let reply = closed_within(&mut slow, Duration::from_secs(10));
    assert_eq!(status_of(&reply), 408, "{reply}");
    assert!(error_message(reply.split_once("\r\n\r\n").unwrap().1).contains("did not arrive"), "{reply}");
    let reply = closed_within(&mut kept, Duration::from_secs(10));
    assert_eq!(status_of(&reply), 200, "{reply}");
    assert_still_answers(&h);
}

#[test]
fn zero_workers_or_token_limit_are_refused() {
    let load = || lm::checkpoint::load_causal_lm(&fixture(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let e = start(load(), "mqa", 0, 0, 64).err().expect("--workers 0 is refused").to_string();
    assert!(e.contains("--workers must be at least 1"), "{e}");
    let e = start(load(), "mqa", 0, 2, 0).err().expect("--max-tokens-limit 0 is refused").to_string();
    assert!(e.contains("--max-tokens-limit must be at least 1"), "{e}");
}

/// Shutdown while requests are in progress and others keep arriving: the
/// ones accepted before it are answered in full (200), those that arrive
/// during it get a 503 with a JSON error, then the port closes.
#[test]
fn shutdown_answers_accepted_requests_and_503s_the_rest() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let h = serve();
    let addr = h.addr;
    // Two requests in progress: their bodies are half sent when the
    // shutdown starts, and finished once it is under way.
    let whole = json!({"model": "mqa", "messages": [{"role": "user", "content": "Tell me a story"}],
                       "max_tokens": 32, "temperature": 0})
    .to_string();
    let mut streamed = serde_json::from_str::<Value>(&whole).unwrap();
    streamed["stream"] = json!(true);
    let streamed = streamed.to_string();
    let open = |body: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            &body[..10]
        )
        .unwrap();
        s
    };
    let (mut a, mut b) = (open(&whole), open(&streamed));
    let t0 = std::time::Instant::now();
    while h.in_flight() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the two requests never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let unavailable = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        // Clients that keep sending requests, each on a new connection,
        // until the port is closed (at most 500 each).
        let probers: Vec<_> = (0..3)
            .map(|_| {
                sc.spawn(|| {
                    let mut statuses = vec![];
                    for _ in 0..500 {
                        match raw(addr, &models_request(addr)) {
                            Ok(reply) if !reply.is_empty() => {
                                let s = status_of(&reply);
                                if s == 503 {
                                    let body = reply.split_once("\r\n\r\n").unwrap().1;
                                    assert!(error_message(body).contains("shutting down"), "{body}");
                                    unavailable.fetch_add(1, Ordering::SeqCst);
                                }
                                statuses.push(s);
                            }
                            // Refused or reset: the port is closing.
                            _ => break,
                        }
                        if done.load(Ordering::SeqCst) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    statuses
                })
            })
            .collect();
        let stopper = sc.spawn(|| h.shutdown());
        let t0 = std::time::Instant::now();
        while unavailable.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "no 503 while shutting down");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The shutdown is under way: the accepted requests finish.
        a.write_all(&whole.as_bytes()[10..]).unwrap();
        b.write_all(&streamed.as_bytes()[10..]).unwrap();
        let mut reply = String::new();
        a.read_to_string(&mut reply).unwrap();
        assert_eq!(status_of(&reply), 200, "{reply}");
        let v: Value = serde_json::from_str(reply.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(v["object"], "chat.completion");
        let mut reply = String::new();
        b.read_to_string(&mut reply).unwrap();
        assert_eq!(status_of(&reply), 200, "{reply}");
        assert!(reply.contains("data: [DONE]") && reply.ends_with("0\r\n\r\n"), "{reply}");
        stopper.join().unwrap();
        done.store(true, Ordering::SeqCst);
        let mut total = 0;
        for p in probers {
            let statuses = p.join().unwrap();
            total += statuses.len();
            assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
            // Once a 503, never a 200 again.
            let first503 = statuses.iter().position(|s| *s == 503).unwrap_or(statuses.len());
            assert!(statuses[first503..].iter().all(|s| *s == 503), "{statuses:?}");
        }
        eprintln!("the probers sent {total} requests, {} answered 503", unavailable.load(Ordering::SeqCst));
    });
    assert!(TcpStream::connect(addr).is_err(), "the port is closed");
}

/// The `choices[0].logprobs.content` entries of a chat.completion, or of
/// every chunk of a stream in order.
fn logprob_entries(v: &Value) -> Vec<Value> {
    match &v["choices"][0]["logprobs"] {
        Value::Null => vec![],
        l => l["content"].as_array().expect("logprobs.content is a list").clone(),
    }
}

#[test]
fn logprobs_and_top_logprobs_in_openai_shape() {
    let h = serve();
    let url = h.url();
    let msgs = json!([{"role": "user", "content": "Say hi"}]);
    for (bad, needle) in [
        (json!({"model": "mqa", "messages": msgs, "top_logprobs": 2}), "logprobs"),
        (json!({"model": "mqa", "messages": msgs, "logprobs": false, "top_logprobs": 2}), "logprobs"),
        (json!({"model": "mqa", "messages": msgs, "logprobs": true, "top_logprobs": 21}), "0..=20"),
        (json!({"model": "mqa", "messages": msgs, "logprobs": true, "top_logprobs": -1}), "top_logprobs"),
        (json!({"model": "mqa", "messages": msgs, "logprobs": "yes"}), "logprobs"),
    ] {
        let (s, b) = post(&url, &bad.to_string());
        assert_eq!(s, 400, "{bad} -> {b}");
        assert!(error_message(&b).contains(needle), "{b}");
    }
    let req = json!({"model": "mqa", "messages": msgs, "max_tokens": 12, "temperature": 0.7, "top_k": 20,
                     "seed": 3, "logprobs": true, "top_logprobs": 3});
    let (s, b) = post(&url, &req.to_string());
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    let entries = logprob_entries(&v);

    // The same request as a direct generate call with the same seed.
    let m = lm::checkpoint::load_causal_lm(&fixture(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let tok = &m.tokenizer;
    let ids = lm::chat::prompt_ids(tok, &[lm::Message::new("user", "Say hi")]).unwrap();
    let cfg = lm::GenerationConfig {
        max_new_tokens: 12,
        temperature: 0.7,
        top_k: Some(20),
        top_p: None,
        seed: 3,
        eos_id: tok.special.eos,
        end_of_turn_id: Some(tok.special.end_of_turn),
        pad_id: tok.special.pad,
    };
    let wt = lm::InferenceWeights::for_model(&m.model);
    let g = lm::generate::generate_detailed(&m.model, wt.as_ref(), &[ids], &cfg, 3, |_, _| true).unwrap();
    let g = &g[0];
    assert!(!g.content().is_empty());
    assert_eq!(entries.len(), g.content().len(), "one entry per answer token: {b}");
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() as usize, entries.len());
    let mut all_bytes = vec![];
    for (i, e) in entries.iter().enumerate() {
        let lp = e["logprob"].as_f64().unwrap() as f32;
        assert_eq!(lp, g.logprobs[i], "token {i}: {e}");
        // `bytes` is null for a token that adds no text (special, or an id
        // past the tokenizer's vocabulary).
        if let Some(bytes) = e["bytes"].as_array() {
            let bytes: Vec<u8> = bytes.iter().map(|b| u8::try_from(b.as_u64().unwrap()).unwrap()).collect();
            match std::str::from_utf8(&bytes) {
                Ok(s) => assert_eq!(e["token"].as_str().unwrap(), s),
                Err(_) => assert!(e["token"].as_str().unwrap().starts_with("bytes:")),
            }
            all_bytes.extend_from_slice(&bytes);
        } else {
            assert!(e["bytes"].is_null() && e["token"].is_string(), "{e}");
            assert_eq!(tok.decode(&[g.content()[i]], true).unwrap(), "");
        }
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        for (j, t) in top.iter().enumerate() {
            assert_eq!(t["logprob"].as_f64().unwrap() as f32, g.top_logprobs[i][j].1);
            assert!(t["token"].is_string() && (t["bytes"].is_array() || t["bytes"].is_null()), "{t}");
            assert!(t.get("top_logprobs").is_none(), "OpenAI's top entries have no nested list");
        }
        assert!(lp <= top[0]["logprob"].as_f64().unwrap() as f32);
    }
    // The tokens' bytes spell the answer (this random model's bytes need
    // not be valid UTF-8: the text has U+FFFD for them, as decoding does).
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&all_bytes), text);

    // Streaming: the chunks' entries together are the same entries; the
    // role chunk and the finish chunk carry none.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (s, b) = post(&url, &sreq.to_string());
    assert_eq!(s, 200, "{b}");
    let events: Vec<Value> = b
        .split("\n\n")
        .filter(|e| !e.is_empty() && *e != "data: [DONE]")
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    assert!(events[0]["choices"][0]["logprobs"].is_null());
    assert!(events.last().unwrap()["choices"][0]["logprobs"].is_null());
    let streamed: Vec<Value> = events.iter().flat_map(logprob_entries).collect();
    assert_eq!(streamed, entries, "stream = completion");
    let streamed_text: String = events.iter().map(|e| delta(&e.to_string())).collect();
    assert_eq!(streamed_text, text);

    // Without `logprobs`, `logprobs` is null, as OpenAI answers.
    let mut plain = req.clone();
    plain.as_object_mut().unwrap().remove("top_logprobs");
    plain["logprobs"] = json!(false);
    let (s, b) = post(&url, &plain.to_string());
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert!(v["choices"][0]["logprobs"].is_null());
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), text);
    // `logprobs: true` alone: entries with empty top lists.
    plain["logprobs"] = json!(true);
    let (_, b) = post(&url, &plain.to_string());
    let v: Value = serde_json::from_str(&b).unwrap();
    let e = logprob_entries(&v);
    assert_eq!(e.len(), entries.len());
    assert!(e.iter().all(|e| e["top_logprobs"] == json!([])));
    h.shutdown();
}
