//! The reward stage with LoRA: only the adapters and the score head are
//! trained; the stage writes a PEFT `SEQ_CLS` adapter (with the head) and
//! the merged reward model, which scores as base + adapter does.

mod common;

use common::*;
use lm::peft::TaskType;
use lm::train::session::{Trainable, Updater};
use tch::{nn, Device, Kind, Tensor};

const LORA: &str =
    "[reward.lora]\nrank = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]";

#[test]
fn only_the_adapters_and_the_head_are_trained() {
    let dir = tempfile::tempdir().unwrap();
    write_lm(&dir.path().join("init"), 3, true);
    write_jsonl(&dir.path().join("pairs.jsonl"), &synthetic_rows(20, 1));
    let cfg = load_config(&write_config(dir.path(), &format!("max_steps = 2\n{LORA}")));
    let mut loaded = reward::model::load(&cfg.stage.model, Device::Cpu, Kind::Float, None, 1).unwrap();
    let mut t =
        Trainable::prepare(loaded.vs, &mut loaded.model.backbone, &cfg.stage, TaskType::SeqCls).unwrap();
    let up = Updater::new(&mut t, &cfg.stage.optim).unwrap();
    let layers = loaded.model.cfg.num_hidden_layers as usize;
    let names = up.opt.names();
    assert_eq!(names.len(), 2 * 3 * layers + 1, "{names:?}");
    assert!(names.contains(&"score.weight"), "{names:?}");
    let trained: Vec<String> =
        t.base.variables().into_iter().filter(|(_, v)| v.requires_grad()).map(|(n, _)| n).collect();
    assert_eq!(trained, vec!["score.weight".to_string()]);
}

#[test]
fn a_lora_reward_model_is_saved_as_a_seq_cls_adapter_and_merged() {
    let dir = tempfile::tempdir().unwrap();
    write_lm(&dir.path().join("init"), 5, true);
    write_jsonl(&dir.path().join("pairs.jsonl"), &synthetic_rows(120, 7));
    let cfg = load_config(&write_config(dir.path(), &format!("max_steps = 20\n{LORA}")));
    let s = reward::run(&cfg, dir.path()).unwrap();
    assert!(s.completed);
    assert!(s.final_loss < s.first_losses[0], "{:?} → {}", s.first_losses, s.final_loss);
    let out = &cfg.stage.output_dir;
    let file = lm::peft::load_adapter(&out.join("adapter")).unwrap();
    assert_eq!(file.task_type, TaskType::SeqCls);
    let head = file.score.as_ref().expect("the SEQ_CLS adapter carries the score head");

    // The merged model scores as the base with the adapter and head does.
    let ids = Tensor::from_slice(&[2i64, 30, 41, 52, 9, 2, 17, 18, 19, 0]).view([2, 5]);
    let valid = ids.ne(0);
    let merged = reward::model::load(&out.join("model"), Device::Cpu, Kind::Float, None, 0).unwrap();
    let mut base = reward::model::load(&dir.path().join("init"), Device::Cpu, Kind::Float, None, 0).unwrap();
    let adapters = nn::VarStore::new(Device::Cpu);
    base.model.backbone.attach_lora(&adapters.root(), &file.config, 0).unwrap();
    base.model.backbone.load_adapter_tensors(&file.tensors, &out.join("adapter")).unwrap();
    tch::no_grad(|| base.model.score.weight.copy_(head));
    let (a, b) = tch::no_grad(|| {
        (merged.model.forward(&ids, &valid).unwrap(), base.model.forward(&ids, &valid).unwrap())
    });
    let scale = a.abs().max().double_value(&[]).max(1.0);
    let diff = (&a - &b).abs().max().double_value(&[]);
    assert!(diff < 1e-5 * scale, "merged {a:?} vs base + adapter {b:?}: {diff}");
    // The statistics are stored beside the merged model as before.
    assert!(reward::RewardStats::read(&out.join("model")).unwrap().is_some());
}
