//! `http:URL`: a judge behind an OpenAI-compatible `/v1/chat/completions`
//! endpoint (vLLM, llama.cpp server, Ollama, a hosted API, `align serve`).
//!
//! `URL` is the base (`http://127.0.0.1:8000` or `…/v1`); the request is the
//! filled template as one user message, temperature 0 (0.7 with a new seed
//! on the retry of an unparseable verdict). The API key is read from an
//! environment variable whose name is given (sent as `Authorization:
//! Bearer`; none when unset). Each request has a timeout; transport errors,
//! 429 and 5xx are retried with exponential backoff; other 4xx fail the run
//! with the server's message. At most `max_in_flight` requests run at once.

use crate::pairwise::{Judge, RawVerdict, Shown};
use crate::template::{Fields, Template};
use crate::verdict::parse_verdict;
use anyhow::{anyhow, bail, Context, Result};
use lm::http::{post_json, Reply, Retries};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Settings of an [`HttpJudge`].
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub model: String,
    pub api_key_env: String,
    pub timeout: Duration,
    pub retries: u32,
    /// Wait before the first retry; doubled each time.
    pub backoff: Duration,
    pub max_in_flight: usize,
    pub max_tokens: usize,
    pub seed: u64,
}

pub struct HttpJudge {
    pub base: String,
    pub template: Template,
    pub settings: HttpSettings,
    agent: ureq::Agent,
    api_key: Option<String>,
}

impl HttpJudge {
    pub fn new(url: &str, template: Template, settings: HttpSettings) -> Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("http judge URL {url:?} must start with http:// or https://");
        }
        let base = url.trim_end_matches('/').trim_end_matches("/v1").to_string();
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(settings.timeout))
            .http_status_as_error(false)
            .build();
        let api_key = std::env::var(&settings.api_key_env).ok().filter(|k| !k.is_empty());
        Ok(HttpJudge { base, template, settings, agent: config.into(), api_key })
    }

    fn endpoint(&self) -> String {
        format!("{}/v1/chat/completions", self.base)
    }

    /// One completion with retries.
    pub fn complete(&self, prompt: &str, attempt: u32) -> Result<String> {
        let body = json!({
            "model": self.settings.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.settings.max_tokens,
            "temperature": if attempt == 0 { 0.0 } else { 0.7 },
            "seed": self.settings.seed.wrapping_add(u64::from(attempt)),
        })
        .to_string();
        let url = self.endpoint();
        let tries = Retries { retries: self.settings.retries, backoff: self.settings.backoff };
        post_json(&self.agent, &url, self.api_key.as_deref(), &body, tries, "answer", |text| {
            let v: Value =
                serde_json::from_str(text).with_context(|| format!("{url}: the reply is not JSON"))?;
            v["choices"][0]["message"]["content"]
                .as_str()
                .map(|c| Reply::Done(c.to_string()))
                .ok_or_else(|| anyhow!("{url}: the reply has no choices[0].message.content: {text}"))
        })
    }
}

impl Judge for HttpJudge {
    fn name(&self) -> String {
        format!("http:{}", self.base)
    }

    /// Requests are independent: eight rounds of the requests in flight.
    fn chunk_items(&self) -> Option<usize> {
        Some(8 * self.settings.max_in_flight.max(1))
    }

    fn judge(&self, items: &[Shown], attempt: u32) -> Result<Vec<RawVerdict>> {
        let prompts: Vec<String> = items
            .iter()
            .map(|s| {
                self.template.render(&Fields {
                    question: s.question,
                    answer_a: s.answer_a,
                    answer_b: s.answer_b,
                    reference: s.reference,
                })
            })
            .collect::<Result<_>>()?;
        let results: Mutex<Vec<Option<Result<String>>>> =
            Mutex::new((0..prompts.len()).map(|_| None).collect());
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..self.settings.max_in_flight.clamp(1, prompts.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= prompts.len() {
                        break;
                    }
                    let r = self.complete(&prompts[i], attempt);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                });
            }
        });
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let text = r.ok_or_else(|| anyhow!("item {i} was not judged"))??;
                Ok(RawVerdict::new(parse_verdict(&text), text))
            })
            .collect()
    }
}
