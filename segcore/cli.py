"""The ``gigaseg`` command. Subcommands are entry points in the group ``gigaseg.commands``.

Each entry point is a ``register(subparsers)`` function that adds its parser and sets
``func`` on it, so segcore never imports search or pipelines (data flows one way).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

log = logging.getLogger("gigaseg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gigaseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group="gigaseg.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as err:  # keep the other commands usable; say why this one is not
            _add_unavailable(sub, ep.name, err)
            continue
        register(sub)
    return parser


def _add_unavailable(sub: argparse._SubParsersAction, name: str, err: ImportError) -> None:
    def fail(_args: argparse.Namespace) -> int:
        log.error("gigaseg %s is unavailable: %s. Reinstall with `pip install -e .`.", name, err)
        return 2

    p = sub.add_parser(name, help=f"(unavailable: {err})")
    p.set_defaults(func=fail)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # User-facing errors (bad config, bad file, unknown name) carry their own fix.
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
