"""Every error reportgen raises on purpose, under one base, so callers (run.py, a sweep, a test) can tell a
problem the user can act on from a bug.

Each message names what to change: a config key with its value, what was expected and the valid choices; a file
with the reason it could not be used; a folder with the process that holds it.
"""
from __future__ import annotations

import difflib
from typing import Any, List, Optional


class ReportgenError(Exception):
    """Base of every error with a message meant for the user."""


class ConfigError(ReportgenError, ValueError):
    """A config value that cannot work; the message names the key, the value and what would."""

    def __init__(self, key: str, value: Any, expected: str, choices: Optional[List[str]] = None):
        message = f"config key '{key}': got {value!r}; expected {expected}."
        if choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3, cutoff=0.6)
            if close:
                message += f" Did you mean {' or '.join(repr(c) for c in close)}?"
            shown = ", ".join(str(c) for c in choices[:40])
            more = f" ... ({len(choices)} in all)" if len(choices) > 40 else ""
            message += f"\n  valid choices: {shown}{more}"
        super().__init__(message)
        self.key = key


class ModelLoadError(ReportgenError, RuntimeError):
    """The model could not be built or its weights not loaded; the message says what to do."""


class RunError(ReportgenError, RuntimeError):
    """The run could not complete (e.g. the model's forward raised); names the files of the failing batch."""


class FolderBusy(ReportgenError, RuntimeError):
    """Another live process holds the run folder."""
