"""Pretrain on any torchgeo ``GeoDataset`` + sampler, through the same interface as :class:`TileDataset`.

torchgeo users keep their datasets (``RasterDataset``, ``Landsat8``, ``Sentinel2``, intersections...) and
samplers (``RandomGeoSampler``, ``GridGeoSampler``...). :class:`GeoDatasetTiles` draws the sampler's queries
once (a fixed, reproducible list: the SSL sampler then permutes it per pass), reads each query through the
dataset, and returns items shaped like the tile store's: ``image`` float32 ``[C, T, T]``, ``valid``
``[T, T]`` (the dataset's ``nodata`` value, NaNs and all-zero fill of torchgeo's merge outside the rasters are
invalid), ``index``. Per-band statistics over valid pixels are computed from (up to) 64 samples for
normalisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class GeoDatasetTiles(Dataset):
    """A torchgeo ``GeoDataset`` seen as a list of tiles (see module docstring).

    Args:
        dataset: a torchgeo ``GeoDataset`` whose samples have an ``image`` tensor.
        sampler: an iterable of queries (a torchgeo ``GeoSampler``); it must be finite (give ``length``).
        band_names: names of the image bands (default: ``dataset.bands`` or ``b1..bN``).
        nodata: value marking invalid pixels (default: ``dataset.nodata`` when it has one, else 0 where
            every band is 0 — torchgeo fills the area outside the rasters with 0).
        normalize: standardise bands with statistics over valid pixels of up to ``stats_samples`` samples.
    """

    def __init__(self, dataset: Any, sampler: Iterable[Any], band_names: Sequence[str] | None = None,
                 nodata: float | None = None, normalize: bool = True, stats_samples: int = 64) -> None:
        self.dataset = dataset
        self.queries = list(sampler)
        if not self.queries:
            raise ValueError("the sampler produced no queries; check its size/length against the dataset bounds")
        first = self._raw(0)[0]
        n_bands = first.shape[0]
        names = band_names or list(getattr(dataset, "bands", None) or []) or [f"b{i + 1}" for i in range(n_bands)]
        if len(names) != n_bands:
            raise ValueError(f"{len(names)} band names for {n_bands} bands")
        self.band_names = list(names)
        self.nodata = nodata if nodata is not None else getattr(dataset, "nodata", None)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        if normalize:
            vals = []
            for i in np.linspace(0, len(self.queries) - 1, min(stats_samples, len(self.queries))).astype(int):
                img, valid = self._raw(int(i))
                vals.append(img[:, valid].double())
            v = torch.cat(vals, dim=1)
            if v.shape[1] == 0:
                raise ValueError("no valid pixels in the sampled queries")
            self.mean = v.mean(1).float().numpy()
            self.std = v.std(1).clamp(min=1e-6).float().numpy()

    def __len__(self) -> int:
        return len(self.queries)

    def _raw(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.dataset[self.queries[index]]
        img = sample["image"].float()
        if img.ndim == 4:  # [T, C, H, W] time series: take the first date
            img = img[0]
        finite = torch.isfinite(img).all(0)
        nd = getattr(self, "nodata", None)
        if nd is not None and not np.isnan(nd):
            valid = finite & ~(img == nd).any(0)
        else:
            valid = finite & ~(img == 0).all(0)
        return torch.nan_to_num(img), valid

    def __getitem__(self, index: int) -> dict[str, Any]:
        img, valid = self._raw(index)
        if self.mean is not None and self.std is not None:
            img = (img - torch.from_numpy(self.mean)[:, None, None]) / torch.from_numpy(self.std)[:, None, None]
        img = img.masked_fill(~valid, 0.0)
        return {"image": img.contiguous(), "valid": valid, "index": int(index)}
