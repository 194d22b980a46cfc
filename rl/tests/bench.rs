//! The benchmark's align side runs and reports a consistent time split.

#[test]
fn bench_reports_the_time_split_of_a_step() {
    let o = rl::bench::BenchOptions {
        preset: "test-mqa".into(),
        batch: 2,
        k: 2,
        prompt_len: 8,
        new_tokens: 6,
        steps: 1,
        ..Default::default()
    };
    let r = rl::bench::bench(&o).unwrap();
    let a = r.align;
    assert!(a.generate > 0.0 && a.score > 0.0 && a.update > 0.0);
    assert!(a.generate + a.score + a.update <= a.total * 1.01 + 1e-3, "{a:?}");
    assert!(a.rollout_tokens >= 4.0 && a.rollout_tokens <= 24.0, "{a:?}");
    assert!(r.trl.is_none() && r.speedup.is_none());
    let text = r.to_string();
    assert!(text.contains("align") && text.contains("rollout tok/s"), "{text}");
}
