//! Shared helpers for the lm integration tests: the transformers fixtures.
#![allow(dead_code)]

use lm::checkpoint::{self, Loaded};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn expected(name: &str) -> serde_json::Value {
    fixture_json(name, "expected.json")
}

/// A committed fixture file, read as JSON. A missing one fails the test with
/// the command that makes it: no parity test is skipped for want of Python.
pub fn fixture_json(name: &str, file: &str) -> serde_json::Value {
    let path = fixture_dir(name).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} is missing ({e}): it is made by scripts/make_fixtures.py (`make fixtures`) and committed",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

pub fn load(name: &str) -> Loaded {
    let dir = fixture_dir(name);
    checkpoint::load_causal_lm(&dir, Device::Cpu, Kind::Float).unwrap_or_else(|e| {
        panic!(
            "fixture model {}: {e:#} (made by scripts/make_fixtures.py, `make fixtures`, and committed)",
            dir.display()
        )
    })
}

pub fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| match x {
            serde_json::Value::Array(_) => floats(x),
            _ => vec![x.as_f64().unwrap() as f32],
        })
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Last-position logits (V,) for one unpadded prompt.
pub fn last_logits(model: &lm::Gemma, prompt: &[i64]) -> Tensor {
    let x = Tensor::from_slice(prompt).unsqueeze(0);
    let logits = tch::no_grad(|| model.forward(&x).unwrap());
    logits.get(0).get(prompt.len() as i64 - 1)
}

/// The token greedy decoding picks first after `prompt`.
pub fn first_greedy_token(model: &lm::Gemma, prompt: &[i64]) -> i64 {
    lm::generate(model, &[prompt.to_vec()], &greedy(1)).unwrap()[0].tokens[0]
}

pub fn greedy(max_new: usize) -> lm::GenerationConfig {
    lm::GenerationConfig {
        max_new_tokens: max_new,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        eos_id: 1,
        end_of_turn_id: Some(5),
        pad_id: 0,
    }
}

/// What f32 sums taken in another order may differ by, relative to the
/// values' scale: the tolerance of the chunked and recomputed paths.
pub const TOL: f64 = 1e-6;

/// The tests that draw from torch's global generator take it one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `a` equals `b` within TOL relative to max(1, |b|) (sums of many f32 terms).
pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * b.abs().max(1.0)
}

/// The largest difference between `a` and `b`, relative to max(1, max |b|).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1.0)
}

/// Rows of ids from a JSON array of arrays.
pub fn mat(v: &serde_json::Value) -> Vec<Vec<i64>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

/// A JSON array of equal-length id rows as a (B, T) int64 tensor.
pub fn tensor2(v: &serde_json::Value) -> Tensor {
    let rows = mat(v);
    let (b, t) = (rows.len() as i64, rows[0].len() as i64);
    Tensor::from_slice(&rows.concat()).view([b, t])
}

/// The causal mask of a packed row: position ids that restart at 0 start a
/// new example, and no token sees another example's (transformers finds the
/// packing the same way). (1, 1, T, T) bool.
pub fn packed_mask(positions: &[i64]) -> Tensor {
    let mut doc = Vec::with_capacity(positions.len());
    let mut d = -1i64;
    for (i, &p) in positions.iter().enumerate() {
        if p == 0 || i == 0 {
            d += 1;
        }
        doc.push(d);
    }
    let t = positions.len() as i64;
    let docs = Tensor::from_slice(&doc);
    let same = docs.view([t, 1]).eq_tensor(&docs.view([1, t]));
    let ar = Tensor::arange(t, (Kind::Int64, Device::Cpu));
    let causal = ar.view([1, t]).le_tensor(&ar.view([t, 1]));
    same.logical_and(&causal).view([1, 1, t, t])
}
