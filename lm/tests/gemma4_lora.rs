//! LoRA on Gemma 4 with per-layer inputs, against peft: PEFT's
//! `target_modules="all-linear"` on Gemma4ForCausalLM adapts the seven
//! projections and also `model.layers.N.per_layer_input_gate`,
//! `model.layers.N.per_layer_projection` and `model.per_layer_model_projection`
//! (every `nn.Linear` but `lm_head`). The fixture lm/tests/fixtures/gemma4-lora
//! (scripts/make_gemma4_lora_fixture.py; committed, no Python at test time)
//! is such an adapter made by peft over lm/tests/fixtures/gemma4, its B
//! matrices random, with the adapted model's logits. Here: it loads with
//! peft's logits (1e-4), merges into a checkpoint with the same logits,
//! align's save of it holds the same tensors under the same names; align's
//! own "all-linear" adapts, trains and counts the three per-layer
//! projections; a module the model lacks is an error naming it; activation
//! checkpointing draws the per-layer adapters' dropout the same.

mod common;
use common::*;
use lm::lora::{LoraConfig, TargetModules, ALL_LINEAR_MODULES, PER_LAYER_INPUT_MODULES};
use lm::peft::{self, TaskType};
use lm::train::{AdamW, OptimConfig};
use lm::{Gemma, GemmaConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use tch::{nn, Device, Kind, Tensor};

const BASE: &str = "gemma4";
const ADAPTER: &str = "gemma4-lora";
/// Tolerance on the logits (f32; the fixture's f32 noise is about 2e-5).
const TOL: f64 = 1e-4;

fn adapter_dir() -> PathBuf {
    fixture_dir(ADAPTER)
}

/// The fixture's prompts (B, T) and peft's logits (B, T, V).
fn prompts_and_logits() -> (Tensor, Tensor) {
    let e = expected(ADAPTER);
    let rows = e["input_ids"].as_array().unwrap();
    let flat: Vec<i64> = rows.iter().flat_map(ids).collect();
    let x = Tensor::from_slice(&flat).view([rows.len() as i64, -1]);
    let want = Tensor::from_slice(&floats(&e["logits"])).view([x.size()[0], x.size()[1], -1]);
    (x, want)
}

/// The gemma4 fixture with peft's adapter attached and loaded.
fn with_peft_adapter() -> (lm::checkpoint::Loaded, nn::VarStore, peft::AdapterFile) {
    let file = peft::load_adapter(&adapter_dir()).unwrap();
    let mut m = load(BASE);
    let adapters = nn::VarStore::new(Device::Cpu);
    m.model.attach_lora(&adapters.root(), &file.config, 0).unwrap();
    m.model.load_adapter_tensors(&file.tensors, &adapter_dir()).unwrap();
    (m, adapters, file)
}

fn lora_cfg(targets: TargetModules, dropout: f64) -> LoraConfig {
    LoraConfig { rank: 3, alpha: 6.0, dropout, target_modules: targets }
}

fn list(names: &[&str]) -> TargetModules {
    TargetModules::List(names.iter().map(|s| s.to_string()).collect())
}

#[test]
fn a_peft_all_linear_adapter_loads_with_peft_logits() {
    let _serial = serial(); // torch's generator is global
    let (m, _adapters, file) = with_peft_adapter();
    assert_eq!(file.task_type, TaskType::CausalLm);
    assert_eq!((file.config.rank, file.config.alpha), (4, 6.0));
    // peft's "all-linear", resolved on the model and saved as a list: the
    // seven projections and the three per-layer-input ones.
    assert_eq!(file.config.target_modules.resolve().unwrap(), ALL_LINEAR_MODULES);
    assert_eq!(m.model.lora_modules(), ALL_LINEAR_MODULES);
    let e = expected(ADAPTER);
    let peft_modules: BTreeSet<String> =
        e["adapted_modules"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let ours: BTreeSet<String> = m
        .model
        .adapter_tensors()
        .keys()
        .map(|k| {
            k.strip_suffix(".lora_A.weight").or_else(|| k.strip_suffix(".lora_B.weight")).unwrap().to_string()
        })
        .collect();
    assert_eq!(ours, peft_modules, "align adapts exactly the modules peft's all-linear adapted");
    assert_eq!(ours.len(), 50);
    for name in [
        "model.layers.3.per_layer_input_gate",
        "model.layers.5.per_layer_projection",
        "model.per_layer_model_projection",
    ] {
        assert!(ours.contains(name), "{name}");
    }

    let (x, want) = prompts_and_logits();
    let got = tch::no_grad(|| m.model.forward(&x).unwrap());
    let d = max_abs_diff(&got, &want);
    eprintln!("gemma4 + peft all-linear adapter: max |Δlogit| against peft = {d:e}");
    assert!(d < TOL, "max |Δlogit| = {d}");
    // The adapter matters, and so does its per-layer-input part alone.
    let base = tch::no_grad(|| {
        let _off = m.model.adapters_disabled();
        m.model.forward(&x).unwrap()
    });
    assert!(max_abs_diff(&base, &want) > 1e-1);
    tch::no_grad(|| {
        for (name, l) in m.model.linears() {
            if PER_LAYER_INPUT_MODULES.iter().any(|p| name.ends_with(p)) {
                let _ = l.lora.as_ref().unwrap().lora_b.shallow_clone().zero_();
            }
        }
    });
    let without = tch::no_grad(|| m.model.forward(&x).unwrap());
    assert!(max_abs_diff(&without, &want) > 1e-2, "the per-layer-input adapters change the logits");
}

#[test]
fn the_peft_adapter_merges_into_a_checkpoint_with_its_logits() {
    let _serial = serial(); // torch's generator is global
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let r = peft::merge_dirs(&fixture_dir(BASE), &adapter_dir(), &out, None).unwrap();
    assert_eq!((r.task_type, r.merged, r.kind), (TaskType::CausalLm, 50, Kind::Float));
    let merged = load_dir(&out);
    let (x, want) = prompts_and_logits();
    let got = tch::no_grad(|| merged.model.forward(&x).unwrap());
    let d = max_abs_diff(&got, &want);
    eprintln!("merged gemma4 + peft all-linear adapter: max |Δlogit| against peft = {d:e}");
    assert!(d < TOL, "merged: max |Δlogit| = {d}");
    // The merged per-layer-input weights are W + s·B A.
    let (m, _a, file) = with_peft_adapter();
    let name = "model.per_layer_model_projection";
    let w = m.model.model.per_layer_model_projection.as_ref().unwrap().weight.detach();
    let (a, b) =
        (&file.tensors[&format!("{name}.lora_A.weight")], &file.tensors[&format!("{name}.lora_B.weight")]);
    let want_w = w + b.matmul(a) * file.config.scaling();
    let got_w = merged.model.model.per_layer_model_projection.as_ref().unwrap().weight.detach();
    assert!(max_abs_diff(&got_w, &want_w) < 1e-6);
}

fn load_dir(dir: &std::path::Path) -> lm::checkpoint::Loaded {
    lm::checkpoint::load_causal_lm(dir, Device::Cpu, Kind::Float).unwrap()
}

#[test]
fn align_saves_the_adapter_as_peft_did_and_reads_it_back() {
    let _serial = serial(); // torch's generator is global
    let (m, adapters, file) = with_peft_adapter();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    peft::save_adapter(&dir, &adapters, &file.config, "lm/tests/fixtures/gemma4", TaskType::CausalLm, &[])
        .unwrap();
    // The same tensors under the same (PEFT) names, bit for bit.
    let theirs = lm::checkpoint::read_tensors_file(&adapter_dir().join(peft::ADAPTER_WEIGHTS)).unwrap();
    let ours = lm::checkpoint::read_tensors_file(&dir.join(peft::ADAPTER_WEIGHTS)).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    assert!(ours.contains_key("base_model.model.model.per_layer_model_projection.lora_A.weight"));
    assert!(ours.contains_key("base_model.model.model.layers.0.per_layer_input_gate.lora_B.weight"));
    for (k, t) in &theirs {
        assert!(ours[k].equal(t), "{k}");
    }
    // target_modules: the same set of names as peft wrote.
    let modules = |d: &std::path::Path| -> BTreeSet<String> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join(peft::ADAPTER_CONFIG)).unwrap()).unwrap();
        v["target_modules"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(modules(&dir), modules(&adapter_dir()));
    // Read back: the same tensors and logits.
    let back = peft::load_adapter(&dir).unwrap();
    assert_eq!(back.config, file.config);
    assert_eq!(back.tensors.keys().collect::<Vec<_>>(), file.tensors.keys().collect::<Vec<_>>());
    for (k, t) in &back.tensors {
        assert!(t.equal(&file.tensors[k]), "{k}");
    }
    let mut fresh = load(BASE);
    let v2 = nn::VarStore::new(Device::Cpu);
    fresh.model.attach_lora(&v2.root(), &back.config, 0).unwrap();
    fresh.model.load_adapter_tensors(&back.tensors, &dir).unwrap();
    let (x, _) = prompts_and_logits();
    let (a, b) = tch::no_grad(|| (m.model.forward(&x).unwrap(), fresh.model.forward(&x).unwrap()));
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// A random tiny Gemma 4 (the fixture's config: per-layer inputs, KV sharing, k = v).
fn tiny_gemma4(vs: &nn::VarStore) -> Gemma {
    let cfg = GemmaConfig::from_file(&fixture_dir(BASE).join("config.json")).unwrap();
    tch::manual_seed(3);
    Gemma::new(&vs.root(), &cfg).unwrap()
}

#[test]
fn all_linear_in_align_adapts_trains_and_counts_the_per_layer_projections() {
    let _serial = serial(); // torch's generator is global
    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = tiny_gemma4(&vs);
    let adapters = nn::VarStore::new(Device::Cpu);
    let cfg = lora_cfg(TargetModules::default(), 0.0);
    model.attach_lora(&adapters.root(), &cfg, 7).unwrap();
    let t = model.adapter_tensors();
    let layers = model.model.layers.len();
    for i in 0..layers {
        for m in ["per_layer_input_gate", "per_layer_projection"] {
            for ab in ["A", "B"] {
                assert!(t.contains_key(&format!("model.layers.{i}.{m}.lora_{ab}.weight")), "layer {i} {m}");
            }
        }
    }
    assert!(t.contains_key("model.per_layer_model_projection.lora_A.weight"));
    assert!(!t.keys().any(|k| k.starts_with("lm_head")));
    assert_eq!(t.len(), 2 * 50);
    // Counted in the trainable parameters: r · (in + out) per module.
    let want: i64 = model
        .linears()
        .iter()
        .map(|(_, l)| {
            let s = l.weight.size();
            cfg.rank * (s[0] + s[1])
        })
        .sum();
    let opt = AdamW::new(&adapters, &OptimConfig::default());
    assert_eq!(opt.num_elements(), want);
    assert_eq!(opt.num_params(), 100);
    assert!(opt.names().contains(&"model.per_layer_model_projection.lora_B.weight"));
    assert!(vs.variables().values().all(|v| !v.requires_grad()), "the base is frozen");

    // Gradients reach the per-layer adapters (B starts at zero: its gradient
    // is the one that moves), through Linear's LoRA path.
    let x = Tensor::from_slice(&[2i64, 40, 41, 42, 43, 44, 45, 46]).unsqueeze(0);
    let loss = model.forward(&x).unwrap().square().mean(Kind::Float);
    loss.backward();
    for name in [
        "model.layers.0.per_layer_input_gate.lora_B.weight",
        "model.layers.4.per_layer_projection.lora_B.weight",
        "model.per_layer_model_projection.lora_B.weight",
    ] {
        let g = t[name].grad();
        assert!(g.defined() && g.abs().max().double_value(&[]) > 0.0, "{name} gets a gradient");
    }

    // Saved under PEFT's names, with the ten module names, and read back.
    let tmp = tempfile::tempdir().unwrap();
    peft::save_adapter(tmp.path(), &adapters, &cfg, "base", TaskType::CausalLm, &[]).unwrap();
    let back = peft::load_adapter(tmp.path()).unwrap();
    assert_eq!(back.config.target_modules.resolve().unwrap(), ALL_LINEAR_MODULES);
    assert_eq!(back.tensors.len(), 100);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(peft::ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(v["target_modules"], serde_json::json!(ALL_LINEAR_MODULES));
}

#[test]
fn explicit_lists_may_name_the_per_layer_projections_and_missing_modules_are_named() {
    let _serial = serial(); // torch's generator is global
    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = tiny_gemma4(&vs);
    let adapters = nn::VarStore::new(Device::Cpu);
    let cfg = lora_cfg(list(&["per_layer_model_projection", "q_proj", "per_layer_input_gate"]), 0.0);
    model.attach_lora(&adapters.root(), &cfg, 1).unwrap();
    let modules: BTreeSet<String> =
        model.adapter_tensors().keys().map(|k| k.split(".lora_").next().unwrap().to_string()).collect();
    let layers = model.model.layers.len();
    assert_eq!(modules.len(), 2 * layers + 1, "{modules:?}");
    assert!(modules.iter().all(|m| m.ends_with("q_proj")
        || m.ends_with("per_layer_input_gate")
        || m == "model.per_layer_model_projection"));

    // A model without per-layer inputs (Gemma 2) has no such module.
    let mut g2 = load("gemma2");
    let a2 = nn::VarStore::new(Device::Cpu);
    let e = format!("{:#}", g2.model.attach_lora(&a2.root(), &cfg, 1).unwrap_err());
    assert!(
        e.contains("no \"per_layer_input_gate\", \"per_layer_model_projection\" modules")
            && e.contains("per-layer"),
        "{e}"
    );
    // "all-linear" there is the seven projections.
    g2.model.attach_lora(&a2.root(), &lora_cfg(TargetModules::default(), 0.0), 1).unwrap();
    assert_eq!(g2.model.lora_modules(), lm::lora::LINEAR_MODULES);
    // peft's Gemma 4 adapter on a Gemma 2 model: an error naming the modules.
    let file = peft::load_adapter(&adapter_dir()).unwrap();
    let mut g2 = load("gemma2");
    let a3 = nn::VarStore::new(Device::Cpu);
    let e = format!("{:#}", g2.model.attach_lora(&a3.root(), &file.config, 0).unwrap_err());
    assert!(e.contains("per_layer_input_gate") && e.contains("per_layer_model_projection"), "{e}");
    // …and its tensors on adapters made with "all-linear": unexpected, named.
    g2.model.attach_lora(&a3.root(), &lora_cfg(TargetModules::default(), 0.0), 0).unwrap();
    let e = format!("{:#}", g2.model.load_adapter_tensors(&file.tensors, &adapter_dir()).unwrap_err());
    assert!(
        e.contains("unexpected tensors") && e.contains("model.per_layer_model_projection.lora_A.weight"),
        "{e}"
    );
    // Unknown names stay unknown.
    let e = lora_cfg(list(&["per_layer_embed"]), 0.0).validate().unwrap_err().to_string();
    assert!(e.contains("unknown module \"per_layer_embed\""), "{e}");
}

/// An adapter file naming a per-layer module path peft writes (full paths,
/// as for a sequence classifier) reads; a malformed path is refused.
#[test]
fn per_layer_module_paths_in_target_modules() {
    let _serial = serial(); // torch's generator is global
    let tmp = tempfile::tempdir().unwrap();
    let write = |targets: serde_json::Value| {
        let src = adapter_dir();
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join(peft::ADAPTER_CONFIG)).unwrap()).unwrap();
        v["target_modules"] = targets;
        std::fs::write(tmp.path().join(peft::ADAPTER_CONFIG), v.to_string()).unwrap();
        std::fs::copy(src.join(peft::ADAPTER_WEIGHTS), tmp.path().join(peft::ADAPTER_WEIGHTS)).unwrap();
        peft::load_adapter(tmp.path())
    };
    let mut paths: Vec<String> = vec!["model.per_layer_model_projection".into()];
    for i in 0..6 {
        paths.push(format!("model.layers.{i}.per_layer_input_gate"));
        paths.push(format!("model.layers.{i}.per_layer_projection"));
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            paths.push(format!("model.layers.{i}.self_attn.{p}"));
        }
        for p in ["gate_proj", "up_proj", "down_proj"] {
            paths.push(format!("model.layers.{i}.mlp.{p}"));
        }
    }
    let f = write(serde_json::json!(paths)).unwrap();
    assert_eq!(f.config.target_modules.resolve().unwrap(), ALL_LINEAR_MODULES);
    let e =
        format!("{:#}", write(serde_json::json!(["model.layers.0.mlp.per_layer_input_gate"])).unwrap_err());
    assert!(e.contains("model.layers.N.per_layer_input_gate"), "{e}");
    // A hand-written "all-linear" reads the per-layer tensors too.
    let f = write(serde_json::json!("all-linear")).unwrap();
    assert_eq!(f.tensors.len(), 100);
    // A list without the per-layer modules refuses their tensors, naming them.
    let e = format!("{:#}", write(serde_json::json!(["q_proj", "k_proj"])).unwrap_err());
    assert!(e.contains("base_model.model.model.per_layer_model_projection.lora_A.weight"), "{e}");
}

/// Activation checkpointing recomputes the per-layer inputs, which go
/// through `per_layer_model_projection`'s adapter: its dropout must draw the
/// same masks as the plain forward (the same loss and gradients).
#[test]
fn checkpointing_draws_the_per_layer_adapters_dropout_the_same() {
    let _serial = serial(); // torch's generator is global
    let run = |ckpt: bool| -> (f64, BTreeMap<String, Tensor>) {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut model = tiny_gemma4(&vs);
        let adapters = nn::VarStore::new(Device::Cpu);
        model.attach_lora(&adapters.root(), &lora_cfg(TargetModules::default(), 0.3), 5).unwrap();
        tch::no_grad(|| {
            for (_, t) in model.adapter_tensors() {
                t.shallow_clone().copy_(&(Tensor::randn_like(&t) * 0.1));
            }
        });
        model.set_training(true);
        let x = Tensor::from_slice(&[2i64, 40, 41, 42, 43, 44, 45, 46, 47, 48]).unsqueeze(0);
        let pos = Tensor::arange(10, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        tch::manual_seed(17);
        let loss = model
            .forward_backward(&x, &pos, None, ckpt, |h| {
                let loss = model.logits(h).square().mean(Kind::Float);
                loss.backward();
                Ok(loss.double_value(&[]))
            })
            .unwrap();
        let grads = adapters.variables().into_iter().map(|(n, t)| (n, t.grad().copy())).collect();
        (loss, grads)
    };
    let (plain, gp) = run(false);
    let (ckpt, gc) = run(true);
    assert!((plain - ckpt).abs() <= 1e-6 * plain.abs().max(1.0), "loss {plain} vs {ckpt}");
    for (n, g) in &gp {
        let d = max_abs_diff(g, &gc[n]);
        let scale = g.abs().max().double_value(&[]).max(1e-6);
        assert!(d <= 1e-5 * scale, "{n}: gradients differ by {d} (scale {scale})");
    }
    let g = &gp["model.per_layer_model_projection.lora_A.weight"];
    assert!(g.abs().max().double_value(&[]) > 0.0);
}
