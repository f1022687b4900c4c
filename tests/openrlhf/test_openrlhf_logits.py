"""The experience forwards' log-probs (`plugin.logits.action_logprobs`, used by the teacher and the student):
one chunked log-normaliser per forward, values equal to a full-vocabulary log_softmax read by hand."""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer import objectives
from openrlhf_safesteer.objectives import log_normaliser
from openrlhf_safesteer.plugin import logits as plugin_logits
from openrlhf_safesteer.plugin.logits import action_logprobs


def batch(seed=0, b=3, t=9, v=50):
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(b, t, v, generator=generator)
    sequences = torch.randint(0, v, (b, t), generator=generator)
    action = torch.zeros(b, t - 1, dtype=torch.bool)
    action[0, 2:8] = True
    action[1, 2:5] = True
    action[2, 4:6] = True
    return logits, sequences, action, torch.tensor([3, 17, 42])


@pytest.mark.parametrize("chunk_rows", [1, 4, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_normaliser_is_the_logsumexp_in_any_chunking(chunk_rows, dtype):
    logits, *_ = batch()
    logits = logits.to(dtype)
    got = log_normaliser(logits, temperature=0.7, chunk_rows=chunk_rows)
    assert got.shape == (3, 9, 1) and got.dtype == torch.float32
    expected = torch.logsumexp(logits.double() / 0.7, dim=-1, keepdim=True)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        log_normaliser(logits, chunk_rows=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        log_normaliser(logits, temperature=0.0)


def test_action_logprobs_use_one_normaliser_and_equal_a_log_softmax(monkeypatch):
    logits, sequences, action, ids = batch()
    calls = []
    real = plugin_logits.log_normaliser
    monkeypatch.setattr(plugin_logits, "log_normaliser", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    full_passes = []
    real_lse = torch.logsumexp
    monkeypatch.setattr(objectives.torch, "logsumexp",
                        lambda x, *a, **k: full_passes.append(x.shape) or real_lse(x, *a, **k))

    got = action_logprobs(logits, sequences, action, ids)

    assert calls == [(3, 8, 50)]  # one normaliser, over the (B, A, V) positions read
    assert len(full_passes) == 1  # one logsumexp pass over V (3 x 8 rows fit one 1024-row chunk)
    # Independent: log_softmax over the vocabulary at positions 0..T-2, read at the next token and at S.
    reference = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    mask = action.double()
    expected_sampled = reference.gather(-1, sequences[:, 1:].unsqueeze(-1)).squeeze(-1) * mask
    expected_on_s = reference[..., ids] * mask.unsqueeze(-1)
    torch.testing.assert_close(got["logprobs"].double(), expected_sampled, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got["logprobs_on_s"].double(), expected_on_s, atol=1e-5, rtol=1e-6)


def test_action_logprobs_read_the_last_a_positions_and_accept_packed_logits():
    """A narrower action mask (A < T - 1) reads the last A positions, as OpenRLHF's action_log_probs; the
    (B, T, 1, V) logits of OpenRLHF's packed gather give the same result."""
    logits, sequences, action, ids = batch()
    narrow = action[:, -5:]
    got = action_logprobs(logits, sequences, narrow, ids)
    reference = torch.log_softmax(logits[:, -6:-1].double(), dim=-1)
    expected = reference.gather(-1, sequences[:, -5:].unsqueeze(-1)).squeeze(-1) * narrow
    torch.testing.assert_close(got["logprobs"].double(), expected, atol=1e-5, rtol=1e-6)
    packed = action_logprobs(logits.unsqueeze(2), sequences, narrow, ids)
    for key in got:
        torch.testing.assert_close(packed[key], got[key])
