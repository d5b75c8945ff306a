"""The `piip-llava` entry point: every option of chat, convert and train init is explained; a closed pipe ends quietly."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from piip_llava.cli import build_parser


def subcommand_parser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for name in path:
        subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    return parser


@pytest.mark.parametrize("command", [["chat"], ["convert"], ["train", "init"]])
def test_every_option_has_a_help_text(command):
    parser = subcommand_parser(build_parser(), command)
    options = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert options
    unexplained = [action.option_strings[0] for action in options if not (action.help or "").strip()]
    assert unexplained == []


def test_output_into_a_closed_pipe_ends_without_a_traceback():
    # `piip-llava flops ... | head -1`: the reader is gone before the table is written.
    process = subprocess.Popen(
        [sys.executable, "-m", "piip_llava", "flops", "piip_vision_clip-bl_512-256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.communicate(timeout=300)[1].decode()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
    assert process.returncode == 141  # 128 + SIGPIPE, as a shell reports a program stopped by a closed pipe
