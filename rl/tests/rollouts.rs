//! Rollouts: reproducible from the seed; the teacher-forced log-probs agree
//! with those of sampling; the first step's KL is exactly zero; micro-batched
//! updates give the gradient of the whole batch.

mod common;

use common::{config, trainer, weights, write_prompts};
use rl::Rollout;

fn ids(r: &[Rollout]) -> Vec<Vec<i64>> {
    r.iter().map(|x| x.response_ids.clone()).collect()
}

#[test]
fn rollouts_are_reproducible_from_the_seed_and_step() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 8);
    let (t, p) = trainer(config(d.path(), &prompts, ""));
    let a = t.rollouts(3, &p).unwrap();
    let b = t.rollouts(3, &p).unwrap();
    assert_eq!(a.len(), 16, "4 prompts × 4 samples");
    assert_eq!(ids(&a), ids(&b));
    let lp = |r: &[Rollout]| r.iter().flat_map(|x| x.sample_logprobs.clone()).collect::<Vec<f32>>();
    assert_eq!(lp(&a), lp(&b));
    assert_eq!(
        a.iter().map(|r| r.text.clone()).collect::<Vec<_>>(),
        b.iter().map(|r| r.text.clone()).collect::<Vec<_>>()
    );
    // Laid out prompt by prompt; the k samples of a prompt differ.
    assert_eq!(
        a.iter().map(|r| r.group).collect::<Vec<_>>(),
        (0..4).flat_map(|g| [g; 4]).collect::<Vec<_>>()
    );
    assert!(ids(&a[..4]).windows(2).any(|w| w[0] != w[1]), "the k samples of a prompt should differ");
    // Another step, or another seed, draws other samples.
    assert_ne!(ids(&t.rollouts(4, &p).unwrap()), ids(&a));
    let (t2, _) = trainer(config(d.path(), &prompts, "seed = 8"));
    assert_ne!(ids(&t2.rollouts(3, &p).unwrap()), ids(&a));
    // Chunked generation is reproducible too.
    let (t3, _) = trainer(config(d.path(), &prompts, "generation_batch_size = 5"));
    assert_eq!(ids(&t3.rollouts(3, &p).unwrap()), ids(&t3.rollouts(3, &p).unwrap()));
}

#[test]
fn teacher_forced_logprobs_equal_the_sampling_logprobs() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 8);
    let (t, p) = trainer(config(d.path(), &prompts, ""));
    let r = t.rollouts(0, &p).unwrap();
    // Prompts of different lengths, responses of different lengths: the
    // right-padded teacher-forced batch must line every token up.
    let b = rl::rollout::TeacherBatch::new(&r, 0..r.len(), t.specials.pad, tch::Device::Cpu).unwrap();
    let (lp, ent) =
        tch::no_grad(|| rl::rollout::response_logprobs(&t.policy, &b, true, t.cfg.temperature).unwrap());
    let mut n = 0;
    for (i, x) in r.iter().enumerate() {
        for (j, &s) in x.sample_logprobs.iter().enumerate() {
            let tf = lp.double_value(&[i as i64, j as i64]);
            assert!(
                (tf - f64::from(s)).abs() < 1e-4,
                "row {i} token {j}: teacher-forced {tf} vs sampled {s}"
            );
            n += 1;
        }
        for j in x.response_ids.len()..lp.size()[1] as usize {
            assert_eq!(lp.double_value(&[i as i64, j as i64]), 0.0, "padding is masked out");
        }
    }
    assert!(n > 16);
    let e = ent.unwrap();
    assert!(e.min().double_value(&[]) >= 0.0 && e.max().double_value(&[]) <= (512f64).ln() + 1e-4);
}

#[test]
fn first_step_kl_is_zero_and_micro_batches_give_the_same_gradient() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 8);
    let (mut whole, p) = trainer(config(d.path(), &prompts, "beta = 0.1"));
    let (mut micro, _) = trainer(config(d.path(), &prompts, "beta = 0.1\nmicro_batch_size = 5"));
    let (a, ra) = whole.step(0, &p).unwrap();
    let (b, rb) = micro.step(0, &p).unwrap();
    assert_eq!(ids(&ra), ids(&rb));
    // The policy is the reference before the first update: KL exactly 0.
    assert_eq!(a.kl, 0.0);
    assert_eq!(b.kl, 0.0);
    assert!((a.loss - b.loss).abs() < 1e-6, "{} vs {}", a.loss, b.loss);
    assert!((a.entropy - b.entropy).abs() < 1e-5);
    assert!(a.reward_std > 0.0 && a.adv_std > 0.0, "the toy reward varies across samples");
    let (mut max_diff, mut max_g) = (0.0f64, 0.0f64);
    for ((n1, w1), (n2, w2)) in
        weights(&whole.policy_weights.base).iter().zip(weights(&micro.policy_weights.base).iter())
    {
        assert_eq!(n1, n2);
        let (g1, g2) = (w1.grad(), w2.grad());
        max_diff = max_diff.max((&g1 - &g2).abs().max().double_value(&[]));
        max_g = max_g.max(g1.abs().max().double_value(&[]));
    }
    assert!(max_g > 0.0 && max_diff < 1e-5 * max_g.max(1.0), "gradients differ by {max_diff} (max {max_g})");
    // The reference never moves.
    let (r0, _) = trainer(config(d.path(), &prompts, ""));
    let ref_vs = |t: &rl::Trainer| match &t.reference {
        rl::trainer::Reference::Model { vs, .. } => weights(vs),
        rl::trainer::Reference::AdaptersOff => panic!("a full fine-tune has a reference model"),
    };
    for ((_, a), (_, b)) in ref_vs(&whole).iter().zip(ref_vs(&r0).iter()) {
        assert!(a.equal(b));
        assert!(!a.requires_grad());
    }
}
