"""The `proxytune` console script: every subcommand the README teaches reaches its module's own CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows import cli

SCRIPT = Path(sys.executable).parent / "proxytune"


def test_console_script_is_installed_and_lists_its_commands():
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in cli.COMMANDS:
        assert command in out.stdout


def test_presets_list_runs_through_the_cli(capsys):
    assert cli.main(["presets", "list"]) == 0
    assert "student_lumina_mgpt_tiny" in capsys.readouterr().out


def test_run_rejects_an_unknown_stage_with_argparse_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--stage", "nope"])
    assert exit_.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_unknown_command_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
    err = capsys.readouterr().err
    assert "frobnicate" in err and "run" in err and "benchmark" in err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_params_documents_and_checks_through_the_cli(capsys):
    assert cli.main(["params"]) == 0
    assert "supervisor.learning_rate" in capsys.readouterr().out
    assert cli.main(["params", "--check", "params.yaml"]) == 0  # the committed params.yaml is valid
    assert capsys.readouterr().out == "params.yaml: ok\n"
