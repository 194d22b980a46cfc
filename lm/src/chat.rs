//! The Gemma dialogue formatter.
//!
//! Renders a conversation exactly as Gemma's chat template
//! (`chat_template.jinja`, written into every `tokenizer_config.json` align
//! saves) does: `<bos>` once, then per turn
//! `<start_of_turn>{role}\n{content.trim()}<end_of_turn>\n` with `assistant`
//! spelled `model`; a system message is folded into the first user turn as
//! `{system.trim()}\n\n`; the generation prompt is `<start_of_turn>model\n`.
//!
//! [`encode`] returns the token ids and a loss mask that covers each model
//! turn's content and its `<end_of_turn>\n` (so the model learns to stop), but
//! not the `<start_of_turn>model\n` header.

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use std::ops::Range;

/// Gemma's chat template (Jinja), as transformers' `apply_chat_template` runs it.
pub const CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");

/// One turn of a conversation, as in the `messages` column of HF datasets:
/// the readers' type, which the formatter takes as it is.
pub use datasets::Message;

/// A conversation rendered to text, with the byte ranges the loss trains on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub trained: Vec<Range<usize>>,
}

/// Token ids with a loss mask (true = the model is trained on this token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub loss_mask: Vec<bool>,
}

/// Python's `str.strip()` (what Jinja's `trim` does): Unicode white space
/// plus the ASCII separators U+001C..U+001F that Python also strips.
pub fn py_trim(s: &str) -> &str {
    let ws = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    s.trim_matches(ws)
}

enum Turn {
    User,
    Model,
}

fn role_of(i: usize, role: &str) -> Result<Option<Turn>> {
    Ok(match role {
        "user" => Some(Turn::User),
        "model" | "assistant" => Some(Turn::Model),
        "system" => None,
        other => bail!(
            "message {i}: unknown role {other:?}; expected \"user\", \"model\"/\"assistant\" or \"system\""
        ),
    })
}

/// Renders `messages` with Gemma's template. With `add_generation_prompt`
/// the text ends with `<start_of_turn>model\n`.
pub fn render(messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
    if messages.is_empty() {
        bail!("the conversation is empty; it needs at least one user turn");
    }
    let mut text = String::from("<bos>");
    let mut trained = Vec::new();
    let (prefix, turns) = match role_of(0, &messages[0].role)? {
        None => (format!("{}\n\n", py_trim(&messages[0].content)), &messages[1..]),
        Some(_) => (String::new(), messages),
    };
    let offset = messages.len() - turns.len();
    if turns.is_empty() {
        bail!("the conversation has only a system message; it needs a user turn after it");
    }
    for (j, m) in turns.iter().enumerate() {
        let i = j + offset;
        let turn = match role_of(i, &m.role)? {
            None => bail!("message {i}: a system message may only come first"),
            Some(t) => t,
        };
        let (want_user, role) = match turn {
            Turn::User => (true, "user"),
            Turn::Model => (false, "model"),
        };
        if want_user != (j % 2 == 0) {
            let expected = if j % 2 == 0 { "user" } else { "model" };
            bail!(
                "message {i}: roles must alternate user/model starting with user; expected {expected}, got {:?}",
                m.role
            );
        }
        text.push_str("<start_of_turn>");
        text.push_str(role);
        text.push('\n');
        if j == 0 {
            text.push_str(&prefix);
        }
        let start = text.len();
        text.push_str(py_trim(&m.content));
        text.push_str("<end_of_turn>\n");
        if matches!(turn, Turn::Model) {
            trained.push(start..text.len());
        }
    }
    if add_generation_prompt {
        text.push_str("<start_of_turn>model\n");
    }
    Ok(Rendered { text, trained })
}

/// Renders and tokenizes `messages` (the whole text at once, as
/// `apply_chat_template(tokenize=True)` does) and marks the tokens whose
/// first byte falls in a model turn's trained span.
pub fn encode(tok: &Tokenizer, messages: &[Message], add_generation_prompt: bool) -> Result<Encoded> {
    let r = render(messages, add_generation_prompt)?;
    let enc = tok.encode_raw(&r.text)?;
    let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
    let loss_mask =
        enc.get_offsets().iter().map(|&(s, _)| r.trained.iter().any(|sp| sp.contains(&s))).collect();
    Ok(Encoded { ids, loss_mask })
}

/// The prompt for generation: the conversation plus `<start_of_turn>model\n`.
pub fn prompt_ids(tok: &Tokenizer, messages: &[Message]) -> Result<Vec<i64>> {
    Ok(encode(tok, messages, true)?.ids)
}

/// A user prompt, optionally preceded by a system message.
pub fn single_turn(system: Option<&str>, prompt: &str) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(Message::system(s));
    }
    m.push(Message::user(prompt));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_gemma_turns_and_trims_content() {
        let r = render(&[Message::user("  Hi \n"), Message::new("assistant", "\nHello!  ")], false).unwrap();
        assert_eq!(
            r.text,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        );
        assert_eq!(&r.text[r.trained[0].clone()], "Hello!<end_of_turn>\n");
    }

    #[test]
    fn system_is_folded_into_first_user_turn() {
        let r = render(&single_turn(Some(" Be brief. "), "Hi"), true).unwrap();
        assert_eq!(r.text, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n");
        assert!(r.trained.is_empty());
    }

    #[test]
    fn malformed_conversations_are_rejected_with_the_message_index() {
        let e = render(&[], false).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = render(&[Message::model("x")], false).unwrap_err().to_string();
        assert!(e.contains("message 0") && e.contains("alternate"), "{e}");
        let e = render(&[Message::user("a"), Message::user("b")], false).unwrap_err().to_string();
        assert!(e.contains("message 1"), "{e}");
        let e = render(&[Message::new("robot", "a")], false).unwrap_err().to_string();
        assert!(e.contains("unknown role \"robot\""), "{e}");
        let e = render(&[Message::user("a"), Message::new("system", "b")], false).unwrap_err().to_string();
        assert!(e.contains("system message may only come first"), "{e}");
        let e = render(&[Message::new("system", "b")], false).unwrap_err().to_string();
        assert!(e.contains("only a system message"), "{e}");
    }

    #[test]
    fn py_trim_matches_python_strip_on_separators() {
        assert_eq!(py_trim("\u{1f}\u{a0} x \u{3000}\t"), "x");
    }
}
