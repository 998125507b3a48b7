"""The ``histolens`` command: one sub-command per job, each defined next to the code it runs.

A sub-command lives in its own module as two functions, ``add_arguments(parser)`` and
``run(args) -> int`` (or in an object of that module with both, named ``module:object``);
this file only lists them, so ``histolens --help`` stays fast (no
torch, no Qt) and each job's options sit beside its implementation.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["console", "main"]

#: name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "view": (
        "histolens._qt._launch",
        "open napari with a slide (default: the sample) and the HistoLens dock",
    ),
    "demo": (
        "histolens._demo",
        "the main job: napari with the sample slide, or headless: analyse it and write files + a PNG",
    ),
    "analyze": (
        "histolens.batch._cli",
        "analyse whole slides or regions and write GeoJSON, CSV, masks and a summary",
    ),
    "nuclei": (
        "histolens.nuclei",
        "segment nuclei in plain images; write label TIFFs and CSVs",
    ),
    "evaluate": (
        "histolens.training.cli:evaluate",
        "score nuclei predictions against ground truth (Dice, AJI, PQ)",
    ),
    "train": (
        "histolens.training.cli:train",
        "train the default model's heads (the project's recipe)",
    ),
    "models": ("histolens.models._cli", "list the registered models and their cards"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line (no usage block), pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="histolens", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"histolens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Import only the module of the sub-command being run, so --help of one job never
    # pays for another job's heavy imports.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (target, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module, _, attr = target.partition(":")
            command = importlib.import_module(module)
            command = getattr(command, attr) if attr else command
            command.add_arguments(p)
            p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``histolens`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args._run(args) or 0)


def console(argv: Sequence[str] | None = None) -> int:
    """:func:`main` for a terminal: bad input (a missing, unreadable or wrong file, an absurd
    option) prints its one-line message, which names the file and the fix, instead of a
    traceback, and exits with 2. ``HISTOLENS_DEBUG=1`` shows the traceback."""
    try:
        return main(argv)
    except (ValueError, OSError) as exc:
        if os.environ.get("HISTOLENS_DEBUG"):
            raise
        print(f"histolens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console())
