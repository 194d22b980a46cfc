//! Stages repeated over seeds (`seeds = [0, 1]` on a stage): one run per
//! seed into `<stage>/seed-<seed>/`, a later stage with seeds paired seed by
//! seed, the report's mean ± std and per-seed rows, finished seeds skipped,
//! an added seed run alone, an interrupted seed resumed alone, and bad
//! seeds lists refused before anything runs, naming the stage and the key.

mod common;
use common::{
    align, align_in, names, read_json, recipe, refused, skipped, started, stderr, stdout, write_recipe,
};
use std::process::Stdio;
use std::sync::LazyLock;

/// A reward model, then RL and its judge repeated over seeds 0 and 1.
static RECIPE: LazyLock<String> = LazyLock::new(|| {
    [
        recipe::tiny("seeds", 7, 200),
        recipe::data("prefs", Some(0.2), "builtin:preferences?n=40&seed=4"),
        recipe::data("prompts", None, "builtin:rl?n=16&seed=5"),
        recipe::tokenizer_and_base("max_seq_len = 48, batch_size = 8, max_steps = 3, packing = true"),
        recipe::reward("base", "max_seq_len = 48, batch_size = 8, max_steps = 2"),
        recipe::rl(
            "base",
            &["reward = \"rm\"", "seeds = [0, 1]"],
            "steps = 2, batch_size = 4, num_samples = 2, max_new_tokens = 6, eval_every = 0, save_every = 1",
        ),
        recipe::judge(
            "rl",
            "base",
            &["seeds = [0, 1]"],
            r#"prompts = "builtin:eval?n=14&seed=6", judge = "reward:rm", oracle = "tasks", max_new_tokens = 8"#,
        ),
    ]
    .concat()
});

#[test]
fn a_stage_with_seeds_runs_per_seed_reports_mean_and_spread_and_skips_finished_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_recipe(dir, &RECIPE);
    let first = align_in(dir, &["run", "recipe.toml"]);
    let err = stderr(&first);
    assert!(first.status.success(), "{err}");
    assert_eq!(
        started(&err),
        names(&["tokenizer", "base", "rm", "rl seed 0", "rl seed 1", "judge seed 0", "judge seed 1"]),
        "{err}"
    );
    let out = dir.join("out");
    for seed in [0, 1] {
        let rl = out.join(format!("rl/seed-{seed}"));
        assert!(rl.join("model/model.safetensors").exists(), "{}", rl.display());
        // Each seed runs with its seed, recorded beside its outputs.
        let settings: toml::Table =
            toml::from_str(&std::fs::read_to_string(rl.join("config.toml")).unwrap()).unwrap();
        assert_eq!(settings["config"]["seed"].as_integer(), Some(seed), "{settings}");
        let m = read_json(&rl.join("manifest.json"));
        assert_eq!(m["completed"], true);
        // The judge of seed s compares seed s's RL model with the base.
        let judge = out.join(format!("judge/seed-{seed}"));
        let settings = std::fs::read_to_string(judge.join("config.toml")).unwrap();
        assert!(settings.contains(&format!("seed = {seed}")), "{settings}");
        let summary = read_json(&judge.join("summary.json"));
        let cand = summary.to_string();
        assert!(
            cand.contains(&format!("seed-{seed}")),
            "the judge of seed {seed} compares that seed's model: {cand}"
        );
        assert!(!out.join("rl/model").exists() && !out.join("judge/summary.json").exists());
    }
    // Both seeds' manifests differ (their hashes cover their seeds).
    let h = |s: u64| read_json(&out.join(format!("rl/seed-{s}/manifest.json")))["config_hash"].clone();
    assert_ne!(h(0), h(1));

    // The report: a row with mean ± std over the seeds, then one per seed.
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let row = |start: &str| {
        report
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("{start}: {report}"))
            .to_string()
    };
    let rl = row("| **rl (2 seeds)** | Rl | done |");
    assert!(rl.contains("mean ± std over seeds 0, 1: steps 2, reward "), "{rl}");
    assert!(rl.contains(" ± "), "{rl}");
    let judge = row("| **judge (2 seeds)** | Judge | done |");
    assert!(judge.contains("win rate ") && judge.contains(" ± "), "{judge}");
    for s in ["rl seed 0", "rl seed 1", "judge seed 0", "judge seed 1"] {
        let r = row(&format!("| {s} | "));
        assert!(r.contains("| done |") && !r.contains(" ± "), "{r}");
    }
    assert!(row("| base | Pretrain | done |").contains("final loss"), "{report}");
    assert!(report.contains("rl seed 1 rl.png](rl/seed-1/rl.png)"), "{report}");

    // A second run skips every seed.
    let again = align_in(dir, &["run", "recipe.toml"]);
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert!(started(&err).is_empty(), "{err}");
    assert_eq!(
        skipped(&err),
        names(&["tokenizer", "base", "rm", "rl seed 0", "rl seed 1", "judge seed 0", "judge seed 1"])
    );
    let status = stdout(&align_in(dir, &["status", "recipe.toml"]));
    assert!(status.lines().any(|l| l.starts_with("rl seed 1") && l.contains("done")), "{status}");

    // A seed that was interrupted (its manifest not written) resumes alone.
    std::fs::remove_file(out.join("rl/seed-1/manifest.json")).unwrap();
    let status = stdout(&align_in(dir, &["status", "recipe.toml"]));
    assert!(
        status.lines().any(|l| l.starts_with("rl seed 1") && l.contains("interrupted (resumes)")),
        "{status}"
    );
    let resumed = align_in(dir, &["run", "recipe.toml"]);
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert_eq!(started(&err), names(&["rl seed 1"]), "{err}");

    // An added seed runs alone (and its judge); the finished ones stay.
    let before = std::fs::read(out.join("rl/seed-0/manifest.json")).unwrap();
    let more = align_in(
        dir,
        &["run", "recipe.toml", "--set", "rl.seeds=[0, 1, 2]", "--set", "judge.seeds=[0, 1, 2]"],
    );
    let err = stderr(&more);
    assert!(more.status.success(), "{err}");
    assert_eq!(started(&err), names(&["rl seed 2", "judge seed 2"]), "{err}");
    assert_eq!(std::fs::read(out.join("rl/seed-0/manifest.json")).unwrap(), before);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| **rl (3 seeds)** | Rl | done |"), "{report}");
    assert!(report.contains("mean ± std over seeds 0, 1, 2"), "{report}");

    // Without seeds the stage runs once, into its own directory; the seed
    // directories of the earlier runs are removed.
    let once = align_in(dir, &["run", "recipe.toml", "--set", "rl.seeds=[0]", "--set", "judge.seeds=[0]"]);
    assert!(once.status.success(), "{}", stderr(&once));
    assert!(started(&stderr(&once)).is_empty(), "{}", stderr(&once));
    let plain = RECIPE.replace("seeds = [0, 1]\n", "");
    write_recipe(dir, &plain);
    let unseeded = align_in(dir, &["run", "recipe.toml"]);
    let err = stderr(&unseeded);
    assert!(unseeded.status.success(), "{err}");
    assert_eq!(started(&err), names(&["rl", "judge"]), "{err}");
    assert!(out.join("rl/model/model.safetensors").exists() && !out.join("rl/seed-0").exists());
    assert!(out.join("judge/summary.json").exists() && !out.join("judge/seed-1").exists());
}

#[test]
fn bad_seeds_lists_are_refused_naming_the_stage_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let rl_seeds = |list: &str| RECIPE.replacen("seeds = [0, 1]", &format!("seeds = {list}"), 1);
    refused(d, &rl_seeds("[]"), &["stages[3] \"rl\".seeds is empty", "seeds = [0, 1, 2]"]);
    refused(d, &rl_seeds("[0, 1, 0]"), &["stages[3] \"rl\".seeds: seed 0 is listed twice"]);
    refused(d, &rl_seeds("[0, 1.5]"), &["stages[3] \"rl\".seeds[1]", "floating point `1.5`"]);
    refused(d, &rl_seeds("[0, \"one\"]"), &["stages[3] \"rl\".seeds[1]", "string \"one\""]);
    refused(d, &rl_seeds("[-1, 0]"), &["stages[3] \"rl\".seeds[0]", "-1"]);
    refused(d, &rl_seeds("3"), &["stages[3] \"rl\".seeds", "expected a sequence"]);
    // A later stage using a stage repeated over seeds must have seeds too,
    // among that stage's.
    let judge_once = RECIPE.replace("seeds = [0, 1]\nconfig = { prompts", "config = { prompts");
    refused(
        d,
        &judge_once,
        &[
            "stages[4] \"judge\": candidate = \"rl\": \"rl\" is repeated over seeds [0, 1]",
            "seeds = [0, 1]` too",
        ],
    );
    let judge_more =
        RECIPE.replace("seeds = [0, 1]\nconfig = { prompts", "seeds = [0, 2]\nconfig = { prompts");
    refused(
        d,
        &judge_more,
        &["stages[4] \"judge\".seeds: seed 2 is not one of the seeds \"rl\" is repeated over"],
    );
    // The seed is the repetition's: not in the config as well.
    let both =
        RECIPE.replace("eval_every = 0, save_every = 1 }", "eval_every = 0, save_every = 1, seed = 3 }");
    refused(d, &both, &["stages[3] \"rl\": config.seed = 3 and seeds = [0, 1]", "remove config.seed"]);
    // The tokenizer is the recipe's one.
    let tok = RECIPE.replacen("kind = \"tokenizer\"\n", "kind = \"tokenizer\"\nseeds = [0, 1]\n", 1);
    refused(d, &tok, &["stages[0] \"tokenizer\".seeds: a tokenizer stage cannot be repeated over seeds"]);
    // `--set` names the stage's own key too.
    let r = write_recipe(d, &RECIPE);
    let out = align(&["run", &r, "--set", "rl.seeds=[]"]);
    assert!(
        !out.status.success() && stderr(&out).contains("stages[3] \"rl\".seeds is empty"),
        "{}",
        stderr(&out)
    );
    // A good list plans one row per seed.
    let dry = align(&["run", &r, "--dry-run"]);
    let plan = stdout(&dry);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        plan.contains("rl seed 0") && plan.contains("judge seed 1") && plan.contains("rl/seed-1"),
        "{plan}"
    );
}

/// RL repeated over seeds 0 and 1, 40 steps each, a checkpoint a step.
fn kill_recipe() -> String {
    [
        recipe::tiny("kill-seeds", 2, 200),
        recipe::data("prompts", None, "builtin:rl?n=64&seed=5"),
        recipe::tokenizer_and_base("max_seq_len = 48, batch_size = 8, max_steps = 3, packing = true"),
        recipe::rl(
            "base",
            &["seeds = [0, 1]"],
            r#"steps = 40, batch_size = 4, num_samples = 2, max_new_tokens = 6, save_every = 1, eval_every = 0, reward = { kind = "oracle" }"#,
        ),
    ]
    .concat()
}

/// A run killed (SIGKILL) while a stage runs its second seed resumes that
/// seed from its checkpoint and skips the finished first seed.
#[test]
fn a_run_killed_in_a_seed_resumes_that_seed_and_skips_the_finished_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = write_recipe(dir, &kill_recipe());
    let mut child =
        common::align_command(&["run", &r]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let ckpts = dir.join("out/rl/seed-1/checkpoints");
    common::kill_once_checkpointed(
        &mut child,
        &ckpts,
        2,
        std::time::Duration::from_secs(600),
        "rl seed 1 checkpoint",
        "align run",
    );
    assert!(dir.join("out/rl/seed-0/manifest.json").exists(), "seed 0 finished before seed 1 started");
    assert!(!dir.join("out/rl/seed-1/manifest.json").exists(), "seed 1 was killed before it finished");
    let status = stdout(&align(&["status", &r]));
    assert!(status.lines().any(|l| l.starts_with("rl seed 0") && l.contains("done")), "{status}");
    assert!(
        status.lines().any(|l| l.starts_with("rl seed 1") && l.contains("interrupted (resumes)")),
        "{status}"
    );
    let again = align(&["run", &r]);
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert_eq!(skipped(&err), names(&["tokenizer", "base", "rl seed 0"]), "{err}");
    assert_eq!(started(&err), names(&["rl seed 1"]), "{err}");
    assert!(err.contains("resuming from"), "seed 1 did not resume: {err}");
    let summary = read_json(&dir.join("out/rl/seed-1/summary.json"));
    assert_eq!(summary["steps"], 40, "{summary}");
}
