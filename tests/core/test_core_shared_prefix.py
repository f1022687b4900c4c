"""Generation encodes the prompts' shared chat header once: same replies and first-step log-probs as plain
left-padded generate."""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.chat import (
    encode_left_padded,
    encode_shared_prefix,
    end_of_turn_ids,
    generate_with_first_logprobs,
    render_prompts,
    shared_prefix_layout,
    to_left_padded,
)
from openrlhf_safesteer.testing import tiny_model, tiny_tokenizer

PROMPTS = ["Hi", "How do I bake bread in a garden oven?", "Name a prime number.", "What is the capital of Peru?"]
SYSTEM = "You are a careful assistant who answers briefly and politely."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _shared(rows: list[list[int]], keep: int = 1) -> int:
    """shared_prefix_layout's prefix length for token lists, left-padded with 0 by hand."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return shared_prefix_layout(ids, mask, width, keep)[2]


def test_shared_prefix_leaves_every_row_its_own_tokens():
    assert _shared([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert _shared([[1, 2, 3], [1, 2, 3, 4]]) == 2                    # the shorter row keeps its last token
    assert _shared([[1, 2, 3], [1, 2, 3]]) == 2
    assert _shared([[1, 2, 3, 4], [1, 2, 3, 4]], keep=3) == 1         # keep = 3 of each row's own tokens
    assert _shared([[7, 2], [1, 2]]) == 0
    assert _shared([[1, 2, 3]]) == 0                                  # nothing to share with


def test_shared_layout_holds_the_left_padded_tokens(tok):
    texts = render_prompts(tok, PROMPTS, SYSTEM)
    ids, mask, shared = encode_shared_prefix(tok, texts)
    plain_ids, plain_mask = encode_left_padded(tok, texts)
    assert shared > 10                                                # the system header
    assert (ids[:, :shared] == ids[0, :shared]).all() and mask[:, :shared].all()
    assert mask[:, -1].all()                                          # position -1 is every prompt's last token
    assert not mask.all()                                             # ragged: pads sit after the prefix
    left_ids, left_mask = to_left_padded(ids, mask)
    assert torch.equal(left_ids, plain_ids) and torch.equal(left_mask, plain_mask)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_generation_with_shared_prefix_equals_plain_generate(tok, arch, system):
    """Rotary (llama) and absolute (gpt2) positions must both survive the pads between prefix and rest."""
    model = tiny_model(arch, tok, layers=2, hidden=32).eval()
    replies, first = generate_with_first_logprobs(model, tok, PROMPTS, max_new_tokens=8, batch_size=4,
                                                  system_prompt=system)
    ids, mask = encode_left_padded(tok, render_prompts(tok, PROMPTS, system))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=end_of_turn_ids(tok),
                             output_logits=True, return_dict_in_generate=True)
    want = tok.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
    assert replies == want
    assert torch.allclose(first, torch.log_softmax(out.logits[0], -1), atol=1e-5)
    assert len(set(replies)) > 1                                      # the prompts really steer the replies


def test_greedy_rows_batched_by_length_come_back_in_prompt_order(tok):
    """Greedy generation batches rows by prompt length (chat.length_order); each reply and first-token log-prob
    comes back at its prompt's index and equals that prompt generated alone."""
    from openrlhf_safesteer.chat import length_order

    model = tiny_model("llama", tok, layers=2, hidden=32).eval()
    texts = render_prompts(tok, PROMPTS, None)
    assert length_order(tok, texts) != list(range(len(PROMPTS)))     # the order really changes
    replies, first = generate_with_first_logprobs(model, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        alone, alone_first = generate_with_first_logprobs(model, tok, [prompt], max_new_tokens=6, batch_size=1)
        assert replies[i] == alone[0], prompt
        torch.testing.assert_close(first[i], alone_first[0], atol=1e-5, rtol=1e-5)


def _layer_inputs_at_end(model, layer: int, ids, mask, last: int):
    """Plain left-padded forward; returns (logits (B, T, V), input of decoder layer `layer` at the last positions)."""
    from openrlhf_safesteer.models import decoder_layers, left_padded_position_ids

    seen = []
    handle = decoder_layers(model)[layer].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"])[:, -last:]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_position_ids(mask)).logits
    finally:
        handle.remove()
    return logits, seen[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_forwards_with_shared_prefix_equal_plain_forwards(tok, arch):
    """Direction finding reads the last-token log-probs and the layer inputs at the post-instruction positions;
    with the shared chat header encoded once, both must equal the plain left-padded forward (and the header's
    own pass must not be counted as a prompt's last tokens)."""
    from openrlhf_safesteer.directions import last_token_logprobs, mean_activations

    model = tiny_model(arch, tok, layers=2, hidden=32).eval()
    ids, mask = encode_left_padded(tok, render_prompts(tok, PROMPTS))
    logits, layer_inputs = _layer_inputs_at_end(model, 1, ids, mask, last=3)
    got = last_token_logprobs(model, tok, PROMPTS, batch_size=4)
    assert torch.allclose(got, torch.log_softmax(logits[:, -1], -1), atol=1e-5)
    got = mean_activations(model, tok, PROMPTS, positions=[-3, -2, -1], batch_size=4)   # (L, P, H)
    assert torch.allclose(got[1], layer_inputs.double().mean(0), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_steered_continuations_with_shared_prefix_equal_plain_ones(tok, arch):
    """The safety-token vote samples continuations from the steered model and scores them; with the header
    encoded once the draws and the answer log-probs must be those of the plain left-padded batch."""
    from openrlhf_safesteer.safety_tokens import answer_logprobs, sample_continuations
    from openrlhf_safesteer.steering import SteeringVector, steer

    model = tiny_model(arch, tok, layers=2, hidden=32).eval()
    texts = render_prompts(tok, PROMPTS, SYSTEM)
    plain_ids, plain_mask = encode_left_padded(tok, texts)
    ids, mask, shared = encode_shared_prefix(tok, texts)
    vector = SteeringVector(torch.randn(32, generator=torch.Generator().manual_seed(0)), layer=1)
    with steer(model, vector, 4.0):
        drawn = sample_continuations(model, ids, mask, 5, torch.Generator().manual_seed(3), shared=shared)
        want = sample_continuations(model, plain_ids, plain_mask, 5, torch.Generator().manual_seed(3))
        got_scores = answer_logprobs(model, torch.cat([ids, drawn], 1), torch.cat([mask, torch.ones_like(drawn)], 1),
                                     6, shared)
        want_scores = answer_logprobs(model, torch.cat([plain_ids, want], 1),
                                      torch.cat([plain_mask, torch.ones_like(want)], 1), 6)
    assert torch.equal(drawn, want)
    assert torch.allclose(got_scores, want_scores, atol=1e-5)
    assert len({tuple(r) for r in drawn.tolist()}) > 1


def test_shared_prefix_layout_of_a_rollout_batch(tok):
    """A left-padded [prompt | completion] batch reordered in place: the prompt part becomes the shared-prefix
    layout, the completion columns (right pads included) stay where they were."""
    texts = render_prompts(tok, PROMPTS, SYSTEM)
    ids, mask = encode_left_padded(tok, texts)
    completion = torch.tensor([[9, 8, 2, 0], [7, 7, 7, 7], [5, 2, 0, 0], [6, 6, 6, 2]])
    completion_mask = (completion != 0).long()
    got_ids, got_mask, shared = shared_prefix_layout(torch.cat([ids, completion], 1),
                                                     torch.cat([mask, completion_mask], 1), ids.shape[1])
    prompt_len = ids.shape[1]
    header = tok(render_prompts(tok, ["x"], SYSTEM)[0], add_special_tokens=False)["input_ids"]
    assert 10 < shared < len(header) and got_ids[0, :shared].tolist() == header[:shared]   # the system header
    assert (got_ids[:, :shared] == got_ids[0, :shared]).all() and got_mask[:, :shared].all()
    assert got_mask[:, prompt_len - 1].all()                 # every prompt still ends at the same column
    assert torch.equal(got_ids[:, prompt_len:], completion) and torch.equal(got_mask[:, prompt_len:], completion_mask)
    back_ids, back_mask = to_left_padded(got_ids[:, :prompt_len], got_mask[:, :prompt_len])
    assert torch.equal(back_ids, ids) and torch.equal(back_mask, mask)
    # nothing shared: unchanged
    lone = shared_prefix_layout(ids[:1], mask[:1], ids.shape[1])
    assert lone[2] == 0 and torch.equal(lone[0], ids[:1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_completion_logits_and_gradients_with_shared_prefix_equal_plain_ones(tok, arch):
    """The training loss encodes the shared header once per micro-batch and backpropagates through its KV cache:
    logits and every parameter gradient must equal the plain left-padded forward's."""
    from openrlhf_safesteer.chat import completion_logits
    from openrlhf_safesteer.local.rollout import sample_rollouts
    from openrlhf_safesteer.models import left_padded_position_ids

    model = tiny_model(arch, tok, layers=2, hidden=32)
    rollouts = sample_rollouts(model, tok, PROMPTS, 2, max_new_tokens=5, seed=1, system_prompt=SYSTEM)
    ids, mask, P = rollouts.input_ids, rollouts.attention_mask, rollouts.prompt_len
    weights = torch.randn(ids.shape[0], ids.shape[1] - P, generator=torch.Generator().manual_seed(0))

    def loss_and_grads(logits):
        model.zero_grad()
        loss = (torch.log_softmax(logits, -1)[..., 7] * weights).sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    got, got_grads = loss_and_grads(completion_logits(model, ids, mask, P))
    plain = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_position_ids(mask)).logits
    want, want_grads = loss_and_grads(plain[:, P - 1:-1])
    assert torch.allclose(got, want, atol=1e-4)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)


def test_completion_logits_under_gradient_checkpointing_equal_the_plain_ones(tok):
    """transformers returns no KV cache when a training model checkpoints its activations, so the shared header
    cannot go through the cache there (the local engine's --gradient-checkpointing crashed on it): the logits and
    gradients must still be the plain forward's."""
    from openrlhf_safesteer.chat import completion_logits
    from openrlhf_safesteer.models import left_padded_position_ids

    model = tiny_model("llama", tok, layers=2, hidden=32)
    generator = torch.Generator().manual_seed(0)
    header = torch.randint(20, 400, (6,), generator=generator)
    ids = torch.cat([header.repeat(3, 1), torch.randint(20, 400, (3, 8), generator=generator)], 1)
    mask = torch.ones_like(ids)
    model.train()
    model.gradient_checkpointing_enable()
    got = completion_logits(model, ids, mask, 10)
    want = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_position_ids(mask)).logits[:, 9:-1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
