"""Does the rollout engine hold the policy's weights after a weight sync? A check on CPU and GPU alike.

OpenRLHF's sync can fail without an error: vLLM's PyNcclCommunicator disables itself where NCCL is missing and its
broadcast then sends nothing, after which `update_weight` loads an uninitialised buffer (`torch.empty`) into the
engine; a sync that moves nothing leaves the engine on old weights. Either way every later rollout comes from a
model that is not the policy. After each sync the policy (rank 0) asks each engine for fingerprints of a few
tensors it sent, by the same names, and stops the run with `WeightSyncError` when one differs.

A fingerprint is (sum, sum of |x|) of a tensor in float64: equal, up to summation order, for equal tensors; far apart
for a garbage buffer, zeros or another tensor. Only tensors the engine stores under the HF name with the HF shape
are compared (vLLM fuses q/k/v and gate/up into one parameter, and shards most tensors under tensor parallelism;
norms, o_proj and down_proj stay as they are at TP 1, and norms at any TP). Imports neither OpenRLHF nor vLLM.
"""

from __future__ import annotations

from typing import Any

import torch

# Fingerprints agree to this share of sum|x| (float64 sums of the same values in another order differ by ~1e-12).
RELATIVE_TOLERANCE = 1e-6
# How many tensors each check compares (each costs one gather and two reductions on each side).
CHECKED_TENSORS = 4


class WeightSyncError(RuntimeError):
    """The rollout engine does not hold the weights the policy just sent."""


def fingerprint(tensor: torch.Tensor) -> tuple[float, float]:
    """(sum, sum of |x|) of `tensor` (any shape, any float dtype), accumulated in float64."""
    data = tensor.detach()
    return float(data.sum(dtype=torch.float64)), float(data.abs().sum(dtype=torch.float64))


def engine_fingerprints(worker: Any, names: list[str]) -> dict[str, tuple[list[int], float, float]]:
    """In a vLLM worker (through `collective_rpc`, which passes the worker): {name: (shape, sum, sum|x|)} for each
    of `names` that its model holds under that name."""
    params = dict(worker.model_runner.model.named_parameters())
    return {name: (list(params[name].shape), *fingerprint(params[name])) for name in names if name in params}


def engine_shapes(worker: Any, names: list[str]) -> dict[str, tuple[list[int]]]:
    """In a vLLM worker: {name: (shape,)} for each of `names` that its model holds under that name."""
    params = dict(worker.model_runner.model.named_parameters())
    return {name: (list(params[name].shape),) for name in names if name in params}


def comparable(sent: dict[str, tuple[int, ...]], held: list[dict[str, tuple]]) -> list[str]:
    """The sent names (HF name -> shape) that every engine rank holds with the same shape, in sending order."""
    return [name for name, shape in sent.items()
            if held and all(name in rank and tuple(rank[name][0]) == tuple(shape) for rank in held)]


def pick(names: list[str], shapes: dict[str, tuple[int, ...]], count: int = CHECKED_TENSORS) -> list[str]:
    """Up to `count` names spread over the list (first and last included): early and late layers both. Matrices
    only where there are any: norms often start as all ones (so another norm's leftover buffer would match) and a
    LoRA policy never changes them."""
    matrices = [name for name in names if len(shapes[name]) >= 2]
    names = matrices or names
    if len(names) <= count:
        return list(names)
    step = (len(names) - 1) / (count - 1)
    return [names[round(i * step)] for i in range(count)]


def mismatches(policy: dict[str, tuple[float, float]], engine: list[dict[str, tuple[list[int], float, float]]],
               tolerance: float = RELATIVE_TOLERANCE) -> list[str]:
    """One line per (engine rank, tensor) whose fingerprint differs from the policy's; empty when all agree."""
    lines = []
    for rank, held in enumerate(engine):
        for name, (total, magnitude) in policy.items():
            if name not in held:
                lines.append(f"rank {rank}: {name} missing")
                continue
            _, e_total, e_magnitude = held[name]
            bound = tolerance * max(magnitude, 1e-12)
            if not (abs(e_total - total) <= bound and abs(e_magnitude - magnitude) <= bound):
                lines.append(f"rank {rank}: {name} sum {e_total:.6g} (|x| {e_magnitude:.6g}) in the engine, "
                             f"{total:.6g} (|x| {magnitude:.6g}) in the policy")
    return lines


def sync_error(step: int, lines: list[str]) -> WeightSyncError:
    return WeightSyncError(
        f"weight sync {step}: the rollout engine does not hold the policy's weights ({len(lines)} mismatch(es): "
        f"{'; '.join(lines[:4])}). The sync sent nothing or the wrong tensors (for instance a PyNccl communicator "
        "that disabled itself where NCCL is missing, which sends nothing without an error). Stopping: every later "
        "rollout would come from a model that is not the policy (docs/openrlhf.md, 'The weight-sync check')")
