"""Checkpoints, generation (HF batched or vLLM) and the resumable JSONL cache of replies.

Greedy decoding with the model's own chat template and no system prompt is the default; every
setting that changes a reply is part of `GenerationSettings.key()`, so a cache written under other
settings is never reused, and a re-run with the same settings only generates what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openrlhf_safesteer.files import append_jsonl, json_sha256, read_jsonl
from openrlhf_safesteer.optional import vllm_usable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    system_prompt: str | None = None
    batch_size: int = 8
    backend: str = "auto"  # auto | hf | vllm

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:   # also refuses NaN (nan < 0 is false)
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also refuses NaN; top_p > 1 would silently mean "no nucleus cut"
            raise ValueError(f"top_p (--top-p) must be in (0, 1], got {self.top_p}")
        if self.backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"backend must be auto, hf or vllm, got {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> dict[str, Any]:
        """What changes the replies (batch size and backend do not, under greedy decoding)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "system_prompt": self.system_prompt}


@dataclass
class Checkpoint:
    """A model to evaluate: a path / hub name, or an in-memory model + tokenizer.

    steer: optional steering-vector directory (`safesteer direction --out`); the vector is attached
    for the whole evaluation, which scores the steered teacher itself.
    """

    name: str
    path: str | None = None
    model: Any = None
    tokenizer: Any = None
    steer: str | None = None
    steer_coeff: float | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.model is None:
            raise ValueError(f"checkpoint {self.name!r} needs a path or an in-memory model")
        if self.model is not None and self.tokenizer is None:
            raise ValueError(f"checkpoint {self.name!r}: an in-memory model needs its tokenizer")

    def identity(self) -> dict[str, Any]:
        """What identifies the weights, for cache keys: the path and its weight files' mtimes/sizes."""
        ident: dict[str, Any] = {"name": self.name, "steer": self.steer, "steer_coeff": self.steer_coeff}
        if self.path is not None:
            ident["path"] = os.path.abspath(self.path) if os.path.exists(self.path) else self.path
            ident["files"] = _files_signature(self.path)
        if self.steer is not None:
            ident["steer_files"] = _files_signature(self.steer)
        return ident


def _files_signature(directory: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the weight/config files in a directory: a rewritten checkpoint gets a new cache key."""
    if not os.path.isdir(directory):
        return []
    return sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in Path(directory).iterdir()
                  if f.suffix in (".safetensors", ".bin", ".gguf", ".json") and f.is_file())


def parse_checkpoint_arg(arg: str) -> Checkpoint:
    """'name=path' or a bare path (its basename is the name)."""
    if "=" in arg:
        name, path = arg.split("=", 1)
    else:
        path = arg
        name = Path(arg.rstrip("/")).name or arg
    if not name or not path:
        raise ValueError(f"bad checkpoint {arg!r}; use NAME=PATH or PATH")
    return Checkpoint(name=name, path=path)


def embedded_model_name(path: str | None) -> str | None:
    """The name when `path` names a model embedded in the package registry (`safesteer demo`'s models)."""
    if path is None:
        return None
    try:
        from openrlhf_safesteer.loading import EMBEDDED_MODELS
    except ImportError:
        return None
    return path if path in EMBEDDED_MODELS else None


def load_checkpoint(checkpoint: Checkpoint, device: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) for a checkpoint: in memory as given, an embedded demo model (e.g.
    "qwen2.5-coder-0.5b", converted once from the GGUF packages), a LoRA adapter dir, or a HF path/name."""
    if checkpoint.model is not None:
        return checkpoint.model, checkpoint.tokenizer
    if embedded_model_name(checkpoint.path):
        from openrlhf_safesteer.loading import load_model

        return load_model(checkpoint.path, device=device or "cpu")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    path = checkpoint.path
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    try:
        if adapter:  # a LoRA run: base weights + adapter, merged for fast generation
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise OSError(f"checkpoint {checkpoint.name!r}: cannot load {path}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def choose_backend(settings: GenerationSettings, checkpoint: Checkpoint) -> str:
    """vLLM when asked or (auto) when installed with a GPU and the checkpoint is on disk; else HF."""
    if settings.backend == "vllm":
        if not vllm_usable():
            raise RuntimeError("backend 'vllm' needs vllm installed and a CUDA GPU; use --backend hf")
        if checkpoint.path is None or checkpoint.steer or embedded_model_name(checkpoint.path):
            raise RuntimeError(f"checkpoint {checkpoint.name!r}: vLLM needs a checkpoint on disk without steering")
        return "vllm"
    if (settings.backend == "auto" and vllm_usable() and checkpoint.path is not None and not checkpoint.steer
            and not embedded_model_name(checkpoint.path)):
        return "vllm"
    return "hf"


def vllm_generate(path: str, tokenizer, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    """Chat-templated generation with vLLM (GPU only; not exercised by the CPU test suite)."""
    from vllm import LLM, SamplingParams

    from openrlhf_safesteer.chat import end_of_turn_ids, render_prompts

    texts = render_prompts(tokenizer, prompts, settings.system_prompt)
    # Token ids, not text: the rendered template already holds BOS; vLLM would add a second one.
    token_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    llm = LLM(model=path, tokenizer=path, seed=0)
    params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_new_tokens, stop_token_ids=end_of_turn_ids(tokenizer))
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params)
    return [out.outputs[0].text for out in outputs]


def hf_generate(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    from openrlhf_safesteer.chat import generate

    sampling = settings.temperature > 0
    return generate(model, tokenizer, list(prompts), max_new_tokens=settings.max_new_tokens,
                    batch_size=settings.batch_size, do_sample=sampling,
                    temperature=settings.temperature if sampling else 1.0, top_p=settings.top_p,
                    system_prompt=settings.system_prompt)


# ---------------------------------------------------------------------------------------------
# The cache: one JSONL per (checkpoint, benchmark), one line per reply, appended batch by batch so
# an interrupted run keeps what it generated.


def digest(obj: Any) -> str:
    """A cache key: the first 16 hex digits of obj's canonical JSON sha256."""
    return json_sha256(obj)[:16]


def cached_generate(
    cache_file: Path,
    run_key: str,
    prompts: Sequence[str],
    generate_fn: Callable[[list[str]], list[str]],
    chunk: int = 32,
) -> tuple[list[str], int]:
    """Replies for `prompts`, reusing cached ones made under the same `run_key`.

    generate_fn maps a list of prompts to their replies. Returns (replies in prompt order, how many
    were generated now).
    """
    # skip_bad_lines: a line cut by an interrupted run is generated again
    cached = {row["key"]: row["reply"] for row in read_jsonl(cache_file, skip_bad_lines=True)
              if row.get("run") == run_key}
    keys = [digest([run_key, p]) for p in prompts]
    missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in cached))
    for start in range(0, len(missing), chunk):
        batch = missing[start:start + chunk]
        replies = generate_fn(batch)
        if len(replies) != len(batch):
            raise RuntimeError(f"generator returned {len(replies)} replies for {len(batch)} prompts")
        rows = [{"run": run_key, "key": digest([run_key, p]), "prompt": p, "reply": r} for p, r in zip(batch, replies)]
        append_jsonl(cache_file, rows)
        cached.update((row["key"], row["reply"]) for row in rows)
    return [cached[k] for k in keys], len(missing)
