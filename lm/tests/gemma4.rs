//! Gemma 4 (text, dense) against transformers, on the fixture written by
//! scripts/make_family_fixtures.py (lm/tests/fixtures/gemma4; committed, no
//! Python at test time): plain-`w` norms and `v_norm`, full-attention layers
//! with their own head_dim and KV heads and keys = values, proportional
//! partial RoPE, per-layer inputs, two layers reusing earlier layers' keys
//! and values (one sliding, one full; double-wide MLPs), random
//! `layer_scalar`s, final soft-capping, a window of 4 shorter than the
//! prompts. Beyond parity: KV-cache decoding equals full recomputation past
//! the window, a packed row gives the unpacked rows' gradients, activation
//! checkpointing gives the plain gradients, soft-capped gradients equal
//! finite differences; MoE and unknown per-layer overrides are refused.

mod common;
use common::*;
use lm::family::{KvSharing, Span};
use lm::model::{padded_causal_mask, KvCache};
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

#[test]
fn logits_match_transformers() {
    let m = load(NAME);
    let e = expected(NAME);
    let mut worst = 0f64;
    for (p, want) in e["prompts"].as_array().unwrap().iter().zip(e["last_logits"].as_array().unwrap()) {
        let prompt = ids(p);
        let d = max_abs_diff(&last_logits(&m.model, &prompt), &Tensor::from_slice(&floats(want)));
        assert!(d < 1e-4, "prompt of {} tokens: max |Δlogit| = {d}", prompt.len());
        worst = worst.max(d);
    }
    let full = &e["full_logits"];
    let x = Tensor::from_slice(&ids(&full["prompt"])).unsqueeze(0);
    let got = tch::no_grad(|| m.model.forward(&x).unwrap()).flatten(0, -1);
    let d = max_abs_diff(&got, &Tensor::from_slice(&floats(&full["logits"])));
    assert!(d < 1e-4, "every position: max |Δlogit| = {d}");
    eprintln!("gemma4 parity: last-position max |Δlogit| {worst:.2e}, every position {d:.2e}");
}

#[test]
fn greedy_ids_match_transformers_one_by_one_and_batched() {
    let m = load(NAME);
    let e = expected(NAME);
    let n = e["max_new_tokens"].as_u64().unwrap() as usize;
    let prompts = mat(&e["prompts"]);
    let want = mat(&e["greedy"]);
    for (p, w) in prompts.iter().zip(&want) {
        let g = lm::generate(&m.model, std::slice::from_ref(p), &greedy(n)).unwrap();
        let stop = w.iter().position(|&x| x == 1 || x == 5).map_or(w.len(), |i| i + 1);
        assert_eq!(g[0].tokens, w[..stop], "greedy continuation of a {}-token prompt", p.len());
    }
    // One left-padded batch gives what transformers' batched generate gives.
    let g = lm::generate(&m.model, &prompts, &greedy(n)).unwrap();
    let pg = mat(&e["padded"]["greedy"]);
    for (r, (gi, w)) in g.iter().zip(&pg).enumerate() {
        let stop = w.iter().position(|&x| x == 1 || x == 5).map_or(w.len(), |i| i + 1);
        assert_eq!(gi.tokens, w[..stop], "transformers' batched greedy row {r}");
    }
}

#[test]
fn padded_batches_match_transformers() {
    let m = load(NAME);
    let e = &expected(NAME)["padded"];
    for side in ["left", "right"] {
        let s = &e[side];
        let input = tensor2(&s["input_ids"]);
        let (b, t) = input.size2().unwrap();
        let valid = tensor2(&s["attention_mask"]).to_kind(Kind::Bool);
        let positions = match side {
            "left" => tensor2(&s["position_ids"]),
            _ => Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], true),
        };
        let mask = padded_causal_mask(&valid, t).unwrap();
        let logits = tch::no_grad(|| {
            let h = m.model.forward_hidden(&input, &positions, Some(&mask), None).unwrap();
            m.model.logits(&h)
        }); // (B, T, V)
        let lens: Vec<i64> = mat(&s["attention_mask"]).iter().map(|r| r.iter().sum()).collect();
        for (r, want) in s["last_logits"].as_array().unwrap().iter().enumerate() {
            let last = if side == "left" { t - 1 } else { lens[r] - 1 };
            let d = max_abs_diff(&logits.get(r as i64).get(last), &Tensor::from_slice(&floats(want)));
            assert!(d < 1e-4, "{side}-padded row {r}: max |Δlogit| = {d}");
        }
    }
}

#[test]
fn a_packed_row_matches_transformers() {
    let m = load(NAME);
    let e = &expected(NAME)["packed"];
    let input = Tensor::from_slice(&ids(&e["input_ids"])).unsqueeze(0);
    let pos = ids(&e["position_ids"]);
    let positions = Tensor::from_slice(&pos).unsqueeze(0);
    let mask = packed_mask(&pos);
    let got = tch::no_grad(|| {
        let h = m.model.forward_hidden(&input, &positions, Some(&mask), None).unwrap();
        m.model.logits(&h)
    })
    .flatten(0, -1);
    let d = max_abs_diff(&got, &Tensor::from_slice(&floats(&e["logits"])));
    assert!(d < 1e-4, "packed row: max |Δlogit| = {d}");
}

/// Decoding one token at a time over the KV cache (sliding layers in a
/// ring of `window` slots; the reusing layers reading their sources' keys
/// from the same step), and prefilling in chunks that cross the ring's end,
/// give the logits of one full forward pass at every position; in a padded
/// batch too.
#[test]
fn kv_cache_decoding_equals_full_recomputation_past_the_window() {
    let m = load(NAME);
    let e = expected(NAME);
    let prompt = ids(&e["full_logits"]["prompt"]);
    let t = prompt.len() as i64;
    let w = m.model.cfg.sliding_window.unwrap();
    assert!(t > 3 * w);
    let x = Tensor::from_slice(&prompt).unsqueeze(0);
    let full = tch::no_grad(|| m.model.forward(&x).unwrap()).squeeze_dim(0); // (T, V)
    let mut worst = 0f64;
    for chunk in [1, 3, w + 1, t] {
        let mut cache = KvCache::new(&m.model.cfg, 1, t, Kind::Float, Device::Cpu).unwrap();
        let mut at = 0;
        while at < t {
            let n = chunk.min(t - at);
            let ids = x.narrow(1, at, n);
            let pos = Tensor::arange_start(at, at + n, (Kind::Int64, Device::Cpu)).unsqueeze(0);
            let h = tch::no_grad(|| m.model.forward_hidden(&ids, &pos, None, Some(&mut cache)).unwrap());
            let got = m.model.logits(&h).squeeze_dim(0);
            let d = max_abs_diff(&got, &full.narrow(0, at, n));
            assert!(d < 1e-4, "chunks of {chunk}: positions {at}..{}: max |Δlogit| = {d}", at + n);
            worst = worst.max(d);
            at += n;
        }
    }
    eprintln!("gemma4 cache vs recompute: max |Δlogit| {worst:.2e}");
    // A left-padded batch decoded over the cache: each row as alone.
    let prompts = mat(&e["prompts"]);
    let n = 12;
    let g = lm::generate(&m.model, &prompts, &greedy(n)).unwrap();
    for (p, gi) in prompts.iter().zip(&g) {
        let mut ids = p.clone();
        for &tok in &gi.tokens {
            let x = Tensor::from_slice(&ids).unsqueeze(0);
            let logits = tch::no_grad(|| m.model.forward(&x).unwrap());
            let next = logits.get(0).get(ids.len() as i64 - 1).argmax(0, false).int64_value(&[]);
            assert_eq!(next, tok, "batched cache decoding against full recomputation");
            ids.push(tok);
        }
    }
    // The cache: sliding layers bounded by the window, none for the reusing layers.
    let cfg = &m.model.cfg;
    let cap = 4 * t;
    let cache = KvCache::new(cfg, 1, cap, Kind::Float, Device::Cpu).unwrap();
    let specs = lm::family::layer_specs(cfg, cfg.family().unwrap()).unwrap();
    let want: i64 = specs
        .iter()
        .filter(|s| !matches!(s.gemma4.unwrap().kv, KvSharing::Reuse(_)))
        .map(|s| {
            let slots = match s.span {
                Span::Full => cap,
                Span::Sliding(w) => w,
            };
            2 * s.num_kv_heads * s.head_dim * 4 * slots
        })
        .sum();
    assert_eq!(cache.bytes(), want);
}

fn loss_and_grads(
    model: &lm::Gemma,
    vs: &nn::VarStore,
    ids: &Tensor,
    pos: &Tensor,
    mask: Option<&Tensor>,
    targets: &Tensor,
    checkpointing: Option<bool>,
) -> (f64, Vec<(String, Tensor)>) {
    for (_, mut v) in vs.variables() {
        v.zero_grad();
    }
    let loss_of = |h: &Tensor| {
        let logits = model.logits(h).flatten(0, 1); // (B·T, V)
        let lp = logits.log_softmax(-1, Kind::Double).gather(1, &targets.view([-1, 1]).clamp_min(0), false);
        let keep = targets.view([-1]).ge(0).to_kind(Kind::Double);
        -(lp.view([-1]) * keep).sum(Kind::Double)
    };
    let loss = match checkpointing {
        None => {
            let h = model.forward_hidden(ids, pos, mask, None).unwrap();
            let loss = loss_of(&h);
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
    let mut grads: Vec<(String, Tensor)> = vs
        .trainable_variables()
        .into_iter()
        .zip(0..)
        .map(|(v, i)| (i.to_string(), v.grad().detach().copy()))
        .collect();
    let names: Vec<String> = {
        let vars = vs.variables();
        let tr = vs.trainable_variables();
        tr.iter()
            .map(|v| vars.iter().find(|(_, x)| x.data_ptr() == v.data_ptr()).map(|(n, _)| n.clone()).unwrap())
            .collect()
    };
    for (g, n) in grads.iter_mut().zip(names) {
        g.0 = n;
    }
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    (loss, grads)
}

fn load_f64() -> (lm::Gemma, nn::VarStore) {
    let l = lm::checkpoint::load_causal_lm(&fixture_dir(NAME), Device::Cpu, Kind::Double).unwrap();
    (l.model, l.vs)
}

/// A packed row (examples side by side, positions restarting, a block
/// mask) gives the same loss and gradients as the examples one by one:
/// through the per-layer inputs, the shared keys and values, the sliding
/// window and the soft-capped head.
#[test]
fn a_packed_row_gives_the_unpacked_rows_gradients() {
    let (model, vs) = load_f64();
    let e = &expected(NAME)["packed"];
    let examples: Vec<Vec<i64>> = e["examples"].as_array().unwrap().iter().map(|x| ids(&x["ids"])).collect();
    let row: Vec<i64> = examples.concat();
    let pos: Vec<i64> = examples.iter().flat_map(|x| 0..x.len() as i64).collect();
    let targets_of = |x: &[i64]| -> Vec<i64> { x[1..].iter().copied().chain([-100]).collect() };
    let targets: Vec<i64> = examples.iter().flat_map(|x| targets_of(x)).collect();
    let (lp, gp) = loss_and_grads(
        &model,
        &vs,
        &Tensor::from_slice(&row).unsqueeze(0),
        &Tensor::from_slice(&pos).unsqueeze(0),
        Some(&packed_mask(&pos)),
        &Tensor::from_slice(&targets),
        None,
    );
    let mut lu = 0.0;
    let mut gu: Vec<Tensor> = Vec::new();
    for x in &examples {
        let n = x.len() as i64;
        let (l, g) = loss_and_grads(
            &model,
            &vs,
            &Tensor::from_slice(x).unsqueeze(0),
            &Tensor::arange(n, (Kind::Int64, Device::Cpu)).unsqueeze(0),
            None,
            &Tensor::from_slice(&targets_of(x)),
            None,
        );
        lu += l;
        if gu.is_empty() {
            gu = g.into_iter().map(|(_, t)| t).collect();
        } else {
            for (a, (_, b)) in gu.iter_mut().zip(g) {
                *a += b;
            }
        }
    }
    assert!((lp - lu).abs() < 1e-9 * lu.abs(), "loss {lp} packed, {lu} unpacked");
    let mut nonzero = 0;
    for ((n, a), b) in gp.iter().zip(&gu) {
        let d = max_abs_diff(a, b);
        assert!(d < 1e-9, "{n}: gradients differ by {d}");
        nonzero += (a.abs().max().double_value(&[]) > 0.0) as usize;
    }
    assert_eq!(nonzero, gp.len(), "every trainable tensor gets a gradient");
    assert!(examples.iter().any(|x| x.len() as i64 > model.cfg.sliding_window.unwrap()));
}

/// Activation checkpointing (layers recomputed in the backward pass; the
/// per-layer inputs and the shared keys/values handed across as leaves)
/// gives the plain pass's loss and gradients, in a padded batch.
#[test]
fn checkpointing_gives_the_plain_gradients() {
    let _g = serial();
    let (model, vs) = load_f64();
    let e = &expected(NAME)["padded"]["left"];
    let input = tensor2(&e["input_ids"]);
    let (_, t) = input.size2().unwrap();
    let valid = tensor2(&e["attention_mask"]).to_kind(Kind::Bool);
    let positions = tensor2(&e["position_ids"]);
    let mask = padded_causal_mask(&valid, t).unwrap();
    let targets = Tensor::cat(
        &[input.narrow(1, 1, t - 1), Tensor::full([input.size()[0], 1], -100, (Kind::Int64, Device::Cpu))],
        1,
    );
    let targets = targets.where_self(&valid.roll([-1], [1]), &Tensor::from(-100i64));
    let (l0, g0) = loss_and_grads(&model, &vs, &input, &positions, Some(&mask), &targets, None);
    for c in [false, true] {
        let (l, g) = loss_and_grads(&model, &vs, &input, &positions, Some(&mask), &targets, Some(c));
        assert!((l - l0).abs() < 1e-9 * l0.abs(), "checkpointing {c}: loss {l} against {l0}");
        for ((n, a), (_, b)) in g.iter().zip(&g0) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-9, "checkpointing {c}: {n}: gradients differ by {d}");
        }
    }
}

/// With final soft-capping on, autograd's gradient equals central finite
/// differences in f64: for the key projection of a layer whose keys a later
/// layer reuses, the per-layer embeddings, a plain-`w` norm and a
/// q_norm of a reusing layer.
#[test]
fn soft_capped_gradients_equal_finite_differences() {
    let (model, vs) = load_f64();
    let e = expected(NAME);
    let prompt = ids(&e["full_logits"]["prompt"]);
    let t = prompt.len() as i64;
    let x = Tensor::from_slice(&prompt).unsqueeze(0);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let targets: Vec<i64> = prompt[1..].iter().copied().chain([-100]).collect();
    let targets = Tensor::from_slice(&targets);
    let (_, grads) = loss_and_grads(&model, &vs, &x, &pos, None, &targets, None);
    let vars = vs.variables();
    for name in [
        "model.layers.2.self_attn.k_proj.weight",
        "model.layers.3.self_attn.v_proj.weight",
        "model.embed_tokens_per_layer.weight",
        "model.per_layer_model_projection.weight",
        "model.layers.1.post_per_layer_input_norm.weight",
        "model.layers.5.self_attn.q_norm.weight",
    ] {
        let g = &grads.iter().find(|(n, _)| n == name).unwrap().1;
        let v = &vars[name];
        let flat = g.view([-1]);
        // The largest gradient entry and two fixed ones.
        let top = flat.abs().argmax(0, false).int64_value(&[]);
        for idx in [top, 7, flat.size()[0] - 1] {
            let eps = 1e-6;
            let shift = |d: f64| {
                tch::no_grad(|| {
                    let _ = v.view([-1]).get(idx).g_add_(&Tensor::from(d).to_kind(Kind::Double));
                });
                tch::no_grad(|| {
                    let h = model.forward_hidden(&x, &pos, None, None).unwrap();
                    let lp = model.logits(&h).flatten(0, 1).log_softmax(-1, Kind::Double);
                    let picked = lp.gather(1, &targets.view([-1, 1]).clamp_min(0), false).view([-1]);
                    let keep = targets.ge(0).to_kind(Kind::Double);
                    -(picked * keep).sum(Kind::Double).double_value(&[])
                })
            };
            let up = shift(eps);
            let down = shift(-2.0 * eps);
            shift(eps);
            let fd = (up - down) / (2.0 * eps);
            let ad = flat.double_value(&[idx]);
            assert!(
                (fd - ad).abs() <= 1e-6 * ad.abs().max(1.0),
                "{name}[{idx}]: autograd {ad}, finite differences {fd}"
            );
        }
    }
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
    let cfg = lm::lora::LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: lm::lora::TargetModules::Preset("all-linear".into()),
    };
    shared.attach_lora(&avs.root(), &cfg, 0).unwrap();
    assert_eq!(shared.adapter_tensors().len(), 2 * linears.len());
    for (n, t) in shared.base_tensors() {
        assert!(!t.requires_grad(), "{n} is frozen under LoRA");
    }
    let got = tch::no_grad(|| shared.forward(&x).unwrap());
    assert_eq!(max_abs_diff(&got, &want), 0.0);
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

/// In f64 the cache changes nothing beyond rounding: decoding one token at
/// a time equals the full pass to 1e-10 (the f32 test's tolerance hides no
/// logic error).
#[test]
fn kv_cache_decoding_is_exact_in_f64() {
    let (model, _vs) = load_f64();
    let prompt = ids(&expected(NAME)["full_logits"]["prompt"]);
    let t = prompt.len() as i64;
    let x = Tensor::from_slice(&prompt).unsqueeze(0);
    let full = tch::no_grad(|| model.forward(&x).unwrap()).squeeze_dim(0);
    for chunk in [1, 5] {
        let mut cache = KvCache::new(&model.cfg, 1, t, Kind::Double, Device::Cpu).unwrap();
        let mut at = 0;
        while at < t {
            let n = chunk.min(t - at);
            let pos = Tensor::arange_start(at, at + n, (Kind::Int64, Device::Cpu)).unsqueeze(0);
            let h = tch::no_grad(|| {
                model.forward_hidden(&x.narrow(1, at, n), &pos, None, Some(&mut cache)).unwrap()
            });
            let d = max_abs_diff(&model.logits(&h).squeeze_dim(0), &full.narrow(0, at, n));
            assert!(d < 1e-10, "chunks of {chunk}: positions {at}..: max |Δlogit| = {d}");
            at += n;
        }
    }
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
    let (base, _vs) = load_f64();
    let mut model = base.share_base();
    let avs = nn::VarStore::new(Device::Cpu);
    let cfg = lm::lora::LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.2,
        target_modules: lm::lora::TargetModules::Preset("all-linear".into()),
    };
    model.attach_lora(&avs.root(), &cfg, 7).unwrap();
    model.set_training(true);
    // B starts at zero: give it values so that A gets gradients too.
    tch::no_grad(|| {
        for mut t in avs.trainable_variables() {
            let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.05));
        }
    });
    let prompt = ids(&expected(NAME)["full_logits"]["prompt"]);
    let t = prompt.len() as i64;
    let x = Tensor::from_slice(&prompt).unsqueeze(0);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let targets: Vec<i64> = prompt[1..].iter().copied().chain([-100]).collect();
    let targets = Tensor::from_slice(&targets);
    let run = |checkpointing: bool| -> Vec<Tensor> {
        for mut v in avs.trainable_variables() {
            v.zero_grad();
        }
        tch::manual_seed(11);
        model
            .forward_backward(&x, &pos, None, checkpointing, |h| {
                let lp = model.logits(h).flatten(0, 1).log_softmax(-1, Kind::Double);
                let picked = lp.gather(1, &targets.view([-1, 1]).clamp_min(0), false).view([-1]);
                let loss = -(picked * targets.ge(0).to_kind(Kind::Double)).sum(Kind::Double);
                loss.backward();
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
