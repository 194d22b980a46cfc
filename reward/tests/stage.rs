//! The training stage end to end: learning a synthetic preference, resume,
//! bad input and the length policy.

mod common;

use common::*;
use std::path::Path;

fn read(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn learns_a_synthetic_preference_to_90_percent_held_out() {
    let dir = tempfile::tempdir().unwrap();
    write_lm(&dir.path().join("init"), 7, true);
    write_jsonl(&dir.path().join("pairs.jsonl"), &synthetic_rows(500, 11));
    let cfg = load_config(&write_config(
        dir.path(),
        "epochs = 2\neval_every = 50\ncenter_rewards_coefficient = 0.01",
    ));
    let s = reward::run(&cfg, dir.path()).unwrap();
    let eval = s.eval.as_ref().unwrap();
    eprintln!(
        "held-out accuracy {:.3} over {} pairs after {} steps; mean margin {:.3}; first losses {:?}, final {:.4}",
        eval.accuracy, eval.pairs, s.steps, eval.mean_margin, s.first_losses, s.final_loss
    );
    assert_eq!((s.train_pairs, s.eval_pairs), (400, 100));
    assert_eq!(s.new_tensors, vec!["score.weight".to_string()]);
    assert!(eval.accuracy >= 0.9, "held-out accuracy {}", eval.accuracy);
    assert!(eval.mean_margin > 0.0);
    assert_eq!(eval.per_category.len(), 2);
    assert_eq!(eval.per_category["a"].pairs + eval.per_category["b"].pairs, 100);
    // The statistics stored with the model are the held-out ones.
    let model_dir = s.model_dir.clone().unwrap();
    let stats = reward::RewardStats::read(&model_dir).unwrap().unwrap();
    assert_eq!(stats.split, "eval");
    assert_eq!(stats.n, 200);
    assert!((stats.mean - eval.reward_mean).abs() < 1e-12 && (stats.std - eval.reward_std).abs() < 1e-12);
    let config = read(&model_dir.join("config.json"));
    assert_eq!(config["architectures"][0], "GemmaForSequenceClassification");
    // Metrics: one row per step plus the evaluations; the summary on disk.
    let metrics = lm::train::read_metrics(&cfg.stage.output_dir.join("metrics.jsonl")).unwrap();
    let steps = metrics.iter().filter(|m| m.get("loss").is_some()).count() as u64;
    assert_eq!(steps, s.steps);
    assert!(metrics.iter().filter(|m| m.get("eval_accuracy").is_some()).count() >= 2);
    assert_eq!(read(&cfg.stage.output_dir.join("summary.json"))["steps"], s.steps);
    // The picture of the loss and accuracy.
    let png = std::fs::read(cfg.stage.output_dir.join("loss.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "loss.png is a PNG");
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn resume_after_an_interruption_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    write_lm(&dir.path().join("init"), 3, true);
    write_jsonl(&dir.path().join("pairs.jsonl"), &synthetic_rows(60, 5));
    let extra = "max_steps = 9\nsave_every = 3\nkeep_last = 5\ngrad_accum = 2\nbatch_size = 4";
    // Uninterrupted, through the CLI entry point (paths relative to the config).
    let config_path = write_config(dir.path(), extra);
    reward::cli_train(&config_path).unwrap();
    let cfg = load_config(&config_path);
    let whole: reward::RewardSummary =
        serde_json::from_value(read(&cfg.stage.output_dir.join("summary.json"))).unwrap();
    assert!(whole.completed && whole.steps == 9);
    let want = weights(&whole.model_dir.unwrap());

    // Interrupted: stop after step 5, then lose the step-5 checkpoint as a
    // kill between saves would; the next run resumes from step 3.
    let mut cut = cfg.clone();
    cut.stage.output_dir = dir.path().join("cut");
    cut.stop_after = Some(5);
    let first = reward::run(&cut, dir.path()).unwrap();
    assert!(!first.completed && first.model_dir.is_none());
    assert_eq!(first.steps, 5);
    let ckpts = lm::train::list_checkpoints(&cut.stage.output_dir.join("checkpoints")).unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 5]);
    std::fs::remove_dir_all(&ckpts[1].1).unwrap();
    cut.stop_after = None;
    let resumed = reward::run(&cut, dir.path()).unwrap();
    assert_eq!(resumed.resumed_from, Some(3));
    assert_eq!(resumed.steps, 9);
    assert!(
        weights(&resumed.model_dir.unwrap()) == want,
        "resumed weights differ from the uninterrupted run"
    );
    // The metrics log has each step once, and the same losses.
    let loss_of = |root: &Path| -> Vec<(u64, f64)> {
        lm::train::read_metrics(&root.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter(|m| m.get("loss").is_some())
            .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(loss_of(&cut.stage.output_dir), loss_of(&cfg.stage.output_dir));

    // Another configuration does not resume from these checkpoints.
    let mut other = cut.clone();
    other.stage.optim.lr = 1e-2;
    let e = reward::run(&other, dir.path()).unwrap_err().to_string();
    assert!(e.contains("different configuration"), "{e}");
}

fn data_error(rows: &str, on_bad_row: &str) -> Result<reward::stage::RewardData, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pairs.jsonl"), rows).unwrap();
    let mut cfg = load_config(&write_config(dir.path(), ""));
    cfg.data.held_out = None;
    cfg.data.on_bad_row = serde_json::from_value(serde_json::json!(on_bad_row)).unwrap();
    reward::load_data(&cfg, &tokenizer(), dir.path()).map_err(|e| format!("{e:#}"))
}

#[test]
fn bad_rows_are_errors_naming_row_and_field() {
    let ok = r#"{"prompt": "p", "chosen": "yes", "rejected": "no"}"#;
    let empty = r#"{"prompt": "p", "chosen": "  ", "rejected": "no"}"#;
    let same = r#"{"prompt": "p", "chosen": "same", "rejected": "same "}"#;
    let missing = r#"{"prompt": "p", "chosen": "yes"}"#;

    let e = data_error(&format!("{ok}\n{ok}\n{empty}\n"), "fail").err().unwrap();
    assert!(e.contains("line 3") && e.contains("`chosen`") && e.contains("empty"), "{e}");
    let e = data_error(&format!("{ok}\n{same}\n"), "fail").err().unwrap();
    assert!(e.contains("line 2") && e.contains("`rejected`") && e.contains("identical"), "{e}");
    let e = data_error(&format!("{ok}\n{missing}\n"), "fail").err().unwrap();
    assert!(e.contains("line 2") && e.contains("`rejected`"), "{e}");
    let e = data_error(&format!("{missing}\n"), "fail").err().unwrap();
    assert!(e.contains("`chosen` and `rejected`"), "{e}");
    let e = data_error(r#"{"prompt": "p", "completion": "c"}"#, "fail").err().unwrap();
    assert!(e.contains("line 1") && e.contains("preference"), "{e}");

    // Skipped by policy: counted, the rest is used.
    let d = data_error(&format!("{ok}\n{empty}\n{same}\n{ok}\n"), "skip").unwrap();
    assert_eq!(d.skipped_bad_rows, 2);
    assert_eq!(d.train.kept_count(), 2);
}

#[test]
fn over_long_pairs_are_cut_on_the_prompt_side_or_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let long_prompt = "word ".repeat(100);
    let rows = [
        serde_json::json!({"prompt": "short", "chosen": "good", "rejected": "bad"}),
        serde_json::json!({"prompt": long_prompt, "chosen": "good", "rejected": "bad"}),
        serde_json::json!({"prompt": "short", "chosen": "good ".repeat(40), "rejected": "bad"}),
    ];
    write_jsonl(&dir.path().join("pairs.jsonl"), &rows);
    let tok = tokenizer();
    let mut cfg = load_config(&write_config(dir.path(), ""));
    cfg.data.held_out = None;
    cfg.max_seq_len = 64;
    let d = reward::load_data(&cfg, &tok, dir.path()).unwrap();
    assert_eq!((d.train.truncated, d.train.dropped, d.train.kept_count()), (1, 1, 2));
    let cut = d.train.pairs[1].as_ref().unwrap();
    assert_eq!(cut.chosen.len(), 64);
    assert_eq!(cut.chosen[0], tok.special.bos);
    // The response and its <end_of_turn>\n survive whole.
    let text = tok.decode(&cut.chosen, false).unwrap();
    assert!(text.ends_with("<start_of_turn>model\ngood<end_of_turn>\n"), "{text:?}");
    assert!(d.train.pairs[2].is_none());

    cfg.truncation = reward::Truncation::Drop;
    let d = reward::load_data(&cfg, &tok, dir.path()).unwrap();
    assert_eq!((d.train.truncated, d.train.dropped, d.train.kept_count()), (0, 2, 1));
}

#[test]
fn config_rejects_unknown_keys_and_other_record_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(dir.path(), "learning_rate = 1.0");
    let e = format!("{:#}", reward::RewardConfig::from_toml_file(&p).unwrap_err());
    assert!(e.contains("learning_rate"), "{e}");
    let p = write_config(dir.path(), "epochs = 1");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("[reward.data]\n", "[reward.data]\nkind = \"conversational\"\n");
    std::fs::write(&p, text).unwrap();
    let e = format!("{:#}", reward::RewardConfig::from_toml_file(&p).unwrap_err());
    assert!(e.contains("preference"), "{e}");
}

#[test]
fn every_checkpoint_after_an_eval_carries_that_evals_reward_stats() {
    let dir = tempfile::tempdir().unwrap();
    write_lm(&dir.path().join("init"), 3, true);
    write_jsonl(&dir.path().join("pairs.jsonl"), &synthetic_rows(40, 5));
    let cfg = load_config(&write_config(
        dir.path(),
        "max_steps = 7\neval_every = 3\nsave_every = 2\nkeep_last = 10\nbatch_size = 4",
    ));
    let s = reward::run(&cfg, dir.path()).unwrap();
    assert_eq!(s.steps, 7);
    let root = cfg.stage.output_dir.join("checkpoints");
    let ckpts = lm::train::list_checkpoints(&root).unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4, 6, 7]);
    // The evaluations the metrics log recorded, by step.
    let evals: std::collections::BTreeMap<u64, (f64, f64)> =
        lm::train::read_metrics(&cfg.stage.output_dir.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter(|m| m.get("eval_reward_mean").is_some())
            .map(|m| {
                let f = |k: &str| m[k].as_f64().unwrap();
                (m["step"].as_u64().unwrap(), (f("eval_reward_mean"), f("eval_reward_std")))
            })
            .collect();
    assert_eq!(evals.keys().copied().collect::<Vec<_>>(), vec![3, 6, 7]);
    let stats_at = |step: u64| {
        let dir = &ckpts.iter().find(|c| c.0 == step).unwrap().1;
        reward::RewardStats::read(dir).unwrap()
    };
    // Step 2 was saved before any evaluation: nothing to normalise with.
    assert_eq!(stats_at(2), None);
    // Steps 4 and 6 carry the latest evaluation (steps 3 and 6), step 7 the final one.
    for (ckpt, eval_step) in [(4, 3), (6, 6), (7, 7)] {
        let st = stats_at(ckpt).unwrap_or_else(|| panic!("step-{ckpt} has no reward_stats.json"));
        let (mean, std) = evals[&eval_step];
        assert_eq!(st.split, "eval");
        assert_eq!(st.n, 2 * s.eval_pairs);
        assert!(
            (st.mean - mean).abs() < 1e-12 && (st.std - std).abs() < 1e-12,
            "step-{ckpt}: {st:?} vs {mean} {std}"
        );
    }
    assert_ne!(stats_at(4), stats_at(6), "a later evaluation replaces the stats");
    // A checkpoint loads as a reward model with its stats, as the RL stage loads one.
    let ckpt4 = &ckpts.iter().find(|c| c.0 == 4).unwrap().1;
    let loaded = lm::reward_model::load(ckpt4, tch::Device::Cpu, tch::Kind::Float, None, 0).unwrap();
    assert!(loaded.new_tensors.is_empty());
    assert_eq!(loaded.stats, stats_at(4));

    // After a resume, the stats come back from the checkpoint resumed from:
    // stop at 5 (saving step 5 beside step 4), lose step 5, resume to 5 again.
    let mut cut = cfg.clone();
    cut.stage.output_dir = dir.path().join("cut");
    cut.stop_after = Some(5);
    reward::run(&cut, dir.path()).unwrap();
    let cut_root = cut.stage.output_dir.join("checkpoints");
    let step5 = cut_root.join("step-00000005");
    let first = reward::RewardStats::read(&step5).unwrap().unwrap();
    assert_eq!(Some(first.clone()), stats_at(4));
    std::fs::remove_dir_all(&step5).unwrap();
    let again = reward::run(&cut, dir.path()).unwrap();
    assert_eq!(again.resumed_from, Some(4));
    assert_eq!(reward::RewardStats::read(&step5).unwrap(), Some(first));
}
