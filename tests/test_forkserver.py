"""The warm interpreter of tests/forkserver.py (the recipes' $PYTHON in the suite) behaves as a fresh `python`:
the same argv, sys.path, exit status, streams and uncaught-exception output, none of this project's modules loaded;
what it cannot reproduce runs in a fresh interpreter; a fork whose client is killed dies with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

PROBE = ("import json, sys; "
         "print(json.dumps({'argv': sys.argv, 'path0': sys.path[0], 'name': __name__, "
         "'input': sys.stdin.read(), 'project': sorted(m for m in sys.modules if m.split('.')[0] in "
         "('openrlhf', 'openrlhf_safesteer')), 'warm': 'torch' in sys.modules})); "
         "print('to stderr', file=sys.stderr); sys.exit(int(sys.argv[1]))")


def run(python: str, args: list[str], tmp_path, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], cwd=tmp_path, input=stdin, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_a_fork_runs_code_as_a_fresh_interpreter_does(warm_python, tmp_path):
    fresh, warm = (run(p, ["-c", PROBE, "3", "x y"], tmp_path, stdin="in\n") for p in (sys.executable, warm_python))
    assert warm.returncode == fresh.returncode == 3
    assert warm.stderr == fresh.stderr == "to stderr\n"
    seen, want = json.loads(warm.stdout), json.loads(fresh.stdout)
    assert seen.pop("warm") is True and want.pop("warm") is False     # the fork started with torch loaded
    assert seen == want == {"argv": ["-c", "3", "x y"], "path0": "", "name": "__main__", "input": "in\n",
                            "project": []}


def test_a_module_and_a_script_get_their_argv_path_and_exceptions(warm_python, tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tool.py").write_text("import sys\nprint(sys.argv[1:], sys.path[0])\nraise ValueError('bad ' + sys.argv[1])\n")
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(sys.argv, sys.path[0] == __import__('os').path.dirname(__file__))\n")
    library = tmp_path / "lib"
    library.mkdir()
    for args in (["-m", "pkg.tool", "a", "--flag"], [str(script), "b"]):
        fresh, warm = (run(p, args, tmp_path, env={"PYTHONPATH": str(library)}) for p in (sys.executable, warm_python))
        assert (warm.returncode, warm.stdout) == (fresh.returncode, fresh.stdout), args
        assert warm.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:], args
    assert fresh.stdout.strip().endswith("True")
    module = run(warm_python, ["-m", "pkg.tool", "a"], tmp_path)
    assert module.returncode == 1 and module.stderr.splitlines()[-1] == "ValueError: bad a"
    shown = run(warm_python, ["-c", "import sys; print(sys.path[1])"], tmp_path, env={"PYTHONPATH": str(library)})
    assert shown.stdout.strip() == str(library)


@pytest.mark.parametrize("case", ["option", "import-time variable"])
def test_what_a_fork_cannot_reproduce_runs_in_a_fresh_interpreter(warm_python, tmp_path, case):
    args, env = (["-W", "ignore", "-c", PROBE, "0"], {}) if case == "option" else (["-c", PROBE, "0"],
                                                                                    {"OMP_NUM_THREADS": "7"})
    proc = run(warm_python, args, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["warm"] is False


def test_a_fork_dies_with_its_client(warm_python, tmp_path):
    marker = tmp_path / "pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    client = subprocess.Popen([warm_python, "-c", code], cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.1)
    fork = int(marker.read_text())
    assert fork != client.pid
    client.send_signal(signal.SIGKILL)
    client.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{fork}") and open(f"/proc/{fork}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "the fork outlived its client"
        time.sleep(0.1)


def test_a_timed_run_counts_the_memory_of_a_fork_and_of_its_children(warm_python, tmp_path):
    """compare.run.timed_run measures a run's peak RSS over its process tree; a fork of the warm server is not in
    that tree, so it registers itself (SAFESTEER_RUN_PIDS) and is counted, with a child it starts, each once."""
    from openrlhf_safesteer.compare.run import registered_processes, timed_run, tree_rss

    child = "import time; block = bytearray(300 * 2 ** 20); time.sleep(4)"
    code = ("import subprocess, sys, time; block = bytearray(300 * 2 ** 20); "
            f"subprocess.run([sys.executable, '-c', {child!r}])")
    run = timed_run([warm_python, "-c", code], tmp_path / "log", dict(os.environ), poll_seconds=0.1)
    assert run["returncode"] == 0, (tmp_path / "log").read_text()
    assert run["peak_rss_mb"] > 600          # the fork's 300 MB and its child's (the client alone is ~10 MB)

    import psutil

    me = psutil.Process()
    assert tree_rss([me, me]) == tree_rss([me]) > 0
    (tmp_path / "pids").mkdir()
    for name in (str(os.getpid()), "not-a-pid", "999999999"):
        (tmp_path / "pids" / name).write_text("")
    assert [p.pid for p in registered_processes(tmp_path / "pids")] == [os.getpid()]
