//! A packed training batch against transformers: three examples in one row,
//! positions restarting per example and attention that never crosses one,
//! as transformers builds them from the position ids (fixture
//! lm/tests/fixtures/*/packed.json, made by scripts/make_fixtures.py and
//! committed: no Python at test time).

use lm::checkpoint;
use sft::batch::{make_batch, Sequence};
use sft::batch_loss;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures").join(name)
}

fn packed_json(name: &str) -> serde_json::Value {
    let path = fixture(name).join("packed.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} is missing ({e}): it is made by scripts/make_fixtures.py (`make fixtures`) and committed",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn i64s(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn bools(v: &serde_json::Value) -> Vec<bool> {
    v.as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect()
}

fn check(name: &str) {
    let m = checkpoint::load_causal_lm(&fixture(name), Device::Cpu, Kind::Float).unwrap();
    let e = packed_json(name);
    let seqs: Vec<Sequence> = e["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| Sequence::from_ids(&i64s(&x["ids"]), &bools(&x["loss_mask"])).unwrap())
        .collect();
    let row: Vec<usize> = (0..seqs.len()).collect();
    let b = make_batch(&seqs, &[row], m.tokenizer.special.pad, Device::Cpu).unwrap();
    let t = b.input.size()[1];
    let flat = |x: &Tensor| Vec::<i64>::try_from(x.view([-1]).to_kind(Kind::Int64)).unwrap();
    // The row, positions and attention are what transformers trained on.
    assert_eq!(flat(&b.input), i64s(&e["input_ids"]), "{name}: packed input ids");
    assert_eq!(flat(&b.target), i64s(&e["target"]), "{name}: targets");
    assert_eq!(
        Vec::<bool>::try_from(b.mask.view([-1])).unwrap(),
        bools(&e["mask"]),
        "{name}: trained positions"
    );
    assert_eq!(flat(&b.positions), i64s(&e["position_ids"]), "{name}: position ids");
    let hf_mask: Vec<i64> = e["attention_mask"].as_array().unwrap().iter().flat_map(i64s).collect();
    let attn = b.attn.as_ref().expect("a packed row has an attention mask");
    assert_eq!(flat(attn), hf_mask, "{name}: attention mask (1 = may attend)");
    // Logits at every position, and the mean loss over the trained tokens.
    let logits = tch::no_grad(|| {
        let h = m.model.forward_hidden(&b.input, &b.positions, b.attn.as_ref(), None).unwrap();
        m.model.logits(&h)
    })
    .view([t, -1]);
    let want: Vec<f32> = e["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>())
        .collect();
    let want = Tensor::from_slice(&want).view([t, -1]);
    let d = (&logits - &want).abs().max().double_value(&[]);
    assert!(d < 1e-4, "{name}: packed logits: max |Δ| = {d}");
    let loss = tch::no_grad(|| batch_loss(&m.model, &b, b.trained as f64).unwrap()).double_value(&[]);
    let hf = e["loss"].as_f64().unwrap();
    assert!((loss - hf).abs() < 1e-5 * hf.abs().max(1.0), "{name}: packed loss {loss} vs transformers {hf}");
}

#[test]
fn packed_batch_matches_transformers_mqa() {
    check("mqa");
}

#[test]
fn packed_batch_matches_transformers_gqa() {
    check("gqa");
}
