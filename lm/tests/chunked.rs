//! Chunked cross-entropy, log-probabilities and entropy (`lm::chunked`)
//! equal the full computation over all (B, T, V) logits, in value and in
//! gradient (1e-6), with masked positions and chunk sizes that do not
//! divide the number of positions; tied and untied heads.

mod common;

use common::{close, rel_diff, serial, TOL};
use lm::chunked::{self, DEFAULT_CHUNK};
use lm::generate::sampling_log_softmax;
use lm::{Gemma, GemmaConfig};
use tch::{nn, Device, Kind, Reduction, Tensor};

struct Setup {
    vs: nn::VarStore,
    model: Gemma,
    ids: Tensor,       // (B, T)
    positions: Tensor, // (B, T)
    targets: Tensor,   // (B, T)
    mask: Tensor,      // (B, T) bool
}

/// A test-mqa model (tied or untied head), seeded, with nonzero norm
/// weights, and a batch whose mask leaves out some positions of each row.
fn setup(tied: bool) -> Setup {
    tch::manual_seed(7);
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
    let (b, t) = (3, 11);
    let v = cfg.vocab_size;
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
    let targets = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], true);
    let mask = Tensor::rand([b, t], (Kind::Float, Device::Cpu)).gt(0.3);
    let _ = mask.get(0).get(0).fill_(0); // some false, some true in every case
    let _ = mask.get(1).get(t - 1).fill_(1);
    Setup { vs, model, ids, positions, targets, mask }
}

/// Every variable's gradient by name (None when undefined). Each run that
/// accumulates gradients uses a fresh [`setup`] (the same seeded model).
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

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
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
            (x, y) => {
                // An undefined gradient and an all-zero one are the same.
                let z = x.as_ref().or(y.as_ref()).unwrap();
                assert!(
                    z.abs().max().double_value(&[]) == 0.0,
                    "{what}: {na} has a gradient on one side only"
                );
            }
        }
    }
    assert!(nonzero > 5, "{what}: the test must exercise real gradients ({nonzero} nonzero)");
}

fn hidden(s: &Setup) -> Tensor {
    s.model.forward_hidden(&s.ids, &s.positions, None, None).unwrap()
}

/// The full computation: (B, T, V) f32 logits, per-token loss, masked sum.
fn full_ce(s: &Setup, h: &Tensor, scale: f64) -> Tensor {
    let logits = s.model.logits(h).to_kind(Kind::Float);
    let v = logits.size()[2];
    let per = logits.reshape([-1, v]).cross_entropy_loss::<Tensor>(
        &s.targets.reshape([-1]),
        None,
        Reduction::None,
        -100,
        0.0,
    );
    (per * s.mask.reshape([-1]).to_kind(Kind::Float)).sum(Kind::Float) * scale
}

#[test]
fn select_gathers_the_masked_rows_in_order() {
    let _serial = serial();
    let s = setup(true);
    let h = tch::no_grad(|| hidden(&s));
    let sel = chunked::select(&h, &s.mask).unwrap();
    let n = s.mask.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(sel.size(), [n, h.size()[2]]);
    let expect = h.masked_select(&s.mask.unsqueeze(-1)).reshape([n, -1]);
    assert_eq!(max_diff(&sel, &expect), 0.0);
    assert!(chunked::select(&h, &s.mask.narrow(1, 0, 3)).is_err(), "a mask of the wrong shape is an error");
}

#[test]
fn cross_entropy_equals_the_full_computation_in_value_and_gradient() {
    let _serial = serial();
    for tied in [true, false] {
        let scale = 1.0 / 7.0;
        let s = setup(tied);
        let full = full_ce(&s, &hidden(&s), scale);
        full.backward();
        let want = grads(&s.vs);
        let full = full.double_value(&[]);
        let n = s.mask.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        assert!(n > 10);
        for chunk in [1, 3, 7, n - 1, n, n + 5, DEFAULT_CHUNK] {
            // Values only: no gradient anywhere.
            let s = setup(tied);
            let tgt = s.targets.masked_select(&s.mask);
            let h = hidden(&s);
            let sel = chunked::select(&h, &s.mask).unwrap();
            let value = chunked::cross_entropy_sum(&s.model, &sel, &tgt, scale, chunk, false).unwrap();
            assert!(close(value, full), "chunk {chunk}: {value} vs {full}");
            assert!(s.vs.variables().values().all(|t| !t.grad().defined()), "no backward without `backward`");
            // With backward: through the chunks into the whole model.
            let value = chunked::cross_entropy_sum(&s.model, &sel, &tgt, scale, chunk, true).unwrap();
            assert!(close(value, full), "chunk {chunk} with backward: {value} vs {full}");
            assert_grads_equal(&format!("tied {tied}, chunk {chunk}"), &want, &grads(&s.vs));
        }
    }
}

#[test]
fn cross_entropy_ignores_target_minus_100_and_handles_no_positions() {
    let _serial = serial();
    let s = setup(true);
    let h = tch::no_grad(|| hidden(&s));
    let sel = chunked::select(&h, &s.mask).unwrap();
    let tgt = s.targets.masked_select(&s.mask);
    let cut = tgt.copy();
    let _ = cut.narrow(0, 0, 4).fill_(-100);
    let a = chunked::cross_entropy_sum(&s.model, &sel, &cut, 1.0, 3, false).unwrap();
    let b = chunked::cross_entropy_sum(
        &s.model,
        &sel.narrow(0, 4, sel.size()[0] - 4),
        &tgt.narrow(0, 4, tgt.size()[0] - 4),
        1.0,
        5,
        false,
    )
    .unwrap();
    assert!(close(a, b), "{a} vs {b}");
    let none = chunked::cross_entropy_sum(&s.model, &sel.narrow(0, 0, 0), &tgt.narrow(0, 0, 0), 1.0, 4, true)
        .unwrap();
    assert_eq!(none, 0.0);
    assert!(chunked::cross_entropy_sum(&s.model, &sel, &tgt, 1.0, 0, false).is_err(), "chunk 0 is an error");
    assert!(chunked::cross_entropy_sum(&s.model, &sel, &tgt.narrow(0, 0, 2), 1.0, 4, false).is_err());
}

#[test]
fn token_logprobs_and_entropy_equal_the_full_computation() {
    let _serial = serial();
    for tied in [true, false] {
        let s = setup(tied);
        let h = tch::no_grad(|| hidden(&s));
        for temperature in [1.0, 0.7, 0.0] {
            let logp_all = sampling_log_softmax(&s.model.logits(&h).to_kind(Kind::Float), temperature); // (B, T, V)
            let lp_full =
                logp_all.gather(-1, &s.targets.unsqueeze(-1), false).squeeze_dim(-1).masked_select(&s.mask);
            let ent_full = (-(logp_all.exp() * &logp_all).sum_dim_intlist(-1, false, Kind::Float))
                .masked_select(&s.mask);
            let sel = chunked::select(&h, &s.mask).unwrap();
            let tgt = s.targets.masked_select(&s.mask);
            let n = tgt.size()[0];
            for chunk in [1, 4, n - 1, n, n + 3] {
                let (lp, ent) =
                    chunked::token_logprobs(&s.model, &sel, &tgt, temperature, chunk, true).unwrap();
                assert_eq!(lp.kind(), Kind::Float);
                assert!(rel_diff(&lp, &lp_full) < TOL, "T {temperature} chunk {chunk}: log-probs");
                assert!(rel_diff(&ent.unwrap(), &ent_full) < TOL, "T {temperature} chunk {chunk}: entropy");
                let (lp2, none) =
                    chunked::token_logprobs(&s.model, &sel, &tgt, temperature, chunk, false).unwrap();
                assert!(none.is_none());
                assert_eq!(max_diff(&lp, &lp2), 0.0);
            }
        }
    }
}

/// A loss over log-probabilities and entropies that is not linear in them.
fn rl_like_loss(lp: &Tensor, ent: &Tensor, w: &Tensor) -> Tensor {
    (lp * w).sum(Kind::Float) + (lp.exp() - 1.0).pow_tensor_scalar(2).sum(Kind::Float) * 0.3
        - ent.sum(Kind::Float) * 0.01
}

/// The full computation's log-probs and entropies at the masked positions,
/// with a graph through the (B, T, V) log-softmax.
fn full_logprobs(s: &Setup, temperature: f64) -> (Tensor, Tensor) {
    let h = hidden(s);
    let logp_all = sampling_log_softmax(&s.model.logits(&h).to_kind(Kind::Float), temperature);
    let lp = logp_all.gather(-1, &s.targets.unsqueeze(-1), false).squeeze_dim(-1).masked_select(&s.mask);
    let ent = (-(logp_all.exp() * &logp_all).sum_dim_intlist(-1, false, Kind::Float)).masked_select(&s.mask);
    (lp, ent)
}

#[test]
fn token_logprobs_backward_gives_the_gradients_of_the_full_log_softmax() {
    let _serial = serial();
    for tied in [true, false] {
        for temperature in [1.0, 0.6] {
            let s = setup(tied);
            let n = s.mask.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
            let w = Tensor::randn([n], (Kind::Float, Device::Cpu));
            // Full, log-probs and entropy.
            let (lp, ent) = full_logprobs(&s, temperature);
            let full_loss = rl_like_loss(&lp, &ent, &w);
            full_loss.backward();
            let want = grads(&s.vs);
            let full_loss = full_loss.double_value(&[]);
            // Full, log-probs only (the entropy term constant).
            let s = setup(tied);
            let (lp, ent) = full_logprobs(&s, temperature);
            let ent_const = ent.detach();
            rl_like_loss(&lp, &ent_const, &w).backward();
            let want_lp_only = grads(&s.vs);
            for chunk in [1, 5, n - 2, n + 1] {
                // values → leaves → loss → backward → chunked backward.
                let s = setup(tied);
                let tgt = s.targets.masked_select(&s.mask);
                let h = hidden(&s);
                let sel = chunked::select(&h, &s.mask).unwrap();
                let (lpv, entv) =
                    chunked::token_logprobs(&s.model, &sel, &tgt, temperature, chunk, true).unwrap();
                let lp_leaf = lpv.set_requires_grad(true);
                let ent_leaf = entv.unwrap().set_requires_grad(true);
                let loss = rl_like_loss(&lp_leaf, &ent_leaf, &w);
                assert!(close(loss.double_value(&[]), full_loss));
                loss.backward();
                chunked::token_logprobs_backward_with(
                    &s.model,
                    &sel,
                    &tgt,
                    temperature,
                    chunk,
                    Some(&lp_leaf.grad()),
                    Some(&ent_leaf.grad()),
                )
                .unwrap();
                let what = format!("tied {tied}, T {temperature}, chunk {chunk}, log-probs and entropy");
                assert_grads_equal(&what, &want, &grads(&s.vs));
                // The plain form: the log-probs' gradient only.
                let s = setup(tied);
                let h = hidden(&s);
                let sel = chunked::select(&h, &s.mask).unwrap();
                let (lpv, _) =
                    chunked::token_logprobs(&s.model, &sel, &tgt, temperature, chunk, false).unwrap();
                let lp_leaf = lpv.set_requires_grad(true);
                rl_like_loss(&lp_leaf, &ent_const, &w).backward();
                chunked::token_logprobs_backward(&s.model, &sel, &tgt, temperature, chunk, &lp_leaf.grad())
                    .unwrap();
                let what = format!("tied {tied}, T {temperature}, chunk {chunk}, log-probs");
                assert_grads_equal(&what, &want_lp_only, &grads(&s.vs));
            }
        }
    }
}

#[test]
fn an_undefined_gradient_does_nothing() {
    let _serial = serial();
    let s = setup(true);
    let h = hidden(&s);
    let sel = chunked::select(&h, &s.mask).unwrap();
    let tgt = s.targets.masked_select(&s.mask);
    let leaf = Tensor::zeros([tgt.size()[0]], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    chunked::token_logprobs_backward(&s.model, &sel, &tgt, 1.0, 4, &leaf.grad()).unwrap();
    assert!(s.vs.variables().values().all(|t| !t.grad().defined()));
}

#[test]
fn grad_enabled_sees_no_grad() {
    let _serial = serial();
    assert!(chunked::grad_enabled());
    tch::no_grad(|| assert!(!chunked::grad_enabled()));
    assert!(chunked::grad_enabled());
}
