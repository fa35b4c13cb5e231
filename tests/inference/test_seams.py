"""Seam-free defaults for models whose output depends on the whole window (a ViT's global attention).

The model here adds half the window's mean to every pixel: neighbouring windows disagree everywhere by the
difference of their means, as a ViT's features do, so any narrow blend leaves a visible step at window
borders. Measured with the largest mean absolute row-to-row (column-to-column) step divided by its median.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3geo.inference import make_layout, predict_raster
from dinov3geo.inference.models import RasterModel


class WindowContext(RasterModel):
    in_bands = 1
    out_bands = 1
    scale = 1
    receptive_margin = 32
    global_context = True

    def forward(self, x, valid):
        return x[:, :1] + 0.5 * x.mean(dim=(2, 3), keepdim=True)[:, :1]


def seam_ratio(a: np.ndarray) -> float:
    rows = np.nanmean(np.abs(np.diff(a, axis=0)), axis=1)
    cols = np.nanmean(np.abs(np.diff(a, axis=1)), axis=0)
    return float(max(rows.max() / np.median(rows), cols.max() / np.median(cols)))


@pytest.mark.parametrize("seed", [0, 1])
def test_default_overlap_of_a_context_model_is_as_seam_free_as_75_percent(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = 640
    yy, xx = np.mgrid[0:n, 0:n]
    img = ((np.sin(xx / rng.uniform(20, 60)) + np.cos(yy / rng.uniform(20, 60))) * 10 + 0.1 * (xx + yy) + 50
           + rng.normal(0, 1, (n, n)))  # a gradient: neighbouring windows differ in their means
    path = tmp_path / "img.tif"
    with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=1, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(0, n, 1, 1)) as ds:
        ds.write(img.astype("float32"), 1)
    model = WindowContext()
    assert make_layout(model, n, n, window=256).overlap == 128  # half a window for a context model
    ratios = {}
    for name, overlap in (("default", None), ("quarter", 66), ("75%", 192)):
        out = predict_raster(model, path, tmp_path / f"{name}.tif", window=256, overlap=overlap, progress=False)
        with rasterio.open(out) as ds:
            ratios[name] = seam_ratio(ds.read(1))
    # the old default (a quarter window, here a 2 px ramp) leaves steps ~3x the median; the default is within
    # the metric's noise (about 1 % between seeds) of a 75 %-overlap run, which costs 2.8x the windows
    assert ratios["quarter"] > 2.0, ratios
    assert ratios["default"] <= ratios["75%"] * 1.02, ratios


def test_models_without_context_keep_a_quarter_window():
    class Local(WindowContext):
        global_context = False

    assert make_layout(Local(), 640, 640, window=256).overlap == 66  # max(256 // 4, 2 * 32 + 2)
