//! Regression tests: a UTF-8 byte-order mark is not data, and a ragged CSV
//! row is named by its number.

use datasets::{read_dataset, ReadOptions};

fn read(name: &str, body: &[u8]) -> anyhow::Result<datasets::Dataset> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, body).unwrap();
    read_dataset(&p, &ReadOptions::default())
}

#[test]
fn a_utf8_bom_at_the_start_of_jsonl_json_and_csv_is_skipped() {
    let jsonl = b"\xef\xbb\xbf{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n";
    assert_eq!(read("d.jsonl", jsonl).unwrap().examples.len(), 2);
    let json = b"\xef\xbb\xbf[{\"prompt\": \"a\", \"completion\": \"b\"}]";
    assert_eq!(read("d.json", json).unwrap().examples.len(), 1);
    let csv = b"\xef\xbb\xbfprompt,completion\na,b\n";
    let ds = read("d.csv", csv).unwrap();
    assert_eq!(ds.examples.len(), 1);
}

#[test]
fn a_ragged_csv_row_is_named_by_its_number() {
    let csv = b"prompt,completion\na,b\n\"x, y\",z\nc,d,e\n";
    let e = format!("{:#}", read("d.csv", csv).unwrap_err());
    assert!(e.contains("row 3 has 3 fields but the header has 2"), "{e}");
    assert!(e.contains("d.csv"), "{e}");
}
