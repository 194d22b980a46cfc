//! Data-parallel reward training over Gloo on loopback (the test binary
//! re-executes its own `rank_process` test as each rank, with torchrun's
//! variables). Skipped, saying why, when the bridge was built without Gloo.
//!
//! - 2 ranks × grad_accum 2 end with the weights of 1 process × grad_accum 4;
//! - a 2-rank run stopped half-way (stop_after) and resumed ends
//!   bit-identical to an uninterrupted 2-rank run;
//! - 2 ranks with the optimiser state sharded (`[reward.optim] zero = 1`,
//!   ZeRO-1) end with the 2-rank DDP run's weights, bit for bit.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use tch::Tensor;
use testkit::ddp::{self, gloo_or_skip, max_diff, read_sorted};

/// Runs `world` ranks of `config` ([`ddp::run_ranks`]); returns their logs, by rank.
fn run_ranks(dir: &Path, config: &Path, world: usize) -> Vec<String> {
    ddp::run_ranks(dir, "reward", config, world)
}

/// A run directory `dir/name` (model, pairs and config).
fn setup(dir: &Path, name: &str, grad_accum: usize, extra: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    write_lm(&d.join("init"), 3, true);
    write_jsonl(&d.join("pairs.jsonl"), &synthetic_rows(60, 1));
    write_config(&d, &format!("batch_size = 2\ngrad_accum = {grad_accum}\nmax_steps = 4\n{extra}"))
}

fn weights(config: &Path) -> Vec<(String, Tensor)> {
    read_sorted(&config.parent().unwrap().join("out/model/model.safetensors"))
}

/// One rank of a test run (a no-op when the harness runs it directly).
#[test]
fn rank_process() {
    let Some(_role) = ddp::role() else { return };
    let path = ddp::config_path();
    let cfg = load_config(&path);
    if let Err(e) = reward::run(&cfg, path.parent().unwrap()) {
        eprintln!("rank error: {e:#}");
        std::process::exit(1);
    }
}

#[test]
fn two_ranks_train_a_reward_model_as_one_process() {
    if !gloo_or_skip("two_ranks_train_a_reward_model_as_one_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let one = setup(dir.path(), "one", 4, "");
    let single = reward::run(&load_config(&one), one.parent().unwrap()).unwrap();
    let two = setup(dir.path(), "two", 2, "");
    run_ranks(dir.path(), &two, 2);
    let d = max_diff(&weights(&one), &weights(&two));
    assert!(d < 1e-5, "2 ranks differ from 1 process by {d}");
    let rows = lm::train::read_metrics(&two.parent().unwrap().join("out/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = rows.iter().filter_map(|r| r.get("loss")?.as_f64()).collect();
    assert_eq!(losses.len(), 4);
    for (x, y) in losses.iter().zip(&single.first_losses) {
        assert!((x - y).abs() < 1e-5, "losses {losses:?} vs {:?}", single.first_losses);
    }

    // Stopped after 2 steps, then resumed: as the uninterrupted run.
    let cut = setup(dir.path(), "cut", 2, "stop_after = 2");
    run_ranks(dir.path(), &cut, 2);
    assert!(!cut.parent().unwrap().join("out/model").exists());
    write_config(cut.parent().unwrap(), "batch_size = 2\ngrad_accum = 2\nmax_steps = 4");
    run_ranks(dir.path(), &cut, 2);
    let d = max_diff(&weights(&two), &weights(&cut));
    assert_eq!(d, 0.0, "the resumed 2-rank run differs from the uninterrupted one by {d}");
}

#[test]
fn zero1_trains_a_reward_model_as_ddp_bit_for_bit() {
    if !gloo_or_skip("zero1_trains_a_reward_model_as_ddp_bit_for_bit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ddp_cfg = setup(dir.path(), "ddp", 2, "");
    run_ranks(dir.path(), &ddp_cfg, 2);
    // The same run with the optimiser state sharded over the 2 ranks.
    let zero = setup(dir.path(), "zero", 2, "");
    let text = std::fs::read_to_string(&zero).unwrap();
    assert!(text.contains("[reward.optim]\n"), "{text}");
    std::fs::write(&zero, text.replace("[reward.optim]\n", "[reward.optim]\nzero = 1\n")).unwrap();
    assert_eq!(load_config(&zero).stage.optim.zero, 1);
    let logs = run_ranks(dir.path(), &zero, 2);
    assert!(
        logs[0].contains("ZeRO-1 optimiser state for"),
        "rank 0 did not shard its optimiser state:\n{}",
        logs[0]
    );

    let d = max_diff(&weights(&ddp_cfg), &weights(&zero));
    eprintln!("ZeRO-1 vs DDP, 2 ranks: max |Δw| = {d:e}");
    assert_eq!(d, 0.0, "ZeRO-1 differs from DDP by {d}");
}
