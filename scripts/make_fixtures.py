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

Beside it, for each model:

- ``bf16.json``: the same model cast to bfloat16 (eager attention): last-position
  logits of the prompts, and greedy continuations with transformers' top-2
  logit margin at every step;
- ``padded.json``: the prompts as one left-padded and one right-padded batch
  (attention mask; for left padding, position ids from the mask as
  ``generate`` makes them): logits at each row's last real token, and the
  batched greedy continuations of the left-padded batch;
- ``packed.json``: a packed training row of three examples (positions that
  restart per example, no attention mask: transformers finds the packing from
  the position ids), the mask transformers built for it, logits at every
  position and the mean loss over the trained tokens.

And ``reward/tests/fixtures/reward``: a random ``GemmaForSequenceClassification``
(one label) saved by transformers, with ``expected.json`` holding the rewards
of a right-padded batch of sequences.

Usage: make_fixtures.py [NAME ...] with names among mqa, gqa, reward (all by default).
"""
import copy
import json
import os
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GemmaConfig, GemmaForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "lm", "tests", "fixtures")
REWARD_OUT = os.path.join(ROOT, "reward", "tests", "fixtures", "reward")
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
    write_bf16(out, model, prompts)
    write_padded(out, model, prompts)
    write_packed(out, model, seed)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)


def versions():
    return {"transformers": __import__("transformers").__version__, "torch": torch.__version__}


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def write_bf16(out, model, prompts, max_new=12):
    m = copy.deepcopy(model).to(torch.bfloat16).eval()
    last, greedy, margins = [], [], []
    with torch.no_grad():
        for p in prompts:
            last.append(m(torch.tensor([p])).logits[0, -1].float().tolist())
            g = m.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           do_sample=False, max_new_tokens=max_new, eos_token_id=[1, 5], pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
            greedy.append(g.sequences[0, len(p):].tolist())
            steps = []
            for step_logits in g.logits:
                top = step_logits[0].float().topk(2).values
                steps.append(float(top[0] - top[1]))
            margins.append(steps)
    write_json(os.path.join(out, "bf16.json"),
               {**versions(), "dtype": "bfloat16", "prompts": prompts, "last_logits": last,
                "greedy": greedy, "margins": margins})


def write_padded(out, model, prompts, max_new=12, pad=0):
    t = max(len(p) for p in prompts)
    left = torch.tensor([[pad] * (t - len(p)) + p for p in prompts])
    left_mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    left_pos = (left_mask.cumsum(-1) - 1).clamp(min=0)
    right = torch.tensor([p + [pad] * (t - len(p)) for p in prompts])
    right_mask = torch.tensor([[1] * len(p) + [0] * (t - len(p)) for p in prompts])
    with torch.no_grad():
        ll = model(input_ids=left, attention_mask=left_mask, position_ids=left_pos).logits[:, -1]
        rl = model(input_ids=right, attention_mask=right_mask).logits
        rl = torch.stack([rl[i, len(p) - 1] for i, p in enumerate(prompts)])
        g = model.generate(left, attention_mask=left_mask, do_sample=False, max_new_tokens=max_new,
                           eos_token_id=[1, 5], pad_token_id=pad)
    write_json(os.path.join(out, "padded.json"),
               {**versions(), "prompts": prompts, "pad": pad,
                "left": {"input_ids": left.tolist(), "attention_mask": left_mask.tolist(),
                         "position_ids": left_pos.tolist(), "last_logits": ll.tolist()},
                "right": {"input_ids": right.tolist(), "attention_mask": right_mask.tolist(),
                          "last_logits": rl.tolist()},
                "greedy": g[:, t:].tolist()})


def write_packed(out, model, seed):
    from transformers.masking_utils import create_causal_mask
    rng = random.Random(seed + 100)
    examples = []
    for n, prompt_len in ((8, 3), (12, 5), (9, 4)):
        ids = [2] + [rng.randrange(6, 400) for _ in range(n - 1)]
        examples.append({"ids": ids, "loss_mask": [False] * prompt_len + [True] * (n - prompt_len)})
    # The row sft trains on: each example shifted into (input, target) pairs,
    # the mask of a pair that of the token predicted, positions restarting.
    inp, tgt, msk, pos = [], [], [], []
    for e in examples:
        inp += e["ids"][:-1]
        tgt += e["ids"][1:]
        msk += e["loss_mask"][1:]
        pos += list(range(len(e["ids"]) - 1))
    ids, position_ids = torch.tensor([inp]), torch.tensor([pos])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0]
        embeds = model.get_input_embeddings()(ids)
        mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                  position_ids=position_ids, allow_is_causal_skip=False)
    mask = mask[0, 0]
    mask = (mask == 0) if mask.dtype != torch.bool else mask
    # transformers found the packing: no attention across examples.
    assert not bool(mask[len(examples[0]["ids"]) - 1, 0]), "transformers did not detect the packed row"
    lp = logits.log_softmax(-1)
    trained = [i for i, m in enumerate(msk) if m]
    loss = -sum(float(lp[i, tgt[i]]) for i in trained) / len(trained)
    write_json(os.path.join(out, "packed.json"),
               {**versions(), "examples": examples, "input_ids": inp, "target": tgt, "mask": msk,
                "position_ids": pos, "attention_mask": mask.int().tolist(),
                "logits": [[round(x, 6) for x in row] for row in logits.tolist()], "loss": loss})


def make_reward(seed=7):
    """A one-label GemmaForSequenceClassification, saved by transformers."""
    from transformers import GemmaForSequenceClassification
    out = REWARD_OUT
    os.makedirs(out, exist_ok=True)
    train_tokenizer().save(os.path.join(out, "tokenizer.json"))
    torch.manual_seed(seed)
    config = GemmaConfig(
        vocab_size=512, max_position_embeddings=256, hidden_act="gelu_pytorch_tanh", hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, attn_implementation="eager", num_labels=1,
    )
    model = GemmaForSequenceClassification(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(0.0, 0.15 if "norm" in pname else 0.3)
    model.save_pretrained(out)
    rng = random.Random(seed)
    seqs = [[2] + [rng.randrange(6, 400) for _ in range(n)] for n in (3, 8, 15, 1)]
    t = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (t - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
    with torch.no_grad():
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = [float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
    assert all(abs(a - b) < 1e-4 for a, b in zip(rewards.tolist(), alone)), (rewards, alone)
    write_json(os.path.join(out, "expected.json"), {**versions(), "seqs": seqs, "rewards": rewards.tolist()})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    wanted = set(sys.argv[1:]) or {"mqa", "gqa", "reward"}
    if "mqa" in wanted:
        make("mqa", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=32), seed=1)
    if "gqa" in wanted:
        make("gqa", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16), seed=2)
    if "reward" in wanted:
        make_reward()
