//! Readers on small files in each format, and the errors bad rows give.

mod common;

use std::collections::BTreeMap;

use common::{write, write_parquet, Col};
use datasets::{read_dataset, write_jsonl, Format, Message, OnBadRow, ReadOptions, Record, RecordKind};
use tempfile::tempdir;

fn opts() -> ReadOptions {
    ReadOptions::default()
}

fn skip() -> ReadOptions {
    ReadOptions { on_bad_row: OnBadRow::Skip, ..ReadOptions::default() }
}

fn err(path: &std::path::Path, o: &ReadOptions) -> String {
    format!("{:#}", read_dataset(path, o).unwrap_err())
}

#[test]
fn jsonl_conversation_keeps_roles_category_and_line_numbers() {
    let dir = tempdir().unwrap();
    let p = write(
        dir.path(),
        "chat.jsonl",
        concat!(
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "Assistant", "content": "Hello."}], "category": "greeting"}"#,
            "\n\n",
            r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "model", "content": "4"}], "id": 7}"#,
            "\n"
        ),
    );
    let d = read_dataset(&p, &opts()).unwrap();
    assert_eq!(d.report.kind, RecordKind::Conversational);
    assert_eq!(d.examples.len(), 2);
    let first = &d.examples[0];
    assert_eq!(first.category.as_deref(), Some("greeting"));
    assert_eq!(
        first.record.messages(),
        vec![Message::system("Be brief."), Message::user("Hi"), Message::new("assistant", "Hello."),]
    );
    // The blank line still counts: the second record is on line 3.
    assert_eq!(d.examples[1].origin.row, 3);
    assert_eq!(d.examples[1].category, None);
}

#[test]
fn json_array_and_object_with_a_list_read_prompt_completion() {
    let dir = tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.json",
        r#"[{"prompt": "Say hi", "completion": "Hi!"}, {"prompt": "Count", "response": "1 2 3"}]"#,
    );
    let d = read_dataset(&a, &opts()).unwrap();
    assert_eq!(d.report.kind, RecordKind::PromptCompletion);
    assert_eq!(d.examples[0].record.messages(), vec![Message::user("Say hi"), Message::model("Hi!")]);
    // A row without `completion` uses `response`.
    assert_eq!(d.examples[1].record.messages()[1], Message::model("1 2 3"));

    let b = write(dir.path(), "b.json", r#"{"version": 2, "data": [{"prompt": "p", "output": "o"}]}"#);
    let d = read_dataset(&b, &opts()).unwrap();
    assert_eq!(d.examples.len(), 1);
    assert_eq!(d.examples[0].record.messages()[1], Message::model("o"));

    let cols = write(dir.path(), "c.json", r#"{"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}"#);
    let d = read_dataset(&cols, &opts()).unwrap();
    assert_eq!(d.examples[1].record.messages()[0], Message::user("p2"));
}

#[test]
fn alpaca_instruction_and_input_make_the_prompt() {
    let dir = tempdir().unwrap();
    let p = write(
        dir.path(),
        "alpaca.json",
        r#"[{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue"}]"#,
    );
    let d = read_dataset(&p, &opts()).unwrap();
    assert_eq!(d.report.kind, RecordKind::PromptCompletion);
    assert_eq!(d.examples[0].record.prompt_messages(), vec![Message::user("Translate to French.\n\ncat")]);
    assert_eq!(d.examples[1].record.prompt_messages(), vec![Message::user("Name a colour.")]);
}

#[test]
fn hh_rlhf_transcripts_split_at_the_shared_prefix() {
    let dir = tempdir().unwrap();
    let row = serde_json::json!({
        "chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for 8 minutes.\n\nHuman: And soft?\n\nAssistant: About 6 minutes.",
        "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for 8 minutes.\n\nHuman: And soft?\n\nAssistant: Eggs cannot be soft."
    });
    let p = write(dir.path(), "hh.jsonl", &format!("{row}\n"));
    let d = read_dataset(&p, &opts()).unwrap();
    assert_eq!(d.report.kind, RecordKind::Preference);
    let Record::Preference { prompt, chosen, rejected, margin } = &d.examples[0].record else {
        panic!("not a preference record")
    };
    assert_eq!(
        prompt,
        &vec![
            Message::user("How do I boil an egg?"),
            Message::model("Put it in boiling water for 8 minutes."),
            Message::user("And soft?"),
        ]
    );
    assert_eq!(chosen, &vec![Message::model("About 6 minutes.")]);
    assert_eq!(rejected, &vec![Message::model("Eggs cannot be soft.")]);
    assert_eq!(*margin, None);
    assert_eq!(d.examples[0].record.rejected_messages().unwrap().len(), 4);
}

#[test]
fn ultrafeedback_message_list_pair_takes_prompt_from_shared_turns() {
    let dir = tempdir().unwrap();
    let row = serde_json::json!({
        "prompt": "What is the capital of France?",
        "chosen": [{"role": "user", "content": "What is the capital of France?"},
                   {"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "Lyon."}],
        "score_chosen": 9.0,
        "margin": 2.5
    });
    let p = write(dir.path(), "uf.jsonl", &format!("{row}\n"));
    let d = read_dataset(&p, &opts()).unwrap();
    let Record::Preference { prompt, chosen, rejected, margin } = &d.examples[0].record else {
        panic!("not a preference record")
    };
    assert_eq!(prompt, &vec![Message::user("What is the capital of France?")]);
    assert_eq!(chosen, &vec![Message::new("assistant", "Paris.")]);
    assert_eq!(rejected, &vec![Message::new("assistant", "Lyon.")]);
    assert_eq!(*margin, Some(2.5));
}

#[test]
fn csv_reads_text_columns_message_json_and_numeric_margin() {
    let dir = tempdir().unwrap();
    let p = write(
        dir.path(),
        "pairs.csv",
        "prompt,chosen,rejected,margin,category\n\
         \"Hi, there\",Hello!,Go away.,1.5,chat\n\
         Why?,\"Because, well\nit is.\",No.,,\n",
    );
    let d = read_dataset(&p, &opts()).unwrap();
    assert_eq!(d.report.kind, RecordKind::Preference);
    assert_eq!(d.examples.len(), 2);
    let Record::Preference { prompt, chosen, margin, .. } = &d.examples[0].record else { panic!() };
    assert_eq!(prompt, &vec![Message::user("Hi, there")]);
    assert_eq!(chosen, &vec![Message::model("Hello!")]);
    assert_eq!(*margin, Some(1.5));
    assert_eq!(d.examples[0].category.as_deref(), Some("chat"));
    let Record::Preference { chosen, margin, .. } = &d.examples[1].record else { panic!() };
    assert_eq!(chosen[0].content, "Because, well\nit is.");
    assert_eq!(*margin, None);
    assert_eq!(d.examples[1].category, None);

    let m = write(
        dir.path(),
        "chat.csv",
        "messages\n\"[{\"\"role\"\": \"\"user\"\", \"\"content\"\": \"\"hi\"\"}, {\"\"role\"\": \"\"assistant\"\", \"\"content\"\": \"\"yo\"\"}]\"\n",
    );
    let d = read_dataset(&m, &opts()).unwrap();
    assert_eq!(d.examples[0].record.messages(), vec![Message::user("hi"), Message::new("assistant", "yo")]);
}

#[test]
fn parquet_reads_message_lists_text_and_numbers() {
    let dir = tempdir().unwrap();
    let p = write_parquet(
        dir.path(),
        "chat.parquet",
        vec![
            Col::Messages(
                "messages",
                vec![
                    vec![("user", "Hi"), ("assistant", "Hello")],
                    vec![("system", "Terse."), ("user", "2+2"), ("assistant", "4")],
                ],
            ),
            Col::Text("category", vec![Some("a"), None]),
        ],
    );
    let d = read_dataset(&p, &opts()).unwrap();
    assert_eq!(d.report.kind, RecordKind::Conversational);
    assert_eq!(
        d.examples[1].record.messages(),
        vec![Message::system("Terse."), Message::user("2+2"), Message::new("assistant", "4")]
    );
    assert_eq!(d.examples[0].category.as_deref(), Some("a"));
    assert_eq!(d.examples[1].category, None);

    // UltraFeedback-style pair in Parquet: message-list columns and a margin.
    let p = write_parquet(
        dir.path(),
        "uf.parquet",
        vec![
            Col::Text("prompt", vec![Some("Capital of Italy?")]),
            Col::Messages("chosen", vec![vec![("user", "Capital of Italy?"), ("assistant", "Rome.")]]),
            Col::Messages("rejected", vec![vec![("user", "Capital of Italy?"), ("assistant", "Milan.")]]),
            Col::Float("margin", vec![Some(0.75)]),
        ],
    );
    let d = read_dataset(&p, &opts()).unwrap();
    let Record::Preference { prompt, chosen, rejected, margin } = &d.examples[0].record else { panic!() };
    assert_eq!(prompt, &vec![Message::user("Capital of Italy?")]);
    assert_eq!(chosen[0].content, "Rome.");
    assert_eq!(rejected[0].content, "Milan.");
    assert_eq!(*margin, Some(0.75));
}

#[test]
fn directory_of_shards_reads_files_in_name_order() {
    let dir = tempdir().unwrap();
    let shards = dir.path().join("train");
    std::fs::create_dir(&shards).unwrap();
    write(&shards, "part-00001.jsonl", "{\"prompt\": \"b\", \"completion\": \"2\"}\n");
    write(&shards, "part-00000.jsonl", "{\"prompt\": \"a\", \"completion\": \"1\"}\n");
    write(&shards, "README.md", "not data");
    write(&shards, ".hidden.jsonl", "garbage");
    let d = read_dataset(&shards, &opts()).unwrap();
    assert_eq!(d.report.files.len(), 2);
    let prompts: Vec<String> =
        d.examples.iter().map(|e| e.record.prompt_messages()[0].content.clone()).collect();
    assert_eq!(prompts, vec!["a", "b"]);

    write(&shards, "extra.csv", "prompt,completion\nc,3\n");
    let e = err(&shards, &opts());
    assert!(e.contains("mixes formats"), "{e}");
    let only_csv = ReadOptions { format: Some(Format::Csv), ..opts() };
    assert_eq!(read_dataset(&shards, &only_csv).unwrap().examples.len(), 1);
}

#[test]
fn column_map_renames_file_columns_to_canonical_names() {
    let dir = tempdir().unwrap();
    let p = write(
        dir.path(),
        "qa.jsonl",
        "{\"question\": \"Why is the sky blue?\", \"answer\": \"Rayleigh scattering.\", \"prompt\": \"ignored\"}\n",
    );
    let mut columns = BTreeMap::new();
    columns.insert("prompt".to_string(), "question".to_string());
    columns.insert("completion".to_string(), "answer".to_string());
    let o = ReadOptions { columns, ..opts() };
    let d = read_dataset(&p, &o).unwrap();
    assert_eq!(
        d.examples[0].record.messages(),
        vec![Message::user("Why is the sky blue?"), Message::model("Rayleigh scattering.")]
    );

    let mut bad = BTreeMap::new();
    bad.insert("answer".to_string(), "answer".to_string());
    let e = err(&p, &ReadOptions { columns: bad, ..opts() });
    assert!(e.contains("`answer` is not a column name"), "{e}");

    let mut missing = BTreeMap::new();
    missing.insert("completion".to_string(), "reply".to_string());
    let e = err(&p, &ReadOptions { columns: missing, ..opts() });
    assert!(e.contains("column `reply` (mapped to `completion`) is not in the file"), "{e}");
}

#[test]
fn bad_rows_name_file_line_field_and_expectation() {
    let dir = tempdir().unwrap();
    let good = r#"{"prompt": "p", "completion": "c"}"#;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed.jsonl",
            format!("{good}\n{{\"prompt\": \"p\", \n"),
            "line 2: expected a JSON object, but the line does not parse",
        ),
        (
            "missing.jsonl",
            format!("{good}\n{good}\n{{\"prompt\": \"p\", \"completion\": null}}\n"),
            "line 3, field `completion`: expected the response text",
        ),
        (
            "wrongtype.jsonl",
            format!("{good}\n{{\"prompt\": 42, \"completion\": \"c\"}}\n"),
            "line 2, field `prompt`: expected text or a list of {role, content} messages, found number 42",
        ),
        (
            "array.jsonl",
            format!("{good}\n[1, 2]\n"),
            "line 2: expected a JSON object, found a list of 2 items",
        ),
    ];
    for (name, text, want) in cases {
        let p = write(dir.path(), name, &text);
        let e = err(&p, &opts());
        assert!(e.contains(name), "{e}");
        assert!(e.contains(want), "{name}: {e}");
        assert!(e.contains("on_bad_row = \"skip\""), "{e}");
    }

    let role = write(
        dir.path(),
        "role.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"bot\", \"content\": \"yo\"}]}\n",
    );
    let e = err(&role, &opts());
    assert!(
        e.contains(
            "line 1, field `messages[1].role`: expected one of user, assistant, model, system, found \"bot\""
        ),
        "{e}"
    );

    let no_model =
        write(dir.path(), "nomodel.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    let e = err(&no_model, &opts());
    assert!(e.contains("field `messages`: has no model/assistant turn"), "{e}");
    // ... which is fine as a prompt.
    let as_prompts = ReadOptions { kind: Some(RecordKind::PromptOnly), ..opts() };
    assert_eq!(read_dataset(&no_model, &as_prompts).unwrap().examples.len(), 1);
}

#[test]
fn bad_preference_pairs_are_bad_rows() {
    let dir = tempdir().unwrap();
    let p = write(
        dir.path(),
        "pairs.jsonl",
        concat!(
            r#"{"prompt": "p", "chosen": "yes", "rejected": "no"}"#,
            "\n",
            r#"{"prompt": "p", "chosen": "same", "rejected": " same "}"#,
            "\n",
            r#"{"prompt": "p", "chosen": "", "rejected": "no"}"#,
            "\n",
            r#"{"prompt": "p", "chosen": "yes", "rejected": "no", "margin": "big"}"#,
            "\n",
            r#"{"chosen": "yes", "rejected": "no"}"#,
            "\n",
        ),
    );
    let e = err(&p, &opts());
    assert!(e.contains("line 2, field `rejected`: is identical to `chosen`"), "{e}");
    let d = read_dataset(&p, &skip()).unwrap();
    assert_eq!(d.examples.len(), 1);
    assert_eq!(d.report.rows, 5);
    let found: Vec<(usize, Option<&str>)> =
        d.report.skipped.iter().map(|b| (b.number, b.field.as_deref())).collect();
    assert_eq!(
        found,
        vec![(2, Some("rejected")), (3, Some("chosen")), (4, Some("margin")), (5, Some("prompt")),]
    );
    let shown = d.report.to_string();
    assert!(shown.contains("4 bad rows skipped"), "{shown}");
    assert!(shown.contains("line 4, field `margin`: expected a number, found text \"big\""), "{shown}");
}

#[test]
fn csv_parquet_and_json_bad_rows_give_row_numbers() {
    let dir = tempdir().unwrap();
    let csv = write(dir.path(), "b.csv", "prompt,completion\na,b\nc,\n");
    let e = err(&csv, &opts());
    assert!(e.contains("b.csv: row 2, field `completion`"), "{e}");

    let json = write(
        dir.path(),
        "b.json",
        r#"[{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b"}, "oops"]"#,
    );
    let e = err(&json, &opts());
    assert!(e.contains("b.json: row 3: expected a JSON object, found text \"oops\""), "{e}");

    let lines_in_json = write(dir.path(), "lines.json", "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n");
    let e = err(&lines_in_json, &opts());
    assert!(e.contains("lines.json") && e.contains("name it .jsonl"), "{e}");

    let pq = write_parquet(
        dir.path(),
        "b.parquet",
        vec![
            Col::Text("prompt", vec![Some("a"), Some("b"), Some("c")]),
            Col::Text("completion", vec![Some("x"), Some("y"), None]),
        ],
    );
    let e = err(&pq, &opts());
    assert!(e.contains("b.parquet: row 3, field `completion`"), "{e}");

    // A remapped column is named as the file names it.
    let mut columns = BTreeMap::new();
    columns.insert("completion".to_string(), "answer".to_string());
    let renamed = write(dir.path(), "r.csv", "prompt,answer\na,b\nc,\n");
    let e = err(&renamed, &ReadOptions { columns, ..opts() });
    assert!(e.contains("row 2, field `answer`"), "{e}");
}

#[test]
fn skipping_every_row_is_an_empty_dataset_error() {
    let dir = tempdir().unwrap();
    let p = write(
        dir.path(),
        "allbad.jsonl",
        "{\"prompt\": \"p\", \"completion\": 1}\n{\"prompt\": \"p\", \"completion\": 2}\n",
    );
    let e = err(&p, &skip());
    assert!(e.contains("has no usable rows (2 rows, 2 skipped as bad"), "{e}");
    assert!(e.contains("line 1, field `completion`"), "{e}");
    let empty = write(dir.path(), "empty.jsonl", "\n");
    let e = err(&empty, &opts());
    assert!(e.contains("cannot tell the record kind"), "{e}");
}

#[test]
fn unknown_columns_say_how_to_remap() {
    let dir = tempdir().unwrap();
    let p = write(dir.path(), "t.jsonl", "{\"text\": \"hello\"}\n");
    let e = err(&p, &opts());
    assert!(e.contains("t.jsonl: cannot tell the record kind from the columns [text]"), "{e}");
    assert!(e.contains("`columns` map"), "{e}");
}

#[test]
fn wanted_kind_converts_conversations_to_prompts() {
    let dir = tempdir().unwrap();
    let p = write(
        dir.path(),
        "c.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
    );
    let o = ReadOptions { kind: Some(RecordKind::PromptOnly), ..opts() };
    let d = read_dataset(&p, &o).unwrap();
    assert_eq!(d.report.detected, RecordKind::Conversational);
    assert_eq!(d.report.kind, RecordKind::PromptOnly);
    assert_eq!(d.examples[0].record, Record::PromptOnly { prompt: vec![Message::user("q")] });
    let o = ReadOptions { kind: Some(RecordKind::Preference), ..opts() };
    let e = err(&p, &o);
    assert!(e.contains("a conversational record cannot be used as a preference record"), "{e}");
}

#[test]
fn written_jsonl_reads_back_to_the_same_examples() {
    let dir = tempdir().unwrap();
    let src = write(
        dir.path(),
        "hh.jsonl",
        &format!(
            "{}\n",
            serde_json::json!({
                "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e",
                "category": "x"
            })
        ),
    );
    let d = read_dataset(&src, &opts()).unwrap();
    let out = dir.path().join("out.jsonl");
    write_jsonl(&out, &d.examples).unwrap();
    let back = read_dataset(&out, &opts()).unwrap();
    assert_eq!(back.examples[0].record, d.examples[0].record);
    assert_eq!(back.examples[0].category.as_deref(), Some("x"));
}

#[test]
fn read_options_parse_from_config_and_reject_unknown_keys() {
    let o: ReadOptions = serde_json::from_str(
        r#"{"kind": "prompt_only", "format": "parquet", "on_bad_row": "skip", "columns": {"prompt": "q"}}"#,
    )
    .unwrap();
    assert_eq!(o.kind, Some(RecordKind::PromptOnly));
    assert_eq!(o.on_bad_row, OnBadRow::Skip);
    assert_eq!(o.format, Some(Format::Parquet));
    assert_eq!(ReadOptions::default().on_bad_row, OnBadRow::Fail);
    let e = serde_json::from_str::<ReadOptions>(r#"{"on_bad_rows": "skip"}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `on_bad_rows`"), "{e}");
    assert!(serde_json::from_str::<ReadOptions>(r#"{"on_bad_row": "ignore"}"#).is_err());
}

#[test]
fn roles_out_of_order_are_bad_rows_naming_the_message() {
    let dir = tempdir().unwrap();
    let m = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let rows = [
        // Line 1: fine, with a system message first.
        serde_json::json!({"messages": [m("system", "s"), m("user", "q"), m("assistant", "a")]}),
        // Line 2: two user turns in a row.
        serde_json::json!({"messages": [m("user", "q"), m("user", "q again"), m("model", "a")]}),
        // Line 3: a system message that is not first.
        serde_json::json!({"messages": [m("user", "q"), m("system", "s"), m("model", "a")]}),
        // Line 4: the first non-system turn is the model's.
        serde_json::json!({"messages": [m("system", "s"), m("model", "a"), m("user", "q")]}),
        // Line 5: two model turns in a row.
        serde_json::json!({"messages": [m("user", "q"), m("model", "a"), m("assistant", "b")]}),
        // Line 6: fine, two rounds.
        serde_json::json!({"messages": [m("user", "q"), m("model", "a"), m("user", "q2"), m("model", "b")]}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let p = write(dir.path(), "order.jsonl", &text);

    // Failing: the first bad row, with file, line, field, index and expectation.
    let e = err(&p, &opts());
    assert!(e.contains("order.jsonl"), "{e}");
    assert!(
        e.contains("line 2, field `messages[1].role`: expected a model/assistant turn after a user turn, found \"user\""),
        "{e}"
    );
    assert!(e.contains("on_bad_row = \"skip\""), "{e}");

    // Skipping: every bad row is skipped, counted and named.
    let d = read_dataset(&p, &skip()).unwrap();
    assert_eq!(d.report.rows, 6);
    assert_eq!(d.examples.len(), 2);
    assert_eq!(d.examples.iter().map(|e| e.origin.row).collect::<Vec<_>>(), vec![1, 6]);
    let found: Vec<(usize, Option<&str>)> =
        d.report.skipped.iter().map(|b| (b.number, b.field.as_deref())).collect();
    assert_eq!(
        found,
        vec![
            (2, Some("messages[1].role")),
            (3, Some("messages[1].role")),
            (4, Some("messages[1].role")),
            (5, Some("messages[2].role")),
        ]
    );
    let why: Vec<&str> = d.report.skipped.iter().map(|b| b.message.as_str()).collect();
    assert!(why[1].contains("a system message may only come first"), "{}", why[1]);
    assert!(why[2].contains("expected a user turn as the first turn, found \"model\""), "{}", why[2]);
    assert!(why[3].contains("expected a user turn after a model turn, found \"assistant\""), "{}", why[3]);
    let shown = d.report.to_string();
    assert!(shown.contains("4 bad rows skipped"), "{shown}");
    // Every kept row renders: the turn order the formatter needs holds.
    for ex in &d.examples {
        let roles: Vec<String> = ex.record.messages().iter().map(|m| m.role.clone()).collect();
        let turns: Vec<&String> = roles.iter().filter(|r| *r != "system").collect();
        for (i, r) in turns.iter().enumerate() {
            assert_eq!(i % 2 == 0, *r == "user", "{roles:?}");
        }
    }
}

#[test]
fn roles_out_of_order_in_prompts_and_pairs_are_bad_rows() {
    let dir = tempdir().unwrap();
    let m = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    // A prompt list that ends with the model's turn, then a text completion.
    let pc = serde_json::json!({"prompt": [m("user", "q"), m("model", "a")], "completion": "b"});
    let p = write(dir.path(), "pc.jsonl", &format!("{pc}\n"));
    let e = err(&p, &opts());
    assert!(
        e.contains("line 1, field `completion`: expected a user turn after a model turn, found \"model\""),
        "{e}"
    );

    // Preference lists whose shared prompt has two user turns in a row.
    let pair = serde_json::json!({
        "chosen": [m("user", "q"), m("user", "q"), m("assistant", "good")],
        "rejected": [m("user", "q"), m("user", "q"), m("assistant", "bad")],
    });
    let good = serde_json::json!({"prompt": "q", "chosen": "good", "rejected": "bad"});
    let p = write(dir.path(), "pairs.jsonl", &format!("{good}\n{pair}\n"));
    let e = err(&p, &opts());
    assert!(
        e.contains("line 2, field `chosen[1].role`: expected a model/assistant turn after a user turn"),
        "{e}"
    );
    let d = read_dataset(&p, &skip()).unwrap();
    assert_eq!((d.examples.len(), d.report.skipped.len()), (1, 1));

    // HH-RLHF transcripts with two Human turns in a row.
    let hh = serde_json::json!({
        "chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: yes",
        "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: no",
    });
    let p = write(dir.path(), "hh.jsonl", &format!("{hh}\n"));
    let e = err(&p, &opts());
    assert!(e.contains("field `chosen[1].role`"), "{e}");

    // Prompts for generation end with the user's turn.
    let prompts = [
        serde_json::json!({"prompt": [m("user", "q"), m("model", "a")]}),
        serde_json::json!({"prompt": [m("system", "s"), m("user", "q")]}),
        serde_json::json!({"prompt": [m("model", "a"), m("user", "q")]}),
    ];
    let text: String = prompts.iter().map(|r| format!("{r}\n")).collect();
    let p = write(dir.path(), "prompts.jsonl", &text);
    let o = ReadOptions { kind: Some(RecordKind::PromptOnly), on_bad_row: OnBadRow::Skip, ..opts() };
    let d = read_dataset(&p, &o).unwrap();
    assert_eq!(d.examples.len(), 1);
    assert_eq!(d.examples[0].origin.row, 2);
    let found: Vec<(usize, Option<&str>)> =
        d.report.skipped.iter().map(|b| (b.number, b.field.as_deref())).collect();
    assert_eq!(found, vec![(1, Some("prompt[1].role")), (3, Some("prompt[0].role"))]);
    assert!(d.report.skipped[0].message.contains("end with a user turn"), "{}", d.report.skipped[0].message);
}
