"""Small pieces shared by the GAN baselines: view frames, projections, LSGAN, init, optimiser.

Axis conventions (docs/architecture.md, "Conventions"; the same as :mod:`patching.projection.drr`):

- A volume is ``B×C×X×Y×Z`` in RAS+: ``x`` grows to the patient's Right, ``y`` to Anterior,
  ``z`` to Superior.
- An X-ray is ``B×1×H×W`` indexed ``[row, col]`` as a radiologist reads it, row 0 superior.
  ``pa``: the beam travels posterior→anterior (along +y), col 0 is the patient's right (high
  ``x``). ``lateral``: the beam travels right→left (along −x), col 0 is anterior (high ``y``).
- A *branch frame* is the 3D frame a 2D view encoder lifts its features into (X2CT-GAN's
  connection B): ``B×C×D×R×K`` = ``[depth, row, col]``, with ``depth`` along the view's beam,
  index 0 on the source side. :func:`branch_to_volume` / :func:`volume_to_branch` are the
  permute-and-flip maps between a branch frame and the volume frame (X2CT-GAN's connection C).
  For ``pa``: ``depth → y`` (0 = posterior), ``row → z`` (flipped), ``col → x`` (flipped).
  For ``lateral``: ``depth → x`` (0 = right, flipped), ``row → z`` (flipped), ``col → y``
  (flipped). They are exact inverses of the parallel projection: projecting
  ``branch_to_volume(expand_to_branch(img))`` along the view's beam gives ``img`` back.
- ``axial``: the projection along ``z`` (mean over the craniocaudal axis), drawn as a
  radiologist views an axial slice from the feet: row 0 anterior, col 0 the patient's right.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from patching.errors import InputError
from patching.projection.drr import parallel_projection

XRAY_VIEWS = ("pa", "lateral")  # the views a model takes as input
PROJECTION_VIEWS = ("pa", "lateral", "axial")  # the views a projection loss may use


# --- view frames -----------------------------------------------------------------------------


def _check_view(view: str) -> None:
    if view not in XRAY_VIEWS:
        raise InputError("view", f"expected one of {', '.join(XRAY_VIEWS)}, got {view!r}")


def expand_to_branch(features: Tensor, depth: int) -> Tensor:
    """Connection B's lift: repeat 2D features along a new depth axis, ``B×C×R×K → B×C×D×R×K``."""
    return repeat(features, "b c r k -> b c d r k", d=depth)


def branch_to_volume(t: Tensor, view: str) -> Tensor:
    """A branch frame ``B×C×D×R×K`` (depth, row, col) → the volume frame ``B×C×X×Y×Z``."""
    _check_view(view)
    if view == "pa":  # depth = y (posterior first); row = z flipped; col = x flipped
        return rearrange(t, "b c d r k -> b c k d r").flip((2, 4))
    # lateral: depth = x flipped (right first, the source side); row = z flipped; col = y flipped
    return rearrange(t, "b c d r k -> b c d k r").flip((2, 3, 4))


def volume_to_branch(t: Tensor, view: str) -> Tensor:
    """The inverse of :func:`branch_to_volume`: ``B×C×X×Y×Z`` → ``B×C×D×R×K``."""
    _check_view(view)
    if view == "pa":
        return rearrange(t.flip((2, 4)), "b c x y z -> b c y z x")
    return rearrange(t.flip((2, 3, 4)), "b c x y z -> b c x z y")


def xray_to_volume(image: Tensor, view: str, shape: Sequence[int]) -> Tensor:
    """Back-project an X-ray by repetition along its beam: ``B×C×H×W`` → ``B×C×X×Y×Z``.

    The image is first resized (area average) to the volume's plane for that view
    (``Z×X`` for ``pa``, ``Z×Y`` for ``lateral``). This is the conditioning volume of a
    conditional discriminator (X2CT-GAN, X-Recon: each X-ray expanded along its depth axis).
    """
    _check_view(view)
    x, y, z = (int(s) for s in shape)
    depth, cols = (y, x) if view == "pa" else (x, y)
    if tuple(image.shape[-2:]) != (z, cols):
        image = F.interpolate(image, size=(z, cols), mode="area")
    return branch_to_volume(expand_to_branch(image, depth), view)


# --- projections -----------------------------------------------------------------------------


def axial_projection(volume: Tensor) -> Tensor:
    """Mean along ``z``: ``B×C×X×Y×Z`` → ``B×C×Y×X`` image, row 0 anterior, col 0 patient's right.

    :func:`patching.projection.drr.parallel_projection` has no axial view (there is no axial radiograph),
    so the loss's third view is this plain mean over ``z``.
    """
    image = rearrange(volume.mean(dim=4), "b c x y -> b c y x")
    return image.flip((2, 3))  # row 0 = high y (anterior); col 0 = high x (patient's right)


def project(volume: Tensor, view: str) -> Tensor:
    """Parallel mean projection of ``B×C×X×Y×Z`` for a loss, in the image convention of ``view``."""
    if view == "axial":
        return axial_projection(volume)
    if view not in XRAY_VIEWS:
        raise InputError("view", f"expected one of {', '.join(PROJECTION_VIEWS)}, got {view!r}")
    return parallel_projection(volume, view, reduce="mean")


def projection_l1(fake: Tensor, real: Tensor, views: Sequence[str]) -> Tensor:
    """Mean over ``views`` of the L1 distance between the two volumes' parallel projections."""
    losses = [F.l1_loss(project(fake, v), project(real, v)) for v in views]
    return torch.stack(losses).mean()


# --- adversarial pieces ----------------------------------------------------------------------


def lsgan_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """LSGAN discriminator objective (Mao et al. 2017): ``½E[(D(real)−1)²] + ½E[D(fake)²]``."""
    return 0.5 * ((real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean())


def lsgan_g_loss(fake_logits: Tensor) -> Tensor:
    """LSGAN generator objective: ``E[(D(fake)−1)²]``."""
    return (fake_logits - 1.0).pow(2).mean()


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Forward through ``module`` without recording its parameters in the autograd graph.

    Used for the discriminator inside the generator step: gradients flow through D to its
    input (the generated volume) but never into D's parameters. Autograd records
    ``requires_grad`` at forward time, so restoring the flags on exit is safe even though the
    backward pass runs later. Pass the *unwrapped* module here (``accelerator.unwrap_model``):
    a DDP wrapper would otherwise wait for gradients that never come.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


# --- initialisation, value range, optimiser --------------------------------------------------


def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """The X2CT-GAN / X-Recon initialisation (their ``init_type='normal'``).

    Conv, transposed-conv and linear weights ~ N(0, ``std``), biases 0; affine norm layers get
    weight 1 and bias 0. Returns ``module``. Parameters on the ``meta`` device hold no data
    and are skipped (build on ``meta`` to count parameters; after ``to_empty`` call this again).
    """
    for m in module.modules():
        if getattr(getattr(m, "weight", None), "is_meta", False):
            continue
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def to_model_range(volume: Tensor, value_range: tuple[float, float]) -> Tensor:
    """Map a project volume in [-1, 1] (HU window) to a model's ``value_range`` (linear)."""
    lo, hi = value_range
    return (volume + 1.0) * (0.5 * (hi - lo)) + lo


def from_model_range(volume: Tensor, value_range: tuple[float, float]) -> Tensor:
    """The inverse of :func:`to_model_range`: a model's output back to the project's [-1, 1]."""
    lo, hi = value_range
    return (volume - lo) * (2.0 / (hi - lo)) - 1.0


def lr_factor(step: int, num_steps: int, decay_start: float) -> float:
    """The papers' schedule: constant, then linear decay to 0 from ``decay_start·num_steps``.

    X2CT-GAN trains 50 epochs at the base rate and 50 more decaying linearly to zero
    (``niter``/``niter_decay``), i.e. ``decay_start = 0.5``. Pure; use it in a ``LambdaLR``.
    """
    if num_steps <= 0:
        return 1.0
    start = decay_start * num_steps
    if step < start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / max(1.0, num_steps - start))


def adam_pair(generator: nn.Module, discriminator: nn.Module, lr: float,
              betas: tuple[float, float]) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """The papers' optimisers: one Adam for G and one for D, same learning rate and betas."""
    return (torch.optim.Adam(generator.parameters(), lr=lr, betas=betas),
            torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas))


# --- input checks ----------------------------------------------------------------------------


def check_xrays(pa: Tensor | None, lateral: Tensor | None, views: Sequence[str], size: int) -> list[Tensor]:
    """Validate the X-rays a model needs; returns them in the order of ``views``.

    Each must be a float ``B×1×size×size`` tensor; every view in ``views`` must be given and
    the batch sizes must agree. Bad input raises :class:`~patching.errors.InputError`.
    """
    given: Mapping[str, Tensor | None] = {"pa": pa, "lateral": lateral}
    out = []
    for view in views:
        image = given[view]
        if image is None:
            raise InputError(view, f"this model needs the {view} X-ray (views: {', '.join(views)})")
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != 1 \
                or tuple(image.shape[2:]) != (size, size):
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise InputError(view, f"expected a B×1×{size}×{size} X-ray tensor, got {shape}")
        if not image.is_floating_point():
            raise InputError(view, f"expected a float tensor in [0, 1], got {image.dtype}")
        out.append(image)
    if len({int(t.shape[0]) for t in out}) > 1:
        raise InputError(", ".join(views), f"batch sizes differ: {[int(t.shape[0]) for t in out]}")
    return out


def check_volume(volume: Tensor, size: int, name: str) -> None:
    """``volume`` must be ``B×1×size×size×size`` (the models' cubic output)."""
    if not isinstance(volume, Tensor) or volume.dim() != 5 or volume.shape[1] != 1 \
            or tuple(volume.shape[2:]) != (size, size, size):
        shape = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
        raise InputError(name, f"expected a B×1×{size}×{size}×{size} volume, got {shape}")


def num_params(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and 2 ** int(round(math.log2(n))) == n
