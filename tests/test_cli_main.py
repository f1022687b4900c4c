"""The `safesteer` console entry point: a user's bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from openrlhf_safesteer.cli import main as cli_main


@pytest.fixture
def failing_subcommand(monkeypatch):
    """A stand-in `direction` subcommand whose run() raises what the test puts in `raised`."""
    raised: list[BaseException] = []
    module = types.ModuleType("fake_direction")
    module.add_parser = lambda sub: sub.add_parser("direction")

    def run(args):
        raise raised[0]

    module.run = run
    monkeypatch.setitem(sys.modules, "fake_direction", module)
    monkeypatch.setitem(cli_main.SUBCOMMANDS, "direction", ("fake_direction", "stand-in"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)      # pytest's handlers stop main()'s basicConfig from setting it
    yield raised
    root.setLevel(level)                # setLevel, not setattr: it also clears the loggers' level cache


def test_bad_input_is_one_line_and_exit_2(failing_subcommand, capsys):
    failing_subcommand.append(ValueError("--n-train must be >= 1, got -3"))
    assert cli_main.console_main(["--log-level", "WARNING", "direction"]) == 2
    err = capsys.readouterr().err
    assert err == "safesteer direction: error: --n-train must be >= 1, got -3\n"       # no traceback
    failing_subcommand[0] = FileNotFoundError(2, "No such file or directory", "vec/steering_vector.json")
    assert cli_main.console_main(["--log-level", "WARNING", "direction"]) == 2
    assert "vec/steering_vector.json" in capsys.readouterr().err


def test_bugs_and_debug_keep_the_traceback(failing_subcommand):
    failing_subcommand.append(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):            # not a user error: not swallowed
        cli_main.console_main(["--log-level", "WARNING", "direction"])
    failing_subcommand[0] = ValueError("bad input")
    with pytest.raises(ValueError, match="bad input"):          # main() raises for callers and tests
        cli_main.main(["--log-level", "WARNING", "direction"])
    logging.getLogger().setLevel(logging.DEBUG)
    with pytest.raises(ValueError, match="bad input"):          # --log-level DEBUG shows where it came from
        cli_main.console_main(["--log-level", "DEBUG", "direction"])
