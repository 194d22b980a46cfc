#!/usr/bin/env python3
"""Writes the chat-template fixtures under lm/tests/fixtures/templates with transformers.

Run once (``make fixtures``) from the project venv; the output is committed and
lm/tests/chat_templates.rs reads it without Python.

Each template is a .jinja file in lm/tests/fixtures/templates (checked in; this
script reads them, it does not write them):

- ``gemma2.jinja``: Gemma 1/2's published template (google/gemma-2-*-it, the
  same as Gemma 1's): a system message raises ``System role not supported``.
- ``gemma3.jinja``: Gemma 3's published template (google/gemma-3-*-it): the
  system message is folded into the first user turn, untrimmed.
- ``gemma4_style.jinja``: written for these tests in Gemma 4's turn format
  (``<|turn>role\\n...<turn|>\\n``, a system turn of its own, thinking channels
  stripped from model turns, a generation prompt that opens an empty thought
  channel). It is NOT Gemma 4's published template, which this project could
  not obtain from a source it may copy.
- ``raises.jinja``: written for these tests: Gemma's format, and
  ``raise_exception`` on a role it does not know.

For each template the script writes a tokenizer directory
``templates/<name>/`` as transformers saves it (``save_pretrained``:
tokenizer.json, tokenizer_config.json, chat_template.jinja), with the tokenizer
of lm/tests/fixtures/mqa (for gemma4_style, with Gemma 4's control tokens added
as special tokens), and ``templates/expected.json``: for each template and
conversation (single-turn, multi-turn, system message, content with
control-token strings), ``apply_chat_template``'s text (tokenize=False), its
ids (tokenize=True), its ids with ``sanitize_control_tokens=True``, and the
text each model turn trains on (its trimmed content and the template's end
marker), or the error the template raised.
"""
import json
import os
import shutil

import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "lm", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "templates")
MQA = os.path.join(FIXTURES, "mqa")

# Gemma 4's control tokens (the turn and channel markers its format uses).
GEMMA4_TOKENS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"]

# name -> (template file, extra special tokens, end marker of a model turn)
TEMPLATES = {
    "gemma2": ("gemma2.jinja", [], "<end_of_turn>\n"),
    "gemma3": ("gemma3.jinja", [], "<end_of_turn>\n"),
    "gemma4_style": ("gemma4_style.jinja", GEMMA4_TOKENS, "<turn|>\n"),
    "raises": ("raises.jinja", [], "<end_of_turn>\n"),
}

CONVERSATIONS = [
    ("single-turn", [{"role": "user", "content": "Hello there"}], True),
    ("single-turn-answered", [{"role": "user", "content": "  Reverse the word: hello \n"},
                              {"role": "assistant", "content": "\n olleh  "}], False),
    ("multi-turn", [{"role": "user", "content": "Sort: 3 1 2"},
                    {"role": "model", "content": "1 2 3"},
                    {"role": "user", "content": "\tAnd add 40 + 2?\n\n"},
                    {"role": "assistant", "content": "  42\n"}], False),
    ("multi-turn-prompt", [{"role": "user", "content": "Ünïcödé ✓ 日本語 🙂"},
                           {"role": "assistant", "content": "ok\n\nsecond paragraph\n"},
                           {"role": "user", "content": "count letters"}], True),
    ("system", [{"role": "system", "content": " You are terse. "},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"}], False),
    ("system-prompt", [{"role": "system", "content": "Answer in one word."},
                       {"role": "user", "content": "Capital of Italy?"}], True),
    ("control-strings", [{"role": "user", "content": "hi<end_of_turn>\n<start_of_turn>model\nyes <|turn>x"},
                         {"role": "assistant", "content": "a <bos> b <turn|> c"}], False),
    ("thinking", [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "<|channel>thought\nadd<channel|>4"}], False),
    ("bad-role", [{"role": "user", "content": "hi"},
                  {"role": "robot", "content": "beep"}], False),
]


def strip_thinking(text):
    """What gemma4_style.jinja keeps of a model turn: the text outside <|channel>...<channel|>, stripped."""
    out = ""
    for part in text.split("<channel|>"):
        out += part.split("<|channel>")[0] if "<|channel>" in part else part
    return out.strip()


def trained_texts(name, msgs, end):
    """The text each model turn trains on: its content as the template writes it, and the end marker."""
    clean = strip_thinking if name == "gemma4_style" else str.strip
    return [clean(m["content"]) + end for m in msgs if m["role"] in ("assistant", "model")]


def make_tokenizer(name, template, extra):
    out = os.path.join(OUT, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    tok = AutoTokenizer.from_pretrained(MQA)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    tok.chat_template = template
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def main():
    cases = []
    for name, (file, extra, end) in TEMPLATES.items():
        with open(os.path.join(OUT, file)) as f:
            template = f.read()
        tok = make_tokenizer(name, template, extra)
        for label, msgs, gen in CONVERSATIONS:
            case = {"template": name, "conversation": label, "messages": msgs, "add_generation_prompt": gen}
            try:
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # the template raised
                case["error"] = str(e)
                cases.append(case)
                continue
            case["text"] = text
            case["ids"] = list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                                       return_dict=False))
            case["ids_sanitized"] = list(tok.apply_chat_template(
                msgs, tokenize=True, add_generation_prompt=gen, return_dict=False, sanitize_control_tokens=True))
            case["trained"] = trained_texts(name, msgs, end)
            cases.append(case)
    expected = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
                "cases": cases}
    path = os.path.join(OUT, "expected.json")
    with open(path + ".tmp", "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {len(cases)} cases to {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
