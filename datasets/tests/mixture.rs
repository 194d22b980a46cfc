//! Mixture sampling: determinism, weights, held-out splits, the report.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::{conv, example_at, write};
use datasets::{Draw, ExactDedupConfig, FilterConfig, Filters, MixSettings, Mixture, MixtureConfig, Source};
use tempfile::tempdir;

fn source(name: &str, weight: f64, n: usize) -> Source {
    Source {
        name: name.to_string(),
        weight,
        examples: (0..n)
            .map(|i| example_at(conv(&format!("{name} question {i}"), "answer"), name, i + 1))
            .collect(),
    }
}

fn per_source(draws: &[Draw]) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for d in draws {
        *m.entry(d.source).or_default() += 1;
    }
    m
}

#[test]
fn same_seed_gives_the_same_epochs_and_other_seeds_or_epochs_differ() {
    let build = |seed| {
        Mixture::from_sources(
            vec![source("a", 1.0, 50), source("b", 0.5, 40)],
            &MixSettings { seed, ..MixSettings::default() },
        )
        .unwrap()
    };
    let m1 = build(7);
    let m2 = build(7);
    assert_eq!(m1.epoch(0), m2.epoch(0));
    assert_eq!(m1.epoch(3), m2.epoch(3));
    assert_ne!(m1.epoch(0), m1.epoch(1));
    assert_ne!(m1.epoch(0), build(8).epoch(0));
    // The examples behind the draws are the same too.
    let a: Vec<_> = m1.epoch_examples(2).into_iter().cloned().collect();
    let b: Vec<_> = m2.epoch_examples(2).into_iter().cloned().collect();
    assert_eq!(a, b);
}

#[test]
fn weights_without_total_are_numbers_of_passes() {
    let m = Mixture::from_sources(
        vec![source("twice", 2.0, 30), source("half", 0.5, 40), source("once_and_a_half", 1.5, 20)],
        &MixSettings::default(),
    )
    .unwrap();
    let draws = m.epoch(0);
    let counts = per_source(&draws);
    assert_eq!(counts[&0], 60);
    assert_eq!(counts[&1], 20);
    assert_eq!(counts[&2], 30);
    assert_eq!(m.per_epoch(), &[60, 20, 30]);

    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    for d in &draws {
        *seen.entry((d.source, d.index)).or_default() += 1;
    }
    // weight 2.0: every row exactly twice.
    assert!((0..30).all(|i| seen[&(0, i)] == 2));
    // weight 0.5: 20 distinct rows once each.
    assert_eq!(seen.keys().filter(|k| k.0 == 1).count(), 20);
    assert!(seen.iter().filter(|(k, _)| k.0 == 1).all(|(_, &c)| c == 1));
    // weight 1.5: every row at least once, 10 of them twice.
    assert!((0..20).all(|i| seen[&(2, i)] >= 1));
    assert_eq!((0..20).filter(|i| seen[&(2, *i)] == 2).count(), 10);
}

#[test]
fn downsampled_rows_change_between_epochs_and_are_uniform() {
    let m = Mixture::from_sources(vec![source("s", 0.5, 100)], &MixSettings::default()).unwrap();
    let e0: HashSet<usize> = m.epoch(0).iter().map(|d| d.index).collect();
    let e1: HashSet<usize> = m.epoch(1).iter().map(|d| d.index).collect();
    assert_ne!(e0, e1);
    // Over 400 epochs each row is picked about half the time: the count is
    // Binomial(400, 0.5), sd 10; allow 5 sd.
    let mut hits = [0usize; 100];
    for e in 0..400 {
        for d in m.epoch(e) {
            hits[d.index] += 1;
        }
    }
    for (i, h) in hits.iter().enumerate() {
        assert!((150..=250).contains(h), "row {i} picked {h} times of 400");
    }
}

#[test]
fn total_splits_rows_by_weight_and_the_shuffle_interleaves_sources() {
    let m = Mixture::from_sources(
        vec![source("big", 3.0, 100), source("small", 1.0, 1000)],
        &MixSettings { seed: 1, total: Some(2000), held_out_fraction: None },
    )
    .unwrap();
    let draws = m.epoch(0);
    assert_eq!(draws.len(), 2000);
    let counts = per_source(&draws);
    assert_eq!(counts[&0], 1500); // 15 passes over 100 rows
    assert_eq!(counts[&1], 500); // half of 1000
                                 // Any window of the shuffled epoch matches the weights within sampling
                                 // error: the first 400 draws hold Binomial(400, 0.75) of `big` (sd 8.7).
    let head = per_source(&draws[..400]);
    let big = head[&0] as f64;
    assert!((big - 300.0).abs() < 5.0 * 8.7, "big share in the first 400: {big}");
    // Across seeds the mean share matches exactly in expectation.
    let mut total_big = 0usize;
    for seed in 0..50 {
        let m = Mixture::from_sources(
            vec![source("big", 3.0, 100), source("small", 1.0, 1000)],
            &MixSettings { seed, total: Some(2000), held_out_fraction: None },
        )
        .unwrap();
        total_big += m.epoch(0)[..100].iter().filter(|d| d.source == 0).count();
    }
    // 5000 draws, p = 0.75: sd ≈ 30.6 (a little less without replacement).
    assert!((total_big as f64 - 3750.0).abs() < 5.0 * 30.6, "{total_big}");
    let r = m.report();
    assert_eq!(r.per_epoch, 2000);
    assert!((r.sources[0].share - 0.75).abs() < 1e-12);
}

#[test]
fn held_out_fraction_is_disjoint_deterministic_and_per_source() {
    let settings = MixSettings { seed: 3, total: None, held_out_fraction: Some(0.1) };
    let m = Mixture::from_sources(vec![source("a", 1.0, 100), source("b", 2.0, 30)], &settings).unwrap();
    assert_eq!(m.held_out().len(), 10 + 3);
    assert_eq!(m.report().sources[0].held_out, 10);
    assert_eq!(m.report().sources[1].train, 27);
    let held: HashSet<String> = m.held_out().iter().map(|e| e.record.messages()[0].content.clone()).collect();
    for e in 0..5 {
        for ex in m.epoch_examples(e) {
            assert!(!held.contains(&ex.record.messages()[0].content));
        }
    }
    // Same seed, same split; the split of `a` does not depend on other sources.
    let again = Mixture::from_sources(vec![source("a", 1.0, 100)], &settings).unwrap();
    let held_a: Vec<_> = m
        .held_out()
        .iter()
        .zip(m.held_out_sources())
        .filter(|(_, s)| **s == 0)
        .map(|(e, _)| e.clone())
        .collect();
    assert_eq!(again.held_out(), held_a.as_slice());
    let other_seed =
        Mixture::from_sources(vec![source("a", 1.0, 100)], &MixSettings { seed: 4, ..settings.clone() })
            .unwrap();
    assert_ne!(other_seed.held_out(), again.held_out());
}

#[test]
fn bad_weights_and_duplicate_names_are_errors() {
    let e =
        Mixture::from_sources(vec![source("a", 0.0, 10)], &MixSettings::default()).unwrap_err().to_string();
    assert!(e.contains("`a`: weight 0 must be a positive number"), "{e}");
    let e = Mixture::from_sources(vec![source("a", f64::NAN, 10)], &MixSettings::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be a positive number"), "{e}");
    let e = Mixture::from_sources(
        vec![source("a", 1.0, 1)],
        &MixSettings { held_out_fraction: Some(0.5), ..MixSettings::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("needs at least 2"), "{e}");
}

#[test]
fn load_reads_sources_filters_across_them_and_reports_each_source() {
    let dir = tempdir().unwrap();
    let mut a = String::new();
    for i in 0..20 {
        a.push_str(&format!("{{\"prompt\": \"alpha {i}\", \"completion\": \"x\"}}\n"));
    }
    a.push_str("{\"prompt\": \"broken\"}\n");
    write(dir.path(), "a.jsonl", &a);
    let mut b = String::from("question,answer\n");
    for i in 0..10 {
        b.push_str(&format!("beta {i},y\n"));
    }
    b.push_str("Alpha 3,x\n"); // a duplicate of a row of `a` after normalisation
    write(dir.path(), "b.csv", &b);
    let mut held = String::new();
    for i in 0..4 {
        held.push_str(&format!("{{\"prompt\": \"eval {i}\"}}\n"));
    }
    write(dir.path(), "eval.jsonl", &held);

    let cfg: MixtureConfig = serde_json::from_value(serde_json::json!({
        "seed": 5,
        "total": 60,
        "on_bad_row": "skip",
        "sources": [
            {"name": "a", "path": "a.jsonl", "weight": 2.0},
            {"name": "b", "path": "b.csv", "weight": 1.0,
             "columns": {"prompt": "question", "completion": "answer"}}
        ],
        "held_out": {"path": "eval.jsonl", "kind": "prompt_only"},
        "filters": {"exact_dedup": {}, "keep_removed": true}
    }))
    .unwrap();
    let m = Mixture::load(&cfg, dir.path()).unwrap();
    let r = m.report();
    assert_eq!(r.sources[0].rows, 21);
    assert_eq!(r.sources[0].skipped_bad_rows, 1);
    assert_eq!(r.sources[0].train, 20);
    assert_eq!(r.sources[1].filtered_out, 1);
    assert_eq!(r.sources[1].train, 10);
    assert_eq!(r.sources[0].per_epoch, 40);
    assert_eq!(r.sources[1].per_epoch, 20);
    assert_eq!(r.held_out, 4);
    assert_eq!(m.held_out().len(), 4);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].number, 21);
    let fr = r.filters.as_ref().unwrap();
    assert_eq!(fr.removed_by, vec![("exact_dedup", 1)]);
    assert_eq!(fr.removed[0].example.origin.row, 11);
    let text = r.to_string();
    assert!(text.contains("60 rows per epoch, 4 held out"), "{text}");
    assert_eq!(m.epoch(0).len(), 60);

    let mut no_split = cfg.clone();
    no_split.held_out = Some(Default::default());
    let e = format!("{:#}", Mixture::load(&no_split, dir.path()).unwrap_err());
    assert!(e.contains("held_out: set `fraction`"), "{e}");

    let mut cfg2 = cfg.clone();
    cfg2.sources[1].name = "a".into();
    let e = format!("{:#}", Mixture::load(&cfg2, dir.path()).unwrap_err());
    assert!(e.contains("two sources are named `a`"), "{e}");
}

#[test]
fn mixture_config_rejects_unknown_keys() {
    let e = serde_json::from_value::<MixtureConfig>(serde_json::json!({
        "sources": [{"name": "a", "path": "a.jsonl", "wieght": 2.0}]
    }))
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `wieght`"), "{e}");
}

#[test]
fn filtering_inside_a_mixture_keeps_the_first_occurrence_across_sources() {
    let mut first = source("first", 1.0, 5);
    let mut second = source("second", 1.0, 5);
    // second's row 0 repeats first's row 2.
    second.examples[0] = example_at(conv("first question 2", "answer"), "second", 1);
    first.examples.truncate(5);
    let cfg = FilterConfig { exact_dedup: Some(ExactDedupConfig::default()), ..FilterConfig::default() };
    let mut f = Filters::with_eval_prompts(&cfg, &[]).unwrap();
    let m = Mixture::from_sources_filtered(vec![first, second], &MixSettings::default(), &mut f).unwrap();
    assert_eq!(m.train_rows(0).len(), 5);
    assert_eq!(m.train_rows(1).len(), 4);
    let by_name: BTreeMap<_, _> =
        m.report().sources.iter().map(|s| (s.name.clone(), s.filtered_out)).collect();
    assert_eq!(by_name["first"], 0);
    assert_eq!(by_name["second"], 1);
}
