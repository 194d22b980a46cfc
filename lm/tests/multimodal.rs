//! Multimodal Gemma checkpoints (`Gemma3ForConditionalGeneration`,
//! `Gemma4ForConditionalGeneration`, made by
//! scripts/make_family_fixtures.py with a tiny vision tower): align reads
//! the text model (`text_config`, tensors under the text prefix) with
//! transformers' logits, and writes back a complete checkpoint of the same
//! architecture whose vision tensors are bit for bit the input's.

mod common;
use common::*;
use lm::checkpoint;
use lm::safetensors_io::WeightReader;
use tch::{Device, Kind, Tensor};

fn check(name: &str) {
    let e = expected(name);
    let l = load(name);
    assert!(l.model.cfg.wrapper.is_some(), "{name}: read as the text model of a multimodal checkpoint");
    for (p, want) in e["prompts"].as_array().unwrap().iter().zip(e["last_logits"].as_array().unwrap()) {
        let prompt = ids(p);
        let d = max_abs_diff(&last_logits(&l.model, &prompt), &Tensor::from_slice(&floats(want)));
        assert!(d < 1e-4, "{name}: prompt of {} tokens: max |Δlogit| = {d}", prompt.len());
    }
    let n = e["max_new_tokens"].as_u64().unwrap() as usize;
    for (p, w) in e["prompts"].as_array().unwrap().iter().zip(e["greedy"].as_array().unwrap()) {
        let g = lm::generate(&l.model, &[ids(p)], &greedy(n)).unwrap();
        assert_eq!(g[0].tokens, ids(w), "{name}: greedy ids");
    }

    // Written back: the wrapper's config and every other tower's tensor as read.
    let out = tempfile::tempdir().unwrap();
    let saved = out.path().join("m");
    checkpoint::save(&saved, &l.vs, &l.model.cfg, &l.tokenizer, &Default::default()).unwrap();
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
    };
    let (a, b) = (read(&fixture_dir(name)), read(&saved));
    assert_eq!(b["architectures"][0], e["architecture"]);
    assert_eq!(a["text_config"], b["text_config"], "{name}: text_config as read");
    assert_eq!(a["vision_config"], b["vision_config"]);
    let src = WeightReader::open_dir_raw(&fixture_dir(name)).unwrap();
    let dst = WeightReader::open_dir_raw(&saved).unwrap();
    let names = |r: &WeightReader| r.names().cloned().collect::<Vec<_>>();
    assert_eq!(names(&src), names(&dst), "{name}: the same tensor names");
    let others = e["non_text_tensors"].as_object().unwrap();
    assert!(!others.is_empty());
    for n in names(&src) {
        let (x, y) = (src.read(&n).unwrap(), dst.read(&n).unwrap());
        assert!(x.equal(&y), "{name}: tensor {n} changed");
    }
    let again = checkpoint::load_causal_lm(&saved, Device::Cpu, Kind::Float).unwrap();
    let x = Tensor::from_slice(&ids(&e["prompts"][0])).unsqueeze(0);
    let (p, q) = tch::no_grad(|| (l.model.forward(&x).unwrap(), again.model.forward(&x).unwrap()));
    assert!(p.equal(&q), "{name}: logits after a save and load");
}

#[test]
fn gemma3_multimodal_text_model_matches_and_keeps_its_vision_tower() {
    check("gemma3-mm");
}

#[test]
fn gemma4_multimodal_text_model_matches_and_keeps_its_vision_tower() {
    check("gemma4-mm");
}

/// LoRA over a multimodal model's text model: the adapter is written under
/// PEFT's names for it (`base_model.model.model.language_model.…`) and
/// reads back into align's modules with the same logits.
#[test]
fn a_lora_adapter_of_a_multimodal_text_model_uses_peft_names() {
    use lm::lora::LoraConfig;
    use lm::peft::{self, TaskType};
    use tch::nn;
    for name in ["gemma3-mm", "gemma4-mm"] {
        let dir = fixture_dir(name);
        let mut m = load(name);
        let adapters = nn::VarStore::new(Device::Cpu);
        m.model.attach_lora(&adapters.root(), &LoraConfig::default(), 3).unwrap();
        tch::no_grad(|| {
            for (_, mut v) in adapters.variables() {
                let _ = v.g_add_(&(Tensor::randn_like(&v) * 0.05));
            }
        });
        let out = tempfile::tempdir().unwrap();
        let adir = out.path().join("adapter");
        let base = dir.to_str().unwrap();
        peft::save_adapter(&adir, &adapters, &LoraConfig::default(), base, TaskType::CausalLm, &[]).unwrap();
        let keys: Vec<String> = lm::checkpoint::read_tensors_file(&adir.join("adapter_model.safetensors"))
            .unwrap()
            .into_keys()
            .collect();
        // (Gemma 4's per_layer_model_projection sits beside the layers.)
        assert!(
            keys.iter().all(|k| k.starts_with("base_model.model.model.language_model.layers.")
                || k.starts_with("base_model.model.model.language_model.per_layer_model_projection.")),
            "{name}: {keys:?}"
        );
        // peft's list of target names would also match the vision tower's
        // modules (Gemma 4's q_proj …): the other towers are excluded.
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(adir.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["exclude_modules"], peft::MULTIMODAL_EXCLUDE, "{name}");
        let file = peft::load_adapter(&adir).unwrap();
        let mut again = load(name);
        let vs2 = nn::VarStore::new(Device::Cpu);
        again.model.attach_lora(&vs2.root(), &file.config, 0).unwrap();
        again.model.load_adapter_tensors(&file.tensors, &adir).unwrap();
        let x = Tensor::from_slice(&[2i64, 50, 117, 304, 209, 326, 96, 320]).unsqueeze(0);
        let (a, b) = tch::no_grad(|| (m.model.forward(&x).unwrap(), again.model.forward(&x).unwrap()));
        assert!(a.equal(&b), "{name}: logits with the adapter read back");
        if let Ok(keep) = std::env::var("ALIGN_SAVE_DIR") {
            let to = std::path::Path::new(&keep).join(format!("{name}-adapter"));
            let _ = std::fs::remove_dir_all(&to);
            std::fs::rename(&adir, &to).unwrap();
            let logits: Vec<f32> = a.get(0).get(7).try_into().unwrap();
            std::fs::write(to.join("align_last_logits.json"), serde_json::to_string(&logits).unwrap())
                .unwrap();
        }
    }
}
