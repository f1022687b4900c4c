"""select_safety_tokens: an independent recount at horizon > 1 on a tiny model with planted end-of-turn
positions (fast); on the toy refusal model (slow: trained once per session, 80 small steps) an
independent recount at horizon 1, the planted refusal tokens recovered at a longer horizon,
determinism, and clear errors. Also the "<|" rule of the banned-token mask."""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer import safety_tokens
from openrlhf_safesteer.directions import last_token_logprobs
from openrlhf_safesteer.safety_tokens import banned_token_mask, select_safety_tokens
from openrlhf_safesteer.steering import IncompatibleArtifactError, SteeringVector, steer
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer
from openrlhf_safesteer.toy import REFUSAL_REPLY


@pytest.fixture(scope="module")
def toy_vector(toy_selection):
    return toy_selection[0]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bad_input_fails_before_compute(toy_refusal):
    model, tok, _, harmless = toy_refusal
    good = SteeringVector(torch.ones(model.config.hidden_size), layer=1)
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        select_safety_tokens(model, tok, good, harmless[:2], horizon=0)
    with pytest.raises(ValueError, match="non-empty list"):
        select_safety_tokens(model, tok, good, [])
    with pytest.raises(IncompatibleArtifactError, match="hidden size"):
        select_safety_tokens(model, tok, SteeringVector(torch.ones(7), layer=1), harmless[:2])


# ----------------------------------------------------------------------------- horizon > 1, fast

END_NAMES = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")  # the tiny tokenizer's end-of-turn/-text tokens
PROMPTS = ["Plan a trip to Rome.", "Write a poem about the sea.", "Explain photosynthesis."]
HORIZON, N_SAMPLES = 4, 2


def _planted_model(tok):
    """A tiny float64 llama where the base model ends the turn right after the token "pon", and the
    steered teacher does not.

    "pon"'s embedding is 8 u and the <|im_end|> row of the LM head is 5 u, so at "pon" the base's argmax is
    <|im_end|>; the steering vector (2 x 6 r, at layer 1, r orthogonal to u) outweighs it and the teacher's
    argmax there is "Sorry" (LM-head row 5 r). The other LM-head rows are scaled up so that end-of-turn is
    never the base's argmax elsewhere.
    """
    model = tiny_model("llama", tok, layers=2, hidden=32, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    u, r = basis[:, 0], basis[:, 1]
    marker, opener = tok.convert_tokens_to_ids("pon"), tok.convert_tokens_to_ids("Sorry")
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
        model.model.embed_tokens.weight[marker] = 8 * u
        model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>")] = 5 * u
        model.lm_head.weight[opener] = 5 * r
    return model, SteeringVector(6 * r, layer=1, coeff=2.0), marker


def _logprobs(model, ids, add=None, layer=1):
    """Full forward of one unpadded row (1, L) -> log-probs (L, V) float64; `add` (H,) is added to the input
    of decoder block `layer` at every position by a hook of this test (not the package's steer)."""
    handle = None
    if add is not None:
        handle = model.model.layers[layer].register_forward_pre_hook(
            lambda module, args: (args[0] + add.to(args[0].dtype), *args[1:]))
    try:
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0].double(), -1)
    finally:
        if handle is not None:
            handle.remove()


def _expected_vote(rows, banned, k, k_prime, min_prob, mean_over_valid=True):
    """docs/METHOD.md section 3 by hand from per-row (teacher, base, valid); mean_over_valid=False is the
    wrong rule (mean teacher probability over every position), used to show the scenario tells them apart."""
    teacher = torch.stack([t for t, _, _ in rows])                        # (N, H, V)
    base = torch.stack([b for _, b, _ in rows])
    valid = torch.stack([v for _, _, v in rows])                          # (N, H)
    if mean_over_valid:
        mean_prob = teacher[valid].exp().mean(0)
    else:
        mean_prob = teacher.exp().flatten(0, 1).mean(0)
    allowed = ~(banned | (mean_prob < min_prob))
    counts, log_ratio = {}, torch.zeros(teacher.shape[-1], dtype=torch.float64)
    for n in range(teacher.shape[0]):
        for h in range(teacher.shape[1]):
            if not valid[n, h]:
                continue
            delta = teacher[n, h] - base[n, h]
            log_ratio += delta
            ranked = sorted((i for i in range(len(delta)) if allowed[i]), key=lambda i: -float(delta[i]))
            for i in ranked[:k_prime]:
                if delta[i] > 0:
                    counts[i] = counts.get(i, 0) + 1
    ids = sorted(counts, key=lambda i: (-counts[i], -float(log_ratio[i]), i))[:k]
    return ids, [counts[i] for i in ids]


def test_horizon_four_matches_an_independent_recount(monkeypatch):
    """At H = 4 the vote needs three docs/METHOD.md section 3 rules that H = 1 never exercises: continuations
    sampled from the STEERED model, validity from the BASE model's argmax (the first end-of-turn and all
    after it are dropped), and min_prob applied to the mean teacher probability over VALID positions only.

    The sampler is replaced by one that checks the steering hook is live (a probe forward must give the
    steered logits) and returns planted continuations; in them "pon" makes the base, not the teacher, end
    the turn. Teacher and base are then recomputed here row by row (no padding, this test's own hook)."""
    tok = tiny_tokenizer()
    model, vector, marker = _planted_model(tok)
    end_ids = {tok.convert_tokens_to_ids(name) for name in END_NAMES}
    add = vector.coeff * vector.vector.double()
    probe = torch.tensor([[5, 17, 42, marker, 99]])
    steered_probe, base_probe = _logprobs(model, probe, add), _logprobs(model, probe)
    assert (steered_probe - base_probe).abs().max() > 1.0

    a, b, c = (tok.convert_tokens_to_ids(t) for t in ("gar", "den", "vel"))
    continuations = [[[a, b, c], [marker, a, b]], [[a, marker, b], [b, c, marker]], [[c, a, b], [b, marker, marker]]]
    rendered = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                            add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                for p in PROMPTS]
    served, probes = [], []

    def planted_sampler(model_, input_ids, attention_mask, length, generator, forbidden_ids=(), **kwargs):
        assert length == HORIZON - 1 and end_ids <= set(forbidden_ids)
        with torch.no_grad():
            probes.append(torch.log_softmax(model_(probe).logits[0].double(), -1))
        out = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = rendered.index(ids[mask.bool()].tolist())
            sample = sum(p == prompt for p, _ in served)
            served.append((prompt, sample))
            out.append(continuations[prompt][sample])
        return torch.tensor(out, dtype=torch.long, device=input_ids.device)

    monkeypatch.setattr(safety_tokens, "sample_continuations", planted_sampler)

    rows = []
    for prompt, samples in zip(rendered, continuations):
        for continuation in samples:
            ids = torch.tensor([prompt + continuation])
            answer = slice(len(prompt) - 1, len(prompt) + HORIZON - 1)   # the last prompt token + H - 1 more
            teacher, base = _logprobs(model, ids, add)[answer], _logprobs(model, ids)[answer]
            ends = torch.tensor([int(i) in end_ids for i in base.argmax(-1)])
            rows.append((teacher, base, ends.long().cumsum(0) == 0))
    valid = torch.stack([v for _, _, v in rows])
    # the plant holds: the base ends the turn right after each "pon", the teacher never ends it
    assert valid.sum(1).tolist() == [4, 1, 2, 3, 4, 2]
    assert not any(int(i) in end_ids for t, _, _ in rows for i in t.argmax(-1))

    vocab = tok.get_vocab()
    banned = torch.zeros(len(tok), dtype=torch.bool)
    banned[[i for token, i in vocab.items() if "<|" in token] + list(tok.all_special_ids)] = True
    k, k_prime = len(tok), 40   # k = V: every id with a vote is in the result, so any change of the ban shows
    # min_prob halfway (in log) between a voted id's mean teacher probability over valid positions and
    # over all positions, so the two means ban different ids and give different results
    teacher_all = torch.stack([t for t, _, _ in rows]).exp()
    over_valid, over_all = teacher_all[valid].mean(0), teacher_all.flatten(0, 1).mean(0)
    voted, _ = _expected_vote(rows, banned, k, k_prime, 0.0)
    gap = {i: abs(float(over_valid[i].log() - over_all[i].log())) for i in voted}
    token = max(gap, key=gap.get)
    min_prob = float((over_valid[token] * over_all[token]).sqrt())
    expected_ids, expected_votes = _expected_vote(rows, banned, k, k_prime, min_prob)
    assert (expected_ids, expected_votes) != _expected_vote(rows, banned, k, k_prime, min_prob, mean_over_valid=False)

    result = select_safety_tokens(model, tok, vector, PROMPTS, horizon=HORIZON, n_samples=N_SAMPLES, k=k,
                                  k_prime=k_prime, min_prob=min_prob, batch_size=4, seed=0, progress=False)
    assert sorted(served) == [(p, s) for p in range(len(PROMPTS)) for s in range(N_SAMPLES)]
    assert len(probes) == 2   # two batches (4 + 2 rows), each sampled under the steering hook
    for got in probes:
        torch.testing.assert_close(got, steered_probe, rtol=1e-6, atol=1e-6)
    assert result.config["n_valid_positions"] == int(valid.sum()) == 16
    assert result.ids == expected_ids
    assert result.votes == expected_votes


def test_banned_mask_bans_any_token_containing_the_special_marker():
    # An ordinary (not special) token whose text holds "<|" must be banned by its text alone; the tiny
    # vocabulary's own "<|" tokens are all special, so they cannot show this rule.
    tok = tiny_tokenizer()
    tok.add_tokens(["a<|b", "a<b", "a|b"])
    marked, lt, bar = tok.convert_tokens_to_ids(["a<|b", "a<b", "a|b"])
    assert marked not in tok.all_special_ids
    banned = banned_token_mask(tok, len(tok))
    assert banned[marked]
    assert not banned[lt] and not banned[bar]
