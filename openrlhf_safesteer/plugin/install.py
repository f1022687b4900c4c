"""Run OpenRLHF's own `train_ppo_ray` entry point with the SafeSteer classes installed.

OpenRLHF 0.11.2 writes its PPO parser and its post-parse validation inline under
`if __name__ == "__main__"`, then calls `train(args)`. `run_openrlhf_main` executes that module's
source as `__main__` (its parser, its validation, unchanged) with `train` renamed, and puts a hook in
its place that (1) refuses unsupported flag combinations, (2) checks the artifacts against the
model on the driver, (3) swaps the SafeSteer classes into the names `train` uses, and only then
(4) calls OpenRLHF's `train`. Nothing is placed on Ray before (1) and (2) pass.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import inspect
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from openrlhf_safesteer.plugin import compat
from openrlhf_safesteer.plugin.config import (
    SafeSteerConfig,
    SafeSteerConfigError,
    load_artifacts,
    refusals,
    resolve_rollout,
)
from openrlhf_safesteer.plugin.placement import cluster_problems, plan_placement

logger = logging.getLogger(__name__)

OPENRLHF_MAIN = "openrlhf.cli.train_ppo_ray"


def _compile_openrlhf_main(module_name: str = OPENRLHF_MAIN):
    import importlib

    module = importlib.import_module(module_name)
    tree = ast.parse(inspect.getsource(module))
    renamed = False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "train":
            node.name = "_openrlhf_train"
            renamed = True
    if not renamed:
        raise compat.UnsupportedOpenRLHFError(f"{module.__file__} defines no train(args): not OpenRLHF 0.11.2's layout")
    return compile(tree, module.__file__, "exec"), module.__file__


@contextlib.contextmanager
def patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def ensure_ray(logical_gpus: int = 0) -> int:
    """Start Ray here unless this process is already connected to a cluster. Returns the logical GPUs it declared.

    logical_gpus > 0 (OpenRLHF's vLLM engines on a machine without CUDA, `plugin.vllm_cpu`): the new cluster reports
    that many GPUs, which exist only for Ray's bookkeeping: OpenRLHF's `create_vllm_engines` waits for
    `{"GPU": 1, "CPU": 1}` bundles and would wait forever on a cluster without GPUs. A cluster already connected is
    left as it is (0 returned). Every worker of the job runs compat.worker_setup first (Ray's worker_process_setup_hook), so that the
    SafeSteer actor classes, whose modules import OpenRLHF, unpickle where flash_attn / vllm are not installed.
    """
    import ray

    if ray.is_initialized():
        _warn_without_worker_setup(ray)
        return 0
    env = {
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
    }
    if not compat.cuda_present():
        env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    # No cluster yet (a single-machine run): start one without the dashboard, which only costs
    # memory and start-up time here. On a cluster, `ray job submit` has already connected us.
    gpus = {"num_gpus": logical_gpus} if logical_gpus else {}
    ray.init(runtime_env={"env_vars": env, "worker_process_setup_hook": compat.WORKER_SETUP_HOOK},
             include_dashboard=False, **gpus)
    return logical_gpus


def _warn_without_worker_setup(ray) -> None:
    """A cluster we joined runs no compat.worker_setup in its workers: fine where flash_attn and vLLM are
    installed (a GPU cluster), not where the SafeSteer actors would need the stand-ins to import."""
    missing = compat.stand_ins_needed()
    hook = (ray.get_runtime_context().runtime_env or {}).get("worker_process_setup_hook")
    if missing and not hook:
        logger.warning("%s not installed here and this Ray job's workers run no setup hook: the SafeSteer actors "
                       "will not import on workers without them. Submit the job with --runtime-env-json "
                       "'{\"worker_process_setup_hook\": \"%s\"}'.", " and ".join(missing), compat.WORKER_SETUP_HOOK)


def artifacts_ready(config: SafeSteerConfig) -> bool:
    return bool(config.vector and config.tokens and Path(config.vector).is_dir() and Path(config.tokens).is_file())


def make_train_hook(config: SafeSteerConfig, user_argv: list[str], namespace: dict, result: dict) -> Callable:
    """The function that replaces OpenRLHF's `train(args)` in the executed `__main__`."""

    def train(args: SimpleNamespace) -> None:
        problems = refusals(args, user_argv, config, this_machine=not config.dry_run)
        if problems:
            raise SafeSteerConfigError(problems)
        if config.dry_run and not artifacts_ready(config):
            logger.warning("dry run: %s / %s do not exist yet (the recipe's first stage makes them); not checked",
                           config.vector, config.tokens)
        else:
            load_artifacts(config, args.actor.model_name_or_path)
        config.rollout = resolve_rollout(config)
        compat.apply_cpu_dtype(args)
        # A recipe's dry run (often on a laptop) describes the GPU cluster the recipe is written for.
        placement = plan_placement(args, config.rollout, on_gpus=compat.cuda_present() or config.dry_run)
        logger.info("rollout: %s\n%s", config.rollout, placement.describe())
        result["placement"] = placement
        if config.rollout == "hf" and compat.cuda_present():
            # The HF engines take weights through Ray's object store, not an NCCL group; with the default
            # "nccl" backend OpenRLHF's PolicyModelActor reads the vllm stand-in's version (0.0.0 < 0.16) and
            # sets NCCL_CUMEM_ENABLE=0, which its own comment says breaks ncclCommInitRank under NCCL >= 2.27.
            args.vllm.sync_backend = "ray-object-store"
        args.safesteer = config.namespace()
        result["args"] = args
        if config.dry_run:
            return

        import openrlhf.trainer.ppo_trainer as ppo_trainer

        from openrlhf_safesteer.plugin.experience import (
            SafeSteerActorGroup,
            SafeSteerPPOTrainerRemote,
            end_launched_actors,
        )
        from openrlhf_safesteer.plugin.policy import SafeSteerPolicyActorRemote
        from openrlhf_safesteer.plugin.teacher import SteeredReferenceActorRemote

        namespace["ReferenceModelActor"] = SteeredReferenceActorRemote
        namespace["PolicyModelActor"] = SafeSteerPolicyActorRemote
        namespace["RayActorGroup"] = SafeSteerActorGroup
        if config.rollout == "hf":
            from openrlhf_safesteer.plugin.rollout import create_hf_rollout_engines

            namespace["create_vllm_engines"] = create_hf_rollout_engines
        else:   # OpenRLHF's vLLM engines, each request seeded by the plugin's rule (plugin.vllm_seeded)
            from openrlhf_safesteer.plugin.vllm_seeded import seeded_vllm_engines

            namespace["create_vllm_engines"] = seeded_vllm_engines(namespace["create_vllm_engines"])
        declared = ensure_ray(placement.logical_gpus)
        import ray

        refused, warned = cluster_problems(ray.cluster_resources(), placement, declared)
        for warning in warned:
            logger.warning("%s", warning)
        if refused:  # nothing is placed yet
            raise SafeSteerConfigError(refused)
        # train() imports PPOTrainer from its module at call time.
        try:
            with patched(ppo_trainer, "PPOTrainer", SafeSteerPPOTrainerRemote):
                namespace["_openrlhf_train"](args)
            result["trained"] = True
        finally:
            # The model was saved by train(); free the cluster for whatever the session does next.
            logger.info("ended %d SafeSteer actors", end_launched_actors())

    return train


def exec_openrlhf_main(module_name: str, argv: list[str], make_train: Callable[[dict], Callable]) -> None:
    """Execute an OpenRLHF CLI module's `__main__` block (its parser and validation, unchanged) with argv,
    where its `train(args)` is `make_train(namespace)` (the namespace the module's code runs in)."""
    code, filename = _compile_openrlhf_main(module_name)
    namespace: dict = {"__name__": "__main__", "__file__": filename, "__builtins__": builtins}
    namespace["train"] = make_train(namespace)
    old_argv = sys.argv
    sys.argv = [module_name, *argv]
    try:
        exec(code, namespace)  # noqa: S102 - OpenRLHF's own __main__, parser and validation unchanged
    finally:
        sys.argv = old_argv


def run_openrlhf_main(config: SafeSteerConfig, openrlhf_argv: list[str], user_argv: list[str]) -> dict:
    """Parse `openrlhf_argv` with OpenRLHF's own parser and validation, then train with SafeSteer.

    Returns {"args": the parsed OpenRLHF args (with .safesteer), "trained": bool}. Raises
    SystemExit from OpenRLHF's argparse on an unknown/invalid flag, AssertionError from its own
    validation, SafeSteerConfigError for a refused combination, IncompatibleArtifactError for
    artifacts that do not fit the model.
    """
    from openrlhf_safesteer.plugin.config import argv_refusals

    problems = argv_refusals(user_argv)
    if problems:
        raise SafeSteerConfigError(problems)
    compat.prepare_process()
    result: dict = {"args": None, "trained": False}

    def make_train(namespace: dict) -> Callable:
        return make_train_hook(config, user_argv, namespace, result)

    exec_openrlhf_main(OPENRLHF_MAIN, openrlhf_argv, make_train)
    return result


def parse_openrlhf_flags(module_name: str, argv: list[str]) -> SimpleNamespace:
    """Run an OpenRLHF CLI module's own parser and post-parse validation on argv; train nothing.

    For recipes of OpenRLHF's own entry points (DPO, PPO baselines): SystemExit(2) on an unknown
    or malformed flag (argparse), AssertionError from OpenRLHF's validation. Returns the args.
    """
    compat.prepare_process()
    captured: dict = {}
    exec_openrlhf_main(module_name, argv, lambda namespace: lambda args: captured.setdefault("args", args))
    if "args" not in captured:
        raise RuntimeError(f"{module_name}'s __main__ finished without calling train(args)")
    return captured["args"]
