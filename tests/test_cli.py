"""The `medpipe` console script: every stage listed, every --help answers, errors are one line."""

import subprocess
import sys
from pathlib import Path

import pytest

from medpipe.cli import STAGES

BIN = Path(sys.executable).parent
MEDPIPE = BIN / "medpipe"


def run(*args, timeout=120):
    return subprocess.run([str(MEDPIPE), *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    result = run("--help")
    assert result.returncode == 0
    for name in ("ingest", "train", "evaluate", "publish", "serve", "predict", "demo"):
        assert f"  {name} " in result.stdout


@pytest.mark.parametrize("command", sorted(STAGES))
def test_each_subcommand_help_describes_options(command):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--" in result.stdout


def test_unknown_command_is_a_clear_error():
    result = run("trian")
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr


@pytest.mark.parametrize("module", sorted({module for module, _ in STAGES.values()}))
def test_every_stage_runs_as_a_module(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_console_flags_are_taken_before_the_stage_parses():
    from medpipe.cli import split_console_flags

    assert split_console_flags(["--config", "c", "--verbose", "--log-file", "x.log", "a.png"]) == (
        True, "x.log", ["--config", "c", "a.png"])
    assert split_console_flags(["--log-file=y.log", "--", "--verbose"]) == (False, "y.log", ["--", "--verbose"])
