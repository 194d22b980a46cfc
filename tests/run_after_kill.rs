//! `align run` killed with SIGKILL in the middle of a stage and run again
//! finishes with the same weights as an uninterrupted run: the runner
//! resumes the interrupted stage from its last checkpoint and runs the
//! stages after it.

mod common;
use common::{align_command, kill_once_checkpointed, recipe, write_recipe};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Pretraining, then a 40-step SFT with a checkpoint every 2 steps, then RL.
fn kill_recipe() -> String {
    [
        recipe::tiny("kill", 2, 300),
        recipe::data("sft", Some(0.1), "builtin:sft?n=400&seed=3"),
        recipe::data("prompts", None, "builtin:rl?n=64&seed=5"),
        recipe::tokenizer_and_base("max_seq_len = 48, batch_size = 8, max_steps = 4, packing = true"),
        recipe::sft("max_seq_len = 48, batch_size = 8, max_steps = 40, save_every = 2, keep_last = 2, eval_every = 0"),
        recipe::rl(
            "sft",
            &[],
            r#"steps = 4, batch_size = 4, num_samples = 2, max_new_tokens = 6, save_every = 1, eval_every = 0, reward = { kind = "oracle" }"#,
        ),
    ]
    .concat()
}

/// `align run` of `dir`'s recipe, its stderr piped.
fn align(dir: &Path) -> Command {
    let mut c = align_command(&["run", dir.join("recipe.toml").to_str().unwrap()]);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn setup() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write_recipe(d.path(), &kill_recipe());
    d
}

fn weights(dir: &Path, stage: &str) -> Vec<u8> {
    std::fs::read(dir.join("out").join(stage).join("model/model.safetensors")).unwrap()
}

#[test]
fn align_run_killed_mid_stage_resumes_to_the_same_weights() {
    let whole = setup();
    let out = align(whole.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let cut = setup();
    let mut child = align(cut.path()).spawn().unwrap();
    let ckpts = cut.path().join("out/sft/checkpoints");
    // SIGKILL, mid-stage.
    kill_once_checkpointed(&mut child, &ckpts, 6, Duration::from_secs(300), "sft checkpoint", "align run");
    assert!(!cut.path().join("out/sft/model").exists(), "the sft stage was killed before it finished");
    assert!(!cut.path().join("out/rl").exists(), "the rl stage had not started");

    let again = align(cut.path()).output().unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("== base (Pretrain): done, skipped"), "{err}");
    assert!(err.contains("resuming from"), "the sft stage did not resume: {err}");
    for stage in ["base", "sft", "rl"] {
        assert!(weights(whole.path(), stage) == weights(cut.path(), stage), "{stage} weights differ");
    }
}
