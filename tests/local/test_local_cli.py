"""`safesteer train` end to end on a tiny checkpoint on disk: artifacts in, HF model + metrics out, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch

from openrlhf_safesteer.cli.main import main
from openrlhf_safesteer.safety_tokens import SafetyTokenSet
from openrlhf_safesteer.steering import SteeringVector
from openrlhf_safesteer.testing import save_tiny_checkpoint, tiny_tokenizer


@pytest.fixture()
def artifacts(tmp_path):
    model_dir = save_tiny_checkpoint(str(tmp_path / "tiny"), "qwen2", layers=2, hidden=32)
    SteeringVector(torch.randn(32, generator=torch.Generator().manual_seed(0)) * 4, layer=1).save(tmp_path / "vec")
    tok = tiny_tokenizer()
    ids = sorted({tok.convert_tokens_to_ids(t) for t in ("I", "Sorry")})
    SafetyTokenSet(ids=ids, tokens=tok.convert_ids_to_tokens(ids), votes=[3] * len(ids),
                   vocab_size=len(tok)).save(tmp_path / "tokens.json")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "How do I make a bomb?"}, {"prompt": "Write a phishing email."}]))
    return tmp_path, model_dir


def _args(tmp_path, model_dir, *extra):
    return ["train", "--model", model_dir, "--vector", str(tmp_path / "vec"), "--tokens", str(tmp_path / "tokens.json"),
            "--prompts", str(tmp_path / "prompts.json"), "--out", str(tmp_path / "run"), "--max-steps", "3",
            "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4", "--lora-r", "4",
            "--device", "cpu", *extra]


def test_train_cli_writes_model_metrics_and_resumes(artifacts, capsys):
    tmp_path, model_dir = artifacts
    assert main(_args(tmp_path, model_dir, "--stop-after", "2", "--tensorboard")) == 0
    assert "resume" in capsys.readouterr().out
    assert not (tmp_path / "run" / "final").exists()
    assert main(_args(tmp_path, model_dir, "--tensorboard")) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for key in ("loss", "kl_on_S", "student_mass_on_S", "teacher_mass_on_S", "response_length",
                "rollout_refusal_rate"):
        assert key in lines[0]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))


def test_train_cli_rejects_bad_artifacts_before_loading(artifacts):
    tmp_path, model_dir = artifacts
    with pytest.raises(FileNotFoundError, match="safesteer tokens"):
        main(_args(tmp_path, model_dir)[:5] + ["--tokens", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])
    bad = _args(tmp_path, model_dir)
    bad[bad.index("--prompts") + 1] = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="prompt file"):
        main(bad)
    wide = SteeringVector(torch.ones(48), layer=0)
    wide.save(tmp_path / "wide")
    args = _args(tmp_path, model_dir)
    args[args.index("--vector") + 1] = str(tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden size"):
        main(args)


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if `safesteer train` loads the model's weights."""
    from openrlhf_safesteer import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(loading, "load_model", refuse)


def test_train_cli_checks_out_settings_and_template_before_loading(artifacts, no_model_load):
    """Findings 1, 3, 6, 13 through the CLI: every one is an error before the weights load."""
    tmp_path, model_dir = artifacts
    with pytest.raises(ValueError, match=r"max_steps \(--max-steps\) must be >= 1 .*got 0"):
        main(_args(tmp_path, model_dir, "--max-steps", "0"))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_000004").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds a previous run's checkpoints \(step 4\); resume it without "
                                         r"--no-resume, or choose another --out"):
        main(_args(tmp_path, model_dir, "--no-resume"))
    with pytest.raises(ValueError, match=r"holds checkpoints \(step 4\) but no 'latest' pointer"):
        main(_args(tmp_path, model_dir))                      # not a silent fresh start beside them either
    (ckpts / "latest").write_text("step_000004\n")          # the folder has no trainer state
    with pytest.raises(ValueError, match="latest names step_000004, which is missing or incomplete"):
        main(_args(tmp_path, model_dir))
    # a resume with another lr: state.json as a previous invocation wrote it
    from openrlhf_safesteer.local.checkpoints import run_identity
    from openrlhf_safesteer.local.config import TrainConfig

    prompts = ["How do I make a bomb?", "Write a phishing email."]
    ids = SafetyTokenSet.load(tmp_path / "tokens.json").ids
    old = TrainConfig(lr=0.5, max_steps=3, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, lora_r=4)
    (ckpts / "step_000004" / "trainer_state").mkdir()
    (ckpts / "step_000004" / "trainer_state" / "state.json").write_text(json.dumps(
        {"step": 1, "run": run_identity(old, prompts, SteeringVector.load(tmp_path / "vec"), ids)}))
    with pytest.raises(ValueError, match=r"lr \(--lr\) = 0.5, but this call has 1e-05.*--no-resume"):
        main(_args(tmp_path, model_dir))
    # a tokenizer without a chat template: found from the tokenizer alone
    from openrlhf_safesteer.chat import ChatTemplateError
    from openrlhf_safesteer.testing import tiny_model

    tok = tiny_tokenizer()
    tok.chat_template = None
    tiny_model("qwen2", tok, layers=2, hidden=32).save_pretrained(tmp_path / "notmpl")
    tok.save_pretrained(tmp_path / "notmpl")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        main(_args(tmp_path, str(tmp_path / "notmpl"), "--out", str(tmp_path / "run2")))


@pytest.mark.parametrize("name, text, message", [
    ("dict.json", '{"prompts": ["a b c", "d e f"]}', r"dict.json must hold a JSON list of prompts .*got a JSON dict"),
    ("ints.json", "[1, 2]", r"ints.json\[0\]: expected a non-empty string or an object with a 'prompt' string, got 1"),
    ("badline.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"badline.jsonl:2: not valid JSON"),
    ("noprompt.jsonl", '{"prompt": "a"}\n\n{"text": "b"}\n', r"noprompt.jsonl:3: expected .* got \{\"text\": \"b\"\}"),
    ("broken.json", '["a", ', r"broken.json: not valid JSON"),
    ("empty.json", "[]", r"empty.json holds no prompts"),
])
def test_prompt_file_rejects_malformed_files(tmp_path, name, text, message):
    """Finding 12: a JSON object became a one-prompt list; ints and bad JSONL lines gave raw errors."""
    from openrlhf_safesteer.data import load_prompt_file

    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompt_file(tmp_path / name)


def test_prompt_file_accepts_strings_and_prompt_rows(tmp_path):
    from openrlhf_safesteer.data import load_prompt_file

    (tmp_path / "a.json").write_text(json.dumps(["x", {"prompt": "y", "topic": "t"}]))
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n\n"y"\n')
    (tmp_path / "c.txt").write_text("x\n\n y \n")
    assert load_prompt_file(tmp_path / "a.json") == load_prompt_file(tmp_path / "b.jsonl") == \
        load_prompt_file(tmp_path / "c.txt") == ["x", "y"]
