"""Gradient surgery on AdamW's update inside OpenRLHF's actor: the project's selectivity mechanism (docs/METHOD.md
section 8.1; the local engine's `refusal_surgery` with `surgery_target update`, `local.engine.project_update`).

Each optimizer step, on `per_step` borderline-safe prompts (a seeded slice per step, the local engine's
`step_prompts` with its `retain_seed`): a = d/dtheta of their mean first-reply-token refusal log-odds
(`selective.first_token_refusal_scores`). The optimizer moves the weights by d; when <d, a> > 0 (the step raises
that refusal to first order) the weights become theta + d - (<d, a> / <a, a>) a, i.e. the step loses its
component along a (A-GEM's rule). The harmful loss, its clipping and AdamW are untouched.

Where the update lives under DeepSpeed: with bf16 (BF16_Optimizer) or ZeRO-1/2 the optimizer steps fp32 master
copies of the weights, partitioned over the data-parallel ranks, and then copies them into the bf16 weights the
model runs on. The surgery reads and writes those master copies through DeepSpeed's own accessors
(`deepspeed.utils.safe_get_full_fp32_param` / `safe_set_full_fp32_param`, collectives every rank calls in the same
order) and copies the result into the model's weights; in plain fp32 without ZeRO the weights are the optimizer's
own. No copy of the weights is kept: <d, a> = <theta_after, a> - <theta_before, a>, two scalars in float64.
ZeRO-3 is refused (`config.surgery_problems`): its weights are partitioned, and autograd's gradient of the refusal
score would not be a whole-parameter tensor.

Every rank computes the same guard a (the same prompts, the same weights), so data parallelism needs no extra
communication beyond the accessors'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from openrlhf_safesteer.local.engine import retain_seed, step_prompts
from openrlhf_safesteer.selective import first_token_refusal_scores

Tensor = torch.Tensor


def master_value(param: nn.Parameter) -> Tensor:
    """The fp32 value the optimizer steps for `param`: DeepSpeed's master copy where it keeps one (bf16, ZeRO-1/2/3;
    gathered whole), else the parameter itself (detached)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    return param.detach() if value is None else value


def set_master_value(param: nn.Parameter, value: Tensor) -> None:
    """Write `value` into the optimizer's master copy of `param` (where it keeps one) and into `param` itself."""
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        safe_set_full_fp32_param(param, value.to(torch.float32))
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def guard_dot(params: Sequence[nn.Parameter], guard: Sequence[Tensor | None]) -> float:
    """<theta, a> over the parameters the guard depends on, in float64, theta the optimizer's master values."""
    return float(sum((master_value(p).double() * a.double()).sum() for p, a in zip(params, guard) if a is not None))


def project_master(params: Sequence[nn.Parameter], guard: Sequence[Tensor | None], along: float) -> None:
    """theta <- theta - along * a for every parameter the guard depends on (master copy and model weight)."""
    for p, a in zip(params, guard):
        if a is not None:
            set_master_value(p, master_value(p).float() - along * a.float())


@dataclass
class UpdateSurgery:
    """One run's surgery: the borderline-safe prompts it guards, how many a step, the seed of their order, and R
    (`directions.refusal_token_ids`, the refusal openers' first tokens)."""

    prompts: list[str]
    per_step: int
    seed: int
    refusal_ids: list[int]

    def step_prompts(self, step: int) -> list[str]:
        """Optimizer step `step`'s prompts (0-based): the local engine's for the same seed and step."""
        return step_prompts(self.prompts, step, self.per_step, retain_seed(self.seed))

    def guard(self, model: nn.Module, tokenizer, params: Sequence[nn.Parameter], step: int,
              share_header: bool = True) -> tuple[list[Tensor | None], float]:
        """(a: d mean refusal log-odds / d param for each of `params`, None where it does not depend on one;
        the mean refusal log-odds itself) at step `step`'s prompts. `model`: the HF model the actor runs."""
        scores = first_token_refusal_scores(model, tokenizer, self.step_prompts(step), self.refusal_ids,
                                            share_header=share_header)                                 # (N,)
        guard = torch.autograd.grad(scores.mean(), list(params), allow_unused=True)
        return [None if a is None else a.detach() for a in guard], float(scores.detach().mean())

    @staticmethod
    def apply(params: Sequence[nn.Parameter], guard: Sequence[Tensor | None], before: float) -> dict[str, float]:
        """After the optimizer's step: project it when it raised the guarded refusal. before = guard_dot(params,
        guard) taken before the step. Returns the step's surgery metrics: applied (0/1) and the update's
        component along the unit guard, <d, a> / |a| (> 0: it would have raised refusal)."""
        guard_sq = float(sum((a.double() ** 2).sum() for a in guard if a is not None))
        if guard_sq == 0.0:
            return {"surgery_applied": 0.0, "surgery_update_along_guard": 0.0}
        along = guard_dot(params, guard) - before        # <d, a>
        if along > 0:
            project_master(params, guard, along / guard_sq)
        return {"surgery_applied": float(along > 0), "surgery_update_along_guard": along / guard_sq ** 0.5}
