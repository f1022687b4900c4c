"""Placement and rollout backend are explicit: the launcher says what it asks Ray for,
refuses CPU placement on a cluster with GPUs, refuses `--safesteer.rollout auto` falling back to HF generate
on a CUDA machine, keeps OpenRLHF from setting NCCL_CUMEM_ENABLE=0 for the HF engines, and gives the
sampled objective per-sequence loss aggregation. Every case goes through OpenRLHF 0.11.2's real parser;
no Ray cluster is started (`ray.cluster_resources` is answered by a stub where the cluster is the point)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from openrlhf_safesteer.cli import train_safesteer_ray
from openrlhf_safesteer.plugin import compat, install
from openrlhf_safesteer.plugin.config import SafeSteerConfig
from openrlhf_safesteer.plugin.install import run_openrlhf_main
from openrlhf_safesteer.plugin.placement import Placement, cluster_problems, plan_placement


def recipe_args(nodes, gpus, engines, tp, colocate_all=True, colocate_actor_ref=False):
    return SimpleNamespace(
        actor=SimpleNamespace(num_nodes=nodes, num_gpus_per_node=gpus),
        ref=SimpleNamespace(num_nodes=nodes, num_gpus_per_node=gpus),
        vllm=SimpleNamespace(num_engines=engines, tensor_parallel_size=tp),
        train=SimpleNamespace(colocate_all=colocate_all, colocate_actor_ref=colocate_actor_ref))


@pytest.mark.parametrize("args, on_gpus, gpus", [
    (recipe_args(1, 8, 8, 1), True, 8),                        # train_safesteer_llama.sh
    (recipe_args(4, 8, 4, 8), True, 32),                       # train_safesteer_llama70b_multinode.sh
    (recipe_args(1, 2, 2, 1, colocate_all=False), True, 6),    # policy 2 + teacher 2 + 2 engines
    (recipe_args(1, 2, 1, 2, colocate_all=False, colocate_actor_ref=True), True, 4),
    (recipe_args(1, 1, 1, 1, colocate_all=False), False, 0),   # train_safesteer_cpu.sh
])
def test_plan_counts_the_gpus_the_run_asks_for(args, on_gpus, gpus):
    placement = plan_placement(args, "vllm", on_gpus)
    assert placement.on_gpus == on_gpus and placement.gpus == gpus
    assert placement.describe().startswith("Ray placement: " + (f"{gpus} GPU(s)" if on_gpus else "CPU only"))


def test_cpu_placement_on_a_gpu_cluster_is_refused_and_a_short_cluster_warned():
    cpu = Placement(False, 0, 1.0, ())
    refused, warned = cluster_problems({"CPU": 64.0, "GPU": 8.0}, cpu)
    assert len(refused) == 1 and "the Ray cluster has 8 GPU(s) but this driver process sees no CUDA" in refused[0]
    assert cluster_problems({"CPU": 2.0}, cpu) == ([], [])
    refused, warned = cluster_problems({"GPU": 8.0}, Placement(True, 32, 32, ()))
    assert refused == [] and "asks for 32 GPU(s) but the Ray cluster has 8" in warned[0]


def test_launcher_refuses_cpu_placement_on_a_gpu_cluster_before_placing_anything(tiny_run, tmp_path, capsys,
                                                                                 cpu_flags, monkeypatch):
    """A driver without CUDA connected to a cluster with GPUs (a CPU head node): exit 2, OpenRLHF's train()
    is never called."""
    import ray

    monkeypatch.setattr(install, "ensure_ray", lambda *args: 0)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 16.0})
    monkeypatch.setattr(install, "patched", _train_must_not_run)
    status = train_safesteer_ray.main(cpu_flags(tiny_run, tmp_path))
    captured = capsys.readouterr()
    assert status == 2
    assert "the Ray cluster has 16 GPU(s) but this driver process sees no CUDA device" in captured.err


def _train_must_not_run(*args):
    raise AssertionError("the launcher went on to OpenRLHF's train()")


def test_auto_rollout_without_vllm_on_a_cuda_machine_is_refused(tiny_run, tmp_path, capsys, cpu_flags, monkeypatch):
    monkeypatch.setattr(compat, "cuda_present", lambda: True)
    monkeypatch.setattr(compat, "vllm_available", lambda: False)
    monkeypatch.setattr(compat, "install_cpu_shims", lambda: False)  # as on a GPU machine
    argv = [a for a in cpu_flags(tiny_run, tmp_path) if a not in ("--safesteer.rollout", "hf")]
    status = train_safesteer_ray.main(argv)
    err = capsys.readouterr().err
    assert status == 2
    assert "--safesteer.rollout auto: this machine has CUDA but vLLM is not installed" in err


def dry_run(tiny_run, tmp_path, cpu_flags, *extra, objective="exact"):
    from openrlhf_safesteer.plugin.config import default_openrlhf_flags, split_argv

    config, openrlhf_argv = split_argv(cpu_flags(tiny_run, tmp_path, list(extra))
                                       + ["--safesteer.dry_run", "--safesteer.objective", objective])
    assert isinstance(config, SafeSteerConfig)
    return run_openrlhf_main(config, default_openrlhf_flags(openrlhf_argv, config.objective), [])


@pytest.mark.parametrize("objective, extra, expected", [
    ("sampled", [], "seq-mean-token-mean"),
    ("sampled", ["--actor.loss_agg_mode", "token-mean"], "token-mean"),  # the user's explicit choice stays
    ("exact", [], "token-mean"),  # unused by the exact step, which reduces per sequence itself
])
def test_sampled_objective_aggregates_per_sequence_by_default(tiny_run, tmp_path, cpu_flags, objective, extra,
                                                              expected):
    from openrlhf_safesteer.plugin import versions

    if not versions.features().loss_agg_mode_flag:
        pytest.skip("this OpenRLHF (before 0.11.2) has no --actor.loss_agg_mode; test_openrlhf_versions checks that "
                    "the sampled step aggregates per sequence there")
    args = dry_run(tiny_run, tmp_path, cpu_flags, *extra, objective=objective)["args"]
    assert args.actor.loss_agg_mode == expected


def test_hf_rollout_on_cuda_keeps_openrlhf_from_disabling_nccl_cumem(tiny_run, tmp_path, cpu_flags, monkeypatch):
    """OpenRLHF's PolicyModelActor sets NCCL_CUMEM_ENABLE=0 when sync_backend is nccl and the imported vllm is
    older than 0.16 (the stand-in is 0.0.0); with HF engines there is no NCCL sync group, so the launcher
    names another backend. On a CPU the flag stays as OpenRLHF parsed it."""
    import vllm
    from packaging import version

    assert version.parse(vllm.__version__) < version.parse("0.16")  # the stand-in would trigger it
    result = dry_run(tiny_run, tmp_path, cpu_flags)
    assert result["args"].vllm.sync_backend == "nccl"
    assert result["placement"].on_gpus  # a dry run describes the GPU cluster a recipe is meant for
    monkeypatch.setattr(compat, "cuda_present", lambda: True)
    monkeypatch.setattr(compat, "install_cpu_shims", lambda: False)
    result = dry_run(tiny_run, tmp_path, cpu_flags)
    assert result["args"].safesteer.rollout == "hf"
    assert result["args"].vllm.sync_backend == "ray-object-store"
