"""Command-line front ends: `safesteer` (local) and `train_safesteer_ray` (OpenRLHF)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, and the module docstring kept as written.

    Unlike argparse's ArgumentDefaultsHelpFormatter, it says nothing where there is nothing to say:
    no "(default: None)" for a flag whose default is decided at run time, no "(default: False)" for an
    on/off switch, and no second default where the help text already gives one in words.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0
                or "default" in help_text.lower()):
            return help_text
        return super()._get_help_string(action)


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
    from openrlhf_safesteer.demo.model import resolve_model

    require_chat_template(AutoTokenizer.from_pretrained(resolve_model(model)))
