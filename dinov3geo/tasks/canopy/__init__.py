"""Canopy height from frozen DINOv3 features: heads, Meta CHMv2, training, evaluation and region mapping.

Model code: :mod:`~dinov3geo.tasks.canopy.bins` (height bins), :mod:`~dinov3geo.tasks.canopy.dpt` (Meta's DPT
head), :mod:`~dinov3geo.tasks.canopy.chmv2` (Meta CHMv2 loading and forward, Hugging Face key map),
:mod:`~dinov3geo.tasks.canopy.heads` (light head), :mod:`~dinov3geo.tasks.canopy.model` (model, checkpoints,
raster adapter).
"""

from dinov3geo.tasks.canopy.bins import HeightBins
from dinov3geo.tasks.canopy.chmv2 import (
    CHMv2,
    export_hf,
    from_hf_state_dict,
    load_chmv2,
    to_hf_config,
    to_hf_state_dict,
)
from dinov3geo.tasks.canopy.dpt import DPTHead
from dinov3geo.tasks.canopy.heads import LightHead, build_head
from dinov3geo.tasks.canopy.model import (
    CanopyHeightModel,
    CanopyRasterModel,
    load_canopy_model,
    save_canopy_model,
)

__all__ = [
    "CHMv2",
    "CanopyHeightModel",
    "CanopyRasterModel",
    "DPTHead",
    "HeightBins",
    "LightHead",
    "build_head",
    "export_hf",
    "from_hf_state_dict",
    "load_canopy_model",
    "load_chmv2",
    "save_canopy_model",
    "to_hf_config",
    "to_hf_state_dict",
]
