"""Torch datasets over tile stores and georeferenced image/label pairs; iBOT masking."""

from dinov3geo.data.tiles import TileDataset

__all__ = ["TileDataset"]
