"""OpenRLHF's sample generator, made repeatable at a fixed seed (the HF-generate engines; vLLM as far as it allows).

OpenRLHF's `SamplesGenerator` sends each prompt of a rollout to an engine as its own Ray call and keeps the
results in completion order; no request carries a seed. `SeededSamplesGenerator` keeps its prompt loading,
load balancing and response processing, and changes what makes two runs differ:
- every rollout carries `sampling.rollout_seed(--train.seed, rollout index)` as `SamplingParams.seed`, from which
  a seeded engine derives each request's own seed (`plugin.rollout`), so a sample does not depend on which
  requests share its batch;
- the HF-generate engines are told how many requests the rollout sends before they are sent (the step
  barrier), and receive no tokenizer (each uses its own: OpenRLHF pickles a copy into every request);
- results are read in dispatch order (prompt order, then sample order), so the experiences, their
  micro-batches and the order of every float sum downstream are the same in every run.
Engines that do not announce `seeded_requests` (OpenRLHF's own vLLM actor) get the stock request, unseeded:
the same seed for all of a prompt's samples would make them identical there. The plugin's vLLM actor
(`plugin.vllm_seeded`) derives each request's seed as the HF engine does; vLLM batches continuously, so it
gets no barrier and keeps OpenRLHF's tokenizer argument.

Dynamic filtering re-dispatches replacement prompts as results arrive, which is order-dependent by design:
with --algo.dynamic_filtering_enable the stock path runs, and the log says it is not repeatable.

Imports OpenRLHF at module level; import it after `compat.prepare_process()` or in a prepared Ray worker.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

import ray
from openrlhf.trainer.ppo_utils import samples_generator as stock
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

from openrlhf_safesteer.sampling import rollout_seed

logger = logging.getLogger(__name__)


def is_seeded_engine(engine: Any) -> bool:
    """Whether a rollout engine handle derives per-request seeds from SamplingParams.seed (the HF engine and
    `plugin.vllm_seeded`'s vLLM actor do; OpenRLHF's own vLLM actor does not)."""
    return hasattr(engine, "seeded_requests")


def has_barrier(engine: Any) -> bool:
    """Whether an engine handle takes an announced request count and tokenizes with its own tokenizer (the HF
    engine: vLLM batches continuously and needs no barrier)."""
    return hasattr(engine, "expect_requests")


class _Recorder:
    """Stands in for one engine handle while OpenRLHF's dispatch runs: load queries go to the real engine,
    generate_responses calls are recorded (not sent) so the barrier can be announced before any is."""

    def __init__(self, index: int, engine: Any, calls: list):
        self.get_num_unfinished_requests = engine.get_num_unfinished_requests
        self.generate_responses = self
        self.index, self.calls = index, calls

    def remote(self, **kwargs) -> int:
        self.calls.append((self.index, kwargs))
        return len(self.calls) - 1


class SeededSamplesGenerator(SamplesGenerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_seed = int(self.args.train.seed)
        self.rollout_index = 0   # policy updates before the next rollout (a resumed run restarts at 0)
        self.warned_dynamic = False

    def _dispatch_prompts_to_vllm(self, prompts, labels, *, images=None, **generate_kwargs) -> list:
        """OpenRLHF's dispatch (same engine choice and request fields), then: the rollout seed for seeded
        engines, no tokenizer and an announced request count for the HF engines, and only then the calls."""
        engines, calls = self.vllm_engines, []
        self.vllm_engines = [_Recorder(i, engine, calls) for i, engine in enumerate(engines)]
        try:
            super()._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        finally:
            self.vllm_engines = engines
        seed = rollout_seed(self.train_seed, self.rollout_index)
        counts: Counter = Counter()
        for index, kwargs in calls:
            if is_seeded_engine(engines[index]):
                kwargs["sampling_params"] = copy.copy(kwargs["sampling_params"])
                kwargs["sampling_params"].seed = seed
            if has_barrier(engines[index]):
                kwargs["hf_tokenizer"] = None
                counts[index] += kwargs.get("num_samples", 1)
        ray.get([engines[index].expect_requests.remote(count) for index, count in counts.items()])
        return [engines[index].generate_responses.remote(**kwargs) for index, kwargs in calls]

    def _generate_vllm(self, dataloader_iter, num_prompts: int, dynamic_filtering, **generate_kwargs):
        if dynamic_filtering:
            if not self.warned_dynamic:
                logger.warning("--algo.dynamic_filtering_enable: rollouts follow result arrival order and are not "
                               "repeatable at a fixed seed")
                self.warned_dynamic = True
            result = super()._generate_vllm(dataloader_iter, num_prompts, dynamic_filtering, **generate_kwargs)
            self.rollout_index += 1
            return result
        prompts, labels, images, exhausted = stock._collect_prompt_batch(dataloader_iter, num_prompts)
        if not prompts:
            return [], 0, True
        refs = self._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        experiences = [self._process_response_into_experience(response, **generate_kwargs)
                       for ref in refs for response in ray.get(ref)]   # dispatch order, not completion order
        self.rollout_index += 1
        return experiences, len(prompts), exhausted
