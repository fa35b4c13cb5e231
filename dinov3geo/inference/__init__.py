"""Region-scale inference: blended sliding windows over whole rasters, out of core, resumable, distributable.

Quick start::

    from dinov3geo.inference import BackboneFeatures, predict_raster
    from dinov3geo.models import load_backbone

    model = BackboneFeatures(load_backbone("dinov3_vitl16_sat493m.pth"), value_scale=1 / 255)
    predict_raster(model, "region.tif", "features.tif", window=512, aoi="fields.gpkg")

See :mod:`dinov3geo.inference.engine` for how a run works and :mod:`dinov3geo.inference.layout` for the
window/blend geometry.
"""

from dinov3geo.inference.engine import (
    InferenceConfig,
    make_layout,
    parts_dir,
    predict_array,
    predict_raster,
    resolve_amp,
    resolve_device,
)
from dinov3geo.inference.layout import Layout, blend_weights_1d, lattice_starts
from dinov3geo.inference.models import BackboneFeatures, MeanFilter, RasterModel, TorchRasterModel
from dinov3geo.inference.sources import (
    ArraySource,
    MosaicSource,
    RasterSource,
    SceneSource,
    StackSource,
    TileStoreSource,
    as_source,
)

__all__ = [
    "ArraySource",
    "BackboneFeatures",
    "InferenceConfig",
    "Layout",
    "MeanFilter",
    "MosaicSource",
    "RasterModel",
    "RasterSource",
    "SceneSource",
    "StackSource",
    "TileStoreSource",
    "TorchRasterModel",
    "as_source",
    "blend_weights_1d",
    "lattice_starts",
    "make_layout",
    "parts_dir",
    "predict_array",
    "predict_raster",
    "resolve_amp",
    "resolve_device",
]
