//! SFT with LoRA on the tiny transformers fixture model, through the shared
//! training loop: what is trained, what is written (a PEFT adapter and the
//! merged model), resume after an interruption, activation checkpointing.

mod common;

use common::{fixture, write_data};
use lm::checkpoint;
use lm::peft::TaskType;
use lm::train::session::{Trainable, Updater};
use sft::SftConfig;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// A LoRA SFT config writing to `dir/out_name`; `extra` lines go at the top level.
fn config(dir: &Path, out_name: &str, extra: &str) -> SftConfig {
    let data = write_data(dir, 40);
    let steps = if extra.contains("max_steps") { "" } else { "max_steps = 6" };
    let toml = format!(
        r#"
model = "{}"
output_dir = "{}"
max_seq_len = 64
batch_size = 4
grad_accum = 2
{steps}
seed = 5
device = "cpu"
{extra}
[optim]
lr = 1e-2
warmup_steps = 1
[lora]
rank = 4
alpha = 8
[data]
seed = 1
[[data.sources]]
name = "reverse"
path = "{}"
"#,
        fixture().display(),
        dir.join(out_name).display(),
        data.display()
    );
    let p = dir.join(format!("{out_name}.toml"));
    std::fs::write(&p, toml).unwrap();
    SftConfig::from_toml_file(&p).unwrap()
}

fn adapter_tensors(out: &Path) -> std::collections::BTreeMap<String, Tensor> {
    lm::peft::load_adapter(&out.join("adapter")).unwrap().tensors
}

#[test]
fn only_the_adapters_are_trained_and_b_starts_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "out", "");
    let loaded = checkpoint::load_causal_lm(&cfg.stage.model, Device::Cpu, Kind::Float).unwrap();
    let mut model = loaded.model;
    let base_logits =
        tch::no_grad(|| model.forward(&Tensor::from_slice(&[2i64, 5, 9, 11]).view([1, 4]))).unwrap();
    let mut t = Trainable::prepare(loaded.vs, &mut model, &cfg.stage, TaskType::CausalLm).unwrap();
    let up = Updater::new(&mut t, &cfg.stage.optim).unwrap();
    // all-linear: 7 projections per layer, A and B each.
    let layers = model.cfg.num_hidden_layers as usize;
    let names = up.opt.names();
    assert_eq!(names.len(), 2 * 7 * layers, "{names:?}");
    assert!(
        names.iter().all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")),
        "{names:?}"
    );
    assert!(t.base.variables().values().all(|v| !v.requires_grad()), "the base is frozen");
    // B = 0: step 0 computes exactly the base model.
    let logits = tch::no_grad(|| model.forward(&Tensor::from_slice(&[2i64, 5, 9, 11]).view([1, 4]))).unwrap();
    assert!(logits.equal(&base_logits));
}

#[test]
fn a_lora_run_writes_a_peft_adapter_and_the_merged_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "out", "");
    let s = sft::run(&cfg, dir.path()).unwrap();
    assert_eq!(s.steps, 6);
    assert!(s.final_loss < s.first_losses[0], "{:?} → {}", s.first_losses, s.final_loss);
    let out = &cfg.stage.output_dir;
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["task_type"], "CAUSAL_LM");
    assert_eq!(ac["r"], 4);
    assert_eq!(ac["base_model_name_or_path"], fixture().display().to_string());
    // The merged model equals the base with the trained adapter attached.
    let ids = Tensor::from_slice(&[2i64, 7, 3, 12, 20, 5]).view([1, 6]);
    let merged = checkpoint::load_causal_lm(&out.join("model"), Device::Cpu, Kind::Float).unwrap();
    let mut base = checkpoint::load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let adapters = nn::VarStore::new(Device::Cpu);
    let file = lm::peft::load_adapter(&out.join("adapter")).unwrap();
    base.model.attach_lora(&adapters.root(), &file.config, 0).unwrap();
    base.model.load_adapter_tensors(&file.tensors, &out.join("adapter")).unwrap();
    let (a, b) = tch::no_grad(|| (merged.model.forward(&ids).unwrap(), base.model.forward(&ids).unwrap()));
    // Within 1e-5 relative to the logits' scale (a few f32 ulps).
    let scale = a.abs().max().double_value(&[]).max(1.0);
    let diff = (a - b).abs().max().double_value(&[]);
    assert!(diff < 1e-5 * scale, "merged vs base + adapter: {diff} (logits up to {scale})");
    // Training checkpoints are adapters too, not copies of the base.
    let ckpts = lm::train::list_checkpoints(&out.join("checkpoints")).unwrap();
    let (_, last) = ckpts.last().unwrap();
    assert!(last.join("adapter_model.safetensors").exists() && !last.join("model.safetensors").exists());
}

#[test]
fn an_interrupted_lora_run_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let whole = config(dir.path(), "whole", "save_every = 2\nkeep_last = 5");
    sft::run(&whole, dir.path()).unwrap();
    let want = adapter_tensors(&whole.stage.output_dir);

    // The same run, cut after its step-2 checkpoint as a kill would leave it.
    let cut = config(dir.path(), "cut", "save_every = 2\nkeep_last = 5");
    sft::run(&cut, dir.path()).unwrap();
    let out = &cut.stage.output_dir;
    for name in ["summary.json", "model", "adapter"] {
        let p = out.join(name);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    for (step, d) in lm::train::list_checkpoints(&out.join("checkpoints")).unwrap() {
        if step > 2 {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
    let s = sft::run(&cut, dir.path()).unwrap();
    assert_eq!(s.resumed_from, Some(2));
    let got = adapter_tensors(out);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (k, v) in &want {
        assert!(got[k].equal(v), "{k} differs after the resume");
    }
}

#[test]
fn activation_checkpointing_trains_the_same_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let plain = config(dir.path(), "plain", "max_steps = 3");
    let ckpt = config(dir.path(), "ckpt", "max_steps = 3\ngradient_checkpointing = true");
    let a = sft::run(&plain, dir.path()).unwrap();
    let b = sft::run(&ckpt, dir.path()).unwrap();
    for (x, y) in a.first_losses.iter().zip(&b.first_losses) {
        assert!((x - y).abs() < 1e-5, "losses {:?} vs {:?}", a.first_losses, b.first_losses);
    }
    let (ta, tb) = (adapter_tensors(&plain.stage.output_dir), adapter_tensors(&ckpt.stage.output_dir));
    for (k, v) in &ta {
        let d = (v - &tb[k]).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{k}: {d}");
    }
}

#[test]
fn a_stage_starts_from_an_adapter_made_by_peft() {
    let dir = tempfile::tempdir().unwrap();
    let peft_dir = fixture().join("../peft/causal");
    let mut cfg = config(dir.path(), "out", "");
    cfg.stage.lora = None;
    cfg.stage.adapter = Some(peft_dir.clone());
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft_dir.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<Vec<i64>> = serde_json::from_value(expected["input_ids"].clone()).unwrap();
    let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    let loaded = checkpoint::load_causal_lm(&cfg.stage.model, Device::Cpu, Kind::Float).unwrap();
    let mut model = loaded.model;
    let t = Trainable::prepare(loaded.vs, &mut model, &cfg.stage, TaskType::CausalLm).unwrap();
    // The adapter's own config (r = 4, alpha 8, five projections) was taken.
    let l = t.lora.as_ref().unwrap();
    assert_eq!((l.cfg.rank, l.cfg.alpha), (4, 8.0));
    let flat: Vec<i64> = ids.concat();
    let x = Tensor::from_slice(&flat).view([ids.len() as i64, ids[0].len() as i64]);
    let got = tch::no_grad(|| model.forward(&x)).unwrap();
    let want = Tensor::from_slice(&want.concat().concat()).view(got.size().as_slice());
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "logits of base + peft's adapter differ by {diff}");
    // A [lora] table that disagrees with the adapter is refused.
    let mut bad = cfg.clone();
    bad.stage.lora = Some(lm::lora::LoraConfig { rank: 8, ..Default::default() });
    let loaded = checkpoint::load_causal_lm(&cfg.stage.model, Device::Cpu, Kind::Float).unwrap();
    let mut model = loaded.model;
    let e = Trainable::prepare(loaded.vs, &mut model, &bad.stage, TaskType::CausalLm).err().unwrap();
    assert!(e.to_string().contains("rank 8") && e.to_string().contains("rank 4"), "{e}");
    // And the stage trains from it.
    let s = sft::run(&cfg, dir.path()).unwrap();
    assert_eq!(s.steps, 6);
    let saved = lm::peft::load_adapter(&cfg.stage.output_dir.join("adapter")).unwrap();
    assert_eq!(saved.config.rank, 4);
}

#[test]
fn bad_lora_settings_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "out", "");
    cfg.stage.lora = None;
    cfg.stage.base_dtype = Some("bf16".into());
    let e = sft::run(&cfg, dir.path()).unwrap_err().to_string();
    assert!(e.contains("base_dtype = \"bf16\" is for LoRA"), "{e}");
    cfg.stage.base_dtype = None;
    cfg.stage.adapter = Some(dir.path().join("no-such-adapter"));
    let e = sft::run(&cfg, dir.path()).unwrap_err().to_string();
    assert!(e.contains("no adapter_config.json there"), "{e}");
    assert!(!cfg.stage.output_dir.exists(), "the output directory was created");
}
