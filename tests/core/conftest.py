"""Fixtures of the core tests: the in-memory tokenizer and the toy refusal model (trained once per session)."""

from __future__ import annotations

import pytest

from openrlhf_safesteer.testing import tiny_tokenizer


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return tiny_tokenizer(template="chatml")


@pytest.fixture(scope="session")
def toy_refusal(chatml_tokenizer):
    """(model, tokenizer, harmful prompts, harmless prompts): a tiny llama trained to refuse harmful requests."""
    import torch

    from openrlhf_safesteer.toy import toy_prompts, train_refusal_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run outside the autouse per-test fixture below
    try:
        model = train_refusal_model("llama", chatml_tokenizer)
    finally:
        torch.set_num_threads(before)
    return model, chatml_tokenizer, toy_prompts("harmful"), toy_prompts("harmless")


@pytest.fixture(autouse=True)
def _one_thread():
    """Core tests run models of 32-64 hidden units: one intra-op thread is faster than two (thread sync
    dominates such small matmuls) and much faster on a shared, oversubscribed machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_selection(toy_refusal):
    """select_direction on the toy model: (vector, table, harmful_val, harmless_val)."""
    import torch

    from openrlhf_safesteer.directions import select_direction

    model, tok, harmful, harmless = toy_refusal
    harmful_val, harmless_val = harmful[1::2][:16], harmless[1::2][:16]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vector, table = select_direction(model, tok, harmful[::2], harmless[::2], harmful_val, harmless_val,
                                         progress=False)
    finally:
        torch.set_num_threads(before)
    return vector, table, harmful_val, harmless_val
