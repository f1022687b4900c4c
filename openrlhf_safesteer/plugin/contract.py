"""What the plugin relies on in OpenRLHF, checked against an installed or released OpenRLHF without running it.

    python -m openrlhf_safesteer.plugin.contract --installed          # the OpenRLHF this Python imports
    python -m openrlhf_safesteer.plugin.contract --wheel 0.12.0 ...   # releases from the package index (cached)
    python -m openrlhf_safesteer.plugin.contract --source DIR         # an `openrlhf` package folder (a git checkout)

Every module, class, function, method (with the parameters the plugin passes or overrides) and parser flag the
plugin uses is one `Need` below. Each is looked up in the release's source (its AST; nothing is imported, so any
release checks in well under a second, on any machine). A need the release lacks is `missing`, unless
`versions.GAPS` names it as a difference the plugin makes up for (`adapted`), or another name does its job
(`--algo.advantage.is_correction_enable`). Exit status 0 when nothing is missing, 1 otherwise, 2 when the source
cannot be had. Run it on a new OpenRLHF release before users do; tests/openrlhf/test_openrlhf_contract.py checks that
this list names every OpenRLHF import and every parsed flag the plugin's code reads.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from openrlhf_safesteer.plugin import versions


@dataclass(frozen=True)
class Need:
    where: str                      # 'openrlhf/...py' (the module), or the parser's module for a flag
    name: str                       # NAME, Class.method, or --flag; '' for the module itself
    params: tuple[str, ...] = ()    # parameters the plugin passes by name or relies on
    used_by: str = ""               # the plugin file that relies on it
    adapted: str | None = None      # a versions.Features field: without it the plugin makes up for the need
    instead: tuple[str, ...] = ()   # other names that do the same job

    def label(self) -> str:
        module = self.where[:-3].replace("/", ".").removesuffix(".__init__")
        if self.name.startswith("--"):
            return f"{self.name} ({module} parser)"
        return f"{module}.{self.name}" if self.name else module


PPO = "openrlhf/cli/train_ppo_ray.py"
LAUNCHER = "openrlhf/trainer/ray/launcher.py"
PPO_ACTOR = "openrlhf/trainer/ray/ppo_actor.py"
EXPERIENCE = "openrlhf/trainer/ppo_utils/experience.py"
MAKER = "openrlhf/trainer/ppo_utils/experience_maker.py"
SAMPLES = "openrlhf/trainer/ppo_utils/samples_generator.py"


def _names(where: str, used_by: str, *names: str) -> list[Need]:
    return [Need(where, name, used_by=used_by) for name in names]


NEEDS: tuple[Need, ...] = (
    # The launcher executes train_ppo_ray's __main__ with `train` renamed and these names swapped (install.py).
    Need(PPO, "train", ("args",), "install.py"),
    *_names(PPO, "install.py", "ReferenceModelActor", "PolicyModelActor", "RayActorGroup", "create_vllm_engines"),
    Need("openrlhf/cli/train_dpo.py", "train", ("args",), "stock.py, check_flags.py"),
    Need("openrlhf/utils/config.py", "hierarchize", used_by="versions.py (the dotted flags)"),
    # The teacher: OpenRLHF's reference actor, its Actor and the logits it returns.
    Need(LAUNCHER, "ReferenceModelActor.init_model_from_pretrained", ("strategy", "pretrain"), "teacher.py"),
    Need(LAUNCHER, "ReferenceModelActor.forward", ("sequences", "action_mask", "attention_mask", "packed_seq_lens",
                                                   "mm_train_inputs_list"), "teacher.py"),
    Need("openrlhf/models/actor.py", "Actor.forward", ("sequences", "action_mask", "attention_mask", "return_output",
                                                       "allgather_logits", "ring_attn_group", "packed_seq_lens"),
         "teacher.py, policy.py, versions.py"),
    Need("openrlhf/utils/vlm_utils.py", "merge_mm_train_inputs", used_by="teacher.py (VLM only)"),
    Need("openrlhf/models/actor.py", "Actor.forward", ("return_logprobs", "return_entropy"), "actor_window.py"),
    *_names("openrlhf/models/utils.py", "actor_window.py (stock PPO on a CPU)", "log_probs_from_logits",
            "compute_entropy"),
    # The experience maker and the controller.
    Need("openrlhf/models/utils.py", "masked_mean", used_by="experience.py"),
    Need("openrlhf/trainer/ppo_trainer.py", "PPOTrainer", used_by="experience.py, stock_actors.py, install.py"),
    Need(MAKER, "RemoteExperienceMaker.__init__", ("actor_model_group", "critic_model_group", "reward_model_group",
                                                   "initial_model_group", "kl_controller", "strategy", "tokenizer"),
         "experience.py"),
    Need(MAKER, "RemoteExperienceMaker._dispatch_forward", ("group", "sync_condition"), "experience.py"),
    Need(MAKER, "RemoteExperienceMaker._flatten_results", ("refs", "duplicate_factor"), "experience.py"),
    Need(MAKER, "RemoteExperienceMaker.make_experience", ("samples_list",), "experience.py"),
    Need(MAKER, "RemoteExperienceMaker.compute_advantages_and_returns", ("experiences",), "experience.py"),
    Need(LAUNCHER, "RayActorGroup.__init__", used_by="experience.py"),
    Need(LAUNCHER, "RayActorGroup._initiate_actors", ("pg", "num_gpus_per_actor"), "experience.py"),
    Need(LAUNCHER, "RewardModelActor", used_by="experience.py"),
    *_names(EXPERIENCE, "policy.py, experience.py", "Experience", "make_experience_batch", "remove_padding_in_sequences",
            "split_experience_batch"),
    # The policy step.
    Need("openrlhf/trainer/ppo_utils/__init__.py", "NaiveReplayBuffer", used_by="policy.py"),
    Need(PPO_ACTOR, "ActorPPOTrainer.training_step", ("experience", "kl_ctl", "step"), "policy.py"),
    Need(PPO_ACTOR, "ActorPPOTrainer.training_step", ("loss_batch_info",), "policy.py", adapted="step_loss_info"),
    Need(PPO_ACTOR, "ActorPPOTrainer.ppo_train", ("kl_ctl",), "policy.py"),
    Need(PPO_ACTOR, "ActorPPOTrainer._init_vllm_sync_group", ("backend",), "rollout.py (HFWeightSync)"),
    Need(PPO_ACTOR, "ActorPPOTrainer.broadcast_to_vllm", used_by="rollout.py (HFWeightSync)"),
    Need(PPO_ACTOR, "PolicyModelActor.init_model_from_pretrained", ("strategy", "pretrain"), "policy.py"),
    Need(PPO_ACTOR, "PolicyModelActor.forward", ("sequences", "action_mask", "attention_mask", "packed_seq_lens"),
         "policy.py"),
    Need("openrlhf/models/__init__.py", "aggregate_loss", used_by="policy.py", adapted="aggregate_loss"),
    Need("openrlhf/utils/loss_utils.py", "get_loss_batch_info", used_by="policy.py", adapted="aggregate_loss"),
    # The HF-generate rollout engine, and the CPU shims.
    Need("openrlhf/utils/agent.py", "SingleTurnAgentExecutor", used_by="rollout.py"),
    Need("openrlhf/trainer/ray/vllm_engine.py", "_load_agent_executor", used_by="rollout.py"),
    Need("openrlhf/utils/distributed_util.py", "torch_dist_barrier_and_cuda_sync", used_by="rollout.py"),
    *_names("openrlhf/utils/deepspeed/deepspeed.py", "compat.py (CPU)", "get_train_ds_config", "init_device_mesh"),
    Need("openrlhf/utils/utils.py", "convert_to_torch_dtype", used_by="compat.py (CPU)"),
    # Repeatable rollouts: the seeded sample generator (samples.py), the seeded vLLM actor (vllm_seeded.py), the
    # LoRA init seeded like the local engine's (policy.py).
    Need("openrlhf/trainer/ppo_trainer.py", "SamplesGenerator", used_by="experience.py (seeded_samples)"),
    Need(SAMPLES, "SamplesGenerator", used_by="samples.py"),
    Need(SAMPLES, "_collect_prompt_batch", ("dataloader_iter", "num_prompts"), "samples.py"),
    Need(SAMPLES, "SamplesGenerator._dispatch_prompts_to_vllm", ("prompts", "labels", "images"), "samples.py"),
    Need(SAMPLES, "SamplesGenerator._generate_vllm", ("dataloader_iter", "num_prompts", "dynamic_filtering"),
         "samples.py"),
    Need(SAMPLES, "SamplesGenerator._process_response_into_experience", ("response",), "samples.py"),
    Need("openrlhf/trainer/ray/vllm_engine.py", "RolloutRayActor.generate",
         ("prompt_token_ids", "sampling_params", "multi_modal_data"), "vllm_seeded.py"),
    Need("openrlhf/models/actor.py", "get_peft_model", used_by="policy.py (seeded_lora_init)"),
    # OpenRLHF's vLLM engines and weight sync on a machine without CUDA (vllm_cpu.py, vllm_cpu_worker.py), the LoRA
    # sync and the check after each sync (vllm_sync.py).
    Need("openrlhf/trainer/ray/vllm_worker_wrap.py", "WorkerWrap", used_by="vllm_cpu_worker.py"),
    Need("openrlhf/trainer/ray/vllm_worker_wrap.py", "WorkerWrap.init_process_group", used_by="vllm_cpu_worker.py"),
    Need("openrlhf/trainer/ray/vllm_worker_wrap.py", "WorkerWrap.update_weight", ("name", "dtype", "shape"),
         "vllm_cpu.py"),
    Need("openrlhf/utils/distributed_util.py", "stateless_init_process_group",
         ("master_address", "master_port", "rank", "world_size", "device"), "vllm_cpu.py"),
    Need(PPO_ACTOR, "stateless_init_process_group", used_by="vllm_sync.py (the name _init_vllm_sync_group calls)"),
    Need("openrlhf/trainer/ray/vllm_engine.py", "RolloutRayActor.update_weight", ("name", "dtype", "shape"),
         "vllm_sync.py (LoRA)"),
    # Flags the plugin reads from OpenRLHF's parsed args, or adds to its argv.
    *(Need(PPO, flag, used_by="config.py, placement.py, install.py") for flag in (
        "--actor.model_name_or_path", "--actor.num_nodes", "--actor.num_gpus_per_node", "--actor.entropy_coef",
        "--ref.num_nodes", "--ref.num_gpus_per_node", "--algo.advantage.estimator", "--algo.kl.init_coef",
        "--algo.kl.use_loss", "--algo.kl.estimator", "--data.apply_chat_template", "--data.input_template",
        "--data.prompt_dataset", "--data.label_key", "--ds.adam_offload", "--ds.attn_implementation",
        "--ds.packing_samples", "--ds.param_dtype", "--ds.ring_attn_size", "--ds.tensor_parallel_size",
        "--ds.zero_stage", "--eval.dataset", "--reward.model_name_or_path", "--reward.remote_url",
        "--train.agent_func_path", "--train.async_enable", "--train.colocate_all", "--train.colocate_actor_ref",
        "--train.colocate_critic_reward", "--train.dynamic_batch_enable", "--vllm.num_engines",
        "--vllm.tensor_parallel_size", "--vllm.sync_backend", "--rollout.temperature", "--train.seed")),
    Need(PPO, "--actor.loss_agg_mode", used_by="config.py (sampled objective)", adapted="loss_agg_mode_flag"),
    Need(PPO, "--algo.advantage.is_correction_level", used_by="config.py (HF rollout)",
         instead=("--algo.advantage.is_correction_enable",)),
)


@dataclass(frozen=True)
class Finding:
    need: Need
    status: str      # ok | adapted | missing
    detail: str = ""


def _class_method(module: ast.Module, cls: str, method: str) -> ast.FunctionDef | None:
    """`cls.method` as defined in the class or in a base class of the same module (OpenRLHF keeps hierarchies
    such as BaseModelActor -> ReferenceModelActor in one file)."""
    classes = {node.name: node for node in module.body if isinstance(node, ast.ClassDef)}
    seen = set()
    while cls in classes and cls not in seen:
        seen.add(cls)
        node = classes[cls]
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
                return item
        bases = [base.id for base in node.bases if isinstance(base, ast.Name)]
        cls = bases[0] if bases else ""
    return None


def _params(function: ast.FunctionDef) -> set[str]:
    args = function.args
    return {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}


def _lookup(need: Need, sources: Mapping[str, str]) -> str | None:
    """None when the release has the need, else what is missing (a short phrase)."""
    if need.where not in sources:
        return "no such module"
    text = sources[need.where]
    if need.name.startswith("--"):
        return None if need.name in versions.parser_flags(text) else "no such flag"
    if not need.name:
        return None
    module = ast.parse(text)
    cls, _, method = need.name.partition(".")
    if not method:
        node = versions.module_names(text).get(cls)
        if node is None:
            return "no such name"
        if need.params and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lacking = sorted(set(need.params) - _params(node))
            return f"no parameter {', '.join(lacking)}" if lacking else None
        return None
    function = _class_method(module, cls, method)
    if function is None:
        return "no such class" if cls not in versions.module_names(text) else "no such method"
    lacking = [p for p in need.params if p not in _params(function)]
    if lacking and function.args.kwarg is None:
        return f"no parameter {', '.join(lacking)}"
    return None


def check(sources: Mapping[str, str]) -> list[Finding]:
    """Every need against one release's sources ({'openrlhf/...py': text})."""
    findings = []
    for need in NEEDS:
        problem = _lookup(need, sources)
        if problem is None:
            findings.append(Finding(need, "ok"))
            continue
        substitute = next((name for name in need.instead
                           if _lookup(Need(need.where, name), sources) is None), None)
        if substitute:
            findings.append(Finding(need, "adapted", f"{problem}; {substitute} does its job"))
        elif need.adapted:
            gap = next(g for g in versions.GAPS if g.feature == need.adapted)
            findings.append(Finding(need, "adapted", f"{problem}; {gap.remedy}"))
        else:
            findings.append(Finding(need, "missing", problem))
    return findings


def report(name: str, findings: list[Finding], verbose: bool = False) -> str:
    counts = {status: sum(f.status == status for f in findings) for status in ("ok", "adapted", "missing")}
    lines = [f"OpenRLHF {name}: {len(findings)} needs of the SafeSteer plugin; {counts['ok']} present, "
             f"{counts['adapted']} made up for by the plugin, {counts['missing']} missing"]
    for finding in findings:
        if verbose or finding.status != "ok":
            lines.append(f"  {finding.status:8} {finding.need.label()}  [{finding.need.used_by}]"
                         + (f": {finding.detail}" if finding.detail else ""))
    return "\n".join(lines)


def _sources(args) -> list[tuple[str, Mapping[str, str]]]:
    from openrlhf_safesteer.plugin import releases

    found = []
    if args.installed:
        root = versions.installed_root()
        if root is None:
            raise FileNotFoundError("OpenRLHF is not installed in this Python")
        found.append((f"{versions.installed_version()} (installed, {root})", versions.FolderSources(root)))
    for version in args.wheel or []:
        found.append((f"{version} (wheel)", releases.wheel_sources(releases.wheel(version))))
    for folder in args.source or []:
        found.append((f"source {folder}", versions.FolderSources(folder)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openrlhf_safesteer.plugin.contract",
                                     description="Check an OpenRLHF release against what the SafeSteer plugin uses.")
    parser.add_argument("--installed", action="store_true", help="the OpenRLHF this Python would import")
    parser.add_argument("--wheel", nargs="+", metavar="VERSION", help="released versions (downloaded, cached)")
    parser.add_argument("--source", nargs="+", metavar="DIR", help="`openrlhf` package folders")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every need, not only the problems")
    args = parser.parse_args(argv)
    if not (args.installed or args.wheel or args.source):
        args.installed = True
    from openrlhf_safesteer.plugin.releases import DownloadError

    try:
        sources = _sources(args)
    except (DownloadError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = False
    for name, files in sources:
        findings = check(files)
        missing |= any(f.status == "missing" for f in findings)
        print(report(name, findings, args.verbose))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
