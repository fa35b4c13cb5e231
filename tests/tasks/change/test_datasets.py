"""Change datasets: OSCD / Taizhou / LEVIR-CD loaders on the real shared data, generic rasters, crops, prediction."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from dinov3geo.inference import RasterModel
from dinov3geo.tasks.change.datasets import (
    ChangePair,
    d4_transform,
    encode_labels,
    grid_crops,
    load_levir,
    load_oscd_city,
    load_raster_pair,
    load_taizhou,
    predict_pair,
    random_crops,
)
from tests.conftest import write_raster


def test_oscd_city_on_the_10m_grid(shared_data):
    city = shared_data / "change_pairs/oscd/bercy"
    pair = load_oscd_city(city)
    assert pair.before.shape == pair.after.shape == (13, 395, 360)
    assert pair.band_names[:4] == ("coastal", "blue", "green", "red")
    # label 1/2 -> 0/1, all 1046 change pixels kept; transform borrowed from the 10 m band
    assert int(pair.label.sum()) == 1046 and set(np.unique(pair.label)) == {0, 1}
    assert pair.valid.all()
    with rasterio.open(next((city / "imgs_1").glob("*_B02.tif"))) as ds:
        assert pair.grid.transform.almost_equals(ds.transform) and pair.grid.crs == ds.crs
        np.testing.assert_array_equal(pair.before[1], ds.read(1).astype(np.float32))
    # dates from dates.txt, not from the processing time in the imgs_1 file names
    assert pair.dates == (date(2016, 11, 30), date(2017, 8, 29))
    # a 20 m band is resampled onto the 10 m grid (not just nearest-neighbour copies everywhere)
    assert pair.before[4].std() > 0
    rgb = load_oscd_city(city, bands=["red", "green", "B02"])
    np.testing.assert_array_equal(rgb.before[2], pair.before[1])


def test_taizhou_labels_only_where_sampled(shared_data):
    pair = load_taizhou(shared_data / "change_pairs/landsat_taizhou")
    assert pair.before.shape == (6, 400, 400)
    assert int(pair.valid.sum()) == 17163 + 4227
    assert int(pair.label[pair.valid].sum()) == 4227
    assert int(pair.label[~pair.valid].sum()) == 0
    assert pair.image_valid.sum() > pair.valid.sum()
    assert pair.dates == (date(2000, 3, 17), date(2003, 2, 6))


def test_levir_triplets(shared_data):
    pairs = load_levir(shared_data / "change_pairs/levir_cd_samples", ["test_7_0256_0512", "val_27_0000_0256"])
    assert [p.name for p in pairs] == ["test_7_0256_0512", "val_27_0000_0256"]
    for p in pairs:
        assert p.before.shape == (3, 256, 256) and p.grid is None
        assert set(np.unique(p.label)) <= {0, 1} and 0.05 < p.label.mean() < 0.3
    with pytest.raises(Exception, match="missing"):
        load_levir(shared_data / "change_pairs/levir_cd_samples", ["nope"])


def test_generic_rasters_and_label_encodings(tmp_path):
    rng = np.random.default_rng(0)
    tr = from_origin(500000, 4000000, 10, 10)
    b = write_raster(tmp_path / "before.tif", rng.integers(0, 1000, (4, 20, 30)).astype(np.uint16), transform=tr)
    # after on a finer grid covering the same area: read on the before grid
    a = write_raster(tmp_path / "after.tif", rng.integers(0, 1000, (4, 40, 60)).astype(np.uint16),
                     transform=from_origin(500000, 4000000, 5, 5))
    lab = np.zeros((20, 30), np.uint8)
    lab[5:10, 5:10] = 255
    lab_path = write_raster(tmp_path / "label.tif", lab, transform=tr)
    pair = load_raster_pair(b, a, lab_path)  # auto: 0/255
    assert pair.before.shape == pair.after.shape == (4, 20, 30)
    assert int(pair.label.sum()) == 25 and pair.valid.all()
    # a label without georeferencing but with the image shape: pixel-aligned
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=30, height=20, count=1, dtype="uint8") as ds:
        ds.write((lab // 255 + 1)[None])  # OSCD-style 1/2
    pair2 = load_raster_pair(b, a, plain, label_encoding="oscd")
    np.testing.assert_array_equal(pair2.label, pair.label)
    # sparse samples: 0 = unlabelled
    samp = np.where(lab > 0, 2, 0).astype(np.uint8)
    samp[0, :10] = 1
    pair3 = load_raster_pair(b, a, write_raster(tmp_path / "s.tif", samp, transform=tr), label_encoding="samples")
    assert int(pair3.valid.sum()) == 35 and int(pair3.label.sum()) == 25
    with pytest.raises(ValueError, match=r"values \[255\].*binary"):
        load_raster_pair(b, a, lab_path, label_encoding="binary")
    bad = tmp_path / "bad.tif"
    with rasterio.open(bad, "w", driver="GTiff", width=7, height=5, count=1, dtype="uint8") as ds:
        ds.write(np.zeros((1, 5, 7), np.uint8))
    with pytest.raises(Exception, match="bad.tif.*no geotransform"):
        load_raster_pair(b, a, bad)


def test_encode_labels_dict_and_errors():
    raw = np.array([[0, 3, 7], [7, 3, 0]])
    lab, ok = encode_labels(raw, {"change": [7], "nochange": [3], "ignore": [0]})
    np.testing.assert_array_equal(lab, [[0, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(ok, [[False, True, True], [True, True, False]])
    with pytest.raises(ValueError, match="unknown label encoding"):
        encode_labels(raw, "percent")
    with pytest.raises(ValueError, match="cannot guess"):
        encode_labels(raw, "auto")


def _pair(h: int = 40, w: int = 50, c: int = 2) -> ChangePair:
    rng = np.random.default_rng(3)
    b = rng.random((c, h, w), dtype=np.float32)
    a = rng.random((c, h, w), dtype=np.float32)
    lab = (rng.random((h, w)) < 0.2).astype(np.uint8)
    return ChangePair(b, a, lab, np.ones((h, w), bool), tuple(f"b{i}" for i in range(c)), name="t")


def test_d4_is_applied_identically():
    p = _pair(8, 8)
    # a marker that is change in the label and bright in both dates must stay aligned
    p.before[:, 1, 2] = p.after[:, 1, 2] = 10
    p.label[:] = 0
    p.label[1, 2] = 1
    seen = set()
    for k in range(8):
        b, a, lab, v = d4_transform([p.before, p.after, p.label, p.valid], k)
        r, c = np.argwhere(lab == 1)[0]
        assert (b[:, r, c] == 10).all() and (a[:, r, c] == 10).all()
        seen.add((int(r), int(c)))
    assert len(seen) == 8  # all 8 elements differ


def test_random_and_grid_crops():
    p = _pair(40, 50)
    crops = random_crops([p], 16, 10, rng=1, augment=True)
    assert len(crops) == 10 and all(c.before.shape == (2, 16, 16) for c in crops)
    rare = ChangePair(p.before, p.after, np.zeros(p.shape, np.uint8), p.valid, p.band_names)
    rare.label[30, 7] = 1  # one change pixel: every "positive" crop must contain it
    pos = random_crops([rare], 16, 6, rng=2, positive_fraction=1.0)
    assert all(int(c.label.sum()) == 1 for c in pos)
    assert sum(int(c.label.sum()) for c in random_crops([rare], 16, 6, rng=2)) < 6
    tiles = grid_crops(p, 16, stride=16)
    covered = np.zeros(p.shape, int)
    for s, (r, c) in tiles:
        covered[r:r + 16, c:c + 16] += 1
        np.testing.assert_array_equal(s.label, p.label[r:r + 16, c:c + 16])
    assert covered.min() >= 1  # the last row/column is shifted back: everything covered
    small = grid_crops(p, 64)
    assert len(small) == 1 and small[0][0].valid[40:].sum() == 0  # padded past the edge, marked invalid
    with pytest.raises(ValueError, match="no labelled pixel"):
        random_crops([ChangePair(p.before, p.after, p.label, np.zeros(p.shape, bool), p.band_names)], 8, 1)


class _AbsDiff(RasterModel):
    """Per-pixel mean |after - before| (a pointwise model: tiling must not change it)."""

    out_bands = 1
    receptive_margin = 0

    def forward(self, x, valid):
        c = x.shape[1] // 2
        return (x[:, c:] - x[:, :c]).abs().mean(1, keepdim=True)


class _Box(RasterModel):
    """5x5 box filter of the mean difference: margin 2 makes tiled == whole-image."""

    out_bands = 1
    receptive_margin = 2

    def forward(self, x, valid):
        c = x.shape[1] // 2
        d = (x[:, c:] - x[:, :c]).mean(1, keepdim=True)
        return torch.nn.functional.avg_pool2d(d, 5, stride=1, padding=2, count_include_pad=True)


def test_predict_pair_tiled_equals_whole():
    p = _pair(70, 90)
    p.image_valid[0, 0] = False
    whole = np.abs(p.after - p.before).mean(0)
    out = predict_pair(_AbsDiff(), p, window=32, overlap=8, batch_size=3)
    assert np.isnan(out[0, 0])
    np.testing.assert_allclose(out[1:], whole[1:], rtol=1e-6, atol=1e-6)
    p.image_valid[:] = True
    ref = predict_pair(_Box(), p, window=256)  # one window
    tiled = predict_pair(_Box(), p, window=32, overlap=12)
    np.testing.assert_allclose(tiled, ref, atol=1e-5)
