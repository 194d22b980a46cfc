//! Gemma 2 and Gemma 3 against transformers, on the fixtures written by
//! scripts/make_family_fixtures.py (committed; no Python at test time):
//! windows shorter than the prompts, soft-capping on, q/k norms, RoPE per
//! layer type with linear scaling. Beyond parity: KV-cache decoding over a
//! ring cache equals full recomputation, batched generation equals one by
//! one, a packed row gives the unpacked rows' gradients, and the
//! soft-capped model's gradients equal finite differences.

mod common;
use common::*;
use lm::model::{padded_causal_mask, KvCache};
use tch::{nn, Device, Kind, Tensor};

const FAMILIES: &[&str] = &["gemma2", "gemma3"];

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
        for (p, want) in e["prompts"].as_array().unwrap().iter().zip(e["last_logits"].as_array().unwrap()) {
            let prompt = ids(p);
            let d = max_abs_diff(&last_logits(&m.model, &prompt), &Tensor::from_slice(&floats(want)));
            assert!(d < 1e-4, "{name}: prompt of {} tokens: max |Δlogit| = {d}", prompt.len());
        }
        let full = &e["full_logits"];
        let x = Tensor::from_slice(&ids(&full["prompt"])).unsqueeze(0);
        let got = tch::no_grad(|| m.model.forward(&x).unwrap()).flatten(0, -1);
        let d = max_abs_diff(&got, &Tensor::from_slice(&floats(&full["logits"])));
        assert!(d < 1e-4, "{name}: every position: max |Δlogit| = {d}");
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

#[test]
fn a_packed_row_matches_transformers() {
    for name in FAMILIES {
        let m = load(name);
        let e = &expected(name)["packed"];
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
        assert!(d < 1e-4, "{name}: packed row: max |Δlogit| = {d}");
    }
}

/// Decoding one token at a time over the KV cache (sliding layers in a
/// ring of `window` slots), and prefilling in chunks that cross the ring's
/// end, give the logits of one full forward pass at every position.
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
        for chunk in [1, 3, w + 1] {
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
                at += n;
            }
        }
        // The sliding layers' cache is bounded by the window.
        let cap = 4 * t;
        let cache = KvCache::new(&m.model.cfg, 1, cap, Kind::Float, Device::Cpu).unwrap();
        let cfg = &m.model.cfg;
        let full_layers =
            cfg.layer_types.as_ref().unwrap().iter().filter(|l| *l == "full_attention").count() as i64;
        let sliding = cfg.num_hidden_layers - full_layers;
        let per_pos = 2 * cfg.num_kv_heads() * cfg.head_dim() * 4;
        assert_eq!(cache.bytes(), per_pos * (full_layers * cap + sliding * w), "{name}: cache bytes");
    }
}

fn loss_and_grads(
    model: &lm::Gemma,
    vs: &nn::VarStore,
    ids: &Tensor,
    pos: &Tensor,
    mask: Option<&Tensor>,
    targets: &Tensor,
) -> (f64, Vec<(String, Tensor)>) {
    for (_, mut v) in vs.variables() {
        v.zero_grad();
    }
    let h = model.forward_hidden(ids, pos, mask, None).unwrap();
    let logits = model.logits(&h).flatten(0, 1); // (B·T, V)
    let loss =
        logits.log_softmax(-1, Kind::Double).gather(1, &targets.view([-1, 1]).clamp_min(0), false).view([-1]);
    let keep = targets.view([-1]).ge(0).to_kind(Kind::Double);
    let loss = -(loss * keep).sum(Kind::Double);
    loss.backward();
    let mut grads: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, v)| (n, v.grad().detach().copy())).collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    (loss.double_value(&[]), grads)
}

/// A packed row (examples side by side, positions restarting, a block
/// mask) gives the same loss and gradients as the examples one by one.
#[test]
fn a_packed_row_gives_the_unpacked_rows_gradients() {
    for name in FAMILIES {
        let dir = fixture_dir(name);
        let l = lm::checkpoint::load_causal_lm(&dir, Device::Cpu, Kind::Double).unwrap();
        let (model, vs) = (l.model, l.vs);
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
        for ((n, a), b) in gp.iter().zip(&gu) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-9, "{name}: {n}: gradients differ by {d}");
        }
        assert!(
            examples.iter().any(|x| x.len() as i64 > model.cfg.sliding_window.unwrap()),
            "{name}: an example longer than the window"
        );
    }
}

/// With attention and final soft-capping on (Gemma 2), autograd's gradient
/// equals central finite differences in f64, for a projection and a norm.
#[test]
fn soft_capped_gradients_equal_finite_differences() {
    let l = lm::checkpoint::load_causal_lm(&fixture_dir("gemma2"), Device::Cpu, Kind::Double).unwrap();
    let (model, vs) = (l.model, l.vs);
    let e = expected("gemma2");
    let prompt = ids(&e["full_logits"]["prompt"]);
    let t = prompt.len() as i64;
    let x = Tensor::from_slice(&prompt).unsqueeze(0);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let targets: Vec<i64> = prompt[1..].iter().copied().chain([-100]).collect();
    let targets = Tensor::from_slice(&targets);
    let (_, grads) = loss_and_grads(&model, &vs, &x, &pos, None, &targets);
    let vars = vs.variables();
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.post_feedforward_layernorm.weight"]
    {
        let g = &grads.iter().find(|(n, _)| n == name).unwrap().1;
        let v = &vars[name];
        let flat = g.view([-1]);
        for idx in [0i64, 7, flat.size()[0] - 1] {
            let eps = 1e-6;
            let shift = |d: f64| {
                tch::no_grad(|| {
                    let _ = v.view([-1]).get(idx).g_add_(&Tensor::from(d).to_kind(Kind::Double));
                });
                let (l, _) = tch::no_grad(|| {
                    let h = model.forward_hidden(&x, &pos, None, None).unwrap();
                    let lp = model.logits(&h).flatten(0, 1).log_softmax(-1, Kind::Double);
                    let picked = lp.gather(1, &targets.view([-1, 1]).clamp_min(0), false).view([-1]);
                    let keep = targets.ge(0).to_kind(Kind::Double);
                    (-(picked * keep).sum(Kind::Double).double_value(&[]), ())
                });
                l
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
        let input = Tensor::from_slice(&ids(&e["input_ids"])).unsqueeze(0);
        let pos = ids(&e["position_ids"]);
        let target = Tensor::from_slice(&ids(&e["target"]));
        let keep: Vec<bool> = e["mask"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
        let keep = Tensor::from_slice(&keep).to_kind(Kind::Float);
        let h = l
            .model
            .forward_hidden(&input, &Tensor::from_slice(&pos).unsqueeze(0), Some(&packed_mask(&pos)), None)
            .unwrap();
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
