"""What the demo computes once for given inputs, reused when it runs again with the same inputs.

The base model's evaluation and stage 1 (the steering vector with its candidate table, the teacher check and
the safety tokens S) depend only on the model's weights, the prompts, the settings that shape them, this
package's code and data, and the numerical environment (torch and transformers versions, CPU threads, oneDNN).
`stage_key` hashes all of them, so a run that changes any of them computes afresh; a run that changes none
(another seed of the training, another learning rate, a rerun) reads the stored result and says so in its log.

An entry is a folder `<root>/<stage>-<key>` written whole into a temporary folder and renamed into place
(`files.replace_dir`): a run that is interrupted while storing leaves no entry, never half of one. The root is
$SAFESTEER_DEMO_CACHE, else `demo/` in the model cache (`loading.cache_root()`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openrlhf_safesteer.files import replace_dir
from openrlhf_safesteer.loading import SOURCE_MARKER, cache_root

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CHUNK = 1 << 22


def demo_cache_root() -> Path:
    """Where the demo's stage results are kept: $SAFESTEER_DEMO_CACHE, else <model cache>/demo."""
    return Path(os.environ.get("SAFESTEER_DEMO_CACHE") or cache_root() / "demo")


def _hash_files(paths: list[Path], root: Path) -> str:
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def model_fingerprint(model_dir: str) -> str | None:
    """The content of a local model: an embedded model's verified GGUF sha256 (its converted folder names it),
    else a hash of every file of the folder (about 1 s per GB). None for a hub id (not on disk: not cached)."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    marker = path / SOURCE_MARKER
    if marker.is_file():
        source = json.loads(marker.read_text())
        return f"gguf-sha256:{source['sha256']}"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return f"files:{_hash_files(files, path)}"


def code_fingerprint() -> str:
    """A hash of every .py and .json file of this package (its code and its prompt sets): any edit is a miss."""
    files = sorted(p for p in PACKAGE_DIR.rglob("*") if p.suffix in (".py", ".json") and p.is_file()
                   and "__pycache__" not in p.parts)
    return _hash_files(files, PACKAGE_DIR)


def environment(onednn: bool) -> dict[str, Any]:
    """What changes a float's last bits between two runs of the same code: library versions, threads, oneDNN."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "onednn": bool(onednn)}


def stage_key(stage: str, model: str, inputs: dict[str, Any], env: dict[str, Any], code: str) -> str:
    """sha256 (24 hex digits) of a stage's name, model fingerprint, inputs (JSON-able), environment and code."""
    blob = json.dumps({"stage": stage, "model": model, "inputs": inputs, "environment": env, "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def entry_dir(stage: str, key: str) -> Path:
    return demo_cache_root() / f"{stage}-{key}"


def load_entry(stage: str, key: str) -> Path | None:
    """The stored folder of (stage, key), or None when there is none."""
    path = entry_dir(stage, key)
    return path if path.is_dir() else None


def store_entry(stage: str, key: str, write: Callable[[Path], None]) -> Path | None:
    """write(folder) into a temporary folder, then move it to the entry's place. A failure to store (a read-only or
    full cache) is logged and returns None: the run has its result and goes on."""
    final = entry_dir(stage, key)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}-tmp-") as tmp:
            folder = Path(tmp) / "entry"
            folder.mkdir()
            write(folder)
            replace_dir(folder, final)
    except OSError as error:
        logger.warning("could not store the %s result in the demo cache (%s): %s", stage, final, error)
        return None
    return final
