//! Gemma 2, Gemma 3 and Gemma 4 against transformers, on the fixtures
//! written by scripts/make_family_fixtures.py (committed; no Python at test
//! time): windows shorter than the prompts, soft-capping on, q/k norms, RoPE
//! per layer type with linear scaling (Gemma 2, 3), and Gemma 4's layers
//! (tests/gemma4.rs checks the fixture has them all). Every check runs on
//! every fixture: beyond parity, KV-cache decoding over a ring cache equals
//! full recomputation (exactly in f64), batched generation equals one by
//! one, a packed row gives the unpacked rows' gradients, checkpointing
//! gives the plain gradients, and the soft-capped model's gradients equal
//! finite differences and transformers'.

mod common;
use common::*;
use lm::family::{KvSharing, Span};
use lm::model::{padded_causal_mask, KvCache};
use tch::{Device, Kind, Tensor};

const FAMILIES: &[&str] = &["gemma2", "gemma3", "gemma4"];

#[test]
fn family_configs_need_windows_shorter_than_the_prompts() {
    for name in FAMILIES {
        let m = load(name);
        let e = expected(name);
        let w = m.model.cfg.sliding_window.unwrap();
        let longest = e["prompts"].as_array().unwrap().iter().map(|p| ids(p).len()).max().unwrap();
        assert!((longest as i64) > 2 * w, "{name}: prompts of {longest} tokens, window {w}");
        assert!(m.model.cfg.final_logit_softcapping.is_some(), "{name}: final soft-capping on");
    }
    assert!(load("gemma2").model.cfg.attn_logit_softcapping.is_some());
}

#[test]
fn logits_match_transformers() {
    for name in FAMILIES {
        let m = load(name);
        let e = expected(name);
        let mut worst = 0f64;
        for (p, want) in e["prompts"].as_array().unwrap().iter().zip(e["last_logits"].as_array().unwrap()) {
            let prompt = ids(p);
            let d = max_abs_diff(&last_logits(&m.model, &prompt), &Tensor::from_slice(&floats(want)));
            assert!(d < 1e-4, "{name}: prompt of {} tokens: max |Δlogit| = {d}", prompt.len());
            worst = worst.max(d);
        }
        let full = &e["full_logits"];
        let x = Tensor::from_slice(&ids(&full["prompt"])).unsqueeze(0);
        let got = tch::no_grad(|| m.model.forward(&x).unwrap()).flatten(0, -1);
        let d = max_abs_diff(&got, &Tensor::from_slice(&floats(&full["logits"])));
        assert!(d < 1e-4, "{name}: every position: max |Δlogit| = {d}");
        eprintln!("{name} parity: last-position max |Δlogit| {worst:.2e}, every position {d:.2e}");
    }
}

#[test]
fn greedy_ids_match_transformers_one_by_one_and_batched() {
    for name in FAMILIES {
        let m = load(name);
        let e = expected(name);
        let n = e["max_new_tokens"].as_u64().unwrap() as usize;
        let prompts = mat(&e["prompts"]);
        let want = mat(&e["greedy"]);
        for (p, w) in prompts.iter().zip(&want) {
            let g = lm::generate(&m.model, std::slice::from_ref(p), &greedy(n)).unwrap();
            assert_eq!(&g[0].tokens, w, "{name}: greedy continuation of a {}-token prompt", p.len());
        }
        // One left-padded batch gives what each prompt gives alone.
        let g = lm::generate(&m.model, &prompts, &greedy(n)).unwrap();
        for (r, (gi, w)) in g.iter().zip(&want).enumerate() {
            assert_eq!(&gi.tokens, w, "{name}: batched greedy row {r}");
        }
        let pg = mat(&e["padded"]["greedy"]);
        for (r, (gi, w)) in g.iter().zip(&pg).enumerate() {
            let stop = w.iter().position(|&x| x == 1 || x == 5).map_or(w.len(), |i| i + 1);
            assert_eq!(gi.tokens, w[..stop], "{name}: transformers' batched greedy row {r}");
        }
    }
}

#[test]
fn padded_batches_match_transformers() {
    for name in FAMILIES {
        let m = load(name);
        let e = &expected(name)["padded"];
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
                assert!(d < 1e-4, "{name}: {side}-padded row {r}: max |Δlogit| = {d}");
            }
        }
    }
}

/// The fixture's packed row: its ids and positions (1, T), its block mask.
fn packed_row(e: &serde_json::Value) -> (Tensor, Tensor, Tensor) {
    let pos = ids(&e["position_ids"]);
    let input = Tensor::from_slice(&ids(&e["input_ids"])).unsqueeze(0);
    (input, Tensor::from_slice(&pos).unsqueeze(0), packed_mask(&pos))
}

#[test]
fn a_packed_row_matches_transformers() {
    for name in FAMILIES {
        let m = load(name);
        let e = &expected(name)["packed"];
        let (input, positions, mask) = packed_row(e);
        let got = tch::no_grad(|| {
            let h = m.model.forward_hidden(&input, &positions, Some(&mask), None).unwrap();
            m.model.logits(&h)
        })
        .flatten(0, -1);
        let d = max_abs_diff(&got, &Tensor::from_slice(&floats(&e["logits"])));
        assert!(d < 1e-4, "{name}: packed row: max |Δlogit| = {d}");
    }
}

/// Decoding one token at a time over the KV cache (sliding layers in a
/// ring of `window` slots; Gemma 4's reusing layers reading their sources'
/// keys from the same step), and prefilling in chunks that cross the ring's
/// end or in one, give the logits of one full forward pass at every
/// position; in a padded batch too. The cache holds what each layer's spec
/// says: its own KV heads and head_dim, a ring of `window` slots for a
/// sliding layer, none for a layer reusing another's keys and values.
#[test]
fn kv_cache_decoding_equals_full_recomputation_past_the_window() {
    for name in FAMILIES {
        let m = load(name);
        let e = expected(name);
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
                assert!(
                    d < 1e-4,
                    "{name}: chunks of {chunk}: positions {at}..{}: max |Δlogit| = {d}",
                    at + n
                );
                worst = worst.max(d);
                at += n;
            }
        }
        eprintln!("{name} cache vs recompute: max |Δlogit| {worst:.2e}");
        // A left-padded batch decoded over the cache: each row as alone.
        let prompts = mat(&e["prompts"]);
        let g = lm::generate(&m.model, &prompts, &greedy(12)).unwrap();
        for (p, gi) in prompts.iter().zip(&g) {
            let mut ids = p.clone();
            for &tok in &gi.tokens {
                let x = Tensor::from_slice(&ids).unsqueeze(0);
                let logits = tch::no_grad(|| m.model.forward(&x).unwrap());
                let next = logits.get(0).get(ids.len() as i64 - 1).argmax(0, false).int64_value(&[]);
                assert_eq!(next, tok, "{name}: batched cache decoding against full recomputation");
                ids.push(tok);
            }
        }
        // The cache, layer by layer as the specs say; the specs' spans are
        // the config's layer_types.
        let cfg = &m.model.cfg;
        let cap = 4 * t;
        let cache = KvCache::new(cfg, 1, cap, Kind::Float, Device::Cpu).unwrap();
        let specs = lm::family::layer_specs(cfg, cfg.family().unwrap()).unwrap();
        let types = cfg.layer_types.as_ref().unwrap();
        assert_eq!(specs.len(), types.len(), "{name}: a spec per layer");
        for (i, (s, ty)) in specs.iter().zip(types).enumerate() {
            let want = if ty == "full_attention" { Span::Full } else { Span::Sliding(w) };
            assert_eq!(s.span, want, "{name}: layer {i} is {ty}");
        }
        let want: i64 = specs
            .iter()
            .filter(|s| !s.gemma4.is_some_and(|g| matches!(g.kv, KvSharing::Reuse(_))))
            .map(|s| {
                let slots = match s.span {
                    Span::Full => cap,
                    Span::Sliding(w) => w,
                };
                2 * s.num_kv_heads * s.head_dim * 4 * slots
            })
            .sum();
        assert_eq!(cache.bytes(), want, "{name}: cache bytes");
    }
}

/// In f64 the cache changes nothing beyond rounding: decoding one token at
/// a time, or five, equals the full pass to 1e-10 (the f32 test's tolerance
/// hides no logic error).
#[test]
fn kv_cache_decoding_is_exact_in_f64() {
    for name in FAMILIES {
        let (model, _vs) = load_f64(name);
        let prompt = ids(&expected(name)["full_logits"]["prompt"]);
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
                assert!(d < 1e-10, "{name}: chunks of {chunk}: positions {at}..: max |Δlogit| = {d}");
                at += n;
            }
        }
    }
}

/// A packed row (examples side by side, positions restarting, a block
/// mask) gives the same loss and gradients as the examples one by one
/// (Gemma 4: through the per-layer inputs, the shared keys and values, the
/// sliding window and the soft-capped head), and every trainable tensor
/// gets a gradient.
#[test]
fn a_packed_row_gives_the_unpacked_rows_gradients() {
    for name in FAMILIES {
        let (model, vs) = load_f64(name);
        let e = &expected(name)["packed"];
        let examples: Vec<Vec<i64>> =
            e["examples"].as_array().unwrap().iter().map(|x| ids(&x["ids"])).collect();
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
        assert!((lp - lu).abs() < 1e-9 * lu.abs(), "{name}: loss {lp} packed, {lu} unpacked");
        // Every parameter, as transformers counts them, has its gradient.
        let numel: i64 = gp.iter().map(|(_, g)| g.numel() as i64).sum();
        assert_eq!(numel, model.cfg.num_parameters(), "{name}: gradients of every parameter");
        let mut nonzero = 0;
        for ((n, a), b) in gp.iter().zip(&gu) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-9, "{name}: {n}: gradients differ by {d}");
            nonzero += (a.abs().max().double_value(&[]) > 0.0) as usize;
        }
        assert_eq!(nonzero, gp.len(), "{name}: every trainable tensor gets a gradient");
        assert!(
            examples.iter().any(|x| x.len() as i64 > model.cfg.sliding_window.unwrap()),
            "{name}: an example longer than the window"
        );
    }
}

/// Activation checkpointing (layers recomputed in the backward pass;
/// Gemma 4's per-layer inputs and shared keys/values handed across as
/// leaves) gives the plain pass's loss and gradients, in a padded batch.
#[test]
fn checkpointing_gives_the_plain_gradients() {
    let _g = serial();
    for name in FAMILIES {
        let (model, vs) = load_f64(name);
        let e = &expected(name)["padded"]["left"];
        let input = tensor2(&e["input_ids"]);
        let (_, t) = input.size2().unwrap();
        let valid = tensor2(&e["attention_mask"]).to_kind(Kind::Bool);
        let positions = tensor2(&e["position_ids"]);
        let mask = padded_causal_mask(&valid, t).unwrap();
        let targets = Tensor::cat(
            &[
                input.narrow(1, 1, t - 1),
                Tensor::full([input.size()[0], 1], -100, (Kind::Int64, Device::Cpu)),
            ],
            1,
        );
        let targets = targets.where_self(&valid.roll([-1], [1]), &Tensor::from(-100i64));
        let (l0, g0) = loss_and_grads(&model, &vs, &input, &positions, Some(&mask), &targets, None);
        for c in [false, true] {
            let (l, g) = loss_and_grads(&model, &vs, &input, &positions, Some(&mask), &targets, Some(c));
            assert!((l - l0).abs() < 1e-9 * l0.abs(), "{name}: checkpointing {c}: loss {l} against {l0}");
            for ((n, a), (_, b)) in g.iter().zip(&g0) {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-9, "{name}: checkpointing {c}: {n}: gradients differ by {d}");
            }
        }
    }
}

/// With attention and final soft-capping on (Gemma 2), autograd's gradient
/// equals central finite differences in f64, for a projection and a norm
/// (tests/gemma4.rs checks Gemma 4's own tensors).
#[test]
fn soft_capped_gradients_equal_finite_differences() {
    assert_gradients_equal_finite_differences(
        "gemma2",
        &["model.layers.0.self_attn.q_proj.weight", "model.layers.1.post_feedforward_layernorm.weight"],
    );
}

/// A config align cannot run is refused naming the field: an unknown
/// `model_type`, an unknown `layer_types` entry, a window that is not
/// positive, a RoPE type align does not compute, bidirectional attention.
#[test]
fn bad_family_configs_are_errors_naming_the_field() {
    let text = std::fs::read_to_string(fixture_dir("gemma3").join("config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    let check = |edit: &dyn Fn(&mut serde_json::Value), want: &[&str]| {
        let mut v = base.clone();
        edit(&mut v);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        let e = format!("{:#}", lm::checkpoint::read_config(dir.path()).unwrap_err());
        for w in want {
            assert!(e.contains(w), "{e}\nshould say {w:?}");
        }
    };
    check(&|v| v["model_type"] = "llama".into(), &["model_type is \"llama\"", "\"gemma3_text\""]);
    check(&|v| v["layer_types"][2] = "chunked_attention".into(), &["layer_types[2]", "chunked_attention"]);
    check(&|v| v["layer_types"] = serde_json::json!(["full_attention"]), &["layer_types has 1 entries"]);
    check(&|v| v["sliding_window"] = 0.into(), &["sliding_window must be positive"]);
    check(
        &|v| v["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into(),
        &["rope_parameters.full_attention.rope_type", "yarn"],
    );
    check(&|v| v["use_bidirectional_attention"] = true.into(), &["use_bidirectional_attention"]);
}

/// The packed row's mean loss and its gradients (soft-capping inside the
/// loss) equal transformers' autograd: every norm weight's gradient value
/// by value, every parameter's gradient norm.
#[test]
fn packed_loss_gradients_equal_transformers() {
    for name in FAMILIES {
        let l = load(name);
        let e = &expected(name)["packed"];
        let (input, positions, mask) = packed_row(e);
        let target = Tensor::from_slice(&ids(&e["target"]));
        let keep: Vec<bool> = e["mask"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
        let keep = Tensor::from_slice(&keep).to_kind(Kind::Float);
        let h = l.model.forward_hidden(&input, &positions, Some(&mask), None).unwrap();
        let logp = l.model.logits(&h).squeeze_dim(0).log_softmax(-1, Kind::Float);
        let nll = -logp.gather(1, &target.view([-1, 1]), false).view([-1]);
        let loss = (nll * &keep).sum(Kind::Float) / keep.sum(Kind::Float);
        let want = e["loss"].as_f64().unwrap();
        assert!((loss.double_value(&[]) - want).abs() < 1e-5, "{name}: loss {loss:?} vs {want}");
        loss.backward();
        let vars = l.vs.variables();
        for (n, g) in e["grads"].as_object().unwrap() {
            let got = vars[n].grad().view([-1]);
            let want = Tensor::from_slice(&floats(g));
            let scale = want.abs().max().double_value(&[]).max(1e-3);
            let d = max_abs_diff(&got, &want) / scale;
            assert!(d < 1e-3, "{name}: gradient of {n} differs from transformers' by {d} (relative)");
        }
        for (n, want) in e["grad_norms"].as_object().unwrap() {
            let got = vars[n].grad().norm().double_value(&[]);
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-4 * want.max(1.0),
                "{name}: |∇{n}| = {got}, transformers {want}"
            );
        }
    }
}

/// A Gemma 2 config without the soft-capping keys gets transformers'
/// defaults (50 and 30); an explicit null turns them off.
#[test]
fn gemma2_soft_capping_defaults_when_the_keys_are_absent() {
    let text = std::fs::read_to_string(fixture_dir("gemma2").join("config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    let read = |v: &serde_json::Value| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_string(v).unwrap()).unwrap();
        lm::GemmaConfig::from_file(&path).unwrap()
    };
    let mut absent = base.clone();
    absent.as_object_mut().unwrap().remove("attn_logit_softcapping");
    absent.as_object_mut().unwrap().remove("final_logit_softcapping");
    let c = read(&absent);
    assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (Some(50.0), Some(30.0)));
    let mut null = base.clone();
    null["attn_logit_softcapping"] = serde_json::Value::Null;
    null["final_logit_softcapping"] = serde_json::Value::Null;
    let c = read(&null);
    assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (None, None));
    // Written back as null, so a save of a model without soft-capping reads back without.
    let again: serde_json::Value = serde_json::from_str(&c.to_json().unwrap()).unwrap();
    let c = read(&again);
    assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (None, None));
}
