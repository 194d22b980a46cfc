//! The per-rank random stream of the training session (`RankRng`: what LoRA
//! dropout draws) is saved in checkpoints and restored on resume: a LoRA
//! run with dropout stopped after a checkpoint and resumed ends with the
//! adapters of an uninterrupted run, bit for bit; the same resume with the
//! recorded positions removed draws other masks and ends elsewhere.

use lm::checkpoint::load_causal_lm;
use lm::peft::TaskType;
use lm::stage_settings::StageSettings;
use lm::train::session::{Session, SessionSpec, Trainable, Updater};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mqa")
}

fn settings(out: &Path) -> StageSettings {
    serde_json::from_value(serde_json::json!({
        "model": fixture(),
        "output_dir": out,
        "seed": 11,
        "device": "cpu",
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.5, "target_modules": "all-linear"},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
    }))
    .unwrap()
}

/// Trains from the newest checkpoint in `out` (or from the start) up to
/// step `until` (of 4), saving a checkpoint after steps 2 and 4; returns the
/// adapters' values and the step resumed from.
fn train(out: &Path, until: u64) -> (Vec<(String, Tensor)>, Option<u64>) {
    let s = settings(out);
    let loaded = load_causal_lm(&s.model, Device::Cpu, Kind::Float).unwrap();
    let mut model = loaded.model;
    let mut t = Trainable::prepare(loaded.vs, &mut model, &s, TaskType::CausalLm).unwrap();
    let mut up = Updater::new(&mut t, &s.optim).unwrap();
    let spec = SessionSpec {
        name: "test",
        settings: &s,
        total_steps: 4,
        config_hash: "rank-rng-test".into(),
        extra: serde_json::Value::Null,
        architecture: "GemmaForCausalLM",
        ignore: &["lm_head.weight"],
    };
    let mut session = Session::start(spec, &t, &model, &mut up).unwrap();
    let resumed = session.resumed_from;
    let ids = Tensor::from_slice(&[2i64, 17, 9, 41, 5, 33, 8, 12]).view([2, 4]);
    let pos = Tensor::arange(4, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([2, 4], true);
    model.set_training(true);
    while session.state.step < until {
        let step = session.state.step;
        up.step(1, 4, step, |_| {
            model.forward_backward(&ids, &pos, None, false, |h| {
                let loss = h.square().mean(Kind::Float);
                loss.backward();
                Ok(loss.double_value(&[]))
            })
        })
        .unwrap();
        session.state.step += 1;
        if session.state.step.is_multiple_of(2) {
            session.save(&t, &up, &model.cfg, &loaded.tokenizer, &[]).unwrap();
        }
    }
    model.set_training(false);
    let mut w: Vec<(String, Tensor)> =
        t.lora.as_ref().unwrap().vs.variables().into_iter().map(|(n, v)| (n, v.copy())).collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    (w, resumed)
}

/// A fresh directory under the system's temporary directory, removed when
/// dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("align-rank-rng-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn equal(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((n, x), (m, y))| n == m && x.equal(y))
}

#[test]
fn the_rank_streams_are_saved_and_resumed_bit_identically() {
    let dir = TempDir::new();
    let (full, _) = train(&dir.path().join("full"), 4);

    // Stopped after step 2, resumed: the checkpoint records this rank's
    // stream position (one rank), and the resumed run continues it.
    let part = dir.path().join("part");
    train(&part, 2);
    let ckpt = part.join("checkpoints/step-00000002");
    let st = lm::train::read_trainer_state(&ckpt).unwrap();
    assert_eq!(st.rank_rng.len(), 1, "{st:?}");
    assert_ne!(st.rank_rng[0], "0", "the stream advanced");
    assert_eq!(st.rank_rng[0], st.rng_word_pos);
    let (resumed, from) = train(&part, 4);
    assert_eq!(from, Some(2));
    assert!(equal(&full, &resumed), "the resumed run's adapters differ from the uninterrupted run's");

    // Without the recorded positions the streams restart: other dropout
    // masks, other adapters (so the saved state is what made them equal).
    let other = dir.path().join("other");
    train(&other, 2);
    let state_file = other.join("checkpoints/step-00000002/trainer_state.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("rank_rng");
    std::fs::write(&state_file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let (restarted, from) = train(&other, 4);
    assert_eq!(from, Some(2));
    assert!(!equal(&full, &restarted), "dropout drew the same masks from a restarted stream");
}
