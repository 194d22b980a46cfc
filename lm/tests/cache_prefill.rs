//! The KV cache with more than one new token: a prompt prefilled in chunks
//! (chunked prefill, speculative decoding) gives what prefilling it at once
//! does. Each new query sees the cached positions and the new ones up to its
//! own, never a later one (a bottom-right aligned causal mask).

mod common;
use common::*;
use lm::{InferenceWeights, KvCache};
use tch::{Device, Kind, Tensor};

/// Hidden states of `prompt` prefilled in chunks cut at `cuts`, each chunk
/// one forward over the cache (no mask given), joined along time.
fn prefill(m: &lm::Gemma, wt: Option<&InferenceWeights>, prompt: &[i64], cuts: &[usize]) -> Tensor {
    let t = prompt.len() as i64;
    let x = Tensor::from_slice(prompt).unsqueeze(0); // (1, T)
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0); // (1, T)
    let mut cache = KvCache::new(&m.cfg, 1, t, m.kind(), Device::Cpu).unwrap();
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().map(|&c| c as i64));
    bounds.push(t);
    let mut parts = vec![];
    for w in bounds.windows(2) {
        let (a, n) = (w[0], w[1] - w[0]);
        let h = tch::no_grad(|| {
            m.forward_hidden_with(&x.narrow(1, a, n), &pos.narrow(1, a, n), None, Some(&mut cache), wt)
                .unwrap()
        });
        assert_eq!(cache.len, w[1]);
        parts.push(h);
    }
    Tensor::cat(&parts, 1)
}

fn check(name: &str) {
    let m = load(name);
    let prompt = ids(&expected(name)["prompts"][3]);
    assert!(prompt.len() > 20, "a long prompt: {}", prompt.len());
    let wt = InferenceWeights::for_model(&m.model);
    assert!(wt.is_some(), "the inference layout is made on the CPU");
    for layout in [None, wt.as_ref()] {
        let once = prefill(&m.model, layout, &prompt, &[]);
        // And the same as without any cache (plain causal attention).
        let x = Tensor::from_slice(&prompt).unsqueeze(0);
        let plain = tch::no_grad(|| {
            let pos = Tensor::arange(prompt.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
            m.model.forward_hidden_with(&x, &pos, None, None, layout).unwrap()
        });
        assert!(max_abs_diff(&once, &plain) < 1e-4, "{name}: prefill into a cache vs no cache");
        for cuts in [vec![1], vec![5], vec![17], vec![4, 9, 20], vec![prompt.len() - 2]] {
            let chunked = prefill(&m.model, layout, &prompt, &cuts);
            let d = max_abs_diff(&chunked, &once);
            assert!(
                d < 1e-4,
                "{name} ({} layout): prefill cut at {cuts:?} differs from prefill at once by {d}",
                if layout.is_some() { "inference" } else { "training" }
            );
        }
    }
}

#[test]
fn prefill_in_chunks_equals_prefill_at_once_mqa() {
    check("mqa");
}

#[test]
fn prefill_in_chunks_equals_prefill_at_once_gqa() {
    check("gqa");
}
