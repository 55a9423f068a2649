"""Project error types.

Bad user input (files, configs, command-line values) raises :class:`InputError` with a one-line
message that names the file (or option) and what is wrong. The CLI prints the message and exits
with status 2, without a traceback. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad user input. ``str(err)`` is one line: ``<file or option>: <problem>``."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.problem if self.source is None else f"{self.source}: {self.problem}")
