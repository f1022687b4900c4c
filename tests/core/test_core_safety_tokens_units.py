"""The safety-token vote's pure pieces against brute force, and the SafetyTokenSet artifact."""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.safety_tokens import (
    SafetyTokenSet,
    banned_token_mask,
    top_by_votes,
    valid_positions,
    vote,
)
from openrlhf_safesteer.steering import IncompatibleArtifactError


def test_valid_positions_stop_at_first_end_of_turn():
    argmax = torch.tensor([[4, 9, 4, 4], [1, 2, 3, 4], [7, 4, 9, 1]])
    assert valid_positions(argmax, [9, 7]).tolist() == [
        [True, False, False, False], [True, True, True, True], [False, False, False, False]]


def test_vote_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    n, h, v, k_prime = 5, 4, 30, 6
    delta = torch.randn(n, h, v, generator=g)
    valid = torch.rand(n, h, generator=g) > 0.3
    banned = torch.zeros(v, dtype=torch.bool)
    banned[[0, 3, 17]] = True
    expected = [0] * v
    for i in range(n):
        for j in range(h):
            if not valid[i, j]:
                continue
            allowed = [(float(delta[i, j, t]), t) for t in range(v) if not banned[t]]
            for d, t in sorted(allowed, reverse=True)[:k_prime]:
                expected[t] += d > 0          # only ids the teacher favours vote
    votes = vote(delta, valid, banned, k_prime)
    assert votes.tolist() == expected
    assert int(votes[[0, 3, 17]].sum()) == 0
    assert int(votes.sum()) <= k_prime * int(valid.sum())


def test_vote_ignores_ids_the_teacher_makes_less_likely():
    """With fewer allowed ids than k', ids with delta <= 0 must not vote (they are not safety tokens)."""
    delta = torch.tensor([[[2.0, -1.0, 0.5, -3.0, 0.0]]])
    banned = torch.tensor([False, False, False, False, False])
    votes = vote(delta, torch.ones(1, 1, dtype=torch.bool), banned, k_prime=200)
    assert votes.tolist() == [1, 0, 1, 0, 0]


def test_vote_with_everything_banned_is_an_error():
    with pytest.raises(ValueError, match="every vocabulary id is banned"):
        vote(torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool), torch.ones(4, dtype=torch.bool), 2)


def test_top_by_votes_orders_and_drops_zero():
    votes = torch.tensor([0, 5, 2, 5, 0, 1])
    assert top_by_votes(votes, 3) == [1, 3, 2]
    assert top_by_votes(votes, 10) == [1, 3, 2, 5]


def test_top_by_votes_breaks_ties_by_score_then_id():
    votes = torch.tensor([3, 3, 3, 1, 3, 0])
    tiebreak = torch.tensor([0.5, 2.0, 0.5, 9.0, -1.0, 9.0])
    # among the four 3-vote ids: 1 (2.0), then 0 and 2 (0.5, smaller id first), then 4 (-1.0); zero votes dropped
    assert top_by_votes(votes, 6, tiebreak) == [1, 0, 2, 4, 3]
    assert top_by_votes(votes, 2, tiebreak) == [1, 0]


def test_banned_mask(chatml_tokenizer):
    rows = len(chatml_tokenizer) + 3  # LM heads are often padded past the tokenizer
    banned = banned_token_mask(chatml_tokenizer, rows)
    vocab = chatml_tokenizer.get_vocab()
    for special in ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>"):
        assert banned[vocab[special]]
    assert banned[-3:].all()
    assert not banned[chatml_tokenizer("Sorry", add_special_tokens=False)["input_ids"][0]]


def test_token_set_roundtrip_and_compatibility(tmp_path, chatml_tokenizer):
    ids = chatml_tokenizer(" sorry illegal", add_special_tokens=False)["input_ids"]
    tokens = chatml_tokenizer.convert_ids_to_tokens(ids)
    s = SafetyTokenSet(ids=ids, tokens=tokens, votes=[9, 4][: len(ids)] + [1] * (len(ids) - 2), config={"k": 2},
                       model_name="tiny", vocab_size=len(chatml_tokenizer))
    s.save(tmp_path / "tokens.json")
    loaded = SafetyTokenSet.load(tmp_path / "tokens.json")
    assert loaded == s
    assert torch.equal(loaded.ids_tensor(), torch.tensor(ids))
    loaded.check_compatible(len(chatml_tokenizer), chatml_tokenizer)
    with pytest.raises(IncompatibleArtifactError, match="outside the model's vocabulary"):
        loaded.check_compatible(min(ids))
    from openrlhf_safesteer.testing import tiny_tokenizer
    with pytest.raises(IncompatibleArtifactError, match="name other tokens"):
        loaded.check_compatible(len(chatml_tokenizer), tiny_tokenizer(vocab_size=300))


def test_token_set_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one id"):
        SafetyTokenSet(ids=[], tokens=[], votes=[])
    with pytest.raises(ValueError, match="unique"):
        SafetyTokenSet(ids=[1, 1], tokens=["a", "a"], votes=[1, 1])
    with pytest.raises(FileNotFoundError, match="safesteer tokens"):
        SafetyTokenSet.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a safety-token set"):
        SafetyTokenSet.load(tmp_path / "x.json")


@pytest.mark.parametrize("coeff", [float("nan"), float("inf")])
def test_non_finite_coeff_override_fails_before_compute(chatml_tokenizer, monkeypatch, coeff):
    """Not torch.multinomial's "probability tensor contains either inf, nan" after the sampling pass."""
    from openrlhf_safesteer import safety_tokens
    from openrlhf_safesteer.steering import SteeringVector
    from openrlhf_safesteer.testing import tiny_model

    def no_compute(*args, **kwargs):
        raise AssertionError("work started before the coefficient was checked")

    monkeypatch.setattr(safety_tokens, "banned_token_mask", no_compute)
    monkeypatch.setattr(safety_tokens, "sample_continuations", no_compute)
    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32)
    with pytest.raises(ValueError, match="coeff must be a finite number"):
        safety_tokens.select_safety_tokens(model, chatml_tokenizer, SteeringVector(torch.ones(32), layer=1),
                                           ["Plan a trip"], coeff=coeff, progress=False)


def test_sample_continuations_follow_the_model_and_skip_forbidden(chatml_tokenizer):
    from openrlhf_safesteer.safety_tokens import sample_continuations
    from openrlhf_safesteer.testing import tiny_model

    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked next-token distribution, so frequencies are measurable
    prompt = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        probs = torch.softmax(model(prompt).logits[0, -1].float(), -1)
    top = int(probs.argmax())
    n = 3000
    ids, mask = prompt.repeat(n, 1), torch.ones(n, 3, dtype=torch.long)
    drawn = sample_continuations(model, ids, mask, 1, torch.Generator().manual_seed(0))[:, 0]
    for token in probs.topk(3).indices.tolist():  # empirical frequency within 4 standard errors
        p = float(probs[token])
        assert abs(float((drawn == token).float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3
    # Forbidding the most likely token removes it; the same seed repeats the same draw; length is exact.
    again = sample_continuations(model, ids[:50], mask[:50], 4, torch.Generator().manual_seed(1), forbidden_ids=[top])
    assert again.shape == (50, 4) and not (again == top).any()
    assert torch.equal(again, sample_continuations(model, ids[:50], mask[:50], 4, torch.Generator().manual_seed(1),
                                                   forbidden_ids=[top]))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_cached_sampling_draws_what_a_full_re_encoding_draws(chatml_tokenizer, architecture):
    """The KV-cached sampler equals a plain loop that re-encodes the whole left-padded sequence at every
    step (same generator, same steering hook): same tokens, on ragged prompts (positions matter for GPT-2)."""
    import torch.nn.functional as F

    from openrlhf_safesteer.models import left_padded_position_ids
    from openrlhf_safesteer.safety_tokens import sample_continuations
    from openrlhf_safesteer.steering import SteeringVector, steer
    from openrlhf_safesteer.testing import tiny_model

    model = tiny_model(architecture, chatml_tokenizer, layers=2, hidden=32)
    ids = torch.tensor([[0, 0, 5, 17, 42], [3, 9, 11, 12, 13], [0, 7, 8, 21, 30]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    vector = SteeringVector(torch.randn(32, generator=torch.Generator().manual_seed(0)), layer=1)

    def reference(length: int, generator: torch.Generator) -> torch.Tensor:
        seq, m, out = ids, mask, []
        for _ in range(length):
            with torch.no_grad():
                logits = model(input_ids=seq, attention_mask=m, position_ids=left_padded_position_ids(m)).logits[:, -1]
            token = torch.multinomial(F.softmax(logits.float(), -1), 1, generator=generator)
            out.append(token)
            seq, m = torch.cat([seq, token], 1), torch.cat([m, torch.ones_like(token)], 1)
        return torch.cat(out, 1)

    with steer(model, vector, 4.0):
        cached = sample_continuations(model, ids, mask, 6, torch.Generator().manual_seed(7))
        expected = reference(6, torch.Generator().manual_seed(7))
    assert torch.equal(cached, expected)
    assert sample_continuations(model, ids, mask, 0, torch.Generator()).shape == (3, 0)
