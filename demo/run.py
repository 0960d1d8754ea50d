"""``gigaseg demo`` (placeholder until search and pipelines land)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole mission end to end on local Ray + SQLite MLflow")
    p.add_argument("--scale", type=float, default=1.0)
    p.set_defaults(func=lambda args: 0)
