//! Recipes: reference checks before anything runs, a tiny end-to-end run,
//! skipping complete stages, and `--set` making a stage stale.

use std::path::Path;
use std::process::{Command, Output};

fn align(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_align")).args(args).output().expect("align runs")
}

const RECIPE: &str = r#"
name = "tiny"
output_dir = "out"
seed = 1
device = "cpu"
[base_model]
preset = "tiny"
[tokenizer]
train_on = ["builtin:pretrain?n=300&seed=1"]
vocab_size = 300
[data.text]
text = ["builtin:pretrain?n=200&seed=2"]
[data.sft]
held_out = { fraction = 0.1 }
[[data.sft.sources]]
name = "tasks"
path = "builtin:sft?n=100&seed=3"
[data.prefs]
held_out = { fraction = 0.2 }
[[data.prefs.sources]]
name = "tasks"
path = "builtin:preferences?n=40&seed=4"
[data.prompts]
[[data.prompts.sources]]
name = "tasks"
path = "builtin:rl?n=16&seed=5"
[[stages]]
name = "tokenizer"
kind = "tokenizer"
[[stages]]
name = "base"
kind = "pretrain"
data = "text"
config = { max_seq_len = 48, batch_size = 8, max_steps = 3, packing = true }
[[stages]]
name = "sft"
kind = "sft"
data = "sft"
config = { max_seq_len = 48, batch_size = 8, max_steps = 3 }
[[stages]]
name = "sweep"
kind = "sweep"
from = "base"
data = "sft"
baseline = "base"
[stages.config]
base = { max_seq_len = 48, batch_size = 8, max_steps = 2 }
prompts = "builtin:eval?n=14&seed=6"
judge = "oracle:tasks"
max_new_tokens = 8
variants = [{ name = "lr-low", set = { "optim.lr" = 1e-4 } }, { name = "lr-high", set = { "optim.lr" = 3e-3 }, weights = { tasks = 2.0 } }]
[[stages]]
name = "rm"
kind = "reward"
data = "prefs"
from = "sft"
config = { max_seq_len = 48, batch_size = 8, max_steps = 2 }
[[stages]]
name = "rl"
kind = "rl"
from = "sft"
data = "prompts"
reward = "rm"
config = { steps = 2, batch_size = 4, num_samples = 2, max_new_tokens = 6, eval_every = 0 }
[[stages]]
name = "judge"
kind = "judge"
candidate = "rl"
baseline = "sft"
config = { prompts = "builtin:eval?n=14&seed=6", judge = "reward:rm", oracle = "tasks", max_new_tokens = 8 }
"#;

fn write(dir: &Path, text: &str) -> String {
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn recipe_runs_end_to_end_then_skips_complete_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let r = write(tmp.path(), RECIPE);
    let out = align(&["run", &r]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in [
        "tokenizer.json",
        "base/model/config.json",
        "sft/model/model.safetensors",
        "rm/model/model.safetensors",
        "rl/model/model.safetensors",
        "judge/summary.json",
        "report.md",
    ] {
        assert!(tmp.path().join("out").join(f).exists(), "{f}");
    }
    let report = std::fs::read_to_string(tmp.path().join("out/report.md")).unwrap();
    assert!(report.contains("| sft | Sft | done | ") && report.contains("win rate"), "{report}");
    assert!(report.contains("Total time of the stage runs"), "{report}");
    assert!(report.contains("| rm | Reward | done | ") && report.contains("held-out accuracy"), "{report}");
    assert!(
        report.contains("| rl | Rl | done | ") && report.contains("agreement with the oracle"),
        "{report}"
    );
    assert!(report.contains("oracle accuracy"), "{report}");
    // A second run does nothing.
    let again = align(&["run", &r]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && err.matches("done, skipped").count() == 7, "{err}");
    // Changing a stage's setting makes it and the stages after it stale,
    // not the ones before; --stage runs it alone.
    let status = align(&["status", &r, "--set", "sft.max_steps=4"]);
    let text = String::from_utf8_lossy(&status.stdout);
    let state = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap().to_string();
    assert!(state("base").contains("done") && state("tokenizer").contains("done"), "{text}");
    for later in ["sft", "sweep", "rm", "rl", "judge"] {
        assert!(state(later).contains("stale"), "{later}: {text}");
    }
    let rerun = align(&["run", &r, "--stage", "sft", "--set", "sft.max_steps=4"]);
    assert!(rerun.status.success(), "{}", String::from_utf8_lossy(&rerun.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("out/sft/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 4);
    // The dry run prints the plan without running anything.
    let dry = align(&["run", &r, "--dry-run"]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("judge"));
}

#[test]
fn bad_references_and_keys_are_caught_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (RECIPE.replace("candidate = \"rl\"", "candidate = \"nope\""), "candidate = \"nope\" names no stage"),
        (RECIPE.replace("data = \"sft\"", "data = \"missing\""), "data = \"missing\" is not in [data]"),
        (RECIPE.replace("seed = 1", "seed = 1\nsed = 2"), "unknown field `sed`"),
        (RECIPE.replace("preset = \"tiny\"", "preset = \"huge\""), "unknown model preset"),
        (
            RECIPE.replace("weights = { tasks = 2.0 }", "weights = { nope = 2.0 }"),
            "weights name source \"nope\"",
        ),
        (RECIPE.replace("max_steps = 3, packing", "max_steps = \"three\", packing"), "invalid type"),
    ];
    for (text, needle) in cases {
        let r = write(tmp.path(), &text);
        let out = align(&["run", &r]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{needle}: {err}");
        assert!(!tmp.path().join("out").exists(), "nothing runs before the checks pass");
    }
}

#[test]
fn shipped_recipes_validate_with_dry_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    for r in ["quickstart.toml", "gemma-2b-sft-rm-rl.toml", "gemma-7b-sft-rm-rl.toml"] {
        let out = align(&["run", root.join(r).to_str().unwrap(), "--dry-run"]);
        assert!(out.status.success(), "{r}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("will run")
                || String::from_utf8_lossy(&out.stdout).contains("skip")
        );
    }
}
