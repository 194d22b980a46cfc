//! `generate_with`: the per-step callback sees every token as it is chosen,
//! can stop generation, and leaves the results of `generate` unchanged.

mod common;
use common::*;
use lm::generate::generate_with;
use lm::{GenerationConfig, StopReason};

fn prompts() -> Vec<Vec<i64>> {
    vec![vec![2, 40, 41, 42], vec![2, 300, 12, 9, 77, 150, 88, 61, 19, 7, 250], vec![2]]
}

#[test]
fn callback_sees_each_token_and_results_equal_generate() {
    let m = load("mqa");
    let e = expected("mqa");
    // A stop token that ends the first row after one token, so the callback
    // also sees rows that have finished (None) while others go on.
    let p = ids(&e["prompts"][1]);
    let first = first_greedy_token(&m.model, &p);
    let mut batch = vec![p];
    batch.extend(prompts());
    let sampled = GenerationConfig {
        temperature: 0.9,
        top_k: Some(50),
        top_p: Some(0.95),
        seed: 5,
        eos_id: -1,
        end_of_turn_id: Some(first),
        ..greedy(12)
    };
    for cfg in [GenerationConfig { end_of_turn_id: Some(first), eos_id: -1, ..greedy(12) }, sampled] {
        let plain = lm::generate(&m.model, &batch, &cfg).unwrap();
        let mut seen: Vec<Vec<i64>> = vec![vec![]; batch.len()];
        let mut steps = vec![];
        let with = generate_with(&m.model, &batch, &cfg, |step, new| {
            assert_eq!(new.len(), batch.len());
            steps.push(step);
            for (r, t) in new.iter().enumerate() {
                if let Some(t) = t {
                    seen[r].push(*t);
                }
            }
            true
        })
        .unwrap();
        assert_eq!(steps, (0..steps.len()).collect::<Vec<_>>(), "steps 0, 1, … in order");
        if cfg.temperature == 0.0 {
            assert_eq!(plain[0].tokens, vec![first]);
            assert_eq!(plain[0].stop_reason, StopReason::EndOfTurn);
            assert!(plain[1..].iter().any(|g| g.tokens.len() > 1), "other rows go on");
        }
        for ((a, b), s) in plain.iter().zip(&with).zip(&seen) {
            assert_eq!(a.tokens, b.tokens);
            assert_eq!(a.logprobs, b.logprobs, "bit for bit");
            assert_eq!(a.stop_reason, b.stop_reason);
            assert_eq!(&b.tokens, s, "the callback saw every token, the stop token included");
        }
        let longest = plain.iter().map(|g| g.tokens.len()).max().unwrap();
        assert_eq!(steps.len(), longest);
    }
}

#[test]
fn returning_false_stops_generation() {
    let m = load("mqa");
    let cfg = GenerationConfig { eos_id: -1, end_of_turn_id: None, ..greedy(20) };
    let full = lm::generate(&m.model, &prompts(), &cfg).unwrap();
    let mut calls = 0;
    let cut = generate_with(&m.model, &prompts(), &cfg, |step, _| {
        calls += 1;
        step < 4
    })
    .unwrap();
    assert_eq!(calls, 5, "steps 0..=4, then stopped");
    for (f, c) in full.iter().zip(&cut) {
        assert_eq!(c.tokens, f.tokens[..5].to_vec(), "a prefix of the full generation");
        assert_eq!(c.stop_reason, StopReason::Length);
    }
}

/// A layout made once and reused for several calls (serving, chat, judging)
/// gives what a layout made per call gives, bit for bit.
#[test]
fn a_layout_made_once_serves_many_calls_unchanged() {
    let m = load("mqa");
    let wt = lm::InferenceWeights::for_model(&m.model);
    assert!(wt.is_some(), "a small CPU model gets the inference layout");
    for seed in [1, 2, 3] {
        let cfg = GenerationConfig { temperature: 0.8, seed, eos_id: -1, ..greedy(10) };
        let fresh = lm::generate(&m.model, &prompts(), &cfg).unwrap();
        let reused =
            lm::generate::generate_using(&m.model, wt.as_ref(), &prompts(), &cfg, |_, _| true).unwrap();
        for (a, b) in fresh.iter().zip(&reused) {
            assert_eq!(a.tokens, b.tokens);
            assert_eq!(a.logprobs, b.logprobs);
            assert_eq!(a.stop_reason, b.stop_reason);
        }
    }
}
