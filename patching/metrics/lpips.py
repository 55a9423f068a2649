"""2.5D LPIPS-style distance with a local feature network (see docs/metrics.md); re-exported by
:mod:`patching.metrics.scores`."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from patching.checks import metric_pair, metric_window
from patching.errors import InputError


class FeatureNet:
    """A frozen VGG-like 2D feature network, read from a safetensors file, as plain functions.

    The file layout is ``stage1_vqgan.losses.SliceFeatureNet``'s (``stages.<i>.<j>.weight`` /
    ``.bias``: stage ``i`` is its 3×3 convolutions with ReLU, 2×2 max pooling before every stage
    but the first), so the perceptual-loss weights file — or a converted VGG16 — serves both.
    Defined here, not imported, because ``patching`` must not depend on ``stage1_vqgan``.
    Call it on ``N×C×H×W`` to get one feature map per stage.
    """

    def __init__(self, stages: list[list[tuple[torch.Tensor, torch.Tensor | None]]]):
        self.stages = stages
        self.in_channels = int(stages[0][0][0].shape[1])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, convs in enumerate(self.stages):
            if i:
                x = F.max_pool2d(x, 2)
            for w, b in convs:
                x = F.relu(F.conv2d(x, w, b, padding=w.shape[-1] // 2))
            feats.append(x)
        return feats


def load_feature_net(path: str | os.PathLike) -> FeatureNet:
    """Read a :class:`FeatureNet` from a local safetensors file (never downloads).

    Raises :class:`InputError` naming ``path`` when it is missing, unreadable, or not such a net.
    """
    import re

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "LPIPS feature weights not found (needs a local safetensors file)")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputError(path, f"cannot be read as safetensors: {err}") from None
    convs: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        found = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(weight|bias)", key)
        if found:
            convs.setdefault(int(found[1]), {}).setdefault(int(found[2]), {})[found[3]] = value
    if not convs or sorted(convs) != list(range(len(convs))):
        raise InputError(path, "is not a slice feature network (expected tensors 'stages.<i>.<j>.weight')")
    stages, c_in = [], None
    for i in range(len(convs)):
        stage = []
        for j in sorted(convs[i]):
            w, b = convs[i][j].get("weight"), convs[i][j].get("bias")
            ok = w is not None and w.ndim == 4 and w.shape[-1] == w.shape[-2] and w.shape[-1] % 2 == 1
            ok = ok and (c_in is None or w.shape[1] == c_in) and (b is None or b.shape == (w.shape[0],))
            if not ok:
                raise InputError(path, f"tensor stages.{i}.{j} is not a 2D convolution that fits the layers before")
            stage.append((w.float(), None if b is None else b.float()))
            c_in = w.shape[0]
        stages.append(stage)
    return FeatureNet(stages)


def lpips25d(pred, target, weights_path, *, window=(-1024.0, 1600.0), slices_per_axis: int | None = None,
             batch: int = 32) -> float:
    """2.5D LPIPS-style distance: 2D slices along each axis through a frozen feature network.

    Per slice (HU clipped to ``window`` and mapped to [-1, 1], repeated to the network's input
    channels): each feature map is unit-normalised over channels at every pixel, the squared
    difference is summed over channels and averaged over pixels, and the stages are summed —
    LPIPS with uniform channel weights (its "baseline" variant; no learned linear heads). Slices
    are averaged per axis, then the three axes. Lower is closer; identical volumes give 0.

    Args:
        weights_path: a local safetensors file (see :func:`load_feature_net`) or an already loaded
            :class:`FeatureNet` (load once, score many cases) — or any callable mapping
            ``N×C×H×W`` to a list of feature maps.
        slices_per_axis: evenly spaced slices per axis; ``None`` for all.
    """
    a, b = metric_pair(pred, target)
    win = metric_window(window) or (-1024.0, 1600.0)
    net = weights_path if callable(weights_path) else load_feature_net(weights_path)
    c_in = int(getattr(net, "in_channels", 1))
    if slices_per_axis is not None and (isinstance(slices_per_axis, bool) or int(slices_per_axis) < 1):
        raise InputError("slices_per_axis", f"needs a positive integer or None, got {slices_per_axis!r}")
    per_axis = []
    with torch.no_grad():
        for k in range(3):
            n = a.shape[k]
            idx = (np.arange(n) if slices_per_axis is None
                   else np.unique(np.linspace(0, n - 1, min(n, int(slices_per_axis))).round().astype(int)))
            dists = []
            for i0 in range(0, len(idx), batch):
                take = idx[i0:i0 + batch]
                xs = [torch.from_numpy(np.moveaxis(v.take(take, axis=k), k, 0).astype(np.float32)) for v in (a, b)]
                xs = [((x.clamp(*win) - win[0]) / (win[1] - win[0]) * 2 - 1)[:, None].expand(-1, c_in, -1, -1)
                      for x in xs]  # n C H W in [-1, 1]
                d = 0.0
                for fa, fb in zip(net(xs[0]), net(xs[1]), strict=True):
                    fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
                    fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
                    d = d + ((fa - fb) ** 2).sum(1).mean(dim=(-2, -1))  # n
                dists.append(d.double())
            per_axis.append(float(torch.cat(dists).mean()))
    return float(np.mean(per_axis))


