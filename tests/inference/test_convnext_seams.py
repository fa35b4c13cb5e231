"""The inference engine maps a raster with a ConvNeXt feature model seam-free.

A ConvNeXt has a finite receptive field (:func:`dinov3geo.models.taps.receptive_radius`: 276 px for the tiny test
config's last stage). With edge margins that wide, blended windows must reproduce one window over the whole raster
to float rounding, provided the wrapper pads windows without moving the 32 px stage grid: bottom/right padding of
windows that are not multiples of 32 (here 656 px) keeps the grid anchored at each window's origin, a multiple of
32. Real pixels: a crop of the bundled NEON 10 cm RGB image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from dinov3geo.inference import BackboneFeatures, make_layout, predict_raster
from dinov3geo.models import load_backbone
from dinov3geo.models.taps import receptive_radius
from tests.models.convnext_weights import save_convnext_test_weights

ROOT = Path(__file__).resolve().parents[2]
NEON = ROOT / "data/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"


def _crop(path: Path, n: int) -> Path:
    with rasterio.open(NEON) as ds:
        prof = ds.profile.copy()
        data = ds.read(window=Window(0, 0, n, n))
        prof.update(width=n, height=n, transform=ds.window_transform(Window(0, 0, n, n)), tiled=False)
    prof.pop("blockxsize", None)
    prof.pop("blockysize", None)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
    return path


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def test_tiled_convnext_features_equal_one_window_over_the_whole_raster(tmp_path: Path) -> None:
    image = _crop(tmp_path / "neon720.tif", 720)  # 720 = 22.5 x 32: the wrapper pads it
    weights = save_convnext_test_weights(tmp_path / "convnext.pth")
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    bb = load_backbone(weights)
    margin = receptive_radius(bb)
    assert margin == 276
    whole = BackboneFeatures(bb, value_scale=1 / 255, receptive_margin=0)
    tiled = BackboneFeatures(bb, value_scale=1 / 255, receptive_margin=margin)
    # windows of 656 px (20.5 x 32) every 32 px: 3 x 3 windows whose origins are multiples of 32
    layout = make_layout(tiled, 720, 720, window=656, overlap=624)
    assert layout.n_windows == 9
    assert {layout.input_window(i, j).col_off % 32 for i in range(3) for j in range(3)} == {0}
    a = _read(predict_raster(whole, image, tmp_path / "whole.tif", window=720, overlap=0, progress=False,
                             overviews=False, device="cpu"))
    b = _read(predict_raster(tiled, image, tmp_path / "tiled.tif", window=656, overlap=624, progress=False,
                             overviews=False, device="cpu"))
    assert a.shape == b.shape == (128, 45, 45)
    assert float(a.std()) > 0.5  # LayerNorm-ed features of real texture, not a constant
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-5)  # measured max difference 4.8e-7
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


def test_a_window_off_the_32_px_grid_is_padded_at_its_bottom_right(tmp_path: Path) -> None:
    """A 656 px window sees the features of the same pixels inside a 704 px one (same origin), away from its
    padded edge: the padding did not shift the stage grid (centre padding would move it by 8 px)."""
    bb = load_backbone(save_convnext_test_weights(tmp_path / "convnext.pth"))
    with rasterio.open(NEON) as ds:
        x = torch.from_numpy(ds.read(window=Window(200, 100, 704, 704)).astype(np.float32))[None]
    model = BackboneFeatures(bb, value_scale=1 / 255)
    valid = torch.ones(1, 704, 704, dtype=torch.bool)
    with torch.no_grad():
        big = model(x, valid)
        small = model(x[..., :656, :656], valid[..., :656, :656])
    assert big.shape == (1, 128, 44, 44) and small.shape == (1, 128, 41, 41)
    keep = (656 - receptive_radius(bb)) // 16 - 1  # cells whose receptive field ends before the padding
    torch.testing.assert_close(small[..., :keep, :keep], big[..., :keep, :keep], rtol=0, atol=2e-5)
    assert (small[..., -1, :] - big[..., 40, :41]).abs().max() > 1e-3  # the padded edge itself differs


def test_default_windows_sit_on_the_32_px_grid_and_see_the_grid_mirrored_past_its_edge(tmp_path: Path) -> None:
    """At the defaults (window 512, no overlap given) on a raster whose side is no multiple of 32, every window
    origin, the last ones shifted back to the grid edge included, is a multiple of 32, and the last windows see
    the grid mirrored past its edge, as a whole image is padded: tiled features then match one window over the
    whole raster closely (measured mean / max 0.0006 / 0.038 on features of sd 1). Windows placed as before
    (last origin 488, zeros past the edge) disagree by ~0.4 on average."""
    image = _crop(tmp_path / "neon1000.tif", 1000)
    bb = load_backbone(save_convnext_test_weights(tmp_path / "convnext.pth"))
    whole = BackboneFeatures(bb, value_scale=1 / 255, receptive_margin=0)
    tiled = BackboneFeatures(bb, value_scale=1 / 255)
    assert tiled.receptive_margin == 64 and (tiled.window_align, tiled.edge_fill) == (32, "reflect")
    layout = make_layout(tiled, 1000, 1000, window=512)
    starts = {layout.input_window(i, j).row_off for i in range(layout.n_rows) for j in range(layout.n_cols)}
    assert starts == {0, 256, 512}  # 1000 - 512 = 488 rounded up to the 32 px grid: 24 px mirrored
    a = _read(predict_raster(whole, image, tmp_path / "whole.tif", window=1024, overlap=0, progress=False,
                             overviews=False, device="cpu"))
    b = _read(predict_raster(tiled, image, tmp_path / "tiled.tif", window=512, progress=False, overviews=False,
                             device="cpu"))
    assert a.shape == b.shape == (128, 63, 63) and float(a.std()) > 0.5
    d = np.abs(b - a)
    assert float(d.mean()) < 0.003 and float(d.max()) < 0.1, (float(d.mean()), float(d.max()))
    tiled.window_align, tiled.edge_fill = 1, "zeros"  # windows as the engine placed them before
    c = _read(predict_raster(tiled, image, tmp_path / "old.tif", window=512, progress=False, overviews=False,
                             device="cpu"))
    assert float(np.abs(c - a).mean()) > 0.1  # the check above would catch a regression


def test_an_overlap_that_puts_windows_off_the_32_px_grid_is_refused_with_ones_that_do(tmp_path: Path) -> None:
    bb = load_backbone(save_convnext_test_weights(tmp_path / "convnext.pth"))
    model = BackboneFeatures(bb, value_scale=1 / 255)
    with pytest.raises(ValueError, match=r"368 px apart, off the model.s 32 px feature grid.*e\.g\. 128 or 160"):
        make_layout(model, 1000, 1000, window=512, overlap=144)
    assert make_layout(model, 1000, 1000, window=512, overlap=160).stride == 352


@pytest.mark.parametrize("n", [1, 2, 5, 37])
def test_the_mirror_past_the_grid_edge_is_numpy_reflect_padding(n: int) -> None:
    from dinov3geo.inference.engine import _reflect_past_edge

    grid = np.arange(3 * n * (n + 1)).reshape(3, n, n + 1).astype(np.float32)
    r0, c0 = (5, 7) if n > 20 else (0, 0)  # the mirror of every overhanging pixel lies in the strip
    strip = np.zeros((3, n - r0 + 3, n + 1 - c0 + 4), np.float32)  # overhangs bottom and right
    strip[:, : n - r0, : n + 1 - c0] = grid[:, r0:, c0:]
    got = _reflect_past_edge(strip, r0, c0, n, n + 1)
    h, w = strip.shape[1:]
    want = np.pad(grid, ((0, 0), (0, r0 + h - n), (0, c0 + w - n - 1)), mode="reflect")
    np.testing.assert_array_equal(got, want[:, r0 : r0 + h, c0 : c0 + w])
