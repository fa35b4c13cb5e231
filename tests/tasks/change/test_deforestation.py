"""Forest loss: forest from canopy height or a mask, height drop and/or probability evidence, MMU, ForestGapR labels."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3geo.io import GridSpec
from dinov3geo.tasks.change.deforestation import (
    forest_loss,
    forest_mask,
    forestgapr_loss_labels,
    read_on_grid,
)

G = GridSpec("EPSG:32722", from_origin(779170.0, 9585524.0, 10.0, 10.0), 6, 6)


def test_forest_mask_rules():
    h = np.array([[4.9, 5.0, np.nan]], np.float32)
    assert forest_mask(h).tolist() == [[False, True, False]]
    assert forest_mask(h, np.array([[1, 0, 1]])).tolist() == [[False, False, False]]
    assert forest_mask(mask=np.array([[1, 0, 2]])).tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="canopy-height raster"):
        forest_mask()


def test_loss_from_heights_and_probability():
    hb = np.full((6, 6), 20.0, np.float32)
    hb[0] = 3.0  # not forest
    ha = hb.copy()
    ha[0] = 0.0  # a drop, but it was not forest
    ha[2:4, 2:4] = 1.0  # cleared forest
    ha[5, 5] = 16.0  # a 4 m drop: below the 5 m threshold
    prob = np.zeros((6, 6), np.float32)
    prob[2:4, 2:5] = 0.9
    r = forest_loss(height_before=hb, height_after=ha, grid=G, mmu_ha=0)
    assert r.evidence == "height" and r.loss.sum() == 4 and r.loss[2:4, 2:4].all()
    both = forest_loss(height_before=hb, height_after=ha, prob=prob, prob_threshold=0.5, grid=G, mmu_ha=0)
    assert both.evidence == "height+prob" and both.loss.sum() == 4
    either = forest_loss(height_before=hb, height_after=ha, prob=prob, prob_threshold=0.5, combine="or",
                         grid=G, mmu_ha=0)
    assert either.loss.sum() == 6  # + the 2 high-probability forest pixels of column 4
    valid = np.ones((6, 6), bool)
    valid[2, 2] = False  # e.g. a cloud: never loss
    assert not forest_loss(height_before=hb, height_after=ha, valid=valid, grid=G, mmu_ha=0).loss[2, 2]
    # MMU: the 4 px region is 0.04 ha on this 10 m grid
    assert forest_loss(height_before=hb, height_after=ha, grid=G, mmu_ha=0.05).loss.sum() == 0
    assert forest_loss(height_before=hb, height_after=ha, grid=G, mmu_ha=0.04).loss.sum() == 4
    with pytest.raises(ValueError, match="prob_threshold"):
        forest_loss(height_before=hb, prob=prob, grid=G)
    with pytest.raises(ValueError, match="evidence of loss"):
        forest_loss(height_before=hb, grid=G)
    fm = forest_loss(forest=np.ones((6, 6)), prob=prob, prob_threshold=0.5, grid=G, mmu_ha=0)
    assert fm.evidence == "prob" and fm.loss.sum() == 6


def test_forestgapr_labels(shared_data):
    d = shared_data / "change_pairs/forestgapr_cauaxi_als_chm"
    loss, valid = forestgapr_loss_labels(d / "ALS_CHM_CAU_2012.tif", d / "ALS_CHM_CAU_2014.tif")
    with rasterio.open(d / "ALS_CHM_CAU_2012.tif") as a, rasterio.open(d / "ALS_CHM_CAU_2014.tif") as b:
        h12, h14 = a.read(1), b.read(1)
    assert valid.all() and loss.shape == (300, 300)
    # the data README counts 1851 px going from >= 10 m to < 5 m: all are loss under this rule
    clear = (h12 >= 10) & (h14 < 5)
    assert clear.sum() == 1851 and loss[clear].all()
    assert not loss[h12 < 5].any()  # only 2012 forest can be lost
    gap_only = (h12 >= 5) & (h14 < 2) & (h12 - h14 < 5)
    assert not gap_only.any() or loss[gap_only].all()


def test_read_on_grid_reprojects_and_masks(shared_data):
    d = shared_data / "change_pairs/forestgapr_cauaxi_als_chm"
    g = GridSpec("EPSG:31982", from_origin(779170.0, 9585524.0, 10.0, 10.0), 32, 32)  # 10 m, 2 px beyond the plot
    h = read_on_grid(d / "ALS_CHM_CAU_2012.tif", g, assume_crs="EPSG:31982", resampling="average")
    with rasterio.open(d / "ALS_CHM_CAU_2012.tif") as ds:
        full = ds.read(1)
    assert h[0, 0] == pytest.approx(full[:10, :10].mean(), rel=1e-4)
    assert np.isnan(h[30:, :]).all() and np.isfinite(h[:30, :30]).all()
