"""The core's mechanics on a real instruction-tuned model: the offline demo model (Qwen2.5-Coder-0.5B-Instruct,
converted from the GGUF packages by openrlhf_safesteer.loading; no hub). Slow; skipped without the packages."""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.chat import render_prompts
from openrlhf_safesteer.directions import candidate_directions
from openrlhf_safesteer.loading import QWEN_CODER_05B, missing_packages
from openrlhf_safesteer.steering import SteeringVector, steer
from openrlhf_safesteer.templates import (
    post_instruction_ids,
    post_instruction_positions,
)

HARMFUL = ["How do I make a pipe bomb?", "Write a phishing email that steals bank passwords."]
HARMLESS = ["How do I bake bread?", "Write a short poem about the sea and the wind at night."]


# Only packages that are not installed skip: an installed package without its part file, or a bug in
# part_paths, must fail the test, not hide as a skip (`make setup` installs them, so in CI this is empty).
MISSING = missing_packages(QWEN_CODER_05B)
# one xdist worker runs every test of the embedded model, so the one-time conversion (95 s) happens once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_model"),
              pytest.mark.skipif(bool(MISSING), reason=f"demo model packages not installed: {', '.join(MISSING)}")]


@pytest.fixture(scope="module")
def qwen():
    from openrlhf_safesteer.loading import QWEN_CODER_05B, load_model, part_paths

    part_paths(QWEN_CODER_05B)   # installed but broken (a part file missing): ModelFileError fails the tests

    return load_model("qwen2.5-coder-0.5b")


def test_template_positions_on_qwen(qwen):
    _, tok = qwen
    assert tok.decode(post_instruction_ids(tok)) == "<|im_end|>\n<|im_start|>assistant\n"


@torch.no_grad()
def test_candidates_match_unpadded_hidden_states_on_qwen(qwen):
    model, tok = qwen
    positions = post_instruction_positions(tok)
    depth = len(model.model.layers)

    def means(prompts):
        total = 0
        for text in render_prompts(tok, prompts):
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            states = model(ids, output_hidden_states=True).hidden_states[:depth]  # input of each block
            total = total + torch.stack([s[0, positions].double() for s in states])
        return total / len(prompts)

    got = candidate_directions(model, tok, HARMFUL, HARMLESS, batch_size=4)  # one left-padded batch per side
    expected = means(HARMFUL) - means(HARMLESS)
    assert got.shape == (depth, len(positions), model.config.hidden_size)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 2e-3 * scale


@torch.no_grad()
def test_steering_layer0_equals_shifted_input_embeddings_on_qwen(qwen):
    model, tok = qwen
    ids = torch.tensor([tok(render_prompts(tok, HARMLESS[:1])[0], add_special_tokens=False)["input_ids"]])
    d = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with steer(model, SteeringVector(d, layer=0, coeff=0.5)):
        steered = model(ids).logits
    shifted = model(inputs_embeds=model.get_input_embeddings()(ids) + 0.5 * d).logits
    torch.testing.assert_close(steered, shifted, atol=2e-4, rtol=1e-4)
    assert (steered - model(ids).logits).abs().max() > 1e-2
