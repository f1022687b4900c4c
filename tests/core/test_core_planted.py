"""The exact checks the core issue names: bit-identical logits with coefficient 0 and after exit, the
layer input equal to the unsteered one plus the vector, cached generation equal to recomputation, and
a direction planted in the embeddings recovered through the batched, left-padded extraction."""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.directions import candidate_directions
from openrlhf_safesteer.models import decoder_layers
from openrlhf_safesteer.steering import SteeringVector, steer
from openrlhf_safesteer.templates import post_instruction_positions
from openrlhf_safesteer.testing import tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 11], [7, 8, 9, 10, 11, 12, 13]])


def _vector(hidden: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gpt_neox"])
def test_coefficient_zero_and_exit_leave_logits_bit_identical(chatml_tokenizer, architecture):
    model = tiny_model(architecture, chatml_tokenizer, layers=3, hidden=32)
    with torch.no_grad():
        before = model(IDS).logits
        vector = SteeringVector(_vector(32), layer=1)
        with steer(model, vector, coeff=0.0):
            zero = model(IDS).logits
        with steer(model, vector):
            steered = model(IDS).logits
        after = model(IDS).logits
    assert torch.equal(zero, before)
    assert torch.equal(after, before)
    assert not torch.allclose(steered, before)  # the hook did act while it was there


@pytest.mark.parametrize("layer, coeff", [(0, 1.0), (2, -1.5)])
def test_layer_input_inside_steer_is_unsteered_plus_vector(chatml_tokenizer, layer, coeff):
    model = tiny_model("qwen2", chatml_tokenizer, layers=3, hidden=32)
    target = decoder_layers(model)[layer]
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):  # registered after steer's hook, so it sees what the layer receives
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    d = _vector(32)
    with torch.no_grad():
        handle = target.register_forward_pre_hook(record, with_kwargs=True)
        model(IDS)
        handle.remove()
        with steer(model, SteeringVector(d, layer=layer, coeff=coeff)):
            handle = target.register_forward_pre_hook(record, with_kwargs=True)
            model(IDS)
            handle.remove()
    plain, steered = seen
    assert torch.equal(steered, plain + coeff * d)


def test_cached_generation_equals_full_recomputation_under_steering(chatml_tokenizer):
    model = tiny_model("llama", chatml_tokenizer, layers=3, hidden=32, seed=4)
    prompt = torch.tensor([[5, 17, 42, 99, 3]])
    vector = SteeringVector(_vector(32) * 2, layer=1)
    with torch.no_grad(), steer(model, vector):
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True,
                                output_logits=True, return_dict_in_generate=True, min_new_tokens=12)
        sequence = cached.sequences
        # Recompute every step's next-token logits with one full forward over the whole sequence.
        full = model(sequence).logits[0, prompt.shape[1] - 1:-1]
    step_logits = torch.stack(cached.logits, dim=1)[0]
    assert sequence.shape[1] == prompt.shape[1] + 12
    torch.testing.assert_close(step_logits, full, atol=1e-4, rtol=1e-4)
    # Unsteered, the model writes something else: the cache did carry the steered state.
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert not torch.equal(plain, sequence)


def test_direction_planted_in_marker_embeddings_is_recovered(chatml_tokenizer):
    """Harmful prompts end with a marker token whose embedding is a neutral token's plus v; harmless
    prompts end with the neutral token. The difference of means at the marker's position must be v
    (it rides the residual stream through every layer), and exactly zero at the template positions of
    the layer-0 input, whatever the padding."""
    tok = chatml_tokenizer
    model = tiny_model("llama", tok, layers=4, hidden=64, seed=5)
    (marker,), (neutral,) = tok(" paint")["input_ids"], tok(" cake")["input_ids"]  # one BPE token each
    planted = _vector(64, seed=11) * 0.5   # a few times an embedding row's norm
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[marker] = embeddings[neutral] + planted

    stems = ["How do I make a", "Tell me about the", "Write a poem about a", "Plan a trip with a",
             "Explain the history of the", "Two plus two is a"]
    harmful = [f"{stem} paint" for stem in stems]
    harmless = [f"{stem} cake" for stem in stems]
    for text in harmful:  # the marker must be the last user token, right before the template suffix
        assert tok(text)["input_ids"][-1] == marker

    template = post_instruction_positions(tok)
    marker_position = min(template) - 1
    d = candidate_directions(model, tok, harmful, harmless, positions=[marker_position, *template], batch_size=4)
    assert d.shape == (4, 1 + len(template), 64) and d.dtype == torch.float64

    cosines = torch.nn.functional.cosine_similarity(d[:, 0, :], planted.double()[None], dim=-1)
    assert torch.all(cosines > 0.99), cosines
    torch.testing.assert_close(d[0, 0], planted.double(), atol=1e-6, rtol=0)
    assert torch.equal(d[0, 1:], torch.zeros_like(d[0, 1:]))
