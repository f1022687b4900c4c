"""The launcher's refusals and artifact checks: a clear message, exit status 2, and no Ray started.

Each case goes through OpenRLHF 0.11.2's real parser and validation (the launcher executes its
`__main__`), so a flag OpenRLHF does not know also fails here.
"""

from __future__ import annotations

import pytest
import torch

from openrlhf_safesteer.cli import train_safesteer_ray
from openrlhf_safesteer.plugin import config


class RayStarted(BaseException):
    """Raised by ray.init in `launch`: a BaseException, so no `except Exception` (or the launcher's `except
    AssertionError` for OpenRLHF's validation) can turn it into an exit status."""


def launch(argv, capsys):
    """Run the launcher; fail if it reaches Ray. The worker may hold the suite's shared Ray session (another module's
    test ran first), so "is Ray up?" after the call cannot tell: Ray reads as down here, and starting it fails."""
    import ray

    def start(*args, **kwargs):
        raise RayStarted("a refusal must come before Ray (and any actor) starts")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "is_initialized", lambda: False)
        patch.setattr(ray, "init", start)
        status = train_safesteer_ray.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def flags(cpu_flags):
    def make(run, tmp_path, *extra, dry_run=True):
        return cpu_flags(run, tmp_path, list(extra)) + (["--safesteer.dry_run"] if dry_run else [])

    return make


def test_dry_run_passes_and_prints_the_openrlhf_command(tiny_run, tmp_path, capsys, flags):
    status, out, err = launch(flags(tiny_run, tmp_path), capsys)
    assert status == 0, err
    assert "dry run OK" in out
    # The launcher picks reinforce when the user gave no estimator, so OpenRLHF places no critic.
    assert "--algo.advantage.estimator reinforce" in out
    assert "--safesteer" not in out.split("OpenRLHF command:")[1]


@pytest.mark.parametrize("extra, message", [
    (["--critic.model_name_or_path", "x"], "--critic.model_name_or_path: SafeSteer trains no critic"),
    (["--algo.advantage.estimator", "gae"], "--algo.advantage.estimator gae trains a critic"),
    (["--reward.model_name_or_path", "x"], "--reward.model_name_or_path: SafeSteer uses no reward model"),
    (["--reward.remote_url", "http://localhost:5000/get_reward"], "--reward.remote_url: SafeSteer uses no reward"),
    (["--algo.kl.estimator", "k3", "--safesteer.objective", "sampled"], "--algo.kl.estimator k3: the sampled"),
    (["--algo.kl.use_loss"], "--algo.kl.use_loss adds a KL-to-reference term"),
    (["--algo.kl.init_coef", "0"], "--algo.kl.init_coef must be > 0"),
    (["--train.async_enable"], "--train.async_enable: SafeSteer is on-policy"),
])
def test_refusals_name_the_flag_and_start_nothing(tiny_run, tmp_path, capsys, flags, extra, message):
    status, _, err = launch(flags(tiny_run, tmp_path, *extra), capsys)
    assert status == 2
    assert message in err


def test_machine_checks_refuse_flash_attention_without_cuda(tiny_run, tmp_path, capsys, flags):
    # Not a dry run (those check flags for a GPU cluster, not this machine); still refused before Ray.
    status, _, err = launch(flags(tiny_run, tmp_path, "--ds.attn_implementation", "flash_attention_2",
                                  dry_run=False), capsys)
    assert status == 2
    assert "flash-attn is not installed" in err and "--ds.attn_implementation sdpa" in err


def test_k3_is_allowed_for_the_exact_objective(tiny_run, tmp_path, capsys, flags):
    # The estimator only matters for the sampled form's advantage.
    status, _, err = launch(flags(tiny_run, tmp_path, "--algo.kl.estimator", "k3"), capsys)
    assert status == 0, err


def test_unknown_openrlhf_flag_fails_in_openrlhfs_parser(tiny_run, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        train_safesteer_ray.main(flags(tiny_run, tmp_path, "--algo.not_a_flag", "1"))
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --algo.not_a_flag" in capsys.readouterr().err


def test_unsupported_openrlhf_version_is_refused(tiny_run, tmp_path, capsys, monkeypatch, flags):
    from openrlhf_safesteer.plugin import versions

    monkeypatch.setattr(versions, "installed_version", lambda: "0.10.1")
    status, _, err = launch(flags(tiny_run, tmp_path), capsys)
    assert status == 2
    assert err.strip() == ("error: OpenRLHF 0.10.1 is older than 0.10.2, the oldest release SafeSteer supports (flat "
                           "flags such as --pretrain need a port): upgrade to openrlhf>=0.10.2")


def test_vector_of_another_hidden_size_is_refused_on_the_driver(tiny_run, tmp_path, capsys, flags):
    from openrlhf_safesteer.steering import SteeringVector

    SteeringVector(vector=torch.ones(32), layer=1).save(tmp_path / "vec32")
    status, _, err = launch(flags(tiny_run, tmp_path, "--safesteer.vector", str(tmp_path / "vec32")), capsys)
    assert status == 2
    assert "hidden size 32" in err and "has hidden size 64" in err


def test_vector_layer_out_of_range_is_refused(tiny_run, tmp_path, capsys, flags):
    from openrlhf_safesteer.steering import SteeringVector

    SteeringVector(vector=torch.ones(64), layer=7).save(tmp_path / "vec_l7")
    status, _, err = launch(flags(tiny_run, tmp_path, "--safesteer.vector", str(tmp_path / "vec_l7")), capsys)
    assert status == 2
    assert "targets decoder layer 7" in err and "has 2 layers" in err


def test_safety_ids_outside_the_vocabulary_are_refused(tiny_run, tmp_path, capsys, flags):
    from openrlhf_safesteer.safety_tokens import SafetyTokenSet

    SafetyTokenSet(ids=[3, 100_000], tokens=["a", "b"], votes=[1, 1]).save(tmp_path / "big.json")
    status, _, err = launch(flags(tiny_run, tmp_path, "--safesteer.tokens", str(tmp_path / "big.json")), capsys)
    assert status == 2
    assert "100000 is outside the model's vocabulary" in err


def test_missing_artifacts_are_named(tiny_run, tmp_path, capsys, flags):
    argv = [a for a in flags(tiny_run, tmp_path) if a != "--safesteer.dry_run"]
    argv[argv.index("--safesteer.vector") + 1] = str(tmp_path / "nowhere")
    status, _, err = launch(argv, capsys)
    assert status == 2
    assert "nowhere" in err and "steering-vector folder" in err


def test_safesteer_flags_are_split_from_openrlhfs():
    parsed, rest = config.split_argv(["--a.b", "1", "--safesteer.objective", "sampled", "--safesteer.dry_run",
                                      "--c", "--safesteer.coeff=2.5"])
    assert rest == ["--a.b", "1", "--c"]
    assert (parsed.objective, parsed.dry_run, parsed.coeff) == ("sampled", True, 2.5)
    with pytest.raises(SystemExit):
        config.split_argv(["--safesteer.objective", "nope"])

def test_ray_help_gives_each_default_once():
    options = " ".join(config.build_parser().format_help().split()).split(" --")
    assert not [o for o in options if "(default: None)" in o or o.count("default") > 1]
    assert any("safesteer.objective" in o and "(default: exact)" in o for o in options)


# ---- prompts, tokenizer and malformed artifacts: refused on the driver, also in a dry run --------------------------

def without(argv: list[str], flag: str) -> list[str]:
    return [a for a in argv if a != flag]


def test_prompts_without_the_chat_template_are_refused(tiny_run, tmp_path, capsys, flags):
    status, _, err = launch(without(flags(tiny_run, tmp_path), "--data.apply_chat_template"), capsys)
    assert status == 2
    assert "--data.apply_chat_template is required" in err and "made on prompts rendered with" in err
    # An explicit input template is the user's own rendering: accepted.
    argv = without(flags(tiny_run, tmp_path), "--data.apply_chat_template") + ["--data.input_template",
                                                                              "User: {}\nAssistant:"]
    status, _, err = launch(argv, capsys)
    assert status == 0, err


def test_tokenizer_without_a_chat_template_is_refused(tiny_run, tmp_path, capsys, flags):
    import json
    import shutil
    from pathlib import Path

    model = shutil.copytree(tiny_run["model"], tmp_path / "notmpl")
    (Path(model) / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((Path(model) / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (Path(model) / "tokenizer_config.json").write_text(json.dumps(settings))
    argv = flags(tiny_run, tmp_path)
    argv[argv.index("--actor.model_name_or_path") + 1] = str(model)
    status, _, err = launch(argv, capsys)
    assert status == 2
    assert f"--actor.model_name_or_path {model}" in err and "has no chat template" in err


def test_empty_prompt_dataset_is_refused(tiny_run, tmp_path, capsys, flags):
    (tmp_path / "empty.jsonl").write_text("\n \n")
    argv = flags(tiny_run, tmp_path)
    argv[argv.index("--data.prompt_dataset") + 1] = str(tmp_path / "empty.jsonl")
    status, _, err = launch(argv, capsys)
    assert status == 2
    assert f"--data.prompt_dataset {tmp_path / 'empty.jsonl'} is empty" in err


def test_missing_prompt_dataset_is_refused_before_ray(tiny_run, tmp_path, capsys, caplog, flags):
    argv = flags(tiny_run, tmp_path, dry_run=False)
    argv[argv.index("--data.prompt_dataset") + 1] = str(tmp_path / "nowhere.jsonl")
    status, _, err = launch(argv, capsys)
    assert status == 2
    assert f"--data.prompt_dataset {tmp_path / 'nowhere.jsonl'} does not exist" in err
    # A recipe's dry run comes before its first stage writes the prompts: a warning there, not a refusal.
    status, _, err = launch(argv + ["--safesteer.dry_run"], capsys)
    assert status == 0, err
    assert "nowhere.jsonl does not exist yet" in caplog.text


def test_dataset_problems_leave_hub_names_alone(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "empty_dir").mkdir()
    assert config.dataset_problems("OpenRLHF/prompt-collection-v0.1", dry_run=False) == []
    assert config.dataset_problems(f"{tmp_path / 'p.jsonl'}, Org/name@data", dry_run=False) == []
    problems = config.dataset_problems(f"{tmp_path / 'p.jsonl'},{tmp_path / 'q.jsonl'},{tmp_path / 'empty_dir'}",
                                       dry_run=False)
    assert problems == [f"--data.prompt_dataset {tmp_path / 'q.jsonl'} does not exist",
                        f"--data.prompt_dataset {tmp_path / 'empty_dir'} is an empty folder"]


def test_safety_tokens_of_another_vocabulary_are_refused(tiny_run, tmp_path, capsys, flags):
    from openrlhf_safesteer.safety_tokens import SafetyTokenSet

    ids = tiny_run["safety_ids"]  # the same ids, in range, but naming other strings
    SafetyTokenSet(ids=ids, tokens=[f"other{i}" for i in ids], votes=[1] * len(ids)).save(tmp_path / "other.json")
    status, _, err = launch(flags(tiny_run, tmp_path, "--safesteer.tokens", str(tmp_path / "other.json")), capsys)
    assert status == 2
    assert f"--safesteer.tokens {tmp_path / 'other.json'}" in err and "name other tokens in this tokenizer" in err


@pytest.mark.parametrize("case", ["corrupt tokens", "tokens without ids", "vector format 2", "vector without layer"])
def test_malformed_artifacts_exit_2_naming_the_file(tiny_run, tmp_path, capsys, flags, case):
    import json
    import shutil

    vector, tokens = tiny_run["vector"], tiny_run["tokens"]
    if case.startswith("vector"):
        vector = str(shutil.copytree(vector, tmp_path / "badvec"))
        path = tmp_path / "badvec" / "steering_vector.json"
        data = json.loads(path.read_text())
        if case == "vector format 2":
            data["format_version"] = 2
        else:
            del data["layer"]
        path.write_text(json.dumps(data))
        expected = [str(tmp_path / "badvec"), "unsupported format_version 2" if "2" in case else "missing key 'layer'"]
    else:
        path = tmp_path / "bad.json"
        if case == "corrupt tokens":
            path.write_text('{"format_version": 1 "ids": [1]}')
            expected = [f"error: {path}: ", "Expecting ',' delimiter"]
        else:
            data = json.loads(open(tokens).read())
            del data["ids"]
            path.write_text(json.dumps(data))
            expected = [f"error: {path}: missing key 'ids'"]
        tokens = str(path)
    status, _, err = launch(flags(tiny_run, tmp_path, "--safesteer.vector", vector, "--safesteer.tokens", tokens),
                            capsys)
    assert status == 2, err
    assert "Traceback" not in err
    assert all(part in err for part in expected), err


@pytest.mark.parametrize("coeff", ["nan", "inf", "-inf"])
def test_non_finite_coeff_is_refused(tiny_run, tmp_path, capsys, flags, coeff):
    status, _, err = launch(flags(tiny_run, tmp_path, f"--safesteer.coeff={coeff}"), capsys)
    assert status == 2
    assert "--safesteer.coeff must be a finite number" in err
