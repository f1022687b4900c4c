"""The plugin on whichever OpenRLHF release is on the path: the version gate, the features it detects, and each
adapter of `plugin.versions`. Runs in the normal suite (OpenRLHF 0.11.2) and, through
test_openrlhf_release_matrix.py, once more on each older supported release's own code."""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from openrlhf_safesteer.plugin import compat, versions

compat.install_import_stand_ins()

from openrlhf.models import Actor  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer  # noqa: E402

from openrlhf_safesteer import testing  # noqa: E402
from openrlhf_safesteer.objectives import gather_logprobs, localized_reverse_kl  # noqa: E402
from openrlhf_safesteer.plugin import _loss_compat  # noqa: E402
from openrlhf_safesteer.plugin.config import SafeSteerConfig, default_openrlhf_flags  # noqa: E402
from openrlhf_safesteer.plugin.policy import TEACHER_ON_S, SafeSteerActorTrainer, SafeSteerPolicyActor  # noqa: E402
from openrlhf_safesteer.plugin.teacher import SteeredReferenceActor  # noqa: E402
from openrlhf_safesteer.steering import SteeringVector, steer  # noqa: E402

# What the review of the released wheels found each release lacking (docs/openrlhf.md, "Supported versions").
KNOWN_GAPS = {
    "0.10.2": {"loss_agg_mode_flag", "is_correction_level", "step_loss_info", "aggregate_loss"},
    "0.10.3": {"loss_agg_mode_flag", "is_correction_level", "step_loss_info"},
    "0.10.4": {"loss_agg_mode_flag", "is_correction_level"},
    "0.11.0": {"loss_agg_mode_flag", "is_correction_level"},
    "0.11.1": {"loss_agg_mode_flag", "is_correction_level"},
    "0.11.2": set(),
}
INSTALLED = versions.installed_version()
TEMPERATURE = 2.0


# ------------------------------------------------------------------------------------------------ the gate

FULL = versions.Features(dotted_flags=True, loss_agg_mode_flag=True, is_correction_level=True, step_loss_info=True,
                         aggregate_loss=True)
FLAT = versions.Features(dotted_flags=False, loss_agg_mode_flag=False, is_correction_level=False,
                         step_loss_info=False, aggregate_loss=False)


@pytest.mark.parametrize("version, found", [("0.10.1", FULL), ("0.9.10", FULL), ("0.10.1.post2", FLAT),
                                            ("0.10.2", FLAT)])
def test_releases_before_0_10_2_or_without_dotted_flags_are_refused_in_one_line(version, found):
    refusal, warning = versions.gate(version, found)
    assert warning is None
    assert refusal == (f"OpenRLHF {version} is older than 0.10.2, the oldest release SafeSteer supports (flat flags "
                       "such as --pretrain need a port): upgrade to openrlhf>=0.10.2")


@pytest.mark.parametrize("version", ["0.10.2", "0.10.4", "0.11.1", "0.11.2", "0.11.2+local", "0.11.2.post1"])
def test_supported_releases_pass_the_gate_silently(version):
    assert versions.gate(version, FULL) == (None, None)


@pytest.mark.parametrize("version", ["0.11.3", "0.12.0", "1.0"])
def test_a_newer_release_runs_with_a_warning_naming_the_tested_range(version):
    refusal, warning = versions.gate(version, FULL)
    assert refusal is None
    assert f"OpenRLHF {version} is newer than the releases SafeSteer was tested with (0.10.2 to 0.11.2)" in warning


def test_no_openrlhf_is_a_refusal_naming_the_range():
    refusal, _ = versions.gate(None, None)
    assert refusal.startswith("OpenRLHF is not installed") and "0.10.2 to 0.11.2" in refusal


def test_the_installed_release_passes_and_its_gaps_are_the_known_ones():
    assert versions.check_installed() == INSTALLED
    assert INSTALLED in KNOWN_GAPS, f"OpenRLHF {INSTALLED} is not in the tested range"
    assert {gap.feature for gap in versions.features().missing()} == KNOWN_GAPS[INSTALLED]
    # Logits divided by the temperature arrived in 0.11.1: found by running Actor.forward, not from the version.
    assert versions.actor_scales_logits() == (versions.release(INSTALLED) >= (0, 11, 1))


# -------------------------------------------------------------------------------------------- the adapters


def test_flags_the_launcher_adds_are_ones_this_parser_knows():
    has_flag = versions.default_flags_supported()["--actor.loss_agg_mode"]
    argv = default_openrlhf_flags([], "sampled", loss_agg_mode=has_flag)
    assert ("--actor.loss_agg_mode" in argv) == versions.features().loss_agg_mode_flag
    assert "--actor.loss_agg_mode" not in default_openrlhf_flags([], "sampled", loss_agg_mode=False)


@pytest.mark.parametrize("advantage, expected", [
    (SimpleNamespace(is_correction_level="off"), (False, "--algo.advantage.is_correction_level")),
    (SimpleNamespace(is_correction_level="token"), (True, "--algo.advantage.is_correction_level")),
    (SimpleNamespace(is_correction_enable=False), (False, "--algo.advantage.is_correction_enable")),
    (SimpleNamespace(is_correction_enable=True), (True, "--algo.advantage.is_correction_enable")),
])
def test_is_correction_reads_either_flag(advantage, expected):
    assert versions.is_correction(advantage) == expected


def test_sampled_dry_run_with_hf_rollout_passes_this_releases_parser(tiny_run, tmp_path, cpu_flags):
    """The two flag differences end to end: the launcher adds only flags this parser has (sampled objective), and
    the HF-rollout refusals read whichever is_correction flag it has."""
    from openrlhf_safesteer.cli import train_safesteer_ray

    argv = cpu_flags(tiny_run, tmp_path, ["--safesteer.objective", "sampled", "--safesteer.rollout", "hf",
                                          "--safesteer.dry_run"])
    assert train_safesteer_ray.main(argv) == 0


def _light_stock_init(self, strategy, actor_, ema_model, actor_optim, actor_scheduler, **kwargs):
    """ActorPPOTrainer.__init__ without its torch.distributed group and vLLM sync: the attributes the steps read,
    and this release's real PolicyLoss with its defaults."""
    from openrlhf.models import PolicyLoss

    self.strategy, self.args, self.actor, self.ema_model = strategy, strategy.args, actor_, ema_model
    self.actor_optim, self.actor_scheduler, self.replay_buffer = actor_optim, actor_scheduler, None
    self.actor_loss_fn = PolicyLoss()


def _trainer(objective: str, monkeypatch, model=None, temperature: float = 1.0):
    monkeypatch.setattr(ActorPPOTrainer, "__init__", _light_stock_init)
    config = SafeSteerConfig(objective=objective, rollout="hf", safety_ids=[3, 5]).namespace()
    strategy = testing.RecordingStrategy(config)
    # The parsed args as this release's parser makes them: loss_agg_mode only where the flag exists.
    actor_args = {"loss_agg_mode": "token-mean"} if versions.features().loss_agg_mode_flag else {}
    strategy.args.actor = SimpleNamespace(**actor_args)
    wrapped = Actor(model, temperature=temperature) if model is not None else None
    if wrapped is not None:
        wrapped.packing_samples = False
    return SafeSteerActorTrainer(strategy, wrapped, None, None, SimpleNamespace(get_last_lr=lambda: [1e-3]))


def test_sampled_step_aggregates_per_sequence_and_passes_loss_batch_info_only_where_accepted(monkeypatch):
    trainer = _trainer("sampled", monkeypatch)
    # 0.11.2 gets seq-mean-token-mean from --actor.loss_agg_mode, which the launcher sets; before, the step sets it.
    assert trainer.actor_loss_fn.token_level_loss is versions.features().loss_agg_mode_flag
    calls = []
    stock = ActorPPOTrainer.training_step

    @functools.wraps(stock)   # keeps the stock signature, which the adapter inspects
    def recorder(self, experience, kl_ctl, step, *args, **kwargs):
        calls.append(kwargs)
        return {}

    monkeypatch.setattr(ActorPPOTrainer, "training_step", recorder)
    info = {"dp_size": 1}
    trainer.training_step(None, 0.0, 0, info)
    assert calls == [{"loss_batch_info": info} if versions.features().step_loss_info else {}]


def test_loss_functions_are_openrlhfs_where_it_has_them_else_the_copies():
    aggregate, batch_info = versions.loss_functions()
    assert (aggregate is _loss_compat.aggregate_loss) == (not versions.features().aggregate_loss)
    assert (batch_info is _loss_compat.get_loss_batch_info) == (not versions.features().aggregate_loss)
    # The copy reduces as 0.11.2 does: token mean per sequence, mean over non-empty sequences.
    loss = torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    info = _loss_compat.get_loss_batch_info(None, mask)
    assert float(info["global_batch_size"]) == 2 and float(info["batch_num_tokens"]) == 3
    for function in {aggregate, _loss_compat.aggregate_loss}:
        assert float(function(loss, mask, token_level_loss=False, **info)) == pytest.approx((2.0 + 4.0) / 2)
        assert float(function(loss, mask, token_level_loss=True, **info)) == pytest.approx(8.0 / 3)


# ------------------------------------------------------------------------------------------ the temperature


@pytest.fixture(scope="module")
def tiny():
    tokenizer = testing.tiny_tokenizer()
    model = testing.tiny_model("llama", tokenizer, layers=2, hidden=64, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    sequences, attention, action = testing.right_padded_batch(tokenizer.pad_token_id, (9, 6, 11), 4, generator)
    vector = SteeringVector(vector=3 * torch.randn(64, generator=generator), layer=1, model_name="tiny")
    ids = torch.tensor(sorted(set(tokenizer.encode(" sorry cannot illegal harmful", add_special_tokens=False))))
    return SimpleNamespace(model=model, sequences=sequences, attention=attention, action=action, vector=vector,
                           ids=ids)


def _reference_logprobs(tiny, steered: bool) -> torch.Tensor:
    """log softmax(logits / T) of the bare HF model (B, T-1, V), computed here without OpenRLHF: what 0.11.2's
    Actor returns and what the rollout sampled from."""
    position_ids = (tiny.attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), (steer(tiny.model, tiny.vector) if steered else contextlib.nullcontext()):
        logits = tiny.model(tiny.sequences, attention_mask=tiny.attention, position_ids=position_ids).logits
    return F.log_softmax(logits[:, :-1].float() / TEMPERATURE, dim=-1)


def test_teacher_and_student_logprobs_are_at_the_rollout_temperature(tiny):
    """At T = 2 the teacher's and the student's log-probs (sampled tokens and S) are those of logits / T on this
    release too, whether or not its Actor divides the logits it returns (0.11.1 on) or leaves them (before)."""
    strategy = SimpleNamespace(ring_attn_group=None,
                               args=SimpleNamespace(safesteer=SimpleNamespace(safety_ids=tiny.ids.tolist())))

    def actor():
        wrapped = Actor(tiny.model, temperature=TEMPERATURE)
        wrapped.packing_samples = False
        return wrapped

    teacher_self = SimpleNamespace(model=actor(), strategy=strategy, safety_ids=tiny.ids,
                                   steering_vector=tiny.vector, coeff=tiny.vector.coeff)
    teacher = SteeredReferenceActor.forward(teacher_self, tiny.sequences, tiny.action, tiny.attention)
    student = SafeSteerPolicyActor.forward(SimpleNamespace(actor=actor(), strategy=strategy), tiny.sequences,
                                           tiny.action, tiny.attention)
    mask = tiny.action.float()
    sampled = tiny.sequences[:, 1:].unsqueeze(-1)
    for got, steered in ((teacher, True), (student, False)):
        reference = _reference_logprobs(tiny, steered)
        torch.testing.assert_close(got["logprobs"], reference.gather(-1, sampled).squeeze(-1) * mask,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["logprobs_on_s"], reference[..., tiny.ids] * mask.unsqueeze(-1),
                                   atol=1e-5, rtol=1e-5)
    # Not vacuous: at T = 1 the same tokens have other log-probs.
    plain = F.log_softmax(_reference_logprobs(tiny, False) * TEMPERATURE, dim=-1)
    assert (plain.gather(-1, sampled).squeeze(-1) * mask - student["logprobs"]).abs().max() > 1e-2


def test_exact_step_loss_is_at_the_rollout_temperature(tiny, monkeypatch):
    trainer = _trainer("exact", monkeypatch, model=tiny.model, temperature=TEMPERATURE)
    generator = torch.Generator().manual_seed(1)
    teacher_on_s = torch.log_softmax(torch.randn(*tiny.action.shape, 512, generator=generator), -1)[..., tiny.ids]
    mask = tiny.action.float()
    teacher_on_s = teacher_on_s * mask.unsqueeze(-1)
    trainer.safety_ids = tiny.ids
    experience = Experience(sequences=tiny.sequences, attention_mask=tiny.attention, action_mask=tiny.action, info={})
    setattr(experience, TEACHER_ON_S, teacher_on_s)
    trainer.training_step(experience, kl_ctl=0.0, step=0)
    tiny.model.zero_grad(set_to_none=True)
    tiny.model.eval()
    student = _reference_logprobs(tiny, steered=False)
    expected, _ = localized_reverse_kl(student, teacher_on_s, tiny.ids, mask)
    assert float(trainer.strategy.losses[0]) == pytest.approx(float(expected), rel=1e-4)
    assert gather_logprobs(student, tiny.ids).shape == teacher_on_s.shape


def test_stand_ins_read_as_not_installed_by_transformers_of_every_supported_stack():
    """transformers 5.5-5.7 (OpenRLHF 0.10.x's pins) index their import-name -> distribution map by the name
    find_spec found; without an entry for the flash_attn stand-in, is_flash_attn_2_available raised KeyError in the
    launcher's dry run on 0.10.4's own stack. The entry names no installed distribution."""
    import importlib.metadata

    from transformers.utils import import_utils

    compat.install_import_stand_ins()
    for name in compat.stand_ins_needed():
        distributions = import_utils.PACKAGE_DISTRIBUTION_MAPPING[name]   # the lookup that raised
        for distribution in distributions:
            with pytest.raises(importlib.metadata.PackageNotFoundError):
                importlib.metadata.version(distribution)
    assert not import_utils.is_flash_attn_2_available()
