"""Steering vectors and the hooks that apply them: activation addition (the teacher) and
directional ablation (used to score candidate directions).

    sv = SteeringVector.load("vec/")
    sv.check_compatible(model)
    with steer(model, sv):                 # the SafeSteer teacher: + coeff * d at layer sv.layer
        teacher_logits = model(input_ids).logits
    handle = attach_steering(model, sv)    # the same hook, kept until handle.remove()
    with ablate(model, sv.vector):         # project d out of the residual stream everywhere
        ...

Both hooks act on every position of every forward pass (prompt, response, and every decoding
step under a KV cache), because the residual stream is what they edit, not the tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# The atomic writers live in openrlhf_safesteer.files (one copy for the package); save() uses two of them, and all
# three stay importable from here, where they were first defined.
from openrlhf_safesteer.files import atomic_savefig, atomic_write_text, replace_dir  # noqa: F401  (re-exported)
from openrlhf_safesteer.models import (
    decoder_layers,
    hidden_size,
    model_name,
    num_layers,
)

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

FORMAT_VERSION = 1
VECTOR_FILE = "vector.safetensors"
CONFIG_FILE = "steering_vector.json"
# What `safesteer direction` writes beside the pair. save() swaps the folder in whole, so it replaces a
# folder holding only these (and hidden temporaries of interrupted writes), and refuses one holding anything else.
SIDE_FILES = frozenset({"candidates.json", "candidates.csv", "candidates.png", "candidates.tmp.png"})


class IncompatibleArtifactError(ValueError):
    """An artifact (steering vector, safety-token set) does not fit the model it is applied to."""


def finite_coeff(coeff: float, name: str = "coeff") -> float:
    """coeff as a float; ValueError unless finite (a NaN or infinite addition turns every logit into NaN)."""
    value = float(coeff)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {coeff!r}")
    return value


def _check_parent_writable(path: Path) -> None:
    """Raise unless path's folder is writable, or can be created (mkdir parents=True) under a writable one."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is not a directory, so {path} cannot be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{parent} is not writable, so {path} cannot be written")


def check_output_file(path: str | os.PathLike) -> Path:
    """Raise (before any compute) unless path can be written as a file by atomic_write_text."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path, e.g. {path / 'tokens.json'}")
    _check_parent_writable(path)
    return path


def _replaceable(name: str) -> bool:
    return name in (VECTOR_FILE, CONFIG_FILE) or name in SIDE_FILES or (name.startswith(".") and ".tmp" in name)


def check_vector_dir(directory: str | os.PathLike) -> Path:
    """Raise (before any compute) unless SteeringVector.save can write directory: absent, empty, or a
    steering-vector folder (it is replaced whole, so a folder with other files is refused, not emptied)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; give a folder for the steering vector")
    if directory.is_dir():
        others = sorted(p.name for p in directory.iterdir() if not _replaceable(p.name))
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise FileExistsError(f"{directory} holds files that are not part of a steering-vector folder ({shown}); "
                                  "saving replaces the folder whole, so give a new or empty folder")
    _check_parent_writable(directory)
    return directory


@dataclass
class SteeringVector:
    """A steering vector d (H,) for the input of decoder layer `layer`, with its provenance.

    vector: raw difference of means (not normalised), stored float32. coeff: default coefficient
    of the activation addition (1.0 in the paper). position: the post-instruction template position
    it was read at (negative, from the end of the prompt), for the record. source: how it was made
    (data hashes, selection scores, config).
    """

    vector: Tensor
    layer: int
    coeff: float = 1.0
    position: int | None = None
    model_name: str = ""
    hidden_size: int | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vector, torch.Tensor) or self.vector.dim() != 1:
            shape = tuple(self.vector.shape) if isinstance(self.vector, torch.Tensor) else type(self.vector).__name__
            raise ValueError(f"steering vector must be a 1-D tensor (H,), got {shape}")
        if not torch.isfinite(self.vector).all():
            raise ValueError("steering vector has non-finite entries")
        self.vector = self.vector.detach().to("cpu", torch.float32).contiguous()
        if self.hidden_size is None:
            self.hidden_size = int(self.vector.numel())
        if self.hidden_size != self.vector.numel():
            raise ValueError(f"hidden_size={self.hidden_size} but the vector has {self.vector.numel()} entries")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        self.coeff = finite_coeff(self.coeff)

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def check_compatible(self, model: nn.Module) -> None:
        """Raise IncompatibleArtifactError unless the model's width and depth fit this vector."""
        width, depth = hidden_size(model), num_layers(model)
        if width != self.hidden_size:
            raise IncompatibleArtifactError(
                f"steering vector was made for hidden size {self.hidden_size} (model {self.model_name!r}) but the "
                f"model has hidden size {width} ({model_name(model)!r})"
            )
        if not 0 <= self.layer < depth:
            raise IncompatibleArtifactError(
                f"steering vector targets layer {self.layer} but the model has {depth} decoder layers (0..{depth - 1})"
            )
        name = model_name(model)
        if self.model_name and name and os.path.basename(name.rstrip("/")) != os.path.basename(self.model_name.rstrip("/")):
            # Not an error: a fine-tuned student is a different checkpoint of the same model.
            logger.info("steering vector was made on %r, applying it to %r", self.model_name, name)

    def config_mismatch(self, model_config) -> str | None:
        """Why this vector does not fit a model with this HF config (width, depth), read from config.json
        alone, so no weights load (the OpenRLHF driver, eval's preflight); None when it fits or the config
        does not say."""
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        width = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
        depth = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
        if width is not None and self.hidden_size != width:
            return (f"the vector was made for hidden size {self.hidden_size} ({self.model_name!r}) but the model has "
                    f"hidden size {width}")
        if depth is not None and not 0 <= self.layer < depth:
            return f"the vector targets decoder layer {self.layer} but the model has {depth} layers (0..{depth - 1})"
        return None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `vector.safetensors` and `steering_vector.json` into directory, atomically as a pair.

        Both files are written into a temporary sibling folder that replace_dir swaps in, so an interrupted
        overwrite leaves the old pair or the new one, never a new vector under an old layer/coeff. The old
        folder goes whole (stale candidates.* with it); a folder holding other files is refused.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        target = Path(os.path.realpath(directory))     # swap the folder a symlink points to, not the link
        check_vector_dir(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not mkdtemp: its 0700 would become the folder's mode; mkdir applies the umask as a plain mkdir does.
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        tmp.mkdir()
        try:
            save_file({"vector": self.vector}, str(tmp / VECTOR_FILE), metadata={"format": "safesteer.steering_vector"})
            config = {
                "format_version": FORMAT_VERSION,
                "layer": self.layer,
                "coeff": finite_coeff(self.coeff),     # again: the attribute may have been set after __init__
                "position": self.position,
                "model_name": self.model_name,
                "hidden_size": self.hidden_size,
                "norm": self.norm,
                "source": self.source,
            }
            atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)     # gone already once swapped in
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SteeringVector:
        """Read a steering vector written by `save`; clear errors for a missing or malformed folder."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, vector_path = directory / CONFIG_FILE, directory / VECTOR_FILE
        for path in (config_path, vector_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: {directory} is not a steering-vector folder "
                                        f"(make one with `safesteer direction`)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: unsupported format_version {config.get('format_version')!r}")
        tensors = load_file(str(vector_path))
        if "vector" not in tensors:
            raise ValueError(f"{vector_path} has no tensor named 'vector'")
        try:
            return cls(
                vector=tensors["vector"], layer=int(config["layer"]), coeff=float(config.get("coeff", 1.0)),
                position=config.get("position"), model_name=config.get("model_name", ""),
                hidden_size=int(config["hidden_size"]), source=config.get("source", {}),
            )
        except ValueError as error:     # e.g. "coeff": NaN: name the file, not just the field
            raise ValueError(f"{directory}: {error}") from None


def _edit_first(value: Any, edit) -> Any:
    """Apply edit to a hidden-state tensor returned as a tensor or as the first item of a tuple."""
    if isinstance(value, torch.Tensor):
        return edit(value)
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (edit(value[0]), *value[1:])
    return value


class _Cast:
    """A CPU float32 vector, cast once per (device, dtype) it meets."""

    def __init__(self, vector: Tensor):
        self.vector = vector
        self.cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, hidden: Tensor) -> Tensor:
        key = (hidden.device, hidden.dtype)
        if key not in self.cache:
            self.cache[key] = self.vector.to(device=hidden.device, dtype=hidden.dtype)
        return self.cache[key]


def _addition_pre_hook(vector: Tensor, coeff: float | Tensor):
    """coeff: a number (every row), or per-row coefficients (B,), or per-token ones (B, T) (packed rows)."""
    if not isinstance(coeff, torch.Tensor):
        cast = _Cast(vector * coeff)

        def add(hidden: Tensor) -> Tensor:
            return hidden + cast.like(hidden)
    else:
        cast, scales = _Cast(vector), _Cast(coeff)

        def add(hidden: Tensor) -> Tensor:
            scale = scales.like(hidden)
            rows_only = scale.dim() == 1
            if scale.shape != hidden.shape[:scale.dim()]:
                raise ValueError(f"per-{'row' if rows_only else 'token'} steering coefficients of shape "
                                 f"{tuple(scale.shape)} do not fit hidden states {tuple(hidden.shape)}")
            scale = scale[:, None, None] if rows_only else scale[..., None]   # (B, 1, 1) or (B, T, 1)
            return hidden + scale * cast.like(hidden)

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        # Decoder blocks take the residual stream as their first positional argument in HF, but
        # some callers (vLLM, custom checkpointing) pass it as `hidden_states=`.
        if args:
            return (add(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}
        raise RuntimeError(f"steering hook on {type(module).__name__} found no hidden states in its inputs")

    return hook


def row_coefficients(coeff: Tensor) -> Tensor:
    """Per-row (B,) or per-token (B, T) steering coefficients as a CPU float32 tensor; ValueError unless finite."""
    coeff = torch.as_tensor(coeff).detach()
    if coeff.dim() not in (1, 2) or coeff.numel() == 0:
        raise ValueError(f"per-row steering coefficients must be (B,) or (B, T), got shape {tuple(coeff.shape)}")
    if not torch.isfinite(coeff).all():
        raise ValueError("per-row steering coefficients must be finite")
    return coeff.to("cpu", torch.float32)


def _resolve(model: nn.Module, steering_vector: SteeringVector,
             coeff: float | Tensor | None) -> tuple[nn.Module, float | Tensor]:
    steering_vector.check_compatible(model)
    if isinstance(coeff, torch.Tensor):
        coeff = row_coefficients(coeff)
    else:
        coeff = steering_vector.coeff if coeff is None else finite_coeff(coeff)
    return decoder_layers(model)[steering_vector.layer], coeff


def attach_steering(model: nn.Module, steering_vector: SteeringVector,
                    coeff: float | Tensor | None = None) -> RemovableHandle:
    """Add coeff * d to the input of decoder layer `steering_vector.layer` at every position, until
    `handle.remove()`. coeff defaults to the vector's own; a tensor gives each row its own coefficient
    ((B,): row b gets coeff[b] * d; (B, T): per token, e.g. packed sequences), 0 leaving a row unsteered.
    Works through PEFT/DeepSpeed wrappers."""
    layer, coeff = _resolve(model, steering_vector, coeff)
    return layer.register_forward_pre_hook(_addition_pre_hook(steering_vector.vector, coeff), with_kwargs=True)


@contextlib.contextmanager
def steer(model: nn.Module, steering_vector: SteeringVector,
          coeff: float | Tensor | None = None) -> Iterator[nn.Module]:
    """Context manager form of attach_steering: the model is the steered teacher inside the block."""
    handle = attach_steering(model, steering_vector, coeff)
    try:
        yield model
    finally:
        handle.remove()


# Child names under which decoder blocks keep their attention and MLP sub-blocks.
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _sub_blocks(layer: nn.Module) -> list[nn.Module]:
    found = []
    for names in (_ATTENTION_NAMES, _MLP_NAMES):
        for name in names:
            child = getattr(layer, name, None)
            if isinstance(child, nn.Module):
                found.append(child)
                break
    return found


@contextlib.contextmanager
def ablate(model: nn.Module, direction: Tensor | SteeringVector) -> Iterator[nn.Module]:
    """Directional ablation: project the unit direction r = d/|d| out of the residual stream.

    h <- h - (h . r) r on the input of every decoder block, the outputs of its attention and MLP
    sub-blocks (so the mid-block residual never carries r either) and the block's output (which
    also covers architectures that normalise sub-block outputs before the residual add, e.g.
    Gemma-2). direction: (H,) tensor or a SteeringVector.
    """
    vector = direction.vector if isinstance(direction, SteeringVector) else direction
    if vector.dim() != 1 or vector.numel() != hidden_size(model):
        raise IncompatibleArtifactError(
            f"ablation direction has shape {tuple(vector.shape)}, the model's hidden size is {hidden_size(model)}"
        )
    norm = vector.detach().double().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("cannot ablate a zero (or non-finite) direction")
    cast = _Cast((vector.detach().double() / norm).float())

    def project(hidden: Tensor) -> Tensor:
        unit = cast.like(hidden)
        return hidden - (hidden @ unit).unsqueeze(-1) * unit

    def pre_hook(module, args, kwargs):
        if args:
            return (project(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": project(kwargs["hidden_states"])}
        return None

    def post_hook(module, args, output):
        return _edit_first(output, project)

    handles: list[RemovableHandle] = []
    try:
        for layer in decoder_layers(model):
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            for sub in _sub_blocks(layer):
                handles.append(sub.register_forward_hook(post_hook))
            handles.append(layer.register_forward_hook(post_hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()
