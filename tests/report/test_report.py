"""Report figures, HTML and the headless-Chromium check, on real rasters and real pretraining logs."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import from_origin

from dinov3geo.report import Figure, Link, Section, Table, build_report, raster_area_ha, section_from_spec
from dinov3geo.report import figures as F
from dinov3geo.report import html as H
from dinov3geo.report.browser import check_images, find_chromium, screenshot
from dinov3geo.report.build import validate_specs

LANDSAT = "landsat/rasterio_RGB.byte.tif"
CHM = "aerial_rgb_chm/neon_bart_2019/NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"


def _png(data: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(data), format="png")


def test_percentile_stretch_maps_percentiles_to_0_and_1() -> None:
    a = np.arange(100, dtype="float32").reshape(1, 10, 10)
    s = F.percentile_stretch(a, (10, 90))
    lo, hi = np.percentile(np.arange(100), (10, 90))
    assert s.min() == 0 and s.max() == 1
    assert np.isclose(s[0, 5, 0], (50 - lo) / (hi - lo))
    b = a.copy()
    b[0, 0, :3] = np.nan
    assert (F.percentile_stretch(b)[0, 0, :3] == 0).all()


def test_rgb_and_map_figures_of_real_rasters(shared_data: Path) -> None:
    rgb = _png(F.rgb_figure(shared_data / LANDSAT, max_size=300))
    assert rgb.shape[2] == 4 and 250 < rgb.shape[1] < 900
    chm = _png(F.map_figure(shared_data / CHM, label="canopy height (m)", vmin=0, vmax=30))
    assert chm.shape[1] > chm.shape[0] * 0.9  # map + colour bar is wider than the square map
    pv = F.read_preview(shared_data / CHM)
    assert np.nanmax(pv.data) > 20 and np.nanmin(pv.data) >= 0  # nodata (-9999) masked
    with pytest.raises(ValueError, match="band 4 out of range"):
        F.read_preview(shared_data / LANDSAT, bands=[4])


def test_overlay_draws_the_mask_where_it_is_and_nowhere_else(make_raster) -> None:
    base = np.full((3, 60, 60), 100, np.uint8)
    base[1] = 120
    img = make_raster("img.tif", base)
    m = np.zeros((30, 30), np.float32)  # half resolution, same extent: reprojected onto the image grid
    m[:, 15:] = 0.9
    mask = make_raster("mask.tif", m, transform=from_origin(500000.0, 4000000.0, 20.0, 20.0))
    red = np.array([232, 17, 45]) / 255

    def share_red(png: bytes) -> float:
        a = _png(png)[..., :3]
        return float((np.abs(a - red).sum(-1) < 0.1).mean())

    hit = F.overlay_figure(img, mask, threshold=0.5, alpha=1.0)
    none = F.overlay_figure(img, mask, threshold=0.95, alpha=1.0)
    assert 0.35 < share_red(hit) < 0.65 and share_red(none) == 0.0


def test_raster_area_projected_and_geographic(make_raster) -> None:
    m = np.zeros((20, 20), np.uint8)
    m[:5, :8] = 1  # 40 pixels of 10 x 10 m = 0.4 ha
    assert raster_area_ha(make_raster("m.tif", m)) == pytest.approx(0.4)
    geo = make_raster("g.tif", np.ones((10, 10), np.uint8), crs="EPSG:4326",
                      transform=from_origin(10.0, 1.0, 0.001, 0.001))
    # 0.01 x 0.01 degree near the equator: about 1.11 km x 1.11 km = 123 ha
    assert raster_area_ha(geo) == pytest.approx(123.2, rel=0.01)


def test_loss_curves_from_a_real_pretraining_run(tmp_path: Path, shared_data: Path) -> None:
    from dinov3geo.ingest import ingest
    from dinov3geo.ssl.config import load_config
    from dinov3geo.ssl.train import pretrain

    ingest([shared_data / LANDSAT], tmp_path / "t.zarr", tile_size=64, progress=False)
    cfg = load_config({
        "data": {"store": str(tmp_path / "t.zarr"), "batch_size": 2, "num_workers": 0},
        "crops": {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 1},
        "dino": {"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        "ibot": {"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        "optim": {"iterations": 4},
        "train": {"output_dir": str(tmp_path / "run"), "log_every": 1, "health_every": 0, "progress_bar": False,
                  "checkpoint_every": 100},
    })
    pretrain(cfg)
    runs = F.read_loss_curves(tmp_path / "run")
    assert [len(rows) for _, rows in runs] == [4] and "total_loss" in runs[0][1][0]
    png = _png(F.loss_curves_figure(tmp_path / "run"))
    assert png.shape[1] > png.shape[0]
    with pytest.raises(ValueError, match="no pretraining logs"):
        F.read_loss_curves(tmp_path)


def test_html_escapes_formats_and_links_relatively(tmp_path: Path) -> None:
    t = H.table_html([{"model": "<script>x</script>", "mae": 1.23456, "n": 12345}], "metrics")
    assert "<script>" not in t and "&lt;script&gt;" in t and "1.235" in t and "12,345" in t
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "chm.tif").write_bytes(b"x" * 2000)
    links = H.links_html([(tmp_path / "sub" / "chm.tif", "CHM", "COG"), (tmp_path / "gone.gpkg", "", "")],
                         tmp_path / "report")
    assert 'href="../sub/chm.tif"' in links and "2.0 KB" in links
    assert 'class="missing"' in links and "gone.gpkg" in links


def _report(tmp_path: Path, shared_data: Path) -> Path:
    chm = shared_data / CHM
    secs = [
        section_from_spec({"title": "Height", "items": [
            {"kind": "rgb", "path": str(shared_data / LANDSAT), "max_size": 256},
            {"kind": "map", "path": str(chm), "label": "height (m)", "vmin": 0, "vmax": 30},
            {"kind": "overlay", "image": str(chm), "mask": str(chm), "threshold": 20, "label": "tall", "area": True},
            {"kind": "pca", "features": np.random.default_rng(0).normal(size=(8, 20, 30))},
            {"kind": "table", "rows": [{"metric": "MAE (m)", "value": 2.5}]},
            {"kind": "links", "paths": [str(chm), {"path": str(tmp_path / "none.gpkg"), "label": "polygons"}]},
        ]}),
        Section("Python-made", "Two paragraphs.\n\nSecond.", figures=[Figure(F.rgb_figure(chm), "chm as grey")],
                tables=[Table({"a": 1})], links=[Link(chm, "chm")]),
    ]
    return build_report(secs, tmp_path / "out" / "report.html", title="Test report",
                        summary={"forest loss (ha)": 12.3456}, metadata={"pipeline": "t"})


def test_report_is_self_contained(tmp_path: Path, shared_data: Path) -> None:
    out = _report(tmp_path, shared_data)
    text = out.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing from the network
    assert "<link" not in text and "@import" not in text and "<script" not in text
    assert "tall area (ha)" in text and "12.35" in text and "dinov3geo: " in text and "pipeline: t" in text
    assert f'href="{Path(os.path.relpath(shared_data / CHM, out.parent)).as_posix()}"' in text
    with pytest.raises(ValueError, match=r"sections\[0\] \('x'\) item 0 \(kind map\): unknown key\(s\) \['colour'\]"):
        validate_specs([{"title": "x", "kind": "map", "path": "a.tif", "colour": 1}])
    with pytest.raises(ValueError, match="exactly one of 'rows' or 'path'"):
        validate_specs([{"kind": "table"}])


# `make test` installs Debian's chromium where it can; in CI (CI=true) these tests never skip: a missing browser
# fails them instead of hiding a broken report
chromium = pytest.mark.skipif(find_chromium() is None and not os.environ.get("CI"),
                              reason="Chromium not installed (Debian: apt-get install chromium; or set "
                                     "DINOV3GEO_CHROMIUM): headless report check skipped")


@chromium
def test_report_images_load_in_headless_chromium(tmp_path: Path, shared_data: Path) -> None:
    out = _report(tmp_path, shared_data)
    chk = check_images(out)
    assert chk.total == 5 and chk.ok, chk.failed
    assert all(w > 100 for w in chk.widths)
    shot = screenshot(out, tmp_path / "shot.png", width=800, height=600)
    assert _png(shot.read_bytes()).shape[:2] == (600, 800)


@chromium
def test_headless_check_catches_a_broken_image(tmp_path: Path) -> None:
    good = F.rgb_figure(np.random.default_rng(0).random((3, 10, 10)))
    out = build_report([Section("s", figures=[Figure(good, "ok"), Figure(b"not a png", "broken")])],
                       tmp_path / "r.html")
    chk = check_images(out)
    assert chk.total == 2 and chk.failed == ["broken"]
