"""Every option of `piip-llava train`, `eval` and `score` explains itself in `--help`."""

from __future__ import annotations

import argparse

import pytest

from piip_llava.cli import build_parser


def subcommand_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for `parser` and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subcommand_parsers(child, (*path, name))


@pytest.mark.parametrize("command", ["train", "eval", "score"])
def test_every_option_has_a_help_text(command):
    parsers = [(path, parser) for path, parser in subcommand_parsers(build_parser()) if path[:1] == (command,)]
    assert len(parsers) >= 2  # the command and its subcommands
    silent = [
        f"{' '.join(path)} {action.option_strings[-1]}"
        for path, parser in parsers
        for action in parser._actions
        if action.option_strings and action.help is None
    ]
    assert silent == []


def test_help_gives_the_defaults_a_user_needs():
    text = {" ".join(path): " ".join(parser.format_help().split()) for path, parser in subcommand_parsers(build_parser())}
    assert "(default: 0.03)" in text["train"] and "(default: 42)" in text["train"]
    assert "cn for MMBench-CN" in text["eval mmbench"]
    assert "TextVQA_0.5.1_val.json" in text["score textvqa"]
