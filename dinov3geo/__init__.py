"""dinov3geo: remote sensing with self-supervised DINOv3 backbones.

Ingest satellite/aerial scenes into a tile store, pretrain DINOv3-style, and use the frozen features to map
canopy height and detect forest loss, with georeferenced outputs (COG rasters, GeoPackage polygons).
"""

__version__ = "0.1.0"
