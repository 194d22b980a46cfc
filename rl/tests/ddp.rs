//! Data-parallel RL over Gloo on loopback: the test binary re-executes its
//! own `rank_process` test as each rank, with torchrun's variables (RANK,
//! WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Skipped, saying why,
//! when the bridge was built without Gloo.
//!
//! - 2 ranks × `batch_size` b end with the weights of 1 process × 2b (the
//!   same prompts, every sample seeded by its index in the global batch),
//!   with whitened advantages, an adaptive KL coefficient, micro-batches,
//!   two updates per batch and an evaluation split across the ranks;
//! - a 2-rank run stopped after a checkpoint and resumed ends bit-identical
//!   to an uninterrupted 2-rank run;
//! - a dead peer stops the other rank with an error naming it, within the
//!   timeout, leaving no half-written checkpoint;
//! - 2 ranks with the optimiser state sharded (`[rl.optim] zero = 1`,
//!   ZeRO-1) end with the 2-rank DDP run's weights, bit for bit.

mod common;

use common::{config, steps, write_prompts, LowIds};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::Tensor;
use testkit::ddp::{self, gloo_or_skip, join, max_diff, read_sorted, Group};

/// The run: 4 steps, 4 samples per prompt, an epoch boundary (12 training
/// prompts, 4 per step), whitening, an adaptive β, micro-batches of 3
/// sequences, two clipped updates per batch, evaluation and checkpoints
/// every 2 steps.
const EXTRA: &str =
    "steps = 4\nsave_every = 2\neval_every = 2\nkl_target = 1.0\nkl_horizon = 50\nbeta = 0.1\n\
                     updates_per_batch = 2\nmicro_batch_size = 3\nwhiten_advantages = true";

/// The learning rate of these runs. Two ranks and one process compute the
/// same sums in different orders and micro-batch shapes (f32 rounding, about
/// 1e-7 relative); Adam turns that into update differences of up to about
/// 1e-3 × lr on weights whose gradients nearly cancel. One process alone
/// shows the same: micro-batches of 3 against 8 sequences differ by 4.4e-6
/// after these 4 steps at lr 1e-3 (2 ranks against 1 process: 3.4e-6). At
/// 1e-4 the difference is under 1e-6 while the weights move by ~5e-4.
const LR: &str = "1e-4";

/// `text` (a config from `common::config`) with the learning rate `lr`.
fn with_lr(text: &str, lr: &str) -> String {
    text.lines()
        .map(|l| if l.trim_start().starts_with("lr = ") { format!("lr = {lr}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The config of a run in `dir` (`dir/out`) with `batch_size` prompts per
/// rank; its TOML is `dir/rl.toml`.
fn setup(dir: &Path, batch_size: usize, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let prompts = write_prompts(dir, 16);
    config(dir, &prompts, &format!("{EXTRA}\nbatch_size = {batch_size}\n{extra}"));
    let path = dir.join("rl.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let lr = std::env::var("DDP_LR").unwrap_or(LR.into());
    std::fs::write(&path, with_lr(&text, &lr)).unwrap();
    path
}

/// Runs `world` ranks of `config` ([`ddp::run_ranks`]); returns their logs, by rank.
fn run_ranks(dir: &Path, config: &Path, world: usize) -> Vec<String> {
    ddp::run_ranks(dir, "rl", config, world)
}

fn weights(out: &Path) -> Vec<(String, Tensor)> {
    read_sorted(&out.join("model/model.safetensors"))
}

fn base_of(name: &str) -> Tensor {
    let w = Tensor::read_safetensors(common::fixture().join("model.safetensors")).unwrap();
    w.into_iter().find(|(n, _)| n == name).map(|(_, t)| t).unwrap_or_else(|| Tensor::from(0.0))
}

/// One rank of a test run (a no-op when the harness runs it directly).
#[test]
fn rank_process() {
    let Some(role) = ddp::role() else { return };
    if role == ddp::DIE {
        // Joins the group, then dies before the first collective.
        ddp::die_after_joining();
    }
    let path = ddp::config_path();
    let cfg = rl::RlConfig::from_toml_file(&path).unwrap();
    if let Err(e) = rl::run_with_reward(&cfg, path.parent().unwrap(), Box::new(LowIds { below: 128 })) {
        eprintln!("rank error: {e:#}");
        std::process::exit(1);
    }
}

#[test]
fn two_ranks_train_as_one_process_with_twice_the_batch() {
    if !gloo_or_skip("two_ranks_train_as_one_process_with_twice_the_batch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // One process: 4 prompts × 4 samples per step.
    let one = setup(&dir.path().join("one"), 4, "");
    let cfg = rl::RlConfig::from_toml_file(&one).unwrap();
    let single = rl::run_with_reward(&cfg, one.parent().unwrap(), Box::new(LowIds { below: 128 })).unwrap();
    assert_eq!(single.steps, 4);
    // Two ranks: 2 prompts × 4 samples each.
    let two = setup(&dir.path().join("two"), 2, "");
    run_ranks(dir.path(), &two, 2);
    let (out1, out2) = (dir.path().join("one/out"), dir.path().join("two/out"));

    let (a, b) = (weights(&out1), weights(&out2));
    let d = max_diff(&a, &b);
    eprintln!("2 ranks × 2 prompts vs 1 process × 4 prompts: max |Δw| = {d:e}");
    if std::env::var("DDP_DEBUG").is_ok() {
        for ((n, x), (_, y)) in a.iter().zip(&b) {
            let d = (x - y).abs().max().double_value(&[]);
            let m = (x - &base_of(n)).abs().max().double_value(&[]);
            eprintln!("{n}: max |Δ| {d:e}, moved {m:e}");
        }
    }
    if std::env::var("DDP_DEBUG").is_err() {
        assert!(d < 1e-6, "2 ranks differ from 1 process by {d}");
    }
    let mut base = read_sorted(&common::fixture().join("model.safetensors"));
    base.retain(|(n, _)| a.iter().any(|(m, _)| m == n));
    assert!(max_diff(&a, &base) > 1e-4, "training did not move the weights");

    // The same samples (global statistics of the same rewards), β and
    // losses; rank 0 alone logged, one row per step. The figures computed
    // from log-probs carry their f32 rounding (the KL of a sample is a
    // difference of sums of log-probs: ~1e-7 absolute, through whitening
    // ~1e-6 in an advantage).
    let (m1, m2) = (steps(&out1), steps(&out2));
    assert_eq!((m1.len(), m2.len()), (4, 4));
    for (x, y) in m1.iter().zip(&m2) {
        for key in ["reward_max", "response_len", "rollout_tokens", "ended_frac"] {
            assert_eq!(x[key], y[key], "step {} {key}", x["step"]);
        }
        for key in [
            "reward_mean",
            "reward_std",
            "kl",
            "beta",
            "loss",
            "entropy",
            "adv_mean",
            "adv_std",
            "adv_min",
            "grad_norm",
            "clip_frac",
        ] {
            let (u, v) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((u - v).abs() <= 1e-5 * u.abs().max(1.0), "step {} {key}: {u} vs {v}", x["step"]);
        }
    }
    assert!((m2[3]["beta"].as_f64().unwrap() - 0.1).abs() > 1e-6, "the adaptive controller moved β");
    // Whitened over the whole batch, not per rank.
    for r in &m2 {
        assert!(r["adv_mean"].as_f64().unwrap().abs() < 1e-5, "{r}");
    }
    // The evaluation, split across the ranks and gathered: the same
    // samples and report.
    for step in [0, 2, 4] {
        let f = format!("samples-step-{step}.jsonl");
        let (s1, s2) = (
            std::fs::read_to_string(out1.join(&f)).unwrap(),
            std::fs::read_to_string(out2.join(&f)).unwrap(),
        );
        assert_eq!(s1, s2, "{f}");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("summary.json")).unwrap()).unwrap();
    let eval2: Vec<rl::EvalReport> = serde_json::from_value(summary["eval"].clone()).unwrap();
    assert_eq!(eval2.len(), single.eval.len());
    for (x, y) in single.eval.iter().zip(&eval2) {
        assert_eq!((x.step, x.prompts), (y.step, y.prompts));
        assert!((x.reward_mean - y.reward_mean).abs() < 1e-12, "{x:?} vs {y:?}");
    }
}

#[test]
fn a_two_rank_run_resumes_bit_identically() {
    if !gloo_or_skip("a_two_rank_run_resumes_bit_identically") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let full = setup(&dir.path().join("full"), 2, "");
    run_ranks(dir.path(), &full, 2);
    // Stopped after step 3 (as if killed): the newest checkpoint is step 2,
    // whose trainer state records both ranks' random streams.
    let part = setup(&dir.path().join("part"), 2, "stop_after = 3");
    run_ranks(dir.path(), &part, 2);
    let out = dir.path().join("part/out");
    let ckpts = lm::train::list_checkpoints(&out.join("checkpoints")).unwrap();
    assert_eq!(ckpts.last().unwrap().0, 2);
    let st = lm::train::read_trainer_state(&ckpts.last().unwrap().1).unwrap();
    assert_eq!(st.rank_rng.len(), 2, "{st:?}");
    assert!(!out.join("summary.json").exists());
    // Resumed on 2 ranks (the config without stop_after).
    let resumed = setup(&dir.path().join("part"), 2, "");
    run_ranks(dir.path(), &resumed, 2);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["resumed_from"], serde_json::json!(2));

    let (a, b) = (weights(&dir.path().join("full/out")), weights(&out));
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{n} differs after resumption");
    }
    let step = |d: &Path| d.join("checkpoints/step-00000004");
    let (oa, ob) = (
        lm::train::read_checkpoint_state(&step(&dir.path().join("full/out"))).unwrap(),
        lm::train::read_checkpoint_state(&step(&out)).unwrap(),
    );
    for (k, t) in &oa.1 {
        assert!(t.equal(&ob.1[k]), "optimizer {k} differs");
    }
    assert_eq!(oa.0.extra["beta_bits"], ob.0.extra["beta_bits"]);
    assert_eq!(oa.0.rank_rng, ob.0.rank_rng);
    let (ma, mb) = (steps(&dir.path().join("full/out")), steps(&out));
    assert_eq!((ma.len(), mb.len()), (4, 4));
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["reward_mean", "kl", "beta", "loss", "entropy", "adv_std", "clip_frac"] {
            assert_eq!(x[key], y[key], "step {} {key}", x["step"]);
        }
    }
}

#[test]
fn a_dead_peer_stops_the_rl_stage_within_the_timeout() {
    if !gloo_or_skip("a_dead_peer_stops_the_rl_stage_within_the_timeout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(&dir.path().join("dead"), 2, "");
    let group = Group::new(dir.path(), &cfg, 2);
    let env = [("ALIGN_DIST_TIMEOUT", "5")];
    let ranks = vec![group.spawn("rl", 0, &env), group.spawn(ddp::DIE, 1, &env)];
    let out = join(ranks, Duration::from_secs(120));
    let (ok, log, t) = &out[0];
    assert!(!ok, "rank 0 went on without its peer:\n{log}");
    let err = log.lines().find(|l| l.starts_with("rank error")).unwrap_or_default();
    assert!(err.contains("rank 0 of 2 lost its peers"), "the error does not say which rank:\n{log}");
    assert!(*t < Duration::from_secs(90), "rank 0 took {t:?} to fail");
    // No checkpoint was half-written.
    let ckpts = dir.path().join("dead/out/checkpoints");
    if ckpts.exists() {
        for e in std::fs::read_dir(&ckpts).unwrap() {
            let p = e.unwrap().path();
            assert!(p.join("trainer_state.json").exists(), "a partial checkpoint {}", p.display());
        }
    }
}

#[test]
fn zero1_trains_the_policy_as_ddp_bit_for_bit() {
    if !gloo_or_skip("zero1_trains_the_policy_as_ddp_bit_for_bit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ddp_cfg = setup(&dir.path().join("ddp"), 2, "");
    run_ranks(dir.path(), &ddp_cfg, 2);
    // The same run with the optimiser state sharded over the 2 ranks.
    let zero = setup(&dir.path().join("zero"), 2, "");
    let text = std::fs::read_to_string(&zero).unwrap();
    assert!(text.contains("[rl.optim]\n"), "{text}");
    std::fs::write(&zero, text.replace("[rl.optim]\n", "[rl.optim]\nzero = 1\n")).unwrap();
    assert_eq!(rl::RlConfig::from_toml_file(&zero).unwrap().stage.optim.zero, 1);
    let logs = run_ranks(dir.path(), &zero, 2);
    assert!(
        logs[0].contains("ZeRO-1 optimiser state for"),
        "rank 0 did not shard its optimiser state:\n{}",
        logs[0]
    );

    let (a, b) = (weights(&dir.path().join("ddp/out")), weights(&dir.path().join("zero/out")));
    let d = max_diff(&a, &b);
    eprintln!("ZeRO-1 vs DDP, 2 ranks: max |Δw| = {d:e}");
    assert_eq!(d, 0.0, "ZeRO-1 differs from DDP by {d}");
    let mut base = read_sorted(&common::fixture().join("model.safetensors"));
    base.retain(|(n, _)| b.iter().any(|(m, _)| m == n));
    assert!(max_diff(&b, &base) > 1e-4, "training did not move the weights");
}
