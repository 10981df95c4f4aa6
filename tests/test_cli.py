"""The `isc` command and the shared argparse conventions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from entrypoints.cli import COMMANDS, main
from isc.cliutil import Parser, positive_int, str2bool


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_exits_2(capsys):
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_parser_accepts_dash_and_underscore_spellings():
    p = Parser()
    p.add_argument("--memory-size", type=positive_int, default=1)
    assert p.parse_args(["--memory_size", "7"]).memory_size == 7
    assert p.parse_args(["--memory-size", "8"]).memory_size == 8


def test_numeric_validator_names_the_option(capsys):
    p = Parser(prog="t")
    p.add_argument("--memory-size", type=positive_int, default=1)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--memory-size", "0"])
    assert exc.value.code == 2
    assert "--memory-size" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True), ("", False)])
def test_str2bool(text, value):
    assert str2bool(text) is value


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "entrypoints.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: isc <command>" in out.stdout
