"""Released OpenRLHF wheels on this machine: download once into a cache, read their source, unpack one onto a path.

The version tests and the contract check (`python -m openrlhf_safesteer.plugin.contract --wheel X`) run the plugin
against an OpenRLHF release that is not the installed one. A wheel is about 170 KB of pure Python, so
`pip download --no-deps` is cheap; it is kept under SAFESTEER_OPENRLHF_CACHE (default ~/.cache/openrlhf-safesteer,
where CI caches can keep it between runs). `overlay(X)` unpacks the `openrlhf` package and its `.dist-info` into
one folder: put first on sys.path / PYTHONPATH, both `import openrlhf` and `importlib.metadata.version("openrlhf")`
resolve to X, on top of whatever stack (torch, transformers, DeepSpeed, Ray) is installed.

Imports neither torch nor OpenRLHF.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE_ENV = "SAFESTEER_OPENRLHF_CACHE"
# Set to 1 where no package index can be reached (an air-gapped machine): the per-version tests then skip,
# naming the download error, instead of failing. Unset (CI has PyPI), a failed download fails them.
OFFLINE_ENV = "SAFESTEER_OFFLINE_OK"


class DownloadError(RuntimeError):
    """`pip download` could not fetch an OpenRLHF wheel (no network, no such release)."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "openrlhf-safesteer")


def cached_wheel(version: str) -> Path | None:
    # Wheel file names spell the version as released (0.10.1.post2); cp3XX tags differ per interpreter.
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = sorted((cache_dir() / "wheels").glob(f"openrlhf-{version}-*.whl"))
    preferred = [path for path in found if f"-{tag}-" in path.name]
    return (preferred or found or [None])[0]


def wheel(version: str) -> Path:
    """The path of OpenRLHF `version`'s wheel, downloaded (no dependencies) on first use."""
    found = cached_wheel(version)
    if found:
        return found
    target = cache_dir() / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                           "--dest", str(target), f"openrlhf=={version}"],
                          capture_output=True, text=True, timeout=300)
    found = cached_wheel(version)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DownloadError(f"pip download openrlhf=={version} failed: {tail[0]}")
    return found


def _package_path(name: str) -> str | None:
    """A wheel member's path as installed: `openrlhf-X.data/purelib/openrlhf/a.py` -> `openrlhf/a.py`; None for
    members that are not the openrlhf package or its metadata (the wheel also ships a top-level `tests` package,
    which on a path would shadow other test packages)."""
    parts = name.split("/")
    if len(parts) > 2 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
        parts = parts[2:]
    if parts[0] == "openrlhf" or parts[0].endswith(".dist-info"):
        return "/".join(parts)
    return None


def wheel_sources(path: Path) -> dict[str, str]:
    """{'openrlhf/...py': source text} of every Python file of the openrlhf package in a wheel."""
    sources = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            installed = _package_path(name)
            if installed and installed.startswith("openrlhf/") and installed.endswith(".py"):
                sources[installed] = archive.read(name).decode("utf-8")
    return sources


def overlay(version: str) -> Path:
    """A folder holding OpenRLHF `version`'s package and .dist-info only (unpacked once, then reused)."""
    target = cache_dir() / "site" / version
    if (target / "openrlhf" / "__init__.py").is_file():
        return target
    source = wheel(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside the target and rename: a concurrent or interrupted unpack never leaves half a package there.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{version}-"))
    try:
        with zipfile.ZipFile(source) as archive:
            for name in archive.namelist():
                installed = _package_path(name)
                if installed and not name.endswith("/"):
                    out = staging / installed
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(archive.read(name))
        try:
            staging.rename(target)
        except OSError:  # another process won the race
            if not (target / "openrlhf" / "__init__.py").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def overlay_env(version: str, base: dict | None = None, prepend: list[str] | None = None) -> dict:
    """An environment whose Python imports OpenRLHF `version` (its overlay first on PYTHONPATH)."""
    env = dict(os.environ if base is None else base)
    parts = [str(overlay(version)), *(prepend or [])]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env
