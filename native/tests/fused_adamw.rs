//! libtorch's fused AdamW (at::_fused_adamw_) against AdamW as
//! torch.optim.AdamW / lm::train::AdamW compute it.
mod common {
    pub mod reference_adamw;
}
use common::reference_adamw::Reference;
use tch::{Device, Kind, Tensor};

fn max_abs_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn shapes() -> Vec<Vec<i64>> {
    vec![vec![64, 48], vec![48], vec![3, 5, 7], vec![1], vec![1000]]
}

/// Runs `steps` steps of both with the learning rate of each step from `lr`
/// (a warm-up), and returns the largest difference in weights and moments.
fn compare(weight_decay: f64, steps: u64, lr: impl Fn(u64) -> f64) -> f64 {
    tch::manual_seed(7);
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let init: Vec<Tensor> =
        shapes().iter().map(|s| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu))).collect();
    let mut reference = Reference::new(&init);
    let params: Vec<Tensor> = init.iter().map(|p| p.copy()).collect();
    let exp_avgs: Vec<Tensor> = init.iter().map(|p| p.zeros_like()).collect();
    let exp_avg_sqs: Vec<Tensor> = init.iter().map(|p| p.zeros_like()).collect();
    let mut worst: f64 = 0.0;
    for t in 1..=steps {
        let grads: Vec<Tensor> =
            shapes().iter().map(|s| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)) * 0.1).collect();
        let lr_t = lr(t);
        reference.step(&grads, lr_t, b1, b2, weight_decay, eps);
        align_native::fused_adamw_step(
            &params,
            &grads,
            &exp_avgs,
            &exp_avg_sqs,
            t,
            lr_t,
            b1,
            b2,
            weight_decay,
            eps,
        )
        .unwrap();
        worst = worst
            .max(max_abs_diff(&params, &reference.params))
            .max(max_abs_diff(&exp_avgs, &reference.exp_avgs))
            .max(max_abs_diff(&exp_avg_sqs, &reference.exp_avg_sqs));
    }
    // The parameters moved: the comparison is not between two no-ops.
    assert!(max_abs_diff(&params, &init) > 1e-3);
    worst
}

#[test]
fn fused_step_equals_the_reference_without_weight_decay() {
    let d = compare(0.0, 6, |_| 1e-3);
    assert!(d <= 1e-6, "largest difference {d}");
}

#[test]
fn fused_step_equals_the_reference_with_weight_decay_and_warm_up() {
    // Linear warm-up over 4 steps then constant, a large decay so that it shows.
    let d = compare(0.1, 8, |t| 1e-2 * (t.min(4) as f64) / 4.0);
    assert!(d <= 1e-6, "largest difference {d}");
}

#[test]
fn fused_step_updates_bf16_masters_like_the_reference() {
    // lm's mixed precision: the optimiser updates f32 masters from the bf16
    // gradients upcast, then rounds the masters into the bf16 variables.
    tch::manual_seed(3);
    let masters: Vec<Tensor> =
        shapes().iter().map(|s| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu))).collect();
    let vars: Vec<Tensor> = masters.iter().map(|m| m.to_kind(Kind::BFloat16)).collect();
    let mut reference = Reference::new(&masters);
    let m: Vec<Tensor> = masters.iter().map(|p| p.zeros_like()).collect();
    let v: Vec<Tensor> = masters.iter().map(|p| p.zeros_like()).collect();
    for t in 1..=5 {
        let grads: Vec<Tensor> = shapes()
            .iter()
            .map(|s| Tensor::randn(s.as_slice(), (Kind::BFloat16, Device::Cpu)).to_kind(Kind::Float))
            .collect();
        reference.step(&grads, 1e-2, 0.9, 0.95, 0.01, 1e-8);
        align_native::fused_adamw_step(&masters, &grads, &m, &v, t, 1e-2, 0.9, 0.95, 0.01, 1e-8).unwrap();
        tch::no_grad(|| {
            for (var, master) in vars.iter().zip(&masters) {
                var.shallow_clone().copy_(master);
            }
        });
    }
    let d = max_abs_diff(&masters, &reference.params);
    assert!(d <= 1e-6, "largest difference {d}");
    let rounded: Vec<Tensor> = reference.params.iter().map(|p| p.to_kind(Kind::BFloat16)).collect();
    let d = max_abs_diff(&vars, &rounded);
    assert_eq!(d, 0.0, "bf16 variables differ from the rounded reference by {d}");
}

#[test]
fn fused_step_works_on_parameters_that_require_grad() {
    // The optimiser's parameters are leaf variables: the bridge updates them
    // with grad mode off, as torch.optim does.
    let p = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let g = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let (m, v) = (p.detach().zeros_like(), p.detach().zeros_like());
    align_native::fused_adamw_step(&[p.shallow_clone()], &[g], &[m], &[v], 1, 0.5, 0.9, 0.999, 0.0, 1e-8)
        .unwrap();
    // Step 1 of Adam moves by lr·sign(g).
    let moved = p.detach().double_value(&[0]);
    assert!((moved - 0.5).abs() < 1e-6, "{moved}");
}

#[test]
fn mismatched_lists_and_bad_tensors_are_errors() {
    let p = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let e = align_native::fused_adamw_step(
        &[p.copy()],
        &[],
        &[p.copy()],
        &[p.copy()],
        1,
        1e-3,
        0.9,
        0.999,
        0.0,
        1e-8,
    )
    .unwrap_err();
    assert!(e.to_string().contains("1 params but 0 grads"), "{e}");
    let e = align_native::fused_adamw_step(
        &[p.copy()],
        &[p.copy()],
        &[p.copy()],
        &[p.copy()],
        0,
        1e-3,
        0.9,
        0.999,
        0.0,
        1e-8,
    )
    .unwrap_err();
    assert!(e.to_string().contains("1-based"), "{e}");
    // The kernel itself trusts its inputs: a shape, dtype or layout mismatch
    // is refused before it.
    let g = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    let e = align_native::fused_adamw_step(
        &[p.copy()],
        &[g],
        &[p.copy()],
        &[p.copy()],
        1,
        1e-3,
        0.9,
        0.999,
        0.0,
        1e-8,
    )
    .unwrap_err();
    assert!(e.to_string().contains("gradient 0 is Float [4]"), "{e}");
    let g = Tensor::zeros([3], (Kind::Double, Device::Cpu));
    let e = align_native::fused_adamw_step(
        &[p.copy()],
        &[g],
        &[p.copy()],
        &[p.copy()],
        1,
        1e-3,
        0.9,
        0.999,
        0.0,
        1e-8,
    )
    .unwrap_err();
    assert!(e.to_string().contains("gradient 0 is Double"), "{e}");
    let q = Tensor::zeros([3, 3], (Kind::Float, Device::Cpu));
    let qt = q.transpose(0, 1);
    let e = align_native::fused_adamw_step(
        &[q.copy()],
        &[qt],
        &[q.copy()],
        &[q.copy()],
        1,
        1e-3,
        0.9,
        0.999,
        0.0,
        1e-8,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not contiguous"), "{e}");
}

/// Timing, not a test: `cargo test --release -p align-native --test
/// fused_adamw -- --ignored --nocapture bench`. One step of each on ~39M f32
/// parameters shaped like a small Gemma (an embedding, 9 layers of
/// attention and MLP matrices, norms).
#[test]
#[ignore]
fn bench_fused_against_the_reference_step() {
    let (h, f, vocab, layers) = (512i64, 1536i64, 16384i64, 9);
    let mut shapes: Vec<Vec<i64>> = vec![vec![vocab, h], vec![h]];
    for _ in 0..layers {
        shapes.extend([vec![h, h], vec![h, h], vec![h, h], vec![h, h], vec![f, h], vec![f, h], vec![h, f]]);
        shapes.extend([vec![h], vec![h]]);
    }
    let n: i64 = shapes.iter().map(|s| s.iter().product::<i64>()).sum();
    let rand = |s: &Vec<i64>| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu));
    let init: Vec<Tensor> = shapes.iter().map(rand).collect();
    let grads: Vec<Tensor> = shapes.iter().map(rand).collect();
    let mut reference = Reference::new(&init);
    let params: Vec<Tensor> = init.iter().map(|p| p.copy()).collect();
    let m: Vec<Tensor> = init.iter().map(|p| p.zeros_like()).collect();
    let v: Vec<Tensor> = init.iter().map(|p| p.zeros_like()).collect();
    // Interleaved, the fastest and the median of each, and the CPU time
    // (all threads) per step: the machine is shared.
    // The process's user + system CPU time in ms (/proc/self/stat, 100 Hz ticks).
    let cpu_ms = || -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
        f.get(11).zip(f.get(12)).map(|(u, s)| (u + s) * 10.0).unwrap_or(f64::NAN)
    };
    let (mut ours, mut fused) = (vec![], vec![]);
    let (mut ours_cpu, mut fused_cpu) = (0.0, 0.0);
    for t in 1..=12u64 {
        let (start, c0) = (std::time::Instant::now(), cpu_ms());
        reference.step(&grads, 1e-3, 0.9, 0.999, 0.01, 1e-8);
        ours.push(start.elapsed().as_secs_f64() * 1e3);
        let (start, c1) = (std::time::Instant::now(), cpu_ms());
        align_native::fused_adamw_step(&params, &grads, &m, &v, t, 1e-3, 0.9, 0.999, 0.01, 1e-8).unwrap();
        fused.push(start.elapsed().as_secs_f64() * 1e3);
        if t > 2 {
            ours_cpu += (c1 - c0) / 10.0;
            fused_cpu += (cpu_ms() - c1) / 10.0;
        }
    }
    let summary = |mut v: Vec<f64>| {
        let mut v = v.split_off(2); // after the warm-up
        v.sort_by(|a, b| a.total_cmp(b));
        (v[0], v[v.len() / 2])
    };
    let ((ours_min, ours_med), (fused_min, fused_med)) = (summary(ours), summary(fused));
    println!(
        "AdamW step on {:.1}M f32 parameters, {} threads: lm's (tch ops) {ours_min:.1} ms fastest, \
         {ours_med:.1} ms median, {ours_cpu:.0} ms CPU; fused {fused_min:.1} ms fastest, {fused_med:.1} ms median, \
         {fused_cpu:.0} ms CPU",
        n as f64 / 1e6,
        tch::get_num_threads(),
    );
}
