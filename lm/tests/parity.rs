//! Parity with transformers' GemmaForCausalLM and apply_chat_template, on the
//! fixtures written by scripts/make_fixtures.py (no Python at test time).

mod common;
use common::*;
use lm::chat::{self, Message};
use tch::Tensor;

fn check_logits(name: &str) {
    let m = load(name);
    let e = expected(name);
    for (p, want) in e["prompts"].as_array().unwrap().iter().zip(e["last_logits"].as_array().unwrap()) {
        let prompt = ids(p);
        let got = last_logits(&m.model, &prompt);
        let want = Tensor::from_slice(&floats(want));
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{name}: prompt of {} tokens: max |Δlogit| = {d}", prompt.len());
    }
    // Every position of one prompt.
    let full = &e["full_logits"];
    let prompt = ids(&full["prompt"]);
    let x = Tensor::from_slice(&prompt).unsqueeze(0);
    let got = tch::no_grad(|| m.model.forward(&x).unwrap()).squeeze_dim(0).flatten(0, -1);
    let want = Tensor::from_slice(&floats(&full["logits"]));
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "{name}: all positions: max |Δlogit| = {d}");
}

#[test]
fn logits_match_transformers_mqa_head_dim_not_hidden_over_heads() {
    check_logits("mqa");
}

#[test]
fn logits_match_transformers_gqa() {
    check_logits("gqa");
}

fn check_greedy(name: &str) {
    let m = load(name);
    let e = expected(name);
    let prompts: Vec<Vec<i64>> = e["prompts"].as_array().unwrap().iter().map(ids).collect();
    let want: Vec<Vec<i64>> = e["greedy"].as_array().unwrap().iter().map(ids).collect();
    for (p, w) in prompts.iter().zip(&want) {
        let g = lm::generate(&m.model, std::slice::from_ref(p), &greedy(20)).unwrap();
        assert_eq!(&g[0].tokens, w, "{name}: greedy continuation of a {}-token prompt", p.len());
    }
    // The same prompts in one left-padded batch.
    let g = lm::generate(&m.model, &prompts, &greedy(20)).unwrap();
    for (gi, w) in g.iter().zip(&want) {
        assert_eq!(&gi.tokens, w, "{name}: batched greedy");
    }
}

#[test]
fn greedy_ids_match_transformers_generate_mqa() {
    check_greedy("mqa");
}

#[test]
fn greedy_ids_match_transformers_generate_gqa() {
    check_greedy("gqa");
}

#[test]
fn formatter_matches_apply_chat_template_byte_for_byte() {
    let m = load("mqa");
    let e = expected("mqa");
    let chats = e["chats"].as_array().unwrap();
    assert!(chats.len() >= 4);
    for c in chats {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let r = chat::render(&msgs, gen).unwrap();
        assert_eq!(r.text, c["text"].as_str().unwrap());
        let enc = chat::encode(&m.tokenizer, &msgs, gen).unwrap();
        assert_eq!(enc.ids, ids(&c["ids"]), "token ids of {:?}", r.text);
    }
}

#[test]
fn loss_mask_covers_model_content_and_end_of_turn_but_not_header() {
    let m = load("mqa");
    let msgs = vec![
        Message::user("Reverse: abc"),
        Message::model("  cba "),
        Message::user("again"),
        Message::model("cba"),
    ];
    let enc = chat::encode(&m.tokenizer, &msgs, false).unwrap();
    let trained: Vec<i64> = enc.ids.iter().zip(&enc.loss_mask).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
    let text = m.tokenizer.decode(&trained, false).unwrap();
    assert_eq!(text, "cba<end_of_turn>\ncba<end_of_turn>\n");
    // The header `<start_of_turn>model\n` is never trained.
    let sot = m.tokenizer.special.start_of_turn;
    for (id, t) in enc.ids.iter().zip(&enc.loss_mask) {
        if *id == sot {
            assert!(!t);
        }
    }
}
