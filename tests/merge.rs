//! `align merge`: a PEFT adapter (made by peft itself, from
//! scripts/make_peft_fixture.py) merged into its base gives a full
//! checkpoint whose logits (or rewards) are those of base + adapter.

mod common;
use common::*;
use lm::checkpoint;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn peft_dir(name: &str) -> PathBuf {
    fixture("peft").join(name)
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(floats).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    align(&args)
}

#[test]
fn merging_a_peft_causal_adapter_gives_base_plus_adapter_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = merge(&fixture("mqa"), &peft_dir("causal"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("CAUSAL_LM adapter merged"), "{}", stderr(&o));
    let names = checkpoint::tensor_names(&out).unwrap();
    assert!(names.iter().all(|n| !n.contains("lora")), "{names:?}");
    assert_eq!(names, checkpoint::tensor_names(&fixture("mqa")).unwrap());
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let m = checkpoint::load_causal_lm(&out, Device::Cpu, Kind::Float).unwrap();
    let e = read_json(&peft_dir("causal").join("expected.json"));
    let rows = e["input_ids"].as_array().unwrap();
    let x = Tensor::from_slice(&rows.iter().flat_map(ids).collect::<Vec<_>>()).view([rows.len() as i64, -1]);
    let got = tch::no_grad(|| m.model.forward(&x).unwrap()).flatten(0, -1);
    let want = Tensor::from_slice(&floats(&e["logits"]));
    let d = (&got - &want).abs().max().double_value(&[]);
    // Logits reach ±10: 1e-5 relative to the largest (the base alone
    // differs from transformers by several 1e-6, see lm/tests/lora.rs).
    let scale = want.abs().max().double_value(&[]).max(1.0);
    assert!(d < 1e-5 * scale, "merged vs peft base + adapter: max |Δlogit| = {d}");

    // bf16 on request.
    let out16 = tmp.path().join("merged-bf16");
    let o = merge(&fixture("mqa"), &peft_dir("causal"), &out16, &["--dtype", "bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = read_json(&out16.join("config.json"));
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let t = checkpoint::read_tensors(&out16).unwrap();
    assert!(t.values().all(|t| t.kind() == Kind::BFloat16));
}

#[test]
fn merging_a_peft_seq_cls_adapter_gives_a_reward_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm");
    let o = merge(&fixture("mqa"), &peft_dir("seq_cls"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "GemmaForSequenceClassification");
    let rm = lm::reward_model::load(&out, Device::Cpu, Kind::Float, None, 0).unwrap();
    assert!(rm.new_tensors.is_empty(), "the merged reward model has its head");
    let e = read_json(&peft_dir("seq_cls").join("expected.json"));
    let seqs: Vec<Vec<i64>> = e["seqs"].as_array().unwrap().iter().map(ids).collect();
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let flat: Vec<i64> =
        seqs.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len()))).collect();
    let valid: Vec<bool> = seqs.iter().flat_map(|s| (0..t).map(move |i| i < s.len())).collect();
    let n = seqs.len() as i64;
    let got = tch::no_grad(|| {
        rm.model
            .forward(&Tensor::from_slice(&flat).view([n, -1]), &Tensor::from_slice(&valid).view([n, -1]))
            .unwrap()
    });
    let d = (&got - Tensor::from_slice(&floats(&e["rewards"]))).abs().max().double_value(&[]);
    assert!(d < 1e-5, "merged reward model vs peft: max |Δreward| = {d}");
}

#[test]
fn merge_refuses_a_non_empty_out_and_an_input_as_out() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "mine").unwrap();
    let o = merge(&fixture("mqa"), &peft_dir("causal"), tmp.path(), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not empty"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(tmp.path().join("keep.txt")).unwrap(), "mine");

    let o = merge(&fixture("mqa"), &peft_dir("causal"), &fixture("mqa"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("overlaps the --base directory"), "{}", stderr(&o));
    let o = merge(&fixture("mqa"), &peft_dir("causal"), &peft_dir("causal"), &[]);
    assert!(stderr(&o).contains("overlaps the --adapter directory"), "{}", stderr(&o));

    // An adapter for another model size fails naming the tensor, and writes nothing.
    let out = tmp.path().join("x");
    let o = merge(&fixture("gqa"), &peft_dir("causal"), &out, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has shape [4, 128], the model expects [4, 96]"), "{}", stderr(&o));
    assert!(!out.exists());
}
