//! Recipes: checks before anything runs (references, cycles, keys, types,
//! judge configs, missing files), a tiny end-to-end run of every stage kind,
//! skipping complete stages, `--from`, `--force`, a changed setting
//! rerunning that stage and the later ones, and a sweep resuming.
//!
//! The smoke recipe runs once per test binary (`smoke()`); tests that need
//! finished stages work on copies of its output. Recipes are run by a path
//! relative to their directory, so the copies' stages are still "done".

mod common;
use common::{
    align, align_in, names, read_json, recipe, refused, skipped, started, stderr, stdout, write_recipe,
};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{LazyLock, OnceLock};
use std::time::SystemTime;

/// The sweep's variants.
const VARIANTS: &str = r#"[{ name = "lr-low", set = { "optim.lr" = 1e-4 } }, { name = "lr-high", set = { "optim.lr" = 3e-3 }, weights = { tasks = 2.0 } }]"#;

/// The smoke recipe: a stage of every kind, tiny.
static RECIPE: LazyLock<String> = LazyLock::new(|| {
    [
        recipe::tiny("tiny", 1, 200),
        recipe::data("sft", Some(0.1), "builtin:sft?n=100&seed=3"),
        recipe::data("prefs", Some(0.2), "builtin:preferences?n=40&seed=4"),
        recipe::data("prompts", None, "builtin:rl?n=16&seed=5"),
        recipe::tokenizer_and_base("max_seq_len = 48, batch_size = 8, max_steps = 3, packing = true"),
        recipe::sft("max_seq_len = 48, batch_size = 8, max_steps = 3"),
        recipe::sweep("builtin:eval?n=14&seed=6", 8, VARIANTS),
        recipe::reward("sft", "max_seq_len = 48, batch_size = 8, max_steps = 2"),
        recipe::rl(
            "sft",
            &["reward = \"rm\""],
            "steps = 2, batch_size = 4, num_samples = 2, max_new_tokens = 6, eval_every = 0",
        ),
        recipe::judge(
            "rl",
            "sft",
            &[],
            r#"prompts = "builtin:eval?n=14&seed=6", judge = "reward:rm", oracle = "tasks", max_new_tokens = 8"#,
        ),
    ]
    .concat()
});

/// The smoke recipe run once: its directory and the first run's output.
struct Smoke {
    dir: PathBuf,
    first: Output,
}

fn smoke() -> &'static Smoke {
    static SMOKE: OnceLock<Smoke> = OnceLock::new();
    SMOKE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Leftovers of earlier test processes that are gone.
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("recipe-smoke-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(format!("recipe-smoke-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write_recipe(&dir, &RECIPE);
        let first = align_in(&dir, &["run", "recipe.toml"]);
        Smoke { dir, first }
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A copy of the finished smoke run (recipe and outputs) in a new directory.
fn finished_copy() -> tempfile::TempDir {
    let s = smoke();
    assert!(s.first.status.success(), "the smoke recipe failed: {}", stderr(&s.first));
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&s.dir, tmp.path());
    tmp
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).and_then(|m| m.modified()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const STAGES: [&str; 7] = ["tokenizer", "base", "sft", "sweep", "rm", "rl", "judge"];

/// Each stage's manifest: its modification time and its bytes.
fn manifests(dir: &Path) -> Vec<(SystemTime, Vec<u8>)> {
    STAGES
        .iter()
        .map(|s| {
            let m = dir.join("out").join(s).join("manifest.json");
            (mtime(&m), std::fs::read(&m).unwrap())
        })
        .collect()
}

#[test]
fn recipe_runs_end_to_end_then_skips_complete_stages() {
    let s = smoke();
    assert!(s.first.status.success(), "{}", stderr(&s.first));
    assert_eq!(started(&stderr(&s.first)), names(&STAGES));
    for f in [
        "tokenizer.json",
        "base/model/config.json",
        "sft/model/model.safetensors",
        "sweep/model/model.safetensors",
        "rm/model/model.safetensors",
        "rl/model/model.safetensors",
        "judge/summary.json",
        "report.md",
    ] {
        assert!(s.dir.join("out").join(f).exists(), "{f}");
    }
    let report = std::fs::read_to_string(s.dir.join("out/report.md")).unwrap();
    assert!(report.contains("| sft | Sft | done | ") && report.contains("win rate"), "{report}");
    assert!(report.contains("Total time of the stage runs"), "{report}");
    assert!(report.contains("| rm | Reward | done | ") && report.contains("held-out accuracy"), "{report}");
    assert!(
        report.contains("| rl | Rl | done | ") && report.contains("agreement with the oracle"),
        "{report}"
    );
    assert!(report.contains("oracle accuracy"), "{report}");
    // The leaderboard: overall and per category, each with its interval.
    let board = std::fs::read_to_string(s.dir.join("out/sweep/leaderboard.md")).unwrap();
    let summary: serde_json::Value = read_json(&s.dir.join("out/sweep/variants/lr-low/judge/summary.json"));
    let cats: Vec<&String> = summary["per_category"].as_object().unwrap().keys().collect();
    assert!(!cats.is_empty(), "{summary}");
    assert!(board.contains("## Per category"), "{board}");
    let header = board.lines().find(|l| l.starts_with("| variant |")).expect("a per-category table");
    for c in &cats {
        assert!(header.contains(c.as_str()), "{c}: {board}");
    }
    for v in ["lr-low", "lr-high"] {
        let row = board.lines().find(|l| l.starts_with(&format!("| {v} |"))).expect("a row per variant");
        // One cell per category: a rate, its interval and n.
        assert_eq!(row.matches("), n ").count() + row.matches("– (n ").count(), cats.len(), "{row}");
    }
    let json: serde_json::Value = read_json(&s.dir.join("out/sweep/leaderboard.json"));
    let first = &json["leaderboard"][0]["per_category"][cats[0].as_str()];
    assert!(first["lo"].is_number() && first["hi"].is_number() && first["n"].is_number(), "{json}");

    // A second run does nothing.
    let tmp = finished_copy();
    let again = align_in(tmp.path(), &["run", "recipe.toml"]);
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert_eq!(skipped(&err), names(&STAGES), "{err}");
    assert!(started(&err).is_empty(), "{err}");
    // Changing a stage's setting makes it and the stages after it stale,
    // not the ones before; --stage runs it alone.
    let status = align_in(tmp.path(), &["status", "recipe.toml", "--set", "sft.max_steps=4"]);
    let text = stdout(&status);
    let state = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap().to_string();
    assert!(state("base").contains("done") && state("tokenizer").contains("done"), "{text}");
    for later in ["sft", "sweep", "rm", "rl", "judge"] {
        assert!(state(later).contains("stale"), "{later}: {text}");
    }
    let rerun = align_in(tmp.path(), &["run", "recipe.toml", "--stage", "sft", "--set", "sft.max_steps=4"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert_eq!(started(&stderr(&rerun)), names(&["sft"]));
    let summary: serde_json::Value = read_json(&tmp.path().join("out/sft/summary.json"));
    assert_eq!(summary["steps"], 4);
    // The dry run prints the plan without running anything.
    let dry = align_in(tmp.path(), &["run", "recipe.toml", "--dry-run"]);
    assert!(stdout(&dry).contains("judge"));
    assert!(!stdout(&dry).contains("warning"), "{}", stdout(&dry));
}

#[test]
fn from_runs_that_stage_and_the_later_ones_and_force_reruns_complete_ones() {
    let tmp = finished_copy();
    let before = manifests(tmp.path());
    // --from: the stages before it are not looked at; complete ones skipped.
    let out = align_in(tmp.path(), &["run", "recipe.toml", "--from", "rm"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(skipped(&err), names(&["rm", "rl", "judge"]), "{err}");
    assert!(started(&err).is_empty(), "{err}");
    assert_eq!(manifests(tmp.path()), before, "nothing was rerun");
    // --from with --force reruns that stage and the later ones only.
    let out = align_in(tmp.path(), &["run", "recipe.toml", "--from", "rl", "--force"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(started(&err), names(&["rl", "judge"]), "{err}");
    assert!(skipped(&err).is_empty(), "{err}");
    let after = manifests(tmp.path());
    for (k, stage) in STAGES.iter().enumerate() {
        if ["rl", "judge"].contains(stage) {
            assert!(after[k].0 > before[k].0, "{stage} was rerun");
        } else {
            assert_eq!(after[k], before[k], "{stage} was left alone");
        }
    }
    // Still complete for the same configuration.
    let status = align_in(tmp.path(), &["status", "recipe.toml"]);
    let text = stdout(&status);
    assert_eq!(text.lines().filter(|l| !l.starts_with(' ') && l.contains(" done ")).count(), 7, "{text}");
}

#[test]
fn force_reruns_one_complete_stage() {
    let tmp = finished_copy();
    let before = manifests(tmp.path());
    let weights = tmp.path().join("out/sft/model/model.safetensors");
    let w0 = std::fs::read(&weights).unwrap();
    let out = align_in(tmp.path(), &["run", "recipe.toml", "--stage", "sft", "--force"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(started(&err), names(&["sft"]), "{err}");
    let after = manifests(tmp.path());
    for (k, stage) in STAGES.iter().enumerate() {
        if *stage == "sft" {
            assert!(after[k].0 > before[k].0, "sft was rerun");
        } else {
            assert_eq!(after[k], before[k], "{stage} was left alone");
        }
    }
    // Retrained from scratch (its directory was cleared), to the same weights.
    assert!(mtime(&weights) > before[2].0);
    assert!(std::fs::read(&weights).unwrap() == w0, "the same configuration trains the same weights");
    // Without --force a complete stage is skipped.
    let out = align_in(tmp.path(), &["run", "recipe.toml", "--stage", "sft"]);
    assert_eq!(skipped(&stderr(&out)), names(&["sft"]), "{}", stderr(&out));
}

#[test]
fn changing_a_setting_reruns_that_stage_and_the_later_ones_only() {
    let tmp = finished_copy();
    let before = manifests(tmp.path());
    let old = "from = \"sft\"\nconfig = { max_seq_len = 48, batch_size = 8, max_steps = 2 }";
    write_recipe(tmp.path(), &edited(old, &old.replace("max_steps = 2", "max_steps = 3")));
    let out = align_in(tmp.path(), &["run", "recipe.toml"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(skipped(&err), names(&["tokenizer", "base", "sft", "sweep"]), "{err}");
    assert_eq!(started(&err), names(&["rm", "rl", "judge"]), "{err}");
    let after = manifests(tmp.path());
    for k in 0..4 {
        assert_eq!(after[k], before[k], "{} was left alone", STAGES[k]);
    }
    for k in 4..7 {
        assert!(after[k].0 > before[k].0 && after[k].1 != before[k].1, "{} was rerun", STAGES[k]);
    }
    let rm: serde_json::Value = serde_json::from_slice(&after[4].1).unwrap();
    assert_eq!(rm["summary"]["steps"], 3, "{rm}");
}

#[test]
fn interrupted_sweep_resumes_without_retraining_the_finished_variant() {
    let tmp = finished_copy();
    let sweep = tmp.path().join("out/sweep");
    // As if killed after the first variant was judged, before the second
    // one's judgement: no manifest, no winner, no lr-high judgement.
    std::fs::remove_file(sweep.join("manifest.json")).unwrap();
    std::fs::remove_dir_all(sweep.join("model")).unwrap();
    std::fs::remove_file(sweep.join("leaderboard.json")).unwrap();
    std::fs::remove_dir_all(sweep.join("variants/lr-high/judge")).unwrap();
    let low = sweep.join("variants/lr-low/model/model.safetensors");
    let (low_time, low_bytes) = (mtime(&low), std::fs::read(&low).unwrap());
    let low_judged = mtime(&sweep.join("variants/lr-low/judge/summary.json"));
    let out = align_in(tmp.path(), &["run", "recipe.toml"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(started(&err), names(&["sweep"]), "{err}");
    assert!(err.contains("-- variant lr-low: judged already, kept"), "{err}");
    assert!(err.lines().any(|l| l == "-- variant lr-high"), "{err}");
    assert!(!err.lines().any(|l| l == "-- variant lr-low"), "lr-low was not retrained: {err}");
    assert_eq!(mtime(&low), low_time);
    assert!(std::fs::read(&low).unwrap() == low_bytes);
    assert_eq!(mtime(&sweep.join("variants/lr-low/judge/summary.json")), low_judged);
    // The resumed sweep ends where the uninterrupted one did.
    let board = |d: &Path| -> serde_json::Value { read_json(&d.join("out/sweep/leaderboard.json")) };
    let (resumed, whole) = (board(tmp.path()), board(&smoke().dir));
    assert_eq!(resumed["winner"], whole["winner"]);
    assert_eq!(resumed["leaderboard"].as_array().map(Vec::len), Some(2));
    for k in 0..2 {
        assert_eq!(resumed["leaderboard"][k]["win_rate"], whole["leaderboard"][k]["win_rate"], "{resumed}");
    }
    assert!(sweep.join("model/model.safetensors").exists());
}

/// The smoke recipe with `from` replaced by `to`, which must change it.
fn edited(from: &str, to: &str) -> String {
    let text = RECIPE.replace(from, to);
    assert_ne!(text, *RECIPE, "{from:?} → {to:?}: the case changes the recipe");
    text
}

/// Each `(from, to, needle)`: the smoke recipe with `from` replaced by `to`
/// is refused with `needle` in its stderr before anything runs.
fn edits_refused(cases: &[(&str, &str, &str)]) {
    let tmp = tempfile::tempdir().unwrap();
    for (from, to, needle) in cases {
        refused(tmp.path(), &edited(from, to), &[needle]);
    }
}

#[test]
fn bad_references_and_keys_are_caught_before_anything_runs() {
    let rm = "name = \"rm\"\nkind = \"reward\"";
    let sft = "batch_size = 8, max_steps = 3 }";
    edits_refused(&[
        ("candidate = \"rl\"", "candidate = \"nope\"", "candidate = \"nope\" names no stage"),
        ("data = \"sft\"", "data = \"missing\"", "data = \"missing\" is not in [data]"),
        ("seed = 1", "seed = 1\nsed = 2", "unknown field `sed`"),
        ("preset = \"tiny\"", "preset = \"huge\"", "unknown model preset"),
        ("weights = { tasks = 2.0 }", "weights = { nope = 2.0 }", "weights name source \"nope\""),
        // Wrong types name the key path, the stage by index and name.
        (
            "max_steps = 3, packing",
            "max_steps = \"three\", packing",
            "stages[1] \"base\".config.max_steps: invalid type: string \"three\"",
        ),
        ("kind = \"sweep\"", "kind = \"swep\"", "stages[3] \"sweep\".kind: unknown variant `swep`"),
        (
            "held_out = { fraction = 0.2 }",
            "held_out = { fraction = \"a fifth\" }",
            "data.prefs.held_out.fraction: invalid type: string \"a fifth\"",
        ),
        (
            "\"optim.lr\" = 1e-4",
            "\"optim.lr\" = \"slow\"",
            "stages[3] \"sweep\" variant \"lr-low\": config.optim.lr: invalid type: string \"slow\"",
        ),
        (
            "base = { max_seq_len = 48",
            "base = { max_seq_len = \"long\"",
            "stages[3] \"sweep\".config.base.max_seq_len: invalid type",
        ),
        // Unknown keys in a stage or its config name the stage.
        (rm, "name = \"rm\"\nkind = \"reward\"\nfrm = \"sft\"", "stages[4] \"rm\""),
        (rm, "name = \"rm\"\nkind = \"reward\"\nfrm = \"sft\"", "unknown field `frm`"),
        (sft, "batch_size = 8, max_steps = 3, max_stepz = 4 }", "stages[2] \"sft\".config"),
        (sft, "batch_size = 8, max_steps = 3, max_stepz = 4 }", "unknown field `max_stepz`"),
    ]);
}

/// A recipe of two SFT stages with the given references.
fn two_stages(a: &str, b: &str) -> String {
    format!(
        r#"
name = "refs"
output_dir = "out"
[base_model]
preset = "tiny"
[tokenizer]
train_on = ["builtin:pretrain?n=50&seed=1"]
[data.sft]
[[data.sft.sources]]
name = "tasks"
path = "builtin:sft?n=20&seed=3"
[[stages]]
name = "a"
kind = "sft"
data = "sft"
{a}
[[stages]]
name = "b"
kind = "sft"
data = "sft"
{b}
"#
    )
}

#[test]
fn cycles_self_references_and_forward_references_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            two_stages("from = \"b\"", "from = \"a\""),
            "stages[0] \"a\": from = \"b\" and stages[1] \"b\": from = \"a\" form a cycle",
        ),
        (
            two_stages("from = \"a\"", ""),
            "stages[0] \"a\": from = \"a\" refers to the stage itself, which would be a cycle",
        ),
        (two_stages("", "from = \"b\""), "stages[1] \"b\": from = \"b\" refers to the stage itself"),
        (two_stages("from = \"b\"", ""), "stages[0] \"a\": from = \"b\" comes later (stages[1] \"b\")"),
        (
            edited("judge = \"reward:rm\"", "judge = \"reward:judge\""),
            "config.judge = \"judge\" refers to the stage itself",
        ),
    ];
    for (text, needle) in cases {
        let err = refused(tmp.path(), &text, &[needle]);
        assert!(err.contains("a stage can only use the outputs of stages before it"), "{err}");
    }
}

#[test]
fn judge_and_sweep_judge_configs_are_checked_before_anything_runs() {
    let judge = "judge = \"reward:rm\", oracle = \"tasks\", max_new_tokens = 8";
    edits_refused(&[
        (
            judge,
            "judge = \"foo:bar\", oracle = \"tasks\", max_new_tokens = 8",
            "stages[6] \"judge\".config.judge: judge spec \"foo:bar\": unknown kind \"foo\"",
        ),
        (
            judge,
            "judge = \"reward:rm\", oracle = \"tasks\", max_new_tokns = 8",
            "stages[6] \"judge\".config: unknown key \"max_new_tokns\" (did you mean \"max_new_tokens\"?)",
        ),
        (
            judge,
            "judge = \"reward:rm\", oracle = \"tasks\", max_new_tokens = \"eight\"",
            "stages[6] \"judge\".config.max_new_tokens: invalid value 'eight'",
        ),
        (
            judge,
            "judge = \"reward:rm\", oracle = \"nope\", max_new_tokens = 8",
            "stages[6] \"judge\".config.oracle: unknown oracle \"nope\"",
        ),
        (
            judge,
            "judge = \"reward:rl\", oracle = \"tasks\", max_new_tokens = 8",
            "stages[6] \"judge\": config.judge = \"rl\" is a rl stage; it must name a reward stage",
        ),
        (
            judge,
            "judge = \"reward:rm\", lm_mode = \"guess\"",
            "stages[6] \"judge\".config.lm_mode: invalid value 'guess'",
        ),
        (
            judge,
            "judge = \"reward:rm\", out = \"elsewhere\"",
            "stages[6] \"judge\".config.out: the runner sets this",
        ),
        (
            "prompts = \"builtin:eval?n=14&seed=6\", judge",
            "judge",
            "stages[6] \"judge\".config.prompts is missing",
        ),
        (
            "judge = \"oracle:tasks\"",
            "judge = \"oracle:nope\"",
            "stages[3] \"sweep\".config.judge: unknown oracle \"nope\"",
        ),
        (
            "judge = \"oracle:tasks\"",
            "judge = \"orcl:tasks\"",
            "stages[3] \"sweep\".config.judge: judge spec \"orcl:tasks\": unknown kind",
        ),
    ]);
}

#[test]
fn missing_files_fail_fast_naming_the_place_and_dry_run_lists_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "path = \"builtin:sft?n=100&seed=3\"",
            "path = \"missing-chat.jsonl\"",
            "stages[2] \"sft\": data source \"tasks\": file ./missing-chat.jsonl does not exist",
        ),
        (
            "held_out = { fraction = 0.1 }",
            "held_out = { path = \"held-out.jsonl\" }",
            "stages[2] \"sft\": data.sft.held_out.path: file ./held-out.jsonl does not exist",
        ),
        (
            "text = [\"builtin:pretrain?n=200&seed=2\"]",
            "text = [\"corpus.txt\"]",
            "stages[1] \"base\": data.text.text[0]: file ./corpus.txt does not exist",
        ),
        (
            "train_on = [\"builtin:pretrain?n=300&seed=1\"]",
            "file = \"tok.json\"",
            "tokenizer.file: file ./tok.json does not exist",
        ),
        (
            "preset = \"tiny\"",
            "checkpoint = \"ckpt\"",
            "base_model.checkpoint (the model stages[1] \"base\" starts from): directory ./ckpt does not exist",
        ),
        (
            "prompts = \"builtin:eval?n=14&seed=6\", judge = \"reward:rm\"",
            "prompts = \"eval-prompts.jsonl\", judge = \"reward:rm\"",
            "stages[6] \"judge\": config.prompts: file ./eval-prompts.jsonl does not exist",
        ),
        (
            "prompts = \"builtin:eval?n=14&seed=6\"\njudge",
            "prompts = \"dev.jsonl\"\njudge",
            "stages[3] \"sweep\": config.prompts: file ./dev.jsonl does not exist",
        ),
        (
            "judge = \"reward:rm\"",
            "judge = \"reward:models/rm\"",
            "stages[6] \"judge\": config.judge (names no stage, so a model directory): directory ./models/rm does not exist",
        ),
    ];
    for (from, to, needle) in cases {
        write_recipe(tmp.path(), &edited(from, to));
        let t0 = std::time::Instant::now();
        let out = align_in(tmp.path(), &["run", "recipe.toml"]);
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains(needle), "{needle}: {err}");
        assert!(err.contains("no stage was run"), "{err}");
        assert!(!tmp.path().join("out").exists(), "nothing was written for the earlier stages: {needle}");
        assert!(t0.elapsed().as_secs() < 20, "the check comes before any work");
        // The dry run shows the plan and lists what is missing.
        let dry = align_in(tmp.path(), &["run", "recipe.toml", "--dry-run"]);
        assert!(dry.status.success(), "{}", stderr(&dry));
        let plan = stdout(&dry);
        assert!(plan.contains("will run") && plan.contains("warning:") && plan.contains(needle), "{plan}");
    }
    // One data file, used by two stages: both are named.
    write_recipe(tmp.path(), &edited("path = \"builtin:sft?n=100&seed=3\"", "path = \"missing-chat.jsonl\""));
    let err = stderr(&align_in(tmp.path(), &["run", "recipe.toml"]));
    assert!(err.contains("stages[3] \"sweep\": data source \"tasks\": file ./missing-chat.jsonl"), "{err}");
    // Paths inside the output directory are made by earlier stages.
    let text = edited(
        "prompts = \"builtin:eval?n=14&seed=6\", judge = \"reward:rm\"",
        "prompts = \"out/sft/made-earlier.jsonl\", judge = \"reward:rm\"",
    );
    write_recipe(tmp.path(), &text);
    let dry = align_in(tmp.path(), &["run", "recipe.toml", "--dry-run"]);
    assert!(dry.status.success() && !stdout(&dry).contains("warning"), "{}", stdout(&dry));
}

#[test]
fn a_grid_sweep_is_planned_and_its_values_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let list = format!("variants = {VARIANTS}");
    let grid = "[stages.config.grid]\n\"optim.lr\" = [1e-4, 3e-3]\n\"mixture.weights.tasks\" = [1.0, 2.0]";
    let r = write_recipe(tmp.path(), &edited(&list, grid));
    let dry = align(&["run", &r, "--dry-run"]);
    let plan = stdout(&dry);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        plan.contains("variants: tasks=1,lr=1e-4, tasks=1,lr=3e-3, tasks=2,lr=1e-4, tasks=2,lr=3e-3"),
        "{plan}"
    );
    let r = write_recipe(tmp.path(), &edited(&list, &grid.replace("[1e-4, 3e-3]", "[1e-4, \"fast\"]")));
    let err = stderr(&align(&["run", &r]));
    assert!(
        err.contains("stages[3] \"sweep\" variant \"tasks=1,lr=fast\": config.optim.lr: invalid type"),
        "{err}"
    );
    let r = write_recipe(tmp.path(), &edited(&list, &grid.replace("mixture.weights.tasks", "weights.nope")));
    let err = stderr(&align(&["run", &r]));
    assert!(err.contains("weights name source \"nope\""), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn shipped_recipes_validate_with_dry_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    for r in ["quickstart.toml", "gemma-2b-sft-rm-rl.toml", "gemma-7b-sft-rm-rl.toml"] {
        let out = align(&["run", root.join(r).to_str().unwrap(), "--dry-run"]);
        assert!(out.status.success(), "{r}: {}", stderr(&out));
        let plan = stdout(&out);
        assert!(plan.contains("will run") || plan.contains("skip"), "{plan}");
        // The Gemma recipes name a checkpoint and data this machine may not
        // have: the plan lists them as warnings instead of failing.
        if r.starts_with("gemma") && !Path::new("/models").exists() {
            assert!(plan.contains("warning:") && plan.contains("base_model.checkpoint"), "{plan}");
            assert!(plan.contains("data source"), "{plan}");
        }
        if r == "quickstart.toml" {
            assert!(!plan.contains("warning"), "{plan}");
        }
    }
}

#[test]
fn a_set_run_records_its_settings_and_a_plain_run_says_what_it_changes_back() {
    let tmp = finished_copy();
    let judge = tmp.path().join("out/judge");
    let recorded = std::fs::read_to_string(judge.join("config.toml")).unwrap();
    assert!(
        recorded.contains("max_new_tokens = 8") && recorded.contains("judge = \"reward:rm\""),
        "{recorded}"
    );
    // A training stage records every setting, defaults included.
    let rl = std::fs::read_to_string(tmp.path().join("out/rl/config.toml")).unwrap();
    for key in ["steps = 2\n", "beta = ", "seed = 1\n", "[config.optim]", "reward = \"rm\""] {
        assert!(rl.contains(key), "{key}: {rl}");
    }
    let out = align_in(tmp.path(), &["run", "recipe.toml", "--set", "judge.max_new_tokens=6"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(started(&err), names(&["judge"]), "{err}");
    let recorded = std::fs::read_to_string(judge.join("config.toml")).unwrap();
    assert!(recorded.contains("max_new_tokens = 6"), "the override is recorded: {recorded}");
    // Status names the key and still shows the figures of the outputs there.
    let status = stdout(&align_in(tmp.path(), &["status", "recipe.toml"]));
    let row = status.lines().position(|l| l.starts_with("judge ")).unwrap_or_else(|| panic!("{status}"));
    let lines: Vec<&str> = status.lines().collect();
    assert!(lines[row].contains("stale (config changed: judge.max_new_tokens 6 → 8)"), "{status}");
    assert!(lines.get(row + 1).is_some_and(|l| l.contains("win rate")), "{status}");
    // A plain run says what it changes back before it reruns anything.
    let out = align_in(tmp.path(), &["run", "recipe.toml"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let said = err.find("judge.max_new_tokens 6 → 8").unwrap_or_else(|| panic!("{err}"));
    let reran = err.find("== judge (Judge) →").unwrap_or_else(|| panic!("{err}"));
    assert!(said < reran, "{err}");
    let recorded = std::fs::read_to_string(judge.join("config.toml")).unwrap();
    assert!(recorded.contains("max_new_tokens = 8"), "{recorded}");
}

#[test]
fn unknown_keys_suggest_ours_for_trl_names_and_set_says_its_form() {
    let tmp = tempfile::tempdir().unwrap();
    let rl = "steps = 2, batch_size = 4";
    for (trl, needle) in [
        ("kl_coef = 0.1", "did you mean `beta`? (TRL's `kl_coef` is `beta` here)"),
        ("learning_rate = 1e-5", "did you mean `optim.lr`? (TRL's `learning_rate` is `optim.lr` here)"),
        ("num_generations = 4", "did you mean `num_samples`?"),
        ("per_device_train_batch_size = 4", "did you mean `batch_size`?"),
        ("optim = { learning_rate = 1e-5 }", "optim.learning_rate: unknown field `learning_rate`"),
        ("optim = { learning_rate = 1e-5 }", "did you mean `lr`?"),
        ("stepz = 3", "did you mean `steps`?"),
    ] {
        let err = refused(tmp.path(), &edited(rl, &format!("steps = 2, {trl}, batch_size = 4")), &[needle]);
        assert!(err.contains("stages[5] \"rl\".config"), "{err}");
    }
    let r = write_recipe(tmp.path(), &RECIPE);
    let out = align(&["run", &r, "--set", "rl.config.beta=0.1"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("the form is --set rl.beta=0.1"), "{err}");
    let out = align(&["run", &r, "--set", "rl.kl_coef=0.1", "--dry-run"]);
    assert!(!out.status.success() && stderr(&out).contains("did you mean `beta`?"), "{}", stderr(&out));
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn a_judge_that_is_the_candidates_own_reward_model_is_warned_about() {
    let s = smoke();
    let err = stderr(&s.first);
    assert!(
        err.contains("warning: stages[6] \"judge\".config: judge = \"reward:rm\" is the reward model \"rl\" was optimised against"),
        "{err}"
    );
    let report = std::fs::read_to_string(s.dir.join("out/report.md")).unwrap();
    assert!(
        report.contains("## Warnings") && report.contains("is the reward model \"rl\" was optimised against"),
        "{report}"
    );
    // An independent judge: no warning.
    let tmp = tempfile::tempdir().unwrap();
    let r = write_recipe(tmp.path(), &edited("judge = \"reward:rm\"", "judge = \"oracle:tasks\""));
    let out = align(&["run", &r, "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("optimised against"), "{}", stderr(&out));
}

#[test]
fn align_judge_checks_its_judge_and_oracles_before_generating_any_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-model");
    let missing = missing.to_str().unwrap();
    let out_dir = tmp.path().join("judged");
    let judge = |extra: &[&str]| {
        let mut args = vec![
            "judge",
            "--candidate",
            missing,
            "--baseline",
            missing,
            "--prompts",
            "builtin:eval?n=4&seed=1",
            "--out",
            out_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        align(&args)
    };
    for (extra, needle) in [
        (&["--judge", "oracle:nope"][..], "unknown oracle \"nope\""),
        (&["--judge", "oracle:tasks", "--oracle", "nope"][..], "unknown oracle \"nope\""),
        (&["--judge", "oracle:exact"][..], "add a `reference` column"),
        (&["--judge", "foo:bar"][..], "unknown kind \"foo\""),
        (
            &["--judge", "lm:/nonexistent/judge"][..],
            "the judge's model directory /nonexistent/judge does not exist",
        ),
    ] {
        let out = judge(extra);
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("answering"), "checked before answering: {err}");
    }
}
