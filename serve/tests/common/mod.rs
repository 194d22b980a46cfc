//! Helpers shared by the server's integration tests (as in `judge/tests/common`).

use std::path::Path;

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
