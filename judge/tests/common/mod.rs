//! Helpers shared by the judge's integration tests.
#![allow(dead_code)]

use clap::Parser;
use judge::harness::JudgeArgs;
use serde_json::Value;
use std::path::Path;

/// `align judge`'s arguments, parsed as the binary parses them.
#[derive(Parser)]
pub struct Cli {
    #[command(flatten)]
    pub args: JudgeArgs,
}

/// Writes `rows` as JSON lines.
pub fn write_jsonl(path: &Path, rows: &[Value]) {
    std::fs::write(path, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
}

/// The rows of a JSON-lines file.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The `summary.json` a judgement wrote into `out`.
pub fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// `--prompts P --candidate-answers C --baseline-answers B --out OUT`: a
/// judgement of two answer files.
pub fn answer_file_args<'a>(p: &'a Path, c: &'a Path, b: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "--prompts",
        p.to_str().unwrap(),
        "--candidate-answers",
        c.to_str().unwrap(),
        "--baseline-answers",
        b.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
}

/// A string column of a table file (e.g. `judgments.parquet`), read back
/// through the project's own reader; nulls are `None`.
pub fn string_column(path: &Path, name: &str) -> Vec<Option<String>> {
    datasets::read_table(path)
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, row)| match row.get(name) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => panic!("{name}[{i}] is not a string: {v:?}"),
        })
        .collect()
}
