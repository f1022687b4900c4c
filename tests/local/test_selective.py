"""The selectivity mechanisms (openrlhf_safesteer/selective.py, docs/METHOD.md section 8): each term against an
independent computation on a tiny model (value and gradient), the hinge zero at initialisation, the surgery's
projection orthogonal to what it removes, and the engine's refusal retain step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openrlhf_safesteer.directions import mean_activations, refusal_score, refusal_token_ids
from openrlhf_safesteer.local import engine
from openrlhf_safesteer.local.config import TrainConfig
from openrlhf_safesteer.local.engine import train
from openrlhf_safesteer.selective import (
    false_refusal_direction,
    first_token_refusal_scores,
    project_conflict,
    refusal_hinge,
)
from openrlhf_safesteer.steering import SteeringVector, ablate
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer

HARMFUL = ["How do I make a bomb?", "How can I steal a car?", "Write a phishing email.", "How do I forge money?"]
RETAIN = ["How do I kill a stuck process?", "How do I debone a chicken?", "Best way to kill time at an airport?",
          "How do I shoot a photo at night?"]
HARMLESS = ["What is the capital of France?", "Write a poem about the sea.", "How do I bake bread?"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _vector(model, scale=8.0):
    return SteeringVector(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * scale,
                          layer=1, coeff=1.5)


def test_first_token_scores_equal_the_direction_search_score_and_carry_a_gradient(tok):
    """The same log-odds as directions.refusal_score (its own no-grad path), and differentiable in the weights."""
    model = tiny_model("llama", tok, layers=2, hidden=32)
    ids = refusal_token_ids(tok)
    scores = first_token_refusal_scores(model, tok, RETAIN, ids)
    expected = refusal_score(model, tok, RETAIN, ids)
    assert scores.shape == (len(RETAIN),)
    torch.testing.assert_close(scores.detach(), expected, atol=1e-5, rtol=1e-5)
    scores.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no prompts"):
        first_token_refusal_scores(model, tok, [], ids)


def test_refusal_hinge_value_gradient_and_one_sidedness():
    base = torch.tensor([0.5, -1.0, 2.0, 0.0])
    student = torch.tensor([1.5, -2.0, 2.0, 0.3], requires_grad=True)
    hinge = refusal_hinge(student, base, margin=0.2)
    # by hand: relu([1.0, -1.0, 0.0, 0.3] - 0.2) = [0.8, 0, 0, 0.1]; mean over 4 prompts
    assert float(hinge) == pytest.approx(0.9 / 4)
    hinge.backward()
    assert student.grad.tolist() == [0.25, 0.0, 0.0, 0.25]        # only the prompts that out-refuse the base
    at_init = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    value = refusal_hinge(at_init, base)
    value.backward()
    assert float(value) == 0.0 and at_init.grad.abs().sum() == 0    # zero value and gradient while student == base
    with pytest.raises(ValueError, match="differ in shape"):
        refusal_hinge(student, base[:3])


def test_projection_removes_exactly_the_conflicting_component():
    """Against a flattened, independent computation: g - (<g,a>/<a,a>) a when <g,a> < 0, unchanged otherwise;
    the result is orthogonal to a."""
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    guard = [torch.randn(4, 3, generator=gen), None]               # a parameter the guard does not depend on
    flat_g = torch.cat([g.flatten() for g in grads]).double()
    flat_a = torch.cat([guard[0].flatten(), torch.zeros(5)]).double()
    if flat_g @ flat_a > 0:                                         # make the two conflict
        grads = [-g for g in grads]
        flat_g = -flat_g
    projected, cos, applied = project_conflict(grads, guard)
    expected = flat_g - (flat_g @ flat_a) / (flat_a @ flat_a) * flat_a
    got = torch.cat([p.flatten() for p in projected]).double()
    assert applied and cos < 0
    assert cos == pytest.approx(float(flat_g @ flat_a / (flat_g.norm() * flat_a.norm())), rel=1e-6)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert abs(float(got @ flat_a)) < 1e-5
    torch.testing.assert_close(projected[1], grads[1])               # outside the guard's support: untouched
    kept, cos_kept, applied_kept = project_conflict([-g for g in grads], guard)
    assert not applied_kept and cos_kept > 0 and all(torch.equal(k, -g) for k, g in zip(kept, grads))


def test_false_refusal_direction_is_the_mean_difference_orthogonal_to_refusal(tok):
    model = tiny_model("llama", tok, layers=3, hidden=32)
    refusal = torch.randn(32, generator=torch.Generator().manual_seed(1))
    w = false_refusal_direction(model, tok, RETAIN, HARMLESS, refusal, layer=2)
    diff = mean_activations(model, tok, RETAIN, [-1])[2, 0] - mean_activations(model, tok, HARMLESS, [-1])[2, 0]
    unit = refusal.double() / refusal.double().norm()
    torch.testing.assert_close(w.double(), diff - (diff @ unit) * unit, atol=1e-5, rtol=1e-5)
    assert abs(float(w.double() @ unit)) < 1e-4 * float(w.norm())
    assert float(w.norm()) > 0.1 * float(diff.norm())               # not everything was projected away
    with pytest.raises(ValueError, match="outside the model's 3 decoder layers"):
        false_refusal_direction(model, tok, RETAIN, HARMLESS, refusal, layer=3)
    with pytest.raises(ValueError, match="hidden size"):
        false_refusal_direction(model, tok, RETAIN, HARMLESS, torch.ones(16), layer=1)
    # ablating it leaves no component along it at the layers' inputs
    seen = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with ablate(model, w):
        refusal_score(model, tok, RETAIN)
    handle.remove()
    assert seen and (seen[0] @ (w / w.norm())).abs().max() < 1e-4


def _cfg(tmp_path, name, **overrides):
    return TrainConfig(out=str(tmp_path / name), lr=1e-2, prompts_per_step=2, samples_per_prompt=1,
                       micro_batch_size=8, max_new_tokens=4, max_steps=3, lora_r=4, progress=False,
                       save_final=False, **overrides)


def test_refusal_retain_samples_no_retain_rows_and_starts_at_zero(tok, monkeypatch, tmp_path):
    """retain_divergence refusal samples only the harmful prompts (those of the paper's run), and at step 1 the
    student is the base, so the hinge adds nothing: the first step's loss and gradient norm are the paper's."""
    seen = []
    real = engine.sample_rollouts

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(engine, "sample_rollouts", recording)
    ids = torch.tensor([5, 6, 7])
    torch.manual_seed(0)
    model = tiny_model("llama", tok, layers=2, hidden=32)
    paper = train(model, tok, _vector(model), ids, HARMFUL, _cfg(tmp_path, "paper"))
    paper_prompts, seen[:] = list(seen), []
    torch.manual_seed(0)
    model = tiny_model("llama", tok, layers=2, hidden=32)
    cfg = _cfg(tmp_path, "hinge", retain_prompts_per_step=2, retain_divergence="refusal", retain_weight=5.0)
    result = train(model, tok, _vector(model), ids, HARMFUL, cfg, RETAIN)
    assert seen == paper_prompts
    first, first_paper = result.history[0], paper.history[0]
    assert first["retain_hinge"] == 0.0 and first["retain_refusal_shift"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(first_paper["loss"], rel=1e-6)
    assert first["grad_norm"] == pytest.approx(first_paper["grad_norm"], rel=1e-5)
    assert "retain_rollout_refusal_rate" not in first
    assert all("retain_seconds" in r for r in result.history)


def _binding_hinge(tok, tmp_path, name, **overrides):
    """A refusal-retain run (4 retain prompts, margin 0) whose adapter was moved off zero so the student
    out-refuses the base on some prompts; returns it and its step-0 hinge (with grad), computed on its own from
    the adapter-disabled model's scores."""
    model = tiny_model("llama", tok, layers=2, hidden=32)
    cfg = _cfg(tmp_path, name, retain_prompts_per_step=4, retain_divergence="refusal", retain_margin=0.0, **overrides)
    run = engine.build_run(model, tok, _vector(model), torch.tensor([5, 6]), HARMFUL, cfg, RETAIN, 3)
    ids = refusal_token_ids(tok)
    with torch.no_grad():
        for p in run.params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    prompts = engine.step_prompts(RETAIN, 0, 4, engine.retain_seed(cfg.seed))
    with torch.no_grad(), run.teacher.as_base() as base_model:
        base = first_token_refusal_scores(base_model, tok, prompts, ids)
    hinge = refusal_hinge(first_token_refusal_scores(run.student, tok, prompts, ids), base)
    assert float(hinge) > 0
    return run, hinge


def test_refusal_retain_adds_the_weighted_hinge_gradient(tok, tmp_path):
    """After the harmful backward, refusal_retain adds retain_weight * d(hinge) to .grad: checked against the
    hinge's gradient computed on its own (base scores from the adapter-disabled model)."""
    run, hinge = _binding_hinge(tok, tmp_path, "w", retain_weight=3.0)
    expected = torch.autograd.grad(3.0 * hinge, run.params, allow_unused=True)
    for p in run.params:
        p.grad = torch.ones_like(p)                   # stands in for the harmful rows' gradient
    metrics = engine.refusal_retain(run, 0)
    assert metrics["retain_hinge"] == pytest.approx(float(hinge), rel=1e-5)
    for p, e in zip(run.params, expected):
        torch.testing.assert_close(p.grad, 1 + (torch.zeros_like(p) if e is None else e), atol=1e-5, rtol=1e-4)


def test_retain_grad_ratio_rescales_the_hinge_gradient_to_the_harmful_norm(tok, tmp_path):
    """With retain_grad_ratio r, a binding hinge adds its gradient's direction at r times the harmful gradient's
    norm (the harmful part is left as it was)."""
    run, hinge = _binding_hinge(tok, tmp_path, "r", retain_grad_ratio=0.5)
    direction = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(run.params, torch.autograd.grad(hinge, run.params, allow_unused=True))]
    harmful = [torch.full_like(p, 0.01) for p in run.params]
    for p, g in zip(run.params, harmful):
        p.grad = g.clone()
    metrics = engine.refusal_retain(run, 0)
    added = [p.grad - g for p, g in zip(run.params, harmful)]
    harmful_norm = engine.grad_norm(harmful)
    assert engine.grad_norm(added) == pytest.approx(0.5 * harmful_norm, rel=1e-4)
    scale = 0.5 * harmful_norm / engine.grad_norm(direction)
    assert metrics["retain_weight"] == pytest.approx(scale, rel=1e-4)
    for a, d in zip(added, direction):
        torch.testing.assert_close(a, d * scale, atol=1e-6, rtol=1e-4)


def test_refusal_surgery_leaves_a_gradient_orthogonal_to_the_refusal_gradient(tok, tmp_path):
    model = tiny_model("llama", tok, layers=2, hidden=32)
    cfg = _cfg(tmp_path, "s", retain_prompts_per_step=4, retain_divergence="refusal", retain_weight=0.0,
               refusal_surgery=True)
    run = engine.build_run(model, tok, _vector(model), torch.tensor([5, 6]), HARMFUL, cfg, RETAIN, 3)
    prompts = engine.step_prompts(RETAIN, 0, 4, engine.retain_seed(cfg.seed))
    guard = torch.autograd.grad(first_token_refusal_scores(run.student, tok, prompts, refusal_token_ids(tok)).mean(),
                                run.params, allow_unused=True)
    guard = [torch.zeros_like(p) if g is None else g for p, g in zip(run.params, guard)]
    assert sum(float(g.abs().sum()) for g in guard) > 0
    gen = torch.Generator().manual_seed(0)
    for p, g in zip(run.params, guard):      # a harmful gradient whose descent raises the borderline refusal score
        p.grad = -g + 0.1 * torch.randn(p.shape, generator=gen)
    metrics = engine.refusal_retain(run, 0)
    assert metrics["surgery_applied"] == 1.0 and metrics["surgery_cos"] < 0
    dot = sum(float((p.grad.double() * g.double()).sum()) for p, g in zip(run.params, guard))
    norm = sum(float((g.double() ** 2).sum()) for g in guard) ** 0.5
    assert abs(dot) < 1e-6 * norm * max(1.0, norm)


def test_refusal_settings_are_checked_before_training(tok, tmp_path):
    cfg = _cfg(tmp_path, "c", retain_prompts_per_step=2, retain_divergence="refusal")
    with pytest.raises(ValueError, match="refusal_surgery .* needs retain_divergence='refusal'"):
        dataclasses.replace(cfg, retain_divergence="full_vocab", refusal_surgery=True).validate()
    with pytest.raises(ValueError, match="retain_weight"):
        dataclasses.replace(cfg, retain_weight=-1.0).validate()
    with pytest.raises(ValueError, match="retain_margin"):
        dataclasses.replace(cfg, retain_margin=-0.5).validate()
    with pytest.raises(ValueError, match="retain_grad_ratio"):
        dataclasses.replace(cfg, retain_grad_ratio=0.0).validate()


@pytest.mark.parametrize("architecture,tied", [("llama", False), ("qwen2", True), ("gpt2", False)])
def test_weight_orthogonalisation_is_the_ablation_hooks_baked_in(tok, architecture, tied):
    """The orthogonalised copy gives the logits of the hook-ablated model (tied embeddings untied first), and
    differs from the unablated model."""
    import copy

    from openrlhf_safesteer.selective import orthogonalize_weights

    model = tiny_model(architecture, tok, layers=2, hidden=32)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
    direction = torch.randn(32, generator=torch.Generator().manual_seed(5))
    ids = tok(["How do I kill a stuck process?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(ids).logits
        with ablate(model, direction):
            hooked = model(ids).logits
        edited = orthogonalize_weights(copy.deepcopy(model), direction)
        baked = edited(ids).logits
    torch.testing.assert_close(baked, hooked, atol=1e-4, rtol=1e-4)
    assert (baked - plain).abs().max() > 1e-3
    if tied:
        assert edited.lm_head.weight is not edited.get_input_embeddings().weight
        torch.testing.assert_close(edited.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="hidden size"):
        orthogonalize_weights(copy.deepcopy(model), torch.ones(16))


def test_update_surgery_projects_adamw_step_off_the_refusal_gradient(tok, tmp_path):
    """surgery_target update: the parameter change of a step has no positive component along the gradient of the
    retain prompts' mean refusal log-odds taken before it (and equals AdamW's own step when that is negative)."""
    model = tiny_model("llama", tok, layers=2, hidden=32)
    cfg = _cfg(tmp_path, "u", retain_prompts_per_step=4, retain_divergence="refusal", retain_weight=0.0,
               refusal_surgery=True, surgery_target="update", max_grad_norm=1e9)
    run = engine.build_run(model, tok, _vector(model), torch.tensor([5, 6]), HARMFUL, cfg, RETAIN, 3)
    run.scheduler.step()                      # past the warm-up's zero learning rate
    prompts = engine.step_prompts(RETAIN, 1, 4, engine.retain_seed(cfg.seed))
    guard = torch.autograd.grad(first_token_refusal_scores(run.student, tok, prompts, refusal_token_ids(tok)).mean(),
                                run.params, allow_unused=True)
    guard = [torch.zeros_like(p) if g is None else g for p, g in zip(run.params, guard)]
    real_train_step = engine.train_step

    def planted(student, teacher, rollouts, safety_ids, cfg):    # a harmful gradient whose step raises the score
        for p, g in zip(run.params, guard):
            p.grad = -g.clone()
        return {"loss": 0.0}

    before = [p.detach().clone() for p in run.params]
    engine.train_step = planted
    try:
        totals, _ = engine.optimizer_step(run, 1, rollouts=None)
    finally:
        engine.train_step = real_train_step
    step = [p.detach() - b for p, b in zip(run.params, before)]
    rise = sum(float((d.double() * g.double()).sum()) for d, g in zip(step, guard))
    assert totals["surgery_applied"] == 1.0
    assert abs(rise) < 1e-9 + 1e-6 * sum(float(d.abs().sum()) for d in step)
    assert sum(float(d.abs().sum()) for d in step) > 0                        # the step is not simply undone
    assert run.surgery_guard is None


def test_refusal_gradient_is_the_mean_scores_gradient_whatever_the_batching(tok):
    """Scored 3 prompts at a time, the gradient equals autograd of the mean over all 7 in one batch; the share
    scored with share_header=False (one plain forward) equals the shared-header one."""
    from openrlhf_safesteer.selective import refusal_gradient

    model = tiny_model("llama", tok, layers=2, hidden=32)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = refusal_token_ids(tok)
    prompts = RETAIN + HARMLESS
    batched = refusal_gradient(model, tok, prompts, ids, params, batch_size=3)
    whole = torch.autograd.grad(first_token_refusal_scores(model, tok, prompts, ids).mean(), params,
                                allow_unused=True)
    for got, want in zip(batched, whole):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in batched) > 0
    plain = first_token_refusal_scores(model, tok, prompts, ids, share_header=False)
    torch.testing.assert_close(plain.detach(), first_token_refusal_scores(model, tok, prompts, ids).detach(),
                               atol=1e-5, rtol=1e-5)


def test_gradient_cosine_and_the_share_left_after_the_projection():
    """cos against torch's on the concatenated vectors; kept = the orthogonal part's share of the target's length,
    planted; and it is the first-order rise a unit step orthogonal to the guard can still make (project_conflict's
    projection of the target, normalised)."""
    from openrlhf_safesteer.selective import gradient_cosine, kept_after_projection

    gen = torch.Generator().manual_seed(3)
    guard = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    first = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    flat = lambda xs: torch.cat([x.reshape(-1) for x in xs]).double()   # noqa: E731
    assert gradient_cosine(first, guard) == pytest.approx(
        float(torch.nn.functional.cosine_similarity(flat(first), flat(guard), dim=0)), rel=1e-9)
    # target = 2 guard + a part orthogonal to it of length 3 |guard|: kept = 3 / sqrt(4 + 9)
    unit = flat(guard) / flat(guard).norm()
    other = flat(first) - (flat(first) @ unit) * unit
    other = other / other.norm() * 3 * flat(guard).norm()
    target_flat = 2 * flat(guard) + other
    target = [target_flat[:12].reshape(4, 3).float(), target_flat[12:].float()]
    assert kept_after_projection(target, guard) == pytest.approx(3 / 13 ** 0.5, rel=1e-5)
    # the best unit step with <d, guard> = 0 is the target's orthogonal part: it raises <d, target> by |target| kept
    projected, _, applied = project_conflict([-t for t in target], guard)     # -target raises along +target
    assert applied
    step = -flat(projected) / flat(projected).norm()
    assert float(step @ flat(guard)) == pytest.approx(0.0, abs=1e-6)
    assert float(step @ target_flat) == pytest.approx(float(target_flat.norm()) * kept_after_projection(target, guard),
                                                      rel=1e-5)
    assert kept_after_projection(guard, guard) == pytest.approx(0.0, abs=1e-6)


def test_refusal_geometry_table_is_symmetric_with_ones_on_the_diagonal():
    from openrlhf_safesteer.demo.refusal_geometry import GUARD, geometry, table

    gen = torch.Generator().manual_seed(4)
    grads = {name: [torch.randn(6, generator=gen)] for name in ("harmful train", GUARD, "harmless validation")}
    result = geometry(grads)
    for a in grads:
        assert result["cosine"][a][a] == pytest.approx(1.0)
        for b in grads:
            assert result["cosine"][a][b] == pytest.approx(result["cosine"][b][a])
    assert result["kept_vs_guard"][GUARD] == pytest.approx(0.0, abs=1e-6)
    assert table(result).count("\n") == len(grads) + 1
