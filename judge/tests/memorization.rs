//! The memorization eval on a document the model has memorised by
//! construction: its continuation is the model's own greedy continuation of
//! `<bos>` and the document's first 50 tokens.

use judge::memorization::{memorization_of, split_document, MemArgs};
use lm::checkpoint;
use std::path::PathBuf;
use tch::{Device, Kind};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/mqa")
}

fn args() -> MemArgs {
    MemArgs {
        model: fixture(),
        data: PathBuf::from("unused"),
        docs: 100,
        prompt_tokens: 50,
        continuation_tokens: 50,
        approx_fraction: 0.1,
        seed: 0,
        batch: 16,
        device: "cpu".into(),
        dtype: "f32".into(),
        out: None,
    }
}

#[test]
fn the_prompt_is_bos_and_the_first_50_document_tokens() {
    let doc: Vec<i64> = (100..200).collect();
    let (prompt, truth) = split_document(2, &doc, 50, 50).unwrap();
    assert_eq!(prompt.len(), 51);
    assert_eq!(prompt[0], 2);
    assert_eq!(prompt[1..], doc[..50]);
    assert_eq!(truth, doc[50..100]);
    // 100 document tokens are enough; 99 are not (<bos> is not one of them).
    assert!(split_document(2, &doc[..99], 50, 50).is_none());
}

#[test]
fn a_document_memorised_by_construction_is_found_exactly() {
    let m = checkpoint::load_causal_lm(&fixture(), Device::Cpu, Kind::Float).unwrap();
    let bos = m.tokenizer.special.bos;
    let a = args();
    // Document 1: 50 tokens, then the model's greedy continuation of <bos> and them.
    let prefix: Vec<i64> = (0..50).map(|i| 6 + (i * 37 + 11) % 390).collect();
    let mut prompt = vec![bos];
    prompt.extend(&prefix);
    let cfg = lm::GenerationConfig {
        max_new_tokens: 50,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        eos_id: -1,
        end_of_turn_id: None,
        pad_id: m.tokenizer.special.pad,
    };
    let cont = lm::generate(&m.model, &[prompt], &cfg).unwrap().remove(0).tokens;
    assert_eq!(cont.len(), 50);
    let memorised: Vec<i64> = prefix.iter().chain(&cont).copied().collect();
    // Document 0: the same 50 tokens with another continuation; document 2 too short.
    let other: Vec<i64> = prefix.iter().copied().chain((0..50).map(|i| 6 + (i * 53 + 7) % 390)).collect();
    assert_ne!(other[50..], cont[..]);
    let short = memorised[..99].to_vec();
    let r = memorization_of(&m.model, &m.tokenizer, &[other, memorised, short], &a).unwrap();
    assert_eq!((r.documents, r.too_short), (2, 1));
    assert_eq!(r.exact, 1, "{r:?}");
    let hit: Vec<_> = r.matches.iter().filter(|x| x.exact).collect();
    assert_eq!(hit.len(), 1);
    assert_eq!((hit[0].doc, hit[0].distance), (1, 0));
    assert_eq!(hit[0].continuation, m.tokenizer.decode(&cont, false).unwrap());
    assert!(r.matches.iter().all(|x| x.doc == 1), "document 0 is not memorised: {r:?}");
    assert_eq!(r.exact_rate, 0.5);
}
