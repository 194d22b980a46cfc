//! [`TextStream`]: the text deltas of a growing token sequence, for streaming.

use anyhow::Result;
use lm::Tokenizer;

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
