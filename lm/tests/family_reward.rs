//! Reward models of the Gemma family (`Gemma2ForSequenceClassification`,
//! `Gemma3TextForSequenceClassification`) saved by transformers load with
//! their rewards (fixtures of scripts/make_family_fixtures.py); align saves
//! them under the family's architecture name and reloads the same rewards.

mod common;
use common::*;
use lm::checkpoint;
use lm::reward_model;
use tch::{Device, Kind, Tensor};

#[test]
fn family_reward_models_give_transformers_rewards_and_round_trip() {
    for (name, arch) in [
        ("gemma2-reward", "Gemma2ForSequenceClassification"),
        ("gemma3-reward", "Gemma3TextForSequenceClassification"),
    ] {
        let dir = fixture_dir(name);
        let e = expected(name);
        assert_eq!(e["architecture"], arch);
        let l = reward_model::load(&dir, Device::Cpu, Kind::Float, None, 0).unwrap();
        assert!(l.new_tensors.is_empty(), "{name}: the fixture has its score head");
        let ids = tensor2(&e["input_ids"]);
        let valid = tensor2(&e["attention_mask"]).to_kind(Kind::Bool);
        let want = Tensor::from_slice(&floats(&e["rewards"]));
        let got = tch::no_grad(|| l.model.forward(&ids, &valid).unwrap());
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{name}: rewards differ from transformers' by {d}");
        assert!(want.abs().max().double_value(&[]) > 0.05, "{name}: non-trivial rewards");

        let out = tempfile::tempdir().unwrap();
        let saved = out.path().join("rm");
        reward_model::save(&saved, &l.vs, &l.model, &l.tokenizer, None).unwrap();
        let cfg = checkpoint::read_config(&saved).unwrap();
        assert_eq!(cfg.architectures, Some(vec![arch.to_string()]), "{name}");
        assert_eq!(cfg.model_type, l.model.cfg.model_type);
        let again = reward_model::load(&saved, Device::Cpu, Kind::Float, None, 0).unwrap();
        let got2 = tch::no_grad(|| again.model.forward(&ids, &valid).unwrap());
        assert!(got2.equal(&got), "{name}: rewards after a save and load");
    }
}

#[test]
fn family_causal_lms_are_saved_under_their_architecture() {
    for (name, arch) in [("gemma2", "Gemma2ForCausalLM"), ("gemma3", "Gemma3ForCausalLM")] {
        let l = load(name);
        let out = tempfile::tempdir().unwrap();
        let saved = out.path().join("m");
        checkpoint::save(&saved, &l.vs, &l.model.cfg, &l.tokenizer, &Default::default()).unwrap();
        let cfg = checkpoint::read_config(&saved).unwrap();
        assert_eq!(cfg.architectures, Some(vec![arch.to_string()]), "{name}");
        for key in ["sliding_window", "layer_types", "final_logit_softcapping", "query_pre_attn_scalar"] {
            let a = serde_json::to_value(&cfg).unwrap()[key].clone();
            let b = serde_json::to_value(&l.model.cfg).unwrap()[key].clone();
            assert_eq!(a, b, "{name}: {key} survives a save");
        }
        // transformers' strict config wants an int here, not 24.0.
        let text = std::fs::read_to_string(saved.join("config.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(json["query_pre_attn_scalar"].is_i64(), "{name}: {}", json["query_pre_attn_scalar"]);
        let again = checkpoint::load_causal_lm(&saved, Device::Cpu, Kind::Float).unwrap();
        let x = Tensor::from_slice(&[2i64, 50, 117, 304, 209, 326, 96, 320, 11, 12, 13]).unsqueeze(0);
        let a = tch::no_grad(|| l.model.forward(&x).unwrap());
        let b = tch::no_grad(|| again.model.forward(&x).unwrap());
        assert!(a.equal(&b), "{name}: logits after a save and load");
    }
}

/// By hand: writes align's saves of the family fixtures under
/// `$ALIGN_SAVE_DIR/<fixture>` for scripts/check_family_load.py, which
/// loads them with transformers and compares with the fixtures' expected
/// outputs (`make verify-family`).
#[test]
#[ignore = "by hand: make verify-family"]
fn write_family_saves_for_transformers() {
    let root = std::path::PathBuf::from(std::env::var("ALIGN_SAVE_DIR").expect("ALIGN_SAVE_DIR"));
    for name in ["gemma2", "gemma3", "gemma4", "gemma3-mm", "gemma4-mm"] {
        let l = match checkpoint::load_causal_lm(&fixture_dir(name), Device::Cpu, Kind::Float) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{name}: not loaded ({e:#})");
                continue;
            }
        };
        checkpoint::save(&root.join(name), &l.vs, &l.model.cfg, &l.tokenizer, &Default::default()).unwrap();
    }
    for name in ["gemma2-reward", "gemma3-reward"] {
        let l = reward_model::load(&fixture_dir(name), Device::Cpu, Kind::Float, None, 0).unwrap();
        reward_model::save(&root.join(name), &l.vs, &l.model, &l.tokenizer, None).unwrap();
    }
}
