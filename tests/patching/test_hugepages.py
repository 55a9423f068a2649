"""patching.tiling.hugepages: ordinary buffers whatever the kernel does with the advice."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from patching.tiling import hugepages as hugepages


def test_buffers_have_the_asked_shape_dtype_and_contents():
    t = hugepages.empty((64, 64, 300))  # ~4.7 MiB: large enough to be advised
    assert t.shape == (64, 64, 300) and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * t.numel()
    z = hugepages.zeros((8, 1 << 18), dtype=torch.int16)
    assert z.dtype == torch.int16 and not z.any()
    a = hugepages.empty_numpy((3, 1 << 20), np.int16)
    assert a.shape == (3, 1 << 20) and a.dtype == np.int16


def test_advice_only_on_whole_huge_pages_of_large_buffers():
    assert hugepages.advise_huge_pages(0, 1 << 20) is False  # below the size worth advising
    t = torch.empty(16 << 20, dtype=torch.uint8)
    advised = hugepages.advise_huge_pages(t.data_ptr(), t.numel())
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        assert advised  # 16 MiB always holds an aligned 2 MiB page; a THP kernel accepts the advice
    elif not sys.platform.startswith("linux"):
        assert advised is False
