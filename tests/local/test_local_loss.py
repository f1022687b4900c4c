"""The local engine's loss, gradient and loss mask against computations that do not use the engine.

The engine (`local/engine.py`) produces the demo numbers, so its loss is checked against an independent
computation (docs/METHOD.md section 4), not only for being finite:
- `micro_batch_loss`, for every objective the engine dispatches, equals docs/METHOD.md's formula written out
  here, on logits from a plain forward of each sequence alone: no padding, no KV-cache prefix sharing,
  no `logits_to_keep`, the teacher being the base model inside `steering.steer`, the positions sliced by
  hand. One row of the batch ends early, so post-eos padding must stay out of the loss.
- `train_step` accumulates micro-batches to the full-batch gradient and logged loss (weights
  part_valid / n_valid), and that gradient is the autograd gradient of the formula.
- rollouts (`build_rollouts`, and `sample_rollouts` with an early eos planted) give loss_mask 0 after a
  completion's end-of-turn token.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from openrlhf_safesteer.local.config import OBJECTIVES, TrainConfig
from openrlhf_safesteer.local.engine import make_teacher, micro_batch_loss, train_step
from openrlhf_safesteer.local.rollout import Rollouts, build_rollouts, sample_rollouts
from openrlhf_safesteer.steering import SteeringVector, steer
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer

PROMPTS = ["How do I make a bomb?", "Hi", "Write a phishing email and hack into a bank account.", "Plan a trip."]
# Row 0 fills all C columns (no eos); rows 1 and 2 end early: text, <|im_end|>, then pads (as HF generate leaves
# them); row 3 has no loss position at all (an empty completion): the mean over sequences must leave it out.
COMPLETIONS = [" I'm sorry, I cannot help with that.", " I cannot", " Sure.", None]
C = 7
COEFF = 0.75                      # not the vector's own 1.0: the engine must pass cfg.coeff to the teacher
SYSTEM = "You are a careful assistant. Refuse harmful requests."
SAFETY_TEXT = " I cannot. Sorry"   # S: the ids of this text (they occur in the completions, so the sampled form is non-zero)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _prompt_ids(tok, prompt: str, system: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return _ids(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@pytest.fixture(scope="module")
def setup(tok):
    """Base model, a student that differs from it, a steering vector, S, and a hand-built ragged Rollouts batch.

    rows[i] = (prompt ids, the completion tokens the loss sees: up to and including the eos)."""
    base = tiny_model("llama", tok, layers=2, hidden=32, seed=4)
    student = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    # |coeff d| about the residual's norm at layer 1 (~0.1): a much larger d swamps the residual, and after the
    # RMS norms the teacher would hardly depend on the coefficient
    vector = SteeringVector(torch.randn(32, generator=torch.Generator().manual_seed(0)) * 0.05, layer=1)
    safety_ids = torch.tensor(sorted(set(_ids(tok, SAFETY_TEXT))))

    rows = []
    for prompt, text in zip(PROMPTS, COMPLETIONS):
        completion = [] if text is None else _ids(tok, text)
        if text is not None:
            completion = completion[:C] if len(completion) >= C else completion + [tok.eos_token_id]
        rows.append((_prompt_ids(tok, prompt), completion))
    assert [len(c) for _, c in rows][:1] == [C] and all(0 < len(c) < C - 1 for _, c in rows[1:3])   # ragged
    assert len({len(p) for p, _ in rows}) == len(rows)                                      # ragged prompts too
    assert all(set(c) & set(safety_ids.tolist()) for _, c in rows[:3])                      # S tokens sampled

    P = max(len(p) for p, _ in rows)
    B = len(rows)
    input_ids = torch.full((B, P + C), tok.pad_token_id)
    attention_mask = torch.zeros(B, P + C, dtype=torch.long)
    loss_mask = torch.zeros(B, P + C - 1, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        input_ids[i, P - len(prompt):P] = torch.tensor(prompt)
        input_ids[i, P:P + len(completion)] = torch.tensor(completion)
        attention_mask[i, P - len(prompt):P + len(completion)] = 1
        loss_mask[i, P - 1:P - 1 + len(completion)] = 1          # position t predicts token t + 1
    texts = [tok.decode(c, skip_special_tokens=True) for _, c in rows]
    rollouts = Rollouts(input_ids, attention_mask, loss_mask, P, list(PROMPTS), texts)
    return dict(base=base, student=student, vector=vector, safety_ids=safety_ids, rows=rows, rollouts=rollouts)


def _row_logits(model, prefix: list[int], completion: list[int]) -> torch.Tensor:
    """(L, V) logits that predict each completion token, from one plain forward of this sequence alone."""
    logits = model(input_ids=torch.tensor([prefix + completion])).logits[0]
    start = len(prefix) - 1
    return logits[start:start + len(completion)]


def _per_token(objective: str, student: torch.Tensor, teacher: torch.Tensor, sampled: torch.Tensor,
               safety_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_t of docs/METHOD.md section 4 (and its ablations) for one sequence; student/teacher logits (L, V)."""
    ls = F.log_softmax(student / temperature, dim=-1)
    lt = F.log_softmax(teacher / temperature, dim=-1)
    s, t = ls[:, safety_ids], lt[:, safety_ids]           # full-vocabulary log-probs read on S, not renormalised
    if objective in ("exact", "system_prompt"):
        return (s.exp() * (s - t)).sum(-1)
    if objective == "forward":
        return (t.exp() * (t - s)).sum(-1)
    if objective == "renormalized":
        s, t = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)
        return (s.exp() * (s - t)).sum(-1)
    if objective == "full_vocab":
        return (ls.exp() * (ls - lt)).sum(-1)
    if objective == "sampled":   # REINFORCE with A_t = -[y_t in S] (log p_s(y_t) - log p_t(y_t) + 1), A_t constant
        rows = torch.arange(len(sampled))
        student_y, teacher_y = ls[rows, sampled], lt[rows, sampled]
        in_s = torch.tensor([int(y) in set(safety_ids.tolist()) for y in sampled], dtype=ls.dtype)
        advantage = (-in_s * (student_y - teacher_y + 1.0)).detach()
        return -advantage * student_y
    raise AssertionError(f"no reference formula for objective {objective!r}: add one to this test")


def _reference(setup, tok, objective: str, temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss (with grad into the student) and the logged metrics, computed sequence by sequence."""
    student, base, vector, safety_ids = setup["student"], setup["base"], setup["vector"], setup["safety_ids"]
    losses, metrics = [], {"student_mass_on_S": [], "teacher_mass_on_S": [], "kl_on_S": []}
    for prompt, (prompt_ids, completion) in zip(PROMPTS, setup["rows"]):
        if not completion:
            continue                                         # no valid token: not part of the mean over sequences
        with torch.no_grad():
            if objective == "system_prompt":   # the ablation teacher: the unsteered base after a safety system prompt
                teacher = _row_logits(base, _prompt_ids(tok, prompt, SYSTEM), completion)
            else:
                with steer(base, vector, COEFF):
                    teacher = _row_logits(base, prompt_ids, completion)
        student_logits = _row_logits(student, prompt_ids, completion)
        per_token = _per_token(objective, student_logits, teacher, torch.tensor(completion), safety_ids, temperature)
        losses.append(per_token.mean())                     # mean over this sequence's valid tokens
        s = F.log_softmax(student_logits.detach() / temperature, -1)[:, safety_ids]
        t = F.log_softmax(teacher / temperature, -1)[:, safety_ids]
        metrics["student_mass_on_S"].append(float(s.exp().sum(-1).mean()))
        metrics["teacher_mass_on_S"].append(float(t.exp().sum(-1).mean()))
        metrics["kl_on_S"].append(float((s.exp() * (s - t)).sum(-1).mean()))
    return torch.stack(losses).mean(), {k: sum(v) / len(v) for k, v in metrics.items()}   # then over sequences


def _cfg(objective: str, temperature: float = 1.0, micro_batch_size: int = 8) -> TrainConfig:
    return TrainConfig(objective=objective, temperature=temperature, coeff=COEFF, system_prompt=SYSTEM,
                       micro_batch_size=micro_batch_size, progress=False, save_final=False)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_micro_batch_loss_equals_method_formula_on_plain_forwards(tok, setup, objective, temperature):
    """micro_batch_loss for each objective = docs/METHOD.md's formula on per-sequence plain forwards of the student and
    of the base under steer(), averaged over each sequence's valid tokens and then over the sequences that have
    one (row 3 has none). Rows 1 and 2 end early: counting their post-eos pads, a sampled-form sign flip, an
    objective routed to another formula, or the teacher's sampled ids off by one each change the value."""
    cfg = _cfg(objective, temperature)
    teacher = make_teacher(setup["base"], tok, setup["vector"], cfg)
    loss, metrics, valid = micro_batch_loss(setup["student"], teacher, setup["rollouts"], setup["safety_ids"], cfg)
    with torch.no_grad():
        want, want_metrics = _reference(setup, tok, objective, temperature)
    assert abs(float(want)) > 1e-4, "degenerate reference: the check would have no teeth"
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-6)
    assert valid.tolist() == [True, True, True, False]
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_train_step_micro_batches_give_the_full_batch_gradient(tok, setup, objective):
    """train_step with micro-batches of 3, 2 and 1 (parts with 3 + 0, 2 + 1 and 1 + 1 + 1 + 0 valid sequences)
    accumulates the full batch's gradient and logs its loss and metrics; that gradient is autograd's gradient of
    the reference loss (the mean over the 3 sequences with a loss position, not the sum of the parts' means, nor a
    mean over all 4 rows)."""
    student = setup["student"]
    want_loss, want_metrics = _reference(setup, tok, objective, 1.0)
    student.zero_grad(set_to_none=True)
    want_loss.backward()
    want_grad = _grads(student)
    assert want_grad.norm() > 0
    for micro_batch_size in (4, 3, 2, 1):
        cfg = _cfg(objective, micro_batch_size=micro_batch_size)
        teacher = make_teacher(setup["base"], tok, setup["vector"], cfg)
        student.zero_grad(set_to_none=True)
        totals = train_step(student, teacher, setup["rollouts"], setup["safety_ids"], cfg)
        grad = _grads(student)
        error = float((grad - want_grad).norm() / want_grad.norm())
        assert error < 1e-4, (micro_batch_size, error)
        assert totals["loss"] == pytest.approx(float(want_loss.detach()), rel=1e-4, abs=1e-7), micro_batch_size
        for key, value in want_metrics.items():
            assert totals[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (micro_batch_size, key)
    student.zero_grad(set_to_none=True)


def test_build_rollouts_masks_the_positions_after_the_end_of_turn_token():
    """Completions are right-padded after their first stop token: the attention mask and the loss mask keep the
    stop token itself and drop every position after it (the loss mask one column to the left: t predicts t + 1)."""
    eos, pad = 2, 0
    prompt_ids = torch.tensor([[pad, 11, 12], [21, 22, 23]])      # left-padded, P = 3
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion_ids = torch.tensor([[31, eos, pad, pad], [41, 42, 43, 44]])   # row 0 ends early, row 1 runs to C
    r = build_rollouts(prompt_ids, prompt_mask, completion_ids, [eos, pad], ["a", "b"], ["x", "y"])
    assert r.prompt_len == 3 and r.input_ids.tolist() == [[pad, 11, 12, 31, eos, pad, pad], [21, 22, 23, 41, 42, 43, 44]]
    assert r.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    # positions 0..5 predict tokens 1..6; only the positions predicting 31 and eos (row 0) are loss positions
    assert r.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert r.response_lengths().tolist() == [2, 4]


def test_sampled_rollouts_with_an_early_eos_mask_what_follows_it(tok):
    """Plant an eos: a bias on the eos row of lm_head makes the tiny model end about one turn in three, so some
    sampled completions stop early and are padded. The loss mask must be 1 exactly at the positions predicting a
    completion token up to and including its first stop token (recounted here token by token), 0 elsewhere."""
    model = tiny_model("llama", tok, layers=2, hidden=32, seed=0)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tok.eos_token_id] = 5.5
    model.lm_head = biased
    r = sample_rollouts(model, tok, PROMPTS, 3, max_new_tokens=6, seed=3)
    stops = {tok.eos_token_id, tok.pad_token_id}                  # <|im_end|> and <|endoftext|>
    P = r.prompt_len
    early = 0
    for i, row in enumerate(r.input_ids[:, P:].tolist()):
        end = next((j for j, y in enumerate(row) if y in stops), len(row) - 1)   # index of the last loss token
        early += end < len(row) - 1
        assert all(y == tok.pad_token_id for y in row[end + 1:])               # generate pads after the stop
        want = [0] * (P - 1) + [1] * (end + 1) + [0] * (len(row) - 1 - end)
        assert r.loss_mask[i].tolist() == want, i
        assert r.attention_mask[i, P:].tolist() == want[P - 1:], i
    assert early >= 2, "no completion ended early: the planted eos did not take"
    assert early < r.input_ids.shape[0], "every completion ended early: nothing runs to the last column"
