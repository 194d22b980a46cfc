#!/usr/bin/env python3
"""Writes the parity fixtures under lm/tests/fixtures with transformers.

Run once (``make fixtures``) from the project venv; the output is committed and
the Rust tests read it without Python. For each tiny random Gemma
(MQA with head_dim != hidden/heads, and GQA) it writes a Hugging Face model
directory saved by transformers itself and ``expected.json`` with:

- last-position logits (f32, eager attention) for several prompts,
- greedy continuations (``generate(do_sample=False)``, one prompt at a time),
- chat-template renderings (text and ids) of several conversations by
  ``apply_chat_template``, using the template in lm/src/chat_template.jinja.
"""
import json
import os
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GemmaConfig, GemmaForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "lm", "tests", "fixtures")
TEMPLATE = open(os.path.join(ROOT, "lm", "src", "chat_template.jinja")).read()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def corpus(n=600, seed=0):
    rng = random.Random(seed)
    words = ("the a model user answer question reverse sort add count letters numbers word "
             "please hello world gemma align turn text copy format list small large quick brown "
             "fox jumps over lazy dog one two three four five six seven eight nine ten").split()
    lines = []
    for _ in range(n):
        k = rng.randint(3, 12)
        s = " ".join(rng.choice(words) for _ in range(k))
        if rng.random() < 0.3:
            s += f" {rng.randint(0, 999)} + {rng.randint(0, 999)} = ?"
        if rng.random() < 0.2:
            s = s.capitalize() + "."
        lines.append(s)
    lines.append("Ünïcödé ✓ 日本語 emoji 🙂 tabs\tand\nnewlines")
    return lines


def train_tokenizer(vocab_size=400):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    return tok


CONVERSATIONS = [
    ([{"role": "user", "content": "Hello there"}], True),
    ([{"role": "user", "content": "  Reverse the word: hello \n"},
      {"role": "assistant", "content": "\n olleh  "}], False),
    ([{"role": "system", "content": " You are terse. "},
      {"role": "user", "content": "Sort: 3 1 2"},
      {"role": "model", "content": "1 2 3"},
      {"role": "user", "content": "\tAnd add 40 + 2?\n\n"}], True),
    ([{"role": "user", "content": "Ünïcödé ✓ 日本語 🙂"},
      {"role": "assistant", "content": "ok\n\nsecond paragraph\n"},
      {"role": "user", "content": "count letters"},
      {"role": "assistant", "content": "  seven  "}], False),
]


def make(name, cfg_kwargs, seed):
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    raw = train_tokenizer()
    raw.save(os.path.join(out, "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(out, "tokenizer.json"),
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    hf_tok.chat_template = TEMPLATE
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = GemmaConfig(
        vocab_size=512, max_position_embeddings=256, hidden_act="gelu_pytorch_tanh",
        pad_token_id=0, eos_token_id=1, bos_token_id=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, attn_implementation="eager", **cfg_kwargs,
    )
    model = GemmaForCausalLM(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # Large enough that logits are far from uniform (no greedy ties) and
            # the (1 + w) norm weights are exercised.
            p.normal_(0.0, 0.15 if "norm" in pname else 0.3)
    model.generation_config.eos_token_id = [1, 5]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)

    rng = random.Random(seed)
    prompts = [[2] + [rng.randrange(6, 400) for _ in range(n)] for n in (1, 5, 12, 30)]
    logits = []
    with torch.no_grad():
        for p in prompts:
            logits.append(model(torch.tensor([p])).logits[0, -1].tolist())
        # Every position of one prompt.
        full = {"prompt": prompts[2], "logits": model(torch.tensor([prompts[2]])).logits[0].tolist()}
        greedy = []
        for p in prompts:
            g = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, max_new_tokens=20, eos_token_id=[1, 5], pad_token_id=0)
            greedy.append(g[0, len(p):].tolist())

    chats = []
    for msgs, gen in CONVERSATIONS:
        text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        ids2 = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        if isinstance(ids2, dict) or hasattr(ids2, "keys"):
            ids2 = ids2["input_ids"]
        assert list(ids) == list(ids2), (ids, ids2)
        chats.append({"messages": msgs, "add_generation_prompt": gen, "text": text, "ids": ids})

    expected = {
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "prompts": prompts,
        "last_logits": logits,
        "full_logits": full,
        "greedy": greedy,
        "chats": chats,
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)


if __name__ == "__main__":
    make("mqa", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=32), seed=1)
    make("gqa", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16), seed=2)
