"""The vllm-cpu mode's pieces that need no engine (the engine itself: tests/vllm, `make test-vllm`):
the weight-sync check's fingerprints and comparison, the placement check accepting logical GPUs only where the
launcher declared them, and the refused weight-sync settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from openrlhf_safesteer.plugin import sync_guard
from openrlhf_safesteer.plugin.config import vllm_sync_refusals
from openrlhf_safesteer.plugin.placement import cluster_problems, plan_placement


def test_fingerprints_agree_for_the_same_values_and_catch_garbage_and_stale_weights():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    policy = {"w": sync_guard.fingerprint(weight)}
    held = [{"w": ([64, 32], *sync_guard.fingerprint(weight.clone().t().contiguous()))}]   # another layout
    assert sync_guard.mismatches(policy, held) == []
    for wrong in (torch.zeros_like(weight), torch.empty_like(weight).fill_(3.0), weight * 1.01):
        lines = sync_guard.mismatches(policy, [{"w": ([64, 32], *sync_guard.fingerprint(wrong))}])
        assert len(lines) == 1 and lines[0].startswith("rank 0: w sum")
    assert sync_guard.mismatches(policy, [{}]) == ["rank 0: w missing"]
    error = sync_guard.sync_error(1, ["rank 0: w missing"])
    assert isinstance(error, sync_guard.WeightSyncError) and "does not hold the policy's weights" in str(error)


def test_only_tensors_the_engine_holds_by_name_and_shape_are_compared_matrices_first():
    sent = {"embed.weight": (10, 4), "layers.0.qkv.weight": (12, 4), "norm.weight": (4,), "lm_head.weight": (10, 4)}
    held = [{"embed.weight": ([10, 4],), "layers.0.qkv.weight": ([6, 4],), "norm.weight": ([4],),
             "lm_head.weight": ([10, 4],)}]
    names = sync_guard.comparable(sent, held)
    assert names == ["embed.weight", "norm.weight", "lm_head.weight"]    # the fused/sharded one is left out
    assert sync_guard.pick(names, sent) == ["embed.weight", "lm_head.weight"]
    many = [f"m{i}" for i in range(10)]
    assert sync_guard.pick(many, {name: (2, 2) for name in many}) == ["m0", "m3", "m6", "m9"]


def _args(engines=1, tp=1, sync_with_ray=False, backend="nccl", lora=0, colocate_all=False):
    return SimpleNamespace(
        actor=SimpleNamespace(num_nodes=1, num_gpus_per_node=1), ref=SimpleNamespace(num_nodes=1, num_gpus_per_node=1),
        vllm=SimpleNamespace(num_engines=engines, tensor_parallel_size=tp, sync_with_ray=sync_with_ray,
                             sync_backend=backend),
        ds=SimpleNamespace(lora=SimpleNamespace(rank=lora)),
        train=SimpleNamespace(colocate_all=colocate_all, colocate_actor_ref=False, async_enable=False))


def test_cpu_placement_with_vllm_engines_is_accepted_only_on_the_logical_gpus_the_launcher_declared():
    placement = plan_placement(_args(engines=2), "vllm", on_gpus=False)
    assert placement.logical_gpus == 2 and not placement.on_gpus
    assert "logical" in placement.describe()
    assert cluster_problems({"CPU": 2.0, "GPU": 2.0}, placement, declared_gpus=2) == ([], [])
    refused, _ = cluster_problems({"CPU": 64.0, "GPU": 8.0}, placement, declared_gpus=0)   # a cluster it joined
    assert len(refused) == 1 and "sees no CUDA device" in refused[0]
    hf = plan_placement(_args(engines=2), "hf", on_gpus=False)
    assert hf.logical_gpus == 0
    assert len(cluster_problems({"GPU": 2.0}, hf, declared_gpus=2)[0]) == 1


@pytest.mark.parametrize("args, on_cpu, expected", [
    (_args(sync_with_ray=True, backend="gloo"), False, "--vllm.sync_with_ray with --vllm.sync_backend gloo"),
    (_args(lora=8, colocate_all=True), False, "--ds.lora.rank with vLLM engines and --train.colocate_all"),
    (_args(tp=2), True, "--vllm.tensor_parallel_size > 1 with vLLM on a CPU"),
])
def test_weight_sync_settings_that_cannot_work_are_refused(args, on_cpu, expected):
    problems = vllm_sync_refusals(args, on_cpu)
    assert len(problems) == 1 and problems[0].startswith(expected)


def test_the_settings_the_recipes_and_the_cpu_tier_use_are_not_refused():
    assert vllm_sync_refusals(_args(colocate_all=True), on_cpu=False) == []   # the GPU recipes: IPC, full weights
    assert vllm_sync_refusals(_args(lora=8), on_cpu=True) == []               # tests/vllm: broadcast, LoRA merged
    assert vllm_sync_refusals(_args(tp=2), on_cpu=False) == []
