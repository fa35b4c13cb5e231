"""Land-cover classification on frozen DINOv3 features (issue 17).

Modules:

* :mod:`~dinov3geo.tasks.landcover.classes`: class tables (code, name, colour) and class COGs that open coloured
  and labelled in QGIS (colour table, category names, ``DINOV3GEO_CLASSES`` tag, ``.qml`` style);
* :mod:`~dinov3geo.tasks.landcover.labels`: polygons or class rasters of any CRS onto an image grid, checks, and
  the split by polygon (:func:`~dinov3geo.tasks.landcover.labels.split_by_polygon`);
* :mod:`~dinov3geo.tasks.landcover.heads`: the linear and light dense heads, the model and its checkpoint;
* :mod:`~dinov3geo.tasks.landcover.train`: training with cached features, class weights, resume;
* :mod:`~dinov3geo.tasks.landcover.baseline`: the per-pixel random forest on bands and spectral indices;
* :mod:`~dinov3geo.tasks.landcover.metrics`: OA, kappa, producer's/user's accuracy, F1, IoU, confusion CSV/PNG;
* :mod:`~dinov3geo.tasks.landcover.predict`: maps through the inference engine;
* :mod:`~dinov3geo.tasks.landcover.evaluate`: a map against reference labels;
* :mod:`~dinov3geo.tasks.landcover.accuracy`, :mod:`~dinov3geo.tasks.landcover.sampling`,
  :mod:`~dinov3geo.tasks.landcover.transitions`: area estimation, reference sampling, from-to change.

Only the class-table API is imported here (no torch), so ``import dinov3geo.tasks.landcover`` stays light.
"""

from dinov3geo.tasks.landcover.classes import (
    CLASSES_TAG,
    NODATA,
    ClassRasterWriter,
    ClassTable,
    ClassTableError,
    LandClass,
    read_class_table,
    write_class_raster,
)

__all__ = [
    "CLASSES_TAG",
    "NODATA",
    "ClassRasterWriter",
    "ClassTable",
    "ClassTableError",
    "LandClass",
    "read_class_table",
    "write_class_raster",
]
