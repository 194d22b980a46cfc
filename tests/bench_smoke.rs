//! `align bench lora` runs end to end on a tiny preset (the reference
//! skipped): it prints its figures. No timing is asserted.

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["bench", "lora", "--preset", "tiny", "--seq", "32", "--python", "none"])
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

#[test]
fn bench_lora_runs_on_a_tiny_preset_and_prints_its_figures() {
    let out = bench(&["--steps", "1", "--base-dtype", "f32,bf16"]);
    assert!(out.contains("machine: ") && out.contains("torch threads"), "{out}");
    for dtype in ["f32", "bf16"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{dtype} base  align")))
            .unwrap_or_else(|| panic!("no {dtype} line: {out}"));
        assert!(line.contains("s/step") && line.contains("peak RSS"), "{line}");
    }
    assert!(!out.contains("peft "), "the reference was skipped: {out}");
}

#[test]
fn bench_lora_rl_runs_one_step_on_a_tiny_preset() {
    let out = bench(&["--rl", "--warmup", "0", "--steps", "1", "--base-dtype", "f32", "--new-tokens", "4"]);
    let line =
        out.lines().find(|l| l.starts_with("f32 base  align RL step")).unwrap_or_else(|| panic!("{out}"));
    for part in ["generate", "score", "update", "peak RSS"] {
        assert!(line.contains(part), "{line}");
    }
}
