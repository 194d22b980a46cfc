//! Each filter removes what it should and keeps what it should.

mod common;

use common::{conv, example, example_at, write};
use datasets::{
    DecontaminateConfig, ExactDedupConfig, FilterConfig, Filters, LengthConfig, LengthUnit, Message,
    NearDedupConfig, PiiConfig, Record, SelfIdConfig, TextScope,
};
use tempfile::tempdir;

/// Run `cfg` over conversations (user, model) and return the kept model
/// answers and the (filter, reason) of each removal.
fn run(cfg: &FilterConfig, rows: &[(&str, &str)]) -> (Vec<String>, Vec<(String, String)>) {
    let mut cfg = cfg.clone();
    cfg.keep_removed = true;
    let mut f = Filters::with_eval_prompts(&cfg, &[]).unwrap();
    let examples =
        rows.iter().enumerate().map(|(i, (u, m))| example_at(conv(u, m), "t.jsonl", i + 1)).collect();
    let (kept, report) = f.apply(examples).unwrap();
    assert_eq!(report.kept + report.total_removed(), report.input);
    (
        kept.iter().map(|e| e.record.messages()[1].content.clone()).collect(),
        report.removed.iter().map(|r| (r.filter.to_string(), r.reason.clone())).collect(),
    )
}

fn model_says(cfg: &FilterConfig, answers: &[&str]) -> Vec<String> {
    let rows: Vec<(&str, &str)> = answers.iter().map(|a| ("question", *a)).collect();
    run(cfg, &rows).0
}

#[test]
fn exact_dedup_ignores_case_punctuation_and_spacing_and_keeps_the_first() {
    let cfg = FilterConfig { exact_dedup: Some(ExactDedupConfig::default()), ..FilterConfig::default() };
    let (kept, removed) = run(
        &cfg,
        &[
            ("What is 2+2?", "Four."),
            ("what is 2 + 2", "four"),
            ("What is 2+3?", "Five."),
            ("  WHAT is 2+2 ?? ", "FOUR!"),
        ],
    );
    assert_eq!(kept, vec!["Four.", "Five."]);
    assert_eq!(removed.len(), 2);
    assert!(removed[0].1.contains("exact duplicate of t.jsonl row 1"), "{removed:?}");

    // Scoped to prompts, a different answer to the same prompt is a duplicate.
    let prompts = FilterConfig {
        exact_dedup: Some(ExactDedupConfig { scope: TextScope::Prompt }),
        ..FilterConfig::default()
    };
    let (kept, _) = run(&prompts, &[("Hi", "Hello"), ("hi!", "Hey")]);
    assert_eq!(kept, vec!["Hello"]);
}

#[test]
fn near_dedup_removes_small_edits_and_keeps_different_texts() {
    let base = "The quick brown fox jumps over the lazy dog while the farmer watches from the old \
                wooden porch and the sun sets slowly behind the distant hills of the quiet valley \
                where the river bends toward the sea and the birds return to their nests";
    let edited = base.replace("old wooden", "old painted");
    let different = "Photosynthesis converts light energy into chemical energy stored in glucose, \
                     releasing oxygen as a by-product in the chloroplasts of green plant cells \
                     during the day while respiration continues at night in the mitochondria";
    let cfg = FilterConfig {
        near_dedup: Some(NearDedupConfig { threshold: 0.7, ..NearDedupConfig::default() }),
        ..FilterConfig::default()
    };
    let (kept, removed) = run(&cfg, &[("q", base), ("q", &edited), ("q", different)]);
    assert_eq!(kept, vec![base.to_string(), different.to_string()]);
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].0, "near_dedup");
    assert!(removed[0].1.contains("near duplicate of t.jsonl row 1"), "{removed:?}");

    // A strict threshold keeps the edited copy (its true Jaccard is about 0.8).
    let strict = FilterConfig {
        near_dedup: Some(NearDedupConfig { threshold: 0.97, ..NearDedupConfig::default() }),
        ..FilterConfig::default()
    };
    let (kept, _) = run(&strict, &[("q", base), ("q", &edited)]);
    assert_eq!(kept.len(), 2);
}

#[test]
fn length_bounds_in_words_and_chars_check_both_sides_of_a_pair() {
    let words = FilterConfig {
        length: Some(LengthConfig {
            unit: LengthUnit::Words,
            min: Some(2),
            max: Some(4),
            scope: TextScope::Response,
        }),
        ..FilterConfig::default()
    };
    let kept = model_says(&words, &["one", "one two", "one two three four", "a b c d e"]);
    assert_eq!(kept, vec!["one two", "one two three four"]);

    let chars = FilterConfig {
        length: Some(LengthConfig {
            unit: LengthUnit::Chars,
            min: None,
            max: Some(12),
            scope: TextScope::All,
        }),
        ..FilterConfig::default()
    };
    // "question" (8) + answer: ≤ 12 characters in all.
    let (kept, removed) = run(&chars, &[("question", "four"), ("question", "fiver")]);
    assert_eq!(kept, vec!["four"]);
    assert!(removed[0].1.contains("13 characters, above the maximum 12"), "{removed:?}");

    let mut f = Filters::with_eval_prompts(&words, &[]).unwrap();
    let pair = example(Record::Preference {
        prompt: vec![Message::user("q")],
        chosen: vec![Message::model("fine answer here")],
        rejected: vec![Message::model("no")],
        margin: None,
    });
    let r = f.check(&pair).unwrap();
    assert!(r.reason.contains("(rejected), below the minimum 2"), "{}", r.reason);

    let e = Filters::with_eval_prompts(
        &FilterConfig {
            length: Some(LengthConfig { min: Some(5), max: Some(2), ..LengthConfig::default() }),
            ..FilterConfig::default()
        },
        &[],
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("min (5) is larger than max (2)"));
}

#[test]
fn pii_removes_emails_phones_cards_and_ids_but_not_lookalikes() {
    let cfg = FilterConfig { pii: Some(PiiConfig::default()), ..FilterConfig::default() };
    let removed_texts = [
        "Write to jane.doe@gmail.com for details.",
        "Call me at (555) 123-4567 tomorrow.",
        "My number is +44 20 7946 0958.",
        "Dial 555-867-5309 now.",
        "Card: 4539 1488 0343 6467, exp 12/27.",
        "Card 4539148803436467 on file",
        "SSN 123-45-6789 is on the form.",
        "Pay to GB82 WEST 1234 5698 7654 32 please.",
    ];
    let kept_texts = [
        "Write to support@example.com for details.",
        "The meeting is on 2023-10-15 at 10:30.",
        "Card: 4539 1488 0343 6468 fails the Luhn check.",
        "Numbers 1200 1500 2000 are years.",
        "The value of pi is 3.14159265358979.",
        "SSN-like 000-12-3456 is not valid.",
        "Version 1.2.3 was released.",
        "0000000000000000 is a placeholder.",
    ];
    let all: Vec<&str> = removed_texts.iter().chain(&kept_texts).copied().collect();
    let (kept, removed) = run(&cfg, &all.iter().map(|t| ("question", *t)).collect::<Vec<_>>());
    assert_eq!(kept, kept_texts.to_vec());
    assert_eq!(removed.len(), removed_texts.len());
    let reasons: Vec<&str> = removed.iter().map(|r| r.1.as_str()).collect();
    assert!(reasons[0].starts_with("email address"), "{reasons:?}");
    assert!(reasons[1].starts_with("phone number"), "{reasons:?}");
    assert!(reasons[4].starts_with("card-like number"), "{reasons:?}");
    assert!(reasons[6].starts_with("social-security-like"), "{reasons:?}");
    assert!(reasons[7].starts_with("IBAN-like"), "{reasons:?}");
    // The reason masks the match.
    assert!(!reasons[0].contains("jane.doe@gmail.com"), "{reasons:?}");

    // Turning a kind off keeps those rows.
    let no_email = FilterConfig {
        pii: Some(PiiConfig { emails: false, ..PiiConfig::default() }),
        ..FilterConfig::default()
    };
    assert_eq!(model_says(&no_email, &[removed_texts[0]]).len(), 1);
}

#[test]
fn self_identification_catches_claims_in_model_turns_only() {
    let cfg = FilterConfig { self_identification: Some(SelfIdConfig::default()), ..FilterConfig::default() };
    let claims = [
        "I am ChatGPT, a large language model.",
        "As an AI language model developed by OpenAI, I cannot browse.",
        "I'm a large language model trained by Anthropic.",
        "Hello! I’m Claude. How can I help?",
        "My name is LLaMA and I am here to help.",
        "I was created by Meta AI.",
        "My creators at OpenAI asked me to be careful.",
        "I am GPT-4o.",
    ];
    let fine = [
        "I am not ChatGPT; I am Gemma, a model made by Google.",
        "ChatGPT is a chatbot developed by OpenAI.",
        "I am happy to compare ChatGPT and Claude for you.",
        "Tools such as ChatGPT, Claude and Llama are popular.",
        "I am Gemma, trained by Google DeepMind.",
        "Llamas are domesticated South American camelids.",
    ];
    let all: Vec<&str> = claims.iter().chain(&fine).copied().collect();
    let kept = model_says(&cfg, &all);
    assert_eq!(kept, fine.to_vec());

    // The user may ask; a rejected response may claim (it is a good negative).
    let mut f = Filters::with_eval_prompts(&cfg, &[]).unwrap();
    assert!(f.check(&example(conv("Are you ChatGPT? I am ChatGPT.", "No, I am Gemma."))).is_none());
    let pair = |chosen: &str, rejected: &str| {
        example(Record::Preference {
            prompt: vec![Message::user("Who are you?")],
            chosen: vec![Message::model(chosen)],
            rejected: vec![Message::model(rejected)],
            margin: None,
        })
    };
    assert!(f.check(&pair("I am Gemma.", "I am ChatGPT.")).is_none());
    let r = f.check(&pair("I am ChatGPT.", "I am Gemma.")).unwrap();
    assert_eq!(r.filter, "self_identification");
    assert!(r.reason.contains("I am ChatGPT"), "{}", r.reason);

    // Extra names extend the defaults.
    let extra = FilterConfig {
        self_identification: Some(SelfIdConfig {
            extra_names: vec!["Zorp Assistant".into()],
            ..SelfIdConfig::default()
        }),
        ..FilterConfig::default()
    };
    let kept = model_says(&extra, &["I am Zorp  Assistant.", "I am ChatGPT.", "I am Gemma."]);
    assert_eq!(kept, vec!["I am Gemma."]);
}

#[test]
fn decontamination_removes_13_gram_overlaps_and_short_prompt_matches() {
    let eval = vec![
        // A long eval prompt (20 words).
        "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"
            .to_string(),
        // A short eval prompt (7 words).
        "What is the capital city of Australia".to_string(),
        // Too short to match anything (2 words < min_words 5).
        "Hello there".to_string(),
    ];
    let cfg = FilterConfig {
        decontaminate: Some(DecontaminateConfig::default()),
        keep_removed: true,
        ..FilterConfig::default()
    };
    let rows = [
        // Shares 13+ consecutive words with the long prompt (case and punctuation differ).
        ("Solve: natalia sold clips to 48 of her friends in April, and then she sold half as many!", "72"),
        // Shares only 12 consecutive words.
        ("natalia sold clips to 48 of her friends in April and then bought pens", "ok"),
        // Contains the short eval prompt.
        ("Quick quiz: what is the capital city of Australia? Answer briefly.", "Canberra"),
        // A short training text inside the long eval prompt (6 words ≥ min_words).
        ("sold half as many clips in", "?"),
        // Unrelated.
        ("Tell me about the capital of France", "Paris"),
        // Contains the 2-word eval prompt: below min_words, kept.
        ("hello there friend", "hi"),
    ];
    let mut f = Filters::with_eval_prompts(&cfg, &eval).unwrap();
    let examples =
        rows.iter().enumerate().map(|(i, (u, m))| example_at(conv(u, m), "train.jsonl", i + 1)).collect();
    let (kept, report) = f.apply(examples).unwrap();
    let kept_rows: Vec<usize> = kept.iter().map(|e| e.origin.row).collect();
    assert_eq!(kept_rows, vec![2, 5, 6]);
    assert_eq!(report.removed_by, vec![("decontaminate", 3)]);
    assert!(report.removed[0].reason.contains("13-word run"), "{}", report.removed[0].reason);
    assert!(report.removed[1].reason.contains("7-word run"), "{}", report.removed[1].reason);

    // n is configurable: with n = 8 the 12-word overlap counts too.
    let n8 = FilterConfig {
        decontaminate: Some(DecontaminateConfig { n: 8, ..DecontaminateConfig::default() }),
        ..FilterConfig::default()
    };
    let mut f = Filters::with_eval_prompts(&n8, &eval).unwrap();
    assert!(f.check(&example(conv(rows[1].0, "ok"))).is_some());
}

#[test]
fn decontamination_reads_eval_prompts_from_files() {
    let dir = tempdir().unwrap();
    write(
        dir.path(),
        "eval.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Name three primary colours used in painting\"}]}\n",
    );
    let cfg: FilterConfig = serde_json::from_value(serde_json::json!({
        "decontaminate": {"against": ["eval.jsonl"], "n": 13}
    }))
    .unwrap();
    let mut f = Filters::new(&cfg, dir.path()).unwrap();
    assert!(f
        .check(&example(conv("Name three primary colours used in painting.", "Red, yellow, blue")))
        .is_some());
    assert!(f.check(&example(conv("Name three animals.", "Cat, dog, cow"))).is_none());
    let missing: FilterConfig =
        serde_json::from_value(serde_json::json!({"decontaminate": {"against": ["nope.jsonl"]}})).unwrap();
    let e = format!("{:#}", Filters::new(&missing, dir.path()).err().unwrap());
    assert!(e.contains("cannot read evaluation prompts"), "{e}");
}

#[test]
fn filters_run_in_order_and_removed_rows_are_written_for_review() {
    let dir = tempdir().unwrap();
    let cfg: FilterConfig = serde_json::from_value(serde_json::json!({
        "length": {"min": 3},
        "pii": {},
        "self_identification": {},
        "exact_dedup": {},
        "keep_removed": true
    }))
    .unwrap();
    let mut f = Filters::with_eval_prompts(&cfg, &[]).unwrap();
    assert_eq!(f.names(), vec!["length", "pii", "self_identification", "exact_dedup"]);
    let rows = vec![
        example_at(conv("hi there", "I am ChatGPT."), "x", 1),
        example_at(conv("hi there", "mail bob@corp.io"), "x", 2),
        example_at(conv("hi", "ok"), "x", 3),
        example_at(conv("hi there", "hello friend"), "x", 4),
        example_at(conv("Hi there!", "Hello, friend."), "x", 5),
    ];
    let (kept, report) = f.apply(rows).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        report.removed_by,
        vec![("length", 1), ("pii", 1), ("self_identification", 1), ("exact_dedup", 1)]
    );
    let out = dir.path().join("removed.jsonl");
    report.write_removed(&out).unwrap();
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["filter"], "self_identification");
    assert_eq!(lines[0]["row"], 1);
    assert_eq!(lines[0]["record"]["messages"][1]["content"], "I am ChatGPT.");
    let shown = report.to_string();
    assert!(shown.contains("5 rows in, 1 kept, 4 removed"), "{shown}");
}

#[test]
fn filtering_everything_away_is_an_error() {
    let cfg = FilterConfig {
        length: Some(LengthConfig { min: Some(100), ..LengthConfig::default() }),
        ..FilterConfig::default()
    };
    let mut f = Filters::with_eval_prompts(&cfg, &[]).unwrap();
    let e = f.apply(vec![example(conv("a", "b")), example(conv("c", "d"))]).unwrap_err().to_string();
    assert!(e.contains("removed every row"), "{e}");
    assert!(e.contains("length"), "{e}");
}

#[test]
fn filter_config_rejects_unknown_keys() {
    let e = serde_json::from_value::<FilterConfig>(serde_json::json!({"dedup": {}})).unwrap_err();
    assert!(e.to_string().contains("unknown field `dedup`"), "{e}");
    let e = serde_json::from_value::<FilterConfig>(serde_json::json!({"pii": {"email": false}})).unwrap_err();
    assert!(e.to_string().contains("unknown field `email`"), "{e}");
}
