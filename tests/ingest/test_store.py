"""Tile store layout: flat chunk keys, and moving tiles by renaming their chunk files (both key layouts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from dinov3geo.ingest.store import TileStore


def _fill(ts: TileStore, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ts.begin_scene("s", n)
    data = rng.integers(1, 1000, size=(n, 2, 8, 8), dtype=np.uint16)
    valid = np.ones((n, 8, 8), bool)
    valid[::2, :3, :] = False  # masks on every other tile; all-valid masks store no chunk
    ts.group["tiles"][:n] = data
    ts.group["valid"][:n] = valid
    return data, valid


def test_new_store_writes_one_flat_file_per_tile(tmp_path: Path) -> None:
    ts = TileStore.create(tmp_path / "s.zarr", ["a", "b"], 8, "uint16")
    _fill(ts, 5)
    folder = tmp_path / "s.zarr" / "tiles"
    chunks = sorted(p.name for p in folder.iterdir() if p.name != "zarr.json")
    assert chunks == [f"c.{i}.0.0.0" for i in range(5)]
    assert all(p.is_file() for p in folder.iterdir())  # no per-tile folders
    vfolder = tmp_path / "s.zarr" / "valid"
    assert sorted(p.name for p in vfolder.iterdir() if p.name != "zarr.json") == ["c.0.0.0", "c.2.0.0", "c.4.0.0"]


@pytest.mark.parametrize("separator", [".", "/"])
def test_move_tiles_renames_chunks(tmp_path: Path, separator: str) -> None:
    ts = TileStore.create(tmp_path / "s.zarr", ["a", "b"], 8, "uint16")
    if separator == "/":  # a store written before chunk keys were flat: c/<tile>/0/0/0
        g = ts.group
        g.create_array("tiles", shape=(0, 2, 8, 8), chunks=(1, 2, 8, 8), dtype="uint16", fill_value=0,
                       dimension_names=["tile", "band", "y", "x"], overwrite=True)
        g.create_array("valid", shape=(0, 8, 8), chunks=(1, 8, 8), dtype=bool, fill_value=True,
                       dimension_names=["tile", "y", "x"], overwrite=True)
    data, valid = _fill(ts, 7)
    ts.move_tiles(4, 1, 3)  # slots 1..3 <- 4..6 (tile 4's mask moves; tile 1's stale mask must go)
    ts.shrink_pending(4)
    t = zarr.open_array(str(tmp_path / "s.zarr" / "tiles"))
    v = zarr.open_array(str(tmp_path / "s.zarr" / "valid"))
    np.testing.assert_array_equal(t[:], data[[0, 4, 5, 6]])
    np.testing.assert_array_equal(v[:], valid[[0, 4, 5, 6]])
    # no empty folders left behind by moved chunks
    assert not [d for d in (tmp_path / "s.zarr").rglob("*") if d.is_dir() and not any(d.iterdir())]


def test_move_tiles_refuses_upward_moves(tmp_path: Path) -> None:
    ts = TileStore.create(tmp_path / "s.zarr", ["a", "b"], 8, "uint16")
    _fill(ts, 3)
    with pytest.raises(ValueError, match="only move down"):
        ts.move_tiles(0, 2, 1)


@pytest.mark.parametrize("codec", ["store", "zstd", "other"])
def test_chunk_reader_equals_zarr(tmp_path: Path, codec: str) -> None:
    """Direct chunk reads equal Zarr's for the store's codecs, Zarr's default and a fallback codec; missing
    chunks read as the fill value; damaged chunks raise an error naming the file."""
    from zarr.codecs import GzipCodec

    from dinov3geo.ingest.store import ChunkReader, TileStoreError

    ts = TileStore.create(tmp_path / "s.zarr", ["a", "b"], 8, "uint16")
    if codec != "store":
        kw = {} if codec == "zstd" else {"compressors": GzipCodec()}
        ts.group.create_array("tiles", shape=(0, 2, 8, 8), chunks=(1, 2, 8, 8), dtype="uint16", fill_value=0,
                              overwrite=True, **kw)
        ts.group.create_array("valid", shape=(0, 8, 8), chunks=(1, 8, 8), dtype=bool, fill_value=True,
                              overwrite=True, **kw)
    data, valid = _fill(ts, 5)
    tiles, vmask = ChunkReader(ts.group["tiles"]), ChunkReader(ts.group["valid"])
    assert (tiles._decoder is None) == (codec == "other")
    for i in range(5):
        got = tiles[i]
        assert got.dtype == np.uint16 and got.flags.writeable
        np.testing.assert_array_equal(got, data[i])
        np.testing.assert_array_equal(vmask[i], valid[i])  # odd tiles: no mask chunk -> fill True
    if codec == "store":
        chunk = tmp_path / "s.zarr" / "tiles" / "c.3.0.0.0"
        chunk.write_bytes(chunk.read_bytes()[:-5])
        with pytest.raises(TileStoreError, match="c.3.0.0.0"):
            tiles[3]
