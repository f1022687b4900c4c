"""What a reader of README types still parses: every `safesteer ...`, `python -m ...` and `bash recipes/...` command
in a README code block or inline code span is checked without loading a model, so a renamed flag, subcommand,
module or recipe breaks the suite, not a reader.

- `safesteer ...` and `python -m MODULE ...`: the command's own argparse parser reads the words (in process), and
  the run stops right after parsing; `--help` prints and exits 0. An inline span may name a command without its
  required flags (`safesteer train --retain-prompts-per-step N`): there only the words given must parse.
- `bash recipes/X.sh ...`: the recipe runs with `--dry-run` (it prints and checks, and starts nothing); one check
  per recipe and arguments, whether README shows it with `--dry-run` or without.
Placeholders (M, N, DIR, CKPT ...) stay words: parsing does not open paths.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFIXES = ("safesteer ", "python -m ", "bash recipes/")
# Synopsis words a reader replaces: optional brackets taken, "one or more" dropped, a number for N.
SYNOPSIS = {"CKPT|NAME=CKPT": "ckpt", "...": None, "N": "1"}


def normalise(line: str) -> str | None:
    """A README command as the words to check, or None when the line is no command of ours. Strips the timing
    and virtualenv prefixes the measured commands carry (`/usr/bin/time -v`, `.venv/bin/`) and a trailing
    comment; a synopsis listing several subcommands (`safesteer direction / tokens ...`) is no command."""
    line = line.split(" #")[0].strip()
    line = re.sub(r"^/usr/bin/time -v ", "", line)
    line = re.sub(r"^\.venv/bin/(python )", r"\1", line)
    line = re.sub(r"^\.venv/bin/safesteer ", "safesteer ", line)
    if not line.startswith(PREFIXES) or " / " in line or "COMMAND" in line:
        return None
    if line.startswith("bash recipes/"):     # checked with --dry-run whether it shows one or not: one check each
        line = " ".join(w for w in line.split() if w not in ("--dry-run", "[--dry-run]"))
    return " ".join(line.split())


def readme_commands(text: str) -> dict[str, bool]:
    """The commands of README's code blocks (continuation lines joined) and inline code spans, in order, once:
    {command: complete}, complete False for an inline span (a mention that may leave out required flags)."""
    found = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if language in ("", "bash", "sh", "console"):
            found += [(line, True) for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [(" ".join(span.split()), False) for span in re.findall(r"`([^`]+)`", prose)]
    commands: dict[str, bool] = {}
    for line, complete in found:
        command = normalise(line)
        if command:
            commands[command] = commands.get(command, False) or complete
    return commands


class Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once the words parsed: the command's work never starts."""


def parse_only(monkeypatch, main, argv: list[str], complete: bool = True) -> None:
    """Run main(argv) up to its parser: passes when the words parse (or --help exits 0), fails on exit 2.
    Not `complete`: a missing required flag passes too (argparse reports it after every given word parsed)."""
    real, real_error = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.error

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    def error(self, message):
        if not complete and message.startswith("the following arguments are required"):
            raise Parsed(message)
        real_error(self, message)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    try:
        main(argv)
    except Parsed:
        return
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"exit status {exit_.code}"
        return
    raise AssertionError("main returned without parsing its arguments")


def words(command: str) -> list[str]:
    return [SYNOPSIS.get(w, w) for w in shlex.split(command) if SYNOPSIS.get(w, w) is not None]


COMMANDS = readme_commands((REPO / "README.md").read_text())


def test_readme_has_the_commands_this_file_checks():
    """The extraction itself: each kind is found (a README rewrite that hid them from it would pass vacuously)."""
    kinds = {c.split()[0] + (" " + c.split()[1] if c.startswith("bash") else "") for c in COMMANDS}
    assert {"safesteer", "python"} <= kinds and any(k.startswith("bash recipes/") for k in kinds), COMMANDS
    assert readme_commands("```bash\n.venv/bin/safesteer eval --models a=b \\\n  --out x   # c\n```\n"
                           "and `safesteer direction / tokens`, `/usr/bin/time -v safesteer demo --out\no`") == {
        "safesteer eval --models a=b --out x": True, "safesteer demo --out o": False}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_readme_command_parses(command, monkeypatch, tmp_path, capsys, warm_python):
    argv, complete = words(command), COMMANDS[command]
    if argv[0] == "safesteer":
        from openrlhf_safesteer.cli.main import main

        parse_only(monkeypatch, main, argv[1:], complete)
    elif argv[0] == "python":
        assert argv[1] == "-m", command
        # a module whose main does not parse with argparse would run for real here (pytest ran the whole suite
        # inside this test once): README says `make test` for the suite
        assert argv[2] not in ("pytest", "pip"), f"README names `{command}`: write the make target instead"
        module = importlib.import_module(argv[2])
        parse_only(monkeypatch, module.main, argv[3:], complete)
    else:
        script = REPO / argv[1]
        assert script.is_file(), f"{command}: no {script}"
        env = dict(os.environ, PYTHON=warm_python, WORK=str(tmp_path / "work"),
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(["bash", str(script), "--dry-run", *argv[2:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{command}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def test_the_launchers_flag_list_in_docs_names_every_safesteer_flag():
    """docs/openrlhf.md lists the `--safesteer.*` flags in one sentence (`vector`, `tokens`, ...): a flag added to
    the launcher's parser and not to that list fails here (retain_divergence was missing once)."""
    from openrlhf_safesteer.plugin.config import PREFIX, build_parser

    text = (REPO / "docs" / "openrlhf.md").read_text()
    start = text.index("The launcher takes every flag of")
    listed = text[start:text.index("It runs OpenRLHF's own entry point", start)]
    named = {w.split()[0] for w in re.findall(r"`([^`]+)`", listed)}
    flags = {o[len(PREFIX):] for a in build_parser()._actions for o in a.option_strings if o.startswith(PREFIX)}
    assert flags - {"help"} <= named, sorted(flags - {"help"} - named)
