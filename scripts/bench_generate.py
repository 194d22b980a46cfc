#!/usr/bin/env python3
"""The transformers side of `align bench generate`.

Takes one JSON argument (the model config and the workload, written by align)
and times batched greedy `generate` with the KV cache on a randomly
initialised GemmaForCausalLM of that config, one call per "run" command of
align's interleaved protocol (bench_protocol.py).
"""
import json
import sys
import time

from bench_protocol import serve

import torch
import transformers
from transformers import GemmaConfig, GemmaForCausalLM

args = json.loads(sys.argv[1])
torch.set_num_threads(int(args["threads"]))
torch.manual_seed(0)
cfg = {k: v for k, v in args["config"].items() if k not in ("architectures",)}
config = GemmaConfig(**cfg)
dtype = torch.bfloat16 if args["dtype"] == "bf16" else torch.float32
model = GemmaForCausalLM(config).to(device=args["device"], dtype=dtype).eval()
b, p, n = args["batch"], args["prompt_len"], args["new_tokens"]
ids = torch.randint(10, config.vocab_size, (b, p), device=args["device"])
mask = torch.ones_like(ids)


def run():
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    assert out.shape == (b, p + n), out.shape
    if args["device"] == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


serve(run, lambda: {"transformers": transformers.__version__, "torch": torch.__version__})
