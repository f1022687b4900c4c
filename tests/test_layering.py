"""The import layering of docs/DESIGN's layers, checked on the modules as they are.

Each package module is imported in a fresh process (a fork of one interpreter that has imported only
third-party libraries: torch, transformers), and what that import loaded is compared with its layer:
- the core (the modules at the package's top, and `data`) never loads OpenRLHF, Ray, or any engine,
  evaluation or front-end package of this project;
- the local engine never loads OpenRLHF, Ray, the plugin, the evaluation or a front end;
- the evaluation never loads the plugin, OpenRLHF, Ray or a front end;
- nothing but `cli` loads `cli`;
- importing a plugin module registers no stand-in `vllm` / `flash_attn` module (the launcher and the Ray
  actors install them in the processes that import OpenRLHF), so "is vLLM here?" cannot be fooled by one.
A case that a module still breaks is marked xfail(strict=True) with the reason: it turns into a failure the
day the module is fixed, so that the mark is removed with the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "openrlhf_safesteer"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
FRONT_ENDS = (f"{PACKAGE}.cli", f"{PACKAGE}.demo", f"{PACKAGE}.compare")
ENGINES = (f"{PACKAGE}.local", f"{PACKAGE}.plugin")
THIRD_PARTY_ENGINE = ("openrlhf", "ray")


def _module_names() -> list[str]:
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _module_names()

# One interpreter imports the heavy third-party libraries once; each module is then imported in a fork of it,
# which starts with none of this package's modules loaded.
PROBE = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
import torch, transformers  # noqa: F401  (third party: shared by every fork, checked by no rule)
results = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(name)
            loaded = sorted(m for m in sys.modules
                            if m.split(".")[0] in ("openrlhf_safesteer", "openrlhf", "ray", "vllm", "flash_attn"))
            stand_ins = sorted(m for m in ("vllm", "flash_attn")
                               if getattr(sys.modules.get(m), "__safesteer_stand_in__", False))
            out = {"loaded": loaded, "stand_ins": stand_ins}
        except BaseException as error:  # noqa: BLE001 - reported, not raised, in the child
            out = {"error": f"{type(error).__name__}: {error}"}
        os.write(write, json.dumps(out).encode())
        os.close(write)
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    results[name] = json.loads(b"".join(chunks) or b'{"error": "the import killed its process"}')
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imports() -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *MODULES], capture_output=True, text=True, timeout=900,
                          cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "data" or len(parts) == 2 and not (ROOT / parts[1]).is_dir():
        return "core"
    return parts[1]


def _forbidden(name: str) -> tuple[str, ...]:
    """Module prefixes that importing `name` must not load."""
    layer = _layer(name)
    no_cli = () if layer == "cli" else (f"{PACKAGE}.cli",)
    if layer == "core":
        return (*THIRD_PARTY_ENGINE, *ENGINES, f"{PACKAGE}.eval", *FRONT_ENDS)
    if layer == "local":
        return (*THIRD_PARTY_ENGINE, f"{PACKAGE}.plugin", f"{PACKAGE}.eval", *FRONT_ENDS)
    if layer == "eval":
        return (*THIRD_PARTY_ENGINE, *ENGINES, *FRONT_ENDS)
    if layer == "plugin":
        return (f"{PACKAGE}.eval", *FRONT_ENDS)
    return no_cli


def _loads(loaded: list[str], prefix: str) -> bool:
    return any(m == prefix or m.startswith(prefix + ".") for m in loaded)


# plugin/config.py imports HelpFormatter from `cli` (its home is now openrlhf_safesteer.helpformat), and the
# launcher's modules import config.
CONFIG_IMPORTS_CLI = "plugin/config.py imports openrlhf_safesteer.cli.HelpFormatter (use openrlhf_safesteer.helpformat)"
LAYER_XFAIL = {
    f"{PACKAGE}.plugin.config": CONFIG_IMPORTS_CLI,
    f"{PACKAGE}.plugin.install": CONFIG_IMPORTS_CLI,
    f"{PACKAGE}.plugin.stock": CONFIG_IMPORTS_CLI + " (through plugin.install)",
}

# These modules subclass OpenRLHF's classes at import, and OpenRLHF imports flash_attn and vllm at import: they
# install the stand-ins themselves until the launcher and the Ray workers do it before importing them.
SUBCLASSES_OPENRLHF = ("imports OpenRLHF at module level and calls compat.install_import_stand_ins() there; "
                       "to move to the launcher and a Ray worker_process_setup_hook")
STAND_IN_XFAIL = {f"{PACKAGE}.plugin.{name}": f"plugin/{name}.py {SUBCLASSES_OPENRLHF}"
                  for name in ("teacher", "experience", "policy", "stock")}


def _cases(xfails: dict[str, str], names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=xfails[n])) if n in xfails else n
            for n in names]


@pytest.mark.slow
@pytest.mark.parametrize("name", _cases(LAYER_XFAIL, MODULES))
def test_module_loads_nothing_above_its_layer(imports, name):
    result = imports[name]
    assert "error" not in result, f"importing {name} failed: {result.get('error')}"
    above = [prefix for prefix in _forbidden(name) if _loads(result["loaded"], prefix)]
    assert not above, f"importing {name} ({_layer(name)} layer) loads {above}"


@pytest.mark.slow
@pytest.mark.parametrize("name", _cases(STAND_IN_XFAIL, [m for m in MODULES if _layer(m) == "plugin"]))
def test_importing_a_plugin_module_registers_no_stand_in(imports, name):
    result = imports[name]
    assert "error" not in result, f"importing {name} failed: {result.get('error')}"
    assert not result["stand_ins"], f"importing {name} registered stand-ins for {result['stand_ins']}"


def test_every_layer_is_known():
    """A new subpackage gets a layer here (and in docs/DESIGN) before it gets modules."""
    layers = {_layer(name) for name in MODULES}
    assert layers <= {"core", "local", "plugin", "eval", "cli", "demo", "compare"}, layers
