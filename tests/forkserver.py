"""A warm `python` for the subprocesses the tests start: one interpreter imports the heavy third-party libraries once,
and each `python ...` the recipes run becomes a fork of it.

Why: a recipe's --dry-run is one `python -m ...` that imports OpenRLHF's CLI (torch, transformers, DeepSpeed, Ray:
13-16 s of CPU on 2 cores), and the suite runs about fifty of them (each recipe, the README's commands, the GPU
comparison's stages, and every recipe again on each older OpenRLHF release). A fork starts with those libraries
loaded and none of this project's or OpenRLHF's modules, so it runs the same code as a fresh `python` would: the
recipe's own entry point, OpenRLHF's own parser, the overlay's OpenRLHF where PYTHONPATH puts one first.

    python tests/forkserver.py serve SOCKET        # the server (the `warm_python` fixture starts it)
    CLIENT -m module args... / -c code / script    # the client the fixture writes: what $PYTHON points at

The client passes its stdin, stdout and stderr (as file descriptors), argv, environment and working directory; the
fork takes them as its own and sends its exit status back. A request the fork cannot reproduce exactly (an option
other than -u and -B, reading a program from stdin, an environment that differs in a variable read at
import time) runs in a fresh interpreter instead. If the client dies (a test's timeout), the fork's process group is
killed. A fork whose environment names a folder in SAFESTEER_RUN_PIDS writes its pid there: a timed run
(compare.run.timed_run) then counts its memory, as it counts its own descendants'.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys

# Read when a preloaded library is imported: a request that sets them differently gets a fresh interpreter.
# (TOKENIZERS_PARALLELISM is not: the tokenizers library reads it each time it may go parallel.)
IMPORT_TIME_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                   "CUDA_VISIBLE_DEVICES", "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME",
                   "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS")
PRELOAD = ("torch", "transformers", "deepspeed", "peft", "ray", "safetensors", "numpy")
SIMPLE_FLAGS = {"-u", "-B"}

CLIENT = r'''#!{python} -IS
"""$PYTHON for the tests: a fork of the warm interpreter at {socket} (tests/forkserver.py)."""
import array, json, os, socket, struct, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    conn.connect({socket!r})
except OSError:
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
request = json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
conn.sendmsg([struct.pack("!I", len(request)) + request],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
status = b""
while len(status) < 4:
    chunk = conn.recv(4 - len(status))
    if not chunk:
        sys.exit(1)   # the fork died without a status (a signal): as a crashed interpreter would
    status += chunk
code = struct.unpack("!i", status)[0]
if code == {fresh}:   # the server cannot reproduce this interpreter: run a fresh one
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
sys.exit(code)
'''


FRESH = -(2 ** 31)   # the status that tells the client to run a fresh interpreter itself


def client_source(python: str, socket_path: str) -> str:
    return CLIENT.format(python=python, socket=socket_path, fresh=FRESH)


def parse_argv(argv: list[str]) -> tuple[list[str], str, str, list[str]] | None:
    """Split `python` arguments into (flags, kind, target, args) with kind 'module', 'code' or 'script'; None when
    the request needs a fresh interpreter."""
    flags = []
    for i, word in enumerate(argv):
        if word in SIMPLE_FLAGS:
            flags.append(word)
        elif word in ("-m", "-c"):
            if i + 1 >= len(argv):
                return None
            return flags, "module" if word == "-m" else "code", argv[i + 1], argv[i + 2:]
        elif word.startswith("-"):
            return None
        else:
            return flags, "script", word, argv[i + 1:]
    return None


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancillary, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    (size,) = struct.unpack("!I", data[:4])
    body = data[4:]
    while len(body) < size:
        body += conn.recv(size - len(body))
    return json.loads(body), list(fds)


def _watch_client(conn: socket.socket) -> None:
    """Kill this fork's process group when the client goes away before the fork is done."""
    import signal
    import threading

    def watch():
        try:
            conn.recv(1)
        except OSError:
            pass
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def _run(request: dict, parsed: tuple, base_path: list[str], base_pythonpath: list[str]) -> int:
    import atexit
    import runpy
    import traceback

    flags, kind, target, args = parsed
    registry = request["env"].get("SAFESTEER_RUN_PIDS")
    if registry and os.path.isdir(registry):   # a timed run counts this fork's memory (compare.run.timed_run)
        open(os.path.join(registry, str(os.getpid())), "w").close()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # sys.path as a fresh interpreter would build it: the program's folder (or ''), PYTHONPATH, the site folders
    pythonpath = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    head = {"module": os.getcwd(), "code": "", "script": os.path.dirname(os.path.abspath(target))}[kind]
    sys.path[:] = [head, *(os.path.abspath(p) for p in pythonpath),
                   *(p for p in base_path if p not in base_pythonpath)]
    sys.dont_write_bytecode = "-B" in flags
    if "-u" in flags:
        sys.stdout.reconfigure(write_through=True)
        sys.stderr.reconfigure(write_through=True)
    code = 0
    try:
        if kind == "module":
            sys.argv = [target, *args]   # runpy puts the module's file in argv[0]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "code":
            sys.argv = ["-c", *args]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")
    except SystemExit as done:
        if done.code is None:
            code = 0
        elif isinstance(done.code, int):
            code = done.code
        else:
            print(done.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code


def serve(socket_path: str, preload: tuple[str, ...] = PRELOAD) -> None:
    import signal
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in preload:
            try:
                __import__(name)
            except ImportError:
                pass
    base_env = {key: os.environ.get(key) for key in IMPORT_TIME_ENV}
    # what the libraries added (ray puts its thirdparty_files first), less this file's folder, which a fresh
    # `python` would not have
    here = os.path.dirname(os.path.abspath(__file__))
    base_path = [p for p in sys.path if os.path.abspath(p) != here]
    base_pythonpath = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # forks are reaped by the kernel; their clients get the status
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path + ".tmp")
    os.rename(socket_path + ".tmp", socket_path)      # the client connects only once the libraries are loaded
    server.listen(16)
    while True:
        conn, _ = server.accept()
        try:
            request, fds = _recv_request(conn)
        except (OSError, ValueError, struct.error):
            conn.close()
            continue
        parsed = parse_argv(request["argv"])
        sys.stdout.flush()
        sys.stderr.flush()
        if parsed is None or any(request["env"].get(key) != value for key, value in base_env.items()):
            conn.sendall(struct.pack("!i", FRESH))
        elif os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.setpgid(0, 0)
            for target, fd in zip((0, 1, 2), fds):
                os.dup2(fd, target)
            for fd in fds:
                os.close(fd)
            _watch_client(conn)
            code = _run(request, parsed, base_path, base_pythonpath)
            try:
                conn.sendall(struct.pack("!i", code))
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        conn.close()


if __name__ == "__main__":
    # --without ray: a server for Ray's workers. Ray's C++ core reads its settings, the worker's job id among them,
    # from the environment once per process, when `ray` is imported: a fork of a process that imported it would
    # start every worker with the server's (empty) job id.
    if len(sys.argv) < 3 or sys.argv[1] != "serve" or (sys.argv[3:] and sys.argv[3] != "--without"):
        sys.exit("usage: python tests/forkserver.py serve SOCKET [--without MODULE ...]")
    serve(sys.argv[2], tuple(name for name in PRELOAD if name not in sys.argv[4:]))
