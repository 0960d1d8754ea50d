"""The ``gigaseg`` command. Subcommands are entry points in the group ``gigaseg.commands``.

Each entry point is a ``register(subparsers)`` function that adds its parser and sets
``func`` on it, so segcore never imports search or pipelines (data flows one way).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from segcore.errors import UserError

log = logging.getLogger("gigaseg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gigaseg",
        description="Segment huge scientific images: simulate data, train, search, segment archives.",
    )
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




def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand. The project's user errors (:class:`segcore.errors.UserError`: bad config,
    bad file, unknown name, unusable model folder) carry their own fix, so they are logged as one
    line with exit status 2; anything else is a bug and keeps its traceback. Ctrl-C is one line
    and exit status 130 (commands that can resume say so themselves)."""
    setup_logging(getattr(args, "verbose", False))
    try:
        return int(func(args) or 0)
    except UserError as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("stopped (Ctrl-C)")
        return 130


def module_main(
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    func: Callable[[argparse.Namespace], int | None],
    argv: list[str] | None = None,
) -> int:
    """``python -m <package>``: the same arguments and behaviour as its ``gigaseg`` subcommand."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    return run_command(func, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
