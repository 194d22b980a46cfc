#!/usr/bin/env python3
"""Writes the Gemma-family parity fixtures (Gemma 2, 3, 4) under lm/tests/fixtures with transformers.

Run once (``make fixtures``) from the project venv; the output is committed and
the Rust tests read it without Python. lm/tests/fixtures/FAMILY.md describes
every fixture's config and every key of its expected.json.

For each family a tiny random checkpoint (f32, eager attention, every weight
random, norms away from their init values), saved by transformers itself
(``save_pretrained``, safetensors), with the tokenizer of lm/tests/fixtures/mqa
(copied), the family's own chat template, and ``expected.json``:

- ``last_logits``: last-position logits of several prompts (some longer than
  the sliding window),
- ``full_logits``: the logits at every position of one long prompt,
- ``greedy``: ``generate(do_sample=False)`` one prompt at a time with the default
  (sliding-window) cache, well past the window,
- ``padded``: the prompts as one left-padded batch (logits at each row's last
  real token, batched greedy continuations) and one right-padded batch,
- ``packed``: a packed training row (positions restarting per example),
- ``chats``: ``apply_chat_template`` renderings (text and ids).

Fixtures: gemma2, gemma3, gemma4 (text, *ForCausalLM), gemma3-mm and gemma4-mm
(*ForConditionalGeneration with a tiny vision tower; their language model has
the same weights as gemma3 / gemma4, so text logits are the same), and
gemma2-reward, gemma3-reward (*ForSequenceClassification, one label).
transformers 5.24 has no Gemma 4 sequence-classification class, so there is no
gemma4-reward.

Usage: make_family_fixtures.py [NAME ...] with names among gemma2, gemma3,
gemma4, gemma3-mm, gemma4-mm, gemma2-reward, gemma3-reward (all by default).
"""
import hashlib
import json
import os
import random
import shutil
import sys

import torch
import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "lm", "tests", "fixtures")
TOKENIZER_SRC = os.path.join(OUT, "mqa")

VOCAB = 512          # the mqa tokenizer has 400 tokens (ids 0..399); the model vocab is larger, like mqa's
TOKENS = (6, 400)    # prompt tokens are drawn from [6, 400): ordinary BPE tokens, no specials
PAD, EOS, BOS = 0, 1, 2
EOS_IDS = [1, 5]     # <eos> and <end_of_turn>, as the mqa fixture's generation_config
MAX_NEW = 16         # greedy tokens: with window 4 and prompts of 1..30 tokens, well past the window
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS,
              bos_token_id=BOS, rms_norm_eps=1e-6, tie_word_embeddings=True)

# --- chat templates -------------------------------------------------------------------------
# Gemma 2's published template (google/gemma-2-*-it, the same as Gemma 1's): a system message raises.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Gemma 3's published template (google/gemma-3-*-it): the system message is folded into the first
# user turn; content may be a string or a list of {type: text|image} items.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

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
    ([{"role": "system", "content": "Answer in one word."},
      {"role": "user", "content": "Capital of France?"},
      {"role": "assistant", "content": "Paris"}], False),
]


# --- helpers ----------------------------------------------------------------------------------
def versions():
    return {"transformers": transformers.__version__, "torch": torch.__version__}


def write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def fresh_dir(name):
    out = os.path.join(OUT, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    return out


def write_tokenizer(out, template):
    """The mqa fixture's tokenizer.json and tokenizer_config.json, copied, and the family's template."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_SRC, f), os.path.join(out, f))
    if template is not None:
        with open(os.path.join(out, "chat_template.jinja"), "w") as f:
            f.write(template)
    return AutoTokenizer.from_pretrained(out)


def randomize(model, seed, unit_norms=False, post=3.0, qk=0.0):
    """Every parameter random. Norm weights around their identity value (0 for the (1 + w) norms of
    Gemma 2/3, 1 for Gemma 4's plain-w norms, ``unit_norms``), except the post-norms of the residual
    branches (post_attention_layernorm, post_feedforward_layernorm, post_per_layer_input_norm), which
    scale their branch by about 4: otherwise the (tied, sqrt(hidden)-scaled) token embedding dominates
    the residual stream and greedy decoding repeats the last token, which would hide cache bugs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                identity = 1.0 if unit_norms else 0.0
                if ".post_" in pname:
                    identity += post
                elif ".q_norm" in pname or ".k_norm" in pname:
                    identity += qk
                p.normal_(identity, 0.15)
            else:
                p.normal_(0.0, 0.3)


def set_generation(model):
    model.generation_config.eos_token_id = EOS_IDS
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS


def prompts_for(seed, lengths=(1, 5, 12, 30)):
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(*TOKENS) for _ in range(n)] for n in lengths]


def greedy_one(model, p, max_new=MAX_NEW):
    g = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                       do_sample=False, max_new_tokens=max_new, eos_token_id=EOS_IDS, pad_token_id=PAD,
                       output_logits=True, return_dict_in_generate=True)
    margins = []
    for step_logits in g.logits:
        top = step_logits[0].float().topk(2).values
        margins.append(float(top[0] - top[1]))
    return g.sequences[0, len(p):].tolist(), margins


def padded(model, prompts, max_new=MAX_NEW):
    t = max(len(p) for p in prompts)
    left = torch.tensor([[PAD] * (t - len(p)) + p for p in prompts])
    left_mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    left_pos = (left_mask.cumsum(-1) - 1).clamp(min=0)
    right = torch.tensor([p + [PAD] * (t - len(p)) for p in prompts])
    right_mask = torch.tensor([[1] * len(p) + [0] * (t - len(p)) for p in prompts])
    ll = model(input_ids=left, attention_mask=left_mask, position_ids=left_pos).logits[:, -1]
    rl = model(input_ids=right, attention_mask=right_mask).logits
    rl = torch.stack([rl[i, len(p) - 1] for i, p in enumerate(prompts)])
    g = model.generate(left, attention_mask=left_mask, do_sample=False, max_new_tokens=max_new,
                       eos_token_id=EOS_IDS, pad_token_id=PAD)
    return {"pad": PAD,
            "left": {"input_ids": left.tolist(), "attention_mask": left_mask.tolist(),
                     "position_ids": left_pos.tolist(), "last_logits": ll.tolist()},
            "right": {"input_ids": right.tolist(), "attention_mask": right_mask.tolist(),
                      "last_logits": rl.tolist()},
            "greedy": g[:, t:].tolist()}


def packed(model, seed):
    rng = random.Random(seed + 100)
    examples = []
    for n, prompt_len in ((8, 3), (12, 5), (9, 4)):
        ids = [BOS] + [rng.randrange(*TOKENS) for _ in range(n - 1)]
        examples.append({"ids": ids, "loss_mask": [False] * prompt_len + [True] * (n - prompt_len)})
    inp, tgt, msk, pos = [], [], [], []
    for e in examples:
        inp += e["ids"][:-1]
        tgt += e["ids"][1:]
        msk += e["loss_mask"][1:]
        pos += list(range(len(e["ids"]) - 1))
    logits = model(input_ids=torch.tensor([inp]), position_ids=torch.tensor([pos]), use_cache=False).logits[0]
    # The same examples one at a time: transformers must have found the packing from the positions.
    off = 0
    for e in examples:
        n = len(e["ids"]) - 1
        alone = model(input_ids=torch.tensor([e["ids"][:-1]]), use_cache=False).logits[0]
        d = (alone - logits[off:off + n]).abs().max().item()
        assert d < 1e-4, f"packed row differs from the examples alone by {d}"
        off += n
    lp = logits.log_softmax(-1)
    trained = [i for i, m in enumerate(msk) if m]
    loss = -sum(float(lp[i, tgt[i]]) for i in trained) / len(trained)
    return {"examples": examples, "input_ids": inp, "target": tgt, "mask": msk, "position_ids": pos,
            "logits": [[round(x, 6) for x in row] for row in logits.tolist()], "loss": loss}


def resolved(model):
    """What transformers built from config.json, per layer (read off the modules), and the rotary
    inverse frequencies per layer type: for a config reader's test."""
    text = model.model
    layers = []
    for i, layer in enumerate(text.layers):
        attn = layer.self_attn
        kv_heads = model.config.num_attention_heads // attn.num_key_value_groups
        layers.append({
            "layer_type": model.config.layer_types[i],
            "head_dim": attn.head_dim,
            "num_key_value_heads": kv_heads,
            "scaling": attn.scaling,
            "sliding_window": attn.sliding_window,
            "intermediate_size": layer.mlp.gate_proj.out_features,
            "kv_shared": bool(getattr(attn, "is_kv_shared_layer", False)),
            "stores_kv": bool(getattr(attn, "store_full_length_kv", False)),
            "k_eq_v": bool(getattr(attn, "use_alternative_attention", False)),
        })
    rotary = text.rotary_emb
    if hasattr(rotary, "layer_types"):
        inv_freq = {t: getattr(rotary, f"{t}_inv_freq").tolist() for t in rotary.layer_types}
    else:
        inv_freq = {"all": rotary.inv_freq.tolist()}
    out = {"layers": layers, "inv_freq": inv_freq,
           "embed_scale": float(text.embed_tokens.embed_scale)}
    if hasattr(text, "embed_tokens_per_layer"):
        out["per_layer_embed_scale"] = float(text.embed_tokens_per_layer.embed_scale)
    if hasattr(model.config, "kv_sharing_modes"):
        out["kv_sharing_modes"] = model.config.kv_sharing_modes
    return out


def reference_logits(out, ids):
    """Logits of one prompt (no padding, positions 0..) computed from ``out``'s config.json and
    model.safetensors by a from-scratch f64 implementation of FAMILY.md's description (no
    transformers module): an executable spec of Gemma 2, 3 and 4 (text) for the re-implementer."""
    import math
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(out, "config.json")))
    w = {k: v.double() for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    fam = cfg["model_type"]                      # gemma2 | gemma3_text | gemma4_text
    g4 = fam == "gemma4_text"
    n_layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    eps, types, window = cfg["rms_norm_eps"], cfg["layer_types"], cfg["sliding_window"]
    plc = {int(k): v for k, v in (cfg.get("per_layer_config") or {}).items()}

    def head_dim(i):
        return plc.get(i, {}).get("head_dim", cfg["head_dim"])

    def kv_heads(i):
        return plc.get(i, {}).get("num_key_value_heads", cfg["num_key_value_heads"])

    def norm(x, weight=None):
        y = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
        if weight is None:
            return y
        return y * weight if g4 else y * (1.0 + weight)   # Gemma 4: w; Gemma 2/3: 1 + w

    def gelu(x):
        return torch.nn.functional.gelu(x, approximate="tanh")

    def inv_freq(layer_type, d):
        rp = cfg["rope_parameters"] if fam == "gemma2" else cfg["rope_parameters"][layer_type]
        theta, kind = rp["rope_theta"], rp["rope_type"]
        if kind == "proportional":
            angles = int(rp.get("partial_rotary_factor", 1.0) * d // 2)
            f = 1.0 / theta ** (torch.arange(0, 2 * angles, 2).double() / d)
            f = torch.cat([f, torch.zeros(d // 2 - angles, dtype=torch.float64)])
        else:
            f = 1.0 / theta ** (torch.arange(0, d, 2).double() / d)
        return f / rp.get("factor", 1.0) if kind in ("linear", "proportional") else f

    def rope(x, pos, layer_type, d):              # x [T, heads, d]; rotate_half pairs (i, i + d/2)
        f = pos[:, None].double() * inv_freq(layer_type, d)[None]
        emb = torch.cat([f, f], -1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    t = len(ids)
    ids, pos = torch.tensor(ids), torch.arange(t)
    qi, ki = pos[:, None], pos[None]
    masks = {"full_attention": ki <= qi, "sliding_attention": (ki <= qi) & (ki > qi - window)}
    h = w["model.embed_tokens.weight"][ids] * math.sqrt(hidden)
    if g4 and cfg.get("hidden_size_per_layer_input"):
        ple = cfg["hidden_size_per_layer_input"]
        tok = (w["model.embed_tokens_per_layer.weight"][ids] * math.sqrt(ple)).view(t, n_layers, ple)
        ctx = (h @ w["model.per_layer_model_projection.weight"].T * hidden ** -0.5).view(t, n_layers, ple)
        per_layer = (norm(ctx, w["model.per_layer_projection_norm.weight"]) + tok) * 2 ** -0.5
    first_shared = n_layers - cfg.get("num_kv_shared_layers", 0)
    kv = {}
    for i in range(n_layers):
        p, lt, d, nk = f"model.layers.{i}.", types[i], head_dim(i), kv_heads(i)
        x = norm(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, d)
        if fam != "gemma2":
            q = norm(q, w[p + "self_attn.q_norm.weight"])
        q = rope(q, pos, lt, d)
        if i >= first_shared:                       # reuse the last non-shared layer of this type
            k, v = kv[max(j for j in range(first_shared) if types[j] == lt)]
        else:
            kr = (x @ w[p + "self_attn.k_proj.weight"].T).view(t, nk, d)
            vname = p + "self_attn.v_proj.weight"
            vr = (x @ w[vname].T).view(t, nk, d) if vname in w else kr     # attention_k_eq_v
            if fam != "gemma2":
                kr = norm(kr, w[p + "self_attn.k_norm.weight"])
            k, v = rope(kr, pos, lt, d), (norm(vr) if g4 else vr)          # Gemma 4 v_norm
            kv[i] = (k, v)
        k, v = k.repeat_interleave(heads // nk, 1), v.repeat_interleave(heads // nk, 1)
        scale = 1.0 if g4 else cfg["query_pre_attn_scalar"] ** -0.5
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if fam == "gemma2" and cfg.get("attn_logit_softcapping"):
            c = cfg["attn_logit_softcapping"]
            scores = torch.tanh(scores / c) * c
        probs = scores.masked_fill(~masks[lt], float("-inf")).softmax(-1)
        a = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, heads * d) @ w[p + "self_attn.o_proj.weight"].T
        h = h + norm(a, w[p + "post_attention_layernorm.weight"])
        x = norm(h, w[p + "pre_feedforward_layernorm.weight"])
        m = (gelu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        h = h + norm(m, w[p + "post_feedforward_layernorm.weight"])
        if g4 and cfg.get("hidden_size_per_layer_input"):
            y = gelu(h @ w[p + "per_layer_input_gate.weight"].T) * per_layer[:, i]
            h = h + norm(y @ w[p + "per_layer_projection.weight"].T, w[p + "post_per_layer_input_norm.weight"])
        if g4:
            h = h * w[p + "layer_scalar"]
    logits = norm(h, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T
    if cfg.get("final_logit_softcapping"):
        c = cfg["final_logit_softcapping"]
        logits = torch.tanh(logits / c) * c
    return logits


def packed_grads(model, pk, small=512):
    """Gradients of the packed row's loss (mean NLL over the masked targets) with respect to every
    parameter: their L2 norms, and the full gradient (7 significant digits) of every parameter of
    at most ``small`` elements (norm weights, Gemma 4's per-layer gates and projections). The tied embedding's gradient includes lm_head's."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=torch.tensor([pk["input_ids"]]), position_ids=torch.tensor([pk["position_ids"]]),
                   use_cache=False).logits[0]
    lp = logits.log_softmax(-1)
    trained = [i for i, m in enumerate(pk["mask"]) if m]
    loss = -lp[trained, [pk["target"][i] for i in trained]].mean()
    loss.backward()
    assert abs(loss.item() - pk["loss"]) < 1e-5, (loss.item(), pk["loss"])
    norms, grads = {}, {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        norms[name] = g.norm().item()
        if p.numel() <= small:
            grads[name] = [float(f"{x:.7g}") for x in g.reshape(-1).tolist()]
    model.zero_grad(set_to_none=True)
    return {"grad_norms": norms, "grads": grads}


def chats(tok, template):
    out = []
    for msgs, gen in CONVERSATIONS:
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # a template that raises (Gemma 2 on a system message)
            out.append({"messages": msgs, "add_generation_prompt": gen, "error": str(e)})
            continue
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append({"messages": msgs, "add_generation_prompt": gen, "text": text, "ids": list(ids)})
    return out


def causal_expected(model, seed, tok, template):
    prompts = prompts_for(seed)
    with torch.no_grad():
        last = [model(torch.tensor([p])).logits[0, -1].tolist() for p in prompts]
        full = {"prompt": prompts[3], "logits": model(torch.tensor([prompts[3]])).logits[0].tolist()}
        greedy, margins = [], []
        for p in prompts:
            g, m = greedy_one(model, p)
            greedy.append(g)
            margins.append(m)
        # The cache must not change anything: greedy ids from full recomputation are the same.
        for p, g in zip(prompts, greedy):
            ids = list(p)
            for _ in range(len(g)):
                ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            assert ids[len(p):] == g, ("cache vs recompute", ids[len(p):], g)
        pad = padded(model, prompts)
        pk = packed(model, seed)
    pk.update(packed_grads(model, pk))
    return {**versions(), "prompts": prompts, "last_logits": last, "full_logits": full, "greedy": greedy,
            "greedy_margins": margins, "eos_token_ids": EOS_IDS, "max_new_tokens": MAX_NEW,
            "padded": pad, "packed": pk, "chats": chats(tok, template), "resolved": resolved(model)}


def save(model, out):
    model.save_pretrained(out, safe_serialization=True)
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n} parameters, model.safetensors {size} bytes", file=sys.stderr)
    assert size < 1_000_000, size


def tensor_digests(out):
    """sha256 of every tensor's raw bytes in model.safetensors, by name."""
    from safetensors import safe_open
    res = {}
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k).contiguous()
            res[k] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                      "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest()}
    return res


def reload_check(out, model, cls, prompts):
    """transformers loads what it wrote with the same logits (catches non-persistent state)."""
    m2 = cls.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in prompts:
            a = model(torch.tensor([p])).logits
            b = m2(torch.tensor([p])).logits
            assert torch.equal(a, b), f"{out}: reload changes logits by {(a - b).abs().max()}"


# --- configs ----------------------------------------------------------------------------------
def gemma2_config(**extra):
    from transformers import Gemma2Config
    return Gemma2Config(**{**dict(
        **COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        attn_logit_softcapping=2.0, final_logit_softcapping=6.0, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager"), **extra})


def gemma3_text_config(**extra):
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**{**dict(
        **COMMON, hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20, sliding_window=4,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        final_logit_softcapping=6.0, attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh",
        attn_implementation="eager"), **extra})


def gemma4_text_config(**extra):
    from transformers import Gemma4TextConfig
    return Gemma4TextConfig(**{**dict(
        **COMMON, hidden_size=48, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention", "sliding_attention", "full_attention"],
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, num_kv_shared_layers=2,
        use_double_wide_mlp=True, enable_moe_block=False, final_logit_softcapping=6.0,
        hidden_activation="gelu_pytorch_tanh", attn_implementation="eager"), **extra})


def random_layer_scalars(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


# --- fixtures ---------------------------------------------------------------------------------
def make_causal(name, cls, config, template, seed, unit_norms=False, layer_scalars=False, post=3.0, qk=0.0):
    out = fresh_dir(name)
    tok = write_tokenizer(out, template)
    model = cls(config).eval()
    randomize(model, seed, unit_norms, post, qk)
    if layer_scalars:
        random_layer_scalars(model, seed)
    set_generation(model)
    save(model, out)
    expected = causal_expected(model, seed, tok, template)
    reload_check(out, model, cls, expected["prompts"])
    # The description in FAMILY.md, implemented from scratch in f64, gives transformers' logits.
    ref = reference_logits(out, expected["full_logits"]["prompt"])
    d = (ref - torch.tensor(expected["full_logits"]["logits"], dtype=torch.float64)).abs().max().item()
    assert d < 1e-4, f"{name}: the reference implementation differs from transformers by {d}"
    print(f"  reference implementation (f64) vs transformers (f32): max |dlogit| {d:.2e}", file=sys.stderr)
    write_json(os.path.join(out, "expected.json"), expected)
    return model, expected


def make_mm(name, cls, config, text_model, template, seed, unit_norms=False, softcap=True):
    """A *ForConditionalGeneration with a tiny vision tower; its language model and lm_head are
    text_model's weights (so text-only logits are text_model's)."""
    out = fresh_dir(name)
    tok = write_tokenizer(out, template)
    model = cls(config).eval()
    randomize(model, seed, unit_norms)
    lm = model.model.language_model
    lm.load_state_dict(text_model.model.state_dict(), strict=True)  # layer_scalar (a persistent buffer) too
    with torch.no_grad():
        model.lm_head.weight.copy_(text_model.lm_head.weight)
    set_generation(model)
    save(model, out)
    prompts = prompts_for(seed)
    with torch.no_grad():
        last = [model(input_ids=torch.tensor([p])).logits[0, -1].tolist() for p in prompts]
        # Gemma3ForConditionalGeneration does not apply final_logit_softcapping (modeling_gemma3.py:998);
        # Gemma4ForConditionalGeneration does (modeling_gemma4.py:2687).
        cap = text_model.config.final_logit_softcapping
        if not softcap:
            text_model.config.final_logit_softcapping = None
        ref = [text_model(torch.tensor([p])).logits[0, -1] for p in prompts]
        text_model.config.final_logit_softcapping = cap
        for a, b in zip(last, ref):
            d = (torch.tensor(a) - b).abs().max().item()
            assert d < 1e-5, f"{name}: text-only logits differ from the text model's by {d}"
        greedy = [greedy_one(model, p)[0] for p in prompts]
        pad = padded(model, prompts)
    reload_check(out, model, cls, prompts)
    keys = tensor_digests(out)
    # transformers 5.24 saves Gemma 3's wrapper in the legacy llava layout (language_model.model.*,
    # vision_tower.*, multi_modal_projector.*: conversion_mapping.py:812-817 reversed on save), and
    # Gemma 4's as its modules are named (model.language_model.*, model.vision_tower.*, ...).
    text_prefix = next(p for p in ("model.language_model.", "language_model.model.")
                       if any(k.startswith(p) for k in keys))
    expected = {**versions(), "architecture": cls.__name__, "text_prefix": text_prefix,
                "final_logit_softcapping_applied": softcap,
                "text_fixture": name.replace("-mm", ""),
                "prompts": prompts, "last_logits": last, "greedy": greedy,
                "eos_token_ids": EOS_IDS, "max_new_tokens": MAX_NEW, "padded": pad,
                "chats": chats(tok, template),
                "non_text_tensors": {k: v for k, v in keys.items() if not k.startswith(text_prefix)},
                "text_tensors": sorted(k for k in keys if k.startswith(text_prefix))}
    write_json(os.path.join(out, "expected.json"), expected)


def make_reward(name, cls, config, template, seed, unit_norms=False, post=3.0, qk=0.0):
    out = fresh_dir(name)
    write_tokenizer(out, template)
    model = cls(config).eval()
    randomize(model, seed, unit_norms, post, qk)
    model.config.pad_token_id = PAD
    save(model, out)
    rng = random.Random(seed)
    seqs = [[BOS] + [rng.randrange(*TOKENS) for _ in range(n)] for n in (3, 8, 15, 1)]
    t = max(len(s) for s in seqs)
    ids = torch.tensor([s + [PAD] * (t - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
    with torch.no_grad():
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = [float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
    assert all(abs(a - b) < 1e-4 for a, b in zip(rewards.tolist(), alone)), (rewards, alone)
    m2 = cls.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids, attention_mask=mask).logits[:, 0], rewards)
    write_json(os.path.join(out, "expected.json"),
               {**versions(), "architecture": cls.__name__, "seqs": seqs, "pad": PAD,
                "input_ids": ids.tolist(), "attention_mask": mask.tolist(), "rewards": rewards.tolist()})
    print(f"  rewards {rewards.tolist()}", file=sys.stderr)


def gemma3_mm_config():
    from transformers import Gemma3Config, SiglipVisionConfig
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=16, patch_size=4, vision_use_head=False)
    return Gemma3Config(text_config=gemma3_text_config().to_dict(), vision_config=vision.to_dict(),
                        mm_tokens_per_image=4, boi_token_index=509, eoi_token_index=510,
                        image_token_index=511, tie_word_embeddings=True, attn_implementation="eager")


def gemma4_mm_config():
    from transformers import Gemma4Config, Gemma4VisionConfig
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                pooling_kernel_size=2, patch_size=4, position_embedding_size=64)
    return Gemma4Config(text_config=gemma4_text_config().to_dict(), vision_config=vision.to_dict(),
                        audio_config=None, boi_token_id=508, eoi_token_id=509, image_token_id=510,
                        video_token_id=511, boa_token_id=506, eoa_token_index=507, audio_token_id=505,
                        tie_word_embeddings=True, attn_implementation="eager")


def main(wanted):
    from transformers import (Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma3ForCausalLM,
                              Gemma3ForConditionalGeneration, Gemma3TextForSequenceClassification,
                              Gemma4ForCausalLM, Gemma4ForConditionalGeneration)
    if "gemma2" in wanted:
        make_causal("gemma2", Gemma2ForCausalLM, gemma2_config(), GEMMA2_TEMPLATE, seed=23)
    if "gemma2-reward" in wanted:
        make_reward("gemma2-reward", Gemma2ForSequenceClassification, gemma2_config(num_labels=1),
                    GEMMA2_TEMPLATE, seed=22)
    g3 = g4 = None
    if "gemma3" in wanted or "gemma3-mm" in wanted:
        g3, _ = make_causal("gemma3", Gemma3ForCausalLM, gemma3_text_config(), GEMMA3_TEMPLATE, seed=33,
                            qk=-0.5)
    if "gemma3-mm" in wanted:
        make_mm("gemma3-mm", Gemma3ForConditionalGeneration, gemma3_mm_config(), g3, GEMMA3_TEMPLATE, seed=34,
                softcap=False)
    if "gemma3-reward" in wanted:
        make_reward("gemma3-reward", Gemma3TextForSequenceClassification, gemma3_text_config(num_labels=1),
                    GEMMA3_TEMPLATE, seed=32, qk=-0.5)
    if "gemma4" in wanted or "gemma4-mm" in wanted:
        g4, _ = make_causal("gemma4", Gemma4ForCausalLM, gemma4_text_config(), GEMMA3_TEMPLATE, seed=49,
                            unit_norms=True, layer_scalars=True, post=2.0, qk=-0.6)
    if "gemma4-mm" in wanted:
        make_mm("gemma4-mm", Gemma4ForConditionalGeneration, gemma4_mm_config(), g4, GEMMA3_TEMPLATE, seed=44,
                unit_norms=True)


if __name__ == "__main__":
    ALL = ["gemma2", "gemma2-reward", "gemma3", "gemma3-mm", "gemma3-reward", "gemma4", "gemma4-mm"]
    args = sys.argv[1:]
    bad = [a for a in args if a not in ALL]
    if bad:
        sys.exit(f"unknown fixture(s) {bad}; known: {ALL}")
    main(set(args) or set(ALL))
