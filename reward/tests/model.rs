//! The reward model: padding independence, initialisation from a causal LM,
//! save/load round trips, scoring files, and the same rewards as
//! transformers computes (a committed fixture; a live check is `#[ignore]`d).

mod common;

use common::*;
use lm::checkpoint;
use reward::data::{format, make_pair_batch, PairTokens};
use reward::model::{self, LoadedReward};
use reward::{RewardStats, ScoreOptions, Scored, Scorer};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn msgs(role: &str, text: &str) -> Vec<lm::Message> {
    vec![lm::Message::new(role, text)]
}

fn pair(l: &LoadedReward, prompt: &str, chosen: &str, rejected: &str) -> PairTokens {
    let p = msgs("user", prompt);
    PairTokens {
        chosen: format(&l.tokenizer, &p, &msgs("model", chosen)).unwrap().ids,
        rejected: format(&l.tokenizer, &p, &msgs("model", rejected)).unwrap().ids,
        margin: 0.0,
        category: None,
    }
}

fn rewards(l: &LoadedReward, pairs: &[&PairTokens]) -> Vec<f32> {
    let b = make_pair_batch(pairs, l.tokenizer.special.pad, Device::Cpu).unwrap();
    tch::no_grad(|| Vec::try_from(l.model.forward(&b.ids, &b.valid).unwrap()).unwrap())
}

/// A reward model from a fresh causal LM with a large head (std 1), so
/// rewards are O(1) and comparisons are strict.
fn fresh(dir: &Path) -> LoadedReward {
    write_lm(&dir.join("init"), 5, true);
    model::load(&dir.join("init"), Device::Cpu, Kind::Float, Some(1.0), 9).unwrap()
}

#[test]
fn reward_does_not_depend_on_padding() {
    let dir = tempfile::tempdir().unwrap();
    let l = fresh(dir.path());
    let p = pair(&l, "Say hi.", "hello there", "no");
    let long = pair(
        &l,
        "Tell me a long story about a horse and a river.",
        "once upon a time a horse",
        "a river ran by",
    );
    let alone = rewards(&l, &[&p]); // (c, r)
    let batched = rewards(&l, &[&long, &p, &long]); // chosen ×3, rejected ×3
    let got = [batched[1], batched[4]];
    for (a, b) in alone.iter().zip(got) {
        assert!((a - b).abs() < 1e-5, "alone {alone:?}, batched {got:?}");
    }
    assert!(alone[0].abs() > 1e-3, "rewards are non-trivial: {alone:?}");
    // Left padding gives the same reward: the last real token is found from the mask.
    let (n, t) = (p.chosen.len(), long.chosen.len());
    let mut ids = vec![l.tokenizer.special.pad; t - n];
    ids.extend(&p.chosen);
    let valid: Vec<bool> = (0..t).map(|i| i >= t - n).collect();
    let left = tch::no_grad(|| {
        l.model
            .forward(
                &Tensor::from_slice(&ids).view([1, t as i64]),
                &Tensor::from_slice(&valid).view([1, t as i64]),
            )
            .unwrap()
            .double_value(&[0])
    });
    assert!((left as f32 - alone[0]).abs() < 1e-5, "left-padded {left} vs {}", alone[0]);
    // The reward is read at the formatted sequence's last token, `\n` after <end_of_turn>.
    assert_eq!(p.chosen[p.chosen.len() - 2], l.tokenizer.special.end_of_turn);
}

#[test]
fn init_from_a_causal_lm_then_save_and_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let l = fresh(dir.path());
    assert_eq!(l.new_tensors, vec!["score.weight".to_string()]);
    let out = dir.path().join("rm");
    let stats = RewardStats { mean: 0.5, std: 2.0, n: 10, split: "eval".into() };
    model::save(&out, &l.vs, &l.model, &l.tokenizer, Some(&stats)).unwrap();

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"], serde_json::json!(["GemmaForSequenceClassification"]));
    assert_eq!(config["num_labels"], 1);
    assert_eq!(config["pad_token_id"], l.tokenizer.special.pad);
    let tensors = checkpoint::read_tensors(&out).unwrap();
    assert_eq!(tensors["score.weight"].size(), vec![1, 64]);
    assert!(!tensors.contains_key("lm_head.weight"));
    assert_eq!(tensors.len(), l.vs.variables().len());

    let again = model::load(&out, Device::Cpu, Kind::Float, None, 0).unwrap();
    assert!(again.new_tensors.is_empty());
    assert_eq!(again.stats.as_ref(), Some(&stats));
    let p = pair(&l, "Pick one.", "apple", "stone");
    let q = pair(&l, "And now?", "green light", "paper");
    assert_eq!(rewards(&l, &[&p, &q]), rewards(&again, &[&p, &q]));

    // The library scorer agrees, and normalises with the stored statistics.
    let scorer = Scorer::load(&out, &ScoreOptions { device: "cpu".into(), ..Default::default() }).unwrap();
    let rec = datasets::Record::Preference {
        prompt: vec![datasets::Message::user("Pick one.")],
        chosen: vec![datasets::Message::model("apple")],
        rejected: vec![datasets::Message::model("stone")],
        margin: None,
    };
    let want = rewards(&l, &[&p]);
    match scorer.score_records(&[rec]).unwrap()[0] {
        Scored::Pair { chosen, rejected } => {
            assert!((chosen as f32 - want[0]).abs() < 1e-6 && (rejected as f32 - want[1]).abs() < 1e-6);
            assert_eq!(scorer.normalize(chosen), (chosen - 0.5) / 2.0);
        }
        other => panic!("{other:?}"),
    }
    // A causal LM is not a reward model for scoring.
    let e = Scorer::load(&dir.path().join("init"), &ScoreOptions::default()).err().unwrap().to_string();
    assert!(e.contains("not a reward model") && e.contains("score.weight"), "{e}");
}

#[test]
fn a_missing_backbone_tensor_is_an_error_and_an_untied_lm_head_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    write_lm(&init, 1, true);
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(init.join(f), broken.join(f)).unwrap();
    }
    let mut t = checkpoint::read_tensors(&init).unwrap();
    t.remove("model.norm.weight");
    checkpoint::write_tensors(&broken, &t, usize::MAX).unwrap();
    let e = model::load(&broken, Device::Cpu, Kind::Float, None, 0).err().unwrap().to_string();
    assert!(e.contains("missing tensors: model.norm.weight"), "{e}");

    let untied = dir.path().join("untied");
    write_lm(&untied, 1, false);
    assert!(checkpoint::read_tensors(&untied).unwrap().contains_key("lm_head.weight"));
    let l = model::load(&untied, Device::Cpu, Kind::Float, None, 0).unwrap();
    assert_eq!(l.new_tensors, vec!["score.weight".to_string()]);
    assert!(!l.vs.variables().contains_key("lm_head.weight"));
    let out = dir.path().join("rm");
    model::save(&out, &l.vs, &l.model, &l.tokenizer, None).unwrap();
    assert!(!checkpoint::read_tensors(&out).unwrap().contains_key("lm_head.weight"));
}

#[test]
fn score_file_writes_reward_columns_in_each_format() {
    let dir = tempfile::tempdir().unwrap();
    let l = fresh(dir.path());
    let rm = dir.path().join("rm");
    model::save(&rm, &l.vs, &l.model, &l.tokenizer, None).unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_jsonl(&pairs, &synthetic_rows(6, 2));
    let responses = dir.path().join("responses.jsonl");
    write_jsonl(
        &responses,
        &[
            serde_json::json!({"prompt": "Say hi.", "completion": "hello"}),
            serde_json::json!({"prompt": "Hi", "completion": "Hey"}),
        ],
    );
    let opts = ScoreOptions { device: "cpu".into(), ..Default::default() };
    let scorer = Scorer::load(&rm, &opts).unwrap();
    let examples = datasets::read_dataset(&pairs, &Default::default()).unwrap().examples;
    let want = scorer.score_examples(&examples).unwrap().0;

    let out = dir.path().join("scored.jsonl");
    let r = reward::score_file(&rm, &pairs, Some(&out), &opts).unwrap();
    assert_eq!((r.rows, r.pairs, r.responses), (6, 6, 0));
    let e = r.pair_eval.unwrap();
    assert_eq!(e.per_category.len(), 2);
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut correct = 0;
    for (row, s) in rows.iter().zip(&want) {
        let Scored::Pair { chosen, rejected } = *s else { panic!() };
        // (JSON text round-trips floats to within an ulp.)
        assert!((row["reward_chosen"].as_f64().unwrap() - chosen).abs() < 1e-12);
        assert!((row["reward_rejected"].as_f64().unwrap() - rejected).abs() < 1e-12);
        assert_eq!(row["correct"].as_bool().unwrap(), chosen > rejected);
        assert!(row["chosen"].is_string() && row["category"].is_string());
        correct += usize::from(chosen > rejected);
    }
    assert!((e.accuracy - correct as f64 / 6.0).abs() < 1e-12);

    // Prompt/response rows get one `reward` each, in CSV and Parquet too.
    let csv = dir.path().join("scored.csv");
    let r = reward::score_file(&rm, &responses, Some(&csv), &opts).unwrap();
    assert_eq!((r.responses, r.pairs), (2, 0));
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.lines().next().unwrap().ends_with(",reward"), "{text}");
    assert_eq!(text.lines().count(), 3);
    let pq = dir.path().join("scored.parquet");
    reward::score_file(&rm, &responses, Some(&pq), &opts).unwrap();
    use polars::prelude::SerReader;
    let df = polars::prelude::ParquetReader::new(std::fs::File::open(&pq).unwrap()).finish().unwrap();
    let ca = df.column("reward").unwrap().f64().unwrap().clone();
    let col: Vec<Option<f64>> = (0..df.height()).map(|i| ca.get(i)).collect();
    let recs: Vec<datasets::Record> = datasets::read_dataset(&responses, &Default::default())
        .unwrap()
        .examples
        .into_iter()
        .map(|e| e.record)
        .collect();
    let direct = scorer.score_records(&recs).unwrap();
    for (c, s) in col.iter().zip(&direct) {
        let Scored::Response { reward } = *s else { panic!() };
        assert_eq!(c.unwrap(), reward);
    }
    // A conversation is scored at its end, as the same prompt + completion.
    let conv = datasets::Record::Conversation {
        messages: vec![datasets::Message::user("Hi"), datasets::Message::new("assistant", "Hey")],
    };
    let (Scored::Response { reward: a }, Scored::Response { reward: b }) =
        (scorer.score_records(&[conv]).unwrap()[0], direct[1])
    else {
        panic!()
    };
    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    // The read-back Parquet holds the data columns too.
    for c in ["prompt", "completion"] {
        assert!(df.column(c).is_ok(), "no {c} column in {:?}", df.get_column_names());
    }

    // An unknown output extension is refused before scoring; prompts alone have nothing to score.
    let e = reward::score_file(&rm, &pairs, Some(&dir.path().join("x.txt")), &opts).unwrap_err().to_string();
    assert!(e.contains(".parquet"), "{e}");
    let prompts = dir.path().join("prompts.jsonl");
    write_jsonl(&prompts, &[serde_json::json!({"prompt": "a"}), serde_json::json!({"prompt": "b"})]);
    let e = format!("{:#}", reward::score_file(&rm, &prompts, None, &opts).unwrap_err());
    assert!(e.contains("prompts.jsonl row 1") && e.contains("without a response"), "{e}");
}

/// A `GemmaForSequenceClassification` saved by transformers (fixture
/// reward/tests/fixtures/reward, made by scripts/make_fixtures.py and
/// committed) loads as a reward model and gives transformers' rewards for a
/// right-padded batch.
#[test]
fn a_transformers_reward_model_loads_and_gives_its_rewards() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reward");
    let path = dir.join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} is missing ({e}): it is made by scripts/make_fixtures.py (`make fixtures`) and committed",
            path.display()
        )
    });
    let e: serde_json::Value = serde_json::from_str(&text).unwrap();
    let l = model::load(&dir, Device::Cpu, Kind::Float, None, 0).unwrap();
    assert!(l.new_tensors.is_empty(), "the fixture has its score head: {:?}", l.new_tensors);
    let seqs: Vec<Vec<i64>> = e["seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
        .collect();
    let want: Vec<f64> = e["rewards"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let t = seqs.iter().map(Vec::len).max().unwrap();
    assert!(seqs.iter().any(|s| s.len() < t), "the batch is padded");
    let pad = l.tokenizer.special.pad;
    let ids: Vec<i64> =
        seqs.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat(pad)).take(t)).collect();
    let valid: Vec<bool> = seqs.iter().flat_map(|s| (0..t).map(move |i| i < s.len())).collect();
    let shape = [seqs.len() as i64, t as i64];
    let got: Vec<f32> = tch::no_grad(|| {
        let r =
            l.model.forward(&Tensor::from_slice(&ids).view(shape), &Tensor::from_slice(&valid).view(shape));
        Vec::try_from(r.unwrap()).unwrap()
    });
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((f64::from(*a) - b).abs() < 1e-4, "align {got:?} vs transformers {want:?}");
    }
    assert!(want.iter().any(|r| r.abs() > 0.1), "rewards are non-trivial: {want:?}");
}

/// Live check, the other way round: transformers' `GemmaForSequenceClassification`
/// loads a reward model align saved and gives the same rewards. Needs
/// `ALIGN_PYTHON` naming a python with torch and transformers (`make pydeps`),
/// so it is ignored by default: `cargo test -p reward --test model -- --ignored`.
#[test]
#[ignore = "live transformers check: needs ALIGN_PYTHON with transformers (make pydeps)"]
fn live_transformers_loads_an_align_reward_model_and_agrees() {
    let python = std::env::var("ALIGN_PYTHON")
        .expect("set ALIGN_PYTHON to a python with torch and transformers (`make pydeps` installs them)");
    let has_transformers = std::process::Command::new(&python)
        .args(["-c", "import transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(has_transformers, "{python} has no transformers (`make pydeps` installs it)");
    let dir = tempfile::tempdir().unwrap();
    let l = fresh(dir.path());
    let rm = dir.path().join("rm");
    model::save(&rm, &l.vs, &l.model, &l.tokenizer, None).unwrap();
    let p = pair(&l, "Say hi.", "hello there", "no");
    let q = pair(&l, "Tell me a story about a horse.", "once upon a time", "never");
    let ours = rewards(&l, &[&p, &q]);
    let seqs = serde_json::json!([p.chosen, q.chosen, p.rejected, q.rejected]);
    let script = r#"
import json, sys, torch
from transformers import GemmaForSequenceClassification
m = GemmaForSequenceClassification.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
assert m.config.num_labels == 1
seqs = json.loads(sys.argv[2]); pad = m.config.pad_token_id
t = max(len(s) for s in seqs)
ids = torch.tensor([s + [pad] * (t - len(s)) for s in seqs])
mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
with torch.no_grad():
    print(json.dumps(m(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, rm.to_str().unwrap(), &seqs.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let theirs: Vec<f64> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((f64::from(*a) - b).abs() < 1e-4, "align {ours:?} vs transformers {theirs:?}");
    }
}

/// Regression: the head was drawn from torch's global generator, so a test
/// (or a server thread) seeding and drawing at the same time changed a
/// "seeded" reward model, and a resumed run no longer matched (CI, resume
/// test). The head now comes from its own stream keyed by the seed.
#[test]
fn head_init_ignores_other_threads_drawing_from_torch() {
    let dir = tempfile::tempdir().unwrap();
    write_lm(&dir.path().join("init"), 5, true);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tch::manual_seed(1);
                let _ = Tensor::randn([4096], (Kind::Float, Device::Cpu));
            }
        })
    };
    let head = |seed| {
        let l = model::load(&dir.path().join("init"), Device::Cpu, Kind::Float, Some(0.5), seed).unwrap();
        l.model.score.weight.detach().copy()
    };
    let (a, b, c) = (head(3), head(3), head(4));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    noise.join().unwrap();
    assert!(a.equal(&b), "the same seed gave two heads");
    assert!(!a.equal(&c), "another seed gave the same head");
}
