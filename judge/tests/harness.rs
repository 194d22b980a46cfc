//! `align judge` end to end on small files and the fixture model.

mod common;
use clap::Parser;
use common::{answer_file_args, read_jsonl, summary, write_jsonl as write, Cli};
use judge::harness::{cli_judge, JudgeArgs};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/mqa")
}

fn args(extra: &[&str]) -> JudgeArgs {
    let mut v = vec!["judge", "--device", "cpu", "--bootstrap", "300"];
    v.extend_from_slice(extra);
    Cli::parse_from(v).args
}

/// [`args`] for a judgement of the answer files `p`, `c`, `b` into `out`,
/// and `extra`.
fn answers_args(p: &Path, c: &Path, b: &Path, out: &Path, extra: &[&str]) -> JudgeArgs {
    let mut v = answer_file_args(p, c, b, out);
    v.extend_from_slice(extra);
    args(&v)
}

/// A reward model in `dir/rm`: the fixture's backbone with a fresh (seeded)
/// head.
fn write_reward_model(dir: &Path) -> PathBuf {
    let l = lm::reward_model::load(&fixture(), tch::Device::Cpu, tch::Kind::Float, Some(0.5), 0).unwrap();
    let rm = dir.join("rm");
    lm::reward_model::save(&rm, &l.vs, &l.model, &l.tokenizer, None).unwrap();
    rm
}

/// Prompts with categories and references, and two answer files: the
/// candidate right on 3 of 4 math prompts and 1 of 2 trivia prompts, the
/// baseline right on 1 math (also answered right by the candidate) and both
/// trivia prompts.
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let prompts = [
        ("2+2?", "math", "4", "4", "5"),
        ("3*3?", "math", "9", "9", "9"),
        ("10-7?", "math", "3", "3", "4"),
        ("8/2?", "math", "4", "5", "3"),
        ("Capital of France?", "trivia", "Paris", "Paris.", "paris"),
        ("Largest planet?", "trivia", "Jupiter", "Saturn", "Jupiter"),
    ];
    let p = dir.join("prompts.jsonl");
    let c = dir.join("cand.jsonl");
    let b = dir.join("base.jsonl");
    write(
        &p,
        &prompts
            .iter()
            .map(|(q, cat, r, _, _)| serde_json::json!({"prompt": q, "category": cat, "reference": r}))
            .collect::<Vec<_>>(),
    );
    write(
        &c,
        &prompts
            .iter()
            .rev()
            .map(|(q, _, _, a, _)| serde_json::json!({"prompt": q, "completion": a}))
            .collect::<Vec<_>>(),
    );
    write(
        &b,
        &prompts
            .iter()
            .map(|(q, _, _, _, a)| serde_json::json!({"prompt": q, "completion": a}))
            .collect::<Vec<_>>(),
    );
    (p, c, b)
}

#[test]
fn oracle_judge_on_answer_files() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c, b) = setup(dir.path());
    let out = dir.path().join("out");
    cli_judge(answers_args(&p, &c, &b, &out, &["--judge", "oracle:exact"])).unwrap();
    let s = summary(&out);
    // math: wins on 2+2, 10-7, 8/2 is a loss-free tie? 8/2: cand 5 (wrong), base 3 (wrong) -> tie;
    // 3*3 both right -> tie. So math: 2 wins, 2 ties -> 0.75.
    let math = &s["per_category"]["math"];
    assert_eq!(
        (math["wins"].as_u64(), math["ties"].as_u64(), math["losses"].as_u64()),
        (Some(2), Some(2), Some(0))
    );
    assert_eq!(math["win_rate"].as_f64(), Some(0.75));
    // trivia: France both right (normalised) -> tie; Jupiter -> loss. 0.25.
    assert_eq!(s["per_category"]["trivia"]["win_rate"].as_f64(), Some(0.25));
    // overall: 2 wins, 3 ties, 1 loss of 6 -> 3.5/6.
    let o = &s["overall"];
    assert!((o["win_rate"].as_f64().unwrap() - 3.5 / 6.0).abs() < 1e-12);
    assert!(o["lo"].as_f64().unwrap() <= o["win_rate"].as_f64().unwrap());
    assert!(o["hi"].as_f64().unwrap() >= o["win_rate"].as_f64().unwrap());
    assert_eq!(o["order_agreement"].as_f64(), Some(1.0));
    assert_eq!(o["excluded"].as_u64(), Some(0));
    assert_eq!(s["unparseable_verdicts"].as_u64(), Some(0));
    assert!(o["lengths"]["candidate_chars"].as_f64().unwrap() > 0.0);
    for f in ["judgments.jsonl", "judgments.parquet", "summary.json", "report.md", "winrate.png"] {
        assert!(std::fs::metadata(out.join(f)).unwrap().len() > 0, "{f}");
    }
    let lines = std::fs::read_to_string(out.join("judgments.jsonl")).unwrap();
    let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["outcome"], "win");
    assert_eq!(first["candidate"], "4");
    assert_eq!(first["category"], "math");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| math | 4 | 75.0% |"), "{md}");
    // The table is also written as Parquet.
    let bytes = std::fs::read(out.join("judgments.parquet")).unwrap();
    assert_eq!(&bytes[..4], b"PAR1");
}

#[test]
fn fixture_model_against_reference_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _, _) = setup(dir.path());
    // The baseline answers with the references: always right.
    let b = dir.path().join("refs.jsonl");
    let text = std::fs::read_to_string(&p).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["prompt"], "completion": v["reference"]})
        })
        .collect();
    write(&b, &rows);
    let out = dir.path().join("out");
    cli_judge(args(&[
        "--prompts",
        p.to_str().unwrap(),
        "--candidate",
        fixture().to_str().unwrap(),
        "--baseline-answers",
        b.to_str().unwrap(),
        "--judge",
        "oracle:exact",
        "--oracle",
        "exact",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]))
    .unwrap();
    let s = summary(&out);
    assert_eq!(s["overall"]["win_rate"].as_f64(), Some(0.0), "{s}");
    assert_eq!(s["overall"]["n"].as_u64(), Some(6));
    // Each side's oracle accuracy on its own: the references are all right,
    // the random model's answers all wrong.
    assert_eq!(s["overall"]["oracle_score"]["baseline"].as_f64(), Some(1.0), "{s}");
    assert_eq!(s["overall"]["oracle_score"]["candidate"].as_f64(), Some(0.0), "{s}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("candidate 0.0%, baseline 100.0%"), "{md}");
}

#[test]
fn lm_judges_on_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c, b) = setup(dir.path());
    let fx = fixture();
    let lm_args = |out: &Path, extra: &[&str]| answers_args(&p, &c, &b, out, extra);
    // Log-probability of "A" vs "B": every verdict parses.
    let out = dir.path().join("logprob");
    let judge = format!("lm:{}", fx.display());
    cli_judge(lm_args(&out, &["--judge", &judge, "--lm-mode", "logprob", "--oracle", "exact"])).unwrap();
    let s = summary(&out);
    assert_eq!(s["unparseable_verdicts"].as_u64(), Some(0));
    assert_eq!(s["overall"]["n"].as_u64(), Some(6));
    assert!(s["overall"]["oracle_agreement"].as_f64().is_some());
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(out.join("judgments.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    assert!(first["candidate_first"]["raw"].as_str().unwrap().starts_with("logp(A)="));

    // Reason-then-verdict: a random tiny model writes no marker in 4 tokens,
    // so every verdict is retried, stays unparseable and is excluded.
    // A short template of our own (the fixture's context is 256 tokens).
    let t = dir.path().join("short.txt");
    std::fs::write(&t, "{question}\nA: {answer_a}\nB: {answer_b}\nEnd with [[A]], [[B]] or [[C]].").unwrap();
    let out = dir.path().join("reason");
    let t = t.to_str().unwrap();
    let extra = ["--judge", &judge, "--lm-mode", "reason", "--judge-max-new-tokens", "4", "--template", t];
    cli_judge(lm_args(&out, &extra)).unwrap();
    let s = summary(&out);
    assert_eq!(s["unparseable_verdicts"].as_u64(), Some(12));
    assert_eq!(s["retried_verdicts"].as_u64(), Some(12));
    assert_eq!(s["overall"]["excluded"].as_u64(), Some(6));
    assert_eq!(s["overall"]["n"].as_u64(), Some(0));
    assert!(s["overall"]["win_rate"].is_null());
    assert!(std::fs::metadata(out.join("winrate.png")).unwrap().len() > 0);
}

#[test]
fn reward_judge_on_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c, b) = setup(dir.path());
    let rm = write_reward_model(dir.path());
    let out = dir.path().join("out");
    let judge = format!("reward:{}", rm.display());
    cli_judge(answers_args(&p, &c, &b, &out, &["--judge", &judge])).unwrap();
    let s = summary(&out);
    // A reward model does not see positions: the orders always agree.
    assert_eq!(s["overall"]["order_agreement"].as_f64(), Some(1.0));
    assert_eq!(s["overall"]["n"].as_u64(), Some(6));
    // A causal LM directory is refused as a reward judge.
    let e =
        cli_judge(answers_args(&p, &c, &b, &out, &["--judge", &format!("reward:{}", fixture().display())]))
            .unwrap_err();
    assert!(format!("{e:#}").contains("not a reward model"), "{e:#}");
}

#[test]
fn reward_judge_ties_within_its_tolerance() {
    use judge::judges::{verdict_from_scores, RewardJudge};
    use judge::pairwise::{Judge, Shown};
    use judge::verdict::Verdict;
    let dir = tempfile::tempdir().unwrap();
    let (p, c, b) = setup(dir.path());
    let rm = write_reward_model(dir.path());
    let load = |tol: f64| RewardJudge::load(&rm, tch::Device::Cpu, tch::Kind::Float, tol, 4).unwrap();

    // Six answers to one prompt and their rewards.
    let prompt = vec![lm::Message::user("Capital of France?")];
    let answers = ["Paris", "Paris.", "paris", "Lyon", "It is Paris, of course.", "I do not know"];
    let rows: Vec<(&[lm::Message], &str)> = answers.iter().map(|a| (prompt.as_slice(), *a)).collect();
    let r = load(0.0).rewards(&rows).unwrap();
    assert!(r.iter().all(|x| x.is_finite()));
    // Pairs (i, j) and a tolerance between the smallest and largest gap.
    let pairs: Vec<(usize, usize)> =
        (0..answers.len()).flat_map(|i| (i + 1..answers.len()).map(move |j| (i, j))).collect();
    let mut gaps: Vec<f64> = pairs.iter().map(|&(i, j)| (r[i] - r[j]).abs()).collect();
    gaps.sort_by(f64::total_cmp);
    assert!(gaps[0] < gaps[gaps.len() - 1], "the rewards differ: {r:?}");
    let tol = (gaps[gaps.len() / 2 - 1] + gaps[gaps.len() / 2]) / 2.0;
    let items: Vec<Shown> = pairs
        .iter()
        .map(|&(i, j)| Shown {
            question: "Capital of France?",
            prompt: &prompt,
            answer_a: answers[i],
            answer_b: answers[j],
            reference: None,
        })
        .collect();
    for (t, want_ties) in [(0.0, 0), (tol, gaps.len() / 2), (gaps[gaps.len() - 1] + 1.0, gaps.len())] {
        let v = load(t).judge(&items, 0).unwrap();
        let ties = v.iter().filter(|x| x.verdict == Some(Verdict::Tie)).count();
        assert_eq!(ties, want_ties, "tolerance {t}: {v:?}");
        for (x, &(i, j)) in v.iter().zip(&pairs) {
            assert_eq!(x.verdict, Some(verdict_from_scores(r[i], r[j], t)), "{}", x.raw);
        }
    }
    assert!(RewardJudge::load(&rm, tch::Device::Cpu, tch::Kind::Float, -0.1, 4).is_err());
    assert!(RewardJudge::load(&rm, tch::Device::Cpu, tch::Kind::Float, f64::NAN, 4).is_err());

    // Through `align judge`: a tolerance above every gap makes every pair a
    // tie (win rate 0.5); none gives the same decided pairs as before.
    let rr = |q: &str, a: &str| {
        let m = vec![lm::Message::user(q)];
        load(0.0).rewards(&[(m.as_slice(), a)]).unwrap()[0]
    };
    let prompts = ["2+2?", "3*3?", "10-7?", "8/2?", "Capital of France?", "Largest planet?"];
    let cand = ["4", "9", "3", "5", "Paris.", "Saturn"];
    let base = ["5", "9", "4", "3", "paris", "Jupiter"];
    let big =
        prompts.iter().zip(cand).zip(base).map(|((q, c), b)| (rr(q, c) - rr(q, b)).abs()).fold(0.0, f64::max)
            + 1.0;
    let run = |tol: f64, out: &Path| {
        let judge = format!("reward:{}", rm.display());
        cli_judge(answers_args(&p, &c, &b, out, &["--judge", &judge, "--tie-tolerance", &tol.to_string()]))
            .unwrap();
        summary(out)
    };
    let s = run(big, &dir.path().join("tied"));
    assert_eq!(s["overall"]["n"].as_u64(), Some(6));
    assert_eq!(s["overall"]["ties"].as_u64(), Some(6), "{s}");
    assert_eq!(s["overall"]["win_rate"].as_f64(), Some(0.5));
    let s0 = run(0.0, &dir.path().join("strict"));
    // "3*3?" has the same answer on both sides: a tie at any tolerance.
    assert!(s0["overall"]["ties"].as_u64().unwrap() >= 1);
    assert!(s0["overall"]["ties"].as_u64().unwrap() < 6, "{s0}");
}

#[test]
fn reward_judge_keys_its_scores_by_the_whole_conversation() {
    use judge::judges::RewardJudge;
    use judge::pairwise::{Judge, Shown};
    let dir = tempfile::tempdir().unwrap();
    let rm = write_reward_model(dir.path());
    let judge = RewardJudge::load(&rm, tch::Device::Cpu, tch::Kind::Float, 0.0, 4).unwrap();
    // Two prompts with the same question text, differing only in the system turn.
    let plain = vec![lm::Message::user("Capital of France?")];
    let french = vec![lm::Message::system("Answer in French."), lm::Message::user("Capital of France?")];
    let shown = |prompt| Shown {
        question: "Capital of France?",
        prompt,
        answer_a: "Paris",
        answer_b: "Lyon",
        reference: None,
    };
    let v = judge.judge(&[shown(&plain), shown(&french)], 0).unwrap();
    let want = |p: &[lm::Message]| judge.rewards(&[(p, "Paris"), (p, "Lyon")]).unwrap();
    let (a, b) = (want(&plain), want(&french));
    assert_ne!(a, b, "the system turn changes the rewards");
    // (Batches of other sizes round differently in the last digits.)
    let shown_rewards = |raw: &str| -> Vec<f64> {
        raw.split(' ').map(|kv| kv.split_once('=').unwrap().1.parse().unwrap()).collect()
    };
    for (x, r) in v.iter().zip([&a, &b]) {
        let got = shown_rewards(&x.raw);
        assert!((got[0] - r[0]).abs() < 1e-5 && (got[1] - r[1]).abs() < 1e-5, "{} vs {r:?}", x.raw);
    }
    assert_ne!(v[0].raw, v[1].raw, "two prompts differing only in the system turn share no score");
}

#[test]
fn agreement_with_human_labels_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c, b) = setup(dir.path());
    // Label the six prompts: the exact-match oracle's outcomes are win, tie,
    // win, tie, tie, loss; the labels agree on 4 of 6.
    let text = std::fs::read_to_string(&p).unwrap();
    let labels = ["candidate", "tie", "candidate", "baseline", "tie", "candidate"];
    let rows: Vec<Value> = text
        .lines()
        .zip(labels)
        .map(|(l, h)| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["human"] = Value::from(h);
            v
        })
        .collect();
    write(&p, &rows);
    let out = dir.path().join("out");
    let run = |out: &Path| cli_judge(answers_args(&p, &c, &b, out, &["--judge", "oracle:exact"]));
    run(&out).unwrap();
    let s = summary(&out);
    assert!((s["overall"]["human_agreement"].as_f64().unwrap() - 4.0 / 6.0).abs() < 1e-12, "{s}");
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("human labels"));
    // The Parquet table carries the human outcome, as the JSONL does.
    let jsonl = read_jsonl(&out.join("judgments.jsonl"));
    let from_jsonl: Vec<Option<String>> =
        jsonl.iter().map(|r| r["human_outcome"].as_str().map(String::from)).collect();
    assert_eq!(from_jsonl.iter().flatten().count(), 6);
    assert_eq!(common::string_column(&out.join("judgments.parquet"), "human_outcome"), from_jsonl);
    // A label that is not a choice is an error naming the row.
    let mut bad = rows.clone();
    bad[2]["human"] = Value::from("maybe");
    write(&p, &bad);
    let e = format!("{:#}", run(&dir.path().join("out2")).unwrap_err());
    assert!(e.contains("row 3") && e.contains("human"), "{e}");
}

#[test]
fn judge_output_dir_is_claimed_refusing_foreign_files_a_held_lock_and_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c, b) = setup(dir.path());
    let run = |out: &Path| cli_judge(answers_args(&p, &c, &b, out, &["--judge", "oracle:exact"]));
    // A directory of someone else's files is refused and kept.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let e = format!("{:#}", run(&foreign).unwrap_err());
    assert!(e.contains("not made by align") && e.contains("notes.txt"), "{e}");
    assert_eq!(std::fs::read_to_string(foreign.join("notes.txt")).unwrap(), "mine");
    assert!(!foreign.join("summary.json").exists());
    // A new directory is claimed and written.
    let out = dir.path().join("out");
    run(&out).unwrap();
    // A second run while one holds the lock fails naming it; a rerun after is fine.
    let held = lm::output_dir::OutputLock::acquire(&out).unwrap();
    let e = format!("{:#}", run(&out).unwrap_err());
    assert!(e.contains("in use by another align run"), "{e}");
    drop(held);
    run(&out).unwrap();
    // An output that is one of the inputs is refused.
    let e = format!("{:#}", run(&c).unwrap_err());
    assert!(e.contains("input"), "{e}");
}
