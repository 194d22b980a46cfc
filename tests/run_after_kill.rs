//! `align run` killed with SIGKILL in the middle of a stage and run again
//! finishes with the same weights as an uninterrupted run: the runner
//! resumes the interrupted stage from its last checkpoint and runs the
//! stages after it.

mod common;
use common::kill_once_checkpointed;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const RECIPE: &str = r#"
name = "kill"
output_dir = "out"
seed = 2
device = "cpu"
[base_model]
preset = "tiny"
[tokenizer]
train_on = ["builtin:pretrain?n=300&seed=1"]
vocab_size = 300
[data.text]
text = ["builtin:pretrain?n=300&seed=2"]
[data.sft]
held_out = { fraction = 0.1 }
[[data.sft.sources]]
name = "tasks"
path = "builtin:sft?n=400&seed=3"
[data.prompts]
[[data.prompts.sources]]
name = "tasks"
path = "builtin:rl?n=64&seed=5"
[[stages]]
name = "tokenizer"
kind = "tokenizer"
[[stages]]
name = "base"
kind = "pretrain"
data = "text"
config = { max_seq_len = 48, batch_size = 8, max_steps = 4, packing = true }
[[stages]]
name = "sft"
kind = "sft"
data = "sft"
config = { max_seq_len = 48, batch_size = 8, max_steps = 40, save_every = 2, keep_last = 2, eval_every = 0 }
[[stages]]
name = "rl"
kind = "rl"
from = "sft"
data = "prompts"
config = { steps = 4, batch_size = 4, num_samples = 2, max_new_tokens = 6, save_every = 1, eval_every = 0, reward = { kind = "oracle" } }
"#;

fn align(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.args(["run", dir.join("recipe.toml").to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn setup() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("recipe.toml"), RECIPE).unwrap();
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
