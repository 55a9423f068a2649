"""Work that every process of an ``accelerate launch`` run does, and fails, together.

A process that raises while the others go on to a collective (``gather_object``, a barrier)
would leave them waiting forever. :func:`run_collectively` runs ``fn`` on every process, then
shares whether any failed: all raise (the failing process its own error, the others an
:class:`InputError` quoting the first problem), so every process exits with the one-line error.
"""

from __future__ import annotations

from patching.errors import InputError


def problem(err: BaseException) -> str:
    """One line for an error: an InputError's own text, else ``Type: first line``."""
    if isinstance(err, InputError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_collectively(state, fn):
    """``fn()`` on every process of ``state`` (an :class:`accelerate.PartialState`); when it raises
    on any, every process raises (module docstring). One process: just ``fn()``."""
    from accelerate.utils import gather_object

    try:
        value, err = fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes know
        value, err = None, e
    if state.num_processes > 1:
        first = next((e for e in gather_object([None if err is None else problem(err)]) if e), None)
        if first is not None and err is None:
            raise InputError(None, f"another process failed: {first}")
    if err is not None:
        raise err
    return value
