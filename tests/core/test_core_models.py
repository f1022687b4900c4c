"""decoder_layers / hidden_size / unwrap_model on every tiny architecture and through wrappers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from openrlhf_safesteer.models import (
    decoder_layers,
    hidden_size,
    left_padded_position_ids,
    num_layers,
    unwrap_model,
    vocab_size,
)
from openrlhf_safesteer.testing import TINY_ARCHITECTURES, tiny_model


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_decoder_layers_are_the_blocks_that_run(architecture, chatml_tokenizer):
    model = tiny_model(architecture, chatml_tokenizer, layers=3, hidden=32)
    layers = decoder_layers(model)
    assert len(layers) == 3 == num_layers(model)
    assert hidden_size(model) == 32
    assert vocab_size(model) == len(chatml_tokenizer)
    # Every returned block really runs once per forward, in order, on (B, T, H) inputs.
    calls = []
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: calls.append((i, (a[0] if a else k["hidden_states"]).shape)), with_kwargs=True)
        for i, layer in enumerate(layers)]
    model(torch.tensor([[5, 6, 7]]))
    for h in handles:
        h.remove()
    assert calls == [(i, torch.Size([1, 3, 32])) for i in range(3)]


class _EngineLike(nn.Module):
    """Stands in for a DeepSpeed engine / DDP wrapper: they expose the wrapped model as `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_unwrap_through_peft_and_engine(chatml_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2", chatml_tokenizer, layers=2, hidden=32)
    blocks = decoder_layers(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped = _EngineLike(peft_model)
    assert unwrap_model(wrapped) is model
    assert decoder_layers(wrapped) is blocks
    assert hidden_size(wrapped) == 32


class _ActorLike(nn.Module):
    """Like OpenRLHF's Actor: keeps the HF (or PEFT) model as `.model` and has no config of its own."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def test_unwrap_through_engine_actor_and_peft(chatml_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32)
    wrapped = _EngineLike(_ActorLike(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))))
    assert unwrap_model(wrapped) is model
    assert decoder_layers(wrapped) is model.model.layers


def test_generic_search_finds_unusual_layout(chatml_tokenizer):
    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.backbone = nn.Module()
            self.backbone.stack = model.model.layers
            self.other = nn.ModuleList([nn.Linear(2, 2)])  # wrong length: must be ignored

    assert decoder_layers(Odd()) is model.model.layers


def test_no_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        decoder_layers(nn.Linear(3, 3))


def test_left_padded_position_ids():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert left_padded_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
