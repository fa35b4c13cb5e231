"""The pretraining data path: tile store -> multi-crop -> collated batches, a pure function of the iteration.

Exact resumption needs the data of iteration ``it`` to be the same whether or not the run was interrupted.
:class:`IterationSampler` therefore yields ``(pass, index)`` keys computed from the iteration alone (a
fresh seeded permutation of the store per pass over it, split across ranks), and :class:`SSLTileDataset`
seeds each sample's augmentation from ``(seed, pass, index)``; the iBOT masks are seeded from the batch's
sample indices by :class:`~dinov3geo.data.collate.MultiCropCollator`. Nothing depends on worker count or
on state held by a DataLoader.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinov3geo.data.augmentations import MultiCropAugmentation, generator_for
from dinov3geo.data.collate import MultiCropCollator
from dinov3geo.data.tiles import TileDataset
from dinov3geo.ssl.config import SSLConfig


class IterationSampler(Sampler[tuple[int, int, int]]):
    """Infinite sampler of ``(pass, index, resolution)`` keys starting at ``start_iteration``.

    Global sample position ``p = (it * world_size + rank) * batch_size + j`` maps to pass ``p // n`` and to
    ``permutation(seed, pass)[p % n]``. Every rank sees disjoint samples of the same global batch. With
    ``shares`` (high-resolution adaptation), each iteration draws one resolution id from ``(seed, it)`` with
    these probabilities; all ranks use the same id, so a global batch has one crop size.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_iteration: int = 0, rank: int = 0,
                 world_size: int = 1, shares: Sequence[float] | None = None) -> None:
        if n <= 0:
            raise ValueError("the tile store holds no tiles; ingest scenes first")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_iteration, self.rank, self.world_size = start_iteration, rank, world_size
        self._perm_cache: dict[int, np.ndarray] = {}
        if shares is not None:
            w = np.asarray(shares, np.float64)
            if w.ndim != 1 or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"resolution shares must be non-negative and sum > 0, got {list(shares)}")
            self.cum = np.cumsum(w / w.sum())
        else:
            self.cum = None

    def resolution_for_iteration(self, it: int) -> int:
        if self.cum is None:
            return 0
        u = np.random.default_rng([self.seed, 7, it]).random()
        return int(min(np.searchsorted(self.cum, u, side="right"), len(self.cum) - 1))

    def _perm(self, p: int) -> np.ndarray:
        if p not in self._perm_cache:
            self._perm_cache = {p: np.random.default_rng([self.seed, p]).permutation(self.n)}
        return self._perm_cache[p]

    def keys_for_iteration(self, it: int) -> list[tuple[int, int, int]]:
        """The ``(pass, index, resolution)`` keys of this rank's part of iteration ``it``."""
        base = (it * self.world_size + self.rank) * self.batch_size
        r = self.resolution_for_iteration(it)
        out = []
        for j in range(self.batch_size):
            pos = base + j
            p = pos // self.n
            out.append((p, int(self._perm(p)[pos % self.n]), r))
        return out

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        it = self.start_iteration
        while True:
            yield from self.keys_for_iteration(it)
            it += 1


class SSLTileDataset(Dataset):
    """Tiles with their multi-crop views; indexed by ``(pass, index, resolution)`` keys of
    :class:`IterationSampler` (``augmentation`` may be a list: one per resolution of a mix)."""

    def __init__(self, tiles: TileDataset, augmentation: MultiCropAugmentation | list[MultiCropAugmentation],
                 seed: int = 0) -> None:
        self.tiles = tiles
        self.augmentations = augmentation if isinstance(augmentation, list) else [augmentation]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: tuple[int, ...] | int) -> dict[str, Any]:
        p, index, r = (tuple(key) + (0,))[:3] if isinstance(key, tuple) else (0, key, 0)
        item = self.tiles[index]
        aug = self.augmentations[r]
        crops = aug(item["image"], item["valid"], generator=generator_for(self.seed, p, index))
        crops["index"] = index
        return crops


def build_augmentation(cfg: SSLConfig, band_names: Sequence[str], *, rgb: bool = False,
                       mean: Any = None, std: Any = None, value_range: tuple[float, float] | None = None,
                       sizes: dict[str, Any] | None = None) -> MultiCropAugmentation:
    """The multi-crop augmentation of a stage config.

    For RGB stores the augmentation sees raw values (``value_range`` maps them to [0, 1]) so the RGB colour
    operations of the recipe apply, then normalises with ``mean``/``std`` (store statistics in [0, 1]
    units). Other band sets arrive already normalised from the tile dataset and get per-band
    brightness/contrast jitter and blur only.
    """
    c = cfg.crops
    sz = {"global_crops_size": c.global_crops_size, "local_crops_size": c.local_crops_size,
          "gram_teacher_crops_size": c.gram_teacher_crops_size, **(sizes or {})}
    return MultiCropAugmentation(
        global_crops_size=int(sz["global_crops_size"]),
        local_crops_size=int(sz["local_crops_size"]),
        local_crops_number=c.local_crops_number,
        global_crops_scale=tuple(c.global_crops_scale),  # type: ignore[arg-type]
        local_crops_scale=tuple(c.local_crops_scale),  # type: ignore[arg-type]
        gram_teacher_crops_size=sz["gram_teacher_crops_size"],
        gram_teacher_no_distortions=c.gram_teacher_no_distortions,
        band_names=band_names,
        rgb=rgb,
        mean=mean,
        std=std,
        value_range=value_range,
        horizontal_flips=c.horizontal_flips,
        vertical_flips=c.vertical_flips,
        rotations=c.rotations,
        blur_mode=c.blur_mode,  # type: ignore[arg-type]
        min_valid_fraction=cfg.data.min_valid_fraction,
    )


def build_dataset(cfg: SSLConfig, tiles: Any = None) -> SSLTileDataset:
    """Tile dataset + augmentation of a stage (see :func:`build_augmentation` for RGB vs other bands).

    ``tiles`` replaces the tile store by any dataset with the :class:`TileDataset` item interface and a
    ``band_names`` attribute (e.g. :class:`dinov3geo.data.torchgeo.GeoDatasetTiles`), already normalised.
    """
    from dinov3geo.data.augmentations import is_rgb
    from dinov3geo.ingest.store import TileStore

    mix = _resolution_sizes(cfg)
    if tiles is not None:
        return SSLTileDataset(tiles, [build_augmentation(cfg, list(tiles.band_names), rgb=False, sizes=m)
                                      for m in mix], seed=cfg.train.seed)
    if not cfg.data.store:
        raise ValueError("data.store is not set: point it at a tile store made by `dinov3geo ingest`")
    store = TileStore.open(cfg.data.store)
    bands = cfg.data.bands or store.band_names
    norm = cfg.data.normalize
    if is_rgb(bands) and norm != "none":
        hi = 255.0 if store.dtype == np.uint8 else float(max(store.stats["max"][store.band_names.index(b)]
                                                            for b in bands))
        if norm == "store":
            idx = [store.band_names.index(b) for b in bands]
            mean = [store.stats["mean"][i] / hi for i in idx]
            std = [store.stats["std"][i] / hi for i in idx]
        else:
            mean, std = [float(v) for v in norm[0]], [float(v) for v in norm[1]]  # type: ignore[index]
        tiles = TileDataset(cfg.data.store, bands=bands, normalize=False)
        augs = [build_augmentation(cfg, bands, rgb=True, mean=mean, std=std, value_range=(0.0, hi), sizes=m)
                for m in mix]
    else:
        tiles = TileDataset(cfg.data.store, bands=bands, normalize=_normalize_arg(cfg))
        augs = [build_augmentation(cfg, bands, rgb=False, sizes=m) for m in mix]
    return SSLTileDataset(tiles, augs, seed=cfg.train.seed)


_MIX_KEYS = {"global_crops_size", "local_crops_size", "gram_teacher_crops_size", "share"}


def _resolution_sizes(cfg: SSLConfig) -> list[dict[str, Any]]:
    """Crop sizes per resolution of ``crops.resolution_mix`` (one entry of the single sizes without a mix)."""
    mix = cfg.crops.resolution_mix
    if not mix:
        return [{}]
    out = []
    for i, m in enumerate(mix):
        unknown = set(m) - _MIX_KEYS
        if unknown or "global_crops_size" not in m:
            raise ValueError(f"crops.resolution_mix[{i}]: keys must be among {sorted(_MIX_KEYS)} and include "
                             f"global_crops_size (unknown: {sorted(unknown)})")
        out.append({k: v for k, v in m.items() if k != "share"})
    return out


def build_dataloader(cfg: SSLConfig, start_iteration: int = 0, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False, tiles: Any = None) -> tuple[DataLoader, Any]:
    """DataLoader of collated multi-crop batches for a stage, starting at ``start_iteration``."""
    ds = build_dataset(cfg, tiles)
    tiles = ds.tiles
    shares = [float(m.get("share", 1.0)) for m in cfg.crops.resolution_mix] or None
    sampler = IterationSampler(len(tiles), cfg.data.batch_size, seed=cfg.train.seed,
                               start_iteration=start_iteration, rank=rank, world_size=world_size, shares=shares)
    collate = MultiCropCollator(
        patch_size=cfg.student.patch_size, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability, seed=cfg.train.seed,
    )
    nw = cfg.data.num_workers
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate, num_workers=nw,
                        pin_memory=pin_memory, persistent_workers=nw > 0, prefetch_factor=4 if nw > 0 else None,
                        drop_last=True)
    return loader, tiles


def batch_to(data: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a collated batch to ``device`` (non-blocking)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in data.items()}


def _normalize_arg(cfg: SSLConfig) -> Any:
    n = cfg.data.normalize
    if n == "store":
        return True
    if n == "none":
        return False
    if isinstance(n, list) and len(n) == 2:
        return (n[0], n[1])
    raise ValueError(f"data.normalize must be 'store', 'none' or [[mean...], [std...]], got {n!r}")
