#!/usr/bin/env python3
"""The transformers side of `align bench generate`.

Takes one JSON argument (written by align) and times greedy `generate` with
the KV cache, one call per "run" command of align's interleaved protocol
(bench_protocol.py).

- `--family gemma` (no "checkpoint" key): a randomly initialised
  GemmaForCausalLM of the given config on random prompts.
- `--family gemma2|gemma3`: the checkpoint align wrote (its config.json and
  weights, so both sides run identical weights), loaded with transformers'
  default attention implementation, on align's prompts ("prompts_file").
  Each call also times its prefill (until the first token is chosen); the
  final answer carries those times, the generated ids (compared by align
  with its own) and the bytes of the cache after generation: the sum over
  the cache layers of their key and value tensors' bytes, and of the
  storage those tensors keep alive.
"""
import json
import sys
import time

from bench_protocol import serve

import torch
import transformers

args = json.loads(sys.argv[1])
torch.set_num_threads(int(args["threads"]))
torch.manual_seed(0)
dtype = torch.bfloat16 if args["dtype"] == "bf16" else torch.float32
device = args["device"]


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


if "checkpoint" not in args:
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = {k: v for k, v in args["config"].items() if k not in ("architectures",)}
    config = GemmaConfig(**cfg)
    model = GemmaForCausalLM(config).to(device=device, dtype=dtype).eval()
    b, p, n = args["batch"], args["prompt_len"], args["new_tokens"]
    ids = torch.randint(10, config.vocab_size, (b, p), device=device)
    mask = torch.ones_like(ids)

    def run():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0, eos_token_id=None)
        assert out.shape == (b, p + n), out.shape
        sync()
        return time.perf_counter() - t0

    serve(run, lambda: {"transformers": transformers.__version__, "torch": torch.__version__})
    sys.exit(0)

from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

model = AutoModelForCausalLM.from_pretrained(args["checkpoint"], dtype=dtype).to(device).eval()
# Greedy over exactly new_tokens, nothing changing the logits: no eos (whose
# min_new_tokens suppression would alter the argmax), no other processor.
model.generation_config.eos_token_id = None
with open(args["prompts_file"]) as f:
    prompts = json.load(f)
ids = torch.tensor(prompts, dtype=torch.long, device=device)
mask = torch.ones_like(ids)
b, p = ids.shape
n = int(args["new_tokens"])


class FirstToken(LogitsProcessor):
    """Notes when the first token's logits arrive: the end of the prefill.
    Returns the scores untouched."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            sync()
            self.at = time.perf_counter()
        return scores


prefill_seconds = []
last = {}


def run():
    first = FirstToken()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             pad_token_id=0, logits_processor=LogitsProcessorList([first]),
                             return_dict_in_generate=True)
    sync()
    t = time.perf_counter() - t0
    seq = out.sequences
    assert seq.shape == (b, p + n), seq.shape
    prefill_seconds.append(first.at - t0)
    last["ids"] = seq[:, p:].tolist()
    last["cache"] = out.cache
    return t


def cache_info(cache):
    nbytes = lambda t: t.numel() * t.element_size()
    total, storage, lens = 0, 0, []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        total += nbytes(k) + nbytes(v)
        storage += k.untyped_storage().nbytes() + v.untyped_storage().nbytes()
        lens.append(f"{type(layer).__name__} {k.shape[-2]}")
    return total, storage, ", ".join(lens)


def final():
    total, storage, layout = cache_info(last["cache"])
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "attn_implementation": model.config._attn_implementation,
        "prefill_seconds": prefill_seconds,
        "ids": last["ids"],
        "cache_bytes": total,
        "cache_storage_bytes": storage,
        "cache_layout": layout,
    }


serve(run, final)
