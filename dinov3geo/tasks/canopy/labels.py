"""Canopy-height labels: put a CHM raster of any CRS/resolution onto an image grid, with a valid mask.

Alignment always goes through the georeferencing (``rasterio.warp.reproject`` from the CHM's transform/CRS to
the target grid's), never through pixel indices: NEON's BART camera mosaic and CHM origins differ by
decimetres (320214.8/4881614.5 vs 320214/4881615), so a pixel-index crop would shift the labels.

Resampling (chosen by :func:`chm_resampling` unless given):

* target pixels finer than (or as fine as) the CHM's, e.g. a 1 m lidar CHM onto a 0.5 m or 0.1 m image
  grid: **bilinear** (heights are continuous; nearest would produce 1 m staircases);
* target pixels coarser than the CHM's, e.g. a 0.5 m drone CHM onto a 1 m grid: **average** (the mean height of
  the covered cells, what a coarser sensor sees).

Nodata: the CHM's declared nodata (compared in the file's own dtype, so Kootenay's float64 ``-1.7e308`` works;
it is not representable in float32), NaN and +-inf, and an optional user ``nodata`` are invalid. Invalid
source cells are set to NaN before warping and the warp treats NaN as nodata, so they never leak into
neighbouring target pixels; a target pixel is valid when the warp gives it a finite value.
Negative heights (lidar noise below the ground model) are clipped to 0 by default (as Tolan et al. 2024,
``chm[chm < 0] = 0``), or flagged invalid with ``negative="invalid"``, or kept with ``negative="keep"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from dinov3geo.io.errors import MissingCRSError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import GDAL_ENV, open_raster, target_grid
from dinov3geo.io.sources import open_scene

__all__ = [
    "AlignedCHM",
    "CHMAligner",
    "ImageCHMPair",
    "NoOverlapError",
    "align_chm",
    "chm_resampling",
    "load_image_and_chm",
]

NegativePolicy = Literal["clip", "invalid", "keep"]


class NoOverlapError(ValueError):
    """The label raster and the target grid do not overlap."""


@dataclass(frozen=True)
class AlignedCHM:
    """Canopy heights on a target grid.

    Attributes:
        heights: ``[H, W]`` float32 metres; invalid pixels are NaN.
        valid: ``[H, W]`` bool.
        grid: the target grid.
        resampling: resampling that was used.
    """

    heights: np.ndarray
    valid: np.ndarray
    grid: GridSpec
    resampling: str


@dataclass(frozen=True)
class ImageCHMPair:
    """An image and its canopy-height labels on one common grid.

    Attributes:
        image: ``[C, H, W]`` float32 image values (invalid pixels 0).
        heights: ``[H, W]`` float32 metres (NaN where the label is invalid).
        valid: ``[H, W]`` bool, True where both image and label are valid.
        grid: the common grid.
        band_names: image band names.
        info: provenance (paths, resolutions, resamplings, valid counts).
    """

    image: np.ndarray
    heights: np.ndarray
    valid: np.ndarray
    grid: GridSpec
    band_names: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)


def chm_resampling(src_res: float, dst_res: float) -> str:
    """``"average"`` when the target pixels are coarser than the CHM's (> 1.01x), else ``"bilinear"``."""
    return "average" if dst_res > 1.01 * src_res else "bilinear"


def _bounds_str(b: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"


class CHMAligner:
    """A CHM raster kept open to read it onto any target grid (window by window for big regions).

    Args:
        path: CHM raster (any GDAL format, any CRS and resolution).
        band: 1-based band index of the heights.
        nodata: nodata value overriding/adding to the declared one.
        negative: ``"clip"`` (to 0), ``"invalid"`` or ``"keep"`` negative heights.
        resampling: force a resampling (``"bilinear"``, ``"average"``, ``"nearest"``, ...); None chooses with
            :func:`chm_resampling` per target grid.
        assume_crs: CRS to use when the file has none (otherwise such a file is refused).

    Use as a context manager; :meth:`read` returns an :class:`AlignedCHM`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        band: int = 1,
        nodata: float | None = None,
        negative: NegativePolicy = "clip",
        resampling: str | None = None,
        assume_crs: Any = None,
    ) -> None:
        if negative not in ("clip", "invalid", "keep"):
            raise ValueError(f"negative must be 'clip', 'invalid' or 'keep', got {negative!r}")
        self.path = os.fspath(path)
        self.band = int(band)
        self.nodata = nodata
        self.negative = negative
        self.resampling = resampling
        with rasterio.Env(**GDAL_ENV):
            self._ds = open_raster(self.path)
        try:
            if not 1 <= self.band <= self._ds.count:
                raise ValueError(
                    f"band {self.band} not found in {self.path!r}, which has {self._ds.count} band(s); "
                    "give the 1-based index of the height band"
                )
            crs = self._ds.crs
            if crs is None:
                if assume_crs is None:
                    raise MissingCRSError(
                        self.path, hint="Pass assume_crs='EPSG:xxxx' (CLI: --truth-crs) if you know its CRS."
                    )
                crs = CRS.from_user_input(assume_crs)
            self.crs = CRS.from_user_input(crs)
            t = self._ds.transform
            if t.is_identity and self._ds.crs is None:
                raise MissingCRSError(self.path, hint="It has no geotransform either: georeference it first.")
            self.transform = t
            self.src_res = float(min(abs(t.a) or abs(t.b), abs(t.e) or abs(t.d)))
            self.bounds = tuple(self._ds.bounds)
        except Exception:
            self.close()
            raise

    def __enter__(self) -> CHMAligner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        ds = getattr(self, "_ds", None)
        if ds is not None and not ds.closed:
            ds.close()

    def overlaps(self, grid: GridSpec) -> bool:
        """Whether ``grid`` overlaps the CHM footprint."""
        left, bottom, right, top = transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
        cl, cb, cr, ct = self.bounds
        return left < cr and right > cl and bottom < ct and top > cb

    def check_overlap(self, grid: GridSpec, what: str = "the image grid") -> None:
        """Raise :class:`NoOverlapError` naming both bounds when ``grid`` misses the CHM."""
        if not self.overlaps(grid):
            gb = transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
            raise NoOverlapError(
                f"the canopy-height raster {self.path!r} does not overlap {what}: CHM bounds "
                f"{_bounds_str(self.bounds)} vs {what} bounds {_bounds_str(gb)} (both in {self.crs.to_string()}). "
                "Check that the two files cover the same place and that their CRSs are declared correctly."
            )

    def _source_window(self, grid: GridSpec) -> Window | None:
        """Window of the CHM covering ``grid`` plus a 2-cell margin (None: no overlap)."""
        t = self.transform
        if t.b != 0 or t.d != 0:  # rotated source: read it whole
            return Window(0, 0, self._ds.width, self._ds.height)
        if not self.overlaps(grid):
            return None
        gb = transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
        w = from_bounds(*gb, transform=t)
        c0 = int(np.floor(w.col_off)) - 2
        r0 = int(np.floor(w.row_off)) - 2
        c1 = int(np.ceil(w.col_off + w.width)) + 2
        r1 = int(np.ceil(w.row_off + w.height)) + 2
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, self._ds.width), min(r1, self._ds.height)
        if c1 <= c0 or r1 <= r0:
            return None
        return Window(c0, r0, c1 - c0, r1 - r0)

    def read(self, grid: GridSpec, resampling: str | None = None) -> AlignedCHM:
        """The CHM on ``grid`` (outside the CHM footprint: invalid, NaN)."""
        rs = resampling or self.resampling or chm_resampling(self.src_res, min(grid.res))
        heights = np.full(grid.shape, np.nan, dtype=np.float32)
        win = self._source_window(grid)
        if win is not None:
            src = self._ds.read(self.band, window=win)
            bad = ~np.isfinite(src) if np.issubdtype(src.dtype, np.floating) else np.zeros(src.shape, bool)
            for nd in (self._ds.nodatavals[self.band - 1], self.nodata):
                if nd is None:
                    continue
                if np.isnan(nd):
                    bad |= np.isnan(src.astype(np.float64))
                else:
                    bad |= src == np.asarray(nd).astype(src.dtype)
            mask = self._ds.read_masks(self.band, window=win) if self._has_mask() else None
            if mask is not None:
                bad |= mask == 0
            values = src.astype(np.float64)
            values[bad] = np.nan
            if self.negative == "clip":
                values[values < 0] = 0.0
            elif self.negative == "invalid":
                values[values < 0] = np.nan
            reproject(
                values,
                heights,
                src_transform=self._ds.window_transform(win),
                src_crs=self.crs,
                src_nodata=np.nan,
                dst_transform=grid.transform,
                dst_crs=grid.crs,
                dst_nodata=np.nan,
                resampling=Resampling[rs],
            )
        valid = np.isfinite(heights)
        heights[~valid] = np.nan
        return AlignedCHM(heights, valid, grid, rs)

    def _has_mask(self) -> bool:
        flags = self._ds.mask_flag_enums[self.band - 1]
        return not any(f.name in ("all_valid", "nodata") for f in flags)


def align_chm(
    chm: str | os.PathLike[str],
    grid: GridSpec,
    *,
    band: int = 1,
    nodata: float | None = None,
    negative: NegativePolicy = "clip",
    resampling: str | None = None,
    assume_crs: Any = None,
) -> AlignedCHM:
    """Read the CHM raster ``chm`` onto ``grid`` (see the module docstring for resampling and nodata).

    Raises:
        NoOverlapError: the CHM does not overlap ``grid`` (the message gives both bounds).
        MissingCRSError: the CHM has no CRS and ``assume_crs`` is not given.
        RasterReadError: the file cannot be opened.
    """
    with CHMAligner(
        chm, band=band, nodata=nodata, negative=negative, resampling=resampling, assume_crs=assume_crs
    ) as al:
        al.check_overlap(grid)
        return al.read(grid)


def load_image_and_chm(
    image: Any,
    chm: str | os.PathLike[str],
    *,
    target_res: float | None = None,
    bands: Sequence[str | int] | None = None,
    grid: GridSpec | None = None,
    image_resampling: str | None = None,
    chm_band: int = 1,
    negative: NegativePolicy = "clip",
    chm_resampling_method: str | None = None,
    assume_crs: Any = None,
) -> ImageCHMPair:
    """Read an image and its CHM on one common grid.

    The grid is ``grid`` when given; else the image's own grid, or (with ``target_res``) the image extent at
    ``target_res`` in the image CRS (e.g. 0.5 m: a 0.1 m image is averaged, a 1 m CHM bilinearly interpolated).

    Args:
        image: anything :func:`dinov3geo.io.open_scene` opens (file, band folder, STAC item).
        chm: canopy-height raster (any CRS/resolution).
        target_res: working resolution in image-CRS units.
        bands: image bands to keep (names or 1-based indices).
        grid: explicit common grid (overrides ``target_res``).
        image_resampling: resampling of the image when it is not on the grid (default: ``average`` when
            downsampling, ``bilinear`` otherwise).
        chm_band, negative, chm_resampling_method, assume_crs: see :class:`CHMAligner`.

    Returns:
        an :class:`ImageCHMPair`; ``valid`` is image-valid AND label-valid.

    Raises:
        NoOverlapError: image and CHM do not overlap.
    """
    scene = open_scene(image, bands=bands, crs=assume_crs)
    img_res = min(scene.grid.res)
    if grid is None:
        grid = scene.grid if target_res is None else target_grid(scene.grid, res=target_res)
    irs = image_resampling or ("average" if min(grid.res) > 1.01 * img_res else "bilinear")
    on_own_grid = grid.same_as(scene.grid)
    if not on_own_grid:
        scene = scene.with_grid(grid, irs)
    with CHMAligner(
        chm, band=chm_band, negative=negative, resampling=chm_resampling_method, assume_crs=assume_crs
    ) as al:
        al.check_overlap(grid, what=f"the image {str(image)!r}")
        lab = al.read(grid)
        chm_res = al.src_res
    chip = scene.read()
    valid = chip.valid & lab.valid
    info = {
        "image": str(image),
        "chm": os.fspath(chm),
        "grid_res": list(grid.res),
        "crs": grid.crs.to_string(),
        "shape": list(grid.shape),
        "image_res": img_res,
        "chm_res": chm_res,
        "image_resampling": None if on_own_grid else irs,
        "chm_resampling": lab.resampling,
        "n_valid": int(valid.sum()),
        "n_label_valid": int(lab.valid.sum()),
        "n_image_valid": int(chip.valid.sum()),
    }
    return ImageCHMPair(chip.data.astype(np.float32, copy=False), lab.heights, valid, grid, chip.band_names, info)
