"""patches/openrlhf-0.11.2-extension-points.patch applies cleanly to the installed OpenRLHF 0.11.2
and the patched experience helpers keep subclass fields (run in a subprocess on a patched copy).

The patch is applied with `git apply` (git is there wherever the project is cloned; the `patch` tool is
not part of `make setup`), so these tests never skip: a patch that stops applying fails them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PATCH = Path(__file__).resolve().parents[2] / "patches" / "openrlhf-0.11.2-extension-points.patch"


def git_apply(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`git apply ARGS PATCH` in cwd as a plain folder: GIT_CEILING_DIRECTORIES stops git from finding a
    repository above it (site-packages inside a clone's .venv), whose root would change the paths."""
    git = shutil.which("git")
    assert git is not None, "git is needed to check the OpenRLHF patch (it is not on PATH)"
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(cwd.parent))
    return subprocess.run([git, "apply", "-p1", *args, str(PATCH)], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed_root() -> Path:
    import importlib.util

    from openrlhf_safesteer.plugin import compat

    assert compat.openrlhf_version() == "0.11.2"
    spec = importlib.util.find_spec("openrlhf")
    return Path(spec.origin).parent.parent


def test_patch_applies_cleanly_to_the_installed_source(installed_root):
    # git apply never fuzzes (every context line must match); -v reports a hunk found at an offset
    proc = git_apply(["--check", "-v"], installed_root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = [line for line in proc.stderr.splitlines() if line.startswith("Checking patch ")]
    files = [line for line in PATCH.read_text().splitlines() if line.startswith("diff ")]
    assert len(checked) == len(files), proc.stderr   # every file of the patch was checked
    assert "offset" not in proc.stderr and "error:" not in proc.stderr, proc.stderr


def test_patched_helpers_keep_subclass_fields(installed_root, tmp_path):
    shutil.copytree(installed_root / "openrlhf", tmp_path / "openrlhf")
    proc = git_apply([], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = textwrap.dedent('''
        from dataclasses import dataclass
        import torch
        from openrlhf.trainer.ppo_utils.experience import (Experience, tensor_field, split_experience_batch,
            remove_padding_in_sequences, make_experience_batch)
        from openrlhf.utils.plugins import load_object
        import openrlhf
        assert openrlhf.__file__.startswith(%r), openrlhf.__file__

        @dataclass
        class TeacherExperience(Experience):
            teacher_on_s: torch.Tensor = tensor_field("step", default=None)  # (B, A, K)

        seq = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 9]])
        att = (seq != 0).long()
        act = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
        teacher = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
        exp = TeacherExperience(sequences=seq, attention_mask=att, action_mask=act, teacher_on_s=teacher)
        items = remove_padding_in_sequences(split_experience_batch(exp))
        assert all(type(i) is TeacherExperience for i in items)
        assert items[0].teacher_on_s.shape == (3, 3) and items[1].teacher_on_s.shape == (4, 3)
        batch = make_experience_batch(items[::-1])
        assert type(batch) is TeacherExperience and batch.teacher_on_s.shape == (2, 4, 3)
        assert torch.equal(batch.teacher_on_s[1, :3], teacher[0, :3]) and batch.teacher_on_s[1, 3].sum() == 0
        assert load_object("openrlhf.trainer.ppo_utils.experience:Experience") is Experience
        print("patched helpers OK")
    ''' % str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "patched helpers OK" in proc.stdout
