"""The plugin's response-window forwards: the policy's exact step and the steered teacher run the HF model only on
what carries a loss (the columns from the first one any row acts on, and the chat header the rows share encoded
once through the KV cache), and must give what OpenRLHF's full forward gives.

OpenRLHF 0.11 lays a batch out as [prompt | response | pads] rows with an action mask over all T - 1 positions;
the batches here do too, with prompts of different lengths that start with the same header (the chat template's
system turn), so both savings are exercised: the precondition asserts say so. fp32, a tiny llama built in the test.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from openrlhf_safesteer import testing
from openrlhf_safesteer.chat import shared_prefix_layout
from openrlhf_safesteer.plugin import compat

compat.install_import_stand_ins()

from openrlhf_safesteer.plugin.logits import (  # noqa: E402
    can_share_header,
    response_window,
)
from openrlhf_safesteer.plugin.policy import SafeSteerActorTrainer  # noqa: E402
from openrlhf_safesteer.plugin.teacher import steered_response_outputs, teacher_outputs  # noqa: E402
from openrlhf_safesteer.steering import SteeringVector, steer  # noqa: E402

HEADER = 6                      # tokens every row starts with
PROMPTS = (3, 5, 2, 4)          # each row's own prompt tokens after the header
RESPONSES = (4, 2, 5, 3)
SAFETY_IDS = torch.tensor([21, 37, 101, 250])


@pytest.fixture(scope="module")
def tiny():
    tokenizer = testing.tiny_tokenizer()
    model = testing.tiny_model("llama", tokenizer, layers=2, hidden=64, seed=0).float()
    generator = torch.Generator().manual_seed(5)
    header = torch.randint(20, 400, (HEADER,), generator=generator)
    total = max(HEADER + p + r for p, r in zip(PROMPTS, RESPONSES))
    sequences = torch.full((len(PROMPTS), total), tokenizer.pad_token_id)
    attention = torch.zeros((len(PROMPTS), total), dtype=torch.long)
    action = torch.zeros((len(PROMPTS), total - 1), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        length = HEADER + prompt + response
        sequences[row, :HEADER] = header
        sequences[row, HEADER:length] = torch.randint(20, 400, (prompt + response,), generator=generator)
        attention[row, :length] = 1
        action[row, HEADER + prompt - 1:length - 1] = 1
    vector = SteeringVector(vector=3 * torch.randn(64, generator=generator), layer=1, coeff=1.5, model_name="tiny")
    return SimpleNamespace(model=model, sequences=sequences, attention=attention, action=action, vector=vector)


def full_logits(model, sequences, attention):
    """(B, T - 1, V): OpenRLHF's Actor.forward, every position, positions numbered as it numbers them."""
    position_ids = attention.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention == 0, 1)
    return model(sequences, attention_mask=attention, position_ids=position_ids).logits.float()[:, :-1]


def test_the_batches_exercise_both_savings(tiny):
    first = response_window(tiny.action)
    assert first == HEADER + min(PROMPTS) - 1 > 0
    width = tiny.action.shape[1] - first
    assert shared_prefix_layout(tiny.sequences, tiny.attention, tiny.sequences.shape[1] - width)[2] == HEADER


def test_response_window_of_an_empty_mask_is_the_last_column():
    assert response_window(torch.zeros(3, 7, dtype=torch.long)) == 6


def test_policy_window_logits_and_gradients_equal_the_full_forward(tiny):
    model = tiny.model
    first = response_window(tiny.action)
    width = tiny.action.shape[1] - first
    trainer = SimpleNamespace(actor=SimpleNamespace(model=model, temperature=0.7),
                              strategy=SimpleNamespace(ring_attn_group=None))
    experience = SimpleNamespace(sequences=tiny.sequences, attention_mask=tiny.attention)
    weights = torch.randn(tiny.sequences.shape[0], width, generator=torch.Generator().manual_seed(1))

    def loss_and_grads(logits):
        model.zero_grad()
        loss = (torch.log_softmax(logits, -1)[..., 37] * weights * tiny.action[:, first:]).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    got = SafeSteerActorTrainer._response_logits(trainer, experience, width)
    want = full_logits(model, tiny.sequences, tiny.attention)[:, first:] / 0.7
    assert got.shape == want.shape
    mask = tiny.action[:, first:].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    got_loss, got_grads = loss_and_grads(got)
    want_loss, want_grads = loss_and_grads(full_logits(model, tiny.sequences, tiny.attention)[:, first:] / 0.7)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("share_header", [True, False])
def test_teacher_window_with_mixed_scales_equals_each_rows_full_forward(tiny, monkeypatch, share_header):
    """Rows with scales (1, 0, 0.5, 1): each row equals its own full forward under coeff * scale (0: the plain base),
    zeros before the window, where the action mask is zero anyway; with the header cache and with the plain
    windowed forward (flash-attn's case)."""
    import openrlhf_safesteer.plugin.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "can_share_header", lambda model, training: share_header)
    scales = torch.tensor([1.0, 0.0, 0.5, 1.0])
    with torch.no_grad():
        got = steered_response_outputs(tiny.model, tiny.vector, tiny.vector.coeff, scales, tiny.sequences,
                                       tiny.attention, tiny.action, SAFETY_IDS)
        for row, scale in enumerate(scales.tolist()):
            one = slice(row, row + 1)
            with steer(tiny.model, tiny.vector, tiny.vector.coeff * scale):
                logits = tiny.model(tiny.sequences[one], attention_mask=tiny.attention[one]).logits.float()
            want = teacher_outputs(logits, tiny.sequences[one], tiny.action[one], SAFETY_IDS)
            for key in ("logprobs", "logprobs_on_s"):
                assert got[key].shape[:2] == tiny.action.shape
                torch.testing.assert_close(got[key][one], want[key], atol=1e-5, rtol=1e-5)
        plain = steered_response_outputs(tiny.model, tiny.vector, 0.0, None, tiny.sequences, tiny.attention,
                                         tiny.action, SAFETY_IDS)
    assert (plain["logprobs_on_s"][0] - got["logprobs_on_s"][0]).abs().max() > 1e-2   # row 0 is steered


def test_header_is_shared_only_where_the_cache_is_checked(tiny, monkeypatch):
    model = tiny.model
    assert model.config._attn_implementation == "sdpa"
    assert can_share_header(model, training=True) and can_share_header(model, training=False)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    assert not can_share_header(model, training=False)      # flash-attn's varlen path after a cache: unchecked
    assert not can_share_header(lambda *a: None, training=False)   # no HF model inside: the plain forward


def test_gradient_checkpointing_is_seen_through_wrappers(tiny):
    from peft import LoraConfig, get_peft_model

    model = testing.tiny_model("llama", testing.tiny_tokenizer(), layers=1, hidden=32, seed=0)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    engine = type("Engine", (torch.nn.Module,), {})()      # DeepSpeed's engine holds the model as .module
    engine.module = peft
    assert can_share_header(engine, training=True)
    model.gradient_checkpointing_enable()
    # checkpointing drops the KV cache in training only: seen through the engine and the PEFT wrapper
    assert not can_share_header(engine, training=True) and can_share_header(engine, training=False)
    assert not can_share_header(object(), training=True)    # cannot tell: no KV cache relied on


@pytest.mark.parametrize("share_header", [True, False])
def test_stock_actor_window_equals_openrlhfs_forward(tiny, monkeypatch, share_header):
    """OpenRLHF's own Actor (stock PPO on a CPU, `actor_window`): action log-probs, entropies under the action mask,
    and every parameter's gradient of a PPO-like loss equal the stock Actor.forward's, at temperature 0.7."""
    from openrlhf.models.actor import Actor

    import openrlhf_safesteer.plugin.actor_window as actor_window

    monkeypatch.setattr(actor_window, "can_share_header", lambda model, training: share_header)
    model = tiny.model
    stock = Actor(model, temperature=0.7)
    windowed = Actor(model, temperature=0.7)
    stock.packing_samples = windowed.packing_samples = False    # set only when Actor loads a model by name
    actor_window.install_response_window(windowed, SimpleNamespace(ring_attn_group=None))
    weights = torch.randn(tiny.action.shape, generator=torch.Generator().manual_seed(2))
    mask = tiny.action.bool()

    def run(actor):
        model.zero_grad()
        logprobs, output = actor(tiny.sequences, tiny.action, attention_mask=tiny.attention, return_output=True,
                                 return_entropy=True)
        entropy = output.entropy[:, -tiny.action.shape[1]:]
        loss = (logprobs * weights).sum() + 0.1 * (entropy * tiny.action).sum()
        loss.backward()
        return logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    got_logprobs, got_entropy, got_grads = run(windowed)
    want_logprobs, want_entropy, want_grads = run(stock)
    assert got_logprobs.shape == want_logprobs.shape == tiny.action.shape
    torch.testing.assert_close(got_logprobs, want_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_entropy[mask], want_entropy[mask], atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():                                   # make_experience's call: log-probs only, no output
        torch.testing.assert_close(windowed(tiny.sequences, tiny.action, attention_mask=tiny.attention),
                                   want_logprobs, atol=1e-5, rtol=1e-5)


def test_stock_actor_window_leaves_other_calls_to_the_stock_forward(tiny):
    """No action mask, return_logprobs or vision inputs: the stock forward runs (full logits come back)."""
    from openrlhf.models.actor import Actor

    from openrlhf_safesteer.plugin.actor_window import install_response_window, windowable

    actor = Actor(tiny.model)
    actor.packing_samples = False
    install_response_window(actor, SimpleNamespace(ring_attn_group=None))
    with torch.no_grad():
        output = actor(tiny.sequences, None, attention_mask=tiny.attention, return_output=True)
        assert output["logits"].shape[:2] == tiny.sequences.shape
        logprobs = actor(tiny.sequences, tiny.action, attention_mask=tiny.attention, return_logprobs=True)
        assert logprobs.shape == (tiny.sequences.shape[0], tiny.sequences.shape[1] - 1)
    actor.packing_samples = True                            # packing: the stock forward's business
    assert not windowable(actor, SimpleNamespace(ring_attn_group=None), tiny.action, False, False, {})
