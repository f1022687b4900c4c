"""The demo's model: the embedded Qwen2.5-Coder-0.5B-Instruct, an entry of the core loader's registry.

The loader itself is `openrlhf_safesteer.loading`; these names stay here for the demo modules that
import them from `.model`.
"""

from openrlhf_safesteer.loading import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "load_model"]
