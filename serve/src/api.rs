//! The OpenAI request and error shapes: [`ApiError`] and the parsing of a
//! `/v1/chat/completions` body into [`Params`].

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use lm::Message;
use serde_json::{json, Value};

/// The largest request body accepted (1 MiB); a larger one is a 413.
pub const MAX_BODY: usize = 1 << 20;

/// An error answered as `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    /// Ask the client to close the connection (shutdown, busy).
    pub close: bool,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into(), close: false }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    /// A failure inside the server: the details go to stderr, the client
    /// gets a generic message (no libtorch internals).
    pub fn internal(e: &anyhow::Error) -> Self {
        eprintln!("align serve: internal error: {e:#}");
        Self::internal_generic()
    }

    pub fn internal_generic() -> Self {
        Self::new(500, "server_error", "internal server error; the server log has the details")
    }

    pub fn too_large() -> Self {
        Self::new(413, "invalid_request_error", format!("the request body is over {MAX_BODY} bytes"))
    }

    pub fn shutting_down() -> Self {
        ApiError { close: true, ..Self::new(503, "server_error", "the server is shutting down") }
    }

    pub fn busy() -> Self {
        ApiError {
            close: true,
            ..Self::new(503, "server_error", "the server is busy (its request queue is full); retry later")
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.status}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if self.close {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// What a request asks for, validated.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    pub messages: Vec<Message>,
    /// None: as many as the context leaves, up to the server's limit.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: u64,
    pub stream: bool,
    /// OpenAI's `logprobs`: each answer token's log-prob in the response.
    pub logprobs: bool,
    /// OpenAI's `top_logprobs` (0..=20, only with `logprobs`): the most
    /// likely tokens at each step.
    pub top_logprobs: usize,
}

/// The largest `top_logprobs`, as OpenAI's.
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// Parses and validates a `/v1/chat/completions` body for the model `name`.
pub(crate) fn parse_params(name: &str, max_tokens_limit: usize, body: &[u8]) -> Result<Params, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object() else { return Err(ApiError::bad("the body must be a JSON object")) };
    match obj.get("model") {
        Some(Value::String(m)) if m == name => {}
        Some(Value::String(m)) => {
            return Err(ApiError::new(
                404,
                "model_not_found",
                format!("model {m:?} is not served here; this server has {name:?}"),
            ))
        }
        _ => return Err(ApiError::bad("`model` (a string) is required")),
    }
    let Some(Value::Array(msgs)) = obj.get("messages") else {
        return Err(ApiError::bad("`messages` (a list of {role, content}) is required"));
    };
    let mut messages = vec![];
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").and_then(Value::as_str);
        match (role, content) {
            (Some(r), Some(c)) => messages.push(Message::new(r, c)),
            _ => {
                return Err(ApiError::bad(format!(
                    "messages[{i}] needs a string `role` and a string `content`"
                )))
            }
        }
    }
    let uint = |k: &str| -> Result<Option<u64>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| ApiError::bad(format!("`{k}` must be a non-negative integer"))),
        }
    };
    let float = |k: &str| -> Result<Option<f64>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::bad(format!("`{k}` must be a number"))),
        }
    };
    let max_tokens = match uint("max_tokens")?.or(uint("max_completion_tokens")?) {
        None => None,
        Some(0) => return Err(ApiError::bad("`max_tokens` must be at least 1")),
        Some(n) if n > max_tokens_limit as u64 => {
            return Err(ApiError::bad(format!(
                "`max_tokens` {n} is over this server's limit {max_tokens_limit} (--max-tokens-limit)"
            )))
        }
        Some(n) => Some(n as usize),
    };
    let temperature = float("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(format!("`temperature` must be in [0, 2], got {temperature}")));
    }
    let top_p = float("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad(format!("`top_p` must be in (0, 1], got {p}")));
        }
    }
    let top_k = match obj.get("top_k") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(k) if k >= 1 => Some(k),
            _ => return Err(ApiError::bad("`top_k` must be an integer >= 1")),
        },
    };
    if let Some(n) = uint("n")? {
        if n != 1 {
            return Err(ApiError::bad("only `n` = 1 is supported"));
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("`stream` must be true or false")),
    };
    let logprobs = match obj.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("`logprobs` must be true or false")),
    };
    let top_logprobs = match uint("top_logprobs")? {
        None => 0,
        Some(n) if n > MAX_TOP_LOGPROBS => {
            return Err(ApiError::bad(format!("`top_logprobs` must be in 0..={MAX_TOP_LOGPROBS}, got {n}")))
        }
        Some(_) if !logprobs => {
            return Err(ApiError::bad("`top_logprobs` needs `logprobs` set to true"));
        }
        Some(n) => n as usize,
    };
    Ok(Params {
        messages,
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed: uint("seed")?.unwrap_or(0),
        stream,
        logprobs,
        top_logprobs,
    })
}

/// The number of new tokens a request gets: an explicit `max_tokens` must
/// fit in the context after the prompt (else a 400 saying so); without one,
/// what the context leaves, at most `limit`.
pub(crate) fn resolve_max_tokens(
    requested: Option<usize>,
    limit: usize,
    prompt_len: usize,
    ctx: usize,
) -> Result<usize, ApiError> {
    let room = ctx.saturating_sub(prompt_len);
    if room == 0 {
        return Err(ApiError::bad(format!(
            "the prompt is {prompt_len} tokens, which fills the model's context of {ctx} tokens and leaves no \
             room for an answer; shorten the messages"
        )));
    }
    match requested {
        Some(n) if n > room => Err(ApiError::bad(format!(
            "the prompt is {prompt_len} tokens; with max_tokens {n} that is over the model's context of {ctx} \
             tokens; ask for at most {room} or shorten the messages"
        ))),
        Some(n) => Ok(n),
        None => Ok(limit.min(room)),
    }
}
