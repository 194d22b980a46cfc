//! Built-in verifiable instruction tasks, the embedded default data.
//!
//! Seven categories, each a prompt template whose answer a program can check
//! ([`check`] recomputes the reference from the prompt alone):
//!
//! | category      | prompt                                   | answer        |
//! |---------------|------------------------------------------|---------------|
//! | `reverse`     | `Reverse: d o g`                         | `g o d`       |
//! | `sort_letters`| `Sort the letters: d a c`                | `a c d`       |
//! | `sort_numbers`| `Sort the numbers: 5 2 9`                | `2 5 9`       |
//! | `add`         | `Add: 23 + 45`                           | `68`          |
//! | `count`       | `Count the items: x y z w`               | `4`           |
//! | `upper`       | `Uppercase: a b c`                       | `A B C`       |
//! | `format`      | `First item in brackets: q r s`          | `[q]`         |
//!
//! Items are single characters separated by spaces so that a small
//! byte-level tokenizer sees one token per item. From a seed the module makes
//! plain text for pretraining, SFT demonstrations (imperfect, as human
//! demonstrations are: a fraction wrong or sloppy), preference pairs (the
//! correct answer chosen over a corrupted or sloppy one, or any answer over
//! a non-answer), RL prompts and
//! held-out evaluation prompts. Evaluation prompts are disjoint from every
//! training prompt: a prompt belongs to the evaluation split exactly when a
//! hash of its text falls in the evaluation bucket, and the generators of
//! the training sets never emit such prompts.
//!
//! Recipes address them as
//! `builtin:KIND?n=N&seed=S&error_rate=E&sloppy_rate=R&categories=a,b`
//! with KIND one of `sft`, `preferences`, `rl`, `dev`, `eval`, `pretrain`
//! (see [`parse_spec`]). `dev` prompts (for choosing among variants) are
//! disjoint from both the training and the evaluation prompts.

use crate::record::{Example, Message, Origin, Record};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::Arc;

/// The version of the generator: a `builtin:` spec names its data by seed,
/// so a change to what a seed generates bumps this, and the recipe runner
/// (whose stage hashes include it) reruns the stages that used the old data.
pub const GENERATOR_VERSION: u32 = 2;

/// The task categories, in a fixed order.
pub const CATEGORIES: [&str; 7] =
    ["reverse", "sort_letters", "sort_numbers", "add", "count", "upper", "format"];

/// Items are drawn from ten letters, as numbers from ten digits: a small
/// model learns to copy, reverse and sort them within the quickstart's budget.
const LETTERS: &[u8] = b"abcdefghij";

/// One task instance: a prompt, its category and the reference answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub category: &'static str,
    pub prompt: String,
    pub answer: String,
}

fn spaced<T: ToString>(items: &[T]) -> String {
    items.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" ")
}

fn letters(rng: &mut ChaCha8Rng, lo: usize, hi: usize) -> Vec<char> {
    let n = rng.random_range(lo..=hi);
    (0..n).map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char).collect()
}

/// A random task of `category`.
pub fn make_task(category: &'static str, rng: &mut ChaCha8Rng) -> Task {
    let (prompt, answer) = match category {
        "reverse" => {
            let w = letters(rng, 3, 6);
            let r: Vec<char> = w.iter().rev().copied().collect();
            (format!("Reverse: {}", spaced(&w)), spaced(&r))
        }
        "sort_letters" => {
            let w = letters(rng, 3, 6);
            let mut s = w.clone();
            s.sort_unstable();
            (format!("Sort the letters: {}", spaced(&w)), spaced(&s))
        }
        "sort_numbers" => {
            let n = rng.random_range(3..=6);
            let v: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
            let mut s = v.clone();
            s.sort_unstable();
            (format!("Sort the numbers: {}", spaced(&v)), spaced(&s))
        }
        "add" => {
            let a = rng.random_range(0..50u32);
            let b = rng.random_range(0..50u32);
            (format!("Add: {a} + {b}"), (a + b).to_string())
        }
        "count" => {
            let w = letters(rng, 2, 9);
            (format!("Count the items: {}", spaced(&w)), w.len().to_string())
        }
        "upper" => {
            let w = letters(rng, 3, 6);
            let u: Vec<char> = w.iter().map(|c| c.to_ascii_uppercase()).collect();
            (format!("Uppercase: {}", spaced(&w)), spaced(&u))
        }
        _ => {
            let w = letters(rng, 3, 5);
            (format!("First item in brackets: {}", spaced(&w)), format!("[{}]", w[0]))
        }
    };
    let category = CATEGORIES.iter().copied().find(|c| *c == category).unwrap_or("format");
    Task { category, prompt, answer }
}

/// The reference answer for a prompt made by this module, with its category;
/// None when the prompt is not a built-in task.
pub fn reference(prompt: &str) -> Option<(&'static str, String)> {
    let items = |s: &str| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
    let p = prompt.trim();
    if let Some(rest) = p.strip_prefix("Reverse: ") {
        let mut v = items(rest);
        v.reverse();
        return Some(("reverse", v.join(" ")));
    }
    if let Some(rest) = p.strip_prefix("Sort the letters: ") {
        let mut v = items(rest);
        v.sort();
        return Some(("sort_letters", v.join(" ")));
    }
    if let Some(rest) = p.strip_prefix("Sort the numbers: ") {
        let mut v: Vec<u32> = rest.split_whitespace().map(|x| x.parse().ok()).collect::<Option<_>>()?;
        v.sort_unstable();
        return Some(("sort_numbers", spaced(&v)));
    }
    if let Some(rest) = p.strip_prefix("Add: ") {
        let (a, b) = rest.split_once(" + ")?;
        let s = a.trim().parse::<u64>().ok()? + b.trim().parse::<u64>().ok()?;
        return Some(("add", s.to_string()));
    }
    if let Some(rest) = p.strip_prefix("Count the items: ") {
        return Some(("count", items(rest).len().to_string()));
    }
    if let Some(rest) = p.strip_prefix("Uppercase: ") {
        return Some(("upper", rest.to_uppercase().split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    if let Some(rest) = p.strip_prefix("First item in brackets: ") {
        return Some(("format", format!("[{}]", items(rest).first()?)));
    }
    None
}

/// The oracle: whether `answer` is correct for a built-in `prompt` (exact
/// match after trimming; the format must be followed). None when the prompt
/// is not a built-in task.
pub fn check(prompt: &str, answer: &str) -> Option<bool> {
    reference(prompt).map(|(_, want)| answer.trim() == want)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// The split a prompt belongs to, from a hash of its text: 1 in 8 prompts
/// is held out for evaluation, another 1 in 8 for development (choosing
/// among variants, as a sweep does), the rest are for training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Dev,
    Eval,
}

/// The [`Split`] of a prompt.
pub fn split_of(prompt: &str) -> Split {
    match fnv(prompt) % 8 {
        0 => Split::Eval,
        1 => Split::Dev,
        _ => Split::Train,
    }
}

/// Whether a prompt belongs to the held-out evaluation split (1 in 8).
pub fn is_eval_prompt(prompt: &str) -> bool {
    split_of(prompt) == Split::Eval
}

/// The right answer wrapped in chatter ("The answer is 7."): what a sloppy
/// demonstrator writes, always in the same words, as a habit is. The oracle
/// rejects it: the format is part of the task.
pub fn sloppy(task: &Task) -> String {
    format!("The answer is {}.", task.answer)
}

/// Not an answer at all: what an untuned model says to a question it has
/// never seen in dialogue form (a stray symbol, the question continued in
/// the pretraining format, or dots).
pub fn non_answer(task: &Task, rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..4) {
        0 => "]".to_string(),
        1 => format!("= {}", task.answer.split(' ').next().unwrap_or("?")),
        2 => task.prompt.split(':').next().unwrap_or("?").to_string(),
        _ => "...".to_string(),
    }
}

/// A wrong answer close to the right one: a swap, a dropped or repeated
/// item, an off-by-one number, or a sloppy format (extra words, see [`sloppy`]).
pub fn corrupt(task: &Task, rng: &mut ChaCha8Rng) -> String {
    for _ in 0..8 {
        let cand = match rng.random_range(0..4) {
            0 => sloppy(task),
            1 => match task.answer.parse::<i64>() {
                Ok(n) => (n + if rng.random_bool(0.5) { 1 } else { -1 }).max(0).to_string(),
                Err(_) => {
                    let mut v: Vec<&str> = task.answer.split(' ').collect();
                    if v.len() > 1 {
                        let i = rng.random_range(0..v.len() - 1);
                        v.swap(i, i + 1);
                    }
                    v.join(" ")
                }
            },
            2 => {
                // A dropped or a repeated item: length alone does not tell.
                let mut v: Vec<&str> = task.answer.split(' ').collect();
                if v.len() > 1 && rng.random_bool(0.5) {
                    v.pop();
                } else if let Some(&last) = v.last() {
                    v.push(last);
                }
                v.join(" ")
            }
            _ => {
                let mut v: Vec<&str> = task.answer.split(' ').collect();
                v.shuffle(rng);
                v.join(" ")
            }
        };
        if cand != task.answer {
            return cand;
        }
    }
    format!("{} ?", task.answer)
}

/// `n` tasks from `categories` (round robin) in one split; the held-out
/// splits have no repeated prompt.
pub fn tasks(n: usize, seed: u64, categories: &[&'static str], split: Split) -> Vec<Task> {
    let salt = match split {
        Split::Train => 0x7a11,
        Split::Dev => 0xde71,
        Split::Eval => 0xe7a1,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ salt);
    let held_out = split != Split::Train;
    let mut out = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::new();
    let mut tries = 0usize;
    while out.len() < n && tries < n * 200 + 1000 {
        tries += 1;
        let cat = categories[out.len() % categories.len()];
        let t = make_task(cat, &mut rng);
        if split_of(&t.prompt) != split || (held_out && !seen.insert(t.prompt.clone())) {
            continue;
        }
        out.push(t);
    }
    out
}

/// Plain text for pretraining a base model: task statements in a
/// non-dialogue form ("Reverse: a b c = c b a"), some of them wrong, so a
/// base model knows the items and the tasks but not the dialogue format.
pub fn pretrain_text(n: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e77);
    tasks(n, seed, &CATEGORIES, Split::Train)
        .into_iter()
        .map(|t| {
            let ans = if rng.random_bool(0.3) { corrupt(&t, &mut rng) } else { t.answer.clone() };
            format!("{} = {ans}", t.prompt)
        })
        .collect()
}

/// What `builtin:KIND?…` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltinSpec {
    pub kind: String,
    pub n: usize,
    pub seed: u64,
    /// Fraction of SFT demonstrations that are wrong or sloppy.
    pub error_rate: f64,
    /// Fraction of the other SFT demonstrations that give the right answer
    /// wrapped in chatter ([`sloppy`]): a habit that imitation learns and
    /// preferences can remove.
    pub sloppy_rate: f64,
    pub categories: Vec<&'static str>,
}

/// Parses `builtin:KIND?n=N&seed=S&error_rate=E&sloppy_rate=R&categories=a,b`.
pub fn parse_spec(spec: &str) -> Result<BuiltinSpec> {
    let rest =
        spec.strip_prefix("builtin:").with_context(|| format!("{spec:?} does not start with builtin:"))?;
    let (kind, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !matches!(kind, "sft" | "preferences" | "rl" | "dev" | "eval" | "pretrain") {
        bail!("{spec}: unknown built-in data {kind:?}; use sft, preferences, rl, dev, eval or pretrain");
    }
    let mut s = BuiltinSpec {
        kind: kind.to_string(),
        n: 1000,
        seed: 0,
        error_rate: 0.2,
        sloppy_rate: 0.0,
        categories: CATEGORIES.to_vec(),
    };
    for kv in query.split('&').filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').with_context(|| format!("{spec}: {kv:?} is not key=value"))?;
        match k {
            "n" => s.n = v.parse().with_context(|| format!("{spec}: n={v} is not a count"))?,
            "seed" => s.seed = v.parse().with_context(|| format!("{spec}: seed={v} is not an integer"))?,
            "error_rate" => {
                s.error_rate =
                    v.parse().with_context(|| format!("{spec}: error_rate={v} is not a number"))?;
                if !(0.0..=1.0).contains(&s.error_rate) {
                    bail!("{spec}: error_rate must be in [0, 1]");
                }
            }
            "sloppy_rate" => {
                s.sloppy_rate =
                    v.parse().with_context(|| format!("{spec}: sloppy_rate={v} is not a number"))?;
                if !(0.0..=1.0).contains(&s.sloppy_rate) {
                    bail!("{spec}: sloppy_rate must be in [0, 1]");
                }
            }
            "categories" => {
                s.categories = v
                    .split(',')
                    .map(|c| {
                        CATEGORIES.iter().copied().find(|k| *k == c).with_context(|| {
                            format!("{spec}: unknown category {c:?}; known: {}", CATEGORIES.join(", "))
                        })
                    })
                    .collect::<Result<_>>()?;
            }
            other => bail!(
                "{spec}: unknown parameter {other:?}; use n, seed, error_rate, sloppy_rate or categories"
            ),
        }
    }
    if s.n == 0 {
        bail!("{spec}: n must be at least 1");
    }
    Ok(s)
}

/// The examples a `builtin:` spec stands for.
pub fn builtin_examples(spec: &str) -> Result<Vec<Example>> {
    let s = parse_spec(spec)?;
    let file: Arc<Path> = Arc::from(Path::new(spec));
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed ^ 0x5f7);
    let split = match s.kind.as_str() {
        "eval" => Split::Eval,
        "dev" => Split::Dev,
        _ => Split::Train,
    };
    let ts = tasks(s.n, s.seed, &s.categories, split);
    let examples = ts
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let prompt = vec![Message::user(t.prompt.clone())];
            let record = match s.kind.as_str() {
                "sft" => {
                    let ans = if rng.random_bool(s.error_rate) {
                        corrupt(&t, &mut rng)
                    } else if rng.random_bool(s.sloppy_rate) {
                        sloppy(&t)
                    } else {
                        t.answer.clone()
                    };
                    Record::Conversation { messages: vec![prompt[0].clone(), Message::model(ans)] }
                }
                "preferences" => {
                    // One pair in five ranks an answer (bare or in chatter)
                    // above a non-answer; the rest, the right answer above a
                    // close miss.
                    let (chosen, rejected) = if rng.random_bool(0.2) {
                        let chosen = if rng.random_bool(0.5) { sloppy(&t) } else { t.answer.clone() };
                        (chosen, non_answer(&t, &mut rng))
                    } else {
                        (t.answer.clone(), corrupt(&t, &mut rng))
                    };
                    Record::Preference {
                        prompt,
                        chosen: vec![Message::model(chosen)],
                        rejected: vec![Message::model(rejected)],
                        margin: None,
                    }
                }
                "pretrain" => Record::Conversation {
                    messages: vec![prompt[0].clone(), Message::model(t.answer.clone())],
                },
                _ => Record::PromptOnly { prompt },
            };
            Example {
                record,
                category: Some(t.category.to_string()),
                origin: Origin { file: file.clone(), row: i + 1 },
            }
        })
        .collect();
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_is_checked_by_its_oracle() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for cat in CATEGORIES {
            for _ in 0..50 {
                let t = make_task(cat, &mut rng);
                assert_eq!(reference(&t.prompt), Some((cat, t.answer.clone())), "{t:?}");
                assert_eq!(check(&t.prompt, &format!(" {} \n", t.answer)), Some(true));
                let wrong = corrupt(&t, &mut rng);
                assert_eq!(check(&t.prompt, &wrong), Some(false), "{t:?} vs {wrong:?}");
            }
        }
        assert_eq!(check("What is love?", "x"), None);
    }

    /// Regression: close misses only ever dropped an item, so a reward
    /// model learned "longer is better" and RL learned to repeat the last
    /// item. Misses are now longer as often as shorter.
    #[test]
    fn close_misses_are_not_told_apart_by_length() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (mut longer, mut shorter) = (0, 0);
        for _ in 0..400 {
            let t = make_task("reverse", &mut rng);
            let miss = corrupt(&t, &mut rng);
            if miss.starts_with("The answer") {
                continue;
            }
            let (n, m) = (t.answer.split(' ').count(), miss.split(' ').count());
            longer += usize::from(m > n);
            shorter += usize::from(m < n);
        }
        assert!(longer > 30 && shorter > 30, "{longer} longer, {shorter} shorter");
        // Non-answers are never empty (a reward row needs text on both sides).
        for _ in 0..50 {
            let t = make_task("add", &mut rng);
            assert!(!non_answer(&t, &mut rng).trim().is_empty());
        }
    }

    #[test]
    fn eval_prompts_are_disjoint_from_training_prompts() {
        let train: std::collections::HashSet<String> =
            tasks(3000, 5, &CATEGORIES, Split::Train).into_iter().map(|t| t.prompt).collect();
        let eval = tasks(300, 5, &CATEGORIES, Split::Eval);
        let dev = tasks(300, 5, &CATEGORIES, Split::Dev);
        assert_eq!((eval.len(), dev.len()), (300, 300));
        assert!(eval.iter().all(|t| !train.contains(&t.prompt) && is_eval_prompt(&t.prompt)));
        assert!(dev.iter().all(|t| !train.contains(&t.prompt) && split_of(&t.prompt) == Split::Dev));
        let dev_prompts: std::collections::HashSet<&str> = dev.iter().map(|t| t.prompt.as_str()).collect();
        assert!(eval.iter().all(|t| !dev_prompts.contains(t.prompt.as_str())));
        // Every category is represented.
        for c in CATEGORIES {
            assert!(eval.iter().any(|t| t.category == c));
        }
    }

    #[test]
    fn builtin_specs_are_deterministic_and_validated() {
        let a = builtin_examples("builtin:sft?n=50&seed=3&error_rate=0.3").unwrap();
        let b = builtin_examples("builtin:sft?n=50&seed=3&error_rate=0.3").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 50);
        let wrong = a
            .iter()
            .filter(|e| {
                let m = e.record.messages();
                check(&m[0].content, &m[1].content) == Some(false)
            })
            .count();
        assert!((5..=25).contains(&wrong), "{wrong} wrong demonstrations of 50 at rate 0.3");
        // Sloppy demonstrations: the right answer in chatter, which the
        // oracle rejects.
        let chatty = builtin_examples("builtin:sft?n=200&seed=3&error_rate=0&sloppy_rate=0.5").unwrap();
        let sloppy = chatty
            .iter()
            .filter(|e| {
                let m = e.record.messages();
                let want = reference(&m[0].content).unwrap().1;
                m[1].content != want && m[1].content.contains(&want)
            })
            .count();
        assert!((70..=130).contains(&sloppy), "{sloppy} sloppy demonstrations of 200 at rate 0.5");
        assert!(parse_spec("builtin:sft?sloppy_rate=2").is_err());
        let p = builtin_examples("builtin:preferences?n=20&categories=add,count").unwrap();
        assert!(p.iter().all(|e| matches!(e.category.as_deref(), Some("add" | "count"))));
        assert!(parse_spec("builtin:nope").is_err());
        assert!(parse_spec("builtin:sft?x=1").unwrap_err().to_string().contains("unknown parameter"));
        assert!(parse_spec("builtin:sft?categories=zzz")
            .unwrap_err()
            .to_string()
            .contains("unknown category"));
    }
}
