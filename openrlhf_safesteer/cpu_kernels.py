"""oneDNN matrix products for inference on a CPU.

PyTorch's CPU `F.linear` calls MKL's sgemm, which is far from the memory bound when few rows go
through a large matrix: decoding 8 sequences with the demo's 0.5B model spends most of each step in
(8, 896) x (896, 4864) products and the (8, 896) x (896, 151936) LM head. oneDNN, which PyTorch
ships for its own CPU graph compiler, does the same products 1.7x (layers) to 2.3x (LM head) faster
at 8 rows on the 2-core AMD EPYC of CI (`python -m benchmarks.cpu_linear`); on small matrices its
fixed cost per call loses, so those stay on MKL.

The oneDNN op has no backward, so it is used only where no gradient is needed (generation, the
teacher, evaluation); anything that needs a gradient goes to the stock `F.linear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_stock_linear = F.linear
# oneDNN's fixed cost per call (~0.1 ms) loses on small matrices: at 8 rows it is 0.55x on (128, 896) and
# 1.06x on (896, 896), 1.7-2.0x on the (4864, 896) MLP matrices and 2.4x on the LM head
MIN_WEIGHT_ELEMENTS = 1 << 21


def onednn_available() -> bool:
    """True when this PyTorch build has the oneDNN linear op (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if (needs_grad or weight.numel() < MIN_WEIGHT_ELEMENTS or input.device.type != "cpu"
            or input.dtype != torch.float32 or weight.dtype != torch.float32):
        return _stock_linear(input, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


@contextlib.contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[bool]:
    """Within the block, float32 CPU `F.linear` calls that need no gradient run on oneDNN.

    Process-wide (it swaps `torch.nn.functional.linear`, which every `nn.Linear` calls), so enter it
    around a whole run, not from threads. Yields whether it is active.
    """
    if not enabled or not onednn_available() or F.linear is _linear:
        yield F.linear is _linear
        return
    F.linear = _linear
    try:
        yield True
    finally:
        F.linear = _stock_linear
