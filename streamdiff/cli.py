"""The ``streamdiff`` command: the only place that configures logging.

Subcommands live in :mod:`streamdiff.commands`, one module each, exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. They are found automatically (modules without ``NAME``, such
as the shared :mod:`streamdiff.commands.options`, are helpers).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from typing import Sequence

from . import __version__, commands
from .errors import StreamDiffError

logger = logging.getLogger("streamdiff")


def _quiet_third_party() -> None:
    """Silence progress bars and chatter of diffusers/transformers/huggingface_hub in the CLI."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers
        import transformers

        diffusers.logging.set_verbosity_error()
        diffusers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamdiff", description="Real-time streaming image-to-image diffusion.")
    parser.add_argument("--version", action="version", version=f"streamdiff {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if not hasattr(module, "NAME"):  # a helper module (options.py), not a command
            continue
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.verbose < 2:
        _quiet_third_party()
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except StreamDiffError as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
