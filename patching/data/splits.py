"""Which split a case belongs to, as the user states it once at ingest (``--split``, ``--splits``).

A splits file maps names to splits, one entry per line (blank lines and ``#`` comments skipped):

* ``NAME SPLIT`` (separated by whitespace, a comma or a tab; a first line ``NAME,split`` header
  is skipped), e.g. ``LIDC-IDRI-0001.nii.gz test``;
* one ``NAME`` per line in a file named ``train.txt``, ``val.txt`` or ``test.txt``: every name
  gets that split. This is the format of X2CT-GAN's published LIDC lists (``test.txt``).

A ``NAME`` matches a case by its case id, its source file name (``ct-001.nii.gz``), that name
without ``.nii``/``.nii.gz``, or the folder of its DICOM series. Cases no line names get
``--split`` (default: the store's stable hash of the case id, :func:`patching.data.store.split_for`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from patching.data.store import SPLITS
from patching.errors import InputError

MAX_SPLITS_BYTES = 16 * 1024 * 1024  # a list of names; anything larger is not one


def read_splits(path: str | os.PathLike) -> dict[str, str]:
    """``{name: split}`` from a splits file (module docstring); InputError naming the line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such splits file")
    if path.stat().st_size > MAX_SPLITS_BYTES:
        raise InputError(path, f"is larger than {MAX_SPLITS_BYTES // 2**20} MB; not a list of case names")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"unreadable splits file ({type(err).__name__})") from None
    stem_split = path.stem.lower() if path.stem.lower() in SPLITS else None
    table: dict[str, str] = {}
    first = True
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f for f in re.split(r"[\s,]+", line) if f]
        if first and len(fields) == 2 and fields[1].lower() == "split":
            first = False
            continue  # a CSV header
        first = False
        if len(fields) == 1:
            if stem_split is None:
                raise InputError(path, f"line {number}: {fields[0]!r} names no split; write 'NAME SPLIT' lines, "
                                       "or name the file train.txt, val.txt or test.txt")
            name, split = fields[0], stem_split
        elif len(fields) == 2:
            name, split = fields[0], fields[1].lower()
        else:
            raise InputError(path, f"line {number}: expected 'NAME SPLIT', got {len(fields)} fields")
        if split not in SPLITS:
            raise InputError(path, f"line {number}: unknown split {fields[-1]!r}; expected one of {', '.join(SPLITS)}")
        if table.get(name, split) != split:
            raise InputError(path, f"line {number}: {name!r} is listed as {table[name]!r} and as {split!r}")
        table[name] = split
    if not table:
        raise InputError(path, "lists no case")
    return table


class SplitAssignment:
    """The split of each case: the first of its names the table lists, else ``default``.

    Args:
        table: ``{name: split}`` (:func:`read_splits`), or None.
        default: ``train``/``val``/``test`` for unlisted cases, or None (the store's hash split).
    """

    def __init__(self, table: Mapping[str, str] | None = None, default: str | None = None):
        if default is not None and default not in SPLITS:
            raise InputError("--split", f"unknown split {default!r}; expected one of {', '.join(SPLITS)}")
        self.table, self.default = dict(table or {}), default
        self.used: set[str] = set()

    @property
    def explicit(self) -> bool:
        """Whether the user stated anything (then existing cases are moved to the stated split)."""
        return bool(self.table) or self.default is not None

    def split_of(self, names: Iterable[str]) -> str | None:
        for name in names:
            if name in self.table:
                self.used.add(name)
                return self.table[name]
        return self.default

    def unmatched(self) -> list[str]:
        """Names of the table that matched no case (sorted)."""
        return sorted(set(self.table) - self.used)
