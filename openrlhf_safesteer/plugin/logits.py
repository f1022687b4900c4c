"""The teacher's and the student's log-probs from the full logits OpenRLHF's `Actor` returns.

Shared by the steered reference actor (`teacher.py`) and the policy actor (`policy.py`). Imports no
Ray and no OpenRLHF: these are tensor functions.

Sample packing: `Actor.forward(..., return_output=True, allgather_logits=True)` with
`--ds.packing_samples` runs the (1, nnz, V) logits through OpenRLHF's `gather_and_pad_tensor`
(models/ring_attn_utils.py), which is written for (1, nnz) tensors: its `pad_input(...).squeeze(-1)`
returns (B, T, 1, V). `padded_logits` puts that back to (B, T, V); row b, position t then holds the
logits of sequence b at position t, exactly as without packing (zeros at padded positions).
"""

from __future__ import annotations

import torch

from openrlhf_safesteer.chat import completion_logits
from openrlhf_safesteer.objectives import gather_logprobs, log_normaliser

Tensor = torch.Tensor


def padded_logits(logits: Tensor, sequences: Tensor) -> Tensor:
    """The Actor's logits as (B, T, V) for sequences (B, T): (B, T, 1, V) under packing is squeezed.

    Raises ValueError for any other shape (an OpenRLHF whose packed output changed, ring attention slices).
    """
    if logits.dim() == 4 and logits.shape[2] == 1:
        logits = logits.squeeze(2)
    if logits.dim() != 3 or logits.shape[:2] != sequences.shape:
        raise ValueError(f"the Actor returned logits {tuple(logits.shape)} for sequences {tuple(sequences.shape)}; "
                         "expected (B, T, V), or (B, T, 1, V) from OpenRLHF's packed gather")
    return logits


def action_logprobs(logits: Tensor, sequences: Tensor, action_mask: Tensor,
                    safety_ids: Tensor) -> dict[str, Tensor]:
    """Log-probs of the sampled tokens (B, A) and of S (B, A, K), masked, from full logits (B, T, V).

    Position t of the result predicts token t + 1 of `sequences`, aligned like OpenRLHF's
    action_log_probs (the last A positions, A = action_mask.shape[1]). Full-vocabulary log-softmax, not
    renormalised over S.
    """
    logits = padded_logits(logits, sequences)
    return response_logprobs(logits[:, :-1][:, -action_mask.shape[1]:], sequences, action_mask, safety_ids)


def response_logprobs(logits: Tensor, sequences: Tensor, action_mask: Tensor,
                      safety_ids: Tensor) -> dict[str, Tensor]:
    """As `action_logprobs`, from the logits (B, A, V) at the A positions that predict the last A tokens of
    sequences (B, T) only. One chunked log-normaliser serves both reads (one pass over V, not two)."""
    width = action_mask.shape[1]
    mask = action_mask.to(logits.device, torch.float32)
    normaliser = log_normaliser(logits)                                                   # (B, A, 1)
    ids = sequences[:, 1:][:, -width:].to(logits.device)
    sampled = gather_logprobs(logits, ids, log_normaliser=normaliser) * mask
    on_s = gather_logprobs(logits, safety_ids.to(logits.device), log_normaliser=normaliser) * mask.unsqueeze(-1)
    return {"logprobs": sampled, "logprobs_on_s": on_s}


def response_window(action_mask: Tensor) -> int:
    """The first action column any row uses (0 .. A-1) for action_mask (B, A).

    OpenRLHF (0.11) lays each sample out as [prompt | response | pads] and gives an action mask over all T - 1
    positions, zero on every prompt: on the demo's batches the responses start at column 41-45 of 69. Only
    columns lo .. A-1 carry a loss, so only their logits need computing (the LM head and a log-softmax over the
    vocabulary per position). Returns A - 1 when no row has an action (one column, all masked)."""
    used = action_mask.bool().any(0).nonzero()
    return int(used[0]) if used.numel() else action_mask.shape[1] - 1


def plain_hf_forward(actor, strategy) -> bool:
    """True when OpenRLHF's Actor would run its HF model on the plain (B, T) batch: no sample packing, no ring
    attention, no vision inputs. Then the SafeSteer actors may call the HF model themselves for the response
    positions only (`chat.completion_logits`), which OpenRLHF's Actor.forward cannot ask for."""
    return not (getattr(actor, "packing_samples", False) or getattr(actor, "is_vlm", False)
                or getattr(strategy, "ring_attn_group", None) is not None)


def hf_model_inside(model):
    """The transformers PreTrainedModel inside `model` (a DeepSpeed engine's .module, a PEFT model's base model, or
    the model itself); None where there is none to be found."""
    for _ in range(8):
        if hasattr(type(model), "is_gradient_checkpointing") and hasattr(model, "config"):
            return model
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return None
    return None


# Attention kernels the shared-header KV cache is checked with (tests/openrlhf/test_openrlhf_window.py, fp32, and
# the local engine's own tests): right-padded rows after a cache. flash-attn's varlen path is not checked on a CPU.
HEADER_CACHE_ATTENTION = ("sdpa", "eager")


def can_share_header(model, training: bool) -> bool:
    """Whether the chat header the rows share may be encoded once through the KV cache (`chat.completion_logits`):
    the attention kernel is one HEADER_CACHE_ATTENTION names and, in training, no gradient checkpointing (which
    drops the cache)."""
    inner = hf_model_inside(model)
    if inner is None or getattr(inner.config, "_attn_implementation", None) not in HEADER_CACHE_ATTENTION:
        return False
    return not (training and inner.is_gradient_checkpointing)


def window_logits(model, sequences: Tensor, attention_mask: Tensor, width: int, share_header: bool) -> Tensor:
    """(B, W = width, V) logits at the positions that predict the last W tokens of sequences (B, T), from the HF
    `model` (or the DeepSpeed engine around it). share_header: encode the header the rows share once
    (`chat.completion_logits`); else one plain forward that projects only those positions (`logits_to_keep`),
    positions numbered as OpenRLHF's Actor.forward numbers them."""
    if share_header:
        return completion_logits(model, sequences, attention_mask, sequences.shape[1] - width)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    output = model(sequences, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=width + 1)
    return output["logits"][:, :-1]                   # positions T-1-W .. T-2 predict the last W tokens
