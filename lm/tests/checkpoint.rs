//! Checkpoint directories: round trips, shards, and the errors bad ones give.

mod common;
use common::*;
use lm::checkpoint::{self, SaveOptions};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Saves `m` to `out` in shards of at most 100 kB.
fn save_sharded(m: &checkpoint::Loaded, out: &Path) {
    let opts = SaveOptions { max_shard_bytes: 100_000, ..Default::default() };
    checkpoint::save(out, &m.vs, &m.model.cfg, &m.tokenizer, &opts).unwrap();
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    names
}

fn probe() -> Vec<i64> {
    vec![2, 17, 99, 230, 5, 301, 44, 7]
}

#[test]
fn saved_checkpoint_reloads_with_identical_logits() {
    let m = load("mqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    checkpoint::save(&out, &m.vs, &m.model.cfg, &m.tokenizer, &SaveOptions::default()).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "GemmaForCausalLM");
    assert_eq!(cfg["model_type"], "gemma");
    let again = checkpoint::load_causal_lm(&out, Device::Cpu, Kind::Float).unwrap();
    let a = last_logits(&m.model, &probe());
    let b = last_logits(&again.model, &probe());
    assert!(a.equal(&b), "logits changed after a save/load round trip");
    // No temp directories are left beside the checkpoint.
    assert_eq!(entries(tmp.path()), ["ckpt"]);
}

#[test]
fn overwriting_a_checkpoint_replaces_it_whole() {
    let m = load("mqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    save_sharded(&m, &out);
    assert!(out.join("model.safetensors.index.json").exists());
    checkpoint::save(&out, &m.vs, &m.model.cfg, &m.tokenizer, &SaveOptions::default()).unwrap();
    assert!(!out.join("model.safetensors.index.json").exists(), "stale shard index survived");
    checkpoint::load_causal_lm(&out, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(entries(tmp.path()), ["ckpt"], "staging or old directories left behind");
}

#[test]
fn replacing_a_directory_swaps_it_whole_and_a_failed_fill_keeps_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let write = |files: &'static [&'static str]| {
        lm::fsio::write_dir_atomic(&dir, |d| {
            for f in files {
                std::fs::write(d.join(f), f)?;
            }
            Ok(())
        })
    };
    write(&["a", "b"]).unwrap();
    write(&["c"]).unwrap();
    assert_eq!(entries(&dir), ["c"]);
    let e = lm::fsio::write_dir_atomic(&dir, |d| {
        std::fs::write(d.join("half"), "x")?;
        anyhow::bail!("fill failed")
    })
    .unwrap_err();
    assert_eq!(e.to_string(), "fill failed");
    assert_eq!(std::fs::read_to_string(dir.join("c")).unwrap(), "c", "the old directory is kept");
    assert_eq!(entries(tmp.path()), ["d"], "staging or old directories left behind");
}

#[test]
fn sharded_checkpoint_loads() {
    let m = load("mqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sharded");
    save_sharded(&m, &out);
    let files = checkpoint::weight_files(&out).unwrap();
    assert!(files.len() >= 3, "expected several shards, got {files:?}");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["weight_map"].as_object().unwrap().len(), m.vs.variables().len());
    let again = checkpoint::load_causal_lm(&out, Device::Cpu, Kind::Float).unwrap();
    assert!(last_logits(&m.model, &probe()).equal(&last_logits(&again.model, &probe())));
}

/// Rewrites the fixture's weights with `edit` applied, into a temp copy.
fn edited(edit: impl FnOnce(&mut std::collections::BTreeMap<String, Tensor>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir("mqa"), tmp.path());
    let mut t = checkpoint::read_tensors(tmp.path()).unwrap();
    edit(&mut t);
    checkpoint::write_tensors(tmp.path(), &t, usize::MAX).unwrap();
    tmp
}

fn load_err(dir: &Path) -> String {
    match checkpoint::load_causal_lm(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    let d = edited(|t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = load_err(d.path());
    assert!(e.contains("missing tensors: model.layers.1.mlp.up_proj.weight"), "{e}");
}

#[test]
fn unexpected_tensor_is_named() {
    let d = edited(|t| {
        t.insert("model.layers.9.extra.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu)));
    });
    let e = load_err(d.path());
    assert!(e.contains("unexpected tensors: model.layers.9.extra.weight"), "{e}");
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let d = edited(|t| {
        t.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            Tensor::zeros([64, 64], (Kind::Float, Device::Cpu)),
        );
    });
    let e = load_err(d.path());
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight has shape [64, 64], the model expects [32, 64]"),
        "{e}"
    );
}

#[test]
fn corrupt_safetensors_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir("mqa"), tmp.path());
    std::fs::write(tmp.path().join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        .unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("is not a valid safetensors file"), "{e}");
    // Truncated: a valid header promising more bytes than there are.
    let good = std::fs::read(fixture_dir("mqa").join("model.safetensors")).unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), &good[..good.len() / 2]).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("is not a valid safetensors file"), "{e}");
}

#[test]
fn missing_model_directory_is_a_clear_error() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("model directory /nonexistent/model does not exist"), "{e}");
}

#[test]
fn config_with_a_wrong_field_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir("mqa"), tmp.path());
    let p = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"hidden_size\": 64", "\"hidden_size\": \"64\"");
    std::fs::write(&p, text).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json") && e.contains("invalid type: string \"64\""), "{e}");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"hidden_size\": \"64\"", "\"hidden_size\": 64")
        .replace("\"model_type\": \"gemma\"", "\"model_type\": \"llama\"");
    std::fs::write(&p, text).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model_type is \"llama\""), "{e}");
}

#[test]
fn bf16_checkpoint_round_trips_in_bf16() {
    let mut m = load("mqa");
    m.vs.set_kind(Kind::BFloat16);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    checkpoint::save(&out, &m.vs, &m.model.cfg, &m.tokenizer, &SaveOptions::default()).unwrap();
    let t = checkpoint::read_tensors(&out).unwrap();
    assert!(t.values().all(|x| x.kind() == Kind::BFloat16));
    let again = checkpoint::load_causal_lm(&out, Device::Cpu, Kind::BFloat16).unwrap();
    assert!(last_logits(&m.model, &probe()).equal(&last_logits(&again.model, &probe())));
}
