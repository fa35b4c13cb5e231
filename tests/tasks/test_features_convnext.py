"""``dinov3geo features`` with a ConvNeXt weights file: stage selection, widths, LVD-1689M normalisation, errors.

The weights are ``convnext_tiny_test`` (stage widths 16, 32, 64, 128) with real layer scales, saved in Meta's
format like ``dinov3_convnext_*_pretrain_lvd1689m-*.pth``; the image is a 320 px crop of the bundled NEON RGB
image, mapped in one window so that the Zarr must equal the backbone's own output on the whole crop.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from rasterio.windows import Window

from dinov3geo.cli import main
from dinov3geo.models import LVD1689M, SAT493M, load_backbone, normalize
from dinov3geo.models.taps import tap_maps
from dinov3geo.tasks.features import normalisation_for
from tests.models.convnext_weights import save_convnext_test_weights

ROOT = Path(__file__).resolve().parents[2]
NEON = ROOT / "data/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cx_features")
    w = Window(300, 200, 320, 320)
    with rasterio.open(NEON) as ds:
        prof = ds.profile.copy()
        data = ds.read(window=w)
        prof.update(width=320, height=320, transform=ds.window_transform(w), tiled=False)
    prof.pop("blockxsize", None)
    prof.pop("blockysize", None)
    image = d / "neon320.tif"
    with rasterio.open(image, "w", **prof) as ds:
        ds.write(data)
    return image, save_convnext_test_weights(d / "dinov3_convnext_test.pth")


def _sha(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_cli_features_of_two_stages_equal_the_backbone_with_lvd_normalisation(files, tmp_path):
    image, weights = files
    before = _sha(image, weights)
    out = tmp_path / "feats.zarr"
    rc = main(["-q", "features", str(image), "--weights", str(weights), "--out", str(out), "--layers", "0,-1",
               "--window", "320"])
    assert rc == 0 and _sha(image, weights) == before
    ds = xr.open_zarr(out, consolidated=False)
    f = ds["features"]
    assert f.shape == (16 + 128, 20, 20)  # stage 0 (16 channels) then stage 3 (128), on the 16 px grid
    names = [str(n) for n in f["feature"].values]
    assert names[0] == "l00_f000" and names[15] == "l00_f015" and names[16] == "l03_f000" and names[-1] == "l03_f127"
    assert ds.attrs["layers"] == [0, 3]
    with rasterio.open(image) as src:
        assert ds.rio.transform() == src.transform * rasterio.Affine.scale(16)
        x = torch.from_numpy(src.read().astype(np.float32))[None] / 255

    # a Meta ConvNeXt file carries no metadata: uint8 / 255, then the LVD-1689M (ImageNet) mean/std
    bb = load_backbone(weights)
    assert bb.metadata is None
    assert normalisation_for(bb, "uint8") == (1 / 255, list(LVD1689M.mean), list(LVD1689M.std))
    with torch.no_grad():
        want = torch.cat(tap_maps(bb, normalize(x, LVD1689M.mean, LVD1689M.std), [0, 3]), 1)[0].numpy()
        sat = torch.cat(tap_maps(bb, normalize(x, SAT493M.mean, SAT493M.std), [0, 3]), 1)[0].numpy()
    got = f.values
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - sat).max() > 1e-2  # not the SAT-493M constants of the ViTs
    assert (out.parent / "feats_pca.png").exists() and (out.parent / "feats_pca.tif").exists()


@pytest.mark.parametrize(("layers", "text"), [
    ("0,3,-1", "layers [0, 3, -1] name the same block twice ([0, 3, 3]); give each once"),
    ("5", "layers [5] out of range: the backbone has 4 stages"),
])
def test_bad_stage_selections_are_one_line_errors_before_any_output(files, tmp_path, capsys, layers, text):
    image, weights = files
    before = _sha(image, weights)
    out = tmp_path / "feats.zarr"
    rc = main(["features", str(image), "--weights", str(weights), "--out", str(out), "--layers", layers])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and text in lines[0] and "--layers" in lines[0] and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "feats_pca.png").exists()
    assert _sha(image, weights) == before
