"""On-policy rollouts for the local engine with vLLM (GPU): the same `Rollouts` as HF generate, faster.

    sampler = VLLMRollout(student, base_model_dir, lora_rank=cfg.lora_r)
    rollouts = sampler.sample(prompts, M, max_new_tokens, temperature, top_p, seed, tokenizer, step)

vLLM holds its own copy of the frozen base weights; the student's LoRA adapter, which is all that
training changes, is saved into a fresh per-step folder and passed as a `LoRARequest` with a new id,
so every step samples from the current student (vLLM caches adapters by id, so an id is never
reused for different weights). Full fine-tuning would need the whole state dict pushed into the
engine through vLLM internals that change between versions, so it is refused: use LoRA or the HF
backend.

The prompts are rendered and tokenised by this project's own helpers (`render_prompts`,
`encode_left_padded`) and sent as token ids, so the student, the teacher and vLLM see exactly
the same prompt tokens; completions come back as token ids and are laid out by `build_rollouts`,
exactly as `sample_rollouts` lays out HF generate's output.

This module imports without vLLM; `vllm` is imported when a `VLLMRollout` is built.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from openrlhf_safesteer.chat import encode_left_padded, end_of_turn_ids, render_prompts

from .rollout import Rollouts, build_rollouts

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

# vLLM accepts only these values for max_lora_rank (its LoRAConfig validates them); an adapter of
# rank r runs under any max_lora_rank >= r, so the engine uses the smallest allowed value >= r.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(lora_r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a rank-`lora_r` adapter."""
    for rank in VLLM_MAX_LORA_RANKS:
        if rank >= lora_r:
            return rank
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]}, got lora_r={lora_r}; "
                     "use --rollout-backend hf")


def request_seed(seed: int, row: int) -> int:
    """Seed of the vLLM request for prompt `row` of a step whose rollout seed is `seed`.

    A pure function of (seed, row), so a resumed run draws the same rollouts. vLLM derives the seeds
    of a request's n samples from it (seed + sample index in current versions), hence the odd
    multipliers that keep nearby (seed, row) pairs far apart; kept below 2**31 for every backend.
    """
    return (seed * 6_364_136_223_846_793_005 + (row + 1) * 1_442_695_040_888_963_407) % (2 ** 31 - 1)


def pad_completions(token_lists: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Right-pad completion token lists into a (B, C) long tensor, C = the longest completion (0 if all empty)."""
    width = max((len(ids) for ids in token_lists), default=0)
    out = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        if len(ids):
            out[row, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return out


def completion_token_ids(output, stop_ids: Sequence[int]) -> list[int]:
    """The token ids of one vLLM CompletionOutput, ending with its stop token when it stopped on one.

    HF generate keeps the end-of-turn token in the sequence and the completion mask counts it;
    vLLM keeps stop_token_ids in token_ids too, but re-append it if a version drops it.
    """
    ids = [int(t) for t in output.token_ids]
    reason = getattr(output, "stop_reason", None)
    if (getattr(output, "finish_reason", None) == "stop" and isinstance(reason, int) and reason in stop_ids
            and (not ids or ids[-1] != reason)):
        ids.append(reason)
    return ids


def _mask_past_end(rollouts: Rollouts, lengths: Tensor) -> Rollouts:
    """Zero the masks on padding after a completion that ended without a stop token (B,) lengths.

    build_rollouts masks only after a stop token; HF generate never ends a row early without one,
    but vLLM can (e.g. at its max_model_len), and that row's padding must not count.
    """
    columns = torch.arange(rollouts.completion_len, device=lengths.device)
    past_end = columns[None, :] >= lengths[:, None]                          # (B, C)
    p = rollouts.prompt_len
    rollouts.attention_mask[:, p:][past_end] = 0
    rollouts.loss_mask[:, p - 1:][past_end] = 0
    return rollouts


class VLLMRollout:
    """A vLLM engine over the student's frozen base, sampling with the student's current LoRA adapter.

    student: the PEFT-wrapped model being trained (its adapter is saved each step).
    model_path: the base model's HF directory (or hub id) the student was loaded from.
    dtype: vLLM's compute dtype; bf16 because vLLM's LoRA kernels do not run in float32.
    gpu_memory_utilization: share of the GPU vLLM takes (weights + KV cache); the trainer needs the rest.
    """

    def __init__(self, student: nn.Module, model_path: str, lora_rank: int, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16", seed: int = 0, max_model_len: int | None = None,
                 workdir: str | None = None) -> None:
        if lora_rank <= 0:
            raise ValueError("vLLM rollouts need LoRA (lora_r > 0): with full fine-tuning the engine's weights "
                             "cannot be updated each step without version-specific vLLM internals; "
                             "use --lora-r > 0 or --rollout-backend hf")
        if not model_path:
            raise ValueError("vLLM rollouts need the student's base model directory (HF format)")
        if not hasattr(student, "save_pretrained") or not hasattr(student, "peft_config"):
            raise ValueError("vLLM rollouts need the PEFT (LoRA) student, to save its adapter each step")
        from vllm import LLM

        self.student = student
        self.model_path = str(model_path)
        kwargs = {"model": self.model_path, "enable_lora": True, "max_lora_rank": vllm_max_lora_rank(lora_rank),
                  "max_loras": 1, "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype,
                  "enforce_eager": True, "seed": seed}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="safesteer-vllm-lora-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._previous: Path | None = None
        logger.info("vLLM rollout engine on %s (dtype %s, max_lora_rank %d, gpu_memory_utilization %.2f)",
                    self.model_path, dtype, kwargs["max_lora_rank"], gpu_memory_utilization)

    def sync_adapter(self, step: int):
        """Save the student's adapter for `step` and return the LoRARequest that samples with it.

        lora_int_id = step + 1: vLLM needs ids > 0 and caches adapters by id, so each weight version
        gets its own id; the previous step's folder is deleted (vLLM loaded it when it was used).
        """
        from vllm.lora.request import LoRARequest

        folder = self.workdir / f"step{step}"
        if folder.exists():
            shutil.rmtree(folder)
        self.student.save_pretrained(str(folder))
        if self._previous is not None and self._previous != folder:
            shutil.rmtree(self._previous, ignore_errors=True)
        self._previous = folder
        return LoRARequest(f"step{step}", step + 1, str(folder))

    @torch.no_grad()
    def sample(self, prompts: list[str], samples_per_prompt: int, max_new_tokens: int, temperature: float,
               top_p: float, seed: int, tokenizer, step: int, system_prompt: str | None = None) -> Rollouts:
        """Sample `samples_per_prompt` completions of each prompt from the current student.

        Returns the Rollouts sample_rollouts would build: rows prompt-major (prompt i's samples at
        rows i*M .. i*M+M-1), input_ids (B, P + C) on the student's device.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        texts = render_prompts(tokenizer, prompts, system_prompt)
        device = next(self.student.parameters()).device
        prompt_ids, prompt_mask = encode_left_padded(tokenizer, texts, "cpu")       # (N, P)
        stop_ids = end_of_turn_ids(tokenizer)
        requests = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                    for ids, mask in zip(prompt_ids, prompt_mask)]
        # ignore_eos: stop on exactly stop_ids, like HF generate(eos_token_id=stop_ids); otherwise
        # vLLM would also stop on the eos ids of the model's generation_config.
        params = [SamplingParams(n=samples_per_prompt, temperature=temperature, top_p=top_p,
                                 max_tokens=max_new_tokens, seed=request_seed(seed, row), stop_token_ids=stop_ids,
                                 ignore_eos=True, skip_special_tokens=True)
                  for row in range(len(requests))]
        lora = self.sync_adapter(step)
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=lora)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        token_lists = []
        for request_output in outputs:
            samples = sorted(request_output.outputs, key=lambda o: getattr(o, "index", 0))
            if len(samples) != samples_per_prompt:
                raise RuntimeError(f"vLLM returned {len(samples)} samples, expected {samples_per_prompt}")
            token_lists.extend(completion_token_ids(o, stop_ids) for o in samples)
        completion_ids = pad_completions(token_lists, tokenizer.pad_token_id)      # (B, C)
        if completion_ids.shape[1] == 0:
            raise RuntimeError("vLLM returned no new tokens")
        lengths = torch.tensor([len(ids) for ids in token_lists], dtype=torch.long)
        prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
        repeated = [p for p in prompts for _ in range(samples_per_prompt)]
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rollouts = build_rollouts(prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                                  stop_ids, repeated, completions)
        return _mask_past_end(rollouts, lengths.to(device))

    def close(self) -> None:
        """Delete the adapter folders (when this object made them) and drop the engine."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.llm = None
