"""Command-line front ends: `safesteer` (local) and `train_safesteer_ray` (OpenRLHF)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

# Kept importable from here for the front ends; its home is helpformat (the OpenRLHF launcher's flags use it too).
from openrlhf_safesteer.helpformat import HelpFormatter  # noqa: F401

_FLAG_TYPES = {"int": int, "float": float, "str": str}


def add_config_flags(parser: argparse.ArgumentParser, config: Any, names: list[str] | None = None,
                     required: tuple[str, ...] = ()) -> None:
    """A flag for each field of the config dataclass instance `config` (`local.config.knob` fields: their help,
    choices and flag name; `config`'s values are the defaults): `names` in that order, or every field with a
    flag in field order. The type comes from the annotation: int / float / str, `list[...]` takes one or more
    values, a bool is an on/off switch (--NAME, or --no-NAME when it defaults to True). `required` fields have
    no default. Parsed, each value is at args.FIELD_NAME (`config_values` collects them)."""
    from openrlhf_safesteer.local.config import flag_name

    fields = {f.name: f for f in dataclasses.fields(config)}
    for name in names or [f.name for f in fields.values() if f.metadata.get("cli", True)]:
        f = fields[name]
        default = getattr(config, name)
        kwargs: dict[str, Any] = {"dest": name, "help": f.metadata.get("help")}
        annotation = str(f.type).replace(" | None", "")
        if annotation == "bool":
            parser.add_argument(flag_name(f), action="store_false" if default else "store_true", **kwargs)
            continue
        if annotation.startswith("list["):
            annotation, kwargs["nargs"] = annotation[len("list["):-1], "+"
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(flag_name(f), type=_FLAG_TYPES[annotation], **kwargs)


def config_values(args: argparse.Namespace, config_cls: type, names: list[str] | None = None) -> dict[str, Any]:
    """The parsed values of the flags add_config_flags made for `config_cls` (the same `names`), by field name."""
    fields = dataclasses.fields(config_cls)
    return {name: getattr(args, name) for name in names or [f.name for f in fields if f.metadata.get("cli", True)]}


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
