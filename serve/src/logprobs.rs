//! OpenAI's `logprobs` entries: `{"token", "logprob", "bytes", "top_logprobs"}`
//! for a generated token, with the bytes that token adds to the text.

use lm::generate::StepToken;
use lm::Tokenizer;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::OnceLock;
use tokenizers::decoders::DecoderWrapper;

/// The inverse of the GPT-2 byte-to-character table that byte-level BPE
/// spells its tokens with.
fn byte_level_chars() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut bytes: Vec<u8> = (b'!'..=b'~').chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut chars: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        let mut n = 0;
        for b in 0..=255u8 {
            if !bytes.contains(&b) {
                bytes.push(b);
                chars.push(256 + n);
                n += 1;
            }
        }
        chars.into_iter().zip(bytes).filter_map(|(c, b)| Some((char::from_u32(c)?, b))).collect()
    })
}

fn is_byte_level(d: &DecoderWrapper) -> bool {
    match d {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(s) => s.get_decoders().iter().any(is_byte_level),
        _ => false,
    }
}

/// The bytes token `id` adds to the decoded text, and its `token` string.
/// A byte-fallback piece (`<0x0A>`) is its byte, a byte-level BPE piece its
/// bytes (which may end inside a UTF-8 character), a SentencePiece piece its
/// text with `▁` as a space, an added token that is not special its text.
/// A special token (`<pad>`, `<start_of_turn>`) and an id the tokenizer
/// does not know (the model's vocabulary can be larger) add nothing to the
/// text: their bytes are None (OpenAI's `null`) and their token is their
/// name (`<id N>` for an unknown one).
pub(crate) fn token_bytes(tok: &Tokenizer, id: i64) -> (String, Option<Vec<u8>>) {
    let Some(piece) = u32::try_from(id).ok().and_then(|i| tok.inner.id_to_token(i)) else {
        return (format!("<id {id}>"), None);
    };
    let added = u32::try_from(id)
        .ok()
        .and_then(|i| tok.inner.get_added_vocabulary().get_added_tokens_decoder().get(&i));
    if let Some(a) = added {
        return if a.special { (piece, None) } else { (piece.clone(), Some(piece.into_bytes())) };
    }
    let bytes = if let Some(b) = piece
        .strip_prefix("<0x")
        .and_then(|h| h.strip_suffix('>'))
        .and_then(|h| u8::from_str_radix(h, 16).ok())
    {
        vec![b]
    } else if tok.inner.get_decoder().is_some_and(is_byte_level) {
        let table = byte_level_chars();
        let mut out = Vec::with_capacity(piece.len());
        for c in piece.chars() {
            match table.get(&c) {
                Some(&b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        out
    } else {
        piece.replace('\u{2581}', " ").into_bytes()
    };
    (token_text(&bytes), Some(bytes))
}

/// The `token` string of `bytes`: its text, or, when it is not whole UTF-8,
/// `bytes:` and each byte as `\xNN` (as OpenAI spells such tokens).
fn token_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
            format!("bytes:{hex}")
        }
    }
}

fn one(tok: &Tokenizer, id: i64, logprob: f32) -> serde_json::Map<String, Value> {
    let (token, bytes) = token_bytes(tok, id);
    let mut m = serde_json::Map::new();
    m.insert("token".into(), json!(token));
    m.insert("logprob".into(), json!(logprob));
    m.insert("bytes".into(), json!(bytes));
    m
}

/// One entry of `choices[i].logprobs.content`.
pub(crate) fn entry(tok: &Tokenizer, id: i64, logprob: f32, top: &[(i64, f32)]) -> Value {
    let mut m = one(tok, id, logprob);
    let top: Vec<Value> = top.iter().map(|&(t, lp)| Value::Object(one(tok, t, lp))).collect();
    m.insert("top_logprobs".into(), Value::Array(top));
    Value::Object(m)
}

/// [`entry`] for a token seen while streaming.
pub(crate) fn step_entry(tok: &Tokenizer, t: &StepToken) -> Value {
    entry(tok, t.id, t.logprob, &t.top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_gpt2s() {
        let t = byte_level_chars();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'\u{120}'], b' '); // Ġ
        assert_eq!(t[&'\u{10A}'], b'\n'); // Ċ
        assert_eq!(t[&'a'], b'a');
    }

    #[test]
    fn partial_utf8_tokens_are_spelled_as_bytes() {
        assert_eq!(token_text("é".as_bytes()), "é");
        assert_eq!(token_text(&[0xe2, 0x80]), "bytes:\\xe2\\x80");
    }
}
