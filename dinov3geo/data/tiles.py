"""PyTorch dataset over a tile store: random access to georeferenced tiles with their valid masks."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dinov3geo.ingest.store import ChunkReader, TileStore

NormalizeSpec = bool | str | tuple[Sequence[float], Sequence[float]]


class TileDataset(Dataset):
    """Tiles of a store written by :func:`dinov3geo.ingest.ingest` (only completely ingested scenes).

    Each item is a dict:

    * ``image``: float32 ``[bands, T, T]`` tensor (normalised when asked; invalid pixels set to 0 *after*
      normalisation, i.e. to the band mean);
    * ``valid``: bool ``[T, T]`` tensor, True where every band is valid — nodata must never become signal;
    * ``index``, ``scene_id``, ``datetime`` (ISO string or ``""``), ``crs`` (string), ``transform``
      (float64 ``[6]``, GDAL order, of the tile's top-left pixel).

    The store is opened lazily in each process, so the dataset works with ``DataLoader(num_workers>0)``;
    per-tile metadata is held in memory, pixel data is read per item (one Zarr chunk per tile).

    Args:
        store: path of the tile store.
        bands: subset of band names (store order by default).
        normalize: ``False`` (raw values as float), ``True``/``"store"`` (per-band mean/std from the store's
            statistics over valid pixels), or an explicit ``(mean, std)`` pair.
        transform: optional callable applied to the item dict.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        bands: Sequence[str] | None = None,
        normalize: NormalizeSpec = False,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.path = Path(store)
        ts = TileStore.open(self.path)
        names = ts.band_names
        self.band_names = list(bands) if bands is not None else names
        missing = [b for b in self.band_names if b not in names]
        if missing:
            raise KeyError(f"bands {missing} not in tile store {self.path} (it has {names})")
        self.band_index = [names.index(b) for b in self.band_names]
        self.n = ts.n_tiles
        g = ts.group
        self.scene_id = np.asarray(g["scene_id"][: self.n].tolist(), dtype=object)
        self.datetime = np.asarray(g["datetime"][: self.n])
        self.crs = np.asarray(g["crs"][: self.n].tolist(), dtype=object)
        self.transform_ = np.asarray(g["transform"][: self.n], np.float64)
        self.valid_fraction = np.asarray(g["valid_fraction"][: self.n], np.float32)
        self.tile_size = ts.tile_size
        self.mean, self.std = self._norm(ts, normalize)
        self.transform = transform
        self._tiles: Any = None
        self._valid: Any = None

    def _norm(self, ts: TileStore, normalize: NormalizeSpec) -> tuple[np.ndarray | None, np.ndarray | None]:
        if normalize is False:
            return None, None
        if normalize is True or normalize == "store":
            st = ts.stats
            if not st:
                raise ValueError(f"tile store {self.path} has no statistics yet (no scene ingested)")
            mean = np.asarray([st["mean"][i] for i in self.band_index], np.float32)
            std = np.asarray([st["std"][i] for i in self.band_index], np.float32)
        else:
            mean, std = (np.asarray(v, np.float32) for v in normalize)  # type: ignore[misc]
        if mean.shape != (len(self.band_index),) or std.shape != mean.shape:
            raise ValueError(f"normalisation needs one mean and std per band ({len(self.band_index)})")
        return mean, np.where(std > 0, std, 1.0).astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_tiles"] = d["_valid"] = None  # reopen in each worker process
        return d

    def _open(self) -> None:
        import zarr

        self._tiles = ChunkReader(zarr.open_array(str(self.path / "tiles"), mode="r"))
        self._valid = ChunkReader(zarr.open_array(str(self.path / "valid"), mode="r"))

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(pixels [bands, T, T], valid [T, T])`` of one tile as numpy arrays."""
        if not -self.n <= index < self.n:
            raise IndexError(f"tile {index} out of range for {self.n} tiles")
        index %= self.n
        if self._tiles is None:
            self._open()
        data = self._tiles[index]
        if self.band_index != list(range(data.shape[0])):
            data = data[self.band_index]
        return data, self._valid[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        data, valid = self.read(index)
        img = data.astype(np.float32)
        if self.mean is not None:
            img = (img - self.mean[:, None, None]) / self.std[:, None, None]
            img[:, ~valid] = 0.0
        dt = self.datetime[index]
        item = {
            "image": torch.from_numpy(img),
            "valid": torch.from_numpy(np.ascontiguousarray(valid, dtype=bool)),
            "index": int(index),
            "scene_id": str(self.scene_id[index]),
            "datetime": "" if np.isnat(dt) else str(np.datetime_as_string(dt, unit="s")),
            "crs": str(self.crs[index]),
            "transform": torch.from_numpy(self.transform_[index].copy()),
        }
        return self.transform(item) if self.transform is not None else item
