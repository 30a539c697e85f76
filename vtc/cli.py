"""The ``vtc`` command: ``vtc run`` (= ``python -m vtc``), ``vtc eval`` (= ``python -m vtc.eval``), ``vtc demo``
(= ``python -m vtc.demo``).

Each subcommand hands its arguments to that module's own parser, so ``vtc SUBCOMMAND --help`` lists every option.
A subcommand's module is imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # provides build_parser(prog) and main(argv, prog) -> exit status
    summary: str


COMMANDS = {
    "run": Command("vtc.__main__", "compress a VLM with every method and compare answers and speed (= python -m vtc)"),
    "eval": Command("vtc.eval.__main__", "accuracy, visual tokens, latency and memory on a VQA task (eval extra)"),
    "demo": Command("vtc.demo.__main__", "serve the demo page (demo extra)"),
}


def build_parser() -> argparse.ArgumentParser:
    """``vtc``'s own parser: the subcommands, ``--help`` and ``--version``."""
    from vtc import __version__

    parser = argparse.ArgumentParser(
        prog="vtc",
        description="Training-free visual token compression for Hugging Face vision-language models.",
        epilog="Options of a subcommand: vtc SUBCOMMAND --help",
    )
    parser.add_argument("--version", action="version", version=f"vtc {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, command in COMMANDS.items():
        subcommands.add_parser(name, help=command.summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # prints the help, the version or the error, and exits
        parser.error(f"the subcommand ({', '.join(COMMANDS)}) comes first")
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name].module)
    return module.main(rest, prog=f"vtc {name}")
