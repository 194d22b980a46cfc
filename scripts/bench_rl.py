#!/usr/bin/env python3
"""The TRL side of `align bench rl`: RL steps of TRL's own `RLOOTrainer`
(trl >= 1.0, run as is, not a re-implementation) on the CPU or a GPU, on the
same problem as align's step:

- policy: a randomly initialised `GemmaForCausalLM` with align's config
  (passed in as JSON), saved to a temporary directory so that TRL builds
  the frozen reference model from it, as it does for a hub model;
- reward: a randomly initialised `GemmaForSequenceClassification` of the
  same config (one label), passed to TRL as a model reward function;
- tokenizer: the word-level tokenizer align writes (ids 0..5 Gemma's
  special tokens, then one word per id), so text round-trips to the same
  ids and TRL's decode/re-encode for the reward model sees the same lengths;
- B prompts of `prompt_len` random words per step, `num_generations = k`
  samples each, `max_completion_length = new_tokens`, temperature 1, no
  top-k/top-p, beta (KL in the reward, k1 estimator), one update per batch
  (`num_iterations = 1`), AdamW, gradient clipping 1.0, fp32.

Time split, per step (one warm-up step, then one step each time align asks,
on the interleaved protocol of bench_protocol.py):
`generate` = `RLOOTrainer._generate` (tokenize, `model.generate` with the KV
cache, decode); `score` = the no-grad log-prob passes (the policy's old
log-probs and the reference's) plus `_calculate_rewards` (the reward
model); `update` = the rest of the step (the training forward and
backward, the optimiser step, the trainer's bookkeeping). `total` is the
wall time of the step from `on_step_begin` to `on_step_end`.

Takes one JSON argument written by align; answers each "run" with the
step's split and "done" with the versions.
"""
import json
import random
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")

import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    GemmaConfig,
    GemmaForCausalLM,
    GemmaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl import RLOOConfig, RLOOTrainer  # noqa: E402

import bench_protocol  # noqa: E402

transformers.logging.set_verbosity_error()

args = json.loads(sys.argv[1])
torch.set_num_threads(int(args["threads"]))
torch.manual_seed(0)
random.seed(0)
device = args.get("device", "cpu")
b, k = int(args["batch"]), int(args["k"])
prompt_len, new_tokens, steps = int(args["prompt_len"]), int(args["new_tokens"]), int(args["steps"])

tok = PreTrainedTokenizerFast(
    tokenizer_file=args["tokenizer"],
    pad_token="<pad>",
    eos_token="<eos>",
    bos_token="<bos>",
    unk_token="<unk>",
)
cfg = {key: v for key, v in args["config"].items() if key not in ("architectures", "num_labels")}
gcfg = GemmaConfig(**cfg)
policy = GemmaForCausalLM(gcfg)
reward = GemmaForSequenceClassification(GemmaConfig(**cfg, num_labels=1)).eval()
reward.config.pad_token_id = tok.pad_token_id

vocab = gcfg.vocab_size
n_prompts = b * (steps + 1)
prompts = [" ".join(f"w{random.randrange(6, vocab)}" for _ in range(prompt_len)) for _ in range(n_prompts)]
data = Dataset.from_dict({"prompt": prompts})

timings = {"generate": 0.0, "score": 0.0, "tokens": 0}


class StepTimer(TrainerCallback):
    """Step 1 is the warm-up; each later step waits for align's "run"."""

    def on_step_begin(self, a, state, control, **kw):
        if state.global_step > 0 and bench_protocol.next_command() != "run":
            raise SystemExit("align ended the benchmark before the last step")
        timings.update(generate=0.0, score=0.0, tokens=0)
        if device == "cuda":
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_step_end(self, a, state, control, **kw):
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - self.t0
        if state.global_step == 1:
            bench_protocol.ready()
            return
        gen, score = timings["generate"], timings["score"]
        bench_protocol.reply({
            "seconds": total,
            "generate": gen,
            "score": score,
            "update": total - gen - score,
            "total": total,
            "rollout_tokens": timings["tokens"],
            "rollout_tokens_per_s": timings["tokens"] / gen if gen > 0 else 0.0,
        })


with tempfile.TemporaryDirectory() as tmp:
    policy.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    conf = RLOOConfig(
        output_dir=f"{tmp}/out",
        per_device_train_batch_size=b * k,
        gradient_accumulation_steps=1,
        num_generations=k,
        max_completion_length=new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=float(args["beta"]),
        num_iterations=1,
        learning_rate=1e-6,
        max_grad_norm=1.0,
        max_steps=steps + 1,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=False,
        seed=0,
        shuffle_dataset=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = RLOOTrainer(
        model=tmp,
        reward_funcs=reward,
        args=conf,
        train_dataset=data,
        processing_class=tok,
        reward_processing_classes=tok,
        callbacks=[StepTimer()],
    )

    def timed(name, fn, counter=None):
        def wrapper(*a, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            bucket = name(a, kw) if callable(name) else name
            if bucket is not None:
                timings[bucket] += time.perf_counter() - t0
            if counter is not None:
                timings["tokens"] += counter(out)
            return out

        return wrapper

    trainer._generate = timed("generate", trainer._generate, counter=lambda out: sum(len(c) for c in out[1]))
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    # The no-grad passes (old policy, reference) are scoring; the one with
    # gradients is the update's forward.
    trainer._get_per_token_logps_and_entropies = timed(
        lambda a, kw: None if torch.is_grad_enabled() else "score", trainer._get_per_token_logps_and_entropies
    )
    trainer.train()

bench_protocol.next_command()  # "done"
bench_protocol.reply({"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__})
