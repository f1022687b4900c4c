"""The refusal direction: difference-of-means candidates and the choice of one (docs/METHOD.md section 1).

    vector, table = select_direction(model, tokenizer, harmful_train, harmless_train, harmful_val, harmless_val)

Shapes: N prompts, L decoder layers, P post-instruction positions, H hidden size, V vocabulary.
Every prompt is rendered with the model's chat template (no system prompt) and batched with LEFT
padding, so the post-instruction positions are the last P columns of every row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from openrlhf_safesteer.chat import (
    batches,
    encode_shared_prefix,
    forward_after_prefix,
    prefill_shared_prefix,
    render_prompts,
)
from openrlhf_safesteer.files import json_sha256
from openrlhf_safesteer.models import (
    decoder_layers,
    model_device,
    model_name,
    num_layers,
)
from openrlhf_safesteer.steering import SteeringVector, ablate, finite_coeff, steer
from openrlhf_safesteer.templates import post_instruction_positions

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

# Words instruction-tuned models open refusals with; their first tokens form the refusal set R.
REFUSAL_OPENERS: tuple[str, ...] = ("I", "Sorry", "As")


class DirectionSelectionError(RuntimeError):
    """No candidate direction passed the selection filters."""


def prompts_sha256(prompts: Sequence[str]) -> str:
    """Provenance hash of a prompt list (order matters)."""
    return json_sha256(list(prompts), ensure_ascii=False)


def _check_prompts(name: str, prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of prompt strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name} is empty; need at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{name} has empty or non-string prompts at indices {bad[:10]}")


def refusal_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str] = REFUSAL_OPENERS) -> list[int]:
    """First token id of each refusal opener as it starts an assistant reply (deduplicated, sorted)."""
    ids = set()
    for word in words:
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if encoded:
            ids.add(int(encoded[0]))
    if not ids:
        raise ValueError(f"none of the refusal openers {list(words)} tokenise to anything")
    return sorted(ids)


def _forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, shared: int = 0,
                    past=None) -> Tensor:
    """Logits (B, 1, V) at the last position only: every caller reads the next-token distribution
    (or only the layer inputs, through hooks), and projecting all T positions onto a 150k vocabulary
    cost more than the decoder layers of a 0.5B model.

    input_ids, attention_mask (B, T) as laid out by `chat.encode_shared_prefix`; `past` is the KV cache
    of the first `shared` columns (`chat.prefill_shared_prefix`), so only columns [shared, T) are encoded.
    """
    return forward_after_prefix(model, input_ids, attention_mask, shared, past, logits_to_keep=1).logits


@torch.no_grad()
def last_token_logprobs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int = 16
) -> Tensor:
    """Next-token log-probs (N, V), float32, at the last position of each rendered prompt."""
    texts = render_prompts(tokenizer, prompts)
    device = model_device(model)
    out = []
    for chunk in batches(texts, batch_size):
        input_ids, attention_mask, shared = encode_shared_prefix(tokenizer, chunk, device)
        past = prefill_shared_prefix(model, input_ids, shared)
        logits = _forward_logits(model, input_ids, attention_mask, shared, past)[:, -1, :]
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def refusal_scores_from_logprobs(logprobs: Tensor, refusal_ids: Sequence[int]) -> Tensor:
    """log p(R) - log(1 - p(R)) per row of next-token log-probs (N, V) -> (N,)."""
    log_p = torch.logsumexp(logprobs[:, list(refusal_ids)].double(), dim=-1)
    # log(1 - p) computed stably; clamp keeps p(R) = 1 finite.
    log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-12))
    return (log_p - log_not_p).float()


def refusal_score(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    refusal_ids: Sequence[int] | None = None, batch_size: int = 16,
) -> Tensor:
    """Refusal score (N,) of each prompt: logit of the next-token probability of the refusal openers.

    Positive means the model is more likely than not to open with a refusal token. Hooks active on
    the model (steer/ablate) apply.
    """
    _check_prompts("prompts", prompts)
    refusal_ids = refusal_token_ids(tokenizer) if refusal_ids is None else list(refusal_ids)
    return refusal_scores_from_logprobs(last_token_logprobs(model, tokenizer, prompts, batch_size), refusal_ids)


@torch.no_grad()
def mean_activations(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    positions: Sequence[int], batch_size: int = 16, progress: bool = False, desc: str = "activations",
) -> Tensor:
    """Mean residual stream entering every decoder layer at the given negative positions.

    Returns (L, P, H) float64 (accumulated in float64: differences of means of large activations
    lose digits in bf16/fp32).
    """
    _check_prompts("prompts", prompts)
    if not positions or any(p >= 0 for p in positions):
        raise ValueError(f"positions must be a non-empty list of negative offsets, got {list(positions)}")
    layers = decoder_layers(model)
    index = list(positions)
    total: list[Tensor | None] = [None] * len(layers)

    collecting = [True]   # off while the chunk's shared chat header is encoded: it is no prompt's last tokens

    def make_hook(i: int):
        def hook(module, args, kwargs):
            if not collecting[0]:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            batch_sum = hidden[:, index, :].double().sum(dim=0).cpu()  # (P, H)
            total[i] = batch_sum if total[i] is None else total[i] + batch_sum
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    texts = render_prompts(tokenizer, prompts)
    device = model_device(model)
    try:
        for chunk in tqdm(list(batches(texts, batch_size)), desc=desc, disable=not progress):
            input_ids, attention_mask, shared = encode_shared_prefix(tokenizer, chunk, device, keep=len(index))
            if input_ids.shape[1] < len(index):
                raise ValueError("a rendered prompt is shorter than the post-instruction template")
            collecting[0] = False
            past = prefill_shared_prefix(model, input_ids, shared)
            collecting[0] = True
            _forward_logits(model, input_ids, attention_mask, shared, past)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(total) / len(prompts)


def candidate_directions(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, harmful: Sequence[str], harmless: Sequence[str],
    positions: Sequence[int] | None = None, batch_size: int = 16, progress: bool = False,
) -> Tensor:
    """Difference of means d[l, i] = mean_harmful - mean_harmless of the input of layer l at
    post-instruction position i. Returns (L, P, H) float64; positions default to the template's."""
    _check_prompts("harmful", harmful)
    _check_prompts("harmless", harmless)
    positions = post_instruction_positions(tokenizer) if positions is None else list(positions)
    mean_harmful = mean_activations(model, tokenizer, harmful, positions, batch_size, progress, "harmful activations")
    mean_harmless = mean_activations(model, tokenizer, harmless, positions, batch_size, progress, "harmless activations")
    return mean_harmful - mean_harmless


def _kl(reference: Tensor, other: Tensor) -> Tensor:
    """Mean over rows of KL(reference || other) for log-prob rows (N, V)."""
    return (reference.exp() * (reference - other)).sum(-1).mean()


@dataclass
class CandidateScore:
    """Selection scores of the candidate d[layer, position] (one row of the table)."""

    layer: int
    position: int
    norm: float
    ablation_refusal: float | None = None   # mean refusal score on harmful val under ablation (lower is better)
    steering_refusal: float | None = None   # mean refusal score on harmless val with + d at `layer` (must be > 0)
    ablation_kl: float | None = None        # mean KL(base || ablated) next-token on harmless val (must be <= kl_threshold)
    rejected: str = ""                      # why the candidate was dropped ("" if it passed)

    def to_dict(self) -> dict:
        return asdict(self)


def rejection_reason(row: CandidateScore, kl_threshold: float) -> str:
    """Why docs/METHOD.md's rules drop a scored candidate ("" if it passes). Written as `not (x <= limit)` /
    `not (x > 0)` so that a NaN score drops the candidate instead of slipping past every comparison."""
    if not (math.isfinite(row.ablation_kl) and row.ablation_kl <= kl_threshold):
        return f"ablation KL {row.ablation_kl:.3g} > {kl_threshold}"
    if not row.steering_refusal > 0:
        return f"steering refusal score {row.steering_refusal:.3g} <= 0"
    return ""


def _check_selection(prompt_sets: dict[str, Sequence[str]], max_layer_fraction: float, kl_threshold: float,
                     coeff: float) -> float:
    """ValueError for an empty prompt set or an out-of-range setting; returns coeff as a finite float."""
    for name, prompts in prompt_sets.items():
        _check_prompts(name, prompts)
    if not 0 < max_layer_fraction <= 1:
        raise ValueError(f"max_layer_fraction must be in (0, 1], got {max_layer_fraction}")
    if not kl_threshold > 0:
        raise ValueError(f"kl_threshold must be > 0, got {kl_threshold}")
    return finite_coeff(coeff)     # here, not at the first candidate: that comes after every forward pass


def _search_grid(model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_layer_fraction: float,
                 layers: Sequence[int] | None, positions: Sequence[int] | None,
                 ) -> tuple[int, int, list[int], list[int] | None]:
    """(depth, the first layer too deep to choose, the post-instruction positions to score, the sorted layers to
    score or None for all); ValueError for a fraction that leaves no layer, or a layer / position outside
    the model and its template."""
    depth = num_layers(model)
    max_layer = int(depth * max_layer_fraction)
    if max_layer < 1:
        raise ValueError(f"max_layer_fraction={max_layer_fraction} leaves no layer of {depth} to choose from")
    template_positions = post_instruction_positions(tokenizer)
    if positions is None:
        positions = template_positions
    else:
        positions = [int(p) for p in positions]
        unknown = [p for p in positions if p not in template_positions]
        if not positions or unknown:
            raise ValueError(f"positions {unknown or positions} are not post-instruction template positions "
                             f"{template_positions}")
    if layers is not None:
        layers = sorted({int(x) for x in layers})
        if not layers or layers[0] < 0 or layers[-1] >= depth:
            raise ValueError(f"layers {layers} must be a non-empty subset of 0..{depth - 1}")
    return depth, max_layer, positions, layers


def _score_candidate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, row: CandidateScore, vector: Tensor,
                     harmful_val: Sequence[str], harmless_val: Sequence[str], base_harmless: Tensor,
                     refusal_ids: list[int], coeff: float, batch_size: int) -> None:
    """Fill row's scores: the harmful refusal score and the harmless KL under ablation of `vector`, and the
    harmless refusal score with coeff * vector added at row.layer."""
    with ablate(model, vector):
        ablated = last_token_logprobs(model, tokenizer, list(harmful_val) + list(harmless_val), batch_size)
    row.ablation_refusal = refusal_scores_from_logprobs(ablated[: len(harmful_val)], refusal_ids).mean().item()
    row.ablation_kl = _kl(base_harmless, ablated[len(harmful_val):]).item()
    sv = SteeringVector(vector, layer=row.layer, coeff=coeff, hidden_size=vector.numel())
    with steer(model, sv):
        row.steering_refusal = refusal_score(model, tokenizer, harmless_val, refusal_ids, batch_size).mean().item()


def _pick(table: list[CandidateScore], fallback: bool, baseline: dict[str, float]) -> tuple[CandidateScore, bool]:
    """(the selected row, whether it is the fallback): the passing row of lowest ablation refusal, or with
    `fallback` and none passing, the scored row of highest steering refusal; DirectionSelectionError when
    nothing can be selected."""
    passed = [row for row in table if not row.rejected]
    steered = [row for row in table if row.steering_refusal is not None and math.isfinite(row.steering_refusal)]
    used_fallback = not passed and fallback and bool(steered)
    if not passed and not used_fallback:
        scored = sorted((r for r in table if r.ablation_refusal is not None), key=lambda r: r.ablation_refusal)
        lines = "\n".join(f"  layer {r.layer} pos {r.position}: {r.rejected}" for r in scored[:5])
        raise DirectionSelectionError(
            f"all {len(table)} candidate directions were rejected; the five with the lowest ablation refusal "
            f"score:\n{lines}\nLoosen --kl-threshold or --max-layer-fraction, or check that the model refuses "
            "the harmful prompts (baseline harmful refusal score "
            f"{baseline['harmful_val_refusal']:.3f}, harmless {baseline['harmless_val_refusal']:.3f})"
        )
    if used_fallback:
        best = max(steered, key=lambda r: (r.steering_refusal, -r.layer, -r.position))
        logger.warning("every candidate failed docs/METHOD.md's rules (%s); falling back to layer %d position %d, the "
                       "strongest steering refusal score (%.2f)",
                       "; ".join(f"layer {r.layer} pos {r.position}: {r.rejected}" for r in table),
                       best.layer, best.position, best.steering_refusal)
    else:
        best = min(passed, key=lambda r: (r.ablation_refusal, r.layer, r.position))
    return best, used_fallback


def select_direction(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    refusal_words: Sequence[str] = REFUSAL_OPENERS,
    filter_train: bool = True,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    coeff: float = 1.0,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    fallback: bool = False,
) -> tuple[SteeringVector, list[CandidateScore]]:
    """Compute every candidate direction and select one (docs/METHOD.md section 1).

    Candidates in layers >= int(L * max_layer_fraction) are dropped; so are those whose ablation
    moves the harmless next-token distribution by KL > kl_threshold and those whose activation
    addition (coefficient `coeff`) leaves the harmless refusal score <= 0. Among the rest the
    lowest mean harmful refusal score under ablation wins. Returns the SteeringVector and the table
    of all candidates' scores; raises DirectionSelectionError when every candidate is rejected.

    layers / positions restrict the grid (a reduced search on big models): layers to score (still
    subject to max_layer_fraction) and negative post-instruction positions (default: all of them).
    fallback: when every candidate is rejected, take the scored one whose addition raises the harmless
    refusal score most (logged, and recorded as source["fallback"]) instead of raising. SafeSteer needs
    above all a teacher that refuses; the demo uses this on its reduced grid.
    """
    coeff = _check_selection({"harmful_train": harmful_train, "harmless_train": harmless_train,
                              "harmful_val": harmful_val, "harmless_val": harmless_val},
                             max_layer_fraction, kl_threshold, coeff)
    depth, max_layer, positions, layers = _search_grid(model, tokenizer, max_layer_fraction, layers, positions)
    refusal_ids = refusal_token_ids(tokenizer, refusal_words)

    if filter_train:
        harmful_train, harmless_train = _filter_train(model, tokenizer, harmful_train, harmless_train, refusal_ids,
                                                      batch_size)
    candidates = candidate_directions(model, tokenizer, harmful_train, harmless_train, positions, batch_size, progress)

    base_harmless = last_token_logprobs(model, tokenizer, harmless_val, batch_size)
    baseline = {"harmful_val_refusal": refusal_score(model, tokenizer, harmful_val, refusal_ids,
                                                     batch_size).mean().item(),
                "harmless_val_refusal": refusal_scores_from_logprobs(base_harmless, refusal_ids).mean().item()}
    logger.info("baseline refusal score: harmful val %.3f, harmless val %.3f", baseline["harmful_val_refusal"],
                baseline["harmless_val_refusal"])

    table: list[CandidateScore] = []
    grid = [(layer, p) for layer in (range(depth) if layers is None else layers) for p in range(len(positions))]
    for layer, p in tqdm(grid, desc="score candidates", disable=not progress):
        vector = candidates[layer, p].float()
        row = CandidateScore(layer=layer, position=positions[p], norm=float(vector.norm()))
        table.append(row)
        if layer >= max_layer:
            row.rejected = f"layer >= {max_layer} (last {1 - max_layer_fraction:.0%} of the stack)"
        elif not torch.isfinite(vector).all() or row.norm == 0:
            row.rejected = "zero or non-finite direction"
        else:
            _score_candidate(model, tokenizer, row, vector, harmful_val, harmless_val, base_harmless, refusal_ids,
                             coeff, batch_size)
            row.rejected = rejection_reason(row, kl_threshold)

    best, used_fallback = _pick(table, fallback, baseline)
    logger.info("selected layer %d position %d: ablation refusal %.3f, steering refusal %.3f, ablation KL %.4f",
                best.layer, best.position, best.ablation_refusal, best.steering_refusal, best.ablation_kl)
    source = {
        "method": "difference of means (docs/METHOD.md section 1)",
        "harmful_train_sha256": prompts_sha256(harmful_train),
        "harmless_train_sha256": prompts_sha256(harmless_train),
        "harmful_val_sha256": prompts_sha256(harmful_val),
        "harmless_val_sha256": prompts_sha256(harmless_val),
        "n_harmful_train": len(harmful_train),
        "n_harmless_train": len(harmless_train),
        "n_harmful_val": len(harmful_val),
        "n_harmless_val": len(harmless_val),
        "refusal_ids": refusal_ids,
        "refusal_tokens": tokenizer.convert_ids_to_tokens(refusal_ids),
        "positions": positions,
        "baseline": baseline,
        "selected": best.to_dict(),
        "fallback": used_fallback,
        "config": {"filter_train": filter_train, "max_layer_fraction": max_layer_fraction,
                   "kl_threshold": kl_threshold, "coeff": coeff, "refusal_words": list(refusal_words),
                   "layers": layers, "positions": positions},
    }
    vector = SteeringVector(candidates[best.layer, positions.index(best.position)].float(), layer=best.layer,
                            coeff=coeff, position=best.position, model_name=model_name(model), source=source)
    return vector, table


def _filter_train(model, tokenizer, harmful, harmless, refusal_ids, batch_size):
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it answers (score < 0)."""
    harmful_scores = refusal_score(model, tokenizer, harmful, refusal_ids, batch_size)
    harmless_scores = refusal_score(model, tokenizer, harmless, refusal_ids, batch_size)
    kept_harmful = [p for p, s in zip(harmful, harmful_scores.tolist()) if s > 0]
    kept_harmless = [p for p, s in zip(harmless, harmless_scores.tolist()) if s < 0]
    logger.info("refusal-score filter kept %d/%d harmful and %d/%d harmless training prompts",
                len(kept_harmful), len(harmful), len(kept_harmless), len(harmless))
    if len(kept_harmful) < 2 or len(kept_harmless) < 2:
        logger.warning("the refusal-score filter left fewer than 2 prompts on a side; using the unfiltered sets")
        return list(harmful), list(harmless)
    return kept_harmful, kept_harmless
