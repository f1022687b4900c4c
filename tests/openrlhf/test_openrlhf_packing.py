"""Sample packing (--ds.packing_samples) through OpenRLHF 0.11.2's real `Actor`, on a CPU.

With packing, `Actor.forward(..., return_output=True, allgather_logits=True)` returns logits shaped
(B, T, 1, V) (its `gather_and_pad_tensor` is written for (1, nnz) tensors). The teacher read, the
student's experience forward and the exact loss must give what the unpacked batch gives.

STAND-IN (CPU only): flash-attn does not install without CUDA, and the import stand-in raises when
called. Its padding helpers are plain PyTorch, so `openrlhf_safesteer.testing` re-implements the three
OpenRLHF calls (`unpad_input`, `pad_input`, `index_first_axis`) and the conftest's `torch_bert_padding`
fixture installs them as the `flash_attn.bert_padding` module's functions (and in
`openrlhf.models.ring_attn_utils`, which imported the names). Attention is sdpa: transformers keeps packed
sequences apart with its packed-sequence mask built from the restarting position ids (the Actor passes no
attention mask and disables the KV cache).
flash-attn's varlen kernels, which a GPU run uses, are not exercised here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from openrlhf.models import Actor
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

from openrlhf_safesteer import testing
from openrlhf_safesteer.plugin.config import SafeSteerConfig
from openrlhf_safesteer.plugin.logits import padded_logits
from openrlhf_safesteer.plugin.policy import TEACHER_ON_S, SafeSteerActorTrainer, SafeSteerPolicyActor
from openrlhf_safesteer.plugin.teacher import SteeredReferenceActor
from openrlhf_safesteer.steering import SteeringVector

PROMPT_LEN = 4
LENGTHS = (9, 6, 11, 3)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = testing.tiny_tokenizer()
    model = testing.tiny_model("llama", tokenizer, layers=2, hidden=64, seed=0)
    model.config.use_cache = False  # what Actor sets when it loads a checkpoint by path (actor.py:210)
    generator = torch.Generator().manual_seed(0)
    sequences, attention, action = testing.right_padded_batch(tokenizer.pad_token_id, LENGTHS, PROMPT_LEN,
                                                             generator)
    vector = SteeringVector(vector=3 * torch.randn(64, generator=generator), layer=1, model_name="tiny")
    ids = torch.tensor(sorted(set(tokenizer.encode(" sorry cannot illegal harmful", add_special_tokens=False))))
    return SimpleNamespace(model=model, sequences=sequences, attention=attention, action=action, vector=vector,
                           ids=ids)


def actor(model, packing: bool) -> Actor:
    wrapped = Actor(model)
    wrapped.packing_samples = packing  # set by Actor only when it loads a checkpoint by path
    return wrapped


def test_packed_actor_returns_4d_logits_that_padded_logits_undoes(tiny, torch_bert_padding):
    """The OpenRLHF behaviour this file is about, and the fix: rows equal the unpacked forward's."""
    with torch.no_grad():
        plain = actor(tiny.model, False)(tiny.sequences, None, tiny.attention, return_output=True,
                                         allgather_logits=True)["logits"]
        packed = actor(tiny.model, True)(tiny.sequences, None, tiny.attention, return_output=True,
                                         allgather_logits=True)["logits"]
    batch, length = tiny.sequences.shape
    assert plain.shape == (batch, length, plain.shape[-1])
    assert packed.shape == (batch, length, 1, plain.shape[-1])
    fixed = padded_logits(packed, tiny.sequences)
    real = tiny.attention.bool()
    torch.testing.assert_close(fixed[real], plain[real], atol=1e-5, rtol=1e-5)
    assert fixed[~real].abs().max() == 0  # padded positions are zeros, never read (action mask is 0 there)
    with pytest.raises(ValueError, match=r"expected \(B, T, V\), or \(B, T, 1, V\)"):
        padded_logits(packed[:, :-1], tiny.sequences)


def test_teacher_and_student_forwards_under_packing_equal_the_unpacked_batch(tiny, torch_bert_padding):
    """SteeredReferenceActor.forward and SafeSteerPolicyActor.forward (the methods the Ray actors run) on
    packed and unpacked Actors: same teacher rows (sampled tokens and S) and student log-probs."""
    strategy = SimpleNamespace(ring_attn_group=None,
                               args=SimpleNamespace(safesteer=SimpleNamespace(safety_ids=tiny.ids.tolist())))
    results = {}
    for packing in (False, True):
        teacher_self = SimpleNamespace(model=actor(tiny.model, packing), strategy=strategy, safety_ids=tiny.ids,
                                       steering_vector=tiny.vector, coeff=tiny.vector.coeff)
        teacher = SteeredReferenceActor.forward(teacher_self, tiny.sequences, tiny.action, tiny.attention)
        student_self = SimpleNamespace(actor=actor(tiny.model, packing), strategy=strategy)
        student = SafeSteerPolicyActor.forward(student_self, tiny.sequences, tiny.action, tiny.attention)
        results[packing] = teacher, student
    for plain, packed in zip(results[False], results[True]):
        assert packed["logprobs_on_s"].shape == (len(LENGTHS), tiny.action.shape[1], len(tiny.ids))
        torch.testing.assert_close(packed["logprobs"], plain["logprobs"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed["logprobs_on_s"], plain["logprobs_on_s"], atol=1e-5, rtol=1e-5)
    # The teacher is steered (differs from the student), so the comparison above covers the hook too.
    assert (results[True][0]["logprobs_on_s"] - results[True][1]["logprobs_on_s"]).abs().max() > 1e-2


def test_exact_loss_and_gradient_under_packing_equal_the_unpacked_batch(tiny, torch_bert_padding, monkeypatch):
    """SafeSteerActorTrainer's exact step with a real packed Actor: the loss and every parameter gradient equal
    the unpacked run's. Only ActorPPOTrainer.__init__ (a torch.distributed group) and DeepSpeed are left out."""

    def light_stock_init(self, strategy, actor_, ema_model, actor_optim, actor_scheduler, **kwargs):
        self.strategy, self.args, self.actor, self.ema_model = strategy, strategy.args, actor_, ema_model
        self.actor_optim, self.actor_scheduler, self.replay_buffer = actor_optim, actor_scheduler, None

    monkeypatch.setattr(ActorPPOTrainer, "__init__", light_stock_init)
    generator = torch.Generator().manual_seed(1)
    teacher_on_s = torch.log_softmax(torch.randn(*tiny.action.shape, 512, generator=generator), -1)[..., tiny.ids]
    teacher_on_s = teacher_on_s * tiny.action.unsqueeze(-1)
    config = SafeSteerConfig(objective="exact", rollout="hf", safety_ids=tiny.ids.tolist()).namespace()
    runs = {}
    for packing in (False, True):
        tiny.model.zero_grad(set_to_none=True)
        strategy = testing.RecordingStrategy(config)
        trainer = SafeSteerActorTrainer(strategy, actor(tiny.model, packing), None, None,
                                        SimpleNamespace(get_last_lr=lambda: [1e-3]))
        experience = Experience(sequences=tiny.sequences, attention_mask=tiny.attention, action_mask=tiny.action,
                                info={})
        setattr(experience, TEACHER_ON_S, teacher_on_s)
        trainer.training_step(experience, kl_ctl=0.0, step=0)
        runs[packing] = strategy.losses[0], {n: p.grad.clone() for n, p in tiny.model.named_parameters()}
    tiny.model.eval()
    (loss_plain, grads_plain), (loss_packed, grads_packed) = runs[False], runs[True]
    assert loss_plain.item() > 0
    assert loss_packed.item() == pytest.approx(loss_plain.item(), rel=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-6, rtol=1e-4, msg=name)
