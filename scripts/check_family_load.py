#!/usr/bin/env python3
"""By-hand check that transformers loads a checkpoint align wrote with the same logits.

Usage: check_family_load.py CHECKPOINT_DIR EXPECTED_JSON [--tol 1e-4]

CHECKPOINT_DIR is a model directory (config.json + model.safetensors), for
example one align wrote after loading a fixture of lm/tests/fixtures and saving
it again. EXPECTED_JSON has the layout scripts/make_family_fixtures.py writes
(lm/tests/fixtures/FAMILY.md): the fixture's own expected.json, or one align
wrote in that layout for the checkpoint's weights.

The class comes from config.json's ``architectures`` (Gemma2ForCausalLM,
Gemma3ForCausalLM, Gemma4ForCausalLM, Gemma3ForConditionalGeneration,
Gemma4ForConditionalGeneration, Gemma2ForSequenceClassification,
Gemma3TextForSequenceClassification, ...), loaded in f32 with eager attention.
Prints the max abs difference of every quantity expected.json holds
(last-position logits, logits at every position, left/right-padded batches,
rewards), whether greedy ids agree, and for the multimodal wrappers whether
every non-text tensor is bit for bit the fixture's (sha256). Exit status 1 when
a difference exceeds --tol or ids / tensors differ. Not used by the tests.
"""
import argparse
import hashlib
import json
import os
import sys

import torch
import transformers


def load(path):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        sys.exit(f"{path}: config.json architectures {config.get('architectures')!r} is not a transformers class")
    model = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return arch, model


def maxdiff(a, b):
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("expected")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    with open(args.expected) as f:
        exp = json.load(f)
    arch, model = load(args.checkpoint)
    print(f"{args.checkpoint}: {arch}, transformers {transformers.__version__}")
    failures = []

    def report(what, d):
        ok = d <= args.tol
        print(f"  {what}: max abs diff {d:.3e}{'' if ok else '  > tol'}")
        if not ok:
            failures.append(what)

    def same_ids(what, got, want):
        ok = got == want
        print(f"  {what}: {'equal' if ok else 'DIFFERENT'}")
        if not ok:
            print(f"    transformers {got}\n    expected     {want}")
            failures.append(what)

    with torch.no_grad():
        if "rewards" in exp:
            ids = torch.tensor(exp["input_ids"])
            mask = torch.tensor(exp["attention_mask"])
            got = model(input_ids=ids, attention_mask=mask).logits[:, 0]
            report("rewards (right-padded batch)", maxdiff(got, exp["rewards"]))
        if "last_logits" in exp:
            d = max(maxdiff(model(input_ids=torch.tensor([p])).logits[0, -1], want)
                    for p, want in zip(exp["prompts"], exp["last_logits"]))
            report(f"last-position logits ({len(exp['prompts'])} prompts)", d)
        if "full_logits" in exp:
            p = exp["full_logits"]["prompt"]
            report("logits at every position", maxdiff(model(input_ids=torch.tensor([p])).logits[0],
                                                       exp["full_logits"]["logits"]))
        if "padded" in exp:
            left = exp["padded"]["left"]
            got = model(input_ids=torch.tensor(left["input_ids"]), attention_mask=torch.tensor(left["attention_mask"]),
                        position_ids=torch.tensor(left["position_ids"])).logits[:, -1]
            report("left-padded batch, last logits", maxdiff(got, left["last_logits"]))
            right = exp["padded"]["right"]
            logits = model(input_ids=torch.tensor(right["input_ids"]),
                           attention_mask=torch.tensor(right["attention_mask"])).logits
            got = torch.stack([logits[i, len(p) - 1] for i, p in enumerate(exp["prompts"])])
            report("right-padded batch, last real logits", maxdiff(got, right["last_logits"]))
        if "greedy" in exp:
            eos = exp.get("eos_token_ids", [1, 5])
            n = exp.get("max_new_tokens", max(len(g) for g in exp["greedy"]))
            got = []
            for p in exp["prompts"]:
                g = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
                got.append(g[0, len(p):].tolist())
            same_ids("greedy ids", got, exp["greedy"])
    if "non_text_tensors" in exp:
        from safetensors import safe_open
        files = [f for f in os.listdir(args.checkpoint) if f.endswith(".safetensors")]
        have = {}
        for fn in files:
            with safe_open(os.path.join(args.checkpoint, fn), "pt") as f:
                for k in f.keys():
                    have[k] = f.get_tensor(k)
        # Gemma 3's wrapper loads from either layout (llava's language_model.model.* / vision_tower.* /
        # multi_modal_projector.*, or model.language_model.* / model.vision_tower.* / ...; the vision
        # tower with or without the Hub's vision_model. prefix): compare by the loaded name.
        def canonical(k):
            k = k.replace("vision_tower.vision_model.", "vision_tower.")  # the Hub's Siglip prefix
            for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                             ("multi_modal_projector.", "model.multi_modal_projector.")):
                if k.startswith(old):
                    return new + k[len(old):]
            return k
        have = {canonical(k): v for k, v in have.items()}
        bad = []
        for k, want in exp["non_text_tensors"].items():
            t = have.get(canonical(k))
            if t is None:
                bad.append(f"{k} missing")
            elif hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() != want["sha256"]:
                bad.append(f"{k} differs")
        print(f"  non-text tensors bit for bit: {len(exp['non_text_tensors']) - len(bad)}/{len(exp['non_text_tensors'])}")
        for b in bad:
            print(f"    {b}")
        if bad:
            failures.append("non-text tensors")
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
