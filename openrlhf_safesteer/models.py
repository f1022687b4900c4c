"""Finding the parts of a Hugging Face causal LM that SafeSteer hooks, whatever wraps it.

SafeSteer touches a model in exactly one place: the input of a decoder block (the residual stream
entering layer l). These helpers find the decoder blocks of any HF decoder-only model, through the
wrappers the engines add (PEFT adapters, DeepSpeed/DDP engines exposing `.module`), so the
steering hook and direction extraction work on the raw model, a LoRA student and a DeepSpeed actor
alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Attribute paths of the decoder-block list, tried in order before the generic search.
_LAYER_PATHS: Sequence[str] = (
    "model.layers",                     # llama, mistral, qwen2/3, gemma/2/3-text, phi3, olmo, ...
    "model.language_model.layers",      # multimodal wrappers (gemma3, llava-style) in transformers 5
    "language_model.model.layers",
    "transformer.h",                    # gpt2, gpt-j, falcon, bloom
    "gpt_neox.layers",                  # pythia / gpt-neox
    "model.decoder.layers",             # opt
    "transformer.blocks",               # mpt
    "layers",                           # a bare decoder (LlamaModel)
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying HF model: strips DeepSpeed/DDP engines (`.module`) and PEFT wrappers.

    The LoRA layers stay in place (they live inside the base model's modules), so hooks on the
    returned model's blocks also see the adapted weights.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DeepSpeedEngine, DDP, OpenRLHF Actor
            model = model.module
        elif isinstance(getattr(model, "model", None), nn.Module) and not hasattr(model, "config"):
            # OpenRLHF's Actor keeps the HF model as `.model` and has no config of its own.
            model = model.model
    return model


def _get_path(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def text_config(model: nn.Module):
    """The config describing the decoder stack (the text config of multimodal models)."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no `config`; pass a Hugging Face model")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(decoder_layers(model))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of an HF causal LM (through PEFT/DeepSpeed wrappers).

    Known attribute paths first; otherwise the shallowest ModuleList whose length equals the
    config's number of hidden layers. Raises a clear error when none is found.
    """
    base = unwrap_model(model)
    for path in _LAYER_PATHS:
        found = _get_path(base, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    expected = None
    try:
        config = text_config(base)
        expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    except TypeError:
        pass
    candidates = [
        (name.count("."), name, module) for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise ValueError(
            f"cannot find the decoder layers of {type(base).__name__}: tried {', '.join(_LAYER_PATHS)} and any "
            f"ModuleList of length num_hidden_layers={expected}"
        )
    candidates.sort(key=lambda c: (c[0], c[1]))
    logger.debug("decoder layers of %s found at %s", type(base).__name__, candidates[0][1])
    return candidates[0][2]


def hidden_size(model: nn.Module) -> int:
    """Width H of the residual stream."""
    config = text_config(model)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}")


def vocab_size(model: nn.Module) -> int:
    """Size V of the output vocabulary (rows of the LM head, which may exceed len(tokenizer))."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(text_config(base).vocab_size)


def model_name(model: nn.Module) -> str:
    """The name or path the model was loaded from ("" when unknown)."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    return str(getattr(base, "name_or_path", "") or getattr(config, "name_or_path", "") or "")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def left_padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a LEFT-padded batch: 0 at each row's first real token (pads get 0).

    A plain forward numbers positions from the first column, so left padding would shift absolute
    position embeddings (GPT-2) by the pad count; HF generate does this same correction.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
