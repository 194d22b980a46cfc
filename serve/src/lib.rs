//! `serve`: `align serve`, an OpenAI-compatible chat-completions server for
//! a local checkpoint, on loopback only, built on axum and tokio.
//!
//! - `GET /v1/models` — the one model served.
//! - `POST /v1/chat/completions` — `model`, `messages` (`role`, `content`),
//!   optional `max_tokens` (or `max_completion_tokens`), `temperature`,
//!   `top_p`, `top_k`, `seed`, `n` (1 only), `stream`, `logprobs` and
//!   `top_logprobs` (0..=20, only with `logprobs`). Without `max_tokens`
//!   an answer may take what the context leaves after the prompt, up to
//!   `--max-tokens-limit`; an explicit `max_tokens` over either is a 400.
//!   With `stream: true` the answer comes as server-sent events while it is
//!   generated: a `chat.completion.chunk` with the role, one per piece of
//!   text that became stable (a token that ends inside a UTF-8 character is
//!   held back until the character is complete, [`TextStream`]), one with
//!   `finish_reason`, then `data: [DONE]`; each goes out as soon as it exists
//!   (HTTP/1.1 chunked transfer; an HTTP/1.0 client gets the same events in
//!   one body). A client that disconnects stops its generation.
//!   With `logprobs`, `choices[0].logprobs.content` has OpenAI's entries
//!   (`token`, `logprob`, `bytes`, `top_logprobs`) for each answer token,
//!   under the sampling distribution `log_softmax(logits / T)` (see
//!   `lm::generate::generate_detailed`); a stream sends each chunk's tokens'
//!   entries in that chunk, and `logprobs` is null otherwise.
//!
//! Errors are JSON `{"error": {"message", "type", "code"}}`: malformed JSON,
//! a wrong field → 400; an unknown model → 404; an over-long prompt → 400;
//! a body over 1 MiB → 413 (a larger `Content-Length` is refused before
//! anything is read); a body that does not arrive in time → 408; unknown
//! paths → 404, a wrong method → 405; a full request queue or a server
//! shutting down → 503; a failure inside the server → 500 with a generic
//! message (the details go to stderr, never to the client).
//!
//! Layout:
//! - [`api`](crate::api) (private) — the error and request shapes, parsing
//!   and validation.
//! - [`logprobs`](crate::logprobs) (private) — a token's OpenAI
//!   log-prob entry and the bytes it adds to the text.
//! - [`model`](crate::model) (private) — `--workers` threads that own the
//!   model and take jobs from a bounded queue; generation runs one request
//!   at a time on the model. The async side only sends jobs and awaits
//!   replies on channels: no tensor crosses into it.
//! - [`server`] — the axum routes and the accept loop on a small tokio
//!   runtime (no thread per connection). A connection that sends no
//!   complete request headers within [`Timeouts::header_read`] (an idle
//!   keep-alive one too) is closed, and a body that does not arrive within
//!   [`Timeouts::body_read`] is a 408; a client that stops reading its
//!   answer loses the connection after [`Timeouts::write`].
//!   [`ServerHandle::shutdown`] (or
//!   dropping the handle) answers new requests with a 503, lets every
//!   request accepted before it finish (a stream runs to its end), then
//!   closes the socket and the connections and joins the workers.
//! - [`cli`] — `align serve`'s flags ([`ServeArgs`]; `--workers 0` and
//!   `--max-tokens-limit 0` are refused) and [`cli_serve`], which shuts down
//!   on SIGINT or SIGTERM and exits 0 (a second signal exits at once).

mod api;
pub mod cli;
mod logprobs;
mod model;
pub mod server;
pub mod text;

pub use api::MAX_BODY;
pub use cli::{cli_serve, ServeArgs};
pub use server::{start, start_with, Options, ServerHandle, Timeouts};
pub use text::TextStream;
