"""OpenRLHF 0.11.2's `aggregate_loss` (openrlhf/models/loss.py) and `get_loss_batch_info` (openrlhf/utils/loss_utils.py),
copied for OpenRLHF 0.10.2, which has neither (versions.loss_functions picks OpenRLHF's own wherever they exist).

Copied unchanged but for the imports and comments; OpenRLHF is Apache-2.0 licensed, as this project.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    # openrlhf.models.utils.masked_mean, which 0.10.2 has; kept here so this module needs no OpenRLHF at all.
    if dim is not None:
        return (tensor * mask).sum(axis=dim) / mask.sum(axis=dim)
    return (tensor * mask).sum() / mask.sum()


def aggregate_loss(
    loss: torch.Tensor,
    loss_mask: torch.Tensor,
    token_level_loss: bool = True,
    dp_size: int = 1,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
) -> torch.Tensor:
    """A per-token loss (B, A) to a scalar: token_level_loss=True, masked sum / global token count; False, the sum
    of per-sequence token means / global sample count (times dp_size, which DeepSpeed's rank averaging undoes)."""
    if token_level_loss:
        if batch_num_tokens is None:
            return _masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size

    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).float()  # exclude fully masked sequences
    if global_batch_size is None:
        return _masked_mean(seq_loss, seq_mask, dim=None)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


def _get_dp_group(strategy):
    if not dist.is_available() or not dist.is_initialized():
        return None
    device_mesh = getattr(strategy, "ds_device_mesh", None)
    return device_mesh["dp"].get_group() if device_mesh is not None else None


def get_loss_batch_info(
    strategy,
    loss_mask: torch.Tensor,
    *,
    replay_buffer=None,
    step: Optional[int] = None,
    dynamic_batch: bool = False,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
):
    """The micro-batch's token and sample counts summed over the data-parallel ranks, and the rank count."""
    dp_group = _get_dp_group(strategy)
    dp_size = dist.get_world_size(group=dp_group) if dist.is_available() and dist.is_initialized() else 1

    if dynamic_batch and replay_buffer is not None and step is not None:
        batch_num_tokens = replay_buffer.dynamic_batch_num_tokens[step]
        global_batch_size = replay_buffer.dynamic_global_batch_size[step]

    if batch_num_tokens is None:
        batch_num_tokens = loss_mask.sum().to(loss_mask.device, dtype=torch.float32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_num_tokens, op=dist.ReduceOp.SUM, group=dp_group)
    else:
        batch_num_tokens = torch.as_tensor(batch_num_tokens, device=loss_mask.device, dtype=torch.float32)

    if global_batch_size is None:
        sample_mask = loss_mask.reshape(loss_mask.shape[0], -1).sum(dim=-1) > 0
        global_batch_size = sample_mask.sum().to(loss_mask.device, dtype=torch.float32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(global_batch_size, op=dist.ReduceOp.SUM, group=dp_group)
    else:
        global_batch_size = torch.as_tensor(global_batch_size, device=loss_mask.device, dtype=torch.float32)

    return {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens, "global_batch_size": global_batch_size}
