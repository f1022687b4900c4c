"""The plugin's policy step and experience maker on ragged batches, without Ray (review 13, findings 4 and 5).

- SafeSteerActorTrainer._exact_training_step: the loss it backpropagates is docs/METHOD.md section 4's
  (token mean of L_t within each sequence, then mean over sequences), read from the logits at the
  positions that predict each response token. Response lengths differ, so a token-level mean gives
  another number; the logits vary with the position, so reading them one position late does too.
- SafeSteerExperienceMaker.make_experience: the student's and the teacher's results land in the
  right fields, and the per-sequence KL over S and masses on S it logs equal a recount by hand.

Only what the plugin code does not own is stubbed: OpenRLHF's ActorPPOTrainer.__init__ (it needs a
torch.distributed group), the strategy (DeepSpeed), the actor (returns fixed logits), the Ray actor
groups (return fixed log-probs) and `ray.get`. The plugin methods themselves run unchanged.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from openrlhf_safesteer.plugin import compat

compat.install_import_stand_ins()

from openrlhf.trainer.ppo_utils import experience_maker as stock_maker  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer  # noqa: E402

from openrlhf_safesteer.plugin.config import SafeSteerConfig  # noqa: E402
from openrlhf_safesteer.plugin.experience import TEACHER_SAMPLED, SafeSteerExperienceMaker  # noqa: E402
from openrlhf_safesteer.plugin.policy import TEACHER_ON_S, SafeSteerActorTrainer  # noqa: E402
from openrlhf_safesteer.testing import RecordingStrategy, light_trainer_init  # noqa: E402

VOCAB = 12
SAFETY_IDS = [2, 5, 9]
PROMPT_LEN = 3


def ragged_batch(lengths, seed=0):
    """Right-padded prompt + response sequences of PROMPT_LEN + lengths[i] tokens; action mask (B, T - 1)
    is 1 at the positions predicting a response token (OpenRLHF's layout, as in test_openrlhf_units.py)."""
    generator = torch.Generator().manual_seed(seed)
    total = PROMPT_LEN + max(lengths)
    sequences = torch.zeros((len(lengths), total), dtype=torch.long)
    attention = torch.zeros((len(lengths), total), dtype=torch.long)
    action = torch.zeros((len(lengths), total - 1), dtype=torch.bool)
    for row, length in enumerate(lengths):
        sequences[row, : PROMPT_LEN + length] = torch.randint(1, VOCAB, (PROMPT_LEN + length,), generator=generator)
        attention[row, : PROMPT_LEN + length] = 1
        action[row, PROMPT_LEN - 1: PROMPT_LEN - 1 + length] = True
    return sequences, attention, action


# ----------------------------------------------------------------------------- finding 4: the policy step


class FixedLogitsActor:
    """Stands in for OpenRLHF's Actor: returns the same (B, T, V) logits, a leaf with a gradient."""

    def __init__(self, logits):
        self.logits = logits.clone().requires_grad_(True)
        self.calls = []

    def __call__(self, sequences, num_actions, attention_mask=None, return_output=False, **kwargs):
        self.calls.append((sequences, attention_mask, return_output))
        return {"logits": self.logits}

    def model(self, sequences, attention_mask=None, position_ids=None, logits_to_keep=0):
        """The HF model inside: the last `logits_to_keep` positions' logits (all with 0), as transformers does."""
        self.calls.append((sequences, attention_mask, logits_to_keep))
        return {"logits": self.logits[:, -logits_to_keep:] if logits_to_keep else self.logits}

    def train(self):
        pass

    def parameters(self):
        return iter([self.logits])


def make_trainer(monkeypatch, logits, divergence="reverse"):
    """A real SafeSteerActorTrainer (its own __init__ runs) over the stock base class minus its distributed setup."""

    monkeypatch.setattr(ActorPPOTrainer, "__init__", light_trainer_init)
    config = SafeSteerConfig(objective="exact", divergence=divergence, rollout="hf", safety_ids=SAFETY_IDS).namespace()
    strategy = RecordingStrategy(config)
    actor = FixedLogitsActor(logits)
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    trainer = SafeSteerActorTrainer(strategy, actor, None, None, scheduler)
    return trainer, strategy, actor


def by_hand_loss(logits, teacher_on_s, action):
    """docs/METHOD.md section 4, one sequence and one position at a time: L_t = sum_{v in S} p_s(v) (log p_s(v) -
    log p_t(v)) with p_s the full-vocabulary softmax of the logits at the position BEFORE the response token
    (logits (B, T, V); action (B, T - 1): column j predicts token j + 1, read from logits[:, j]); token mean
    within each sequence, then mean over the sequences with at least one response token."""
    per_sequence = []
    for row in range(action.shape[0]):
        terms = []
        for j in range(action.shape[1]):
            if not action[row, j]:
                continue
            log_p = torch.log_softmax(logits[row, j].double(), dim=-1)
            terms.append(sum(log_p[v].exp() * (log_p[v] - teacher_on_s[row, j, k].double())
                             for k, v in enumerate(SAFETY_IDS)))
        if terms:
            per_sequence.append(sum(terms) / len(terms))
    return sum(per_sequence) / len(per_sequence)


def test_exact_step_loss_is_sequence_mean_on_a_ragged_batch(monkeypatch):
    """Responses of 5, 1, 7 and 0 tokens: the loss handed to backward, its gradient and the logged metrics
    equal docs/METHOD.md's per-sequence-then-batch mean, recomputed by hand from the same logits."""
    lengths = (5, 1, 7, 0)
    sequences, attention, action = ragged_batch(lengths)
    generator = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(len(lengths), sequences.shape[1], VOCAB, generator=generator)
    teacher_on_s = torch.log_softmax(2 * torch.randn(*action.shape, VOCAB, generator=generator), -1)[..., :3]
    teacher_on_s = teacher_on_s * action.unsqueeze(-1)  # as teacher_outputs() returns them
    experience = Experience(sequences=sequences, attention_mask=attention, action_mask=action, info={})
    setattr(experience, TEACHER_ON_S, teacher_on_s)
    trainer, strategy, actor = make_trainer(monkeypatch, logits)

    status = trainer.training_step(experience, kl_ctl=0.0, step=0)

    # The actor was asked for the whole batch.
    assert len(actor.calls) == 1 and actor.calls[0][0] is sequences and actor.calls[0][1] is attention
    expected = by_hand_loss(logits, teacher_on_s, action)
    [loss] = strategy.losses
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert status["metrics"]["policy_loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    # The gradient that reaches the actor is that loss's gradient.
    leaf = logits.clone().requires_grad_(True)
    by_hand_loss(leaf, teacher_on_s, action).backward()
    torch.testing.assert_close(actor.logits.grad.double(), leaf.grad.double(), atol=1e-6, rtol=1e-4)
    assert actor.logits.grad[:, -1].abs().max() == 0  # the last position predicts nothing

    # Guard: on this batch the alternatives the audit names give other numbers (else the test could not fail).
    token_mean = sum(by_hand_loss(logits, teacher_on_s, action & (torch.arange(4) == r).unsqueeze(-1)) * n
                     for r, n in enumerate(lengths) if n) / sum(lengths)
    late = by_hand_loss(torch.cat([logits[:, 1:], logits[:, :1]], 1), teacher_on_s, action)
    assert abs(token_mean - expected) > 1e-2 and abs(late - expected) > 1e-2

    # The logged watch metrics (docs/METHOD.md: mass on S, KL over S), reduced per sequence then over sequences.
    rows = [r for r, n in enumerate(lengths) if n]
    log_p = torch.log_softmax(logits[:, :-1].double(), -1)

    def seq_mean(per_token):
        return sum(per_token[r][action[r]].mean() for r in rows) / len(rows)

    student_s = log_p[..., SAFETY_IDS]
    assert status["metrics"]["safesteer/student_mass_on_S"].item() == pytest.approx(
        seq_mean(student_s.exp().sum(-1)).item(), rel=1e-5)
    assert status["metrics"]["safesteer/teacher_mass_on_S"].item() == pytest.approx(
        seq_mean(teacher_on_s.double().exp().sum(-1)).item(), rel=1e-5)
    assert status["metrics"]["safesteer/kl_on_S"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert status["num_action_tokens"] == sum(lengths) and status["num_samples"] == len(lengths)


def test_exact_step_normalises_over_the_whole_optimizer_step(monkeypatch):
    """Two micro-batches of one optimizer step, each given the step's loss_batch_info (global_batch_size =
    sequences in the step): their losses add up to the per-sequence mean over the whole step, whatever the
    micro-batches' lengths (OpenRLHF's gradient accumulation sums the micro-batch gradients)."""
    lengths = (6, 2, 1, 4, 3)
    sequences, attention, action = ragged_batch(lengths, seed=3)
    generator = torch.Generator().manual_seed(4)
    logits = 2 * torch.randn(len(lengths), sequences.shape[1], VOCAB, generator=generator)
    teacher_on_s = torch.log_softmax(torch.randn(*action.shape, VOCAB, generator=generator), -1)[..., :3]
    teacher_on_s = teacher_on_s * action.unsqueeze(-1)
    expected = by_hand_loss(logits, teacher_on_s, action)

    total = 0.0
    for part in (slice(0, 2), slice(2, 5)):
        experience = Experience(sequences=sequences[part], attention_mask=attention[part], action_mask=action[part],
                                info={})
        setattr(experience, TEACHER_ON_S, teacher_on_s[part])
        trainer, strategy, _actor = make_trainer(monkeypatch, logits[part])
        info = {"dp_size": 1, "batch_num_tokens": torch.tensor(float(sum(lengths))),
                "global_batch_size": torch.tensor(float(len(lengths)))}
        trainer.training_step(experience, kl_ctl=0.0, step=0, loss_batch_info=info)
        total += strategy.losses[0].item()
    assert total == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_exact_step_without_teacher_log_probs_is_a_clear_error(monkeypatch):
    sequences, attention, action = ragged_batch((2, 3))
    trainer, _strategy, _actor = make_trainer(monkeypatch, torch.zeros(2, sequences.shape[1], VOCAB))
    experience = Experience(sequences=sequences, attention_mask=attention, action_mask=action, info={})
    with pytest.raises(RuntimeError, match="carries no teacher log-probs on S"):
        trainer.training_step(experience, kl_ctl=0.0, step=0)


# ----------------------------------------------------------------------------- finding 5: the experience maker


class StubGroup:
    """Stands in for a RayActorGroup of policy (or reference) actors: `async_run_method_batch` answers with
    fixed per-micro-batch results, one list per "actor" (two actors, one micro-batch each), as ray.get would."""

    def __init__(self, results):
        self.results = results
        self.calls = []

    def async_run_method_batch(self, method_name, **kwargs):
        self.calls.append((method_name, kwargs))
        return [[result] for result in self.results]


def fake_forward(action, generator, boost):
    """What SafeSteerPolicyActor.forward / teacher_outputs return: full-vocabulary log-probs of the sampled
    tokens and on S (zero outside the action mask). `boost` raises S's logits, so its mass differs."""
    logits = torch.randn(*action.shape, VOCAB, generator=generator)
    logits[..., SAFETY_IDS] += boost
    log_p = torch.log_softmax(logits, -1)
    sampled = torch.randint(0, VOCAB, action.shape, generator=generator)
    mask = action.float()
    return {"logprobs": log_p.gather(-1, sampled.unsqueeze(-1)).squeeze(-1) * mask,
            "logprobs_on_s": log_p[..., SAFETY_IDS] * mask.unsqueeze(-1)}


def make_maker(monkeypatch, objective, lengths_per_batch):
    monkeypatch.setattr(stock_maker, "ray", SimpleNamespace(get=lambda refs: refs))  # results, not object refs
    generator = torch.Generator().manual_seed(7)
    samples, students, teachers = [], [], []
    for index, lengths in enumerate(lengths_per_batch):
        sequences, attention, action = ragged_batch(lengths, seed=10 + index)
        samples.append(Experience(sequences=sequences, attention_mask=attention, action_mask=action, info={}))
        students.append(fake_forward(action, generator, boost=-1.0))
        teachers.append(fake_forward(action, generator, boost=2.0))
    args = SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator="reinforce")),
        ds=SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1),
        train=SimpleNamespace(colocate_all=False, colocate_actor_ref=False),
        safesteer=SafeSteerConfig(objective=objective, safety_ids=SAFETY_IDS).namespace())
    student_group, teacher_group = StubGroup(students), StubGroup(teachers)
    maker = SafeSteerExperienceMaker(student_group, None, None, teacher_group, None, SimpleNamespace(args=args), None)
    return maker, samples, students, teachers, (student_group, teacher_group)


def by_hand_safety(student_on_s, teacher_on_s, action):
    """Per sequence, the mean over its response positions of KL over S, student mass and teacher mass."""
    out = {"kl_on_S": [], "student_mass_on_S": [], "teacher_mass_on_S": []}
    for row in range(action.shape[0]):
        kl, mass_s, mass_t = [], [], []
        for j in range(action.shape[1]):
            if action[row, j]:
                s, t = student_on_s[row, j].double(), teacher_on_s[row, j].double()
                kl.append(sum(math.exp(a) * (a - b) for a, b in zip(s.tolist(), t.tolist())))
                mass_s.append(sum(math.exp(a) for a in s.tolist()))
                mass_t.append(sum(math.exp(b) for b in t.tolist()))
        out["kl_on_S"].append(sum(kl) / len(kl))
        out["student_mass_on_S"].append(sum(mass_s) / len(mass_s))
        out["teacher_mass_on_S"].append(sum(mass_t) / len(mass_t))
    return out


def test_make_experience_routes_student_and_teacher_and_logs_safety_per_sequence(monkeypatch):
    """Two ragged micro-batches (sampled objective): the student's log-probs become action_log_probs, the
    teacher's ride along, and the logged kl_on_S / masses on S equal a per-sequence recount by hand."""
    lengths_per_batch = [(4, 1, 6), (2, 5)]
    maker, samples, students, teachers, groups = make_maker(monkeypatch, "sampled", lengths_per_batch)

    out = maker.make_experience(samples)

    assert out is samples and len(out) == 2
    for group in groups:  # both actor groups scored every micro-batch, as laid out
        [(method, kwargs)] = group.calls
        assert method == "forward"
        assert all(a is s.sequences for a, s in zip(kwargs["sequences"], samples))
        assert all(a is s.action_mask for a, s in zip(kwargs["action_mask"], samples))
        assert all(a is s.attention_mask for a, s in zip(kwargs["attention_mask"], samples))
    for experience, student, teacher, lengths in zip(out, students, teachers, lengths_per_batch):
        mask = experience.action_mask
        assert torch.equal(experience.action_log_probs, student["logprobs"])
        assert torch.equal(getattr(experience, TEACHER_SAMPLED), teacher["logprobs"])
        log_ratio = (student["logprobs"] - teacher["logprobs"]) * mask
        torch.testing.assert_close(experience.kl, log_ratio)
        by_hand_kl = [sum(log_ratio[r][mask[r]].tolist()) / n for r, n in enumerate(lengths)]
        torch.testing.assert_close(experience.info["kl"].double(), torch.tensor(by_hand_kl, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-5)
        expected = by_hand_safety(student["logprobs_on_s"], teacher["logprobs_on_s"], mask)
        for key, values in expected.items():
            torch.testing.assert_close(experience.info[key].double(), torch.tensor(values, dtype=torch.float64),
                                       atol=1e-6, rtol=1e-5, msg=key)
        # The planted masses differ (teacher boosted on S), so a student/teacher swap could not pass.
        assert min(expected["teacher_mass_on_S"]) > max(expected["student_mass_on_S"]) + 0.1
        assert torch.equal(experience.rewards, torch.zeros(len(lengths)))
        assert experience.base_action_log_probs is None and experience.values is None


def test_make_experience_exact_objective_asks_only_the_teacher(monkeypatch):
    """objective `exact`: the policy step recomputes the student with gradient (and logs its KL over S from it),
    so the maker makes no student forward; the teacher's log-probs on S ride along for the loss."""
    maker, samples, _students, teachers, (student_group, teacher_group) = make_maker(monkeypatch, "exact",
                                                                                      [(4, 1, 6), (2, 5)])
    out = maker.make_experience(samples)
    assert student_group.calls == [] and [method for method, _ in teacher_group.calls] == ["forward"]
    for experience, teacher in zip(out, teachers):
        assert torch.equal(getattr(experience, TEACHER_ON_S), teacher["logprobs_on_s"])
        assert torch.equal(getattr(experience, TEACHER_SAMPLED), teacher["logprobs"])
        assert experience.action_log_probs.shape == experience.action_mask.shape
        assert experience.kl is None and "kl_on_S" not in experience.info


def test_make_experience_sampled_objective_carries_no_teacher_on_s(monkeypatch):
    """objective `sampled`: no (B, A, K) tensor rides along, and the advantages computed afterwards come
    from the student's and teacher's sampled-token log-probs: -[y in S] (log p_s(y) - log p_t(y) + 1)."""
    maker, samples, students, teachers, _groups = make_maker(monkeypatch, "sampled", [(3, 5)])
    [experience] = maker.make_experience(samples)
    assert not hasattr(experience, TEACHER_ON_S)
    sequences, action = experience.sequences, experience.action_mask
    sequences[0, PROMPT_LEN] = SAFETY_IDS[1]  # a planted safety token in the first response
    sequences[1, PROMPT_LEN + 2] = SAFETY_IDS[0]
    [experience] = maker.compute_advantages_and_returns([experience])
    student, teacher = students[0]["logprobs"], teachers[0]["logprobs"]
    expected = torch.zeros(action.shape)
    for row in range(action.shape[0]):
        for j in range(action.shape[1]):
            if action[row, j] and int(sequences[row, j + 1]) in SAFETY_IDS:
                expected[row, j] = -(student[row, j] - teacher[row, j] + 1)
    assert (expected != 0).sum() >= 2  # the planted ones, and any sampled by chance
    torch.testing.assert_close(experience.advantages, expected)
