# align — build, test and run on a fresh machine with nothing installed by hand.
#
#   make quickstart   the main job (see README)
#   make test         every test, CPU only
#   make bench        align against transformers on this machine
#   make bench-lora   LoRA at gemma-2b size against transformers + PEFT (long)
#   make gpu-check    the GPU checks (scripts/gpu_check.sh; GPU_CHECK_DEVICE=cpu runs them on the CPU)
#   make fixtures     regenerate the transformers and peft parity fixtures (needs the venv)
#
# libtorch comes from PyTorch 2.11.0: the system python3 when it already has
# that torch (the GPU machines), otherwise a project-local venv (.venv).

SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

VENV    := .venv
STAMPS  := .stamps
TORCH_VERSION := 2.11.0
CARGO   ?= cargo
BIN     := target/release/align
# Free disk needed, in GB: torch with its CUDA libraries from PyPI; the release
# build of the workspace and its tests.
TORCH_DISK_GB := 6
BUILD_DISK_GB := 6

# Which python provides torch: recorded once in $(STAMPS)/python.
HAVE_SYS_TORCH := $(shell python3 -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_SYS_TORCH),yes)
PYTHON := $(shell command -v python3)
else
PYTHON := $(CURDIR)/$(VENV)/bin/python
endif

# Evaluated when a recipe runs, after $(STAMPS)/torch exists.
export LIBTORCH = $(shell cat $(STAMPS)/libtorch 2>/dev/null)
ORIG_LD_LIBRARY_PATH := $(LD_LIBRARY_PATH)
export LD_LIBRARY_PATH = $(LIBTORCH)/lib:$(ORIG_LD_LIBRARY_PATH)
export ALIGN_PYTHON := $(PYTHON)

.PHONY: all build test quickstart bench bench-lora gpu-check fixtures pydeps fonts chromium gloo fmt clippy clean verify-hf verify-family

all: build

$(STAMPS)/torch:
	mkdir -p $(STAMPS)
	if [ "$(HAVE_SYS_TORCH)" != yes ]; then
	  if ! $(PYTHON) -c "import torch" >/dev/null 2>&1; then
	    echo ">> creating $(VENV) with torch==$(TORCH_VERSION) (about a minute, 4.6 GB)"
	    scripts/check_disk.sh . $(TORCH_DISK_GB) "the venv with torch==$(TORCH_VERSION)"
	    python3 -m venv $(VENV)
	    # No pip cache: the wheels would otherwise take their size twice. Temporary
	    # files go next to the venv, not to a possibly small /tmp.
	    mkdir -p $(VENV)/tmp
	    TMPDIR=$(CURDIR)/$(VENV)/tmp $(VENV)/bin/pip install --quiet --no-cache-dir --disable-pip-version-check torch==$(TORCH_VERSION)
	    rm -rf $(VENV)/tmp
	  fi
	fi
	$(PYTHON) -c "import torch, os; print(os.path.dirname(torch.__file__))" 2>/dev/null > $(STAMPS)/libtorch
	echo ">> libtorch: $$(cat $(STAMPS)/libtorch)"
	touch $@

# transformers, numpy and peft for the reference side of benchmarks and fixtures only.
$(STAMPS)/pydeps: $(STAMPS)/torch
	$(PYTHON) -c "import transformers, numpy, peft" >/dev/null 2>&1 || \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check "transformers>=4.50" numpy peft
	touch $@
pydeps: $(STAMPS)/pydeps

# The charts (lm::plot) are set in DejaVu Sans: Debian's fonts-dejavu-core.
FONT_FILE := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
FONT_PACKAGE := fonts-dejavu-core
fonts:
	if [ ! -f $(FONT_FILE) ]; then
	  echo ">> installing $(FONT_PACKAGE) (the charts' font, $(FONT_FILE))"
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo)
	  $$SUDO apt-get install -y -q $(FONT_PACKAGE) || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $(FONT_PACKAGE); }
	fi

# The browser tests of the HTML reports (judge/tests/html_browser.rs) drive
# Debian's chromium headless; without it they skip with a message. Not a
# dependency of `test` (a large download); CI (.ci/run) installs it.
CHROMIUM_PACKAGE := chromium
chromium:
	if ! command -v chromium >/dev/null 2>&1; then
	  echo ">> installing $(CHROMIUM_PACKAGE) (headless browser for the HTML report tests)"
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo)
	  $$SUDO apt-get install -y -q --no-install-recommends $(CHROMIUM_PACKAGE) || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends $(CHROMIUM_PACKAGE); }
	fi

# The C++ bridge's Gloo backend (native/) compiles against Gloo's headers,
# which the torch wheel does not ship: Debian's libgloo-dev. Without them the
# bridge builds without Gloo and the distributed tests say they were skipped.
# native/build.rs is touched after installing so that cargo rebuilds the bridge.
GLOO_HEADER := /usr/include/gloo/config.h
GLOO_PACKAGE := libgloo-dev
gloo:
	if [ ! -f $(GLOO_HEADER) ]; then
	  echo ">> installing $(GLOO_PACKAGE) (Gloo's headers, for the distributed backend)"
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo)
	  $$SUDO apt-get install -y -q $(GLOO_PACKAGE) || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $(GLOO_PACKAGE); } \
	    || echo "note: $(GLOO_PACKAGE) could not be installed; the bridge builds without Gloo and the distributed tests skip"
	  touch native/build.rs
	fi

build: $(STAMPS)/torch fonts
	$(CARGO) build --release --bin align

test: $(STAMPS)/torch fonts gloo
	scripts/check_disk.sh target $$([ -d target/release ] && echo 1 || echo $(BUILD_DISK_GB)) "the release build and its tests"
	$(CARGO) test --release --workspace

QS_MODEL := runs/quickstart/rl/seed-0/model
QS_PROMPT := Reverse: b a d g e

# The main job: run the recipe, print its report, then check that the final
# RL model answers the same, token for token, in align and in transformers.
quickstart: build $(STAMPS)/pydeps
	$(BIN) run recipes/quickstart.toml
	cat runs/quickstart/report.md
	$(BIN) generate --model $(QS_MODEL) --prompt "$(QS_PROMPT)" --max-new-tokens 16 --device cpu --json \
	  | tee runs/quickstart/answer.json \
	  | $(PYTHON) -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"prompt_ids": d["prompt_ids"], "token_ids": d["token_ids"]}))' > runs/quickstart/align-ids.json
	$(PYTHON) scripts/check_hf_load.py $(QS_MODEL) "$(QS_PROMPT)" 16 > runs/quickstart/transformers-ids.json
	@$(PYTHON) -c 'import json; d=json.load(open("runs/quickstart/answer.json")); print("align generate:", json.dumps({"prompt": "$(QS_PROMPT)", "answer": d["text"]}))'
	cmp runs/quickstart/align-ids.json runs/quickstart/transformers-ids.json && \
	  echo "quickstart: transformers loads $(QS_MODEL) and gives the same answer, token for token"

bench: build $(STAMPS)/pydeps
	$(BIN) bench generate --python $(PYTHON)
	$(BIN) bench sft --python $(PYTHON)
	$(PYTHON) -c "import trl" 2>/dev/null || $(PYTHON) -m pip install --quiet --disable-pip-version-check trl
	$(BIN) bench rl --python $(PYTHON)

# Real size (gemma-2b shapes, random weights): LoRA SFT against
# transformers + PEFT, f32 and bf16 base, each side in its own process
# (peak RSS per process), then one RL step. About an hour on 2 cores.
bench-lora: build $(STAMPS)/pydeps
	$(BIN) bench lora --python $(PYTHON)
	$(BIN) bench lora --rl --warmup 0 --steps 1

# The GPU checks (see scripts/gpu_check.sh): build, CUDA in `align info`,
# CUDA-vs-CPU logits, LoRA SFT/reward/RL steps in bf16 at gemma-2b size.
gpu-check:
	bash scripts/gpu_check.sh

# peft (for the LoRA fixtures only; no test needs it) is installed here.
fixtures: $(STAMPS)/pydeps
	$(PYTHON) scripts/make_fixtures.py
	$(PYTHON) scripts/make_family_fixtures.py
	$(PYTHON) scripts/make_template_fixtures.py
	$(PYTHON) -c "import peft" >/dev/null 2>&1 || \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check peft
	$(PYTHON) scripts/make_peft_fixture.py
	$(PYTHON) scripts/make_gemma4_lora_fixture.py

fmt:
	$(CARGO) fmt --all

clippy: $(STAMPS)/torch
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf $(STAMPS) runs

# A checkpoint align writes loads in transformers unchanged and generates the
# same greedy tokens.
verify-hf: build $(STAMPS)/pydeps
	mkdir -p runs/verify-hf
	$(BIN) tokenizer train --input recipes/data/tiny_corpus.txt --vocab-size 800 --out runs/verify-hf/tokenizer.json
	$(BIN) init --preset tiny --tokenizer runs/verify-hf/tokenizer.json --out runs/verify-hf/model --seed 3 --force
	$(BIN) generate --model runs/verify-hf/model --prompt "Sort the numbers 5 2 9" --max-new-tokens 16 --device cpu --json \
	  | $(PYTHON) -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"prompt_ids": d["prompt_ids"], "token_ids": d["token_ids"]}))' > runs/verify-hf/align.json
	$(PYTHON) scripts/check_hf_load.py runs/verify-hf/model "Sort the numbers 5 2 9" 16 > runs/verify-hf/transformers.json
	cmp runs/verify-hf/align.json runs/verify-hf/transformers.json && echo "verify-hf: transformers loads the align checkpoint and agrees token for token"

# transformers loads align's saves of every Gemma-family fixture (causal LMs,
# multimodal wrappers, reward models) with the fixtures' outputs (by hand).
# align's saves of the Gemma-family fixtures (written by an ignored test of
# lm/tests/family_reward.rs) load in transformers with the fixtures' logits,
# greedy ids, rewards and untouched vision tensors (scripts/check_family_load.py).
FAMILY_FIXTURES := gemma2 gemma3 gemma4 gemma3-mm gemma4-mm gemma2-reward gemma3-reward
verify-family: $(STAMPS)/torch $(STAMPS)/pydeps
	rm -rf runs/verify-family
	mkdir -p runs/verify-family
	ALIGN_SAVE_DIR=$(CURDIR)/runs/verify-family $(CARGO) test --release -p lm --test family_reward -- --ignored write_family_saves_for_transformers
	fail=0
	for n in $(FAMILY_FIXTURES); do
	  $(PYTHON) scripts/check_family_load.py runs/verify-family/$$n lm/tests/fixtures/$$n/expected.json || fail=1
	done
	if [ $$fail = 0 ]; then echo "verify-family: transformers loads align's saves of every family fixture with the same outputs"; fi
	exit $$fail
