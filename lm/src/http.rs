//! The one HTTP client mechanism of the workspace: a JSON POST with retries
//! and exponential backoff, used by the `http:` judge and the RL `http`
//! reward. Transport errors, 429 and 5xx are retried; another non-200 status
//! fails at once; the caller's parser says whether a 200 reply is the
//! answer, another try, or an error.

use anyhow::{bail, Result};
use std::time::Duration;

/// What a 200 reply turned out to be.
pub enum Reply<T> {
    /// The answer.
    Done(T),
    /// Not usable (say why); try again.
    Retry(String),
}

/// How often and how patiently to try.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// Tries after the first.
    pub retries: u32,
    /// The first wait; it doubles after each try.
    pub backoff: Duration,
}

/// POSTs `body` (JSON) to `url`, with `Authorization: Bearer {api_key}` when
/// a key is given, and hands each 200 reply's text to `parse`. After the
/// retries the error names `url`, `what` was wanted and the last error.
pub fn post_json<T>(
    agent: &ureq::Agent,
    url: &str,
    api_key: Option<&str>,
    body: &str,
    tries: Retries,
    what: &str,
    mut parse: impl FnMut(&str) -> Result<Reply<T>>,
) -> Result<T> {
    let mut wait = tries.backoff;
    let mut last = String::new();
    for k in 0..=tries.retries {
        if k > 0 {
            std::thread::sleep(wait);
            wait *= 2;
        }
        let mut req = agent.post(url).header("Content-Type", "application/json");
        if let Some(key) = api_key {
            req = req.header("Authorization", &format!("Bearer {key}"));
        }
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => {
                last = format!("{e}");
                continue;
            }
        };
        let status = resp.status().as_u16();
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => {
                last = format!("reading the response: {e}");
                continue;
            }
        };
        if status == 429 || status >= 500 {
            last = format!("HTTP {status}: {text}");
            continue;
        }
        if status != 200 {
            bail!("{url} refused the request (HTTP {status}): {text}");
        }
        match parse(&text)? {
            Reply::Done(v) => return Ok(v),
            Reply::Retry(why) => last = why,
        }
    }
    bail!("{url}: no {what} after {} retries; last error: {last}", tries.retries)
}
