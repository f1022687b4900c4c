"""Optional packages: is the real one importable here, or only this project's import stand-in?

`openrlhf_safesteer.plugin.compat` registers stand-in modules for flash_attn and vllm on machines
that lack them (OpenRLHF imports both at module import) and marks them with STAND_IN_MARK. This
module holds the checks with no side effects, and the one answer to "can vLLM run here?" that the
local engine, the evaluation and the OpenRLHF launcher all ask (a stand-in never counts as vLLM).
"""

from __future__ import annotations

import importlib.util
import sys

STAND_IN_MARK = "__safesteer_stand_in__"


def really_installed(name: str) -> bool:
    """True when `name` imports as the real package: not a stand-in already in sys.modules, or findable."""
    module = sys.modules.get(name)
    if module is not None:
        return not getattr(module, STAND_IN_MARK, False)
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def vllm_installed() -> bool:
    """True when the real vLLM package is importable (not openrlhf_safesteer.plugin.compat's stand-in)."""
    return really_installed("vllm")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_missing() -> list[str]:
    """What keeps vLLM from running here, in words (empty when it can run)."""
    missing = []
    if not vllm_installed():
        missing.append("vLLM is not installed")
    if not cuda_available():
        missing.append("no CUDA GPU is available")
    return missing


def vllm_usable() -> bool:
    """vLLM can run here: the real vLLM package is installed and a CUDA GPU is present."""
    return not vllm_missing()
