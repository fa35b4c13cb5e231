"""Cloud and nodata masking: SCL classes on real Sentinel-2 data, the brightness test, nodata never changes."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from dinov3geo.tasks.change.coregister import coregister
from dinov3geo.tasks.change.masking import (
    SCL_MASKED,
    CloudMasker,
    bright_cloud_mask,
    nodata_mask,
    scl_clear_mask,
)

BARB = "sentinel2/sen2r_barbellino"


def test_scl_classes():
    scl = np.arange(12, dtype=np.uint8)
    clear = scl_clear_mask(scl)
    assert set(np.nonzero(~clear)[0]) == set(SCL_MASKED) == {0, 1, 3, 8, 9, 10}
    assert scl_clear_mask(scl, masked=[11]).sum() == 11  # snow masked on request
    with pytest.raises(ValueError, match="unknown SCL classes"):
        scl_clear_mask(scl, masked=[12])


def test_nodata_mask():
    d = np.ones((2, 3, 3), np.float32)
    d[0, 0, 0] = np.nan
    d[1, 2, 2] = -9999
    ok = nodata_mask(d, -9999)
    assert ok.sum() == 7 and not ok[0, 0] and not ok[2, 2]


def test_bright_cloud_test():
    # [blue, green, red, nir] reflectance x 10000: a white cloud, a bright red roof (not white), dark forest
    px = np.array([[7000, 7200, 7100, 7300], [1500, 2500, 6500, 4000], [300, 500, 300, 3500]], np.float32).T
    data = px[:, None, :]
    cloud = bright_cloud_mask(data, ["blue", "green", "red", "nir"], value_scale=1e-4)
    assert cloud[0].tolist() == [True, False, False]


def test_scl_masks_clouds_of_real_sentinel2(shared_data):
    d = shared_data / BARB
    b, a = d / "S2A2A_20170703_022_Barbellino_BOA_10.tif", d / "S2A2A_20190723_022_Barbellino_BOA_10.tif"
    scl = d / "S2A2A_20170703_022_Barbellino_SCL_10.tif"
    with rasterio.open(scl) as ds:
        s20 = ds.read(1)
    expect_cloud = np.kron(np.isin(s20, SCL_MASKED), np.ones((2, 2), bool))  # 20 m -> 10 m, exactly 2x2
    assert expect_cloud.sum() == 4 * 33  # 30 medium + 3 high-probability cloud pixels in this real SCL
    pair = coregister(b, a, misregistration=False)
    assert pair.grid.shape == (42, 24) and (pair.date_before, pair.date_after) == ("2017-07-03", "2019-07-23")
    plain = pair.source()
    masked = pair.source(masks=(CloudMasker(scl=scl), None))
    win = Window(0, 0, 24, 42)
    with rasterio.Env(), plain.reader() as r:
        _, v0 = r.read(win)
    with rasterio.Env(), masked.reader() as r:
        data, v1 = r.read(win)
    np.testing.assert_array_equal(v1, v0 & ~expect_cloud)
    assert masked.sources[0].masked_pixels == int((v0 & expect_cloud).sum()) > 0


def test_scl_must_be_single_band(shared_data):
    with pytest.raises(ValueError, match="single-band"):
        CloudMasker(scl=shared_data / BARB / "S2A2A_20170703_022_Barbellino_BOA_10.tif")
