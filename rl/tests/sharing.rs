//! RL at real size: a LoRA policy whose reference is itself with the
//! adapters off, a LoRA reward model over the same base weights (one copy
//! of the base for all three), only adapters trained, the update on
//! `forward_backward` and chunked log-probs equal to the full-logits one,
//! and a LoRA run killed and resumed bit-identical.

mod common;

use common::{config, fixture, full_logprobs, write_prompts, LowIds};
use lm::checkpoint::load_causal_lm;
use lm::lora::LoraConfig;
use lm::peft::{self, TaskType};
use rl::rollout::TeacherBatch;
use rl::{KlMode, Reference, RewardConfig, RewardFn, Rollout, Trainer};
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

const LORA: &str = "lora = { rank = 4, alpha = 8.0 }";

/// A few chat prompts on the fixture's tokenizer.
fn prompts() -> Vec<Arc<rl::Prompt>> {
    let tok = lm::Tokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    ["Tell me about rivers", "Name a star", "Why is bread soft?", "Hi"]
        .iter()
        .map(|q| {
            let messages = vec![lm::Message::user(*q)];
            let ids = lm::chat::prompt_ids(&tok, &messages).unwrap();
            Arc::new(rl::Prompt { messages, ids, category: None })
        })
        .collect()
}

fn trainer(cfg: &rl::RlConfig, dir: &Path, reward: Option<Box<dyn RewardFn>>) -> Trainer {
    rl::run::load_trainer(cfg, dir, reward).unwrap().0
}

fn batch(r: &[Rollout], t: &Trainer) -> TeacherBatch {
    TeacherBatch::new(r, 0..r.len(), t.specials.pad, Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn lora_reference_is_the_base_model_exactly_and_only_adapters_train() {
    let d = tempfile::tempdir().unwrap();
    let prompts_file = write_prompts(d.path(), 8);
    let cfg = config(d.path(), &prompts_file, &format!("{LORA}\nbeta = 0.1"));
    let mut t = trainer(&cfg, d.path(), Some(Box::new(LowIds { below: 128 })));
    assert!(matches!(t.reference, Reference::AdaptersOff), "no second model under LoRA");
    assert_eq!(t.reference_model().base_tensors()[Q].data_ptr(), t.policy.base_tensors()[Q].data_ptr());
    let base = load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let p = prompts();
    let r = t.rollouts(0, &p).unwrap();
    let b = batch(&r, &t);
    let temp = t.cfg.temperature;
    let base_lp = rl::rollout::response_logprobs(&base.model, &b, false, temp).unwrap().0;
    assert!(t.reference_logprobs(&b).unwrap().equal(&base_lp), "before any update");

    for s in 0..3 {
        let (st, _) = t.step(s, &p).unwrap();
        if s == 0 {
            assert_eq!(st.kl, 0.0, "B = 0: the policy is the base");
        }
    }
    // The policy moved; the reference is still the base, exactly.
    let pol = rl::rollout::response_logprobs(&t.policy, &b, false, temp).unwrap().0;
    assert!(max_abs(&pol, &base_lp) > 1e-4, "the adapters should have moved the policy");
    assert!(t.reference_logprobs(&b).unwrap().equal(&base_lp), "after updates");
    assert!(t.policy.adapter_switch().unwrap().enabled(), "adapters back on after the reference pass");

    // Only the adapters have optimiser state and gradients: 7 projections
    // × 2 layers × (A, B).
    let layers = t.policy.cfg.num_hidden_layers as usize;
    let names = t.updater.opt.names();
    assert_eq!(t.updater.opt.num_params(), 7 * layers * 2, "{names:?}");
    assert!(
        names.iter().all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")),
        "{names:?}"
    );
    for (n, v) in t.policy_weights.base.variables() {
        assert!(!v.requires_grad(), "{n} is frozen");
        assert!(!v.grad().defined(), "{n} has a gradient");
    }
    let lora = t.policy_weights.lora.as_ref().unwrap();
    assert_eq!(lora.vs.variables().len(), 7 * layers * 2);
    let moved = lora
        .vs
        .variables()
        .iter()
        .filter(|(n, v)| n.ends_with("lora_B.weight") && v.abs().max().double_value(&[]) > 0.0)
        .count();
    assert_eq!(moved, 7 * layers, "every B moved from zero");
}

/// A reward stage's LoRA output over the fixture: `X/adapter` (SEQ_CLS,
/// random B and score head, base = the fixture) and `X/model` (merged),
/// with reward statistics.
fn make_lora_reward_model(x: &Path) -> std::path::PathBuf {
    let l = load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let mut m = l.model;
    let avs = tch::nn::VarStore::new(Device::Cpu);
    let lcfg = LoraConfig { rank: 4, alpha: 8.0, ..Default::default() };
    m.attach_lora(&avs.root(), &lcfg, 5).unwrap();
    tch::manual_seed(3);
    tch::no_grad(|| {
        for (n, v) in avs.variables() {
            if n.ends_with("lora_B.weight") {
                v.shallow_clone().copy_(&(v.randn_like() * 0.05));
            }
        }
    });
    let score = Tensor::randn([1, m.cfg.hidden_size], (Kind::Float, Device::Cpu)) * 0.1;
    let base = std::fs::canonicalize(fixture()).unwrap();
    let adapter = x.join("adapter");
    peft::save_adapter(
        &adapter,
        &avs,
        &lcfg,
        base.to_str().unwrap(),
        TaskType::SeqCls,
        &[(peft::SCORE_WEIGHT, &score)],
    )
    .unwrap();
    let model = x.join("model");
    peft::merge_dirs(&fixture(), &adapter, &model, None).unwrap();
    lm::reward_model::RewardStats::of(&[1.0, 3.0], "eval").unwrap().write(&model).unwrap();
    model
}

#[test]
fn a_lora_reward_model_over_the_same_base_shares_one_copy_of_the_weights() {
    let d = tempfile::tempdir().unwrap();
    let prompts_file = write_prompts(d.path(), 8);
    let rm_dir = make_lora_reward_model(&d.path().join("rm"));
    let mut cfg = config(d.path(), &prompts_file, LORA);
    cfg.reward = RewardConfig::Model { path: rm_dir.clone(), batch_size: 5, max_seq_len: None };
    let mut t = trainer(&cfg, d.path(), None);
    assert!(matches!(t.reference, Reference::AdaptersOff));
    let rm = t.reward.reward_model().expect("a reward model");
    for name in [Q, "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"] {
        let p = t.policy.base_tensors()[name].data_ptr();
        assert_eq!(t.reference_model().base_tensors()[name].data_ptr(), p, "{name}: reference");
        assert_eq!(rm.backbone.base_tensors()[name].data_ptr(), p, "{name}: reward model");
    }
    // The reward model's adapters are its own, frozen, switched separately.
    let (ps, rs) = (t.policy.adapter_switch().unwrap(), rm.backbone.adapter_switch().unwrap());
    assert!(!ps.same(&rs));
    assert!(rm.backbone.adapter_tensors().values().all(|v| !v.requires_grad()));
    assert!(!rm.score.weight.requires_grad());
    // The statistics are the reward stage's.
    assert_eq!(t.reward.stats(), Some((2.0, 1.0)));

    // Its rewards are those of the merged reward model loaded on its own.
    let p = prompts();
    let r = t.rollouts(0, &p).unwrap();
    let shared = t.reward.score(&r).unwrap();
    let mut alone = rl::RewardModelFn::load(&rm_dir, Device::Cpu, Kind::Float, 16, None).unwrap();
    let own = alone.score(&r).unwrap();
    let diff = shared.iter().zip(&own).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff < 1e-5, "shared vs merged rewards differ by {diff}: {shared:?} vs {own:?}");
    assert!(own.iter().any(|x| (x - own[0]).abs() > 1e-6), "the rewards vary: {own:?}");

    // A step trains the policy's adapters only; the reward model's stay.
    let rm = t.reward.reward_model().unwrap();
    let before: Vec<Tensor> = rm.backbone.adapter_tensors().values().map(|v| v.copy()).collect();
    t.step(0, &p).unwrap();
    let rm = t.reward.reward_model().unwrap();
    for (a, b) in rm.backbone.adapter_tensors().values().zip(&before) {
        assert!(a.equal(b));
    }
    assert_eq!(t.reward.score(&r).unwrap(), shared, "the reward model did not move");

    // Without LoRA the reward model is loaded on its own.
    let mut full = config(d.path(), &prompts_file, "");
    full.reward = cfg.reward.clone();
    let t2 = trainer(&full, d.path(), None);
    let rm2 = t2.reward.reward_model().unwrap();
    assert_ne!(rm2.backbone.base_tensors()[Q].data_ptr(), t2.policy.base_tensors()[Q].data_ptr());
}

/// One step's update the way the trainer computed it before the chunked
/// update: the full (n, R, V) logits with a graph, the loss, `backward()`,
/// on the whole batch of `rollouts` scored `raw` (a config without reward
/// normalisation or clipping, one micro-batch).
fn old_update(t: &mut Trainer, rollouts: &[Rollout], raw: &[f64]) {
    let cfg = t.cfg.clone();
    let b = batch(rollouts, t);
    let temp = cfg.temperature;
    let (reference, old) = tch::no_grad(|| {
        let reference = match &t.reference {
            Reference::Model { model, .. } => full_logprobs(model, &b, temp),
            Reference::AdaptersOff => {
                let _off = t.policy.adapters_disabled();
                full_logprobs(&t.policy, &b, temp)
            }
        };
        (reference, full_logprobs(&t.policy, &b, temp))
    });
    let kl = rl::kl_per_token(&old, &reference, &b.mask, cfg.kl_estimator).unwrap();
    let kl_seq = kl.sum_dim_intlist(-1, false, Kind::Float);
    let score = Tensor::from_slice(raw).to_kind(Kind::Float);
    let ended: Vec<bool> = rollouts.iter().map(Rollout::ended).collect();
    let beta = t.kl.beta;
    let beta_r = if cfg.kl_mode == KlMode::Reward { beta } else { 0.0 };
    let total = rl::sequence_rewards(
        &score,
        &kl_seq.unsqueeze(-1),
        beta_r,
        &Tensor::from_slice(&ended),
        cfg.missing_eot_penalty,
    );
    let adv = rl::advantages(&total, cfg.num_samples as i64, cfg.baseline, cfg.advantage_scale()).unwrap();
    let sizes = rl::BatchSize::of(&b.mask);
    let agg = cfg.loss_aggregation;
    let updates = cfg.updates_per_batch;
    for _ in 0..updates {
        let policy = &t.policy;
        t.updater
            .step(1, cfg.steps * updates as u64, 0, |_| {
                let logp = full_logprobs(policy, &b, temp);
                let mut loss = if updates > 1 {
                    rl::clipped_reinforce_loss(&logp, &old, &b.mask, &adv, cfg.clip_eps, agg, sizes)
                } else {
                    rl::reinforce_loss(&logp, &b.mask, &adv, agg, sizes)
                };
                if cfg.kl_mode == KlMode::Loss && beta > 0.0 {
                    loss += rl::kl_loss(&logp, &reference, &b.mask, cfg.kl_estimator, beta, agg, sizes)?;
                }
                loss.backward();
                Ok(loss.double_value(&[]))
            })
            .unwrap();
    }
}

/// Every trained variable (full fine-tune: the base; LoRA: the adapters).
fn trained(t: &Trainer) -> Vec<(String, Tensor)> {
    let mut v = match &t.policy_weights.lora {
        Some(l) => l.vs.variables().into_iter().collect::<Vec<_>>(),
        None => t.policy_weights.base.variables().into_iter().collect(),
    };
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn same_update_as_the_full_logits_path(extra: &str) {
    let d = tempfile::tempdir().unwrap();
    let prompts_file = write_prompts(d.path(), 8);
    let mut cfg = config(d.path(), &prompts_file, extra);
    // AdamW's update is Lipschitz in the gradient with constant lr / eps:
    // a larger eps keeps float-rounding differences of near-zero gradients
    // from being amplified to ±lr.
    cfg.stage.optim.eps = 1e-3;
    cfg.stage.optim.warmup_steps = 0;
    let p = prompts();
    let mut new = trainer(&cfg, d.path(), Some(Box::new(LowIds { below: 128 })));
    let mut old = trainer(&cfg, d.path(), Some(Box::new(LowIds { below: 128 })));
    let (_, r) = new.step(0, &p).unwrap();
    let r_old = old.rollouts(0, &p).unwrap();
    assert_eq!(
        r.iter().map(|x| x.response_ids.clone()).collect::<Vec<_>>(),
        r_old.iter().map(|x| x.response_ids.clone()).collect::<Vec<_>>()
    );
    let raw = LowIds { below: 128 }.score(&r_old).unwrap();
    old_update(&mut old, &r_old, &raw);
    let start = trained(&trainer(&cfg, d.path(), Some(Box::new(LowIds { below: 128 }))));
    let (mut dp, mut dg, mut moved, mut gmax) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (((n1, a), (n2, b)), (n3, s)) in trained(&new).iter().zip(trained(&old).iter()).zip(&start) {
        assert!(n1 == n2 && n2 == n3);
        dp = dp.max(max_abs(a, b));
        dg = dg.max(max_abs(&a.grad(), &b.grad()));
        gmax = gmax.max(b.grad().abs().max().double_value(&[]));
        moved = moved.max(max_abs(b, s));
    }
    eprintln!("{extra:?}: parameters differ by {dp:e} (moved {moved:e}), gradients by {dg:e} (max {gmax:e})");
    assert!(moved > 1e-4, "the update moved nothing");
    assert!(gmax > 0.0 && dg < 1e-6 * gmax.max(1.0), "gradients differ by {dg} (max {gmax})");
    assert!(dp < 1e-6, "the parameters after the update differ by {dp}");
}

#[test]
fn the_update_equals_the_full_logits_path() {
    same_update_as_the_full_logits_path("beta = 0.1");
}

#[test]
fn the_update_equals_the_full_logits_path_with_gradient_checkpointing() {
    same_update_as_the_full_logits_path("beta = 0.1\ngradient_checkpointing = true");
}

#[test]
fn the_update_equals_the_full_logits_path_with_two_updates_per_batch() {
    same_update_as_the_full_logits_path(
        "beta = 0.1\nupdates_per_batch = 2\nkl_mode = \"loss\"\nkl_estimator = \"k3\"\ngradient_checkpointing = true",
    );
}

#[test]
fn the_lora_update_equals_the_full_logits_path() {
    same_update_as_the_full_logits_path(&format!(
        "{LORA}\nbeta = 0.1\nupdates_per_batch = 2\nkl_mode = \"loss\"\nkl_estimator = \"k3\"\ngradient_checkpointing = true"
    ));
}

const RESUME: &str = "steps = 5\nbatch_size = 2\nsave_every = 2\nkl_target = 1.0\nkl_horizon = 50\nbeta = 0.1\n\
                      updates_per_batch = 2\nmicro_batch_size = 3\nwhiten_advantages = true\n\
                      gradient_checkpointing = true\nlora = { rank = 4, alpha = 8.0, target_modules = [\"q_proj\", \"v_proj\", \"down_proj\"] }";

fn run(dir: &Path, prompts: &Path, stop_after: Option<u64>) -> rl::RlSummary {
    let mut cfg = config(dir, prompts, RESUME);
    cfg.stop_after = stop_after;
    rl::run_with_reward(&cfg, dir, Box::new(LowIds { below: 128 })).unwrap()
}

#[test]
fn a_lora_run_killed_and_resumed_ends_with_bit_identical_adapters() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pa = write_prompts(a.path(), 8);
    let pb = write_prompts(b.path(), 8);
    let full = run(a.path(), &pa, None);
    assert_eq!(full.steps, 5);
    let part = run(b.path(), &pb, Some(3));
    assert!(part.stopped_early);
    let resumed = run(b.path(), &pb, None);
    assert_eq!(resumed.resumed_from, Some(2));
    let (fa, fb) = (
        peft::load_adapter(&a.path().join("out/adapter")).unwrap(),
        peft::load_adapter(&b.path().join("out/adapter")).unwrap(),
    );
    assert_eq!(fa.task_type, TaskType::CausalLm);
    assert_eq!(fa.tensors.len(), 3 * 2 * 2);
    for (k, t) in &fa.tensors {
        assert!(t.equal(&fb.tensors[k]), "{k} differs after resumption");
    }
    assert!(fa
        .tensors
        .iter()
        .any(|(k, t)| k.ends_with("lora_B.weight") && t.abs().max().double_value(&[]) > 0.0));
    let (ma, mb) = (
        lm::checkpoint::read_tensors(&a.path().join("out/model")).unwrap(),
        lm::checkpoint::read_tensors(&b.path().join("out/model")).unwrap(),
    );
    for (k, t) in &ma {
        assert!(t.equal(&mb[k]), "merged {k} differs after resumption");
    }
    let (sa, sb) = (common::steps(&a.path().join("out")), common::steps(&b.path().join("out")));
    assert_eq!(sa.len(), 5);
    for (x, y) in sa.iter().zip(&sb) {
        for key in ["reward_mean", "kl", "beta", "loss", "entropy"] {
            assert_eq!(x[key], y[key], "step {} {key}", x["step"]);
        }
    }
}
