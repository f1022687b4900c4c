"""An HF-generate rollout engine that answers like OpenRLHF's vLLM engine (`RolloutRayActor`).

OpenRLHF 0.11.2 generates only through vLLM engines, which need a GPU. This Ray actor exposes the
same methods the sample generator and the trainer call (`generate_responses`, `generate`,
`get_num_unfinished_requests`, `sleep`, `wake_up`, `reset_prefix_cache`) and runs OpenRLHF's own
agent executors (`SingleTurnAgentExecutor` or a user's `AgentExecutor`) on top of
`transformers.generate`. It receives the policy's new weights after each step through Ray's
object store (`load_weights`). Use it on CPU machines, in CI, and for small models; vLLM remains
the engine for real runs.

Repeatable at a fixed seed (docs/openrlhf.md, "Repeatable runs"):
- every request samples from its own generator (`sampling.SeededSampling`), seeded by
  `sampling.request_seed(SamplingParams.seed, prompt ids, k)`: the rollout's seed comes from the sample
  generator (`RolloutSeeds`), k numbers identical prompts in arrival order (they are exchangeable), so a
  request's tokens do not depend on its batch mates, its row or earlier batches;
- a step barrier instead of a timer: the sample generator says how many requests a rollout sends
  (`expect_requests`) and the engine generates once they are all in, in a canonical row order, so batch
  composition, padding and float summation are the same in every run (a watchdog generates a partial batch
  after `BARRIER_TIMEOUT_SECONDS` and logs it);
- the engine tokenizes with its own tokenizer (OpenRLHF ships a copy with every request: 9.8 MB pickled for
  the demo model, about 0.8 s each) and, on a CPU, generates with a fixed thread count and oneDNN products, as
  the local engine does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# No OpenRLHF import at module level: the actor installs the CPU stand-ins (compat.prepare_process) in its
# own process before it imports OpenRLHF's agent executors.
from openrlhf_safesteer.chat import shared_prefix_layout, shared_prompt_cache
from openrlhf_safesteer.cpu_kernels import onednn_linear
from openrlhf_safesteer.plugin import compat
from openrlhf_safesteer.sampling import SeededSampling, request_seed

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


# Without a barrier (requests from a sample generator that announces none, or later turns of a multi-turn agent)
# requests that arrive within this window share one generate call, as before the barrier existed.
BATCH_WAIT_SECONDS = 0.05
# A barrier that waits this long for announced requests generates what it has and logs it: a missing request
# must slow a run down, never hang it.
BARRIER_TIMEOUT_SECONDS = 120.0
MAX_BATCH = 64


def sampling_key(sampling_params: Any) -> tuple:
    """Requests with equal keys can share one `generate` call (same decoding settings and length limit)."""
    return tuple(getattr(sampling_params, name, None) for name in
                 ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "logprobs", "skip_special_tokens"))


@dataclass
class Request:
    """One pending generate request: its prompt, settings, per-request seed (None: unseeded) and future."""

    prompt_ids: list[int]
    sampling_params: Any
    seed: int | None
    future: asyncio.Future

    def order_key(self) -> tuple:
        """The canonical row order: by seed (a hash of the prompt and k), then prompt, never by arrival."""
        return (self.seed if self.seed is not None else -1, self.prompt_ids)


class Occurrences:
    """k for each seeded request: how many requests of the same prompt with the same rollout seed came before.

    Only the current rollout seed's counts are kept (a new seed starts a new rollout)."""

    def __init__(self):
        self.seed: int | None = None
        self.counts: dict[tuple, int] = {}

    def next(self, rollout_seed: int, prompt_ids: list[int]) -> int:
        if rollout_seed != self.seed:
            self.seed, self.counts = rollout_seed, {}
        key = tuple(prompt_ids)
        k = self.counts.get(key, 0)
        self.counts[key] = k + 1
        return k


def generation_kwargs(sampling_params: Any, eos_ids: list[int], pad_id: int) -> dict:
    """Translate vLLM SamplingParams into transformers.generate kwargs (same semantics). Seeded requests
    sample through `sampling.SeededSampling` instead (`HFRolloutActor._generate_batch`)."""
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
                 remote_rm_url=None, dtype: str | None = None, threads: int | None = None, **unused: Any):
        compat.prepare_process()
        from openrlhf.utils.agent import SingleTurnAgentExecutor
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # a fixed thread count: Ray sets OMP_NUM_THREADS=1 for a num_cpus=0 actor, a user's shell anything
            torch.set_num_threads(threads or os.cpu_count() or 1)
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
        torch.manual_seed(seed)   # only unseeded requests (no SamplingParams.seed) draw from the global stream
        self.unfinished = 0
        self.pending: list[Request] = []
        self.expected = 0                     # announced requests of the current barrier not yet arrived
        self.arrived: asyncio.Future | None = None   # the barrier's wake-up, made in the loop that waits on it
        self.partial_batches = 0              # barriers the watchdog cut short
        self.occurrences = Occurrences()
        self.batcher: asyncio.Task | None = None
        self.weight_version = 0
        if agent_func_path:
            from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

            self.executor = _load_agent_executor(agent_func_path)
        else:
            self.executor = SingleTurnAgentExecutor(remote_rm_url)

    # ------------------------------------------------------------------ what vLLM's engine answers
    def seeded_requests(self) -> bool:
        """Marks an engine that derives each request's seed from SamplingParams.seed (`plugin.samples`)."""
        return True

    def expect_requests(self, count: int) -> None:
        """The sample generator's announcement: the next `count` requests form one rollout; generate when all
        are in (the step barrier). Called before it dispatches them."""
        if count < 0:
            raise ValueError(f"expect_requests needs count >= 0, got {count}")
        self.expected += int(count)

    async def generate(self, prompt_token_ids: list[int], sampling_params, multi_modal_data=None) -> RequestOutput:
        """One request, answered from a batch: OpenRLHF dispatches every prompt of a rollout step at once
        and each executor awaits its own request. Announced requests wait for the step barrier; others for
        `BATCH_WAIT_SECONDS`. A request with `sampling_params.seed` draws from its own seeded generator.
        """
        if multi_modal_data:
            raise NotImplementedError("the HF-generate rollout is text-only")
        loop = asyncio.get_running_loop()
        prompt_ids = list(prompt_token_ids)
        rollout_seed = getattr(sampling_params, "seed", None)
        seed = None if rollout_seed is None else request_seed(
            rollout_seed, prompt_ids, self.occurrences.next(rollout_seed, prompt_ids))
        request = Request(prompt_ids, sampling_params, seed, loop.create_future())
        self.unfinished += 1
        self.pending.append(request)
        if self.expected:
            self.expected -= 1
            if not self.expected and self.arrived is not None and not self.arrived.done():
                self.arrived.set_result(None)
        if self.batcher is None or self.batcher.done():
            self.batcher = loop.create_task(self._run_batches())
        try:
            return await request.future
        finally:
            self.unfinished -= 1

    async def _wait_for_requests(self) -> None:
        """Until the announced requests are all in (or the watchdog fires), else a short batching window."""
        if not self.expected:
            await asyncio.sleep(BATCH_WAIT_SECONDS)
            return
        self.arrived = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.arrived, BARRIER_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            self.partial_batches += 1
            logger.warning("rollout barrier: %d announced requests missing after %.0f s; generating the %d that "
                           "arrived (partial batch %d: this rollout's batching is not repeatable)", self.expected,
                           BARRIER_TIMEOUT_SECONDS, len(self.pending), self.partial_batches)
            self.expected = 0
        finally:
            self.arrived = None

    async def _run_batches(self) -> None:
        try:
            await self._batches()
        except BaseException as error:   # never leave an executor waiting on a batcher that died
            pending, self.pending = self.pending, []
            for request in pending:
                if not request.future.done():
                    request.future.set_exception(error if isinstance(error, Exception) else RuntimeError(error))
            raise

    async def _batches(self) -> None:
        await self._wait_for_requests()
        while self.pending:
            pending, self.pending = sorted(self.pending, key=Request.order_key), []
            groups: dict[tuple, list[Request]] = {}
            for request in pending:
                groups.setdefault(sampling_key(request.sampling_params), []).append(request)
            for group in groups.values():
                for start in range(0, len(group), MAX_BATCH):
                    chunk = group[start:start + MAX_BATCH]
                    try:
                        outputs = self._generate_batch([r.prompt_ids for r in chunk], chunk[0].sampling_params,
                                                       [r.seed for r in chunk])
                    except Exception as error:  # every waiting executor sees the failure
                        for request in chunk:
                            request.future.set_exception(error)
                        continue
                    for request, output in zip(chunk, outputs):
                        request.future.set_result(output)
            await asyncio.sleep(0)
            if self.expected:                  # the next rollout was announced while this one decoded
                await self._wait_for_requests()

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling_params,
                        seeds: list[int | None] | None = None) -> list[RequestOutput]:
        """Generate for left-padded prompts (B rows); each answer is cut after its first end-of-turn token.

        With seeds (one per row, all set) and temperature > 0, each row samples from its own generator
        (`sampling.SeededSampling`); unseeded rows share transformers' global stream as before."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        kwargs = generation_kwargs(sampling_params, self.eos_ids, self.pad_id)
        kwargs["max_new_tokens"] = max(1, min(kwargs["max_new_tokens"], self.max_model_len - width))
        sampler = None
        if kwargs["do_sample"] and seeds is not None and all(seed is not None for seed in seeds):
            sampler = SeededSampling(seeds, kwargs.pop("temperature"), kwargs.pop("top_p"), kwargs.pop("top_k"))
            kwargs.update(do_sample=False, logits_processor=[sampler], output_scores=False)
        # The chat header every prompt starts with is encoded once at batch 1 and each prompt but its last token
        # once, as the local engine's rollouts do (chat.shared_prompt_cache): on a CPU the prefill costs about as
        # much as the decoding. On a CPU, oneDNN for the large products: the local engine's kernels, so both
        # engines compute the same logits for the same request (cpu_kernels.py; generation needs no gradient).
        input_ids, attention_mask, shared = shared_prefix_layout(input_ids, attention_mask, width)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with onednn_linear(self.device.type == "cpu"):
            cache = shared_prompt_cache(self.model, input_ids, attention_mask, shared)
            out = self.model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache, **kwargs)
        want_logprobs = getattr(sampling_params, "logprobs", None) is not None
        drawn = sampler.drawn_logprobs() if sampler is not None and want_logprobs else None
        skip = getattr(sampling_params, "skip_special_tokens", False)
        results = []
        for row in range(len(prompts)):
            new = out.sequences[row, width:].tolist()
            stop = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
            if stop is not None:  # like vLLM: keep the end-of-turn token, drop what generate padded after it
                new = new[: stop + 1]
            logprobs = None
            if drawn is not None:
                logprobs = [{token: Logprob(float(drawn[row, step]))} for step, token in enumerate(new)]
            elif want_logprobs:
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
        """N samples for one prompt, through OpenRLHF's executor (same dicts as the vLLM engine). With
        hf_tokenizer None (`SeededSamplesGenerator` sends none) the executor uses this engine's own."""
        tokenizer = self.tokenizer if hf_tokenizer is None else hf_tokenizer
        tasks = [
            self.executor.execute(prompt=prompt, label=label, sampling_params=sampling_params, max_length=max_length,
                                  hf_tokenizer=tokenizer, llm_engine=self, images=images)
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
