//! The optimiser and its schedules: TRL's `lr_scheduler_type` and
//! `warmup_ratio` against hand computations, f32 gradient accumulation of
//! bf16 variables, and AdamW over exactly the tensors it is given.

use lm::train::{config_hash, lr_at, AdamW, LrSchedule, OptimConfig};
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};

fn optim(toml_text: &str) -> anyhow::Result<OptimConfig> {
    let c: OptimConfig = toml::from_str(toml_text)?;
    c.validate()?;
    Ok(c)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// The schedule as it was before `lr_scheduler_type` existed.
fn old_lr_at(step: u64, total: u64, c: &OptimConfig) -> f64 {
    if step < c.warmup_steps {
        return c.lr * (step + 1) as f64 / c.warmup_steps as f64;
    }
    let decay_steps = total.saturating_sub(c.warmup_steps).max(1);
    let progress = ((step - c.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine)
}

#[test]
fn cosine_is_the_default_and_bit_identical_to_the_old_schedule() {
    assert_eq!(OptimConfig::default().lr_scheduler_type, LrSchedule::Cosine);
    for (lr, warmup, min) in [(3e-3, 20, 0.05), (1e-4, 0, 0.1), (1e-3, 10, 0.0), (0.7, 3, 1.0)] {
        let c = OptimConfig { lr, warmup_steps: warmup, min_lr_ratio: min, ..Default::default() };
        for total in [1, 7, 100, 313] {
            for step in 0..total + 5 {
                assert_eq!(lr_at(step, total, &c).to_bits(), old_lr_at(step, total, &c).to_bits());
            }
        }
    }
}

#[test]
fn linear_warms_up_then_decays_linearly_as_transformers_does() {
    // transformers' get_linear_schedule_with_warmup after warm-up:
    // lr * max(0, (total - step) / (total - warmup)), which is min_lr_ratio = 0.
    let c = optim("lr = 1.0\nwarmup_steps = 4\nmin_lr_ratio = 0.0\nlr_scheduler_type = 'linear'").unwrap();
    assert_eq!(c.lr_scheduler_type, LrSchedule::Linear);
    assert_eq!(lr_at(0, 14, &c), 0.25); // warm-up: (step + 1) / warmup
    assert_eq!(lr_at(1, 14, &c), 0.5);
    assert_eq!(lr_at(3, 14, &c), 1.0);
    for step in 4..=14 {
        let hf = (14 - step) as f64 / 10.0;
        assert!(close(lr_at(step, 14, &c), hf), "step {step}: {} vs {hf}", lr_at(step, 14, &c));
    }
    assert!(close(lr_at(9, 14, &c), 0.5)); // half way
    assert_eq!(lr_at(14, 14, &c), 0.0); // the end
    assert_eq!(lr_at(100, 14, &c), 0.0); // beyond the end: stays there

    // With the default floor, to 0.1 * lr: lr * (0.1 + 0.9 * (1 - progress)).
    let c = OptimConfig { min_lr_ratio: 0.1, ..c };
    assert!(close(lr_at(4, 14, &c), 1.0));
    assert!(close(lr_at(6, 14, &c), 0.1 + 0.9 * 0.8));
    assert!(close(lr_at(9, 14, &c), 0.55));
    assert!(close(lr_at(14, 14, &c), 0.1));
    assert!(close(lr_at(1000, 14, &c), 0.1));
}

#[test]
fn constant_warms_up_then_holds_the_peak() {
    let c = optim("lr = 2.0\nwarmup_steps = 4\nlr_scheduler_type = 'constant'").unwrap();
    assert_eq!(c.lr_scheduler_type, LrSchedule::Constant);
    assert_eq!([0, 1, 2, 3].map(|s| lr_at(s, 14, &c)), [0.5, 1.0, 1.5, 2.0]);
    for step in [4, 9, 14, 100] {
        assert_eq!(lr_at(step, 14, &c), 2.0); // min_lr_ratio plays no part
    }
    // transformers' name for it; without warm-up it is transformers' `constant`.
    let c = optim("lr = 2.0\nlr_scheduler_type = 'constant_with_warmup'").unwrap();
    assert_eq!(c.lr_scheduler_type, LrSchedule::Constant);
    assert_eq!([0, 5, 99].map(|s| lr_at(s, 10, &c)), [2.0; 3]);
}

#[test]
fn cosine_by_hand() {
    let c = optim("lr = 1.0\nwarmup_steps = 4\nlr_scheduler_type = 'cosine'").unwrap();
    assert_eq!(lr_at(0, 14, &c), 0.25);
    assert_eq!(lr_at(3, 14, &c), 1.0);
    assert!(close(lr_at(4, 14, &c), 1.0));
    // A quarter of the way: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2.
    let quarter = 0.1 + 0.9 * 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
    let c12 = OptimConfig { warmup_steps: 2, ..c.clone() }; // decay over 12 steps
    assert!(close(lr_at(5, 14, &c12), quarter));
    assert!(close(lr_at(9, 14, &c), 0.55));
    assert!(close(lr_at(14, 14, &c), 0.1));
    assert!(close(lr_at(100, 14, &c), 0.1));
}

#[test]
fn warmup_ratio_is_a_fraction_of_the_total_steps_rounded_up() {
    // ceil(0.25 * 14) = 4 warm-up steps: the same as warmup_steps = 4, for every schedule.
    for kind in ["cosine", "linear", "constant"] {
        let by_ratio =
            optim(&format!("lr = 1.0\nwarmup_ratio = 0.25\nlr_scheduler_type = '{kind}'")).unwrap();
        let by_steps = optim(&format!("lr = 1.0\nwarmup_steps = 4\nlr_scheduler_type = '{kind}'")).unwrap();
        assert_eq!(by_ratio.warmup(14), 4);
        for step in 0..20 {
            assert_eq!(lr_at(step, 14, &by_ratio), lr_at(step, 14, &by_steps), "{kind} step {step}");
        }
    }
    let c = optim("lr = 1.0\nwarmup_ratio = 0.1").unwrap();
    assert_eq!((c.warmup(100), c.warmup(15), c.warmup(0)), (10, 2, 0));
    assert_eq!(lr_at(0, 100, &c), 0.1);
    assert_eq!(lr_at(9, 100, &c), 1.0);
    // Zero is no warm-up; one is all warm-up.
    let c = optim("lr = 1.0\nwarmup_ratio = 0.0").unwrap();
    assert!(close(lr_at(0, 10, &c), 1.0));
    let c = optim("lr = 1.0\nwarmup_ratio = 1.0").unwrap();
    assert_eq!((lr_at(0, 10, &c), lr_at(9, 10, &c)), (0.1, 1.0));
}

#[test]
fn bad_schedule_settings_are_refused_with_clear_errors() {
    let e = optim("warmup_steps = 10\nwarmup_ratio = 0.1").unwrap_err().to_string();
    assert!(e.contains("optim.warmup_steps = 10 and optim.warmup_ratio = 0.1 are both set"), "{e}");
    for r in ["1.5", "-0.1", "nan"] {
        let e = optim(&format!("warmup_ratio = {r}")).unwrap_err().to_string();
        assert!(e.contains("optim.warmup_ratio must be in [0, 1]"), "{e}");
    }
    let e = optim("lr_scheduler_type = 'cosine_with_restarts'").unwrap_err().to_string();
    assert!(e.contains("unknown variant `cosine_with_restarts`"), "{e}");
    assert!(e.contains("`cosine`, `linear`, `constant`"), "{e}");
    let e = optim("min_lr_ratio = 1.5").unwrap_err().to_string();
    assert!(e.contains("optim.min_lr_ratio must be in [0, 1]"), "{e}");
}

#[test]
fn new_keys_at_their_defaults_leave_the_serialized_form_and_hash_unchanged() {
    // The serialized form before lr_scheduler_type and warmup_ratio existed.
    let before = r#"{"lr":0.0001,"min_lr_ratio":0.1,"warmup_steps":0,"weight_decay":0.0,"beta1":0.9,"beta2":0.999,"eps":1e-8,"grad_clip":1.0}"#;
    assert_eq!(serde_json::to_string(&OptimConfig::default()).unwrap(), before);
    let quickstart = optim("lr = 3e-3\nwarmup_steps = 20\nmin_lr_ratio = 0.05").unwrap();
    let before = r#"{"lr":0.003,"min_lr_ratio":0.05,"warmup_steps":20,"weight_decay":0.0,"beta1":0.9,"beta2":0.999,"eps":1e-8,"grad_clip":1.0}"#;
    assert_eq!(serde_json::to_string(&quickstart).unwrap(), before);
    // Setting the default explicitly is the same config.
    let explicit =
        optim("lr = 3e-3\nwarmup_steps = 20\nmin_lr_ratio = 0.05\nlr_scheduler_type = 'cosine'").unwrap();
    assert_eq!(config_hash(&explicit).unwrap(), config_hash(&quickstart).unwrap());
    // Another schedule or a warm-up ratio is another config (and round-trips).
    let linear = OptimConfig { lr_scheduler_type: LrSchedule::Linear, ..quickstart.clone() };
    assert_ne!(config_hash(&linear).unwrap(), config_hash(&quickstart).unwrap());
    let ratio = OptimConfig { warmup_steps: 0, warmup_ratio: Some(0.1), ..quickstart.clone() };
    let text = serde_json::to_string(&ratio).unwrap();
    assert!(text.contains(r#""warmup_ratio":0.1"#), "{text}");
    assert_eq!(serde_json::from_str::<OptimConfig>(&text).unwrap(), ratio);
    let text = serde_json::to_string(&linear).unwrap();
    assert!(text.contains(r#""lr_scheduler_type":"linear""#), "{text}");
    assert_eq!(serde_json::from_str::<OptimConfig>(&text).unwrap(), linear);
}

/// A variable `w` of `n` values (1.0) in `kind`, and its AdamW.
fn one_var(n: i64, kind: Kind) -> (nn::VarStore, AdamW) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().var("w", &[n], nn::Init::Const(1.0));
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    let opt = AdamW::new(&vs, &OptimConfig { lr: 1e-2, ..Default::default() });
    (vs, opt)
}

/// Backward of `sum(w * c)`: `w`'s gradient is `c`, in `w`'s dtype.
fn backward(vs: &nn::VarStore, c: &Tensor) {
    let w = vs.variables()["w"].shallow_clone();
    (w.to_kind(Kind::Float) * c).sum(Kind::Float).backward();
}

/// Micro-batch gradients where bf16 accumulation loses: element 0 is 1.0
/// then seven times 2^-9 (below half of bf16's step at 1.0, so a bf16 sum
/// stays at 1.0); the other elements vary.
fn micro_grads() -> Vec<Tensor> {
    (0..8)
        .map(|k| {
            let first = if k == 0 { 1.0 } else { 2f32.powi(-9) };
            let rest: Vec<f32> =
                (1..6).map(|j| 0.37 * ((k * 7 + j * 3) % 11) as f32 - 1.3 + 1e-3 * k as f32).collect();
            Tensor::from_slice(&[&[first][..], &rest].concat())
        })
        .collect()
}

#[test]
fn bf16_micro_batch_gradients_accumulate_as_their_f32_sum() {
    let grads = micro_grads();
    let (vs, mut opt) = one_var(6, Kind::BFloat16);
    assert!(opt.has_masters());
    // The f32 sum of the per-micro-batch gradients exactly as bf16
    // backward produced them (each rounded to bf16 once).
    let mut expected = Tensor::zeros([6], (Kind::Float, Device::Cpu));
    opt.zero_grad();
    for c in &grads {
        backward(&vs, c);
        let g = vs.variables()["w"].grad().to_kind(Kind::Float);
        expected += g;
        opt.accumulate().unwrap();
        // The variable's own gradient was moved into the accumulator.
        assert_eq!(vs.variables()["w"].grad().abs().max().double_value(&[]), 0.0);
    }
    let acc = opt.grad("w").unwrap().unwrap();
    assert_eq!(acc.kind(), Kind::Float);
    assert!(acc.equal(&expected), "{acc} vs {expected}");
    assert_eq!(acc.double_value(&[0]), 1.0 + 7.0 * 2f64.powi(-9));

    // Naive accumulation (bf16 backward into the bf16 gradient) loses the small terms.
    let (naive_vs, mut naive) = one_var(6, Kind::BFloat16);
    naive.zero_grad();
    for c in &grads {
        backward(&naive_vs, c);
    }
    let naive_grad = naive_vs.variables()["w"].grad();
    assert_eq!(naive_grad.kind(), Kind::BFloat16);
    assert_eq!(naive_grad.double_value(&[0]), 1.0);
    assert!(!naive_grad.to_kind(Kind::Float).equal(&expected));

    // The update uses the f32 sum: the master moves exactly as an f32
    // parameter whose gradient is that sum (norm, clipping and AdamW).
    let (f32_vs, mut f32_opt) = one_var(6, Kind::Float);
    f32_opt.zero_grad();
    backward(&f32_vs, &expected);
    let n_mixed = opt.clip_and_step(1.0, 1e-2, 1, None).unwrap();
    let n_f32 = f32_opt.clip_and_step(1.0, 1e-2, 1, None).unwrap();
    assert_eq!(n_mixed, n_f32);
    let master = opt.state_tensors()["w.master"].shallow_clone();
    assert!(master.equal(&f32_vs.variables()["w"]), "{master} vs {}", f32_vs.variables()["w"]);
    for k in ["w.exp_avg", "w.exp_avg_sq"] {
        assert!(opt.state_tensors()[k].equal(&f32_opt.state_tensors()[k]), "{k}");
    }
    // The bf16 variable holds the master rounded.
    assert!(vs.variables()["w"].equal(&master.to_kind(Kind::BFloat16)));

    // zero_grad clears the accumulator and the variable's gradient.
    backward(&vs, &grads[1]);
    opt.accumulate().unwrap();
    backward(&vs, &grads[2]);
    opt.zero_grad();
    let g = opt.grad("w").unwrap();
    assert!(g.is_none_or(|g| g.abs().max().double_value(&[]) == 0.0));
    assert_eq!(vs.variables()["w"].grad().abs().max().double_value(&[]), 0.0);
}

#[test]
fn a_pending_bf16_gradient_is_accumulated_by_the_step_itself() {
    // A caller that never calls accumulate() gets what it got before
    // (the bf16 gradient, read once in f32); a last backward without a
    // call after it is not lost.
    let grads = micro_grads();
    let (vs, mut opt) = one_var(6, Kind::BFloat16);
    opt.zero_grad();
    backward(&vs, &grads[0]);
    opt.accumulate().unwrap();
    backward(&vs, &grads[1]);
    let expected = grads[0].to_kind(Kind::BFloat16).to_kind(Kind::Float)
        + grads[1].to_kind(Kind::BFloat16).to_kind(Kind::Float);
    assert!(opt.grad("w").unwrap().unwrap().equal(&expected));
}

#[test]
fn accumulate_leaves_f32_gradients_as_they_are() {
    let grads = micro_grads();
    let (with, mut opt_with) = one_var(6, Kind::Float);
    let (without, mut opt_without) = one_var(6, Kind::Float);
    assert!(!opt_with.has_masters());
    opt_with.zero_grad();
    opt_without.zero_grad();
    for c in &grads {
        backward(&with, c);
        opt_with.accumulate().unwrap();
        backward(&without, c);
    }
    assert!(with.variables()["w"].grad().equal(&without.variables()["w"].grad()));
    opt_with.clip_and_step(1.0, 1e-2, 1, None).unwrap();
    opt_without.clip_and_step(1.0, 1e-2, 1, None).unwrap();
    assert!(with.variables()["w"].equal(&without.variables()["w"]));
}

#[test]
fn from_vars_trains_exactly_the_tensors_it_is_given() {
    // A frozen-looking base (still requiring gradients, to show that only
    // what is given matters), adapters in a second VarStore, a head.
    let base = nn::VarStore::new(Device::Cpu);
    let w = base.root().sub("model").var("w", &[3], nn::Init::Const(1.0));
    let head = base.root().sub("score").var("weight", &[3], nn::Init::Const(0.5));
    let adapters = nn::VarStore::new(Device::Cpu);
    let a = adapters.root().sub("model").sub("w").var("lora_A", &[3], nn::Init::Const(0.1));
    let vars = vec![
        ("score.weight".to_string(), head.shallow_clone()),
        ("model.w.lora_A".to_string(), a.shallow_clone()),
    ];
    let mut opt = AdamW::from_vars(vars, &OptimConfig { lr: 1e-2, ..Default::default() }).unwrap();
    assert_eq!(opt.num_params(), 2);
    assert_eq!(opt.names(), ["model.w.lora_A", "score.weight"]);
    assert_eq!(opt.num_elements(), 6);
    let keys: Vec<String> = opt.state_tensors().into_keys().collect();
    assert_eq!(
        keys,
        [
            "model.w.lora_A.exp_avg",
            "model.w.lora_A.exp_avg_sq",
            "score.weight.exp_avg",
            "score.weight.exp_avg_sq"
        ]
    );

    let before: BTreeMap<&str, Tensor> =
        [("w", w.copy()), ("head", head.copy()), ("a", a.copy())].into_iter().collect();
    for _ in 0..3 {
        opt.zero_grad();
        ((&w + &a) * &head).sum(Kind::Float).backward();
        opt.clip_and_step(1.0, 1e-2, 1, None).unwrap();
    }
    assert!(w.equal(&before["w"]), "a tensor not given moved");
    assert!(!head.equal(&before["head"]) && !a.equal(&before["a"]), "a given tensor did not move");
    assert_eq!(opt.t, 3);

    // Refused: a tensor that cannot get gradients, and a name given twice.
    let frozen = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let e = AdamW::from_vars(vec![("x".into(), frozen)], &OptimConfig::default()).err().unwrap().to_string();
    assert!(e.contains("x does not require gradients"), "{e}");
    let dup = vec![("a".to_string(), a.shallow_clone()), ("a".to_string(), head.shallow_clone())];
    let e = AdamW::from_vars(dup, &OptimConfig::default()).err().unwrap().to_string();
    assert!(e.contains("a is given twice"), "{e}");

    // new() is from_vars over a VarStore's trainable variables.
    let opt = AdamW::new(&base, &OptimConfig::default());
    assert_eq!(opt.names(), ["model.w", "score.weight"]);
}
