//! `align data inspect|filter|mix` end to end: the real binary on small
//! JSONL/CSV/TOML files written into a temporary directory.

mod common;
use common::{align, align_in, fixture};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn tokenizer() -> PathBuf {
    fixture("mqa").join("tokenizer.json")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "align failed\nstdout: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&stdout(out)).expect("one JSON object")
}

fn fails_cleanly(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure, stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    err
}

fn jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

const PREFERENCE: &str = r#"{"prompt": "What is the capital of France?", "chosen": "Paris is the capital of France.", "rejected": "Lyon.", "category": "geo"}
{"prompt": "Add 2 and 3.", "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 6, I think, but I am not sure at all.", "category": "math"}
{"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say yes."}], "chosen": "Yes.", "rejected": "No.", "category": "math", "source": "x"}
"#;

#[test]
fn inspect_detects_the_kind_marks_trained_spans_and_prints_token_percentiles() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "prefs.jsonl", PREFERENCE);
    let out = stdout(&align(&["data", "inspect", s(&file), "--tokenizer", s(&tokenizer())]));
    assert!(out.contains("kind        preference"), "{out}");
    assert!(out.contains("rows        3 (3 usable, 0 skipped as bad)"), "{out}");
    assert!(out.contains("columns     category, chosen, prompt, rejected"), "{out}");
    assert!(out.contains("ignored     source"), "{out}");
    assert!(out.contains("categories  geo 1, math 2"), "{out}");
    // The first row, chosen and rejected, each through Gemma's formatter with
    // the model turn (content + <end_of_turn>\n) marked, the header not.
    let chosen = "--- chosen ---\n<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n\
                  <start_of_turn>model\n⟦Paris is the capital of France.<end_of_turn>\n⟧";
    let rejected =
        "--- rejected ---\n<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n\
                    <start_of_turn>model\n⟦Lyon.<end_of_turn>\n⟧";
    assert!(out.contains(chosen), "{out}");
    assert!(out.contains(rejected), "{out}");
    assert!(out.contains("token lengths (6 formatted sequences"), "{out}");
    assert!(
        out.contains("p50 ") && out.contains("p90 ") && out.contains("p99 ") && out.contains("max "),
        "{out}"
    );

    // The JSON report, with percentiles checked against the formatter and
    // tokenizer run here (nearest rank over the 6 sequences).
    let v =
        json(&align(&["data", "inspect", s(&file), "--model", s(tokenizer().parent().unwrap()), "--json"]));
    assert_eq!(v["kind"], "preference");
    assert_eq!(v["rows"], 3);
    assert_eq!(v["categories"]["math"], 2);
    let tok = lm::Tokenizer::from_file(&tokenizer()).unwrap();
    let rows: Vec<Value> = PREFERENCE.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut lengths = Vec::new();
    for r in &rows {
        let prompt: Vec<lm::Message> = match &r["prompt"] {
            Value::String(p) => vec![lm::Message::user(p)],
            list => serde_json::from_value(list.clone()).unwrap(),
        };
        for side in ["chosen", "rejected"] {
            let mut m = prompt.clone();
            m.push(lm::Message::model(r[side].as_str().unwrap()));
            lengths.push(lm::chat::encode(&tok, &m, false).unwrap().ids.len() as u64);
        }
    }
    lengths.sort();
    let len = &v["tokens"]["length"];
    assert_eq!(v["tokens"]["sequences"], 6);
    assert_eq!(len["p50"], lengths[2], "{v}");
    assert_eq!(len["p90"], lengths[5], "{v}");
    assert_eq!(len["max"], lengths[5], "{v}");
    let text = v["example"]["sequences"][1]["text"].as_str().unwrap();
    assert!(text.ends_with("⟦Lyon.<end_of_turn>\n⟧"), "{text}");

    // --example picks the row: the system message is folded into the user turn.
    let out = stdout(&align(&["data", "inspect", s(&file), "--example", "3"]));
    assert!(out.contains("<start_of_turn>user\nBe terse.\n\nSay yes.<end_of_turn>"), "{out}");
    assert!(out.contains("⟦Yes.<end_of_turn>\n⟧"), "{out}");
}

#[test]
fn inspect_reads_csv_with_renamed_columns_and_marks_every_model_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let dialog = r#"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": ""Hello!""}, {""role"": ""user"", ""content"": ""Bye""}, {""role"": ""assistant"", ""content"": ""Goodbye.""}]"#;
    let file = write(tmp.path(), "chat.csv", &format!("dialog,topic\n\"{dialog}\",greetings\n"));
    let out = align(&["data", "inspect", s(&file)]);
    fails_cleanly(&out, &["cannot tell the record kind", "dialog"]);
    let v = json(&align(&[
        "data",
        "inspect",
        s(&file),
        "--column",
        "messages=dialog",
        "--column",
        "category=topic",
        "--json",
    ]));
    assert_eq!(v["kind"], "conversational");
    assert_eq!(v["categories"]["greetings"], 1);
    assert_eq!(v["tokens"], Value::Null);
    let text = v["example"]["sequences"][0]["text"].as_str().unwrap();
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n⟦Hello!<end_of_turn>\n⟧\
         <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n⟦Goodbye.<end_of_turn>\n⟧"
    );
    let out = align(&["data", "inspect", s(&file), "--column", "dialogue=dialog"]);
    fails_cleanly(&out, &["`dialogue` is not a column the readers know"]);
}

#[test]
fn inspect_fails_on_a_bad_row_with_its_number_or_skips_and_lists_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(
        tmp.path(),
        "conv.jsonl",
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
{"messages": [{"role": "user", "content": "Hey"}, {"role": "model", "content": "Hey there"}]}
{"messages": [{"role": "user", "content": "Yo"}, {"role": "robot", "content": "beep"}]}
"#,
    );
    let out = align(&["data", "inspect", s(&file)]);
    fails_cleanly(&out, &["conv.jsonl: line 3", "messages[1].role", "\"robot\"", "--on-bad-row skip"]);

    let out = stdout(&align(&["data", "inspect", s(&file), "--on-bad-row", "skip"]));
    assert!(out.contains("rows        3 (2 usable, 1 skipped as bad)"), "{out}");
    assert!(out.contains("bad rows skipped: 1\n  "), "{out}");
    assert!(out.contains("conv.jsonl: line 3, field `messages[1].role`"), "{out}");

    // Roles out of order (a model turn first) are a bad row of the reader,
    // naming the row, the message and the rule, skipped like any other.
    let file = write(
        tmp.path(),
        "order.csv",
        "prompt,completion\nHi,Hello\n\"[{\"\"role\"\": \"\"model\"\", \"\"content\"\": \"\"x\"\"}]\",y\n",
    );
    let out = align(&["data", "inspect", s(&file)]);
    fails_cleanly(&out, &["order.csv: row 2, field `prompt[0].role`", "alternate", "--on-bad-row skip"]);
    let v = json(&align(&["data", "inspect", s(&file), "--on-bad-row", "skip", "--json"]));
    assert_eq!(v["bad_rows"]["count"], 1);
    assert_eq!(v["unformattable"]["count"], 0);
    assert_eq!(v["usable"], 1);
}

#[test]
fn filter_removes_pii_duplicates_and_contaminated_rows_and_writes_them_out() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(
        tmp.path(),
        "train.jsonl",
        r#"{"prompt": "How do I reverse a list in Python?", "completion": "Call reversed() on it, or use the slice [::-1].", "category": "code"}
{"prompt": "Give me your contact.", "completion": "Write to jane.roe@gmail.com and I will answer.", "category": "chat"}
{"prompt": "How do I reverse a list in Python?", "completion": "Call reversed() on it, or use the slice [::-1].", "category": "code"}
{"prompt": "Which river flows through the old city of Prague in the Czech Republic?", "completion": "The Vltava.", "category": "geo"}
{"prompt": "Name a prime number.", "completion": "Seven is prime.", "category": "math"}
"#,
    );
    let eval = write(
        tmp.path(),
        "eval.jsonl",
        r#"{"prompt": "Which river flows through the old city of Prague in the Czech Republic?"}
"#,
    );
    let out_file = tmp.path().join("kept.jsonl");
    let removed = tmp.path().join("removed.jsonl");
    let out = stdout(&align(&[
        "data",
        "filter",
        s(&file),
        "--out",
        s(&out_file),
        "--pii",
        "--dedup",
        "--decontaminate",
        s(&eval),
        "--removed",
        s(&removed),
    ]));
    assert!(out.contains("filters: 5 rows in, 2 kept, 3 removed"), "{out}");
    for (name, line) in [("pii", 2), ("decontaminate", 4), ("exact_dedup", 3)] {
        let counted = out.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w == [name, "1", "removed"]
        });
        assert!(counted, "no count for {name}: {out}");
        assert!(out.contains(&format!("train.jsonl line {line}: ")), "{out}");
    }
    assert!(out.contains("email address"), "{out}");
    assert!(out.contains("exact duplicate of"), "{out}");

    let kept = jsonl(&out_file);
    let kept_prompts: Vec<&str> = kept.iter().map(|r| r["prompt"].as_str().unwrap()).collect();
    assert_eq!(kept_prompts, ["How do I reverse a list in Python?", "Name a prime number."]);
    assert_eq!(kept[1]["category"], "math");
    let gone = jsonl(&removed);
    let mut why: Vec<(String, u64)> = gone
        .iter()
        .map(|r| (r["filter"].as_str().unwrap().to_string(), r["row"].as_u64().unwrap()))
        .collect();
    why.sort();
    assert_eq!(
        why,
        [("decontaminate".to_string(), 4), ("exact_dedup".to_string(), 3), ("pii".to_string(), 2)]
    );
    assert!(gone.iter().all(|r| r["reason"].as_str().is_some_and(|x| !x.is_empty())));
    assert_eq!(
        gone.iter().find(|r| r["filter"] == "pii").unwrap()["record"]["completion"],
        "Write to jane.roe@gmail.com and I will answer."
    );

    // Parquet and CSV outputs read back to the same rows.
    for ext in ["parquet", "csv"] {
        let p = tmp.path().join(format!("kept.{ext}"));
        let v = json(&align(&["data", "filter", s(&file), "--out", s(&p), "--pii", "--dedup", "--json"]));
        assert_eq!((v["input"].as_u64(), v["kept"].as_u64()), (Some(5), Some(3)), "{v}");
        assert_eq!(v["removed_by"]["pii"], 1);
        assert_eq!(v["removed_by"]["exact_dedup"], 1);
        let back = json(&align(&["data", "inspect", s(&p), "--example", "3", "--json"]));
        assert_eq!(back["kind"], "prompt_completion");
        assert_eq!(back["rows"], 3);
        assert_eq!(back["categories"]["geo"], 1);
        let text = back["example"]["sequences"][0]["text"].as_str().unwrap();
        assert!(text.ends_with("⟦Seven is prime.<end_of_turn>\n⟧"), "{text}");
    }
}

#[test]
fn filter_flags_are_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "a.jsonl", "{\"prompt\": \"a b c\", \"completion\": \"d e f\"}\n");
    let out = tmp.path().join("o.jsonl");
    fails_cleanly(&align(&["data", "filter", s(&file), "--out", s(&out)]), &["no filter chosen", "--dedup"]);
    fails_cleanly(
        &align(&["data", "filter", s(&file), "--out", s(&tmp.path().join("o.txt")), "--dedup"]),
        &["--out", "o.txt", ".jsonl"],
    );
    fails_cleanly(
        &align(&["data", "filter", s(&file), "--out", s(&out), "--min-words", "9", "--max-words", "3"]),
        &["--min-words 9 is larger than --max-words 3"],
    );
    fails_cleanly(
        &align(&["data", "filter", s(&file), "--out", s(&out), "--near-dedup", "--near-threshold", "1.5"]),
        &["--near-threshold 1.5"],
    );
    fails_cleanly(
        &align(&["data", "filter", s(&file), "--out", s(&out), "--decontaminate", "missing.jsonl"]),
        &["missing.jsonl"],
    );
    fails_cleanly(
        &align(&["data", "filter", s(&file), "--out", s(&file), "--dedup"]),
        &["is the input file"],
    );
    // Everything removed: an error, nothing written.
    fails_cleanly(
        &align(&["data", "filter", s(&file), "--out", s(&out), "--min-words", "50"]),
        &["removed every row", "length: 1"],
    );
    assert!(!out.exists());
}

#[test]
fn mix_reports_each_source_and_writes_an_epoch_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir(&data).unwrap();
    let conv = |u: &str, m: &str| {
        format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{u}\"}}, {{\"role\": \"assistant\", \"content\": \"{m}\"}}]}}\n"
        )
    };
    let chat: String =
        (0..4).map(|i| conv(&format!("chat question {i}"), &format!("chat answer {i}"))).collect();
    write(&data, "chat.jsonl", &chat);
    let qa: String = (0..6)
        .map(|i| format!("{{\"prompt\": \"qa question {i}\", \"completion\": \"qa answer {i}\"}}\n"))
        .collect();
    write(&data, "qa.jsonl", &format!("{qa}{{\"prompt\": 3}}\n"));
    let recipe = write(
        tmp.path(),
        "recipe.toml",
        r#"
[sft]
model = "unused"

[sft.data]
seed = 11
kind = "conversational"
on_bad_row = "skip"

[[sft.data.sources]]
name = "chat"
path = "data/chat.jsonl"
weight = 2.0

[[sft.data.sources]]
name = "qa"
path = "data/qa.jsonl"
weight = 0.5
"#,
    );
    // Run from another directory: paths are relative to the TOML file.
    let run = |args: &[&str]| align_in(&data, args);
    let text = stdout(&run(&["data", "mix", s(&recipe), "--section", "sft"]));
    assert!(text.contains("mixture [sft.data]"), "{text}");
    let cols = |name: &str| -> Vec<String> {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}: {text}"));
        line.split_whitespace().map(String::from).collect()
    };
    // source weight rows bad filtered held per-epoch share
    assert_eq!(cols("chat")[..7], ["chat", "2.000", "4", "0", "0", "0", "8"], "{text}");
    assert_eq!(cols("qa")[..7], ["qa", "0.500", "7", "1", "0", "0", "3"], "{text}");
    assert!(text.contains("11 rows per epoch"), "{text}");
    assert!(text.contains("qa.jsonl: line 7, field `prompt`"), "{text}");

    let v = json(&run(&["data", "mix", s(&recipe), "--section", "sft.data", "--json"]));
    assert_eq!(v["per_epoch"], 11);
    assert_eq!(v["sources"][1]["per_epoch"], 3);
    assert_eq!(v["sources"][1]["skipped_bad_rows"], 1);

    let a = tmp.path().join("a.jsonl");
    let b = tmp.path().join("b.jsonl");
    stdout(&run(&["data", "mix", s(&recipe), "--section", "sft", "--out", s(&a), "--epoch", "1"]));
    stdout(&run(&["data", "mix", s(&recipe), "--section", "sft", "--out", s(&b), "--epoch", "1"]));
    let (ea, eb) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert_eq!(ea, eb, "the same config and epoch must give the same rows in the same order");
    let rows = jsonl(&a);
    assert_eq!(rows.len(), 11);
    let user = |r: &Value| r["messages"][0]["content"].as_str().unwrap().to_string();
    for i in 0..4 {
        let n = rows.iter().filter(|r| user(r) == format!("chat question {i}")).count();
        assert_eq!(n, 2, "weight 2.0: every chat row twice");
    }
    let qa_rows: Vec<String> = rows.iter().map(user).filter(|u| u.starts_with("qa")).collect();
    assert_eq!(qa_rows.len(), 3);
    let unique: std::collections::BTreeSet<&String> = qa_rows.iter().collect();
    assert_eq!(unique.len(), 3, "weight 0.5 draws without replacement: {qa_rows:?}");
    // Sources are shuffled together, not laid out one after the other.
    let firsts: Vec<bool> = rows.iter().map(|r| user(r).starts_with("chat")).collect();
    assert!(firsts.windows(2).filter(|w| w[0] != w[1]).count() > 1, "{firsts:?}");

    fails_cleanly(&run(&["data", "mix", s(&recipe)]), &["no mixture", "--section", "sft"]);
    fails_cleanly(&run(&["data", "mix", s(&recipe), "--section", "rl"]), &["no table `rl`", "sft"]);
    let bad = write(tmp.path(), "bad.toml", "[data]\nseed = 1\nsources = []\nwieght = 3\n");
    fails_cleanly(&run(&["data", "mix", s(&bad)]), &["[data]", "wieght"]);
}
