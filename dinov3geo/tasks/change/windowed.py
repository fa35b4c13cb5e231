"""Regions, minimum mapping unit and polygons of a binary raster, tile by tile: memory bounded by the tile.

The in-memory reference (:func:`~dinov3geo.tasks.change.polygons.remove_small_regions`,
:func:`~dinov3geo.tasks.change.polygons.change_polygons`) labels the whole raster at once. Here the raster is
cut into ``tile x tile`` windows, visited in row-major order twice; each visit reads the tile's mask through a
callable (an array slice in tests, a raster window in :func:`~dinov3geo.tasks.change.detect.detect_change`),
so only one tile is in memory at a time.

**Pass 1** (:class:`RegionScan`): each tile is labelled on its own (``scipy.ndimage.label``, 4- or
8-connectivity) and the hectares of each local region are summed from the per-row pixel areas
(:func:`~dinov3geo.tasks.change.polygons.pixel_area_ha`: geodesic per row for geographic CRSs). A region that
does not touch an edge shared with another tile is complete: its MMU decision is local and nothing is kept.
A region that touches a shared edge gets a global id (ids are handed out in visiting order, so pass 2 can
hand them out again without storing them) and its area is kept. The ids along the last row of the previous
row of tiles and along the last column of the previous tile are kept as *frontiers* (one integer per pixel of
a grid row and of a tile column); the first row and column of the new tile are matched against them: the
same position for 4-connectivity, also the two diagonal neighbours for 8-connectivity (the diagonals reach
into the tiles above-left and above-right, so regions touching only at a tile corner join too). Each match is
an edge between two global ids. At the end (:meth:`RegionScan.finish`) the connected components of that
graph (``scipy.sparse.csgraph.connected_components``) are the regions cut by tile edges, their areas are
summed over their pieces and the MMU decides for each one: the decision is global, as in the reference.

**Pass 2** (:meth:`RegionPlan.resolve`): each tile is labelled again (the same mask gives the same labels and
ids; a tile whose edge regions differ from pass 1 raises), and every local region gets its decision: local
for interior regions, its component's for edge regions. :meth:`TileRegions.kept` is the tile of the filtered
mask (e.g. ``forest_loss.tif``, written window by window).

**Polygons** (:class:`PolygonBuilder`, in pass 2): the kept regions of each tile are polygonised with
``rasterio.features.shapes`` in *pixel coordinates of the grid* (tile offset added, integers: exact). A
region inside one tile is finished at once: its coordinates are mapped with the grid's transform by the
same formula GDAL applies (``x = c + a*col + b*row``, ``y = f + d*col + e*row``), so its polygon is the
reference's, coordinate for coordinate. The pieces of a region cut by tile edges wait (with their zonal sums)
until the last piece has been seen (the component's piece count is known from pass 1), are dissolved with
``shapely.union_all`` in pixel coordinates (shared edges match exactly), normalised and cleared of the
collinear vertices the seams leave (GDAL's polygons have vertices at corners only, which matters for
geodesic areas), then mapped to the CRS. Zonal statistics (``n_pixels``, ``mean_prob``, height drops) are
sums and counts per region, added over pieces; ties in area are ordered by the raster-scan position of each
region's first pixel, as in the reference. The table is built by
:func:`~dinov3geo.tasks.change.polygons.polygon_frame`, as in the reference.

Memory: one tile's arrays (a few bytes per pixel of the tile: mask, int32 labels, the zonal inputs), two
frontiers (8 bytes per pixel of a grid row and of a tile column), and for pass 1 about 30 bytes per region
touching a shared tile edge plus 16 bytes per seam match (regions near seams only: for a ``tile``-sized
tiling, about ``4 * H * W / tile`` pixels lie on seams); pass 2 holds the pieces of the regions still open.
The polygons found are kept until the end (the table is sorted by area), i.e. memory grows with the number
of output polygons, not with the grid.

Results equal the in-memory reference: the filtered mask bit for bit, the polygons the same set (geometries
equal; areas, counts and zonal statistics equal up to floating-point summation order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from rasterio.features import shapes
from rasterio.transform import Affine
from rasterio.windows import Window
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dinov3geo.io import GridSpec
from dinov3geo.tasks.change.polygons import label_regions, pixel_area_ha, polygon_frame

__all__ = [
    "DEFAULT_TILE",
    "PolygonBuilder",
    "RegionPlan",
    "RegionScan",
    "TileRegions",
    "as_reader",
    "tile_windows",
    "windowed_change_polygons",
    "windowed_remove_small_regions",
]

#: Default tile size (pixels) of the windowed post-processing: a 2048^2 tile takes ~100-150 MB of arrays.
DEFAULT_TILE = 2048

Reader = Callable[[Window], np.ndarray]


def tile_windows(height: int, width: int, tile: int) -> list[Window]:
    """``tile x tile`` windows covering a ``height x width`` grid, row-major (edge tiles are smaller)."""
    tile = int(tile)
    if tile < 1:
        raise ValueError(f"tile must be >= 1 pixel, got {tile}")
    return [Window(c, r, min(tile, width - c), min(tile, height - r))
            for r in range(0, height, tile) for c in range(0, width, tile)]


def as_reader(source: np.ndarray | Reader | None) -> Reader | None:
    """A window reader: callables are returned as they are, arrays ``[H, W]`` are sliced."""
    if source is None or callable(source):
        return source
    arr = np.asarray(source)

    def read(w: Window) -> np.ndarray:
        r, c = int(w.row_off), int(w.col_off)
        return arr[r : r + int(w.height), c : c + int(w.width)]

    return read


def _offsets(window: Window) -> tuple[int, int, int, int]:
    return int(window.row_off), int(window.col_off), int(window.height), int(window.width)


def _label_areas(labels: np.ndarray, n: int, row_area: np.ndarray) -> np.ndarray:
    """Hectares per label (index 0: background) from the per-row pixel areas of the tile."""
    weights = np.broadcast_to(row_area[:, None], labels.shape).ravel()
    return np.bincount(labels.ravel(), weights=weights, minlength=n + 1)


class _Tiling:
    """What both passes share: the grid, the tiles, the labelling and the edge regions of a tile."""

    def __init__(self, grid: GridSpec, tile: int, connectivity: int, mmu_ha: float,
                 pixel_area: np.ndarray | None) -> None:
        self.grid = grid
        self.height, self.width = grid.height, grid.width
        self.tile = int(tile)
        self.windows = tile_windows(self.height, self.width, self.tile)
        self.connectivity = connectivity
        self.mmu_ha = float(mmu_ha)
        self.threshold = mmu_ha * (1 - 1e-9) if mmu_ha > 0 else -math.inf  # 10 x 0.01 ha is not < 0.1 ha
        pa = pixel_area_ha(grid) if pixel_area is None else pixel_area
        self.row_area = np.asarray(pa, dtype=np.float64).reshape(-1)
        if self.row_area.shape != (self.height,):
            raise ValueError(f"pixel_area must hold one area per grid row ({self.height}), got {np.shape(pa)}")

    def _check(self, index: int, window: Window, mask: np.ndarray) -> np.ndarray:
        if index >= len(self.windows):
            raise RuntimeError(f"more tiles than the {len(self.windows)} of the tiling")
        want = self.windows[index]
        if _offsets(window) != _offsets(want):
            raise ValueError(f"tiles must come in row-major order: expected {want}, got {window}")
        m = np.asarray(mask, dtype=bool)
        if m.shape != (int(want.height), int(want.width)):
            raise ValueError(f"mask of tile {want} is {m.shape}, expected {(int(want.height), int(want.width))}")
        return m

    def _labels(self, window: Window, m: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        """Local labels, their count and the sorted labels touching an edge shared with another tile."""
        labels, n = label_regions(m, self.connectivity)
        r0, c0, h, w = _offsets(window)
        lines = []
        if r0 > 0:
            lines.append(labels[0])
        if r0 + h < self.height:
            lines.append(labels[-1])
        if c0 > 0:
            lines.append(labels[:, 0])
        if c0 + w < self.width:
            lines.append(labels[:, -1])
        if not lines or n == 0:
            return labels, n, np.zeros(0, dtype=np.int32)
        edge = np.unique(np.concatenate(lines))
        return labels, n, edge[edge > 0]


class RegionScan(_Tiling):
    """Pass 1: label tile by tile, join the regions cut by tile edges, decide the MMU globally.

    Feed every window of :attr:`windows` in order to :meth:`add`, then call :meth:`finish`.

    Args:
        grid: the raster's grid (size, CRS for pixel areas).
        tile: tile size in pixels.
        connectivity: 4 or 8.
        mmu_ha: minimum mapping unit in hectares (regions smaller are dropped; 0 keeps all).
        pixel_area: hectares of a pixel per grid row (default :func:`pixel_area_ha` of ``grid``).
    """

    def __init__(self, grid: GridSpec, tile: int = DEFAULT_TILE, *, connectivity: int = 8, mmu_ha: float = 0.1,
                 pixel_area: np.ndarray | None = None) -> None:
        label_regions(np.zeros((1, 1), bool), connectivity)  # checks the connectivity
        super().__init__(grid, tile, connectivity, mmu_ha, pixel_area)
        self._index = 0
        self._bases: list[int] = []
        self._counts: list[int] = []
        self._n = 0
        self._areas: list[np.ndarray] = []
        self._edges: list[np.ndarray] = []
        self._prev_row = np.zeros(self.width, dtype=np.int64)  # 1 + id along the last row of the tile row above
        self._cur_row = np.zeros(self.width, dtype=np.int64)
        self._left = np.zeros(0, dtype=np.int64)  # 1 + id along the last column of the previous tile

    def _matches(self, mine: np.ndarray, other: np.ndarray, shift: int) -> np.ndarray:
        """Edges between ``mine[k]`` and ``other[k + shift]`` (both 1 + id, 0 = none) as ``[2, m]`` ids."""
        k = np.arange(len(mine))
        j = k + shift
        ok = (j >= 0) & (j < len(other))
        a, b = mine[k[ok]], other[j[ok]]
        sel = (a > 0) & (b > 0)
        return np.stack([a[sel] - 1, b[sel] - 1])

    def add(self, window: Window, mask: np.ndarray) -> None:
        """Scan the next tile (``mask``: its ``[h, w]`` boolean values)."""
        m = self._check(self._index, window, mask)
        window = self.windows[self._index]
        self._index += 1
        labels, n, edge = self._labels(window, m)
        r0, c0, h, w = _offsets(window)
        base = self._n
        self._bases.append(base)
        self._counts.append(len(edge))
        self._n += len(edge)
        ids = np.zeros(n + 1, dtype=np.int64)  # 1 + global id of each local edge region, 0 otherwise
        ids[edge] = np.arange(base + 1, base + len(edge) + 1)
        if len(edge):
            self._areas.append(_label_areas(labels, n, self.row_area[r0 : r0 + h])[edge])
        shifts = (0,) if self.connectivity == 4 else (-1, 0, 1)
        found = []
        if r0 > 0 and len(edge):
            # the row above, from one column left of the tile to one column right (diagonal neighbours)
            lo, hi = max(c0 - 1, 0), min(c0 + w + 1, self.width)
            above = self._prev_row[lo:hi]
            top = ids[labels[0]]
            found += [self._matches(top, above, s + (c0 - lo)) for s in shifts]
        if c0 > 0 and len(edge):
            left = ids[labels[:, 0]]
            found += [self._matches(left, self._left, s) for s in shifts]
        found = [f for f in found if f.shape[1]]
        if found:
            e = np.unique(np.concatenate(found, axis=1), axis=1)
            self._edges.append(e)
        if r0 + h < self.height:
            self._cur_row[c0 : c0 + w] = ids[labels[-1]]
        self._left = ids[labels[:, -1]] if c0 + w < self.width else np.zeros(0, dtype=np.int64)
        if c0 + w == self.width:  # end of a row of tiles
            self._prev_row, self._cur_row = self._cur_row, self._prev_row

    def finish(self) -> RegionPlan:
        """The MMU decisions of the regions cut by tile edges (after every tile was added)."""
        if self._index != len(self.windows):
            raise RuntimeError(f"only {self._index} of {len(self.windows)} tiles were scanned")
        n = self._n
        area = np.concatenate(self._areas) if self._areas else np.zeros(0)
        if n:
            e = np.concatenate(self._edges, axis=1) if self._edges else np.zeros((2, 0), dtype=np.int64)
            graph = coo_matrix((np.ones(e.shape[1], dtype=np.int8), (e[0], e[1])), shape=(n, n))
            ncomp, comp = connected_components(graph, directed=False)
        else:
            ncomp, comp = 0, np.zeros(0, dtype=np.int32)
        comp_area = np.bincount(comp, weights=area, minlength=ncomp)
        pieces = np.bincount(comp, minlength=ncomp)
        self._edges, self._areas = [], []
        return RegionPlan(self.grid, self.tile, self.connectivity, self.mmu_ha, self.row_area,
                          self._bases, self._counts, comp.astype(np.int64), comp_area >= self.threshold,
                          pieces, comp_area)


@dataclass
class TileRegions:
    """The regions of one tile after :meth:`RegionPlan.resolve`.

    Attributes:
        window: the tile's window on the grid.
        labels: ``[h, w]`` int32 local labels (0 = background).
        n: number of local labels.
        keep: ``[n + 1]`` bool, the MMU decision of each local label (``keep[0]`` False).
        component: ``[n + 1]`` int64, the global component of labels touching a shared tile edge, -1 otherwise.
        pieces: ``[n + 1]`` int64, number of pieces (tile-local labels, over all tiles) of each label's region.
    """

    window: Window
    labels: np.ndarray
    n: int
    keep: np.ndarray
    component: np.ndarray
    pieces: np.ndarray

    def kept(self) -> np.ndarray:
        """``[h, w]`` bool: the tile's mask without the regions smaller than the MMU."""
        return self.keep[self.labels]


class RegionPlan(_Tiling):
    """Pass 2: the decisions of pass 1, to resolve every tile again in the same order (:meth:`resolve`).

    Made by :meth:`RegionScan.finish`. ``component_area`` holds the hectares of each region cut by tile edges.
    """

    def __init__(self, grid: GridSpec, tile: int, connectivity: int, mmu_ha: float, row_area: np.ndarray,
                 bases: list[int], counts: list[int], comp: np.ndarray, keep: np.ndarray, pieces: np.ndarray,
                 component_area: np.ndarray) -> None:
        super().__init__(grid, tile, connectivity, mmu_ha, row_area)
        self._bases, self._counts = bases, counts
        self._comp, self._keep, self._pieces = comp, keep, pieces
        self.component_area = component_area
        self._index = 0

    @property
    def n_components(self) -> int:
        """Number of regions cut by (or touching) shared tile edges."""
        return len(self._keep)

    def resolve(self, window: Window, mask: np.ndarray) -> TileRegions:
        """Label the next tile again and attach each region's MMU decision (tiles in row-major order)."""
        index = self._index
        m = self._check(index, window, mask)
        window = self.windows[index]
        self._index += 1
        labels, n, edge = self._labels(window, m)
        if len(edge) != self._counts[index]:
            raise RuntimeError(f"tile {window}: {len(edge)} edge regions now, {self._counts[index]} in pass 1; "
                               "the mask must not change between the passes")
        r0, _, h, _ = _offsets(window)
        keep = _label_areas(labels, n, self.row_area[r0 : r0 + h]) >= self.threshold
        keep[0] = False
        comp = np.full(n + 1, -1, dtype=np.int64)
        pieces = np.ones(n + 1, dtype=np.int64)
        if len(edge):
            c = self._comp[self._bases[index] : self._bases[index] + len(edge)]
            comp[edge] = c
            keep[edge] = self._keep[c]
            pieces[edge] = self._pieces[c]
        return TileRegions(window, labels, n, keep, comp, pieces)


# ---------------------------------------------------------------------- polygons
_N, _PS, _PC, _DS, _DC, _DM, _BS, _BC, _AS, _AC, _FIRST = range(11)
_NSTAT = 11


class PolygonBuilder:
    """Polygons and zonal statistics of the kept regions, tile by tile, dissolved across tile edges.

    Feed :meth:`add` the :class:`TileRegions` of every tile (pass 2, in order) with the tile's values, then
    :meth:`result` gives the table of :func:`~dinov3geo.tasks.change.polygons.change_polygons`.

    Args:
        grid: the raster's grid (CRS and transform of the polygons).
        connectivity: 4 or 8 (as for the regions).
        date_before, date_after: dates written to every feature.
        with_prob: add ``mean_prob`` (then pass ``prob`` to :meth:`add`).
        with_heights: add the height-drop columns (then pass ``height_before`` and ``height_after``).
    """

    def __init__(self, grid: GridSpec, *, connectivity: int = 8, date_before: str | None = None,
                 date_after: str | None = None, with_prob: bool = False, with_heights: bool = False) -> None:
        self.grid = grid
        self.connectivity = connectivity
        self.date_before, self.date_after = date_before, date_after
        self.with_prob, self.with_heights = with_prob, with_heights
        self._geoms: list[Any] = []
        self._stats: list[np.ndarray] = []
        self._pending: dict[int, tuple[list[Any], np.ndarray, list[int]]] = {}

    @property
    def n_open(self) -> int:
        """Regions cut by tile edges whose pieces have not all been seen yet."""
        return len(self._pending)

    def _to_crs(self, geom: Any) -> Any:
        t = self.grid.transform

        def f(xy: np.ndarray) -> np.ndarray:
            x, y = xy[:, 0], xy[:, 1]
            return np.column_stack([t.c + t.a * x + t.b * y, t.f + t.d * x + t.e * y])

        g = shapely.transform(geom, f)
        return g if g.is_valid else shapely.make_valid(g)

    def _tile_stats(self, tr: TileRegions, lk: np.ndarray, k: int, prob: np.ndarray | None,
                    hb: np.ndarray | None, ha: np.ndarray | None) -> np.ndarray:
        st = np.zeros((k + 1, _NSTAT), dtype=np.float64)
        at = np.flatnonzero(lk)  # the kept pixels only (usually a small part of the tile)
        lab = lk.ravel()[at]
        st[:, _N] = np.bincount(lab, minlength=k + 1)

        def sums(v: np.ndarray, s: int, c: int) -> tuple[np.ndarray, np.ndarray]:
            ok = np.isfinite(v)
            st[:, s] = np.bincount(lab[ok], weights=v[ok], minlength=k + 1)
            st[:, c] = np.bincount(lab[ok], minlength=k + 1)
            return v, ok

        def values(x: np.ndarray) -> np.ndarray:
            return np.asarray(x).ravel()[at].astype(np.float64)

        if self.with_prob:
            if prob is None:
                raise ValueError("with_prob=True needs prob for every tile")
            sums(values(prob), _PS, _PC)
        if self.with_heights:
            if hb is None or ha is None:
                raise ValueError("with_heights=True needs height_before and height_after for every tile")
            b64, a64 = values(hb), values(ha)
            d, ok = sums(b64 - a64, _DS, _DC)
            mx = np.full(k + 1, -np.inf)
            np.maximum.at(mx, lab[ok], d[ok])
            st[:, _DM] = mx
            sums(b64, _BS, _BC)
            sums(a64, _AS, _AC)
        # raster-scan position of each region's first pixel (ties in area keep this order, as the reference)
        r0, c0, _, _ = _offsets(tr.window)
        st[0, _FIRST] = math.inf
        for j, sl in enumerate(ndimage.find_objects(lk, max_label=k), start=1):
            row = sl[0].start
            col = sl[1].start + int(np.argmax(lk[row, sl[1]] == j))
            st[j, _FIRST] = (r0 + row) * self.grid.width + (c0 + col)
        return st

    def add(self, tr: TileRegions, prob: np.ndarray | None = None, height_before: np.ndarray | None = None,
            height_after: np.ndarray | None = None) -> None:
        """Polygonise the kept regions of a tile; finish those complete, keep pieces of the others."""
        kept = np.nonzero(tr.keep)[0]
        k = len(kept)
        if not k:
            return
        remap = np.zeros(tr.n + 1, dtype=np.int32)
        remap[kept] = np.arange(1, k + 1, dtype=np.int32)
        lk = remap[tr.labels]
        st = self._tile_stats(tr, lk, k, prob, height_before, height_after)
        r0, c0, _, _ = _offsets(tr.window)
        geoms: dict[int, Any] = {}
        for geom, val in shapes(lk, mask=lk > 0, connectivity=self.connectivity,
                                transform=Affine(1, 0, c0, 0, 1, r0)):
            g = shapely.geometry.shape(geom)
            j = int(val)
            geoms[j] = g if j not in geoms else shapely.union(geoms[j], g)
        for j, lab in enumerate(kept, start=1):
            comp, pieces = int(tr.component[lab]), int(tr.pieces[lab])
            if comp < 0 or pieces == 1:
                self._emit(self._to_crs(geoms[j]), st[j])
                continue
            parts, acc, left = self._pending.setdefault(comp, ([], np.zeros(_NSTAT), [pieces]))
            if not parts:
                acc[:] = st[j]
            else:
                acc[:] = _combine(acc, st[j])
            parts.append(geoms[j])
            left[0] -= 1
            if left[0] == 0:
                del self._pending[comp]
                merged = shapely.union_all(parts)
                merged = shapely.simplify(shapely.normalize(merged), 0, preserve_topology=False)  # seam vertices
                self._emit(self._to_crs(merged), acc)

    def _emit(self, geom: Any, stats: np.ndarray) -> None:
        self._geoms.append(geom)
        self._stats.append(np.array(stats, dtype=np.float64))

    def result(self, mmu_ha: float = 0.1) -> gpd.GeoDataFrame:
        """The polygon table (see :func:`~dinov3geo.tasks.change.polygons.change_polygons`)."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} regions cut by tile edges still miss pieces; add every tile")
        st = np.array(self._stats, dtype=np.float64).reshape(-1, _NSTAT)
        order = np.argsort(st[:, _FIRST], kind="stable")
        st = st[order]
        geoms = [self._geoms[i] for i in order]

        def mean(s: int, c: int) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(st[:, c] > 0, st[:, s] / np.maximum(st[:, c], 1), np.nan)

        cols: dict[str, Any] = {"n_pixels": st[:, _N].astype(np.int64)}
        if self.with_prob:
            cols["mean_prob"] = mean(_PS, _PC)
        if self.with_heights:
            cols["mean_height_drop"] = mean(_DS, _DC)
            mx = st[:, _DM].copy()
            mx[~np.isfinite(mx)] = np.nan
            cols["max_height_drop"] = mx
            cols["mean_height_before"] = mean(_BS, _BC)
            cols["mean_height_after"] = mean(_AS, _AC)
        return polygon_frame(geoms, cols, self.grid.crs, mmu_ha=mmu_ha, date_before=self.date_before,
                             date_after=self.date_after)


def _combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = a + b
    out[_DM] = max(a[_DM], b[_DM])
    out[_FIRST] = min(a[_FIRST], b[_FIRST])
    return out


# ---------------------------------------------------------------------- conveniences
def _two_passes(read_mask: Reader, grid: GridSpec, tile: int, connectivity: int, mmu_ha: float,
                pixel_area: np.ndarray | None) -> Iterator[TileRegions]:
    scan = RegionScan(grid, tile, connectivity=connectivity, mmu_ha=mmu_ha, pixel_area=pixel_area)
    for w in scan.windows:
        scan.add(w, read_mask(w))
    plan = scan.finish()
    for w in plan.windows:
        yield plan.resolve(w, read_mask(w))


def windowed_remove_small_regions(
    mask: np.ndarray | Reader,
    grid: GridSpec,
    mmu_ha: float,
    connectivity: int = 8,
    *,
    tile: int = DEFAULT_TILE,
    write: Callable[[Window, np.ndarray], None] | None = None,
    pixel_area: np.ndarray | None = None,
) -> np.ndarray | None:
    """:func:`~dinov3geo.tasks.change.polygons.remove_small_regions` tile by tile (equal to it bit for bit).

    Args:
        mask: the ``[H, W]`` mask, or a reader ``window -> [h, w] bool`` (called twice per tile).
        grid, mmu_ha, connectivity: as for the reference.
        tile: tile size in pixels.
        write: called with ``(window, kept [h, w] bool)`` for every tile; None assembles and returns the
            whole filtered mask (for small rasters and tests).
        pixel_area: hectares of a pixel per grid row (default from ``grid``).
    """
    read = as_reader(mask)
    assert read is not None
    out = None if write is not None else np.zeros(grid.shape, dtype=bool)
    for tr in _two_passes(read, grid, tile, connectivity, mmu_ha, pixel_area):
        k = tr.kept()
        if write is not None:
            write(tr.window, k)
        else:
            r0, c0, h, w = _offsets(tr.window)
            out[r0 : r0 + h, c0 : c0 + w] = k
    return out


def windowed_change_polygons(
    mask: np.ndarray | Reader,
    grid: GridSpec,
    *,
    tile: int = DEFAULT_TILE,
    mmu_ha: float = 0.1,
    connectivity: int = 8,
    date_before: str | None = None,
    date_after: str | None = None,
    prob: np.ndarray | Reader | None = None,
    height_before: np.ndarray | Reader | None = None,
    height_after: np.ndarray | Reader | None = None,
    pixel_area: np.ndarray | None = None,
) -> gpd.GeoDataFrame:
    """:func:`~dinov3geo.tasks.change.polygons.change_polygons` tile by tile (see the module docstring).

    Every raster argument is an ``[H, W]`` array or a reader ``window -> [h, w]`` array.
    """
    read = as_reader(mask)
    assert read is not None
    rp, rb, ra = as_reader(prob), as_reader(height_before), as_reader(height_after)
    heights = rb is not None and ra is not None
    pb = PolygonBuilder(grid, connectivity=connectivity, date_before=date_before, date_after=date_after,
                        with_prob=rp is not None, with_heights=heights)
    for tr in _two_passes(read, grid, tile, connectivity, mmu_ha, pixel_area):
        w = tr.window
        pb.add(tr, prob=rp(w) if rp is not None else None, height_before=rb(w) if heights else None,
               height_after=ra(w) if heights else None)
    return pb.result(mmu_ha)
