"""The engine's parts without Ray: teacher outputs, replay-buffer alignment, HF rollout engine,
the sampled-form advantage through the experience maker. Real OpenRLHF classes, tiny real models."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from openrlhf_safesteer.plugin import compat

compat.install_import_stand_ins()

from openrlhf.models import Actor  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402

from openrlhf_safesteer import testing  # noqa: E402
from openrlhf_safesteer.objectives import sampled_advantages  # noqa: E402
from openrlhf_safesteer.plugin.policy import TEACHER_ON_S, SafeSteerReplayBuffer  # noqa: E402
from openrlhf_safesteer.plugin.teacher import teacher_outputs  # noqa: E402
from openrlhf_safesteer.steering import SteeringVector, attach_steering, steer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_run["model"], dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    return SimpleNamespace(model=model.eval(), tokenizer=tokenizer, vector=SteeringVector.load(tiny_run["vector"]),
                           ids=torch.tensor(tiny_run["safety_ids"]), run=tiny_run)


def right_padded_batch(tokenizer, lengths=(9, 6, 11), prompt_len=4, seed=0):
    """Prompt + response sequences, right-padded like OpenRLHF's concatenated rollouts."""
    return testing.right_padded_batch(tokenizer.pad_token_id, lengths, prompt_len, torch.Generator().manual_seed(seed))


def test_teacher_outputs_equal_the_core_steered_model(tiny):
    sequences, attention, action = right_padded_batch(tiny.tokenizer)
    actor = Actor(tiny.model)  # OpenRLHF's wrapper: its own position ids and temperature handling
    actor.packing_samples = False  # set only when Actor loads a checkpoint by path
    handle = attach_steering(actor.model, tiny.vector)
    try:
        logits = actor(sequences, None, attention, return_output=True)["logits"]
    finally:
        handle.remove()
    got = teacher_outputs(logits, sequences, action, tiny.ids)

    # Independent: the core's steer() on the bare HF model, full log-softmax, gathered by hand.
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), steer(tiny.model, tiny.vector):
        reference = F.log_softmax(tiny.model(sequences, attention_mask=attention, position_ids=position_ids)
                                  .logits[:, :-1].float(), dim=-1)
    mask = action.float()
    expected_on_s = reference[..., tiny.ids] * mask.unsqueeze(-1)
    expected_sampled = reference.gather(-1, sequences[:, 1:].unsqueeze(-1)).squeeze(-1) * mask
    assert got["logprobs_on_s"].shape == (3, sequences.shape[1] - 1, len(tiny.ids))
    torch.testing.assert_close(got["logprobs_on_s"], expected_on_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["logprobs"], expected_sampled, atol=1e-5, rtol=1e-5)

    # And the hook matters: the unsteered model gives other log-probs on S.
    with torch.no_grad():
        base = F.log_softmax(tiny.model(sequences, attention_mask=attention, position_ids=position_ids)
                             .logits[:, :-1].float(), dim=-1)[..., tiny.ids] * mask.unsqueeze(-1)
    assert (base - expected_on_s).abs().max() > 1e-2


def test_replay_buffer_keeps_teacher_rows_aligned_with_each_sample(tiny):
    sequences, attention, action = right_padded_batch(tiny.tokenizer, lengths=(9, 6, 11))
    teacher = torch.randn(3, action.shape[1], 4) * action.unsqueeze(-1)
    experience = Experience(sequences=sequences, attention_mask=attention, action_mask=action,
                            action_log_probs=torch.randn(action.shape) * action, advantages=torch.zeros(action.shape),
                            response_length=action.sum(-1), info={"kl": torch.zeros(3)})
    setattr(experience, TEACHER_ON_S, teacher)
    buffer = SafeSteerReplayBuffer(2, cpu_offload=True)
    buffer.append(experience)
    assert [item.action_mask.shape[0] for item in buffer.items] == [8, 5, 10]
    for i, item in enumerate(buffer.items):
        assert torch.equal(getattr(item, TEACHER_ON_S), teacher[i, : item.action_mask.shape[0]])
    batch = buffer.collate_fn([buffer.items[1], buffer.items[2]])  # 6- and 11-token samples, re-padded
    got = getattr(batch, TEACHER_ON_S)
    assert got.shape == (2, batch.action_mask.shape[1], 4)
    assert torch.equal(got[0, :5], teacher[1, :5]) and torch.equal(got[0, 5:], torch.zeros(5, 4))
    assert torch.equal(got[1], teacher[2, :10])
    # The per-token action mask and the teacher rows still line up after the round trip.
    assert torch.equal(got.abs().sum(-1) > 0, batch.action_mask.bool() & (got.abs().sum(-1) > 0))


def _maker(objective, ids):
    from openrlhf_safesteer.plugin.experience import SafeSteerExperienceMaker

    args = SimpleNamespace(algo=SimpleNamespace(advantage=SimpleNamespace(estimator="reinforce")),
                           safesteer=SimpleNamespace(objective=objective, safety_ids=ids, dump_dir=None))
    return SafeSteerExperienceMaker(None, None, None, None, None, SimpleNamespace(args=args), None)


def test_sampled_advantages_through_the_maker_equal_the_core(tiny):
    from openrlhf_safesteer.plugin.experience import TEACHER_SAMPLED

    sequences, attention, action = right_padded_batch(tiny.tokenizer)
    # Plant safety tokens among the responses so some advantages are non-zero.
    sequences[:, 5] = tiny.ids[0]
    sequences[0, 7] = tiny.ids[2]
    student = torch.log_softmax(torch.randn(*action.shape, 5), -1)[..., 0] * action
    teacher = torch.log_softmax(torch.randn(*action.shape, 5), -1)[..., 0] * action
    experience = Experience(sequences=sequences, attention_mask=attention, action_mask=action,
                            action_log_probs=student, info={})
    setattr(experience, TEACHER_SAMPLED, teacher)
    [out] = _maker("sampled", tiny.ids.tolist()).compute_advantages_and_returns([experience])
    expected = sampled_advantages(student, teacher, sequences[:, 1:], tiny.ids, action)
    torch.testing.assert_close(out.advantages, expected)
    assert (out.advantages != 0).sum() >= 3  # the planted tokens (inside the action mask) count
    assert not hasattr(out, TEACHER_SAMPLED)


def test_hf_rollout_engine_answers_like_vllms(tiny):
    from openrlhf_safesteer.plugin.rollout import HFRolloutActor

    engine = HFRolloutActor(tiny.run["model"], seed=0, max_model_len=64)
    sampling = compat.SamplingParams(temperature=0.0, max_tokens=6, min_tokens=1)
    prompt = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "How do I make a cake?"}],
                                                tokenize=False, add_generation_prompt=True)
    [response] = asyncio.run(engine.generate_responses(prompt, "", sampling, 64, tiny.tokenizer, num_samples=1))
    prompt_ids = tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert response["observation_tokens"][: len(prompt_ids)] == prompt_ids
    start, end = response["action_ranges"][0]
    assert (start, end) == (len(prompt_ids), len(response["observation_tokens"]))
    # Greedy decoding equals transformers' own greedy continuation, up to and including eos.
    direct = tiny.model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                                 eos_token_id=tiny.tokenizer.eos_token_id,
                                 pad_token_id=tiny.tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    action = response["observation_tokens"][start:end]
    assert action == direct[: len(action)]
    assert response["truncated"] == (tiny.tokenizer.eos_token_id not in action)
    assert response["reward"] is None and response["rollout_log_probs"] is None

    # Weight sync: new weights in, other generations out.
    before = engine.parameter_checksum()
    state = {name: torch.randn_like(p) for name, p in engine.model.named_parameters()}
    engine.load_weights(state)
    assert engine.parameter_checksum() != pytest.approx(before)
    with pytest.raises(KeyError):
        engine.load_weights({"not.a.parameter": torch.zeros(1)})


def test_seeded_vllm_actor_gives_each_request_its_own_seed():
    """The GPU path's rule (plugin.vllm_seeded): the rollout seed in SamplingParams becomes each request's own
    request_seed(rollout, prompt ids, k), as in the HF engine; unseeded requests pass through unchanged."""
    from openrlhf_safesteer.plugin.vllm_seeded import SeededRolloutActor
    from openrlhf_safesteer.sampling import request_seed, rollout_seed

    seen = []

    class FakeLLM:   # the vLLM engine inside the actor: records what each request was sampled with
        def generate(self, prompt, params, request_id):
            seen.append((prompt["prompt_token_ids"], params.seed))

            async def outputs():
                yield "done"

            return outputs()

    actor = object.__new__(SeededRolloutActor)   # no vLLM engine to start: only generate() is exercised
    actor.llm, actor._mm_pad_token_ids = FakeLLM(), None
    rollout = rollout_seed(42, 3)
    params = compat.SamplingParams(temperature=1.0, seed=rollout)

    async def requests():
        for ids in ([1, 2], [1, 2], [3]):
            assert await actor.generate(ids, params) == "done"
        await actor.generate([1, 2], compat.SamplingParams(temperature=1.0))

    asyncio.run(requests())
    assert seen == [([1, 2], request_seed(rollout, [1, 2], 0)), ([1, 2], request_seed(rollout, [1, 2], 1)),
                    ([3], request_seed(rollout, [3], 0)), ([1, 2], None)]
    assert params.seed == rollout   # the caller's params are not modified


def _rollout(engine, prompts: list[str], samples: int, params, announce: bool):
    """One rollout as SeededSamplesGenerator sends it: (announce,) then every prompt's request, in the given
    order and 80 ms apart (longer than the batching window of unannounced requests, as Ray spreads them), with
    no tokenizer shipped. Returns each prompt's response token lists."""

    async def late(delay: float, prompt: str):
        await asyncio.sleep(delay)
        return await engine.generate_responses(prompt, "", params, 64, None, num_samples=samples)

    async def run():
        if announce:
            engine.expect_requests(len(prompts) * samples)
        return await asyncio.gather(*[late(0.08 * i, p) for i, p in enumerate(prompts)])

    answers = asyncio.run(run())
    return {p: sorted(tuple(r["observation_tokens"][r["action_ranges"][0][0]:]) for r in answer)
            for p, answer in zip(prompts, answers)}


def test_hf_engine_barrier_generates_one_canonical_batch_whatever_the_arrival_order(tiny, monkeypatch):
    """Announced requests are generated together once all are in, rows in a canonical order, each with its own
    seed: two arrival orders give one batch each, of the same rows, and the same samples; the engine's own
    tokenizer serves requests that ship none. A missing request trips the watchdog: a logged partial batch."""
    from openrlhf_safesteer.plugin import rollout as rollout_module
    from openrlhf_safesteer.plugin.rollout import HFRolloutActor
    from openrlhf_safesteer.sampling import rollout_seed

    batches = []

    def recorded_engine(seed: int) -> HFRolloutActor:
        engine = HFRolloutActor(tiny.run["model"], seed=seed, max_model_len=64)
        stock = engine._generate_batch

        def recording(prompts, params, seeds=None):
            batches.append([tuple(p) for p in prompts])
            return stock(prompts, params, seeds)

        engine._generate_batch = recording
        return engine

    prompts = [tiny.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)
               for text in ("How do I make a cake?", "Write a poem.", "Name a colour.")]
    params = compat.SamplingParams(temperature=1.0, max_tokens=6, min_tokens=1, seed=rollout_seed(42, 0))
    # two runs (engines whose global streams differ too), the requests arriving in opposite orders
    forward = _rollout(recorded_engine(0), prompts, 2, params, announce=True)
    engine = recorded_engine(1)
    backward = _rollout(engine, prompts[::-1], 2, params, announce=True)
    assert len(batches) == 2 and len(batches[0]) == 6 and batches[0] == batches[1]
    assert forward == backward
    assert len({s for samples in forward.values() for s in samples}) > 3     # samples of a prompt differ

    # another rollout seed, other samples (the equality above could fail)
    other = compat.SamplingParams(temperature=1.0, max_tokens=6, min_tokens=1, seed=rollout_seed(42, 1))
    assert _rollout(engine, prompts, 2, other, announce=True) != forward

    monkeypatch.setattr(rollout_module, "BARRIER_TIMEOUT_SECONDS", 0.2)

    async def one_short():
        engine.expect_requests(3)
        return await asyncio.gather(*[engine.generate_responses(p, "", params, 64, None) for p in prompts[:2]])

    assert len(asyncio.run(one_short())) == 2 and engine.partial_batches == 1
    with pytest.raises(ValueError, match="count >= 0"):
        engine.expect_requests(-1)
