//! `Gemma::forward_backward`, with and without activation checkpointing,
//! gives the loss and parameter gradients of a plain forward and
//! `loss.backward()` (1e-6): causal and padded masks, frozen parameters,
//! a chunked head, LoRA adapters with dropout.

mod common;

use common::{close, rel_diff, serial, TOL};
use lm::chunked;
use lm::lora::{AdapterSwitch, LoraAdapter};
use lm::model::padded_causal_mask;
use lm::{Gemma, GemmaConfig};
use tch::{nn, Device, Kind, Reduction, Tensor};

struct Setup {
    vs: nn::VarStore,
    model: Gemma,
    ids: Tensor,          // (B, T)
    positions: Tensor,    // (B, T)
    targets: Tensor,      // (B, T)
    mask: Tensor,         // (B, T) bool: positions in the loss
    attn: Option<Tensor>, // (B, 1, T, T) bool
}

/// A seeded test-mqa model (nonzero norm weights) and a batch; `padded`:
/// rows left-padded to different lengths, with the mask the stages use.
fn setup(padded: bool, tied: bool) -> Setup {
    tch::manual_seed(11);
    let mut cfg = GemmaConfig::preset("test-mqa").unwrap();
    cfg.tie_word_embeddings = tied;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Gemma::new(&vs.root(), &cfg).unwrap();
    tch::no_grad(|| {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0)); // a fixed order for the draws
        for (name, mut t) in vars {
            if name.contains("norm") {
                t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    let (b, t) = (3i64, 10i64);
    let v = cfg.vocab_size;
    let mut ids = Tensor::randint_low(3, v, [b, t], (Kind::Int64, Device::Cpu));
    let targets = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
    let mut mask = Tensor::rand([b, t], (Kind::Float, Device::Cpu)).gt(0.2);
    let (positions, attn) = if padded {
        // Row r starts after `pad[r]` padding tokens (left padding).
        let pad = [0i64, 3, 6];
        let valid: Vec<bool> = (0..b).flat_map(|r| (0..t).map(move |j| j >= pad[r as usize])).collect();
        let valid = Tensor::from_slice(&valid).view([b, t]);
        let pos: Vec<i64> = (0..b).flat_map(|r| (0..t).map(move |j| (j - pad[r as usize]).max(0))).collect();
        let _ = ids.masked_fill_(&valid.logical_not(), 0);
        mask = mask.logical_and(&valid);
        (Tensor::from_slice(&pos).view([b, t]), Some(padded_causal_mask(&valid, t).unwrap()))
    } else {
        (Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], true), None)
    };
    Setup { vs, model, ids, positions, targets, mask, attn }
}

/// Every variable's gradient by name (None when undefined).
fn grads(vs: &nn::VarStore) -> Vec<(String, Option<Tensor>)> {
    let mut out: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let g = t.grad();
            (n, g.defined().then(|| g.copy()))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_grads_equal(what: &str, a: &[(String, Option<Tensor>)], b: &[(String, Option<Tensor>)]) {
    assert_eq!(a.len(), b.len());
    let mut nonzero = 0;
    for ((na, ga), (nb, gb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        match (ga, gb) {
            (Some(x), Some(y)) => {
                let d = rel_diff(x, y);
                assert!(d < TOL, "{what}: gradient of {na} differs by {d} (relative)");
                if x.abs().max().double_value(&[]) > 1e-4 {
                    nonzero += 1;
                }
            }
            (None, None) => {}
            _ => panic!("{what}: {na} has a gradient on one side only ({} / {})", ga.is_some(), gb.is_some()),
        }
    }
    assert!(nonzero > 3, "{what}: the test must exercise real gradients ({nonzero} nonzero)");
}

/// The loss the head computes: masked cross-entropy over full logits.
fn loss_of(s: &Setup, h: &Tensor) -> Tensor {
    let logits = s.model.logits(h).to_kind(Kind::Float);
    let v = logits.size()[2];
    let per = logits.reshape([-1, v]).cross_entropy_loss::<Tensor>(
        &s.targets.reshape([-1]),
        None,
        Reduction::None,
        -100,
        0.0,
    );
    (per * s.mask.reshape([-1]).to_kind(Kind::Float)).sum(Kind::Float) / 9.0
}

/// Plain forward and `loss.backward()`: the reference.
fn plain(s: &Setup) -> f64 {
    let h = s.model.forward_hidden(&s.ids, &s.positions, s.attn.as_ref(), None).unwrap();
    let loss = loss_of(s, &h);
    loss.backward();
    loss.double_value(&[])
}

fn through(s: &Setup, checkpointing: bool) -> f64 {
    s.model
        .forward_backward(&s.ids, &s.positions, s.attn.as_ref(), checkpointing, |h| {
            assert!(h.requires_grad() && h.is_leaf(), "the head gets a leaf that requires grad");
            let loss = loss_of(s, h);
            loss.backward();
            Ok(loss.double_value(&[]))
        })
        .unwrap()
}

#[test]
fn checkpointing_gives_the_plain_loss_and_gradients() {
    let _serial = serial();
    for padded in [false, true] {
        for tied in [true, false] {
            let s = setup(padded, tied);
            let want_loss = plain(&s);
            let want = grads(&s.vs);
            for ckpt in [false, true] {
                let s = setup(padded, tied);
                let loss = through(&s, ckpt);
                let what = format!("padded {padded}, tied {tied}, checkpointing {ckpt}");
                assert!(close(loss, want_loss), "{what}: loss {loss} vs {want_loss}");
                assert_grads_equal(&what, &want, &grads(&s.vs));
            }
        }
    }
}

#[test]
fn gradients_accumulate_onto_existing_ones() {
    let _serial = serial();
    let s = setup(true, true);
    plain(&s);
    plain(&s);
    let want = grads(&s.vs);
    for ckpt in [false, true] {
        let s = setup(true, true);
        plain(&s);
        through(&s, ckpt);
        assert_grads_equal(&format!("accumulated, checkpointing {ckpt}"), &want, &grads(&s.vs));
    }
}

#[test]
fn frozen_parameters_get_no_gradient_and_the_chain_continues() {
    let _serial = serial();
    // The embeddings (and so the tied head), the whole last layer and one
    // projection of the first are frozen: the first layer's other weights
    // still get their gradients through the frozen last layer.
    let freeze = |s: &Setup| {
        for (name, t) in s.vs.variables() {
            if name.starts_with("model.embed_tokens")
                || name.starts_with("model.layers.1.")
                || name == "model.layers.0.self_attn.q_proj.weight"
            {
                let _ = t.set_requires_grad(false);
            }
        }
    };
    let s = setup(true, true);
    freeze(&s);
    let want_loss = plain(&s);
    let want = grads(&s.vs);
    assert!(want.iter().any(|(n, g)| n.starts_with("model.layers.0.mlp") && g.is_some()));
    assert!(want.iter().all(|(n, g)| !n.starts_with("model.layers.1.") || g.is_none()));
    for ckpt in [false, true] {
        let s = setup(true, true);
        freeze(&s);
        let loss = through(&s, ckpt);
        assert!(close(loss, want_loss));
        assert_grads_equal(&format!("frozen, checkpointing {ckpt}"), &want, &grads(&s.vs));
    }
    // Everything frozen: nothing to do, nothing fails.
    let s = setup(false, true);
    for (_, t) in s.vs.variables() {
        let _ = t.set_requires_grad(false);
    }
    for ckpt in [false, true] {
        through(&s, ckpt);
        assert!(grads(&s.vs).iter().all(|(_, g)| g.is_none()));
    }
}

#[test]
fn a_chunked_head_gives_the_plain_gradients() {
    let _serial = serial();
    let s = setup(true, false);
    let want_loss = plain(&s);
    let want = grads(&s.vs);
    for ckpt in [false, true] {
        let s = setup(true, false);
        let tgt = s.targets.masked_select(&s.mask);
        let loss = s
            .model
            .forward_backward(&s.ids, &s.positions, s.attn.as_ref(), ckpt, |h| {
                let sel = chunked::select(h, &s.mask)?;
                chunked::cross_entropy_sum(&s.model, &sel, &tgt, 1.0 / 9.0, 4, true)
            })
            .unwrap();
        assert!(close(loss, want_loss), "{loss} vs {want_loss}");
        assert_grads_equal(&format!("chunked head, checkpointing {ckpt}"), &want, &grads(&s.vs));
    }
}

#[test]
fn no_gradient_from_the_head_means_no_backward_and_errors_pass_through() {
    let _serial = serial();
    for ckpt in [false, true] {
        let s = setup(true, true);
        let r =
            s.model.forward_backward(&s.ids, &s.positions, s.attn.as_ref(), ckpt, |h| Ok(h.size())).unwrap();
        assert_eq!(r, [3, 10, 64]);
        assert!(grads(&s.vs).iter().all(|(_, g)| g.is_none()));
        let e = s
            .model
            .forward_backward(&s.ids, &s.positions, s.attn.as_ref(), ckpt, |_| -> anyhow::Result<()> {
                anyhow::bail!("head failed")
            })
            .unwrap_err();
        assert!(format!("{e:#}").contains("head failed"));
        let bad = s.positions.narrow(1, 0, 4);
        assert!(s.model.forward_backward(&s.ids, &bad, None, ckpt, |_| Ok(())).is_err());
    }
}

#[test]
fn runs_with_gradients_under_a_callers_no_grad() {
    let _serial = serial();
    let s = setup(false, true);
    plain(&s);
    let want = grads(&s.vs);
    for ckpt in [false, true] {
        let s = setup(false, true);
        tch::no_grad(|| through(&s, ckpt));
        assert_grads_equal(&format!("under no_grad, checkpointing {ckpt}"), &want, &grads(&s.vs));
    }
}

/// LoRA adapters (B ≠ 0) on every projection of `s.model`, the base frozen.
fn attach_lora(s: &mut Setup, dropout: f64, training: bool) {
    for (_, t) in s.vs.variables() {
        let _ = t.set_requires_grad(false);
    }
    let switch = AdapterSwitch::default();
    switch.set_training(training);
    let root = s.vs.root();
    let r = 4;
    for (name, lin) in s.model.linears_mut() {
        let (out, inp) = (lin.weight.size()[0], lin.weight.size()[1]);
        let p = root.sub("lora").sub(name.replace('.', "_"));
        let lora_a = p.randn("a", &[r, inp], 0.0, 0.1);
        let lora_b = p.randn("b", &[out, r], 0.0, 0.1);
        lin.lora = Some(LoraAdapter { lora_a, lora_b, scaling: 2.0, dropout, switch: switch.clone() });
    }
}

#[test]
fn lora_dropout_draws_the_same_masks_when_recomputed() {
    let _serial = serial();
    let run = |ckpt: bool, dropout: f64, seed: i64| {
        let mut s = setup(true, true);
        attach_lora(&mut s, dropout, true);
        tch::manual_seed(seed);
        let loss = through(&s, ckpt);
        let g = grads(&s.vs);
        assert!(
            g.iter().all(|(n, g)| n.starts_with("lora") == g.is_some()),
            "only the adapters have gradients"
        );
        (loss, g)
    };
    let (loss_plain, plain_g) = run(false, 0.3, 5);
    let (loss_ckpt, ckpt_g) = run(true, 0.3, 5);
    assert!(close(loss_plain, loss_ckpt));
    assert_grads_equal("LoRA with dropout", &plain_g, &ckpt_g);
    // The dropout is real: another seed gives another loss.
    let (other, _) = run(true, 0.3, 6);
    assert!((other - loss_ckpt).abs() > 1e-6, "dropout draws from the seed");
    // Without dropout, equal to the plain forward + backward.
    let mut s = setup(true, true);
    attach_lora(&mut s, 0.0, true);
    let want_loss = plain(&s);
    let want = grads(&s.vs);
    let (loss, g) = run(true, 0.0, 5);
    assert!(close(loss, want_loss));
    assert_grads_equal("LoRA without dropout", &want, &g);
}
