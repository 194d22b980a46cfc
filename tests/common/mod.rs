//! Helpers shared by the root package's integration tests: running the
//! `align` binary, reading its output, the fixture model's path, and killing
//! a training run once it has written a checkpoint.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// `align ARGS`, run to the end.
pub fn align(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_align")).args(args).output().expect("align runs")
}

/// `align ARGS` run in `dir`.
pub fn align_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_align")).current_dir(dir).args(args).output().expect("align runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The package root (`CARGO_MANIFEST_DIR`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A model directory of the transformers fixtures (`lm/tests/fixtures/NAME`).
pub fn fixture(name: &str) -> PathBuf {
    root().join("lm/tests/fixtures").join(name)
}

/// Writes `n` reverse-the-word dialogues as `dir/data.jsonl`.
pub fn write_reverse_data(dir: &Path, n: usize) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let w = format!("word{i}x{}", i * 7 % 13);
            let r: String = w.chars().rev().collect();
            serde_json::json!({"messages": [{"role": "user", "content": format!("Reverse: {w}")},
                                             {"role": "model", "content": r}]})
            .to_string()
        })
        .collect();
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// Waits until `ckpts` holds a checkpoint at step `step` or later, then
/// kills `child` with SIGKILL and reaps it. Fails with `no {what} appeared`
/// after `limit`, and with `{who} finished before it could be killed` when
/// the run ends first.
pub fn kill_once_checkpointed(
    child: &mut Child,
    ckpts: &Path,
    step: u64,
    limit: Duration,
    what: &str,
    who: &str,
) {
    let t0 = Instant::now();
    loop {
        let n = lm::train::list_checkpoints(ckpts).map(|v| v.last().map_or(0, |c| c.0)).unwrap_or(0);
        if n >= step {
            break;
        }
        assert!(t0.elapsed() < limit, "no {what} appeared");
        assert!(child.try_wait().unwrap().is_none(), "{who} finished before it could be killed");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}
