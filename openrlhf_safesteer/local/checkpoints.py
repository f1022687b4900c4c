"""Checkpoints of a local run: written atomically, resumed exactly, refused when they belong to another run.

    out/checkpoints/step_N/model/            the student in HF format (the adapter folder with LoRA)
    out/checkpoints/step_N/trainer_state/    trainable weights, AdamW moments (safetensors + JSON, no pickle),
                                             the schedule, the step, the config and the run's identity
    out/checkpoints/latest                   the name of the newest step_N
    out/final/                               the trained model, LoRA merged (save_final)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from openrlhf_safesteer.files import atomic_write_text, json_sha256, replace_dir
from openrlhf_safesteer.steering import SteeringVector

from .config import TrainConfig, flag_of, total_steps

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}



def _atomic_dir(final: Path, write) -> None:
    """Write a directory under a temporary name, then swap it into place (replace_dir: the old copy is
    removed only once the new one is at `final`)."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """AdamW state as flat tensors (safetensors) + JSON-able param groups (no pickle)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(out: Path, step: int, student: nn.Module, tokenizer, optimizer, scheduler,
                    cfg: TrainConfig, run: dict | None = None) -> Path:
    """out/checkpoints/step_N: the model in HF format (adapter folder if LoRA) + trainer state; atomic.
    run: the run's identity (run_identity), compared on resume."""
    from safetensors.torch import save_file

    root = out / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        state_dir = tmp / "trainer_state"
        state_dir.mkdir()
        save_file(trainable_state(student), str(state_dir / "trainable.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(state_dir / "optimizer.safetensors"))
        (state_dir / "optimizer.json").write_text(json.dumps(opt_meta))
        (state_dir / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (state_dir / "state.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg),
                                                               "run": run}, indent=1))

    _atomic_dir(final, write)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    kept = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in kept[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint out/checkpoints/latest names; None when there is no pointer. A pointer to a missing
    or incomplete folder is an error: silently starting afresh would redo the run and mix it with the old one."""
    pointer = out / CHECKPOINT_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    path = out / CHECKPOINT_DIR / pointer.read_text().strip()
    if not (path / "trainer_state" / "state.json").is_file():
        raise ValueError(f"{pointer} names {path.name}, which is missing or incomplete; move {out / CHECKPOINT_DIR} "
                         "aside to start this run afresh, or choose another --out")
    return path


# The settings that define a run: resuming with another value would continue one run's checkpoint with
# another run's data, loss or schedule. total_steps stands for max_steps/epochs (they set the cosine
# schedule's length, so a new value changes the lr of every remaining step). Left out on purpose, as they
# may change between the invocations of one run: where and how it is saved or logged (out, resume,
# stop_after, save_every, keep_checkpoints, save_final, progress, tensorboard, wandb*), and how the same
# computation is carried out: micro_batch_size (accumulation sums to the same loss), gradient_checkpointing,
# teacher (frozen_copy and shared_lora are the same teacher), rollout_backend, vllm_gpu_memory_utilization,
# and bf16 (a run may move between a GPU and a CPU).
RUN_FIELDS = ("objective", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "prompts_per_step",
              "retain_prompts_per_step", "samples_per_prompt", "max_new_tokens", "temperature", "top_p", "lora_r",
              "lora_alpha", "lora_targets", "lora_layers", "freeze_embeddings", "seed")


def _digest(obj) -> str:
    """The short sha256 run identities store (of a list: the same digest as sha256(json.dumps(obj)))."""
    return json_sha256(obj)[:16]


def run_identity(cfg: TrainConfig, prompts: list[str], steering_vector: SteeringVector | None,
                 safety_ids, retain_prompts: list[str] | None = None) -> dict:
    """What makes two invocations the same run (JSON values; see RUN_FIELDS for what is left out and why)."""
    uses_vector = cfg.objective != "system_prompt" and steering_vector is not None
    ids = [int(i) for i in torch.as_tensor(safety_ids).flatten().tolist()]
    identity = {name: getattr(cfg, name) for name in RUN_FIELDS}
    identity.update(
        total_steps=total_steps(len(prompts), cfg),
        prompts=f"{len(prompts)} prompts, sha256 {_digest(list(prompts))}",
        safety_ids=f"{len(ids)} ids, sha256 {_digest(ids)}",
        vector=(f"layer {steering_vector.layer}, sha256 {_digest(steering_vector.vector.tolist())}"
                if uses_vector else None),
        coeff=((cfg.coeff if cfg.coeff is not None else steering_vector.coeff) if uses_vector else None),
        system_prompt=cfg.system_prompt if cfg.objective == "system_prompt" else None,
    )
    if cfg.retain_prompts_per_step:     # absent otherwise: checkpoints of runs without the term still resume
        identity["retain_prompts"] = f"{len(retain_prompts)} prompts, sha256 {_digest(list(retain_prompts))}"
        identity["retain_divergence"] = cfg.retain_divergence
    return json.loads(json.dumps(identity))   # tuples -> lists: comparable with what state.json gives back


def check_same_run(ckpt: Path, identity: dict) -> None:
    """Refuse to resume `ckpt` with settings that define another run (naming the first that differs)."""
    state = json.loads((ckpt / "trainer_state" / "state.json").read_text())
    saved = state.get("run")
    if saved is None:   # written before the identity was stored: compare the settings its config holds
        config = state.get("config", {})
        saved = {name: config[name] for name in RUN_FIELDS if name in config}
    for key, old in saved.items():
        if key in identity and identity[key] != old:
            raise ValueError(f"{ckpt} belongs to a run with {flag_of(key)} = {old!r}, but this call has {identity[key]!r}; "
                             "resume with the run's own settings, or start a new run in another --out "
                             "(--no-resume does not reuse a folder that holds checkpoints)")


def resume_point(cfg: TrainConfig, identity: dict) -> Path | None:
    """The checkpoint this call continues from (None: a fresh run). Needs no model, so it runs before the
    model loads: it refuses a fresh run over another run's checkpoints (retention, by step number, would then
    delete the new run's checkpoints and keep the old run's), a dangling `latest`, and a resume whose
    settings differ from the run's."""
    root = Path(cfg.out) / CHECKPOINT_DIR
    steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    if not cfg.resume:
        if steps:
            raise ValueError(f"{root} holds a previous run's checkpoints (step {steps[-1]}); resume it "
                             "without --no-resume, or choose another --out")
        return None
    ckpt = latest_checkpoint(Path(cfg.out))
    if ckpt is None:
        if steps:
            raise ValueError(f"{root} holds checkpoints (step {steps[-1]}) but no {LATEST_FILE!r} pointer; "
                             "move them aside to start afresh, or choose another --out")
        return None
    check_same_run(ckpt, identity)
    return ckpt


def load_checkpoint(path: Path, student: nn.Module, optimizer, scheduler) -> int:
    """Restore trainable weights, AdamW moments and the schedule; returns the number of steps done."""
    from safetensors.torch import load_file

    state_dir = path / "trainer_state"
    weights = load_file(str(state_dir / "trainable.safetensors"))
    params = dict(student.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(f"checkpoint {path} does not match this run's trainable parameters "
                         f"(e.g. LoRA vs full fine-tuning); start a fresh --out or pass --no-resume")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    _load_optimizer(optimizer, load_file(str(state_dir / "optimizer.safetensors")),
                    json.loads((state_dir / "optimizer.json").read_text()))
    scheduler.load_state_dict(json.loads((state_dir / "scheduler.json").read_text()))
    return int(json.loads((state_dir / "state.json").read_text())["step"])


def merged(model: nn.Module) -> nn.Module:
    """The model with any LoRA adapter merged into its weights (in place: call when training is over), so
    generation does not pay the adapter's two extra matmuls per projection at every token."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


@contextlib.contextmanager
def without_deepspeed_probe() -> Iterator[None]:
    """While saving: transformers' save_pretrained unwraps the model with accelerate's extract_model_from_parallel,
    which imports deepspeed (wherever it is installed) only to ask whether the model is a DeepSpeedEngine: 2-7 s on
    2 cores in a process that never loaded deepspeed. No object can be a DeepSpeedEngine there, so accelerate is
    told deepspeed is absent for the duration; a process that did import deepspeed gets the probe unchanged."""
    if "deepspeed" in sys.modules:
        yield
        return
    import accelerate.utils.other as accelerate_other

    probe = accelerate_other.is_deepspeed_available
    accelerate_other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        accelerate_other.is_deepspeed_available = probe


def save_final(out: Path, student: nn.Module, tokenizer) -> tuple[Path, nn.Module]:
    """out/final: a plain HF checkpoint (LoRA merged into the weights), atomically. Returns (dir, plain model)."""
    final = out / "final"
    model = merged(student)  # the run is over
    model.eval()

    def write(tmp: Path) -> None:
        with without_deepspeed_probe():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _atomic_dir(final, write)
    return final, model
