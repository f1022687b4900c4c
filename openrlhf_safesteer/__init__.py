"""openrlhf-safesteer: SafeSteer (arXiv 2606.02530), localized on-policy distillation for safety.

The public API is plain PyTorch + transformers; nothing here imports OpenRLHF. Names are loaded
lazily so `import openrlhf_safesteer` stays cheap on Ray workers and in the CLI.
"""

from __future__ import annotations

import importlib
import warnings

# torch's CUDA module imports the deprecated `pynvml` package (pulled in by a dependency, not by this
# project) and warns about it on every start; the warning names nothing a user of this package can change.
# Every module of the package is imported through here, before any of them imports torch.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

__version__ = "0.1.0"

_EXPORTS = {
    # models / hooks
    "decoder_layers": "openrlhf_safesteer.models",
    "hidden_size": "openrlhf_safesteer.models",
    "unwrap_model": "openrlhf_safesteer.models",
    "SteeringVector": "openrlhf_safesteer.steering",
    "steer": "openrlhf_safesteer.steering",
    "attach_steering": "openrlhf_safesteer.steering",
    "ablate": "openrlhf_safesteer.steering",
    # templates and directions
    "post_instruction_positions": "openrlhf_safesteer.templates",
    "candidate_directions": "openrlhf_safesteer.directions",
    "refusal_token_ids": "openrlhf_safesteer.directions",
    "refusal_score": "openrlhf_safesteer.directions",
    "select_direction": "openrlhf_safesteer.directions",
    # safety tokens
    "SafetyTokenSet": "openrlhf_safesteer.safety_tokens",
    "select_safety_tokens": "openrlhf_safesteer.safety_tokens",
    # objectives and metrics
    "localized_reverse_kl": "openrlhf_safesteer.objectives",
    "localized_forward_kl": "openrlhf_safesteer.objectives",
    "renormalized_reverse_kl": "openrlhf_safesteer.objectives",
    "full_vocab_reverse_kl": "openrlhf_safesteer.objectives",
    "sampled_advantages": "openrlhf_safesteer.objectives",
    "safety_metrics": "openrlhf_safesteer.objectives",
    # chat helpers and the string judge
    "render_prompts": "openrlhf_safesteer.chat",
    "generate": "openrlhf_safesteer.chat",
    "is_refusal": "openrlhf_safesteer.refusal",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'openrlhf_safesteer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
