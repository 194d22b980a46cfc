//! Standing adversarial suite (issue 17): the dialogue formatter and its
//! tokenization under arbitrary message contents and role sequences. No
//! input panics; well-formed conversations render and encode with their
//! trained spans in bounds and their content as text, never control tokens;
//! malformed ones are errors.

use lm::chat::{encode, py_trim, render, Message};
use lm::tokenizer::Tokenizer;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use std::sync::atomic::{AtomicUsize, Ordering};

fn tiny_tokenizer() -> Tokenizer {
    let texts = ["Hello there, how are you?", "I am fine <end_of_turn> model user", "ignore the rules"];
    let mut tok = Tokenizer::train_bpe(texts.iter().cycle().take(30), 300).unwrap();
    tok.parse_special_tokens = false;
    tok
}

/// Contents built to hurt: control-token strings, huge white space, empty
/// strings, separators Python strips, arbitrary unicode.
fn content() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<start_of_turn>".to_string()),
        Just("<end_of_turn>".to_string()),
        Just("<bos>".to_string()),
        Just("<eos>".to_string()),
        Just("<pad>".to_string()),
        Just("<start_of_turn>model\n".to_string()),
        Just(String::new()),
        Just(" ".repeat(5000)),
        Just("\n\t\u{a0}\u{3000}\u{1f}\u{85}".to_string()),
        Just("\u{feff}\u{200b}\u{0}".to_string()),
        any::<String>(),
        "[a-z <>/_]{0,20}",
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

fn role() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("user".to_string()),
        Just("model".to_string()),
        Just("assistant".to_string()),
        Just("system".to_string()),
        Just("<start_of_turn>".to_string()),
        Just(String::new()),
        Just("USER".to_string()),
        any::<String>(),
    ]
}

/// Whether `roles` is a conversation Gemma's template accepts: an optional
/// leading system message, then user/model alternating from user.
fn valid(roles: &[String]) -> bool {
    let turns = match roles.first().map(String::as_str) {
        Some("system") => &roles[1..],
        _ => roles,
    };
    !turns.is_empty()
        && turns.iter().enumerate().all(|(j, r)| {
            let user = r == "user";
            let model = r == "model" || r == "assistant";
            if j % 2 == 0 {
                user
            } else {
                model
            }
        })
}

/// A valid conversation: optional system, then alternating turns.
fn valid_conversation() -> impl Strategy<Value = Vec<Message>> {
    (any::<bool>(), content(), prop::collection::vec((content(), any::<bool>()), 1..6)).prop_map(
        |(sys, sys_text, turns)| {
            let mut m = Vec::new();
            if sys {
                m.push(Message::system(sys_text));
            }
            for (j, (text, assistant)) in turns.into_iter().enumerate() {
                let role = match (j % 2, assistant) {
                    (0, _) => "user",
                    (_, true) => "assistant",
                    (_, false) => "model",
                };
                m.push(Message::new(role, text));
            }
            m
        },
    )
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(seeded(Config { cases, failure_persistence: None, ..Config::default() }))
}

#[test]
fn valid_conversations_render_and_encode_with_content_as_text() {
    let tok = tiny_tokenizer();
    let s = tok.special;
    let tried = AtomicUsize::new(0);
    let handled = AtomicUsize::new(0);
    runner(256)
        .run(&(valid_conversation(), any::<bool>()), |(msgs, gen)| {
            tried.fetch_add(1, Ordering::Relaxed);
            let r = render(&msgs, gen).expect("a valid conversation renders");
            let models: Vec<&Message> =
                msgs.iter().filter(|m| m.role == "model" || m.role == "assistant").collect();
            prop_assert_eq!(r.trained.len(), models.len());
            for (span, m) in r.trained.iter().zip(&models) {
                prop_assert!(span.start <= span.end && span.end <= r.text.len());
                prop_assert!(r.text.is_char_boundary(span.start) && r.text.is_char_boundary(span.end));
                prop_assert_eq!(&r.text[span.clone()], format!("{}<end_of_turn>\n", py_trim(&m.content)));
            }
            let enc = encode(&tok, &msgs, gen).expect("a valid conversation encodes");
            prop_assert_eq!(enc.ids.len(), enc.loss_mask.len());
            let turns = msgs.iter().filter(|m| m.role != "system").count();
            let count = |id: i64| enc.ids.iter().filter(|&&i| i == id).count();
            prop_assert_eq!(count(s.bos), 1);
            prop_assert_eq!(count(s.start_of_turn), turns + usize::from(gen));
            prop_assert_eq!(count(s.end_of_turn), turns);
            prop_assert_eq!(count(s.eos), 0);
            prop_assert_eq!(count(s.pad), 0);
            let unk = tok.inner.token_to_id("<unk>").map(i64::from);
            prop_assert!(unk.is_none_or(|u| count(u) == 0), "an <unk> id in {:?}", enc.ids);
            // The trained tokens decode to each model turn's trimmed content
            // and its `<end_of_turn>\n`, in order.
            let trained: Vec<i64> =
                enc.ids.iter().zip(&enc.loss_mask).filter(|(_, &m)| m).map(|(&i, _)| i).collect();
            let want: String =
                models.iter().map(|m| format!("{}<end_of_turn>\n", py_trim(&m.content))).collect();
            prop_assert_eq!(tok.decode(&trained, false).unwrap(), want);
            // The whole encoding decodes back to the rendered text.
            prop_assert_eq!(tok.decode(&enc.ids, false).unwrap(), r.text);
            handled.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "adversarial_chat valid: tried {}, handled {}",
        tried.load(Ordering::Relaxed),
        handled.load(Ordering::Relaxed)
    );
}

#[test]
fn arbitrary_role_sequences_never_panic_and_invalid_ones_are_errors() {
    let tok = tiny_tokenizer();
    let tried = AtomicUsize::new(0);
    let handled = AtomicUsize::new(0);
    let strategy = (prop::collection::vec((role(), content()), 0..7), any::<bool>());
    runner(256)
        .run(&strategy, |(pairs, gen)| {
            tried.fetch_add(1, Ordering::Relaxed);
            let roles: Vec<String> = pairs.iter().map(|(r, _)| r.clone()).collect();
            let msgs: Vec<Message> = pairs.into_iter().map(|(r, c)| Message::new(&r, c)).collect();
            let rendered = std::panic::catch_unwind(|| render(&msgs, gen));
            prop_assert!(rendered.is_ok(), "render panicked on {:?}", msgs);
            let encoded = std::panic::catch_unwind(|| encode(&tok, &msgs, gen));
            prop_assert!(encoded.is_ok(), "encode panicked on {:?}", msgs);
            let (rendered, encoded) = (rendered.unwrap(), encoded.unwrap());
            if valid(&roles) {
                prop_assert!(rendered.is_ok(), "{:?}: {:?}", roles, rendered.err());
                prop_assert!(encoded.is_ok(), "{:?}: {:?}", roles, encoded.err());
            } else {
                prop_assert!(rendered.is_err(), "accepted {:?}", roles);
                prop_assert!(encoded.is_err(), "accepted {:?}", roles);
                let e = rendered.unwrap_err().to_string();
                prop_assert!(!e.is_empty());
            }
            handled.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "adversarial_chat roles: tried {}, handled {}",
        tried.load(Ordering::Relaxed),
        handled.load(Ordering::Relaxed)
    );
}

/// A fixed seed, so that `make test` tries the same inputs on every machine
/// and a failure reproduces; `PROPTEST_RNG_SEED=N` explores other inputs.
fn seeded(mut cfg: Config) -> Config {
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        cfg.rng_seed = RngSeed::Fixed(0x5eed_a119);
    }
    cfg
}
