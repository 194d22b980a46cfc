//! Record kinds, messages, and the conversion of one row (a JSON object with
//! canonical column names) into a typed [`Example`].

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The user's role.
pub const ROLE_USER: &str = "user";
/// The model's role (Gemma's name for the assistant).
pub const ROLE_MODEL: &str = "model";
/// The assistant's role, as most hub datasets spell it; means the same as `model`.
pub const ROLE_ASSISTANT: &str = "assistant";
/// A system message (Gemma 1 folds it into the first user turn).
pub const ROLE_SYSTEM: &str = "system";

/// One turn of a dialogue. `role` is one of `user`, `assistant`, `model`,
/// `system` (lower case; the readers lower-case what they find). The one
/// message type of the workspace: `lm::chat` formats it as it is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.to_string(), content: content.into() }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Message::new(ROLE_USER, content)
    }

    pub fn model(content: impl Into<String>) -> Self {
        Message::new(ROLE_MODEL, content)
    }

    pub fn system(content: impl Into<String>) -> Self {
        Message::new(ROLE_SYSTEM, content)
    }

    /// True for the model's turns (`model` or `assistant`): the turns SFT trains on.
    pub fn is_model(&self) -> bool {
        is_model_role(&self.role)
    }
}

/// True for `model` and `assistant`.
pub fn is_model_role(role: &str) -> bool {
    role == ROLE_MODEL || role == ROLE_ASSISTANT
}

/// The four kinds of record a dataset can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// `messages` = [{role, content}, …] with at least one model turn.
    Conversational,
    /// `prompt` + `completion` (or `response`, `output`), or Alpaca's
    /// `instruction` + optional `input` + `output`.
    PromptCompletion,
    /// `prompt` + `chosen` + `rejected` (+ optional `margin`), or HH-RLHF
    /// transcripts in `chosen`/`rejected` alone. When `chosen` and `rejected`
    /// are whole dialogues (message lists or transcripts), their shared
    /// leading turns are the prompt (up to the last non-model turn) and the
    /// `prompt` column is used only when they share none. A pair with an
    /// empty side, or with identical responses, is a bad row.
    Preference,
    /// `prompt` or `messages`, for RL and the judge.
    PromptOnly,
}

impl RecordKind {
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Conversational => "conversational",
            RecordKind::PromptCompletion => "prompt_completion",
            RecordKind::Preference => "preference",
            RecordKind::PromptOnly => "prompt_only",
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed record. Prompts and responses are message lists so that
/// multi-turn prompts (HH-RLHF, UltraFeedback) keep their structure.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Conversation { messages: Vec<Message> },
    PromptCompletion { prompt: Vec<Message>, completion: Vec<Message> },
    Preference { prompt: Vec<Message>, chosen: Vec<Message>, rejected: Vec<Message>, margin: Option<f64> },
    PromptOnly { prompt: Vec<Message> },
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Conversation { .. } => RecordKind::Conversational,
            Record::PromptCompletion { .. } => RecordKind::PromptCompletion,
            Record::Preference { .. } => RecordKind::Preference,
            Record::PromptOnly { .. } => RecordKind::PromptOnly,
        }
    }

    /// The dialogue to train on: a conversation's messages; prompt then
    /// completion; for a preference pair the prompt then the *chosen* response
    /// (see [`Record::rejected_messages`]); a prompt-only record's prompt.
    pub fn messages(&self) -> Vec<Message> {
        match self {
            Record::Conversation { messages } => messages.clone(),
            Record::PromptCompletion { prompt, completion } => concat(prompt, completion),
            Record::Preference { prompt, chosen, .. } => concat(prompt, chosen),
            Record::PromptOnly { prompt } => prompt.clone(),
        }
    }

    /// Prompt + chosen for a preference pair, `None` for other kinds.
    pub fn chosen_messages(&self) -> Option<Vec<Message>> {
        match self {
            Record::Preference { prompt, chosen, .. } => Some(concat(prompt, chosen)),
            _ => None,
        }
    }

    /// Prompt + rejected for a preference pair, `None` for other kinds.
    pub fn rejected_messages(&self) -> Option<Vec<Message>> {
        match self {
            Record::Preference { prompt, rejected, .. } => Some(concat(prompt, rejected)),
            _ => None,
        }
    }

    /// The prompt: everything before the response. For a conversation this is
    /// every message before its last run of model turns (all of it when it
    /// has none).
    pub fn prompt_messages(&self) -> Vec<Message> {
        match self {
            Record::Conversation { messages } => {
                let (prompt, _) = split_last_response(messages);
                prompt.to_vec()
            }
            Record::PromptCompletion { prompt, .. }
            | Record::Preference { prompt, .. }
            | Record::PromptOnly { prompt } => prompt.clone(),
        }
    }

    /// The full sequences a model would see: one for most kinds, two (chosen,
    /// rejected) for a preference pair. Length filters measure each of them.
    pub fn sequences(&self) -> Vec<Vec<&Message>> {
        match self {
            Record::Conversation { messages } => vec![messages.iter().collect()],
            Record::PromptCompletion { prompt, completion } => {
                vec![prompt.iter().chain(completion).collect()]
            }
            Record::Preference { prompt, chosen, rejected, .. } => {
                vec![prompt.iter().chain(chosen).collect(), prompt.iter().chain(rejected).collect()]
            }
            Record::PromptOnly { prompt } => vec![prompt.iter().collect()],
        }
    }

    /// Every distinct message once (the prompt of a preference pair once, then
    /// chosen, then rejected).
    pub fn all_messages(&self) -> Vec<&Message> {
        match self {
            Record::Conversation { messages } => messages.iter().collect(),
            Record::PromptCompletion { prompt, completion } => prompt.iter().chain(completion).collect(),
            Record::Preference { prompt, chosen, rejected, .. } => {
                prompt.iter().chain(chosen).chain(rejected).collect()
            }
            Record::PromptOnly { prompt } => prompt.iter().collect(),
        }
    }

    /// Convert to another kind where that makes sense:
    /// - to conversational: prompt + completion, or prompt + chosen;
    /// - to prompt-completion: a conversation splits before its last run of
    ///   model turns; a preference pair keeps its chosen response;
    /// - to prompt-only: the prompt of any record;
    /// - to preference: only from a preference pair.
    ///
    /// The error says what is missing; readers report it as a bad row.
    pub fn convert(self, to: RecordKind) -> Result<Record, String> {
        let from = self.kind();
        if from == to {
            return Ok(self);
        }
        match (self, to) {
            (Record::PromptCompletion { prompt, completion }, RecordKind::Conversational) => {
                Ok(Record::Conversation { messages: concat(&prompt, &completion) })
            }
            (Record::Preference { prompt, chosen, .. }, RecordKind::Conversational) => {
                Ok(Record::Conversation { messages: concat(&prompt, &chosen) })
            }
            (Record::Conversation { messages }, RecordKind::PromptCompletion) => {
                let (prompt, completion) = split_last_response(&messages);
                if prompt.is_empty() || completion.is_empty() {
                    return Err("the conversation cannot be split into a prompt and a final model response"
                        .to_string());
                }
                Ok(Record::PromptCompletion { prompt: prompt.to_vec(), completion: completion.to_vec() })
            }
            (Record::Preference { prompt, chosen, .. }, RecordKind::PromptCompletion) => {
                Ok(Record::PromptCompletion { prompt, completion: chosen })
            }
            (record, RecordKind::PromptOnly) => {
                let prompt = record.prompt_messages();
                if prompt.is_empty() {
                    return Err("the record has no prompt messages".to_string());
                }
                Ok(Record::PromptOnly { prompt })
            }
            (_, to) => Err(format!("a {from} record cannot be used as a {to} record")),
        }
    }
}

fn concat(a: &[Message], b: &[Message]) -> Vec<Message> {
    a.iter().chain(b).cloned().collect()
}

/// Split a message list before its final run of model turns.
pub fn split_last_response(messages: &[Message]) -> (&[Message], &[Message]) {
    let mut cut = messages.len();
    while cut > 0 && messages[cut - 1].is_model() {
        cut -= 1;
    }
    messages.split_at(cut)
}

/// Where a record came from: the file and its 1-based line (JSONL) or row
/// (other formats) number.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    pub file: Arc<Path>,
    pub row: usize,
}

/// A record with its optional category (carried through for per-category
/// reports) and its origin.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub record: Record,
    pub category: Option<String>,
    pub origin: Origin,
}

impl Example {
    pub fn kind(&self) -> RecordKind {
        self.record.kind()
    }

    /// The record as one JSON object in canonical columns, which the readers
    /// read back to the same record: `messages`; `prompt` + `completion`;
    /// `prompt` + `chosen` + `rejected` (+ `margin`); `prompt`; plus
    /// `category`. A prompt that is one user message and a response that is one
    /// model message are written as plain text.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        match &self.record {
            Record::Conversation { messages } => {
                obj.insert("messages".into(), messages_json(messages));
            }
            Record::PromptCompletion { prompt, completion } => {
                obj.insert("prompt".into(), prompt_json(prompt));
                obj.insert("completion".into(), response_json(completion));
            }
            Record::Preference { prompt, chosen, rejected, margin } => {
                obj.insert("prompt".into(), prompt_json(prompt));
                obj.insert("chosen".into(), response_json(chosen));
                obj.insert("rejected".into(), response_json(rejected));
                if let Some(m) = margin {
                    obj.insert("margin".into(), Value::from(*m));
                }
            }
            Record::PromptOnly { prompt } => {
                obj.insert("prompt".into(), prompt_json(prompt));
            }
        }
        if let Some(c) = &self.category {
            obj.insert("category".into(), Value::String(c.clone()));
        }
        Value::Object(obj)
    }
}

fn messages_json(messages: &[Message]) -> Value {
    Value::Array(
        messages
            .iter()
            .map(|m| {
                let mut o = Map::new();
                o.insert("role".into(), Value::String(m.role.clone()));
                o.insert("content".into(), Value::String(m.content.clone()));
                Value::Object(o)
            })
            .collect(),
    )
}

fn prompt_json(prompt: &[Message]) -> Value {
    match prompt {
        [m] if m.role == ROLE_USER => Value::String(m.content.clone()),
        _ => messages_json(prompt),
    }
}

fn response_json(response: &[Message]) -> Value {
    match response {
        [m] if m.is_model() => Value::String(m.content.clone()),
        _ => messages_json(response),
    }
}

/// The canonical column names. A reader's column map renames a file's
/// columns to these.
pub const CANONICAL_COLUMNS: &[&str] = &[
    "messages",
    "prompt",
    "completion",
    "response",
    "output",
    "instruction",
    "input",
    "chosen",
    "rejected",
    "margin",
    "category",
];

/// Which kind a set of (canonical) column names holds, or why none fits.
/// Rules, first match wins: `chosen` + `rejected` → preference; `messages` →
/// conversational; `prompt` + one of `completion`/`response`/`output` →
/// prompt-completion; `instruction` + `output`/`response` → prompt-completion
/// (Alpaca); `prompt` or `instruction` alone → prompt-only.
pub fn detect_kind(columns: &BTreeSet<String>) -> Result<RecordKind, String> {
    let has = |c: &str| columns.contains(c);
    if has("chosen") && has("rejected") {
        return Ok(RecordKind::Preference);
    }
    if has("chosen") || has("rejected") {
        return Err("a preference file needs both `chosen` and `rejected` columns".to_string());
    }
    if has("messages") {
        return Ok(RecordKind::Conversational);
    }
    let response = has("completion") || has("response") || has("output");
    if has("prompt") && response {
        return Ok(RecordKind::PromptCompletion);
    }
    if has("instruction") && (has("output") || has("response")) {
        return Ok(RecordKind::PromptCompletion);
    }
    if has("prompt") || has("instruction") {
        return Ok(RecordKind::PromptOnly);
    }
    Err(format!(
        "cannot tell the record kind from the columns [{}]: expected `messages`, \
         `prompt` + `completion`/`response`/`output`, `instruction` + `output`, \
         `chosen` + `rejected`, or `prompt`; rename columns with the `columns` map \
         (canonical name = file's name)",
        columns.iter().cloned().collect::<Vec<_>>().join(", ")
    ))
}

/// A failure to read one row: the field and what was expected.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    fn at(field: &str, message: impl Into<String>) -> Self {
        FieldError { field: Some(field.to_string()), message: message.into() }
    }

    fn row(message: impl Into<String>) -> Self {
        FieldError { field: None, message: message.into() }
    }
}

/// A short description of a JSON value for error messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                format!("text {short:?}…")
            } else {
                format!("text {short:?}")
            }
        }
        Value::Array(a) => format!("a list of {} items", a.len()),
        Value::Object(o) => {
            format!("an object with keys [{}]", o.keys().cloned().collect::<Vec<_>>().join(", "))
        }
    }
}

/// Parse one row (canonical column names) as `kind`. `category` is read for
/// every kind.
pub(crate) fn parse_row(
    row: &Map<String, Value>,
    kind: RecordKind,
) -> Result<(Record, Option<String>), FieldError> {
    let record = match kind {
        RecordKind::Conversational => {
            let messages = message_list(required(row, "messages")?, "messages")?;
            if messages.is_empty() {
                return Err(FieldError::at("messages", "expected at least one message, found an empty list"));
            }
            if !messages.iter().any(Message::is_model) {
                return Err(FieldError::at(
                    "messages",
                    "has no model/assistant turn to train on (for prompts only, read the file with kind = \"prompt_only\")",
                ));
            }
            check_turn_order(&[Part::list("messages", &messages, 0)])?;
            Record::Conversation { messages }
        }
        RecordKind::PromptCompletion => parse_prompt_completion(row)?,
        RecordKind::Preference => parse_preference(row)?,
        RecordKind::PromptOnly => {
            let (prompt, field, listed) = if let Some(v) = present(row, "prompt") {
                (prompt_value(v, "prompt")?, "prompt", !is_plain_text(v))
            } else if let Some(v) = present(row, "messages") {
                let messages = message_list(v, "messages")?;
                check_turn_order(&[Part::list("messages", &messages, 0)])?;
                let (prompt, _) = split_last_response(&messages);
                (prompt.to_vec(), "messages", true)
            } else if present(row, "instruction").is_some() {
                (vec![Message::user(alpaca_prompt(row)?)], "instruction", false)
            } else {
                return Err(FieldError::row(
                    "expected a `prompt`, `messages` or `instruction` field, found none",
                ));
            };
            if prompt.is_empty() || prompt.iter().all(|m| m.content.trim().is_empty()) {
                return Err(FieldError::at("prompt", "expected a non-empty prompt"));
            }
            let part = if listed { Part::list(field, &prompt, 0) } else { Part::text(field, &prompt) };
            check_turn_order(&[part])?;
            check_ends_with_user(part)?;
            Record::PromptOnly { prompt }
        }
    };
    let category = match present(row, "category") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        Some(other) => {
            return Err(FieldError::at("category", format!("expected text, found {}", describe(other))))
        }
    };
    Ok((record, category))
}

/// The value of a field that is present and not null.
fn present<'a>(row: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    row.get(field).filter(|v| !v.is_null())
}

fn required<'a>(row: &'a Map<String, Value>, field: &str) -> Result<&'a Value, FieldError> {
    match row.get(field) {
        Some(Value::Null) => Err(FieldError::at(field, "expected a value, found null")),
        Some(v) => Ok(v),
        None => Err(FieldError::at(field, "is missing")),
    }
}

fn text<'a>(v: &'a Value, field: &str) -> Result<&'a str, FieldError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(FieldError::at(field, format!("expected text, found {}", describe(other)))),
    }
}

const ROLES: &[&str] = &[ROLE_USER, ROLE_ASSISTANT, ROLE_MODEL, ROLE_SYSTEM];

/// A field's value that is one plain text (not a message list in JSON).
fn is_plain_text(v: &Value) -> bool {
    matches!(v, Value::String(s) if !looks_like_message_list(s))
}

/// Messages that came from one field of the row, for turn-order checks.
#[derive(Clone, Copy)]
struct Part<'a> {
    field: &'a str,
    messages: &'a [Message],
    /// Index of the first message within the field's list; `None` when the
    /// field held plain text (one message).
    offset: Option<usize>,
}

impl<'a> Part<'a> {
    fn list(field: &'a str, messages: &'a [Message], offset: usize) -> Self {
        Part { field, messages, offset: Some(offset) }
    }

    fn text(field: &'a str, messages: &'a [Message]) -> Self {
        Part { field, messages, offset: None }
    }

    /// Where message `j` of this part sits, e.g. `messages[2].role`.
    fn role_field(&self, j: usize) -> String {
        match self.offset {
            Some(o) => format!("{}[{}].role", self.field, o + j),
            None => self.field.to_string(),
        }
    }
}

/// Checks that `parts`, read in order as one dialogue, follow the order the
/// Gemma formatter needs: an optional system message first, then user and
/// model turns alternating, starting with user. The error names the field
/// and the message index, and says which role was expected.
fn check_turn_order(parts: &[Part<'_>]) -> Result<(), FieldError> {
    const RULE: &str =
        "turns must alternate user, model, user, … starting with user, after an optional first system message";
    let (mut pos, mut turn) = (0usize, 0usize);
    for part in parts {
        for (j, m) in part.messages.iter().enumerate() {
            if m.role == ROLE_SYSTEM {
                if pos != 0 {
                    return Err(FieldError::at(
                        &part.role_field(j),
                        format!("expected a {} turn, found a system message; a system message may only come first ({RULE})",
                            if turn % 2 == 0 { "user" } else { "model/assistant" }),
                    ));
                }
            } else {
                let want_user = turn % 2 == 0;
                if want_user != (m.role == ROLE_USER) {
                    let (want, what) = if want_user {
                        ("a user", if turn == 0 { "the first turn" } else { "a model turn" })
                    } else {
                        ("a model/assistant", "a user turn")
                    };
                    let after = if turn == 0 { format!("as {what}") } else { format!("after {what}") };
                    return Err(FieldError::at(
                        &part.role_field(j),
                        format!("expected {want} turn {after}, found {:?} ({RULE})", m.role),
                    ));
                }
                turn += 1;
            }
            pos += 1;
        }
    }
    Ok(())
}

/// A prompt for generation ends with the user's turn (the model answers it).
fn check_ends_with_user(part: Part<'_>) -> Result<(), FieldError> {
    match part.messages.last() {
        Some(m) if m.role != ROLE_USER => Err(FieldError::at(
            &part.role_field(part.messages.len() - 1),
            format!(
                "expected the prompt to end with a user turn for the model to answer, found {:?}",
                m.role
            ),
        )),
        _ => Ok(()),
    }
}

/// A list of {role, content} objects. A string holding such a list as JSON
/// (as CSV files carry it) is accepted too.
fn message_list(v: &Value, field: &str) -> Result<Vec<Message>, FieldError> {
    let parsed;
    let v = match v {
        Value::String(s) if s.trim_start().starts_with('[') => {
            parsed = serde_json::from_str::<Value>(s).map_err(|e| {
                FieldError::at(
                    field,
                    format!("expected a list of {{role, content}} messages; the text looks like JSON but does not parse: {e}"),
                )
            })?;
            &parsed
        }
        other => other,
    };
    let Value::Array(items) = v else {
        return Err(FieldError::at(
            field,
            format!("expected a list of {{role, content}} messages, found {}", describe(v)),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let here = format!("{field}[{i}]");
        let Value::Object(o) = item else {
            return Err(FieldError::at(
                &here,
                format!("expected a {{role, content}} object, found {}", describe(item)),
            ));
        };
        let role = match o.get("role") {
            Some(Value::String(r)) => r.trim().to_lowercase(),
            Some(other) => {
                return Err(FieldError::at(
                    &format!("{here}.role"),
                    format!("expected text, found {}", describe(other)),
                ))
            }
            None => {
                return Err(FieldError::at(
                    &format!("{here}.role"),
                    "is missing (each message needs `role` and `content`)",
                ))
            }
        };
        if !ROLES.contains(&role.as_str()) {
            return Err(FieldError::at(
                &format!("{here}.role"),
                format!("expected one of user, assistant, model, system, found {role:?}"),
            ));
        }
        let content = match o.get("content") {
            Some(Value::String(c)) => c.clone(),
            Some(other) => {
                return Err(FieldError::at(
                    &format!("{here}.content"),
                    format!("expected text, found {}", describe(other)),
                ))
            }
            None => {
                return Err(FieldError::at(
                    &format!("{here}.content"),
                    "is missing (each message needs `role` and `content`)",
                ))
            }
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

/// A prompt: text (one user message) or a message list.
fn prompt_value(v: &Value, field: &str) -> Result<Vec<Message>, FieldError> {
    match v {
        Value::String(s) if !looks_like_message_list(s) => Ok(vec![Message::user(s.clone())]),
        Value::String(_) | Value::Array(_) => message_list(v, field),
        other => Err(FieldError::at(
            field,
            format!("expected text or a list of {{role, content}} messages, found {}", describe(other)),
        )),
    }
}

/// A response: text (one model message) or a message list.
fn response_value(v: &Value, field: &str) -> Result<Vec<Message>, FieldError> {
    match v {
        Value::String(s) if !looks_like_message_list(s) => Ok(vec![Message::model(s.clone())]),
        Value::String(_) | Value::Array(_) => message_list(v, field),
        other => Err(FieldError::at(
            field,
            format!("expected text or a list of {{role, content}} messages, found {}", describe(other)),
        )),
    }
}

/// Text that parses as a JSON list of objects with `role` and `content`.
fn looks_like_message_list(s: &str) -> bool {
    let t = s.trim_start();
    if !t.starts_with('[') {
        return false;
    }
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Array(items)) => {
            !items.is_empty()
                && items.iter().all(|i| {
                    i.as_object().is_some_and(|o| o.contains_key("role") && o.contains_key("content"))
                })
        }
        _ => false,
    }
}

fn alpaca_prompt(row: &Map<String, Value>) -> Result<String, FieldError> {
    let instruction = text(required(row, "instruction")?, "instruction")?;
    let input = match present(row, "input") {
        None => "",
        Some(v) => text(v, "input")?,
    };
    Ok(if input.trim().is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") })
}

fn parse_prompt_completion(row: &Map<String, Value>) -> Result<Record, FieldError> {
    let prompt = if present(row, "prompt").is_some() || present(row, "instruction").is_none() {
        prompt_value(required(row, "prompt")?, "prompt")?
    } else {
        vec![Message::user(alpaca_prompt(row)?)]
    };
    let field = ["completion", "response", "output"].into_iter().find(|f| present(row, f).is_some());
    let Some(field) = field else {
        // Name the column the file has (null here), or `completion` when none.
        let named = ["completion", "response", "output"]
            .into_iter()
            .find(|f| row.contains_key(*f))
            .unwrap_or("completion");
        return Err(FieldError::at(named, "expected the response text, found null or nothing"));
    };
    let completion_value = required(row, field)?;
    let completion = response_value(completion_value, field)?;
    if prompt.is_empty() || prompt.iter().all(|m| m.content.trim().is_empty()) {
        return Err(FieldError::at("prompt", "expected a non-empty prompt"));
    }
    if completion.is_empty() || completion.iter().all(|m| m.content.trim().is_empty()) {
        return Err(FieldError::at(field, "expected a non-empty response"));
    }
    let prompt_part = match present(row, "prompt") {
        Some(v) if !is_plain_text(v) => Part::list("prompt", &prompt, 0),
        Some(_) => Part::text("prompt", &prompt),
        None => Part::text("instruction", &prompt),
    };
    let completion_part = if is_plain_text(completion_value) {
        Part::text(field, &completion)
    } else {
        Part::list(field, &completion, 0)
    };
    check_turn_order(&[prompt_part, completion_part])?;
    Ok(Record::PromptCompletion { prompt, completion })
}

/// Parse an HH-RLHF transcript ("\n\nHuman: … \n\nAssistant: …") into
/// messages; `None` when the text has no such markers.
pub fn parse_hh_transcript(s: &str) -> Option<Vec<Message>> {
    const HUMAN: &str = "Human:";
    const ASSISTANT: &str = "Assistant:";
    let t = s.trim_start();
    if !(t.starts_with(HUMAN) || t.starts_with(ASSISTANT)) {
        return None;
    }
    // Markers count only at the start of the text or after a blank line.
    let mut marks: Vec<(usize, &str, usize)> = Vec::new();
    let base = s.len() - t.len();
    let start_role =
        if t.starts_with(HUMAN) { (ROLE_USER, HUMAN.len()) } else { (ROLE_MODEL, ASSISTANT.len()) };
    marks.push((base, start_role.0, start_role.1));
    let mut from = base + start_role.1;
    while let Some(pos) = s[from..].find("\n\n") {
        let at = from + pos;
        let rest = &s[at + 2..];
        if rest.starts_with(HUMAN) {
            marks.push((at, ROLE_USER, 2 + HUMAN.len()));
            from = at + 2 + HUMAN.len();
        } else if rest.starts_with(ASSISTANT) {
            marks.push((at, ROLE_MODEL, 2 + ASSISTANT.len()));
            from = at + 2 + ASSISTANT.len();
        } else {
            from = at + 2;
        }
    }
    let mut out = Vec::with_capacity(marks.len());
    for (i, &(at, role, len)) in marks.iter().enumerate() {
        let end = marks.get(i + 1).map_or(s.len(), |m| m.0);
        out.push(Message::new(role, s[at + len..end].trim()));
    }
    Some(out)
}

fn preference_side(v: &Value, field: &str) -> Result<(Vec<Message>, bool), FieldError> {
    match v {
        Value::String(s) => match parse_hh_transcript(s) {
            Some(m) => Ok((m, true)),
            None => response_value(v, field).map(|m| (m, looks_like_message_list(s))),
        },
        Value::Array(_) => message_list(v, field).map(|m| (m, true)),
        other => Err(FieldError::at(
            field,
            format!(
                "expected text, an HH-RLHF transcript or a list of {{role, content}} messages, found {}",
                describe(other)
            ),
        )),
    }
}

fn parse_preference(row: &Map<String, Value>) -> Result<Record, FieldError> {
    let (chosen, chosen_full) = preference_side(required(row, "chosen")?, "chosen")?;
    let (rejected, rejected_full) = preference_side(required(row, "rejected")?, "rejected")?;
    let margin = match present(row, "margin") {
        None => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(
            s.trim()
                .parse::<f64>()
                .map_err(|_| FieldError::at("margin", format!("expected a number, found text {s:?}")))?,
        ),
        Some(other) => {
            return Err(FieldError::at("margin", format!("expected a number, found {}", describe(other))))
        }
    };
    if margin.is_some_and(|m| !m.is_finite()) {
        return Err(FieldError::at("margin", "expected a finite number"));
    }
    for (side, msgs) in [("chosen", &chosen), ("rejected", &rejected)] {
        if msgs.is_empty() || msgs.iter().all(|m| m.content.trim().is_empty()) {
            return Err(FieldError::at(side, "is empty; a preference pair needs two responses"));
        }
    }
    // Whole dialogues (message lists, transcripts): the shared prefix is the prompt.
    let (mut prompt, chosen, rejected) = if chosen_full || rejected_full {
        let mut common = chosen.iter().zip(&rejected).take_while(|(a, b)| a == b).count();
        // A response never starts inside the shared prefix's model turns.
        while common > 0 && chosen[common - 1].is_model() {
            common -= 1;
        }
        let prompt = chosen[..common].to_vec();
        (prompt, chosen[common..].to_vec(), rejected[common..].to_vec())
    } else {
        (Vec::new(), chosen, rejected)
    };
    // Where each part sits in its field, for turn-order errors.
    let shared = prompt.len();
    let prompt_field = present(row, "prompt");
    let prompt_from_field = prompt.is_empty();
    if prompt.is_empty() {
        prompt = prompt_value(
            required(row, "prompt").map_err(|_| {
                FieldError::at(
                    "prompt",
                    "is missing, and `chosen`/`rejected` share no prompt turns to take it from",
                )
            })?,
            "prompt",
        )?;
    }
    if chosen.iter().map(|m| m.content.trim()).eq(rejected.iter().map(|m| m.content.trim())) {
        return Err(FieldError::at(
            "rejected",
            "is identical to `chosen`; a preference pair needs two different responses",
        ));
    }
    for (side, msgs) in [("chosen", &chosen), ("rejected", &rejected)] {
        if msgs.is_empty() || msgs.iter().all(|m| m.content.trim().is_empty()) {
            return Err(FieldError::at(side, "has an empty response after the shared prompt"));
        }
        if !msgs[0].is_model() {
            return Err(FieldError::at(
                side,
                format!(
                    "expected the response after the shared prompt to start with a model turn, found a {} turn",
                    msgs[0].role
                ),
            ));
        }
    }
    if prompt.iter().all(|m| m.content.trim().is_empty()) {
        return Err(FieldError::at("prompt", "expected a non-empty prompt"));
    }
    for (side, msgs, full) in [("chosen", &chosen, chosen_full), ("rejected", &rejected, rejected_full)] {
        let prompt_part = if !prompt_from_field {
            // Taken from the shared turns at the start of both sides.
            Part::list(side, &prompt, 0)
        } else if prompt_field.is_some_and(|v| !is_plain_text(v)) {
            Part::list("prompt", &prompt, 0)
        } else {
            Part::text("prompt", &prompt)
        };
        let side_part = if full { Part::list(side, msgs, shared) } else { Part::text(side, msgs) };
        check_turn_order(&[prompt_part, side_part])?;
    }
    Ok(Record::Preference { prompt, chosen, rejected, margin })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn hh_transcript_splits_turns_and_shared_prefix_becomes_prompt() {
        let r = row(json!({
            "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4.",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 5, obviously."
        }));
        let (rec, _) = parse_row(&r, RecordKind::Preference).unwrap();
        let Record::Preference { prompt, chosen, rejected, margin } = rec else { panic!() };
        assert_eq!(
            prompt,
            vec![Message::user("Hi there"), Message::model("Hello!"), Message::user("What is 2+2?")]
        );
        assert_eq!(chosen, vec![Message::model("4.")]);
        assert_eq!(rejected, vec![Message::model("5, obviously.")]);
        assert_eq!(margin, None);
    }

    #[test]
    fn hh_marker_inside_a_line_is_not_a_turn() {
        let m = parse_hh_transcript("Human: say \"Assistant: x\" please\n\nAssistant: ok").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].content, "say \"Assistant: x\" please");
        assert!(parse_hh_transcript("just text").is_none());
    }

    #[test]
    fn identical_or_empty_preference_sides_are_rejected() {
        let same = row(json!({"prompt": "p", "chosen": "a ", "rejected": "a"}));
        let e = parse_row(&same, RecordKind::Preference).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("rejected"));
        assert!(e.message.contains("identical"));
        let empty = row(json!({"prompt": "p", "chosen": "  ", "rejected": "a"}));
        let e = parse_row(&empty, RecordKind::Preference).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("chosen"));
    }

    #[test]
    fn detect_kind_follows_documented_precedence() {
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            detect_kind(&cols(&["prompt", "chosen", "rejected", "messages"])),
            Ok(RecordKind::Preference)
        );
        assert_eq!(detect_kind(&cols(&["prompt", "messages"])), Ok(RecordKind::Conversational));
        assert_eq!(detect_kind(&cols(&["prompt", "response"])), Ok(RecordKind::PromptCompletion));
        assert_eq!(detect_kind(&cols(&["instruction", "input", "output"])), Ok(RecordKind::PromptCompletion));
        assert_eq!(detect_kind(&cols(&["prompt", "id"])), Ok(RecordKind::PromptOnly));
        assert!(detect_kind(&cols(&["text"])).unwrap_err().contains("columns [text]"));
        assert!(detect_kind(&cols(&["chosen"])).is_err());
    }

    #[test]
    fn conversions_between_kinds() {
        let conv = Record::Conversation {
            messages: vec![
                Message::system("be brief"),
                Message::user("q"),
                Message::new(ROLE_ASSISTANT, "a"),
            ],
        };
        let pc = conv.clone().convert(RecordKind::PromptCompletion).unwrap();
        assert_eq!(pc.prompt_messages().len(), 2);
        assert_eq!(pc.messages(), conv.messages());
        let po = conv.clone().convert(RecordKind::PromptOnly).unwrap();
        assert_eq!(po.messages(), vec![Message::system("be brief"), Message::user("q")]);
        assert!(po.convert(RecordKind::Preference).is_err());
    }

    #[test]
    fn to_json_reads_back_to_the_same_record() {
        let examples = [
            Record::Conversation { messages: vec![Message::user("u"), Message::model("m")] },
            Record::PromptCompletion {
                prompt: vec![Message::user("u")],
                completion: vec![Message::model("m")],
            },
            Record::Preference {
                prompt: vec![Message::user("u"), Message::model("m"), Message::user("u2")],
                chosen: vec![Message::model("c")],
                rejected: vec![Message::model("r")],
                margin: Some(1.5),
            },
            Record::PromptOnly { prompt: vec![Message::system("s"), Message::user("u")] },
        ];
        for record in examples {
            let ex = Example {
                record: record.clone(),
                category: Some("cat".into()),
                origin: Origin { file: Arc::from(Path::new("x")), row: 1 },
            };
            let v = ex.to_json();
            let (back, cat) = parse_row(v.as_object().unwrap(), record.kind()).unwrap();
            assert_eq!(back, record);
            assert_eq!(cat.as_deref(), Some("cat"));
        }
    }
}
