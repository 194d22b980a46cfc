//! Pretrain mode data: a seeded, shuffled held-out split by document, and
//! long documents cut into `max_seq_len` windows (optionally overlapping by
//! `stride`) instead of truncated, with the counts in `summary.json`.

mod common;

use common::fixture;
use lm::Tokenizer;
use sft::{load_data, SftConfig};
use std::collections::BTreeSet;
use std::path::Path;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture().join("tokenizer.json")).unwrap()
}

fn config(dir: &Path, docs: &[String], extra: &str) -> SftConfig {
    let text = dir.join("docs.txt");
    std::fs::write(&text, docs.join("\n")).unwrap();
    let toml = format!(
        "model = \"{}\"\noutput_dir = \"{}\"\nmode = \"pretrain\"\ntext_files = [\"{}\"]\nbatch_size = 4\nmax_steps = 2\ndevice = \"cpu\"\n{extra}\n",
        fixture().display(),
        dir.join("out").display(),
        text.display()
    );
    let p = dir.join("sft.toml");
    std::fs::write(&p, toml).unwrap();
    SftConfig::from_toml_file(&p).unwrap()
}

/// The document numbers ("... doc N") of sequences, from their tokens.
fn doc_numbers(tok: &Tokenizer, seqs: &[sft::Sequence]) -> BTreeSet<usize> {
    seqs.iter()
        .map(|s| {
            let text = tok.decode(&s.target[..s.target.len() - 1], false).unwrap();
            text.rsplit(' ').next().unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn the_held_out_split_is_whole_documents_drawn_from_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let docs: Vec<String> = (0..40).map(|i| format!("the quick brown fox doc {i}")).collect();
    let split = |seed: u64| {
        let cfg = config(tmp.path(), &docs, &format!("eval_fraction = 0.25\nseed = {seed}"));
        let (data, _) = load_data(&cfg, &tok, tmp.path()).unwrap();
        (doc_numbers(&tok, &data.train), doc_numbers(&tok, &data.eval), data.eval.len())
    };
    let (train, eval, n) = split(1);
    assert_eq!((eval.len(), n, train.len()), (10, 10, 30));
    assert!(train.is_disjoint(&eval));
    assert_eq!(train.union(&eval).count(), 40);
    let last: BTreeSet<usize> = (30..40).collect();
    assert_ne!(eval, last, "the held-out documents are drawn, not the last ones");
    assert!(eval.iter().any(|&i| i < 20), "held out from the whole file: {eval:?}");
    assert_eq!(split(1).1, eval, "the same seed holds out the same documents");
    assert_ne!(split(2).1, eval, "another seed holds out others");
}

/// A document of about 300 tokens (bos and eos included), numbered `n`.
fn long_doc(n: usize) -> String {
    let words: Vec<String> = (0..120).map(|i| format!("w{}", i % 10)).collect();
    format!("{} doc {n}", words.join(" "))
}

#[test]
fn long_documents_are_cut_into_windows_not_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let docs = vec![long_doc(0), "a short one doc 1".to_string(), "another short doc 2".to_string()];
    let mut ids = vec![tok.special.bos];
    ids.extend(tok.encode(&docs[0]).unwrap());
    ids.push(tok.special.eos);
    let pairs = ids.len() - 1;
    assert!(pairs > 100, "{pairs}");
    for (stride, extra) in [(32, String::new()), (20, "stride = 20".to_string())] {
        let cfg = config(tmp.path(), &docs, &format!("max_seq_len = 32\neval_fraction = 0.0\n{extra}"));
        let (data, _) = load_data(&cfg, &tok, tmp.path()).unwrap();
        // The long document's windows come first (documents keep their order).
        let n_windows = 1 + (pairs - 32).div_ceil(stride);
        assert_eq!(data.train.len(), n_windows + 2, "stride {stride}");
        let w = &data.train[..n_windows];
        assert!(w.iter().all(|s| s.len() <= 32));
        for (k, s) in w.iter().enumerate() {
            let start = k * stride;
            assert_eq!(
                s.input,
                ids[start..start + s.len()],
                "window {k} (stride {stride}) starts at {start}"
            );
        }
        // Every token of the document is trained once, in order.
        let trained: Vec<i64> =
            w.iter().flat_map(|s| s.target.iter().zip(&s.mask).filter(|p| *p.1).map(|p| *p.0)).collect();
        assert_eq!(trained, ids[1..], "stride {stride}");
        let c = data.windows.as_ref().unwrap();
        assert_eq!(
            (c.documents, c.train_documents, c.eval_documents, c.long_documents),
            (3, 3, 0, 1),
            "stride {stride}"
        );
        assert_eq!((c.train_windows, c.eval_windows, c.stride), (n_windows + 2, 0, stride));
        assert_eq!((data.truncated, data.dropped), (0, 0));
    }
}

#[test]
fn window_counts_are_in_summary_json_and_a_bad_stride_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let docs: Vec<String> =
        (0..10).map(|i| if i % 3 == 0 { long_doc(i) } else { format!("short text doc {i}") }).collect();
    let cfg = config(tmp.path(), &docs, "max_seq_len = 48\neval_fraction = 0.2\nstride = 40");
    let s = sft::run(&cfg, tmp.path()).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("out/summary.json")).unwrap()).unwrap();
    let w = &summary["windows"];
    assert_eq!(w["documents"], 10);
    assert_eq!((w["train_documents"].as_u64(), w["eval_documents"].as_u64()), (Some(8), Some(2)));
    assert_eq!(w["long_documents"], 4);
    assert_eq!(w["stride"], 40);
    assert_eq!(w["max_seq_len"], 48);
    let (train_w, eval_w) = (w["train_windows"].as_u64().unwrap(), w["eval_windows"].as_u64().unwrap());
    assert!(train_w > 8, "long documents give several windows: {w}");
    assert_eq!(s.train_examples as u64, train_w);
    assert_eq!(s.eval_examples as u64, eval_w);
    let p = tmp.path().join("bad.toml");
    std::fs::write(
        &p,
        "model = \"m\"\noutput_dir = \"o\"\nmode = \"pretrain\"\ntext_files = [\"x\"]\nmax_seq_len = 32\nstride = 33\n",
    )
    .unwrap();
    let e = format!("{:#}", SftConfig::from_toml_file(&p).unwrap_err());
    assert!(e.contains("stride must be in 1..=max_seq_len (32), got 33"), "{e}");
}
