"""STAC Items and QGIS styles for what a CLI command wrote (the pipeline runner does the same per stage).

:func:`write_sidecars` gives every product it is handed a ``<file>.stac.json`` STAC Item
(:func:`dinov3geo.io.stac.describe_product`) and, for rasters, a QGIS style and GDAL statistics
(:func:`dinov3geo.io.qgis.style_product`). A sidecar never fails the command: a problem (a file dinov3geo did not
write in the way, an unreadable product) is logged as one warning line and the product is left as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("dinov3geo.cli")


def write_sidecars(products: Iterable[str | os.PathLike[str] | None], *, inputs: Sequence[Any] = (),
                   model: Any = None, datetime: Any = None, command: str = "") -> list[Path]:  # noqa: A002
    """STAC Item (+ QGIS style and statistics for rasters) of each existing product; returns the Items written."""
    from dinov3geo.io.qgis import style_product
    from dinov3geo.io.stac import describable, describe_product

    models = [str(m) for m in (model if isinstance(model, list | tuple) else [model])
              if m and not str(m).startswith("random:")]
    ins = [str(p) for p in inputs if isinstance(p, str | os.PathLike) and str(p) not in models]
    items: list[Path] = []
    for prod in products:
        if prod is None or not Path(prod).exists() or not describable(prod):
            continue
        try:
            if Path(prod).suffix.lower() in (".tif", ".tiff"):
                for note in style_product(prod)["kept"]:
                    log.warning("%s", note)
            items.append(describe_product(prod, inputs=ins, model=models or None, datetime=datetime,
                                          extra_properties={"dinov3geo:command": command} if command else None))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a sidecar never fails the command; the user is told
            log.warning("no STAC item for %s: %s", prod, e)
    return items
