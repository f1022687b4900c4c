"""SafeSteer's objectives: the localized reverse KL on the safety tokens S, its sampled-token
advantage, the paper's ablations, and the metrics to watch.

Shapes: B sequences, T positions, V vocabulary, K = |S| safety tokens. Position t of every
(B, T, ...) tensor predicts token t + 1; `mask` (B, T) is 1 where that predicted token is a
completion token the loss should see. The teacher never contributes a (B, T, V) tensor: it arrives
already gathered on S, (B, T, K).

Reduction everywhere: mean over the valid tokens of each sequence, then mean over the sequences that
have at least one valid token (docs/METHOD.md section 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def check_safety_ids(safety_ids: Tensor, vocab_size: int) -> None:
    """Raise a clear error unless safety_ids is a non-empty 1-D integer tensor of ids in [0, vocab_size)."""
    if safety_ids.dim() != 1 or safety_ids.numel() == 0:
        raise ValueError(f"safety_ids must be a non-empty 1-D tensor, got shape {tuple(safety_ids.shape)}")
    if safety_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"safety_ids must be an integer tensor (torch.long), got {safety_ids.dtype}")
    low, high = int(safety_ids.min()), int(safety_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"safety_ids must lie in [0, {vocab_size}) (the vocabulary), got ids in [{low}, {high}]")


def _check_bt(name: str, tensor: Tensor, batch_shape: torch.Size) -> None:
    if tensor.shape[:2] != batch_shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected leading (B, T) = {tuple(batch_shape)}")


def upcast(tensor: Tensor) -> Tensor:
    """bf16/fp16 -> fp32 for log-softmax and KL arithmetic; fp32/fp64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Token mean within each sequence, then mean over sequences with >= 1 valid token.

    values, mask: (B, T). Returns a scalar; 0 (with a gradient path) when no token is valid.
    """
    mask = mask.to(values.dtype)
    tokens = mask.sum(dim=1)
    per_sequence = (values * mask).sum(dim=1) / tokens.clamp(min=1.0)
    has_tokens = (tokens > 0).to(values.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


# Positions per logsumexp chunk in `log_normaliser`: OpenRLHF's own bound (models/utils.py, _logsumexp_by_chunk).
NORMALISER_CHUNK_ROWS = 1024


def log_normaliser(logits: Tensor, temperature: float = 1.0, chunk_rows: int = NORMALISER_CHUNK_ROWS) -> Tensor:
    """logsumexp over the vocabulary of logits / temperature: (..., V) -> (..., 1), float32 or wider.

    Computed `chunk_rows` positions at a time, like OpenRLHF's chunked logsumexp, so the upcast and
    scaled temporaries are (chunk_rows, V) instead of a second full (B, T, V) tensor. Pass the result to
    `gather_logprobs(..., log_normaliser=...)` for every id set read from the same logits: one pass over V.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    rows = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(rows.shape[0], dtype=upcast(logits[..., :0]).dtype, device=logits.device)
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = upcast(rows[start:start + chunk_rows])
        if temperature != 1.0:
            chunk = chunk / temperature
        out[start:start + chunk_rows] = torch.logsumexp(chunk, dim=-1)
    return out.reshape(*logits.shape[:-1], 1)


def gather_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0,
                    log_normaliser: Tensor | None = None) -> Tensor:
    """Full-vocabulary log-softmax of logits / temperature, read only at `ids`.

    logits (B, T, V); ids (K,) -> (B, T, K), or ids (B, T) -> (B, T). Computed as
    logit - logsumexp(logit) so no (B, T, V) log-prob tensor is kept for backward beyond the logits.
    Not renormalised over the ids (docs/METHOD.md: "do NOT renormalise over S").
    log_normaliser (B, T, 1): logsumexp of the scaled logits when the caller already has it
    (reading two id sets from one tensor needs one pass over V, not two).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = upcast(logits)
    if temperature != 1.0:
        scaled = scaled / temperature
    if log_normaliser is None:
        log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (B, T, 1)
    if ids.dim() == 1:
        check_safety_ids(ids, logits.shape[-1])
        return scaled.index_select(-1, ids.to(logits.device)) - log_normaliser
    if ids.shape != logits.shape[:-1]:
        raise ValueError(f"token ids {tuple(ids.shape)} must be (K,) or match logits' (B, T) {tuple(logits.shape[:-1])}")
    return scaled.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - log_normaliser.squeeze(-1)


def _check_subset_shapes(student_logits: Tensor, teacher_logprobs_on_s: Tensor, safety_ids: Tensor,
                         mask: Tensor) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (B, T, V), got shape {tuple(student_logits.shape)}")
    check_safety_ids(safety_ids, student_logits.shape[-1])
    batch_shape = student_logits.shape[:2]
    _check_bt("mask", mask, batch_shape)
    expected = (*batch_shape, safety_ids.numel())
    if tuple(teacher_logprobs_on_s.shape) != expected:
        raise ValueError(
            f"teacher_logprobs_on_S has shape {tuple(teacher_logprobs_on_s.shape)}, expected (B, T, |S|) = {expected}"
        )


def _subset_inputs(student_logits: Tensor, teacher_logprobs_on_s: Tensor, safety_ids: Tensor, mask: Tensor,
                   temperature: float) -> tuple[Tensor, Tensor]:
    _check_subset_shapes(student_logits, teacher_logprobs_on_s, safety_ids, mask)
    student_on_s = gather_logprobs(student_logits, safety_ids, temperature)  # (B, T, K)
    return student_on_s, teacher_logprobs_on_s.to(student_on_s.dtype).detach()


# Elements of (., V) processed at a time by the fused loss. On CPU: small enough that a chunk's
# temporaries stay in cache, large enough that the per-chunk Python overhead is negligible. On an
# accelerator, cache blocking buys nothing and every chunk costs kernel launches, so chunks only bound
# the temporaries' memory (2^27 fp32 elements = 512 MiB): one chunk per sequence for 8B-70B vocabularies.
_CHUNK_ELEMENTS = 1 << 19
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 27


def _row_chunks(batch: int, length: int, vocab: int, device: torch.device):
    """(b, slice of positions) pieces of a (B, T, V) tensor; each piece z[b, sl] is contiguous in the last dim."""
    budget = _CHUNK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
    step = max(1, budget // vocab)
    for b in range(batch):
        for start in range(0, length, step):
            yield b, slice(start, min(start + step, length))


class _LocalizedReverseKL(torch.autograd.Function):
    """Per-token L_t = sum_{v in S} p_v (log p_v - log t_v) with an analytic backward.

    With a_j = log p_j - log t_j + 1 and c = sum_{v in S} p_v a_v, dL_t/dz_j = (1/tau) p_j ([j in S] a_j - c).
    Autograd would keep the logsumexp temporaries and build three (B, T, V) tensors in backward
    (softmax, the index_select scatter, their sum); here the forward keeps only the (B, T) normaliser
    and the backward writes the gradient in one (B, T, V) tensor, chunk by chunk, in cache.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, teacher_on_s: Tensor, safety_ids: Tensor, temperature: float) -> Tensor:
        batch, length, vocab = logits.shape
        dtype = upcast(logits[:0]).dtype
        log_normaliser = torch.empty(batch, length, dtype=dtype, device=logits.device)  # (B, T)
        for b, rows in _row_chunks(batch, length, vocab, logits.device):
            chunk = upcast(logits[b, rows])
            if temperature != 1.0:
                chunk = chunk / temperature
            log_normaliser[b, rows] = torch.logsumexp(chunk, dim=-1)
        on_s = upcast(logits.index_select(-1, safety_ids))                           # (B, T, K)
        if temperature != 1.0:
            on_s = on_s / temperature
        student_on_s = on_s - log_normaliser.unsqueeze(-1)
        per_token = (student_on_s.exp() * (student_on_s - teacher_on_s)).sum(-1)     # (B, T)
        ctx.save_for_backward(logits, log_normaliser, student_on_s, teacher_on_s, safety_ids)
        ctx.temperature = temperature
        return per_token

    @staticmethod
    def backward(ctx, grad_per_token: Tensor):
        logits, log_normaliser, student_on_s, teacher_on_s, safety_ids = ctx.saved_tensors
        temperature = ctx.temperature
        batch, length, vocab = logits.shape
        p_s = student_on_s.exp()
        weight = grad_per_token.to(p_s.dtype) / temperature                           # (B, T)
        a = student_on_s - teacher_on_s + 1.0                                          # (B, T, K)
        minus_c = -(weight * (p_s * a).sum(-1))                                        # (B, T)
        on_s = weight.unsqueeze(-1) * p_s * a                                          # (B, T, K)
        grad = torch.empty(batch, length, vocab, dtype=logits.dtype, device=logits.device)
        for b, rows in _row_chunks(batch, length, vocab, logits.device):
            chunk = upcast(logits[b, rows])
            if temperature != 1.0:
                chunk = chunk / temperature
            target = grad[b, rows]                                                     # contiguous view
            p = target if target.dtype == chunk.dtype else None
            p = torch.sub(chunk, log_normaliser[b, rows].unsqueeze(-1), out=p).exp_()  # p_j, (rows, V)
            p.mul_(minus_c[b, rows].unsqueeze(-1)).index_add_(-1, safety_ids, on_s[b, rows])
            if p is not target:
                target.copy_(p)
        return grad, None, None, None


def localized_reverse_kl(
    student_logits: Tensor, teacher_logprobs_on_s: Tensor, safety_ids: Tensor, mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """SafeSteer's loss: L_t = sum_{v in S} p_s(v) (log p_s(v) - log p_t(v)), probabilities un-renormalised.

    student_logits (B, T, V) with grad; teacher_logprobs_on_s (B, T, K) full-vocabulary teacher
    log-probs gathered on S; safety_ids (K,) long; mask (B, T).
    Returns (loss scalar, per-token L_t (B, T), zero where mask is 0).

    Computed by a fused autograd Function (analytic gradient, no (B, T, V) temporaries kept between
    forward and backward); tests/bench/test_bench_fused_loss.py checks it against plain autograd.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_subset_shapes(student_logits, teacher_logprobs_on_s, safety_ids, mask)
    dtype = upcast(student_logits[:0]).dtype
    per_token = _LocalizedReverseKL.apply(student_logits, teacher_logprobs_on_s.detach().to(dtype),
                                          safety_ids.to(student_logits.device), float(temperature))
    per_token = per_token * mask.to(per_token.dtype)
    return sequence_mean(per_token, mask), per_token


def localized_reverse_kl_autograd(
    student_logits: Tensor, teacher_logprobs_on_s: Tensor, safety_ids: Tensor, mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """localized_reverse_kl written with plain autograd ops: the reference the fused version is tested against."""
    student_on_s, teacher_on_s = _subset_inputs(student_logits, teacher_logprobs_on_s, safety_ids, mask, temperature)
    per_token = (student_on_s.exp() * (student_on_s - teacher_on_s)).sum(-1)
    per_token = per_token * mask.to(per_token.dtype)
    return sequence_mean(per_token, mask), per_token


def localized_forward_kl(
    student_logits: Tensor, teacher_logprobs_on_s: Tensor, safety_ids: Tensor, mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Ablation: forward KL on S, sum_{v in S} p_t(v) (log p_t(v) - log p_s(v)). Same shapes as localized_reverse_kl."""
    student_on_s, teacher_on_s = _subset_inputs(student_logits, teacher_logprobs_on_s, safety_ids, mask, temperature)
    per_token = (teacher_on_s.exp() * (teacher_on_s - student_on_s)).sum(-1)
    per_token = per_token * mask.to(per_token.dtype)
    return sequence_mean(per_token, mask), per_token


def renormalized_reverse_kl(
    student_logits: Tensor, teacher_logprobs_on_s: Tensor, safety_ids: Tensor, mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Ablation: reverse KL between the student and teacher distributions renormalised over S."""
    student_on_s, teacher_on_s = _subset_inputs(student_logits, teacher_logprobs_on_s, safety_ids, mask, temperature)
    student_on_s = student_on_s - torch.logsumexp(student_on_s, dim=-1, keepdim=True)
    teacher_on_s = teacher_on_s - torch.logsumexp(teacher_on_s, dim=-1, keepdim=True)
    per_token = (student_on_s.exp() * (student_on_s - teacher_on_s)).sum(-1)
    per_token = per_token * mask.to(per_token.dtype)
    return sequence_mean(per_token, mask), per_token


def full_vocab_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Ablation: reverse KL over the whole vocabulary. Needs the teacher's full (B, T, V) logits."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ")
    _check_bt("mask", mask, student_logits.shape[:2])
    student = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    teacher = F.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1)
    per_token = (student.exp() * (student - teacher)).sum(-1) * mask.to(student.dtype)
    return sequence_mean(per_token, mask), per_token


SUBSET_OBJECTIVES = {
    "reverse": localized_reverse_kl,
    "forward": localized_forward_kl,
    "renormalized": renormalized_reverse_kl,
}


def sampled_advantages(
    student_logprobs: Tensor, teacher_logprobs: Tensor, sampled_ids: Tensor, safety_ids: Tensor, mask: Tensor
) -> Tensor:
    """Per-token advantage of the sampled-token form: A_t = -[y_t in S] (log p_s(y_t) - log p_t(y_t) + 1).

    student_logprobs, teacher_logprobs (B, T): log-probs of the sampled tokens; sampled_ids (B, T);
    safety_ids (K,); mask (B, T). Returns (B, T), detached, zero off S and where mask is 0. The +1 is
    the derivative of p log p; without it the policy gradient is biased (tests/test_objectives.py).
    """
    batch_shape = sampled_ids.shape
    for name, tensor in (("student_logprobs", student_logprobs), ("teacher_logprobs", teacher_logprobs), ("mask", mask)):
        if tensor.shape != batch_shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(batch_shape)} like sampled_ids")
    if safety_ids.dim() != 1 or safety_ids.numel() == 0:
        raise ValueError(f"safety_ids must be a non-empty 1-D tensor, got shape {tuple(safety_ids.shape)}")
    in_s = torch.isin(sampled_ids, safety_ids.to(sampled_ids.device))
    weight = (in_s & mask.bool()).to(student_logprobs.dtype)
    return (-(student_logprobs - teacher_logprobs + 1.0) * weight).detach()


@torch.no_grad()
def safety_metrics(student_logprobs_on_s: Tensor, teacher_logprobs_on_s: Tensor, mask: Tensor) -> dict[str, float]:
    """What to watch while training: probability mass on S of student and teacher, and the KL over S.

    Inputs (B, T, K) log-probs gathered on S and mask (B, T); each metric is reduced like the loss.
    An un-renormalised subset reverse KL can push mass off S, so a falling student mass is a warning.
    """
    student, teacher = upcast(student_logprobs_on_s), upcast(teacher_logprobs_on_s)
    student_mass = student.exp().sum(-1)
    teacher_mass = teacher.exp().sum(-1)
    kl = (student.exp() * (student - teacher)).sum(-1)
    return {
        "student_mass_on_S": float(sequence_mean(student_mass, mask)),
        "teacher_mass_on_S": float(sequence_mean(teacher_mass, mask)),
        "kl_on_S": float(sequence_mean(kl, mask)),
    }
