"""Command-line front ends: `safesteer` (local) and `train_safesteer_ray` (OpenRLHF)."""

from __future__ import annotations

import argparse

# Kept importable from here for the front ends; its home is helpformat (the OpenRLHF launcher's flags use it too).
from openrlhf_safesteer.helpformat import HelpFormatter  # noqa: F401


def check_out(out: str, check) -> None:
    """Run check(out) (steering.check_vector_dir / check_output_file) and turn its OSError into a SystemExit
    naming --out: a bad output path must fail before the compute whose result it would receive."""
    try:
        check(out)
    except OSError as error:
        raise SystemExit(f"--out {out}: {error}") from None


def check_chat_template(model: str) -> None:
    """Load only the tokenizer and require its chat template, before the weights load (ChatTemplateError)."""
    from transformers import AutoTokenizer

    from openrlhf_safesteer.chat import require_chat_template
    from openrlhf_safesteer.loading import resolve_model

    require_chat_template(AutoTokenizer.from_pretrained(resolve_model(model)))


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def add_device_map_flags(parser: argparse.ArgumentParser) -> None:
    """--device-map / --max-memory / --offload-folder: spread a model too big for one device (accelerate)."""
    parser.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                        help="spread the model's layers over every visible GPU (then CPU RAM, then --offload-folder) "
                             "with accelerate, for models larger than one device (a 70B model in bf16 is ~141 GB); "
                             "excludes --device")
    parser.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                        help="with --device-map: memory per device, e.g. '0=70GiB,1=70GiB,cpu=200GiB' (GPU index, "
                             "cpu or disk)")
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="with --device-map: folder for weights that fit no device (disk offload, slow)")


def parse_max_memory(text: str | None) -> dict | None:
    """'0=70GiB,cpu=200GiB' -> {0: '70GiB', 'cpu': '200GiB'} (accelerate's max_memory); SystemExit when malformed."""
    if text is None:
        return None
    memory: dict = {}
    for item in text.split(","):
        device, sep, size = item.strip().partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not device or not size:
            raise SystemExit(f"--max-memory {text!r}: expected DEVICE=SIZE[,DEVICE=SIZE...], e.g. 0=70GiB,cpu=200GiB")
        if device.isdigit():
            key: int | str = int(device)
        elif device in ("cpu", "disk", "mps"):
            key = device
        else:
            raise SystemExit(f"--max-memory {text!r}: device {device!r} is not a GPU index, cpu, mps or disk")
        if not any(ch.isdigit() for ch in size):
            raise SystemExit(f"--max-memory {text!r}: size {size!r} has no number (e.g. 70GiB)")
        memory[key] = int(size) if size.isdigit() else size  # accelerate: an int of bytes, or "70GiB"
    return memory


def device_placement(args) -> dict:
    """load_model's placement keywords from the parsed flags: {'device': ...} or {'device_map': ..., ...}.

    Raises SystemExit for contradictory flags before any weight loads.
    """
    if args.device_map is None:
        if args.max_memory is not None or args.offload_folder is not None:
            raise SystemExit("--max-memory and --offload-folder need --device-map")
        return {"device": args.device}
    if args.device is not None:
        raise SystemExit("--device and --device-map exclude each other: --device-map places the model itself")
    return {"device_map": args.device_map, "max_memory": parse_max_memory(args.max_memory),
            "offload_folder": args.offload_folder}
