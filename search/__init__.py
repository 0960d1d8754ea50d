"""Architecture and hyperparameter search for gigaseg: Ray Tune + Optuna + ASHA, tracked in MLflow.

Public API::

    from search import load_search_spec, run_search, resume_search
    outcome = run_search(load_search_spec("search.yaml"))
    outcome.champion_uri  # "models:/<name>@champion"

CLI: ``gigaseg search --config search.yaml`` / ``--resume PATH`` / ``--dry-run``; the same as
``python -m search``. See docs/search.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from search.spec import SearchSpec, load_search_spec, parse_search_spec

if TYPE_CHECKING:
    from search.summary import SearchOutcome


def run_search(spec: SearchSpec, spec_yaml: str | None = None) -> SearchOutcome:
    """Run a validated search to the end (see :func:`search.runner.run_search`); Ray is imported lazily."""
    from search.runner import run_search as _run

    return _run(spec, spec_yaml)


def resume_search(path: str | Path) -> SearchOutcome:
    """Continue a stopped search from its folder (see :func:`search.runner.resume_search`)."""
    from search.runner import resume_search as _resume

    return _resume(path)


__all__ = ["SearchSpec", "load_search_spec", "parse_search_spec", "resume_search", "run_search"]
