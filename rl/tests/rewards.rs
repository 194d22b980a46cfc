//! The reward functions: a trained reward model scores the formatted
//! dialogue exactly as a one-at-a-time forward does and its stored
//! statistics normalise rewards in the stage; the built-in tasks' oracle.

mod common;

use common::{config, fixture, trainer, write_prompts};
use lm::reward_model::{self, RewardModel, RewardStats};
use rl::{RewardFn, RewardModelFn, Rollout};
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A randomly initialised reward model on the fixture's config and
/// tokenizer, with stored statistics.
fn make_reward_model(dir: &Path) {
    let l = lm::checkpoint::load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    tch::manual_seed(11);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let m = RewardModel::new(&vs.root(), &l.model.cfg, 0.5).unwrap();
    let stats = RewardStats { mean: 0.25, std: 2.0, n: 10, split: "eval".into() };
    reward_model::save(dir, &vs, &m, &l.tokenizer, Some(&stats)).unwrap();
}

#[test]
fn reward_model_scores_the_formatted_dialogue_like_a_single_forward() {
    let d = tempfile::tempdir().unwrap();
    let rm_dir = d.path().join("rm");
    make_reward_model(&rm_dir);
    let mut rm = RewardModelFn::load(&rm_dir, Device::Cpu, Kind::Float, 3, None).unwrap();
    assert_eq!(rm.stats(), Some((0.25, 2.0)));
    let prompts = write_prompts(d.path(), 8);
    let (t, p) = trainer(config(d.path(), &prompts, ""));
    let rollouts = t.rollouts(0, &p).unwrap();
    let got = rm.score(&rollouts).unwrap();
    assert_eq!(got.len(), 16);
    for (r, g) in rollouts.iter().zip(&got) {
        let mut m = r.prompt.messages.clone();
        m.push(lm::Message::model(&r.text));
        let mut ids = lm::chat::encode(&rm.tokenizer, &m, false).unwrap().ids;
        if !r.ended() {
            // A cut response is scored as it is, without the closing <end_of_turn>.
            let eot = rm.tokenizer.special.end_of_turn;
            ids.truncate(ids.iter().rposition(|&t| t == eot).unwrap());
        }
        let x = Tensor::from_slice(&ids).unsqueeze(0);
        let valid = x.ones_like().to_kind(Kind::Bool);
        let want = tch::no_grad(|| rm.model.forward(&x, &valid).unwrap()).double_value(&[0]);
        assert!((want - g).abs() < 1e-4, "batched {g} vs single {want}");
    }
    let spread = got.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        - got.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(spread > 1e-3, "a random head still tells responses apart: {got:?}");
    // A causal LM is not a reward model.
    let err = RewardModelFn::load(&fixture(), Device::Cpu, Kind::Float, 3, None).err().unwrap().to_string();
    assert!(err.contains("not a reward model"), "{err}");
}

#[test]
fn stage_normalises_reward_model_scores_by_the_stored_statistics() {
    let d = tempfile::tempdir().unwrap();
    let rm_dir = d.path().join("rm");
    make_reward_model(&rm_dir);
    let prompts = write_prompts(d.path(), 8);
    let mut cfg = config(d.path(), &prompts, "steps = 2\nnormalize_reward = true\nreward_clip = 100.0");
    cfg.reward = rl::RewardConfig::Model { path: "rm".into(), batch_size: 5, max_seq_len: None };
    cfg.resolve_paths(d.path());
    let s = rl::run(&cfg, d.path()).unwrap();
    assert_eq!(s.steps, 2);
    assert!(s.reward.contains("reward model"));
    for r in common::steps(&d.path().join("out")) {
        let (raw, score) = (r["reward_mean"].as_f64().unwrap(), r["score_mean"].as_f64().unwrap());
        assert!((score - (raw - 0.25) / 2.0).abs() < 1e-6, "score {score} for raw {raw}");
    }
    // Clipping applies after normalisation.
    let mut cfg2 = cfg.clone();
    cfg2.stage.output_dir = d.path().join("out2");
    cfg2.reward_clip = Some(1e-3);
    rl::run(&cfg2, d.path()).unwrap();
    for r in common::steps(&cfg2.stage.output_dir) {
        assert!(r["score_mean"].as_f64().unwrap().abs() <= 1e-3 + 1e-12);
    }
}

fn task_rollout(prompt: &str, text: &str) -> Rollout {
    Rollout {
        group: 0,
        prompt: Arc::new(rl::Prompt {
            messages: vec![lm::Message::user(prompt)],
            ids: vec![2],
            category: None,
        }),
        response_ids: vec![10, 5],
        sample_logprobs: vec![0.0, 0.0],
        text: text.into(),
        stop_reason: lm::StopReason::EndOfTurn,
    }
}

#[test]
fn oracle_reward_checks_built_in_task_answers() {
    let mut o = rl::OracleReward;
    let b = [
        task_rollout("Reverse: d o g", "g o d"),
        task_rollout("Reverse: d o g", "god"),
        task_rollout("Add: 2 + 3", " 5 "),
    ];
    assert_eq!(o.score(&b).unwrap(), vec![1.0, 0.0, 1.0]);
    let err = o.score(&[task_rollout("Tell me a story", "once")]).unwrap_err().to_string();
    assert!(err.contains("built-in task"), "{err}");
}

#[test]
fn evaluation_reports_oracle_accuracy_on_built_in_prompts() {
    let d = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
model = "{}"
output_dir = "out"
steps = 1
batch_size = 2
num_samples = 2
max_new_tokens = 6
device = "cpu"
eval_every = 1
eval_prompts = 6
[reward]
kind = "oracle"
[data]
held_out = {{ path = "builtin:eval?n=6&seed=2" }}
[[data.sources]]
name = "tasks"
path = "builtin:rl?n=20&seed=1&categories=reverse,add"
"#,
        fixture().display()
    );
    let p = d.path().join("rl.toml");
    std::fs::write(&p, toml).unwrap();
    // Through the CLI entry point: paths relative to the config's directory.
    rl::cli_train(&p).unwrap();
    let s: rl::RlSummary =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("out/summary.json")).unwrap()).unwrap();
    assert_eq!(s.eval.len(), 2, "before the first step and after the last");
    for e in &s.eval {
        assert_eq!(e.oracle_prompts, 6);
        // The untrained fixture answers nothing right: reward = accuracy = 0.
        assert_eq!(e.oracle_accuracy, Some(e.reward_mean));
    }
    let samples = std::fs::read_to_string(d.path().join("out/samples-step-1.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    assert!(first["prompt"][0]["content"].as_str().unwrap().len() > 3);
    assert!(first["category"].is_string());
}

/// A random reward model on the fixture's tokenizer that reads at most 48
/// tokens, so that a long prompt must be cut.
fn make_short_reward_model(dir: &Path) {
    let l = lm::checkpoint::load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let mut cfg = l.model.cfg.clone();
    cfg.max_position_embeddings = 48;
    tch::manual_seed(12);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let m = RewardModel::new(&vs.root(), &cfg, 0.5).unwrap();
    reward_model::save(dir, &vs, &m, &l.tokenizer, None).unwrap();
}

#[test]
fn align_score_the_rl_reward_and_the_reward_judge_give_one_reward() {
    use judge::judges::RewardJudge;
    use lm::reward_score::{Conversation, RewardScorer};
    use lm::Message;
    let d = tempfile::tempdir().unwrap();
    let rm_dir = d.path().join("rm");
    make_short_reward_model(&rm_dir);
    let long_q = (0..80).map(|i| format!("word{}", i % 7)).collect::<Vec<_>>().join(" ");
    let convs: Vec<(Vec<Message>, &str)> = vec![
        (vec![Message::user("Say hi.")], "hello there"),
        (vec![Message::system("Be brief."), Message::user("Say hi.")], "hello there"),
        (vec![Message::system("Be brief."), Message::user(&long_q)], "a short answer"),
    ];
    let scorer = RewardScorer::load(&rm_dir, Device::Cpu, Kind::Float, 4, None).unwrap();
    assert_eq!(scorer.max_seq_len, 48);

    // align score's path: conversations ending with the model turn.
    let score = reward::Scorer::load(
        &rm_dir,
        &reward::ScoreOptions { device: "cpu".into(), batch_size: 4, ..Default::default() },
    )
    .unwrap();
    let recs: Vec<datasets::Record> = convs
        .iter()
        .map(|(p, a)| {
            let mut messages = p.clone();
            messages.push(Message::model(*a));
            datasets::Record::Conversation { messages }
        })
        .collect();
    let from_score: Vec<f64> = score
        .score_records(&recs)
        .unwrap()
        .into_iter()
        .map(|s| match s {
            reward::Scored::Response { reward } => reward,
            other => panic!("{other:?}"),
        })
        .collect();

    // The RL reward: rollouts that ended their turn.
    let mut rm = RewardModelFn::load(&rm_dir, Device::Cpu, Kind::Float, 4, None).unwrap();
    let rollouts: Vec<Rollout> = convs
        .iter()
        .map(|(p, a)| Rollout {
            group: 0,
            prompt: Arc::new(rl::Prompt {
                messages: p.clone(),
                ids: lm::chat::prompt_ids(&rm.tokenizer, p).unwrap(),
                category: None,
            }),
            response_ids: vec![10, 5],
            sample_logprobs: vec![0.0, 0.0],
            text: a.to_string(),
            stop_reason: lm::StopReason::EndOfTurn,
        })
        .collect();
    let from_rl = rm.score(&rollouts).unwrap();

    // The reward judge.
    let judge = RewardJudge::load(&rm_dir, Device::Cpu, Kind::Float, 0.0, 4).unwrap();
    let rows: Vec<(&[Message], &str)> = convs.iter().map(|(p, a)| (p.as_slice(), *a)).collect();
    let from_judge = judge.rewards(&rows).unwrap();

    // One path: the same ids, batched the same way, give the same rewards.
    let direct =
        scorer.score(&convs.iter().map(|(p, a)| Conversation::new(p, a)).collect::<Vec<_>>()).unwrap();
    assert_eq!(from_score, direct);
    assert_eq!(from_rl, direct);
    assert_eq!(from_judge, direct);
    assert_ne!(direct[0], direct[1], "the system turn is part of the scored conversation");

    // The long prompt is cut from the left after <bos>; the response stays whole.
    let c = Conversation::new(&convs[2].0, convs[2].1);
    let full = lm::reward_score::format(&scorer.tokenizer, c.prompt, &c.response, true).unwrap();
    assert!(full.ids.len() > 48 && full.ids.len() - full.prompt_len < 47, "{}", full.ids.len());
    let e = scorer.encode(&c).unwrap();
    assert!(e.truncated);
    assert_eq!(e.ids.len(), 48);
    assert_eq!(e.ids[0], full.ids[0], "<bos> stays");
    assert_eq!(e.ids[1..], full.ids[full.ids.len() - 47..], "the earliest prompt tokens go");
    assert_eq!(rm.format(&rollouts[2]).unwrap(), e.ids);
    // A one-at-a-time forward on the cut ids gives the reward.
    let x = Tensor::from_slice(&e.ids).unsqueeze(0);
    let valid = x.ones_like().to_kind(Kind::Bool);
    let want = tch::no_grad(|| scorer.model.forward(&x, &valid).unwrap()).double_value(&[0]);
    assert!((want - direct[2]).abs() < 1e-4, "{want} vs {}", direct[2]);

    // A response too long to fit alone is refused by all three, never cut.
    let long_a = (0..60).map(|i| format!("w{}", i % 5)).collect::<Vec<_>>().join(" ");
    let p = vec![Message::user("Say hi.")];
    let mut msgs = p.clone();
    msgs.push(Message::model(&long_a));
    let e = format!(
        "{:#}",
        score.score_records(&[datasets::Record::Conversation { messages: msgs }]).unwrap_err()
    );
    assert!(e.contains("record 0") && e.contains("response") && e.contains("max_seq_len"), "{e}");
    let e = format!("{:#}", judge.rewards(&[(p.as_slice(), long_a.as_str())]).unwrap_err());
    assert!(e.contains("response") && e.contains("max_seq_len"), "{e}");
    let mut r = rollouts[0].clone();
    r.text = long_a.clone();
    let e = format!("{:#}", rm.score(&[r]).unwrap_err());
    assert!(e.contains("rollout 0") && e.contains("max_seq_len"), "{e}");
}
