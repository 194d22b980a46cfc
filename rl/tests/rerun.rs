//! A finished RL run run again does no work: summary.json and
//! metrics.jsonl stay byte-identical.

mod common;

use common::{config, write_prompts, LowIds};

#[test]
fn rerun_of_a_finished_rl_stage_leaves_summary_and_metrics_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path(), 8);
    let cfg = config(dir.path(), &prompts, "steps = 4\nbatch_size = 2\neval_every = 2\nsave_every = 2");
    let run = || rl::run_with_reward(&cfg, dir.path(), Box::new(LowIds { below: 128 })).unwrap();
    let s = run();
    let out = &cfg.stage.output_dir;
    let rows = lm::train::read_metrics(&out.join("metrics.jsonl")).unwrap();
    let evals: Vec<u64> =
        rows.iter().filter(|r| r.get("eval_reward").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, vec![0, 2, 4], "each evaluation step is logged once");
    let (summary, metrics) =
        (std::fs::read(out.join("summary.json")).unwrap(), std::fs::read(out.join("metrics.jsonl")).unwrap());
    let again = run();
    assert_eq!(again.steps, s.steps);
    assert_eq!(std::fs::read(out.join("summary.json")).unwrap(), summary, "summary.json was rewritten");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics, "metrics.jsonl changed");
    assert!(!out.join(lm::output_dir::LOCK_FILE).exists());
}
