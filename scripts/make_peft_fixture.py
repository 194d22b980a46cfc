#!/usr/bin/env python3
"""Writes LoRA adapters made by peft itself, for align's LoRA parity tests.

Run once (``make fixtures``, which installs peft into the venv for fixtures
only); the output is committed and the Rust tests (lm/tests/lora.rs) read it
without Python. Both adapters sit over the tiny MQA causal LM that
scripts/make_fixtures.py writes to lm/tests/fixtures/mqa:

- ``lm/tests/fixtures/peft/causal``: a ``CAUSAL_LM`` LoRA adapter (r 4,
  alpha 8, dropout 0.05, target modules q_proj, v_proj, o_proj, up_proj and
  down_proj), its B matrices randomised so that the adapter changes the
  logits, saved with ``save_pretrained``; ``expected.json`` holds the logits
  of base + adapter (eval mode, f32, eager attention) at every position of
  fixed ids.
- ``lm/tests/fixtures/peft/seq_cls``: a ``SEQ_CLS`` LoRA adapter over the same
  causal LM loaded as ``GemmaForSequenceClassification`` (one label, a new
  ``score`` head saved with the adapter), on every linear layer
  (``"all-linear"``); ``expected.json`` holds the rewards of a right-padded
  batch.

Usage: make_peft_fixture.py
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import GemmaForCausalLM, GemmaForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "lm", "tests", "fixtures", "mqa")
OUT = os.path.join(ROOT, "lm", "tests", "fixtures", "peft")
# How the adapters name their base (relative to the repository root).
BASE_NAME = "lm/tests/fixtures/mqa"
IDS = [[2, 17, 250, 31, 99, 7, 480, 12], [2, 5, 300, 301, 302, 44, 45, 1]]


def versions():
    import peft
    import transformers
    return {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def randomise_b(model, seed):
    """B starts at zero (the adapter computes nothing): give it values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def make_causal():
    out = os.path.join(OUT, "causal")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(11)
    base = GemmaForCausalLM.from_pretrained(BASE, attn_implementation="eager", dtype=torch.float32)
    base.name_or_path = base.config._name_or_path = BASE_NAME
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, bias="none", task_type=TaskType.CAUSAL_LM,
                     target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, cfg)
    randomise_b(model, 12)
    model.eval()
    model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # peft's empty model card
    # The saved adapter loads back with the same logits.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(IDS)).logits
        again = GemmaForCausalLM.from_pretrained(BASE, attn_implementation="eager", dtype=torch.float32)
        again = PeftModel.from_pretrained(again, out).eval()
        assert torch.allclose(again(input_ids=torch.tensor(IDS)).logits, logits)
        with model.disable_adapter():
            base_logits = model(input_ids=torch.tensor(IDS)).logits
        assert (base_logits - logits).abs().max() > 1e-2, "the adapter changes nothing"
    write_json(os.path.join(out, "expected.json"),
               {**versions(), "input_ids": IDS, "logits": logits.tolist(), "base_logits": base_logits.tolist()})
    print(f"wrote {out}", file=sys.stderr)


def make_seq_cls():
    out = os.path.join(OUT, "seq_cls")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(13)
    base = GemmaForSequenceClassification.from_pretrained(BASE, attn_implementation="eager",
                                                          dtype=torch.float32, num_labels=1)
    base.name_or_path = base.config._name_or_path = BASE_NAME
    with torch.no_grad():
        base.score.weight.normal_(0.0, 0.3)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type=TaskType.SEQ_CLS,
                     target_modules="all-linear")
    model = get_peft_model(base, cfg)
    randomise_b(model, 14)
    model.eval()
    model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # peft's empty model card
    seqs = [s[:n] for s, n in zip(IDS, (5, 8))]
    t = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (t - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
    with torch.no_grad():
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        again = GemmaForSequenceClassification.from_pretrained(BASE, attn_implementation="eager",
                                                               dtype=torch.float32, num_labels=1)
        again = PeftModel.from_pretrained(again, out).eval()
        assert torch.allclose(again(input_ids=ids, attention_mask=mask).logits[:, 0], rewards)
    write_json(os.path.join(out, "expected.json"),
               {**versions(), "seqs": seqs, "rewards": rewards.tolist()})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    make_causal()
    make_seq_cls()
