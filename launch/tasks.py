"""Task registry: ``xray2ct train TASK`` names → ``module:attr`` import paths.

A stage package never imports ``launch``; it only has to provide an object with the methods
of the task protocol (see :mod:`launch.engine`). ``TASK`` is a registered name or any
``module:attr`` path (the tests use ``tests.launch.toy_task:ToyTask``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from patching.errors import InputError

TASKS: dict[str, str] = {
    "vqgan": "stage1_vqgan.task:VQGANTask",
    "diffusion": "stage2_diffusion.task:DiffusionTask",
    "x2ct-gan": "gan_baselines.x2ct_gan.task:X2CTGANTask",
    "x-recon": "gan_baselines.x_recon.task:XReconTask",
    "s-xr2ct": "gan_baselines.s_xr2ct.task:SXR2CTTask",
    "cncl": "gan_baselines.cncl.task:CNCLTask",
}

# Reconstructors: a checkpoint's task → the ``module:Class`` of its
# :class:`patching.artifacts.reconstruct.Reconstructor`. `xray2ct sample`, `evaluate` and `demo` load
# every method through :func:`patching.artifacts.reconstruct.load_reconstructor` with this
# registry; adding a method = one class + one line here. A task's ``module:attr`` reference
# (recorded beside its name in every checkpoint) finds the same class.
RECONSTRUCTORS: dict[str, str] = {
    "diffusion": "stage2_diffusion.pipeline:DiffusionReconstructor",
    "x2ct-gan": "gan_baselines.sampling:GanReconstructor",
    "x-recon": "gan_baselines.sampling:GanReconstructor",
    "s-xr2ct": "gan_baselines.sampling:GanReconstructor",
}
RECONSTRUCTORS.update({TASKS[name]: ref for name, ref in list(RECONSTRUCTORS.items())})
# What to do instead with the checkpoints of tasks that are not reconstructors.
RECONSTRUCTOR_HINTS: dict[str, str] = {
    "cncl": "it denoises CTs: xray2ct denoise --checkpoint PATH --input CT.nii.gz --out OUT.nii.gz",
}

REQUIRED = ("default_config", "build_models", "build_optimizers", "build_dataset", "train_step")


def task_reference(name: str) -> str:
    """The ``module:attr`` path of a registered name or of a path given directly."""
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        return name
    raise InputError("TASK", f"unknown task {name!r}; registered: {', '.join(sorted(TASKS))} (or give module:attr)")


def load_task(name: str) -> tuple[str, Any]:
    """Import and instantiate a task. Returns ``(module:attr, task object)``.

    ``attr`` may be a class (instantiated without arguments), a factory function, or an
    instance already.
    """
    ref = task_reference(name)
    module_name, _, attr = ref.partition(":")
    label = f"task {name!r}" + (f" ({ref})" if ref != name else "")
    if not module_name or not attr:
        raise InputError("TASK", f"{ref!r} is not of the form module:attr")
    if ref != TASKS.get(name) and "" not in sys.path and os.getcwd() not in sys.path:
        # `module:attr` of the user's own: importable from the working directory, as with
        # `python -m` (the `xray2ct` console script does not put it on the path).
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError("TASK", f"{label} cannot be imported: {type(err).__name__}: {err}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InputError("TASK", f"{label}: module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type):
        missing = [m for m in REQUIRED if not callable(getattr(obj, m, None))]
        if missing:  # checked on the class, before anything is instantiated
            raise InputError("TASK", f"{label} does not implement the task protocol: missing {', '.join(missing)}")
        task = obj()
    elif callable(obj) and not _is_task(obj):
        # A factory: a Python function taking no arguments. Anything else callable (os:system,
        # a builtin, a function that needs arguments) is refused, never called.
        if not inspect.isfunction(obj) or not _takes_no_arguments(obj):
            raise InputError("TASK", f"{label} is not a task class, a task factory (a function of no arguments) "
                                     "or a task object")
        task = obj()
    else:
        task = obj
    missing = [m for m in REQUIRED if not callable(getattr(task, m, None))]
    if missing:
        raise InputError("TASK", f"{label} does not implement the task protocol: missing {', '.join(missing)}")
    return ref, task


def _takes_no_arguments(fn: Any) -> bool:
    try:
        inspect.signature(fn).bind()
    except (TypeError, ValueError):
        return False
    return True


def _is_task(obj: Any) -> bool:
    return not isinstance(obj, type) and all(callable(getattr(obj, m, None)) for m in REQUIRED)
