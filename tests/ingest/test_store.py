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


@pytest.mark.parametrize("codec", ["store", "zstd", "other", "slash"])
def test_chunk_writer_writes_what_zarr_writes(tmp_path: Path, codec: str) -> None:
    """Direct chunk writes give the same chunk files, byte for byte, as Zarr's writes of the same data (the
    store's Blosc codecs, Zarr's default Zstandard, the old "/" key layout); other codecs go through Zarr;
    all-zero tiles store no chunk (fill value 0); out-of-range writes are refused."""
    from zarr.codecs import GzipCodec

    from dinov3geo.ingest.store import ChunkWriter

    def make(name: str) -> TileStore:
        ts = TileStore.create(tmp_path / name, ["a", "b"], 8, "uint16")
        if codec != "store":
            kw: dict = {"compressors": GzipCodec()} if codec == "other" else {}
            if codec == "slash":
                kw["compressors"] = ts.group["tiles"].metadata.codecs[1]
            ts.group.create_array("tiles", shape=(0, 2, 8, 8), chunks=(1, 2, 8, 8), dtype="uint16", fill_value=0,
                                  overwrite=True, **kw)
            ts.group.create_array("valid", shape=(0, 8, 8), chunks=(1, 8, 8), dtype=bool, fill_value=True,
                                  overwrite=True, **kw)
        ts.begin_scene("s", 6)
        return ts

    rng = np.random.default_rng(3)
    data = rng.integers(0, 3000, size=(6, 2, 8, 8), dtype=np.uint16)
    data[4] = 0  # equal to the fill value
    valid = rng.random((6, 8, 8)) > 0.2
    ref, new = make("zarr.zarr"), make("direct.zarr")
    ref.group["tiles"][:6] = data
    ref.group["valid"][:6] = valid
    tiles, vmask = ChunkWriter(new.group["tiles"]), ChunkWriter(new.group["valid"])
    assert (tiles._encoder is None) == (codec == "other")
    tiles.write(0, data[:2])
    tiles.write(2, data[2:])
    for i in range(6):
        vmask.write(i, valid[i : i + 1])

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("c*")) if p.is_file()}

    for arr in ("tiles", "valid"):
        want, got = files(tmp_path / "zarr.zarr" / arr), files(tmp_path / "direct.zarr" / arr)
        assert got == want, arr
    assert "c.4.0.0.0" not in files(tmp_path / "direct.zarr" / "tiles") or codec == "slash"
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "direct.zarr" / "tiles"))[:], data)
    with pytest.raises(IndexError, match="direct.zarr"):
        tiles.write(5, data[:2])
