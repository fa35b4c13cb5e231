"""A georeferenced pixel grid: CRS + affine transform + shape, travelling as one typed record."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from affine import Affine
from rasterio.crs import CRS
from rasterio.transform import array_bounds
from rasterio.transform import from_origin as _from_origin
from rasterio.windows import Window


@dataclass(frozen=True)
class GridSpec:
    """A north-up (or any affine) raster grid.

    Attributes:
        crs: coordinate reference system of the grid.
        transform: affine transform from pixel (col, row) to CRS (x, y) of the pixel's upper-left corner.
        width: number of columns.
        height: number of rows.
    """

    crs: CRS
    transform: Affine
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"grid must have a positive size, got {self.width}x{self.height}")
        if not isinstance(self.crs, CRS):
            object.__setattr__(self, "crs", CRS.from_user_input(self.crs))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bounds(
        cls, left: float, bottom: float, right: float, top: float, res: float | tuple[float, float], crs: Any
    ) -> GridSpec:
        """Grid covering ``bounds`` at resolution ``res`` (the far edges are rounded up to whole pixels)."""
        rx, ry = (res, res) if isinstance(res, int | float) else res
        width = max(1, math.ceil((right - left) / rx - 1e-9))
        height = max(1, math.ceil((top - bottom) / ry - 1e-9))
        return cls(CRS.from_user_input(crs), _from_origin(left, top, rx, ry), width, height)

    @classmethod
    def from_dataset(cls, ds: Any) -> GridSpec:
        """Grid of an open rasterio dataset (its CRS may be None: use :func:`require_crs` first)."""
        return cls(ds.crs, ds.transform, ds.width, ds.height)

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units, both positive for north-up grids."""
        t = self.transform
        return (math.hypot(t.a, t.d), math.hypot(t.b, t.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return (west, south, east, north)

    def window_transform(self, window: Window) -> Affine:
        """Transform of a (possibly off-grid, boundless) window of this grid."""
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def window_grid(self, window: Window) -> GridSpec:
        """The sub-grid of ``window`` (may extend beyond this grid)."""
        return GridSpec(self.crs, self.window_transform(window), int(window.width), int(window.height))

    def scaled(self, factor: int) -> GridSpec:
        """A coarser grid with pixels ``factor`` times larger (e.g. the 16 px patch grid of a ViT)."""
        return GridSpec(
            self.crs,
            self.transform @ Affine.scale(factor),
            max(1, math.ceil(self.width / factor)),
            max(1, math.ceil(self.height / factor)),
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (CRS as WKT, transform as 6 GDAL-order numbers)."""
        return {
            "crs": self.crs.to_wkt(),
            "transform": list(self.transform)[:6],
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(CRS.from_user_input(d["crs"]), Affine(*d["transform"][:6]), int(d["width"]), int(d["height"]))

    def same_as(self, other: GridSpec, tol: float = 1e-9) -> bool:
        """True when both grids have the same CRS, shape and (within ``tol`` pixels) the same transform."""
        if self.shape != other.shape or self.crs != other.crs:
            return False
        rx, ry = self.res
        scale = max(rx, ry, 1e-300)
        return all(abs(a - b) <= tol * scale for a, b in zip(self.transform, other.transform, strict=True))
