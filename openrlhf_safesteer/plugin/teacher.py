"""The SafeSteer teacher: OpenRLHF's reference actor with the steering hook on the model it wraps.

OpenRLHF's reference model is the frozen starting checkpoint, which is exactly SafeSteer's base;
adding coeff * d to the input of decoder layer l at every position turns it into the teacher.
The hook goes on the HF model inside DeepSpeed's engine (`Actor.model.module`), so it works under
ZeRO-0/3 (ZeRO-3 partitions parameters, not activations: the hook sees the full hidden states),
with ref offload, and with sample packing (a constant vector added at every position does not
care how sequences are laid out; `plugin.logits.padded_logits` undoes the (B, T, 1, V) shape that
OpenRLHF's packed gather returns). The vector lives in the hook as a plain tensor, never as a
parameter or buffer, so ZeRO-3 never partitions it.

With `--safesteer.coeff_key KEY` the experience maker also sends each row's teacher scale (the prompt's KEY
column: 1 a harmful prompt, 0 a retain prompt whose teacher is the unsteered base; docs/METHOD.md section 8),
and the hook adds coeff * scale * d to each row, or, under packing, to each of the row's tokens.

`forward` returns, per micro-batch, a dict of CPU tensors:
    "logprobs":       (B, A)     teacher log-prob of each sampled token (OpenRLHF's usual output)
    "logprobs_on_s":  (B, A, K)  teacher log-probs of the K safety tokens at every position
with A = action_mask.shape[1] (= T - 1) and both multiplied by action_mask. Full-vocabulary
log-softmax, not renormalised over S. The logits never leave the actor. Without packing, ring attention or a
vision model the actor runs the HF model itself for the A response-predicting positions only, the chat header the
rows share encoded once (`chat.completion_logits`, as the local engine's teacher): the same log-probs, about half
the work on the demo's model. Otherwise OpenRLHF's Actor.forward gives all T positions' logits.

Imports OpenRLHF at module level (it subclasses OpenRLHF's classes), and OpenRLHF imports flash_attn and vllm:
where those are not installed, import it after `compat.prepare_process()` (the launcher does) or in a Ray worker
set up by `compat.worker_setup` (install.ensure_ray starts Ray with it). Importing it installs nothing.
"""

from __future__ import annotations

import logging
from typing import Optional

import ray
import torch
from openrlhf.trainer.ray.launcher import ReferenceModelActor

from openrlhf_safesteer.cpu_kernels import onednn_linear
from openrlhf_safesteer.plugin import compat, versions
from openrlhf_safesteer.plugin.logits import (
    action_logprobs,
    can_share_header,
    plain_hf_forward,
    response_logprobs,
    response_window,
    window_logits,
)
from openrlhf_safesteer.steering import SteeringVector, steer

logger = logging.getLogger(__name__)

_StockReference = ReferenceModelActor.__ray_actor_class__


def teacher_outputs(logits: torch.Tensor, sequences: torch.Tensor, action_mask: torch.Tensor,
                    safety_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Teacher log-probs from its full logits (B, T, V), or (B, T, 1, V) under packing: sampled tokens
    (B, A) and S (B, A, K), masked.

    Position t of the result predicts token t + 1 of `sequences`, aligned like OpenRLHF's
    action_log_probs (the last A positions, A = action_mask.shape[1]).
    """
    return action_logprobs(logits, sequences, action_mask, safety_ids)


def row_coefficients(coeff: float, scales: torch.Tensor, attention_mask: torch.Tensor, packed: bool) -> torch.Tensor:
    """The hook's coefficients for rows with teacher scales (B,): coeff * scales (B,), or, for packed sequences
    (OpenRLHF unpads the (B, T) batch into one (1, N) row of its real tokens, in row-major order), per token (1, N)."""
    if scales.shape != attention_mask.shape[:1]:
        raise ValueError(f"{tuple(scales.shape)} teacher scales for a batch of {attention_mask.shape[0]} rows")
    per_row = coeff * scales.float()
    if not packed:
        return per_row
    return per_row[:, None].expand(attention_mask.shape)[attention_mask.bool()][None]


def steered_response_outputs(hf_model, vector: SteeringVector, coeff: float, steering_scales: Optional[torch.Tensor],
                             sequences: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor,
                             safety_ids: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The teacher's outputs (as `teacher_outputs`, (B, A) and (B, A, K) for action_mask (B, A)) from the HF model's
    logits at the action positions only (from the first column any row acts on, `response_window`; zeros before
    it), the chat header the rows share encoded once where the attention kernel allows (`can_share_header`,
    `chat.completion_logits`, as the local engine's teacher).
    sequences, attention_mask (B, T): OpenRLHF's layout, [prompt | response | pads] rows (0.11) or LEFT-padded
    prompts then responses. Rows with different steering scales (B,) go in passes of their own, one per scale, under
    coeff * scale: the shared header is encoded at batch 1 under one coefficient, and a retain row's header must
    be the plain base's."""
    rows_total = sequences.shape[0]
    scales = (torch.ones(rows_total) if steering_scales is None
              else torch.as_tensor(steering_scales, dtype=torch.float32).reshape(-1))
    if scales.shape[0] != rows_total:
        raise ValueError(f"{scales.shape[0]} teacher scales for a batch of {rows_total} rows")
    # only the columns from the first one any row acts on (response_window); the rest are zeros, as masked
    first = response_window(action_mask)
    window = action_mask[:, first:]
    share_header, parts = can_share_header(hf_model, training=False), []
    for scale in scales.unique().tolist():
        rows = (scales == scale).nonzero().flatten().to(sequences.device)
        with steer(hf_model, vector, coeff * scale):
            logits = window_logits(hf_model, sequences[rows], attention_mask[rows], window.shape[1],
                                   share_header=share_header).float()
        if temperature != 1.0:
            logits = logits / temperature
        parts.append((rows, response_logprobs(logits, sequences[rows], window[rows], safety_ids)))
    result = {key: value.new_zeros(rows_total, action_mask.shape[1], *value.shape[2:])
              for key, value in parts[0][1].items()}
    for rows, part in parts:
        for key, value in part.items():
            result[key][rows, first:] = value
    return result


class SteeredReferenceActor(_StockReference):
    """OpenRLHF's ReferenceModelActor + the steering hook; returns teacher log-probs on S."""

    def __init__(self, *args, **kwargs):
        compat.prepare_process()
        super().__init__(*args, **kwargs)

    def init_model_from_pretrained(self, strategy, pretrain):
        super().init_model_from_pretrained(strategy, pretrain)
        config = strategy.args.safesteer
        self.safety_ids = torch.tensor(config.safety_ids, dtype=torch.long)
        # self.model is OpenRLHF's Actor; .model is the DeepSpeed engine; the core's decoder_layers
        # sees through both to the HF model's blocks. The hook is attached per forward (with that batch's
        # coefficients), so nothing else that runs this model is ever steered.
        self.steering_vector, self.coeff = config.steering_vector, config.coeff
        strategy.print(f"[safesteer] teacher = reference + {config.coeff:g} * d at decoder layer "
                       f"{config.steering_vector.layer}; |S| = {len(config.safety_ids)}")

    def forward(
        self,
        sequences: torch.LongTensor,
        action_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        return_output=False,
        packed_seq_lens: Optional[list[int]] = None,
        mm_train_inputs_list=None,
        steering_scales: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """steering_scales (B,): each row's multiplier of the teacher's coefficient (None: 1 for every row)."""
        device = torch.cuda.current_device()
        mm_inputs = {}
        if mm_train_inputs_list and getattr(self.model, "is_vlm", False):
            from openrlhf.utils.vlm_utils import merge_mm_train_inputs

            mm_inputs = merge_mm_train_inputs(mm_train_inputs_list, device)
        sequences, attention_mask, action_mask = (sequences.to(device), attention_mask.to(device),
                                                  action_mask.to(device))
        # on a CPU, oneDNN for the large products, as the local engine's teacher (cpu_kernels.py; no gradient here)
        with torch.no_grad(), onednn_linear(not compat.cuda_present()):
            if plain_hf_forward(self.model, self.strategy) and not mm_inputs:
                coeff = self.steering_vector.coeff if self.coeff is None else self.coeff
                result = steered_response_outputs(self.model.model, self.steering_vector, coeff, steering_scales,
                                                  sequences, attention_mask, action_mask, self.safety_ids,
                                                  getattr(self.model, "temperature", 1.0))
            else:
                result = _actor_outputs(self, sequences, attention_mask, action_mask, steering_scales,
                                        packed_seq_lens, mm_inputs)
        return {key: value.to("cpu") for key, value in result.items()}


def _actor_outputs(teacher, sequences, attention_mask, action_mask, steering_scales, packed_seq_lens, mm_inputs):
    """Teacher log-probs from OpenRLHF's Actor.forward (all T positions; packing, ring attention, VLM)."""
    coeff = teacher.coeff
    if steering_scales is not None:
        coeff = row_coefficients(teacher.steering_vector.coeff if coeff is None else coeff, steering_scales,
                                 attention_mask, getattr(teacher.model, "packing_samples", False))
    with steer(teacher.model.model, teacher.steering_vector, coeff):
        # action_mask=None + return_output: the Actor returns its logits, gathered back to (B, T, V) under
        # packing; divided by the rollout temperature like the student's (by OpenRLHF from 0.11.1 on).
        output = teacher.model(
            sequences,
            None,
            attention_mask,
            return_output=True,
            allgather_logits=True,
            ring_attn_group=teacher.strategy.ring_attn_group,
            packed_seq_lens=packed_seq_lens,
            **mm_inputs,
        )
        logits = versions.returned_logits(output["logits"], getattr(teacher.model, "temperature", 1.0))
        return teacher_outputs(logits, sequences, action_mask, teacher.safety_ids)


SteeredReferenceActorRemote = ray.remote(num_gpus=1)(SteeredReferenceActor)
