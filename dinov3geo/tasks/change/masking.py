"""Cloud and nodata masks for change detection: masked pixels are nodata in every output and never change.

Three kinds of evidence, combined with AND into one *clear* mask (True = usable):

* nodata / NaN of either date (already part of every :class:`~dinov3geo.io.Chip` valid mask);
* a Sentinel-2 L2A scene classification layer (SCL) when one is given: classes 0 (no data), 1 (saturated or
  defective), 3 (cloud shadow), 8 (cloud, medium probability), 9 (cloud, high probability) and 10 (thin
  cirrus) are masked by default (:data:`SCL_MASKED`); the SCL (20 m) is read on the image grid with nearest
  resampling;
* optionally, a simple brightness/whiteness cloud test (:func:`bright_cloud_mask`) for imagery without a cloud
  mask: bright and spectrally flat (white) pixels are flagged. It is crude (bright roofs, sand and snow are
  flagged too); prefer a real cloud mask when there is one.

:class:`MaskedSource` applies a :class:`CloudMasker` to an inference-engine source window by window, so the masks
work on rasters of any size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rasterio.windows import Window

from dinov3geo.inference.sources import RasterSource, WindowReader
from dinov3geo.io import GridSpec, Scene, open_scene

__all__ = [
    "SCL_CLASSES",
    "SCL_MASKED",
    "CloudMasker",
    "MaskedSource",
    "bright_cloud_mask",
    "nodata_mask",
    "scl_clear_mask",
]

#: Sentinel-2 L2A scene classification (Sen2Cor) classes.
SCL_CLASSES: dict[int, str] = {
    0: "no_data", 1: "saturated_or_defective", 2: "dark_area_pixels", 3: "cloud_shadows", 4: "vegetation",
    5: "not_vegetated", 6: "water", 7: "unclassified", 8: "cloud_medium_probability",
    9: "cloud_high_probability", 10: "thin_cirrus", 11: "snow",
}
#: SCL classes masked by default: no data, saturated/defective, cloud shadow, clouds, thin cirrus.
SCL_MASKED: tuple[int, ...] = (0, 1, 3, 8, 9, 10)

_VISIBLE = ("blue", "green", "red")


def nodata_mask(data: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """``[H, W]`` True where every band of ``data`` (``[C, H, W]``) is finite and not ``nodata``."""
    d = np.asarray(data)
    d = d[None] if d.ndim == 2 else d
    ok = np.ones(d.shape[1:], dtype=bool)
    if np.issubdtype(d.dtype, np.floating):
        ok &= np.all(np.isfinite(d), axis=0)
    if nodata is not None and not np.isnan(nodata):
        ok &= ~np.any(d == nodata, axis=0)
    return ok


def scl_clear_mask(scl: np.ndarray, masked: Sequence[int] = SCL_MASKED) -> np.ndarray:
    """True where the SCL class is not in ``masked`` (see :data:`SCL_CLASSES`)."""
    bad = [int(c) for c in masked]
    unknown = [c for c in bad if c not in SCL_CLASSES]
    if unknown:
        raise ValueError(f"unknown SCL classes {unknown}; valid classes are {sorted(SCL_CLASSES)}")
    return ~np.isin(np.asarray(scl), bad)


def bright_cloud_mask(
    data: np.ndarray,
    band_names: Sequence[str],
    *,
    value_scale: float,
    brightness: float = 0.3,
    whiteness: float = 0.7,
) -> np.ndarray:
    """Bright, white (spectrally flat) pixels: a crude cloud test for imagery without a cloud mask.

    A pixel is flagged when the mean of the visible bands (blue, green, red, or all bands when those are not
    named) exceeds ``brightness`` (reflectance, after ``value_scale``) and the Fmask-style whiteness
    ``sum(|b - mean|) / mean`` over those bands is below ``whiteness``.

    Args:
        data: ``[C, H, W]`` raw values.
        band_names: names of the ``C`` bands.
        value_scale: factor to reflectance in ``[0, 1]`` (``1/255`` for 8-bit, ``1e-4`` for Sentinel-2 DN).

    Returns:
        ``[H, W]`` bool, True = cloud.
    """
    names = [n.lower() for n in band_names]
    idx = [names.index(v) for v in _VISIBLE if v in names]
    if len(idx) < 2:
        idx = list(range(len(names)))
    vis = np.asarray(data, dtype=np.float32)[idx] * np.float32(value_scale)
    mean = vis.mean(axis=0)
    white = np.abs(vis - mean).sum(axis=0) / np.maximum(mean, 1e-6)
    return (mean > brightness) & (white < whiteness)


@dataclass
class CloudMasker:
    """How to mask one date window by window (see the module docstring).

    Attributes:
        scl: a Sentinel-2 SCL raster (path or :class:`~dinov3geo.io.Scene`) for this date, or None.
        scl_masked: SCL classes to mask.
        bright_test: apply :func:`bright_cloud_mask`.
        value_scale: reflectance scale for the bright test (None: ``1/255`` for 8-bit data, else ``1e-4``).
        brightness, whiteness: thresholds of the bright test.
        assume_crs: CRS for an SCL file without one.
    """

    scl: Any = None
    scl_masked: Sequence[int] = SCL_MASKED
    bright_test: bool = False
    value_scale: float | None = None
    brightness: float = 0.3
    whiteness: float = 0.7
    assume_crs: Any = None
    _scl_scene: Scene | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        scl_clear_mask(np.zeros(1, np.uint8), self.scl_masked)  # validates the classes
        if self.scl is not None:
            s = self.scl if isinstance(self.scl, Scene) else open_scene(self.scl, crs=self.assume_crs)
            if len(s.bands) != 1:
                raise ValueError(f"SCL raster {self.scl!r} has {len(s.bands)} bands; expected the single-band "
                                 "Sentinel-2 scene classification layer")
            self._scl_scene = s

    @property
    def active(self) -> bool:
        return self._scl_scene is not None or self.bright_test

    def scl_on(self, grid: GridSpec) -> Scene | None:
        """The SCL scene read on ``grid`` (nearest resampling), or None."""
        if self._scl_scene is None:
            return None
        return self._scl_scene.with_grid(grid, "nearest")

    def clear(self, data: np.ndarray, band_names: Sequence[str], dtype: str, scl: np.ndarray | None = None,
              scl_valid: np.ndarray | None = None) -> np.ndarray:
        """``[H, W]`` True where the pixel is not cloud/shadow (nodata is handled by the source itself)."""
        ok = np.ones(data.shape[1:], dtype=bool)
        if scl is not None:
            ok &= scl_clear_mask(scl, self.scl_masked)
            if scl_valid is not None:
                ok &= scl_valid
        if self.bright_test:
            vs = self.value_scale
            if vs is None:
                vs = 1 / 255 if np.dtype(dtype) == np.uint8 else 1e-4
            ok &= ~bright_cloud_mask(data, band_names, value_scale=vs, brightness=self.brightness,
                                     whiteness=self.whiteness)
        return ok


class _MaskedReader(WindowReader):
    def __init__(self, src: MaskedSource) -> None:
        self.src = src
        self._inner = src.inner.reader()
        scl = src.masker.scl_on(src.grid)
        self._scl = scl.reader() if scl is not None else None
        if self._scl is not None:
            self._scl.open()

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        data, valid = self._inner.read(window)
        scl = sv = None
        if self._scl is not None:
            chip = self._scl.read(window, fill=0)
            scl, sv = chip.data[0], chip.valid
        clear = self.src.masker.clear(data, self.src.band_names, self.src.dtype, scl, sv)
        self.src.count_masked(int((valid & ~clear).sum()))
        return data, valid & clear

    def close(self) -> None:
        self._inner.close()
        if self._scl is not None:
            self._scl.close()


class MaskedSource(RasterSource):
    """An inference-engine source with clouds/shadows (per a :class:`CloudMasker`) marked invalid.

    Args:
        inner: the source (e.g. one date of a :class:`~dinov3geo.tasks.change.coregister.CoregisteredPair`).
        masker: the masking rules for this date.
    """

    def __init__(self, inner: RasterSource, masker: CloudMasker) -> None:
        self.inner = inner
        self.masker = masker
        self.grid = inner.grid
        self.band_names = inner.band_names
        self.dtype = inner.dtype
        self.masked_pixels = 0  # counted by readers in this process (windows may be read more than once)

    def count_masked(self, n: int) -> None:
        self.masked_pixels += n

    def reader(self) -> WindowReader:
        return _MaskedReader(self)

    def describe(self) -> dict[str, Any]:
        scl = self.masker._scl_scene
        return {"kind": "masked", "inner": self.inner.describe(),
                "scl": list(scl.paths) if scl is not None else None, "scl_masked": list(self.masker.scl_masked),
                "bright_test": self.masker.bright_test, "brightness": self.masker.brightness,
                "whiteness": self.masker.whiteness, "value_scale": self.masker.value_scale}


def masker_from(scl: str | os.PathLike | Scene | None, bright_test: bool, **kw: Any) -> CloudMasker | None:
    """A :class:`CloudMasker`, or None when there is nothing to mask beyond nodata."""
    if scl is None and not bright_test:
        return None
    return CloudMasker(scl=scl, bright_test=bright_test, **kw)
