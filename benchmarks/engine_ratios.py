"""Ratios 4-6: the local engine against TRL's GKDTrainer, the demo's stage shares, LoRA memory.

4. One local-engine optimizer step (student rollouts + steered-teacher scoring on S + update) vs one
   step of TRL's GKDTrainer (trl.experimental.gkd, lmbda=1 fully on-policy, beta=1 reverse KL over the
   full vocabulary) distilling the same student from the same steered teacher (attach_steering on a
   frozen copy): same sequences per step, max_new_tokens, temperature, LoRA settings. Steps alternate
   (engine, TRL, engine, ...); the median after warm-up is reported.
5. Direction extraction + safety-token selection wall time as a share of the whole `safesteer demo`,
   from the per-stage timings the demo writes to report.json.
6. Peak RSS of the local engine in LoRA shared-teacher mode vs frozen-copy mode, each in its own
   subprocess (`python -m benchmarks.engine_ratios memory ...`), on the demo model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import Ratio, paired_median_seconds

logger = logging.getLogger("benchmarks")

DEFAULT_DEMO_REPORT = "outputs/demo/report.json"


@dataclass
class EngineSettings:
    """Per-model sizes of one training step (the demo's own for `demo`)."""

    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    lora_r: int
    lr: float
    k: int = 50

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


def engine_settings(name: str) -> EngineSettings:
    if name == "demo":
        from openrlhf_safesteer.demo.pipeline import DemoConfig

        d = DemoConfig()
        return EngineSettings(d.prompts_per_step, d.samples_per_prompt, d.max_new_tokens, d.lora_r, d.lr, d.k)
    if name == "llama-1b":
        return EngineSettings(4, 2, 128, 16, 2e-4)
    return EngineSettings(4, 2, 32, 0, 1e-5)


def load_model_and_tokenizer(name: str, device: str):
    """(model, tokenizer) with a chat template. Random models use the in-memory tiny tokenizer; ids
    above its 512 tokens decode to nothing, which is fine for timing (rollouts run to max_new_tokens)."""
    if name == "demo":
        from openrlhf_safesteer.loading import load_model

        model, tokenizer = load_model()
        return model.to(device), tokenizer
    from benchmarks.run import MODELS
    from openrlhf_safesteer.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = MODELS[name][0]()
    if model.dtype != torch.float32 and device == "cpu":
        model = model.float()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def _vector_and_ids(model, k: int):
    from benchmarks.core_ratios import random_safety_ids, random_vector
    from openrlhf_safesteer.models import decoder_layers

    vector = random_vector(model, layer=len(decoder_layers(model)) // 2)
    vector.vector = vector.vector / vector.vector.norm() * 4.0  # a moderate push, like a real refusal direction
    return vector, random_safety_ids(model.get_output_embeddings().weight.shape[0], k)


def _prompts() -> list[str]:
    from openrlhf_safesteer import data

    return data.harmful("train")


def _engine_config(s: EngineSettings, out: str, teacher: str = "auto"):
    from openrlhf_safesteer.local.engine import TrainConfig

    return TrainConfig(out=out, objective="exact", lr=s.lr, max_steps=1000, prompts_per_step=s.prompts_per_step,
                       samples_per_prompt=s.samples_per_prompt, micro_batch_size=s.sequences,
                       max_new_tokens=s.max_new_tokens, lora_r=s.lora_r, teacher=teacher, progress=False,
                       save_final=False, resume=False)


class EngineStepper:
    """The body of openrlhf_safesteer.local.engine.train's loop, built from the engine's public functions
    (step_prompts, sample_rollouts, make_teacher/prepare_student, train_step), one optimizer step per call.
    Scheduler and metrics logging are left out: they cost microseconds."""

    def __init__(self, model, tokenizer, vector, safety_ids, prompts, cfg):
        from openrlhf_safesteer.local.engine import (
            make_teacher,
            prepare_student,
            teacher_mode,
        )

        self.cfg, self.tokenizer, self.prompts, self.safety_ids = cfg, tokenizer, prompts, safety_ids
        if teacher_mode(cfg) == "frozen_copy":
            self.teacher = make_teacher(model, tokenizer, vector, cfg)
            self.student = prepare_student(model, cfg)
        else:
            self.student = prepare_student(model, cfg)
            self.teacher = make_teacher(self.student, tokenizer, vector, cfg)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step_index = 0
        self.lengths: list[float] = []

    def __call__(self) -> None:
        from openrlhf_safesteer.local.engine import step_prompts, train_step
        from openrlhf_safesteer.local.rollout import sample_rollouts

        cfg = self.cfg
        batch = step_prompts(self.prompts, self.step_index, cfg.prompts_per_step, cfg.seed)
        rollouts = sample_rollouts(self.student, self.tokenizer, batch, cfg.samples_per_prompt, cfg.max_new_tokens,
                                   cfg.temperature, cfg.top_p, seed=cfg.seed,
                                   rollout_index=self.step_index)
        self.optimizer.zero_grad(set_to_none=True)
        train_step(self.student, self.teacher, rollouts, self.safety_ids, cfg)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.step_index += 1
        self.lengths.append(float(rollouts.response_lengths().float().mean()))

    def close(self) -> None:
        self.teacher.remove()


class TRLStepper:
    """One GKDTrainer optimizer step per call: its own training_step (on-policy generate, student and
    teacher forwards, generalized JSD with beta=1, backward), then clip, AdamW and the schedule, as
    Trainer's inner loop does. The teacher is a frozen deep copy with the steering hook attached."""

    def __init__(self, model, tokenizer, vector, prompts, s: EngineSettings, out: str, device: str):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from openrlhf_safesteer.steering import attach_steering

        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.handle = attach_steering(teacher, vector)
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Sure."}]}
                for p in prompts for _ in range(s.samples_per_prompt)]
        peft_config = None
        if s.lora_r > 0:
            from peft import LoraConfig

            from openrlhf_safesteer.local.engine import TrainConfig

            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            peft_config = LoraConfig(r=s.lora_r, lora_alpha=TrainConfig.lora_alpha, lora_dropout=0.0,
                                     target_modules=[t for t in TrainConfig().lora_targets if t in present],
                                     task_type="CAUSAL_LM")
        args = GKDConfig(output_dir=out, per_device_train_batch_size=s.sequences, gradient_accumulation_steps=1,
                         learning_rate=s.lr, weight_decay=0.0, max_grad_norm=1.0, lmbda=1.0, beta=1.0,
                         temperature=1.0, max_new_tokens=s.max_new_tokens, max_steps=1000, report_to="none",
                         save_strategy="no", logging_strategy="no", use_cpu=device == "cpu", bf16=device != "cpu",
                         seed=0, disable_dropout=True, dataloader_num_workers=0, lr_scheduler_type="cosine",
                         warmup_steps=0)
        self.trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, peft_config=peft_config)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer's inner loop, which we unroll
        self.batches = itertools.cycle(self.trainer.get_train_dataloader())
        self.params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        self.lengths: list[float] = []

    def __call__(self) -> None:
        inputs = next(self.batches)
        inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        self.trainer.training_step(self.trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.trainer.optimizer.step()
        self.trainer.lr_scheduler.step()
        self.trainer.model.zero_grad(set_to_none=True)
        prompt_len = inputs["prompts"].shape[1]
        self.lengths.append(float((inputs["labels"][:, prompt_len:] != -100).sum(1).float().mean()))

    def close(self) -> None:
        self.handle.remove()


def ratio_engine_vs_trl(name: str, device: str, repeats: int = 3) -> list[Ratio]:
    """4. Local-engine step / TRL GKDTrainer step, same student, steered teacher, batch and lengths."""
    s = engine_settings(name)
    model, tokenizer = load_model_and_tokenizer(name, device)
    vector, safety_ids = _vector_and_ids(model, s.k)
    prompts = _prompts()
    trl_model = copy.deepcopy(model)  # the same initial student for both trainers
    with tempfile.TemporaryDirectory() as tmp:
        engine = EngineStepper(model, tokenizer, vector, safety_ids.to(device), prompts,
                               _engine_config(s, os.path.join(tmp, "engine")))
        trl = TRLStepper(trl_model, tokenizer, vector, prompts, s, os.path.join(tmp, "trl"), device)
        try:
            t_engine, t_trl = paired_median_seconds(engine, trl, repeats=repeats, warmup=1)
        finally:
            engine.close()
            trl.close()
    mode = f"LoRA r={s.lora_r}, shared teacher" if s.lora_r else "full FT, frozen-copy teacher"
    trl_mode = f"LoRA r={s.lora_r}" if s.lora_r else "full FT"
    note = (f"{s.sequences} seq/step, max_new_tokens={s.max_new_tokens}, T=1; engine: {mode}; TRL: {trl_mode}, "
            f"steered frozen-copy teacher; mean completion tokens engine {_mean(engine.lengths):.1f} / "
            f"TRL {_mean(trl.lengths):.1f}")
    return [Ratio(4, "local-engine step / TRL GKDTrainer step", name, t_engine, t_trl, "s", "<= 0.7", note)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------
# 5. demo stage shares


def ratio_demo_share(name: str, device: str, report_path: str = DEFAULT_DEMO_REPORT) -> list[Ratio]:
    """5. (direction + safety tokens) seconds / whole-demo seconds, from the demo's report.json."""
    if name != "demo":
        return []
    path = Path(report_path)
    if not path.is_file():
        logger.warning("ratio 5 skipped: no demo report at %s (run `make demo` or pass --demo-report)", path)
        return [Ratio(5, "direction + safety tokens / whole demo", name, float("nan"), float("nan"), "s", "report",
                      f"skipped: no {path}; run `make demo` first or pass --demo-report")]
    timings = json.loads(path.read_text())["timings_seconds"]
    stages = timings.get("direction", 0.0) + timings.get("safety tokens", 0.0)
    detail = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    return [Ratio(5, "direction + safety tokens / whole demo", name, stages, timings["total"], "s", "report",
                  f"from {path.name}: {detail}")]


# ------------------------------------------------------------------------------------------------
# 6. peak memory, one subprocess per mode


def _max_rss_bytes() -> int:
    """Peak RSS of this process: VmHWM where readable. ru_maxrss is not used when VmHWM exists: Linux
    carries the forking parent's peak into it across exec, so a child of a big process reports the parent's."""
    peak = _peak_rss_since_reset()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_since_reset() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_memory(name: str, mode: str, steps: int, device: str) -> dict:
    """Run `steps` engine steps in `mode` (shared_lora | frozen_copy, LoRA student) and report peak RSS."""
    s = engine_settings(name)
    if s.lora_r == 0:
        s.lora_r = 16
    model, tokenizer = load_model_and_tokenizer(name, device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    after_load = _max_rss_bytes()
    # Imports alone can set the process peak on a small model; measure the engine's own peak from here.
    reset = _reset_peak_rss()
    vector, safety_ids = _vector_and_ids(model, s.k)
    with tempfile.TemporaryDirectory() as tmp:
        stepper = EngineStepper(model, tokenizer, vector, safety_ids, _prompts(), _engine_config(s, tmp, mode))
        start = time.perf_counter()
        for _ in range(steps):
            stepper()
        seconds = (time.perf_counter() - start) / steps
        stepper.close()
    since_load = _peak_rss_since_reset() if reset else None
    return {"mode": mode, "peak_rss_bytes": max(after_load, since_load or _max_rss_bytes()),
            "rss_after_load_bytes": after_load, "peak_rss_since_load_bytes": since_load,
            "model_bytes": model_bytes, "steps": steps, "seconds_per_step": seconds}


def _memory_subprocess(name: str, mode: str, steps: int, device: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.engine_ratios", "memory", "--model", name, "--mode", mode,
           "--steps", str(steps), "--device", device, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio_lora_memory(name: str, device: str, steps: int = 2) -> list[Ratio]:
    """6. Peak RSS, LoRA shared-teacher / frozen-copy teacher (same LoRA student, same steps)."""
    if name != "demo" and name != "tiny":
        return []
    threads = torch.get_num_threads()
    shared = _memory_subprocess(name, "shared_lora", steps, device, threads)
    frozen = _memory_subprocess(name, "frozen_copy", steps, device, threads)
    gib = 1 << 30
    key = "peak_rss_since_load_bytes" if shared.get("peak_rss_since_load_bytes") else "peak_rss_bytes"
    saved = (frozen[key] - shared[key]) / shared["model_bytes"]
    note = (f"peak RSS of the whole process, own subprocess each, {steps} steps, LoRA r="
            f"{engine_settings(name).lora_r or 16}; engine peak (VmHWM reset after loading) shared "
            f"{shared[key] / gib:.2f} / frozen {frozen[key] / gib:.2f} GiB: saving = {saved:.2f} model copies "
            f"(model {shared['model_bytes'] / gib:.2f} GiB); process RSS after load {shared['rss_after_load_bytes'] / gib:.2f} GiB")
    return [Ratio(6, "peak RSS: LoRA shared teacher / frozen copy", name, shared["peak_rss_bytes"] / gib,
                  frozen["peak_rss_bytes"] / gib, "GiB", "about one model copy less", note)]


RATIOS = {4: ratio_engine_vs_trl, 5: ratio_demo_share, 6: ratio_lora_memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="helper subprocess for ratio 6")
    sub = parser.add_subparsers(dest="command", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--model", default="demo")
    mem.add_argument("--mode", choices=("shared_lora", "frozen_copy"), required=True)
    mem.add_argument("--steps", type=int, default=2)
    mem.add_argument("--device", default="cpu")
    mem.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):
        result = measure_memory(args.model, args.mode, args.steps, args.device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
