"""Stage 1 on a model split over devices: `safesteer direction` and `safesteer tokens` with --device-map
(accelerate) give the same steering vector and the same safety-token set S as the unsplit run.

On a CPU machine the two "devices" are CPU RAM and the disk: --max-memory cpu=<half the model> puts the
first layers in RAM and offloads the rest to --offload-folder, so accelerate's hooks load each offloaded
layer for its forward, as they move activations between GPUs on a multi-GPU node. The steering and
ablation hooks, the activation means and the votes then run through accelerate's dispatched model."""

from __future__ import annotations

import json

import pytest
import torch

from openrlhf_safesteer.cli.main import main
from openrlhf_safesteer.safety_tokens import SafetyTokenSet
from openrlhf_safesteer.steering import SteeringVector


@pytest.fixture(scope="module")
def toy_files(toy_refusal, tmp_path_factory):
    model, tok, harmful, harmless = toy_refusal
    root = tmp_path_factory.mktemp("toy_split")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        (root / f"{name}.json").write_text(json.dumps([{"prompt": p} for p in prompts]))
    (root / "harmless.txt").write_text("\n".join(harmless[:4]) + "\n")
    half = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    return root, half


def stage1(root, out, placement):
    vec, tokens = out / "vec", out / "tokens.json"
    assert main(["direction", "--model", str(root / "model"), "--harmful", str(root / "harmful.json"),
                 "--harmless", str(root / "harmless.json"), "--out", str(vec), "--n-train", "24", "--n-val", "8",
                 "--layers", "1", "2", "--positions", "-1", *placement]) == 0
    assert main(["tokens", "--model", str(root / "model"), "--vector", str(vec), "--prompts",
                 str(root / "harmless.txt"), "--out", str(tokens), "--horizon", "3", "--n-samples", "2",
                 "--k", "8", "--k-prime", "10", *placement]) == 0
    return SteeringVector.load(vec), SafetyTokenSet.load(tokens)


@pytest.mark.slow
def test_split_model_gives_the_same_vector_and_safety_tokens(toy_files, tmp_path, monkeypatch):
    from openrlhf_safesteer import loading

    root, half = toy_files
    placements = []
    real_load = loading.load_model

    def recording_load(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        placements.append(set(getattr(model, "hf_device_map", {"": "whole"}).values()))
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model", recording_load)
    whole_vector, whole_tokens = stage1(root, tmp_path / "whole", ["--device", "cpu"])
    split = ["--device-map", "auto", "--max-memory", f"cpu={half}", "--offload-folder", str(tmp_path / "offload")]
    split_vector, split_tokens = stage1(root, tmp_path / "split", split)
    # direction and tokens each loaded it whole, then each split over RAM and disk.
    assert placements == [{"whole"}, {"whole"}, {"cpu", "disk"}, {"cpu", "disk"}]
    assert (split_vector.layer, split_vector.position) == (whole_vector.layer, whole_vector.position)
    torch.testing.assert_close(split_vector.vector, whole_vector.vector, atol=1e-6, rtol=1e-6)
    assert split_tokens.ids == whole_tokens.ids and split_tokens.votes == whole_tokens.votes


@pytest.mark.parametrize("flags, message", [
    (["--device", "cpu", "--device-map", "auto"], "--device and --device-map exclude each other"),
    (["--max-memory", "cpu=1GiB"], "--max-memory and --offload-folder need --device-map"),
    (["--device-map", "auto", "--max-memory", "cpu:1GiB"], "expected DEVICE=SIZE"),
    (["--device-map", "auto", "--max-memory", "gpu0=1GiB"], "is not a GPU index, cpu, mps or disk"),
])
@pytest.mark.parametrize("command", ["direction", "tokens"])
def test_bad_placement_flags_fail_before_the_model_loads(tmp_path, command, flags, message):
    vec = tmp_path / "vec"
    SteeringVector(vector=torch.ones(4), layer=0, model_name="x").save(vec)
    extra = ["--vector", str(vec), "--out", str(tmp_path / "t.json")] if command == "tokens" else \
        ["--out", str(tmp_path / "v")]
    # The model path does not exist: a placement error must come first.
    with pytest.raises(SystemExit, match=message):
        main([command, "--model", str(tmp_path / "no-model"), *extra, *flags])
