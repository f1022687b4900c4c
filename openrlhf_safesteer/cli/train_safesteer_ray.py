"""`python -m openrlhf_safesteer.cli.train_safesteer_ray`: SafeSteer through OpenRLHF's Ray PPO trainer.

Every flag of `python -m openrlhf.cli.train_ppo_ray` works unchanged (OpenRLHF's own parser reads
them); the `--safesteer.*` flags add the method:

    python -m openrlhf_safesteer.cli.train_safesteer_ray \\
        --actor.model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct \\
        --data.prompt_dataset prompts.jsonl --data.input_key prompt --data.apply_chat_template \\
        --vllm.num_engines 8 ... \\
        --safesteer.vector vec/ --safesteer.tokens tokens.json [--safesteer.objective exact|sampled]

No reward model, reward function or critic. `--safesteer.help` lists the SafeSteer flags,
`--safesteer.dry_run` checks everything and starts nothing. Exit status 2 for a refused flag
combination (including a tokenizer without a chat template or a missing or empty local prompt
dataset) or missing, malformed or incompatible artifacts, with the reason on stderr.
"""

from __future__ import annotations

import logging
import shlex
import sys

logger = logging.getLogger("openrlhf_safesteer.train_safesteer_ray")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    user_argv = list(sys.argv[1:] if argv is None else argv)

    from openrlhf_safesteer.plugin.config import (
        ArtifactError,
        SafeSteerConfigError,
        build_parser,
        default_openrlhf_flags,
        split_argv,
    )

    if "-h" in user_argv or "--help" in user_argv:
        # Ours first; OpenRLHF's parser then prints every train_ppo_ray flag and exits.
        build_parser().print_help()
        print("\nEvery flag of python -m openrlhf.cli.train_ppo_ray is accepted unchanged:\n")
    config, openrlhf_argv = split_argv(user_argv)

    from openrlhf_safesteer.plugin import compat

    try:
        version = compat.check_openrlhf_version()
    except compat.UnsupportedOpenRLHFError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from openrlhf_safesteer.plugin import versions

    known = versions.default_flags_supported()
    openrlhf_argv = default_openrlhf_flags(openrlhf_argv, config.objective, config.coeff_key,
                                           loss_agg_mode=known["--actor.loss_agg_mode"])

    from openrlhf_safesteer.plugin.install import run_openrlhf_main
    from openrlhf_safesteer.steering import IncompatibleArtifactError

    try:
        result = run_openrlhf_main(config, openrlhf_argv, user_argv)
    except (SafeSteerConfigError, IncompatibleArtifactError, ArtifactError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except AssertionError as error:  # OpenRLHF validates its own flags with asserts
        print(f"error: OpenRLHF rejected the flags: {error}", file=sys.stderr)
        return 2
    if config.dry_run:
        args = result["args"]
        print(f"dry run OK: OpenRLHF {version} parsed {len(openrlhf_argv)} argument words; SafeSteer objective "
              f"{args.safesteer.objective}, rollout {args.safesteer.rollout}; nothing started.")
        print("OpenRLHF command: python -m openrlhf.cli.train_ppo_ray " + shlex.join(openrlhf_argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
