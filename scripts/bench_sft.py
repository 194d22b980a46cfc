#!/usr/bin/env python3
"""The PyTorch side of `align bench sft`: the same training step in plain
PyTorch + transformers (GemmaForCausalLM, SDPA attention, cross-entropy over
every token, torch.optim.AdamW, global-norm clipping).

Takes one JSON argument written by align; times one training step per "run"
command of align's interleaved protocol (bench_protocol.py).
"""
import json
import resource
import sys
import time

import torch
import transformers
from bench_protocol import serve
from transformers import GemmaConfig, GemmaForCausalLM

args = json.loads(sys.argv[1])
torch.set_num_threads(int(args["threads"]))
torch.manual_seed(0)
cfg = {k: v for k, v in args["config"].items() if k != "architectures"}
model = GemmaForCausalLM(GemmaConfig(**cfg)).to(args["device"]).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
b, t = args["batch"], args["seq"]
ids = torch.randint(10, model.config.vocab_size, (b, t + 1), device=args["device"])
inp, tgt = ids[:, :-1], ids[:, 1:]


def step():
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=args["device"], dtype=torch.bfloat16, enabled=args.get("dtype") == "bf16"):
        logits = model(input_ids=inp).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    loss.item()
    return time.perf_counter() - t0


def peak_rss_mib():
    # VmHWM of this process alone (ru_maxrss would include the parent's
    # high-water mark, which survives exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


serve(step, lambda: {
    "peak_rss_mib": peak_rss_mib(),
    "transformers": transformers.__version__,
    "torch": torch.__version__,
})
