"""`safesteer`: every SafeSteer stage on one machine.

    safesteer direction --model M --out vec/       # refusal direction (steering vector)
    safesteer tokens    --model M --vector vec/ --out tokens.json
    safesteer train     --model M --vector vec/ --tokens tokens.json --out run/
    safesteer eval      --models base=M safesteer=run/final --out eval/
    safesteer demo      --out demo/                # all of the above on the embedded offline model

Each subcommand lives in its own module with `add_parser(subparsers)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from openrlhf_safesteer.helpformat import HelpFormatter

SUBCOMMANDS = {
    "direction": ("openrlhf_safesteer.cli.direction", "compute and select the refusal direction (steering vector)"),
    "tokens": ("openrlhf_safesteer.cli.tokens", "vote the safety-token set S from teacher/base disagreement"),
    "train": ("openrlhf_safesteer.cli.train", "train the student with localized on-policy distillation (local engine)"),
    "eval": ("openrlhf_safesteer.cli.eval", "evaluate checkpoints on safety, over-refusal and general benchmarks"),
    "demo": ("openrlhf_safesteer.cli.demo", "run the whole pipeline on the embedded offline model (CPU, no hub)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safesteer",
        description="SafeSteer: safety alignment by localized on-policy distillation from a steered teacher.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    parser.add_argument("--no-onednn", action="store_true",
                        help="keep PyTorch's default CPU matrix products for inference (oneDNN is faster on a CPU)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_parser(sub)
        else:
            # Listed in `safesteer --help` without importing torch-heavy modules.
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    from openrlhf_safesteer.cpu_kernels import onednn_linear

    with onednn_linear(not args.no_onednn):
        return int(module.run(args) or 0)


# What a user's bad input raises (the project's own errors derive from ValueError: IncompatibleArtifactError,
# ChatTemplateError, ...) and a missing or unwritable path. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def console_main(argv: list[str] | None = None) -> int:
    """The `safesteer` command: main(), with a user's bad input reported as one line and exit status 2.

    main() itself raises (for tests and for callers that want the exception); `--log-level DEBUG` keeps the
    traceback here too.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except USER_ERRORS as err:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        prog = " ".join(["safesteer", *(a for a in argv if a in SUBCOMMANDS)][:2])
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
