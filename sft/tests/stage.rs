//! The SFT stage on the tiny transformers fixture model: the loss against a
//! hand computation, packing against padding, a smoke run, NaN handling.

mod common;

use common::fixture;
use lm::checkpoint;
use sft::batch::{make_batch, plan_epoch, Sequence};
use sft::{batch_loss, Mode, SftConfig};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Writes `n` reverse-the-word dialogues as JSONL.
fn write_data(dir: &Path, n: usize) -> PathBuf {
    let words = ["gemma", "align", "model", "reward", "policy", "judge", "token", "batch", "sort", "count"];
    let mut lines = vec![];
    for i in 0..n {
        let w = format!("{}{}", words[i % words.len()], i % 7);
        let r: String = w.chars().rev().collect();
        let v = serde_json::json!({"messages": [
            {"role": "user", "content": format!("Reverse the word: {w}")},
            {"role": "assistant", "content": r}]});
        lines.push(v.to_string());
    }
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn config(dir: &Path, data: &Path) -> SftConfig {
    let toml = format!(
        r#"
model = "{}"
output_dir = "{}"
max_seq_len = 64
batch_size = 4
max_steps = 12
seed = 3
device = "cpu"
[optim]
lr = 3e-3
warmup_steps = 2
[data]
seed = 1
held_out = {{ fraction = 0.1 }}
[[data.sources]]
name = "reverse"
path = "{}"
"#,
        fixture().display(),
        dir.join("out").display(),
        data.display()
    );
    let p = dir.join("sft.toml");
    std::fs::write(&p, toml).unwrap();
    SftConfig::from_toml_file(&p).unwrap()
}

fn seqs(tok: &lm::Tokenizer) -> Vec<Sequence> {
    let convs = [
        vec![lm::Message::user("Reverse: abc"), lm::Message::model("cba")],
        vec![
            lm::Message::user("Add 2 and 3"),
            lm::Message::model("5"),
            lm::Message::user("and 4?"),
            lm::Message::model("9"),
        ],
    ];
    convs
        .iter()
        .map(|c| {
            let e = lm::chat::encode(tok, c, false).unwrap();
            Sequence::from_ids(&e.ids, &e.loss_mask).unwrap()
        })
        .collect()
}

#[test]
fn stage_loss_equals_a_hand_computation_on_two_examples() {
    let m = checkpoint::load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let s = seqs(&m.tokenizer);
    let batch = make_batch(&s, &[vec![0], vec![1]], m.tokenizer.special.pad, Device::Cpu).unwrap();
    let got = tch::no_grad(|| batch_loss(&m.model, &batch, batch.trained as f64).unwrap()).double_value(&[]);
    // By hand: each example alone, −log softmax at every trained position,
    // summed over both examples and divided by the number of trained tokens.
    let (mut sum, mut n) = (0.0, 0);
    for q in &s {
        let logits = tch::no_grad(|| m.model.forward(&Tensor::from_slice(&q.input).unsqueeze(0)).unwrap())
            .squeeze_dim(0);
        let lp = logits.log_softmax(-1, Kind::Float);
        for (i, (&t, &k)) in q.target.iter().zip(&q.mask).enumerate() {
            if k {
                sum -= lp.double_value(&[i as i64, t]);
                n += 1;
            }
        }
    }
    assert_eq!(n, batch.trained);
    assert!(n >= 6, "both model turns and their <end_of_turn>\\n are trained");
    assert!((got - sum / n as f64).abs() < 1e-5, "{got} vs {}", sum / n as f64);
}

fn grads(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, t)| (k, t.grad().copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn packed_and_padded_batches_give_the_same_loss_and_gradients() {
    let m = checkpoint::load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let s = seqs(&m.tokenizer);
    let pad = m.tokenizer.special.pad;
    let padded = make_batch(&s, &[vec![0], vec![1]], pad, Device::Cpu).unwrap();
    let packed = make_batch(&s, &[vec![0, 1]], pad, Device::Cpu).unwrap();
    assert_eq!(packed.input.size()[0], 1);
    let n = padded.trained as f64;
    let l1 = batch_loss(&m.model, &padded, n).unwrap();
    l1.backward();
    let g1 = grads(&m.vs);
    for (_, mut t) in m.vs.variables() {
        t.zero_grad();
    }
    let l2 = batch_loss(&m.model, &packed, n).unwrap();
    l2.backward();
    let g2 = grads(&m.vs);
    assert!((l1.double_value(&[]) - l2.double_value(&[])).abs() < 1e-5);
    for ((name, a), (_, b)) in g1.iter().zip(&g2) {
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d < 1e-5, "gradient of {name} differs by {d}");
    }
}

/// The first step's loss by hand: the examples of the run's first batch
/// (its epoch plan), each alone through the initial model, −log softmax at
/// every trained position, averaged over the trained tokens.
fn first_loss_by_hand(cfg: &SftConfig, base: &Path) -> f64 {
    let m = checkpoint::load_causal_lm(&cfg.stage.model, Device::Cpu, Kind::Float).unwrap();
    let (data, sampler) = sft::load_data(cfg, &m.tokenizer, base).unwrap();
    let order = sft::stage::epoch_order(&data, &sampler, 0, cfg.stage.seed);
    let plan = plan_epoch(&data.train, &order, cfg.batch_size, cfg.max_seq_len, cfg.packing, cfg.stage.seed);
    let (mut sum, mut n) = (0.0, 0);
    for &i in plan[..cfg.grad_accum].iter().flatten().flatten() {
        let q = &data.train[i];
        let x = Tensor::from_slice(&q.input).unsqueeze(0);
        let lp = tch::no_grad(|| m.model.forward(&x).unwrap()).squeeze_dim(0).log_softmax(-1, Kind::Float);
        for (j, (&t, &k)) in q.target.iter().zip(&q.mask).enumerate() {
            if k {
                sum -= lp.double_value(&[j as i64, t]);
                n += 1;
            }
        }
    }
    assert!(n > 0);
    sum / n as f64
}

#[test]
fn smoke_run_lowers_the_loss_and_the_first_loss_is_the_hand_computed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 80);
    let cfg = config(tmp.path(), &data);
    assert_eq!(cfg.mode, Mode::Chat);
    let s = sft::run(&cfg, tmp.path()).unwrap();
    assert_eq!(s.steps, 12);
    assert!(s.final_loss < s.first_losses[0] * 0.8, "{:?} → {}", s.first_losses, s.final_loss);
    // The first loss is the initial model's on the first planned batch, by
    // hand (the same machine computes both: the tolerance covers only the
    // batched against the one-example forward, not another BLAS).
    let want = first_loss_by_hand(&cfg, tmp.path());
    let got = s.first_losses[0];
    assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "first loss {got}, by hand {want}");
    let out = tmp.path().join("out");
    for f in ["metrics.jsonl", "summary.json", "loss.png", "model/config.json", "model/model.safetensors"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let metrics = lm::train::read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.iter().filter(|m| m.get("loss").is_some()).count(), 12);
    assert!(metrics.iter().any(|m| m.get("eval_loss").is_some()));
    assert!(s.eval_loss.unwrap().is_finite() && s.eval_examples == 8);
    // The final model loads as a causal LM.
    checkpoint::load_causal_lm(&s.model_dir, Device::Cpu, Kind::Float).unwrap();
}

#[test]
fn non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 40);
    let mut cfg = config(tmp.path(), &data);
    // Adam moves each weight by about lr per step: 1e30 is finite after the
    // first step (saved), and overflows the logits at the next.
    cfg.stage.optim.lr = 1e30;
    cfg.stage.optim.warmup_steps = 0;
    cfg.stage.optim.grad_clip = 0.0;
    cfg.max_steps = 30;
    cfg.stage.save_every = 1;
    let e = format!("{:#}", sft::run(&cfg, tmp.path()).unwrap_err());
    assert!(e.contains("non-finite loss") || e.contains("non-finite gradient norm"), "{e}");
    let ckpts = lm::train::list_checkpoints(&tmp.path().join("out/checkpoints")).unwrap();
    assert!(!ckpts.is_empty());
    let (step, last) = ckpts.last().unwrap();
    // The error names the checkpoint that was kept, and the step after it.
    assert!(e.contains(&format!("last good checkpoint is {}", last.display())), "{e}");
    assert!(e.contains(&format!("at step {}", step + 1)), "{e}");
    // ... and that checkpoint is good: every weight and moment is finite,
    // and it loads as a model.
    let tensors = checkpoint::read_tensors(last).unwrap();
    assert!(!tensors.is_empty());
    for (name, t) in &tensors {
        assert!(bool::try_from(t.isfinite().all()).unwrap(), "{name} in {} is not finite", last.display());
    }
    let (_, moments) = lm::train::read_checkpoint_state(last).unwrap();
    for (name, t) in &moments {
        assert!(bool::try_from(t.isfinite().all()).unwrap(), "optimizer {name} is not finite");
    }
    checkpoint::load_causal_lm(last, Device::Cpu, Kind::Float).unwrap();
    assert!(!tmp.path().join("out/model").exists(), "no final model after a failed run");

    // A step that leaves inf weights (lr 1e38 overflows them at once) is
    // never saved as a checkpoint: the run stops naming the step.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &data);
    cfg.stage.optim.lr = 1e38;
    cfg.stage.optim.warmup_steps = 0;
    cfg.stage.optim.grad_clip = 0.0;
    cfg.stage.save_every = 1;
    let e = format!("{:#}", sft::run(&cfg, tmp.path()).unwrap_err());
    assert!(e.contains("non-finite weights after step 1"), "{e}");
    assert!(e.contains("model.embed_tokens.weight"), "{e}");
    assert!(e.contains("last good checkpoint is none"), "{e}");
    assert!(lm::train::list_checkpoints(&tmp.path().join("out/checkpoints")).unwrap().is_empty());
}

#[test]
fn pretrain_mode_trains_on_every_token_of_plain_text() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        (0..60)
            .map(|i| format!("the quick brown fox {i} jumps over the lazy dog"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let toml = format!(
        "model = \"{}\"\noutput_dir = \"{}\"\nmode = \"pretrain\"\ntext_files = [\"{}\"]\nmax_seq_len = 32\nbatch_size = 4\nmax_steps = 6\npacking = true\ndevice = \"cpu\"\neval_fraction = 0.1\n[optim]\nlr = 3e-3\n",
        fixture().display(),
        tmp.path().join("out").display(),
        text.display()
    );
    let p = tmp.path().join("pt.toml");
    std::fs::write(&p, toml).unwrap();
    let cfg = SftConfig::from_toml_file(&p).unwrap();
    let s = sft::run(&cfg, tmp.path()).unwrap();
    assert_eq!(s.steps, 6);
    assert!(s.final_loss < s.first_losses[0]);
    assert_eq!(s.eval_examples, 6);
}

#[test]
fn unknown_config_keys_are_errors_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.toml");
    std::fs::write(&p, "model = \"m\"\noutput_dir = \"o\"\nbatch_sise = 4\n").unwrap();
    let e = format!("{:#}", SftConfig::from_toml_file(&p).unwrap_err());
    assert!(e.contains("batch_sise"), "{e}");
    std::fs::write(&p, "model = \"m\"\noutput_dir = \"o\"\n[optim]\nlr = \"fast\"\n").unwrap();
    let e = format!("{:#}", SftConfig::from_toml_file(&p).unwrap_err());
    assert!(e.contains("invalid type: string \"fast\"") && e.contains("optim.lr"), "{e}");
}

#[test]
fn bf16_training_with_fp32_masters_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 80);
    let mut cfg = config(tmp.path(), &data);
    cfg.stage.dtype = "bf16".into();
    let s = sft::run(&cfg, tmp.path()).unwrap();
    assert!(s.final_loss < s.first_losses[0] * 0.8, "{:?} → {}", s.first_losses, s.final_loss);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.model_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["torch_dtype"], "bfloat16");
    let (_, opt) = lm::train::read_checkpoint_state(
        &lm::train::list_checkpoints(&tmp.path().join("out/checkpoints")).unwrap()[0].1,
    )
    .unwrap();
    assert!(opt.keys().any(|k| k.ends_with(".master")));
    assert!(opt.values().all(|t| t.kind() == Kind::Float));
}

#[test]
fn summary_records_what_each_filter_removed_and_the_skipped_bad_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 40); // lines 1..=40, all distinct
    let mut text = std::fs::read_to_string(&data).unwrap();
    let first = text.lines().next().unwrap().to_string();
    let long = serde_json::json!({"messages": [
        {"role": "user", "content": format!("Reverse the words: {}", "word ".repeat(40))},
        {"role": "assistant", "content": "drow"}]});
    let user_user = serde_json::json!({"messages": [
        {"role": "user", "content": "Reverse the word: abc"},
        {"role": "user", "content": "please"},
        {"role": "assistant", "content": "cba"}]});
    let no_content = serde_json::json!({"messages": [
        {"role": "user", "content": "Reverse the word: abc"}, {"role": "assistant"}]});
    // Lines 41–43 repeat line 1, 44 is too long, 45 and 46 are bad rows.
    for extra in
        [first.clone(), first.clone(), first, long.to_string(), user_user.to_string(), no_content.to_string()]
    {
        text.push('\n');
        text.push_str(&extra);
    }
    std::fs::write(&data, text).unwrap();
    let mut cfg = config(tmp.path(), &data);
    cfg.max_steps = 2;
    let mix = cfg.data.as_mut().unwrap();
    mix.on_bad_row = datasets::OnBadRow::Skip;
    mix.filters = Some(datasets::FilterConfig {
        length: Some(datasets::LengthConfig { max: Some(30), ..Default::default() }),
        exact_dedup: Some(Default::default()),
        keep_removed: true,
        ..Default::default()
    });
    let s = sft::run(&cfg, tmp.path()).unwrap();
    assert_eq!(s.steps, 2);

    let out = tmp.path().join("out");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let d = &summary["data"];
    assert_eq!(d["filters"]["input"], 44);
    assert_eq!(d["filters"]["kept"], 40);
    assert_eq!(d["filters"]["removed"], 4);
    assert_eq!(
        d["filters"]["removed_by"],
        serde_json::json!([{"filter": "length", "removed": 1}, {"filter": "exact_dedup", "removed": 3}])
    );
    assert_eq!(d["skipped_bad_rows"], 2);
    let bad = d["bad_rows"].as_array().unwrap();
    assert_eq!(bad.len(), 2);
    assert_eq!(bad[0]["file"], data.display().to_string());
    assert_eq!((bad[0]["unit"].as_str(), bad[0]["number"].as_u64()), (Some("line"), Some(45)));
    assert_eq!(bad[0]["field"], "messages[1].role");
    assert!(
        bad[0]["reason"].as_str().unwrap().contains("expected a model/assistant turn after a user turn"),
        "{bad:?}"
    );
    assert_eq!(
        (bad[1]["number"].as_u64(), bad[1]["field"].as_str()),
        (Some(46), Some("messages[1].content"))
    );
    // The per-source counts agree.
    assert_eq!(summary["sources"][0]["filtered_out"], 4);
    assert_eq!(summary["sources"][0]["skipped_bad_rows"], 2);
    // The removed rows are written for review, each with its filter and reason.
    assert_eq!(d["removed_rows_file"], out.join(sft::FILTERED_OUT_FILE).display().to_string());
    let removed: Vec<serde_json::Value> = std::fs::read_to_string(out.join(sft::FILTERED_OUT_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<(&str, u64)> =
        removed.iter().map(|r| (r["filter"].as_str().unwrap(), r["row"].as_u64().unwrap())).collect();
    assert_eq!(got, vec![("exact_dedup", 41), ("exact_dedup", 42), ("exact_dedup", 43), ("length", 44)]);
    // What the stage prints at its end.
    let shown = s.data.to_string();
    assert!(shown.contains("filters: 44 rows in, 40 kept, 4 removed"), "{shown}");
    assert!(shown.contains("exact_dedup") && shown.contains("3 removed"), "{shown}");
    assert!(shown.contains("bad rows skipped: 2"), "{shown}");
    assert!(shown.contains(&format!("{}: line 45, field `messages[1].role`", data.display())), "{shown}");
}

#[test]
fn only_settings_that_shape_training_are_in_the_config_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 8);
    let mut c = config(tmp.path(), &data);
    let h = c.hash().unwrap();
    c.stage.save_every = 7;
    c.stage.eval_every = 5;
    c.stage.keep_last = 9;
    assert_eq!(c.hash().unwrap(), h, "where a run saves, evaluates and what it keeps may change on resume");
    c.stage.optim.lr *= 2.0;
    assert_ne!(c.hash().unwrap(), h);
}
