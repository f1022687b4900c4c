"""Session-wide test settings.

- The demo's stage cache (demo/cache.py) goes to a folder of this session, so tests neither read a developer's stored
  results nor leave entries in the user cache.
- One CPU thread per process (SAFESTEER_TEST_THREADS overrides): pytest.ini runs 2 xdist workers on the 2 cores, and
  every subprocess and Ray worker inherits OMP_NUM_THREADS. With 2 threads a process, the workers' thread pools wait
  on each other at every op (a 2-layer model ran 40x slower with 2 threads than with 1 under load).
- The slow tests start first, the longest first (their measured seconds below), so the two workers end together
  instead of one running the last long test alone. Modules whose module-scoped fixtures cost a minute or more are
  one xdist group each (`pytest.mark.xdist_group`, pytest.ini's --dist loadgroup): one worker builds them once.
- `warm_python`: a `python` for the recipes' $PYTHON that forks a warm interpreter (tests/forkserver.py).
- `warm_ray_workers`: Ray's workers, in every Ray test, are forks of another warm interpreter.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ["SAFESTEER_DEMO_CACHE"] = tempfile.mkdtemp(prefix="safesteer-demo-cache-")
THREADS = os.environ.get("SAFESTEER_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
os.environ.setdefault("MKL_NUM_THREADS", THREADS)

HERE = Path(__file__).resolve().parent
WARM_PYTHON_ENV = "SAFESTEER_TEST_WARM_PYTHON"   # the warm_python client, for a pytest run inside the suite

# Seconds a module's slow tests took (one at a time beside other work, 2026-12-08); a slow test not listed counts as 20 s.
SLOW_SECONDS = {
    "local/test_demo_run.py": 115, "openrlhf/test_compare.py": 110, "openrlhf/test_openrlhf_repeat.py": 100,
    "compare/test_frontier_e2e.py": 55, "test_layering.py": 35, "openrlhf/test_openrlhf_release_matrix.py": 30,
    "openrlhf/test_openrlhf_ray.py": 25,
}


def _expected_seconds(item: pytest.Item) -> float:
    if item.get_closest_marker("slow") is None:
        return 0.0
    module = Path(str(item.path)).resolve().relative_to(HERE).as_posix()
    return SLOW_SECONDS.get(module, 20.0)


def pytest_collection_modifyitems(config, items):
    # stable: a module's tests stay together and in order (module-scoped fixtures are built once per worker)
    items.sort(key=lambda item: -_expected_seconds(item))


def _start_fork_server(folder: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """Start tests/forkserver.py serving at folder/socket; returns the server and the client to use as `python`
    (which runs a fresh interpreter itself until the server has loaded its libraries and opened the socket)."""
    socket_path = str(folder / "socket")
    server = subprocess.Popen([sys.executable, str(HERE / "forkserver.py"), "serve", socket_path, *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    forkserver = runpy.run_path(str(HERE / "forkserver.py"))   # a test folder is no package to import from
    client = folder / "python"
    client.write_text(forkserver["client_source"](sys.executable, socket_path))
    client.chmod(0o755)
    return server, client


@pytest.fixture(scope="session")
def warm_python(tmp_path_factory) -> str:
    """A path to use as $PYTHON: each `python ...` it runs is a fork of one interpreter that has imported torch,
    transformers, DeepSpeed, peft and Ray (tests/forkserver.py), started once per test session (about 15 s). A pytest
    that the suite runs inside itself (the older OpenRLHF releases' runs) uses its caller's, named in the environment."""
    inherited = os.environ.get(WARM_PYTHON_ENV)
    if inherited and os.path.exists(inherited):
        yield inherited
        return
    folder = tmp_path_factory.mktemp("warm_python")
    server, client = _start_fork_server(folder)
    deadline = time.monotonic() + 300
    while not (folder / "socket").exists():
        if server.poll() is not None:
            raise RuntimeError(f"the fork server exited: {server.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("the fork server did not start in 300 s")
        time.sleep(0.2)
    os.environ[WARM_PYTHON_ENV] = str(client)
    yield str(client)
    os.environ.pop(WARM_PYTHON_ENV, None)
    server.kill()
    server.wait()


@pytest.fixture(scope="session", autouse=True)
def warm_ray_workers(request, tmp_path_factory):
    """Every Ray worker of the session's Ray jobs (started here or by a recipe or CLI this session runs) is a fork of
    a warm interpreter that has imported torch, transformers, DeepSpeed and peft: Ray's `py_executable`, set by the
    RAY_RUNTIME_ENV_HOOK `openrlhf_safesteer.testing.warm_ray_workers`. A fresh worker spends about 10 s of CPU on
    those imports, and a CPU recipe's run starts four (a 2-step run on the tiny model: 71 s fresh, 30 s warm). Only
    where a Ray test was collected (not in tests/vllm, whose engines keep their own workers); the server is not
    waited for: until it is up, the client starts a fresh interpreter, as Ray would. SAFESTEER_TEST_WARM_RAY=0 turns it
    off (fresh workers, as outside the suite)."""
    wanted = [item for item in request.session.items if item.get_closest_marker("ray") is not None
              and "vllm" not in Path(str(item.path)).parts]
    if not wanted or os.environ.get("SAFESTEER_TEST_WARM_RAY", "1") == "0":
        yield None
        return
    from openrlhf_safesteer import testing

    inherited = os.environ.get(testing.WARM_RAY_WORKER_ENV)
    if inherited and os.path.exists(inherited):   # a pytest run inside the suite: its caller's server
        yield inherited
        return
    folder = tmp_path_factory.mktemp("warm_ray_workers")
    # the environment the workers get: the session's, with what the Ray jobs' runtime_env sets at import time
    server, client = _start_fork_server(folder, "--without", "ray", env={**os.environ, "DS_ACCELERATOR": "cpu"})
    saved = {key: os.environ.get(key) for key in ("RAY_RUNTIME_ENV_HOOK", testing.WARM_RAY_WORKER_ENV)}
    os.environ["RAY_RUNTIME_ENV_HOOK"] = f"{testing.__name__}.{testing.warm_ray_workers.__name__}"
    os.environ[testing.WARM_RAY_WORKER_ENV] = str(client)
    yield str(client)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.kill()
    server.wait()
