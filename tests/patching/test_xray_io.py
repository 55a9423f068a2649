"""X-ray readers: PNG / JPEG / DICOM / .npy → float32 [row, col] in [0, 1], bone bright."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patching.data.xray_io import read_xray, resize_xray
from patching.errors import InputError
from tests.patching.dicom_factory import write_xray_dicom


def _ramp(h=24, w=32, hi=255, dtype=np.uint8):
    """A left-to-right ramp with a brighter lower half: not constant, not symmetric."""
    a = np.linspace(0, hi * 0.8, w)[None, :] + np.where(np.arange(h)[:, None] >= h // 2, hi * 0.2, 0)
    return np.rint(a).astype(dtype)


def test_png_8bit(tmp_path):
    a = _ramp()
    Image.fromarray(a).save(tmp_path / "a.png")
    img = read_xray(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == a.shape
    np.testing.assert_allclose(img, a / 255.0, atol=1e-7)


def test_png_16bit(tmp_path):
    a = _ramp(hi=65535, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode in ("I;16", "I")
    np.testing.assert_allclose(read_xray(tmp_path / "a.png"), a / 65535.0, atol=1e-7)


def test_jpeg(tmp_path):
    a = _ramp()
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    img = read_xray(tmp_path / "a.jpg")
    assert img.shape == a.shape
    np.testing.assert_allclose(img, a / 255.0, atol=0.05)  # lossy


def test_rgb_png_becomes_luminance(tmp_path):
    rgb = np.stack([_ramp(), _ramp()[::-1], np.full((24, 32), 40, np.uint8)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    expected = (rgb.astype(float) @ [0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(read_xray(tmp_path / "c.png"), expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    px = _ramp(hi=4095, dtype=np.uint16)
    m2 = read_xray(write_xray_dicom(tmp_path / "m2.dcm", px, photometric="MONOCHROME2"))
    m1 = read_xray(write_xray_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1", modality="CR"))
    np.testing.assert_allclose(m2, px / 4095.0, atol=1e-6)   # 12 BitsStored → / 4095
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_rescale_and_window(tmp_path):
    px = _ramp(hi=2000, dtype=np.uint16)
    c, w = 900.0, 1200.0
    img = read_xray(write_xray_dicom(tmp_path / "w", px, slope=2.0, intercept=-1000.0, window=(c, w)))
    x = 2.0 * px - 1000.0                                   # modality rescale
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)   # DICOM LINEAR window, normalised
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert img.min() == 0.0 and img.max() == 1.0            # the window saturates both ends


def test_npy(tmp_path):
    a = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    np.save(tmp_path / "unit.npy", a)
    np.testing.assert_array_equal(read_xray(tmp_path / "unit.npy"), a)       # [0, 1] kept
    np.save(tmp_path / "wide.npy", a * 50 - 7)
    np.testing.assert_allclose(read_xray(tmp_path / "wide.npy"), (a - a.min()) / (a.max() - a.min()), atol=1e-6)
    np.save(tmp_path / "int.npy", _ramp(hi=1000, dtype=np.int32))
    img = read_xray(tmp_path / "int.npy")
    assert img.min() == 0.0 and img.max() == 1.0


def test_resize_shape_and_reference(tmp_path):
    a = np.random.default_rng(1).random((37, 53)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    img = read_xray(tmp_path / "a.npy", size=(16, 20))
    assert img.shape == (16, 20) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    ref = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None], size=(16, 20), mode="bilinear",
                                          antialias=True, align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(img, ref, atol=1e-5)
    assert resize_xray(a, (80, 90)).shape == (80, 90)


def _write_truncated_png(p):
    Image.fromarray(_ramp(64, 64)).save(p)
    p.write_bytes(p.read_bytes()[:80])


@pytest.mark.parametrize("name, make, phrase", [
    ("missing.png", None, "no such file"),
    ("empty.png", lambda p: p.write_bytes(b""), "empty"),
    ("garbage.png", lambda p: p.write_bytes(b"not an image at all" * 10), "unreadable or corrupt"),
    ("truncated.png", _write_truncated_png, "unreadable or corrupt"),
    ("vol.npy", lambda p: np.save(p, np.random.default_rng(0).random((3, 4, 5))), "2D"),
    ("nan.npy", lambda p: np.save(p, np.array([[0.1, np.nan], [0.3, 0.4]])), "NaN"),
    ("multi.dcm", lambda p: write_xray_dicom(p, np.arange(2 * 8 * 8).reshape(2, 8, 8), num_frames=2), "multi-frame"),
    ("blank.png", lambda p: Image.fromarray(np.full((8, 8), 17, np.uint8)).save(p), "blank"),
    ("blank.npy", lambda p: np.save(p, np.full((8, 8), 3.0)), "blank"),
])
def test_errors_are_one_line_naming_the_file(tmp_path, name, make, phrase):
    p = tmp_path / name
    if make is not None:
        make(p)
    with pytest.raises(InputError) as e:
        read_xray(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and phrase in msg and "\n" not in msg


def test_bad_size(tmp_path):
    np.save(tmp_path / "a.npy", np.eye(4))
    for size in [(0, 4), (4,), "ab", (2.5, 3)]:
        with pytest.raises(InputError, match="size"):
            read_xray(tmp_path / "a.npy", size=size)
    with pytest.raises(InputError, match="is a directory"):
        read_xray(tmp_path)
