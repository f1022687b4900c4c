"""The objectives against independent computations: brute-force sums, torch's kl_div, and the
Monte-Carlo policy gradient of the sampled form (with and without its +1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from openrlhf_safesteer.objectives import (
    full_vocab_reverse_kl,
    gather_logprobs,
    localized_forward_kl,
    localized_reverse_kl,
    renormalized_reverse_kl,
    safety_metrics,
    sampled_advantages,
)

B, T, V = 4, 5, 11
SAFETY_IDS = torch.tensor([1, 4, 7, 9])


def make_batch(seed: int = 0):
    """Random logits and a ragged mask. Row 2 has no valid token: docs/METHOD.md section 4 averages over the
    sequences that have one, so it must not count in any mean (brute_force skips it; a loss that divided
    by B would be 3/4 of the expected value)."""
    gen = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    teacher_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.float64)
    return student_logits, teacher_logits, mask


def brute_force(student_logits, teacher_logits, mask, ids, term):
    """Python loops over sequences, positions and ids: an independent reading of docs/METHOD.md section 4."""
    per_sequence = []
    for b in range(student_logits.shape[0]):
        values = []
        for t in range(student_logits.shape[1]):
            if mask[b, t] == 0:
                continue
            ls = student_logits[b, t] - torch.logsumexp(student_logits[b, t], 0)
            lt = teacher_logits[b, t] - torch.logsumexp(teacher_logits[b, t], 0)
            values.append(sum(term(ls[v], lt[v]) for v in ids))
        if values:
            per_sequence.append(sum(values) / len(values))
    return sum(per_sequence) / len(per_sequence)


def teacher_on_s(teacher_logits):
    return torch.log_softmax(teacher_logits, -1)[..., SAFETY_IDS]


def test_reverse_kl_equals_brute_force_sum():
    student, teacher, mask = make_batch()
    loss, per_token = localized_reverse_kl(student, teacher_on_s(teacher), SAFETY_IDS, mask)
    expected = brute_force(student, teacher, mask, SAFETY_IDS.tolist(), lambda ls, lt: ls.exp() * (ls - lt))
    assert loss.item() == pytest.approx(float(expected), rel=1e-12)
    assert torch.all(per_token[mask == 0] == 0)


def test_forward_kl_equals_brute_force_sum():
    student, teacher, mask = make_batch(1)
    loss, _ = localized_forward_kl(student, teacher_on_s(teacher), SAFETY_IDS, mask)
    expected = brute_force(student, teacher, mask, SAFETY_IDS.tolist(), lambda ls, lt: lt.exp() * (lt - ls))
    assert loss.item() == pytest.approx(float(expected), rel=1e-12)


def test_renormalized_is_a_true_kl_between_distributions_on_s():
    student, teacher, mask = make_batch(2)
    loss, per_token = renormalized_reverse_kl(student, teacher_on_s(teacher), SAFETY_IDS, mask)
    ps = torch.softmax(student[..., SAFETY_IDS], -1)
    pt = torch.softmax(teacher[..., SAFETY_IDS], -1)
    expected = (ps * (ps.log() - pt.log())).sum(-1) * mask
    torch.testing.assert_close(per_token, expected)
    assert torch.all(per_token >= -1e-12)
    # Identical distributions on S give zero even though the teacher's mass elsewhere differs.
    shifted = student.clone()
    shifted[..., 0] += 5.0  # changes total mass on S but not the distribution within S
    zero, _ = renormalized_reverse_kl(student, torch.log_softmax(shifted, -1)[..., SAFETY_IDS], SAFETY_IDS, mask)
    assert zero.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_vocab_variant_equals_torch_kl_div(temperature):
    # Both logit sets are divided by the temperature (the student's and the teacher's); at T = 0.7 a
    # variant that forgot either division would differ from these references.
    student, teacher, mask = make_batch(3)
    loss, per_token = full_vocab_reverse_kl(student, teacher, mask, temperature)
    ls, lt = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    reference = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1) * mask  # KL(p_s || p_t)
    torch.testing.assert_close(per_token, reference)
    expected = brute_force(student / temperature, teacher / temperature, mask, range(V),
                           lambda l_s, l_t: l_s.exp() * (l_s - l_t))
    assert loss.item() == pytest.approx(float(expected), rel=1e-12)
    all_ids = torch.arange(V)
    subset_loss, _ = localized_reverse_kl(student, lt, all_ids, mask, temperature)
    assert loss.item() == pytest.approx(subset_loss.item(), rel=1e-12)


def test_masked_positions_get_exactly_zero_gradient():
    student, teacher, mask = make_batch(4)
    student = student.requires_grad_()
    loss, _ = localized_reverse_kl(student, teacher_on_s(teacher), SAFETY_IDS, mask)
    loss.backward()
    assert torch.all(student.grad[mask == 0] == 0)
    assert torch.all(student.grad[mask == 1].abs().sum(-1) > 0)


def test_temperature_scales_both_logit_sets_like_log_softmax():
    student, teacher, mask = make_batch(5)
    got = gather_logprobs(student, SAFETY_IDS, temperature=0.7)
    torch.testing.assert_close(got, torch.log_softmax(student / 0.7, -1)[..., SAFETY_IDS])
    sampled = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gather_logprobs(student, sampled),
                               torch.log_softmax(student, -1).gather(-1, sampled[..., None])[..., 0])


def test_sampled_advantage_formula_on_and_off_s():
    student_lp = torch.tensor([[-1.0, -2.0, -0.5]])
    teacher_lp = torch.tensor([[-3.0, -1.0, -0.25]])
    sampled = torch.tensor([[4, 5, 9]])
    mask = torch.tensor([[1, 1, 0]])
    adv = sampled_advantages(student_lp, teacher_lp, sampled, SAFETY_IDS, mask)
    # id 4 in S: -(-1 + 3 + 1) = -3; id 5 not in S: 0; id 9 in S but masked: 0.
    assert adv.tolist() == [[-3.0, 0.0, 0.0]]


def _policy_gradient_estimate(logits, teacher_lp_full, n_samples, plus_one, seed):
    """Mean over samples of the REINFORCE gradient -A * d log p(y) for y ~ p_s (one position)."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(logits.detach(), -1)
    ys = torch.multinomial(probs, n_samples, replacement=True, generator=gen)
    log_p = torch.log_softmax(logits, -1)
    student_lp = log_p[ys]
    teacher_lp = teacher_lp_full[ys]
    adv = sampled_advantages(student_lp[None], teacher_lp[None], ys[None], SAFETY_IDS, torch.ones(1, n_samples))[0]
    if not plus_one:  # the biased estimator: drop the +1 on tokens in S
        adv = adv + torch.isin(ys, SAFETY_IDS).to(adv.dtype)
    surrogate = -(adv * student_lp).mean()
    (grad,) = torch.autograd.grad(surrogate, logits)
    return grad


def test_sampled_policy_gradient_matches_exact_gradient_only_with_plus_one():
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(V, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    teacher_lp_full = torch.log_softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 1.5, -1)

    exact_loss, _ = localized_reverse_kl(logits[None, None], teacher_lp_full[SAFETY_IDS][None, None], SAFETY_IDS,
                                         torch.ones(1, 1))
    (exact_grad,) = torch.autograd.grad(exact_loss, logits)

    n = 200_000
    with_one = _policy_gradient_estimate(logits, teacher_lp_full, n, plus_one=True, seed=1)
    without_one = _policy_gradient_estimate(logits, teacher_lp_full, n, plus_one=False, seed=1)

    # Monte-Carlo error of each gradient coordinate, from the per-sample spread, bounds the check.
    probs = torch.softmax(logits.detach(), -1)
    ys = torch.multinomial(probs, 20_000, replacement=True, generator=torch.Generator().manual_seed(2))
    lp = torch.log_softmax(logits.detach(), -1)
    a = -(torch.isin(ys, SAFETY_IDS).double()) * (lp[ys] - teacher_lp_full[ys] + 1)
    per_sample = -a[:, None] * (F.one_hot(ys, V).double() - probs[None])  # d(-A log p)/dlogits per sample
    standard_error = per_sample.std(0) / math.sqrt(n)

    assert torch.all((with_one - exact_grad).abs() < 5 * standard_error + 1e-9)
    bias = (without_one - exact_grad).abs()
    assert bias.max() > 20 * standard_error.max(), "without +1 the estimate should be visibly biased"


def test_metrics_mass_and_kl():
    student, teacher, mask = make_batch(6)
    ls, lt = torch.log_softmax(student, -1)[..., SAFETY_IDS], teacher_on_s(teacher)
    metrics = safety_metrics(ls, lt, mask)
    loss, _ = localized_reverse_kl(student, lt, SAFETY_IDS, mask)
    assert metrics["kl_on_S"] == pytest.approx(loss.item(), rel=1e-9)
    student_mass = brute_force(student, teacher, mask, SAFETY_IDS.tolist(), lambda l_s, l_t: l_s.exp())
    teacher_mass = brute_force(student, teacher, mask, SAFETY_IDS.tolist(), lambda l_s, l_t: l_t.exp())
    assert metrics["student_mass_on_S"] == pytest.approx(float(student_mass), rel=1e-9)
    assert metrics["teacher_mass_on_S"] == pytest.approx(float(teacher_mass), rel=1e-9)
    # the two masses differ here, so a metric that reported one for the other would fail above
    assert abs(float(student_mass) - float(teacher_mass)) > 1e-3


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([0, V]), "must lie in \\[0, 11\\)"),
        (torch.tensor([-1, 2]), "must lie in \\[0, 11\\)"),
        (torch.tensor([], dtype=torch.long), "non-empty 1-D"),
        (torch.tensor([1.0, 2.0]), "integer tensor"),
    ],
)
def test_bad_safety_ids_are_rejected_with_a_clear_error(ids, message):
    student, teacher, mask = make_batch()
    with pytest.raises((ValueError, TypeError), match=message):
        localized_reverse_kl(student, torch.zeros(B, T, max(ids.numel(), 1)), ids, mask)


def test_teacher_shape_mismatch_is_rejected():
    student, teacher, mask = make_batch()
    with pytest.raises(ValueError, match=r"expected \(B, T, \|S\|\)"):
        localized_reverse_kl(student, torch.zeros(B, T, V), SAFETY_IDS, mask)
