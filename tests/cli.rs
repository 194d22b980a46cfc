//! The `align` binary end to end: generate/inspect/init/tokenizer on the
//! transformers fixtures, and the errors bad input gives (non-zero exit, a
//! message, never a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn align(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_align")).args(args).output().expect("align runs")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lm/tests/fixtures").join(name)
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("mqa").join("expected.json")).unwrap()).unwrap()
}

fn fails_cleanly(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[test]
fn generate_json_prompt_ids_follow_the_chat_template() {
    let out = align(&[
        "generate",
        "--model",
        fixture("mqa").to_str().unwrap(),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_ids"], expected()["chats"][0]["ids"]);
    let n = v["token_ids"].as_array().unwrap().len();
    let reason = v["stop_reason"].as_str().unwrap();
    assert!(matches!(reason, "eos" | "end_of_turn" | "length"));
    assert!(if reason == "length" { n == 8 } else { n < 8 });
    assert!(v["text"].is_string());
    // Greedy is deterministic; sampling is reproducible from --seed.
    let again = align(&[
        "generate",
        "--model",
        fixture("mqa").to_str().unwrap(),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--json",
    ]);
    assert_eq!(out.stdout, again.stdout);
    let s = |seed: &str| {
        align(&[
            "generate",
            "--model",
            fixture("mqa").to_str().unwrap(),
            "--prompt",
            "hi",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
            "--device",
            "cpu",
        ])
        .stdout
    };
    assert_eq!(s("5"), s("5"));
}

#[test]
fn generate_with_system_folds_it_into_the_first_turn() {
    let out = align(&[
        "generate",
        "--model",
        fixture("mqa").to_str().unwrap(),
        "--prompt",
        "Sort: 3 1 2",
        "--system",
        "You are terse.",
        "--max-new-tokens",
        "2",
        "--json",
        "--dtype",
        "bf16",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = &expected()["chats"][2]["ids"];
    // The fixture conversation starts with the same system + user turn.
    let got = v["prompt_ids"].as_array().unwrap();
    assert_eq!(&want.as_array().unwrap()[..got.len() - 4], &got[..got.len() - 4]);
}

#[test]
fn missing_model_directory_fails_cleanly() {
    let out = align(&["generate", "--model", "/nonexistent/dir", "--prompt", "x"]);
    fails_cleanly(&out, "model directory /nonexistent/dir does not exist");
}

fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("mqa")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    edit(tmp.path());
    tmp
}

#[test]
fn corrupt_safetensors_fails_cleanly() {
    let d = broken_copy(|p| std::fs::write(p.join("model.safetensors"), b"garbage").unwrap());
    fails_cleanly(
        &align(&["generate", "--model", d.path().to_str().unwrap(), "--prompt", "x"]),
        "not a valid safetensors file",
    );
}

#[test]
fn config_with_wrong_field_fails_cleanly() {
    let d = broken_copy(|p| {
        let c = std::fs::read_to_string(p.join("config.json"))
            .unwrap()
            .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": -2");
        std::fs::write(p.join("config.json"), c).unwrap();
    });
    fails_cleanly(
        &align(&["generate", "--model", d.path().to_str().unwrap(), "--prompt", "x"]),
        "num_hidden_layers must be positive",
    );
}

#[test]
fn inspect_marks_trained_spans_and_rejects_roles_out_of_order() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.json");
    std::fs::write(
        &good,
        r#"{"messages":[{"role":"user","content":"Reverse: ab"},{"role":"assistant","content":"ba"}]}"#,
    )
    .unwrap();
    let out = align(&[
        "inspect",
        "--model",
        fixture("mqa").to_str().unwrap(),
        "--messages",
        good.to_str().unwrap(),
        "--tokens",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("<start_of_turn>model\n⟦ba<end_of_turn>\n⟧"), "{text}");
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"[{"role":"assistant","content":"hi"},{"role":"user","content":"x"}]"#).unwrap();
    let out =
        align(&["inspect", "--model", fixture("mqa").to_str().unwrap(), "--messages", bad.to_str().unwrap()]);
    fails_cleanly(&out, "roles must alternate");
}

#[test]
fn tokenizer_train_then_init_then_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes/data/tiny_corpus.txt");
    let tok = tmp.path().join("tokenizer.json");
    let out = align(&[
        "tokenizer",
        "train",
        "--input",
        corpus.to_str().unwrap(),
        "--vocab-size",
        "600",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = tmp.path().join("model");
    let out = align(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 640);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc["chat_template"].as_str().unwrap().contains("<start_of_turn>"));
    let out = align(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Add 1 and 2.",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = align(&[
        "init",
        "--preset",
        "nope",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    fails_cleanly(&out, "unknown model preset \"nope\"");
}

#[test]
fn chat_keeps_history_and_handles_reset_and_quit() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["chat", "--model", fixture("mqa").to_str().unwrap(), "--max-new-tokens", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\nsecond turn\n/reset\nagain\n/quit\nnever read\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("model> ").count(), 3, "{text}");
    assert!(text.contains("(history cleared)"));
}

#[test]
fn memorization_eval_finds_documents_a_model_was_trained_to_repeat() {
    let tmp = tempfile::tempdir().unwrap();
    // Four long documents, overfitted by a short pretraining run.
    let docs: Vec<String> = (0..4)
        .map(|d| (0..60).map(|i| format!("w{}", (i * 7 + d * 13) % 50)).collect::<Vec<_>>().join(" "))
        .collect();
    let text = tmp.path().join("docs.txt");
    std::fs::write(&text, docs.join("\n")).unwrap();
    let cfg = tmp.path().join("pt.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"{}\"\noutput_dir = \"{}\"\nmode = \"pretrain\"\ntext_files = [\"{}\"]\nmax_seq_len = 200\nbatch_size = 4\nmax_steps = 120\neval_fraction = 0.0\ndevice = \"cpu\"\n[optim]\nlr = 1e-2\nwarmup_steps = 5\nmin_lr_ratio = 0.5\n",
            fixture("mqa").display(),
            tmp.path().join("out").display(),
            text.display()
        ),
    )
    .unwrap();
    let out = align(&["sft", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = tmp.path().join("out/model");
    let mem = |data: &Path| {
        let out = align(&[
            "eval",
            "memorization",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--prompt-tokens",
            "20",
            "--continuation-tokens",
            "20",
            "--device",
            "cpu",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let r = mem(&text);
    assert_eq!(r["documents"], 4);
    assert!(r["exact_rate"].as_f64().unwrap() >= 0.75, "{r}");
    assert!(r["approximate"].as_u64().unwrap() >= r["exact"].as_u64().unwrap());
    // Unseen documents are not memorized.
    let unseen = tmp.path().join("unseen.txt");
    let other: Vec<String> = (0..4)
        .map(|d| (0..60).map(|i| format!("w{}", (i * 11 + d * 3 + 1) % 47)).collect::<Vec<_>>().join(" "))
        .collect();
    std::fs::write(&unseen, other.join("\n")).unwrap();
    assert_eq!(mem(&unseen)["exact"], 0);
}
