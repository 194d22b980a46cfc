//! Parity with transformers beyond one unpadded f32 prompt, on fixtures made
//! by scripts/make_fixtures.py (committed; no Python at test time): the model
//! in bfloat16, and prompts in left- and right-padded batches. (The packed
//! training batch is checked in sft/tests/packed_parity.rs.)

mod common;
use common::*;
use lm::model::padded_causal_mask;
use tch::{Device, Kind, Tensor};

/// The stated bf16 tolerance of one prompt: twice transformers' own bf16
/// rounding error there, `max |logits_bf16 − logits_f32|` of transformers
/// (bf16.json against expected.json). bf16 keeps 8 significant bits, and
/// align and transformers round different intermediates (SDPA with f32
/// accumulation against eager attention with an f32 softmax, fused against
/// separate projections): each lands about that far from the f32 logits, so
/// the two are at most about twice that apart. A bf16 path that lost a
/// rounding step or used a wrong kernel is further off.
fn bf16_tolerances(name: &str) -> Vec<f64> {
    let f32_logits = expected(name)["last_logits"].clone();
    let bf16_logits = fixture_json(name, "bf16.json")["last_logits"].clone();
    let tols: Vec<f64> = f32_logits
        .as_array()
        .unwrap()
        .iter()
        .zip(bf16_logits.as_array().unwrap())
        .map(|(a, b)| 2.0 * max_abs_diff(&Tensor::from_slice(&floats(a)), &Tensor::from_slice(&floats(b))))
        .collect();
    assert!(tols.iter().all(|&t| t > 0.0), "{name}: the bf16 fixture differs from the f32 one");
    tols
}

fn check_bf16(name: &str) {
    let mut b = load(name);
    b.vs.set_kind(Kind::BFloat16);
    assert_eq!(b.model.kind(), Kind::BFloat16);
    let e = fixture_json(name, "bf16.json");
    assert_eq!(e["dtype"], "bfloat16");
    let prompts = mat(&e["prompts"]);
    assert_eq!(prompts, mat(&expected(name)["prompts"]), "{name}: bf16.json and expected.json share prompts");
    let tols = bf16_tolerances(name);
    for ((p, want), tol) in prompts.iter().zip(e["last_logits"].as_array().unwrap()).zip(&tols) {
        let got = last_logits(&b.model, p).to_kind(Kind::Float);
        let d = max_abs_diff(&got, &Tensor::from_slice(&floats(want)));
        eprintln!("{name}: bf16 logits of a {}-token prompt: max |Δ| = {d} (tolerance {tol})", p.len());
        assert!(d <= *tol, "{name}: bf16 logits of a {}-token prompt: max |Δ| = {d} > {tol}", p.len());
    }
    // Greedy ids equal transformers' wherever its top-2 margin exceeds the
    // tolerance: every such step given transformers' tokens before it, and
    // align's own bf16 generation up to its first closer call (after which
    // the two may rightly part).
    let (mut compared, mut generated) = (0, 0);
    for (((p, want), margins), tol) in
        prompts.iter().zip(mat(&e["greedy"])).zip(e["margins"].as_array().unwrap()).zip(&tols)
    {
        let margins = floats(margins);
        let mut seq = p.clone();
        for (i, (&w, &m)) in want.iter().zip(&margins).enumerate() {
            if f64::from(m) > *tol {
                let next = last_logits(&b.model, &seq).argmax(-1, false).int64_value(&[]);
                assert_eq!(
                    next,
                    w,
                    "{name}: bf16 greedy step {i} after a {}-token prompt (transformers' margin {m} > {tol})",
                    p.len()
                );
                compared += 1;
            }
            seq.push(w);
        }
        let got = lm::generate(&b.model, std::slice::from_ref(p), &greedy(want.len())).unwrap().remove(0);
        let sure = margins.iter().take_while(|&&m| f64::from(m) > *tol).count();
        assert_eq!(
            got.tokens[..sure.min(got.tokens.len())],
            want[..sure],
            "{name}: bf16 generate after a {}-token prompt, up to its first margin under {tol}",
            p.len()
        );
        generated += sure;
    }
    eprintln!("{name}: {compared} bf16 greedy ids compared ({generated} of them generated)");
    assert!(compared >= 8, "{name}: too few bf16 greedy steps above the tolerance to compare ({compared})");
}

#[test]
fn bf16_logits_and_greedy_ids_match_transformers_bf16_mqa() {
    check_bf16("mqa");
}

#[test]
fn bf16_logits_and_greedy_ids_match_transformers_bf16_gqa() {
    check_bf16("gqa");
}

fn check_padded(name: &str) {
    let m = load(name);
    let e = fixture_json(name, "padded.json");
    let prompts = mat(&e["prompts"]);
    let t = prompts.iter().map(Vec::len).max().unwrap() as i64;
    assert!(prompts.iter().any(|p| (p.len() as i64) < t), "the batch is padded");
    for side in ["left", "right"] {
        let s = &e[side];
        let input = tensor2(&s["input_ids"]);
        let valid = tensor2(&s["attention_mask"]).to_kind(Kind::Bool);
        let positions = match side {
            // As generate makes them: counting real tokens only.
            "left" => (valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0),
            _ => {
                Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([input.size()[0], t], false)
            }
        };
        if side == "left" {
            assert!(positions.equal(&tensor2(&s["position_ids"])), "{name}: left-padded position ids");
        }
        let mask = padded_causal_mask(&valid, t).unwrap();
        let logits = tch::no_grad(|| {
            let h = m.model.forward_hidden(&input, &positions, Some(&mask), None).unwrap();
            m.model.logits(&h)
        }); // (B, T, V)
        for (r, (p, want)) in prompts.iter().zip(s["last_logits"].as_array().unwrap()).enumerate() {
            let last = if side == "left" { t - 1 } else { p.len() as i64 - 1 };
            let got = logits.get(r as i64).get(last);
            let d = max_abs_diff(&got, &Tensor::from_slice(&floats(want)));
            assert!(d < 1e-4, "{name}: {side}-padded row {r} ({} tokens): max |Δlogit| = {d}", p.len());
        }
    }
    // transformers' batched greedy generate (left-padded, pad after a stop).
    let got = lm::generate(&m.model, &prompts, &greedy(mat(&e["greedy"])[0].len())).unwrap();
    for (r, (g, want)) in got.iter().zip(mat(&e["greedy"])).enumerate() {
        let stop = want.iter().position(|&x| x == 1 || x == 5).map_or(want.len(), |i| i + 1);
        assert!(want[stop..].iter().all(|&x| x == 0), "{name}: transformers pads row {r} after it stops");
        assert_eq!(g.tokens, want[..stop], "{name}: batched greedy row {r}");
    }
}

#[test]
fn padded_batches_match_transformers_mqa() {
    check_padded("mqa");
}

#[test]
fn padded_batches_match_transformers_gqa() {
    check_padded("gqa");
}
