"""STAC Items and QGIS styles next to the products the toolkit writes (the Python API and the CLI).

:func:`write_sidecars` gives every product it is handed a ``<product>.stac.json`` STAC Item
(:func:`dinov3geo.io.stac.describe_product`: footprint, projection, raster and file extensions, checksums, dates,
inputs, model) and, for rasters, a QGIS ``.qml`` style and GDAL statistics in the ``.aux.xml``
(:func:`dinov3geo.io.qgis.style_product`). The task functions call it once their product is complete
(:func:`~dinov3geo.tasks.canopy.predict.predict_canopy`, :func:`~dinov3geo.tasks.change.detect.detect_change`,
:func:`~dinov3geo.tasks.features.extract_features`, :func:`~dinov3geo.tasks.landcover.predict.predict_landcover`,
:func:`~dinov3geo.tasks.landcover.transitions.transitions`; ``sidecars=False`` skips it), the CLI commands through
them (adding ``dinov3geo:command``), and a pipeline run through its runner instead (with its pipeline and stage).

A sidecar never fails the task: a problem (a ``.stac.json`` or ``.qml`` that dinov3geo did not write in the way,
an unreadable product) is logged as one warning line and the product, and the file in the way, are left as they
are. An Item dinov3geo wrote earlier (it carries ``dinov3geo:version``, :func:`dinov3geo.io.stac.is_ours`) is
replaced, so re-running a task into the same output refreshes its Items.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["model_files", "remove_sidecars", "sidecar_properties", "write_sidecars"]

log = logging.getLogger(__name__)


def model_files(model: Any) -> list[str]:
    """The model file paths in ``model`` (a path, or a list of paths and None): in-memory models, None and
    ``random:<arch>`` backbones (nothing to describe) are left out."""
    items = model if isinstance(model, list | tuple) else [model]
    return [os.fspath(m) for m in items
            if isinstance(m, str | os.PathLike) and os.fspath(m) and not os.fspath(m).startswith("random:")]


def _input_strings(inputs: Iterable[Any], models: Sequence[str]) -> list[str]:
    """The inputs as path strings, in order, without duplicates or models: paths as given, lists flattened,
    scenes and sources by their local files (:func:`dinov3geo.utils.outputs.input_paths`)."""
    from dinov3geo.utils.outputs import input_paths

    out: list[str] = []

    def add(x: Any) -> None:
        if x is None:
            return
        if isinstance(x, str | os.PathLike):
            s = os.fspath(x)
            if s and s not in models and s not in out:
                out.append(s)
        elif isinstance(x, list | tuple):
            for y in x:
                add(y)
        elif isinstance(x, Mapping) or type(x).__module__.startswith("dinov3geo."):  # a scene, a raster source
            for p in input_paths(x):
                add(str(p))
        # anything else (a GeoDataFrame, a geometry, an array) has no file to record

    for i in inputs:
        add(i)
    return out


def sidecar_properties(sidecars: bool | Mapping[str, Any], api: str) -> dict[str, Any] | None:
    """The extra Item properties of a task function's ``sidecars`` argument, None when it is falsy.

    ``sidecars`` is True (the Items get ``{"dinov3geo:api": api}``) or a mapping of more properties added to it
    (the CLI passes ``{"dinov3geo:command": "canopy predict"}``).
    """
    if not sidecars:
        return None
    props: dict[str, Any] = {"dinov3geo:api": api}
    if isinstance(sidecars, Mapping):
        props.update({str(k): v for k, v in sidecars.items()})
    return props


def write_sidecars(
    products: Iterable[str | os.PathLike[str] | None],
    *,
    inputs: Iterable[Any] = (),
    model: Any = None,
    datetime: Any = None,  # noqa: A002 - the STAC field's name
    extra_properties: Mapping[str, Any] | None = None,
    item_id: Callable[[Path], str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[Path]:
    """Give each existing product a STAC Item (and each raster a QGIS style + GDAL statistics).

    Args:
        products: product paths (COGs, feature Zarr stores, vector files); None, missing paths and files of
            other kinds (CSV, JSON, PNG) are skipped.
        inputs: what the products were made from: paths (recorded with their checksums), lists of them, scenes
            or raster sources (their local files); None entries and in-memory data (GeoDataFrames, arrays) are
            ignored.
        model: the model file(s) (a path or a list; None, in-memory models and ``random:`` backbones are left
            out).
        datetime: a date or a ``(start, end)`` pair (see :func:`dinov3geo.io.stac.write_item`); None: from the
            products' tags, the inputs' file names or the products' creation time.
        extra_properties: more Item properties, e.g. ``{"dinov3geo:api": "dinov3geo.tasks.features.extract_features"}``
            or ``{"dinov3geo:command": "features"}``.
        item_id: the Item id of each product (default: its file name without the suffix).
        warn: where the one-line problems go (default: a warning on this module's logger).

    Returns:
        The Items written (or left unchanged because they were already up to date).

    Never raises (except :class:`KeyboardInterrupt`): each problem is one warning line and the product is left
    without its Item.
    """
    from dinov3geo.io.qgis import style_product
    from dinov3geo.io.stac import describable, describe_product

    say = warn or (lambda msg: log.warning("%s", msg))
    models = model_files(model)
    try:
        ins = _input_strings(inputs, models)
    except Exception as e:  # noqa: BLE001 - a sidecar never fails the task
        say(f"STAC items: the inputs could not be listed ({e}); they are left out")
        ins = []
    items: list[Path] = []
    for prod in products:
        if prod is None:
            continue
        p = Path(prod)
        try:
            if not p.exists() or not describable(p):
                continue
            if p.suffix.lower() in (".tif", ".tiff"):
                for note in style_product(p)["kept"]:
                    say(note)
            items.append(describe_product(p, inputs=ins, model=models or None, datetime=datetime,
                                          extra_properties=dict(extra_properties) if extra_properties else None,
                                          item_id=item_id(p) if item_id is not None else None))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a sidecar never fails the task; the user is told
            say(f"no STAC item for {p}: {e}")
    return items


def remove_sidecars(product: str | os.PathLike[str]) -> list[Path]:
    """Delete the STAC Item and QGIS style of a product that no longer exists (a re-run that does not write it
    again), when dinov3geo wrote them; files it did not write are kept. Returns the files deleted."""
    from dinov3geo.io.qgis import _ours as qml_is_ours
    from dinov3geo.io.stac import is_ours, item_path

    p = Path(product)
    gone: list[Path] = []
    for side, ours in ((item_path(p), is_ours), (p.with_suffix(".qml"), qml_is_ours)):
        if side.is_file() and not side.is_symlink() and ours(side):
            try:
                side.unlink()
                gone.append(side)
            except FileNotFoundError:
                pass
    return gone
