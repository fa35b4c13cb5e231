"""Windowed post-processing equals the in-memory reference: MMU masks bit for bit, the same polygons, Otsu.

Tiles are cut through regions on purpose (tiles of a few pixels on grids of tens), for 4- and 8-connectivity,
projected and geographic grids (per-row geodesic pixel areas), and MMU thresholds on both sides of region sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin
from scipy import ndimage

from dinov3geo.io import GridSpec
from dinov3geo.tasks.change.polygons import (
    _region_areas,
    change_polygons,
    label_regions,
    pixel_area_ha,
    remove_small_regions,
)
from dinov3geo.tasks.change.thresholds import (
    ScoreHistogram,
    ValueRange,
    otsu_threshold,
    otsu_threshold_streaming,
)
from dinov3geo.tasks.change.windowed import (
    RegionScan,
    as_reader,
    tile_windows,
    windowed_change_polygons,
    windowed_remove_small_regions,
)

UTM = ("EPSG:32633", from_origin(500000.0, 4000000.0, 10.0, 10.0))
GEO = ("EPSG:4326", from_origin(-74.5, 62.0, 0.0004, 0.0002))  # high latitude: pixel areas vary by row


def _grid(kind: tuple, h: int, w: int) -> GridSpec:
    return GridSpec(kind[0], kind[1], w, h)


def assert_same_polygons(ref, got, rel: float = 1e-9) -> None:
    """Same polygons after normalising: count, columns, geometry (equal, no symmetric difference), values."""
    assert list(ref.columns) == list(got.columns)
    assert len(ref) == len(got)
    assert list(got["id"]) == list(range(1, len(got) + 1))
    assert got["area_ha"].is_monotonic_decreasing
    unmatched = list(range(len(got)))
    for _, r in ref.iterrows():
        cand = [j for j in unmatched if got["n_pixels"].iloc[j] == r["n_pixels"]
                and got.geometry.iloc[j].equals(r.geometry)]
        assert cand, f"no windowed polygon equals reference polygon {r['id']} ({r['n_pixels']} px)"
        j = cand[0]
        unmatched.remove(j)
        g = got.iloc[j]
        assert shapely.symmetric_difference(g.geometry, r.geometry).area <= 1e-9 * r.geometry.area
        assert g["area_ha"] == pytest.approx(r["area_ha"], rel=rel)
        for c in ("mean_prob", "mean_height_drop", "max_height_drop", "mean_height_before", "mean_height_after"):
            if c in ref.columns:
                assert g[c] == pytest.approx(r[c], rel=1e-9, nan_ok=True), c
        assert g["date_before"] == r["date_before"] and g["date_after"] == r["date_after"]
    assert ref["area_ha"].sum() == pytest.approx(got["area_ha"].sum(), rel=rel)


@st.composite
def masks(draw):
    h = draw(st.integers(3, 28))
    w = draw(st.integers(3, 28))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([0.05, 0.2, 0.45, 0.6]))
    m = rng.random((h, w)) < density
    if draw(st.booleans()):
        m = ndimage.binary_dilation(m)  # bigger blobs, more of them cut by tile edges
    return m, rng


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=masks(), tile=st.integers(1, 12), connectivity=st.sampled_from([4, 8]),
       kind=st.sampled_from([UTM, GEO]), pick=st.floats(0, 1), side=st.sampled_from([-1, 0, 1]))
def test_mmu_mask_equals_reference(data, tile, connectivity, kind, pick, side):
    m, _ = data
    grid = _grid(kind, *m.shape)
    labels, n = label_regions(m, connectivity)
    areas = _region_areas(labels, n, grid)[1:]
    # an MMU just below, at or just above the area of one of the regions
    mmu = 0.0 if n == 0 else float(np.sort(areas)[int(pick * (n - 1))]) * (1 + side * 1e-6)
    ref = remove_small_regions(m, grid, mmu, connectivity)
    got = windowed_remove_small_regions(m, grid, mmu, connectivity, tile=tile)
    np.testing.assert_array_equal(got, ref)
    written = np.full(m.shape, 7, np.uint8)

    def write(win, kept):
        r, c = int(win.row_off), int(win.col_off)
        assert kept.shape == (int(win.height), int(win.width)) and win.height <= tile and win.width <= tile
        written[r : r + kept.shape[0], c : c + kept.shape[1]] = kept

    assert windowed_remove_small_regions(m, grid, mmu, connectivity, tile=tile, write=write) is None
    np.testing.assert_array_equal(written, ref.astype(np.uint8))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=masks(), tile=st.integers(2, 12), connectivity=st.sampled_from([4, 8]),
       kind=st.sampled_from([UTM, GEO]), pick=st.floats(0, 1), side=st.sampled_from([-1, 1]))
def test_polygons_equal_reference(data, tile, connectivity, kind, pick, side):
    m, rng = data
    grid = _grid(kind, *m.shape)
    labels, n = label_regions(m, connectivity)
    areas = _region_areas(labels, n, grid)[1:]
    mmu = 0.0 if n == 0 else float(np.sort(areas)[int(pick * (n - 1))]) * (1 + side * 1e-6)
    prob = rng.random(m.shape).astype(np.float32)
    prob[rng.random(m.shape) < 0.1] = np.nan
    hb = (rng.random(m.shape) * 30).astype(np.float32)
    ha = (rng.random(m.shape) * 30).astype(np.float32)
    ha[rng.random(m.shape) < 0.1] = np.nan
    kw = dict(mmu_ha=mmu, connectivity=connectivity, date_before="2019", date_after="2021", prob=prob,
              height_before=hb, height_after=ha)
    ref = change_polygons(m, grid, **kw)
    got = windowed_change_polygons(m, grid, tile=tile, **kw)
    assert_same_polygons(ref, got)


def test_regions_spanning_many_tiles_and_corners():
    grid = _grid(UTM, 30, 30)
    m = np.zeros((30, 30), bool)
    m[2:28, 2] = m[2, 2:28] = m[27, 2:28] = m[8:28, 27] = True  # a frame...
    m[8, 8:28] = m[8:20, 8] = m[19, 8:20] = True  # ...and a spiral joined to it: one region over most tiles
    m[5, 13] = m[6, 14] = True  # diagonal pair across the column seam at 14 (tile 7, 14)
    m[13, 13] = m[14, 14] = True  # touching only at the corner of four tiles (tile 7, 14)
    m[20, 21] = m[21, 20] = True  # anti-diagonal pair at the corner of four tiles (tile 7)
    m[22:26, 12:16] = True
    m[23:25, 13:15] = False  # a ring of 12 px around a hole, cut by seams (tile 3: row 24, columns 12, 15)
    for tile in (1, 3, 7, 14):
        for conn in (4, 8):
            ref = change_polygons(m, grid, mmu_ha=0, connectivity=conn)
            got = windowed_change_polygons(m, grid, tile=tile, mmu_ha=0, connectivity=conn)
            assert_same_polygons(ref, got)
            np.testing.assert_array_equal(windowed_remove_small_regions(m, grid, 0.02, conn, tile=tile),
                                          remove_small_regions(m, grid, 0.02, conn))
    got8 = windowed_change_polygons(m, grid, tile=7, mmu_ha=0, connectivity=8)
    got4 = windowed_change_polygons(m, grid, tile=7, mmu_ha=0, connectivity=4)
    assert len(got8) == 5 and len(got4) == 8  # the three diagonal pairs split in 4-connectivity
    ring = got8[got8["n_pixels"] == 12].geometry.iloc[0]
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1  # the hole survives the dissolve
    assert got8["n_pixels"].iloc[0] == m.sum() - 12 - 6  # frame + spiral


def test_u_shape_pieces_in_one_tile():
    """A region whose two arms are separate labels in one tile, joined only in the next tile."""
    grid = _grid(UTM, 10, 6)
    m = np.zeros((10, 6), bool)
    m[0:8, 1] = m[0:8, 4] = True
    m[7, 1:5] = True  # the bottom joins the arms (rows 5..9 are the second tile row)
    for conn in (4, 8):
        scan = RegionScan(grid, 5, connectivity=conn, mmu_ha=0.15)  # 16 px = 0.16 ha: kept as a whole
        for w in scan.windows:
            scan.add(w, as_reader(m)(w))
        plan = scan.finish()
        assert plan.n_components == 1 and plan.component_area[0] == pytest.approx(0.18)
        got = windowed_remove_small_regions(m, grid, 0.15, conn, tile=5)
        np.testing.assert_array_equal(got, m)
        polys = windowed_change_polygons(m, grid, tile=5, mmu_ha=0.15, connectivity=conn)
        assert len(polys) == 1 and polys["n_pixels"].iloc[0] == 18
        assert polys.geometry.iloc[0].equals(change_polygons(m, grid, mmu_ha=0.15).geometry.iloc[0])
        # each arm alone is 0.05 ha < MMU in a single tile: only the global decision keeps them
        assert not remove_small_regions(m[:5], _grid(UTM, 5, 6), 0.15, conn).any()


def test_equal_areas_keep_the_reference_order():
    """Ties in area are ordered by each region's first pixel (raster scan), as in the reference."""
    grid = _grid(UTM, 24, 24)  # integer coordinates: equal shapes have exactly equal areas
    m = np.zeros((24, 24), bool)
    for r in range(0, 20, 5):
        for k, c in enumerate(range(1 + (r // 5) % 2, 22, 5)):
            rr = r + (k + 1) % 2  # staggered: a block to the right may start a row higher
            m[rr : rr + 2, c : c + 2] = True  # 2 x 2 blocks, some cut by tile edges, some not
    for tile in (3, 4, 5):
        ref = change_polygons(m, grid, mmu_ha=0)
        got = windowed_change_polygons(m, grid, tile=tile, mmu_ha=0)
        assert len(got) == len(ref) >= 16 and (got["n_pixels"] == 4).all()
        for a, b in zip(ref.geometry, got.geometry, strict=True):
            assert a.equals(b)


def test_reads_only_tiles_and_checks_order():
    grid = _grid(UTM, 20, 23)
    m = np.random.default_rng(3).random((20, 23)) < 0.4
    seen = []

    def read(w):
        seen.append((int(w.height), int(w.width)))
        return m[int(w.row_off) : int(w.row_off + w.height), int(w.col_off) : int(w.col_off + w.width)]

    windowed_change_polygons(read, grid, tile=6, mmu_ha=0.02, prob=np.ones((20, 23), np.float32))
    assert len(seen) == 2 * len(tile_windows(20, 23, 6)) and max(max(s) for s in seen) <= 6
    scan = RegionScan(grid, 6)
    with pytest.raises(ValueError, match="row-major"):
        scan.add(scan.windows[1], read(scan.windows[1]))
    for w in scan.windows:
        scan.add(w, read(w))
    plan = scan.finish()
    w0 = plan.windows[0]
    changed = read(w0).copy()
    changed[:, -1] = ~changed[:, -1]
    with pytest.raises(RuntimeError, match="must not change"):
        plan.resolve(w0, changed)
    with pytest.raises(ValueError, match="connectivity"):
        RegionScan(grid, 6, connectivity=6)
    with pytest.raises(ValueError, match="tile"):
        tile_windows(10, 10, 0)


def test_geographic_areas_per_row():
    """Per-row geodesic pixel areas: a region straddling tile rows sums the right rows' areas."""
    grid = _grid(GEO, 40, 12)
    m = np.zeros((40, 12), bool)
    m[3:37, 4:7] = True
    pa = pixel_area_ha(grid)[:, 0]
    assert pa[0] < pa[-1]  # northern hemisphere, north-up: pixels grow southwards
    exact = pa[3:37].sum() * 3
    for tile in (5, 9, 40):
        polys = windowed_change_polygons(m, grid, tile=tile, mmu_ha=0)
        assert polys["area_ha"].iloc[0] == pytest.approx(exact, rel=1e-6)
        mmu = exact * (1 + 1e-6)  # just above: the whole region goes, whatever the tiling
        assert not windowed_remove_small_regions(m, grid, mmu, tile=tile).any()
        assert windowed_remove_small_regions(m, grid, exact * (1 - 1e-6), tile=tile).sum() == m.sum()


# ---------------------------------------------------------------------- Otsu, streaming
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 3000), chunks=st.integers(1, 9),
       shape=st.floats(0.2, 4), bins=st.sampled_from([16, 256]))
def test_streaming_otsu_equals_in_memory(seed, n, chunks, shape, bins):
    rng = np.random.default_rng(seed)
    v = np.concatenate([rng.gamma(shape, size=n), 5 + rng.normal(size=n // 3)]).astype(np.float32)
    v[rng.random(v.shape) < 0.05] = np.nan
    mask = rng.random(v.shape) < 0.9
    cuts = np.sort(rng.integers(0, len(v), chunks - 1))
    parts = list(zip(np.split(v, cuts), np.split(mask, cuts), strict=True))
    try:
        ref = otsu_threshold(v, mask, bins=bins)
    except ValueError:
        with pytest.raises(ValueError):
            otsu_threshold_streaming(lambda: parts, bins=bins)
        return
    assert otsu_threshold_streaming(lambda: parts, bins=bins) == ref  # exactly, not approximately
    rng_ = ValueRange()
    for a, b in parts:
        rng_.add(a, b)
    h = ScoreHistogram(rng_.lo, rng_.hi, bins)
    for a, b in parts:
        h.add(a, b)
    assert h.otsu() == ref and h.counts.sum() == rng_.n == int((np.isfinite(v) & mask).sum())


def test_streaming_otsu_degenerate():
    with pytest.raises(ValueError, match="no finite"):
        otsu_threshold_streaming(lambda: [(np.full(5, np.nan), None)])
    with pytest.raises(ValueError, match="nothing to separate"):
        otsu_threshold_streaming(lambda: [(np.zeros(5), None), (np.zeros(3), None)])
    r = ValueRange()
    r.add(np.zeros(4))
    assert r.constant and r.n == 4
    with pytest.raises(ValueError, match="hi > lo"):
        ScoreHistogram(1.0, 1.0)


def test_aoi_summary_in_batches_equals_one_table():
    import geopandas as gpd

    from dinov3geo.tasks.change.polygons import AOISummary, aoi_summary

    grid = _grid(UTM, 30, 30)
    m = np.random.default_rng(5).random((30, 30)) < 0.35
    polys = change_polygons(m, grid, mmu_ha=0.02)
    aoi = gpd.GeoDataFrame({"name": ["a", "b"]}, geometry=[shapely.box(500000, 3999850, 500150, 4000000),
                                                           shapely.box(500100, 3999700, 500300, 3999900)],
                           crs=grid.crs).to_crs("EPSG:4326")
    ref = aoi_summary(polys, aoi)
    acc = AOISummary(aoi, polys.crs)
    for part in (polys.iloc[:3], polys.iloc[3:3], polys.iloc[3:]):
        acc.add(part)
    got = acc.table()
    assert list(got["aoi"]) == ["a", "b", "total"] and list(got["n_polygons"]) == list(ref["n_polygons"])
    assert got["n_polygons"].iloc[-1] == len(polys) > 3 and ref["loss_ha"].iloc[0] > 0
    np.testing.assert_allclose(got["loss_ha"], ref["loss_ha"], rtol=1e-12)
    np.testing.assert_allclose(got["aoi_area_ha"], ref["aoi_area_ha"], rtol=1e-12)
