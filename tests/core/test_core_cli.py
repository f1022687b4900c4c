"""`safesteer direction` and `safesteer tokens` end to end on the toy refusal model saved to disk."""

from __future__ import annotations

import csv
import json
import re

import pytest

from openrlhf_safesteer.cli.main import main
from openrlhf_safesteer.safety_tokens import SafetyTokenSet
from openrlhf_safesteer.steering import SteeringVector


@pytest.fixture(scope="module")
def toy_dir(toy_refusal, tmp_path_factory):
    model, tok, harmful, harmless = toy_refusal
    path = tmp_path_factory.mktemp("toy") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    files = {}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        files[name] = path.parent / f"{name}.json"
        files[name].write_text(json.dumps([{"prompt": p} for p in prompts]))
    (path.parent / "harmless.txt").write_text("\n".join(harmless[:6]) + "\n")
    return path, files


@pytest.mark.slow
def test_direction_then_tokens(toy_dir, tmp_path, capsys):
    model_dir, files = toy_dir
    vec = tmp_path / "vec"
    rc = main(["direction", "--model", str(model_dir), "--harmful", str(files["harmful"]), "--harmless",
               str(files["harmless"]), "--out", str(vec), "--n-train", "40", "--n-val", "16", "--device", "cpu",
               "--layers", "1", "2", "--positions", "-3", "-1"])
    assert rc == 0
    vector = SteeringVector.load(vec)
    table = json.loads((vec / "candidates.json").read_text())
    selected = [r for r in table if r["selected"]]
    assert len(table) == 4 and len(selected) == 1 and (selected[0]["layer"], selected[0]["position"]) == (vector.layer, vector.position)
    assert (vec / "candidates.png").stat().st_size > 1000
    with open(vec / "candidates.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [(int(r["layer"]), int(r["position"])) for r in csv_rows] == [(r["layer"], r["position"]) for r in table]
    assert [r["selected"] for r in csv_rows].count("True") == 1
    assert vector.model_name == str(model_dir) and vector.source["n_harmful_val"] == 16

    out = tmp_path / "tokens.json"
    rc = main(["tokens", "--model", str(model_dir), "--vector", str(vec), "--prompts",
               str(model_dir.parent / "harmless.txt"), "--out", str(out), "--horizon", "3", "--n-samples", "2",
               "--k", "8", "--k-prime", "10", "--device", "cpu"])
    assert rc == 0
    tokens = SafetyTokenSet.load(out)
    assert 1 <= len(tokens) <= 8 and tokens.config["n_prompts"] == 6 and tokens.config["horizon"] == 3
    assert "safety tokens" in capsys.readouterr().out


def test_missing_inputs_fail_before_loading_the_model(tmp_path):
    # The model path does not exist either: the prompt / vector check must come first.
    with pytest.raises(FileNotFoundError, match="prompt file"):
        main(["direction", "--model", str(tmp_path / "nope"), "--harmful", str(tmp_path / "missing.json"),
              "--out", str(tmp_path / "v")])
    with pytest.raises(FileNotFoundError, match="not a steering-vector folder"):
        main(["tokens", "--model", str(tmp_path / "nope"), "--vector", str(tmp_path), "--out", str(tmp_path / "t")])


@pytest.mark.parametrize("command", ["direction", "tokens"])
def test_help_lists_flags_with_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--model" in text and "--out" in text and "default:" in text


@pytest.mark.parametrize("command", ["direction", "tokens", "train", "demo", "eval"])
def test_help_gives_each_default_once_and_never_none(command, capsys):
    """A default that is decided at run time, or already said in the help's words, is not repeated."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    options = " ".join(capsys.readouterr().out.split()).split(" --")  # one chunk per flag, lines unwrapped
    assert not [o for o in options if "(default: None)" in o or "(default: False)" in o]
    assert not [o for o in options if o.count("default") > 1], "a flag gives its default twice"
    if command == "tokens":
        assert any(o.startswith("k K ") and "(default: 50)" in o for o in options)


def test_demo_help_lists_every_setting_and_each_flag_reaches_the_config(capsys, monkeypatch):
    """docs/demo.md calls `safesteer demo --help` every setting: each DemoConfig field has its flag there (onednn is
    the top-level --no-onednn), and a non-default value of each flag that had none before arrives in the config."""
    import dataclasses

    from openrlhf_safesteer.demo import pipeline
    from openrlhf_safesteer.local.config import flag_name

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    fields = [f for f in dataclasses.fields(pipeline.DemoConfig) if f.name != "onednn"]
    flags = set(re.findall(r"(?<![\w-])--[\w-]+", text))      # whole flags: --k is not --kl-threshold
    assert [flag_name(f) for f in fields if flag_name(f) not in flags] == []
    seen = []
    monkeypatch.setattr(pipeline, "run_demo", lambda cfg: seen.append(cfg) or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        main(["demo", "--positions", "-2", "-1", "--kl-threshold", "0.2", "--k", "20", "--lora-alpha", "8",
              "--micro-batch-size", "2", "--retain-prompts-per-step", "4", "--retain-divergence", "subset",
              "--refusal-tokens", "6", "--teacher-check-prompts", "3", "--freeze-embeddings", "--no-progress"])
    (cfg,) = seen
    assert (cfg.positions, cfg.kl_threshold, cfg.k, cfg.lora_alpha, cfg.micro_batch_size) == ([-2, -1], 0.2, 20, 8, 2)
    assert (cfg.retain_prompts_per_step, cfg.retain_divergence, cfg.refusal_tokens) == (4, "subset", 6)
    assert (cfg.teacher_check_prompts, cfg.freeze_embeddings, cfg.progress) == (3, True, False)


@pytest.fixture
def no_model_load(monkeypatch):
    """load_model raises: a test using this shows its error comes before any weights load."""
    from openrlhf_safesteer import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Tokenizer-only model folders (enough until the weights load): with and without a chat template."""
    from openrlhf_safesteer.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    tiny_tokenizer().save_pretrained(root / "tmpl")
    plain = tiny_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(root / "notmpl")
    import torch

    SteeringVector(torch.ones(32), layer=1).save(root / "vec")
    return root


@pytest.mark.parametrize("flags, message", [
    (["--n-val", "0"], "--n-val must be >= 1, got 0"),
    (["--n-val", "-10"], "--n-val must be >= 1, got -10"),     # the built-in sets were sliced [:-10]
    (["--n-train", "-20"], "--n-train must be >= 1, got -20"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--coeff", "nan"], "--coeff must be a finite number, got nan"),
    (["--coeff", "inf"], "--coeff must be a finite number, got inf"),
    (["--kl-threshold", "nan"], r"--kl-threshold must be > 0, got nan"),
])
def test_direction_bad_flags_fail_before_loading(tokenizer_dirs, tmp_path, no_model_load, flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["direction", "--model", str(tokenizer_dirs / "tmpl"), "--out", str(tmp_path / "vec"), *flags])


@pytest.mark.parametrize("flags, message", [
    (["--min-prob", "2"], r"--min-prob must be in \[0, 1\), got 2.0"),
    (["--min-prob", "-1"], r"--min-prob must be in \[0, 1\), got -1.0"),
    (["--min-prob", "nan"], r"--min-prob must be in \[0, 1\), got nan"),
    (["--coeff", "nan"], "--coeff must be a finite number, got nan"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--horizon", "0"], "--horizon must be >= 1, got 0"),
])
def test_tokens_bad_flags_fail_before_loading(tokenizer_dirs, tmp_path, no_model_load, flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["tokens", "--model", str(tokenizer_dirs / "tmpl"), "--vector", str(tokenizer_dirs / "vec"),
              "--out", str(tmp_path / "tokens.json"), *flags])


def test_bad_out_fails_before_loading(tokenizer_dirs, tmp_path, no_model_load):
    """A --out that cannot receive the result fails before the compute, not after it (review 13, finding 5)."""
    model, vec = str(tokenizer_dirs / "tmpl"), str(tokenizer_dirs / "vec")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")

    def direction(out):
        return main(["direction", "--model", model, "--out", str(out)])

    def tokens(out):
        return main(["tokens", "--model", model, "--vector", vec, "--out", str(out)])

    with pytest.raises(SystemExit, match=r"--out .*afile: .*exists and is not a directory"):
        direction(tmp_path / "afile")
    with pytest.raises(SystemExit, match=r"--out .*afile is not a directory"):
        direction(tmp_path / "afile" / "vec")
    with pytest.raises(SystemExit, match=r"--out .*mine: .*not part of a steering-vector folder \(notes.txt\)"):
        direction(tmp_path / "mine")
    with pytest.raises(SystemExit, match=r"--out .*mine: .*is a directory; give a file path"):
        tokens(tmp_path / "mine")
    with pytest.raises(SystemExit, match=r"--out .*afile is not a directory"):
        tokens(tmp_path / "afile" / "tokens.json")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # Writable outputs pass the check (and reach the model load): a new folder, a previous vector folder.
    for out in (tmp_path / "new" / "vec", tokenizer_dirs / "vec"):
        with pytest.raises(AssertionError, match="model was loaded"):
            direction(out)
    with pytest.raises(AssertionError, match="model was loaded"):
        tokens(tmp_path / "afile")        # an existing file is replaced


@pytest.mark.parametrize("command", ["direction", "tokens"])
def test_missing_chat_template_fails_before_loading(tokenizer_dirs, tmp_path, no_model_load, command):
    from openrlhf_safesteer.chat import ChatTemplateError

    extra = ["--vector", str(tokenizer_dirs / "vec"), "--out", str(tmp_path / "t.json")] if command == "tokens" \
        else ["--out", str(tmp_path / "vec")]
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        main([command, "--model", str(tokenizer_dirs / "notmpl"), *extra])


def test_direction_writes_its_table_into_the_swapped_in_folder(tokenizer_dirs, tmp_path, monkeypatch):
    """vector.save swaps a fresh folder in; candidates.json/csv/png are written into it afterwards, also on a
    rerun over the previous run's folder."""
    import torch

    from openrlhf_safesteer import directions, loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (None, None))
    layer = iter([1, 0])

    def fake_select(*args, **kwargs):
        chosen = next(layer)
        rows = [directions.CandidateScore(layer=i, position=-1, norm=1.0, ablation_refusal=-1.0 - i,
                                          steering_refusal=1.0, ablation_kl=0.01) for i in (0, 1)]
        return SteeringVector(torch.ones(32), layer=chosen, position=-1), rows

    monkeypatch.setattr(directions, "select_direction", fake_select)
    out = tmp_path / "vec"
    for expected in (1, 0):
        assert main(["direction", "--model", str(tokenizer_dirs / "tmpl"), "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["candidates.csv", "candidates.json", "candidates.png",
                                                         "steering_vector.json", "vector.safetensors"]
        table = json.loads((out / "candidates.json").read_text())
        assert SteeringVector.load(out).layer == expected == [r["layer"] for r in table if r["selected"]][0]
