"""Project error types.

Bad user input (files, configs, command-line values) raises :class:`InputError` with a one-line
message that names the file (or option) and what is wrong. The CLI prints the message and exits
with status 2, without a traceback. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations

import errno
import os


class InputError(ValueError):
    """Bad user input. ``str(err)`` is one line: ``<file or option>: <problem>``."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.problem if self.source is None else f"{self.source}: {self.problem}")

    def __reduce__(self):  # re-raised intact from a worker process (ProcessPoolExecutor pickles it)
        return (type(self), (self.source, self.problem))


class StorageError(InputError):
    """The file system refused a write (disk full, read-only, no permission).

    Like :class:`InputError` (one line, exit status 2, no traceback), and the writer that raises
    it has removed what it had half-written: ``<path>: <what failed>: <strerror> [ENOSPC]``.
    """

    @classmethod
    def from_os(cls, path: str | os.PathLike | None, doing: str, err: OSError, after: str = "") -> StorageError:
        code = errno.errorcode.get(err.errno or 0, "")
        why = f"{err.strerror or err}" + (f" [{code}]" if code else "")
        return cls(path, f"{doing}: {why}" + (f"; {after}" if after else ""))
