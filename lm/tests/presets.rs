//! The family presets: each is valid, of its family, and as large as
//! transformers makes the same config (parameter counts from transformers
//! 5.24, the model built on the meta device from the conversion scripts'
//! values); the test presets build and run, with windows and soft-caps on.

use lm::config::{preset_names, Family, PUBLISHED_PRESETS, TEST_PRESETS};
use lm::GemmaConfig;

/// (preset, family, architecture, parameters as transformers counts them:
/// `sum(p.numel() for p in Gemma*ForCausalLM(config).parameters())`).
const PUBLISHED: &[(&str, Family, &str, i64)] = &[
    ("gemma2-9b", Family::Gemma2, "Gemma2ForCausalLM", 9_241_705_984),
    ("gemma2-27b", Family::Gemma2, "Gemma2ForCausalLM", 27_227_128_320),
    ("gemma3-270m", Family::Gemma3, "Gemma3ForCausalLM", 268_098_176),
    ("gemma3-1b", Family::Gemma3, "Gemma3ForCausalLM", 999_885_952),
    ("gemma3-4b", Family::Gemma3, "Gemma3ForCausalLM", 3_880_099_328),
    ("gemma3-12b", Family::Gemma3, "Gemma3ForCausalLM", 11_765_788_416),
    ("gemma3-27b", Family::Gemma3, "Gemma3ForCausalLM", 27_009_002_240),
    ("gemma4-e2b", Family::Gemma4, "Gemma4ForCausalLM", 4_628_569_344),
    ("gemma4-e4b", Family::Gemma4, "Gemma4ForCausalLM", 7_463_013_376),
    ("gemma4-31b", Family::Gemma4, "Gemma4ForCausalLM", 30_697_345_280),
];

#[test]
fn family_presets_are_valid_and_as_large_as_transformers_makes_them() {
    for &(name, family, arch, params) in PUBLISHED {
        assert!(PUBLISHED_PRESETS.contains(&name) && !TEST_PRESETS.contains(&name), "{name}");
        let c = GemmaConfig::preset(name).unwrap();
        c.validate().unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(c.family().unwrap(), family, "{name}");
        assert_eq!(c.architectures.as_deref(), Some(&[arch.to_string()][..]), "{name}");
        // Gemma 4's `layer_scalar` (one per layer) is a buffer in
        // transformers (modeling_gemma4.py:1343), not counted there nor here.
        let n = c.num_parameters();
        assert_eq!(n, params, "{name}: {n} parameters, transformers has {params}");
        // The config written reads back the same.
        let again: GemmaConfig = serde_json::from_str(&c.to_json().unwrap()).unwrap();
        assert_eq!(again, c, "{name}");
    }
}

#[test]
fn published_presets_keep_their_vocabulary_and_test_presets_take_the_tokenizers() {
    let c = GemmaConfig::preset_for_tokenizer("gemma3-1b", 600).unwrap();
    assert_eq!(c.vocab_size, 262_144);
    let err = GemmaConfig::preset_for_tokenizer("gemma2-9b", 300_000).unwrap_err().to_string();
    assert!(err.contains("more than gemma2-9b's vocab_size 256000"), "{err}");
    let c = GemmaConfig::preset_for_tokenizer("tiny-gemma4", 600).unwrap();
    assert_eq!(c.vocab_size, 640);
    assert_eq!(c.extra["vocab_size_per_layer_input"], 640);
    assert_eq!(GemmaConfig::preset_for_tokenizer("tiny", 600).unwrap().vocab_size, 640);
}

#[test]
fn test_presets_build_with_windows_and_soft_caps() {
    for (name, family) in
        [("tiny-gemma2", Family::Gemma2), ("tiny-gemma3", Family::Gemma3), ("tiny-gemma4", Family::Gemma4)]
    {
        let c = GemmaConfig::preset_for_tokenizer(name, 600).unwrap();
        c.validate().unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(c.family().unwrap(), family);
        assert!(c.sliding_window.unwrap() < 48, "{name}: a window shorter than the smoke tests' sequences");
        let types = c.layer_types.as_ref().unwrap();
        assert!(
            types.iter().any(|t| t == "sliding_attention") && types.iter().any(|t| t == "full_attention")
        );
        assert!(c.final_logit_softcapping.is_some(), "{name}");
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let model = lm::Gemma::new(&vs.root(), &c).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        // Trained tensors; Gemma 4's layer_scalars are not (buffers in transformers).
        let n: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        let m = c.num_parameters();
        assert_eq!(m, n, "{name}: {m} parameters, {n} trained");
        let ids = tch::Tensor::arange(40, (tch::Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
        let logits = model.forward(&ids).unwrap();
        assert_eq!(logits.size(), [1, 40, 640]);
        assert!(logits.isfinite().all().int64_value(&[]) == 1, "{name}");
    }
}

#[test]
fn every_named_preset_builds_a_valid_config_and_unknown_names_list_them() {
    for name in preset_names() {
        let c = GemmaConfig::preset(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        c.validate().unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
    let e = format!("{:#}", GemmaConfig::preset("gemma-3b").unwrap_err());
    assert!(e.contains("unknown model preset") && preset_names().all(|n| e.contains(n)), "{e}");
}
