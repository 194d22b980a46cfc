//! LoRA parity: adapters on the Gemma model compute what PEFT computes, load
//! PEFT's files (fixtures made by scripts/make_peft_fixture.py with peft
//! itself; no Python at test time), save files with PEFT's names and fields,
//! merge exactly, switch off exactly, and share one copy of the base.

mod common;
use common::*;
use lm::checkpoint::{self, TensorSource};
use lm::lora::{LoraConfig, TargetModules};
use lm::model::{InferenceWeights, Linear};
use lm::peft::{self, MergedWeights, TaskType};
use lm::reward_model::{self, RewardModel};
use lm::Gemma;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const IDS: [i64; 8] = [2, 17, 250, 31, 99, 7, 480, 12];

fn peft_dir(name: &str) -> PathBuf {
    fixture_dir("peft").join(name)
}

/// A committed peft fixture file as JSON; a missing one names the script.
fn peft_json(name: &str, file: &str) -> serde_json::Value {
    let path = peft_dir(name).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} is missing ({e}): it is made by scripts/make_peft_fixture.py (`make fixtures`) and committed",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn logits(model: &Gemma, ids: &[i64]) -> Tensor {
    let x = Tensor::from_slice(ids).unsqueeze(0);
    tch::no_grad(|| model.forward(&x).unwrap())
}

fn cfg(rank: i64, alpha: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig {
        rank,
        alpha,
        dropout: 0.0,
        target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
    }
}

/// Gives every B (and A) seeded random values, so the adapters change the logits.
fn randomise(model: &Gemma, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (name, t) in model.adapter_tensors() {
            let std = if name.contains("lora_B") { 0.2 } else { 0.1 };
            t.shallow_clone().copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * std));
        }
    });
}

#[test]
fn with_b_zero_the_logits_are_the_base_models_exactly() {
    for kind in [Kind::Float, Kind::BFloat16] {
        let mut m = checkpoint::load_causal_lm(&fixture_dir("mqa"), Device::Cpu, kind).unwrap();
        let base = logits(&m.model, &IDS);
        let adapters = nn::VarStore::new(Device::Cpu);
        m.model.attach_lora(&adapters.root(), &LoraConfig::default(), 3).unwrap();
        for (name, t) in m.model.adapter_tensors() {
            assert_eq!(t.kind(), Kind::Float, "{name}: adapters are f32 over a {kind:?} base");
        }
        assert!(logits(&m.model, &IDS).equal(&base), "{kind:?}");
        // Generation's inference layout (merged copies) too.
        let ids = Tensor::from_slice(&IDS).unsqueeze(0);
        let pos = Tensor::arange(8, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        if let Some(wt) = InferenceWeights::for_model(&m.model) {
            let h = tch::no_grad(|| m.model.forward_hidden_with(&ids, &pos, None, None, Some(&wt)).unwrap());
            let d = max_abs_diff(
                &m.model.logits_with(&h, Some(&wt)).to_kind(Kind::Float),
                &base.to_kind(Kind::Float),
            );
            assert!(d < 1e-5, "{kind:?}: inference layout {d}");
        }
    }
}

#[test]
fn a_is_kaiming_uniform_seeded_and_b_is_zero() {
    let m = load("mqa");
    let mut a = m.model.share_base();
    let mut b = m.model.share_base();
    let (va, vb) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    tch::manual_seed(1);
    a.attach_lora(&va.root(), &LoraConfig::default(), 5).unwrap();
    tch::manual_seed(2);
    b.attach_lora(&vb.root(), &LoraConfig::default(), 5).unwrap();
    for ((name, x), (_, y)) in a.adapter_tensors().into_iter().zip(b.adapter_tensors()) {
        assert!(x.equal(&y), "{name}: the same seed gives the same adapters, whatever torch's generator");
        if name.contains("lora_B") {
            assert_eq!(x.abs().sum(Kind::Float).double_value(&[]), 0.0, "{name}");
        } else {
            let bound = 1.0 / (x.size()[1] as f64).sqrt();
            let max = x.abs().max().double_value(&[]);
            assert!(max <= bound && max > 0.8 * bound, "{name}: |A| max {max}, bound {bound}");
        }
    }
}

#[test]
fn only_the_adapters_require_grad_and_get_gradients() {
    let mut m = load("mqa");
    let adapters = nn::VarStore::new(Device::Cpu);
    let c = cfg(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    m.model.attach_lora(&adapters.root(), &c, 0).unwrap();
    let layers = m.model.cfg.num_hidden_layers as usize;
    assert_eq!(adapters.trainable_variables().len(), 2 * 3 * layers);
    assert_eq!(adapters.variables().len(), 2 * 3 * layers);
    let base = m.model.base_tensors();
    assert!(base.values().all(|t| !t.requires_grad()), "the base is frozen");
    let with_grad = m.model.adapter_tensors().values().filter(|t| t.requires_grad()).count();
    assert_eq!(with_grad, 2 * 3 * layers);
    // A backward pass reaches the adapters only.
    let x = Tensor::from_slice(&IDS).unsqueeze(0);
    m.model.forward(&x).unwrap().pow_tensor_scalar(2).mean(Kind::Float).backward();
    for (name, t) in m.model.adapter_tensors() {
        assert!(t.grad().defined(), "{name} has no gradient");
    }
    for (name, t) in &base {
        assert!(!t.grad().defined(), "{name} of the base got a gradient");
    }
}

/// A few SGD steps on the adapters, as training would.
fn train_a_little(model: &Gemma, adapters: &nn::VarStore) {
    let x = Tensor::from_slice(&IDS).unsqueeze(0);
    let target = Tensor::from_slice(&[17i64, 250, 31, 99, 7, 480, 12, 1]);
    let mut opt = nn::Sgd::default().build(adapters, 0.5).unwrap();
    for _ in 0..3 {
        let logits = model.forward(&x).unwrap().squeeze_dim(0);
        let loss = logits.cross_entropy_for_logits(&target);
        opt.backward_step(&loss);
    }
}

#[test]
fn merged_model_logits_equal_base_plus_adapter() {
    let mut m = load("mqa");
    let adapters = nn::VarStore::new(Device::Cpu);
    m.model
        .attach_lora(
            &adapters.root(),
            &cfg(4, 8.0, &["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]),
            7,
        )
        .unwrap();
    randomise(&m.model, 1);
    train_a_little(&m.model, &adapters);
    let want = logits(&m.model, &IDS);
    let d = max_abs_diff(&want, &logits(&load("mqa").model, &IDS));
    assert!(d > 1e-2, "the adapter changes the logits ({d})");

    let merged = MergedWeights::new(&m.vs, &m.model, Kind::Float).unwrap();
    let names: BTreeSet<String> = merged.entries().unwrap().into_iter().map(|e| e.name).collect();
    assert!(names.iter().all(|n| !n.contains("lora")), "{names:?}");
    assert_eq!(names, m.vs.variables().into_keys().collect());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    checkpoint::save_source(&out, &merged, &m.model.cfg, &m.tokenizer, &Default::default()).unwrap();
    let back = checkpoint::load_causal_lm(&out, Device::Cpu, Kind::Float).unwrap();
    let d = max_abs_diff(&logits(&back.model, &IDS), &want);
    assert!(d < 1e-5, "merged vs base + adapter: {d}");

    // Generation's inference layout merges the adapters too.
    let wt = InferenceWeights::for_model(&m.model).unwrap();
    let ids = Tensor::from_slice(&IDS).unsqueeze(0);
    let pos = Tensor::arange(8, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let h = tch::no_grad(|| m.model.forward_hidden_with(&ids, &pos, None, None, Some(&wt)).unwrap());
    let d = max_abs_diff(&m.model.logits_with(&h, Some(&wt)), &want);
    assert!(d < 1e-5, "inference layout with adapters: {d}");
}

#[test]
fn adapters_switched_off_give_the_base_logits_exactly() {
    let base = logits(&load("mqa").model, &IDS);
    let mut m = load("mqa");
    let adapters = nn::VarStore::new(Device::Cpu);
    m.model.attach_lora(&adapters.root(), &LoraConfig::default(), 0).unwrap();
    randomise(&m.model, 2);
    let on = logits(&m.model, &IDS);
    assert!(max_abs_diff(&on, &base) > 1e-2);
    {
        let _off = m.model.adapters_disabled();
        assert!(logits(&m.model, &IDS).equal(&base));
        assert!(!m.model.has_active_adapters());
    }
    assert!(logits(&m.model, &IDS).equal(&on), "the guard restores the adapters");
    m.model.set_adapters_enabled(false);
    assert!(logits(&m.model, &IDS).equal(&base));
    m.model.set_adapters_enabled(true);
    assert!(logits(&m.model, &IDS).equal(&on));
}

#[test]
fn dropout_applies_in_training_mode_only() {
    let mut m = load("mqa");
    let adapters = nn::VarStore::new(Device::Cpu);
    let c = LoraConfig { dropout: 0.5, ..Default::default() };
    m.model.attach_lora(&adapters.root(), &c, 0).unwrap();
    randomise(&m.model, 3);
    let eval = logits(&m.model, &IDS);
    assert!(logits(&m.model, &IDS).equal(&eval), "no dropout outside training");
    m.model.set_training(true);
    let (a, b) = (logits(&m.model, &IDS), logits(&m.model, &IDS));
    assert!(max_abs_diff(&a, &eval) > 1e-3, "dropout changes the adapters' output while training");
    assert!(max_abs_diff(&a, &b) > 1e-3, "each forward draws a new dropout mask");
    // Dropout acts on the adapters' input only: with them off, training
    // changes nothing.
    let _off = m.model.adapters_disabled();
    assert!(logits(&m.model, &IDS).equal(&logits(&load("mqa").model, &IDS)));
}

#[test]
fn a_bf16_base_adds_f32_adapters_as_peft_does() {
    let mut m = checkpoint::load_causal_lm(&fixture_dir("mqa"), Device::Cpu, Kind::BFloat16).unwrap();
    let adapters = nn::VarStore::new(Device::Cpu);
    m.model.attach_lora(&adapters.root(), &cfg(4, 8.0, &["q_proj"]), 0).unwrap();
    randomise(&m.model, 4);
    let q: &Linear = &m.model.model.layers[0].self_attn.q_proj;
    let a = q.lora.as_ref().unwrap();
    let x = Tensor::randn([2, 3, 64], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let got = tch::no_grad(|| q.forward(&x));
    // PEFT: result = base(x) (bf16); result + B(A(x.float())) * scaling (f32); cast to bf16.
    let base = x.linear::<Tensor>(&q.weight, None);
    let lora = x.to_kind(Kind::Float).linear::<Tensor>(&a.lora_a, None).linear::<Tensor>(&a.lora_b, None)
        * a.scaling;
    let want = (base + lora).to_kind(Kind::BFloat16);
    assert_eq!(got.kind(), Kind::BFloat16);
    assert!(tch::no_grad(|| got.equal(&want)));
}

#[test]
fn share_base_shares_one_copy_of_the_weights() {
    let mut policy = load("mqa");
    let mut rm_backbone = policy.model.share_base();
    let base = policy.model.base_tensors();
    for (name, t) in rm_backbone.base_tensors() {
        assert_eq!(t.data_ptr(), base[&name].data_ptr(), "{name}");
    }
    assert!(rm_backbone.adapter_tensors().is_empty());
    let (pv, rv) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    policy.model.attach_lora(&pv.root(), &LoraConfig::default(), 1).unwrap();
    rm_backbone.attach_lora(&rv.root(), &cfg(2, 4.0, &["q_proj"]), 2).unwrap();
    let score = Linear::new(rv.root() / "score", 64, 1, 0.02);
    let rm = RewardModel::from_backbone(rm_backbone, score, &policy.model.cfg).unwrap();
    // Policy, reference (the policy with adapters off) and reward model: one storage.
    for (name, t) in rm.backbone.base_tensors() {
        assert_eq!(t.data_ptr(), base[&name].data_ptr(), "{name}");
    }
    for (name, t) in policy.model.base_tensors() {
        assert_eq!(t.data_ptr(), base[&name].data_ptr(), "{name}");
    }
    // Each has its own adapters and switch.
    randomise(&policy.model, 5);
    let before = tch::no_grad(|| {
        rm.forward(&Tensor::from_slice(&IDS).unsqueeze(0), &Tensor::ones([1, 8], (Kind::Bool, Device::Cpu)))
            .unwrap()
    });
    let _off = policy.model.adapters_disabled();
    assert!(rm.backbone.has_active_adapters(), "switching the policy off leaves the reward model's on");
    let after = tch::no_grad(|| {
        rm.forward(&Tensor::from_slice(&IDS).unsqueeze(0), &Tensor::ones([1, 8], (Kind::Bool, Device::Cpu)))
            .unwrap()
    });
    assert!(before.equal(&after));
    assert_eq!(rv.trainable_variables().len(), 2 * 2 + 1, "reward model: its adapters and the head");
    // Its adapters and head save as one SEQ_CLS adapter.
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(2, 4.0, &["q_proj"]);
    peft::save_adapter(tmp.path(), &rv, &c, "base", TaskType::SeqCls, &[]).unwrap();
    let file = peft::load_adapter(tmp.path()).unwrap();
    assert!(file.score.unwrap().equal(&rm.score.weight.detach()));
    assert_eq!(file.tensors.len(), 2 * 2);
    let e = peft::save_adapter(tmp.path(), &rv, &c, "base", TaskType::CausalLm, &[]).unwrap_err().to_string();
    assert!(e.contains("score.weight in the adapters' VarStore is not a LoRA tensor"), "{e}");
}

#[test]
fn an_adapter_made_by_peft_loads_with_peft_logits() {
    let file = peft::load_adapter(&peft_dir("causal")).unwrap();
    assert_eq!(file.task_type, TaskType::CausalLm);
    assert_eq!((file.config.rank, file.config.alpha, file.config.dropout), (4, 8.0, 0.05));
    assert_eq!(
        file.config.target_modules.resolve().unwrap(),
        ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    );
    assert_eq!(file.base_model.as_deref(), Some("lm/tests/fixtures/mqa"));
    let mut m = load("mqa");
    let adapters = nn::VarStore::new(Device::Cpu);
    m.model.attach_lora(&adapters.root(), &file.config, 0).unwrap();
    m.model.load_adapter_tensors(&file.tensors, &peft_dir("causal")).unwrap();
    let e = peft_json("causal", "expected.json");
    let rows = e["input_ids"].as_array().unwrap();
    let ids: Vec<i64> = rows.iter().flat_map(common::ids).collect();
    let x = Tensor::from_slice(&ids).view([rows.len() as i64, -1]);
    let got = tch::no_grad(|| m.model.forward(&x).unwrap()).flatten(0, -1);
    let want = Tensor::from_slice(&floats(&e["logits"]));
    let d = max_abs_diff(&got, &want);
    let base = tch::no_grad(|| {
        let _off = m.model.adapters_disabled();
        m.model.forward(&x).unwrap()
    })
    .flatten(0, -1);
    let d_base = max_abs_diff(&base, &Tensor::from_slice(&floats(&e["base_logits"])));
    // Logits here reach ±10, where f32 holds about 7 digits: the base
    // alone (SDPA here, eager attention there) already differs from
    // transformers by several 1e-6. Tolerance 1e-5 relative to the largest
    // logit.
    let scale = want.abs().max().double_value(&[]).max(1.0);
    assert!(d < 1e-5 * scale, "peft adapter: max |Δlogit| = {d} (logits up to {scale}; base alone {d_base})");
    assert!(d_base < 1e-5 * scale, "base: max |Δlogit| = {d_base}");
    assert!(max_abs_diff(&base, &got) > 1e-2, "the peft adapter changes the logits");
}

#[test]
fn a_seq_cls_adapter_made_by_peft_gives_peft_rewards() {
    let file = peft::load_adapter(&peft_dir("seq_cls")).unwrap();
    assert_eq!(file.task_type, TaskType::SeqCls);
    assert_eq!(file.config.target_modules.resolve().unwrap(), lm::lora::LINEAR_MODULES);
    let score = file.score.as_ref().expect("the score head is saved with the adapter");
    let mut rm = reward_model::load(&fixture_dir("mqa"), Device::Cpu, Kind::Float, None, 0).unwrap();
    tch::no_grad(|| rm.model.score.weight.copy_(score));
    let adapters = nn::VarStore::new(Device::Cpu);
    rm.model.backbone.attach_lora(&adapters.root(), &file.config, 0).unwrap();
    rm.model.backbone.load_adapter_tensors(&file.tensors, &peft_dir("seq_cls")).unwrap();
    let e = peft_json("seq_cls", "expected.json");
    let seqs: Vec<Vec<i64>> = e["seqs"].as_array().unwrap().iter().map(common::ids).collect();
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> =
        seqs.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len()))).collect();
    let valid: Vec<bool> = seqs.iter().flat_map(|s| (0..t).map(move |i| i < s.len())).collect();
    let n = seqs.len() as i64;
    let got = tch::no_grad(|| {
        rm.model
            .forward(&Tensor::from_slice(&ids).view([n, -1]), &Tensor::from_slice(&valid).view([n, -1]))
            .unwrap()
    });
    let want = Tensor::from_slice(&floats(&e["rewards"]));
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-5, "peft SEQ_CLS adapter: max |Δreward| = {d}");
}

fn safetensors_keys(path: &Path) -> BTreeMap<String, Vec<i64>> {
    checkpoint::read_tensors_file(path).unwrap().into_iter().map(|(k, t)| (k, t.size())).collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// align's adapter directory next to peft's for the same model and settings.
fn compare_with_peft(name: &str, dir: &Path) {
    let (ours, theirs) = (dir.join(peft::ADAPTER_WEIGHTS), peft_dir(name).join(peft::ADAPTER_WEIGHTS));
    assert_eq!(safetensors_keys(&ours), safetensors_keys(&theirs), "{name}: key names and shapes");
    let (a, b) = (json(&dir.join(peft::ADAPTER_CONFIG)), json(&peft_dir(name).join(peft::ADAPTER_CONFIG)));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(&a), keys(&b), "{name}: config fields");
    for f in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "task_type",
        "modules_to_save",
        "fan_in_fan_out",
        "inference_mode",
        "use_dora",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "base_model_name_or_path",
    ] {
        assert_eq!(a[f], b[f], "{name}: {f}");
    }
    let modules = |v: &serde_json::Value| {
        v["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().rsplit('.').next().unwrap().to_string())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(modules(&a), modules(&b), "{name}: target_modules");
}

#[test]
fn aligns_adapter_has_peft_key_names_and_config_fields() {
    let tmp = tempfile::tempdir().unwrap();
    // CAUSAL_LM, as the peft fixture was made.
    let file = peft::load_adapter(&peft_dir("causal")).unwrap();
    let mut m = load("mqa");
    let adapters = nn::VarStore::new(Device::Cpu);
    m.model.attach_lora(&adapters.root(), &file.config, 0).unwrap();
    let dir = tmp.path().join("causal");
    peft::save_adapter(&dir, &adapters, &file.config, "lm/tests/fixtures/mqa", TaskType::CausalLm, &[])
        .unwrap();
    compare_with_peft("causal", &dir);
    // SEQ_CLS with the score head, all linear layers.
    let file = peft::load_adapter(&peft_dir("seq_cls")).unwrap();
    let mut rm = reward_model::load(&fixture_dir("mqa"), Device::Cpu, Kind::Float, None, 0).unwrap();
    let adapters = nn::VarStore::new(Device::Cpu);
    let c = LoraConfig { target_modules: TargetModules::Preset("all-linear".into()), ..file.config.clone() };
    rm.model.backbone.attach_lora(&adapters.root(), &c, 0).unwrap();
    let dir = tmp.path().join("seq_cls");
    let score = rm.model.score.weight.detach();
    peft::save_adapter(
        &dir,
        &adapters,
        &c,
        "lm/tests/fixtures/mqa",
        TaskType::SeqCls,
        &[("score.weight", &score)],
    )
    .unwrap();
    compare_with_peft("seq_cls", &dir);
}

#[test]
fn save_then_load_round_trips() {
    let mut m = load("mqa");
    let adapters = nn::VarStore::new(Device::Cpu);
    let c = LoraConfig { rank: 3, alpha: 5.5, dropout: 0.1, target_modules: TargetModules::default() };
    m.model.attach_lora(&adapters.root(), &c, 9).unwrap();
    randomise(&m.model, 6);
    let want = logits(&m.model, &IDS);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    peft::save_adapter(&dir, &adapters, &c, "base", TaskType::CausalLm, &[]).unwrap();
    let file = peft::load_adapter(&dir).unwrap();
    assert_eq!(file.config.rank, 3);
    assert_eq!((file.config.alpha, file.config.dropout), (5.5, 0.1));
    assert_eq!(file.config.target_modules.resolve().unwrap(), c.target_modules.resolve().unwrap());
    let ours = m.model.adapter_tensors();
    assert_eq!(file.tensors.keys().collect::<Vec<_>>(), ours.keys().collect::<Vec<_>>());
    for (k, t) in &file.tensors {
        assert!(t.equal(&ours[k].detach()), "{k}");
    }
    let mut fresh = load("mqa");
    let v2 = nn::VarStore::new(Device::Cpu);
    fresh.model.attach_lora(&v2.root(), &file.config, 0).unwrap();
    fresh.model.load_adapter_tensors(&file.tensors, &dir).unwrap();
    assert!(logits(&fresh.model, &IDS).equal(&want));
    // Saving again replaces the directory whole.
    peft::save_adapter(&dir, &adapters, &c, "base", TaskType::CausalLm, &[]).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
}

/// A copy of the peft causal fixture with its config edited.
fn edited_copy(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in [peft::ADAPTER_CONFIG, peft::ADAPTER_WEIGHTS] {
        std::fs::copy(peft_dir("causal").join(f), tmp.path().join(f)).unwrap();
    }
    let mut v = json(&tmp.path().join(peft::ADAPTER_CONFIG));
    edit(&mut v);
    std::fs::write(tmp.path().join(peft::ADAPTER_CONFIG), v.to_string()).unwrap();
    tmp
}

#[test]
fn unsupported_options_and_foreign_adapters_are_clear_errors() {
    let err = |dir: &Path| format!("{:#}", peft::load_adapter(dir).unwrap_err());
    let e = err(edited_copy(|v| v["use_dora"] = true.into()).path());
    assert!(e.contains("use_dora") && e.contains("not supported"), "{e}");
    let e = err(edited_copy(|v| v["bias"] = "all".into()).path());
    assert!(e.contains("bias = \"all\" is not supported"), "{e}");
    let e = err(edited_copy(|v| v["rank_pattern"] = serde_json::json!({"q_proj": 8})).path());
    assert!(e.contains("rank_pattern"), "{e}");
    let e = err(edited_copy(|v| v["peft_type"] = "IA3".into()).path());
    assert!(e.contains("LORA adapters only"), "{e}");
    let e = err(edited_copy(|v| v["target_modules"] = serde_json::json!(["c_attn"])).path());
    assert!(e.contains("c_attn") && e.contains("another architecture"), "{e}");
    let e = err(edited_copy(|v| v["task_type"] = "TOKEN_CLS".into()).path());
    assert!(e.contains("TOKEN_CLS"), "{e}");
    let e = err(edited_copy(|v| v["modules_to_save"] = serde_json::json!(["lm_head"])).path());
    assert!(e.contains("modules_to_save"), "{e}");
    let e = err(Path::new("/nonexistent/adapter"));
    assert!(e.contains("does not exist"), "{e}");

    // Keys of another architecture.
    let tmp = edited_copy(|_| {});
    let mut t = checkpoint::read_tensors_file(&tmp.path().join(peft::ADAPTER_WEIGHTS)).unwrap();
    t.insert(
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight".into(),
        Tensor::zeros([4, 64], (Kind::Float, Device::Cpu)),
    );
    checkpoint::write_tensors_file(&tmp.path().join(peft::ADAPTER_WEIGHTS), &t).unwrap();
    let e = err(tmp.path());
    assert!(e.contains("transformer.h.0.attn.c_attn") && e.contains("another architecture"), "{e}");

    // An adapter for another model size: shapes named.
    let file = peft::load_adapter(&peft_dir("causal")).unwrap();
    let mut gqa = load("gqa");
    let v = nn::VarStore::new(Device::Cpu);
    gqa.model.attach_lora(&v.root(), &file.config, 0).unwrap();
    let e = format!("{:#}", gqa.model.load_adapter_tensors(&file.tensors, &peft_dir("causal")).unwrap_err());
    assert!(
        e.contains(
            "model.layers.0.mlp.down_proj.lora_A.weight has shape [4, 128], the model expects [4, 96]"
        ),
        "{e}"
    );
    // Other target modules than the model's adapters.
    let mut m = load("mqa");
    let v = nn::VarStore::new(Device::Cpu);
    m.model.attach_lora(&v.root(), &cfg(4, 8.0, &["q_proj"]), 0).unwrap();
    let e = format!("{:#}", m.model.load_adapter_tensors(&file.tensors, &peft_dir("causal")).unwrap_err());
    assert!(e.contains("unexpected tensors: model.layers.0.mlp.down_proj.lora_A.weight"), "{e}");
    // Attaching twice.
    let e = m.model.attach_lora(&v.root(), &cfg(4, 8.0, &["q_proj"]), 0).unwrap_err().to_string();
    assert!(e.contains("already has LoRA adapters"), "{e}");
}
