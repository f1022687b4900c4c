"""Seeded sampling per request: a request's tokens depend on its own seed, never on its batch mates.

`transformers.generate(do_sample=True)` draws every row from one process-global RNG stream, so a row's
tokens change with its row index, the batch size and every earlier batch. That is what made the plugin's
HF engine unrepeatable (its batches are cut by request arrival) and what tied the local engine's rollouts
to the order of its rows. Here each request has its own generator, seeded by `request_seed` from what
identifies the request in every engine alike:

    request_seed(rollout_seed(training seed, rollout index), the prompt's token ids, occurrence k)

The rollout index is the number of policy updates before the rollout (the plugin engine's weight version,
the local engine's 0-based step). k numbers identical prompts within one rollout (the samples of one
prompt are exchangeable, so any order of them gives the same set of requests).

`SeededSampling` is a LogitsProcessor that applies the warpers (temperature, top-k, top-p, as transformers
and vLLM define them), draws each row's token from its own generator (`torch.multinomial`, one uniform per
row and step) and returns scores that make greedy decoding pick that token: run `generate(do_sample=False,
logits_processor=[sampler])`. It keeps each drawn token's log-probability under the warped distribution, the
`rollout_log_probs` vLLM reports in `processed_logprobs` mode. The rollout seed travels to the plugin's
engines as `SamplingParams.seed`, and each derives its requests' seeds from it; vLLM's own draw differs from
torch's, so one seed gives the same tokens within one engine kind, not across kinds.

Core module: plain torch + transformers, no OpenRLHF import.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

Tensor = torch.Tensor

SEED_BITS = 63   # torch.Generator.manual_seed and vLLM's SamplingParams.seed both take any int below 2**63


def _blake63(person: bytes, *parts: bytes) -> int:
    digest = hashlib.blake2b(digest_size=8, person=person)
    for part in parts:
        digest.update(part)
    return int.from_bytes(digest.digest(), "little") >> (64 - SEED_BITS)


def rollout_seed(seed: int, rollout_index: int) -> int:
    """The seed of one rollout (what travels as `SamplingParams.seed` to the engines): seed is the run's
    training seed, rollout_index the number of policy updates before this rollout (0 for the first)."""
    if rollout_index < 0:
        raise ValueError(f"rollout_index must be >= 0, got {rollout_index}")
    return _blake63(b"safesteer-roll", struct.pack("<qq", int(seed), int(rollout_index)))


def request_seed(rollout: int, prompt_ids: Sequence[int], occurrence: int) -> int:
    """The seed of one sampled request (a pure function: blake2b of its arguments, 63 bits).

    rollout: `rollout_seed(...)` of its rollout; prompt_ids: the prompt's token ids as the engine sees them
    (chat template applied, no padding); occurrence: k for the k-th request of the same prompt in this
    rollout (0-based).
    """
    if occurrence < 0:
        raise ValueError(f"occurrence must be >= 0, got {occurrence}")
    return _blake63(b"safesteer-req", struct.pack("<qq", int(rollout), int(occurrence)),
                    struct.pack(f"<{len(prompt_ids)}q", *map(int, prompt_ids)))


def occurrences(prompts: Sequence[Sequence[int]]) -> list[int]:
    """k for each prompt of one rollout, in list order: how many identical prompts came before it."""
    seen: Counter = Counter()
    ks = []
    for ids in prompts:
        key = tuple(ids)
        ks.append(seen[key])
        seen[key] += 1
    return ks


def request_seeds(rollout: int, prompts: Sequence[Sequence[int]]) -> list[int]:
    """`request_seed` of every row of one rollout (identical prompts numbered by `occurrences`)."""
    return [request_seed(rollout, ids, k) for ids, k in zip(prompts, occurrences(prompts))]


def warpers(temperature: float, top_p: float = 1.0, top_k: int = 0) -> list[LogitsProcessor]:
    """transformers' own warpers in generate's order (temperature, top-k, top-p); the disabled ones left out."""
    chain: list[LogitsProcessor] = []
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k and top_k > 0:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    return chain


class SeededSampling(LogitsProcessor):
    """Draw row r's next token from its own generator seeded with seeds[r]; greedy decoding then takes it.

    seeds: (B,) ints, one per row of the generate call, in row order. After generate, `logprobs` holds one
    (B,) float32 tensor per decoding step: the drawn token's log-probability under the warped distribution.
    Rows that have finished keep drawing (their tokens are replaced by padding); since every row has its own
    stream, that changes nothing for the others.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float = 1.0, top_k: int = 0):
        if not temperature > 0:
            raise ValueError(f"SeededSampling needs temperature > 0 (use greedy decoding for 0), got {temperature}")
        self.seeds = [int(s) for s in seeds]
        self.chain = warpers(temperature, top_p, top_k)
        self.generators: list[torch.Generator] | None = None
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"SeededSampling got {scores.shape[0]} rows but {len(self.seeds)} seeds")
        if self.generators is None:   # on the device of the scores: multinomial needs its generator there
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        warped = scores.float()
        for warp in self.chain:
            warped = warp(input_ids, warped)
        logp = torch.log_softmax(warped, dim=-1)
        probs = logp.exp()
        drawn = torch.cat([torch.multinomial(probs[row], 1, generator=generator)
                           for row, generator in enumerate(self.generators)])       # (B,)
        self.logprobs.append(logp.gather(-1, drawn[:, None]).squeeze(-1))
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, drawn[:, None], 0.0)

    def drawn_logprobs(self) -> Tensor:
        """(B, steps) the drawn tokens' warped log-probs, one column per decoding step."""
        return torch.stack(self.logprobs, dim=1) if self.logprobs else torch.zeros(len(self.seeds), 0)
