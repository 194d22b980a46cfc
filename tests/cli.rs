//! The `align` binary end to end: generate/inspect/init/tokenizer on the
//! transformers fixtures, and the errors bad input gives (non-zero exit, a
//! message, never a panic).

mod common;
use common::{align, fixture, read_json, root};
use std::path::Path;
use std::process::{Command, Output};

fn expected() -> serde_json::Value {
    read_json(&fixture("mqa").join("expected.json"))
}

fn fails_cleanly(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[test]
fn generate_json_prompt_ids_follow_the_chat_template() {
    let greedy = || {
        align(&[
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
        ])
    };
    let out = greedy();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_ids"], expected()["chats"][0]["ids"]);
    let n = v["token_ids"].as_array().unwrap().len();
    let reason = v["stop_reason"].as_str().unwrap();
    assert!(matches!(reason, "eos" | "end_of_turn" | "length"));
    assert!(if reason == "length" { n == 8 } else { n < 8 });
    assert!(v["text"].is_string());
    // Greedy is deterministic; sampling is reproducible from --seed.
    let again = greedy();
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
    assert!(text.contains("chat template: the checkpoint's") && text.contains("built-in"), "{text}");
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"[{"role":"assistant","content":"hi"},{"role":"user","content":"x"}]"#).unwrap();
    let out =
        align(&["inspect", "--model", fixture("mqa").to_str().unwrap(), "--messages", bad.to_str().unwrap()]);
    fails_cleanly(&out, "roles must alternate");
}

#[test]
fn tokenizer_train_then_init_then_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = root().join("recipes/data/tiny_corpus.txt");
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
    let init = |preset: &str| {
        align(&[
            "init",
            "--preset",
            preset,
            "--tokenizer",
            tok.to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
        ])
    };
    let out = init("tiny");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value = read_json(&model.join("config.json"));
    assert_eq!(cfg["vocab_size"], 640);
    let tc: serde_json::Value = read_json(&model.join("tokenizer_config.json"));
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
    let out = init("nope");
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

/// A reward model: the fixture's backbone with a seeded score head, saved as
/// `align reward` saves one.
fn write_reward_model(dir: &Path) -> lm::reward_model::LoadedReward {
    let rm =
        lm::reward_model::load(&fixture("mqa"), tch::Device::Cpu, tch::Kind::Float, Some(0.5), 23).unwrap();
    lm::reward_model::save(dir, &rm.vs, &rm.model, &rm.tokenizer, None).unwrap();
    rm
}

/// The reward of one dialogue by hand: formatted alone, no padding, the
/// head's output at the last token.
fn reward_by_hand(rm: &lm::reward_model::LoadedReward, messages: &[lm::Message]) -> f64 {
    let ids = lm::chat::encode(&rm.tokenizer, messages, false).unwrap().ids;
    let t = ids.len() as i64;
    let ids = tch::Tensor::from_slice(&ids).view([1, t]);
    let valid = tch::Tensor::ones([1, t], (tch::Kind::Bool, tch::Device::Cpu));
    tch::no_grad(|| rm.model.forward(&ids, &valid).unwrap()).double_value(&[0])
}

#[test]
fn score_writes_reward_columns_and_prints_pair_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let rm_dir = tmp.path().join("rm");
    let rm = write_reward_model(&rm_dir);
    let score = |data: &Path, out: &Path| {
        align(&[
            "score",
            "--reward-model",
            rm_dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let topics = ["rivers", "stars", "bread", "clocks", "trains", "maps"];
    let pairs: Vec<serde_json::Value> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                "prompt": format!("Tell me about {t}"),
                "chosen": format!("{t} are interesting, in {i} ways."),
                "rejected": format!("No {t}{}", "!".repeat(i + 1)),
                "category": if i % 2 == 0 { "even" } else { "odd" },
            })
        })
        .collect();
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(&data, pairs.iter().map(|p| format!("{p}\n")).collect::<String>()).unwrap();
    // The rewards and accuracy by hand.
    let want: Vec<(f64, f64)> = pairs
        .iter()
        .map(|p| {
            let side = |s: &str| {
                reward_by_hand(
                    &rm,
                    &[
                        lm::Message::user(p["prompt"].as_str().unwrap()),
                        lm::Message::model(p[s].as_str().unwrap()),
                    ],
                )
            };
            (side("chosen"), side("rejected"))
        })
        .collect();
    let correct = want.iter().filter(|(c, r)| c > r).count();
    let accuracy = correct as f64 / want.len() as f64;

    for ext in ["jsonl", "parquet"] {
        let out_path = tmp.path().join(format!("scored.{ext}"));
        let out = score(&data, &out_path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains(&format!("accuracy {accuracy:.4} over 6 pairs (chosen > rejected)")), "{err}");
        assert!(err.contains("even: accuracy") && err.contains("odd: accuracy"), "{err}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["pairs"], 6);
        assert!((report["pair_eval"]["accuracy"].as_f64().unwrap() - accuracy).abs() < 1e-12, "{report}");
        assert_eq!(report["out"], out_path.display().to_string());

        let rows = datasets::read_table(&out_path).unwrap();
        assert_eq!(rows.len(), 6, "{ext}");
        for (i, (row, (c, r))) in rows.iter().zip(&want).enumerate() {
            let f = |k: &str| row[k].as_f64().unwrap_or_else(|| panic!("{ext} row {i}: no {k} in {row:?}"));
            assert!((f("reward_chosen") - c).abs() < 1e-4, "{ext} row {i}: {} vs {c}", f("reward_chosen"));
            assert!(
                (f("reward_rejected") - r).abs() < 1e-4,
                "{ext} row {i}: {} vs {r}",
                f("reward_rejected")
            );
            assert!((f("reward_margin") - (f("reward_chosen") - f("reward_rejected"))).abs() < 1e-9);
            assert_eq!(row["correct"], serde_json::json!(c > r), "{ext} row {i}");
            // The data columns come along.
            assert_eq!(row["prompt"], pairs[i]["prompt"], "{ext} row {i}");
            assert_eq!(row["category"], pairs[i]["category"], "{ext} row {i}");
        }
    }

    // Prompt/response rows get one `reward` column.
    let responses = tmp.path().join("responses.jsonl");
    let rows: Vec<serde_json::Value> = topics
        .iter()
        .map(|t| serde_json::json!({"prompt": format!("Tell me about {t}"), "completion": format!("{t} are fine.")}))
        .collect();
    std::fs::write(&responses, rows.iter().map(|p| format!("{p}\n")).collect::<String>()).unwrap();
    let out_path = tmp.path().join("responses_scored.parquet");
    let out = score(&responses, &out_path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("accuracy"), "no pairs, no accuracy: {err}");
    let got = datasets::read_table(&out_path).unwrap();
    assert_eq!(got.len(), topics.len());
    for (row, input) in got.iter().zip(&rows) {
        let want = reward_by_hand(
            &rm,
            &[
                lm::Message::user(input["prompt"].as_str().unwrap()),
                lm::Message::model(input["completion"].as_str().unwrap()),
            ],
        );
        assert!((row["reward"].as_f64().unwrap() - want).abs() < 1e-4, "{row:?} vs {want}");
        assert!(row.get("reward_chosen").is_none());
    }

    // A causal LM is not a reward model; an unknown extension is refused first.
    let out = align(&[
        "score",
        "--reward-model",
        fixture("mqa").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    fails_cleanly(&out, "is not a reward model");
    let bad = tmp.path().join("scored.txt");
    let out = score(&data, &bad);
    fails_cleanly(&out, "unknown output format");
}

#[test]
fn bench_sft_in_bf16_reports_both_matmul_peaks_and_the_fraction_of_the_bf16_one() {
    let args = [
        "bench", "sft", "--preset", "test-mqa", "--batch", "1", "--seq", "16", "--steps", "1", "--python",
        "none",
    ];
    let run = |dtype: &str| {
        let mut a = args.to_vec();
        a.extend(["--dtype", dtype]);
        let out = align(&a);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let peak = |text: &str, label: &str| -> f64 {
        let at = text.find(label).unwrap_or_else(|| panic!("no {label:?} in {text}"));
        text[at + label.len()..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let gflops_and_pct = |text: &str| -> (f64, f64) {
        let line = text.lines().find(|l| l.starts_with("align")).unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let g: f64 = words[words.iter().position(|w| *w == "GFLOP/s").unwrap() - 1].parse().unwrap();
        let pct: f64 =
            words.iter().find(|w| w.starts_with('(')).unwrap().trim_matches(['(', '%']).parse().unwrap();
        (g, pct)
    };

    let bf16 = run("bf16");
    let (f32_peak, bf16_peak) = (peak(&bf16, "f32 matmul peak "), peak(&bf16, "bf16 matmul peak "));
    assert!(f32_peak > 0.0 && bf16_peak > 0.0, "{bf16}");
    assert!(bf16.contains("(fractions of the bf16 peak)"), "{bf16}");
    // The printed fraction is taken against the bf16 peak.
    let (g, pct) = gflops_and_pct(&bf16);
    assert!((pct - (100.0 * g / bf16_peak).round()).abs() <= 1.0, "{pct}% of {bf16_peak}: {bf16}");

    let f32 = run("f32");
    assert!(!f32.contains("bf16 matmul peak"), "{f32}");
    let f32_peak = peak(&f32, "f32 matmul peak ");
    let (g, pct) = gflops_and_pct(&f32);
    assert!((pct - (100.0 * g / f32_peak).round()).abs() <= 1.0, "{pct}% of {f32_peak}: {f32}");
}

#[test]
fn generate_logprobs_are_those_of_the_sampling_distribution() {
    // `--json --logprobs` at T = 0.7 with top-k: one log-prob per token id,
    // each log_softmax(logits / T) at that token, from the model's own
    // forward over the sequence so far (no top-k renormalisation).
    let model = fixture("mqa");
    let out = align(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.7",
        "--top-k",
        "20",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--json",
        "--logprobs",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids =
        |k: &str| -> Vec<i64> { v[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    let (prompt, tokens) = (ids("prompt_ids"), ids("token_ids"));
    let lps: Vec<f64> = v["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(!tokens.is_empty());
    assert_eq!(lps.len(), tokens.len(), "one log-prob per token id");
    let m = lm::checkpoint::load_causal_lm(&model, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let mut seq = prompt.clone();
    for (i, &t) in tokens.iter().enumerate() {
        let x = tch::Tensor::from_slice(&seq).unsqueeze(0);
        let logits = tch::no_grad(|| m.model.forward(&x).unwrap()).get(0).get(seq.len() as i64 - 1);
        let want = (logits / 0.7).log_softmax(-1, tch::Kind::Float).double_value(&[t]);
        assert!((want - lps[i]).abs() < 1e-4, "token {i}: {want} vs {}", lps[i]);
        seq.push(t);
    }
    // Without --json there is nowhere to put them: refused.
    let out = align(&["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--logprobs"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--json"));
}
