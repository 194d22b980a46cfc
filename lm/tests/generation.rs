//! Generation: the KV cache, batching, sampling and its reproducibility.

mod common;
use common::*;
use lm::generate::{top_k_filter, top_p_filter};
use lm::{GenerationConfig, StopReason};
use tch::{Kind, Tensor};

fn prompts() -> Vec<Vec<i64>> {
    vec![
        vec![2, 40, 41, 42],
        vec![2, 300, 12, 9, 77, 150, 88, 61, 19, 7, 250],
        vec![2],
        vec![2, 8, 8, 8, 8, 8, 8],
    ]
}

#[test]
fn kv_cache_gives_the_same_tokens_as_recomputing_the_sequence() {
    let m = load("mqa");
    let cfg = GenerationConfig { eos_id: -1, end_of_turn_id: None, ..greedy(24) };
    for p in prompts() {
        let g = lm::generate(&m.model, std::slice::from_ref(&p), &cfg).unwrap().remove(0);
        assert_eq!(g.tokens.len(), 24);
        let mut seq = p.clone();
        for (i, &t) in g.tokens.iter().enumerate() {
            let logits = last_logits(&m.model, &seq);
            let want = logits.argmax(-1, false).int64_value(&[]);
            assert_eq!(t, want, "step {i} of prompt {p:?}");
            let lp = logits.log_softmax(-1, Kind::Float).double_value(&[want]);
            assert!(
                (lp - g.logprobs[i] as f64).abs() < 1e-4,
                "logprob at step {i}: {lp} vs {}",
                g.logprobs[i]
            );
            seq.push(t);
        }
    }
}

#[test]
fn batched_generation_equals_one_by_one() {
    let m = load("gqa");
    let cfg = GenerationConfig { eos_id: -1, end_of_turn_id: None, ..greedy(16) };
    let batch = lm::generate(&m.model, &prompts(), &cfg).unwrap();
    for (p, b) in prompts().iter().zip(&batch) {
        let one = lm::generate(&m.model, std::slice::from_ref(p), &cfg).unwrap().remove(0);
        assert_eq!(one.tokens, b.tokens);
        for (x, y) in one.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4);
        }
    }
}

#[test]
fn sequences_stop_independently_at_their_stop_token() {
    let m = load("mqa");
    let e = expected("mqa");
    // Find a greedy continuation that ends with a stop token in the fixtures,
    // if any; otherwise make the first generated token a stop token.
    let p = ids(&e["prompts"][1]);
    let first = lm::generate(&m.model, std::slice::from_ref(&p), &greedy(1)).unwrap()[0].tokens[0];
    let cfg = GenerationConfig { end_of_turn_id: Some(first), eos_id: -1, ..greedy(10) };
    let out = lm::generate(&m.model, &[p.clone(), ids(&e["prompts"][3])], &cfg).unwrap();
    assert_eq!(out[0].tokens, vec![first]);
    assert_eq!(out[0].stop_reason, StopReason::EndOfTurn);
    assert!(out[0].content().is_empty());
    let alone = lm::generate(&m.model, &[ids(&e["prompts"][3])], &cfg).unwrap();
    assert_eq!(out[1].tokens, alone[0].tokens, "a finished row must not disturb the others");
    let cfg = GenerationConfig { eos_id: first, end_of_turn_id: None, ..greedy(10) };
    let out = lm::generate(&m.model, std::slice::from_ref(&p), &cfg).unwrap();
    assert_eq!(out[0].stop_reason, StopReason::Eos);
}

fn sampling(seed: u64) -> GenerationConfig {
    GenerationConfig {
        temperature: 0.9,
        top_k: Some(50),
        top_p: Some(0.95),
        seed,
        eos_id: -1,
        end_of_turn_id: None,
        ..greedy(20)
    }
}

#[test]
fn sampling_is_reproducible_from_the_seed() {
    let m = load("mqa");
    let a = lm::generate(&m.model, &prompts(), &sampling(7)).unwrap();
    let b = lm::generate(&m.model, &prompts(), &sampling(7)).unwrap();
    let c = lm::generate(&m.model, &prompts(), &sampling(8)).unwrap();
    let toks = |v: &Vec<lm::Generation>| v.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>();
    assert_eq!(toks(&a), toks(&b));
    assert_ne!(toks(&a), toks(&c));
    assert!(a.iter().all(|g| g.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0)));
}

#[test]
fn top_k_one_sampling_equals_greedy() {
    let m = load("mqa");
    let g = lm::generate(
        &m.model,
        &prompts(),
        &GenerationConfig { eos_id: -1, end_of_turn_id: None, ..greedy(20) },
    )
    .unwrap();
    let s =
        lm::generate(&m.model, &prompts(), &GenerationConfig { top_k: Some(1), top_p: None, ..sampling(3) })
            .unwrap();
    for (a, b) in g.iter().zip(&s) {
        assert_eq!(a.tokens, b.tokens);
    }
}

#[test]
fn sampled_tokens_follow_the_model_distribution() {
    // One step from one prompt, many seeds: frequencies ≈ softmax(logits / T).
    let m = load("mqa");
    let p = vec![2, 40, 41];
    let probs = (last_logits(&m.model, &p) / 2.0).softmax(-1, Kind::Float);
    let top = probs.argmax(-1, false).int64_value(&[]);
    let want = probs.double_value(&[top]);
    let n = 400;
    let cfg = |seed| GenerationConfig { temperature: 2.0, top_k: None, top_p: None, seed, ..greedy(1) };
    let batch: Vec<Vec<i64>> = vec![p.clone(); n];
    let out = lm::generate(&m.model, &batch, &cfg(11)).unwrap();
    let hits = out.iter().filter(|g| g.tokens[0] == top).count() as f64 / n as f64;
    let sd = (want * (1.0 - want) / n as f64).sqrt();
    assert!((hits - want).abs() < 4.0 * sd + 1e-3, "freq {hits} vs p {want}");
}

#[test]
fn top_k_and_top_p_filters_keep_the_right_tokens() {
    let l = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 0.0]).unsqueeze(0);
    let k = top_k_filter(&l, 2);
    let kept: Vec<bool> = Vec::try_from(k.isfinite().squeeze_dim(0)).unwrap();
    assert_eq!(kept, vec![false, true, true, false]);
    // softmax([1,3,2,0]) ≈ [0.087, 0.644, 0.237, 0.032]: p = 0.7 keeps {3, 2}.
    let pf = top_p_filter(&l, 0.7);
    let kept: Vec<bool> = Vec::try_from(pf.isfinite().squeeze_dim(0)).unwrap();
    assert_eq!(kept, vec![false, true, true, false]);
    // A tiny p still keeps the most likely token.
    let pf = top_p_filter(&l, 0.01);
    let kept: Vec<bool> = Vec::try_from(pf.isfinite().squeeze_dim(0)).unwrap();
    assert_eq!(kept, vec![false, true, false, false]);
}

#[test]
fn bad_generation_requests_are_errors() {
    let m = load("mqa");
    let e = lm::generate(&m.model, &[vec![]], &greedy(4)).unwrap_err().to_string();
    assert!(e.contains("prompt 0 is empty"), "{e}");
    let e = lm::generate(&m.model, &[vec![2, 9999]], &greedy(4)).unwrap_err().to_string();
    assert!(e.contains("token id 9999 outside the vocabulary"), "{e}");
    let e = lm::generate(&m.model, &[vec![2]], &greedy(1000)).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
    let bad = GenerationConfig { top_p: Some(1.5), temperature: 1.0, ..greedy(4) };
    assert!(lm::generate(&m.model, &[vec![2]], &bad).is_err());
}

#[test]
fn sampled_logprobs_are_those_of_the_temperature_scaled_distribution() {
    // At T = 0.7 with top-k, each stored log-prob is log_softmax(logits / T)
    // at the sampled token (no top-k renormalisation), checked against the
    // model's own forward over the sequence so far.
    let m = load("mqa");
    let cfg = GenerationConfig { temperature: 0.7, top_k: Some(20), top_p: None, ..sampling(5) };
    let gens = lm::generate(&m.model, &prompts(), &cfg).unwrap();
    for (p, g) in prompts().iter().zip(&gens) {
        let mut seq = p.clone();
        for (i, &t) in g.tokens.iter().enumerate() {
            let logits = last_logits(&m.model, &seq);
            let want = (&logits / 0.7).log_softmax(-1, Kind::Float).double_value(&[t]);
            let got = f64::from(g.logprobs[i]);
            assert!((want - got).abs() < 1e-4, "step {i}: {want} vs {got}");
            seq.push(t);
        }
    }
}

#[test]
fn top_logprobs_are_the_top_of_the_sampling_distribution() {
    // generate_detailed with top_logprobs = 5 gives the same tokens and
    // log-probs as generate, bit for bit, plus each step's 5 most likely
    // tokens of log_softmax(logits / T) from the model's own forward; its
    // callback sees the same numbers.
    let m = load("mqa");
    let cfg = GenerationConfig { temperature: 0.7, top_k: Some(20), top_p: None, ..sampling(5) };
    let plain = lm::generate(&m.model, &prompts(), &cfg).unwrap();
    let mut seen: Vec<Vec<lm::generate::StepToken>> = vec![vec![]; prompts().len()];
    let wt = lm::InferenceWeights::for_model(&m.model); // as generate does
    let gens = lm::generate::generate_detailed(&m.model, wt.as_ref(), &prompts(), &cfg, 5, |_, new| {
        for (r, t) in new.iter().enumerate() {
            if let Some(t) = t {
                seen[r].push(t.clone());
            }
        }
        true
    })
    .unwrap();
    for ((p, g), (a, steps)) in prompts().iter().zip(&gens).zip(plain.iter().zip(&seen)) {
        assert_eq!(g.tokens, a.tokens);
        assert_eq!(g.logprobs, a.logprobs, "bit for bit");
        assert!(a.top_logprobs.is_empty(), "not asked for, not computed");
        assert_eq!(g.top_logprobs.len(), g.tokens.len());
        let mut seq = p.clone();
        for (i, &t) in g.tokens.iter().enumerate() {
            assert_eq!(steps[i].id, t);
            assert_eq!(steps[i].logprob, g.logprobs[i]);
            assert_eq!(steps[i].top, g.top_logprobs[i]);
            let want = (&last_logits(&m.model, &seq) / 0.7).log_softmax(-1, Kind::Float);
            let (vals, idx) = want.topk(5, -1, true, true);
            let top = &g.top_logprobs[i];
            assert_eq!(top.len(), 5);
            for (j, &(id, lp)) in top.iter().enumerate() {
                assert_eq!(id, idx.int64_value(&[j as i64]), "step {i} rank {j}");
                assert!((f64::from(lp) - vals.double_value(&[j as i64])).abs() < 1e-4);
            }
            assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "most likely first");
            assert!(g.logprobs[i] <= top[0].1 + 1e-6);
            seq.push(t);
        }
    }
}
