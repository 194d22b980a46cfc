//! Verdicts and the parser for reason-then-verdict judge outputs.
//!
//! A judge that reasons first ends its answer with a marker: `[[A]]` (the
//! first answer shown is better), `[[B]]` (the second) or `[[C]]` (a tie).
//! The parser is lenient about what surrounds the marker and strict about the
//! marker itself:
//!
//! - case does not matter and white space inside the brackets is allowed
//!   (`[[a]]`, `[[ B ]]`);
//! - any text may come before or after it (reasoning, a closing remark);
//! - when several markers appear, the **last** one counts: judges often quote
//!   the format ("answer with [[A]] or [[B]]") or weigh both options before
//!   concluding, and the conclusion comes at the end;
//! - `[[TIE]]` is read as a tie as well;
//! - with no marker at all the output is unparseable (`None`): it is never
//!   guessed from words such as "Assistant A is better".

use serde::{Deserialize, Serialize};

/// Which of the two answers shown a judge prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// The answer shown first.
    A,
    /// The answer shown second.
    B,
    /// Neither.
    Tie,
}

impl Verdict {
    /// The verdict with the two positions swapped.
    pub fn swapped(self) -> Verdict {
        match self {
            Verdict::A => Verdict::B,
            Verdict::B => Verdict::A,
            Verdict::Tie => Verdict::Tie,
        }
    }

    pub fn letter(self) -> &'static str {
        match self {
            Verdict::A => "A",
            Verdict::B => "B",
            Verdict::Tie => "C",
        }
    }
}

/// The verdict a reason-then-verdict output ends with (see the module
/// documentation for the rules), or `None` when it has no marker.
pub fn parse_verdict(text: &str) -> Option<Verdict> {
    let mut last = None;
    let mut rest = text;
    while let Some(start) = rest.find("[[") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("]]") else { break };
        let inner = after[..end].trim();
        // A marker never spans lines or holds more than a word.
        let v = match inner.to_ascii_lowercase().as_str() {
            "a" => Some(Verdict::A),
            "b" => Some(Verdict::B),
            "c" | "tie" => Some(Verdict::Tie),
            _ => None,
        };
        if v.is_some() {
            last = v;
            rest = &after[end + 2..];
        } else {
            // Not a marker ("[[[A]]" or "[[note]]"): move past this "[[" only.
            rest = &rest[start + 1..];
        }
    }
    last
}
