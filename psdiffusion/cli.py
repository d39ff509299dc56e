"""The ``psdiffusion`` command: ``psdiffusion text ...`` and ``psdiffusion image ...``.

Each subcommand lives in its own module that exposes ``add_parser(subparsers)``
and ``main(args) -> int``. Those modules keep heavy imports (transformers,
diffusers, open_clip) inside ``main``, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module providing add_parser(subparsers) and main(args)
SUBCOMMANDS = {
    "text": "psdiffusion.lm.cli",
    "image": "psdiffusion.image_cli",
    "bench": "psdiffusion.bench_cli",
}


def build_parser(modules: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psdiffusion",
        description="Power sampling: inference-time lookahead for image diffusion and language models.",
    )
    parser.add_argument("--verbose", action="store_true", help="log progress at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(modules) + "}")
    for module in modules.values():
        module.add_parser(subparsers)
    return parser


def _available_modules() -> dict:
    modules = {}
    for name, path in SUBCOMMANDS.items():
        try:
            modules[name] = importlib.import_module(path)
        except ModuleNotFoundError as error:
            # Only a missing subcommand module is tolerated; a broken import inside it is a bug.
            if error.name != path:
                raise
    return modules


def main(argv=None) -> int:
    modules = _available_modules()
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(modules[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
