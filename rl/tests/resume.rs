//! Resumption: a run stopped after a checkpoint and continued ends with
//! bit-identical weights, optimiser state, KL coefficient and metrics to an
//! uninterrupted run (adaptive KL, two updates per batch, micro-batches and
//! an epoch boundary included).

mod common;

use common::{config, steps, write_prompts, LowIds};
use std::path::Path;

const EXTRA: &str =
    "steps = 6\nbatch_size = 2\nsave_every = 2\nkl_target = 1.0\nkl_horizon = 50\nbeta = 0.1\n\
                     updates_per_batch = 2\nmicro_batch_size = 3\nwhiten_advantages = true\neval_every = 3";

fn run(dir: &Path, prompts: &Path, stop_after: Option<u64>) -> rl::RlSummary {
    let mut cfg = config(dir, prompts, EXTRA);
    cfg.stop_after = stop_after;
    rl::run_with_reward(&cfg, dir, Box::new(LowIds { below: 128 })).unwrap()
}

fn tensors(dir: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    lm::checkpoint::read_tensors(dir).unwrap()
}

#[test]
fn stop_and_resume_gives_bit_identical_weights() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    // 8 prompts, 2 held out: 6 training prompts, 2 per step → a new epoch
    // every 3 steps.
    let pa = write_prompts(a.path(), 8);
    let pb = write_prompts(b.path(), 8);
    let full = run(a.path(), &pa, None);
    assert_eq!(full.steps, 6);

    // Stopped after step 3 (as if killed): the newest checkpoint is step 2,
    // so step 3 is redone on resumption.
    let part = run(b.path(), &pb, Some(3));
    assert!(part.stopped_early && part.model_dir.is_none());
    let ckpts = lm::train::list_checkpoints(&b.path().join("out/checkpoints")).unwrap();
    assert_eq!(ckpts.last().unwrap().0, 2);
    let resumed = run(b.path(), &pb, None);
    assert_eq!(resumed.resumed_from, Some(2));
    assert_eq!(resumed.steps, 6);

    let (wa, wb) = (tensors(&a.path().join("out/model")), tensors(&b.path().join("out/model")));
    assert_eq!(wa.len(), wb.len());
    for (k, t) in &wa {
        assert!(t.equal(&wb[k]), "{k} differs after resumption");
    }
    let step = |d: &Path| d.join("out/checkpoints/step-00000006");
    let (oa, ob) = (
        lm::train::read_checkpoint_state(&step(a.path())).unwrap(),
        lm::train::read_checkpoint_state(&step(b.path())).unwrap(),
    );
    for (k, t) in &oa.1 {
        assert!(t.equal(&ob.1[k]), "optimizer {k} differs");
    }
    assert_eq!(oa.0.extra["beta_bits"], ob.0.extra["beta_bits"]);
    assert_ne!(oa.0.extra["beta"], serde_json::json!(0.1), "the adaptive controller moved beta");
    assert_eq!((oa.0.epoch, oa.0.batch_in_epoch), (ob.0.epoch, ob.0.batch_in_epoch));
    // The metrics log has each step once, with the same values.
    let (ma, mb) = (steps(&a.path().join("out")), steps(&b.path().join("out")));
    assert_eq!(ma.len(), 6);
    assert_eq!(mb.len(), 6);
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["reward_mean", "kl", "beta", "loss", "entropy", "adv_std", "clip_frac"] {
            assert_eq!(x[key], y[key], "step {} {key}", x["step"]);
        }
    }
    // Two updates per batch: the first is at ρ = 1 (nothing clipped), so at
    // most half the counted tokens are clipped; the second update does
    // clip some tokens on some step.
    let clip: Vec<f64> = ma.iter().map(|r| r["clip_frac"].as_f64().unwrap()).collect();
    eprintln!("clipped fraction per step: {clip:?}");
    assert!(clip.iter().all(|&c| (0.0..=0.5).contains(&c)), "{clip:?}");
    assert!(clip.iter().any(|&c| c > 0.0), "no token was ever clipped: {clip:?}");
}

#[test]
fn resuming_under_another_config_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = write_prompts(d.path(), 8);
    run(d.path(), &p, Some(2));
    let mut cfg = config(d.path(), &p, EXTRA);
    cfg.beta = 0.2;
    let err =
        format!("{:#}", rl::run_with_reward(&cfg, d.path(), Box::new(LowIds { below: 128 })).unwrap_err());
    assert!(err.contains("different configuration"), "{err}");
}

#[test]
fn importance_ratios_are_clipped_only_after_the_policy_moves() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 8);
    let clip_fracs = |extra: &str, lr: f64| -> Vec<f64> {
        let mut cfg = config(d.path(), &prompts, extra);
        cfg.stage.optim.lr = lr;
        cfg.stage.optim.warmup_steps = 0;
        let (mut t, batch) = common::trainer(cfg);
        (0..3).map(|s| t.step(s, &batch).unwrap().0.clip_frac).collect()
    };
    // One update per batch: the plain REINFORCE loss, no ratio, nothing clipped.
    assert_eq!(clip_fracs("updates_per_batch = 1", 5e-2), vec![0.0; 3]);
    // Several updates with a policy that barely moves: every ρ stays within
    // [1 − ε, 1 + ε], so nothing is clipped either.
    assert_eq!(clip_fracs("updates_per_batch = 4\nclip_eps = 0.05", 1e-9), vec![0.0; 3]);
    // Large steps and a tight clip: the later updates push some ratios out of
    // the range; the first update of each batch is at ρ = 1 and clips
    // nothing, so at most 3 in 4 counted tokens are clipped.
    let moved = clip_fracs("updates_per_batch = 4\nclip_eps = 0.05", 5e-2);
    eprintln!("clipped fraction per step with 4 updates, lr 5e-2, eps 0.05: {moved:?}");
    assert!(moved.iter().all(|&c| c > 0.0 && c <= 0.75), "{moved:?}");
}
