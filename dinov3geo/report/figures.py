"""Report figures as PNG bytes: RGB previews, single-band maps with a colour bar, class maps with a legend,
mask overlays, feature PCA and pretraining loss curves.

Every function accepts a raster path (read decimated to at most ``max_size`` pixels on the long side, nodata
masked) or an in-memory array, and returns the PNG file content (matplotlib's object API with the Agg
canvas: no pyplot state, safe in threads and notebooks). Nodata pixels are drawn transparent.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike[str]

#: loss columns drawn by default when present in the pretraining metrics (in this order)
LOSS_COLUMNS = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss",
                "gram_loss")


@dataclass
class Preview:
    """A decimated raster read: ``data [C, h, w]`` float32 with NaN at nodata, and its georeferencing."""

    data: np.ndarray
    transform: Any = None  #: affine transform of the preview grid (None when unknown)
    crs: Any = None
    band_names: tuple[str, ...] = ()

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.data).all(0)


def read_preview(path: PathLike, bands: Sequence[int | str] | None = None, max_size: int = 1024,
                 shape: tuple[int, int] | None = None) -> Preview:
    """Read ``bands`` (1-based indices or band descriptions; default all) decimated to ``max_size`` (or to
    ``shape = (h, w)``), nearest neighbour, with the file's nodata and masks as NaN."""
    import rasterio
    from rasterio.enums import Resampling

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"report figure: raster {str(p)!r} not found")
    with rasterio.open(p) as src:
        names = [d or f"band{i}" for i, d in enumerate(src.descriptions, 1)]
        idx: list[int] = []
        for b in bands or range(1, src.count + 1):
            if isinstance(b, str):
                if b not in names:
                    raise ValueError(f"report figure: {p}: no band {b!r} (bands: {names})")
                idx.append(names.index(b) + 1)
            else:
                if not 1 <= int(b) <= src.count:
                    raise ValueError(f"report figure: {p}: band {b} out of range 1..{src.count}")
                idx.append(int(b))
        if shape is None:
            step = max(1.0, max(src.width, src.height) / max_size)
            shape = (max(1, round(src.height / step)), max(1, round(src.width / step)))
        arr = src.read(idx, out_shape=(len(idx), *shape), masked=True, resampling=Resampling.nearest)
        data = np.ma.filled(arr.astype("float32"), np.nan)
        data[~np.isfinite(data)] = np.nan
        transform = src.transform * src.transform.scale(src.width / shape[1], src.height / shape[0])
        has_geo = src.crs is not None and not src.transform.is_identity
        return Preview(data, transform if has_geo else None, src.crs if has_geo else None,
                       tuple(names[i - 1] for i in idx))


def _as_preview(x: PathLike | np.ndarray | Preview, bands: Sequence[int | str] | None = None,
                max_size: int = 1024) -> Preview:
    if isinstance(x, Preview):
        return x
    if isinstance(x, np.ndarray):
        a = np.asarray(x, dtype="float32")
        return Preview(a[None] if a.ndim == 2 else a)
    return read_preview(x, bands=bands, max_size=max_size)


def percentile_stretch(data: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0),
                       valid: np.ndarray | None = None) -> np.ndarray:
    """Per-band linear stretch of ``data [C, h, w]`` between the given percentiles of valid pixels to [0, 1]."""
    data = np.asarray(data, dtype="float32")
    if valid is None:
        valid = np.isfinite(data).all(0)
    out = np.zeros_like(data)
    for c in range(data.shape[0]):
        v = data[c][valid]
        if v.size == 0:
            continue
        lo, hi = np.percentile(v, percentiles)
        out[c] = np.clip((data[c] - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
    out[:, ~valid] = 0.0
    return out


def _rgba(data: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    rgb = percentile_stretch(data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, 0), percentiles, valid)
    return np.concatenate([np.moveaxis(rgb, 0, -1), valid[..., None].astype("float32")], axis=-1)


def _figure(h: int, w: int, extra_w: float = 0.0, dpi: int = 100, max_in: float = 8.0) -> Any:
    from matplotlib.figure import Figure

    aspect = h / max(w, 1)
    width = max_in if aspect <= 1 else max_in / aspect
    return Figure(figsize=(width + extra_w, max(width * aspect, 1.5)), dpi=dpi)


def png_bytes(fig: Any) -> bytes:
    """Render a matplotlib ``Figure`` to PNG bytes (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def rgb_figure(image: PathLike | np.ndarray | Preview, bands: Sequence[int | str] | None = None,
               percentiles: tuple[float, float] = (2.0, 98.0), max_size: int = 1024) -> bytes:
    """RGB preview (first three of ``bands``, default bands 1-3) with a per-band percentile stretch."""
    if bands is None and not isinstance(image, np.ndarray | Preview):
        import rasterio

        with rasterio.open(image) as src:
            bands = [1, 2, 3] if src.count >= 3 else [1]
    pv = _as_preview(image, bands, max_size)
    _, h, w = pv.data.shape
    fig = _figure(h, w)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(_rgba(pv.data, pv.valid, percentiles), interpolation="nearest")
    ax.set_axis_off()
    return png_bytes(fig)


def map_figure(raster: PathLike | np.ndarray | Preview, band: int | str = 1, label: str = "",
               cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
               max_size: int = 1024) -> bytes:
    """One band as a colour map with a labelled colour bar (e.g. canopy height in m, uncertainty in m).

    ``vmin``/``vmax`` default to the 2nd/98th percentiles of the valid pixels.
    """
    pv = _as_preview(raster, [band], max_size)
    a = pv.data[0] if pv.data.shape[0] == 1 else pv.data[int(band) - 1]
    valid = np.isfinite(a)
    v = a[valid]
    lo = vmin if vmin is not None else (float(np.percentile(v, 2)) if v.size else 0.0)
    hi = vmax if vmax is not None else (float(np.percentile(v, 98)) if v.size else 1.0)
    h, w = a.shape
    fig = _figure(h, w, extra_w=1.2)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                   interpolation="nearest")
    ax.set_axis_off()
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(label)
    return png_bytes(fig)


def _onto(mask: Preview, target: Preview, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` band 1 on the grid of ``target`` (reprojected when both are georeferenced, else resized)."""
    src = mask.data[0]
    if mask.transform is not None and target.transform is not None:
        from rasterio.warp import Resampling, reproject

        dst = np.full(shape, np.nan, dtype="float32")
        reproject(src, dst, src_transform=mask.transform, src_crs=mask.crs, dst_transform=target.transform,
                  dst_crs=target.crs, resampling=Resampling.nearest, src_nodata=np.nan, dst_nodata=np.nan)
        return dst
    rows = (np.arange(shape[0]) * src.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * src.shape[1] / shape[1]).astype(int)
    return src[rows][:, cols]


def overlay_figure(image: PathLike | np.ndarray | Preview, mask: PathLike | np.ndarray | Preview,
                   threshold: float = 0.5, color: str = "#e8112d", alpha: float = 0.6, label: str = "",
                   bands: Sequence[int | str] | None = None, percentiles: tuple[float, float] = (2.0, 98.0),
                   max_size: int = 1024, polygons: Any = None, outline: str = "#ffd400") -> bytes:
    """A binary or probability mask (``mask >= threshold``, band 1) drawn in ``color`` over an RGB preview.

    The mask is reprojected onto the image's grid when both are georeferenced (nearest neighbour), so a
    change map on another grid or resolution lines up; otherwise it is resized to the image. ``polygons``
    (a vector file or GeoDataFrame, any CRS; the image must be georeferenced) are drawn as ``outline``
    coloured outlines on top.
    """
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch

    if bands is None and not isinstance(image, np.ndarray | Preview):
        import rasterio

        with rasterio.open(image) as src:
            bands = [1, 2, 3] if src.count >= 3 else [1]
    img = _as_preview(image, bands, max_size)
    _, h, w = img.data.shape
    mk = _as_preview(mask, [1], max_size)
    m = _onto(mk, img, (h, w))
    hit = np.isfinite(m) & (m >= threshold)
    fig = _figure(h, w)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(_rgba(img.data, img.valid, percentiles), interpolation="nearest")
    over = np.zeros((h, w, 4), dtype="float32")
    over[hit] = to_rgba(color, alpha)
    ax.imshow(over, interpolation="nearest")
    handles = [Patch(color=color, alpha=alpha, label=label)] if label else []
    if polygons is not None:
        from matplotlib.lines import Line2D

        n = draw_outlines(ax, polygons, img, outline)
        handles.append(Line2D([], [], color=outline, lw=1.2, label=f"polygons ({n})"))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    if handles:
        ax.legend(handles=handles, loc="lower right", framealpha=0.8)
    return png_bytes(fig)


def class_legend(path: PathLike, band: int = 1) -> dict[int, tuple[tuple[int, int, int], str]]:
    """``{value: (rgb, label)}`` of a class raster's band: the colours of its GDAL colour table and the labels
    of its category names (``.aux.xml``), else of its dinov3geo class table (``DINOV3GEO_CLASSES`` tag); values
    without a colour get matplotlib's tab20 colours, values without a name their number."""
    import rasterio

    from dinov3geo.tasks.landcover.classes import CLASSES_TAG, ClassTable, read_category_names

    with rasterio.open(path) as src:
        try:
            cmap = {int(k): tuple(int(c) for c in v[:3]) for k, v in src.colormap(band).items()}
        except ValueError:  # no colour table
            cmap = {}
        tag = src.tags().get(CLASSES_TAG)
        nodata = src.nodata
    names = {i: n for i, n in enumerate(read_category_names(path, band)) if n}
    if tag and band == 1:
        for c in ClassTable.from_json(tag):
            names.setdefault(c.code, c.name)
            cmap.setdefault(c.code, c.rgb)
    if nodata is not None:
        cmap.pop(int(nodata), None)
    return {v: (rgb, names.get(v, str(v))) for v, rgb in cmap.items()} | {
        v: ((0, 0, 0), n) for v, n in names.items() if v not in cmap and v != nodata}


def _legend_groups(entries: Sequence[tuple[tuple[int, int, int], str, int]]) -> list[tuple[tuple[int, int, int], str]]:
    """Merge legend entries of one colour: ``a -> a`` pairs become "unchanged", ``a -> b`` pairs of one
    destination "-> b (from a, c)" (the colours of a transition raster); else the labels joined."""
    groups: dict[tuple[int, int, int], list[tuple[str, int]]] = {}
    for rgb, lab, n in entries:
        groups.setdefault(rgb, []).append((lab, n))
    out = []
    for rgb, items in sorted(groups.items(), key=lambda g: -sum(n for _, n in g[1])):
        labs = [lab for lab, _ in sorted(items, key=lambda t: -t[1])]
        pairs = [lab.split(" -> ") for lab in labs]
        if len(labs) > 1 and all(len(p) == 2 for p in pairs):
            if all(a == b for a, b in pairs):
                out.append((rgb, "unchanged"))
                continue
            if len({b for _, b in pairs}) == 1 and all(a != b for a, b in pairs):
                out.append((rgb, f"-> {pairs[0][1]} (from {', '.join(a for a, _ in pairs)})"))
                continue
        out.append((rgb, ", ".join(labs)))
    return out


def class_map_figure(raster: PathLike, band: int = 1, max_size: int = 1024, legend: bool = True,
                     max_entries: int = 12) -> bytes:
    """A class raster (land-cover map, transition raster, mask with a colour table) in its own colours with a
    legend of the classes present (largest first; entries of one colour merged, see :func:`class_legend`).

    Pixels are read decimated (nearest neighbour, so classes are never mixed); nodata is transparent.
    """
    from matplotlib.patches import Patch

    pv = read_preview(raster, [band], max_size)
    a = pv.data[0]
    valid = np.isfinite(a)
    codes = np.where(valid, a, -1).astype(np.int64)
    table = class_legend(raster, band)
    present, counts = np.unique(codes[valid], return_counts=True)
    fallback = _tab20()
    rgba = np.zeros((*a.shape, 4), dtype=np.float32)
    entries = []
    for k, (v, n) in enumerate(zip(present.tolist(), counts.tolist(), strict=True)):
        rgb, lab = table.get(v, (fallback[k % len(fallback)], str(v)))
        rgba[codes == v] = (*(c / 255 for c in rgb), 1.0)
        entries.append((rgb, lab, n))
    h, w = a.shape
    fig = _figure(h, w, extra_w=2.4 if legend else 0.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rgba, interpolation="nearest")
    ax.set_axis_off()
    if legend and entries:
        groups = _legend_groups(entries)
        more = len(groups) - max_entries
        handles = [Patch(facecolor=tuple(c / 255 for c in rgb), edgecolor="#555", label=lab)
                   for rgb, lab in groups[:max_entries]]
        if more > 0:
            handles.append(Patch(facecolor="none", edgecolor="none", label=f"(+{more} smaller)"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9,
                  borderaxespad=0.0)
    return png_bytes(fig)


def _tab20() -> list[tuple[int, int, int]]:
    from matplotlib import colormaps

    return [tuple(int(round(255 * c)) for c in colormaps["tab20"](i)[:3]) for i in range(20)]  # type: ignore[misc]


def draw_outlines(ax: Any, polygons: Any, target: Preview, color: str = "#ffd400", lw: float = 1.0) -> int:
    """Draw the outlines of ``polygons`` (vector file or GeoDataFrame, any CRS) in the pixel coordinates of
    ``target`` (a georeferenced :class:`Preview`) on ``ax``; returns the number of polygons drawn."""
    import shapely

    if target.transform is None or target.crs is None:
        raise ValueError("report figure: polygon outlines need a georeferenced image")
    if isinstance(polygons, str | os.PathLike):
        from dinov3geo.io.vector import read_vector

        if not Path(polygons).exists():
            raise FileNotFoundError(f"report figure: polygons {str(polygons)!r} not found")
        gdf = read_vector(polygons, allow_empty=True)
    else:
        gdf = polygons
    if len(gdf) == 0:
        return 0
    if gdf.crs is None:
        raise ValueError("report figure: the polygons have no CRS")
    geoms = gdf.geometry.to_crs(target.crs).values
    inv = ~target.transform
    n = 0
    for g in geoms:
        if g is None or g.is_empty:
            continue
        n += 1
        for line in shapely.get_parts(shapely.boundary(g)):
            for part in shapely.get_parts(line):
                xy = np.asarray(part.coords)
                if xy.shape[0] < 2:
                    continue
                cols, rows = inv * (xy[:, 0], xy[:, 1])
                ax.plot(np.asarray(cols) - 0.5, np.asarray(rows) - 0.5, color=color, lw=lw)
    return n


def pca_figure(features: PathLike | np.ndarray, max_size: int = 512, variable: str = "features") -> bytes:
    """3-component PCA of dense features as an RGB picture.

    ``features`` is a ``[C, h, w]`` array (NaN = nodata) or a Zarr written by
    :func:`dinov3geo.tasks.features.extract_features` (read with a stride to at most ``max_size`` pixels).
    """
    from dinov3geo.tasks.features import pca_rgb

    if isinstance(features, np.ndarray):
        f = features.astype("float32")
    else:
        import xarray as xr

        p = Path(features)
        if not p.exists():
            raise FileNotFoundError(f"report figure: features {str(p)!r} not found")
        with xr.open_zarr(p, consolidated=False) as ds:
            if variable not in ds:
                raise ValueError(f"report figure: {p} has no variable {variable!r} (has {list(ds.data_vars)})")
            da = ds[variable]
            step = max(1, int(np.ceil(max(da.sizes["y"], da.sizes["x"]) / max_size)))
            f = np.asarray(da.isel(y=slice(None, None, step), x=slice(None, None, step)).values, "float32")
    valid = np.isfinite(f).all(0)
    rgb = pca_rgb(np.nan_to_num(f), valid)
    rgba = np.concatenate([np.moveaxis(rgb, 0, -1).astype("float32") / 255.0, valid[..., None]], -1)
    h, w = valid.shape
    fig = _figure(h, w)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgba, interpolation="nearest")
    ax.set_axis_off()
    return png_bytes(fig)


def read_loss_curves(runs: Sequence[PathLike] | PathLike) -> list[tuple[str, list[dict[str, float]]]]:
    """``(stage name, metric rows)`` per pretraining run folder, in order.

    A folder with ``logs/run*/metrics.csv`` (what :func:`dinov3geo.ssl.train.pretrain` writes through
    Lightning's CSV logger) is one run; a folder without logs but with stage sub-folders (``pretrain``,
    ``gram``, ``highres``, ``distill``; what ``--stage all`` writes) gives one run per stage.
    """
    from dinov3geo.ssl.config import STAGES
    from dinov3geo.ssl.train import stage_metrics

    items = [runs] if isinstance(runs, str | os.PathLike) else list(runs)
    out: list[tuple[str, list[dict[str, float]]]] = []
    for r in items:
        p = Path(r)
        if not p.exists():
            raise FileNotFoundError(f"report figure: pretraining run {str(p)!r} not found")
        if (p / "logs").is_dir():
            out.append((p.name, stage_metrics(p)))
            continue
        subs = [p / s for s in STAGES if (p / s / "logs").is_dir()]
        if not subs:
            raise ValueError(f"report figure: {p} holds no pretraining logs (logs/run*/metrics.csv)")
        out += [(s.name, stage_metrics(s)) for s in subs]
    return out


def loss_curves_figure(runs: Sequence[PathLike] | PathLike | Sequence[tuple[str, list[Mapping[str, float]]]],
                       metrics: Sequence[str] | None = None) -> bytes:
    """Pretraining losses against the iteration, stages one after the other (dashed lines at boundaries).

    ``runs``: run folders (see :func:`read_loss_curves`) or ``(name, rows)`` pairs; ``metrics``: columns to
    draw (default: those of :data:`LOSS_COLUMNS` that were logged).
    """
    from matplotlib.figure import Figure

    if isinstance(runs, str | os.PathLike) or (runs and not isinstance(runs[0], tuple)):
        data = read_loss_curves(runs)  # type: ignore[arg-type]
    else:
        data = list(runs)  # type: ignore[arg-type]
    cols = list(metrics) if metrics else [c for c in LOSS_COLUMNS if any(c in r for _, rows in data for r in rows)]
    if not cols:
        raise ValueError("report figure: no loss metrics in the pretraining logs")
    fig = Figure(figsize=(8, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    offset = 0
    colors = {c: f"C{i}" for i, c in enumerate(cols)}
    for k, (name, rows) in enumerate(data):
        steps = [int(r["step"]) for r in rows if "step" in r]
        for c in cols:
            pts = [(offset + int(r["step"]) + 1, r[c]) for r in rows if c in r and "step" in r]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, color=colors[c], label=c if k == 0 else None, lw=1.5)
        if len(data) > 1:
            ax.axvline(offset, color="0.5", ls="--", lw=0.8)
            ax.text(offset, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        offset += (max(steps) + 1) if steps else 0
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)
