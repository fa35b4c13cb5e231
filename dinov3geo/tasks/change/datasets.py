"""Change-detection data: bi-temporal pairs with labels on one grid, crops for training, whole-pair prediction.

Every loader returns a :class:`ChangePair`: ``before`` and ``after`` ``[C, H, W]`` float32 raw values (the
model normalises them), ``label`` ``[H, W]`` uint8 (1 = change, 0 = no change), ``valid`` ``[H, W]`` bool
(False = unlabelled or nodata in either date: ignored by training and metrics), band names, the grid
(``None`` for plain, non-georeferenced images) and the two dates when known.

Loaders (see ``../shared/data/README.md`` for the quirks they handle):

* :func:`load_oscd_city`: an OSCD city folder (``imgs_1/``, ``imgs_2/`` per-band Sentinel-2 L1C files at
  10/20/60 m resampled to the 10 m grid by :func:`dinov3geo.io.open_scene`; ``cm/<city>-cm.tif`` labels
  ``1 = no change, 2 = change`` without a geotransform, pixel-aligned with the 10 m bands, whose transform is
  borrowed; dates from ``dates.txt`` because the old file names carry processing times).
* :func:`load_taizhou`: the Taizhou Landsat-7 pair; labels only on the sparse expert samples
  (``reference_samples.tif``: 0 unlabelled, 1 unchanged, 2 changed).
* :func:`load_levir`: LEVIR-CD PNG triplets ``A/``, ``B/``, ``label/`` (0/255; not georeferenced).
* :func:`load_raster_pair`: any ``before``, ``after``, ``label`` rasters with a label encoding
  (:data:`LABEL_ENCODINGS` or ``"auto"``); the after image and the label are read on the before grid.

For training, :func:`random_crops` / :func:`grid_crops` cut :class:`ChangeSample` crops and
:func:`d4_transform` applies one of the 8 flips/rotations (valid for nadir imagery) identically to both dates,
the label and the mask. :func:`predict_pair` runs any change :class:`~dinov3geo.inference.RasterModel` over a
whole in-memory pair with blended overlapping windows (georeferenced rasters of any size go through
:func:`dinov3geo.inference.predict_raster` instead).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rasterio

from dinov3geo.io import GridSpec, open_scene
from dinov3geo.io.errors import DinoGeoIOError
from dinov3geo.io.sources import datetime_from_name

log = logging.getLogger(__name__)

__all__ = [
    "LABEL_ENCODINGS",
    "ChangePair",
    "ChangeSample",
    "d4_transform",
    "encode_labels",
    "grid_crops",
    "load_levir",
    "load_oscd_city",
    "load_raster_pair",
    "load_taizhou",
    "predict_pair",
    "random_crops",
]

#: name -> (no-change values, change values, ignored values). Values outside the three sets are an error.
LABEL_ENCODINGS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "binary": ((0,), (1,), ()),
    "binary255": ((0,), (255,), ()),
    "oscd": ((1,), (2,), ()),
    "samples": ((1,), (2,), (0,)),
}
_AUTO = {frozenset({0, 1}): "binary", frozenset({0, 255}): "binary255", frozenset({1, 2}): "oscd",
         frozenset({0, 1, 2}): "samples"}


@dataclass
class ChangePair:
    """A bi-temporal pair with labels on one grid (see the module docstring).

    ``valid`` marks pixels that count for training and metrics (labelled and valid in both dates);
    ``image_valid`` marks pixels valid in both images (what a model may look at), default all True.
    """

    before: np.ndarray
    after: np.ndarray
    label: np.ndarray
    valid: np.ndarray
    band_names: tuple[str, ...]
    grid: GridSpec | None = None
    dates: tuple[date | None, date | None] = (None, None)
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    image_valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.image_valid is None:
            self.image_valid = np.ones(self.before.shape[1:], bool)
        if self.before.shape != self.after.shape or self.before.ndim != 3:
            raise ValueError(f"{self.name}: before {self.before.shape} and after {self.after.shape} must both be "
                             "[C, H, W] of the same shape")
        hw = self.before.shape[1:]
        if self.label.shape != hw or self.valid.shape != hw or self.image_valid.shape != hw:
            raise ValueError(f"{self.name}: label {self.label.shape} / valid {self.valid.shape} must be {hw}")
        if len(self.band_names) != self.before.shape[0]:
            raise ValueError(f"{self.name}: {len(self.band_names)} band names for {self.before.shape[0]} bands")

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.before.shape[1]), int(self.before.shape[2])

    @property
    def stacked(self) -> np.ndarray:
        """``[2C, H, W]``: the before bands then the after bands (the layout change models take)."""
        return np.concatenate([self.before, self.after], axis=0)

    def window(self, row0: int, row1: int, col0: int, col1: int, name: str | None = None) -> ChangePair:
        """The pair restricted to rows ``row0:row1`` and columns ``col0:col1`` (grid shifted accordingly)."""
        grid = None
        if self.grid is not None:
            from rasterio.windows import Window

            grid = self.grid.window_grid(Window(col0, row0, col1 - col0, row1 - row0))
        sl = (slice(row0, row1), slice(col0, col1))
        return replace(self, before=self.before[:, sl[0], sl[1]], after=self.after[:, sl[0], sl[1]],
                       label=self.label[sl], valid=self.valid[sl], image_valid=self.image_valid[sl], grid=grid,
                       name=name or f"{self.name}[{row0}:{row1},{col0}:{col1}]")

    def split_rows(self, fraction: float) -> tuple[ChangePair, ChangePair]:
        """Spatial hold-out: ``(top part, bottom fraction of the rows)``, e.g. for a validation split."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        h, w = self.shape
        cut = int(round(h * (1 - fraction)))
        if cut <= 0 or cut >= h:
            raise ValueError(f"{self.name}: {h} rows are too few to hold out {fraction:.0%}")
        return self.window(0, cut, 0, w, f"{self.name}[train]"), self.window(cut, h, 0, w, f"{self.name}[val]")


class ChangeSample(NamedTuple):
    """One training crop: ``before``/``after`` ``[C, h, w]``, ``label`` ``[h, w]`` uint8, ``valid`` bool."""

    before: np.ndarray
    after: np.ndarray
    label: np.ndarray
    valid: np.ndarray


# ------------------------------------------------------------------------------------------ labels
def encode_labels(raw: np.ndarray, encoding: str | dict[str, Sequence[int]] = "auto", what: str = "label"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Raw label values -> ``(label uint8 0/1, labelled bool)``.

    Args:
        raw: label raster values.
        encoding: a name of :data:`LABEL_ENCODINGS`, ``"auto"`` (guessed from the values present), or a dict
            ``{"change": [...], "nochange": [...], "ignore": [...]}``.
        what: the file name, for error messages.

    Raises:
        ValueError: unknown encoding, or values that the encoding does not define.
    """
    vals = set(np.unique(raw).tolist())
    if isinstance(encoding, dict):
        unknown_keys = set(encoding) - {"change", "nochange", "ignore"}
        if unknown_keys:
            raise ValueError(f"label encoding has unknown key(s) {sorted(unknown_keys)}; use change/nochange/ignore")
        no, ch, ig = (tuple(int(v) for v in encoding.get(k, ())) for k in ("nochange", "change", "ignore"))
        if not ch:
            raise ValueError("a label encoding dict needs at least one 'change' value")
    else:
        if encoding == "auto":
            name = next((n for s, n in _AUTO.items() if vals <= s and (vals == s or len(vals) > 1)), None)
            if name is None:
                raise ValueError(f"{what}: cannot guess the label encoding from values {sorted(vals)[:10]}; pass "
                                 f"one of {sorted(LABEL_ENCODINGS)} or a dict of change/nochange/ignore values")
            encoding = name
        if encoding not in LABEL_ENCODINGS:
            raise ValueError(f"unknown label encoding {encoding!r}; use one of {sorted(LABEL_ENCODINGS)}, 'auto' "
                             "or a dict of change/nochange/ignore values")
        no, ch, ig = LABEL_ENCODINGS[encoding]
    bad = vals - set(no) - set(ch) - set(ig)
    if bad:
        raise ValueError(f"{what}: values {sorted(bad)[:10]} are not in the label encoding {encoding!r} "
                         f"(no change {list(no)}, change {list(ch)}, ignored {list(ig)}); pick another encoding")
    label = np.isin(raw, ch).astype(np.uint8)
    labelled = np.isin(raw, ch) | np.isin(raw, no)
    return label, labelled


def _read_label_on(path: Path, grid: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """Label values on ``grid`` and a mask of pixels it covers; a label without georeferencing must have the
    grid's shape (it is then taken as pixel-aligned and the grid's transform is borrowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            no_geo = ds.crs is None and ds.transform.is_identity
            if no_geo:
                if (ds.height, ds.width) != grid.shape:
                    raise DinoGeoIOError(
                        f"label {path} has no geotransform and shape {ds.height}x{ds.width}, which differs from the "
                        f"image grid {grid.height}x{grid.width}; georeference it or crop it to the image", path)
                log.info("%s has no geotransform: borrowing the image grid's (pixel-aligned)", path)
                return ds.read(1), np.ones(grid.shape, bool)
    scene = open_scene(path, grid=grid, resampling="nearest")
    chip = scene.read()
    return chip.data[0], chip.valid


# ------------------------------------------------------------------------------------------ loaders
def _parse_dates_txt(path: Path) -> tuple[date | None, date | None]:
    found: dict[str, date] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(date_[12])\s*:\s*(\d{8})", line)
        if m:
            s = m.group(2)
            found[m.group(1)] = date(int(s[:4]), int(s[4:6]), int(s[6:]))
    if len(found) != 2:
        raise DinoGeoIOError(f"{path} should hold 'date_1: YYYYMMDD' and 'date_2: YYYYMMDD' lines", path)
    return found["date_1"], found["date_2"]


def _read_pair(before: Any, after: Any, bands: Sequence[str | int] | None, **open_kw: Any
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], GridSpec, Any, Any]:
    s1 = open_scene(before, bands=bands, **open_kw)
    s2 = open_scene(after, bands=bands, grid=s1.grid, **open_kw)
    if len(s1.bands) != len(s2.bands):
        raise DinoGeoIOError(f"{after} has {len(s2.bands)} bands but {before} has {len(s1.bands)}; select the same "
                             "bands for both dates (bands=...)", after)
    c1, c2 = s1.read(), s2.read()
    return (c1.data.astype(np.float32), c2.data.astype(np.float32), c1.valid & c2.valid, s1.band_names, s1.grid,
            s1.datetime, s2.datetime)


def load_oscd_city(folder: str | Path, bands: Sequence[str | int] | None = None,
                   resampling: str = "bilinear") -> ChangePair:
    """One OSCD city (``imgs_1``, ``imgs_2``, ``cm/<city>-cm.tif``, ``dates.txt``) on its 10 m grid.

    Args:
        folder: the city folder.
        bands: band subset by name (``red``...) or S2 id (``B04``...); default all 13 in S2 order.
        resampling: for the 20/60 m bands.
    """
    folder = Path(folder)
    city = folder.name
    for sub in ("imgs_1", "imgs_2"):
        if not (folder / sub).is_dir():
            raise DinoGeoIOError(f"{folder} is not an OSCD city folder: {sub}/ is missing", folder)
    cm = folder / "cm" / f"{city}-cm.tif"
    if not cm.exists():
        cands = sorted((folder / "cm").glob("*-cm.tif")) if (folder / "cm").is_dir() else []
        if len(cands) != 1:
            raise DinoGeoIOError(f"OSCD label {cm} not found", cm)
        cm = cands[0]
    b, a, valid, names, grid, _, _ = _read_pair(folder / "imgs_1", folder / "imgs_2", bands, resampling=resampling)
    raw, covered = _read_label_on(cm, grid)
    label, labelled = encode_labels(raw, "oscd", str(cm))
    dates = _parse_dates_txt(folder / "dates.txt") if (folder / "dates.txt").exists() else (None, None)
    return ChangePair(b, a, label, valid & covered & labelled, names, grid, dates, city,
                      {"label_path": str(cm), "sensor": "Sentinel-2 MSI L1C"}, image_valid=valid)


def load_taizhou(folder: str | Path) -> ChangePair:
    """The Taizhou Landsat-7 ETM+ pair (2000, 2003) with the sparse expert reference samples as labels."""
    folder = Path(folder)
    imgs = sorted(folder.glob("taizhou_*_L7ETM.tif"))
    if len(imgs) != 2:
        raise DinoGeoIOError(f"expected two taizhou_<date>_L7ETM.tif files in {folder}, found {len(imgs)}", folder)
    ref = folder / "reference_samples.tif"
    if not ref.exists():
        raise DinoGeoIOError(f"{ref} is missing", ref)
    names = ["blue", "green", "red", "nir", "swir16", "swir22"]
    s1 = open_scene(imgs[0], band_names=names)
    s2 = open_scene(imgs[1], band_names=names, grid=s1.grid)
    c1, c2 = s1.read(), s2.read()
    with rasterio.open(ref) as ds:  # 0 is both "unlabelled" and the declared nodata: read raw values
        if not GridSpec.from_dataset(ds).same_as(s1.grid):
            raise DinoGeoIOError(f"{ref} is not on the grid of {imgs[0]}", ref)
        raw = ds.read(1)
    label, labelled = encode_labels(raw, "samples", str(ref))
    d = tuple(datetime_from_name(p.name) for p in imgs)
    return ChangePair(c1.data.astype(np.float32), c2.data.astype(np.float32), label,
                      c1.valid & c2.valid & labelled, s1.band_names, s1.grid,
                      (d[0].date() if d[0] else None, d[1].date() if d[1] else None), "taizhou",
                      {"sensor": "Landsat-7 ETM+", "label_path": str(ref)}, image_valid=c1.valid & c2.valid)


def load_levir(root: str | Path, names: Sequence[str] | None = None) -> list[ChangePair]:
    """LEVIR-CD triplets ``root/{A,B,label}/<name>.png`` (RGB uint8, labels 0/255); all of them by default."""
    from PIL import Image

    root = Path(root)
    if names is None:
        names = sorted(p.stem for p in (root / "A").glob("*.png"))
        if not names:
            raise DinoGeoIOError(f"no LEVIR-CD PNGs in {root / 'A'}", root)
    out = []
    for n in names:
        stem = Path(n).stem
        paths = [root / d / f"{stem}.png" for d in ("A", "B", "label")]
        for p in paths:
            if not p.exists():
                raise DinoGeoIOError(f"LEVIR-CD file {p} is missing", p)
        a = np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        b = np.asarray(Image.open(paths[1]).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        raw = np.asarray(Image.open(paths[2]).convert("L"))
        label, labelled = encode_labels(raw, "binary255" if raw.max() > 1 else "binary", str(paths[2]))
        out.append(ChangePair(np.ascontiguousarray(a), np.ascontiguousarray(b), label, labelled,
                              ("red", "green", "blue"), None, (None, None), stem, {"gsd_m": 0.5}))
    return out


def load_raster_pair(before: str | Path, after: str | Path, label: str | Path | None = None, *,
                     label_encoding: str | dict[str, Sequence[int]] = "auto",
                     bands: Sequence[str | int] | None = None, nodata: float | None = None,
                     name: str | None = None) -> ChangePair:
    """Generic ``before``, ``after`` (any rasters :func:`~dinov3geo.io.open_scene` reads) and ``label`` rasters.

    The after image and the label are read on the before image's grid (nearest neighbour for the label). A label
    without a geotransform is accepted when it has the before image's shape. Without ``label`` the pair is
    unlabelled (``valid`` is all False) and can still be used for prediction.
    """
    b, a, valid, names, grid, t1, t2 = _read_pair(before, after, bands, nodata=nodata)
    image_valid = valid
    if label is not None:
        raw, covered = _read_label_on(Path(label), grid)
        lab, labelled = encode_labels(raw, label_encoding, str(label))
        valid = valid & covered & labelled
    else:
        lab, valid = np.zeros(grid.shape, np.uint8), np.zeros(grid.shape, bool)
    return ChangePair(b, a, lab, valid, names, grid, (t1.date() if t1 else None, t2.date() if t2 else None),
                      name or Path(before).stem, {"before": str(before), "after": str(after), "label": str(label)},
                      image_valid=image_valid)


# ------------------------------------------------------------------------------------------ crops
def d4_transform(arrays: Sequence[np.ndarray], k: int) -> list[np.ndarray]:
    """Apply the same D4 element (``k`` in 0..7: ``k % 4`` quarter turns, then a left-right flip if ``k >= 4``)
    to the last two axes of every array (copies, C-contiguous)."""
    if not 0 <= k < 8:
        raise ValueError(f"k must be in 0..7, got {k}")
    out = []
    for a in arrays:
        t = np.rot90(a, k % 4, axes=(-2, -1))
        if k >= 4:
            t = t[..., ::-1]
        out.append(np.ascontiguousarray(t))
    return out


def _sample(pair: ChangePair, r0: int, c0: int, size: int) -> ChangeSample:
    """A ``size`` crop at (r0, c0), zero-padded (and invalid) past the pair's edge."""
    h, w = pair.shape
    c = pair.before.shape[0]
    b = np.zeros((c, size, size), np.float32)
    a = np.zeros((c, size, size), np.float32)
    lab = np.zeros((size, size), np.uint8)
    val = np.zeros((size, size), bool)
    rr, cc = min(size, h - r0), min(size, w - c0)
    b[:, :rr, :cc] = pair.before[:, r0:r0 + rr, c0:c0 + cc]
    a[:, :rr, :cc] = pair.after[:, r0:r0 + rr, c0:c0 + cc]
    lab[:rr, :cc] = pair.label[r0:r0 + rr, c0:c0 + cc]
    val[:rr, :cc] = pair.valid[r0:r0 + rr, c0:c0 + cc]
    return ChangeSample(b, a, lab, val)


def random_crops(pairs: Sequence[ChangePair], size: int, n: int, rng: np.random.Generator | int = 0, *,
                 augment: bool = True, min_valid: float = 0.25, max_tries: int = 50,
                 positive_fraction: float = 0.0) -> list[ChangeSample]:
    """``n`` random ``size`` crops from ``pairs`` (chosen in proportion to their labelled area), each with a
    random D4 transform when ``augment``. A crop is redrawn (up to ``max_tries``) until at least ``min_valid``
    of it is labelled; a pair smaller than ``size`` gives padded crops. A ``positive_fraction`` of the crops
    is placed (at a random offset) around a random labelled *change* pixel, so that rare change is seen."""
    rng = np.random.default_rng(rng)
    if not pairs:
        raise ValueError("random_crops needs at least one pair")
    weights = np.array([max(int(p.valid.sum()), 0) for p in pairs], np.float64)
    if weights.sum() == 0:
        raise ValueError("no labelled pixel in any pair; nothing to train on")
    weights /= weights.sum()
    positives = [np.argwhere(p.valid & (p.label > 0)) for p in pairs]
    pos_w = np.array([len(q) for q in positives], np.float64)
    out = []
    for i in range(n):
        if pos_w.sum() > 0 and i < round(positive_fraction * n):
            k = int(rng.choice(len(pairs), p=pos_w / pos_w.sum()))
            pair = pairs[k]
            h, w = pair.shape
            r, c = positives[k][int(rng.integers(0, len(positives[k])))]
            r0 = int(np.clip(r - rng.integers(0, size), 0, max(h - size, 0)))
            c0 = int(np.clip(c - rng.integers(0, size), 0, max(w - size, 0)))
            s = _sample(pair, r0, c0, size)
            out.append(ChangeSample(*d4_transform(s, int(rng.integers(0, 8)))) if augment else s)
            continue
        pair = pairs[int(rng.choice(len(pairs), p=weights))]
        h, w = pair.shape
        best = None
        for _t in range(max_tries):
            r0 = int(rng.integers(0, max(h - size, 0) + 1))
            c0 = int(rng.integers(0, max(w - size, 0) + 1))
            s = _sample(pair, r0, c0, size)
            frac = float(s.valid.mean())
            if best is None or frac > best[0]:
                best = (frac, s)
            if frac >= min_valid:
                break
        assert best is not None
        s = best[1]
        if augment:
            s = ChangeSample(*d4_transform(s, int(rng.integers(0, 8))))
        out.append(s)
    return out


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)  # last window shifted back to end at the edge
    return starts


def grid_crops(pair: ChangePair, size: int, stride: int | None = None) -> list[tuple[ChangeSample, tuple[int, int]]]:
    """Crops covering the whole pair on a lattice of step ``stride`` (default ``size``); the last row/column
    is shifted back to end at the edge. Returns ``(sample, (row0, col0))`` pairs."""
    stride = stride or size
    h, w = pair.shape
    return [(_sample(pair, r, c, size), (r, c)) for r in _starts(h, size, stride) for c in _starts(w, size, stride)]


# ------------------------------------------------------------------------------------------ prediction
def predict_pair(model: Any, before: np.ndarray | ChangePair, after: np.ndarray | None = None,
                 valid: np.ndarray | None = None, *, window: int = 256, overlap: int | None = None,
                 batch_size: int | None = None, device: str = "cpu") -> np.ndarray:
    """Run a change :class:`~dinov3geo.inference.RasterModel` (``scale`` 1, one output band) over a whole
    in-memory pair with the inference engine (:func:`dinov3geo.inference.predict_array`: the same windows,
    blending and masking as a raster run).

    Args:
        model: e.g. :class:`~dinov3geo.tasks.change.zeroshot.ZeroShotChange` or a loaded change head.
        before: ``[C, H, W]`` raw values, or a :class:`ChangePair` (then ``after``/``valid`` come from it).
        after: ``[C, H, W]``.
        valid: ``[H, W]`` input mask (default all valid); invalid pixels come out NaN.
        window, overlap: window side and overlap in pixels (default overlap: the engine's; an overlap below
            twice the model's receptive margin is raised to it).
        batch_size: windows per model call (None: chosen by memory for a trained head, as ``detect_change``
            does; 4 for models without a memory estimate, e.g. zero-shot).
        device: torch device of the model.

    Returns:
        ``[H, W]`` float32 scores, NaN where the input is invalid.
    """
    from dinov3geo.inference import predict_array
    from dinov3geo.inference.batching import resolve_batch_size

    if isinstance(before, ChangePair):
        pair = before
        before, after = pair.before, pair.after
        valid = pair.image_valid if valid is None else valid
    if after is None:
        raise ValueError("predict_pair needs the after image (or a ChangePair)")
    if getattr(model, "scale", 1) != 1 or getattr(model, "out_bands", 1) != 1:
        raise ValueError("predict_pair needs a model with scale 1 and one output band")
    x = np.concatenate([before, after], axis=0)
    if overlap is not None:
        overlap = min(max(int(overlap), 2 * int(getattr(model, "receptive_margin", 0)) + 2), window - 1)
    batch_size = resolve_batch_size(model, window, device, batch_size, fallback=4)
    out = predict_array(model, x, valid, window=window, overlap=overlap, batch_size=batch_size, device=device,
                        amp=None)
    return out[0].astype(np.float32, copy=False)
