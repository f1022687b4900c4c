"""The frontier grid across sessions (`--publish`): the small files are mirrored, the rest is not, and a new --out
starts from a published grid, taking its rows when they extend its own and refusing to merge diverged ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openrlhf_safesteer.compare import frontier


def _grid(folder: Path, keys: list[str]) -> Path:
    """A grid folder as run_frontier leaves it: small files, and the runs' replies and adapters (large)."""
    (folder / "artifacts" / "vector").mkdir(parents=True)
    (folder / "artifacts" / "vector" / "steering_vector.json").write_text('{"layer": 1}')
    (folder / "artifacts" / "safety_tokens.json").write_text('{"ids": [1]}')
    (folder / "spec.json").write_text(json.dumps({"threads": 1}))
    (folder / "eval_sets_dev.json").write_text('{"digest": "d"}')
    (folder / "data" / "seed1000").mkdir(parents=True)
    (folder / "data" / "seed1000" / "dpo_pairs.jsonl").write_text('{"chosen": "no"}\n')
    (folder / "data" / "seed1000" / "data_stats.json").write_text("{}")
    (folder / "runs" / "dev" / "dpo" / "seed1000" / "final").mkdir(parents=True)
    (folder / "runs" / "dev" / "dpo" / "seed1000" / "eval.json").write_text("{}")
    (folder / "runs" / "dev" / "dpo" / "seed1000" / "final" / "adapter_model.safetensors").write_bytes(b"0" * 64)
    (folder / frontier.ROWS).write_text("".join(json.dumps({"key": k}) + "\n" for k in keys))
    return folder


def test_publish_mirrors_the_small_files_only(tmp_path):
    out = _grid(tmp_path / "out", ["a", "b"])
    pub = tmp_path / "pub"
    copied = frontier.mirror_files(out, pub)
    names = sorted(str(p.relative_to(pub)) for p in pub.rglob("*") if p.is_file())
    assert names == ["artifacts/safety_tokens.json", "artifacts/vector/steering_vector.json",
                     "data/seed1000/data_stats.json", "data/seed1000/dpo_pairs.jsonl", "eval_sets_dev.json",
                     "runs.jsonl", "spec.json"]
    assert copied == len(names)
    assert (pub / frontier.ROWS).read_text() == (out / frontier.ROWS).read_text()
    assert not list(pub.rglob("*.partial"))


def test_a_new_out_starts_from_the_published_grid_and_takes_its_longer_rows(tmp_path):
    pub = frontier.mirror_files(_grid(tmp_path / "old", ["a", "b", "c"]), tmp_path / "pub") and tmp_path / "pub"
    fresh = tmp_path / "fresh"
    assert frontier.seed_from_published(pub, fresh) > 0
    assert list(frontier.load_rows(fresh)) == ["a", "b", "c"]
    assert (fresh / "artifacts" / "vector" / "steering_vector.json").is_file()
    # an --out that holds fewer of the same rows takes the published ones; one with more keeps its own
    behind = _grid(tmp_path / "behind", ["a"])
    frontier.seed_from_published(pub, behind)
    assert list(frontier.load_rows(behind)) == ["a", "b", "c"]
    ahead = _grid(tmp_path / "ahead", ["a", "b", "c", "d"])
    frontier.seed_from_published(pub, ahead)
    assert list(frontier.load_rows(ahead)) == ["a", "b", "c", "d"]
    diverged = _grid(tmp_path / "diverged", ["x"])
    with pytest.raises(ValueError, match="hold different runs"):
        frontier.seed_from_published(pub, diverged)
    assert frontier.seed_from_published(tmp_path / "nothing", tmp_path / "other") == 0   # no published grid


def test_main_resumes_with_the_published_spec(tmp_path, monkeypatch):
    """`--publish` with an empty --out: the published spec.json is the grid (no --spec needed), and the run and
    every later row are mirrored back to PUB."""
    pub = tmp_path / "pub"
    pub.mkdir()
    spec = {**frontier.DEFAULT_SPEC, "threads": 1}
    (pub / "spec.json").write_text(json.dumps(spec))
    (pub / frontier.ROWS).write_text(json.dumps({"key": "a"}) + "\n")
    seen = {}

    def fake_run(spec, out, from_dir, phase, max_runs, publish, methods, threads):
        seen.update(spec=spec, out=out, publish=publish, rows=list(frontier.load_rows(out)), methods=methods,
                    threads=threads)
        return {"done": 1, "left": 0, "stopped": None}

    monkeypatch.setattr(frontier, "run_frontier", fake_run)
    assert frontier.main(["--out", str(tmp_path / "out"), "--publish", str(pub)]) == 0
    assert seen["spec"]["threads"] == 1 and seen["rows"] == ["a"] and seen["publish"] == pub
    assert seen["methods"] is None and seen["threads"] is None


def test_methods_trains_only_the_named_methods_and_holds_the_selection(tmp_path, monkeypatch):
    """`--methods sft ppo`: the references and those methods' dev runs are done, the rest is left for another call,
    and the selection (which needs every dev run) is not written; an unknown name is refused before any work."""
    spec = {**frontier.DEFAULT_SPEC, "threads": None, "references": {"teacher": True}}
    monkeypatch.setattr("openrlhf_safesteer.loading.resolve_model", lambda name: "model")
    monkeypatch.setattr(frontier, "stage_artifacts", lambda *a: (tmp_path / "v", tmp_path / "t"))
    monkeypatch.setattr(frontier, "phase_sets", lambda spec, out, ph: ([], "digest"))
    monkeypatch.setattr("openrlhf_safesteer.compare.frontier_report.write_report", lambda out: "")
    trained = []

    def row(run, *rest):
        trained.append(run.key)
        return {"key": run.key, "sets_digest": "digest"}

    monkeypatch.setattr(frontier, "execute_run", row)
    monkeypatch.setattr(frontier, "evaluate_reference", row)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen_threads.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: seen_threads[-1])
    seen_threads = []
    status = frontier.run_frontier(spec, tmp_path / "out", phase="dev", methods=["sft", "ppo"], threads=2)
    expected = [r.key for r in frontier.reference_runs(spec, "dev")]
    expected += [r.key for r in frontier.dev_runs(spec) if r.method in ("sft", "ppo")]
    assert trained == expected and len(expected) > 2
    assert status["left"] == len(frontier.dev_runs(spec)) - len(expected) + 2 > 0
    assert not (tmp_path / "out" / "selection.json").exists()
    # --threads: the evaluation's and the training subprocesses' threads (their environment), in every row
    import os

    assert seen_threads == [2] and os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "2"
    rows = frontier.load_rows(tmp_path / "out")
    assert len(rows) == len(expected)
    assert {json.dumps(r["threads"]) for r in rows.values()} == {'{"evaluation": 2, "training": 2}'}
    with pytest.raises(ValueError, match="--methods grpo: not in this grid"):
        frontier.run_frontier(spec, tmp_path / "out", phase="dev", methods=["grpo"])
    with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
        frontier.run_frontier(spec, tmp_path / "other", phase="dev", threads=0)
    assert not (tmp_path / "other").exists()
