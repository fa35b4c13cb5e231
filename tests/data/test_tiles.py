"""TileDataset: random access, masks, metadata, normalisation, multi-process DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dinov3geo.data.tiles import TileDataset
from dinov3geo.ingest import TileStore, ingest


@pytest.fixture(scope="module")
def rgb_store(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("tiles") / "rgb.zarr"
    ingest([shared_data / "landsat/rasterio_RGB.byte.tif"], out, tile_size=64, progress=False)
    return out


def test_items_match_store(rgb_store):
    ds = TileDataset(rgb_store)
    ts = TileStore.open(rgb_store)
    assert len(ds) == ts.n_tiles > 50
    item = ds[5]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert item["valid"].dtype == torch.bool
    np.testing.assert_array_equal(item["image"].numpy(), ts.group["tiles"][5].astype(np.float32))
    assert item["crs"] == "EPSG:32618" and item["scene_id"] == "rasterio_RGB.byte"
    assert item["datetime"] == ""
    assert torch.allclose(item["transform"], torch.from_numpy(ts.group["transform"][5]))
    # nodata never looks valid: where the mask is False the pixels are filled with 0
    for i in range(len(ds)):
        it = ds[i]
        assert (it["image"][:, ~it["valid"]] == 0).all()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_normalisation_and_band_subset(rgb_store):
    ts = TileStore.open(rgb_store)
    ds = TileDataset(rgb_store, bands=["blue", "red"], normalize=True)
    raw = ts.group["tiles"][3].astype(np.float32)
    valid = ts.group["valid"][3]
    st = ts.stats
    exp = (raw[[2, 0]] - np.array([st["mean"][2], st["mean"][0]], np.float32)[:, None, None]) / np.array(
        [st["std"][2], st["std"][0]], np.float32)[:, None, None]
    exp[:, ~valid] = 0
    np.testing.assert_allclose(ds[3]["image"].numpy(), exp, rtol=1e-6, atol=1e-6)
    # over all valid pixels of the store, normalised bands have mean 0 and std 1
    vals = np.concatenate([ds[i]["image"][:, ds[i]["valid"]].numpy() for i in range(len(ds))], axis=1)
    np.testing.assert_allclose(vals.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(vals.std(axis=1), 1, atol=1e-4)
    with pytest.raises(KeyError, match="nir"):
        TileDataset(rgb_store, bands=["nir"])


def test_dataloader_with_worker_processes(rgb_store):
    ds = TileDataset(rgb_store)
    dl = DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    seen = []
    for batch in dl:
        assert batch["image"].shape[1:] == (3, 64, 64)
        seen.extend(batch["index"].tolist())
    assert seen == list(range(len(ds)))
