//! `align serve`: an OpenAI-compatible chat-completions server for a local
//! checkpoint, on loopback only.
//!
//! - `GET /v1/models` — the one model served.
//! - `POST /v1/chat/completions` — `model`, `messages` (`role`, `content`),
//!   optional `max_tokens` (or `max_completion_tokens`), `temperature`,
//!   `top_p`, `top_k`, `seed`, `n` (1 only), `stream`. Without `max_tokens`
//!   an answer may take what the context leaves after the prompt, up to
//!   `--max-tokens-limit`; an explicit `max_tokens` over either is a 400.
//!   With `stream: true` the answer comes as server-sent events while it is
//!   generated: a `chat.completion.chunk` with the role, one per piece of
//!   text that became stable (a token that ends inside a UTF-8 character is
//!   held back until the character is complete), one with `finish_reason`,
//!   then `data: [DONE]`; each is flushed to the socket as soon as it exists
//!   (HTTP/1.1 chunked transfer; an HTTP/1.0 client gets the same events in
//!   one body). A client that disconnects mid-stream stops its generation.
//!
//! Errors are JSON `{"error": {"message", "type", "code"}}`: malformed JSON,
//! a wrong field → 400; an unknown model → 404; an over-long prompt → 400;
//! a body over 1 MiB → 413; unknown paths → 404. Concurrency is bounded by
//! the number of worker threads (further connections wait in the accept
//! queue) and generation runs one request at a time on the model.
//! [`ServerHandle::shutdown`] (or dropping the handle) stops taking requests,
//! lets the workers finish the ones they are serving, and closes the socket;
//! `align serve` does that on SIGINT or SIGTERM and exits 0.

use anyhow::{anyhow, Context, Result};
use lm::checkpoint::Loaded;
use lm::{GenerationConfig, Message, StopReason, Tokenizer};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// The largest `max_tokens` a request may ask for (also the most a
    /// request without `max_tokens` gets; the model's context may allow less).
    #[arg(long, default_value_t = 512)]
    pub max_tokens_limit: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

const MAX_BODY: usize = 1 << 20;

/// The served model and its inference layout, made once at start (its
/// weights never change while serving).
struct Served {
    loaded: Loaded,
    wt: Option<lm::InferenceWeights>,
}

struct State {
    model: Mutex<Served>,
    name: String,
    max_tokens_limit: usize,
    next_id: AtomicU64,
    /// Requests a worker is serving now.
    in_flight: AtomicUsize,
}

/// A running server; dropping it shuts it down.
pub struct ServerHandle {
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    state: Arc<State>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
}

impl ServerHandle {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests being served at this moment.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Stops taking requests, lets the workers finish the ones they are
    /// serving (a stream runs to its end), joins them and closes the socket.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Blocks until the server stops.
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
        model: Mutex::new(Served { wt: lm::InferenceWeights::for_model(&model.model), loaded: model }),
        name: name.to_string(),
        max_tokens_limit: max_tokens_limit.max(1),
        next_id: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let stopping = Arc::new(AtomicBool::new(false));
    let workers = (0..workers.max(1))
        .map(|_| {
            let (server, state, stopping) = (server.clone(), state.clone(), stopping.clone());
            std::thread::spawn(move || loop {
                match server.recv() {
                    Ok(req) => {
                        state.in_flight.fetch_add(1, Ordering::SeqCst);
                        handle(&state, req);
                        state.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    Err(_) if stopping.load(Ordering::SeqCst) => break,
                    Err(_) => continue,
                }
            })
        })
        .collect();
    Ok(ServerHandle { addr, server, state, workers, stopping })
}

/// `align serve`: serves until SIGINT or SIGTERM, then stops taking
/// requests, finishes those in progress and returns (exit status 0). A
/// second signal exits at once.
pub fn cli_serve(args: ServeArgs) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let device = lm::device::parse_device(&args.device)?;
    let kind = lm::device::parse_dtype(&args.dtype)?;
    let model = lm::checkpoint::load_causal_lm(&args.model, device, kind)?;
    let name = match &args.model_name {
        Some(n) => n.clone(),
        None => args.model.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string(),
    };
    // Handlers first, so that no signal can arrive between listening and them.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("align serve: cannot install the SIGINT/SIGTERM handlers")?;
    let h = start(model, &name, args.port, args.workers, args.max_tokens_limit)?;
    eprintln!("serving {name} at {}/v1/chat/completions (Ctrl-C or SIGTERM stops)", h.url());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if tx.send(sig).is_err() {
                break;
            }
        }
    });
    let signal_name = |s: i32| if s == SIGINT { "SIGINT" } else { "SIGTERM" };
    let first = rx.recv().context("align serve: the signal handler thread ended")?;
    eprintln!(
        "{}: stopped taking requests; finishing {} in progress (a second signal exits at once)",
        signal_name(first),
        h.in_flight()
    );
    std::thread::spawn(move || {
        if let Ok(s) = rx.recv() {
            eprintln!("{}: exiting without finishing the requests in progress", signal_name(s));
            std::process::exit(130);
        }
    });
    h.shutdown();
    eprintln!("align serve: stopped");
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

fn internal(e: anyhow::Error) -> ApiError {
    ApiError { status: 500, kind: "server_error", message: format!("{e:#}") }
}

fn error_body(e: &ApiError) -> Value {
    json!({"error": {"message": e.message, "type": e.kind, "code": e.status}})
}

type JsonResponse = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn json_response(status: u16, body: &Value) -> JsonResponse {
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
    let result: Result<JsonResponse, ApiError> = match (method, url.as_str()) {
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
                Ok(_) => match parse_params(state, &body) {
                    Ok(p) if p.stream => return stream_completion(state, req, &p),
                    Ok(p) => completion(state, &p),
                    Err(e) => Err(e),
                },
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
        Err(e) => json_response(e.status, &error_body(&e)),
    };
    let _ = req.respond(response);
}

struct Params {
    messages: Vec<Message>,
    /// None: as many as the context leaves, up to the server's limit.
    max_tokens: Option<usize>,
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
        None => None,
        Some(0) => return Err(bad("`max_tokens` must be at least 1")),
        Some(n) if n as usize > state.max_tokens_limit => {
            return Err(bad(format!(
                "`max_tokens` {n} is over this server's limit {} (--max-tokens-limit)",
                state.max_tokens_limit
            )))
        }
        Some(n) => Some(n as usize),
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

/// The prompt's ids and the decoding settings of one request.
struct Prepared {
    ids: Vec<i64>,
    cfg: GenerationConfig,
}

/// The number of new tokens a request gets: an explicit `max_tokens` must
/// fit in the context after the prompt (else a 400 saying so); without one,
/// what the context leaves, at most `limit`.
fn resolve_max_tokens(
    requested: Option<usize>,
    limit: usize,
    prompt_len: usize,
    ctx: usize,
) -> Result<usize, ApiError> {
    let room = ctx.saturating_sub(prompt_len);
    if room == 0 {
        return Err(bad(format!(
            "the prompt is {prompt_len} tokens, which fills the model's context of {ctx} tokens and leaves no \
             room for an answer; shorten the messages"
        )));
    }
    match requested {
        Some(n) if n > room => Err(bad(format!(
            "the prompt is {prompt_len} tokens; with max_tokens {n} that is over the model's context of {ctx} \
             tokens; ask for at most {room} or shorten the messages"
        ))),
        Some(n) => Ok(n),
        None => Ok(limit.min(room)),
    }
}

fn prepare(state: &State, loaded: &Loaded, p: &Params) -> Result<Prepared, ApiError> {
    let tok = &loaded.tokenizer;
    let ids = lm::chat::prompt_ids(tok, &p.messages).map_err(|e| bad(format!("{e:#}")))?;
    let ctx = usize::try_from(loaded.model.cfg.max_position_embeddings).unwrap_or(0);
    let max_new_tokens = resolve_max_tokens(p.max_tokens, state.max_tokens_limit, ids.len(), ctx)?;
    let sp = tok.special;
    let cfg = GenerationConfig {
        max_new_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        seed: p.seed,
        eos_id: sp.eos,
        end_of_turn_id: Some(sp.end_of_turn),
        pad_id: sp.pad,
    };
    Ok(Prepared { ids, cfg })
}

fn finish_reason(stop: StopReason) -> &'static str {
    if stop == StopReason::Length {
        "length"
    } else {
        "stop"
    }
}

fn new_id(state: &State) -> (String, u64) {
    let id = format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    (id, created)
}

fn completion(state: &State, p: &Params) -> Result<JsonResponse, ApiError> {
    let served = state.model.lock().unwrap_or_else(|e| e.into_inner());
    let loaded = &served.loaded;
    let prep = prepare(state, loaded, p)?;
    let g = lm::generate::generate_using(
        &loaded.model,
        served.wt.as_ref(),
        std::slice::from_ref(&prep.ids),
        &prep.cfg,
        |_, _| true,
    )
    .map_err(internal)?;
    let g = g.into_iter().next().ok_or_else(|| internal(anyhow!("no generation")))?;
    let content = loaded.tokenizer.decode(g.content(), true).map_err(internal)?;
    drop(served);
    let (id, created) = new_id(state);
    let (prompt_tokens, completion_tokens) = (prep.ids.len(), g.content().len());
    Ok(json_response(
        200,
        &json!({"id": id, "object": "chat.completion", "created": created, "model": state.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": finish_reason(g.stop_reason)}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}),
    ))
}

/// Text deltas of a growing token sequence for streaming: after each token,
/// the part of the decoded text that can no longer change.
///
/// Byte-level BPE splits a multi-byte character over several tokens, so the
/// decoded prefix can end in U+FFFD until the character is complete: that
/// tail is held back. The deltas concatenated (with [`TextStream::finish`])
/// are the decoding of all the tokens at once.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<i64>,
    sent: String,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text that became stable (often empty).
    pub fn push(&mut self, tok: &Tokenizer, id: i64) -> Result<String> {
        self.ids.push(id);
        let cur = tok.decode(&self.ids, true)?;
        Ok(self.advance(&cur, false))
    }

    /// The rest of the text once no token follows (a held-back tail included).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let cur = tok.decode(&self.ids, true)?;
        Ok(self.advance(&cur, true))
    }

    /// The text sent so far.
    pub fn text(&self) -> &str {
        &self.sent
    }

    fn advance(&mut self, cur: &str, last: bool) -> String {
        let stable = if last { cur } else { cur.trim_end_matches('\u{FFFD}') };
        match stable.strip_prefix(self.sent.as_str()) {
            Some(delta) if !delta.is_empty() => {
                let delta = delta.to_string();
                self.sent = stable.to_string();
                delta
            }
            // Nothing new, or the decoder rewrote earlier text (it cannot be
            // taken back from the client): wait for it to settle.
            _ => String::new(),
        }
    }
}

/// Where the events of a stream go.
enum Sink {
    /// HTTP/1.1: chunked transfer, each event flushed at once.
    Chunked(Box<dyn Write + Send>),
    /// HTTP/1.0: no chunked transfer; the events are sent in one body at the end.
    Buffered(tiny_http::Request, Vec<u8>),
}

impl Sink {
    /// Sends `data` (one or more events); false when the client is gone.
    fn send(&mut self, data: &str) -> bool {
        match self {
            Sink::Chunked(w) => {
                let r = write!(w, "{:x}\r\n{data}\r\n", data.len()).and_then(|_| w.flush());
                r.is_ok()
            }
            Sink::Buffered(_, buf) => {
                buf.extend_from_slice(data.as_bytes());
                true
            }
        }
    }

    fn finish(self) {
        match self {
            Sink::Chunked(mut w) => {
                let _ = w.write_all(b"0\r\n\r\n").and_then(|_| w.flush());
            }
            Sink::Buffered(req, buf) => {
                let mut r = tiny_http::Response::from_data(buf);
                if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "text/event-stream") {
                    r.add_header(h);
                }
                let _ = req.respond(r);
            }
        }
    }
}

/// Opens the event stream: the status line and headers go out now.
fn open_stream(req: tiny_http::Request) -> Option<Sink> {
    if *req.http_version() < tiny_http::HTTPVersion(1, 1) {
        return Some(Sink::Buffered(req, vec![]));
    }
    let mut w = req.into_writer();
    let head = "HTTP/1.1 200 OK\r\nServer: align\r\nContent-Type: text/event-stream\r\n\
                Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
    w.write_all(head.as_bytes()).and_then(|_| w.flush()).ok()?;
    Some(Sink::Chunked(w))
}

/// `stream: true`: validates like [`completion`] (errors are ordinary JSON
/// responses), then sends each piece of text as it is generated.
fn stream_completion(state: &State, req: tiny_http::Request, p: &Params) {
    let served = state.model.lock().unwrap_or_else(|e| e.into_inner());
    let loaded = &served.loaded;
    let prep = match prepare(state, loaded, p) {
        Ok(x) => x,
        Err(e) => {
            drop(served);
            let _ = req.respond(json_response(e.status, &error_body(&e)));
            return;
        }
    };
    let Some(mut sink) = open_stream(req) else { return };
    let (id, created) = new_id(state);
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": state.name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    };
    if !sink.send(&chunk(json!({"role": "assistant"}), Value::Null)) {
        return;
    }
    let tok = &loaded.tokenizer;
    let stops = [prep.cfg.eos_id, tok.special.end_of_turn];
    let mut text = TextStream::new();
    let mut failure: Option<anyhow::Error> = None;
    let mut connected = true;
    let generated = lm::generate::generate_using(
        &loaded.model,
        served.wt.as_ref(),
        std::slice::from_ref(&prep.ids),
        &prep.cfg,
        |_, new| {
            let Some(&Some(t)) = new.first() else { return true };
            if stops.contains(&t) {
                return true;
            }
            match text.push(tok, t) {
                Ok(delta) if delta.is_empty() => true,
                Ok(delta) => {
                    connected = sink.send(&chunk(json!({"content": delta}), Value::Null));
                    connected
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        },
    );
    if !connected {
        return; // the client left; nothing more to send
    }
    let result = match (generated, failure) {
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
        (Ok(g), None) => g.into_iter().next().ok_or_else(|| anyhow!("no generation")),
    };
    let events = match result.and_then(|g| Ok((text.finish(tok)?, g.stop_reason))) {
        Ok((rest, stop)) => {
            let mut events = String::new();
            if !rest.is_empty() {
                events.push_str(&chunk(json!({"content": rest}), Value::Null));
            }
            events.push_str(&chunk(json!({}), json!(finish_reason(stop))));
            events
        }
        // The status line is out: the error goes as an event, as OpenAI does.
        Err(e) => format!("data: {}\n\n", error_body(&internal(e))),
    };
    drop(served);
    if sink.send(&events) && sink.send("data: [DONE]\n\n") {
        sink.finish();
    }
}
