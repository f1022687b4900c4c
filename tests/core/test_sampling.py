"""Seeded sampling per request (openrlhf_safesteer/sampling.py).

What must hold, each checked against something computed independently:
- a request's tokens depend on its own seed only: the same request in another batch, row or batch size
  draws the same tokens (the property the plugin's repeatability rests on);
- the draw follows the warped distribution: over many seeds the frequencies match softmax(logits / T)
  restricted to the top-p nucleus, and tokens outside the nucleus never appear;
- the kept log-probs are the warped log-softmax at the drawn tokens;
- the seeds are pure functions of (seed, rollout index, prompt, k), with identical prompts numbered k.
"""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.sampling import (
    SeededSampling,
    occurrences,
    request_seed,
    request_seeds,
    rollout_seed,
)
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer


def test_seeds_are_pure_and_separate_what_differs():
    base = rollout_seed(3, 0)
    assert base == rollout_seed(3, 0)
    assert len({base, rollout_seed(3, 1), rollout_seed(4, 0)}) == 3
    assert 0 <= base < 2 ** 63
    seeds = {request_seed(base, [1, 2, 3], 0), request_seed(base, [1, 2, 3], 1), request_seed(base, [1, 2, 4], 0),
             request_seed(base, [1, 2], 0)}
    assert len(seeds) == 4
    assert occurrences([[1], [2], [1], [1], [2]]) == [0, 0, 1, 2, 1]
    assert request_seeds(base, [[1], [2], [1]]) == [request_seed(base, [1], 0), request_seed(base, [2], 0),
                                                    request_seed(base, [1], 1)]
    with pytest.raises(ValueError, match="occurrence"):
        request_seed(base, [1], -1)
    with pytest.raises(ValueError, match="rollout_index"):
        rollout_seed(3, -1)


def _generate(model, tok, prompts: list[list[int]], seeds: list[int], new_tokens: int = 8):
    """Left-pad prompts, sample with SeededSampling; returns each row's new tokens and the sampler."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    sampler = SeededSampling(seeds, temperature=1.0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         logits_processor=[sampler], pad_token_id=tok.pad_token_id, eos_token_id=[])
    return out[:, width:].tolist(), sampler


def test_a_requests_tokens_do_not_depend_on_its_batch_mates():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, layers=2, hidden=32).eval()
    a, b, c = (tok.encode(text) for text in ("how do I bake bread", "write me a poem please", "hi"))
    alone, _ = _generate(model, tok, [a], [11])
    together, _ = _generate(model, tok, [c, b, a], [33, 22, 11])
    reversed_, _ = _generate(model, tok, [a, c], [11, 33])
    torch.manual_seed(12345)       # the global stream must not matter either
    again, _ = _generate(model, tok, [b, a], [22, 11])
    assert alone[0] == together[2] == reversed_[0] == again[1]
    assert together[1] == again[0] and together[0] == reversed_[1]
    other, _ = _generate(model, tok, [a], [12])     # negative control: another seed, other tokens
    assert other[0] != alone[0]


def test_draws_follow_the_warped_distribution_and_logprobs_are_its_own():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, top_p, n = 0.7, 0.9, 4000
    warped = torch.softmax(logits / temperature, -1)[0]
    order = warped.argsort(descending=True)
    # the nucleus by hand: the most probable tokens until their mass reaches top_p
    cumulative = warped[order].cumsum(0)
    nucleus = order[: int((cumulative < top_p).sum()) + 1]
    expected = torch.zeros_like(warped)
    expected[nucleus] = warped[nucleus] / warped[nucleus].sum()

    counts = torch.zeros(6)
    sampler = SeededSampling(list(range(n)), temperature=temperature, top_p=top_p)
    forced = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1))
    drawn = forced.argmax(-1)
    assert torch.isfinite(forced).sum() == n          # exactly one finite score per row: greedy takes it
    counts += torch.bincount(drawn, minlength=6)
    assert counts[expected == 0].sum() == 0           # never outside the nucleus
    freq = counts / n
    assert torch.allclose(freq, expected, atol=4 * (0.25 / n) ** 0.5)   # 4 sd of a binomial proportion
    logp = torch.log(expected)
    torch.testing.assert_close(sampler.drawn_logprobs()[:, 0], logp[drawn], rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature > 0"):
        SeededSampling([1], temperature=0.0)
    sampler = SeededSampling([1, 2], temperature=1.0)
    with pytest.raises(ValueError, match="2 seeds"):
        sampler(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 5))
