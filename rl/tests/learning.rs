//! The stage learns: with β = 0 the mean reward of a toy reward (the share
//! of response tokens with an id below 128, about 0.22 for the untrained
//! fixture) rises within 60 CPU steps; with a large β the policy
//! stays much closer to the reference.

mod common;

use common::{config, mean, steps, write_prompts, LowIds};

/// Runs the stage with the toy reward and `extra` config lines; returns the
/// step rows and the summary.
fn train(lr: &str, extra: &str) -> (Vec<serde_json::Value>, rl::RlSummary, tempfile::TempDir) {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 24);
    let mut cfg = config(d.path(), &prompts, extra);
    cfg.stage.optim.lr = lr.parse().unwrap();
    let s = rl::run_with_reward(&cfg, d.path(), Box::new(LowIds { below: 128 })).unwrap();
    let out = d.path().join("out");
    assert!(out.join("model/model.safetensors").exists());
    assert!(out.join("summary.json").exists());
    (steps(&out), s, d)
}

#[test]
fn with_beta_zero_the_mean_reward_rises() {
    // 60 steps: after 30 the reward of this toy run had risen by 0.10 to
    // 0.75 depending on the seed (seeds 1-10; samples are seeded per
    // sample, and another CPU's kernels round differently, which acts like
    // another seed); after 60, every one of those seeds is at 0.98-1.0.
    let (rows, s, dir) = train(
        "5e-3",
        "steps = 60\nbatch_size = 8\nbeta = 0.0\nwhiten_advantages = true\neval_every = 30\nseed = 1",
    );
    assert_eq!(rows.len(), 60);
    let first = mean(&rows[..3], "reward_mean");
    let last = mean(&rows[rows.len() - 3..], "reward_mean");
    eprintln!("beta 0: mean reward {first:.3} (steps 1-3) -> {last:.3} (steps 58-60)");
    assert!(first < 0.35, "the untrained policy scores about 0.22, got {first}");
    assert!(last > first + 0.5, "reward {first} -> {last}: it should rise clearly");
    // Held-out prompts, evaluated before, half way and after.
    let ev: Vec<(u64, f64)> = s.eval.iter().map(|e| (e.step, e.reward_mean)).collect();
    eprintln!("eval reward by step: {ev:?}");
    assert_eq!(ev.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 30, 60]);
    assert!(ev[2].1 > ev[0].1 + 0.3, "held-out reward {ev:?}");
    assert!(s.plot.as_ref().is_some_and(|p| p.exists()), "rl.png is written");
    let samples = std::fs::read_to_string(dir.path().join("out/samples-step-60.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 4);
    if let Ok(keep) = std::env::var("RL_KEEP_PLOT") {
        std::fs::copy(s.plot.as_ref().unwrap(), keep).unwrap();
    }
}

#[test]
fn with_large_beta_the_kl_to_the_reference_stays_small() {
    // 60 steps: the unpenalised policy keeps drifting (KL 12-14 over seeds
    // 1-7 against 6-11 after 30 steps) while the penalised ones level off
    // (loss term 1.7-1.9, in the reward 4.5-5.0), so the ratios (at most
    // 0.14 and 0.39 over those seeds) sit well inside the bounds.
    let common = "steps = 60\nbatch_size = 8\nwhiten_advantages = true";
    let kl = |extra: &str| {
        let (rows, _, _) = train("1e-3", &format!("{common}\n{extra}"));
        (mean(&rows[rows.len() - 5..], "kl"), mean(&rows[rows.len() - 3..], "reward_mean"))
    };
    let (kl0, r0) = kl("beta = 0.0");
    let (kl_loss, r_loss) = kl("beta = 2.0\nkl_mode = \"loss\"\nkl_estimator = \"k3\"");
    let (kl_reward, r_reward) = kl("beta = 2.0");
    eprintln!(
        "KL per sample over the last 5 steps: beta 0 {kl0:.3} (reward {r0:.3}); beta 2 as a loss term (k3) \
         {kl_loss:.3} (reward {r_loss:.3}); beta 2 in the reward (k1) {kl_reward:.3} (reward {r_reward:.3})"
    );
    assert!(kl0 > 3.0, "without a KL penalty the policy drifts: {kl0}");
    assert!(kl_loss < 0.35 * kl0, "KL loss term: {kl_loss} vs {kl0} without");
    assert!(kl_reward < 0.6 * kl0, "KL in the reward: {kl_reward} vs {kl0} without");
}
