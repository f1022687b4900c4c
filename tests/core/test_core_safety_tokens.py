"""select_safety_tokens on the toy refusal model: an independent recount at horizon 1, the planted
refusal tokens recovered at a longer horizon, determinism, and clear errors."""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.directions import last_token_logprobs
from openrlhf_safesteer.safety_tokens import banned_token_mask, select_safety_tokens
from openrlhf_safesteer.steering import IncompatibleArtifactError, SteeringVector, steer
from openrlhf_safesteer.toy import REFUSAL_REPLY

pytestmark = pytest.mark.slow  # the toy refusal model is trained once per session (80 small steps)


@pytest.fixture(scope="module")
def toy_vector(toy_selection):
    return toy_selection[0]


def test_horizon_one_matches_an_independent_count(toy_refusal, toy_vector):
    # H = 1: no sampling, one answer position (the last prompt token), every sample identical; so the
    # votes are n_samples x [id in the top-k' of teacher - base] summed over prompts.
    model, tok, _, harmless = toy_refusal
    prompts, n_samples, k_prime = harmless[:6], 3, 7
    result = select_safety_tokens(model, tok, toy_vector, prompts, horizon=1, n_samples=n_samples, k=5,
                                  k_prime=k_prime, min_prob=1e-6, seed=0, progress=False)
    base = last_token_logprobs(model, tok, prompts)
    with steer(model, toy_vector):
        teacher = last_token_logprobs(model, tok, prompts)
    banned = banned_token_mask(tok, teacher.shape[-1]) | (teacher.exp().mean(0) < 1e-6)
    delta = (teacher - base).masked_fill(banned, float("-inf"))
    counts = torch.zeros(teacher.shape[-1], dtype=torch.long)
    for row in delta:
        counts[row.topk(k_prime).indices] += n_samples
    log_ratio_sum = n_samples * (teacher - base).sum(0)  # ties: larger summed log-ratio first, then smaller id
    expected = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), -float(log_ratio_sum[i]), i))[:5]
    assert result.ids == expected
    assert result.votes == [int(counts[i]) for i in expected]
    assert tok.convert_tokens_to_ids("I") in result.ids  # the refusal opener leads at the first position


def test_planted_refusal_tokens_win_and_seed_reproduces(toy_refusal, toy_vector, monkeypatch):
    model, tok, _, harmless = toy_refusal
    kwargs = {"horizon": 5, "n_samples": 2, "k": 12, "k_prime": 10, "min_prob": 1e-8, "progress": False}
    first = select_safety_tokens(model, tok, toy_vector, harmless[:8], seed=3, **kwargs)
    # the same vote when the scores do not fit the in-memory cache and are recomputed in a second pass
    monkeypatch.setattr("openrlhf_safesteer.safety_tokens.SCORE_CACHE_BYTES", 0)
    again = select_safety_tokens(model, tok, toy_vector, harmless[:8], seed=3, **kwargs)
    assert first == again
    # The steered model says "I'm sorry, but I can't help ..." where the base says "Sure! Here are ...":
    # the winners are pieces of the refusal reply, never the compliant opener.
    refusal_ids = set(tok(REFUSAL_REPLY, add_special_tokens=False)["input_ids"])
    texts = [tok.decode([i]) for i in first.ids]
    assert sum(i in refusal_ids for i in first.ids[:6]) >= 4, texts
    assert "Sure" not in [t.strip() for t in texts[:6]], texts
    assert not any("<|" in t for t in first.tokens)
    assert first.config["horizon"] == 5 and first.config["n_valid_positions"] > 0
    first.check_compatible(len(tok), tok)


def test_bad_input_fails_before_compute(toy_refusal):
    model, tok, _, harmless = toy_refusal
    good = SteeringVector(torch.ones(model.config.hidden_size), layer=1)
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        select_safety_tokens(model, tok, good, harmless[:2], horizon=0)
    with pytest.raises(ValueError, match="non-empty list"):
        select_safety_tokens(model, tok, good, [])
    with pytest.raises(IncompatibleArtifactError, match="hidden size"):
        select_safety_tokens(model, tok, SteeringVector(torch.ones(7), layer=1), harmless[:2])
