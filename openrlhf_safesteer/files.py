"""Files on disk, written so that no reader ever sees half of one, and read back the same way everywhere.

- `atomic_write_text`, `atomic_write_json`, `atomic_savefig`, and `atomic_write` for any writer that takes a
  path (safetensors' save_file): write to a temporary name in the target's folder, then `os.replace` it into
  place; an interrupted write leaves the old file (or none), never a truncated one.
- `replace_dir`: swap a finished folder in whole; the old copy is removed only once the new one is in place.
- `json_sha256`: the sha256 of an object's canonical JSON (sorted keys), for provenance and cache keys.
- `read_jsonl` / `append_jsonl`: one JSON object per line (metrics, caches, sweeps).

Plain standard library: every layer of the package may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

logger = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) to a new temporary file in path's folder (created with the folder), then os.replace it to
    path; the temporary file is removed if anything fails. Its name is `.NAME.XXXX.tmp`: it does not end in
    path's suffix, so nothing that globs for the real files picks it up, and a writer that picks its format
    from the suffix must be told the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) to path via a temporary file in the same folder and os.replace (never half-written)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, ensure_ascii: bool = True,
                      sort_keys: bool = False) -> None:
    """json.dumps(obj) plus a final newline, written atomically. Objects JSON cannot encode (paths, dtypes)
    are written as their str()."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, default=str)
    atomic_write_text(path, text + "\n")


def atomic_savefig(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """fig.savefig as PNG to a temporary file in path's folder, then os.replace: an interrupted write never
    leaves a truncated plot at `path` (the temporary name does not end in .png, hence the explicit format)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished directory `new` to `final` (same file system), replacing what is there.

    Never deletes before the new copy is in place: the old `final` is renamed aside, the new one renamed
    in, and only then the old one removed. An interruption leaves either the old or the new complete copy
    at `final` (plus, at worst, a hidden `.NAME.old-PID` folder to delete), never a half-deleted one.
    """
    new, final = Path(new), Path(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    had_old = final.exists()
    if had_old:
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if had_old and not final.exists():
            os.replace(old, final)
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def json_sha256(obj: Any, ensure_ascii: bool = True) -> str:
    """The hex sha256 of obj's JSON with sorted keys (str() for what JSON cannot encode): equal objects give
    equal digests whatever their key order. Callers that store a short key take a prefix of it."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=ensure_ascii, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False) -> list[Any]:
    """Every JSON line of `path` in order, blank lines skipped; [] when the file does not exist.

    skip_bad_lines: log and skip a line that is not JSON (a line cut by an interrupted append, in a cache
    whose missing entries are regenerated) instead of raising json.JSONDecodeError.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not skip_bad_lines:
                    raise
                logger.warning("%s: skipping a truncated line", path)
    return rows


def append_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Append one JSON line per row and fsync, so that what was appended survives an interruption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        handle.flush()
        os.fsync(handle.fileno())
