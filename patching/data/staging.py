"""Staging directories that name their writer, so leftovers can be told from work in progress.

Every writer in this project (store cases and arrays, checkpoints, exports) writes aside and
renames into place. A writer killed by SIGKILL (or stopped by a full disk before it could clean
up) leaves its staging directory behind. :func:`owner_tag` puts the writer's pid and host in
the directory's name; :func:`is_stale` then says whether the writer is gone:

* this process (an earlier attempt of ours that failed) or a pid of this host that no longer
  exists: stale, safe to remove;
* a live process of this host, or a writer on another host (a shared file system, whose
  liveness cannot be checked from here): not stale, left alone;
* a name without a tag (written by an older version): stale.

A reused pid makes a dead writer's directory look live: it is kept (the safe side).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

_TAG_RE = re.compile(r"p(\d+)h([0-9a-f]{8})$")


def host_id() -> int:
    """A 32-bit id of this host (a hash of its name)."""
    return int(hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8], 16)


def owner_tag(pid: int | None = None, host: int | None = None) -> str:
    """``p<pid>h<host>``: the suffix of a staging name that identifies its writer."""
    return f"p{os.getpid() if pid is None else pid}h{host_id() if host is None else host:08x}"


def is_stale(path: str | os.PathLike) -> bool:
    """Whether the staging directory ``path`` (named with :func:`owner_tag`) has no live writer."""
    m = _TAG_RE.search(Path(path).name)
    if m is None:
        return True
    pid, host = int(m.group(1)), int(m.group(2), 16)
    if host != host_id():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clean_stale(folder: str | os.PathLike, match: Callable[[str], bool] = lambda name: True,
                keep: Path | None = None) -> list[Path]:
    """Remove the entries of ``folder`` whose name ``match``-es and that :func:`is_stale` says
    no live writer owns (never ``keep``). Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if match(p.name) and p != keep and is_stale(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
