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
    renormalised over S. One chunked log-normaliser serves both reads (one pass over V, not two).
    """
    logits = padded_logits(logits, sequences)
    width = action_mask.shape[1]
    logits = logits[:, :-1][:, -width:]
    mask = action_mask.to(logits.device, torch.float32)
    normaliser = log_normaliser(logits)                                                   # (B, A, 1)
    ids = sequences[:, 1:][:, -width:].to(logits.device)
    sampled = gather_logprobs(logits, ids, log_normaliser=normaliser) * mask
    on_s = gather_logprobs(logits, safety_ids.to(logits.device), log_normaliser=normaliser) * mask.unsqueeze(-1)
    return {"logprobs": sampled, "logprobs_on_s": on_s}
