"""OpenRLHF's own PPO, DPO and SFT entry points on a machine without a GPU: the baselines SafeSteer is
compared with, with nothing of their algorithms changed.

    python -m openrlhf_safesteer.plugin.stock ppo [every flag of openrlhf.cli.train_ppo_ray]
    python -m openrlhf_safesteer.plugin.stock dpo [every flag of openrlhf.cli.train_dpo]
    python -m openrlhf_safesteer.plugin.stock sft [every flag of openrlhf.cli.train_sft]

On a GPU machine, run `openrlhf.cli.train_ppo_ray` / `train_dpo` / `train_sft` directly; this module is for CPUs.
What it replaces, and only where CUDA is absent (see `compat`):
- the CUDA-only imports (flash_attn, vllm) with the stand-ins, and OpenRLHF's unconditional CUDA
  calls with CPU shims, in the driver and in every Ray worker (DeepSpeed runs its CPU accelerator);
- PPO's vLLM rollout engines with the HF-generate engines (`plugin.rollout`), and the policy's weight
  sync to them (NCCL broadcast) with a copy through Ray's object store (`HFWeightSync`; with LoRA the
  adapter tensors only);
- Ray placement: CPU shares instead of GPUs (`SafeSteerActorGroup`, which places the same groups);
- the policy and reference actors' classes with the same classes set up for a CPU worker (`stock_actors`).
The actor classes live in `plugin.stock_actors`, imported once `run` has prepared the process (and in each Ray
worker after `compat.worker_setup`); importing this module imports no OpenRLHF and installs nothing.
The parsers, the validation, the trainers, the losses, the advantage estimators and the reward
function calls are OpenRLHF's, run unchanged.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from openrlhf_safesteer.plugin import compat
from openrlhf_safesteer.plugin.install import ensure_ray, exec_openrlhf_main, patched

logger = logging.getLogger(__name__)

ENTRY_POINTS = {"ppo": "openrlhf.cli.train_ppo_ray", "dpo": "openrlhf.cli.train_dpo", "sft": "openrlhf.cli.train_sft"}


def _train_ppo_on_cpu(args, namespace: dict) -> None:
    # OpenRLHF's modules (and the classes that subclass them) import here, after run()'s prepare_process.
    import openrlhf.trainer.ppo_trainer as ppo_trainer

    from openrlhf_safesteer.plugin.experience import SafeSteerActorGroup, end_launched_actors
    from openrlhf_safesteer.plugin.rollout import create_hf_rollout_engines
    from openrlhf_safesteer.plugin.stock_actors import (
        CPUPolicyActorRemote,
        CPUPPOTrainerRemote,
        CPUReferenceActorRemote,
    )

    if args.vllm.num_engines < 1:
        raise SystemExit("error: --vllm.num_engines N (N >= 1) is required: OpenRLHF 0.11.2 generates rollouts "
                         "only through engines (here the HF-generate engine)")
    namespace["PolicyModelActor"] = CPUPolicyActorRemote
    namespace["ReferenceModelActor"] = CPUReferenceActorRemote     # the KL anchor (--algo.kl.init_coef > 0)
    namespace["RayActorGroup"] = SafeSteerActorGroup
    namespace["create_vllm_engines"] = create_hf_rollout_engines
    ensure_ray()
    try:
        with patched(ppo_trainer, "PPOTrainer", CPUPPOTrainerRemote):
            namespace["_openrlhf_train"](args)
    finally:
        logger.info("ended %d actors", end_launched_actors())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_one_process_on_cpu(args, namespace: dict) -> None:
    """DPO and SFT: DeepSpeed in this one process."""
    # One process is the whole world: what the `deepspeed` launcher would otherwise export.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    namespace["_openrlhf_train"](args)


def run(kind: str, argv: list[str]) -> None:
    """Train with OpenRLHF's `kind` entry point ('ppo', 'dpo' or 'sft') on this machine, flags unchanged."""
    if kind not in ENTRY_POINTS:
        raise SystemExit(f"error: the first argument is one of {', '.join(ENTRY_POINTS)}, got {kind!r}")
    compat.check_openrlhf_version()
    compat.prepare_process()
    hook = _train_ppo_on_cpu if kind == "ppo" else _train_one_process_on_cpu

    def make_train(namespace: dict):
        def train(args):
            compat.apply_cpu_dtype(args)
            hook(args, namespace)

        return train

    exec_openrlhf_main(ENTRY_POINTS[kind], argv, make_train)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        run(argv[0], argv[1:])
    except compat.UnsupportedOpenRLHFError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
