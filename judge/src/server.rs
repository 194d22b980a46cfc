//! `align serve`: an OpenAI-compatible chat-completions server for a local
//! checkpoint, on loopback only.
//!
//! - `GET /v1/models` — the one model served.
//! - `POST /v1/chat/completions` — `model`, `messages` (`role`, `content`),
//!   optional `max_tokens` (or `max_completion_tokens`), `temperature`,
//!   `top_p`, `top_k`, `seed`, `n` (1 only), `stream`. With `stream: true`
//!   the answer comes as server-sent events (`chat.completion.chunk`, one per
//!   token piece, then `data: [DONE]`); the events are sent once generation
//!   of the request is finished, as `lm::generate` has no per-token callback.
//!
//! Errors are JSON `{"error": {"message", "type", "code"}}`: malformed JSON,
//! a wrong field → 400; an unknown model → 404; an over-long prompt → 400;
//! a body over 1 MiB → 413; unknown paths → 404. Concurrency is bounded by
//! the number of worker threads (further connections wait in the accept
//! queue) and generation runs one request at a time on the model. Dropping
//! the [`ServerHandle`] (or [`ServerHandle::shutdown`]) stops the workers and
//! closes the socket.

use anyhow::{anyhow, Context, Result};
use lm::checkpoint::Loaded;
use lm::{GenerationConfig, Message, StopReason};
use serde_json::{json, Value};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

/// `align serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send; default the directory's name.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Requests handled at once.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// The largest `max_tokens` a request may ask for (also the default).
    #[arg(long, default_value_t = 512)]
    pub max_tokens_limit: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

const MAX_BODY: usize = 1 << 20;

struct State {
    model: Mutex<Loaded>,
    name: String,
    max_tokens_limit: usize,
    next_id: AtomicU64,
}

/// A running server; dropping it shuts it down.
pub struct ServerHandle {
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
}

impl ServerHandle {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets the workers finish their request, and joins them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Blocks until the server stops (for the CLI).
    pub fn wait(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts serving `model` as `name` on 127.0.0.1:`port` with `workers` threads.
pub fn start(
    model: Loaded,
    name: &str,
    port: u16,
    workers: usize,
    max_tokens_limit: usize,
) -> Result<ServerHandle> {
    let server = tiny_http::Server::http(("127.0.0.1", port))
        .map_err(|e| anyhow!("cannot listen on 127.0.0.1:{port}: {e}; pick another --port"))?;
    let addr = server.server_addr().to_ip().context("the server has no IP address")?;
    let server = Arc::new(server);
    let state = Arc::new(State {
        model: Mutex::new(model),
        name: name.to_string(),
        max_tokens_limit: max_tokens_limit.max(1),
        next_id: AtomicU64::new(0),
    });
    let stopping = Arc::new(AtomicBool::new(false));
    let workers = (0..workers.max(1))
        .map(|_| {
            let (server, state, stopping) = (server.clone(), state.clone(), stopping.clone());
            std::thread::spawn(move || loop {
                match server.recv() {
                    Ok(req) => handle(&state, req),
                    Err(_) if stopping.load(Ordering::SeqCst) => break,
                    Err(_) => continue,
                }
            })
        })
        .collect();
    Ok(ServerHandle { addr, server, workers, stopping })
}

/// `align serve`.
pub fn cli_serve(args: ServeArgs) -> Result<()> {
    let device = lm::device::parse_device(&args.device)?;
    let kind = lm::device::parse_dtype(&args.dtype)?;
    let model = lm::checkpoint::load_causal_lm(&args.model, device, kind)?;
    let name = match &args.model_name {
        Some(n) => n.clone(),
        None => args.model.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string(),
    };
    let h = start(model, &name, args.port, args.workers, args.max_tokens_limit)?;
    eprintln!("serving {name} at {}/v1/chat/completions (Ctrl-C stops)", h.url());
    h.wait();
    Ok(())
}

struct ApiError {
    status: u16,
    kind: &'static str,
    message: String,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError { status: 400, kind: "invalid_request_error", message: message.into() }
}

fn json_response(status: u16, body: &Value) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let header = tiny_http::Header::from_bytes("Content-Type", "application/json");
    let mut r = tiny_http::Response::from_data(body.to_string().into_bytes()).with_status_code(status);
    if let Ok(h) = header {
        r.add_header(h);
    }
    r
}

fn handle(state: &State, mut req: tiny_http::Request) {
    let method = req.method().clone();
    let url = req.url().split('?').next().unwrap_or("").to_string();
    let result: Result<tiny_http::Response<std::io::Cursor<Vec<u8>>>, ApiError> = match (method, url.as_str())
    {
        (tiny_http::Method::Get, "/v1/models") => Ok(json_response(
            200,
            &json!({"object": "list", "data": [{"id": state.name, "object": "model", "owned_by": "align"}]}),
        )),
        (tiny_http::Method::Post, "/v1/chat/completions") => {
            let mut body = Vec::new();
            let read = req.as_reader().take(MAX_BODY as u64 + 1).read_to_end(&mut body);
            match read {
                Err(e) => Err(bad(format!("cannot read the request body: {e}"))),
                Ok(_) if body.len() > MAX_BODY => Err(ApiError {
                    status: 413,
                    kind: "invalid_request_error",
                    message: format!("the request body is over {MAX_BODY} bytes"),
                }),
                Ok(_) => completion(state, &body),
            }
        }
        (_, "/v1/models" | "/v1/chat/completions") => Err(ApiError {
            status: 405,
            kind: "invalid_request_error",
            message: format!("{} does not accept this method", url),
        }),
        _ => Err(ApiError {
            status: 404,
            kind: "not_found",
            message: format!("no route {url}; use /v1/chat/completions or /v1/models"),
        }),
    };
    let response = match result {
        Ok(r) => r,
        Err(e) => json_response(
            e.status,
            &json!({"error": {"message": e.message, "type": e.kind, "code": e.status}}),
        ),
    };
    let _ = req.respond(response);
}

struct Params {
    messages: Vec<Message>,
    max_tokens: usize,
    temperature: f64,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: u64,
    stream: bool,
}

fn parse_params(state: &State, body: &[u8]) -> Result<Params, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object() else { return Err(bad("the body must be a JSON object")) };
    match obj.get("model") {
        Some(Value::String(m)) if *m == state.name => {}
        Some(Value::String(m)) => {
            return Err(ApiError {
                status: 404,
                kind: "model_not_found",
                message: format!("model {m:?} is not served here; this server has {:?}", state.name),
            })
        }
        _ => return Err(bad("`model` (a string) is required")),
    }
    let Some(Value::Array(msgs)) = obj.get("messages") else {
        return Err(bad("`messages` (a list of {role, content}) is required"));
    };
    let mut messages = vec![];
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").and_then(Value::as_str);
        match (role, content) {
            (Some(r), Some(c)) => messages.push(Message::new(r, c)),
            _ => return Err(bad(format!("messages[{i}] needs a string `role` and a string `content`"))),
        }
    }
    let uint = |k: &str| -> Result<Option<u64>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| bad(format!("`{k}` must be a non-negative integer")))
            }
        }
    };
    let float = |k: &str| -> Result<Option<f64>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(format!("`{k}` must be a number"))),
        }
    };
    let max_tokens = match uint("max_tokens")?.or(uint("max_completion_tokens")?) {
        None => state.max_tokens_limit,
        Some(0) => return Err(bad("`max_tokens` must be at least 1")),
        Some(n) if n as usize > state.max_tokens_limit => {
            return Err(bad(format!(
                "`max_tokens` {n} is over this server's limit {}",
                state.max_tokens_limit
            )))
        }
        Some(n) => n as usize,
    };
    let temperature = float("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(format!("`temperature` must be in [0, 2], got {temperature}")));
    }
    let top_p = float("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad(format!("`top_p` must be in (0, 1], got {p}")));
        }
    }
    let top_k = match obj.get("top_k") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(k) if k >= 1 => Some(k),
            _ => return Err(bad("`top_k` must be an integer >= 1")),
        },
    };
    if let Some(n) = uint("n")? {
        if n != 1 {
            return Err(bad("only `n` = 1 is supported"));
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("`stream` must be true or false")),
    };
    Ok(Params { messages, max_tokens, temperature, top_p, top_k, seed: uint("seed")?.unwrap_or(0), stream })
}

fn generate(state: &State, p: &Params) -> Result<(Vec<i64>, Vec<String>, usize, StopReason), ApiError> {
    let loaded = state.model.lock().unwrap_or_else(|e| e.into_inner());
    let tok = &loaded.tokenizer;
    let ids = lm::chat::prompt_ids(tok, &p.messages).map_err(|e| bad(format!("{e:#}")))?;
    let ctx = loaded.model.cfg.max_position_embeddings as usize;
    if ids.len() + p.max_tokens > ctx {
        return Err(bad(format!(
            "the prompt is {} tokens; with max_tokens {} that is over the model's context of {ctx} tokens",
            ids.len(),
            p.max_tokens
        )));
    }
    let sp = tok.special;
    let cfg = GenerationConfig {
        max_new_tokens: p.max_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        seed: p.seed,
        eos_id: sp.eos,
        end_of_turn_id: Some(sp.end_of_turn),
        pad_id: sp.pad,
    };
    let internal =
        |e: anyhow::Error| ApiError { status: 500, kind: "server_error", message: format!("{e:#}") };
    let g = lm::generate(&loaded.model, std::slice::from_ref(&ids), &cfg).map_err(internal)?;
    let g = g.into_iter().next().ok_or_else(|| internal(anyhow!("no generation")))?;
    let content = g.content();
    // Text pieces per token, split where the decoded text grows cleanly.
    let mut pieces = vec![];
    let mut prev = String::new();
    for i in 1..=content.len() {
        let cur = tok.decode(&content[..i], true).map_err(internal)?;
        if cur.starts_with(&prev) && !cur.ends_with('\u{FFFD}') {
            pieces.push(cur[prev.len()..].to_string());
            prev = cur;
        }
    }
    let full = tok.decode(content, true).map_err(internal)?;
    if let Some(rest) = full.strip_prefix(&prev) {
        if !rest.is_empty() {
            pieces.push(rest.to_string());
        }
    }
    Ok((content.to_vec(), pieces, ids.len(), g.stop_reason))
}

fn completion(state: &State, body: &[u8]) -> Result<tiny_http::Response<std::io::Cursor<Vec<u8>>>, ApiError> {
    let p = parse_params(state, body)?;
    let (tokens, pieces, prompt_tokens, stop) = generate(state, &p)?;
    let id = format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let finish = if stop == StopReason::Length { "length" } else { "stop" };
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": tokens.len(),
                       "total_tokens": prompt_tokens + tokens.len()});
    if !p.stream {
        return Ok(json_response(
            200,
            &json!({"id": id, "object": "chat.completion", "created": created, "model": state.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": pieces.concat()},
                                 "finish_reason": finish}],
                    "usage": usage}),
        ));
    }
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": state.name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    };
    let mut sse = chunk(json!({"role": "assistant"}), Value::Null);
    for piece in &pieces {
        sse.push_str(&chunk(json!({"content": piece}), Value::Null));
    }
    sse.push_str(&chunk(json!({}), json!(finish)));
    sse.push_str("data: [DONE]\n\n");
    let mut r = tiny_http::Response::from_data(sse.into_bytes());
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "text/event-stream") {
        r.add_header(h);
    }
    Ok(r)
}
