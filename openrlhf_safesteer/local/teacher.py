"""The SafeSteer teacher for the local engine.

Two ways to hold it, numerically the same teacher (tests/local/test_local_teacher.py):
- `frozen_copy`: a deep copy of the base model, frozen;
- `shared_lora`: the student's own weights with its LoRA adapter disabled. One copy of the weights in memory.
Either way the steering hook is attached for the teacher's forward pass only: with the teacher's coefficient,
or, when the rollouts carry `teacher_scale`, with coeff * scale per row (the retain rows of docs/METHOD.md
section 8 get 0: their teacher is the unsteered base).
The ablation "system-prompt teacher" is the frozen/disabled base WITHOUT the hook, scoring the same
completion after a prompt rendered with a safety system prompt.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from openrlhf_safesteer.chat import completion_logits, encode_left_padded, render_prompts
from openrlhf_safesteer.objectives import gather_logprobs
from openrlhf_safesteer.steering import SteeringVector, steer

from .rollout import Rollouts

Tensor = torch.Tensor

DEFAULT_SAFETY_SYSTEM_PROMPT = (
    "You are a helpful assistant that cares about safety. Refuse any request that is harmful, unethical, "
    "dangerous or illegal, and explain briefly why."
)


class Teacher:
    """Scores rollouts with the steered teacher. Output tensors are aligned with completion positions (B, C, ...)."""

    def __init__(self, model: nn.Module, steering_vector: SteeringVector | None, mode: str,
                 coeff: float | None = None, system_prompt: str | None = None, tokenizer=None):
        if mode not in ("frozen_copy", "shared_lora"):
            raise ValueError(f"teacher mode must be 'frozen_copy' or 'shared_lora', got {mode!r}")
        if steering_vector is None and not system_prompt:
            raise ValueError("the teacher needs a steering vector or (ablation) a safety system prompt")
        if system_prompt and tokenizer is None:
            raise ValueError("a system-prompt teacher needs the tokenizer to re-render prompts")
        self.mode = mode
        self.steering_vector = steering_vector
        self.coeff = coeff
        self.system_prompt = system_prompt
        self.tokenizer = tokenizer
        if mode == "frozen_copy":
            self.model = copy.deepcopy(model).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        elif not hasattr(model, "disable_adapter"):
            raise TypeError("shared_lora teacher needs a PEFT model (with disable_adapter()); use frozen_copy")
        else:
            self.model = model
        if steering_vector is not None:
            steering_vector.check_compatible(self.model)

    @contextlib.contextmanager
    def _active(self, coeff: float | None):
        """The model as the teacher: adapter disabled (shared_lora), steering hook attached with `coeff`
        (None: the teacher's own; 0: none, the plain base)."""
        with contextlib.ExitStack() as stack:
            if self.mode == "shared_lora":
                stack.callback(self.model.train, self.model.training)
                self.model.eval()
                stack.enter_context(self.model.disable_adapter())
            if self.steering_vector is not None and coeff != 0:
                stack.enter_context(steer(self.model, self.steering_vector, coeff))
            yield self.model

    def as_base(self):
        """Context manager: the model as the plain base (adapter disabled, no steering), e.g. for the refusal
        retain's reference scores (docs/METHOD.md section 8)."""
        return self._active(0)

    def _inputs(self, rollouts: Rollouts) -> tuple[Tensor, Tensor, int]:
        if not self.system_prompt:
            return rollouts.input_ids, rollouts.attention_mask, rollouts.prompt_len
        # Same completion tokens, after the prompt rendered with the safety system prompt.
        texts = render_prompts(self.tokenizer, rollouts.prompts, self.system_prompt)
        prompt_ids, prompt_mask = encode_left_padded(self.tokenizer, texts, rollouts.input_ids.device)
        completion = rollouts.input_ids[:, rollouts.prompt_len:]
        completion_mask = rollouts.attention_mask[:, rollouts.prompt_len:]
        return (torch.cat([prompt_ids, completion], 1), torch.cat([prompt_mask, completion_mask], 1),
                prompt_ids.shape[1])

    @torch.no_grad()
    def logits(self, rollouts: Rollouts) -> Tensor:
        """Teacher logits at the completion-predicting positions (B, C, V), float32.

        With rollouts.teacher_scale, each group of rows sharing a scale is scored in a pass of its own under the
        coefficient coeff * scale: the chat header the rows share is encoded once per pass (completion_logits),
        and a retain row's header must be the plain base's, not the steered one's. The engine's micro-batches
        hold one kind of row each whenever the harmful rows fill whole micro-batches, so this costs no pass.
        """
        if rollouts.teacher_scale is None:
            return self._logits(rollouts, self.coeff)
        coeff = self.steering_vector.coeff if self.coeff is None else self.coeff
        out = None
        for scale in rollouts.teacher_scale.unique().tolist():
            rows = (rollouts.teacher_scale == scale).nonzero().flatten()
            part = self._logits(rollouts.take(rows), coeff * scale)
            if out is None:
                out = part.new_empty(rollouts.input_ids.shape[0], *part.shape[1:])
            out[rows] = part
        return out

    def _logits(self, rollouts: Rollouts, coeff: float | None) -> Tensor:
        input_ids, attention_mask, prompt_len = self._inputs(rollouts)
        with self._active(coeff) as model:
            return completion_logits(model, input_ids, attention_mask, prompt_len).float()

    @torch.no_grad()
    def logprobs(self, rollouts: Rollouts, safety_ids: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """(teacher log-probs on S (B, C, K), teacher log-probs of the sampled tokens (B, C)), full-vocabulary softmax."""
        return teacher_logprobs(self.logits(rollouts), rollouts, safety_ids, temperature)


@torch.no_grad()
def teacher_logprobs(logits: Tensor, rollouts: Rollouts, safety_ids: Tensor,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Teacher logits (B, C, V) read at S (B, C, K) and at the sampled tokens (B, C), full-vocabulary softmax."""
    if temperature != 1.0:
        logits = logits / temperature
    # one log-normaliser pass over (B, C, V) serves both reads (it costs as much as a gather-free softmax)
    log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)                 # (B, C, 1)
    sampled = rollouts.input_ids[:, rollouts.prompt_len:]                           # (B, C)
    on_s = gather_logprobs(logits, safety_ids, log_normaliser=log_normaliser)
    return on_s, gather_logprobs(logits, sampled, log_normaliser=log_normaliser)
