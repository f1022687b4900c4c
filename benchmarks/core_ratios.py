"""Ratios 1-3: the steered teacher's forward, the exact localized loss step, and the teacher data per token."""

from __future__ import annotations

import pickle

import torch

from benchmarks.common import Ratio, alternating_medians, paired_median_seconds
from openrlhf_safesteer.models import decoder_layers, hidden_size
from openrlhf_safesteer.objectives import (
    gather_logprobs,
    localized_reverse_kl,
    localized_reverse_kl_autograd,
    sequence_mean,
)
from openrlhf_safesteer.steering import SteeringVector, attach_steering


def make_batch(vocab_size: int, batch: int, length: int, prompt: int, seed: int = 0, device="cpu"):
    """Random token ids (B, T), full attention, and a completion mask (B, T-1) after `prompt` tokens, on
    `device` (drawn on the CPU generator, so every device gets the same batch)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    mask = torch.zeros(batch, length - 1)
    mask[:, prompt - 1:] = 1
    return input_ids.to(device), attention_mask.to(device), mask.to(device)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def random_vector(model, layer: int, seed: int = 0) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return SteeringVector(torch.randn(hidden_size(model), generator=gen), layer=layer, model_name="benchmark")


def random_safety_ids(vocab_size: int, k: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def ratio_steered_forward(model, label: str, batch: int, length: int, repeats: int) -> Ratio:
    """1. Steered teacher forward vs a plain forward of the same model and batch (no grad)."""
    input_ids, attention_mask, _ = make_batch(model.config.vocab_size, batch, length, prompt=length // 4,
                                              device=device_of(model))
    vector = random_vector(model, layer=len(decoder_layers(model)) // 2)

    @torch.no_grad()
    def forward():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def steered():
        handle = attach_steering(model, vector)
        try:
            forward()
        finally:
            handle.remove()

    t_steered, t_plain = paired_median_seconds(steered, forward, repeats=repeats)
    return Ratio(1, "steered teacher forward / plain forward", label, t_steered * 1e3, t_plain * 1e3, "ms",
                 "<= 1.02", f"B={batch} T={length}")


def ratio_exact_step(model, label: str, batch: int, length: int, repeats: int, k: int = 50) -> Ratio:
    """2. Training step with the exact localized loss vs the same step with a sampled-token log-prob loss.

    Both steps: student forward, loss, backward, AdamW step. The teacher side arrives precomputed
    on S, (B, T-1, K), as it does from the teacher actor; no (B, T, V) teacher tensor exists.
    """
    vocab = model.config.vocab_size
    device = device_of(model)
    input_ids, attention_mask, mask = make_batch(vocab, batch, length, prompt=length // 4, device=device)
    safety_ids = random_safety_ids(vocab, k).to(device)
    teacher_on_s = torch.log_softmax(torch.randn(batch, length - 1, vocab), -1)[..., safety_ids.cpu()]
    teacher_on_s = teacher_on_s.contiguous().to(device)
    advantages = -torch.rand(batch, length - 1).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9, weight_decay=0.0)

    def student_logits():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]

    def update(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def exact():
        loss, _ = localized_reverse_kl(student_logits(), teacher_on_s, safety_ids, mask)
        update(loss)

    def exact_autograd():  # the same loss in plain autograd ops (before the fused Function)
        loss, _ = localized_reverse_kl_autograd(student_logits(), teacher_on_s, safety_ids, mask)
        update(loss)

    def sampled():
        logprobs = gather_logprobs(student_logits(), input_ids[:, 1:])
        update(sequence_mean(-advantages * logprobs, mask))

    t_exact, t_sampled, t_autograd = alternating_medians([exact, sampled, exact_autograd], repeats=repeats, warmup=1)
    model.eval()
    return Ratio(2, "exact localized-KL step / sampled-token step", label, t_exact * 1e3, t_sampled * 1e3, "ms",
                 "<= 1.10", f"B={batch} T={length} |S|={k}, fwd+bwd+AdamW; same step with the autograd loss "
                 f"(before the fused Function): {t_autograd * 1e3:.4g} ms = {t_autograd / t_sampled:.3f}")


@torch.no_grad()
def ratio_teacher_bytes(model, label: str, batch: int, length: int, k: int = 50) -> Ratio:
    """3. Teacher data per token that crosses to the student: log-probs on S vs full-vocabulary logits.

    Both payloads come from a real steered forward and are measured as pickled bytes (what Ray's
    object store carries), divided by the number of scored tokens.
    """
    vocab = model.config.vocab_size
    input_ids, attention_mask, _ = make_batch(vocab, batch, length, prompt=length // 4, device=device_of(model))
    safety_ids = random_safety_ids(vocab, k).to(device_of(model))
    handle = attach_steering(model, random_vector(model, layer=len(decoder_layers(model)) // 2))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    finally:
        handle.remove()
    on_s = gather_logprobs(logits, safety_ids).contiguous().cpu()
    logits = logits.cpu()  # what would be pickled
    tokens = on_s.shape[0] * on_s.shape[1]
    bytes_on_s = len(pickle.dumps(on_s)) / tokens
    bytes_full = len(pickle.dumps(logits.contiguous())) / tokens
    return Ratio(3, "teacher bytes/token: on S / full-vocab logits", label, bytes_on_s, bytes_full, "B",
                 f"4*|S| = {4 * k} B/token", f"V={vocab}, fp32")
