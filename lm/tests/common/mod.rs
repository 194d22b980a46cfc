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

/// A fixture model in f64 (the gradient checks), with its variables.
pub fn load_f64(name: &str) -> (lm::Gemma, tch::nn::VarStore) {
    let l = checkpoint::load_causal_lm(&fixture_dir(name), Device::Cpu, Kind::Double).unwrap();
    (l.model, l.vs)
}

/// One row to learn: its ids (1, T), positions 0..T (1, T) and next-token
/// targets (T; the last is −100, ignored).
pub fn next_token_example(prompt: &[i64]) -> (Tensor, Tensor, Tensor) {
    let t = prompt.len() as i64;
    let targets: Vec<i64> = prompt[1..].iter().copied().chain([-100]).collect();
    (
        Tensor::from_slice(prompt).unsqueeze(0),
        Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0),
        Tensor::from_slice(&targets),
    )
}

/// The summed next-token NLL of `logits` (B, T, V) against `targets` (B·T;
/// −100 is ignored), in f64.
pub fn summed_nll(logits: &Tensor, targets: &Tensor) -> Tensor {
    let lp = logits.flatten(0, 1).log_softmax(-1, Kind::Double); // (B·T, V)
    let picked = lp.gather(1, &targets.view([-1, 1]).clamp_min(0), false).view([-1]);
    let keep = targets.view([-1]).ge(0).to_kind(Kind::Double);
    -(picked * keep).sum(Kind::Double)
}

/// The summed NLL of `targets` and every trainable tensor's gradient, by
/// name (sorted): a plain pass (`checkpointing` None) or
/// `forward_backward` with activation checkpointing off or on.
pub fn loss_and_grads(
    model: &lm::Gemma,
    vs: &tch::nn::VarStore,
    ids: &Tensor,
    pos: &Tensor,
    mask: Option<&Tensor>,
    targets: &Tensor,
    checkpointing: Option<bool>,
) -> (f64, Vec<(String, Tensor)>) {
    for (_, mut v) in vs.variables() {
        v.zero_grad();
    }
    let loss_of = |h: &Tensor| summed_nll(&model.logits(h), targets);
    let loss = match checkpointing {
        None => {
            let loss = loss_of(&model.forward_hidden(ids, pos, mask, None).unwrap());
            loss.backward();
            loss.double_value(&[])
        }
        Some(c) => model
            .forward_backward(ids, pos, mask, c, |h| {
                let loss = loss_of(h);
                loss.backward();
                Ok(loss.double_value(&[]))
            })
            .unwrap(),
    };
    // Trainable tensors only (Gemma 4's layer_scalars are buffers), named.
    let vars = vs.variables();
    let mut grads: Vec<(String, Tensor)> = vs
        .trainable_variables()
        .iter()
        .map(|v| {
            let name =
                vars.iter().find(|(_, x)| x.data_ptr() == v.data_ptr()).map(|(n, _)| n.clone()).unwrap();
            (name, v.grad().detach().copy())
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    (loss, grads)
}

/// In f64, autograd's gradient of the summed NLL of the fixture's
/// every-position prompt equals central finite differences, for each named
/// parameter: at its first and largest entries, entry 7 and the last.
pub fn assert_gradients_equal_finite_differences(fixture: &str, params: &[&str]) {
    let (model, vs) = load_f64(fixture);
    let (x, pos, targets) = next_token_example(&ids(&expected(fixture)["full_logits"]["prompt"]));
    let (_, grads) = loss_and_grads(&model, &vs, &x, &pos, None, &targets, None);
    let vars = vs.variables();
    for &name in params {
        let g = &grads.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{fixture}: no {name}")).1;
        let v = &vars[name];
        let flat = g.view([-1]);
        let top = flat.abs().argmax(0, false).int64_value(&[]);
        for idx in [0, top, 7, flat.size()[0] - 1] {
            let eps = 1e-6;
            let shift = |d: f64| {
                tch::no_grad(|| {
                    let _ = v.view([-1]).get(idx).g_add_(&Tensor::from(d).to_kind(Kind::Double));
                    let h = model.forward_hidden(&x, &pos, None, None).unwrap();
                    summed_nll(&model.logits(&h), &targets).double_value(&[])
                })
            };
            let up = shift(eps);
            let down = shift(-2.0 * eps);
            shift(eps);
            let fd = (up - down) / (2.0 * eps);
            let ad = flat.double_value(&[idx]);
            assert!(
                (fd - ad).abs() <= 1e-6 * ad.abs().max(1.0),
                "{fixture}: {name}[{idx}]: autograd {ad}, finite differences {fd}"
            );
        }
    }
}
