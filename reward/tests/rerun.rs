//! A finished reward run run again does no work: summary.json and
//! metrics.jsonl stay byte-identical, and the last step's evaluation is
//! logged once.

mod common;

use common::*;

#[test]
fn rerun_of_a_finished_reward_stage_leaves_summary_and_metrics_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    write_lm(&dir.path().join("init"), 3, true);
    write_jsonl(&dir.path().join("pairs.jsonl"), &synthetic_rows(60, 5));
    let cfg = load_config(&write_config(dir.path(), "max_steps = 6\neval_every = 3\nbatch_size = 4"));
    let s = reward::run(&cfg, dir.path()).unwrap();
    assert!(s.completed);
    let out = &cfg.stage.output_dir;
    let rows = lm::train::read_metrics(&out.join("metrics.jsonl")).unwrap();
    let evals: Vec<u64> =
        rows.iter().filter(|r| r.get("eval_loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, vec![3, 6], "each evaluation step is logged once");
    let (summary, metrics) =
        (std::fs::read(out.join("summary.json")).unwrap(), std::fs::read(out.join("metrics.jsonl")).unwrap());
    let again = reward::run(&cfg, dir.path()).unwrap();
    assert_eq!(again.final_loss, s.final_loss);
    assert_eq!(std::fs::read(out.join("summary.json")).unwrap(), summary, "summary.json was rewritten");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics, "metrics.jsonl changed");
    assert!(!out.join(lm::output_dir::LOCK_FILE).exists());
}
