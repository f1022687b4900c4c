"""Check a command line against an OpenRLHF entry point's own parser, without running it.

    python -m openrlhf_safesteer.plugin.check_flags openrlhf.cli.train_dpo --model.model_name_or_path M ...

Used by the recipes' --dry-run for OpenRLHF's own trainers (the DPO and PPO baselines). Exit
status 0 when OpenRLHF accepts every flag, 2 (with OpenRLHF's message) when it does not.
"""

from __future__ import annotations

import sys

ENTRY_POINTS = ("openrlhf.cli.train_dpo", "openrlhf.cli.train_ppo_ray", "openrlhf.cli.train_sft",
                "openrlhf.cli.train_rm")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ENTRY_POINTS:
        print(f"usage: python -m openrlhf_safesteer.plugin.check_flags {{{','.join(ENTRY_POINTS)}}} FLAGS...",
              file=sys.stderr)
        return 2
    from openrlhf_safesteer.plugin import compat
    from openrlhf_safesteer.plugin.install import parse_openrlhf_flags

    try:
        version = compat.check_openrlhf_version()
        parse_openrlhf_flags(argv[0], argv[1:])
    except compat.UnsupportedOpenRLHFError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except AssertionError as error:
        print(f"error: OpenRLHF rejected the flags: {error}", file=sys.stderr)
        return 2
    print(f"flags OK for {argv[0]} (OpenRLHF {version}): {len(argv) - 1} argument words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
