//! Helpers shared by the root package's integration tests: running the
//! `align` binary, reading its output, the fixture model's path, killing
//! a training run once it has written a checkpoint, and the tiny recipes:
//! their pieces ([`recipe`]), writing one, the runs `align run` started or
//! skipped, and a recipe refused before anything runs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The `align` binary with `args`, to be run, spawned or given more settings.
pub fn align_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.args(args);
    c
}

/// `align ARGS`, run to the end.
pub fn align(args: &[&str]) -> Output {
    align_command(args).output().expect("align runs")
}

/// `align ARGS` run in `dir`.
pub fn align_in(dir: &Path, args: &[&str]) -> Output {
    align_command(args).current_dir(dir).output().expect("align runs")
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

/// Trains the 600-token tokenizer of `recipes/data/tiny_corpus.txt` into
/// `out` (`align tokenizer train`), which must succeed.
pub fn tiny_corpus_tokenizer(out: &Path) {
    let (corpus, out) = (root().join("recipes/data/tiny_corpus.txt"), out.to_str().unwrap());
    let o = align(&[
        "tokenizer",
        "train",
        "--input",
        corpus.to_str().unwrap(),
        "--vocab-size",
        "600",
        "--out",
        out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Writes `text` as `dir/recipe.toml`; returns that path.
pub fn write_recipe(dir: &Path, text: &str) -> String {
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Runs `text` as the recipe in `dir`: it must fail with every one of
/// `needles` in its stderr before anything runs. Returns the stderr.
pub fn refused(dir: &Path, text: &str, needles: &[&str]) -> String {
    let r = write_recipe(dir, text);
    let out = align(&["run", &r]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{needles:?}: it ran: {err}");
    for n in needles {
        assert!(err.contains(n), "{n}: {err}");
    }
    assert!(!dir.join("out").exists(), "nothing runs before the checks pass");
    err
}

/// The runs `align run` started: `base`, `rl seed 0`, … (its
/// `== NAME (Kind) → DIR` lines).
pub fn started(err: &str) -> Vec<String> {
    err.lines()
        .filter_map(|l| l.strip_prefix("== "))
        .filter_map(|l| l.split_once(" → ").map(|(head, _)| head))
        .filter_map(|head| head.rsplit_once(" (").map(|(name, _)| name.to_string()))
        .collect()
}

/// The runs `align run` skipped as complete (`== NAME (Kind): done, skipped`).
pub fn skipped(err: &str) -> Vec<String> {
    err.lines()
        .filter_map(|l| l.strip_prefix("== "))
        .filter(|l| l.ends_with("done, skipped"))
        .filter_map(|l| l.rsplit_once(" (").map(|(name, _)| name.to_string()))
        .collect()
}

pub fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Pieces of the tiny recipes the tests run, as TOML text: join them in
/// order (`[..].concat()`). What differs between the tests' recipes is an
/// argument, so each test file still says its own data sizes and configs;
/// a stage's `config` is the inside of its inline table.
pub mod recipe {
    /// The top of a recipe `name` with seed `seed`, on the CPU, writing to
    /// `out/`: the tiny model preset, a 300-token tokenizer trained on 300
    /// built-in pretraining texts, and `texts` of them (seed 2) as `data.text`.
    pub fn tiny(name: &str, seed: u64, texts: usize) -> String {
        format!(
            r#"
name = "{name}"
output_dir = "out"
seed = {seed}
device = "cpu"
[base_model]
preset = "tiny"
[tokenizer]
train_on = ["builtin:pretrain?n=300&seed=1"]
vocab_size = 300
[data.text]
text = ["builtin:pretrain?n={texts}&seed=2"]
"#
        )
    }

    /// `[data.SET]` of one source, "tasks", at `path`, holding out
    /// `held_out` of it where given.
    pub fn data(set: &str, held_out: Option<f64>, path: &str) -> String {
        let held_out = held_out.map(|f| format!("held_out = {{ fraction = {f} }}\n")).unwrap_or_default();
        format!("[data.{set}]\n{held_out}[[data.{set}.sources]]\nname = \"tasks\"\npath = \"{path}\"\n")
    }

    /// A `[[stages]]` table: its name, kind, then the `keys` lines.
    pub fn stage(name: &str, kind: &str, keys: &[&str]) -> String {
        let keys: String = keys.iter().map(|k| format!("{k}\n")).collect();
        format!("[[stages]]\nname = \"{name}\"\nkind = \"{kind}\"\n{keys}")
    }

    /// The tokenizer stage, then "base": pretraining on `data.text`.
    pub fn tokenizer_and_base(config: &str) -> String {
        stage("tokenizer", "tokenizer", &[])
            + &stage("base", "pretrain", &["data = \"text\"", &inline(config)])
    }

    /// "sft": SFT on `data.sft`, from the base model.
    pub fn sft(config: &str) -> String {
        stage("sft", "sft", &["data = \"sft\"", &inline(config)])
    }

    /// "rm": a reward model on `data.prefs`, from stage `from`.
    pub fn reward(from: &str, config: &str) -> String {
        stage("rm", "reward", &["data = \"prefs\"", &format!("from = \"{from}\""), &inline(config)])
    }

    /// "rl": RL on `data.prompts` from stage `from`, with the `keys` lines
    /// (its reward model, seeds) before its config.
    pub fn rl(from: &str, keys: &[&str], config: &str) -> String {
        let from = format!("from = \"{from}\"");
        stage("rl", "rl", &[&[from.as_str(), "data = \"prompts\""], keys, &[&inline(config)]].concat())
    }

    /// "judge": `candidate` against `baseline`, with the `keys` lines (its
    /// seeds) before its config.
    pub fn judge(candidate: &str, baseline: &str, keys: &[&str], config: &str) -> String {
        let (c, b) = (format!("candidate = \"{candidate}\""), format!("baseline = \"{baseline}\""));
        stage("judge", "judge", &[&[c.as_str(), &b], keys, &[&inline(config)]].concat())
    }

    /// "sweep": the `variants` of a 2-step SFT of 8 sequences of 48 from
    /// "base" on `data.sft`, each judged by the tasks' oracle against
    /// "base" on `prompts`, answering up to `max_new_tokens` tokens.
    pub fn sweep(prompts: &str, max_new_tokens: usize, variants: &str) -> String {
        stage(
            "sweep",
            "sweep",
            &[
                "from = \"base\"",
                "data = \"sft\"",
                "baseline = \"base\"",
                "[stages.config]",
                "base = { max_seq_len = 48, batch_size = 8, max_steps = 2 }",
                &format!("prompts = \"{prompts}\""),
                "judge = \"oracle:tasks\"",
                &format!("max_new_tokens = {max_new_tokens}"),
                &format!("variants = {variants}"),
            ],
        )
    }

    fn inline(config: &str) -> String {
        format!("config = {{ {config} }}")
    }
}
