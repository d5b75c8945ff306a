"""The `piip-llava` command: one entry point whose subcommands live in `piip_llava.commands`, one module each.

Each subcommand module exposes `add_parser(subparsers)`, which registers its parser and sets
`handler` (a function taking the parsed arguments and returning an exit code). The modules import
torch-heavy code only inside their handlers, so `piip-llava --help` stays quick.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .commands import bench, chat, convert, evaluate, flops, lmms, serve, synthetic, train

# In the order `piip-llava --help` lists them.
SUBCOMMANDS = [chat, serve, train, evaluate, lmms, convert, flops, bench, synthetic]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piip-llava",
        description="Parameter-Inverted Image Pyramid networks and PIIP-LLaVA: chat, train, evaluate, convert.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:
        return stop_writing_to_closed_pipe()


def stop_writing_to_closed_pipe() -> int:
    """The reader of our output went away (`piip-llava flops ... | head`): end quietly, as Unix tools do.

    Standard output is pointed at /dev/null so that Python's final flush does not fail a second time;
    the exit status is 141 (128 + SIGPIPE), what a shell reports for a program a closed pipe stopped.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
