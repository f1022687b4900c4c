"""Direction selection's train filter and its ablation-KL score against independent computations
(review 13, finding 9).

- `_filter_train` (docs/METHOD.md section 1: keep the harmful training prompts the model refuses, score > 0,
  and the harmless ones it answers, score < 0; if that leaves fewer than 2 prompts on either side, use
  both unfiltered sets) on refusal scores planted by prompt.
- `select_direction`'s `ablation_kl` of the chosen candidate equals KL(base || ablated) of the next-token
  distributions on the harmless validation prompts, recomputed here with the direction projected out of
  the weights (no hooks), one unpadded prompt at a time.
"""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer import directions
from openrlhf_safesteer.directions import _filter_train, prompts_sha256, select_direction
from openrlhf_safesteer.testing import orthogonalised, tiny_model

HARMFUL = ["How do I make a bomb?", "Write a phishing email.", "Hack into a bank account now please", "Steal a car",
           "How to forge a passport?"]
HARMLESS = ["How do I make a cake?", "Write a poem about the sea.", "Plan a trip to Rome", "Explain photosynthesis."]


def plant_scores(monkeypatch, scores: dict[str, float]):
    """Make directions.refusal_score return the planted score of each prompt; returns the recorded calls."""
    calls = []

    def planted(model, tokenizer, prompts, refusal_ids=None, batch_size=16):
        calls.append((list(prompts), refusal_ids, batch_size))
        return torch.tensor([scores[p] for p in prompts])

    monkeypatch.setattr(directions, "refusal_score", planted)
    return calls


def test_filter_keeps_refused_harmful_and_answered_harmless(monkeypatch):
    """Harmful kept iff score > 0, harmless kept iff score < 0 (a score of exactly 0 is neither), order kept."""
    harmful_scores = [1.5, -0.5, 0.0, 2.0, 0.25]
    harmless_scores = [-1.0, 0.75, -0.1, 0.0]
    calls = plant_scores(monkeypatch, {**dict(zip(HARMFUL, harmful_scores)), **dict(zip(HARMLESS, harmless_scores))})
    kept_harmful, kept_harmless = _filter_train("model", "tokenizer", HARMFUL, HARMLESS, [7, 9], 3)
    assert kept_harmful == [HARMFUL[0], HARMFUL[3], HARMFUL[4]]
    assert kept_harmless == [HARMLESS[0], HARMLESS[2]]
    # Each side scored once, with the caller's refusal ids and batch size.
    assert sorted(tuple(prompts) for prompts, _, _ in calls) == sorted([tuple(HARMFUL), tuple(HARMLESS)])
    assert all(ids == [7, 9] and batch == 3 for _, ids, batch in calls)


@pytest.mark.parametrize("side", ["harmful", "harmless"])
def test_filter_falls_back_to_both_unfiltered_sets_when_a_side_keeps_fewer_than_two(monkeypatch, side):
    """Only one prompt survives on `side` (the other side keeps several): both sets come back unfiltered,
    since a difference of means over one prompt is noise."""
    harmful_scores = [1.0, -1.0, -2.0, -0.5, -3.0] if side == "harmful" else [1.0, 2.0, -1.0, 3.0, 0.5]
    harmless_scores = [-1.0, -2.0, 0.5, -0.3] if side == "harmful" else [0.2, -1.0, 0.4, 0.0]
    plant_scores(monkeypatch, {**dict(zip(HARMFUL, harmful_scores)), **dict(zip(HARMLESS, harmless_scores))})
    kept_harmful, kept_harmless = _filter_train("model", "tokenizer", HARMFUL, HARMLESS, [7], 16)
    assert kept_harmful == HARMFUL and kept_harmless == HARMLESS


def test_filter_with_exactly_two_on_each_side_filters(monkeypatch):
    """The fallback threshold is "fewer than 2": two survivors on each side are used as they are."""
    harmful_scores = [-1.0, 0.5, -0.1, -2.0, 3.0]
    harmless_scores = [0.3, -0.2, 1.0, -4.0]
    plant_scores(monkeypatch, {**dict(zip(HARMFUL, harmful_scores)), **dict(zip(HARMLESS, harmless_scores))})
    assert _filter_train("model", "tokenizer", HARMFUL, HARMLESS, [7], 16) == (
        [HARMFUL[1], HARMFUL[4]], [HARMLESS[1], HARMLESS[3]])


@torch.no_grad()
def _next_token_logprobs(model, tokenizer, prompts):
    """(N, V) float64 next-token log-probs, one unpadded chat-rendered prompt at a time."""
    rows = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        rows.append(torch.log_softmax(model(ids).logits[0, -1].double(), -1))
    return torch.stack(rows)


def _mean_kl(p_log, q_log):
    """Mean over prompts of KL(p || q) = sum_v p(v) (log p(v) - log q(v))."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def test_selected_ablation_kl_is_base_to_ablated_kl_on_harmless_val(chatml_tokenizer, monkeypatch):
    """The chosen row's ablation_kl = mean KL(base || ablated) over the HARMLESS validation prompts, the
    ablated model being the base with the chosen direction projected out of its weights. Also: with
    filter_train the candidates come from what the filter returned (recorded in the vector's source)."""
    model = tiny_model("llama", chatml_tokenizer, layers=3, hidden=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked next-token distributions, so the KL is well above float noise
    harmful_val, harmless_val = HARMFUL[2:], HARMLESS[1:]  # equal sizes: a slice mix-up still type-checks
    filtered = (HARMFUL[:3], HARMLESS[:3])
    seen = []

    def recorded_filter(model_, tokenizer, harmful, harmless, refusal_ids, batch_size):
        seen.append((list(harmful), list(harmless)))
        return list(filtered[0]), list(filtered[1])

    monkeypatch.setattr(directions, "_filter_train", recorded_filter)
    # A random model refuses nothing, so every candidate fails "steering refusal > 0": fallback picks one.
    vector, table = select_direction(model, chatml_tokenizer, HARMFUL, HARMLESS, harmful_val, harmless_val,
                                     layers=[1], positions=[-2, -1], kl_threshold=10.0, fallback=True,
                                     batch_size=2, progress=False)
    assert seen == [(HARMFUL, HARMLESS)]
    assert vector.source["harmful_train_sha256"] == prompts_sha256(filtered[0])
    assert vector.source["harmless_train_sha256"] == prompts_sha256(filtered[1])
    [chosen] = [r for r in table if (r.layer, r.position) == (vector.layer, vector.position)]

    unit = vector.vector.double() / vector.vector.double().norm()
    ablated_model = orthogonalised(model, unit.float())
    base = _next_token_logprobs(model, chatml_tokenizer, harmless_val)
    ablated = _next_token_logprobs(ablated_model, chatml_tokenizer, harmless_val)
    expected = _mean_kl(base, ablated)
    assert chosen.ablation_kl == pytest.approx(expected, rel=2e-3, abs=1e-6)

    # Guards: the alternatives the audit names are far from that value on this model (else no test).
    reverse = _mean_kl(ablated, base)
    on_harmful = _mean_kl(base, _next_token_logprobs(ablated_model, chatml_tokenizer, harmful_val))
    assert expected > 1e-3
    assert abs(reverse - expected) > 0.02 * expected and abs(on_harmful - expected) > 0.02 * expected
