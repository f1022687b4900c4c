"""Optional packages: is the real one importable here, or only this project's import stand-in?

`openrlhf_safesteer.plugin.compat` registers stand-in modules for flash_attn and vllm on machines
that lack them (OpenRLHF imports both at module import) and marks them with STAND_IN_MARK. This
module holds the check with no side effects, so the local engine can ask "is vLLM really here?"
without importing the plugin (which would register the stand-ins).
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
