"""An HF-generate rollout engine that answers like OpenRLHF's vLLM engine (`RolloutRayActor`).

OpenRLHF 0.11.2 generates only through vLLM engines, which need a GPU. This Ray actor exposes the
same methods the sample generator and the trainer call (`generate_responses`, `generate`,
`get_num_unfinished_requests`, `sleep`, `wake_up`, `reset_prefix_cache`) and runs OpenRLHF's own
agent executors (`SingleTurnAgentExecutor` or a user's `AgentExecutor`) on top of
`transformers.generate`. It receives the policy's new weights after each step through Ray's
object store (`load_weights`). Use it on CPU machines, in CI, and for small models; vLLM remains
the engine for real runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# No OpenRLHF import at module level: the actor installs the CPU stand-ins (compat.prepare_process) in its
# own process before it imports OpenRLHF's agent executors.
from openrlhf_safesteer.plugin import compat

logger = logging.getLogger(__name__)


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    """The fields of vllm.CompletionOutput that OpenRLHF's executors read."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end-of-turn token) or "length"
    logprobs: Optional[list[dict[int, Logprob]]] = None


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput] = field(default_factory=list)


# A rollout step's requests arrive within milliseconds of each other; one generate call serves them all.
BATCH_WAIT_SECONDS = 0.05
MAX_BATCH = 64


def sampling_key(sampling_params: Any) -> tuple:
    """Requests with equal keys can share one `generate` call (same decoding settings and length limit)."""
    return tuple(getattr(sampling_params, name, None) for name in
                 ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "logprobs", "skip_special_tokens"))


def generation_kwargs(sampling_params: Any, eos_ids: list[int], pad_id: int) -> dict:
    """Translate vLLM SamplingParams into transformers.generate kwargs (same semantics)."""
    temperature = float(getattr(sampling_params, "temperature", 1.0))
    top_k = getattr(sampling_params, "top_k", -1)
    kwargs = dict(
        do_sample=temperature > 0,
        max_new_tokens=int(sampling_params.max_tokens),
        min_new_tokens=int(getattr(sampling_params, "min_tokens", 0) or 0),
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_scores=getattr(sampling_params, "logprobs", None) is not None,
    )
    if temperature > 0:
        # vLLM's top_k=-1 means "off"; transformers' off is 0 (and its generation config may hold 50).
        kwargs.update(temperature=temperature, top_p=float(getattr(sampling_params, "top_p", 1.0)),
                      top_k=int(top_k) if top_k and top_k > 0 else 0)
    return kwargs


class HFRolloutActor:
    """One HF model per actor, generating with transformers; a stand-in for vLLM's engine role."""

    def __init__(self, pretrain: str, seed: int = 0, max_model_len: int = 2048, agent_func_path: str | None = None,
                 remote_rm_url=None, dtype: str | None = None, **unused: Any):
        compat.prepare_process()
        from openrlhf.utils.agent import SingleTurnAgentExecutor
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
            dtype or ("bfloat16" if self.device.type == "cuda" else "float32")]
        self.model = AutoModelForCausalLM.from_pretrained(pretrain, dtype=torch_dtype, trust_remote_code=True,
                                                          attn_implementation="sdpa").to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrain, trust_remote_code=True)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        self.max_model_len = max_model_len
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        torch.manual_seed(seed)
        self.unfinished = 0
        self.pending: list[tuple[list[int], Any, asyncio.Future]] = []
        self.batcher: asyncio.Task | None = None
        self.weight_version = 0
        if agent_func_path:
            from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

            self.executor = _load_agent_executor(agent_func_path)
        else:
            self.executor = SingleTurnAgentExecutor(remote_rm_url)

    # ------------------------------------------------------------------ what vLLM's engine answers
    async def generate(self, prompt_token_ids: list[int], sampling_params, multi_modal_data=None) -> RequestOutput:
        """One request, answered from a batch: OpenRLHF dispatches every prompt of a rollout step at once
        and each executor awaits its own request, so requests that arrive together are generated together
        (left-padded, one `transformers.generate` per group of identical sampling settings), as vLLM batches.
        """
        if multi_modal_data:
            raise NotImplementedError("the HF-generate rollout is text-only")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.unfinished += 1
        self.pending.append((list(prompt_token_ids), sampling_params, future))
        if self.batcher is None or self.batcher.done():
            self.batcher = loop.create_task(self._run_batches())
        try:
            return await future
        finally:
            self.unfinished -= 1

    async def _run_batches(self) -> None:
        await asyncio.sleep(BATCH_WAIT_SECONDS)   # let the rest of the step's requests arrive
        while self.pending:
            pending, self.pending = self.pending, []
            groups: dict[tuple, list] = {}
            for request in pending:
                groups.setdefault(sampling_key(request[1]), []).append(request)
            for group in groups.values():
                for start in range(0, len(group), MAX_BATCH):
                    chunk = group[start:start + MAX_BATCH]
                    try:
                        outputs = self._generate_batch([ids for ids, _, _ in chunk], chunk[0][1])
                    except Exception as error:  # every waiting executor sees the failure
                        for _, _, future in chunk:
                            future.set_exception(error)
                        continue
                    for (_, _, future), output in zip(chunk, outputs):
                        future.set_result(output)
            await asyncio.sleep(0)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling_params) -> list[RequestOutput]:
        """Generate for left-padded prompts (B rows); each answer is cut after its first end-of-turn token."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        kwargs = generation_kwargs(sampling_params, self.eos_ids, self.pad_id)
        kwargs["max_new_tokens"] = max(1, min(kwargs["max_new_tokens"], self.max_model_len - width))
        out = self.model.generate(input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs)
        skip = getattr(sampling_params, "skip_special_tokens", False)
        results = []
        for row in range(len(prompts)):
            new = out.sequences[row, width:].tolist()
            stop = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
            if stop is not None:  # like vLLM: keep the end-of-turn token, drop what generate padded after it
                new = new[: stop + 1]
            logprobs = None
            if kwargs["output_scores"]:
                logprobs = []
                for step, token in enumerate(new):
                    scores = torch.log_softmax(out.scores[step][row].float(), dim=-1)
                    logprobs.append({token: Logprob(float(scores[token]))})
            text = self.tokenizer.decode(new, skip_special_tokens=skip)
            results.append(RequestOutput([CompletionOutput(new, text, "stop" if stop is not None else "length",
                                                           logprobs)]))
        return results

    async def generate_responses(self, prompt: str, label: str, sampling_params, max_length: int, hf_tokenizer,
                                 num_samples: int = 1, images=None):
        """N samples for one prompt, through OpenRLHF's executor (same dicts as the vLLM engine)."""
        tasks = [
            self.executor.execute(prompt=prompt, label=label, sampling_params=sampling_params, max_length=max_length,
                                  hf_tokenizer=hf_tokenizer, llm_engine=self, images=images)
            for _ in range(num_samples)
        ]
        return await asyncio.gather(*tasks)

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished

    async def sleep(self, level: int = 1):
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    async def wake_up(self, tags=None):
        if self.device.type == "cuda":
            self.model.to(self.device)

    async def reset_prefix_cache(self):
        return None

    # ------------------------------------------------------------------ weight sync
    def load_weights(self, state_dict: dict[str, torch.Tensor], lora_config: dict | None = None) -> int:
        """Copy the policy's weights in (names as in the HF model, or as in the PEFT model for LoRA).

        With `lora_config` (the policy's adapter settings, `lora_settings`), `state_dict` holds only the
        adapter tensors: the first call wraps this engine's model in the same PEFT adapter, later calls
        overwrite it. The base weights never change, so nothing is merged and no rounding accumulates.
        Returns the new weight version.
        """
        if lora_config is not None and not hasattr(self.model, "peft_config"):
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(**lora_config)).eval()
        own = dict(self.model.named_parameters())
        unknown = [name for name in state_dict if name not in own]
        if unknown:
            raise KeyError(f"policy weights {unknown[:3]} (and {max(0, len(unknown) - 3)} more) have no parameter "
                           "in the rollout model")
        with torch.no_grad():
            for name, value in state_dict.items():
                own[name].copy_(value.to(own[name].device, own[name].dtype))
        self.weight_version += 1
        return self.weight_version

    def parameter_checksum(self) -> float:
        """Sum of all parameters (float64): lets tests see that weight sync happened."""
        return float(sum(p.double().sum() for p in self.model.parameters()))


LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "layers_to_transform")


def lora_settings(model: torch.nn.Module) -> dict | None:
    """The LoRA settings of a PEFT-wrapped policy (what an engine needs to build the same adapter), else None."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    settings = {name: getattr(config, name) for name in LORA_FIELDS}
    if isinstance(settings["target_modules"], set):
        settings["target_modules"] = sorted(settings["target_modules"])
    return settings


class HFWeightSync:
    """ActorPPOTrainer methods that sync the policy to HF-generate engines through Ray's object store.

    Mixed in before ActorPPOTrainer. OpenRLHF's own sync broadcasts over an NCCL group that only vLLM
    engines join. Here rank 0 gathers the weights (under ZeRO-3 too) and puts one copy in the object
    store; with LoRA only the adapter tensors travel (a few MB instead of the whole model).
    """

    hf_rollout = True

    def _init_vllm_sync_group(self, backend: str):
        logger.info("weight sync to rollout engines: %s", "Ray object store" if self.hf_rollout else backend)
        if self.hf_rollout:
            self._model_update_group = None
            return
        super()._init_vllm_sync_group(backend)

    def broadcast_to_vllm(self):
        if not self.hf_rollout:
            return super().broadcast_to_vllm()
        import deepspeed
        from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

        model = self.actor.model.module
        lora = lora_settings(model)
        rank0 = torch.distributed.get_rank() == 0
        state = {}
        for name, param in model.named_parameters():
            if lora is not None and "lora_" not in name:
                continue
            with deepspeed.zero.GatheredParameters([param], enabled=self.strategy.args.ds.zero_stage == 3):
                if rank0:
                    state[name] = param.data.detach().to("cpu", copy=True)
        if rank0:
            ref = ray.put(state)
            ray.get([engine.load_weights.remote(ref, lora) for engine in self.vllm_engines])
        torch_dist_barrier_and_cuda_sync()


HFRolloutActorRemote = ray.remote(HFRolloutActor)


def create_hf_rollout_engines(
    num_engines: int,
    tensor_parallel_size: int,
    pretrain: str,
    seed: int,
    full_determinism: bool,
    enable_prefix_caching: bool,
    enforce_eager: bool,
    max_model_len: int,
    shared_pg=None,
    gpu_memory_utilization=None,
    vllm_enable_sleep=False,
    logprobs_mode=None,
    agent_func_path: Optional[str] = None,
    remote_rm_url: Optional[str] = None,
    max_images_per_prompt: int = 0,
):
    """Drop-in for openrlhf.trainer.ray.create_vllm_engines (same signature), making HF engines."""
    if tensor_parallel_size != 1:
        raise ValueError("the HF-generate rollout runs one model per engine: use --vllm.tensor_parallel_size 1")
    if max_images_per_prompt:
        raise ValueError("the HF-generate rollout is text-only")
    gpu = compat.cuda_present()
    engines = []
    for i in range(num_engines):
        options: dict[str, Any] = {"num_cpus": 0, "num_gpus": (0.2 if shared_pg is not None else 1) if gpu else 0}
        if shared_pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=shared_pg, placement_group_capture_child_tasks=True, placement_group_bundle_index=i)
        engines.append(HFRolloutActorRemote.options(**options).remote(
            pretrain, seed=seed + i, max_model_len=max_model_len, agent_func_path=agent_func_path,
            remote_rm_url=remote_rm_url))
    from openrlhf_safesteer.plugin.experience import LAUNCHED

    LAUNCHED.extend(engines)
    logger.info("started %d HF-generate rollout engine(s) for %s", num_engines, pretrain)
    return engines
