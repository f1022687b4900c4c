"""`safesteer direction` and `safesteer tokens` end to end on the toy refusal model saved to disk."""

from __future__ import annotations

import csv
import json

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
