"""Georeferenced raster and vector I/O: scenes, windows, grids, COG and vector writers."""

from dinov3geo.io.errors import (
    BandNotFoundError,
    DinoGeoIOError,
    MissingCRSError,
    OutputError,
    RasterReadError,
)
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import Band, Chip, Scene, SceneReader, open_raster, target_grid
from dinov3geo.io.sources import datetime_from_name, gdal_path, open_scene
from dinov3geo.io.windows import clip_window, tile_windows

__all__ = [
    "Band",
    "BandNotFoundError",
    "Chip",
    "DinoGeoIOError",
    "GridSpec",
    "MissingCRSError",
    "OutputError",
    "RasterReadError",
    "Scene",
    "SceneReader",
    "clip_window",
    "datetime_from_name",
    "gdal_path",
    "open_raster",
    "open_scene",
    "target_grid",
    "tile_windows",
]
