//! The model side: worker threads that own the loaded checkpoint and take
//! [`Job`]s from a bounded queue. The async side never touches a tensor; it
//! sends a job and awaits its reply on a channel.

use crate::api::{resolve_max_tokens, ApiError, Params};
use crate::logprobs;
use crate::text::TextStream;
use anyhow::{anyhow, Context, Result};
use lm::checkpoint::Loaded;
use lm::{GenerationConfig, StopReason};
use serde_json::{json, Value};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// The served model and its inference layout, made once at start (its
/// weights never change while serving).
struct Served {
    loaded: Loaded,
    wt: Option<lm::InferenceWeights>,
}

/// What every request shares: the model's name, the token limit, ids.
pub(crate) struct Info {
    pub name: String,
    pub max_tokens_limit: usize,
    next_id: AtomicU64,
}

impl Info {
    pub fn new(name: &str, max_tokens_limit: usize) -> Self {
        Info { name: name.to_string(), max_tokens_limit, next_id: AtomicU64::new(0) }
    }

    fn new_id(&self) -> (String, u64) {
        let id = format!("chatcmpl-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        (id, created)
    }
}

/// Where a job's answer goes.
pub(crate) enum Reply {
    /// The whole `chat.completion` object, or the error.
    Whole(oneshot::Sender<Result<Value, ApiError>>),
    /// `opened` gets Ok once the request is valid (or its error), then each
    /// SSE event's data (a JSON chunk, lastly `[DONE]`) goes to `events`.
    Stream { opened: oneshot::Sender<Result<(), ApiError>>, events: mpsc::UnboundedSender<String> },
}

pub(crate) struct Job {
    pub params: Params,
    pub reply: Reply,
}

/// The worker threads and the sending end of their queue.
pub(crate) struct Pool {
    tx: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// `workers` threads sharing `model` (generation runs one request at a
    /// time on it), fed by a queue of `queue` jobs.
    pub fn start(model: Loaded, info: Arc<Info>, workers: usize, queue: usize) -> Result<Pool> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let served =
            Arc::new(Mutex::new(Served { wt: lm::InferenceWeights::for_model(&model.model), loaded: model }));
        let threads = (0..workers)
            .map(|i| {
                let (rx, served, info) = (rx.clone(), served.clone(), info.clone());
                std::thread::Builder::new()
                    .name(format!("serve-worker-{i}"))
                    .spawn(move || work(&rx, &served, &info))
                    .context("cannot start a worker thread")
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Pool { tx: Some(tx), threads })
    }

    /// A sender for the async side.
    pub fn sender(&self) -> Option<SyncSender<Job>> {
        self.tx.clone()
    }

    /// Waits for the workers to finish the queued jobs and end (once every
    /// sender is gone).
    pub fn join(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Queues a job without waiting: a full queue is a 503.
pub(crate) fn submit(tx: &SyncSender<Job>, job: Job) -> Result<(), ApiError> {
    match tx.try_send(job) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => Err(ApiError::busy()),
        Err(TrySendError::Disconnected(_)) => Err(ApiError::shutting_down()),
    }
}

fn work(rx: &Mutex<Receiver<Job>>, served: &Mutex<Served>, info: &Info) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return, // every sender is gone: shutting down
            }
        };
        let served = served.lock().unwrap_or_else(|e| e.into_inner());
        // A stream whose worker panics still gets an error event.
        let events = match &job.reply {
            Reply::Stream { events, .. } => Some(events.clone()),
            Reply::Whole(_) => None,
        };
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| match job.reply {
            Reply::Whole(reply) => {
                let r = completion(info, &served, &job.params, &reply);
                let _ = reply.send(r);
            }
            Reply::Stream { opened, events } => stream(info, &served, &job.params, opened, &events),
        }));
        if let Err(p) = run {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            // The whole-answer reply was dropped while unwinding: its client
            // gets a generic 500.
            let e = ApiError::internal(&anyhow!("a request panicked: {what}"));
            if let Some(events) = events {
                let _ = events.send(e.body().to_string());
                let _ = events.send("[DONE]".to_string());
            }
        }
    }
}

/// The prompt's ids and the decoding settings of one request.
struct Prepared {
    ids: Vec<i64>,
    cfg: GenerationConfig,
}

fn prepare(info: &Info, loaded: &Loaded, p: &Params) -> Result<Prepared, ApiError> {
    let tok = &loaded.tokenizer;
    let ids = lm::chat::prompt_ids(tok, &p.messages).map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let ctx = usize::try_from(loaded.model.cfg.max_position_embeddings).unwrap_or(0);
    let max_new_tokens = resolve_max_tokens(p.max_tokens, info.max_tokens_limit, ids.len(), ctx)?;
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

/// The top-N a request asks for (0 without `logprobs`).
fn top_n(p: &Params) -> usize {
    if p.logprobs {
        p.top_logprobs
    } else {
        0
    }
}

fn finish_reason(stop: StopReason) -> &'static str {
    if stop == StopReason::Length {
        "length"
    } else {
        "stop"
    }
}

/// A whole answer; stops early when the client is gone.
fn completion(
    info: &Info,
    served: &Served,
    p: &Params,
    reply: &oneshot::Sender<Result<Value, ApiError>>,
) -> Result<Value, ApiError> {
    let loaded = &served.loaded;
    let prep = prepare(info, loaded, p)?;
    let g = lm::generate::generate_detailed(
        &loaded.model,
        served.wt.as_ref(),
        std::slice::from_ref(&prep.ids),
        &prep.cfg,
        top_n(p),
        |_, _| !reply.is_closed(),
    )
    .map_err(|e| ApiError::internal(&e))?;
    let g = g.into_iter().next().ok_or_else(|| ApiError::internal(&anyhow!("no generation")))?;
    let tok = &loaded.tokenizer;
    let content = tok.decode(g.content(), true).map_err(|e| ApiError::internal(&e))?;
    // One entry per answer token (the stop token is not part of the answer).
    let logprobs = if p.logprobs {
        let entries: Vec<Value> = g
            .content()
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let top = g.top_logprobs.get(i).map(Vec::as_slice).unwrap_or(&[]);
                logprobs::entry(tok, t, g.logprobs[i], top)
            })
            .collect();
        json!({"content": entries})
    } else {
        Value::Null
    };
    let (id, created) = info.new_id();
    let (prompt_tokens, completion_tokens) = (prep.ids.len(), g.content().len());
    Ok(json!({"id": id, "object": "chat.completion", "created": created, "model": info.name,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                           "logprobs": logprobs, "finish_reason": finish_reason(g.stop_reason)}],
              "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens}}))
}

/// `stream: true`: validates like [`completion`] (errors go to `opened`),
/// then sends each piece of text as it is generated. A client that is gone
/// (its receiver dropped) stops the generation.
fn stream(
    info: &Info,
    served: &Served,
    p: &Params,
    opened: oneshot::Sender<Result<(), ApiError>>,
    events: &mpsc::UnboundedSender<String>,
) {
    let loaded = &served.loaded;
    let prep = match prepare(info, loaded, p) {
        Ok(x) => x,
        Err(e) => {
            let _ = opened.send(Err(e));
            return;
        }
    };
    if opened.send(Ok(())).is_err() {
        return; // the client left before the stream opened
    }
    let (id, created) = info.new_id();
    // With `logprobs`, a content chunk carries the entries of the tokens
    // its text came from (`pending`: those not sent yet).
    let chunk = |delta: Value, finish: Value, pending: &mut Vec<Value>| {
        let logprobs = if p.logprobs && delta.get("content").is_some() {
            json!({"content": std::mem::take(pending)})
        } else {
            Value::Null
        };
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": info.name,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
        .to_string()
    };
    let mut pending: Vec<Value> = vec![];
    if events.send(chunk(json!({"role": "assistant"}), Value::Null, &mut pending)).is_err() {
        return;
    }
    let tok = &loaded.tokenizer;
    let stops = [prep.cfg.eos_id, tok.special.end_of_turn];
    let mut text = TextStream::new();
    let mut failure: Option<anyhow::Error> = None;
    let mut connected = true;
    let generated = lm::generate::generate_detailed(
        &loaded.model,
        served.wt.as_ref(),
        std::slice::from_ref(&prep.ids),
        &prep.cfg,
        top_n(p),
        |_, new| {
            let Some(Some(step)) = new.first() else { return true };
            let t = step.id;
            if stops.contains(&t) {
                return true;
            }
            if p.logprobs {
                pending.push(logprobs::step_entry(tok, step));
            }
            match text.push(tok, t) {
                Ok(delta) if delta.is_empty() => true,
                Ok(delta) => {
                    connected =
                        events.send(chunk(json!({"content": delta}), Value::Null, &mut pending)).is_ok();
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
    match result.and_then(|g| Ok((text.finish(tok)?, g.stop_reason))) {
        Ok((rest, stop)) => {
            // Tokens whose text never showed (held back, or none) still get
            // their log-probs, with whatever text is left.
            if !rest.is_empty() || !pending.is_empty() {
                let _ = events.send(chunk(json!({"content": rest}), Value::Null, &mut pending));
            }
            let _ = events.send(chunk(json!({}), json!(finish_reason(stop)), &mut pending));
        }
        // The status line is out: the error goes as an event, as OpenAI does.
        Err(e) => {
            let _ = events.send(ApiError::internal(&e).body().to_string());
        }
    }
    let _ = events.send("[DONE]".to_string());
}
