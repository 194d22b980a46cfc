//! Resume after a real kill: `align sft` / `align reward` / `align rl`
//! killed with SIGKILL mid-run and run again give bit-identical weights to an
//! uninterrupted run (CPU).

mod common;
use common::{fixture, kill_once_checkpointed, write_reverse_data};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Two run directories `dir/a` and `dir/b`, each with `toml` written as
/// `file`: the directories and the config paths.
fn two_configs(dir: &Path, file: &str, toml: &str) -> [(PathBuf, PathBuf); 2] {
    ["a", "b"].map(|name| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(file);
        std::fs::write(&p, toml).unwrap();
        (d, p)
    })
}

fn sft_config(data: &Path) -> String {
    format!(
        r#"[sft]
model = "{}"
output_dir = "out"
max_seq_len = 64
batch_size = 8
grad_accum = 2
packing = true
max_steps = 300
save_every = 10
keep_last = 2
eval_every = 100
seed = 5
device = "cpu"
[sft.optim]
lr = 2e-3
warmup_steps = 10
weight_decay = 0.1
[sft.data]
seed = 2
held_out = {{ fraction = 0.05 }}
[[sft.data.sources]]
name = "reverse"
path = "{}"
"#,
        fixture("mqa").display(),
        data.display()
    )
}

fn stage(name: &str, config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.args([name, "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    c
}

/// Runs `cmd_a` to the end; runs `cmd_b`, kills it once a checkpoint at
/// step >= `kill_at` exists, runs it again; returns the two final weights.
fn run_kill_resume(name: &str, a: &Path, ca: &Path, b: &Path, cb: &Path, kill_at: u64) -> (Vec<u8>, Vec<u8>) {
    let out = stage(name, ca).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut child = stage(name, cb).spawn().unwrap();
    let ckpts = b.join("out/checkpoints");
    kill_once_checkpointed(&mut child, &ckpts, kill_at, Duration::from_secs(120), "checkpoint", "run");
    assert!(!b.join("out/model").exists(), "the run was killed before it finished");
    let out = stage(name, cb).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    (
        std::fs::read(a.join("out/model/model.safetensors")).unwrap(),
        std::fs::read(b.join("out/model/model.safetensors")).unwrap(),
    )
}

#[test]
fn reward_resume_after_kill_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..240)
        .map(|i| {
            let chosen = format!("good answer {i}");
            let rejected = format!("bad reply {}", i * 3 % 17);
            serde_json::json!({"prompt": format!("question {i}"), "chosen": chosen, "rejected": rejected})
                .to_string()
        })
        .collect();
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let toml = format!(
        "[reward]\nmodel = \"{}\"\noutput_dir = \"out\"\nmax_seq_len = 64\nbatch_size = 4\ngrad_accum = 2\nmax_steps = 200\nsave_every = 10\nkeep_last = 2\nseed = 4\ndevice = \"cpu\"\n[reward.optim]\nlr = 1e-3\nwarmup_steps = 5\n[reward.data]\nseed = 1\nheld_out = {{ fraction = 0.1 }}\n[[reward.data.sources]]\nname = \"pairs\"\npath = \"{}\"\n",
        fixture("mqa").display(),
        data.display()
    );
    let [(a, ca), (b, cb)] = two_configs(tmp.path(), "reward.toml", &toml);
    let (wa, wb) = run_kill_resume("reward", &a, &ca, &b, &cb, 30);
    assert!(wa == wb, "reward weights after kill + resume differ from the uninterrupted run");
}

#[test]
fn sft_resume_after_kill_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_reverse_data(tmp.path(), 200);
    let [(a, ca), (b, cb)] = two_configs(tmp.path(), "sft.toml", &sft_config(&data));

    // Uninterrupted run; interrupted run (SIGKILL once a mid-run checkpoint
    // exists) resumed to the end.
    let (wa, wb) = run_kill_resume("sft", &a, &ca, &b, &cb, 40);
    let ckpts = b.join("out/checkpoints");
    assert!(wa == wb, "weights after kill + resume differ from the uninterrupted run");
    // Metrics have one row per step, no duplicates from the killed run.
    let m = lm::train::read_metrics(&b.join("out/metrics.jsonl")).unwrap();
    let steps: Vec<u64> =
        m.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=300).collect::<Vec<_>>());
    // Only the last `keep_last` checkpoints remain.
    assert!(lm::train::list_checkpoints(&ckpts).unwrap().len() <= 2);
}

/// A reward model for the RL test: the fixture's backbone with a seeded
/// score head, saved as `align reward` saves one (with reward statistics).
fn write_reward_model(dir: &Path) {
    let fixture = fixture("mqa");
    let rm = lm::reward_model::load(&fixture, tch::Device::Cpu, tch::Kind::Float, Some(0.5), 17).unwrap();
    let stats = lm::reward_model::RewardStats { mean: 0.1, std: 0.5, n: 100, split: "eval".into() };
    lm::reward_model::save(dir, &rm.vs, &rm.model, &rm.tokenizer, Some(&stats)).unwrap();
}

#[test]
fn rl_resume_after_kill_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    write_reward_model(&rm);
    let topics = ["rivers", "stars", "bread", "clocks", "trains", "maps", "bees", "salt"];
    let prompts: Vec<String> = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("Tell me about {} {i}", topics[i % 8])}).to_string())
        .collect();
    let data = tmp.path().join("prompts.jsonl");
    std::fs::write(&data, prompts.join("\n")).unwrap();
    // Every piece of state a resume must restore: the adaptive KL
    // coefficient, the reward normalisation, two clipped updates per
    // batch over micro-batches, the prompt position across epochs (20
    // training prompts, 4 per step) and the sampling RNG.
    let toml = format!(
        r#"[rl]
model = "{policy}"
output_dir = "out"
steps = 60
batch_size = 4
num_samples = 2
max_new_tokens = 8
max_prompt_len = 48
temperature = 1.0
beta = 0.1
kl_target = 0.5
kl_horizon = 100
normalize_reward = true
reward_clip = 3.0
whiten_advantages = true
updates_per_batch = 2
micro_batch_size = 4
eval_every = 15
eval_prompts = 4
save_every = 5
keep_last = 2
seed = 9
device = "cpu"
[rl.optim]
lr = 3e-3
warmup_steps = 3
[rl.reward]
kind = "model"
path = "{rm}"
[rl.data]
seed = 3
held_out = {{ fraction = 0.2 }}
[[rl.data.sources]]
name = "prompts"
path = "{data}"
"#,
        policy = fixture("mqa").display(),
        rm = rm.display(),
        data = data.display(),
    );
    let [(a, ca), (b, cb)] = two_configs(tmp.path(), "rl.toml", &toml);
    let (wa, wb) = run_kill_resume("rl", &a, &ca, &b, &cb, 15);
    assert!(wa == wb, "rl policy weights after kill + resume differ from the uninterrupted run");
    // The training metrics have each step once, with the same values.
    let rows = |d: &Path| -> Vec<serde_json::Value> {
        lm::train::read_metrics(&d.join("out/metrics.jsonl"))
            .unwrap()
            .into_iter()
            .filter(|r| r.get("reward_mean").is_some())
            .collect()
    };
    let (ra, rb) = (rows(&a), rows(&b));
    let steps: Vec<u64> = rb.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=60).collect::<Vec<_>>());
    for (x, y) in ra.iter().zip(&rb) {
        for key in ["reward_mean", "kl", "beta", "loss", "clip_frac"] {
            assert_eq!(x[key], y[key], "step {} {key}", x["step"]);
        }
    }
    assert!(lm::train::list_checkpoints(&b.join("out/checkpoints")).unwrap().len() <= 2);
}
