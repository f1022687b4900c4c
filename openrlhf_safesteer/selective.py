"""Selectivity mechanisms: the project's extension (docs/METHOD.md section 8), not the paper's method.

The paper's update raises refusal of questions that merely sound harmful (borderline-safe prompts) along with
refusal of harmful ones. Three mechanisms act where that over-refusal is decided, the first reply token:

- `refusal_hinge` (M1): a one-sided retain on borderline prompts, relu(s_student - s_base - margin), where s is the
  first-reply-token refusal log-odds (`first_token_refusal_scores`). Zero at initialisation and while the student
  refuses a prompt no more readily than the base; it touches one scalar per prompt and no other token.
- `project_conflict` (M3, A-GEM-style gradient surgery): the harmful loss's gradient loses its component along
  the gradient of the borderline prompts' mean refusal score whenever a step along it would raise that score.
- `false_refusal_direction` (M2, after Wang et al., ICLR 2025): the mean activation difference between
  borderline-safe and harmless prompts, orthogonalised against the refusal direction; ablated from the trained
  student at inference (`steering.ablate`), no retraining.

Every function here is pure torch on a model and its tokenizer; the engine (local/engine.py) wires them into a step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from openrlhf_safesteer.chat import (
    encode_shared_prefix,
    forward_after_prefix,
    model_device,
    prefill_shared_prefix,
    render_prompts,
)
from openrlhf_safesteer.directions import mean_activations, refusal_scores_from_logprobs
from openrlhf_safesteer.models import decoder_layers

Tensor = torch.Tensor


def first_token_refusal_scores(model: nn.Module, tokenizer, prompts: Sequence[str],
                               refusal_ids: Sequence[int], share_header: bool = True) -> Tensor:
    """Refusal log-odds log p(R) - log(1 - p(R)) of the first reply token of each prompt: (N,) float32.

    Differentiable (the caller picks torch.no_grad or not); one forward over the rendered prompts, the shared chat
    header encoded once (share_header=False: in the same forward, for a model whose KV cache is off, e.g. under
    gradient checkpointing), only the last position projected onto the vocabulary. Hooks on the model apply."""
    if not prompts:
        raise ValueError("no prompts to score")
    texts = render_prompts(tokenizer, prompts)
    input_ids, attention_mask, shared = encode_shared_prefix(tokenizer, texts, model_device(model))
    shared = shared if share_header else 0     # the layout stays valid for one plain forward: positions come
    past = prefill_shared_prefix(model, input_ids, shared)     # from the attention mask
    logits = forward_after_prefix(model, input_ids, attention_mask, shared, past, logits_to_keep=1).logits[:, -1]
    return refusal_scores_from_logprobs(F.log_softmax(logits.float(), dim=-1), refusal_ids)


def refusal_hinge(student_scores: Tensor, base_scores: Tensor, margin: float = 0.0) -> Tensor:
    """Mean over prompts of relu(s_student - s_base - margin): (N,), (N,) -> scalar.

    One-sided: a prompt the student refuses less readily than the base (plus the margin) adds nothing, so the term
    never pulls refusal below the base and is exactly zero (value and gradient) while the student equals the base."""
    if student_scores.shape != base_scores.shape:
        raise ValueError(f"student scores {tuple(student_scores.shape)} and base scores "
                         f"{tuple(base_scores.shape)} differ in shape")
    return F.relu(student_scores - base_scores.to(student_scores) - margin).mean()


def project_conflict(grads: Sequence[Tensor], guard: Sequence[Tensor | None]) -> tuple[list[Tensor], float, bool]:
    """A-GEM's rule against a quantity to keep from rising.

    grads: the loss's gradient g, one tensor per parameter (a descent step moves by -lr * g).
    guard: the gradient a of the quantity q that must not rise (None for a parameter q does not depend on).
    A step -lr * g changes q by about -lr * <g, a>; when <g, a> < 0 (the step raises q) g becomes
    g - (<g, a> / <a, a>) a, which is orthogonal to a; otherwise g is kept.
    Returns (the new gradient, cos(g, a) before projection, whether it projected)."""
    if len(grads) != len(guard):
        raise ValueError(f"{len(grads)} gradients and {len(guard)} guard gradients")
    guard = [torch.zeros_like(g) if a is None else a for g, a in zip(grads, guard)]
    dot = sum((g.double() * a.double()).sum() for g, a in zip(grads, guard))
    guard_sq = sum((a.double() ** 2).sum() for a in guard)
    grad_sq = sum((g.double() ** 2).sum() for g in grads)
    cos = float(dot / (guard_sq.sqrt() * grad_sq.sqrt())) if guard_sq > 0 and grad_sq > 0 else 0.0
    if dot >= 0 or guard_sq == 0:
        return list(grads), cos, False
    scale = dot / guard_sq
    return [(g.double() - scale * a.double()).to(g.dtype) for g, a in zip(grads, guard)], cos, True


def refusal_gradient(model: nn.Module, tokenizer, prompts: Sequence[str], refusal_ids: Sequence[int],
                     params: Sequence[nn.Parameter], batch_size: int = 16) -> list[Tensor]:
    """d/dparams of the mean first-reply-token refusal log-odds over `prompts`, one float32 tensor per parameter
    (zeros where it does not depend on one); scored `batch_size` prompts at a time, each batch weighted by its size."""
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for start in range(0, len(prompts), batch_size):
        part = list(prompts[start:start + batch_size])
        scores = first_token_refusal_scores(model, tokenizer, part, refusal_ids)                      # (n,)
        grads = torch.autograd.grad(scores.sum() / len(prompts), list(params), allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t += g.float()
    return total


def gradient_cosine(first: Sequence[Tensor], second: Sequence[Tensor]) -> float:
    """cos of two gradients given as lists of per-parameter tensors, in float64."""
    dot = sum((a.double() * b.double()).sum() for a, b in zip(first, second))
    norms = (sum((a.double() ** 2).sum() for a in first) * sum((b.double() ** 2).sum() for b in second)).sqrt()
    return float(dot / norms) if norms > 0 else 0.0


def kept_after_projection(target: Sequence[Tensor], guard: Sequence[Tensor]) -> float:
    """sqrt(1 - cos^2): the share of `target`'s length orthogonal to `guard`. To first order, the most a step of a
    given length that leaves the guarded quantity unchanged can raise the target's quantity, relative to the best
    unconstrained step of that length (the surgery's ceiling when target is the harmful prompts' refusal gradient
    and guard the borderline-safe prompts')."""
    cos = gradient_cosine(target, guard)
    return max(0.0, 1.0 - cos * cos) ** 0.5


def false_refusal_direction(model: nn.Module, tokenizer, borderline: Sequence[str], harmless: Sequence[str],
                            refusal_direction: Tensor, layer: int) -> Tensor:
    """The false-refusal direction (H,) float32 at decoder layer `layer`'s input, last prompt token: mean
    activation over borderline-safe prompts minus the mean over harmless ones, with its component along
    `refusal_direction` (H,) removed, so that ablating it leaves the refusal of harmful prompts alone.
    Unnormalised (`steering.ablate` normalises)."""
    layers = len(decoder_layers(model))
    if not 0 <= layer < layers:
        raise ValueError(f"layer {layer} is outside the model's {layers} decoder layers")
    if refusal_direction.dim() != 1:
        raise ValueError(f"refusal_direction must be (H,), got {tuple(refusal_direction.shape)}")
    diff = (mean_activations(model, tokenizer, borderline, [-1])[layer, 0]
            - mean_activations(model, tokenizer, harmless, [-1])[layer, 0])                    # (H,) float64
    if diff.shape != refusal_direction.shape:
        raise ValueError(f"refusal_direction has {refusal_direction.numel()} entries, the model's hidden size is "
                         f"{diff.numel()}")
    unit = refusal_direction.double() / refusal_direction.double().norm()
    return (diff - (diff @ unit) * unit).float()


# The linear layer of each sub-block that writes the residual stream: attention's output projection, the MLP's down
# projection (HF names across the llama / qwen / mistral / gemma, gpt2 and gpt-neox families).
_RESIDUAL_WRITERS = ("o_proj", "out_proj", "dense", "c_proj", "down_proj", "dense_4h_to_h", "fc2", "w2")


def _residual_writer(block: nn.Module, hidden: int) -> nn.Module:
    for name in _RESIDUAL_WRITERS:
        child = getattr(block, name, None)
        if child is not None and getattr(child, "weight", None) is not None:
            out = child.weight.shape[0] if isinstance(child, nn.Linear) else child.weight.shape[-1]
            if out == hidden:
                return child
    raise ValueError(f"{type(block).__name__} has none of {_RESIDUAL_WRITERS} writing the {hidden}-wide residual "
                     "stream: weight orthogonalisation does not know this architecture (use steering.ablate's hooks)")


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, direction: Tensor) -> nn.Module:
    """Bake directional ablation of `direction` (H,) into the weights, in place (Arditi et al.'s weight
    orthogonalisation): the token (and position) embeddings and every sub-block's residual writer lose their component along
    the unit direction, so the residual stream never carries it; the same model as `steering.ablate`'s hooks, saved
    like any checkpoint, whatever engine trained it. Tied input and output embeddings are untied first (the LM
    head reads the final norm's output, which the hooks leave alone). Returns the model."""
    from openrlhf_safesteer.models import hidden_size
    from openrlhf_safesteer.steering import _sub_blocks

    hidden = hidden_size(model)
    if direction.dim() != 1 or direction.numel() != hidden:
        raise ValueError(f"direction has shape {tuple(direction.shape)}, the model's hidden size is {hidden}")
    norm = direction.double().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("cannot orthogonalise against a zero (or non-finite) direction")
    unit = direction.double() / norm
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    writers = [_residual_writer(block, hidden) for layer in decoder_layers(model) for block in _sub_blocks(layer)]
    if head is not None and head.weight is embeddings.weight:
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=embeddings.weight.requires_grad)
        model.config.tie_word_embeddings = False
    # the token embeddings and any learned position embeddings (gpt2's wpe) write the residual stream too
    for table in [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.shape[-1] == hidden]:
        weight = table.weight                                                               # (V, H)
        weight.copy_((weight.double() - (weight.double() @ unit)[:, None] * unit[None]).to(weight.dtype))
    for writer in writers:
        w = writer.weight
        if isinstance(writer, nn.Linear):                                                   # (H, in)
            w.copy_((w.double() - unit[:, None] * (unit[None] @ w.double())).to(w.dtype))
        else:                                                                               # Conv1D (in, H)
            w.copy_((w.double() - (w.double() @ unit)[:, None] * unit[None]).to(w.dtype))
        if getattr(writer, "bias", None) is not None:
            writer.bias.copy_((writer.bias.double() - (writer.bias.double() @ unit) * unit).to(writer.bias.dtype))
    return model
