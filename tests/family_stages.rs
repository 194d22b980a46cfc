//! The stages on each Gemma family member: `align init --preset tiny-gemmaN`
//! (windows of 16, shorter than the sequences below; soft-capping on), then
//! SFT → reward → RL → judge as a recipe, then `align serve` answering one
//! request with the RL model. Each stage's outputs exist, its models load back
//! as the same family (`model_type`, the family's causal-LM or
//! sequence-classification architecture), and its losses are finite.

mod common;
use common::{
    align, align_command, align_in, read_json, recipe, stderr, tiny_corpus_tokenizer, write_recipe,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

/// The stages after the base model (`base`, written by `align init`).
fn stages_recipe() -> String {
    let head = r#"
name = "family"
output_dir = "out"
seed = 1
device = "cpu"
[base_model]
checkpoint = "base"
[tokenizer]
file = "base/tokenizer.json"
"#;
    [
        head.to_string(),
        recipe::data("sft", Some(0.1), "builtin:sft?n=60&seed=3"),
        recipe::data("prefs", Some(0.2), "builtin:preferences?n=30&seed=4"),
        recipe::data("prompts", None, "builtin:rl?n=8&seed=5"),
        recipe::sft("max_seq_len = 48, batch_size = 8, max_steps = 3"),
        recipe::reward("sft", "max_seq_len = 48, batch_size = 8, max_steps = 2"),
        recipe::rl(
            "sft",
            &["reward = \"rm\""],
            "steps = 2, batch_size = 4, num_samples = 2, max_new_tokens = 20, eval_every = 0",
        ),
        recipe::judge(
            "rl",
            "sft",
            &[],
            r#"prompts = "builtin:eval?n=6&seed=6", judge = "reward:rm", oracle = "tasks", max_new_tokens = 20"#,
        ),
    ]
    .concat()
}

/// A model directory's config.json: `model_type` and its one architecture.
fn family_of(dir: &Path) -> (String, String) {
    let cfg = read_json(&dir.join("config.json"));
    let arch = cfg["architectures"].as_array().filter(|a| a.len() == 1).unwrap_or_else(|| panic!("{cfg}"));
    (cfg["model_type"].as_str().unwrap().to_string(), arch[0].as_str().unwrap().to_string())
}

fn finite(v: &serde_json::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what}: {v}"));
    assert!(x.is_finite(), "{what}: {x}");
    x
}

/// A causal LM directory loads back with the library as `model_type`, and
/// its logits over 40 positions (longer than the window) are finite.
fn loads_back(dir: &Path, model_type: &str) {
    let loaded = lm::checkpoint::load_causal_lm(dir, tch::Device::Cpu, tch::Kind::Float)
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    let cfg = lm::checkpoint::read_config(dir).unwrap();
    assert_eq!(cfg.model_type, model_type);
    assert!(cfg.sliding_window.unwrap() < 40);
    let ids = tch::Tensor::arange(40, (tch::Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
    let logits = loaded.model.forward(&ids).unwrap();
    assert_eq!(logits.size()[..2], [1, 40]);
    assert_eq!(logits.isfinite().all().int64_value(&[]), 1, "{}", dir.display());
    // Not a dead model (norm scales of 0 in Gemma 4's `w` norms make every logit 0).
    assert!(logits.std(true).double_value(&[]) > 1e-4, "{}: constant logits", dir.display());
}

/// A running `align serve`, killed and reaped when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `align serve --model dir` answers one chat completion.
fn serve_one_request(dir: &Path) -> serde_json::Value {
    let mut serve = Serve(
        align_command(&["serve", "--model", dir.to_str().unwrap(), "--port", "0", "--device", "cpu"])
            .args(["--model-name", "m"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(serve.0.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "align serve exited before serving");
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    let body = r#"{"model": "m", "messages": [{"role": "user", "content": "Reverse: word1x7"}],
                   "max_tokens": 24, "temperature": 0}"#;
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let json = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_else(|| panic!("{raw}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {raw}"))
}

fn stages_run(preset: &str, model_type: &str, causal: &str, classifier: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tok = dir.join("tokenizer.json");
    tiny_corpus_tokenizer(&tok);

    // The base model, of the preset's family.
    let base = dir.join("base");
    let out = align(&[
        "init",
        "--preset",
        preset,
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        base.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(family_of(&base), (model_type.to_string(), causal.to_string()));
    let cfg = read_json(&base.join("config.json"));
    assert!(cfg["sliding_window"].as_i64().unwrap() < 48, "{cfg}");
    assert!(cfg["final_logit_softcapping"].as_f64().is_some(), "{cfg}");
    loads_back(&base, model_type);

    // SFT → reward → RL → judge.
    write_recipe(dir, &stages_recipe());
    let run = align_in(dir, &["run", "recipe.toml"]);
    let err = stderr(&run);
    assert!(run.status.success(), "{preset}: {err}");
    let o = dir.join("out");
    for stage in ["sft", "rm", "rl", "judge"] {
        assert!(err.contains(&format!("== {stage} done")), "{stage}: {err}");
        assert!(o.join(stage).join("manifest.json").exists(), "{stage}");
    }
    for (stage, arch) in [("sft", causal), ("rm", classifier), ("rl", causal)] {
        let m = o.join(stage).join("model");
        assert!(m.join("model.safetensors").exists(), "{stage}");
        assert_eq!(family_of(&m), (model_type.to_string(), arch.to_string()), "{stage}");
    }
    loads_back(&o.join("sft/model"), model_type);
    loads_back(&o.join("rl/model"), model_type);

    let sft = read_json(&o.join("sft/summary.json"));
    assert_eq!(sft["steps"], 3);
    finite(&sft["final_loss"], "sft final_loss");
    finite(&sft["eval_loss"], "sft eval_loss");
    let rm = read_json(&o.join("rm/summary.json"));
    assert_eq!(rm["steps"], 2);
    finite(&rm["final_loss"], "reward final_loss");
    let rl = read_json(&o.join("rl/summary.json"));
    assert_eq!(rl["steps"], 2);
    finite(&rl["final_kl"], "rl final_kl");
    let metrics = std::fs::read_to_string(o.join("rl/metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|m: &serde_json::Value| m["step"].is_number())
        .collect();
    assert_eq!(steps.len(), 2, "{metrics}");
    for m in &steps {
        finite(&m["loss"], "rl loss");
        finite(&m["reward_mean"], "rl reward_mean");
        // Rollouts longer than the window: the sliding layers' cache wraps.
        assert!(finite(&m["response_len"], "rl response_len") > 0.0);
    }
    let judge = read_json(&o.join("judge/summary.json"));
    let rate = finite(&judge["overall"]["win_rate"], "judge win_rate");
    assert!((0.0..=1.0).contains(&rate), "{judge}");
    assert!(o.join("judge/judgments.jsonl").exists());

    // serve: one request answered by the RL model.
    let reply = serve_one_request(&o.join("rl/model"));
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    assert!(reply["choices"][0]["message"]["content"].is_string(), "{reply}");
    // Greedy from a 3-step model may end at once: an answer, of any length.
    let finish = reply["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{reply}");
    let usage = &reply["usage"];
    assert!(usage["prompt_tokens"].as_i64().unwrap() > 0, "{reply}");
    assert_eq!(
        usage["total_tokens"].as_i64().unwrap(),
        usage["prompt_tokens"].as_i64().unwrap() + usage["completion_tokens"].as_i64().unwrap(),
        "{reply}"
    );
}

#[test]
fn stages_run_on_a_tiny_gemma2() {
    stages_run("tiny-gemma2", "gemma2", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification");
}

#[test]
fn stages_run_on_a_tiny_gemma3() {
    stages_run("tiny-gemma3", "gemma3_text", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification");
}

#[test]
fn stages_run_on_a_tiny_gemma4() {
    stages_run("tiny-gemma4", "gemma4_text", "Gemma4ForCausalLM", "Gemma4TextForSequenceClassification");
}
