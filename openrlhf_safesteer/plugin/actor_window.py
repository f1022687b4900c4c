"""OpenRLHF's `Actor.forward` for its own PPO on a CPU, computing the logits of the response window only.

OpenRLHF 0.11 lays a batch out as [prompt | response | pads] rows with an action mask over all T - 1 positions,
and `Actor.forward` projects every position onto the vocabulary (the LM head, a float32 copy and a log-softmax over
151,936 ids on the demo model), though only the columns from the first response token on carry a loss. The
plugin's own actors compute only those columns (`plugin.logits.window_logits`); `install_response_window` gives
OpenRLHF's PPO policy the same forward, so the stock baseline and SafeSteer pay the same per-token cost on a CPU.

What changes is where the logits are computed, not what: the action log-probs and entropies come from OpenRLHF's
own `log_probs_from_logits` and `compute_entropy` on the same logits (tests/openrlhf/test_openrlhf_window.py
checks the log-probs, entropies and every gradient against the stock forward). Everything else (packing, ring
attention, vision inputs, MoE router losses, calls without an action mask) runs the stock forward. Used by
`plugin.stock` only, which runs on machines without a GPU; GPU clusters run `openrlhf.cli.train_ppo_ray` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from openrlhf.models.utils import compute_entropy, log_probs_from_logits
from transformers.modeling_outputs import CausalLMOutputWithPast

from openrlhf_safesteer.plugin.logits import (
    can_share_header,
    hf_model_inside,
    plain_hf_forward,
    response_window,
    window_logits,
)


def windowable(actor, strategy, action_mask, return_logprobs: bool, allgather_logits: bool, mm_inputs: dict) -> bool:
    """True when the call only needs action log-probs (and entropies) on a plain (B, T) batch of a dense model."""
    if action_mask is None or return_logprobs or allgather_logits or mm_inputs:
        return False
    inner = hf_model_inside(actor.model)
    routed = inner is None or getattr(inner.config, "output_router_logits", False)
    return plain_hf_forward(actor, strategy) and not routed


def response_window_forward(actor, sequences: torch.Tensor, action_mask: torch.Tensor, attention_mask: torch.Tensor,
                            return_output: bool, return_entropy: bool):
    """What `Actor.forward(sequences, action_mask, attention_mask, return_output, return_entropy=...)` returns, from
    the response window's logits only.

    sequences, attention_mask: (B, T); action_mask: (B, A), A <= T - 1, aligned with the last A positions.
    Returns action_log_probs (B, A), zero where action_mask is, and with return_output a model output whose
    "logits" are the window's (B, W, V) only (the stock output holds all (B, T, V)) and whose `entropy` is
    (B, A), zero before the window (PPO reads `entropy[:, -A:]` under the action mask).
    """
    width = action_mask.shape[1]
    first = response_window(action_mask)
    window = width - first
    logits = window_logits(actor.model, sequences, attention_mask, window,
                           share_header=can_share_header(actor.model, torch.is_grad_enabled()))
    logits = logits.to(torch.float32)                                             # (B, W, V), as OpenRLHF casts
    if actor.temperature != 1.0:
        logits = logits / actor.temperature
    log_probs = log_probs_from_logits(logits, sequences[:, -window:])             # (B, W)
    action_log_probs = F.pad(log_probs, (first, 0)) * action_mask.float()        # (B, A)
    if not return_output:
        return action_log_probs
    output = CausalLMOutputWithPast(logits=logits)
    if return_entropy:
        output.entropy = F.pad(compute_entropy(logits), (first, 0))
    return action_log_probs, output


def install_response_window(actor, strategy) -> None:
    """Route `actor`'s (OpenRLHF's Actor) forward through `response_window_forward` wherever `windowable`; every
    other call goes to the stock forward unchanged."""
    stock_forward = actor.forward

    def forward(sequences, action_mask=None, attention_mask=None, return_output=False, allgather_logits=False,
                return_logprobs=False, ring_attn_group=None, packed_seq_lens=None, return_entropy=False,
                **mm_inputs):
        if ring_attn_group is None and windowable(actor, strategy, action_mask, return_logprobs, allgather_logits,
                                                  mm_inputs):
            return response_window_forward(actor, sequences, action_mask, attention_mask, return_output,
                                           return_entropy)
        return stock_forward(sequences, action_mask, attention_mask, return_output=return_output,
                             allgather_logits=allgather_logits, return_logprobs=return_logprobs,
                             ring_attn_group=ring_attn_group, packed_seq_lens=packed_seq_lens,
                             return_entropy=return_entropy, **mm_inputs)

    actor.forward = forward
