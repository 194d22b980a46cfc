//! Judge prompt templates: text files with `{field}` placeholders.
//!
//! Fields: `{question}` (the user's prompt, its turns joined), `{answer_a}`
//! and `{answer_b}` (the two answers, in the order shown) are required;
//! `{reference}` (a reference answer, when the prompts file has one) is
//! optional. `{{` and `}}` stand for literal braces. A template is checked
//! when it loads: an unknown field, a missing required one, or an unclosed
//! brace is an error naming it.
//!
//! The built-in templates live in `judge/templates/` and are compiled in;
//! `--template` takes either a built-in name or a path to your own file
//! (start from a copy of a built-in one).

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Fields every template must use.
pub const REQUIRED_FIELDS: [&str; 3] = ["question", "answer_a", "answer_b"];
/// Fields a template may use.
pub const OPTIONAL_FIELDS: [&str; 1] = ["reference"];

/// The built-in templates: name → text.
pub const BUILTIN: [(&str, &str); 4] = [
    ("pairwise", include_str!("../templates/pairwise.txt")),
    ("rubric", include_str!("../templates/rubric.txt")),
    ("constitution", include_str!("../templates/constitution.txt")),
    ("choice", include_str!("../templates/choice.txt")),
];

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(String),
}

/// A checked template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// The built-in name or the file's path.
    pub name: String,
    pieces: Vec<Piece>,
}

/// What a template is filled with.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Fields<'a> {
    pub question: &'a str,
    pub answer_a: &'a str,
    pub answer_b: &'a str,
    pub reference: Option<&'a str>,
}

impl Template {
    /// Parses and checks `text`; `name` says where it came from in errors.
    pub fn parse(name: &str, text: &str) -> Result<Template> {
        let mut pieces = vec![];
        let mut buf = String::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        let mut text_start = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'{' if bytes.get(i + 1) == Some(&b'{') => {
                    buf.push_str(&text[text_start..i]);
                    buf.push('{');
                    i += 2;
                    text_start = i;
                }
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    buf.push_str(&text[text_start..i]);
                    buf.push('}');
                    i += 2;
                    text_start = i;
                }
                b'{' => {
                    buf.push_str(&text[text_start..i]);
                    let rest = &text[i + 1..];
                    let Some(end) = rest.find('}') else {
                        bail!("template {name}: a `{{` at byte {i} is never closed; write `{{{{` for a literal brace")
                    };
                    let field = rest[..end].trim().to_string();
                    if !REQUIRED_FIELDS.contains(&field.as_str())
                        && !OPTIONAL_FIELDS.contains(&field.as_str())
                    {
                        let known: Vec<String> = REQUIRED_FIELDS
                            .iter()
                            .chain(&OPTIONAL_FIELDS)
                            .map(|f| format!("{{{f}}}"))
                            .collect();
                        bail!(
                            "template {name}: unknown field {{{field}}}; the fields are {}; write `{{{{` for a literal brace",
                            known.join(", ")
                        );
                    }
                    if !buf.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut buf)));
                    }
                    pieces.push(Piece::Field(field));
                    i += end + 2;
                    text_start = i;
                }
                b'}' => bail!("template {name}: a lone `}}` at byte {i}; write `}}}}` for a literal brace"),
                _ => i += 1,
            }
        }
        buf.push_str(&text[text_start..]);
        if !buf.is_empty() {
            pieces.push(Piece::Text(buf));
        }
        let t = Template { name: name.to_string(), pieces };
        for f in REQUIRED_FIELDS {
            if !t.fields().contains(&f) {
                bail!("template {name}: the required field {{{f}}} is missing; a template must use {{question}}, {{answer_a}} and {{answer_b}}");
            }
        }
        Ok(t)
    }

    /// A built-in template by name, or a template file.
    pub fn load(name_or_path: &str) -> Result<Template> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Template::parse(name_or_path, text);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            bail!(
                "template {name_or_path}: neither a built-in template ({}) nor an existing file",
                BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the template file {}", path.display()))?;
        Template::parse(name_or_path, &text)
    }

    /// The fields used, in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = vec![];
        for p in &self.pieces {
            if let Piece::Field(f) = p {
                if !out.contains(&f.as_str()) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// The template filled in. A template using `{reference}` needs one.
    pub fn render(&self, f: &Fields) -> Result<String> {
        let mut values = BTreeMap::new();
        values.insert("question", Some(f.question));
        values.insert("answer_a", Some(f.answer_a));
        values.insert("answer_b", Some(f.answer_b));
        values.insert("reference", f.reference);
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(name) => match values.get(name.as_str()).copied().flatten() {
                    Some(v) => out.push_str(v),
                    None => bail!(
                        "template {}: uses {{{name}}} but this prompt has none; add a `reference` column to the prompts file or use a template without it",
                        self.name
                    ),
                },
            }
        }
        Ok(out)
    }
}
