"""Steering hooks against independent weight edits, and the SteeringVector artifact."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from openrlhf_safesteer.steering import (
    CONFIG_FILE,
    VECTOR_FILE,
    IncompatibleArtifactError,
    SteeringVector,
    ablate,
    attach_steering,
    steer,
)
from openrlhf_safesteer.testing import orthogonalised, tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250], [7, 8, 9, 10, 11, 12]])


def _vector(hidden, seed=1):
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("coeff", [1.0, -2.5])
def test_steer_layer0_equals_shifting_every_embedding(chatml_tokenizer, coeff):
    # Adding c*d to the input of block 0 is the same as adding c*d to every embedding row (llama does not
    # rescale embeddings), an edit that never goes through the hook.
    model = tiny_model("llama", chatml_tokenizer, layers=3, hidden=32)
    d = _vector(32)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.embed_tokens.weight += coeff * d
    with steer(model, SteeringVector(d, layer=0, coeff=coeff)):
        steered = model(IDS).logits
    torch.testing.assert_close(steered, edited(IDS).logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model(IDS).logits, steered, atol=1e-3)  # hook gone, model unchanged


def test_steer_layer_l_equals_bias_of_previous_block(chatml_tokenizer):
    # GPT-2's MLP output projection has a bias added straight into the residual stream: raising the bias
    # of block l-1 by d raises the input of block l by d at every position.
    model = tiny_model("gpt2", chatml_tokenizer, layers=3, hidden=32)
    d = _vector(32, seed=2)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.transformer.h[1].mlp.c_proj.bias += d
    with steer(model, SteeringVector(d, layer=2)):
        steered = model(IDS).logits
    torch.testing.assert_close(steered, edited(IDS).logits, atol=1e-5, rtol=1e-4)


def test_attach_steering_applies_at_every_decoding_step(chatml_tokenizer):
    model = tiny_model("qwen2", chatml_tokenizer, layers=2, hidden=32)
    d = 3 * _vector(32, seed=3)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.embed_tokens.weight += d
    prompt = IDS[:1]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8, "pad_token_id": chatml_tokenizer.pad_token_id}
    handle = attach_steering(model, SteeringVector(d, layer=0))
    try:
        steered = model.generate(prompt, **kwargs)  # KV cache: later steps see one new position at a time
    finally:
        handle.remove()
    assert torch.equal(steered, edited.generate(prompt, **kwargs))
    assert not torch.equal(steered, model.generate(prompt, **kwargs))


def test_steer_removes_hook_on_error(chatml_tokenizer):
    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32)
    before = model(IDS).logits
    with pytest.raises(RuntimeError, match="boom"), steer(model, SteeringVector(_vector(32), layer=1)):
        raise RuntimeError("boom")
    torch.testing.assert_close(model(IDS).logits, before)


def _layer_input(model, layer: int):
    """Run IDS through the model and return the (B, T, H) residual stream block `layer` computes on (a pre-hook
    registered after any steering hook sees the steered input)."""
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = model.model.layers[layer].register_forward_pre_hook(record, with_kwargs=True)
    try:
        logits = model(IDS).logits
    finally:
        handle.remove()
    return seen[0], logits


def test_steer_casts_to_bf16(chatml_tokenizer):
    """On a bf16 model the hook adds coeff * d, cast to bf16, to the block's input, and the output changes."""
    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32, dtype=torch.bfloat16)
    d, coeff = _vector(32), 2.0
    plain, plain_logits = _layer_input(model, 1)
    with steer(model, SteeringVector(d, layer=1, coeff=coeff)):
        steered, logits = _layer_input(model, 1)
    assert steered.dtype == logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert torch.equal(steered, plain + (coeff * d).to(torch.bfloat16))
    assert (logits.float() - plain_logits.float()).abs().max() > 1e-2     # steering reached the output


def test_ablate_equals_weight_orthogonalisation(chatml_tokenizer):
    model = tiny_model("llama", chatml_tokenizer, layers=3, hidden=32)
    d = 5 * _vector(32, seed=4)
    unit = d / d.norm()
    with ablate(model, d):
        ablated = model(IDS).logits
    torch.testing.assert_close(ablated, orthogonalised(model, unit)(IDS).logits, atol=1e-5, rtol=1e-4)
    # Inside ablate, every block computes on an input with no component along r (a hook registered
    # after ablate's own runs after it, so it sees what the block sees).
    def block_inputs():
        seen = []
        hs = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for layer in model.model.layers]
        model(IDS)
        for h in hs:
            h.remove()
        return seen

    with ablate(model, d):
        seen = block_inputs()
    assert len(seen) == 3 and all((x @ unit).abs().max() < 1e-4 for x in seen)
    assert all((x @ unit).abs().max() > 1e-2 for x in block_inputs())  # without ablation r is present


def test_ablate_rejects_bad_direction(chatml_tokenizer):
    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32)
    with pytest.raises(IncompatibleArtifactError, match="hidden size is 32"), ablate(model, torch.ones(16)):
        pass
    with pytest.raises(ValueError, match="zero"), ablate(model, torch.zeros(32)):
        pass


def test_vector_save_load_roundtrip(tmp_path):
    sv = SteeringVector(_vector(32).double(), layer=2, coeff=1.5, position=-3, model_name="m",
                        source={"harmful_train_sha256": "ab" * 32, "n": 4})
    sv.save(tmp_path / "vec")
    assert sorted(p.name for p in (tmp_path / "vec").iterdir()) == sorted([VECTOR_FILE, CONFIG_FILE])
    config = json.loads((tmp_path / "vec" / CONFIG_FILE).read_text())
    assert config["layer"] == 2 and config["hidden_size"] == 32
    loaded = SteeringVector.load(tmp_path / "vec")
    assert torch.equal(loaded.vector, sv.vector) and loaded.vector.dtype == torch.float32
    assert (loaded.layer, loaded.coeff, loaded.position, loaded.model_name, loaded.source) == \
        (2, 1.5, -3, "m", sv.source)


def test_vector_incompatible_model_is_a_clear_error(chatml_tokenizer):
    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32)
    with pytest.raises(IncompatibleArtifactError, match="hidden size 48"):
        SteeringVector(torch.ones(48), layer=0).check_compatible(model)
    with pytest.raises(IncompatibleArtifactError, match="layer 5 but the model has 2"), \
            steer(model, SteeringVector(torch.ones(32), layer=5)):
        pass


def test_vector_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="1-D"):
        SteeringVector(torch.ones(2, 3), layer=0)
    with pytest.raises(ValueError, match="non-finite"):
        SteeringVector(torch.tensor([1.0, float("nan")]), layer=0)
    with pytest.raises(FileNotFoundError, match="safesteer direction"):
        SteeringVector.load(tmp_path)


def _folder(path, text):
    path.mkdir()
    (path / "a.txt").write_text(text)
    (path / "b.txt").write_text(text)
    return path


def test_replace_dir_never_leaves_a_half_copy(tmp_path, monkeypatch):
    """replace_dir swaps a finished folder in: interrupted before the swap the old copy is whole at the
    final path, interrupted while the old copy is being removed the new one already is."""
    import os
    import shutil

    from openrlhf_safesteer import steering

    final = _folder(tmp_path / "final", "old")
    steering.replace_dir(_folder(tmp_path / "new1", "new1"), final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]         # nothing left beside it
    assert (final / "a.txt").read_text() == (final / "b.txt").read_text() == "new1"

    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        if str(src).endswith("new2"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(steering.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        steering.replace_dir(_folder(tmp_path / "new2", "new2"), final)
    monkeypatch.setattr(steering.os, "replace", real_replace)
    assert (final / "a.txt").read_text() == (final / "b.txt").read_text() == "new1"   # old copy back, whole

    real_rmtree = shutil.rmtree

    def rmtree_one_file_then_interrupt(path, *args, **kwargs):
        os.unlink(os.path.join(path, "a.txt"))
        raise KeyboardInterrupt

    monkeypatch.setattr(steering.shutil, "rmtree", rmtree_one_file_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        steering.replace_dir(_folder(tmp_path / "new3", "new3"), final)
    monkeypatch.setattr(steering.shutil, "rmtree", real_rmtree)
    assert (final / "a.txt").read_text() == (final / "b.txt").read_text() == "new3"   # new copy in place, whole


@pytest.mark.parametrize("coeff", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_coeff_is_refused_everywhere(tmp_path, chatml_tokenizer, coeff):
    """A NaN/inf coefficient makes the teacher's logits NaN: refused when made, loaded or passed as an override."""
    with pytest.raises(ValueError, match="coeff must be a finite number"):
        SteeringVector(torch.ones(32), layer=1, coeff=coeff)
    SteeringVector(torch.ones(32), layer=1).save(tmp_path / "vec")
    config = json.loads((tmp_path / "vec" / CONFIG_FILE).read_text())
    (tmp_path / "vec" / CONFIG_FILE).write_text(json.dumps(dict(config, coeff=coeff)))  # json writes NaN/Infinity
    with pytest.raises(ValueError, match=f"{tmp_path / 'vec'}: coeff must be a finite number"):
        SteeringVector.load(tmp_path / "vec")
    sv = SteeringVector(torch.ones(32), layer=1)
    sv.coeff = coeff                  # set after __init__ (as the demo does with --coeff): still not saved
    with pytest.raises(ValueError, match="coeff must be a finite number"):
        sv.save(tmp_path / "vec2")
    assert not (tmp_path / "vec2").exists()
    model = tiny_model("llama", chatml_tokenizer, layers=2, hidden=32)
    with pytest.raises(ValueError, match="coeff must be a finite number"), \
            steer(model, SteeringVector(torch.ones(32), layer=1), coeff=coeff):
        pass


def _pair(path):
    loaded = SteeringVector.load(path)
    return float(loaded.vector[0]), loaded.layer, loaded.coeff


def test_save_replaces_vector_and_config_as_a_pair(tmp_path, monkeypatch):
    """Interrupted at any rename of an overwrite, the folder loads as the old pair or the new one, never the
    new vector with the old layer/coeff; interrupted while the old folder is removed, the new pair is in place."""
    import os
    import shutil

    from openrlhf_safesteer import steering

    vec = tmp_path / "vec"
    old, new = (1.0, 1, 1.0), (-5.0, 0, 2.0)
    SteeringVector(torch.full((8,), old[0]), layer=old[1], coeff=old[2]).save(vec)
    (vec / "candidates.json").write_text("[]")       # the old run's table goes with its vector
    real_replace, calls = os.replace, []

    def replace_or_interrupt(src, dst):
        calls.append(src)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(steering.os, "replace", replace_or_interrupt)
    for interrupt_at in range(1, 10):
        calls.clear()
        try:
            SteeringVector(torch.full((8,), new[0]), layer=new[1], coeff=new[2]).save(vec)
        except KeyboardInterrupt:
            assert _pair(vec) == old, f"interrupted at rename {interrupt_at}"
            continue
        break
    else:
        pytest.fail("save never completed")
    assert _pair(vec) == new and sorted(p.name for p in vec.iterdir()) == sorted([VECTOR_FILE, CONFIG_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["vec"]        # no temporary folder left beside it
    monkeypatch.setattr(steering.os, "replace", real_replace)

    real_rmtree = shutil.rmtree

    def rmtree_once_then_interrupt(path, *args, **kwargs):
        monkeypatch.setattr(steering.shutil, "rmtree", real_rmtree)
        raise KeyboardInterrupt

    monkeypatch.setattr(steering.shutil, "rmtree", rmtree_once_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        SteeringVector(torch.full((8,), old[0]), layer=old[1], coeff=old[2]).save(vec)
    assert _pair(vec) == old


def test_save_refuses_what_it_would_destroy(tmp_path):
    """save() swaps the folder in whole, so a folder holding other files is refused (and kept), not emptied."""
    from openrlhf_safesteer.steering import check_output_file, check_vector_dir

    sv = SteeringVector(torch.ones(8), layer=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not part of a steering-vector folder \(notes.txt\)"):
        sv.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        check_vector_dir(tmp_path / "afile")
    with pytest.raises(NotADirectoryError, match="afile is not a directory"):
        check_vector_dir(tmp_path / "afile" / "vec")
    with pytest.raises(IsADirectoryError, match="is a directory; give a file path"):
        check_output_file(tmp_path / "mine")
    with pytest.raises(NotADirectoryError, match="afile is not a directory"):
        check_output_file(tmp_path / "afile" / "tokens.json")
    check_output_file(tmp_path / "new" / "deeper" / "tokens.json")   # parents are created by the writer
    sv.save(tmp_path / "new" / "vec")
    assert SteeringVector.load(tmp_path / "new" / "vec").layer == 0


def test_unwritable_parent_is_found_before_writing(tmp_path, monkeypatch):
    """os.access is what decides (it also covers read-only mounts and ACLs); it is stubbed to deny the folder
    because the tests may run as root, which chmod cannot lock out."""
    import os

    from openrlhf_safesteer import steering
    from openrlhf_safesteer.steering import check_output_file, check_vector_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(steering.os, "access",
                        lambda path, mode: False if os.path.abspath(path) == str(locked) else real_access(path, mode))
    with pytest.raises(PermissionError, match="is not writable"):
        check_vector_dir(locked / "vec")
    with pytest.raises(PermissionError, match="is not writable"):
        check_output_file(locked / "sub" / "tokens.json")       # a missing folder is created under `locked`
    check_output_file(tmp_path / "open" / "tokens.json")       # elsewhere: fine
