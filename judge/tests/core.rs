//! Verdict parser, win-rate statistics, templates and the both-orders logic.

use judge::pairwise::{combine, judge_pairs, Judge, Pair, RawVerdict, Shown};
use judge::stats::{bootstrap_interval, summarize, win_rate, Outcome};
use judge::template::Template;
use judge::verdict::{parse_verdict, Verdict};
use rand::{Rng, SeedableRng};
use std::cell::Cell;

#[test]
fn parser_on_real_looking_outputs() {
    let cases: &[(&str, Option<Verdict>)] = &[
        (
            "Answer A is accurate and cites the formula; B confuses mass and weight.\n\n[[A]]",
            Some(Verdict::A),
        ),
        ("Both are fine, but B is more concise.\nFinal verdict: [[B]]\nI hope this helps!", Some(Verdict::B)),
        ("They are equally good. [[C]]", Some(Verdict::Tie)),
        ("verdict: [[b]]", Some(Verdict::B)),
        ("My verdict is [[ a ]].", Some(Verdict::A)),
        ("It's a draw: [[tie]]", Some(Verdict::Tie)),
        // Both markers: the last one is the conclusion.
        ("I must answer [[A]] or [[B]]. A is wrong about the date, so B wins.\n[[B]]", Some(Verdict::B)),
        ("At first [[B]] seemed right, but on reflection: [[A]]", Some(Verdict::A)),
        // No marker: unparseable, never guessed from prose.
        ("Assistant A is clearly better.", None),
        ("Verdict: A", None),
        ("[A] is better", None),
        ("[[D]]", None),
        ("", None),
        ("[[note]] then [[A]]", Some(Verdict::A)),
        ("[[[B]]]", Some(Verdict::B)),
    ];
    for (text, want) in cases {
        assert_eq!(parse_verdict(text), *want, "{text:?}");
    }
}

fn outcomes(w: usize, l: usize, t: usize) -> Vec<Outcome> {
    let mut v = vec![Outcome::Win; w];
    v.extend(vec![Outcome::Loss; l]);
    v.extend(vec![Outcome::Tie; t]);
    v
}

#[test]
fn win_rate_hand_computed() {
    assert_eq!(win_rate(&outcomes(0, 0, 10)), 0.5);
    assert_eq!(win_rate(&outcomes(3, 1, 0)), 0.75);
    assert_eq!(win_rate(&outcomes(2, 1, 1)), 0.625);
    assert!(win_rate(&[]).is_nan());
    let s = summarize(&outcomes(0, 0, 20), 500, 1);
    assert_eq!((s.win_rate, s.lo, s.hi), (0.5, 0.5, 0.5));
    let s = summarize(&outcomes(6, 3, 1), 1000, 7);
    assert_eq!((s.n, s.wins, s.losses, s.ties), (10, 6, 3, 1));
    assert!(s.lo <= s.win_rate && s.win_rate <= s.hi, "{s:?}");
    // Same seed, same interval.
    assert_eq!(summarize(&outcomes(6, 3, 1), 1000, 7), s);
}

#[test]
fn interval_narrows_with_n() {
    let small = bootstrap_interval(&outcomes(6, 4, 0), 2000, 0.95, 3);
    let large = bootstrap_interval(&outcomes(600, 400, 0), 2000, 0.95, 3);
    assert!(small.0 < 0.6 && 0.6 < small.1);
    assert!(large.0 < 0.6 && 0.6 < large.1);
    assert!(large.1 - large.0 < (small.1 - small.0) / 5.0, "{small:?} {large:?}");
}

#[test]
fn bootstrap_covers_true_rate_at_about_nominal_rate() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (p_win, p_tie) = (0.45, 0.2);
    let truth = p_win + p_tie / 2.0;
    let trials = 300;
    let mut covered = 0;
    for t in 0..trials {
        let o: Vec<Outcome> = (0..120)
            .map(|_| {
                let u: f64 = rng.random();
                if u < p_win {
                    Outcome::Win
                } else if u < p_win + p_tie {
                    Outcome::Tie
                } else {
                    Outcome::Loss
                }
            })
            .collect();
        let (lo, hi) = bootstrap_interval(&o, 400, 0.95, t);
        covered += usize::from(lo <= truth && truth <= hi);
    }
    let rate = covered as f64 / trials as f64;
    assert!((0.9..=0.99).contains(&rate), "coverage {rate}");
}

#[test]
fn templates_are_checked() {
    for (name, _) in judge::template::BUILTIN {
        let t = Template::load(name).unwrap();
        assert!(t.fields().contains(&"answer_b"));
    }
    let e = Template::parse("t", "{question} {answer_a} {answer_c}").unwrap_err().to_string();
    assert!(e.contains("unknown field {answer_c}"), "{e}");
    let e = Template::parse("t", "{question} {answer_a}").unwrap_err().to_string();
    assert!(e.contains("{answer_b} is missing"), "{e}");
    let e = Template::parse("t", "{question} {answer_a} {answer_b").unwrap_err().to_string();
    assert!(e.contains("never closed"), "{e}");
    let t = Template::parse("t", "Q={question} {{json}} A={answer_a} B={answer_b} R={reference}").unwrap();
    let f = judge::template::Fields { question: "q", answer_a: "a", answer_b: "b", reference: Some("r") };
    assert_eq!(t.render(&f).unwrap(), "Q=q {json} A=a B=b R=r");
    let e = t.render(&judge::template::Fields { reference: None, ..f }).unwrap_err().to_string();
    assert!(e.contains("reference"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mine.txt");
    std::fs::write(&p, "{question}\n{answer_a}\n{answer_b}\n{bogus}").unwrap();
    let e = Template::load(p.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("mine.txt") && e.contains("{bogus}"), "{e}");
}

/// Always prefers the answer shown first.
struct FirstPosition;
impl Judge for FirstPosition {
    fn name(&self) -> String {
        "first".into()
    }
    fn judge(&self, items: &[Shown], _attempt: u32) -> anyhow::Result<Vec<RawVerdict>> {
        Ok(items.iter().map(|_| RawVerdict::new(Some(Verdict::A), "[[A]]")).collect())
    }
}

/// Prefers the answer with the larger number (the truly better one).
struct Truth;
impl Judge for Truth {
    fn name(&self) -> String {
        "truth".into()
    }
    fn judge(&self, items: &[Shown], _attempt: u32) -> anyhow::Result<Vec<RawVerdict>> {
        Ok(items
            .iter()
            .map(|s| {
                let (a, b): (i32, i32) = (s.answer_a.parse().unwrap(), s.answer_b.parse().unwrap());
                let v = match a.cmp(&b) {
                    std::cmp::Ordering::Greater => Verdict::A,
                    std::cmp::Ordering::Less => Verdict::B,
                    std::cmp::Ordering::Equal => Verdict::Tie,
                };
                RawVerdict::new(Some(v), format!("[[{}]]", v.letter()))
            })
            .collect())
    }
}

/// Unparseable for questions starting with "bad" (both attempts), and for
/// "flaky" ones only on the first attempt.
struct Garbled {
    calls: Cell<u32>,
}
impl Judge for Garbled {
    fn name(&self) -> String {
        "garbled".into()
    }
    fn judge(&self, items: &[Shown], attempt: u32) -> anyhow::Result<Vec<RawVerdict>> {
        self.calls.set(self.calls.get() + 1);
        Ok(items
            .iter()
            .map(|s| {
                if s.question.starts_with("bad") || (s.question.starts_with("flaky") && attempt == 0) {
                    RawVerdict::new(None, "I cannot decide.")
                } else {
                    RawVerdict::new(Some(Verdict::Tie), "[[C]]")
                }
            })
            .collect())
    }
}

fn pairs<'a>(qs: &'a [String], c: &'a [String], b: &'a [String]) -> Vec<Pair<'a>> {
    (0..qs.len())
        .map(|i| Pair { question: &qs[i], prompt: &[], candidate: &c[i], baseline: &b[i], reference: None })
        .collect()
}

#[test]
fn both_orders() {
    assert_eq!(combine(Some(Verdict::A), Some(Verdict::B)), (Some(Outcome::Win), Some(true)));
    assert_eq!(combine(Some(Verdict::A), Some(Verdict::A)), (Some(Outcome::Tie), Some(false)));
    assert_eq!(combine(Some(Verdict::A), Some(Verdict::Tie)), (Some(Outcome::Tie), Some(false)));
    assert_eq!(combine(None, Some(Verdict::Tie)), (None, None));

    let qs: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
    // Candidate better on 7 of 10, worse on 2, equal on 1: true rate 0.75.
    let c: Vec<String> = [5, 5, 5, 5, 5, 5, 5, 1, 1, 3].iter().map(|x| x.to_string()).collect();
    let b: Vec<String> = [1, 1, 1, 1, 1, 1, 1, 5, 5, 3].iter().map(|x| x.to_string()).collect();
    let ps = pairs(&qs, &c, &b);

    let r = judge_pairs(&FirstPosition, &ps).unwrap();
    assert!(r.iter().all(|p| p.outcome == Some(Outcome::Tie) && p.orders_agree == Some(false)));

    let r = judge_pairs(&Truth, &ps).unwrap();
    let o: Vec<Outcome> = r.iter().filter_map(|p| p.outcome).collect();
    assert_eq!(win_rate(&o), 0.75);
    assert!(r.iter().all(|p| p.orders_agree == Some(true)));
}

#[test]
fn unparseable_retried_once_then_excluded() {
    let qs: Vec<String> = ["ok", "bad", "flaky"].iter().map(|s| s.to_string()).collect();
    let a: Vec<String> = vec!["1".into(); 3];
    let j = Garbled { calls: Cell::new(0) };
    let r = judge_pairs(&j, &pairs(&qs, &a, &a)).unwrap();
    assert_eq!(j.calls.get(), 2, "one call, one retry call");
    assert_eq!(r[0].outcome, Some(Outcome::Tie));
    assert_eq!(r[0].candidate_first.first_raw, None);
    assert_eq!(r[1].outcome, None, "unparseable twice: excluded");
    assert_eq!(r[1].candidate_first.verdict, None);
    assert_eq!(r[1].candidate_first.first_raw.as_deref(), Some("I cannot decide."));
    assert_eq!(r[2].outcome, Some(Outcome::Tie), "parsed on the retry");
    assert!(r[2].baseline_first.first_raw.is_some());
}

#[test]
fn builtin_oracles() {
    use judge::oracle::{get_oracle, numbers};
    let exact = get_oracle("exact").unwrap();
    assert_eq!(exact.score("", "  Paris. ", Some("paris")).unwrap(), 1.0);
    assert_eq!(exact.score("", "Paris, France", Some("paris")).unwrap(), 0.0);
    assert!(exact.score("", "x", None).unwrap_err().to_string().contains("reference"));
    let contains = get_oracle("contains").unwrap();
    assert_eq!(contains.score("", "It is PARIS, of course", Some("Paris")).unwrap(), 1.0);
    let number = get_oracle("number").unwrap();
    assert_eq!(number.score("", "3 + 4 = 7, so the answer is 1,234.5.", Some("1234.5")).unwrap(), 1.0);
    assert_eq!(number.score("", "The answer is -3", Some("3")).unwrap(), 0.0);
    assert_eq!(numbers("a -2.5 b 10. c 1,000"), vec![-2.5, 10.0, 1000.0]);
    let e = get_oracle("nope").err().unwrap().to_string();
    assert!(e.contains("exact") && e.contains("nope"), "{e}");
}

#[test]
fn verdict_from_scores_with_a_tie_tolerance() {
    use judge::judges::verdict_from_scores;
    // No tolerance: only equal scores tie.
    assert_eq!(verdict_from_scores(1.0, 1.0, 0.0), Verdict::Tie);
    assert_eq!(verdict_from_scores(1.0 + 1e-12, 1.0, 0.0), Verdict::A);
    assert_eq!(verdict_from_scores(-2.0, -1.0, 0.0), Verdict::B);
    // A tolerance: differences up to it (inclusive) tie, in either direction.
    assert_eq!(verdict_from_scores(0.30, 0.25, 0.1), Verdict::Tie);
    assert_eq!(verdict_from_scores(0.25, 0.30, 0.1), Verdict::Tie);
    assert_eq!(verdict_from_scores(0.5, 0.25, 0.25), Verdict::Tie, "exactly at the tolerance");
    assert_eq!(verdict_from_scores(0.51, 0.25, 0.25), Verdict::A);
    assert_eq!(verdict_from_scores(-0.51, -0.25, 0.25), Verdict::B);
    // Swapping the scores swaps the verdict.
    for (a, b, t) in [(0.9, 0.1, 0.5), (0.9, 0.1, 0.9), (0.3, 0.2, 0.05), (-1.0, 2.0, 0.0)] {
        assert_eq!(verdict_from_scores(b, a, t), verdict_from_scores(a, b, t).swapped());
    }
}
