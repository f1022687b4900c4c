"""On-policy rollouts for the local engine: the student samples completions with HF generate.

A rollout batch is laid out as [left-padded prompt | right-padded completion], so every row's
prompt ends at the same column P and completions occupy columns P..P+C-1. Position t predicts
token t+1, so the completion-predicting positions are P-1 .. P+C-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openrlhf_safesteer.chat import (
    encode_shared_prefix,
    end_of_turn_ids,
    render_prompts,
    shared_prompt_cache,
    to_left_padded,
)
from openrlhf_safesteer.models import left_padded_position_ids
from openrlhf_safesteer.sampling import SeededSampling, request_seeds, rollout_seed

Tensor = torch.Tensor


@dataclass
class Rollouts:
    """One step's sequences.

    input_ids (B, P + C); attention_mask (B, P + C): 1 on real prompt tokens and on completion
    tokens up to and including the first end-of-turn token; loss_mask (B, P + C - 1): 1 at the
    positions that predict a completion token (aligned with logits[:, :-1]); prompt_len P;
    prompts: the B user prompts (each repeated M times); completions: decoded texts.
    teacher_scale: None (every row's teacher is the steered base), or (B,) float multipliers of the
    teacher's steering coefficient per row: 1 on the harmful rows, 0 on retain rows (docs/METHOD.md section 8).
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    prompt_len: int
    prompts: list[str]
    completions: list[str]
    teacher_scale: Tensor | None = None

    @property
    def completion_len(self) -> int:
        return self.input_ids.shape[1] - self.prompt_len

    def position_ids(self) -> Tensor:
        return left_padded_position_ids(self.attention_mask)

    def response_lengths(self) -> Tensor:
        """(B,) number of completion tokens per sequence (eos included)."""
        return self.attention_mask[:, self.prompt_len:].sum(-1)

    def take(self, rows: Tensor) -> Rollouts:
        """The rows at these indices (B',) long, in that order."""
        index = rows.tolist()
        scale = None if self.teacher_scale is None else self.teacher_scale[rows]
        return Rollouts(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows], self.prompt_len,
                        [self.prompts[i] for i in index], [self.completions[i] for i in index], scale)

    def select(self, rows: slice) -> Rollouts:
        scale = None if self.teacher_scale is None else self.teacher_scale[rows]
        return Rollouts(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows], self.prompt_len,
                        self.prompts[rows], self.completions[rows], scale)


def completion_masks(completion_ids: Tensor, stop_ids: list[int]) -> Tensor:
    """(B, C) mask: 1 up to and including the first stop token of each row, 0 after it."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    # number of stop tokens strictly before each position; valid while it is 0
    before = torch.cumsum(is_stop.long(), dim=-1) - is_stop.long()
    return (before == 0).long()


def build_rollouts(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, stop_ids: list[int],
                   prompts: list[str], completions: list[str]) -> Rollouts:
    """Assemble a Rollouts batch from left-padded prompts (B, P) and completions (B, C)."""
    completion_mask = completion_masks(completion_ids, stop_ids)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    prompt_len = prompt_ids.shape[1]
    loss_mask = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    loss_mask[:, prompt_len - 1:] = completion_mask
    return Rollouts(input_ids, attention_mask, loss_mask, prompt_len, prompts, completions)


# OpenRLHF's rollouts never end a reply at its first token (SamplingParams(min_tokens=1)); the local engine
# follows the same convention, so both engines draw a request's tokens alike (sampling.py).
MIN_NEW_TOKENS = 1


def prompt_token_lists(prompt_ids: Tensor, prompt_mask: Tensor) -> list[list[int]]:
    """Each row's real prompt tokens (the mask's 1s) of a padded (N, P) batch, as the engines hash them."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: list[str], samples_per_prompt: int, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                    system_prompt: str | None = None, rollout_index: int = 0) -> Rollouts:
    """Sample `samples_per_prompt` completions of each prompt from `model` (HF generate).

    Every row draws from its own generator, seeded by `sampling.request_seed(rollout_seed(seed, rollout_index),
    its prompt's token ids, k)`: a row's tokens do not depend on the other rows or their order, a resumed run draws what
    the uninterrupted run drew at the same step, and the plugin's HF engine draws the same tokens for the same
    request. seed: the run's training seed; rollout_index: the 0-based optimizer step.
    """
    texts = render_prompts(tokenizer, prompts, system_prompt)
    device = next(model.parameters()).device
    distinct_ids, distinct_mask, shared = encode_shared_prefix(tokenizer, texts, device)
    prompt_ids = distinct_ids.repeat_interleave(samples_per_prompt, dim=0)
    prompt_mask = distinct_mask.repeat_interleave(samples_per_prompt, dim=0)
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    stop_ids = end_of_turn_ids(tokenizer)
    seeds = request_seeds(rollout_seed(seed, rollout_index), prompt_token_lists(prompt_ids, prompt_mask))
    sampler = SeededSampling(seeds, temperature, top_p)
    was_training = model.training
    model.eval()
    cache = shared_prompt_cache(model, distinct_ids, distinct_mask, shared, samples_per_prompt)
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache, max_new_tokens=max_new_tokens,
        min_new_tokens=MIN_NEW_TOKENS, do_sample=False, logits_processor=[sampler],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids,
    )
    model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1]:]
    if completion_ids.shape[1] == 0:
        raise RuntimeError("generate returned no new tokens")
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    prompt_ids, prompt_mask = to_left_padded(prompt_ids, prompt_mask)   # the Rollouts layout
    return build_rollouts(prompt_ids, prompt_mask, completion_ids, stop_ids, repeated, completions)
