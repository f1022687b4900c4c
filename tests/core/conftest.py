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
    from openrlhf_safesteer.toy import toy_prompts, train_refusal_model

    model = train_refusal_model("llama", chatml_tokenizer)
    return model, chatml_tokenizer, toy_prompts("harmful"), toy_prompts("harmless")
