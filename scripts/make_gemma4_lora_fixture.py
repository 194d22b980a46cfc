#!/usr/bin/env python3
"""Writes a LoRA adapter made by peft on the gemma4 fixture with
``target_modules="all-linear"``, for align's Gemma 4 LoRA parity test
(lm/tests/gemma4_lora.rs).

On Gemma4ForCausalLM peft's "all-linear" adapts every ``nn.Linear`` but the
output head: the seven projections (q/k/v/o_proj, gate/up/down_proj; no
k/v_proj on the KV-sharing layers, no v_proj with attention_k_eq_v) **and**
Gemma 4's per-layer-input projections, ``model.layers.N.per_layer_input_gate``,
``model.layers.N.per_layer_projection`` and ``model.per_layer_model_projection``
(50 modules on the fixture). The script asserts exactly that set.

Reads the committed fixture lm/tests/fixtures/gemma4 (written by
scripts/make_family_fixtures.py; not changed here) and writes
lm/tests/fixtures/gemma4-lora:

- ``adapter_config.json``, ``adapter_model.safetensors``: ``save_pretrained``
  of a CAUSAL_LM LoRA (r 4, lora_alpha 6, dropout 0), its A matrices peft's
  own (seeded) kaiming-uniform draw and its B matrices (zero in peft)
  set to N(0, 0.3) so that every adapter changes the logits;
- ``expected.json``: the logits of base + adapter (eval mode, f32, eager
  attention) at every position of two prompts (rounded to 6 decimals),
  with the figures the script checked (the adapter's effect on the logits,
  that of its per-layer-input part alone, the f32 rounding noise against
  the same model in f64).

Deterministic: rerunning rewrites the same files. Usage:
make_gemma4_lora_fixture.py
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import Gemma4ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "lm", "tests", "fixtures", "gemma4")
OUT = os.path.join(ROOT, "lm", "tests", "fixtures", "gemma4-lora")
BASE_NAME = "lm/tests/fixtures/gemma4"
# Two prompts longer than the sliding window (4).
IDS = [[2, 17, 250, 31, 99, 7, 480, 12, 64, 301], [2, 5, 300, 301, 302, 44, 45, 9, 120, 77]]
PER_LAYER = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")


def versions():
    import peft
    import transformers
    return {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def load_base():
    base = Gemma4ForCausalLM.from_pretrained(BASE, attn_implementation="eager", dtype=torch.float32)
    base.name_or_path = base.config._name_or_path = BASE_NAME
    return base.eval()


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(53)  # peft's draw of the A matrices
    base = load_base()
    cfg = LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0, bias="none", task_type=TaskType.CAUSAL_LM,
                     target_modules="all-linear")
    model = get_peft_model(base, cfg)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if hasattr(m, "lora_A"))
    # What "all-linear" picks on Gemma 4: the seven projections where the
    # layer has them, the per-layer-input projections, not lm_head.
    want = []
    for i, layer in enumerate(base.model.layers):
        attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
        want += [f"model.layers.{i}.self_attn.{p}" for p in attn if getattr(layer.self_attn, p, None) is not None]
        want += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        want += [f"model.layers.{i}.{p}" for p in PER_LAYER[:2]]
    want.append("model.per_layer_model_projection")
    assert adapted == sorted(want), (adapted, sorted(want))
    assert len(adapted) == 50, len(adapted)
    g = torch.Generator().manual_seed(54)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(OUT)
    os.remove(os.path.join(OUT, "README.md"))  # peft's empty model card
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        again = PeftModel.from_pretrained(load_base(), OUT).eval()
        assert torch.allclose(again(input_ids=ids).logits, logits)
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        effect = (base_logits - logits).abs().max().item()
        assert effect > 1e-1, f"the adapter changes the logits by {effect} only"
        # The per-layer-input adapters alone matter: without them the logits move.
        saved = {}
        for name, p in model.named_parameters():
            if "lora_B" in name and any(f".{m}." in name for m in PER_LAYER):
                saved[name] = p.clone()
                p.zero_()
        without = model(input_ids=ids).logits
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])
        per_layer_effect = (without - logits).abs().max().item()
        assert per_layer_effect > 1e-2, f"the per-layer adapters change the logits by {per_layer_effect} only"
        assert torch.equal(model(input_ids=ids).logits, logits)
        # f32 rounding noise: the same adapted model in f64.
        noise = (model.double()(input_ids=ids).logits - logits.double()).abs().max().item()
        assert noise < 5e-5, f"f32 noise {noise}"
    # peft writes target_modules from a set (its order follows the string
    # hash seed): sorted here so that reruns write the same file.
    path = os.path.join(OUT, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    targets = config["target_modules"] = sorted(config["target_modules"])
    with open(path, "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    expected = {
        **versions(),
        "base": BASE_NAME,
        "adapted_modules": adapted,
        "target_modules": targets,
        "input_ids": IDS,
        "logits": [[[round(x, 6) for x in row] for row in seq] for seq in logits.tolist()],
        "max_abs_adapter_effect": effect,
        "max_abs_per_layer_adapter_effect": per_layer_effect,
        "f32_noise": noise,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(f"wrote {OUT}: {len(adapted)} adapted modules, target_modules {targets}; the adapter moves the "
          f"logits by up to {effect:.3f}, its per-layer-input part by {per_layer_effect:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
