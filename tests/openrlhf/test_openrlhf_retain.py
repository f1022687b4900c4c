"""--safesteer.coeff_key (docs/METHOD.md section 8) in the plugin: the launcher's checks, the experience maker's
per-row teacher scales, and the teacher actor applying coeff * scale per row, packed or not, exactly.

STAND-IN (CPU only): flash-attn's padding helpers, as in test_openrlhf_packing.py (the conftest's
`torch_bert_padding`: plain-torch re-implementations of `unpad_input`, `pad_input`, `index_first_axis`); the
attention itself is sdpa.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from openrlhf.models import Actor

from openrlhf_safesteer import testing
from openrlhf_safesteer.cli import train_safesteer_ray
from openrlhf_safesteer.plugin.experience import SafeSteerExperienceMaker, teacher_scales
from openrlhf_safesteer.plugin.teacher import SteeredReferenceActor, row_coefficients, teacher_outputs
from openrlhf_safesteer.steering import SteeringVector, steer

LENGTHS = (9, 6, 11, 3)
PROMPT_LEN = 3


@pytest.fixture(scope="module")
def tiny():
    tokenizer = testing.tiny_tokenizer()
    model = testing.tiny_model("llama", tokenizer, layers=2, hidden=64, seed=0)
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(3)
    sequences, attention, action = testing.right_padded_batch(tokenizer.pad_token_id, LENGTHS, PROMPT_LEN,
                                                             generator)
    vector = SteeringVector(vector=3 * torch.randn(64, generator=generator), layer=1, coeff=1.5, model_name="tiny")
    ids = torch.tensor(sorted(set(tokenizer.encode(" sorry cannot illegal harmful", add_special_tokens=False))))
    return SimpleNamespace(model=model, sequences=sequences, attention=attention, action=action, vector=vector,
                           ids=ids)


def _one_row(tiny, row: int, coeff: float) -> dict:
    """Teacher outputs of one row alone, from a plain HF forward under the scalar coefficient (0: no hook)."""
    length = LENGTHS[row]
    seq = tiny.sequences[row:row + 1, :length]
    with torch.no_grad():
        if coeff:
            with steer(tiny.model, tiny.vector, coeff):
                logits = tiny.model(seq).logits.float()
        else:
            logits = tiny.model(seq).logits.float()
    return teacher_outputs(logits, seq, tiny.action[row:row + 1, :length - 1], tiny.ids)


@pytest.mark.parametrize("packing", [False, True])
def test_teacher_applies_each_rows_coefficient_exactly(tiny, torch_bert_padding, packing):
    """SteeredReferenceActor.forward with steering_scales (1, 0, 0.5, 0) on a real OpenRLHF Actor: each row equals
    that row alone under coeff * scale (scale 0: the plain base), with and without sample packing."""
    strategy = SimpleNamespace(ring_attn_group=None)
    actor = Actor(tiny.model)
    actor.packing_samples = packing
    teacher_self = SimpleNamespace(model=actor, strategy=strategy, safety_ids=tiny.ids,
                                   steering_vector=tiny.vector, coeff=tiny.vector.coeff)
    scales = torch.tensor([1.0, 0.0, 0.5, 0.0])
    got = SteeredReferenceActor.forward(teacher_self, tiny.sequences, tiny.action, tiny.attention,
                                        steering_scales=scales)
    for row, scale in enumerate(scales.tolist()):
        want = _one_row(tiny, row, tiny.vector.coeff * scale)
        width = LENGTHS[row] - 1
        for key in ("logprobs", "logprobs_on_s"):
            torch.testing.assert_close(got[key][row, :width], want[key][0], atol=1e-5, rtol=1e-5)
    steered = _one_row(tiny, 1, tiny.vector.coeff)
    assert (steered["logprobs_on_s"][0] - got["logprobs_on_s"][1, :LENGTHS[1] - 1]).abs().max() > 1e-2


def test_row_coefficients_under_packing_follow_the_unpadded_token_order():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    per_token = row_coefficients(2.0, torch.tensor([1.0, 0.0, 0.5]), mask, packed=True)
    assert per_token.tolist() == [[2.0, 2.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]]
    assert row_coefficients(2.0, torch.tensor([1.0, 0.0, 0.5]), mask, packed=False).tolist() == [2.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="teacher scales for a batch of 3 rows"):
        row_coefficients(2.0, torch.ones(2), mask, packed=False)


@pytest.mark.parametrize("objective", ["exact", "sampled"])
def test_experience_maker_sends_each_prompts_scale_to_the_teacher_only(objective):
    """make_experience reads the scales from the samples' labels (the coeff_key column) and passes them to the
    reference (teacher) group's forward, not to the policy's (which `exact` does not call at all)."""
    calls = {}

    def dispatch(group, colocated, **kwargs):
        calls[group] = kwargs
        return group

    batch, width, k = 2, 3, 2
    # Distinct log-probs per group, so a maker that put the student's own log-probs in the reference field
    # (which zeroes the retain estimate (s - s).detach() * s) is told apart from one that puts the teacher's.
    results = {group: [{"logprobs": torch.full((batch, width), value), "logprobs_on_s": torch.full((batch, width, k),
                                                                                                    value)}]
               for group, value in (("policy", -1.0), ("teacher", -2.0))}
    fake = SimpleNamespace(
        args=SimpleNamespace(ds=SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1),
                             train=SimpleNamespace(colocate_all=False, colocate_actor_ref=False)),
        safesteer=SimpleNamespace(coeff_key="teacher_scale", objective=objective),
        actor_model_group="policy", initial_model_group="teacher", _dispatch_forward=dispatch,
        _flatten_results=lambda group, duplicate: results[group])
    samples = SimpleNamespace(sequences=torch.zeros(batch, width + 1, dtype=torch.long),
                              attention_mask=torch.ones(batch, width + 1), action_mask=torch.ones(batch, width),
                              labels=["1", 0], rewards=None, info={})
    SafeSteerExperienceMaker.make_experience.__wrapped__(fake, [samples])
    assert calls["teacher"]["steering_scales"][0].tolist() == [1.0, 0.0]
    # The retain rows' estimate reads the teacher's (on a retain row: the unsteered base's) sampled-token
    # log-probs from OpenRLHF's reference field; the student's own stay in action_log_probs.
    assert torch.equal(samples.base_action_log_probs, torch.full((batch, width), -2.0))
    if objective == "sampled":
        assert "steering_scales" not in calls["policy"]
        assert torch.equal(samples.action_log_probs, torch.full((batch, width), -1.0))
    else:
        assert "policy" not in calls      # the exact policy step recomputes the student itself
    fake.safesteer.coeff_key = None                            # no retain rows: the reference field stays empty
    SafeSteerExperienceMaker.make_experience.__wrapped__(fake, [samples])
    assert samples.base_action_log_probs is None
    with pytest.raises(ValueError, match="--safesteer.coeff_key teacher_scale: a prompt's 'teacher_scale' is 'x'"):
        teacher_scales(["x"], "teacher_scale")


def _launch(argv, capsys):
    status = train_safesteer_ray.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _prompts(tmp_path, rows) -> str:
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_coeff_key_sets_the_label_key_and_checks_the_column(tiny_run, tmp_path, capsys, cpu_flags):
    good = _prompts(tmp_path, [{"prompt": "How do I make a bomb?", "teacher_scale": 1},
                               {"prompt": "How do I kill a stuck process?", "teacher_scale": 0}])
    argv = cpu_flags(tiny_run, tmp_path, ["--safesteer.coeff_key", "teacher_scale", "--safesteer.dry_run"])
    argv[argv.index("--data.prompt_dataset") + 1] = good
    status, out, err = _launch(argv, capsys)
    assert status == 0, err
    assert "--data.label_key teacher_scale" in out.split("OpenRLHF command:")[1]
    status, _, err = _launch(argv + ["--data.label_key", "other"], capsys)
    assert status == 2 and "but --data.label_key is 'other'" in err
    for rows, message in (([{"prompt": "a"}], "mixed.jsonl:1: no 'teacher_scale' column"),
                          ([{"prompt": "a", "teacher_scale": 1}, {"prompt": "b", "teacher_scale": "none"}],
                           "mixed.jsonl:2: --safesteer.coeff_key teacher_scale: a prompt's 'teacher_scale' is 'none'")):
        argv[argv.index("--data.prompt_dataset") + 1] = _prompts(tmp_path, rows)
        status, _, err = _launch(argv, capsys)
        assert status == 2 and message in err, err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "teacher_scale": 1\n')
    argv[argv.index("--data.prompt_dataset") + 1] = str(broken)
    status, _, err = _launch(argv, capsys)
    assert status == 2 and "broken.jsonl:1: not valid JSON" in err, err


@pytest.mark.slow
@pytest.mark.ray
def test_coeff_key_through_ray_steers_only_the_harmful_rows(tiny_run, tmp_path, ray_session, cpu_flags):
    """One real step through OpenRLHF's trainer, Ray actors and the HF rollout engine with a mixed prompt file:
    the scales reach the experience (labels survive OpenRLHF's samples generator), and the teacher's log-probs on
    S of the first micro-batch are the steered checkpoint's on the harmful rows and the plain checkpoint's on the
    retain rows, recomputed here from the initial checkpoint."""
    from openrlhf_safesteer.objectives import gather_logprobs
    from openrlhf_safesteer.testing import load_dump, reference_logits

    rows = [{"prompt": "How do I make a bomb?", "teacher_scale": 1},
            {"prompt": "How do I kill a stuck process?", "teacher_scale": 0},
            {"prompt": "How can I steal a car?", "teacher_scale": 1},
            {"prompt": "How do I debone a chicken?", "teacher_scale": 0}]
    out = tmp_path / "retain"
    argv = cpu_flags(tiny_run, out, ["--safesteer.rollout", "hf", "--safesteer.coeff_key", "teacher_scale",
                                     "--safesteer.keep_prompt_order", "--data.max_samples", "2",
                                     "--actor.lr_warmup_ratio", "0"])
    argv[argv.index("--data.prompt_dataset") + 1] = _prompts(tmp_path, rows)
    assert train_safesteer_ray.main(argv) == 0

    batch, _ = load_dump(out / "dump" / "experience_batch1")
    scales = batch["teacher_scale"]
    assert sorted(set(scales.tolist())) == [0.0, 1.0], scales      # prompts 1 and 2 of the file: one of each
    plain, steered = reference_logits(tiny_run["model"], tiny_run["vector"], batch["sequences"],
                                      batch["attention_mask"])
    ids, mask = torch.tensor(tiny_run["safety_ids"]), batch["action_mask"].float().unsqueeze(-1)
    width = mask.shape[1]
    teacher = torch.where(scales.bool()[:, None, None], steered, plain)[:, -width:]
    # bf16 (OpenRLHF's actor dtype here): the teacher encodes the chat header once and only the response window
    # (test_openrlhf_window.py checks that path to 1e-5 in fp32), the reference every position of each row; the two
    # orders round apart by up to 3e-4 relative
    torch.testing.assert_close(batch["teacher_on_s"], gather_logprobs(teacher, ids) * mask, atol=1e-4, rtol=1e-3)
    retain = ~scales.bool()
    other = gather_logprobs(steered[:, -width:], ids) * mask
    assert (batch["teacher_on_s"][retain] - other[retain]).abs().max() > 1e-2   # not steered: it would differ


def _retain_step_self(coeff_key="teacher_scale", divergence="full_vocab"):
    from openrlhf_safesteer.plugin.policy import SafeSteerActorTrainer

    fake = SimpleNamespace(safesteer=SimpleNamespace(coeff_key=coeff_key, retain_divergence=divergence))
    return lambda *args: SafeSteerActorTrainer._with_retain_rows(fake, *args)


def test_policy_step_replaces_retain_rows_by_the_sampled_full_vocabulary_estimate():
    """Rows with teacher scale 0 get (log p_s(y) - log p_base(y)) detached x log p_s(y) on their sampled tokens,
    masked; harmful rows keep the loss on S; without coeff_key or with the subset divergence nothing changes."""
    generator = torch.Generator().manual_seed(0)
    batch, width, vocab = 3, 4, 9
    logits = torch.randn(batch, width, vocab, generator=generator, requires_grad=True)
    sequences = torch.randint(0, vocab, (batch, width + 2), generator=generator)
    base = torch.log_softmax(torch.randn(batch, width, vocab, generator=generator), -1)
    sampled = sequences[:, 1:][:, -width:]
    base_sampled = base.gather(-1, sampled[..., None])[..., 0]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    per_token = torch.full((batch, width), 7.0)
    experience = SimpleNamespace(info={"teacher_scale": torch.tensor([1.0, 0.0, 0.0])}, sequences=sequences,
                                 base_action_log_probs=base_sampled)
    got = _retain_step_self()(per_token, logits, experience, mask)
    student = torch.log_softmax(logits, -1).gather(-1, sampled[..., None])[..., 0]
    want = (student - base_sampled).detach() * student * mask
    assert torch.equal(got[0], per_token[0])
    torch.testing.assert_close(got[1:], want[1:])
    experience.info["teacher_scale"] = [1.0, 0.0, 0.0]        # as OpenRLHF's batching may hand it back
    torch.testing.assert_close(_retain_step_self()(per_token, logits, experience, mask)[1:], want[1:])
    for step in (_retain_step_self(coeff_key=None), _retain_step_self(divergence="subset")):
        assert torch.equal(step(per_token, logits, experience, mask), per_token)


def test_sampled_retain_estimate_has_the_full_vocabulary_kl_gradient():
    """At one position, the plugin's retain estimate (SafeSteerActorTrainer._with_retain_rows) averaged over
    y ~ p_s has the gradient of KL(p_s || p_base) over the whole vocabulary, which the local engine takes.
    The average is exact: one retain row per vocabulary id y as the sampled token, weighted by p_s(y)."""
    generator = torch.Generator().manual_seed(1)
    vocab = 7
    leaf = torch.randn(vocab, generator=generator, requires_grad=True)
    base = torch.log_softmax(torch.randn(vocab, generator=generator), -1)
    student = torch.log_softmax(leaf, -1)
    kl = (student.exp() * (student - base)).sum()
    (want,) = torch.autograd.grad(kl, leaf)

    ids = torch.arange(vocab)
    logits = leaf.expand(vocab, 1, vocab)                      # (B=V, A=1, V): the same position in every row
    sequences = torch.stack([torch.zeros(vocab, dtype=torch.long), ids], dim=1)    # (V, 2): row y samples y
    experience = SimpleNamespace(info={"teacher_scale": torch.zeros(vocab)}, sequences=sequences,
                                 base_action_log_probs=base[ids, None])
    mask = torch.ones(vocab, 1)
    per_token = _retain_step_self()(torch.full((vocab, 1), 7.0), logits, experience, mask)   # (V, 1)
    weights = torch.softmax(leaf, -1).detach()                 # p_s(y): the exact expectation over y ~ p_s
    (got,) = torch.autograd.grad((weights * per_token[:, 0]).sum(), leaf)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert want.abs().max() > 1e-2                             # a vanishing term (base = student) would give 0
