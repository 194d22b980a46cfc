//! A checkpoint's own chat template (`chat_template.jinja`, or the
//! `chat_template` of `tokenizer_config.json`), rendered with `minijinja` as
//! transformers' `apply_chat_template` renders it with Jinja2: `trim_blocks`
//! and `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`,
//! `namespace`, Python's string and dict methods, transformers' `tojson`,
//! and the named special tokens (`bos_token`, `eos_token`, ...) as variables.
//!
//! [`ChatTemplate::render`] gives a [`Rendered`]: the text, the template's
//! own control tokens, and the spans the loss trains on, found by rendering
//! prefixes of the conversation (each model turn's content and what the
//! template writes after it: its end marker). Content is marked as
//! transformers' `sanitize_control_tokens=True` marks it, so a control-token
//! string typed in a message stays text.

use anyhow::{anyhow, bail, Context, Result};
use datasets::Message;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

/// A conversation rendered to text, with the byte ranges the loss trains on
/// and those of the template's own control tokens (`<bos>`,
/// `<start_of_turn>`, `<end_of_turn>`), in order; everything else is text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub trained: Vec<Range<usize>>,
    pub controls: Vec<Range<usize>>,
}

/// Gemma's chat template (Jinja), as transformers' `apply_chat_template`
/// runs it: align's built-in formatter renders the same text.
pub const CHAT_TEMPLATE: &str = include_str!("../chat_template.jinja");

/// The file that holds a checkpoint's template, as transformers 5 saves it
/// (it takes precedence over `tokenizer_config.json`'s `chat_template`).
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
/// `tokenizer_config.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Private-use markers around control-token strings found in messages:
/// transformers' `_CONTROL_TOKEN_START` / `_CONTROL_TOKEN_END`.
const MARK_START: char = '\u{f0000}';
const MARK_END: char = '\u{f0001}';
/// What a `raise_exception` call's error detail starts with.
const RAISED: &str = "raise_exception: ";

/// Where a chat template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// align's built-in Gemma template (`chat_template.jinja` in lm/src).
    Builtin,
    /// A checkpoint's `chat_template.jinja`.
    File(PathBuf),
    /// The `chat_template` of a checkpoint's `tokenizer_config.json`; `name`
    /// is set when it is a list of named templates (the `default` one).
    TokenizerConfig { path: PathBuf, name: Option<String> },
}

impl std::fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateOrigin::Builtin => write!(f, "align's built-in Gemma template"),
            TemplateOrigin::File(p) => write!(f, "{}", p.display()),
            TemplateOrigin::TokenizerConfig { path, name: None } => {
                write!(f, "the chat_template of {}", path.display())
            }
            TemplateOrigin::TokenizerConfig { path, name: Some(n) } => {
                write!(f, "the {n:?} chat_template of {}", path.display())
            }
        }
    }
}

/// The template files of a checkpoint directory, byte for byte as read, so
/// that a checkpoint align writes keeps them as they were.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateFiles {
    /// `tokenizer_config.json`, when the directory has one.
    pub tokenizer_config: Option<Vec<u8>>,
    /// `chat_template.jinja`, when the directory has one.
    pub chat_template: Option<Vec<u8>>,
}

impl TemplateFiles {
    /// Reads the files of `dir` that exist.
    pub fn read(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            std::fs::read(&p).map(Some).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(TemplateFiles {
            tokenizer_config: read(TOKENIZER_CONFIG_FILE)?,
            chat_template: read(TEMPLATE_FILE)?,
        })
    }

    /// True when neither file exists.
    pub fn is_empty(&self) -> bool {
        self.tokenizer_config.is_none() && self.chat_template.is_none()
    }
}

/// The template text and the named special tokens found in a checkpoint
/// directory's files (`dir` names them in messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundTemplate {
    pub source: String,
    pub origin: TemplateOrigin,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token`, ... from
    /// `tokenizer_config.json`, as `apply_chat_template` passes them.
    pub variables: BTreeMap<String, String>,
}

/// The string of a special-token entry: a plain string or an AddedToken
/// object with `content`.
fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`).
const NAMED_TOKENS: [&str; 8] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
];

/// Finds the chat template of a checkpoint directory from its `files`:
/// `chat_template.jinja` first (as transformers 5 does), then
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of
/// `{name, template}` of which `default` is used). `None` when there is none.
pub fn find(dir: &Path, files: &TemplateFiles) -> Result<Option<FoundTemplate>> {
    let config_path = dir.join(TOKENIZER_CONFIG_FILE);
    let config: Option<serde_json::Map<String, serde_json::Value>> = match &files.tokenizer_config {
        None => None,
        Some(bytes) => Some(
            serde_json::from_slice(bytes)
                .map_err(|e| anyhow!("{} is not a JSON object: {e}", config_path.display()))?,
        ),
    };
    let mut variables = BTreeMap::new();
    if let Some(c) = &config {
        for name in NAMED_TOKENS.iter().take(7) {
            if let Some(s) = c.get(*name).and_then(token_string) {
                variables.insert(name.to_string(), s);
            }
        }
    }
    if let Some(bytes) = &files.chat_template {
        let path = dir.join(TEMPLATE_FILE);
        let source =
            String::from_utf8(bytes.clone()).map_err(|_| anyhow!("{} is not UTF-8 text", path.display()))?;
        return Ok(Some(FoundTemplate { source, origin: TemplateOrigin::File(path), variables }));
    }
    let Some(entry) = config.as_ref().and_then(|c| c.get("chat_template")) else {
        return Ok(None);
    };
    let (source, name) = match entry {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::String(s) => (s.clone(), None),
        serde_json::Value::Array(list) => {
            let mut names = Vec::new();
            let mut found = None;
            for t in list {
                let n = t.get("name").and_then(|n| n.as_str()).unwrap_or_default();
                names.push(n.to_string());
                if n == "default" {
                    found = t.get("template").and_then(|t| t.as_str()).map(str::to_string);
                }
            }
            match found {
                Some(s) => (s, Some("default".to_string())),
                None => bail!(
                    "{}: chat_template is a list of named templates ({}) without a \"default\" one with a \"template\" string",
                    config_path.display(),
                    names.join(", ")
                ),
            }
        }
        other => bail!(
            "{}: chat_template must be a string or a list of {{\"name\", \"template\"}}, not {other}",
            config_path.display()
        ),
    };
    Ok(Some(FoundTemplate {
        source,
        origin: TemplateOrigin::TokenizerConfig { path: config_path, name },
        variables,
    }))
}

/// A compiled chat template with what rendering needs from the tokenizer.
pub struct ChatTemplate {
    pub source: String,
    pub origin: TemplateOrigin,
    pub variables: BTreeMap<String, String>,
    /// Never changed after [`ChatTemplate::new`], so a panic cannot leave it
    /// half-updated (the tokenizer that holds it stays unwind-safe).
    env: AssertUnwindSafe<Environment<'static>>,
    /// Strings of the control tokens, grouped by first byte, longest first:
    /// the tokenizer's special tokens and the added tokens the template's
    /// text contains (transformers' `_get_control_tokens`).
    control: HashMap<u8, Vec<String>>,
    /// The special tokens alone, grouped the same way: the ones the template
    /// writes are encoded as control tokens.
    special: HashMap<u8, Vec<String>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).finish_non_exhaustive()
    }
}

fn group(tokens: impl IntoIterator<Item = String>) -> HashMap<u8, Vec<String>> {
    let mut g: HashMap<u8, Vec<String>> = HashMap::new();
    for t in tokens.into_iter().collect::<BTreeSet<_>>() {
        if let Some(&b) = t.as_bytes().first() {
            g.entry(b).or_default().push(t);
        }
    }
    for v in g.values_mut() {
        v.sort_by_key(|t| std::cmp::Reverse(t.len()));
    }
    g
}

/// The longest of `tokens` that `s[at..]` starts with.
fn token_at<'a>(tokens: &'a HashMap<u8, Vec<String>>, s: &str, at: usize) -> Option<&'a str> {
    let rest = &s.as_bytes()[at..];
    let first = rest.first()?;
    tokens.get(first)?.iter().find(|t| rest.starts_with(t.as_bytes())).map(String::as_str)
}

/// Python's `str.strip(chars)` family: `chars` None strips white space as
/// Python does.
fn py_strip<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let strip = |c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c),
    };
    let s = if left { s.trim_start_matches(strip) } else { s };
    if right {
        s.trim_end_matches(strip)
    } else {
        s
    }
}

/// Python's `json.dumps` of a template value, as transformers' `tojson`
/// filter calls it.
fn write_json(out: &mut String, v: &Value, opts: &JsonOpts, depth: usize) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(indent) = &opts.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let s = v.to_string();
            out.push_str(match s.as_str() {
                "inf" => "Infinity",
                "-inf" => "-Infinity",
                "nan" | "NaN" => "NaN",
                s => s,
            })
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, opts, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, depth + 1);
                match k.as_str() {
                    Some(s) => write_json_str(out, s, opts.ensure_ascii),
                    None => write_json_str(out, &k.to_string(), opts.ensure_ascii),
                }
                out.push_str(&opts.key_sep);
                write_json(out, &v.get_item(k)?, opts, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialise a {}", v.kind()),
            ))
        }
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn tojson(v: Value, kwargs: Kwargs) -> Result<String, Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(i) if i.is_none() => None,
        Some(i) => Some(match i.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(i).unwrap_or(0)),
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, &v, &JsonOpts { ensure_ascii, indent, item_sep, key_sep, sort_keys }, 0)?;
    Ok(out)
}

/// Python string methods: `strip`/`lstrip`/`rstrip` with Python's white
/// space, the rest from minijinja-contrib's pycompat.
fn py_methods(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let (Some(s), "strip" | "lstrip" | "rstrip") = (value.as_str(), method) {
        let chars: Option<Option<String>> = match args {
            [] => None,
            [a] if a.is_none() => None,
            [a] => Some(a.as_str().map(str::to_string)),
            _ => {
                return Err(Error::new(
                    ErrorKind::TooManyArguments,
                    format!("str.{method} takes one argument"),
                ))
            }
        };
        let chars = match chars {
            None => None,
            Some(Some(c)) => Some(c),
            Some(None) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("str.{method}: chars must be a string"),
                ))
            }
        };
        let (l, r) = match method {
            "strip" => (true, true),
            "lstrip" => (true, false),
            _ => (false, true),
        };
        return Ok(Value::from(py_strip(s, chars.as_deref(), l, r)));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` tags
/// (its assistant-mask extension; the loss mask here comes from prefixes).
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        let tag_end = rest[i..].find("%}").map(|j| i + j + 2);
        let inner = tag_end
            .map(|e| rest[i + 2..e - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace()));
        match (tag_end, inner) {
            (Some(e), Some("generation" | "endgeneration")) => {
                out.push_str(&rest[..i]);
                rest = &rest[e..];
            }
            _ => {
                out.push_str(&rest[..i + 2]);
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl ChatTemplate {
    /// Compiles `found` for the tokenizer `tok`. A template that does not
    /// compile is an error naming its origin.
    pub fn new(found: FoundTemplate, tok: &tokenizers::Tokenizer) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(py_methods);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
        });
        env.add_function("strftime_now", |format: String| -> Result<String, Error> { strftime_now(&format) });
        env.add_filter("tojson", tojson);
        env.add_filter("trim", |s: String, chars: Option<String>| -> String {
            py_strip(&s, chars.as_deref(), true, true).to_string()
        });
        env.add_template_owned("chat_template", strip_generation_tags(&found.source))
            .map_err(|e| anyhow!("the chat template ({}) does not compile: {e}", found.origin))?;
        let added = tok.get_added_tokens_decoder();
        let special: Vec<String> = added.values().filter(|t| t.special).map(|t| t.content.clone()).collect();
        let control: Vec<String> = added
            .values()
            .filter(|t| {
                t.special || (found.source.contains(t.content.as_str()) && !t.content.trim().is_empty())
            })
            .map(|t| t.content.clone())
            .collect();
        Ok(ChatTemplate {
            source: found.source,
            origin: found.origin,
            variables: found.variables,
            env: AssertUnwindSafe(env),
            control: group(control),
            special: group(special),
        })
    }

    /// Wraps each control-token string of `s` in the markers (after removing
    /// any markers `s` had): transformers' `mark_control_tokens`.
    fn mark(&self, s: &str) -> String {
        let s: String = s.chars().filter(|&c| c != MARK_START && c != MARK_END).collect();
        let mut out = String::with_capacity(s.len());
        let mut at = 0;
        while at < s.len() {
            if let Some(t) = token_at(&self.control, &s, at) {
                out.push(MARK_START);
                out.push_str(t);
                out.push(MARK_END);
                at += t.len();
            } else {
                let c = s[at..].chars().next().unwrap_or_default();
                out.push(c);
                at += c.len_utf8().max(1);
            }
        }
        out
    }

    /// Renders `messages` as they are: `apply_chat_template(tokenize=False)`.
    pub fn render_text(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_raw(messages, add_generation_prompt)
    }

    fn render_raw(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat_template").map_err(|e| anyhow!("{e}"))?;
        let mut ctx: BTreeMap<&str, Value> =
            self.variables.iter().map(|(k, v)| (k.as_str(), Value::from(v.as_str()))).collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        tmpl.render(ctx).map_err(|e| self.render_error(e))
    }

    fn render_error(&self, e: Error) -> anyhow::Error {
        match e.detail().and_then(|d| d.strip_prefix(RAISED)) {
            Some(message) => anyhow!("the chat template ({}) raised an error: {message}", self.origin),
            None => {
                let mut msg = format!("the chat template ({}) failed: {e}", self.origin);
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    let _ = write!(msg, ": {s}");
                    source = s.source();
                }
                anyhow!(msg)
            }
        }
    }

    /// Renders with the control-token strings of every role and content
    /// marked.
    fn render_marked(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let marked: Vec<Message> = messages
            .iter()
            .map(|m| Message { role: self.mark(&m.role), content: self.mark(&m.content) })
            .collect();
        self.render_raw(&marked, add_generation_prompt)
    }

    /// Renders `messages` and finds the template's control tokens and the
    /// spans the loss trains on: each model turn's content and what the
    /// template writes after it when it is the last message (its end
    /// marker), found by rendering the conversation up to that turn with a
    /// probe for its content.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
        if messages.is_empty() {
            bail!("the conversation is empty; it needs at least one user turn");
        }
        let full = self.render_marked(messages, add_generation_prompt)?;
        let probe = probe_for(messages);
        let mut trained_marked = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !m.is_model() {
                continue;
            }
            let mut probed = messages[..=i].to_vec();
            probed[i].content = probe.clone();
            let with_probe = self.render_marked(&probed, false)?;
            let mut hits = with_probe.match_indices(probe.as_str());
            let (Some((at, _)), None) = (hits.next(), hits.next()) else {
                bail!(
                    "message {i}: the chat template ({}) does not write a model turn's content once and as it is, \
                     so align cannot find what to train on",
                    self.origin
                );
            };
            let (head, tail) = (&with_probe[..at], &with_probe[at + probe.len()..]);
            let upto = self.render_marked(&messages[..=i], false)?;
            if !(upto.len() >= head.len() + tail.len() && upto.starts_with(head) && upto.ends_with(tail)) {
                bail!(
                    "message {i}: the chat template ({}) writes the turns before a model turn differently \
                     depending on its content, so align cannot find what to train on",
                    self.origin
                );
            }
            if !full.starts_with(&upto) {
                bail!(
                    "message {i}: the chat template ({}) does not render the conversation up to this model turn \
                     as the start of the whole conversation, so align cannot find what to train on",
                    self.origin
                );
            }
            trained_marked.push(head.len()..upto.len());
        }
        Ok(self.unmark(&full, &trained_marked))
    }

    /// Removes the markers of a marked rendering: the marked strings become
    /// text, lone markers are dropped, and the special tokens outside marks
    /// are the template's control tokens. `spans` (byte ranges of `marked`)
    /// are mapped to the text.
    fn unmark(&self, marked: &str, spans: &[Range<usize>]) -> Rendered {
        let mut text = String::with_capacity(marked.len());
        let mut controls = Vec::new();
        // Byte offset in `marked` -> offset in `text`, for each marker removed.
        let mut removed: Vec<usize> = Vec::new();
        let mut at = 0;
        let end_len = MARK_END.len_utf8();
        while at < marked.len() {
            let rest = &marked[at..];
            if rest.starts_with(MARK_START) {
                let inner_start = at + MARK_START.len_utf8();
                if let Some(t) = token_at(&self.control, marked, inner_start.min(marked.len()))
                    .filter(|t| marked[inner_start + t.len()..].starts_with(MARK_END))
                {
                    removed.push(at);
                    text.push_str(t);
                    removed.push(inner_start + t.len());
                    at = inner_start + t.len() + end_len;
                    continue;
                }
                removed.push(at);
                at = inner_start;
                continue;
            }
            if rest.starts_with(MARK_END) {
                removed.push(at);
                at += end_len;
                continue;
            }
            if let Some(t) = token_at(&self.special, marked, at) {
                controls.push(text.len()..text.len() + t.len());
                text.push_str(t);
                at += t.len();
                continue;
            }
            let c = rest.chars().next().unwrap_or_default();
            text.push(c);
            at += c.len_utf8().max(1);
        }
        // Each marker is 4 bytes in UTF-8; a position moves back by the
        // markers before it.
        let map = |p: usize| p - removed.partition_point(|&r| r < p) * MARK_START.len_utf8();
        let trained = spans.iter().map(|s| map(s.start)..map(s.end)).collect();
        Rendered { text, trained, controls }
    }
}

/// A private-use string that no message contains, to stand for a model
/// turn's content.
fn probe_for(messages: &[Message]) -> String {
    let mut n = 0x10_0000u32;
    loop {
        let probe: String = [char::from_u32(n).unwrap_or('\u{10ffff}'), '\u{f0002}'].iter().collect();
        if !messages.iter().any(|m| m.content.contains(&probe) || m.role.contains(&probe)) {
            return probe;
        }
        n += 1;
    }
}

/// `strftime_now(format)`: the current UTC time formatted with the common
/// `strftime` codes (`%Y %m %d %H %M %S %B %b %A %a %y %j %p %I %%`).
fn strftime_now(format: &str) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (h, mi, s) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let month = MONTHS[(m - 1) as usize];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{y:04}"),
            Some('y') => write!(out, "{:02}", y.rem_euclid(100)),
            Some('m') => write!(out, "{m:02}"),
            Some('d') => write!(out, "{d:02}"),
            Some('H') => write!(out, "{h:02}"),
            Some('I') => write!(out, "{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
            Some('p') => write!(out, "{}", if h < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{mi:02}"),
            Some('S') => write!(out, "{s:02}"),
            Some('j') => write!(out, "{yday:03}"),
            Some('B') => write!(out, "{month}"),
            Some('b') => write!(out, "{}", &month[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('%') => write!(out, "%"),
            Some(other) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: the format code %{other} is not supported"),
                ))
            }
            None => write!(out, "%"),
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_are_removed() {
        assert_eq!(
            strip_generation_tags("a{%- generation -%}b{% endgeneration %}c{% if x %}d{% endif %}"),
            "abc{% if x %}d{% endif %}"
        );
    }

    #[test]
    fn python_strip_and_json() {
        assert_eq!(py_strip("\u{1f} x \n", None, true, true), "x");
        assert_eq!(py_strip("xxaxx", Some("x"), true, false), "axx");
        let v = Value::from_serialize(serde_json::json!({"b": [1, "é\n"], "a": null}));
        let mut out = String::new();
        let opts = JsonOpts {
            ensure_ascii: false,
            indent: None,
            item_sep: ", ".into(),
            key_sep: ": ".into(),
            sort_keys: true,
        };
        write_json(&mut out, &v, &opts, 0).unwrap();
        assert_eq!(out, r#"{"a": null, "b": [1, "é\n"]}"#);
    }

    #[test]
    fn strftime_formats_a_date() {
        let s = strftime_now("%Y-%m-%d %b").unwrap();
        assert_eq!(s.len(), 14, "{s}");
    }
}
