"""The help layout of every command's flags: `safesteer`, the OpenRLHF launcher's --safesteer.* flags, the
comparison. Below the front ends, so that an engine's flag parser can use it without importing `cli`."""

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
