//! Data-parallel SFT over Gloo on loopback: the test binary re-executes its
//! own `rank_process` test as each rank, with torchrun's variables (RANK,
//! WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Skipped, saying why,
//! when the bridge was built without Gloo.
//!
//! - 2 ranks × grad_accum 2 end with the weights of 1 process × grad_accum 4
//!   (the same global batches in the same order);
//! - a dead peer is an error naming the lost rank within the timeout.

mod common;

use common::{fixture, write_data};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::Tensor;
use testkit::ddp::{self, free_port, gloo_or_skip, join, max_diff, read_sorted, Group};

/// A full fine-tune in f32 writing to `dir/out_name`.
fn config(dir: &Path, out_name: &str, grad_accum: usize, extra: &str) -> PathBuf {
    let data = write_data(dir, 48);
    let toml = format!(
        r#"
model = "{}"
output_dir = "{}"
max_seq_len = 64
batch_size = 2
grad_accum = {grad_accum}
max_steps = 4
seed = 5
device = "cpu"
{extra}
[optim]
lr = 1e-3
warmup_steps = 1
weight_decay = 0.1
[data]
seed = 1
[[data.sources]]
name = "reverse"
path = "{}"
"#,
        fixture().display(),
        dir.join(out_name).display(),
        data.display()
    );
    let p = dir.join(format!("{out_name}.toml"));
    std::fs::write(&p, toml).unwrap();
    p
}

fn run_ranks(dir: &Path, config: &Path, world: usize) {
    ddp::run_ranks(dir, "sft", config, world);
}

fn weights(out: &Path) -> Vec<(String, Tensor)> {
    read_sorted(&out.join("model/model.safetensors"))
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
    let cfg = sft::SftConfig::from_toml_file(&path).unwrap();
    if let Err(e) = sft::stage::run(&cfg, path.parent().unwrap()) {
        eprintln!("rank error: {e:#}");
        std::process::exit(1);
    }
}

#[test]
fn two_ranks_train_as_one_process_with_the_same_global_batch() {
    if !gloo_or_skip("two_ranks_train_as_one_process_with_the_same_global_batch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // One process: 4 micro-batches of 2 rows per step.
    let one = config(dir.path(), "one", 4, "");
    let cfg = sft::SftConfig::from_toml_file(&one).unwrap();
    let single = sft::stage::run(&cfg, dir.path()).unwrap();
    // Two ranks: 2 micro-batches each, the same 8 rows per step.
    let two = config(dir.path(), "two", 2, "");
    run_ranks(dir.path(), &two, 2);
    let (a, b) = (weights(&dir.path().join("one")), weights(&dir.path().join("two")));
    let d = max_diff(&a, &b);
    assert!(d < 1e-5, "2 ranks differ from 1 process by {d}");
    // The base moved, and the logged (global) losses agree.
    let mut base = read_sorted(&fixture().join("model.safetensors"));
    base.retain(|(n, _)| a.iter().any(|(m, _)| m == n));
    assert!(max_diff(&a, &base) > 1e-4, "training did not move the weights");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("two/summary.json")).unwrap()).unwrap();
    let losses: Vec<f64> =
        summary["first_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(losses.len(), single.first_losses.len());
    for (x, y) in losses.iter().zip(&single.first_losses) {
        assert!((x - y).abs() < 1e-5, "losses {losses:?} vs {:?}", single.first_losses);
    }
    // Rank 0 alone wrote: one metrics log with one row per step.
    let rows = lm::train::read_metrics(&dir.path().join("two/metrics.jsonl")).unwrap();
    let steps: Vec<_> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 4);
    // Each row times the step and, within it, the all-reduce (none in one process).
    let one_rows = lm::train::read_metrics(&dir.path().join("one/metrics.jsonl")).unwrap();
    assert!(one_rows
        .iter()
        .filter(|r| r.get("loss").is_some())
        .all(|r| r["allreduce_s"].as_f64() == Some(0.0)));
    for r in &steps {
        let (step_s, comm_s) = (r["step_s"].as_f64().unwrap(), r["allreduce_s"].as_f64().unwrap());
        assert!(comm_s > 0.0 && comm_s < step_s, "step_s {step_s}, allreduce_s {comm_s}");
    }
}

#[test]
fn a_dead_peer_is_an_error_within_the_timeout() {
    if !gloo_or_skip("a_dead_peer_is_an_error_within_the_timeout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "dead", 2, "");
    let group = Group::new(dir.path(), &cfg, 2);
    let env = [("ALIGN_DIST_TIMEOUT", "5")];
    let ranks = vec![group.spawn("sft", 0, &env), group.spawn(ddp::DIE, 1, &env)];
    let out = join(ranks, Duration::from_secs(120));
    let (ok, log, t) = &out[0];
    assert!(!ok, "rank 0 went on without its peer:\n{log}");
    assert!(log.contains("rank 0 of 2"), "the error does not say which rank:\n{log}");
    assert!(*t < Duration::from_secs(90), "rank 0 took {t:?} to fail");
    // No checkpoint was half-written.
    let ckpts = dir.path().join("dead/checkpoints");
    if ckpts.exists() {
        for e in std::fs::read_dir(&ckpts).unwrap() {
            let p = e.unwrap().path();
            assert!(p.join("trainer_state.json").exists(), "a partial checkpoint {}", p.display());
        }
    }
}

#[test]
fn bad_setups_are_clear_errors() {
    if !gloo_or_skip("bad_setups_are_clear_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "bad", 2, "");
    let closed = free_port().to_string();
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("RANK", "5")], "RANK 5 is out of range for WORLD_SIZE 2"),
        (&[("WORLD_SIZE", "two")], "WORLD_SIZE must be a positive integer"),
        (&[("ALIGN_DIST_BACKEND", "nccl")], "nccl"),
        // Rank 1 waits for a store nobody serves.
        (&[("MASTER_PORT", closed.as_str()), ("ALIGN_DIST_TIMEOUT", "3")], "rendezvous"),
    ];
    for (env, want) in cases {
        let rank = Group::new(dir.path(), &cfg, 2).spawn("sft", 1, env);
        let out = join(vec![rank], Duration::from_secs(60));
        let (ok, log, _) = &out[0];
        assert!(!ok, "{env:?} was accepted:\n{log}");
        assert!(log.contains(want), "{env:?}: the error does not say {want:?}:\n{log}");
    }
}
