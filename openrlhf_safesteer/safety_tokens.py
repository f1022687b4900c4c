"""The safety-token set S: the vocabulary ids on which the steered teacher disagrees with the base
model most often (docs/METHOD.md section 3). Done once, before training.

    S = select_safety_tokens(model, tokenizer, steering_vector, harmless_val_prompts)
    S.save("tokens.json"); S = SafetyTokenSet.load("tokens.json"); ids = S.ids_tensor()   # (K,)

Shapes: N sampled continuations, H answer positions (the horizon), V vocabulary rows of the LM head.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from openrlhf_safesteer.chat import (
    batches,
    encode_shared_prefix,
    end_of_turn_ids,
    forward_after_prefix,
    prefill_shared_prefix,
    render_prompts,
)
from openrlhf_safesteer.directions import prompts_sha256
from openrlhf_safesteer.files import atomic_write_text
from openrlhf_safesteer.models import (
    left_padded_position_ids,
    model_device,
    model_name,
    text_config,
    vocab_size,
)
from openrlhf_safesteer.steering import (
    IncompatibleArtifactError,
    SteeringVector,
    finite_coeff,
    steer,
)

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
FORMAT_VERSION = 1


@dataclass
class SafetyTokenSet:
    """The safety tokens S: vocabulary ids (best first), their token strings and vote counts.

    tokens are the tokenizer's own token strings (convert_ids_to_tokens), which is what
    check_compatible compares; texts are the decoded strings, for people.
    """

    ids: list[int]
    tokens: list[str]
    votes: list[int]
    config: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    vocab_size: int | None = None
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = [int(i) for i in self.ids]
        self.votes = [int(v) for v in self.votes]
        if not self.ids:
            raise ValueError("a safety-token set needs at least one id")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("safety-token ids must be unique")
        if min(self.ids) < 0:
            raise ValueError(f"safety-token ids must be >= 0, got {min(self.ids)}")
        if not (len(self.tokens) == len(self.votes) == len(self.ids)) or (self.texts and len(self.texts) != len(self.ids)):
            raise ValueError(f"ids ({len(self.ids)}), tokens ({len(self.tokens)}), votes ({len(self.votes)}) and "
                             f"texts ({len(self.texts)}) must have the same length")

    def __len__(self) -> int:
        return len(self.ids)

    def ids_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """The ids as a LongTensor (K,), the `safety_ids` argument of the objectives."""
        return torch.tensor(self.ids, dtype=torch.long, device=device)

    def check_compatible(self, vocab_size: int, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Raise IncompatibleArtifactError when an id is outside [0, vocab_size) or, given a tokenizer,
        when the ids no longer name the same tokens (another vocabulary)."""
        if max(self.ids) >= vocab_size:
            raise IncompatibleArtifactError(
                f"safety-token id {max(self.ids)} is outside the model's vocabulary of {vocab_size} "
                f"(the set was made for {self.model_name!r} with vocabulary {self.vocab_size})"
            )
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            logger.warning("safety tokens were made with a vocabulary of %d rows, the model has %d",
                           self.vocab_size, vocab_size)
        if tokenizer is not None:
            current = tokenizer.convert_ids_to_tokens(self.ids)
            mismatched = [(i, old, new) for i, old, new in zip(self.ids, self.tokens, current) if old != new]
            if mismatched:
                i, old, new = mismatched[0]
                raise IncompatibleArtifactError(
                    f"{len(mismatched)} safety-token ids name other tokens in this tokenizer (id {i} was {old!r}, "
                    f"is {new!r}): the set was made for another vocabulary ({self.model_name!r})"
                )

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "model_name": self.model_name, "vocab_size": self.vocab_size,
                "ids": self.ids, "tokens": self.tokens, "texts": self.texts, "votes": self.votes,
                "config": self.config}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set as JSON (atomically)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SafetyTokenSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (make a safety-token set with `safesteer tokens`)")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a safety-token set (format_version {FORMAT_VERSION})")
        return cls(ids=data["ids"], tokens=data["tokens"], votes=data["votes"], config=data.get("config", {}),
                   model_name=data.get("model_name", ""), vocab_size=data.get("vocab_size"),
                   texts=data.get("texts", []))


# ----------------------------------------------------------------------------- pure pieces

def default_horizon(model: nn.Module) -> int:
    """H = 5 for Llama-family models, 7 otherwise (Qwen), as in the paper."""
    return 5 if str(getattr(text_config(model), "model_type", "")).startswith("llama") else 7


def default_min_prob(model: nn.Module) -> float:
    """1e-7 for Llama-family models, 1e-8 otherwise (Qwen), as in the paper."""
    return 1e-7 if str(getattr(text_config(model), "model_type", "")).startswith("llama") else 1e-8


def valid_positions(base_argmax: Tensor, end_ids: Sequence[int]) -> Tensor:
    """(N, H) bool: True before the first position where the base model's argmax ends the turn."""
    is_end = torch.isin(base_argmax, torch.tensor(list(end_ids), dtype=base_argmax.dtype, device=base_argmax.device))
    return is_end.long().cumsum(dim=1) == 0


def banned_token_mask(tokenizer: PreTrainedTokenizerBase, vocab_rows: int) -> Tensor:
    """(V,) bool: special tokens, tokens whose text contains "<|", and LM-head rows past the tokenizer."""
    banned = torch.zeros(vocab_rows, dtype=torch.bool)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    for i in special:
        if 0 <= i < vocab_rows:
            banned[i] = True
    for token, i in tokenizer.get_vocab().items():
        if 0 <= i < vocab_rows and "<|" in token:
            banned[i] = True
    if len(tokenizer) < vocab_rows:
        banned[len(tokenizer):] = True  # padding rows of the LM head: no token to vote for
    return banned


SCORE_CACHE_BYTES = 2 << 30   # keep scored (N, H, V) log-probs between the two passes up to this size


def vote(delta: Tensor, valid: Tensor, banned: Tensor, k_prime: int) -> Tensor:
    """Votes (V,) long: at each valid (sample, position) the top-k_prime ids by delta get one vote.

    delta (N, H, V) = log p_teacher - log p_base; valid (N, H) bool; banned (V,) bool never vote.
    Only ids the teacher favours (delta > 0) vote. With docs/METHOD.md's min_prob (1e-8) the top k' ids
    of a 150k vocabulary all have delta > 0 anyway; with a strict min_prob fewer than k' ids are
    allowed, and without this rule every allowed id would vote, including the ones steering makes
    LESS likely. Measured on the demo model (H = 1, min_prob 1e-3): S then held 'To', 'The',
    'Here', 'Yes' (answer openers) next to 'Sorry', and training on it pushed mass to 'Sure'.
    """
    allowed = int((~banned).sum())
    if allowed == 0:
        raise ValueError("every vocabulary id is banned; nothing can be a safety token")
    rows = delta[valid]  # (M, V)
    votes = torch.zeros(delta.shape[-1], dtype=torch.long)
    if rows.numel() == 0:
        return votes
    rows = rows.float().masked_fill(banned.to(rows.device), float("-inf"))
    values, indices = rows.topk(min(k_prime, allowed), dim=-1)        # (M, k')
    top = indices[values > 0].cpu()
    return votes + torch.bincount(top, minlength=delta.shape[-1])


def top_by_votes(votes: Tensor, k: int, tiebreak: Tensor | None = None) -> list[int]:
    """The k ids with most votes, zero-vote ids dropped.

    Ties are common (with few samples and a short horizon many ids get a vote at every position):
    they go to the larger `tiebreak` (V,) score when given, e.g. the summed teacher/base log-ratio,
    then to the smaller id.
    """
    order = torch.arange(votes.numel())
    if tiebreak is not None:
        order = order[torch.sort(-tiebreak.double(), stable=True).indices]
    order = order[torch.sort(-votes[order], stable=True).indices]  # stable: keeps the tie order above
    return [i for i in order[:k].tolist() if int(votes[i]) > 0]


# ----------------------------------------------------------------------------- model passes

@torch.no_grad()
def sample_continuations(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, length: int, generator: torch.Generator,
    forbidden_ids: Sequence[int] = (), temperature: float = 1.0, shared: int = 0,
) -> Tensor:
    """Sample exactly `length` tokens per row (temperature, top_p 1, no top-k) -> (B, length) long.

    forbidden_ids (end-of-turn, pad) get probability 0, which forces the length like HF's
    min_new_tokens. Sampling draws on the CPU generator so a seed gives the same tokens on any
    device. One prompt pass, then one token per step against the KV cache (re-encoding the whole
    sequence at every step made this the slowest part of the vote). The first `shared` columns, the same
    in every row (`chat.encode_shared_prefix`), are encoded once.
    """
    if length == 0:
        return input_ids.new_zeros((input_ids.shape[0], 0))
    out = []
    mask = attention_mask
    positions = left_padded_position_ids(mask)[:, shared:]                      # (B, P - shared)
    step_ids, past = input_ids[:, shared:], prefill_shared_prefix(model, input_ids, shared)
    forbidden = list(forbidden_ids)
    for _ in range(length):
        result = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                       use_cache=True, logits_to_keep=1)
        past = result.past_key_values
        logits = result.logits[:, -1, :].float()                                # (B, V)
        if forbidden:
            logits[:, forbidden] = float("-inf")
        probs = F.softmax(logits / temperature, dim=-1).cpu()
        token = torch.multinomial(probs, 1, generator=generator).to(input_ids.device)  # (B, 1)
        out.append(token)
        step_ids = token
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(out, dim=1)


@torch.no_grad()
def answer_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, horizon: int,
                    shared: int = 0) -> Tensor:
    """Full-vocabulary log-probs (B, H, V) float32 at the H answer positions: the last prompt token
    and the H - 1 continuation tokens (each predicts the next answer token). The first `shared` columns,
    the same in every row (`chat.encode_shared_prefix`), are encoded once."""
    # logits_to_keep: only the H answer positions go through the LM head (the prompt's would be
    # (B, P, V) floats thrown away; with P ~ 5H and V = 150k that was most of the pass)
    past = prefill_shared_prefix(model, input_ids, shared)
    logits = forward_after_prefix(model, input_ids, attention_mask, shared, past, logits_to_keep=horizon).logits
    return F.log_softmax(logits.float(), dim=-1)


def select_safety_tokens(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    steering_vector: SteeringVector,
    prompts: Sequence[str],
    horizon: int = 7,
    n_samples: int = 8,
    k: int = 50,
    k_prime: int = 200,
    min_prob: float = 1e-8,
    seed: int = 0,
    coeff: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> SafetyTokenSet:
    """Vote the safety-token set S (docs/METHOD.md section 3).

    For each prompt (harmless validation prompts), sample n_samples continuations of horizon - 1
    tokens from the STEERED model; teacher-force them through the steered and the base model; at
    each valid answer position the top-k_prime ids of log p_teacher - log p_base (special tokens,
    "<|" tokens and ids whose mean teacher probability over valid positions is below min_prob
    excluded) get a vote; S is the top k ids by votes. Deterministic given seed.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    for name, value in (("horizon", horizon), ("n_samples", n_samples), ("k", k), ("k_prime", k_prime),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= min_prob < 1:
        raise ValueError(f"min_prob must be in [0, 1), got {min_prob}")
    # Checked with the arguments: a NaN/inf teacher makes every probability NaN (torch.multinomial fails).
    coeff = steering_vector.coeff if coeff is None else finite_coeff(coeff)
    steering_vector.check_compatible(model)
    vocab_rows = vocab_size(model)
    end_ids = end_of_turn_ids(tokenizer)
    banned = banned_token_mask(tokenizer, vocab_rows)
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    forbidden = sorted(set(end_ids) | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set()))

    # 1. Sample continuations from the steered model; each prompt repeated n_samples times.
    texts = [t for t in render_prompts(tokenizer, prompts) for _ in range(n_samples)]
    sequences: list[tuple[Tensor, Tensor, int]] = []
    with steer(model, steering_vector, coeff):
        for chunk in tqdm(list(batches(texts, batch_size)), desc="sample steered continuations", disable=not progress):
            input_ids, attention_mask, shared = encode_shared_prefix(tokenizer, chunk, device)
            continuation = sample_continuations(model, input_ids, attention_mask, horizon - 1, generator, forbidden,
                                                shared=shared)
            sequences.append((torch.cat([input_ids, continuation], 1),
                              torch.cat([attention_mask, torch.ones_like(continuation)], 1), shared))

    # The vote needs min_prob's ban list, i.e. one pass over every sample, before the first vote.
    # Small runs keep the (N, H, V) teacher/base log-probs of that pass for the vote; large ones
    # (docs/METHOD.md's 128 prompts x 8 samples at V = 150k: 8 GB) score everything twice instead.
    keep_scores = 2 * len(texts) * horizon * vocab_rows * 4 <= SCORE_CACHE_BYTES
    cache: list[tuple[Tensor, Tensor]] = []

    def scored_batches(desc: str):
        if cache:
            yield from cache
            return
        for input_ids, attention_mask, shared in tqdm(sequences, desc=desc, disable=not progress):
            with steer(model, steering_vector, coeff):
                teacher = answer_logprobs(model, input_ids, attention_mask, horizon, shared)
            scores = teacher.cpu(), answer_logprobs(model, input_ids, attention_mask, horizon, shared).cpu()
            if keep_scores:
                cache.append(scores)
            yield scores

    # 2. Mean teacher probability over valid positions (needed before any vote can be cast).
    prob_sum = torch.zeros(vocab_rows, dtype=torch.float64)
    n_valid = 0
    for teacher, base in scored_batches("teacher probabilities"):
        valid = valid_positions(base.argmax(-1), end_ids)
        prob_sum += (teacher.exp().double() * valid.unsqueeze(-1)).sum(dim=(0, 1))
        n_valid += int(valid.sum())
    if n_valid == 0:
        raise ValueError("no valid answer position: the base model ends the turn immediately on every sample")
    mean_prob = prob_sum / n_valid
    low_prob = mean_prob < min_prob
    banned_all = banned | low_prob
    logger.info("%d valid positions; %d ids banned as special, %d more below min_prob=%g",
                n_valid, int(banned.sum()), int((low_prob & ~banned).sum()), min_prob)

    # 3. Vote.
    votes = torch.zeros(vocab_rows, dtype=torch.long)
    log_ratio_sum = torch.zeros(vocab_rows, dtype=torch.float64)  # breaks ties between equal vote counts
    for teacher, base in scored_batches("vote"):
        valid = valid_positions(base.argmax(-1), end_ids)
        delta = teacher - base                                                     # (b, H, V)
        votes += vote(delta, valid, banned_all, k_prime)
        log_ratio_sum += (delta.double() * valid.unsqueeze(-1)).sum(dim=(0, 1))
    ids = top_by_votes(votes, k, tiebreak=log_ratio_sum)
    if not ids:
        raise ValueError("no token received a vote")
    config = {
        "horizon": horizon, "n_samples": n_samples, "k": k, "k_prime": k_prime, "min_prob": min_prob, "seed": seed,
        "coeff": coeff, "n_prompts": len(prompts), "prompts_sha256": prompts_sha256(prompts),
        "n_valid_positions": n_valid, "tie_break": "summed log p_teacher - log p_base over valid positions",
        "steering_vector": {"layer": steering_vector.layer, "position": steering_vector.position,
                            "norm": steering_vector.norm, "model_name": steering_vector.model_name},
    }
    result = SafetyTokenSet(
        ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids), votes=[int(votes[i]) for i in ids], config=config,
        model_name=model_name(model), vocab_size=vocab_rows, texts=[tokenizer.decode([i]) for i in ids],
    )
    logger.info("safety tokens (top 10 by votes): %s", ", ".join(f"{t!r}:{v}" for t, v in
                                                             zip(result.texts[:10], result.votes[:10])))
    return result
