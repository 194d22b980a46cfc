#!/usr/bin/env python3
"""The reference side of `align bench lora`: the same LoRA fine-tuning step
in transformers + PEFT, in a process of its own (so that its peak RSS is its
own).

GemmaForCausalLM of align's config (random init, SDPA attention), LoRA on
all linear layers (PEFT's "all-linear": q/k/v/o/gate/up/down, not the LM
head), activation checkpointing (non-reentrant), cross-entropy over every
token as transformers computes it (`labels=`), torch.optim.AdamW over the
adapters, global-norm clipping at 1.0. With base_dtype "bf16" the model is
built straight in bf16 and PEFT keeps the adapters in f32 (its
autocast_adapter_dtype default).

Takes one JSON argument written by align; runs `warmup` untimed and `steps`
timed steps; prints one JSON line: step_seconds, setup_seconds,
peak_rss_mib (VmHWM), versions.
"""
import json
import sys
import time

# stdout carries only the final JSON line.
_out = sys.stdout
sys.stdout = sys.stderr

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GemmaConfig, GemmaForCausalLM  # noqa: E402

args = json.loads(sys.argv[1])
t0 = time.perf_counter()
torch.set_num_threads(int(args["threads"]))
torch.manual_seed(0)
dev = args["device"]
bf16 = args["base_dtype"] == "bf16"
cfg = {k: v for k, v in args["config"].items() if k != "architectures"}
cfg["attn_implementation"] = "sdpa"
# Built straight in the base dtype: no f32 copy of a bf16 base.
torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
with torch.device(dev):
    model = GemmaForCausalLM(GemmaConfig(**cfg))
torch.set_default_dtype(torch.float32)
if args["checkpointing"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
lcfg = peft.LoraConfig(
    r=int(args["rank"]), lora_alpha=int(args["alpha"]), lora_dropout=0.0, target_modules="all-linear",
    task_type="CAUSAL_LM",
)
model = peft.get_peft_model(model, lcfg)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
b, t = int(args["batch"]), int(args["seq"])
ids = torch.randint(10, cfg["vocab_size"], (b, t), device=dev)
setup = time.perf_counter() - t0


def step():
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    v = loss.item()
    return time.perf_counter() - t1, v


def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


times = []
for i in range(int(args["warmup"]) + int(args["steps"])):
    s, v = step()
    print(f"peft {args['base_dtype']} base: step {i + 1} {s:.1f} s, loss {v:.4f}", file=sys.stderr, flush=True)
    if i >= int(args["warmup"]):
        times.append(s)

print(json.dumps({
    "step_seconds": times,
    "setup_seconds": setup,
    "peak_rss_mib": peak_rss_mib(),
    "versions": f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
}), file=_out, flush=True)
