"""The contract check (`python -m openrlhf_safesteer.plugin.contract`): it names everything of OpenRLHF the plugin's
code uses, finds nothing missing in the installed release, and reports a planted break by name."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from openrlhf_safesteer.plugin import contract, versions

PACKAGE = Path(__file__).resolve().parents[2] / "openrlhf_safesteer"


def plugin_sources() -> dict[str, str]:
    return {str(path.relative_to(PACKAGE)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def openrlhf_imports(text: str) -> list[tuple[str, str | None]]:
    """(module, name) of every `from openrlhf... import name` and (module, None) of every `import openrlhf...`."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "openrlhf":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "openrlhf"]
    return found


def test_the_contract_names_every_openrlhf_import_of_the_package():
    needed = {(need.where, need.name.split(".")[0]) for need in contract.NEEDS}
    modules = {need.where for need in contract.NEEDS}
    unnamed = []
    for path, text in plugin_sources().items():
        for module, name in openrlhf_imports(text):
            where = module.replace(".", "/")
            files = (f"{where}.py", f"{where}/__init__.py")
            if name is None:
                known = files[0] in modules
            else:   # a name the module defines, or a submodule of a package
                known = any((file, name) in needed for file in files) or f"{where}/{name}.py" in modules
            if not known:
                unnamed.append(f"{path}: {module} {name or ''}")
    assert not unnamed, "not in plugin/contract.py NEEDS:\n" + "\n".join(unnamed)


def test_the_contract_names_every_parsed_flag_the_plugin_reads():
    flags = {need.name for need in contract.NEEDS if need.name.startswith("--")}
    flags |= {name for need in contract.NEEDS for name in need.instead}
    read = set()
    for path, text in plugin_sources().items():
        if not path.startswith(("plugin/", "cli/")):
            continue
        for group, name in re.findall(r"\bargs\.(actor|ref|algo|data|ds|eval|reward|train|vllm|rollout)\.(\w+(?:\.\w+)?)",
                                      text):
            read.add(f"--{group}.{name}")
    read.discard("--algo.advantage")   # the namespace itself, handed to versions.is_correction
    assert read - flags == set(), "flags the plugin reads that plugin/contract.py does not name"


def test_the_installed_release_has_everything():
    findings = contract.check(versions.FolderSources(versions.installed_root()))
    missing = [f.need.label() for f in findings if f.status == "missing"]
    assert missing == []
    proc = subprocess.run([sys.executable, "-m", "openrlhf_safesteer.plugin.contract", "--installed"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"OpenRLHF {versions.installed_version()} (installed" in proc.stdout and ", 0 missing" in proc.stdout


def test_a_planted_break_is_reported_by_name(tmp_path):
    """A copy of the installed OpenRLHF with one method renamed, one parameter and one flag gone: exit 1, each named."""
    copy = tmp_path / "openrlhf"
    shutil.copytree(versions.installed_root(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    maker = copy / "trainer" / "ppo_utils" / "experience_maker.py"
    maker.write_text(maker.read_text().replace("def _dispatch_forward(", "def _dispatch_forward_renamed("))
    actor = copy / "trainer" / "ray" / "ppo_actor.py"
    actor.write_text(actor.read_text().replace("def _init_vllm_sync_group(self, backend", "def _init_vllm_sync_group(self, kind"))
    cli = copy / "cli" / "train_ppo_ray.py"
    cli.write_text(cli.read_text().replace('"--vllm.num_engines"', '"--vllm.engines"'))
    proc = subprocess.run([sys.executable, "-m", "openrlhf_safesteer.plugin.contract", "--source", str(copy)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert ", 3 missing" in lines[0]
    assert any("missing  openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker._dispatch_forward" in line
               and "no such method" in line for line in lines), proc.stdout
    assert any("ActorPPOTrainer._init_vllm_sync_group" in line and "no parameter backend" in line for line in lines)
    assert any("missing  --vllm.num_engines" in line for line in lines)


def test_a_release_without_a_source_is_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "openrlhf_safesteer.plugin.contract", "--wheel", "0.0.0.nonexistent"],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "SAFESTEER_OPENRLHF_CACHE": str(tmp_path),
                               "PIP_NO_INDEX": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: pip download openrlhf==0.0.0.nonexistent failed")
