"""The plugin on every supported OpenRLHF release, each against its own code, on a CPU.

The project's environment holds one OpenRLHF (0.11.2, `make setup`), which the rest of the suite tests. For each
other supported release, its wheel (170 KB, downloaded once into SAFESTEER_OPENRLHF_CACHE) is unpacked into a folder
put first on PYTHONPATH, so `import openrlhf` and `importlib.metadata.version("openrlhf")` both give that release,
on top of the installed stack (torch, transformers, DeepSpeed, Ray). This tests the plugin against each release's
API, not each release's own pinned stack.

- every release: the contract check on its source and the version gate (fast, no import);
- every older supported release, in a subprocess: the fast OpenRLHF tests that touch OpenRLHF's code, and every
  recipe's --dry-run (slow tier: about 2 minutes a release);
- 0.10.4, the most deployed older release: the real Ray training tests (slow tier, a few minutes).

A wheel that cannot be downloaded fails these tests, unless SAFESTEER_OFFLINE_OK=1 says this machine has no index,
in which case they skip, naming the error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_safesteer.plugin import contract, releases, versions

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
INSTALLED = versions.installed_version()
OLDER = [version for version in versions.TESTED if version != INSTALLED]
REFUSED = "0.10.1.post2"   # the newest flat-flag release: the gate's other side

# The fast tests that run OpenRLHF's code (its parser, Actor, trainer classes, experience helpers, agent executor),
# and the recipes' dry runs (marked slow in their own file; the Ray tests are left out by -m "not ray").
SUBSET = ["test_openrlhf_versions.py", "test_openrlhf_contract.py", "test_openrlhf_cli.py", "test_openrlhf_units.py",
          "test_openrlhf_policy_step.py", "test_openrlhf_packing.py", "test_openrlhf_retain.py",
          "test_openrlhf_placement.py", "test_safety_reward.py",
          "test_openrlhf_recipes.py::test_recipe_dry_run_validates_every_flag"]


def release_sources(version: str) -> dict[str, str]:
    try:
        return releases.wheel_sources(releases.wheel(version))
    except releases.DownloadError as error:
        if os.environ.get(releases.OFFLINE_ENV) == "1":
            pytest.skip(f"{error} ({releases.OFFLINE_ENV}=1)")
        raise


def release_env(version: str) -> dict:
    release_sources(version)   # download, or skip/fail as above
    return releases.overlay_env(version, prepend=[str(REPO)])


def run_pytest(version: str, args: list[str], tmp_path: Path, timeout: int,
               python: str = sys.executable) -> subprocess.CompletedProcess:
    env = release_env(version)
    # -n 0: the inner run in one process (pytest.ini asks for 2 xdist workers; this test already runs on one).
    # `python` the warm interpreter: the inner pytest is a fork of it with the release first on sys.path (no
    # OpenRLHF is preloaded there), and it reuses this session's warm servers, which the environment names
    command = [python, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
               f"--basetemp={tmp_path / 'inner'}", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("version", versions.TESTED)
def test_every_supported_release_has_what_the_plugin_uses(version):
    sources = release_sources(version)
    findings = contract.check(sources)
    assert [f.need.label() for f in findings if f.status == "missing"] == []
    assert versions.gate(version, versions.features_of(sources)) == (None, None)
    adapted = {f.need.adapted for f in findings if f.status == "adapted" and f.need.adapted}
    assert adapted <= {gap.feature for gap in versions.features_of(sources).missing()}


def test_a_flat_flag_release_is_refused_and_the_contract_says_why():
    sources = release_sources(REFUSED)
    refusal, _ = versions.gate(REFUSED, versions.features_of(sources))
    assert refusal.startswith(f"OpenRLHF {REFUSED} is older than 0.10.2")
    missing = {f.need.name for f in contract.check(sources) if f.status == "missing"}
    assert {"hierarchize", "--actor.model_name_or_path", "--vllm.num_engines"} <= missing


@pytest.mark.parametrize("interpreter", ["fresh", "warm"])
def test_the_overlay_resolves_import_and_metadata_to_the_release(tmp_path, interpreter, request):
    """In a fresh `python`, and in a fork of the warm one (which runs the releases' inner pytest below)."""
    version = OLDER[0]
    python = sys.executable if interpreter == "fresh" else request.getfixturevalue("warm_python")
    probe = ("import importlib.metadata, openrlhf; from openrlhf_safesteer.plugin import versions; "
             "print(importlib.metadata.version('openrlhf'), openrlhf.__file__, versions.installed_version())")
    proc = subprocess.run([python, "-c", probe], env=release_env(version), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported, path, seen = proc.stdout.split()
    assert reported == seen == version and str(releases.overlay(version)) in path


@pytest.mark.slow
@pytest.mark.parametrize("version", OLDER)
def test_fast_openrlhf_tests_and_recipe_dry_runs_on_release(version, tmp_path, warm_python):
    proc = run_pytest(version, ["-m", "not ray", *(str(HERE / name) for name in SUBSET)], tmp_path, timeout=900,
                      python=warm_python)
    summary = proc.stdout.strip().splitlines()[-1:] or [""]
    assert proc.returncode == 0, f"OpenRLHF {version}:\n" + proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in summary[0] and "failed" not in summary[0], summary


@pytest.mark.slow
@pytest.mark.ray
def test_real_ray_training_on_0_10_4(tmp_path, warm_python):
    """tests/openrlhf/test_openrlhf_ray.py (the CPU recipe's 2 exact steps, whose loss equals the core's, and a
    sampled-objective experience whose advantages equal the core's, and the warm-worker probe) on OpenRLHF 0.10.4's
    own trainer."""
    if INSTALLED == "0.10.4":
        pytest.skip("0.10.4 is the installed release: the suite's own Ray tests train on it")
    proc = run_pytest("0.10.4", [str(HERE / "test_openrlhf_ray.py")], tmp_path, timeout=1200, python=warm_python)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout.strip().splitlines()[-1]
