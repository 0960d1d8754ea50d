"""The project's user-error classes: one base class, caught by the CLI and shown as one line.

Anything that is *not* a :class:`UserError` is a programming error and keeps its traceback.
Each subclass also derives from ``ValueError`` so callers written against the older
``ValueError`` contract keep working. Messages read ``"<what>: <what is wrong>. <fix>"``.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's own input (a file, a config, a model folder, a flag), with its fix."""


class ConfigError(UserError, ValueError):
    """A config file, dict or flag that does not validate; names the source and the bad keys."""


class ModelError(UserError, ValueError):
    """A model reference or model folder that cannot be used (missing, corrupt, inconsistent)."""


class OutputError(UserError, ValueError):
    """An output folder that cannot be written (locked by another run, holds another input's labels)."""
