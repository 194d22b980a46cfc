//! What only Gemma 4 (text, dense) has, on the fixture written by
//! scripts/make_family_fixtures.py (lm/tests/fixtures/gemma4; committed, no
//! Python at test time): plain-`w` norms and `v_norm`, full-attention layers
//! with their own head_dim and KV heads and keys = values, proportional
//! partial RoPE, per-layer inputs, two layers reusing earlier layers' keys
//! and values (one sliding, one full; double-wide MLPs), random
//! `layer_scalar`s, final soft-capping, a window of 4 shorter than the
//! prompts. The parity, cache, packing, checkpointing and gradient checks
//! every family shares run on this fixture in tests/family.rs; here: the
//! fixture has every feature, finite differences through the per-layer
//! inputs and shared keys/values, LoRA over them, saves, bf16; MoE and
//! unknown per-layer overrides are refused.

mod common;
use common::*;
use lm::family::{KvSharing, Span};
use lm::GemmaConfig;
use tch::{nn, Device, Kind, Tensor};

const NAME: &str = "gemma4";

fn config() -> GemmaConfig {
    GemmaConfig::from_file(&fixture_dir(NAME).join("config.json")).unwrap()
}

/// The fixture has every Gemma 4 feature on: this is what the other tests exercise.
#[test]
fn the_fixture_exercises_every_gemma4_feature() {
    let cfg = config();
    let specs = lm::family::layer_specs(&cfg, cfg.family().unwrap()).unwrap();
    let g: Vec<_> = specs.iter().map(|s| s.gemma4.unwrap()).collect();
    assert_eq!(
        g.iter().map(|g| g.kv).collect::<Vec<_>>(),
        [
            KvSharing::Own,
            KvSharing::Own,
            KvSharing::Store,
            KvSharing::Store,
            KvSharing::Reuse(3),
            KvSharing::Reuse(2)
        ]
    );
    assert_eq!(specs[4].span, Span::Sliding(4));
    assert_eq!(specs[5].span, Span::Full);
    assert!(g[2].k_eq_v && g[5].k_eq_v && !g[0].k_eq_v);
    assert_eq!((specs[2].head_dim, specs[2].num_kv_heads), (32, 1));
    assert_eq!((specs[0].head_dim, specs[0].num_kv_heads), (16, 2));
    // Proportional RoPE: 0.25 · 32 / 2 = 4 of the 16 frequency pairs rotate.
    assert_eq!((specs[2].rope.dim, specs[2].rope.rotated), (32, 4));
    assert_eq!((specs[0].rope.dim, specs[0].rope.rotated), (16, 8));
    assert_eq!(specs[4].intermediate_size, 2 * cfg.intermediate_size);
    assert_eq!(g[0].per_layer_input, Some(8));
    assert!(cfg.final_logit_softcapping.is_some());
    let e = expected(NAME);
    let longest = e["prompts"].as_array().unwrap().iter().map(|p| ids(p).len()).max().unwrap();
    assert!(longest as i64 > 2 * cfg.sliding_window.unwrap());
    // The layer_scalars are not all 1: they are read from the checkpoint.
    let m = load(NAME);
    let s: Vec<f64> =
        m.model.model.layers.iter().map(|l| l.layer_scalar.as_ref().unwrap().double_value(&[0])).collect();
    assert!(s.iter().all(|x| (x - 1.0).abs() > 1e-3), "{s:?}");
    // Parameters counted as transformers counts them: what the checkpoint
    // holds, less the layer_scalar buffers (one value per layer).
    let n: i64 =
        lm::checkpoint::read_tensors(&fixture_dir(NAME)).unwrap().values().map(|t| t.numel() as i64).sum();
    assert_eq!(cfg.num_parameters(), n - cfg.num_hidden_layers);
}

/// With final soft-capping on, autograd's gradient equals central finite
/// differences in f64: for the key projection of a layer whose keys a later
/// layer reuses, the per-layer embeddings, a plain-`w` norm and a
/// q_norm of a reusing layer.
#[test]
fn soft_capped_gradients_equal_finite_differences() {
    assert_gradients_equal_finite_differences(
        NAME,
        &[
            "model.layers.2.self_attn.k_proj.weight",
            "model.layers.3.self_attn.v_proj.weight",
            "model.embed_tokens_per_layer.weight",
            "model.per_layer_model_projection.weight",
            "model.layers.1.post_per_layer_input_norm.weight",
            "model.layers.5.self_attn.q_norm.weight",
        ],
    );
}

/// LoRA over Gemma 4: the adapted projections are the ones that exist (no
/// k/v on reusing layers, no v_proj with keys = values); every base tensor,
/// the per-layer-input ones and the layer_scalars included, is frozen; a
/// model sharing the base computes the same logits.
#[test]
fn lora_and_shared_bases_cover_every_tensor() {
    let l = load(NAME);
    let names: std::collections::BTreeSet<String> = l.vs.variables().into_keys().collect();
    let base: std::collections::BTreeSet<String> = l.model.base_tensors().into_keys().collect();
    assert_eq!(base, names, "base_tensors names every variable");
    let linears: Vec<String> = l.model.linears().into_iter().map(|(n, _)| n).collect();
    assert!(linears.contains(&"model.layers.2.self_attn.k_proj".to_string()));
    assert!(!linears.contains(&"model.layers.2.self_attn.v_proj".to_string()));
    assert!(!linears.iter().any(|n| n.starts_with("model.layers.4.self_attn.k_proj")));
    assert!(linears.contains(&"model.layers.5.self_attn.q_proj".to_string()));
    let x = Tensor::from_slice(&[2i64, 40, 41, 42, 43, 44, 45]).unsqueeze(0);
    let want = tch::no_grad(|| l.model.forward(&x).unwrap());
    let mut shared = l.model.share_base();
    let avs = nn::VarStore::new(Device::Cpu);
    let cfg = all_linear_lora(0.0);
    shared.attach_lora(&avs.root(), &cfg, 0).unwrap();
    assert_eq!(shared.adapter_tensors().len(), 2 * linears.len());
    for (n, t) in shared.base_tensors() {
        assert!(!t.requires_grad(), "{n} is frozen under LoRA");
    }
    let got = tch::no_grad(|| shared.forward(&x).unwrap());
    assert_eq!(max_abs_diff(&got, &want), 0.0);
}

/// LoRA of rank 2 (alpha 4) on every projection, as peft's "all-linear".
fn all_linear_lora(dropout: f64) -> lm::lora::LoraConfig {
    lm::lora::LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout,
        target_modules: lm::lora::TargetModules::Preset("all-linear".into()),
    }
}

fn write_config(dir: &std::path::Path, edit: impl Fn(&mut serde_json::Value)) -> std::path::PathBuf {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir(NAME).join("config.json")).unwrap())
            .unwrap();
    edit(&mut v);
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    path
}

/// Configs align cannot run are errors naming the field.
#[test]
fn unsupported_gemma4_configs_are_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let err = |edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let path = write_config(dir.path(), edit);
        format!("{:#}", lm::checkpoint::read_config(path.parent().unwrap()).unwrap_err())
    };
    let e = err(&|v| v["enable_moe_block"] = true.into());
    assert!(e.contains("enable_moe_block") && e.contains("Mixture-of-Experts"), "{e}");
    let e = err(&|v| v["per_layer_config"]["2"]["intermediate_size"] = 7.into());
    assert!(e.contains("per_layer_config.2.intermediate_size"), "{e}");
    let e = err(&|v| v["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into());
    assert!(e.contains("rope_parameters.full_attention.rope_type"), "{e}");
    let e = err(&|v| v["num_kv_shared_layers"] = 6.into());
    assert!(e.contains("num_kv_shared_layers"), "{e}");
    let e = err(&|v| v["attention_k_eq_v"] = "yes".into());
    assert!(e.contains("attention_k_eq_v"), "{e}");
    let e = err(&|v| v["use_bidirectional_attention"] = "all".into());
    assert!(e.contains("use_bidirectional_attention"), "{e}");
    // "vision" concerns image tokens only: the text model stays causal.
    let path = write_config(dir.path(), |v| v["use_bidirectional_attention"] = "vision".into());
    GemmaConfig::from_file(&path).unwrap();
}

/// Without `per_layer_config`, the legacy `global_head_dim` and
/// `num_global_key_value_heads` give the full layers' shapes, as
/// Gemma4TextConfig converts them; the defaults fill absent keys.
#[test]
fn legacy_global_head_keys_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("per_layer_config");
        o.insert("global_head_dim".into(), 32.into());
        o.insert("num_global_key_value_heads".into(), 1.into());
    });
    let cfg = GemmaConfig::from_file(&path).unwrap();
    let a = lm::family::layer_specs(&cfg, cfg.family().unwrap()).unwrap();
    let b = lm::family::layer_specs(&config(), cfg.family().unwrap()).unwrap();
    assert_eq!(a, b);
    let path = write_config(dir.path(), |v| {
        let o = v.as_object_mut().unwrap();
        for k in
            ["per_layer_config", "rope_parameters", "hidden_size_per_layer_input", "num_kv_shared_layers"]
        {
            o.remove(k);
        }
    });
    let cfg = GemmaConfig::from_file(&path).unwrap();
    let s = lm::family::layer_specs(&cfg, cfg.family().unwrap()).unwrap();
    assert_eq!(s[2].head_dim, 512, "global_head_dim defaults to 512");
    assert_eq!(s[2].num_kv_heads, 2, "no num_global_key_value_heads: the global KV heads");
    assert_eq!((s[2].rope.theta, s[2].rope.rotated), (1e6, 64));
    assert_eq!(s[0].gemma4.unwrap().per_layer_input, Some(256));
    assert!(s.iter().all(|l| l.gemma4.unwrap().kv == KvSharing::Own));
}

/// A checkpoint align writes holds the fixture's tensors bit for bit under
/// the same names (the layer_scalars included, no k/v projections on the
/// reusing layers) and its Gemma 4 keys, as Gemma4ForCausalLM: what
/// transformers wrote, it loads again; align reads it back with the same logits.
#[test]
fn a_saved_checkpoint_keeps_the_tensors_and_keys() {
    let l = load(NAME);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("saved");
    lm::checkpoint::save(&out, &l.vs, &l.model.cfg, &l.tokenizer, &Default::default()).unwrap();
    let want = lm::checkpoint::read_tensors(&fixture_dir(NAME)).unwrap();
    let got = lm::checkpoint::read_tensors(&out).unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (n, t) in &want {
        assert!(got[n].equal(t), "{n} changed");
    }
    let json = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    let (a, b) = (json(&out), json(&fixture_dir(NAME)));
    for k in [
        "model_type",
        "architectures",
        "hidden_size_per_layer_input",
        "vocab_size_per_layer_input",
        "attention_k_eq_v",
        "num_kv_shared_layers",
        "use_double_wide_mlp",
        "enable_moe_block",
        "per_layer_config",
        "rope_parameters",
        "layer_types",
        "final_logit_softcapping",
    ] {
        assert_eq!(a[k], b[k], "config.json {k}");
    }
    let again = lm::checkpoint::load_causal_lm(&out, Device::Cpu, Kind::Float).unwrap();
    let x = Tensor::from_slice(&ids(&expected(NAME)["full_logits"]["prompt"])).unsqueeze(0);
    let (p, q) = tch::no_grad(|| (l.model.forward(&x).unwrap(), again.model.forward(&x).unwrap()));
    assert!(p.equal(&q));
}

/// In bf16 (the dtype real checkpoints ship in) the model runs, the cache
/// included (the layer_scalars in bf16 too), and stays near the f32 logits.
#[test]
fn bf16_runs_near_f32() {
    let f = load(NAME);
    let b = lm::checkpoint::load_causal_lm(&fixture_dir(NAME), Device::Cpu, Kind::BFloat16).unwrap();
    assert_eq!(b.model.model.layers[0].layer_scalar.as_ref().unwrap().kind(), Kind::BFloat16);
    let prompt = ids(&expected(NAME)["full_logits"]["prompt"]);
    let x = Tensor::from_slice(&prompt).unsqueeze(0);
    let lf = tch::no_grad(|| f.model.forward(&x).unwrap());
    let lb = tch::no_grad(|| b.model.forward(&x).unwrap()).to_kind(Kind::Float);
    let d = max_abs_diff(&lf, &lb);
    // transformers' own bf16 logits differ from its f32 ones by 1.06 on this
    // fixture (random weights, post-norms near 4); align's bf16 logits equal
    // transformers' bf16 ones with SDPA attention bit for bit (checked by hand).
    assert!(d < 1.5, "bf16 against f32: max |Δlogit| = {d} (logits soft-capped at 6)");
    let g = lm::generate(&b.model, &[prompt.clone(), prompt[..9].to_vec()], &greedy(8)).unwrap();
    assert!(g.iter().all(|g| !g.tokens.is_empty()));
}

/// LoRA with dropout on every projection, training: activation
/// checkpointing (which reseeds each layer's dropout when recomputing it)
/// gives the adapters the plain pass's gradients, through the shared keys
/// and values and the per-layer inputs.
#[test]
fn lora_dropout_with_checkpointing_gives_the_plain_gradients() {
    let _g = serial();
    let (base, _vs) = load_f64(NAME);
    let mut model = base.share_base();
    let avs = nn::VarStore::new(Device::Cpu);
    let cfg = all_linear_lora(0.2);
    model.attach_lora(&avs.root(), &cfg, 7).unwrap();
    model.set_training(true);
    // B starts at zero: give it values so that A gets gradients too.
    tch::no_grad(|| {
        for mut t in avs.trainable_variables() {
            let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.05));
        }
    });
    let (x, pos, targets) = next_token_example(&ids(&expected(NAME)["full_logits"]["prompt"]));
    let run = |checkpointing: bool| -> Vec<Tensor> {
        for mut v in avs.trainable_variables() {
            v.zero_grad();
        }
        tch::manual_seed(11);
        model
            .forward_backward(&x, &pos, None, checkpointing, |h| {
                summed_nll(&model.logits(h), &targets).backward();
                Ok(())
            })
            .unwrap();
        avs.trainable_variables().iter().map(|v| v.grad().detach().copy()).collect()
    };
    let (a, b) = (run(false), run(true));
    assert!(!a.is_empty());
    for (i, (ga, gb)) in a.iter().zip(&b).enumerate() {
        assert!(ga.abs().max().double_value(&[]) > 0.0, "adapter tensor {i} gets a gradient");
        let d = max_abs_diff(ga, gb);
        assert!(d < 1e-9, "adapter tensor {i}: gradients differ by {d}");
    }
}
