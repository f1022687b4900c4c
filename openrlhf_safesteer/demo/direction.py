"""The demo's direction search: METHOD.md section 1's selection rules on a reduced candidate grid.

The full grid (every layer x every post-instruction position) costs about 95 scored candidates
on the 24-layer default model, over ten minutes on 2 CPU cores; the demo scores the layers of a
window at the given template positions instead (default: the last prompt position, layers 8-17),
with the same three rules: ablation KL on harmless prompts <= kl_threshold, activation addition
makes harmless prompts' refusal score > 0, lowest harmful refusal score under ablation wins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from openrlhf_safesteer.directions import (
    CandidateScore,
    DirectionSelectionError,
    candidate_directions,
    last_token_logprobs,
    prompts_sha256,
    refusal_score,
    refusal_scores_from_logprobs,
    refusal_token_ids,
)
from openrlhf_safesteer.models import model_name, num_layers
from openrlhf_safesteer.steering import SteeringVector, ablate, steer
from openrlhf_safesteer.templates import post_instruction_positions

logger = logging.getLogger(__name__)


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def select_direction_window(
    model, tokenizer, harmful_train: Sequence[str], harmless_train: Sequence[str], harmful_val: Sequence[str],
    harmless_val: Sequence[str], layers: Sequence[int], positions: Sequence[int] = (-1,), coeff: float = 1.0,
    kl_threshold: float = 0.1, batch_size: int = 16, progress: bool = True, allow_fallback: bool = True,
) -> tuple[SteeringVector, list[CandidateScore]]:
    """Like directions.select_direction, restricted to `layers` x `positions` (negative template positions).

    allow_fallback: when every candidate fails the rules, take the one with the highest harmless
    steering refusal score (logged, and recorded as source["fallback"]) instead of raising.
    """
    depth = num_layers(model)
    layers = sorted(set(int(x) for x in layers))
    if not layers or layers[0] < 0 or layers[-1] >= depth:
        raise ValueError(f"layers {layers} must lie in 0..{depth - 1}")
    template_positions = post_instruction_positions(tokenizer)
    for p in positions:
        if p not in template_positions:
            raise ValueError(f"position {p} is not a post-instruction template position {template_positions}")
    refusal_ids = refusal_token_ids(tokenizer)
    # METHOD.md's optional filter: harmful prompts the model refuses, harmless ones it answers
    harmful_scores = refusal_score(model, tokenizer, harmful_train, refusal_ids, batch_size).tolist()
    harmless_scores = refusal_score(model, tokenizer, harmless_train, refusal_ids, batch_size).tolist()
    kept_harmful = [p for p, s in zip(harmful_train, harmful_scores) if s > 0] or list(harmful_train)
    kept_harmless = [p for p, s in zip(harmless_train, harmless_scores) if s < 0] or list(harmless_train)
    logger.info("direction fit on %d/%d harmful and %d/%d harmless prompts", len(kept_harmful), len(harmful_train),
                len(kept_harmless), len(harmless_train))
    candidates = candidate_directions(model, tokenizer, kept_harmful, kept_harmless, list(positions), batch_size)

    base_harmless = last_token_logprobs(model, tokenizer, harmless_val, batch_size)
    table: list[CandidateScore] = []
    for layer in tqdm(layers, desc="score candidate layers", disable=not progress):
        for j, position in enumerate(positions):
            vector = candidates[layer, j].float()
            row = CandidateScore(layer=layer, position=position, norm=float(vector.norm()))
            table.append(row)
            if not torch.isfinite(vector).all() or row.norm == 0:   # e.g. layer 0: the same template token for all
                row.rejected, row.steering_refusal = "zero or non-finite direction", float("-inf")
                continue
            with ablate(model, vector):
                ablated = last_token_logprobs(model, tokenizer, list(harmful_val) + list(harmless_val), batch_size)
            row.ablation_refusal = float(refusal_scores_from_logprobs(ablated[:len(harmful_val)], refusal_ids).mean())
            row.ablation_kl = _kl(base_harmless, ablated[len(harmful_val):])
            sv = SteeringVector(vector, layer=layer, coeff=coeff)
            with steer(model, sv):
                row.steering_refusal = float(refusal_score(model, tokenizer, harmless_val, refusal_ids,
                                                           batch_size).mean())
            if not math.isfinite(row.ablation_kl) or row.ablation_kl > kl_threshold:
                row.rejected = f"ablation KL {row.ablation_kl:.3g} > {kl_threshold}"
            elif row.steering_refusal <= 0:
                row.rejected = f"steering refusal score {row.steering_refusal:.3g} <= 0"
    passed = [r for r in table if not r.rejected]
    fallback = not passed
    if fallback and not allow_fallback:
        raise DirectionSelectionError(
            "every candidate in the demo's window was rejected: "
            + "; ".join(f"layer {r.layer}: {r.rejected}" for r in table))
    if fallback:
        # Measured on the default model (first full demo run, coefficient 1): layers 12-17 each failed one rule
        # (ablation KL 0.13-0.52 > 0.1, or harmless steering score < 0). SafeSteer needs above all a teacher
        # that refuses, so fall back to the candidate whose addition raises harmless refusal the most.
        best = max(table, key=lambda r: (r.steering_refusal, -r.layer))
        logger.warning("every candidate failed METHOD.md's rules (%s); falling back to layer %d, the strongest "
                       "steering refusal score (%.2f)", "; ".join(f"layer {r.layer}: {r.rejected}" for r in table),
                       best.layer, best.steering_refusal)
    else:
        best = min(passed, key=lambda r: (r.ablation_refusal, r.layer))
    logger.info("selected layer %d position %d (ablation refusal %.2f, steering refusal %.2f, KL %.3f)", best.layer,
                best.position, best.ablation_refusal, best.steering_refusal, best.ablation_kl)
    source = {
        "method": "difference of means, demo window (METHOD.md section 1 rules)",
        "layers": layers, "positions": list(positions),
        "harmful_train_sha256": prompts_sha256(kept_harmful), "harmless_train_sha256": prompts_sha256(kept_harmless),
        "harmful_val_sha256": prompts_sha256(harmful_val), "harmless_val_sha256": prompts_sha256(harmless_val),
        "selected": best.to_dict(), "kl_threshold": kl_threshold, "fallback": fallback,
    }
    vector = SteeringVector(candidates[best.layer, list(positions).index(best.position)].float(), layer=best.layer,
                            coeff=coeff, position=best.position, model_name=model_name(model), source=source)
    return vector, table
