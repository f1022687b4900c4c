"""oneDNN inference matrix products: same outputs as the stock F.linear, never used where a gradient is needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openrlhf_safesteer import cpu_kernels
from openrlhf_safesteer.cpu_kernels import onednn_available, onednn_linear
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN linear op")


@pytest.fixture(autouse=True)
def onednn_for_tiny_matrices(monkeypatch):
    """The tiny models' matrices are below the size where oneDNN pays off; route them through it anyway."""
    monkeypatch.setattr(cpu_kernels, "MIN_WEIGHT_ELEMENTS", 0)


def test_onednn_linear_matches_stock_linear_and_restores_it():
    stock = F.linear
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 64, generator=g), torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    want = F.linear(x, w, b)
    with onednn_linear() as active:
        assert active and F.linear is not stock
        with torch.no_grad():
            got = F.linear(x, w, b)
            got_no_bias = F.linear(x, w)
        with onednn_linear() as nested:                   # nesting keeps the outer block's kernel
            assert nested
        assert F.linear is not stock
    assert F.linear is stock
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert torch.allclose(got_no_bias, want - b, rtol=1e-5, atol=1e-4)
    with onednn_linear(enabled=False) as active:
        assert not active and F.linear is stock


def test_onednn_block_keeps_gradients_and_model_outputs():
    """The oneDNN op has no backward: a forward that needs gradients must still get them (stock path)."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, layers=2, hidden=32)
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with onednn_linear():
        with torch.no_grad():
            got = model(input_ids=ids).logits
        loss = model(input_ids=ids).logits.logsumexp(-1).sum()
        loss.backward()
    assert torch.allclose(got, want, atol=1e-5)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_lora_gradients_are_the_same_inside_the_onednn_block():
    """With LoRA the frozen base projections of the first layer see inputs that need no gradient, so they run on
    oneDNN; the adapters' gradients must not change."""
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_model("llama", tok, layers=2, hidden=32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                      init_lora_weights=False))
    ids = torch.tensor([[1, 5, 9, 12, 40, 41], [3, 7, 7, 2, 30, 31]])

    def grads(use: bool) -> list[torch.Tensor]:
        model.zero_grad()
        with onednn_linear(use):
            model(input_ids=ids).logits.logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want, got = grads(False), grads(True)
    assert len(want) == len(got) > 0
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5)
