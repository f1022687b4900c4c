"""A tiny model with a steering vector and a safety-token set in a `safesteer demo`-like folder (vector/,
safety_tokens.json), for the frontier grid's end-to-end test. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    from openrlhf_safesteer.safety_tokens import SafetyTokenSet
    from openrlhf_safesteer.steering import SteeringVector
    from openrlhf_safesteer.testing import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_demo")
    model = save_tiny_checkpoint(str(root / "model"), "llama", layers=2, hidden=64, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    vector = 3 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    SteeringVector(vector=vector, layer=1, model_name=model).save(root / "demo" / "vector")
    ids = sorted(set(tokenizer.encode(" sorry cannot illegal harmful unethical", add_special_tokens=False)))
    SafetyTokenSet(ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids), votes=[1] * len(ids), model_name=model,
                   vocab_size=len(tokenizer)).save(root / "demo" / "safety_tokens.json")
    return {"root": root, "model": model, "demo": str(root / "demo")}
