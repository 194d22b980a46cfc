#!/usr/bin/env python3
"""Loads a checkpoint directory written by align with transformers, unchanged.

Usage: check_hf_load.py DIR PROMPT MAX_NEW
Prints one JSON object like `align generate --json`: the chat-template prompt
ids (from tokenizer_config.json's template) and the greedy continuation, so
`make verify-hf` can compare the two programs token for token.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path, prompt, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
# The class config.json names (GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, ...).
assert type(model).__name__ == model.config.architectures[0], type(model).__name__
ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
if hasattr(ids, "keys"):
    ids = ids["input_ids"]
ids = list(ids)
stop = [tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<end_of_turn>")]
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=stop, pad_token_id=tok.pad_token_id)
new = out[0, len(ids):].tolist()
if new and new[-1] in stop:
    new = new[:-1]
print(json.dumps({"prompt_ids": ids, "token_ids": new}))
