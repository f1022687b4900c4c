"""What the OpenRLHF engine writes under --safesteer.dump_dir: a micro-batch's tensors and what produced them.

The policy step writes `policy_step{N}` (its first micro-batch's inputs, teacher log-probs on S and loss) and
the experience maker `experience_batch{N}`; the comparison reads the first policy step back to check the
plugin's loss against the local engine's on the same rollouts. Plain files, no OpenRLHF import.
"""

from __future__ import annotations

import os

import torch

from openrlhf_safesteer.files import atomic_write, atomic_write_json


def save_dump(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write `path`.safetensors (the tensors, on the CPU) and `path`.json (meta, sorted keys), each atomically."""
    from safetensors.torch import save_file

    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    atomic_write(f"{path}.safetensors", lambda tmp: save_file(cpu, tmp))
    atomic_write_json(f"{path}.json", meta, indent=2, sort_keys=True)
