"""Directional ablation on every tiny architecture: no read of the residual stream sees the direction.

test_core_steering.py checks ablation against weight orthogonalisation on llama, where the two are the
same. Gemma-2 normalises each sub-block's output (post_attention_layernorm, post_feedforward_layernorm)
before adding it to the residual stream, so projecting r out of the attention/MLP outputs is not enough
there: the norm's per-dimension scale puts an r component back. steering.ablate therefore also projects
each block's output. Checked here: every block's input and every block's output (the last one is what the
final norm reads) has ~0 component along r, on every architecture of openrlhf_safesteer.testing.
"""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.steering import ablate
from openrlhf_safesteer.testing import TINY_ARCHITECTURES, tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250], [7, 8, 9, 10, 11, 12]])


def _random_norm_scales(model):
    """Give every normalisation layer random per-dimension scales. Freshly initialised norms scale all
    dimensions alike (gemma's 1 + weight with weight = 0), and a uniform scale keeps a vector orthogonal
    to r; a trained model's norms do not, so neither may the test's."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.split(".")[-2] or "ln" in name.split(".")[-2]:
                param.copy_(torch.rand(param.shape, generator=gen) * 2 - 0.5)
    return model


def _blocks(model):
    """The decoder blocks, found here by architecture (not with the package's models.decoder_layers)."""
    if hasattr(model, "transformer"):
        return model.transformer.h          # gpt2
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers
    return model.model.layers               # llama, mistral, qwen2/3, gemma, gemma2


def _residual_reads(model):
    """Every block's input and output (B, T, H) in one forward pass. The hooks are registered after
    ablate's own, so they run after them and see what the next computation sees."""
    seen = []

    def first(value):
        return value[0] if isinstance(value, tuple) else value

    handles = []
    for block in _blocks(model):
        handles.append(block.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(first(args) if args else kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(block.register_forward_hook(lambda module, args, output: seen.append(first(output))))
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_ablation_removes_the_direction_from_every_residual_read(chatml_tokenizer, architecture):
    model = _random_norm_scales(tiny_model(architecture, chatml_tokenizer, layers=3, hidden=32))
    d = 5 * torch.randn(32, generator=torch.Generator().manual_seed(4))
    unit = d / d.norm()
    without = _residual_reads(model)
    assert len(without) == 6
    # without ablation r is present in every read, so the check below can fail
    assert all((x @ unit).abs().max() > 1e-3 * x.abs().max() for x in without)
    with ablate(model, d):
        seen = _residual_reads(model)
    assert len(seen) == 6
    for i, x in enumerate(seen):
        component, scale = float((x @ unit).abs().max()), max(float(x.abs().max()), 1.0)
        where = f"{'output' if i % 2 else 'input'} of block {i // 2}"
        assert component < 1e-5 * scale, f"the {where} keeps {component:.3g} along r (entries up to {scale:.3g})"
